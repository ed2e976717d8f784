"""SAE stage: train one SAE per (model, layer, seed) on cached activations, evaluate, report.

    cache (memmapped shards) --seeded shuffled batches--> train_sae --> runs/<name>/saes/<model>/<hook>/
        cfg.json + sae_weights.safetensors   SAELens format (`sae_lens.SAE.load_from_disk` works)
        crossdict.json                       our spec: input scale, seed, training config
        training_log.jsonl                   step, fvu, l0, dead_frac, lr, ...
        metrics.json                         held-out FVU, L0, dead/dense fractions (+ LM loss)
    --> runs/<name>/report/sae_metrics.csv

Training is deterministic on CPU for a given seed: batch b of the run is a pure function of
(seed, b) (a seeded permutation per epoch), and a checkpoint holds every other piece of state
(weights, Adam moments, dead-latent counters, the torch RNG), so `resume=True` reproduces an
uninterrupted run bit for bit. Checkpoints are one safetensors file (tensors + a JSON header),
written atomically; no pickles anywhere.

Under torchrun (see `distributed`) training is data-parallel: every rank draws the same global
batch indices, takes its equal slice, and DDP sums the gradients; the SAE loss uses global batch
statistics, so the update equals the single-process one up to float summation order. With
`distribute_modules` each rank instead trains whole SAEs (one layer per rank, like sparsify's
`--distribute_modules`), bit-identical to training them alone.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import inspect
import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .backend import Backend, Batch, Edit, start_after
from .cache import ActivationCache, hook_name, manifest_identity, massive_threshold
from .config import RunConfig, SAEConfig
from .distributed import SINGLE, BatchReduce, Dist, DistributedConfigError, check_same_config, local, split_work
from .sae import SAE, SAESpec, is_complete, load_sae, save_sae
from .stability import live_latents, seed_stability, summary_columns
from .integrity import CorruptFileError, verify
from .utils import atomic_path, atomic_write_json, atomic_write_text, read_json, remove_file, resolve_device

CKPT_FILE = "checkpoint.safetensors"
CKPT_FORMAT = "crossdict-sae-checkpoint"
LOG_FILE = "training_log.jsonl"
METRICS_FILE = "metrics.json"
SCALE_SAMPLE_ROWS = 16384
LOG_EVERY = 10
THRESHOLD_BATCHES = 8
"""A BatchTopK SAE's inference threshold is averaged over this many final batches (`SAE.calibrate_threshold`)."""
DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of held-out tokens counts as dense."""


class Rows(Protocol):
    """Anything with `.take(rows) -> float32 [len(rows), d]` and `.shape`; `ShardedArray` is one."""

    shape: tuple[int, int]

    def take(self, rows: np.ndarray) -> np.ndarray: ...


class CheckpointError(ValueError):
    """A checkpoint is unreadable or belongs to another run; it is left untouched."""


class StaleCheckpointError(CheckpointError):
    """A readable checkpoint made for another config or data: resuming it would mix two runs."""


# --- config checks ------------------------------------------------------------------------------


def validate_sae_config(cfg: SAEConfig, d_in: int, n_rows: int | None = None) -> None:
    """Fail before any work on values the SAE cannot train with, naming the field and the value."""
    d_sae = d_in * cfg.expansion_factor
    checks: list[tuple[bool, str]] = [
        (cfg.architecture in ("topk", "batchtopk", "l1"), f"sae.architecture {cfg.architecture!r} is not one of ['topk', 'batchtopk', 'l1']"),
        (cfg.expansion_factor >= 1, f"sae.expansion_factor must be >= 1, got {cfg.expansion_factor}"),
        (cfg.architecture == "l1" or 1 <= cfg.k <= d_sae, f"sae.k={cfg.k} must be between 1 and d_sae={d_sae} (d_in {d_in} x expansion_factor {cfg.expansion_factor})"),
        (cfg.l1_coefficient >= 0, f"sae.l1_coefficient (lambda) must be >= 0, got {cfg.l1_coefficient}"),
        (cfg.l1_warmup_steps >= 0, f"sae.l1_warmup_steps must be >= 0, got {cfg.l1_warmup_steps}"),
        (cfg.aux_k >= 1, f"sae.aux_k must be >= 1, got {cfg.aux_k}"),
        (cfg.aux_coefficient >= 0, f"sae.aux_coefficient must be >= 0, got {cfg.aux_coefficient}"),
        (cfg.dead_tokens_threshold >= 1, f"sae.dead_tokens_threshold must be >= 1, got {cfg.dead_tokens_threshold}"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"sae.lr must be a positive number, got {cfg.lr}"),
        (cfg.lr_warmup_steps >= 0, f"sae.lr_warmup_steps must be >= 0, got {cfg.lr_warmup_steps}"),
        (0 <= cfg.lr_decay_fraction <= 1, f"sae.lr_decay_fraction must be in [0, 1], got {cfg.lr_decay_fraction}"),
        (cfg.grad_clip_norm >= 0 and math.isfinite(cfg.grad_clip_norm), f"sae.grad_clip_norm must be >= 0 (0 = off), got {cfg.grad_clip_norm}"),
        (cfg.batch_size >= 1, f"sae.batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.train_tokens >= cfg.batch_size, f"sae.train_tokens={cfg.train_tokens} is less than one batch (sae.batch_size={cfg.batch_size})"),
        (cfg.checkpoint_every >= 1, f"sae.checkpoint_every must be >= 1, got {cfg.checkpoint_every}"),
        (cfg.decoder_init in ("random", "data"), f"sae.decoder_init {cfg.decoder_init!r} is not one of ['random', 'data']"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    if n_rows is not None and n_rows < 1:
        raise ValueError("no training rows: the activation cache has no tokens in the train split")


def _config_dict(cfg: SAEConfig) -> dict[str, Any]:
    """The SAE config fields that determine a trained SAE (seeds select, they do not determine)."""
    d = dataclasses.asdict(cfg)
    d.pop("seeds", None)
    d.pop("lm_eval_passages", None)  # evaluation only
    d.pop("lm_eval_seeds", None)
    d.pop("per_layer", None)  # resolved by `SAEConfig.for_layer` before it gets here
    return d


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


# --- data ---------------------------------------------------------------------------------------


class BatchStream:
    """Batch b = positions [b*B, (b+1)*B) of an endless stream of seeded per-epoch permutations of `rows`.

    A pure function of (seed, b): resuming needs only the step number, no RNG state.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
        self.rows, self.batch_size, self.seed = np.asarray(rows, np.int64), batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = self.rows[np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))]
        return self._perms[epoch]

    def __call__(self, step: int) -> np.ndarray:
        n = len(self.rows)
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(pos, n)
        out = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out


def _check_finite(x: np.ndarray, where: str) -> None:
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise FloatingPointError(f"{where}: {bad} non-finite activation values (NaN/inf) in {x.shape[0]} rows; "
                                 "the activation cache is corrupt or the model overflowed (try float32 extraction)")


def input_scale_and_mean(acts: Rows, rows: np.ndarray, seed: int) -> tuple[float, np.ndarray]:
    """Fixed input scale s with mean ||s x||^2 = d_in, and the scaled data mean (for b_dec init)."""
    sample = np.sort(np.random.default_rng([seed, 2**31]).permutation(rows)[:SCALE_SAMPLE_ROWS])
    x = acts.take(sample).astype(np.float64)
    # Non-finite rows are left out here; the training loop stops on them, naming the step.
    x = x[np.isfinite(x).all(1)]
    if len(x) == 0:
        raise FloatingPointError("every sampled activation row holds NaN/inf; the activation cache is corrupt")
    sq = float((x**2).sum(1).mean())
    if sq <= 0:
        raise ValueError("all sampled activations are zero; cannot train an SAE on them")
    scale = math.sqrt(x.shape[1] / sq)
    return scale, (x.mean(0) * scale).astype(np.float32)


def lr_at(step: int, n_steps: int, cfg: SAEConfig) -> float:
    """Linear warm-up over `lr_warmup_steps`, constant, linear decay to 0 over the last `lr_decay_fraction`."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
    decay_steps = int(n_steps * cfg.lr_decay_fraction)
    decay_start = n_steps - decay_steps
    decay = 1.0 if step < decay_start or decay_steps == 0 else (n_steps - step) / decay_steps
    return cfg.lr * min(warm, decay)


# --- checkpoints --------------------------------------------------------------------------------


def _save_checkpoint(path: Path, sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor, header: dict) -> None:
    # .cpu(): a no-op on CPU, and a GPU run's checkpoint resumes anywhere.
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    opt_state = opt.state_dict()
    for i, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tensors["tokens_since_fired"] = since_fired.cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    header = {**header, "param_groups": opt_state["param_groups"]}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"crossdict": json.dumps(header)})


def _load_checkpoint(path: Path, expect: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check a checkpoint against `expect` (format, config, seed, data); raise CheckpointError."""
    try:
        verify(path)
    except CorruptFileError as e:
        raise CheckpointError(f"{e.args[0].split(';')[0]}; it was left in place — delete it to start over") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {e}; it was left in place — "
                              "delete it to start over") from None
    try:
        header = json.loads(meta["crossdict"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a crossdict SAE checkpoint (no crossdict header); it was left in place") from None
    if header.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: format {header.get('format')!r}, expected {CKPT_FORMAT!r}; it was left in place")
    diffs = [f"{k}: checkpoint has {header.get(k)!r}, this run has {v!r}" for k, v in expect.items() if header.get(k) != v]
    if diffs:
        raise StaleCheckpointError(f"checkpoint {path} belongs to a different run ({'; '.join(diffs)}); it was left in "
                              "place — delete it or rerun with --restart")
    return header, tensors


def resume_state(ckpt_path: Path, expect: dict, resume: bool | str, model: torch.nn.Module,
                 opt: torch.optim.Optimizer, log_path: Path, stage: str, what: str, quiet: bool = False,
                 ) -> tuple[int, list[dict], torch.Tensor | None]:
    """(first step, log rows before it, restored since_fired or None) for a trainer starting up.

    `resume="auto"` (what `crossdict run`, `train` and `crosscode` use unless `--restart`) resumes a matching
    checkpoint and says so ("<stage>: resuming <what> from step N of M"), and restarts from scratch when the
    checkpoint was made for another config, saying so too ("<stage>: <reason>; training <what> from the start");
    `resume=True` refuses a checkpoint of another config instead; `resume=False` ignores (and later overwrites) it.
    """
    if not (resume and ckpt_path.is_file()):
        return 0, [], None
    try:
        header, tensors = _load_checkpoint(ckpt_path, expect)
    except StaleCheckpointError as e:
        if resume != "auto":
            raise
        if not quiet:
            print(f"[crossdict] {stage}: {e.args[0].split(';')[0]}; training {what} from the start")
        return 0, [], None
    since_fired = _restore(model, opt, header, tensors, ckpt_path)
    start = int(header["step"])
    if not quiet:
        print(f"[crossdict] {stage}: resuming {what} from step {start} of {header.get('n_steps', '?')} ({ckpt_path}; "
              "--restart discards it)")
    return start, [r for r in _read_log(log_path) if r["step"] < start], since_fired


def _restore(sae: SAE, opt: torch.optim.Optimizer, header: dict, tensors: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        sae.load_state_dict(model, strict=True)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": header["param_groups"]})  # moves state to the params' device
        torch.set_rng_state(tensors["rng.torch"])
        return tensors["tokens_since_fired"].clone().to(sae.W_dec.device)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this SAE: {e}") from None


# --- training -----------------------------------------------------------------------------------


def make_sae(d_in: int, cfg: SAEConfig, input_scale: float, metadata: dict | None = None) -> SAE:
    spec = SAESpec(
        architecture=cfg.architecture, d_in=d_in, d_sae=d_in * cfg.expansion_factor, k=cfg.k,
        input_scale=input_scale, l1_coefficient=cfg.l1_coefficient, aux_k=cfg.aux_k,
        aux_coefficient=cfg.aux_coefficient, metadata=dict(metadata or {}),
    )
    return SAE(spec)


def train_sae(
    acts: Rows,
    rows: np.ndarray,
    sae_cfg: SAEConfig,
    seed: int,
    out_dir: Path,
    resume: bool | str,
    progress: bool = True,
    metadata: dict | None = None,
    max_steps: int | None = None,
    dist: Dist = SINGLE,
) -> SAE:
    """Train one SAE on `acts[rows]` and save it to `out_dir` (SAELens format + crossdict.json).

    Never holds more than two batches of activations in RAM. `max_steps` stops early after
    checkpointing at that step, without saving a final SAE (time-boxed runs; tests of resume).
    With `dist` in a process group, every rank calls this with the same arguments: each trains on
    its slice of every batch (DDP), rank 0 writes the files, and all return the same SAE.
    """
    return train_saes(acts, rows, sae_cfg, [seed], [out_dir], resume, progress, [metadata], max_steps, dist)[0]


class _Run:
    """One SAE of a `train_saes` group: model, optimiser, dead-latent counters, log, checkpoint identity."""

    def __init__(self, sae: SAE, model: torch.nn.Module, opt: torch.optim.Optimizer, since_fired: torch.Tensor,
                 start: int, log: list[dict], expect: dict, out_dir: Path):
        self.sae, self.model, self.opt, self.since_fired = sae, model, opt, since_fired
        self.start, self.log, self.expect, self.out_dir = start, log, expect, out_dir


def _data_init_rows(rows: np.ndarray, n: int, seed: int, metadata: dict | None) -> np.ndarray:
    """`n` distinct training rows for a data-initialised decoder, drawn with (seed, model, hook).

    Keyed by the model and hook too, so the SAEs of the two models never start from the rows of paired
    tokens (that would plant a cross-model correspondence at init), and two seeds start from different rows.
    """
    salt = int(hashlib.sha256(json.dumps([(metadata or {}).get("model_name"), (metadata or {}).get("hook_name")])
                              .encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng([seed, salt, 2**31 + 1])
    return np.sort(rng.choice(rows, size=n, replace=len(rows) < n))


def _start_run(acts: Rows, rows: np.ndarray, sae_cfg: SAEConfig, seed: int, data_seed: int, out_dir: Path,
               resume: bool | str, metadata: dict | None, dist: Dist, n_steps: int) -> _Run:
    d_in = int(acts.shape[1])
    expect = {"format": CKPT_FORMAT, "sae_config": _config_dict(sae_cfg), "seed": seed, "data_seed": data_seed,
              "d_in": d_in, "n_rows": len(rows), "rows_digest": _rows_digest(rows)}
    torch.manual_seed(seed)
    scale, mean = input_scale_and_mean(acts, rows, seed)
    expect["input_scale"] = scale  # changes if the cached activations were re-extracted
    meta = {**(metadata or {}), "seed": seed, "train_tokens": n_steps * sae_cfg.batch_size}
    if data_seed != seed:
        meta["data_seed"] = data_seed
    sae = make_sae(d_in, sae_cfg, scale, meta)
    gen = torch.Generator().manual_seed(seed)
    sae.reset_parameters(gen)
    if sae_cfg.decoder_init == "data":
        x = acts.take(_data_init_rows(rows, sae.d_sae, seed, metadata)).astype(np.float64) * scale - mean
        sae.init_decoder_from(torch.from_numpy(x).float())
    with torch.no_grad():  # b_dec at the data mean (Gao et al. 2024 §A.1 use the geometric median)
        sae.b_dec.copy_(torch.from_numpy(mean))
    device = dist.device
    sae.to(device)  # initialised on the CPU generator first, so every device starts from the same weights
    opt = torch.optim.Adam(sae.parameters(), lr=sae_cfg.lr)  # fp32 master weights and moments, on any device
    since_fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
    start, log, restored = resume_state(out_dir / CKPT_FILE, expect, resume, sae, opt, out_dir / LOG_FILE, "train",
                                        "this SAE", quiet=not dist.is_main)
    since_fired = since_fired if restored is None else restored
    # DDP averages gradients over ranks; each rank's loss is its share of the global loss, so scale by
    # the world size to get the sum. broadcast_buffers off: the BatchTopK threshold stays in sync by
    # construction (every rank applies the same global update).
    model = sae if not dist.enabled else _ddp(sae, device)
    sae.train()
    return _Run(sae, model, opt, since_fired, start, log, expect, out_dir)


def _train_step(r: _Run, x: torch.Tensor, step: int, n_steps: int, sae_cfg: SAEConfig, reduce: BatchReduce | None,
                grad_scale: int) -> dict | None:
    """One optimiser step of one SAE on batch `x`; the log record on logging steps."""
    sae, B = r.sae, sae_cfg.batch_size
    lr = lr_at(step, n_steps, sae_cfg)
    for g in r.opt.param_groups:
        g["lr"] = lr
    l1_scale = min(1.0, (step + 1) / sae_cfg.l1_warmup_steps) if sae_cfg.l1_warmup_steps > 0 else 1.0
    dead = r.since_fired >= sae_cfg.dead_tokens_threshold
    out = r.model(x, dead_mask=dead, l1_scale=l1_scale, **({} if reduce is None else {"reduce": reduce}))
    if not torch.isfinite(out.loss):
        raise FloatingPointError(f"training step {step}: loss became {out.loss.item()} (lr {lr:g}); "
                                 "lower sae.lr or check the activations")
    (out.loss if grad_scale == 1 else out.loss * grad_scale).backward()  # DDP all-reduces here
    sae.remove_gradient_parallel_to_decoder_directions()
    fvu_per_mse = float(out.fvu.detach()) / max(float(out.mse.detach()), 1e-30)  # = tokens / total variance
    if sae_cfg.grad_clip_norm > 0 and fvu_per_mse > 0:  # d(fvu) / fvu_per_mse = d(per-token squared error), as SAELens clips
        torch.nn.utils.clip_grad_norm_(sae.parameters(), sae_cfg.grad_clip_norm * fvu_per_mse)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()
    with torch.no_grad():
        r.since_fired += B
        fired = out.latent_indices[out.latent_acts > 0] if out.latent_indices is not None else (out.latent_acts > 0).any(0).nonzero().squeeze(1)
        if reduce is not None:  # a latent is alive if it fired on any rank's slice
            hit = torch.zeros(sae.d_sae, dtype=torch.int64, device=r.since_fired.device)
            hit[fired] = 1
            fired = reduce.sum(hit).nonzero().squeeze(1)
        r.since_fired[fired] = 0
    if not (step % LOG_EVERY == 0 or step == n_steps - 1):
        return None
    terms = {"fvu": out.fvu, "l0": out.l0, "loss": out.loss, "auxk_loss": out.auxk_loss, "l1_loss": out.l1_loss}
    if reduce is not None:  # per-rank shares -> whole-batch values
        terms = {k: reduce.sum(v) for k, v in terms.items()}
    rec = {"step": step, "tokens": (step + 1) * B, "fvu": round(terms["fvu"].item(), 6), "l0": round(terms["l0"].item(), 3),
           "dead_frac": round(dead.float().mean().item(), 6), "lr": lr, "loss": round(terms["loss"].item(), 6),
           "auxk_loss": round(terms["auxk_loss"].item(), 6), "l1_loss": round(terms["l1_loss"].item(), 6)}
    r.log.append(rec)
    return rec


def train_saes(
    acts: Rows,
    rows: np.ndarray,
    sae_cfg: SAEConfig,
    seeds: list[int],
    out_dirs: list[Path],
    resume: bool | str,
    progress: bool = True,
    metadata: list[dict | None] | None = None,
    max_steps: int | None = None,
    dist: Dist = SINGLE,
    data_seed: int | None = None,
) -> list[SAE]:
    """Train one SAE per seed on the same pass over `acts[rows]`: each batch is read once and fed to all.

    Seeds differ in their initialisation; the batch order is that of `data_seed` (default: the first seed),
    so an SAE is a pure function of (its seed, data_seed), whatever else shares the pass, and a second
    seed costs its own compute, not a second read (issue 14 item 5). Each SAE keeps its own checkpoint;
    SAEs whose checkpoints stand at different steps resume together, each joining at its own step.
    """
    if len(seeds) != len(out_dirs) or len(set(seeds)) != len(seeds):
        raise ValueError(f"train_saes needs one out_dir per distinct seed, got seeds {seeds} and {len(out_dirs)} dirs")
    rows = np.asarray(rows, dtype=np.int64)
    validate_sae_config(sae_cfg, int(acts.shape[1]), len(rows))
    data_seed = seeds[0] if data_seed is None else data_seed
    n_steps = sae_cfg.train_tokens // sae_cfg.batch_size
    B = sae_cfg.batch_size
    lo, hi = _batch_slice(B, dist)
    metadata = metadata or [None] * len(seeds)
    runs = [_start_run(acts, rows, sae_cfg, s, data_seed, Path(d), resume, m, dist, n_steps)
            for s, d, m in zip(seeds, out_dirs, metadata)]
    reduce = BatchReduce() if dist.enabled else None
    grad_scale = 1 if reduce is None else dist.world_size
    stream = BatchStream(rows, B, data_seed)
    stop = n_steps if max_steps is None else min(n_steps, max_steps)
    first = min(r.start for r in runs)
    names = ", ".join(r.out_dir.name for r in runs)
    pbar = tqdm(total=n_steps, initial=first, disable=not (progress and dist.is_main),
                desc=f"SAE {sae_cfg.architecture} {names}" + (f" (resuming from step {first} of {n_steps})" if first else ""),
                dynamic_ncols=True)
    take = lambda step: acts.take(stream(step)[lo:hi])  # noqa: E731  (this rank's slice of batch `step`)
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(take, first) if first < stop else None
        for step in range(first, stop):
            x_np = nxt.result()
            nxt = pool.submit(take, step + 1) if step + 1 < stop else None
            _check_finite(x_np, f"training step {step}")
            x = torch.from_numpy(x_np).to(dist.device, non_blocking=True)
            done = step + 1
            for r in runs:
                if step < r.start:
                    continue
                rec = _train_step(r, x, step, n_steps, sae_cfg, reduce, grad_scale)
                if rec is not None and r is runs[0]:
                    pbar.set_postfix(fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead_frac']:.2f}")
                if done < n_steps and (done % sae_cfg.checkpoint_every == 0 or done == stop) and dist.is_main:
                    _save_checkpoint(r.out_dir / CKPT_FILE, r.sae, r.opt, r.since_fired,
                                     {**r.expect, "step": done, "n_steps": n_steps})
                    _write_log(r.out_dir / LOG_FILE, r.log)
            pbar.update(1)
    pbar.close()
    if stop < n_steps:
        dist.barrier()  # the checkpoints exist before any rank moves on
        return [r.sae for r in runs]
    for r in runs:
        if sae_cfg.architecture == "batchtopk":  # threshold from the final weights, on the last batches trained on
            r.sae.calibrate_threshold((torch.from_numpy(take(s)).to(dist.device) for s in range(max(0, n_steps - THRESHOLD_BATCHES), n_steps)), reduce)
        r.sae.eval()
        if dist.is_main:
            save_sae(r.sae, r.out_dir)
            _write_log(r.out_dir / LOG_FILE, r.log)
            remove_file(r.out_dir / CKPT_FILE)  # the final SAE supersedes it
    dist.barrier()
    return [r.sae for r in runs]


def _ddp(sae: SAE, device: torch.device) -> torch.nn.Module:
    """Wrap for data-parallel training; buffers are synced once at init, not every forward."""
    DDP = torch.nn.parallel.DistributedDataParallel
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}  # renamed in newer torch
    return DDP(sae, device_ids=[device] if device.type == "cuda" else None, **no_sync)


def _batch_slice(batch_size: int, dist: Dist) -> tuple[int, int]:
    """Rows [lo, hi) of each global batch that this rank trains on; equal slices, or a clear refusal."""
    W = dist.world_size
    if batch_size % W:
        raise DistributedConfigError(
            f"sae.batch_size={batch_size} does not split evenly over {W} ranks; set sae.batch_size to a multiple "
            f"of {W} (e.g. {batch_size // W * W or W}) or launch with a world size that divides it")
    b = batch_size // W
    return dist.rank * b, (dist.rank + 1) * b


def _write_log(path: Path, log: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in log))


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


# --- massive activations -----------------------------------------------------------------------


def massive_activation_threshold(acts: Rows, rows: np.ndarray, ratio: float, sample: int = SCALE_SAMPLE_ROWS) -> float | None:
    """Residual norm above which a token counts as a massive activation; None when `ratio` is 0.

    A few tokens (the first token, some delimiters: attention sinks) carry residual norms 100x the
    median (Sun et al. 2024, "Massive activations in LLMs"; SmolLM2-135M from block ~11 on). Left in,
    they dominate an SAE's loss and starve most latents (most die), so they are left out of SAE
    training and evaluation, like BOS tokens are elsewhere. The rule is the cache's row-mask rule
    (`cache.massive_threshold`); the SAE stages read the stored mask (`ActivationCache.row_mask`).
    """
    return massive_threshold(acts, rows, ratio, sample)


def drop_massive(acts: Rows, rows: np.ndarray, max_norm: float | None, block: int = 65536) -> np.ndarray:
    """`rows` without the tokens whose residual norm exceeds `max_norm`."""
    if max_norm is None:
        return rows
    keep = [np.linalg.norm(acts.take(rows[s : s + block]), axis=1) <= max_norm for s in range(0, len(rows), block)]
    return rows[np.concatenate(keep)] if keep else rows


# --- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_sae(sae: SAE, acts: Rows, rows: np.ndarray, block_rows: int = 4096) -> dict[str, float]:
    """Held-out FVU (whole-set SSE / total sum of squares about the mean), L0, dead and dense fractions.

    Streams blocks; the total sum of squares is merged per block (Chan et al.) in float64, so a large
    mean direction in the residual stream does not cancel catastrophically.
    """
    if int(acts.shape[1]) != sae.d_in:
        raise ValueError(f"activations have d_model={acts.shape[1]} but the SAE expects d_in={sae.d_in}")
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise ValueError("no held-out rows to evaluate on")
    sae.eval()
    n, sse, m2, l0_sum = 0, 0.0, 0.0, 0.0
    device = sae.W_enc.device
    mean = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    fires = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
    for s in range(0, len(rows), block_rows):
        x_np = acts.take(rows[s : s + block_rows])
        _check_finite(x_np, f"evaluation block at held-out row {s}")
        x = torch.from_numpy(x_np).to(device)
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
        sse += float((x_hat - x).double().pow(2).sum())
        nb = x.shape[0]
        xd = x.double()
        mb = xd.mean(0)
        m2b = float((xd - mb).pow(2).sum())
        delta = mb - mean
        m2 += m2b + float(delta.pow(2).sum()) * n * nb / (n + nb)
        mean += delta * nb / (n + nb)
        n += nb
        active = codes > 0
        fires += active.sum(0)
        l0_sum += float(active.sum())
    freq = fires.double() / n
    return {
        "fvu": sse / max(m2, 1e-30),
        "l0": l0_sum / n,
        "dead_frac": float((fires == 0).double().mean()),
        "dense_frac": float((freq > DENSE_THRESHOLD).double().mean()),
        "n_tokens": n,
    }


def _valid_next(batch: Batch) -> torch.Tensor:
    """`[b, seq]` bool: content positions with a real next token (the last position has none)."""
    valid = batch.is_content[:, :-1] & batch.attention_mask[:, 1:].bool()
    return torch.cat([valid, torch.zeros_like(valid[:, :1])], 1)


@dataclass
class _CleanRows:
    """One sequence's clean pass over the span [lo, hi) of its `_valid_next` positions: what every edited pass
    of it is compared with. A span, not an index list: the edited logits are then read in place, not copied."""

    row: int
    """The sequence's row in its batch."""
    lo: int
    hi: int
    counted: torch.Tensor
    """`[hi - lo]` bool: `_valid_next` in the span (all of it unless a special token sits inside)."""
    target: torch.Tensor
    """`[hi - lo]` the next token at each position."""
    logp: torch.Tensor
    """`[hi - lo, vocab]` clean next-token log-probabilities."""
    p: torch.Tensor
    """`[hi - lo, vocab]` their exp: the KL's weights."""


def _clean_rows(logits: torch.Tensor, batch: Batch) -> list[_CleanRows]:
    """The `_CleanRows` of each sequence of `batch` with a counted position, from the clean `logits` `[b, seq, vocab]`."""
    valid = _valid_next(batch)
    out = []
    for i in range(valid.shape[0]):
        pos = valid[i].nonzero()[:, 0]
        if len(pos) == 0:
            continue
        lo, hi = int(pos[0]), int(pos[-1]) + 1
        logp = F.log_softmax(logits[i, lo:hi].float(), -1)
        dev = logp.device
        out.append(_CleanRows(i, lo, hi, valid[i, lo:hi].to(dev), batch.input_ids[i, lo + 1 : hi + 1].to(dev), logp,
                              logp.exp()))
    return out


def _nll_kl(logits: torch.Tensor, clean: _CleanRows, scratch: torch.Tensor) -> tuple[float, float]:
    """Summed next-token NLL and KL(clean || edited) over `clean`'s positions of the edited `logits` `[b, seq, vocab]`.

    One log-softmax, written into `scratch` `[>= hi - lo, vocab]` (reused: a fresh Gemma-3 sequence's worth,
    134 MB, costs more in page faults than the log-softmax), serves both. KL = Σ p0 (log p0 − log p), the
    difference taken per token and summed by torch's cascade sum, as `F.kl_div` does: Σ p0 log p0 − Σ p0 log p
    would round two entropy-sized float32 numbers, and a float32 dot (bmm) of the 49k-262k terms of a row is
    off by ~1e-4 relative on SmolLM2.
    """
    c = clean
    lp = torch.log_softmax(logits[c.row, c.lo : c.hi].float(), -1, out=scratch[: c.hi - c.lo])
    nll = -float(lp.gather(1, c.target[:, None])[:, 0][c.counted].sum(dtype=torch.float64))
    kl = -float(lp.sub_(c.logp).mul_(c.p).sum(-1)[c.counted].sum(dtype=torch.float64))
    return nll, kl


N_TOP_PCS = 8
"""The error-geometry columns measure the SAE error's energy in this many top principal directions."""


def error_geometry(h: torch.Tensor, recon: torch.Tensor, k: int = N_TOP_PCS) -> dict[str, float]:
    """Where an SAE's error e = recon − h lives, on rows `h`, `recon` `[n, d]`.

    err_radial_share: Σ (e·ĥ)² / Σ ‖e‖², the part along each token's own residual direction ĥ. A
    pre-norm block reads its input through RMS/LayerNorm, which divides a rescaling of h away, so this
    part is nearly invisible downstream; a random direction puts 1/d there.
    err_top_pc_share: energy in the top-`k` principal directions of `h` (random: k/d).
    err_rel_norm: ‖e‖/‖h‖ (root of summed squares), the size of the perturbation.
    """
    h, e = h.double(), (recon - h).double()
    e2 = (e**2).sum().clamp_min(1e-30)
    hu = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    vh = torch.linalg.svd(h - h.mean(0), full_matrices=False)[2][:k]
    return {"err_radial_share": float(((e * hu).sum(-1) ** 2).sum() / e2),
            "err_top_pc_share": float(((e @ vh.T) ** 2).sum() / e2),
            "err_rel_norm": float(e2.sqrt() / h.norm().clamp_min(1e-30)),
            "random_radial_share": 1.0 / h.shape[1], "random_top_pc_share": min(k, h.shape[1]) / h.shape[1]}


def _random_like(h: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h.shape, generator=g, dtype=torch.float32).to(h.device)


def same_norm_random_error(recon: Any, seed: int, perp_only: bool = False) -> Any:
    """`[..., d] -> [..., d]`: h + ‖recon(h) − h‖·u per row, u a random unit direction (Gurnee 2024, "SAE
    reconstruction errors are (empirically) pathological"). With `perp_only`, both the norm and u are of the
    part orthogonal to h: the SAE error with its radial (rescaling) part removed, replaced by a random one."""

    def f(h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        e, u = recon(h) - h, _random_like(h, seed)
        if perp_only:
            hu = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            e = e - (e * hu).sum(-1, keepdim=True) * hu
            u = u - (u * hu).sum(-1, keepdim=True) * hu
        return h + e.norm(dim=-1, keepdim=True) * u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    return f


def _splice(fn: Edit, content: torch.Tensor, max_norm: float | None) -> Edit:
    """`fn` applied where `content` `[b, seq]` holds and the clean residual's norm is at most `max_norm`.

    BOS and padding keep their clean residual (the SAE never saw them in training), and so do massive
    activations (above `max_norm`, left out of training)."""

    def edit(h: torch.Tensor) -> torch.Tensor:
        m = content.to(h.device)
        if max_norm is not None:
            m = m & (h.norm(dim=-1) <= max_norm)
        return torch.where(m[..., None], fn(h).to(h.dtype), h)

    return edit


def _keeper(seen: dict[int, torch.Tensor], layer: int) -> Edit:
    """An edit that changes nothing and keeps a float32 copy of the residual in `seen[layer]` (`hidden_states`'s)."""

    def keep(h: torch.Tensor) -> torch.Tensor:
        seen[layer] = h.float().clone()  # a copy: later blocks may not, but could, write into their input
        return h

    return keep


@dataclass
class _LayerClean:
    """What every SAE at one layer is compared with: the clean residual after the block and both ablations."""

    hidden: list[torch.Tensor]
    """Per batch, `[b, seq, d]` the clean residual after the block; the edited forwards start from it."""
    mean: torch.Tensor
    """`[d]` its mean over content positions: the mean ablation."""
    rows: torch.Tensor
    """`[n, d]` its content rows under `max_norm`, for `error_geometry`."""
    ablations: dict[str, tuple[float, float]] = field(default_factory=dict)
    """`{"zero" | "mean": (summed NLL, summed KL)}`."""


class LMEval:
    """One model's LM-eval batches and what no SAE changes, each computed once for all the SAEs evaluated on them.

        per model  the clean pass: log-probs at the counted positions, clean NLL, the clean residual after
                   each of `layers` (a forward per batch)
        per layer  its clean residual (a forward up to the block, unless in `layers`), its mean, zero and
                   mean ablation
        per SAE    the conditions sae, rand_err and rand_perp_err

    Edited forwards start after the edited block from the clean residual (`backend.start_after`) where the
    backend can: the blocks before an edit are the clean pass's. Memory: the clean log-probs and their exp,
    2 x positions x vocab floats (Gemma-3, 8 passages of 128 tokens: ~2 GB); keep one model's at a time.
    """

    def __init__(self, backend: Backend, batches: Iterable[Batch], layers: Iterable[int] = ()):
        self.backend, self.batches, self.keep = backend, list(batches), sorted(set(layers))
        self._clean: list[list[_CleanRows]] | None = None
        self._hidden: dict[int, list[torch.Tensor]] = {}  # the clean pass's residual after each block of `keep`
        self._layers: dict[tuple[int, float | None], _LayerClean] = {}
        self._buf: torch.Tensor | None = None
        self.clean_nll, self.n_tokens = 0.0, 0  # summed clean NLL over the counted positions, their number (`clean`)

    @torch.no_grad()
    def clean(self) -> list[list[_CleanRows]]:
        """Per batch, per sequence: the clean rows (computed on the first call)."""
        if self._clean is None:
            self._clean = []
            for b in self.batches:
                seen: dict[int, torch.Tensor] = {}
                keepers = {la: _keeper(seen, la) for la in self.keep} or None
                self._clean.append(_clean_rows(self.backend.logits(b, keepers), b))
                for la in self.keep:
                    self._hidden.setdefault(la, []).append(seen[la])
            rows = [c for per_batch in self._clean for c in per_batch]
            self.clean_nll = -sum(float(c.logp.gather(1, c.target[:, None])[:, 0][c.counted].sum(dtype=torch.float64))
                                  for c in rows)
            self.n_tokens = sum(int(c.counted.sum()) for c in rows)
        return self._clean

    def layer(self, layer: int, max_norm: float | None) -> _LayerClean:
        """The `_LayerClean` of block `layer` (computed on the first call for this layer and `max_norm`)."""
        key = (layer, max_norm)
        if key not in self._layers:
            self._layers[key] = self._layer_clean(layer, max_norm)
        return self._layers[key]

    @torch.no_grad()
    def _layer_clean(self, layer: int, max_norm: float | None) -> _LayerClean:
        self.clean()
        kept = self._hidden.get(layer)
        hidden, rows, total, count = [], [], None, 0
        for i, b in enumerate(self.batches):
            h = kept[i] if kept is not None else self.backend.hidden_states(b, [layer])[layer]
            content = b.is_content.to(h.device)
            keep = content & (h.norm(dim=-1) <= max_norm) if max_norm is not None else content
            s = h[content].double().sum(0)  # the mean is over every content position, massive ones included
            total, count = (s if total is None else total + s), count + int(content.sum())
            hidden.append(h)
            rows.append(h[keep].float())
        if count == 0:
            raise ValueError("lm_loss_recovered: the batches hold no content tokens")
        st = _LayerClean(hidden, (total / count).float(), torch.cat(rows))
        if self.n_tokens == 0:
            raise ValueError("lm_loss_recovered: no positions with a next content token")
        st.ablations["zero"] = self.edited(layer, st, lambda i: torch.zeros_like, max_norm)
        st.ablations["mean"] = self.edited(layer, st, lambda i: lambda h: st.mean.to(h.device).expand_as(h), max_norm)
        return st

    @torch.no_grad()
    def edited(self, layer: int, st: _LayerClean, fn_for: Callable[[int], Edit], max_norm: float | None,
               ) -> tuple[float, float]:
        """Summed (NLL, KL(clean || edited)) with `fn_for(batch index)` spliced in after block `layer` (`_splice`)."""
        nll = kl = 0.0
        for i, (b, clean) in enumerate(zip(self.batches, self.clean())):
            edits = {layer: _splice(fn_for(i), b.is_content, max_norm)}
            with start_after(self.backend, layer, st.hidden[i]):
                logits = self.backend.logits(b, edits)
            for c in clean:
                dn, dk = _nll_kl(logits, c, self._scratch(logits))
                nll, kl = nll + dn, kl + dk
            del logits  # before the next batch's forward
        return nll, kl

    def _scratch(self, logits: torch.Tensor) -> torch.Tensor:
        """A `[seq, vocab]` float32 buffer for `_nll_kl`, allocated once (grown if a batch is longer)."""
        shape = logits.shape[1:]
        if self._buf is None or self._buf.shape[0] < shape[0] or self._buf.shape[1:] != shape[1:] \
                or self._buf.device != logits.device:
            self._buf = torch.empty(shape, device=logits.device)
        return self._buf


@torch.no_grad()
def lm_loss_recovered(backend: Backend, sae: Any, layer: int, batches: Iterable[Batch] | LMEval,
                      clean_loss: float | None = None, max_norm: float | None = None, seed: int = 0) -> dict[str, float]:
    """Next-token loss and KL with the SAE reconstruction spliced in after block `layer`, vs clean and ablations.

    Only content positions are replaced (BOS and padding keep their clean residual: the SAE never
    saw them in training). frac_recovered_X = (L_X - L_sae) / (L_X - L_clean) for X in {zero, mean};
    kl_X is the mean KL(clean || spliced) of the next-token distribution and kl_recovered_X =
    1 - kl_sae / kl_X (SAEBench). `sae` needs only `.encode(x)` and `.decode(codes)` on raw `[..., d_model]`
    tensors. `batches` may be an `LMEval` of `backend`: its clean pass and the layer's ablations are then
    computed once for every SAE evaluated with it (`run_train` keeps one per model). `clean_loss`, if given,
    replaces the clean loss (it does not depend on the layer). Positions whose clean residual norm exceeds
    `max_norm` (massive activations the SAE was not trained on, see `massive_activation_threshold`) keep
    their clean residual in every condition.

    Same-norm random-error baselines (Gurnee 2024): rand_err replaces h by h + a random vector of the
    SAE error's per-token norm; rand_perp_err by h + a random vector orthogonal to h with the norm of the
    error's part orthogonal to h. `error_geometry` says where the SAE's error lives (err_* columns).
    """
    ev = batches if isinstance(batches, LMEval) else LMEval(backend, batches)
    if ev.backend is not backend:
        raise ValueError("lm_loss_recovered: the LMEval was made for another backend")
    if hasattr(sae, "eval"):
        sae.eval()
    st = ev.layer(layer, max_norm)
    recon = lambda h: sae.decode(sae.encode(h.float()))  # noqa: E731
    # One random draw per batch, shared by both random baselines (their difference is the radial part).
    runs = {"sae": ev.edited(layer, st, lambda i: recon, max_norm), **st.ablations,
            "rand_err": ev.edited(layer, st, lambda i: same_norm_random_error(recon, seed + i), max_norm),
            "rand_perp_err": ev.edited(layer, st, lambda i: same_norm_random_error(recon, seed + i, perp_only=True),
                                       max_norm)}
    n_tok = ev.n_tokens
    loss = {"clean": ev.clean_nll / n_tok if clean_loss is None else clean_loss,
            **{k: v[0] / n_tok for k, v in runs.items()}}
    out = {f"loss_{k}": v for k, v in loss.items()}
    out.update({f"kl_{k}": v[1] / n_tok for k, v in runs.items()})
    for abl in ("zero", "mean"):
        gap = loss[abl] - loss["clean"]
        out[f"frac_recovered_{abl}"] = (loss[abl] - loss["sae"]) / gap if abs(gap) > 1e-12 else float("nan")
        kl_abl = out[f"kl_{abl}"]
        out[f"kl_recovered_{abl}"] = 1.0 - out["kl_sae"] / kl_abl if kl_abl > 1e-12 else float("nan")
    h = st.rows
    out.update(error_geometry(h, recon(h).float()) if len(h) > 1 else {})
    out["n_tokens"] = n_tok
    return out


# --- stage entry point --------------------------------------------------------------------------

CSV_COLUMNS = ["model", "layer", "hook_name", "seed", "architecture", "d_sae", "fvu", "l0", "dead_frac", "dense_frac", "excluded_frac", "masked_rows",
               "loss_clean", "loss_sae", "loss_zero", "loss_mean", "frac_recovered_zero", "frac_recovered_mean",
               "kl_sae", "kl_zero", "kl_mean", "kl_recovered_zero", "kl_recovered_mean",
               "loss_rand_err", "kl_rand_err", "loss_rand_perp_err", "kl_rand_perp_err",
               "err_rel_norm", "err_radial_share", "random_radial_share", "err_top_pc_share", "random_top_pc_share",
               "train_tokens", "wall_s"]
"""kl_* (KL of the next-token distribution, clean vs spliced), *_rand_err (same-norm random error, Gurnee 2024)
and err_* (where the SAE's error lives) are described in `lm_loss_recovered` and `error_geometry`."""
LM_COLUMNS = [c for c in CSV_COLUMNS if c.startswith(("loss_", "kl_", "frac_recovered_", "err_", "random_"))]
"""The columns `lm_loss_recovered` fills: empty for seeds `sae.lm_eval_seeds` leaves out."""
SEED_COLUMNS = ["seed_ref", "seed_shared_dec", "seed_median_cos_dec", "seed_q10_cos_dec", "seed_q90_cos_dec",
                "seed_shared_enc", "seed_median_cos_enc", "seed_n_live"]
"""Seed stability against seed `seed_ref` (`stability.summary_columns`); empty with one seed."""
STABILITY_FILE = "sae_stability.json"


def _lm_batches(cfg: RunConfig, key: str, backend: Backend, texts: list[str] | None = None) -> list[Batch]:
    """Held-out corpus passages (or `texts`), tokenized by `backend`, for the LM-loss evaluation."""
    if texts is None:
        from .corpus import is_heldout, passages  # owned by the extraction stage

        texts = [p for p in passages(cfg.corpus) if is_heldout(p, cfg.corpus.heldout_fraction)]
    texts = texts[: cfg.sae.lm_eval_passages]
    bs = cfg.extract.batch_size
    return [backend.tokenize(texts[i : i + bs], cfg.model(key).max_ctx) for i in range(0, len(texts), bs)]


def _lm_eval(cfg: RunConfig, key: str, backend: Backend, texts: list[str] | None, lm: dict[str, LMEval]) -> LMEval:
    """Model `key`'s `LMEval` from `lm`, made on first use; another model's is dropped (it holds ~2 GB for Gemma-3)."""
    if key not in lm:
        lm.clear()
        lm[key] = LMEval(backend, _lm_batches(cfg, key, backend, texts), cfg.model(key).layers)
    return lm[key]


def _fingerprint(cfg: RunConfig, cache: ActivationCache, key: str, layer: int, seed: int, data_seed: int,
                 legacy: bool = False) -> dict:
    """What an SAE is a function of: its config, seeds, model, layer and the cache's data-defining fields.

    `legacy`: the fingerprint SAEs trained before issue 15 carry (a hash of the whole manifest, timings
    included); such an SAE is still reused when it matches, so old runs do not retrain once."""
    manifest = json.dumps(cache.manifest if legacy else manifest_identity(cache.manifest), sort_keys=True, default=str)
    return {"sae_config": _config_dict(cfg.sae.for_layer(key, layer)), "seed": seed, "data_seed": data_seed, "model": cfg.model(key).name,
            "layer": layer, "cache": hashlib.sha256(manifest.encode()).hexdigest()[:16]}


def run_train(cfg: RunConfig, seeds: list[int] | None = None, resume: bool = False,
              backends: dict | None = None, progress: bool = True, lm_texts: list[str] | None = None,
              dist: Dist | None = None, distribute_modules: bool = False) -> list[dict]:
    """Train, save and evaluate every configured (model, layer, seed) SAE; write `report/sae_metrics.csv`.

    The seeds of one (model, layer) train in the same pass over the data (`train_saes`); with two or more
    seeds, each SAE's seed stability against the first seed (`stability.seed_stability`) fills the `seed_*`
    columns and `report/sae_stability.json`. SAEs whose directory is complete and whose saved fingerprint
    (SAE config, seed, data seed, model, layer, cache manifest) matches are reused, not retrained. Without
    `backends` the LM-loss columns stay empty; with them, the LM loss is measured on `lm_texts` (default:
    the first `sae.lm_eval_passages` held-out corpus passages, via `crossdict.corpus`) for every seed, or
    for the first only (`sae.lm_eval_seeds: first`; the others' LM columns stay empty). One `LMEval` per
    model serves all its SAEs: one clean pass per model, the ablations once per layer.

    `dist` (from `distributed.init_dist`): every SAE is trained data-parallel over all ranks, or,
    with `distribute_modules`, the seeds of (model, layer) j are trained whole by rank j % world_size.
    Rank 0 writes the CSV.
    """
    dist = dist or Dist(device=resolve_device(cfg.device))
    if dist.enabled:
        check_same_config(dist, cfg.to_dict())
    cache = ActivationCache(cfg.cache_dir)
    seeds = list(seeds if seeds is not None else cfg.sae.seeds)
    groups = [(key, layer) for key in ("a", "b") for layer in cfg.model(key).layers]
    for key, layer in groups:
        validate_sae_config(cfg.sae.for_layer(key, layer), cache.d_model(key), len(cache.rows(key, "train")))
    if distribute_modules:
        split_work(len(groups), dist, "SAE groups to train (models x layers; a layer's seeds train together)",
                   "drop --distribute-modules to train each SAE data-parallel over all ranks")
        mine, job_dist = range(dist.rank, len(groups), dist.world_size), local(dist)
    else:
        mine, job_dist = range(len(groups)), dist
    if dist.enabled and dist.is_main:
        how = "whole SAEs dealt to" if distribute_modules else "each data-parallel over"
        print(f"[crossdict] train: {len(groups) * len(seeds)} SAEs, {how} {dist.world_size} ranks")
    results: dict[int, list[dict]] = {}
    stab: dict[int, list[dict]] = {}
    lm: dict[str, LMEval] = {}  # the model being evaluated: its clean pass serves every layer and seed
    for j in mine:
        key, layer = groups[j]
        data = _layer_rows(cfg, cache, key, layer)  # one layer's row lists in memory at a time
        results[j], stab[j] = _train_group(cfg, cache, key, layer, seeds, data, resume, backends, progress, lm_texts, lm,
                                           job_dist)
    if distribute_modules and dist.enabled:
        gathered = dist.all_gather_object({str(j): (r, stab[j]) for j, r in results.items()})
        merged = {int(j): v for part in gathered for j, v in part.items()}
        results, stab = {j: v[0] for j, v in merged.items()}, {j: v[1] for j, v in merged.items()}
    rows = [r for j in range(len(groups)) for r in results[j]]
    if dist.is_main:
        _write_csv(cfg.report_dir / "sae_metrics.csv", rows)
        if any(stab.values()):
            atomic_write_json(cfg.report_dir / STABILITY_FILE, [s for j in range(len(groups)) for s in stab[j]])
    dist.barrier()
    return rows


def _layer_rows(cfg: RunConfig, cache: ActivationCache, key: str, layer: int) -> tuple:
    """(acts, max_norm, train rows, held-out rows) of one cached layer, masked rows left out.

    The rows are those of the cache's row mask (`ActivationCache.row_mask`: massive activations and
    the attention sink of a model without BOS), the same rows every other stage uses."""
    d_model = cache.d_model(key)
    acts = cache.acts(key, layer)
    if acts.shape[1] != d_model:
        raise ValueError(f"activation cache {cfg.cache_dir}: manifest says model {key} "
                         f"({cfg.model(key).name}) has d_model={d_model}, but {hook_name(layer)} has "
                         f"{acts.shape[1]} columns; re-extract the cache")
    train_rows, held_rows = cache.rows(key, "train"), cache.rows(key, "heldout")
    keep = cache.row_mask(key, layer, cfg.sae.max_norm_ratio)
    max_norm = cache.mask_info(key, layer, cfg.sae.max_norm_ratio)["max_norm"]
    return acts, max_norm, train_rows, train_rows[keep[train_rows]], held_rows[keep[held_rows]]


def _train_group(cfg: RunConfig, cache: ActivationCache, key: str, layer: int, seeds: list[int], data: tuple,
                 resume: bool | str, backends: dict | None, progress: bool, lm_texts: list[str] | None,
                 lm: dict[str, LMEval], dist: Dist) -> tuple[list[dict], list[dict]]:
    """Train (or reuse) the seeds of one (model, layer) in one data pass, evaluate them, measure seed stability.

    Returns the CSV rows and the stability records (seed j >= 1 against seeds[0]). Rank 0 evaluates and writes.
    """
    acts, max_norm, train_rows, layer_train, layer_held = data
    d_model = cache.d_model(key)
    scfg = cfg.sae.for_layer(key, layer)  # `sae.per_layer` overrides applied
    data_seed = seeds[0]
    dirs = [cfg.sae_dir(key, layer, s) for s in seeds]
    fps = [_fingerprint(cfg, cache, key, layer, s, data_seed) for s in seeds]
    t0 = time.perf_counter()
    # Rank 0 decides, so no rank reads files another is about to write.
    legacy = [_fingerprint(cfg, cache, key, layer, s, data_seed, legacy=True) for s in seeds]
    metrics = dist.broadcast_object([_reusable_metrics(d, (fp, old)) for d, fp, old in zip(dirs, fps, legacy)]
                                    if dist.is_main else None)
    todo = [i for i, m in enumerate(metrics) if m is None]
    if todo:
        metas = []
        for i in todo:
            meta = {"model_name": cfg.model(key).name, "hook_name": hook_name(layer),
                    "context_size": cfg.model(key).max_ctx, "fingerprint": fps[i], "max_norm": max_norm}
            if backends is not None:
                meta["prepend_bos"] = bool(backends[key].has_bos)
            metas.append(meta)
        saes = train_saes(acts, layer_train, scfg, [seeds[i] for i in todo], [dirs[i] for i in todo], resume, progress,
                          metas, dist=dist, data_seed=data_seed)
        wall = (time.perf_counter() - t0) / len(todo)  # one pass trains them all: each is charged its share
        for i, sae in zip(todo, saes):
            if dist.is_main:
                m = evaluate_sae(sae, acts, layer_held)
                m["train_wall_s"] = wall
                m["excluded_frac"] = 1.0 - len(layer_train) / len(train_rows)
                atomic_write_json(dirs[i] / METRICS_FILE, m)
                metrics[i] = m
        metrics = dist.broadcast_object(metrics)
    rows = []
    for i, seed in enumerate(seeds):
        lm_evaluated = cfg.sae.lm_eval_seeds == "all" or i == 0
        if backends is not None and lm_evaluated and (metrics[i].get("lm_eval_passages") != cfg.sae.lm_eval_passages
                                                      or "kl_sae" not in metrics[i]):  # measured before the KL columns
            if dist.is_main:
                sae = load_sae(dirs[i], device=getattr(backends[key], "device", "cpu"))
                ev = _lm_eval(cfg, key, backends[key], lm_texts, lm)
                metrics[i].update(lm_loss_recovered(backends[key], sae, layer, ev, max_norm=max_norm))
                metrics[i]["lm_eval_passages"] = cfg.sae.lm_eval_passages
                atomic_write_json(dirs[i] / METRICS_FILE, metrics[i])
            metrics[i] = dist.broadcast_object(metrics[i])
        row = {"model": cfg.model(key).name, "layer": layer, "hook_name": hook_name(layer), "seed": seed,
               "architecture": scfg.architecture, "d_sae": d_model * scfg.expansion_factor,
               "train_tokens": (scfg.train_tokens // scfg.batch_size) * scfg.batch_size,
               "wall_s": round(metrics[i].get("train_wall_s", time.perf_counter() - t0), 2)}
        row["masked_rows"] = int(cache.mask_info(key, layer, cfg.sae.max_norm_ratio)["dropped"])  # of all cached rows
        # A seed left out of the LM eval has empty LM columns, whatever an earlier run measured.
        row.update({c: metrics[i].get(c, "") if lm_evaluated or c not in LM_COLUMNS else ""
                    for c in CSV_COLUMNS if c not in row})
        rows.append(row)
    stab = _group_stability(cfg, key, layer, seeds, dirs, acts, layer_held, rows) if len(seeds) > 1 and dist.is_main else []
    return rows, stab


def _group_stability(cfg: RunConfig, key: str, layer: int, seeds: list[int], dirs: list[Path], acts: Rows,
                     held: np.ndarray, rows: list[dict]) -> list[dict]:
    """Seed j >= 1 against seeds[0] (decoder and encoder Hungarian, live latents on held-out rows); fills `rows`.

    The first seed's row carries its stability against seeds[1]; each record drops the matched index pairs.
    """
    saes = [load_sae(d) for d in dirs]
    live = [live_latents(s, acts, held) for s in saes]
    out = []
    for j in range(1, len(seeds)):
        st = seed_stability(saes[0], saes[j], live[0], live[j])
        cols = summary_columns(st)
        rows[j].update({**cols, "seed_ref": seeds[0]})
        if j == 1:
            rows[0].update({**cols, "seed_ref": seeds[1]})
        out.append({"model": cfg.model(key).name, "key": key, "layer": layer, "seed_a": seeds[0], "seed_b": seeds[j],
                    **{part: {k: v for k, v in st[part].items() if k != "pairs"} for part in ("decoder", "encoder")}})
    return out


def _reusable_metrics(out_dir: Path, fps: tuple[dict, ...]) -> dict | None:
    """The saved metrics of a complete SAE whose fingerprint is one of `fps`, else None (train it)."""
    if not (is_complete(out_dir) and (out_dir / METRICS_FILE).is_file()):
        return None
    try:
        extra = read_json(out_dir / "crossdict.json", "SAE spec")
        metrics = read_json(out_dir / METRICS_FILE, "SAE metrics")
    except ValueError:
        return None
    return metrics if extra.get("spec", {}).get("metadata", {}).get("fingerprint") in fps else None


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS + SEED_COLUMNS, restval="")
    w.writeheader()
    for r in rows:
        w.writerow({c: (f"{v:.6g}" if isinstance(v, float) else v) for c, v in r.items()})
    atomic_write_text(path, buf.getvalue())
