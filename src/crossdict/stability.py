"""Seed stability of a dictionary: do two SAEs of one model and layer, differing only in seed, learn the same latents?

    SAE seed s, SAE seed t (same activations)  --decoder rows [d_sae, d_in], live latents only-->
    one-to-one Hungarian matching on cosine (scipy `linear_sum_assignment`)  -->  matched cosines
    --> shared = #(matched cos > 0.7) / max(#live_s, #live_t), median and quantiles of the matched cosines

and the same on encoder rows. This is the test of Paulo & Belrose 2025 ("Sparse autoencoders trained on the
same data learn different features", arXiv 2501.16615: Hungarian on decoder and encoder cosine, threshold 0.7)
and EleutherAI's seed-stability note. The denominator is the *larger* live set, so a latent without a partner
counts as not shared, and killing latents in one seed cannot raise the score. Only live latents (ones that
fire on held-out tokens) enter: a dead latent is still at its random init and says nothing about the data.

It is the ceiling cross-model feature matching is read against: if one model's SAE does not find its own
features again under a new seed, a feature matched across models is not a property of the models. Feature-level
results of a layer pair whose SAEs fall below `STABLE_SHARE` are flagged as not interpretable in the report;
representation-level metrics (CKA, Procrustes, ...) do not depend on the SAEs and still are.

This is the one implementation of the decoder-cosine seed ceiling; activation-matching ceilings live in
`evaluate` / `matching`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

SHARE_THRESHOLD = 0.7
"""Matched cosine above which two latents count as the same feature (Paulo & Belrose 2025)."""
STABLE_SHARE = 0.3
"""Shared fraction below which an SAE pair is flagged unstable (the 131k-latent Llama-3-8B figure of Paulo & Belrose)."""
MAX_FVU = 0.2
"""Held-out FVU above which a seed-stable SAE is flagged as partial: its features describe the part of the residual
stream it reconstructs, and matches or transfers say nothing about the rest (issue 19's target corner)."""
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
HIST_BINS = np.linspace(-1.0, 1.0, 41)
"""Histogram edges for the distribution of matched cosines (width 0.05)."""


def _unit_rows(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def matched_cosines(w_a: np.ndarray, w_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of rows of `w_a` `[n_a, d]` to rows of `w_b` `[n_b, d]` maximising summed cosine.

    Returns (rows of a `[m]`, rows of b `[m]`, their cosines `[m]`), m = min(n_a, n_b). Signed cosine: SAE codes
    are non-negative, so a row and its negative are different features.
    """
    if w_a.shape[1] != w_b.shape[1]:
        raise ValueError(f"dictionaries have different widths of input: {w_a.shape[1]} vs {w_b.shape[1]}")
    if len(w_a) == 0 or len(w_b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    cos = _unit_rows(w_a) @ _unit_rows(w_b).T
    ia, ib = linear_sum_assignment(cos, maximize=True)
    return ia, ib, cos[ia, ib]


def dictionary_stability(w_a: np.ndarray, w_b: np.ndarray, live_a: np.ndarray | None = None,
                         live_b: np.ndarray | None = None, threshold: float = SHARE_THRESHOLD,
                         rotation: np.ndarray | None = None) -> dict[str, Any]:
    """Shared fraction, median and quantiles of matched cosine between two dictionaries `[n, d]`.

    live_a / live_b `[n]` bool: latents that fire on held-out data (default: all). rotation `[d, d]`: maps
    b's input space back to a's (x_a = x_b @ rotation), for SAEs trained on a rotated copy of the data.
    """
    w_a, w_b = np.asarray(w_a, np.float64), np.asarray(w_b, np.float64)
    live_a = np.ones(len(w_a), bool) if live_a is None else np.asarray(live_a, bool)
    live_b = np.ones(len(w_b), bool) if live_b is None else np.asarray(live_b, bool)
    if rotation is not None:
        w_b = w_b @ np.asarray(rotation, np.float64)
    ia, ib, cos = matched_cosines(w_a[live_a], w_b[live_b])
    n_live = max(int(live_a.sum()), int(live_b.sum()))
    out: dict[str, Any] = {
        "shared": float((cos > threshold).sum() / n_live) if n_live else float("nan"),
        "median_cos": float(np.median(cos)) if len(cos) else float("nan"),
        "n_live_a": int(live_a.sum()), "n_live_b": int(live_b.sum()), "threshold": threshold,
        "quantiles": {f"q{round(q * 100)}": float(np.quantile(cos, q)) if len(cos) else float("nan") for q in QUANTILES},
        "hist": {"edges": HIST_BINS.round(3).tolist(), "counts": np.histogram(np.clip(cos, -1.0, 1.0), HIST_BINS)[0].tolist()},
        "pairs": [np.flatnonzero(live_a)[ia].tolist(), np.flatnonzero(live_b)[ib].tolist()],
    }
    return out


def seed_stability(sae_a: Any, sae_b: Any, live_a: np.ndarray | None = None, live_b: np.ndarray | None = None,
                   threshold: float = SHARE_THRESHOLD, rotation: np.ndarray | None = None) -> dict[str, Any]:
    """`{"decoder": dictionary_stability(...), "encoder": ...}` for two SAEs with `W_dec`/`W_enc` `[d_sae, d_in]`.

    Our SAEs store the encoder like `nn.Linear` (rows are latents); the fixed input scale is a scalar, so it
    changes no cosine. For an orthogonal `rotation` encoder rows map back like decoder rows.
    """
    def rows(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().cpu().numpy()

    return {part: dictionary_stability(rows(getattr(sae_a, w)), rows(getattr(sae_b, w)), live_a, live_b, threshold, rotation)
            for part, w in (("decoder", "W_dec"), ("encoder", "W_enc"))}


@torch.no_grad()
def live_latents(sae: Any, acts: Any, rows: np.ndarray, max_rows: int = 20_000, block: int = 4096) -> np.ndarray:
    """`[d_sae]` bool: latents that fire on at least one of (up to `max_rows`, evenly spaced) held-out `rows`."""
    rows = np.asarray(rows, np.int64)
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).astype(np.int64)]
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for s in range(0, len(rows), block):
        x = torch.from_numpy(np.asarray(acts.take(rows[s : s + block]), np.float32)).to(sae.W_enc.device)
        fired |= (sae.encode(x) > 0).any(0).cpu()
    return fired.numpy()


def summary_columns(stab: dict[str, Any]) -> dict[str, float]:
    """The `sae_metrics.csv` columns of one `seed_stability` result."""
    dec, enc = stab["decoder"], stab["encoder"]
    return {"seed_shared_dec": dec["shared"], "seed_median_cos_dec": dec["median_cos"],
            "seed_q10_cos_dec": dec["quantiles"]["q10"], "seed_q90_cos_dec": dec["quantiles"]["q90"],
            "seed_shared_enc": enc["shared"], "seed_median_cos_enc": enc["median_cos"],
            "seed_n_live": max(dec["n_live_a"], dec["n_live_b"])}
