"""A's SAE carried into B through a fitted map, spliced into B (Chen et al. 2025, "Transferring features
across language models with model stitching"; Kissane et al. 2024, "SAEs (usually) transfer between base
and chat models").

Transferred SAE for map y = x W + c (A -> B): B's residual y is taken back to A's space with the
pseudo-inverse, x' = (y − c) W⁺, encoded and decoded by A's SAE, and sent forward again:
ŷ = SAE_A(x') W + c. No encoder refit: the pseudo-inverse *is* the transferred encoder.

Reported in B (sae_transfer.csv), next to B's own SAE and a random-map floor (a random orthogonal
map with W's mean singular value, same bias):
- held-out FVU on B's cached residuals (massive rows masked),
- CE loss recovered (L_zero − L_spliced)/(L_zero − L_clean) and KL recovered
  (KL_zero − KL_spliced)/KL_zero (SAEBench convention), splicing the reconstruction in at every
  normal content position of the transfer passages (zero ablation = 0, clean = 1);
- for B's own SAE also the same-norm random-error baseline (Gurnee 2024, "SAE reconstruction
  errors are (empirically) pathological"): ŷ_rand = y + ‖y − ŷ‖·u, u a random unit direction, and
  where the SAE's error lives: its share of energy in B's top-8 principal directions vs a random
  error's (8/d).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from .align import LinearMap
from .backend import Edit
from .transfer_controls import normal_rows

SAE_TRANSFER_COLUMNS = ("layer_a", "layer_b", "sae", "map", "fvu", "ce_loss", "ce_recovered", "kl", "kl_recovered",
                        "err_top_pc_share", "random_top_pc_share", "n_rows", "n_tokens")
N_TOP_PCS = 8


def transferred(sae_a: Any, weight: np.ndarray, bias: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """B-space reconstruction `[n, d_b] -> [n, d_b]` by A's SAE through the map (pseudo-inverse encoder)."""
    W = torch.from_numpy(np.asarray(weight, np.float32))
    c = torch.from_numpy(np.asarray(bias, np.float32))
    W_pinv = torch.linalg.pinv(W.double()).float()

    def recon(y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sae_a.reconstruct((y.float() - c) @ W_pinv) @ W + c

    return recon


def random_map(weight: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random orthogonal map `[d_a, d_b]` scaled to `weight`'s mean singular value: the floor."""
    d_a, d_b = weight.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(max(d_a, d_b), max(d_a, d_b), generator=g, dtype=torch.float64))[0][:d_a, :d_b]
    s = float(np.linalg.svd(np.asarray(weight, np.float64), compute_uv=False).mean())
    return (q.numpy() * s).astype(np.float32)


def own(sae_b: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def recon(y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sae_b.reconstruct(y.float())

    return recon


def random_error(recon: Callable[[torch.Tensor], torch.Tensor], seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """y + ‖y − recon(y)‖·u per row, u uniform on the sphere: same error norm, random direction (Gurnee 2024)."""
    g = torch.Generator().manual_seed(seed)

    def f(y: torch.Tensor) -> torch.Tensor:
        e = (y.float() - recon(y)).norm(dim=-1, keepdim=True)
        u = torch.randn(y.shape, generator=g)
        return y.float() + e * u / u.norm(dim=-1, keepdim=True)

    return f


def fvu(recon: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor) -> float:
    """Fraction of variance unexplained on rows `y` `[n, d]`."""
    err = ((y - recon(y)) ** 2).sum()
    return float(err / ((y - y.mean(0)) ** 2).sum())


def top_pcs(y: torch.Tensor, k: int = N_TOP_PCS) -> torch.Tensor:
    """`[k, d]` the top-`k` principal directions of rows `y` `[n, d]` (float64)."""
    return torch.linalg.svd((y - y.mean(0)).double(), full_matrices=False)[2][:k]


def top_pc_share(recon: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, pcs: torch.Tensor) -> float:
    """Share of the reconstruction error's energy in the principal directions `pcs` `[k, d]` of `y` `[n, d]`."""
    e = (y - recon(y)).double()
    return float(((e @ pcs.T) ** 2).sum() / (e**2).sum().clamp_min(1e-30))


def splice_at(recon: Callable[[torch.Tensor], torch.Tensor], positions: torch.Tensor, max_norm: float | None) -> Edit:
    """Edit replacing the residual at `positions` `[b, seq]` (normal rows only) by `recon` of it."""

    def edit(h: torch.Tensor) -> torch.Tensor:
        m = positions.to(h.device).clone()
        m[m.clone()] = torch.from_numpy(normal_rows(h[m].norm(dim=-1).cpu(), max_norm)).to(h.device)
        out = h.clone()
        out[m] = recon(h[m]).to(h.dtype)
        return out

    return edit


def sae_transfer_rows(la: int, lb: int, b_backend: Any, b_clean: Any, b_layer: int, sae_a: Any, sae_b: Any,
                      maps: dict[str, LinearMap], y_heldout: torch.Tensor, max_norm: float | None, seed: int = 0) -> list[dict]:
    """sae_transfer.csv rows for one layer pair: B's own SAE, A's SAE through every map, random-map floors.

    Every splice runs in one `edited_effects` call (stacked along the batch); each reconstruction's own random
    draws (`random_error`) come in the order they did one row at a time: its splice, then FVU, then the PC share."""
    from .interventions import edited_effects

    y = y_heldout.float()
    y = y[torch.from_numpy(normal_rows(y.norm(dim=-1), max_norm))]
    own_b = own(sae_b)
    recons = [("b_own", "none", own_b), ("b_own_random_error", "none", random_error(own_b, seed))]
    for name, mp in maps.items():
        recons += [("a_transferred", name, transferred(sae_a, mp.weight, mp.bias)),
                   ("a_random_map", name, transferred(sae_a, random_map(mp.weight, seed), mp.bias))]
    splices = [lambda t: torch.zeros_like(t)] + [r for *_, r in recons]
    zero, *effects = edited_effects(b_backend, b_clean, [
        lambda k, bb, r=r: {b_layer: splice_at(r, bb.is_content, max_norm)} for r in splices], dlogp=False)
    base = {"layer_a": la, "layer_b": lb, "n_rows": len(y), "n_tokens": b_clean.n_positions}
    gap = zero.nll - b_clean.nll
    pcs = top_pcs(y)
    rows = []
    for (name, map_name, recon), eff in zip(recons, effects):
        rows.append({**base, "sae": name, "map": map_name, "fvu": fvu(recon, y), "ce_loss": eff.nll,
                     "ce_recovered": (zero.nll - eff.nll) / gap if abs(gap) > 1e-12 else math.nan, "kl": eff.kl,
                     "kl_recovered": (zero.kl - eff.kl) / zero.kl if zero.kl > 1e-12 else math.nan,
                     "err_top_pc_share": top_pc_share(recon, y, pcs), "random_top_pc_share": N_TOP_PCS / y.shape[1]})
    return rows
