"""Stage 1, text -> activations: run the same passages through both models and cache hidden states.

For every passage we first cut it to the characters that fit *both* tokenizers' `max_ctx`, so the
two models read exactly the same text. Each shard of passages is written atomically with a
`done.json` marker; an interrupted extraction resumes at the first shard without one.
"""

from __future__ import annotations

import time
from pathlib import Path

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
    shard_is_done,
    write_manifest,
    write_shard,
)
from .config import RunConfig
from .corpus import common_prefix_length, is_heldout, passages
from .models import check_layers
from .utils import read_json, resolve_device, stable_hash


def cache_key(cfg: RunConfig) -> dict:
    """What a cache depends on; a cache made under a different key is refused, not silently reused."""
    models = {
        k: {"name": m.name, "layers": m.layers, "max_ctx": m.max_ctx, "dtype": m.dtype, "backend": m.backend}
        for k, m in (("a", cfg.model_a), ("b", cfg.model_b))
    }
    return {"models": models, "corpus": cfg.to_dict()["corpus"], "extract": cfg.to_dict()["extract"], "version": CACHE_VERSION}


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
    manifest = read_json(path, "activation cache manifest")
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheMismatchError(f"{path} is not a crossdict activation cache; move it away or pick another run_name")
    if manifest.get("key") != key:
        diffs = _describe_mismatch(manifest.get("key", {}), key)
        raise CacheMismatchError(
            f"the activation cache in {cache_dir} was made for another config:\n  " + "\n  ".join(diffs)
            + f"\nUse another run_name, or delete {cache_dir} to re-extract."
        )
    return manifest


def truncate_to_common(texts: list[str], backends: dict[str, Backend], max_ctx: dict[str, int]) -> list[str]:
    keys = list(backends)
    toks = [backends[k].tokenizer for k in keys]
    n_special = [int(backends[k].has_bos) for k in keys]
    ctx = [max_ctx[k] for k in keys]
    return [t[: common_prefix_length(t, toks, ctx, n_special)] for t in texts]


def extract_shard(
    texts: list[str], passage_ids: list[int], heldout: list[bool], backends: dict[str, Backend],
    cfg: RunConfig, store_dtype: np.dtype,
) -> ShardData:
    """Hidden states, token index and anchors for one shard of passages."""
    tokens = {k: [] for k in backends}
    acts = {k: {layer: [] for layer in cfg.model(k).layers} for k in backends}
    anchors = []
    n_rows = {k: 0 for k in backends}
    bs = cfg.extract.batch_size
    for start in range(0, len(texts), bs):
        chunk = texts[start : start + bs]
        per_model_offsets = {}
        for k, backend in backends.items():
            mcfg = cfg.model(k)
            batch = backend.tokenize(chunk, mcfg.max_ctx)
            states = backend.hidden_states(batch, mcfg.layers)
            content = batch.is_content
            per_model_offsets[k] = []
            for i in range(len(chunk)):
                keep = content[i].nonzero().squeeze(1)
                offs = batch.offsets[i, keep]
                pid = passage_ids[start + i]
                rows = np.column_stack([
                    np.full(len(keep), pid), keep.numpy(), offs.numpy(),
                    batch.input_ids[i, keep].numpy(), np.full(len(keep), int(heldout[start + i])),
                ])
                tokens[k].append(rows)
                for layer in mcfg.layers:
                    acts[k][layer].append(states[layer][i, keep].cpu().numpy().astype(store_dtype))
                per_model_offsets[k].append(offs.numpy())
        for i in range(len(chunk)):
            pairs = anchor_pairs(per_model_offsets["a"][i], per_model_offsets["b"][i], chunk[i], cfg.extract.pairing)
            anchors.append(pairs + np.array([n_rows["a"], n_rows["b"]]))
            for k in backends:
                n_rows[k] += len(per_model_offsets[k][i])
    cat = lambda xs, d: np.concatenate(xs) if xs else np.zeros((0, d))  # noqa: E731
    return ShardData(
        tokens={k: cat(v, 6).astype(np.int64) for k, v in tokens.items()},
        acts={k: {layer: cat(v, backends[k].d_model).astype(store_dtype) for layer, v in lay.items()} for k, lay in acts.items()},
        anchors=cat(anchors, 2).astype(np.int64),
        texts=dict(zip(passage_ids, texts)),
    )


def load_backends(cfg: RunConfig) -> dict[str, Backend]:
    """Both models, behind their configured backends; layer indices checked against the real depth."""
    backends = {}
    for k in ("a", "b"):
        m = cfg.model(k)
        check_layers(m.name, m.layers, key=f"model_{k}")  # from the config alone, before loading weights
        backends[k] = load_backend(m.name, m.backend, m.dtype, str(resolve_device(cfg.device)))
        check_layers(m.name, m.layers, backends[k].n_layers, key=f"model_{k}")
    return backends


def run_extract(cfg: RunConfig, backends: dict[str, Backend] | None = None, progress: bool = True) -> ActivationCache:
    """Fill (or reuse) `runs/<name>/cache/`; returns the reader over it."""
    for k in ("a", "b"):  # cheap checks first: no model is loaded for a bad layer index
        check_layers(cfg.model(k).name, cfg.model(k).layers, key=f"model_{k}")
    cache_dir = cfg.cache_dir
    key = cache_key(cfg)
    manifest = check_existing(cache_dir, key)
    if manifest is not None and manifest.get("complete"):
        print(f"[crossdict] extract: reusing complete cache {cache_dir} ({manifest['counts']['n_tokens_a']} + "
              f"{manifest['counts']['n_tokens_b']} tokens, pairing rate {manifest['counts']['pairing_rate']:.3f})")
        return ActivationCache(cache_dir)

    torch.manual_seed(cfg.seed)
    texts = passages(cfg.corpus)
    backends = backends or load_backends(cfg)
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
    write_manifest(cache_dir, manifest)

    store_dtype = np.dtype(cfg.extract.store_dtype)
    sp = cfg.extract.shard_passages
    t0 = time.perf_counter()
    n_new = 0
    todo = [s for s in range(n_shards) if not shard_is_done(cache_dir, s)]
    already = sum(len(kept[s * sp : (s + 1) * sp]) for s in range(n_shards) if s not in todo)
    bar = tqdm(total=len(kept), initial=already, desc="extract passages", disable=not progress)
    for s in todo:
        chunk = kept[s * sp : (s + 1) * sp]
        data = extract_shard([t for _, t in chunk], [i for i, _ in chunk], heldout[s * sp : (s + 1) * sp], backends, cfg, store_dtype)
        write_shard(cache_dir, s, data)
        n_new += data.tokens["a"].shape[0] + data.tokens["b"].shape[0]
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{n_new / (time.perf_counter() - t0):.0f}")
    bar.close()
    elapsed = time.perf_counter() - t0

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
    )
    return ActivationCache(cache_dir)
