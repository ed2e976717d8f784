"""Linear maps from model A's residual space to model B's, fitted on train anchors.

Three maps, from most to least constrained:
  * procrustes: centered orthogonal Procrustes (Schönemann 1966) with an optional isotropic
    scale. When d_A != d_B the map is semi-orthogonal: R = U Vᵀ from the thin SVD of XcᵀYc,
    `[d_A, d_B]`; it preserves angles/norms within A's space when d_A <= d_B (an isometric
    embedding), and is a projection followed by a rotation when d_A > d_B. Equivalent to
    zero-padding the smaller side and solving the square problem.
  * svcca: the prediction of B through the canonical subspace kept by SVCCA (Raghu et al.
    2017): Ŷc = Xc A diag(ρ) Bᵀ Cyy, i.e. regress B's canonical variates on A's and map back.
  * ridge: the unconstrained affine reference, W = (Cxx/n + αI)⁻¹ Cxy/n (α on per-token scale).

Every map is y = x @ weight + bias and is saved as safetensors + JSON (no pickles) under
`runs/<name>/alignment/<layer_a>_<layer_b>/<method>.{safetensors,json}`. Held-out scores:
R² over all output dims and retrieval accuracy among M candidates.

`run_align` (the stage entry point) lives in `evaluate.py`, which imports this module (one arrow).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file, save_file
from scipy import linalg

from .metrics import Moments, cca_from_moments, cross_moments
from .stats import MetricResult, passage_index, resample_weights, shuffled_pairing, summarise
from .integrity import verify
from .utils import atomic_path, atomic_write_json

METHODS = ("procrustes", "svcca", "ridge")


@dataclass
class LinearMap:
    """y = x @ weight + bias: A's space `[d_a]` -> B's space `[d_b]`."""

    method: str
    weight: np.ndarray  # [d_a, d_b] float32
    bias: np.ndarray  # [d_b] float32
    rotation: np.ndarray | None = None  # [d_a, d_b] semi-orthogonal part (procrustes): maps directions
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d_a(self) -> int:
        return self.weight.shape[0]

    @property
    def d_b(self) -> int:
        return self.weight.shape[1]

    def transform(self, X_a: np.ndarray) -> np.ndarray:
        """`[n, d_a]` -> `[n, d_b]`."""
        if X_a.shape[1] != self.d_a:
            raise ValueError(f"{self.method} map expects d_a={self.d_a} inputs, got {X_a.shape[1]}")
        return np.asarray(X_a, np.float32) @ self.weight + self.bias

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        tensors = {"weight": self.weight.astype(np.float32), "bias": self.bias.astype(np.float32)}
        if self.rotation is not None:
            tensors["rotation"] = self.rotation.astype(np.float32)
        path = directory / f"{self.method}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        meta = {"method": self.method, "d_a": self.d_a, "d_b": self.d_b, **self.meta}
        atomic_write_json(directory / f"{self.method}.json", meta)
        return path

    @classmethod
    def load(cls, directory: str | Path, method: str) -> "LinearMap":
        directory = Path(directory)
        path = directory / f"{method}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no fitted {method} map at {path}; run the align stage first")
        verify(path)
        verify(directory / f"{method}.json")
        t = load_file(str(path))
        meta = json.loads((directory / f"{method}.json").read_text())
        meta = {k: v for k, v in meta.items() if k not in ("method", "d_a", "d_b")}
        return cls(method, t["weight"], t["bias"], t.get("rotation"), meta)


def unstandardize(zmap: LinearMap, mean_a: np.ndarray, sd_a: np.ndarray, mean_b: np.ndarray, sd_b: np.ndarray) -> LinearMap:
    """A map fitted between z-scored spaces, as the equivalent raw-space affine map (method `<name>_z`).

    y_raw = ((x - μ_a) / σ_a · W + b) · σ_b + μ_b, so W_raw = diag(1/σ_a) W diag(σ_b) and the bias
    absorbs the means. Directions map through `weight` like any other map's.
    """
    weight = (zmap.weight / sd_a[:, None]) * sd_b[None, :]
    bias = (zmap.bias - (mean_a / sd_a) @ zmap.weight) * sd_b + mean_b
    meta = {**zmap.meta, "fitted_on": "z-scored train anchors"}
    return LinearMap(f"{zmap.method}_z", weight.astype(np.float32), bias.astype(np.float32), None, meta)


def map_dir(run_dir: str | Path, layer_a: int, layer_b: int) -> Path:
    return Path(run_dir) / "alignment" / f"{layer_a}_{layer_b}"


# ---------------------------------------------------------------------------------------------
# fitting


def procrustes_from_moments(cxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R = U Vᵀ `[d_a, d_b]` maximising tr(Rᵀ XcᵀYc) over semi-orthogonal R; also the singular values."""
    u, s, vt = linalg.svd(cxy, full_matrices=False)  # thin SVD: u [d_a, r], vt [r, d_b]
    return u @ vt, s


def procrustes_rotation(X_a: np.ndarray, X_b: np.ndarray, center: bool = True) -> np.ndarray:
    """Semi-orthogonal R `[d_a, d_b]` minimising ‖Xc R - Yc‖_F (centered unless center=False)."""
    if center:
        return procrustes_from_moments(cross_moments(X_a, X_b).cxy)[0]
    return procrustes_from_moments(np.asarray(X_a, np.float64).T @ np.asarray(X_b, np.float64))[0]


def fit_procrustes(m: Moments, scale: bool = True) -> LinearMap:
    R, s = procrustes_from_moments(m.cxy)
    # Optimal isotropic scale for fixed R: tr(Rᵀ XcᵀYc) / ‖Xc‖² = Σσ / tr(XcᵀXc).
    c = float(s.sum() / np.trace(m.cxx)) if scale and np.trace(m.cxx) > 0 else 1.0
    W = c * R
    bias = (m.mean_y - m.mean_x @ W).astype(np.float32)
    return LinearMap("procrustes", W.astype(np.float32), bias, R.astype(np.float32), {"scale": c})


def fit_ridge(m: Moments, alpha: float) -> LinearMap:
    cxx = m.cxx / m.n + alpha * np.eye(m.cxx.shape[0])
    W = linalg.solve(cxx, m.cxy / m.n, assume_a="pos")
    return LinearMap("ridge", W.astype(np.float32), (m.mean_y - m.mean_x @ W).astype(np.float32), None, {"alpha": alpha})


def fit_svcca_map(m: Moments, keep: float) -> LinearMap:
    r = cca_from_moments(m, keep, keep)
    W = (r.a * r.rho) @ (r.b.T @ m.cyy)  # Xc A diag(ρ) Bᵀ Cyy (see module docstring)
    meta = {"keep_variance": keep, "n_components": int(r.rho.size), "mean_rho": float(r.rho.mean()) if r.rho.size else None}
    return LinearMap("svcca", W.astype(np.float32), (m.mean_y - m.mean_x @ W).astype(np.float32), None, meta)


def fit_maps(X_a: np.ndarray, X_b: np.ndarray, methods: list[str] | tuple[str, ...] = METHODS,
             ridge_alpha: float = 1.0, svcca_variance: float = 0.99, scale: bool = True,
             moments: Moments | None = None) -> dict[str, LinearMap]:  # fmt: skip
    """Fit each requested map on train pairs X_a `[n, d_a]`, X_b `[n, d_b]` (one moments pass;
    `moments`: that pass, `cross_moments(X_a, X_b)`, when the caller already made it)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown alignment method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    m = cross_moments(X_a, X_b) if moments is None else moments
    fitters = {
        "procrustes": lambda: fit_procrustes(m, scale),
        "svcca": lambda: fit_svcca_map(m, svcca_variance),
        "ridge": lambda: fit_ridge(m, ridge_alpha),
    }
    maps = {k: fitters[k]() for k in methods}
    for mp in maps.values():
        mp.meta["n_train"] = int(m.n)
    return maps


# ---------------------------------------------------------------------------------------------
# held-out scores


def r2_score(Y_hat: np.ndarray, Y: np.ndarray) -> float:
    """1 - SSE/SST pooled over all output dims (SST around Y's own mean)."""
    Y = np.asarray(Y, np.float64)
    sst = np.sum((Y - Y.mean(0)) ** 2)
    return float(1.0 - np.sum((Y - np.asarray(Y_hat, np.float64)) ** 2) / sst) if sst > 0 else float("nan")


def r2_with_ci(Y_hat: np.ndarray, Y: np.ndarray, passage_ids: np.ndarray, n_boot: int, n_null: int,
               rng: np.random.Generator, alpha: float = 0.05, ci: str = "half_sample") -> MetricResult:  # fmt: skip
    """Held-out R² with a passage-bootstrap CI and its shuffled-pairing null (see `stats.with_ci`).

    Same numbers as `with_ci(r2_score, ...)`, but from per-row sufficient statistics: a
    resample (half-sample or bootstrap) is a weighted sum (SSE = Σ w e_i,
    SST = Σ w ‖y_i‖² - ‖Σ w y_i‖² / Σ w), so only the
    null draws, which re-pair rows, touch the `[n, d]` arrays.
    """
    # R² is unchanged by shifting Y and Ŷ together; centering first keeps SST = Σ‖y‖² - n‖ȳ‖²
    # free of cancellation when residual streams carry large means
    c = np.asarray(Y, np.float64).mean(0)
    Yh, Y = (np.asarray(Y_hat, np.float64) - c).astype(np.float32), (np.asarray(Y, np.float64) - c).astype(np.float32)
    yy = np.einsum("ij,ij->i", Y, Y, dtype=np.float64)
    hh = np.einsum("ij,ij->i", Yh, Yh, dtype=np.float64)
    err = np.einsum("ij,ij->i", Y - Yh, Y - Yh, dtype=np.float64)

    def r2(w: np.ndarray, e: np.ndarray, q: np.ndarray, ysum: np.ndarray) -> float:
        sst = w @ q - ysum @ ysum / w.sum()
        return float(1.0 - (w @ e) / sst) if sst > 0 else float("nan")

    value = r2(np.ones(len(Y)), err, yy, Y.sum(0, dtype=np.float64))
    idx = passage_index(passage_ids)
    boots = []
    for _ in range(n_boot):
        w = resample_weights(idx, rng, ci)
        boots.append(r2(w, err, yy, (w.astype(np.float32) @ Y).astype(np.float64)))
    nulls = []
    for _ in range(n_null):
        ra, rb = shuffled_pairing(idx, rng)
        e = yy[rb] + hh[ra] - 2 * np.einsum("ij,ij->i", Yh[ra], Y[rb], dtype=np.float64)
        nulls.append(r2(np.ones(len(rb)), e, yy[rb], Y[rb].sum(0, dtype=np.float64)))
    return summarise(value, boots, nulls, alpha, len(Y), idx.n_passages, ci)


def _unit(Z: np.ndarray) -> np.ndarray:
    return np.asarray(Z, np.float32) / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


SIM_MATRIX_MAX = 100_000_000
"""Largest n² (float32 entries, 400 MB) for which the retrieval null precomputes all similarities."""


def draw_ranks(above: np.ndarray, n: int, M: int, rng: np.random.Generator) -> np.ndarray:
    """Per query, how many of M-1 random distractors score >= its true partner `[q]`.

    above `[q]`: how many of the n-1 other candidates score >= the partner. The distractors are
    M-1 of those n-1 drawn uniformly without replacement (never the partner), so the count among
    them is hypergeometric(above, n-1-above, M-1): drawn directly, that is the same distribution
    as drawing the index set, with one random number per query instead of n keys and a partition
    (`test_retrieval_ranks_have_the_distribution_of_drawn_distractor_sets`).

    The sampler (rejection) uses a number of random numbers that depends on `above`, so it draws
    from a child generator seeded by one number of `rng`: what `rng` yields afterwards does not
    depend on the similarities, and a last-digit change of one (another BLAS thread count) changes
    at most that query's rank, not every later draw of the stage."""
    above = np.maximum(np.asarray(above, np.int64), 0)  # a NaN partner score counts nothing, as before
    child = np.random.default_rng(rng.integers(1 << 63))
    if M <= 1:
        return np.zeros(len(above), np.int64)
    return child.hypergeometric(above, n - 1 - above, M - 1).astype(np.int64)


def retrieval_ranks(Qh: np.ndarray | None, Yn: np.ndarray | None, queries: np.ndarray, M: int, rng: np.random.Generator,
                    block: int = 512, sims: Callable[[np.ndarray], np.ndarray] | None = None,
                    n: int | None = None) -> np.ndarray:  # fmt: skip
    """Per query, how many of M-1 random distractors score >= its true partner `[len(queries)]` (`draw_ranks`).

    Qh `[n, d]`, Yn `[n, d]` unit rows; row i of Qh belongs with row i of Yn. `sims(q) -> [len(q), n]`
    (with `n`) replaces `Qh[q] @ Yn.T`, e.g. rows of a similarity matrix computed once."""
    n = Yn.shape[0] if n is None else n
    ranks = np.zeros(len(queries), np.int64)
    for s in range(0, len(queries), block):
        q = queries[s : s + block]
        sims_q = Qh[q] @ Yn.T if sims is None else sims(q)  # [b, n]
        true = sims_q[np.arange(len(q)), q]
        above = np.count_nonzero(sims_q >= true[:, None], axis=1) - 1  # the partner itself counts once
        ranks[s : s + len(q)] = draw_ranks(above, n, M, rng)
    return ranks


def _null_above(G: np.ndarray, ra: np.ndarray, rb: np.ndarray, q: np.ndarray, block: int = 512) -> np.ndarray:
    """`above` counts `[len(q)]` of a shuffled pairing from the similarity matrix G `[n, n]` (Q̂Yᵀ):
    query i is A's row ra[i], its partner B's row rb[i], the candidates B's rows rb (all distinct).

    Counting over the whole row of G and subtracting B's rows that are not candidates reads each row
    once in order instead of gathering `[len(q), len(rb)]` columns (same counts)."""
    out = np.setdiff1d(np.arange(G.shape[1]), rb, assume_unique=True)  # B rows the pairing left out
    above = np.empty(len(q), np.int64)
    for s in range(0, len(q), block):
        qq = q[s : s + block]
        rows = G[ra[qq]]  # [b, n]
        true = rows[np.arange(len(qq)), rb[qq]][:, None]
        above[s : s + len(qq)] = (np.count_nonzero(rows >= true, axis=1) - np.count_nonzero(rows[:, out] >= true, axis=1)
                                  - 1)  # fmt: skip
    return above


def retrieval_accuracy(
    Y_hat: np.ndarray, Y: np.ndarray, n_candidates: int = 1000, rng: np.random.Generator | None = None,
    max_queries: int = 5000, block: int = 512, return_ranks: bool = False,
    sims: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Top-1/top-10 retrieval of the paired B token among M candidates by cosine.

    For each query i (≤ max_queries random ones), candidates are Y[i] plus M-1 other held-out B
    tokens drawn without replacement; a hit at k means fewer than k distractors score >= the
    true partner (ties count against us). Chance is 1/M and min(10, M)/M. `return_ranks` adds
    `queries` and `ranks` (per-query distractors at or above the partner) for resampling.
    `sims(q) -> [len(q), n]`: cosine rows of the queries from a matrix computed once (`retrieval_ranks`).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    n = Y.shape[0]
    M = int(min(n_candidates, n))
    if M < 2:
        raise ValueError(f"retrieval needs at least 2 held-out anchors, got {n}")
    queries = np.sort(rng.choice(n, min(n, max_queries), replace=False))
    if sims is None:
        ranks = retrieval_ranks(_unit(Y_hat), _unit(Y), queries, M, rng, block)
    else:
        ranks = retrieval_ranks(None, None, queries, M, rng, block, sims, n)
    k10 = min(10, M)
    out: dict[str, Any] = {
        "top1": float(np.mean(ranks < 1)),
        "top10": float(np.mean(ranks < k10)),
        "chance_top1": 1.0 / M,
        "chance_top10": k10 / M,
        "candidates": M,
        "n_queries": len(queries),
    }
    if return_ranks:
        out.update(queries=queries, ranks=ranks)
    return out


def retrieval_with_ci(Y_hat: np.ndarray, Y: np.ndarray, passage_ids: np.ndarray, n_candidates: int, max_queries: int,
                      n_boot: int, n_null: int, rng: np.random.Generator, alpha: float = 0.05,
                      ci: str = "half_sample", null_queries: int = 1000,
                      max_sim_entries: int = SIM_MATRIX_MAX) -> tuple[dict[str, Any], MetricResult]:  # fmt: skip
    """Retrieval (see `retrieval_accuracy`) and its top-1 as a `MetricResult` with a passage CI and null.

    CI: each resample reweights the queries by their passage (half-samples or cluster bootstrap),
    the distractor draws held fixed. Null: the shuffled pairing of `stats.shuffled_pairing` (A's
    passage meets another passage of B, rank-matched), top-1 recomputed on up to `null_queries`
    queries per draw (a full retrieval per draw would cost as much as the estimate n_null times).
    The estimate and the null draws read their similarities from one `[n, n]` matrix Q̂Yᵀ computed
    once when n² ≤ `max_sim_entries` and there is a null (a draw only re-pairs rows; ~3x less
    matmul than a product per draw, same draws, same numbers up to float32 rounding of the products).
    """
    Qh, Yn = _unit(Y_hat), _unit(Y)
    G = Qh @ Yn.T if n_null and len(Y) ** 2 <= max_sim_entries else None  # [n, n] float32
    ret = retrieval_accuracy(Y_hat, Y, n_candidates, rng, max_queries, return_ranks=True,
                             sims=None if G is None else G.__getitem__)
    idx = passage_index(passage_ids)
    hit = (ret["ranks"] < 1).astype(np.float64)
    qidx = passage_index(np.asarray(passage_ids)[ret["queries"]])
    boots = []
    for _ in range(n_boot):
        w = resample_weights(qidx, rng, ci)
        boots.append(float(w @ hit / w.sum()) if w.sum() > 0 else np.nan)
    nulls = []
    for _ in range(n_null):
        ra, rb = shuffled_pairing(idx, rng)
        M = int(min(n_candidates, len(ra)))
        q = np.sort(rng.choice(len(ra), min(len(ra), null_queries), replace=False))
        if M < 2:
            nulls.append(np.nan)
            continue
        if G is None:
            ranks = retrieval_ranks(Qh[ra], Yn[rb], q, M, rng)
        else:
            ranks = draw_ranks(_null_above(G, ra, rb, q), len(rb), M, rng)
        nulls.append(float(np.mean(ranks < 1)))
    res = summarise(ret["top1"], boots, nulls, alpha, len(Y), qidx.n_passages, ci)
    return ret, res
