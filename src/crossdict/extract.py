"""Stage 1, text -> activations: run the same passages through both models and cache hidden states.

For every passage we first cut it to the characters that fit *both* tokenizers' `max_ctx`, so the
two models read exactly the same text. Each shard of passages is written atomically with a
`done.json` marker; an interrupted extraction resumes at the first shard without one.

Under torchrun the shards still to do are dealt round-robin to the ranks; each rank writes its own
shards into the one cache directory, and rank 0 writes the manifest once every shard is done. A
shard's bytes do not depend on which rank wrote it, so N ranks produce exactly 1 rank's cache, and
a rerun after a crash (of any rank) redoes only the shards without a marker.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .anchors import anchor_pairs
from .backend import Backend, load_backend
from .cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    ActivationCache,
    CacheMismatchError,
    ShardData,
    hook_name,
    shard_dir,
    shard_is_done,
    write_manifest,
    write_row_masks,
    write_shard,
)
from .config import RunConfig
from .corpus import check_splits, check_text_quality, common_prefix_length, is_heldout, passages
from .distributed import Dist, check_same_config, split_work
from .models import check_layers
from .integrity import CorruptFileError, problem
from .utils import atomic_save_npy, atomic_write_json, load_npy, read_json, remove_file, resolve_device, stable_hash


def cache_key(cfg: RunConfig) -> dict:
    """What a cache depends on; a cache made under a different key is refused, not silently reused."""
    models = {
        k: {"name": m.name, "layers": m.layers, "max_ctx": m.max_ctx, "dtype": m.dtype, "backend": m.backend}
        for k, m in (("a", cfg.model_a), ("b", cfg.model_b))
    }
    extract = {k: v for k, v in cfg.to_dict()["extract"].items() if k not in _SIDE_OUTPUTS}
    if extract.get("autocast") == "off":  # caches made before the option existed stay valid
        extract.pop("autocast")
    return {"models": models, "corpus": cfg.to_dict()["corpus"], "extract": extract, "version": CACHE_VERSION}


_SIDE_OUTPUTS = ("random_floor", "layer_sweep_tokens")
"""`extract` keys that shape only the floor and the sweep (their own files and keys), not the main cache."""


def _describe_mismatch(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _describe_mismatch(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: cache has {a!r}, config asks {b!r}")
    return diffs


def check_existing(cache_dir: Path, key: dict) -> dict | None:
    """The existing manifest if it was made for `key`; raise if it was made for something else."""
    path = cache_dir / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = read_json(path, "activation cache manifest")
    except CorruptFileError as e:  # without it the shards cannot be tied to a config: no automatic redo
        raise CorruptFileError(f"{e.args[0].split(';')[0]}; delete {cache_dir} and rerun `crossdict extract`") from None
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheMismatchError(f"{path} is not a crossdict activation cache; move it away or pick another run_name")
    if manifest.get("key") != key:
        diffs = _describe_mismatch(manifest.get("key", {}), key)
        raise CacheMismatchError(
            f"the activation cache in {cache_dir} was made for another config:\n  " + "\n  ".join(diffs)
            + f"\nUse another run_name (--set run_name=NEW), or delete the cache to re-extract (rm -r {cache_dir}; "
            "every later stage then reruns)."
        )
    return manifest


def truncate_to_common(texts: list[str], backends: dict[str, Backend], max_ctx: dict[str, int]) -> list[str]:
    keys = list(backends)
    toks = [backends[k].tokenizer for k in keys]
    n_special = [int(backends[k].has_bos) for k in keys]
    ctx = [max_ctx[k] for k in keys]
    return [t[: common_prefix_length(t, toks, ctx, n_special)] for t in texts]


def autocast_dtype(cfg: RunConfig, backend: Backend) -> torch.dtype | None:
    """`extract.autocast` as a dtype where it applies (a CUDA model), else None: fp32 matmuls."""
    if cfg.extract.autocast == "off":
        return None
    device = getattr(backend, "device", torch.device("cpu"))
    if torch.device(device).type != "cuda":
        warnings.warn(f"extract.autocast={cfg.extract.autocast} applies on CUDA only; {backend.name} runs on "
                      f"{device}, so it is extracted in float32", stacklevel=2)
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.extract.autocast]


def content_states(
    backend: Backend, texts: list[str], max_ctx: int, layers: list[int], batch_size: int,
    amp: torch.dtype | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, dict[int, torch.Tensor]]]:
    """Per text: content-token rows `[n_tok, 4]` (position, char_start, char_end, token_id) and
    `{layer: [n_tok, d_model]}` hidden states; BOS and padding dropped.

    `amp`: run the forward under CUDA autocast in this dtype (weights stay as loaded; the captured
    states are cast back to float32 by the backend)."""
    for start in range(0, len(texts), batch_size):
        batch = backend.tokenize(texts[start : start + batch_size], max_ctx)
        with torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext():
            states = backend.hidden_states(batch, layers)
        content = batch.is_content
        for i in range(len(batch.texts)):
            keep = content[i].nonzero().squeeze(1)
            rows = np.column_stack([keep.numpy(), batch.offsets[i, keep].numpy(), batch.input_ids[i, keep].numpy()])
            yield rows, {layer: states[layer][i, keep] for layer in layers}


def extract_shard(
    texts: list[str], passage_ids: list[int], heldout: list[bool], backends: dict[str, Backend],
    cfg: RunConfig, store_dtype: np.dtype,
) -> ShardData:
    """Hidden states, token index and anchors for one shard of passages."""
    tokens = {k: [] for k in backends}
    acts = {k: {layer: [] for layer in cfg.model(k).layers} for k in backends}
    offsets = {k: [] for k in backends}
    for k, backend in backends.items():
        mcfg = cfg.model(k)
        per_text = content_states(backend, texts, mcfg.max_ctx, mcfg.layers, cfg.extract.batch_size,
                                  autocast_dtype(cfg, backend))
        for pid, ho, (rows, states) in zip(passage_ids, heldout, per_text):
            n = len(rows)
            tokens[k].append(np.column_stack([np.full(n, pid), rows, np.full(n, int(ho))]))
            for layer in mcfg.layers:
                acts[k][layer].append(states[layer].cpu().numpy().astype(store_dtype))
            offsets[k].append(rows[:, 1:3])
    anchors = []
    n_rows = {k: 0 for k in backends}
    for i, text in enumerate(texts):
        pairs = anchor_pairs(offsets["a"][i], offsets["b"][i], text, cfg.extract.pairing)
        anchors.append(pairs + np.array([n_rows["a"], n_rows["b"]]))
        for k in backends:
            n_rows[k] += len(offsets[k][i])
    cat = lambda xs, d: np.concatenate(xs) if xs else np.zeros((0, d))  # noqa: E731
    return ShardData(
        tokens={k: cat(v, 6).astype(np.int64) for k, v in tokens.items()},
        acts={k: {layer: cat(v, backends[k].d_model).astype(store_dtype) for layer, v in lay.items()} for k, lay in acts.items()},
        anchors=cat(anchors, 2).astype(np.int64),
        texts=dict(zip(passage_ids, texts)),
    )


def load_backends(cfg: RunConfig, device: torch.device | None = None) -> dict[str, Backend]:
    """Both models, behind their configured backends; layer indices checked against the real depth.

    `device`: where to put them (a torchrun rank's own GPU); default `cfg.device` resolved."""
    backends = {}
    device = device if device is not None else resolve_device(cfg.device)
    for k in ("a", "b"):
        m = cfg.model(k)
        check_layers(m.name, m.layers, key=f"model_{k}")  # from the config alone, before loading weights
        backends[k] = load_backend(m.name, m.backend, m.dtype, str(device))
        check_layers(m.name, m.layers, backends[k].n_layers, key=f"model_{k}")
    return backends


def run_extract(cfg: RunConfig, backends: dict[str, Backend] | Callable[[], dict] | None = None,
                progress: bool = True, dist: Dist | None = None) -> ActivationCache:
    """Fill (or reuse) `runs/<name>/cache/`, then the floor and sweep caches; returns the main cache's reader.

    `backends`: the loaded models, or a function that loads them (called only if a model must run).
    `dist` (from `distributed.init_dist`): this rank's place in a torchrun job; every rank calls this.
    """
    dist = dist or Dist(device=resolve_device(cfg.device))
    if dist.enabled:
        check_same_config(dist, cfg.to_dict())
    load = _once(backends if callable(backends) else (lambda: backends or load_backends(cfg, dist.device)))
    cache = _main_cache(cfg, load, progress, dist)
    if dist.is_main:  # the rows every later stage leaves out (cache.py, "Row mask"); seconds, idempotent
        _report_masks(write_row_masks(cache, cfg.sae.max_norm_ratio))
    dist.barrier()
    cache = ActivationCache(cache.dir)  # every rank reads the manifest with its mask field
    need_floor = cfg.extract.random_floor and not _floor_is_current(cfg, cache)
    need_sweep = cfg.extract.layer_sweep_tokens > 0 and not _sweep_is_current(cfg, cache) and dist.is_main
    dist.barrier()  # every rank has read the floor's state before rank 0 rewrites its manifest
    if need_floor or need_sweep:
        backends = load()
    if need_floor:
        extract_random_floor(cfg, backends, cache, progress, dist)
    if need_sweep:  # a few passages: not worth splitting
        extract_layer_sweep(cfg, backends, cache)
    dist.barrier()
    return cache


def _once(load: Callable[[], dict]) -> Callable[[], dict]:
    """`load` called at most once: the main cache, the random floor and the sweep share one load of
    both models (each load of the two packaged models costs ~10 s of CPU and their memory)."""
    got: list[dict] = []
    return lambda: got[0] if got else (got.append(load()) or got[0])


def _report_masks(field_: dict) -> None:
    parts = [f"{k}{layer}: {info['dropped']} ({info['dropped_sink']} sink, {info['dropped_massive']} massive)"
             for k, layers in field_["layers"].items() for layer, info in layers.items()]
    print(f"[crossdict] extract: row mask (max_norm_ratio {field_['max_norm_ratio']}) drops rows " + ", ".join(parts))


def _floor_key(cfg: RunConfig, cache: ActivationCache) -> dict:
    return {"main_cache": cache.manifest["key"], "corpus_fingerprint": cache.manifest.get("corpus_fingerprint"),
            "seed": cfg.seed, "layers_b": cfg.model_b.layers}


def _floor_is_current(cfg: RunConfig, cache: ActivationCache) -> bool:
    path = cfg.run_dir / RANDOM_CACHE / "manifest.json"
    if not path.is_file():
        return False
    m = read_json(path, "random-floor manifest")
    return m.get("key") == _floor_key(cfg, cache) and bool(m.get("complete")) and all(
        [shard_is_done(path.parent, s) for s in range(int(m.get("n_shards", 0)))])  # damaged shards are redone


def _sweep_key(cfg: RunConfig, cache: ActivationCache) -> dict:
    return {"main_cache": cache.manifest["key"], "n_max": cfg.extract.layer_sweep_tokens}


def _sweep_is_current(cfg: RunConfig, cache: ActivationCache) -> bool:
    path = cache.dir / LAYER_SWEEP / "sweep.json"
    files = [path.parent / f for f in ("a.npy", "b.npy", "passage_id.npy")]
    return path.is_file() and read_json(path, "layer sweep").get("key") == _sweep_key(cfg, cache) and all(
        f.is_file() and problem(f) is None for f in files)  # damaged: swept again


def check_corpus(cfg: RunConfig, texts: list[str]) -> None:
    """Refuse text that is mostly U+FFFD/control characters, and splits too small for align."""
    check_text_quality(texts, cfg.corpus.source)
    need = cfg.align.min_passages if (cfg.align.n_bootstrap or cfg.align.n_null) else 1
    check_splits(texts, cfg.corpus.heldout_fraction, need, cfg.corpus.source)


def _shards_intact(cache_dir: Path, manifest: dict, dist: Dist) -> bool:
    """Every shard of a complete cache still matches its digests; rank 0 checks (and drops the
    markers of damaged shards, so they are extracted again), the other ranks hear the answer."""
    ok = all([shard_is_done(cache_dir, s) for s in range(int(manifest["n_shards"]))]) if dist.is_main else None
    return bool(dist.broadcast_object(ok))


def _main_cache(cfg: RunConfig, load: Callable[[], dict], progress: bool, dist: Dist) -> ActivationCache:
    for k in ("a", "b"):  # cheap checks first: no model is loaded for a bad layer index
        check_layers(cfg.model(k).name, cfg.model(k).layers, key=f"model_{k}")
    cache_dir = cfg.cache_dir
    key = cache_key(cfg)
    manifest = check_existing(cache_dir, key)
    if manifest is not None and manifest.get("complete") and _shards_intact(cache_dir, manifest, dist):
        if dist.is_main:
            print(f"[crossdict] extract: reusing complete cache {cache_dir} ({manifest['counts']['n_tokens_a']} + "
                  f"{manifest['counts']['n_tokens_b']} tokens, pairing rate {manifest['counts']['pairing_rate']:.3f})")
        return ActivationCache(cache_dir)
    dist.barrier()  # every rank has read the old manifest before rank 0 rewrites it

    torch.manual_seed(cfg.seed)
    texts = passages(cfg.corpus)
    check_corpus(cfg, texts)  # before any model loads: junk or too little text fails now, not after extraction
    backends = load()
    texts = truncate_to_common(texts, backends, {k: cfg.model(k).max_ctx for k in backends})
    kept = [(i, t) for i, t in enumerate(texts) if t]
    heldout = [is_heldout(t, cfg.corpus.heldout_fraction) for _, t in kept]
    n_shards = (len(kept) + cfg.extract.shard_passages - 1) // cfg.extract.shard_passages
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "crossdict": __version__,
        "key": key,
        "complete": False,
        "n_shards": n_shards,
        "dtype": cfg.extract.store_dtype,
        "corpus_fingerprint": stable_hash(texts),
        "models": {
            k: {
                "name": cfg.model(k).name,
                "source": backends[k].info,
                "tokenizer": type(backends[k].tokenizer).__name__,
                "vocab_size": len(backends[k].tokenizer),
                "bos": backends[k].has_bos,
                "n_layers": backends[k].n_layers,
                "d_model": backends[k].d_model,
                "layers": cfg.model(k).layers,
                "hooks": [hook_name(layer) for layer in cfg.model(k).layers],
            }
            for k in ("a", "b")
        },
    }
    sp = cfg.extract.shard_passages
    if dist.enabled:
        split_work(n_shards, dist, f"extraction shards ({len(kept)} passages, extract.shard_passages={sp})",
                   "lower extract.shard_passages for more, smaller shards")
    if dist.is_main:
        write_manifest(cache_dir, manifest)

    store_dtype = np.dtype(cfg.extract.store_dtype)
    t0 = time.perf_counter()
    n_new = 0
    todo = [s for s in range(n_shards) if not shard_is_done(cache_dir, s)]
    dist.barrier()  # all ranks agree on `todo` before any rank writes a shard
    mine = todo[dist.rank :: dist.world_size]
    if dist.enabled:
        bar = tqdm(total=sum(len(kept[s * sp : (s + 1) * sp]) for s in mine), disable=not (progress and dist.is_main),
                   desc=f"extract passages (rank 0 of {dist.world_size})")
    else:
        already = sum(len(kept[s * sp : (s + 1) * sp]) for s in range(n_shards) if s not in todo)
        bar = tqdm(total=len(kept), initial=already, desc="extract passages", disable=not progress)
    for s in mine:
        chunk = kept[s * sp : (s + 1) * sp]
        data = extract_shard([t for _, t in chunk], [i for i, _ in chunk], heldout[s * sp : (s + 1) * sp], backends, cfg, store_dtype)
        write_shard(cache_dir, s, data)
        n_new += data.tokens["a"].shape[0] + data.tokens["b"].shape[0]
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{n_new / (time.perf_counter() - t0):.0f}")
    bar.close()
    n_new = dist.sum_int(n_new)  # also waits for every rank's last shard
    elapsed = time.perf_counter() - t0
    missing = [s for s in range(n_shards) if not shard_is_done(cache_dir, s)]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of {cache_dir} have no done.json after every rank finished: "
                           "the ranks do not share one output_dir (put it on a filesystem every node mounts)")
    if not dist.is_main:
        dist.barrier()  # rank 0 writes the complete manifest
        return ActivationCache(cache_dir)

    counts = {"n_passages": 0, "n_tokens_a": 0, "n_tokens_b": 0, "n_pairs": 0}
    for s in range(n_shards):
        done = read_json(cache_dir / f"shard_{s:05d}" / "done.json", "shard marker")
        for c in counts:
            counts[c] += done[c]
    counts["n_heldout_passages"] = int(sum(heldout))
    counts["pairing_rate"] = counts["n_pairs"] / max(1, min(counts["n_tokens_a"], counts["n_tokens_b"]))
    counts["pairing_rate_a"] = counts["n_pairs"] / max(1, counts["n_tokens_a"])
    counts["pairing_rate_b"] = counts["n_pairs"] / max(1, counts["n_tokens_b"])
    manifest.update(complete=True, counts=counts, extract_seconds=round(elapsed, 2),
                    tokens_per_second=round(n_new / elapsed, 1) if n_new and elapsed > 0 else None)
    write_manifest(cache_dir, manifest)
    print(
        f"[crossdict] extract: {counts['n_passages']} passages ({counts['n_heldout_passages']} held out), "
        f"{counts['n_tokens_a']} tokens A, {counts['n_tokens_b']} tokens B, {counts['n_pairs']} anchor pairs; "
        f"pairing rate {counts['pairing_rate']:.3f} (A {counts['pairing_rate_a']:.3f}, B {counts['pairing_rate_b']:.3f}); "
        + (f"{n_new / elapsed:.0f} tokens/s (both models, {elapsed:.1f} s) -> {cache_dir}" if n_new else f"-> {cache_dir}")
        + (f" [{dist.world_size} ranks]" if dist.enabled else "")
    )
    dist.barrier()
    return ActivationCache(cache_dir)


# --- baselines that need a model run: the random-weights floor and the all-layers sweep ----------

RANDOM_CACHE = "cache_random"
"""`runs/<name>/cache_random/`: model B with random weights on the main cache's passages and anchors."""
LAYER_SWEEP = "layer_sweep"
"""`cache/layer_sweep/`: every layer of both models at a few held-out anchor pairs (all-layers CKA map)."""


def random_init_like(backend: Backend, seed: int) -> Backend:
    """The same architecture and tokenizer with freshly initialised weights.

    Comparing A with an untrained B separates what training taught B from what architecture and
    token identity alone give (the random-network baseline of Kornblith et al. 2019, Sec. 6).
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from .backend_hf import HFBackend

    model = getattr(backend, "model", None)
    # TransformerLens backends carry the HF config of their architecture; the HF model with that
    # config computes the same residual stream (no weight processing), so it is the same floor.
    config = model.config if isinstance(model, PreTrainedModel) else getattr(backend, "hf_config", None)
    if config is None:
        raise ValueError(f"the random-init floor needs a transformers config behind {backend.name!r}; "
                         "set extract.random_floor: false for this backend")
    torch.manual_seed(seed)
    rand = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = HFBackend(rand, backend.tokenizer, f"{backend.name} (random init, seed {seed})", next(model.parameters()).device)
    out.info = {"random_init_seed": seed, "config_of": backend.name}
    return out


def extract_random_floor(cfg: RunConfig, backends: dict[str, Backend], cache: ActivationCache, progress: bool = True,
                         dist: Dist | None = None) -> ActivationCache:
    """Write `cache_random/`: random-weights B states at exactly the main cache's B tokens.

    Token index and anchors are copied from the main cache, so every anchor pairs the same characters;
    a tokenization that differs from the main cache's is refused. Shards are dealt to ranks like the
    main cache's.
    """
    dist = dist or Dist()
    out = cfg.run_dir / RANDOM_CACHE
    key = _floor_key(cfg, cache)
    old = read_json(out / "manifest.json", "random-floor manifest") if (out / "manifest.json").is_file() else None
    if _floor_is_current(cfg, cache):
        return ActivationCache(out)
    if old is not None and old.get("key") != key and dist.is_main:  # made for an older main cache: redo every shard
        for s in range(int(old.get("n_shards", 0))):
            marker = shard_dir(out, s) / "done.json"
            remove_file(marker)
    backend = random_init_like(backends["b"], cfg.seed)
    manifest = json.loads(json.dumps(cache.manifest))
    manifest.update(key=key, complete=False)
    manifest["models"]["a"]["layers"] = []  # only B's states are stored; A's token index rides along for the splits
    manifest["models"]["b"].update(name=backend.name, source=backend.info)
    if dist.is_main:
        write_manifest(out, manifest)
    dist.barrier()  # stale markers are gone before any rank lists what to do
    texts = cache.passage_texts()
    layers = cfg.model_b.layers
    todo = [s for s in range(cache.n_shards) if not shard_is_done(out, s)]
    dist.barrier()  # all ranks agree on `todo` before any rank writes a shard
    amp = autocast_dtype(cfg, backend)
    for s in tqdm(todo[dist.rank :: dist.world_size], desc="extract random-init B", disable=not (progress and dist.is_main)):
        src = shard_dir(cache.dir, s)
        tok_a, tok_b = load_npy(src / "a.tokens.npy", mmap=False), load_npy(src / "b.tokens.npy", mmap=False)
        pids = list(dict.fromkeys(tok_b[:, 0].tolist()))  # passage order as stored
        acts = {layer: [] for layer in layers}
        got = []
        for rows, states in content_states(backend, [texts[p] for p in pids], cfg.model_b.max_ctx, layers,
                                           cfg.extract.batch_size, amp):
            got.append(rows[:, 3])
            for layer in layers:
                acts[layer].append(states[layer].cpu().numpy())
        if not np.array_equal(np.concatenate(got), tok_b[:, 4]):
            raise CacheMismatchError(f"random-init B tokenizes shard {s} differently from {cache.dir}; re-extract the main cache")
        dtype = np.dtype(cfg.extract.store_dtype)
        write_shard(out, s, ShardData(
            tokens={"a": tok_a, "b": tok_b},
            acts={"a": {}, "b": {layer: np.concatenate(v).astype(dtype) for layer, v in acts.items()}},
            anchors=load_npy(src / "anchors.npy", mmap=False),
        ))
    dist.barrier()  # every rank's shards are written
    if dist.is_main:
        manifest["complete"] = True
        write_manifest(out, manifest)
        print(f"[crossdict] extract: random-init floor for {cfg.model_b.name} layers {layers} -> {out}")
    dist.barrier()
    return ActivationCache(out)


def extract_layer_sweep(cfg: RunConfig, backends: dict[str, Backend], cache: ActivationCache) -> Path | None:
    """Every layer of both models at up to `extract.layer_sweep_tokens` held-out anchor pairs.

    Writes `cache/layer_sweep/{a,b}.npy` float32 `[n_layers, n_pairs, d_model]`, `passage_id.npy`
    `[n_pairs]` and `sweep.json`. Whole passages are taken in stored order until the budget is met.
    """
    n_max = cfg.extract.layer_sweep_tokens
    out = cache.dir / LAYER_SWEEP
    key = _sweep_key(cfg, cache)
    if _sweep_is_current(cfg, cache):
        return out
    texts = cache.passage_texts()
    tok_a = cache.tokens("a")
    held = list(dict.fromkeys(tok_a[tok_a[:, 5] == 1, 0].tolist()))
    chosen, total = [], 0
    counts = dict(zip(*np.unique(cache.tokens("a")[cache.anchor_pairs("heldout")[:, 0], 0], return_counts=True)))
    for pid in held:
        if total >= n_max:
            break
        chosen.append(pid)
        total += int(counts.get(pid, 0))
    per_model = {}
    for k, backend in backends.items():
        layers = list(range(backend.n_layers))
        per_model[k] = list(content_states(backend, [texts[p] for p in chosen], cfg.model(k).max_ctx, layers,
                                           cfg.extract.batch_size, autocast_dtype(cfg, backend)))
    xs = {"a": [], "b": []}
    pid_rows = []
    for i, pid in enumerate(chosen):
        (rows_a, st_a), (rows_b, st_b) = per_model["a"][i], per_model["b"][i]
        pairs = anchor_pairs(rows_a[:, 1:3], rows_b[:, 1:3], texts[pid], cfg.extract.pairing)
        for k, st, col in (("a", st_a, 0), ("b", st_b, 1)):
            xs[k].append(torch.stack([st[layer][pairs[:, col]] for layer in sorted(st)]).numpy())
        pid_rows.append(np.full(len(pairs), pid))
    out.mkdir(parents=True, exist_ok=True)
    for k in ("a", "b"):
        atomic_save_npy(out / f"{k}.npy", np.concatenate(xs[k], axis=1)[:, :n_max].astype(np.float32))
    atomic_save_npy(out / "passage_id.npy", np.concatenate(pid_rows)[:n_max].astype(np.int64))
    atomic_write_json(out / "sweep.json", {"key": key, "n_pairs": int(min(total, n_max)), "n_passages": len(chosen),
                                           "n_layers": {k: backends[k].n_layers for k in backends}})
    print(f"[crossdict] extract: all-layers sweep at {min(total, n_max)} held-out anchor pairs -> {out}")
    return out
