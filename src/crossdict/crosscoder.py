"""Cross-tokenizer crosscoder: one sparse dictionary read from and written to N >= 2 activation streams.

A crosscoder (Lindsey et al., "Sparse Crosscoders for Cross-Layer Features and Model Diffing",
Anthropic 2024) encodes every stream with its own encoder, sums them into one latent code, and
decodes that code with one decoder per stream:

    f = act( sum_m (s_m x_m - b_dec_m) @ W_enc_m^T + b_enc )     [n, d_latent]
    x_hat_m = (f @ W_dec_m + b_dec_m) / s_m                       [n, d_m]

Crosscoders need the streams to be read at the same tokens. Two models with different tokenizers
have no common token stream, but the character-span anchor pairs of the activation cache are one:
row i of every stream is the state after reading exactly the same characters (`anchors.py`).

Each stream is scaled by its own fixed s_m (mean ||s_m x_m||^2 = d_m, `train.input_scale_and_mean`)
so the streams weigh alike in the loss. The relative decoder norm of latent i,
r_i = ||W_dec_A,i|| / (||W_dec_A,i|| + ||W_dec_B,i||), says whom it serves: ~0.5 shared, ~1 A only,
~0 B only. Norms are compared in the scaled space, so r does not depend on the raw residual scales.

Losses: TopK (Gao et al. 2024) minimises sum_m FVU_m + AuxK; L1 minimises sum_m MSE_m +
lambda * sum_i f_i sum_m ||W_dec_m,i|| (Anthropic's L1 of per-model decoder norms, which, unlike
an L2 over the concatenated row, does not reward spreading a private feature over both models).
Decoder rows are kept at unit norm over the concatenation of all streams, so the per-stream split,
and with it r, is free.

Implementation: the streams are concatenated feature-wise, `[n, sum_m d_m]`; then the summed
per-model encoders are one matmul, and the TopK path reuses the SAE's sparse kernels.

On disk, `runs/<name>/crosscoder/<layer_a>_<layer_b>/`:
    cfg.json                          format, architecture, d_latent, k, streams (name, d_in, input_scale, ...)
    crosscoder_weights.safetensors    W_enc.<m> [d_latent, d_m], W_dec.<m> [d_latent, d_m], b_dec.<m> [d_m], b_enc
                                      (scaled space: raw x_hat_m = (f @ W_dec.<m> + b_dec.<m>) / input_scale_m)
    metrics.json, training_log.jsonl  held-out FVU per stream, L0, dead fraction; training curve
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .align import LinearMap, map_dir
from .cache import ActivationCache, hook_name, manifest_identity
from .config import CrosscoderConfig, RunConfig
from .evaluate import write_csv
from .sae import _SparseDecode, _SparseEncode, load_sae
from .sae import is_complete as sae_is_complete
from .train import (CKPT_FORMAT, LOG_EVERY, BatchStream, Rows, _check_finite, _rows_digest, _save_checkpoint, _write_log,
                    evaluate_sae, input_scale_and_mean, lr_at, resume_state)
from .integrity import verify
from .utils import atomic_path, atomic_write_json, remove_file, stable_hash

CFG_FILE, WEIGHTS_FILE = "cfg.json", "crosscoder_weights.safetensors"
CKPT_FILE, LOG_FILE, METRICS_FILE = "checkpoint.safetensors", "training_log.jsonl", "metrics.json"
FORMAT = "crossdict-crosscoder"
CLASSES = ("shared", "a_only", "b_only", "dead")


class CrosscoderFormatError(ValueError):
    """A crosscoder directory is missing a file or holds tensors/config that do not fit together."""


@dataclass
class StreamInfo:
    """One input stream of a crosscoder: a (model, layer)."""

    name: str
    """Short id, e.g. `a:8` (model key : layer)."""
    d_in: int
    input_scale: float = 1.0
    """Raw activations are multiplied by this; chosen so mean ||x||^2 = d_in (as for the SAEs)."""
    model_name: str | None = None
    hook_name: str | None = None


@dataclass
class CrosscoderSpec:
    """What defines one crosscoder's shape and loss; saved to `cfg.json`."""

    architecture: Literal["topk", "l1"]
    streams: list[StreamInfo]
    d_latent: int
    k: int = 32
    l1_coefficient: float = 5.0
    aux_k: int = 256
    aux_coefficient: float = 1 / 32
    metadata: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if len(self.streams) < 2:
            raise ValueError(f"a crosscoder needs at least 2 activation streams (models/layers), got {len(self.streams)}: "
                             f"{[s.name for s in self.streams]}; for one stream train an SAE")
        if self.architecture not in ("topk", "l1"):
            raise ValueError(f"crosscoder architecture {self.architecture!r} is not one of ['topk', 'l1']")
        if self.d_latent < 1 or any(s.d_in < 1 for s in self.streams):
            raise ValueError(f"crosscoder needs d_latent >= 1 and every d_in >= 1, got d_latent={self.d_latent}, "
                             f"d_in={[s.d_in for s in self.streams]}")
        if self.architecture == "topk" and not 1 <= self.k <= self.d_latent:
            raise ValueError(f"crosscoder k={self.k} must be between 1 and d_latent={self.d_latent}")
        if len({s.name for s in self.streams}) != len(self.streams):
            raise ValueError(f"crosscoder stream names must be distinct, got {[s.name for s in self.streams]}")
        for s in self.streams:
            if not 0 < s.input_scale < float("inf"):
                raise ValueError(f"stream {s.name}: input_scale must be a positive finite number, got {s.input_scale}")


class CrosscoderOutput(NamedTuple):
    x_hat: list[Tensor]
    """Reconstruction of each stream in raw activation space, `[n, d_m]` per stream."""
    latent_acts: Tensor
    """Active latent values: `[n, k]` (TopK) or dense `[n, d_latent]` codes (L1)."""
    latent_indices: Tensor | None
    """Latent ids of `latent_acts` `[n, k]` (TopK); None when `latent_acts` is dense."""
    fvu: Tensor
    """Fraction of variance unexplained per stream over this batch, `[N]`."""
    mse: Tensor
    """Per stream: sum over d_m of squared error, mean over tokens, scaled space, `[N]`."""
    l1_loss: Tensor
    """Mean over tokens of sum_i f_i * sum_m ||W_dec_m,i|| (L1 only, else 0)."""
    auxk_loss: Tensor
    """AuxK: dead latents reconstructing every stream's residual, each normalised by its variance (TopK only)."""
    l0: Tensor
    """Mean number of non-zero latents per token."""
    loss: Tensor
    """What the trainer minimises: sum(mse) + lambda*l1 (L1), sum(fvu) + aux_coefficient*auxk (TopK)."""


class Crosscoder(nn.Module):
    """One crosscoder over `len(spec.streams)` streams; weights live in the concatenated scaled space."""

    def __init__(self, spec: CrosscoderSpec, device: str | torch.device = "cpu"):
        super().__init__()
        spec.validate()
        self.spec = spec
        d_cat = sum(s.d_in for s in spec.streams)
        bounds = np.cumsum([0] + [s.d_in for s in spec.streams]).tolist()
        self.slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        # Rows are latents, as in `SAE`: [d_latent, d_cat]; stream m owns columns slices[m].
        self.W_enc = nn.Parameter(torch.empty(spec.d_latent, d_cat, device=device))
        self.b_enc = nn.Parameter(torch.zeros(spec.d_latent, device=device))
        self.W_dec = nn.Parameter(torch.empty(spec.d_latent, d_cat, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_cat, device=device))
        self.register_buffer("scales", torch.tensor([s.input_scale for s in spec.streams], dtype=torch.float32, device=device))
        self.reset_parameters()

    @property
    def d_latent(self) -> int:
        return self.spec.d_latent

    @property
    def n_streams(self) -> int:
        return len(self.spec.streams)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder = decoder transpose (Gao et al. 2024 §A.1), as for `SAE`."""
        w = torch.randn(self.W_dec.shape, generator=generator, device=self.W_dec.device)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec)
        if self.spec.architecture == "l1":
            self.W_enc.mul_(0.1)  # small start so the initial L1 term does not swamp the MSE (see `SAE`)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- encoding / decoding (raw activations in and out) ----------------------------------------

    def _scaled(self, xs: list[Tensor]) -> Tensor:
        """Raw streams (`[n, d_m]` each) -> scaled and concatenated `[n, d_cat]`."""
        if len(xs) != self.n_streams:
            raise ValueError(f"crosscoder has {self.n_streams} streams {[s.name for s in self.spec.streams]}, got {len(xs)} inputs")
        n = {x.shape[0] for x in xs}
        if len(n) != 1:
            raise ValueError(f"paired streams need the same number of rows, got {[x.shape[0] for x in xs]}")
        for x, s in zip(xs, self.spec.streams):
            if x.shape[1] != s.d_in:
                raise ValueError(f"stream {s.name} expects d_in={s.d_in}, got {x.shape[1]} columns")
        return torch.cat([x.to(self.W_enc.dtype) * s.input_scale for x, s in zip(xs, self.spec.streams)], 1)

    def encode(self, xs: list[Tensor]) -> Tensor:
        """Raw paired streams -> dense codes `[n, d_latent]`; the pre-activation is the sum of per-stream encoders."""
        pre = F.linear(self._scaled(xs) - self.b_dec, self.W_enc, self.b_enc)
        if self.spec.architecture == "l1":
            return pre.relu()
        vals, idx = pre.topk(self.spec.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, idx, vals.relu())

    def decode(self, codes: Tensor) -> list[Tensor]:
        """Dense codes `[n, d_latent]` -> raw reconstruction of every stream, `[n, d_m]` each."""
        return self.decode_scaled(codes @ self.W_dec + self.b_dec)

    def decoder_norms(self) -> Tensor:
        """||W_dec_m,i|| in the scaled space, `[d_latent, N]`."""
        return torch.stack([self.W_dec[:, sl].norm(dim=1) for sl in self.slices], 1)

    def decoder(self, m: int) -> Tensor:
        """Stream m's decoder rows `[d_latent, d_m]` (directions are the same in raw and scaled space)."""
        return self.W_dec[:, self.slices[m]]

    # -- training forward ------------------------------------------------------------------------

    def _per_stream_sq(self, diff: Tensor) -> Tensor:
        """Sum of squares of `diff` `[n, d_cat]` within each stream, `[N]`."""
        return torch.stack([diff[:, sl].pow(2).sum() for sl in self.slices])

    def forward(self, xs: list[Tensor], dead_mask: Tensor | None = None, l1_scale: float = 1.0) -> CrosscoderOutput:
        """Reconstruct raw paired streams `[n, d_m]` and compute the loss terms.

        dead_mask `[d_latent]` bool: latents eligible for the AuxK loss (TopK).
        l1_scale: warm-up factor in [0, 1] applied to the L1 coefficient.
        """
        target = self._scaled(xs)  # [n, d_cat], scaled space
        n = target.shape[0]
        cc_in = target - self.b_dec
        total_var = self._per_stream_sq(target - target.mean(0)).clamp_min(1e-12)  # [N]
        zero = target.new_zeros(())
        if self.spec.architecture == "l1":
            codes = F.linear(cc_in, self.W_enc, self.b_enc).relu()
            out = codes @ self.W_dec + self.b_dec
            err = self._per_stream_sq(out - target)
            # Anthropic (2024): L1 weighted by the *sum* of per-model decoder norms.
            l1 = (codes * self.decoder_norms().sum(1)).sum(-1).mean()
            loss = err.sum() / n + self.spec.l1_coefficient * l1_scale * l1
            l0 = (codes > 0).sum(-1).float().mean()
            return CrosscoderOutput(self.decode_scaled(out), codes, None, err / total_var, err / n, l1, zero, l0, loss)

        train = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            pre = F.linear(cc_in, self.W_enc, self.b_enc)
            idx = pre.topk(self.spec.k, dim=-1, sorted=False).indices
            n_dead = int(dead_mask.sum()) if train and dead_mask is not None else 0
            if n_dead:
                dead_ids = dead_mask.nonzero().squeeze(1)
                pre_dead = pre[:, dead_ids]
                aux_idx = pre_dead.topk(min(self.spec.aux_k, n_dead), dim=-1, sorted=False).indices
        acts = (_SparseEncode.apply(cc_in, self.W_enc, self.b_enc, idx, pre) if train else pre.gather(1, idx)).relu()
        out = _SparseDecode.apply(idx, acts, self.W_dec) + self.b_dec
        err = self._per_stream_sq(out - target)
        fvu = err / total_var
        auxk = zero
        if n_dead:
            # AuxK (Gao et al. 2024 §A.2) on all streams at once, each stream's error normalised on its own.
            resid = (target - out).detach()
            aux_acts = _SparseEncode.apply(cc_in, self.W_enc[dead_ids], self.b_enc[dead_ids], aux_idx, pre_dead).relu()
            e_hat = _SparseDecode.apply(aux_idx, aux_acts, self.W_dec[dead_ids])
            scale = min(n_dead / self.spec.aux_k, 1.0)
            auxk = scale * (self._per_stream_sq(e_hat - resid) / self._per_stream_sq(resid - resid.mean(0)).clamp_min(1e-12)).sum()
        loss = fvu.sum() + self.spec.aux_coefficient * auxk
        l0 = (acts > 0).sum(-1).float().mean()
        return CrosscoderOutput(self.decode_scaled(out), acts, idx, fvu, err / n, zero, auxk, l0, loss)

    def decode_scaled(self, out: Tensor) -> list[Tensor]:
        """Concatenated scaled reconstruction `[n, d_cat]` -> raw per stream."""
        return [out[:, sl] / s.input_scale for sl, s in zip(self.slices, self.spec.streams)]

    # -- decoder constraint: unit norm over the concatenated row (the per-stream split stays free) ---

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)


# --- save / load --------------------------------------------------------------------------------


def save_crosscoder(cc: Crosscoder, path: str | Path) -> Path:
    """Write `crosscoder_weights.safetensors` then `cfg.json` (last: its presence marks a complete save)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_file(path / CFG_FILE)
    tensors = {"b_enc": cc.b_enc.detach().float().cpu().contiguous()}
    for m, sl in enumerate(cc.slices):
        tensors[f"W_enc.{m}"] = cc.W_enc[:, sl].detach().float().cpu().contiguous()
        tensors[f"W_dec.{m}"] = cc.W_dec[:, sl].detach().float().cpu().contiguous()
        tensors[f"b_dec.{m}"] = cc.b_dec[sl].detach().float().cpu().contiguous()
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(path / CFG_FILE, {"format": FORMAT, "version": 1, **asdict(cc.spec)})
    return path


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise CrosscoderFormatError(msg)


def load_crosscoder(path: str | Path, device: str | torch.device = "cpu") -> Crosscoder:
    """Load a crosscoder saved by `save_crosscoder`; every mismatch raises `CrosscoderFormatError` naming it."""
    path = Path(path)
    cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
    _expect(path.is_dir(), f"no crosscoder at {path}; train one with `crossdict crosscode --config ...`")
    for p in (cfg_path, w_path):
        _expect(p.is_file(), f"crosscoder file missing: {p} (interrupted save? retrain it)")
        verify(p)
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CrosscoderFormatError(f"{cfg_path}: not valid JSON (truncated?): {e}") from None
    _expect(isinstance(cfg, dict) and cfg.get("format") == FORMAT,
            f"{cfg_path}: format {cfg.get('format') if isinstance(cfg, dict) else None!r}, expected {FORMAT!r} "
            "(an SAE directory? load it with crossdict.sae.load_sae)")
    _expect(cfg.get("version") == 1, f"{cfg_path}: version {cfg.get('version')!r} not supported (expected 1)")
    fields = {f.name for f in dataclasses.fields(CrosscoderSpec)}
    missing = sorted(f for f in ("architecture", "streams", "d_latent") if f not in cfg)
    _expect(not missing, f"{cfg_path}: missing field(s) {missing}")
    try:
        streams = [StreamInfo(**s) for s in cfg["streams"]]
        spec = CrosscoderSpec(**{k: v for k, v in cfg.items() if k in fields and k != "streams"}, streams=streams)
        spec.validate()
    except (TypeError, ValueError) as e:
        raise CrosscoderFormatError(f"{cfg_path}: invalid crosscoder config: {e}") from None
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CrosscoderFormatError(f"{w_path}: unreadable (truncated or corrupt?): {e}") from None
    want = {"b_enc": (spec.d_latent,)}
    for m, s in enumerate(streams):
        want |= {f"W_enc.{m}": (spec.d_latent, s.d_in), f"W_dec.{m}": (spec.d_latent, s.d_in), f"b_dec.{m}": (s.d_in,)}
    for name, shape in want.items():
        _expect(name in state, f"{w_path}: tensor {name!r} missing; has {sorted(state)}")
        t = state[name]
        _expect(tuple(t.shape) == shape, f"{w_path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)} "
                                         f"(from {cfg_path})")
        _expect(t.is_floating_point() and bool(torch.isfinite(t).all()), f"{w_path}: tensor {name!r} is not finite floats")
    cc = Crosscoder(spec, device=device)
    with torch.no_grad():
        cc.b_enc.copy_(state["b_enc"])
        for m, sl in enumerate(cc.slices):
            cc.W_enc[:, sl] = state[f"W_enc.{m}"]
            cc.W_dec[:, sl] = state[f"W_dec.{m}"]
            cc.b_dec[sl] = state[f"b_dec.{m}"]
    return cc.eval()


def is_complete(path: str | Path) -> bool:
    return all((Path(path) / f).is_file() for f in (CFG_FILE, WEIGHTS_FILE))


# --- paired data --------------------------------------------------------------------------------


class _InMemory:
    """An `[n, d]` array as `Rows`."""

    def __init__(self, x: np.ndarray):
        self.x = np.asarray(x)
        self.shape = tuple(self.x.shape)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.x[rows], dtype=np.float32)


@dataclass
class PairedStreams:
    """N activation streams read at the same anchor pairs: row `rows[i, m]` of `acts[m]` is pair i in stream m."""

    acts: list[Rows]
    """One `[n_tokens_m, d_m]` row source per stream (`ShardedArray` or in-memory)."""
    rows: np.ndarray
    """int64 `[n_pairs, N]`."""
    names: list[str]

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        if len(self.acts) < 2:
            raise ValueError(f"a crosscoder needs at least 2 activation streams (models/layers), got {len(self.acts)}: "
                             f"{self.names}; for one stream train an SAE")
        if len(self.names) != len(self.acts) or self.rows.ndim != 2 or self.rows.shape[1] != len(self.acts):
            raise ValueError(f"paired rows must be [n_pairs, {len(self.acts)}] with one name per stream; got rows "
                             f"{list(self.rows.shape)}, names {self.names}")
        for m, (a, name) in enumerate(zip(self.acts, self.names)):
            col = self.rows[:, m]
            if len(col) and (col.min() < 0 or col.max() >= a.shape[0]):
                raise ValueError(f"anchor pairs index row {int(col.max() if col.max() >= a.shape[0] else col.min())} of "
                                 f"stream {name}, which has {a.shape[0]} rows: the anchor pairs come from a different run or cache")

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], names: list[str] | None = None) -> "PairedStreams":
        """In-memory paired arrays `[n, d_m]`: row i of every array is one anchor pair."""
        names = names or [f"s{m}" for m in range(len(arrays))]
        lens = [len(x) for x in arrays]
        if len(set(lens)) > 1:
            raise ValueError("paired streams must have the same number of rows (row i of each is one anchor pair); got "
                             + ", ".join(f"{nm}: {n}" for nm, n in zip(names, lens)))
        n = lens[0] if lens else 0
        return cls([_InMemory(x) for x in arrays], np.tile(np.arange(n)[:, None], (1, len(arrays))), names)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def d_ins(self) -> list[int]:
        return [int(a.shape[1]) for a in self.acts]

    def take(self, pairs: np.ndarray) -> list[np.ndarray]:
        """Activations of pairs `pairs` in every stream: float32 `[len(pairs), d_m]` each."""
        return [a.take(self.rows[pairs, m]) for m, a in enumerate(self.acts)]

    def subset(self, keep: np.ndarray) -> "PairedStreams":
        return PairedStreams(self.acts, self.rows[keep], self.names)


def streams_from_cache(cache: ActivationCache, streams: list[tuple[str, int]], split: str = "train",
                       pairs: np.ndarray | None = None) -> PairedStreams:
    """Streams `[(model key, layer), ...]` at the cache's anchor pairs (or at `pairs` `[n, 2]`, rows in a and b).

    `pairs` from elsewhere are checked: every pair must join an A and a B token that end at the same
    character of the same passage in *this* cache, else they come from another run.
    """
    if len(streams) < 2:
        raise ValueError(f"a crosscoder needs at least 2 activation streams (models/layers), got {len(streams)}: {streams}")
    own = pairs is None
    pairs = cache.anchor_pairs(split) if own else np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"anchor pairs must be [n_pairs, 2] (row in a, row in b), got shape {list(pairs.shape)}")
    if not own:
        ta, tb = cache.tokens("a"), cache.tokens("b")
        for key, col, t in (("a", 0, ta), ("b", 1, tb)):
            bad = (pairs[:, col] < 0) | (pairs[:, col] >= len(t))
            if bad.any():
                raise ValueError(f"anchor pairs index row {int(pairs[bad, col][0])} of model {key}, whose cache {cache.dir} "
                                 f"has {len(t)} tokens: the anchor pairs come from a different run or cache")
        # (passage, char_end) of both sides must agree: TOKEN_COLUMNS 0 and 3.
        diff = np.nonzero((ta[pairs[:, 0]][:, [0, 3]] != tb[pairs[:, 1]][:, [0, 3]]).any(1))[0]
        if len(diff):
            i = int(diff[0])
            raise ValueError(f"{len(diff)} of {len(pairs)} anchor pairs join tokens that did not read the same characters "
                             f"(pair {i}: a row {pairs[i, 0]} ends at passage {ta[pairs[i, 0], 0]} char {ta[pairs[i, 0], 3]}, "
                             f"b row {pairs[i, 1]} at passage {tb[pairs[i, 1], 0]} char {tb[pairs[i, 1], 3]}): "
                             f"the anchor pairs come from a different run than the cache {cache.dir}")
    col = {"a": 0, "b": 1}
    for key, _ in streams:
        if key not in col:
            raise ValueError(f"stream model key must be 'a' or 'b', got {key!r}")
    acts = [cache.acts(key, layer) for key, layer in streams]
    return PairedStreams(acts, pairs[:, [col[k] for k, _ in streams]], [f"{k}:{layer}" for k, layer in streams])


# --- training -----------------------------------------------------------------------------------


def validate_crosscoder_config(cfg: CrosscoderConfig, k: int, d_latent: int) -> None:
    """Fail before any work on values the crosscoder cannot train with, naming the field and the value."""
    checks = [
        (cfg.architecture in ("topk", "l1"), f"crosscoder.architecture {cfg.architecture!r} is not one of ['topk', 'l1']"),
        (cfg.architecture == "l1" or 1 <= k <= d_latent, f"crosscoder.k={k} must be between 1 and d_latent={d_latent}"),
        (cfg.batch_size >= 1, f"crosscoder.batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.train_tokens >= cfg.batch_size, f"crosscoder.train_tokens={cfg.train_tokens} is less than one batch "
                                             f"(crosscoder.batch_size={cfg.batch_size})"),
        (cfg.checkpoint_every >= 1, f"crosscoder.checkpoint_every must be >= 1, got {cfg.checkpoint_every}"),
        (cfg.aux_k >= 1 and cfg.aux_coefficient >= 0, "crosscoder.aux_k must be >= 1 and aux_coefficient >= 0"),
        (cfg.dead_tokens_threshold >= 1, f"crosscoder.dead_tokens_threshold must be >= 1, got {cfg.dead_tokens_threshold}"),
        (0 <= cfg.lr_decay_fraction <= 1, f"crosscoder.lr_decay_fraction must be in [0, 1], got {cfg.lr_decay_fraction}"),
        (cfg.lr_warmup_steps >= 0 and cfg.l1_warmup_steps >= 0, "crosscoder.lr_warmup_steps and l1_warmup_steps must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def _config_dict(cfg: CrosscoderConfig) -> dict:
    """The fields that determine a trained crosscoder (not the stage switch or analysis thresholds)."""
    d = asdict(cfg)
    for k in ("enabled", "exclusive_r", "agreement_min_cos"):
        d.pop(k)
    return d


def train_crosscoder(
    ps: PairedStreams, cfg: CrosscoderConfig, out_dir: str | Path, k: int | None = None, resume: bool | str = False,
    progress: bool = True, stream_meta: list[dict] | None = None, metadata: dict | None = None, max_steps: int | None = None,
) -> Crosscoder:
    """Train a crosscoder on the paired streams `ps` and save it to `out_dir` (see the module docstring).

    Like `train.train_sae`: batch b is a pure function of (cfg.seed, b); a checkpoint every
    `cfg.checkpoint_every` steps holds all other state, so `resume=True` reproduces an uninterrupted
    run bit for bit; `max_steps` stops after checkpointing at that step without a final save.
    """
    out_dir = Path(out_dir)
    k = cfg.k if k is None else k
    if k is None:
        if cfg.architecture == "topk":
            raise ValueError("crosscoder.k is not set: pass k (the crosscode stage uses sae.k, for equal L0)")
        k = 0  # unused by L1
    d_latent = cfg.expansion_factor * max(ps.d_ins)
    validate_crosscoder_config(cfg, k, d_latent)
    if ps.n < 1:
        raise ValueError(f"no training rows: the streams {ps.names} have no anchor pairs in the train split")
    seed, B = cfg.seed, cfg.batch_size
    n_steps = cfg.train_tokens // B
    torch.manual_seed(seed)
    scaled = [input_scale_and_mean(a, np.unique(ps.rows[:, m]), seed) for m, a in enumerate(ps.acts)]
    meta = stream_meta or [{} for _ in ps.names]
    streams = [StreamInfo(name, d, s, **mt) for name, d, (s, _), mt in zip(ps.names, ps.d_ins, scaled, meta)]
    spec = CrosscoderSpec(cfg.architecture, streams, d_latent, k, cfg.l1_coefficient, cfg.aux_k, cfg.aux_coefficient,
                          {**(metadata or {}), "seed": seed, "train_tokens": n_steps * B, "n_train_pairs": ps.n})
    cc = Crosscoder(spec)
    cc.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # b_dec at each stream's scaled data mean, as for the SAEs
        cc.b_dec.copy_(torch.from_numpy(np.concatenate([mu for _, mu in scaled])))
    opt = torch.optim.Adam(cc.parameters(), lr=cfg.lr)
    since_fired = torch.zeros(d_latent, dtype=torch.int64)
    ckpt_path = out_dir / CKPT_FILE
    expect = {"format": CKPT_FORMAT, "kind": "crosscoder", "config": _config_dict(cfg), "k": k, "streams": ps.names,
              "d_ins": ps.d_ins, "n_rows": ps.n, "rows_digest": _rows_digest(ps.rows.ravel()),
              "input_scales": [s for s, _ in scaled]}
    start, log, restored = resume_state(ckpt_path, expect, resume, cc, opt, out_dir / LOG_FILE, "crosscode",
                                        "this crosscoder")
    since_fired = since_fired if restored is None else restored

    stream = BatchStream(np.arange(ps.n), B, seed)
    stop = n_steps if max_steps is None else min(n_steps, max_steps)
    pbar = tqdm(total=n_steps, initial=start, disable=not progress, desc=f"crosscoder {cfg.architecture} {out_dir.name}",
                dynamic_ncols=True)
    cc.train()
    with ThreadPoolExecutor(max_workers=1) as pool:  # read batch b+1 while training on batch b
        nxt = pool.submit(ps.take, stream(start)) if start < stop else None
        for step in range(start, stop):
            xs_np = nxt.result()
            nxt = pool.submit(ps.take, stream(step + 1)) if step + 1 < stop else None
            for x, name in zip(xs_np, ps.names):
                _check_finite(x, f"crosscoder training step {step}, stream {name}")
            lr = lr_at(step, n_steps, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            l1_scale = min(1.0, (step + 1) / cfg.l1_warmup_steps) if cfg.l1_warmup_steps > 0 else 1.0
            dead = since_fired >= cfg.dead_tokens_threshold
            out = cc([torch.from_numpy(x) for x in xs_np], dead_mask=dead, l1_scale=l1_scale)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"crosscoder training step {step}: loss became {out.loss.item()} (lr {lr:g}); "
                                         "lower crosscoder.lr or check the activations")
            out.loss.backward()
            cc.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad(set_to_none=True)
            cc.set_decoder_norm_to_unit_norm()
            with torch.no_grad():
                since_fired += B
                fired = (out.latent_indices[out.latent_acts > 0] if out.latent_indices is not None
                         else (out.latent_acts > 0).any(0).nonzero().squeeze(1))
                since_fired[fired] = 0
            if step % LOG_EVERY == 0 or step == n_steps - 1:
                rec = {"step": step, "tokens": (step + 1) * B, **{f"fvu_{nm}": round(v, 6) for nm, v in zip(ps.names, out.fvu.tolist())},
                       "l0": round(out.l0.item(), 3), "dead_frac": round(dead.float().mean().item(), 6), "lr": lr,
                       "loss": round(out.loss.item(), 6), "auxk_loss": round(out.auxk_loss.item(), 6), "l1_loss": round(out.l1_loss.item(), 6)}
                log.append(rec)
                pbar.set_postfix(fvu="/".join(f"{v:.3f}" for v in out.fvu.tolist()), l0=f"{rec['l0']:.1f}", dead=f"{rec['dead_frac']:.2f}")
            pbar.update(1)
            done = step + 1
            if done < n_steps and (done % cfg.checkpoint_every == 0 or done == stop):
                _save_checkpoint(ckpt_path, cc, opt, since_fired, {**expect, "step": done, "n_steps": n_steps})
                _write_log(out_dir / LOG_FILE, log)
    pbar.close()
    if stop < n_steps:
        return cc
    cc.eval()
    save_crosscoder(cc, out_dir)
    _write_log(out_dir / LOG_FILE, log)
    remove_file(ckpt_path)
    return cc


@torch.no_grad()
def evaluate_crosscoder(cc: Crosscoder, ps: PairedStreams, block_rows: int = 4096) -> dict[str, Any]:
    """Held-out FVU per stream (whole-set SSE / total sum of squares, as `train.evaluate_sae`), L0, dead fraction.

    Returns also `freq` `[d_latent]`: the fraction of held-out pairs on which each latent fires.
    """
    if ps.d_ins != [s.d_in for s in cc.spec.streams]:
        raise ValueError(f"streams {ps.names} have widths {ps.d_ins}, the crosscoder expects "
                         f"{[s.d_in for s in cc.spec.streams]} ({[s.name for s in cc.spec.streams]})")
    if ps.n == 0:
        raise ValueError("no held-out anchor pairs to evaluate on")
    cc.eval()
    N = cc.n_streams
    n, sse, m2, l0_sum = 0, np.zeros(N), np.zeros(N), 0.0
    mean = [torch.zeros(d, dtype=torch.float64) for d in ps.d_ins]
    fires = torch.zeros(cc.d_latent, dtype=torch.int64)
    for s in range(0, ps.n, block_rows):
        xs = [torch.from_numpy(x) for x in ps.take(np.arange(s, min(s + block_rows, ps.n)))]
        codes = cc.encode(xs)
        nb = xs[0].shape[0]
        for m, (x, x_hat) in enumerate(zip(xs, cc.decode(codes))):
            sse[m] += float((x_hat - x).double().pow(2).sum())
            xd = x.double()
            mb = xd.mean(0)
            delta = mb - mean[m]  # Chan et al. merge of the sum of squares about the mean
            m2[m] += float((xd - mb).pow(2).sum()) + float(delta.pow(2).sum()) * n * nb / (n + nb)
            mean[m] += delta * nb / (n + nb)
        n += nb
        active = codes > 0
        fires += active.sum(0)
        l0_sum += float(active.sum())
    freq = (fires.double() / n).numpy()
    return {"fvu": {nm: float(sse[m] / max(m2[m], 1e-30)) for m, nm in enumerate(ps.names)}, "l0": l0_sum / n,
            "dead_frac": float((freq == 0).mean()), "n_pairs": n, "freq": freq}


# --- analysis -----------------------------------------------------------------------------------


def relative_norm(cc: Crosscoder, a: int = 0, b: int = 1) -> np.ndarray:
    """r_i = ||W_dec_a,i|| / (||W_dec_a,i|| + ||W_dec_b,i||) in the scaled space, `[d_latent]` float64."""
    norms = cc.decoder_norms().detach().double().cpu().numpy()
    return norms[:, a] / np.maximum(norms[:, a] + norms[:, b], 1e-30)


def classify(r: np.ndarray, freq: np.ndarray, exclusive_r: float) -> np.ndarray:
    """`a_only` (r >= 1 - t), `b_only` (r <= t), `shared` otherwise; `dead` for latents that never fire."""
    cls = np.where(r >= 1 - exclusive_r, "a_only", np.where(r <= exclusive_r, "b_only", "shared")).astype(object)
    cls[np.asarray(freq) <= 0] = "dead"
    return cls


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (Mann-Whitney U, ties counted half)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_features(dirs: np.ndarray, dec: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `dirs` `[L, d]`, the row of `dec` `[m, d]` with the largest cosine: ids `[L]`, cosines `[L]`."""
    du, eu = _unit(dirs), _unit(dec)
    ids, cos = np.empty(len(du), np.int64), np.empty(len(du), np.float32)
    for s in range(0, len(du), block):
        sim = du[s : s + block] @ eu.T
        ids[s : s + block] = sim.argmax(1)
        cos[s : s + block] = sim[np.arange(len(sim)), ids[s : s + block]]
    return ids, cos


@dataclass
class SAEContext:
    """What the post-hoc route left for one layer pair (any piece may be missing)."""

    dec_a: np.ndarray | None = None
    """SAE A decoder rows `[m_a, d_a]`."""
    dec_b: np.ndarray | None = None
    sig_pairs: set[tuple[int, int]] | None = None
    """Significant one-to-one (Hungarian) SAE matches (feat_a, feat_b), from feature_matches.csv."""
    rotation: np.ndarray | None = None
    """Procrustes direction map A -> B `[d_a, d_b]` (align stage)."""


def analyse(cc: Crosscoder, freq: np.ndarray, exclusive_r: float, ctx: SAEContext, min_cos: float = 0.5,
            n_null: int = 200, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per-latent columns (r, class, mapped decoder cosine, nearest SAE features, agreement) and a summary.

    Agreement with the post-hoc route: a latent agrees when its A decoder row's nearest SAE-A feature
    and its B decoder row's nearest SAE-B feature (both with cosine >= min_cos) form a significant
    matched SAE pair. Its null re-pairs the B-side nearest features among the shared latents.
    """
    r = relative_norm(cc)
    cls = classify(r, freq, exclusive_r)
    norms = cc.decoder_norms().detach().double().cpu().numpy()
    da, db = cc.decoder(0).detach().cpu().numpy(), cc.decoder(1).detach().cpu().numpy()
    L = cc.d_latent
    cols: dict[str, np.ndarray] = {"latent": np.arange(L), "r": r, "norm_a": norms[:, 0], "norm_b": norms[:, 1], "class": cls,
                                   "freq": np.asarray(freq, np.float64)}
    nan = np.full(L, np.nan)
    if ctx.rotation is not None:
        # A's decoder direction expressed in B's basis, as matching.decoder_cosine does for SAE pairs.
        cols["dec_cos_mapped"] = np.einsum("ij,ij->i", _unit(da @ ctx.rotation), _unit(db)).astype(np.float64)
    else:
        cols["dec_cos_mapped"] = nan
    have_sae = ctx.dec_a is not None and ctx.dec_b is not None
    if have_sae:
        fa, ca = nearest_features(da, ctx.dec_a)
        fb, cb = nearest_features(db, ctx.dec_b)
        cols |= {"sae_feat_a": fa, "sae_cos_a": ca.astype(np.float64), "sae_feat_b": fb, "sae_cos_b": cb.astype(np.float64)}
    else:
        cols |= {"sae_feat_a": np.full(L, -1), "sae_cos_a": nan, "sae_feat_b": np.full(L, -1), "sae_cos_b": nan}
    shared = cls == "shared"
    counts = {c: int((cls == c).sum()) for c in CLASSES}
    alive = cls != "dead"
    hist, edges = np.histogram(r[alive], bins=20, range=(0.0, 1.0))
    med = lambda x: float(np.median(x)) if len(x) else float("nan")  # noqa: E731
    summary: dict[str, Any] = {
        "n_latents": L, **{f"n_{c}": n for c, n in counts.items()},
        "r_histogram": {"edges": [round(e, 3) for e in edges.tolist()], "counts": hist.tolist()},
        **{f"median_dec_cos_mapped_{c}": med(cols["dec_cos_mapped"][cls == c]) for c in ("shared", "a_only", "b_only")},
    }
    agree_cols = ("agreement", "agreement_null", "agreement_a_only", "agreement_b_only", "coverage", "n_sig_sae_pairs")
    if have_sae and ctx.sig_pairs is not None:
        sig = ctx.sig_pairs
        close = (ca >= min_cos) & (cb >= min_cos)
        hit = np.array([close[i] and (int(fa[i]), int(fb[i])) in sig for i in range(L)])
        cols["matched_sae_pair"] = hit.astype(np.int64)
        rng = np.random.default_rng(seed)
        ids = np.nonzero(shared)[0]
        null = []
        for _ in range(n_null if len(ids) > 1 else 0):
            perm = rng.permutation(ids)
            null.append(np.mean([bool(ca[i] >= min_cos and cb[j] >= min_cos and (int(fa[i]), int(fb[j])) in sig)
                                 for i, j in zip(ids, perm)]))
        hit_pairs = {(int(fa[i]), int(fb[i])) for i in ids if hit[i]}
        summary |= {"agreement": float(hit[shared].mean()) if shared.any() else float("nan"),
                    "agreement_null": float(np.mean(null)) if null else float("nan"),
                    "agreement_a_only": float(hit[cls == "a_only"].mean()) if counts["a_only"] else float("nan"),
                    "agreement_b_only": float(hit[cls == "b_only"].mean()) if counts["b_only"] else float("nan"),
                    "coverage": len(hit_pairs) / len(sig) if sig else float("nan"), "n_sig_sae_pairs": len(sig)}
    else:
        cols["matched_sae_pair"] = np.full(L, -1)
        summary |= {c: float("nan") for c in agree_cols}
    if have_sae:
        summary["median_sae_cos_shared"] = [med(ca[shared]), med(cb[shared])]
    return cols, summary


# --- stage entry point --------------------------------------------------------------------------

CSV_COLUMNS = ("layer_a", "layer_b", "latent", "r", "norm_a", "norm_b", "class", "freq", "dec_cos_mapped",
               "sae_feat_a", "sae_cos_a", "sae_feat_b", "sae_cos_b", "matched_sae_pair")
SUMMARY_FILE = "crosscoder_summary.json"


def crosscoder_dir(cfg: RunConfig, layer_a: int, layer_b: int) -> Path:
    """`runs/<name>/crosscoder/<layer_a>_<layer_b>/`."""
    return cfg.run_dir / "crosscoder" / f"{layer_a}_{layer_b}"


def _significant_matches(path: Path, q: float) -> dict[tuple[int, int], set[tuple[int, int]]] | None:
    """(layer_a, layer_b) -> significant Hungarian SAE pairs, from feature_matches.csv; None if it is missing."""
    if not path.is_file():
        return None
    out: dict[tuple[int, int], set[tuple[int, int]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            try:
                qv = float(row["q_value"])
            except (KeyError, ValueError):
                raise ValueError(f"{path}: row without a numeric q_value ({row}); rerun the align stage") from None
            key = (int(row["layer_a"]), int(row["layer_b"]))
            out.setdefault(key, set())
            if row["method"] == "hungarian" and qv < q:
                out[key].add((int(row["feat_a"]), int(row["feat_b"])))
    return out


def _sae_metrics(cfg: RunConfig) -> dict[tuple[str, int], dict]:
    """(model name, layer) -> the first seed's row of report/sae_metrics.csv."""
    path = cfg.report_dir / "sae_metrics.csv"
    if not path.is_file():
        return {}
    seed = str(cfg.sae.seeds[0])
    with path.open() as f:
        return {(r["model"], int(r["layer"])): r for r in csv.DictReader(f) if r.get("seed", seed) == seed}


def _fingerprint(cfg: RunConfig, cache: ActivationCache, la: int, lb: int, k: int) -> dict:
    return {"crosscoder_config": _config_dict(cfg.crosscoder), "k": k, "layers": [la, lb], "models": [cfg.model_a.name, cfg.model_b.name],
            "max_norm_ratio": cfg.sae.max_norm_ratio, "cache": stable_hash(manifest_identity(cache.manifest))}


def _reusable(out_dir: Path, fp: dict) -> Crosscoder | None:
    if not is_complete(out_dir):
        return None
    try:
        cc = load_crosscoder(out_dir)
    except CrosscoderFormatError as e:
        print(f"[crossdict] crosscode: {e}; retraining")
        return None
    return cc if json.loads(json.dumps(cc.spec.metadata.get("fingerprint"))) == json.loads(json.dumps(fp)) else None


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, (float, np.floating)) else (int(v) if isinstance(v, np.integer) else v)


def _sae_comparison(cfg: RunConfig, la: int, lb: int, ho: PairedStreams, sae_rows: dict,
                    matches: dict | None) -> tuple[SAEContext, dict[str, float]]:
    """The post-hoc route's pieces for one pair, and the SAEs' held-out FVU on the crosscoder's own rows."""
    ctx, fvu = SAEContext(), {}
    streams = (("a", la), ("b", lb))
    dirs = {key: cfg.sae_dir(key, layer) for key, layer in streams}
    if all(sae_is_complete(p) for p in dirs.values()):
        saes = {key: load_sae(p) for key, p in dirs.items()}
        ctx.dec_a, ctx.dec_b = (saes[key].W_dec.detach().numpy() for key in ("a", "b"))
        for m, (key, layer) in enumerate(streams):
            fvu[f"sae_fvu_{key}_same_rows"] = evaluate_sae(saes[key], ho.acts[m], np.unique(ho.rows[:, m]))["fvu"]
            rep = sae_rows.get((cfg.model(key).name, layer), {})  # as the SAE stage reported it, on all held-out tokens
            fvu[f"sae_fvu_{key}_report"] = float(rep["fvu"]) if rep.get("fvu") else float("nan")
            fvu[f"sae_l0_{key}_report"] = float(rep["l0"]) if rep.get("l0") else float("nan")
        if matches is not None:
            ctx.sig_pairs = matches.get((la, lb), set())
    else:
        print(f"[crossdict] crosscode: no SAEs for A{la}/B{lb} at {dirs['a']} / {dirs['b']}; skipping the SAE comparison")
    procrustes = map_dir(cfg.run_dir, la, lb) / "procrustes.safetensors"
    if procrustes.is_file():
        ctx.rotation = LinearMap.load(procrustes.parent, "procrustes").rotation
    return ctx, fvu


def run_crosscode(cfg: RunConfig, layer_pairs: list[tuple[int, int]] | None = None, resume: bool | str = False,
                  progress: bool = True) -> dict[str, Any]:
    """Train (or reuse) one crosscoder per layer pair, evaluate it, compare it with the SAE route.

    Writes `crosscoder/<la>_<lb>/`, `report/crosscoder.csv` (one row per latent) and
    `report/crosscoder_summary.json` (counts, r histogram, FVUs vs the SAEs, agreement); returns the summary
    as written (missing numbers are None). The pairs are those the cache's row mask keeps
    (`ActivationCache.pair_mask`: massive activations and the attention sink of a model without
    BOS left out), the rows the SAEs, maps and metrics use, so all are scored on the same rows.
    """
    ccfg = cfg.crosscoder
    k = ccfg.k if ccfg.k is not None else cfg.sae.k
    cache = ActivationCache(cfg.cache_dir)
    pairs = list(layer_pairs or cfg.layer_pairs)
    for la, lb in pairs:
        for key, layer in (("a", la), ("b", lb)):
            if layer not in cache.layers(key):
                raise KeyError(f"layer {layer} of model {key} is not in the cache {cache.dir}; cached layers: {cache.layers(key)}")
    matches = _significant_matches(cfg.report_dir / "feature_matches.csv", cfg.align.q_threshold)
    sae_rows = _sae_metrics(cfg)
    rows, summaries = [], []
    for la, lb in pairs:
        t0 = time.perf_counter()
        out_dir = crosscoder_dir(cfg, la, lb)
        tr = streams_from_cache(cache, [("a", la), ("b", lb)], "train")
        ho = streams_from_cache(cache, [("a", la), ("b", lb)], "heldout")
        ratio = cfg.sae.max_norm_ratio
        max_norms = [cache.mask_info(key, layer, ratio)["max_norm"] for key, layer in (("a", la), ("b", lb))]
        n_tr, n_ho = tr.n, ho.n
        # the cache's row mask (massive activations, attention sink), as for every other stage
        tr, ho = tr.subset(cache.pair_mask(la, lb, "train", ratio)), ho.subset(cache.pair_mask(la, lb, "heldout", ratio))
        fp = _fingerprint(cfg, cache, la, lb, k)
        cc = _reusable(out_dir, fp)
        if cc is None:
            meta = [{"model_name": cfg.model(key).name, "hook_name": hook_name(layer)} for key, layer in (("a", la), ("b", lb))]
            cc = train_crosscoder(tr, ccfg, out_dir, k=k, resume=resume, progress=progress, stream_meta=meta,
                                  metadata={"fingerprint": fp, "max_norms": max_norms, "layer_a": la, "layer_b": lb})
        ev = evaluate_crosscoder(cc, ho)
        atomic_write_json(out_dir / METRICS_FILE, {k_: v for k_, v in ev.items() if k_ != "freq"})
        ctx, fvu_sae = _sae_comparison(cfg, la, lb, ho, sae_rows, matches)
        cols, summary = analyse(cc, ev["freq"], ccfg.exclusive_r, ctx, ccfg.agreement_min_cos, seed=cfg.seed)
        summaries.append({
            "layer_a": la, "layer_b": lb, "d_latent": cc.d_latent, "k": cc.spec.k, "architecture": cc.spec.architecture,
            "fvu_a": ev["fvu"][f"a:{la}"], "fvu_b": ev["fvu"][f"b:{lb}"], "l0": ev["l0"], "dead_frac": ev["dead_frac"],
            **fvu_sae, **summary, "n_train_pairs": tr.n, "n_heldout_pairs": ho.n,
            "excluded_frac_train": 1 - tr.n / max(n_tr, 1), "excluded_frac_heldout": 1 - ho.n / max(n_ho, 1),
            "train_tokens": cc.spec.metadata.get("train_tokens"), "wall_s": round(time.perf_counter() - t0, 1),
            "has_procrustes": ctx.rotation is not None, "has_matches": ctx.sig_pairs is not None,
        })
        rows += [{"layer_a": la, "layer_b": lb, **{c: _fmt(cols[c][i]) for c in CSV_COLUMNS[2:]}} for i in range(cc.d_latent)]
        nan = float("nan")
        print(f"[crossdict] crosscoder A{la}/B{lb}: {summary['n_shared']} shared, {summary['n_a_only']} A-only, "
              f"{summary['n_b_only']} B-only, {summary['n_dead']} dead; held-out FVU A {ev['fvu'][f'a:{la}']:.3f} "
              f"(SAE {fvu_sae.get('sae_fvu_a_same_rows', nan):.3f}), B {ev['fvu'][f'b:{lb}']:.3f} "
              f"(SAE {fvu_sae.get('sae_fvu_b_same_rows', nan):.3f}) at L0 {ev['l0']:.1f}; agreement with "
              f"matched SAE pairs {summary['agreement']:.3f} (null {summary['agreement_null']:.3f})")
    write_csv(cfg.report_dir / "crosscoder.csv", CSV_COLUMNS, rows)
    out = _json_safe({"exclusive_r": ccfg.exclusive_r, "agreement_min_cos": ccfg.agreement_min_cos,
                      "q_threshold": cfg.align.q_threshold, "pairs": summaries})
    atomic_write_json(cfg.report_dir / SUMMARY_FILE, out)
    return out


def _json_safe(v: Any) -> Any:
    """NaN -> null, numpy scalars -> Python (strict JSON)."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return None if not np.isfinite(v) else float(v)
    return int(v) if isinstance(v, np.integer) else v
