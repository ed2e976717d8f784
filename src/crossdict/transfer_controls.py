"""Null directions for feature injection, a stacked forward that runs many of them at once, paired tests.

Three nulls, each drawn to share the candidate's distribution as far as its name says, all scaled
to the candidate's norm (a control must differ from the candidate only in direction):

- `specificity`: other A features (frequency-matched: nearest firing rate) sent through the same
  map into B. Beating it says *this* feature's direction transfers, not "a mapped A feature does".
- `on_manifold`: Gaussian directions with B's residual covariance at the layer (massive
  activations / attention-sink rows masked, as the align stage masks them). B's variance along a
  decoder direction is several times that along an isotropic one, so isotropic controls alone
  are easier to beat than they should be.
- `isotropic`: uniformly random unit directions (kept as a third, labelled row).

p = (1 + #controls ≥ candidate) / (n + 1); the floor is 1/(n+1) (0.005 at the default 199).
"""

from __future__ import annotations

import contextlib

import math
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import wilcoxon

from .backend import Backend, Batch

CONTROL_KINDS = ("specificity", "on_manifold", "isotropic")


def normal_rows(norms: torch.Tensor | np.ndarray, max_norm: float | None) -> np.ndarray:
    """Bool mask of rows whose residual norm is at most `max_norm` (massive activations dropped).

    The one place transfer decides which rows are "normal"; a shared row mask can replace it.
    """
    n = np.asarray(norms.numpy() if isinstance(norms, torch.Tensor) else norms)
    return np.ones(len(n), bool) if max_norm is None else n <= max_norm


def covariance_root(acts: np.ndarray, max_norm: float | None) -> torch.Tensor:
    """`[d, d]` matrix R with RᵀR = cov of the normal rows of `acts` `[n, d]`: z @ R ~ N(0, cov)."""
    x = np.asarray(acts, np.float64)
    x = x[normal_rows(np.linalg.norm(x, axis=1), max_norm)]
    if len(x) < 2:
        raise ValueError("fewer than 2 normal rows to estimate B's residual covariance from")
    cov = np.cov(x, rowvar=False)
    w, v = np.linalg.eigh(cov)
    return torch.from_numpy((v * np.sqrt(np.clip(w, 0, None))).T.astype(np.float32))


def frequency_matched(freq: np.ndarray, feat: int, n: int, exclude: set[int] | None = None) -> np.ndarray:
    """The `n` live features (freq > 0) other than `feat` whose log firing rate is nearest `feat`'s."""
    ex = set(exclude or ()) | {feat}
    live = np.array([f for f in np.nonzero(freq > 0)[0] if f not in ex], dtype=int)
    if len(live) == 0:
        return live
    d = np.abs(np.log(freq[live]) - math.log(max(freq[feat], 1e-12)))
    return live[np.argsort(d, kind="stable")[:n]]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def control_vectors(kind: str, n: int, norm: float, d: int, gen: torch.Generator, *, mapped_a: torch.Tensor | None = None,
                    cov_root: torch.Tensor | None = None) -> torch.Tensor:
    """`[n', d]` control vectors of `kind`, every one of norm `norm` (the candidate's).

    specificity: `mapped_a` `[m, d]` (other A features' decoder rows through the map), first n used;
    on_manifold: `cov_root` from `covariance_root`; isotropic: N(0, I) directions.
    """
    if kind == "specificity":
        if mapped_a is None:
            raise ValueError("the specificity null needs the mapped decoder rows of other A features")
        dirs = mapped_a[:n].float()
    elif kind == "on_manifold":
        if cov_root is None:
            raise ValueError("the on-manifold null needs B's residual covariance (covariance_root)")
        dirs = torch.randn(n, cov_root.shape[0], generator=gen) @ cov_root
    elif kind == "isotropic":
        dirs = torch.randn(n, d, generator=gen)
    else:
        raise ValueError(f"unknown control kind {kind!r}; expected one of {CONTROL_KINDS}")
    return _unit(dirs) * norm


def repeat_batch(batch: Batch, k: int) -> Batch:
    """The batch stacked `k` times along the batch axis: copy j is rows [j·b, (j+1)·b)."""
    return Batch(batch.input_ids.repeat(k, 1), batch.attention_mask.repeat(k, 1), batch.offsets.repeat(k, 1, 1),
                 list(batch.texts) * k)


def shifts_many(backend: Backend, batches: list[Batch], layer: int, vectors: torch.Tensor, ids: np.ndarray,
                restricted: Callable[[], Any], max_floats: int = 32_000_000,
                hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`[k, len(ids)]` mean logit of tokens `ids` over content positions, with `vectors[j]` `[k, d]` added.

    One forward serves several directions: the batch is stacked along its batch axis, copy j gets
    vector j (chunked so logits stay under `max_floats`). Subtract the clean mean for the shift.
    `hidden` (per batch, the clean residual `[b, seq, d]` after `layer`): the forward starts there
    (`backend.start_after`) instead of re-running the blocks before the edit for every copy.
    """
    sub = torch.from_numpy(np.asarray(ids))
    k = len(vectors)
    total = torch.zeros(k, len(ids), dtype=torch.float64)
    n = 0
    with restricted():
        for bi, b in enumerate(batches):
            nb, seq = b.input_ids.shape
            step = max(1, min(k, max_floats // max(nb * seq * len(ids), 1)))
            content = b.is_content
            for s in range(0, k, step):
                v = vectors[s : s + step]
                big = repeat_batch(b, len(v))
                mask = content.repeat(len(v), 1)[..., None]
                per_row = v.repeat_interleave(nb, 0)[:, None, :]

                def edit(h: torch.Tensor, m=mask, pr=per_row) -> torch.Tensor:
                    return h + m.to(h.device, h.dtype) * pr.to(h.device, h.dtype)

                start = (backend.start_after(layer, hidden[bi].repeat(len(v), 1, 1))
                         if hidden is not None and hasattr(backend, "start_after") else contextlib.nullcontext())
                with start:
                    logits = backend.logits(big, {layer: edit})
                if logits.shape[-1] != len(ids):
                    logits = logits[..., sub]
                logits = (logits * mask.to(logits.dtype)).sum(1, dtype=torch.float64)  # [len(v)·nb, n_ids]
                total[s : s + len(v)] += logits.view(len(v), nb, -1).sum(1)
            n += int(content.sum())
    return (total / n).float()


# --- paired comparisons across feature pairs -----------------------------------------------------------


def paired_test(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Wilcoxon signed-rank test of x vs y `[n_pairs]` (two-sided), with effect sizes.

    Effect sizes: median difference, and the matched-pairs rank-biserial correlation
    r = (W+ − W−)/(W+ + W−) in [-1, 1] (Kerby 2014). All differences zero: p = 1, r = 0.
    """
    ok = np.isfinite(x) & np.isfinite(y)
    dlt = (np.asarray(x, float) - np.asarray(y, float))[ok]
    out = {"n_pairs": int(ok.sum()), "median_diff": float(np.median(dlt)) if len(dlt) else math.nan}
    nz = dlt[dlt != 0]
    if len(nz) == 0:
        return {**out, "statistic": 0.0, "p_value": 1.0, "rank_biserial": 0.0}
    from scipy.stats import rankdata

    r = rankdata(np.abs(nz))
    wp, wm = float(r[nz > 0].sum()), float(r[nz < 0].sum())
    res = wilcoxon(nz)
    return {**out, "statistic": float(res.statistic), "p_value": float(res.pvalue), "rank_biserial": (wp - wm) / (wp + wm)}
