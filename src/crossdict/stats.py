"""Uncertainty for every number we report: passage-level CIs, shuffled-pairing nulls, BH q-values.

Tokens of one passage are strongly dependent (same topic, overlapping context windows), so all
resampling is done over *passages*, never over tokens: resampling tokens would treat ~100
near-copies as independent evidence and give CIs that are far too narrow. CIs come from
half-samples of passages by default (no token repeated; see `with_ci`), or from the cluster
bootstrap (passages with replacement).

The null for "A and B share structure" keeps each model's own statistics intact and destroys
only the pairing: A's passage i is paired with B's passage pi(i) (pi a uniform random
permutation, see `shuffled_pairing`), tokens matched by their rank within the passage and
truncated to the shorter passage. Any metric that still looks "similar" under this null does so
because of marginal structure (anisotropy, rogue dimensions, finite-sample bias of CCA) or
because of token position, which the rank matching keeps aligned (on SmolLM2 vs Gemma-3, raw
SVCCA at 99% variance keeps 1-2 position-dominated directions and its null mean is 0.68). The
p-value (+1 corrected, Phipson & Smyth 2010) therefore asks whether the models agree beyond
what position and marginal statistics explain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy import stats as sps


class InsufficientDataError(ValueError):
    """Too few anchors or passages for the requested statistic."""


@dataclass
class MetricResult:
    value: float
    ci_low: float
    ci_high: float
    null_mean: float
    p_value: float
    n_tokens: int = 0
    n_passages: int = 0


@dataclass
class PassageIndex:
    """Rows grouped by passage: rows of passage g are `order[starts[g] : starts[g] + counts[g]]`."""

    inverse: np.ndarray  # int64 [n] passage number (0..P-1) of each row
    order: np.ndarray  # int64 [n] rows sorted by passage, original order kept within a passage
    starts: np.ndarray  # int64 [P]
    counts: np.ndarray  # int64 [P]
    rank: np.ndarray  # int64 [n] position of each row within its passage

    @property
    def n_passages(self) -> int:
        return len(self.counts)


def passage_index(passage_ids: np.ndarray) -> PassageIndex:
    _, inverse = np.unique(np.asarray(passage_ids), return_inverse=True)
    inverse = inverse.astype(np.int64)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rank = np.empty(len(inverse), np.int64)
    rank[order] = np.arange(len(inverse)) - starts[inverse[order]]
    return PassageIndex(inverse, order, starts, counts, rank)


def require_passages(n_passages: int, needed: int, what: str) -> None:
    if n_passages < needed:
        raise InsufficientDataError(
            f"{what} needs at least {needed} distinct passages with anchors, got {n_passages}; "
            "extract more passages (corpus.max_passages) or lower align.min_passages"
        )


def bootstrap_weights(idx: PassageIndex, rng: np.random.Generator) -> np.ndarray:
    """Cluster bootstrap as row multiplicities `[n]`: draw P passages with replacement."""
    picks = np.bincount(rng.integers(0, idx.n_passages, idx.n_passages), minlength=idx.n_passages)
    return picks[idx.inverse].astype(np.float64)


def bootstrap_rows(idx: PassageIndex, rng: np.random.Generator) -> np.ndarray:
    """Cluster bootstrap as a row list: each drawn passage contributes all its rows."""
    picks = rng.integers(0, idx.n_passages, idx.n_passages)
    return np.concatenate([idx.order[idx.starts[g] : idx.starts[g] + idx.counts[g]] for g in picks])


def half_sample_weights(idx: PassageIndex, rng: np.random.Generator) -> np.ndarray:
    """Half-sampling as 0/1 row weights `[n]`: a random half of the passages, without replacement."""
    keep = np.zeros(idx.n_passages, bool)
    keep[rng.choice(idx.n_passages, idx.n_passages // 2, replace=False)] = True
    return keep[idx.inverse].astype(np.float64)


def half_sample_rows(idx: PassageIndex, rng: np.random.Generator) -> np.ndarray:
    """Half-sampling as a sorted row list (no token appears twice)."""
    return np.nonzero(half_sample_weights(idx, rng))[0]


def resample_rows(idx: PassageIndex, rng: np.random.Generator, ci: str) -> np.ndarray:
    return half_sample_rows(idx, rng) if ci == "half_sample" else bootstrap_rows(idx, rng)


def resample_weights(idx: PassageIndex, rng: np.random.Generator, ci: str) -> np.ndarray:
    return half_sample_weights(idx, rng) if ci == "half_sample" else bootstrap_weights(idx, rng)


def derangement(p: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point (one random cycle through all p items), p >= 2."""
    sigma = rng.permutation(p)
    perm = np.empty(p, np.int64)
    perm[sigma] = np.roll(sigma, -1)
    return perm


def shuffled_pairing(idx: PassageIndex, rng: np.random.Generator, derange: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Null pairing: rows of A's passage g meet rows of B's passage pi(g), matched by rank.

    pi is a uniform random permutation of the passages. Drawing from the whole group S_P
    (fixed points allowed) is what makes the +1 permutation p-value exact: the observed
    pairing is then exchangeable with the draws. Derangements (`derange=True`) look cleaner but
    never pair a passage with itself, so every draw lives on the same off-diagonal set of
    passage pairings and the observed (diagonal) one is not exchangeable with them; with sparse
    SAE codes that made p <= 0.001 ten times too frequent in simulation. The price of S_P is
    that ~1 passage per draw keeps its true partner, pulling null_mean up by ~value/P.

    Returns `(rows_a [n'], rows_b [n'])`, n' <= n because each pair is truncated to the shorter
    of the two passages.
    """
    perm = derangement(idx.n_passages, rng) if derange else rng.permutation(idx.n_passages)
    partner = perm[idx.inverse]  # B's passage for every A row
    keep = idx.rank < idx.counts[partner]
    rows_a = np.nonzero(keep)[0]
    rows_b = idx.order[idx.starts[partner[keep]] + idx.rank[keep]]
    return rows_a, rows_b


def permutation_p_value(value: float, null: np.ndarray) -> float:
    """One-sided (larger = more similar) with the +1 correction (Phipson & Smyth 2010): never 0."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    return float((1 + np.sum(null >= value)) / (1 + len(null)))


def bh_qvalues(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg (1995) adjusted p-values; NaNs stay NaN and are not counted as tests."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = sps.false_discovery_control(np.clip(p[ok], 0.0, 1.0), method="bh")
    return q


def _take(X: Any, rows: np.ndarray) -> Any:
    return X[rows]


def bc_percentile_ci(value: float, boots: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Bias-corrected percentile bootstrap interval (Efron 1981), never excluding the estimate.

    Plain percentiles assume the bootstrap distribution is centred on the estimate. CCA-type
    metrics are biased upward when a resample repeats passages (fewer distinct tokens -> more
    overfitting), which shifts every resample; z0 = Φ⁻¹(share of resamples below the estimate)
    moves the percentile levels to undo that median bias. For unbiased statistics z0 ≈ 0 and
    this is the ordinary percentile interval.

    When every resample lies on one side of the estimate (e.g. all resamples equal and differ from
    it), z0 is clipped and the corrected levels collapse onto one tail: the interval can have zero
    width and exclude the estimate. Then we fall back to the plain percentile interval, and, if that
    still excludes the estimate, stretch it to reach the estimate: an interval that does not
    contain the number it is reported with says nothing.
    """
    boots = np.asarray(boots, np.float64)
    B = len(boots)
    share = (np.sum(boots < value) + 0.5 * np.sum(boots == value)) / B
    z0 = sps.norm.ppf(np.clip(share, 0.5 / B, 1 - 0.5 / B))
    levels = sps.norm.cdf(2 * z0 + sps.norm.ppf([alpha / 2, 1 - alpha / 2]))
    lo, hi = np.quantile(boots, levels)
    if not lo <= value <= hi:  # degenerate correction: plain percentiles
        lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(min(lo, value)), float(max(hi, value))


def half_sample_scale(n_passages: int, alpha: float = 0.05) -> float:
    """Factor on the half-samples' spread so the interval keeps its nominal coverage at small P.

    (1) Odd P: a half-sample holds m = P//2 < P/2 passages; a mean over m of P passages drawn without
    replacement has variance ∝ (P - m) / m relative to the full-sample mean, which is 1 only at
    m = P/2 (x1.22 in sd at P = 5), so deviations are scaled by sqrt(m / (P - m)).
    (2) The spread is estimated from P passages: like a t interval with P - 1 degrees of freedom,
    the normal quantile is replaced by Student's (x1.15 at P = 10, x1.04 at P = 30). Without it
    simulated coverage of a 95% interval was 74% at 4 passages and 82% at 5.
    """
    m = n_passages // 2
    if n_passages < 2 or m == 0:
        return 1.0
    odd = math.sqrt(m / (n_passages - m))
    t = sps.t.ppf(1 - alpha / 2, n_passages - 1) / sps.norm.ppf(1 - alpha / 2)
    return float(odd * t)


def half_sample_ci(value: float, halves: np.ndarray, alpha: float = 0.05, n_passages: int | None = None) -> tuple[float, float]:
    """Interval from half-samples of passages: the estimate plus the half-samples' spread around
    their median, [θ̂ + c·q_lo(θ* - med θ*), θ̂ + c·q_hi(θ* - med θ*)], c = `half_sample_scale(P)`.

    Drawing half of the P passages without replacement makes the spread of θ* match the
    sampling spread of θ̂ for smooth statistics (the finite-population factor 1 - 1/2 cancels the
    halved sample size; McCarthy 1969), and no token is repeated, so metrics built on
    token-by-token similarity are not inflated by duplicated rows. We take only the spread, not
    the shift: several metrics depend on n in ways that are not a simple c/n bias (kNN overlap
    falls as points thin out, CKA's bias grows), so the half-samples' median is not a usable
    bias estimate. Compare with null_mean / p_value for the question "is there any similarity".
    The interval always contains θ̂ (the deviations straddle their median, 0).
    """
    c = 1.0 if n_passages is None else half_sample_scale(n_passages, alpha)
    d = np.asarray(halves, np.float64) - np.median(halves)
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    return float(value + c * min(lo, 0.0)), float(value + c * max(hi, 0.0))


def summarise(value: float, boots: list[float], nulls: list[float], alpha: float, n: int, p_count: int,
              ci: str = "half_sample") -> MetricResult:  # fmt: skip
    boots, nulls = np.asarray(boots, np.float64), np.asarray(nulls, np.float64)
    lo = hi = null_mean = p = math.nan
    if boots.size and np.isfinite(boots).any() and np.isfinite(value):
        fin = boots[np.isfinite(boots)]
        if ci == "half_sample":
            lo, hi = half_sample_ci(value, fin, alpha, p_count or None)
        else:  # the cluster bootstrap's spread is short by sqrt((P-1)/P), plus the t correction as above
            lo, hi = bc_percentile_ci(value, fin, alpha)
            if p_count and p_count >= 2:
                c = math.sqrt(p_count / (p_count - 1)) * sps.t.ppf(1 - alpha / 2, p_count - 1) / sps.norm.ppf(1 - alpha / 2)
                lo, hi = value - c * (value - lo), value + c * (hi - value)
    if nulls.size and np.isfinite(nulls).any():
        null_mean = float(np.nanmean(nulls))
        p = permutation_p_value(value, nulls) if np.isfinite(value) else math.nan
    return MetricResult(float(value), float(lo), float(hi), null_mean, p, n_tokens=n, n_passages=p_count)


def with_ci(
    metric_fn: Callable[[Any, Any], float | dict[str, float]],
    X_a: Any,
    X_b: Any,
    passage_ids: np.ndarray,
    n_boot: int = 200,
    n_null: int = 200,
    rng: np.random.Generator | None = None,
    alpha: float = 0.05,
    min_passages: int = 2,
    ci: str = "half_sample",
    what: str = "a passage-resampling CI / shuffled-pairing null",
) -> MetricResult | dict[str, MetricResult]:
    """Value, passage-resampling CI, shuffled-pairing null mean and permutation p-value.

    CI (`ci`): "half_sample" (default) — the spread of n_boot half-samples of passages around
    the estimate (`half_sample_ci`); "bootstrap" — cluster bootstrap (passages with
    replacement), bias-corrected percentile (`bc_percentile_ci`). The cluster bootstrap repeats every drawn
    passage's tokens, and repeated tokens inflate CKA/RSA/kNN-type metrics (an exact copy is a
    perfect match in both spaces); with strong similarity that shift exceeded the sampling
    spread and the bootstrap interval excluded the estimate, so half-sampling is the default.

    X_a `[n, d_a]`, X_b `[n, d_b]` (arrays, scipy-sparse rows or `metrics.Pairwise`), passage_ids
    `[n]`; row i of X_a and X_b are the two models on the same characters.
    `metric_fn(X_a, X_b)` returns a float (larger = more similar) or a dict of them (several
    metrics sharing one expensive step); the result has the same shape. The p-value is
    one-sided, P(null >= observed), with the +1 correction. Fewer than `min_passages` passages
    (align.min_passages in the align stage) is an `InsufficientDataError` naming `what`.
    """
    rng = np.random.default_rng() if rng is None else rng
    idx = passage_index(passage_ids)
    if n_boot or n_null:
        require_passages(idx.n_passages, max(2, min_passages), what)
    as_dict = lambda v: v if isinstance(v, dict) else {"_": v}  # noqa: E731
    value = as_dict(metric_fn(X_a, X_b))
    boots: dict[str, list[float]] = {k: [] for k in value}
    nulls: dict[str, list[float]] = {k: [] for k in value}
    for _ in range(n_boot):
        r = resample_rows(idx, rng, ci)
        for k, v in as_dict(metric_fn(_take(X_a, r), _take(X_b, r))).items():
            boots[k].append(v)
    for _ in range(n_null):
        ra, rb = shuffled_pairing(idx, rng)
        for k, v in as_dict(metric_fn(_take(X_a, ra), _take(X_b, rb))).items():
            nulls[k].append(v)
    out = {k: summarise(value[k], boots[k], nulls[k], alpha, len(passage_ids), idx.n_passages, ci) for k in value}
    return out["_"] if list(out) == ["_"] else out


def within_passage_subsample(passage_ids: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted rows `[~<= max_rows]` with every passage kept: each passage keeps the same random share of
    its tokens (at least one). The CIs and nulls resample passages, so dropping whole passages would
    throw away exactly the units their coverage rests on (9-10 of 82 held-out passages for RBF CKA
    and kNN, 4-5 for RSA, when whole passages were subsampled); thinning tokens inside passages keeps
    all of them."""
    n = len(passage_ids)
    if n <= max_rows:
        return np.arange(n)
    idx = passage_index(passage_ids)
    quota = np.maximum(1, np.floor(idx.counts * (max_rows / n))).astype(np.int64)
    keys = rng.random(n)
    # rank of each row within its passage in a random order
    order = np.lexsort((keys, idx.inverse))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - idx.starts[idx.inverse[order]]
    return np.nonzero(rank < quota[idx.inverse])[0]


def passage_subsample(passage_ids: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Rows `[<= max_rows]` of randomly chosen whole passages (keeps the cluster structure intact).

    Not used by the align stage's statistics any more (see `within_passage_subsample`)."""
    idx = passage_index(passage_ids)
    if len(passage_ids) <= max_rows:
        return np.arange(len(passage_ids))
    rows = []
    total = 0
    for g in rng.permutation(idx.n_passages):
        if total + idx.counts[g] > max_rows and total > 0:
            continue
        rows.append(idx.order[idx.starts[g] : idx.starts[g] + idx.counts[g]])
        total += idx.counts[g]
        if total >= max_rows:
            break
    return np.sort(np.concatenate(rows))
