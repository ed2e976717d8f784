"""Sparse autoencoders: L1/ReLU ("standard"), TopK and BatchTopK, in one compact class.

    x [n, d_in] raw  --(x * input_scale - b_dec) @ W_enc + b_enc-->  pre [n, d_sae]
    --activation-->  codes  --codes @ W_dec + b_dec, / input_scale-->  x_hat [n, d_in] raw

Everything inside the module lives in *scaled* space, where inputs are multiplied by a fixed
`input_scale` chosen so the mean ||x||^2 is d_in (Anthropic, "Circuits Updates April 2024").
That keeps learning rates and the L1 coefficient meaningful across models. `encode` takes raw
activations and `decode` returns raw activations, so the scaling is invisible to callers.

On disk we use the SAELens 6.x layout (`cfg.json` + `sae_weights.safetensors`), with the scale
folded into the weights exactly as `sae_lens.SAE.fold_activation_norm_scaling_factor` does
(W_enc * s, W_dec / s, b_dec / s): `sae_lens.SAE.load_from_disk(path)` then encodes and decodes
raw activations identically. Our extras (scale, seed, training config) go to `crossdict.json`,
which SAELens ignores.

TopK training is sparse end to end, like EleutherAI sparsify: only the dense encoder matmul
touches all d_sae latents; the decoder and both backward passes touch only the k active ones
(`embedding_bag` forward, sparse-matrix products backward).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .integrity import verify
from .utils import atomic_path, atomic_write_json, remove_file

Architecture = Literal["topk", "batchtopk", "l1"]
SAELENS_ARCH = {"l1": "standard", "topk": "topk", "batchtopk": "jumprelu"}
"""Our architecture -> SAELens inference architecture (BatchTopK is saved as JumpReLU, as SAELens does)."""
CFG_FILE, WEIGHTS_FILE, EXTRA_FILE = "cfg.json", "sae_weights.safetensors", "crossdict.json"
BATCHTOPK_CAP = 4
"""BatchTopK keeps at most BATCHTOPK_CAP * k latents per token (a per-token candidate pool)."""


class SAEFormatError(ValueError):
    """An SAE directory is missing a file or holds tensors/config that do not fit together."""


@dataclass
class SAESpec:
    """What defines one SAE's shape and loss; saved to `crossdict.json`."""

    architecture: Architecture
    d_in: int
    d_sae: int
    k: int = 32
    """Active latents per token (TopK), or on average over a batch (BatchTopK)."""
    input_scale: float = 1.0
    """Raw activations are multiplied by this before encoding; chosen so mean ||x||^2 = d_in."""
    l1_coefficient: float = 5.0
    aux_k: int = 256
    aux_coefficient: float = 1 / 32
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form: hook_name, model_name, seed, training tokens, ..."""

    def validate(self) -> None:
        if self.architecture not in ("topk", "batchtopk", "l1"):
            raise ValueError(f"SAE architecture {self.architecture!r} is not one of ['topk', 'batchtopk', 'l1']")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"SAE needs d_in >= 1 and d_sae >= 1, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture != "l1" and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"SAE k={self.k} must be between 1 and d_sae={self.d_sae}")
        if self.l1_coefficient < 0:
            raise ValueError(f"SAE l1_coefficient (lambda) must be >= 0, got {self.l1_coefficient}")
        if self.aux_k < 1 or self.aux_coefficient < 0:
            raise ValueError(f"SAE aux_k must be >= 1 and aux_coefficient >= 0, got {self.aux_k}, {self.aux_coefficient}")
        if not (self.input_scale > 0 and self.input_scale < float("inf")):
            raise ValueError(f"SAE input_scale must be a positive finite number, got {self.input_scale}")


class Reduce(Protocol):
    """Global-batch reductions when each data-parallel rank holds an equal slice of the batch
    (`distributed.BatchReduce`); `None` everywhere below means the batch is all here."""

    world_size: int

    def sum(self, t: Tensor) -> Tensor: ...

    def min(self, t: Tensor) -> Tensor: ...

    def cat(self, t: Tensor) -> Tensor: ...


def _sq_about_mean(t: Tensor, reduce: Reduce | None) -> Tensor:
    """Sum of squared deviations of the rows of `t` `[n, d]` from their mean, over the global batch."""
    if reduce is None:
        return (t - t.mean(0)).pow(2).sum()
    mean = reduce.sum(t.sum(0)) / (t.shape[0] * reduce.world_size)
    return reduce.sum((t - mean).pow(2).sum())


def _smallest_kept(vals: Tensor, keep: Tensor, reduce: Reduce | None) -> Tensor:
    """Smallest of `vals[keep]` over the global batch; inf when nothing is kept."""
    smallest = vals[keep].min() if keep.any() else vals.new_tensor(float("inf"))
    return smallest if reduce is None else reduce.min(smallest)


def _row_mean(v: Tensor, reduce: Reduce | None) -> Tensor:
    """Mean of per-row values `[n]`; with `reduce`, this rank's share of the global-batch mean."""
    return v.mean() if reduce is None else v.sum() / (v.shape[0] * reduce.world_size)


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """Reconstruction in raw activation space `[n, d_in]`."""
    latent_acts: Tensor
    """Active latent values: `[n, m]` for (Batch)TopK, dense `[n, d_sae]` codes for L1."""
    latent_indices: Tensor | None
    """Latent ids of `latent_acts` `[n, m]` (TopK/BatchTopK); None when `latent_acts` is dense."""
    fvu: Tensor
    """Fraction of variance unexplained over this batch (scale-free)."""
    mse: Tensor
    """Sum over d_in of squared error, mean over tokens, in scaled space."""
    l1_loss: Tensor
    """Mean over tokens of sum_i f_i * ||W_dec,i|| (L1 only, else 0)."""
    auxk_loss: Tensor
    """AuxK: dead latents reconstructing the residual, normalised by its variance (TopK only, else 0)."""
    l0: Tensor
    """Mean number of non-zero latents per token."""
    loss: Tensor
    """What the trainer minimises: mse + lambda*l1_loss (L1), fvu + aux_coefficient*auxk_loss (TopK)."""

    def dense_codes(self, d_sae: int) -> Tensor:
        """Codes as a dense `[n, d_sae]` tensor."""
        if self.latent_indices is None:
            return self.latent_acts
        out = self.latent_acts.new_zeros(self.latent_acts.shape[0], d_sae)
        return out.scatter_(1, self.latent_indices, self.latent_acts)


# --- sparse kernels (autograd) ------------------------------------------------------------------


def _sparse_t_matmul(idx: Tensor, vals: Tensor, y: Tensor, n_rows: int) -> Tensor:
    """sum_r sum_j vals[r, j] * onehot(idx[r, j]) y[r]^T: `[n_rows, d]` from idx/vals `[n, m]`, y `[n, d]`.

    This is G^T @ y for the sparse matrix G `[n, n_rows]`; O(n*m*d) instead of O(n*n_rows*d).
    """
    n, m = idx.shape
    rows = torch.arange(n, device=idx.device).repeat_interleave(m)
    g_t = torch.sparse_coo_tensor(
        torch.stack([idx.reshape(-1), rows]), vals.reshape(-1), (n_rows, n), check_invariants=False
    )
    return torch.sparse.mm(g_t, y)


def _dense_is_cheaper(m: int, n_latents: int) -> bool:
    """Gathers are memory-bound: on CPU a dense [n, n_latents] matmul wins once m > n_latents / 64 (measured)."""
    return m * 64 > n_latents


class _SparseEncode(torch.autograd.Function):
    """Pick pre-activations `pre[r, idx[r, j]]` with a backward that touches only those latents.

    `pre` `[n, d_sae]` was computed without grad; this re-attaches x, W_enc, b_enc (sparsify's
    `fused_encoder`, with a sparse-matrix product instead of materialising [n, k, d_in]).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, idx: Tensor, pre: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, idx)
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, idx = ctx.saved_tensors
        grad = grad.contiguous()
        if _dense_is_cheaper(idx.shape[1], weight.shape[0]):
            g = grad.new_zeros(grad.shape[0], weight.shape[0]).scatter_(1, idx, grad)  # [n, d_sae]
            return g @ weight, g.T @ x, g.sum(0), None, None
        grad_x = F.embedding_bag(idx, weight, mode="sum", per_sample_weights=grad)
        grad_w = _sparse_t_matmul(idx, grad, x, weight.shape[0])
        grad_b = torch.zeros(weight.shape[0], dtype=grad.dtype, device=grad.device).index_add_(0, idx.reshape(-1), grad.reshape(-1))
        return grad_x, grad_w, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """sum_j vals[r, j] * W_dec[idx[r, j]] -> `[n, d_in]`, forward and backward both sparse."""

    @staticmethod
    def forward(ctx, idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(idx, vals, weight)
        return F.embedding_bag(idx, weight, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, grad: Tensor):
        idx, vals, weight = ctx.saved_tensors
        grad = grad.contiguous()
        if _dense_is_cheaper(idx.shape[1], weight.shape[0]):
            codes = vals.new_zeros(vals.shape[0], weight.shape[0]).scatter_(1, idx, vals)  # [n, d_sae]
            return None, (grad @ weight.T).gather(1, idx), codes.T @ grad
        grad_vals = None
        if ctx.needs_input_grad[1]:
            # <W_dec[idx[r, j]], grad[r]>, gathered in chunks so [chunk, m, d_in] stays in cache.
            grad_vals = torch.empty_like(vals)
            for s in range(0, idx.shape[0], 256):
                rows = F.embedding(idx[s : s + 256], weight)
                grad_vals[s : s + 256] = torch.bmm(rows, grad[s : s + 256, :, None]).squeeze(-1)
        grad_w = _sparse_t_matmul(idx, vals, grad, weight.shape[0]) if ctx.needs_input_grad[2] else None
        return None, grad_vals, grad_w


# --- the model ----------------------------------------------------------------------------------


class SAE(nn.Module):
    """One sparse autoencoder; `spec.architecture` picks the activation and the loss."""

    def __init__(self, spec: SAESpec, device: str | torch.device = "cpu"):
        super().__init__()
        spec.validate()
        self.spec = spec
        d_in, d_sae = spec.d_in, spec.d_sae
        # Encoder stored like nn.Linear ([d_sae, d_in]) so sparse backward writes contiguous rows;
        # SAELens's W_enc [d_in, d_sae] is its transpose (see `save_sae`).
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_in, device=device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))
        # BatchTopK inference threshold on pre-activations: a bias-corrected EMA of each batch's smallest
        # kept value (Bussmann et al. 2024 average it over batches; SAELens: EMA at rate 0.01).
        # `threshold_weight` = 1 - 0.99**updates, the EMA's total weight; 0 until the first batch.
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("threshold_weight", torch.zeros((), dtype=torch.float64, device=device))
        self.reset_parameters()

    @property
    def d_in(self) -> int:
        return self.spec.d_in

    @property
    def d_sae(self) -> int:
        return self.spec.d_sae

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows; encoder = decoder transpose (Gao et al. 2024 §A.1)."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator, device=self.W_dec.device)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec)
        if self.spec.architecture == "l1":
            # ReLU codes start dense; a small encoder keeps the initial L1 term from swamping the MSE
            # (cf. the 0.1 "heuristic" init of Anthropic's April 2024 update, used by SAELens).
            self.W_enc.mul_(0.1)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_decoder_from(self, x: Tensor) -> None:
        """Decoder rows = unit-normed data points `x` `[d_sae, d_in]` (scaled space, centred), encoder tied.

        "Sampled activations" init: every latent starts on the data, so none starts dead in an empty region
        and two seeds start from directions the data actually visits. Rows of `x` with zero norm keep their
        random init. The encoder is the decoder transpose as in `reset_parameters` (x 0.1 for L1).
        """
        if tuple(x.shape) != (self.d_sae, self.d_in):
            raise ValueError(f"init_decoder_from needs [d_sae, d_in] = [{self.d_sae}, {self.d_in}], got {list(x.shape)}")
        x = x.to(self.W_dec)
        norm = x.norm(dim=1, keepdim=True)
        ok = (norm > 0).squeeze(1)
        self.W_dec[ok] = x[ok] / norm[ok]
        self.W_enc.copy_(self.W_dec * (0.1 if self.spec.architecture == "l1" else 1.0))

    # -- encoding ---------------------------------------------------------------------------------

    def _sae_in(self, x: Tensor) -> Tensor:
        """Scaled input minus decoder bias (SAELens `apply_b_dec_to_input=True`) `[n, d_in]`."""
        return x.to(self.W_enc.dtype) * self.spec.input_scale - self.b_dec

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations `[n, d_in]` -> dense codes `[n, d_sae]` (inference semantics).

        BatchTopK at inference uses the learned threshold (a JumpReLU, exactly what SAELens saves),
        not a batch-dependent top-k.
        """
        lead = x.shape[:-1]
        x = x.reshape(-1, self.d_in)
        pre = F.linear(self._sae_in(x), self.W_enc, self.b_enc)
        arch = self.spec.architecture
        if arch == "l1":
            codes = pre.relu()
        elif arch == "topk":
            vals, idx = pre.topk(self.spec.k, dim=-1, sorted=False)
            codes = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
        else:
            codes = pre.relu() * (pre > self.threshold.to(pre.dtype))
        return codes.reshape(*lead, self.d_sae)

    def decode(self, codes: Tensor) -> Tensor:
        """Dense codes `[n, d_sae]` -> raw-scale reconstruction `[n, d_in]`."""
        return (codes @ self.W_dec + self.b_dec) / self.spec.input_scale

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)), for splicing into a model: raw `[..., d_in]` -> raw `[..., d_in]`."""
        return self.decode(self.encode(x))

    def _select(self, pre: Tensor, train: bool, reduce: Reduce | None = None) -> tuple[Tensor, Tensor | None]:
        """(Batch)TopK selection on no-grad pre-activations: indices `[n, m]`, keep mask `[n, m]` or None."""
        k = self.spec.k
        if self.spec.architecture == "topk":
            return pre.topk(k, dim=-1, sorted=False).indices, None
        m = min(self.d_sae, BATCHTOPK_CAP * k)
        vals, idx = pre.topk(m, dim=-1, sorted=False)
        if train:
            # BatchTopK (Bussmann et al. 2024): keep the k*n largest over the whole batch.
            pool = vals if reduce is None else reduce.cat(vals)  # the whole batch's candidates, in rank order
            thr = pool.flatten().topk(k * pool.shape[0], sorted=False).values.min()
            keep = (vals >= thr) & (vals > 0)
            smallest = _smallest_kept(vals, keep, reduce)
            if torch.isfinite(smallest):
                self._update_threshold(smallest.double())
        else:
            keep = vals > self.threshold.to(vals.dtype)
        return idx, keep

    @torch.no_grad()
    def _update_threshold(self, smallest: Tensor, rate: float = 0.01) -> None:
        """EMA (SAELens's topk_threshold_lr 0.01) with Adam-style bias correction: the threshold is the
        weighted mean of the batches seen so far, so it is right from the first step, not 1-0.99**t of it."""
        w_old = self.threshold_weight.clone()
        self.threshold_weight.mul_(1 - rate).add_(rate)
        self.threshold.copy_(((1 - rate) * w_old * self.threshold + rate * smallest) / self.threshold_weight)

    @torch.no_grad()
    def calibrate_threshold(self, batches: Iterable[Tensor], reduce: Reduce | None = None) -> None:
        """Set the BatchTopK inference threshold from the *current* weights: the mean over `batches`
        (raw `[n, d_in]` each) of the smallest activation BatchTopK keeps (Bussmann et al. 2024 §3).

        The training-time EMA lags while the weights still move (early in training the smallest kept
        value falls fast), so a short run ends with too high a threshold and too low an L0.
        """
        mins = []
        for x in batches:
            pre = F.linear(self._sae_in(x.to(self.W_enc.device)), self.W_enc, self.b_enc)
            vals = pre.topk(min(self.d_sae, BATCHTOPK_CAP * self.spec.k), dim=-1, sorted=False).values
            pool = vals if reduce is None else reduce.cat(vals)
            thr = pool.flatten().topk(self.spec.k * pool.shape[0], sorted=False).values.min()
            smallest = _smallest_kept(vals, (vals >= thr) & (vals > 0), reduce)
            if torch.isfinite(smallest):
                mins.append(float(smallest))
        if mins:
            self.threshold.fill_(sum(mins) / len(mins))
            self.threshold_weight.fill_(1.0)

    # -- training forward ------------------------------------------------------------------------

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, l1_scale: float = 1.0,
                reduce: Reduce | None = None) -> ForwardOutput:
        """Reconstruct raw `x` `[n, d_in]` and compute the loss terms.

        dead_mask `[d_sae]` bool: latents eligible for the AuxK loss (TopK/BatchTopK).
        l1_scale: warm-up factor in [0, 1] applied to the L1 coefficient.
        reduce: `x` is one data-parallel rank's slice of the batch; batch statistics are global, and
        the scalar outputs are this rank's share (summed over ranks they are the whole batch's values,
        so summed gradients equal the single-process gradient).
        """
        x = x.to(self.W_enc.dtype)
        target = x * self.spec.input_scale  # scaled space
        sae_in = target - self.b_dec
        n_rows = x.shape[0] * (1 if reduce is None else reduce.world_size)
        # Total variance about the batch mean; FVU = SSE / this (Gao et al. 2024 normalised MSE).
        total_var = _sq_about_mean(target, reduce).clamp_min(1e-12)
        zero = x.new_zeros(())
        if self.spec.architecture == "l1":
            codes = F.linear(sae_in, self.W_enc, self.b_enc).relu()
            out = codes @ self.W_dec + self.b_dec
            err = (out - target).pow(2).sum()
            mse = err / n_rows
            # Anthropic April 2024: penalise f_i * ||W_dec,i|| so shrinking rows cannot cheat the L1.
            l1 = _row_mean((codes * self.W_dec.norm(dim=1)).sum(-1), reduce)
            loss = mse + self.spec.l1_coefficient * l1_scale * l1
            l0 = _row_mean((codes > 0).sum(-1).float(), reduce)
            return ForwardOutput(out / self.spec.input_scale, codes, None, err / total_var, mse, l1, zero, l0, loss)

        train = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            pre = F.linear(sae_in, self.W_enc, self.b_enc)
            idx, keep = self._select(pre, train, reduce)
            n_dead = int(dead_mask.sum()) if train and dead_mask is not None else 0
            if n_dead:
                # AuxK (Gao et al. 2024 §A.2): the top aux_k *dead* latents model the residual error.
                # Work on the dead columns only, so the cost scales with how many latents are dead.
                dead_ids = dead_mask.nonzero().squeeze(1)
                pre_dead = pre[:, dead_ids]
                aux_idx = pre_dead.topk(min(self.spec.aux_k, n_dead), dim=-1, sorted=False).indices
        if train:
            picked = _SparseEncode.apply(sae_in, self.W_enc, self.b_enc, idx, pre).relu()
        else:
            picked = pre.gather(1, idx).relu()
        acts = picked if keep is None else picked * keep
        out = _SparseDecode.apply(idx, acts, self.W_dec) + self.b_dec
        err = (out - target).pow(2).sum()
        fvu = err / total_var
        auxk = zero
        if n_dead:
            resid = (target - out).detach()
            aux_acts = _SparseEncode.apply(sae_in, self.W_enc[dead_ids], self.b_enc[dead_ids], aux_idx, pre_dead).relu()
            e_hat = _SparseDecode.apply(aux_idx, aux_acts, self.W_dec[dead_ids])  # no bias: b_dec is in resid
            scale = min(n_dead / self.spec.aux_k, 1.0)  # fewer dead latents -> smaller loss (sparsify)
            auxk = scale * (e_hat - resid).pow(2).sum() / _sq_about_mean(resid, reduce).clamp_min(1e-12)
        loss = fvu + self.spec.aux_coefficient * auxk
        l0 = _row_mean((acts > 0).sum(-1).float(), reduce)
        return ForwardOutput(out / self.spec.input_scale, acts, idx, fvu, err / n_rows, zero, auxk, l0, loss)

    # -- decoder constraint (sparsify) -------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the radial gradient so Adam steps move rows along the unit sphere."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)


# --- SAELens-format save / load -----------------------------------------------------------------


def _sae_lens_version() -> str:
    try:
        from importlib.metadata import version

        return version("sae-lens")
    except Exception:  # not installed: any 6.x marks the 6.x config layout
        return "6.0.0"


def sae_lens_cfg(sae: SAE) -> dict[str, Any]:
    """The `cfg.json` SAELens 6.x `SAE.load_from_disk` expects for this SAE."""
    spec = sae.spec
    meta = spec.metadata
    cfg: dict[str, Any] = {
        "architecture": SAELENS_ARCH[spec.architecture],
        "d_in": spec.d_in,
        "d_sae": spec.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        # Our fixed input scale is folded into the weights, so SAELens needs no normalisation.
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": _sae_lens_version(),
            "sae_lens_training_version": None,
            "model_name": meta.get("model_name"),
            "hook_name": meta.get("hook_name"),
            "hook_head_index": None,
            "context_size": meta.get("context_size"),
            "prepend_bos": meta.get("prepend_bos", True),
            "training_library": "crossdict",
        },
    }
    if spec.architecture == "topk":
        # Our TopK selects on raw pre-activations; folding the scale changes ||W_dec||, so SAELens
        # must not rescale by decoder norm.
        cfg["k"] = spec.k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


@torch.no_grad()
def sae_lens_state_dict(sae: SAE) -> dict[str, Tensor]:
    """Raw-space tensors: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec (+ threshold)."""
    s = sae.spec.input_scale
    # Computed in float64 then rounded once, so loading back (x s / s) is as exact as float32 allows.
    state = {
        "W_enc": (sae.W_enc.double().T * s).float().contiguous(),
        "b_enc": sae.b_enc.detach().float().clone(),
        "W_dec": (sae.W_dec.double() / s).float().contiguous(),
        "b_dec": (sae.b_dec.double() / s).float().contiguous(),
    }
    if sae.spec.architecture == "batchtopk":
        state["threshold"] = torch.full((sae.d_sae,), float(sae.threshold), dtype=torch.float32)
    return {k: v.cpu() for k, v in state.items()}


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write `cfg.json`, `sae_weights.safetensors` (SAELens format) and `crossdict.json`, each atomically.

    `crossdict.json` is written last; `load_sae` and `is_complete` treat its presence as "done".
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_file(path / EXTRA_FILE)
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(sae_lens_state_dict(sae), str(tmp))
    atomic_write_json(path / CFG_FILE, sae_lens_cfg(sae))
    extra = {"format": "crossdict-sae", "version": 1, "spec": asdict(sae.spec)}
    if sae.spec.architecture == "batchtopk":
        extra["threshold"] = float(sae.threshold)
    atomic_write_json(path / EXTRA_FILE, extra)
    return path


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise SAEFormatError(msg)


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by `save_sae` (or a plain SAELens standard/topk/jumprelu SAE directory).

    Every mismatch raises `SAEFormatError` naming the file, the tensor or field, expected and got.
    A directory holding `pretrained.json` (a pretrained SAE the train stage checked) returns a
    `pretrained.PretrainedSAE`, the adapter with this class's interface.
    """
    path = Path(path)
    from . import pretrained  # one-way: pretrained never imports this module

    if pretrained.is_linked(path):
        return pretrained.load_linked(path, device=device)
    cfg_path, w_path, x_path = path / CFG_FILE, path / WEIGHTS_FILE, path / EXTRA_FILE
    for p in (cfg_path, w_path):
        _expect(p.is_file(), f"SAE file missing: {p}")
    for p in (cfg_path, w_path, x_path):
        if p.is_file():
            verify(p)  # a truncated or edited file is named, with the stage that rewrites it
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SAEFormatError(f"{cfg_path}: not valid JSON (truncated?): {e}") from None
    for key in ("architecture", "d_in", "d_sae"):
        _expect(key in cfg, f"{cfg_path}: missing field {key!r}")
    arch_of = {v: k for k, v in SAELENS_ARCH.items()}
    _expect(cfg["architecture"] in arch_of, f"{cfg_path}: architecture {cfg['architecture']!r} not supported; expected one of {sorted(arch_of)}")
    _expect(cfg.get("normalize_activations", "none") == "none", f"{cfg_path}: normalize_activations must be 'none', got {cfg.get('normalize_activations')!r}")
    _expect(cfg.get("apply_b_dec_to_input", True) is True, f"{cfg_path}: apply_b_dec_to_input must be true")
    _expect(not cfg.get("rescale_acts_by_decoder_norm", False), f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    if x_path.is_file():
        try:
            extra = json.loads(x_path.read_text())
        except json.JSONDecodeError as e:
            raise SAEFormatError(f"{x_path}: not valid JSON (truncated?): {e}") from None
        _expect(extra.get("format") == "crossdict-sae", f"{x_path}: format {extra.get('format')!r}, expected 'crossdict-sae'")
        spec = SAESpec(**extra["spec"])
        for key, ours in (("d_in", spec.d_in), ("d_sae", spec.d_sae)):
            _expect(ours == cfg[key], f"{cfg_path}: {key}={cfg[key]} but {x_path} says {ours}")
        _expect(SAELENS_ARCH[spec.architecture] == cfg["architecture"], f"{cfg_path}: architecture {cfg['architecture']!r} but {x_path} says {spec.architecture!r}")
        if spec.architecture == "topk":
            _expect(cfg.get("k") == spec.k, f"{cfg_path}: k={cfg.get('k')} but {x_path} says {spec.k}")
    else:  # a foreign SAELens SAE: no input scaling
        spec = SAESpec(arch_of[cfg["architecture"]], d_in, d_sae, k=int(cfg.get("k", 1)))
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFormatError(f"{w_path}: unreadable (truncated or corrupt?): {e}") from None
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if spec.architecture == "batchtopk":
        want["threshold"] = (d_sae,)
    for name, shape in want.items():
        _expect(name in state, f"{w_path}: tensor {name!r} missing; has {sorted(state)}")
        t = state[name]
        _expect(tuple(t.shape) == shape, f"{w_path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        _expect(t.is_floating_point(), f"{w_path}: tensor {name!r} has dtype {t.dtype}, expected a float dtype")
        _expect(bool(torch.isfinite(t).all()), f"{w_path}: tensor {name!r} holds non-finite values")
    sae = SAE(spec, device=device)
    s = spec.input_scale
    with torch.no_grad():
        sae.W_enc.copy_((state["W_enc"].double() / s).T.float())
        sae.b_enc.copy_(state["b_enc"].float())
        sae.W_dec.copy_((state["W_dec"].double() * s).float())
        sae.b_dec.copy_((state["b_dec"].double() * s).float())
        if spec.architecture == "batchtopk":
            thr = state["threshold"]
            _expect(bool((thr == thr[0]).all()), f"{w_path}: tensor 'threshold' must be one shared value for a BatchTopK SAE")
            sae.threshold.fill_(float(thr[0]))
            sae.threshold_weight.fill_(1.0)  # a saved threshold is a finished estimate
    return sae


def is_complete(path: str | Path) -> bool:
    """All three files of a saved SAE exist (crossdict.json is written last) and match their recorded
    digests, or a checked pretrained SAE's record. A damaged SAE is therefore retrained, not reused."""
    from .integrity import problem
    from .pretrained import is_linked

    path = Path(path)
    files = [path / f for f in (CFG_FILE, WEIGHTS_FILE, EXTRA_FILE)]
    if all(f.is_file() for f in files):
        bad = [f"{f} ({why})" for f in files if (why := problem(f)) is not None]
        if bad:
            print(f"[crossdict] SAE {path} is damaged, it will be trained again: {'; '.join(bad)}")
        return not bad
    return is_linked(path)


@torch.no_grad()
def feature_activations(sae: Any, acts: Any, rows: Any, feats: Any, block: int = 4096) -> Any:
    """`[len(rows), len(feats)]` activations of latents `feats` on cache rows `rows` (numpy, float32).

    `acts` is anything with `.take(rows) -> [n, d_in]` (a `cache.ShardedArray`); encoding goes in
    blocks so a 16k-latent SAE never holds more than `block` dense code rows.
    """
    cols = torch.as_tensor(np.asarray(feats), dtype=torch.long)
    out = np.zeros((len(rows), len(cols)), np.float32)
    for s in range(0, len(rows), block):
        codes = sae.encode(torch.from_numpy(np.asarray(acts.take(rows[s : s + block]), np.float32)))
        out[s : s + block] = codes[:, cols].numpy()
    return out
