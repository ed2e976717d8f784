"""Feature matching between two SAEs over anchor-paired tokens, with per-match statistics.

Similarities: Pearson correlation of the two features' codes over paired tokens ("act"), and
cosine between decoder directions after mapping A's decoder rows into B's space with the
Procrustes rotation ("dec"). Matchings: one-to-one Hungarian on act correlation
(`linear_sum_assignment`; sparse LAPJVsp on each feature's top candidates when m is large),
mutual nearest neighbours on act correlation and on decoder cosine.

Statistics (selection on train, testing on held-out, so the test is not biased by having
picked the best of m candidates):
  * matches are chosen on the train anchors; act_corr is the held-out correlation of the pair;
  * p_value: one-sided permutation p, (1 + #{null >= obs}) / (1 + n_null), against the pair's
    own null from shuffled pairing (passages permuted between the models,
    `stats.shuffled_pairing`), which keeps each feature's sparsity and its within-passage
    autocorrelation. With B's token ids at the anchors (`strata`), a second null re-pairs
    rows only *within* a token stratum (`token_stratified_pairing`: B's row moves to another
    anchor where B read the same token), which keeps what both models read; p_value is then the
    larger of the two p's (p_shuffle, p_token; an intersection-union test, valid at the level of
    each), so a match must beat token identity, not only passage shuffling. One-hot token codes
    are invariant under that null, so a B made of its token ids gets p = 1 everywhere.
  * support (held-out): n_tokens and n_passages in which each feature fires; a pair is `tested`
    only when both features fire in >= min_passages passages and >= min_tokens tokens. Untested
    pairs are written with p/q = NaN (dead and rare features are counted, not matched), and BH
    runs over the tested pairs only. Per-pair draws are cheap (O(nnz) each), so n_null defaults to 1000: the
    p floor of 1/1001 lets BH reject when more than ~2% of 16k matches are real. A pooled
    alternative with finer resolution is in `p_values` (documented caveats).
  * q_value: Benjamini–Hochberg (1995) over all matches of one method and layer pair;
  * stability: fraction of passage-bootstrap resamples of the train anchors in which the same
    pair is matched again.

Codes are held as scipy CSR matrices (TopK SAEs: k nonzeros per token), so 100k tokens × 16k
features cost a few MB; the only dense m_a × m_b array is one float32 correlation matrix
(1 GiB at m = 16k), filled by streaming sparse cross-products over row blocks.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy import sparse
from scipy import stats as sps
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from .stats import bh_qvalues, bootstrap_weights, passage_index, shuffled_pairing

MATCH_COLUMNS = (
    "layer_a", "layer_b", "feat_a", "feat_b", "method", "act_corr", "dec_cos",
    "freq_a", "freq_b", "p_value", "q_value", "stability",
    "p_shuffle", "p_token", "n_passages_a", "n_passages_b", "n_tokens_a", "n_tokens_b", "tested",
)  # fmt: skip
SUPPORT_COLUMNS = ("p_shuffle", "p_token", "n_passages_a", "n_passages_b", "n_tokens_a", "n_tokens_b", "tested")
"""Columns added by issue 18 (absent from older feature_matches.csv files; `read_matches` fills defaults)."""
FREQ_BANDS = ((0.0, 0.001, "lt0.1pct"), (0.001, 0.01, "0.1to1pct"), (0.01, math.inf, "gt1pct"))
"""Held-out firing-frequency bands for match counts: < 0.1%, 0.1-1%, > 1% of tokens."""
DENSE_HUNGARIAN_MAX = 4096 * 4096  # above this, linear_sum_assignment's float64 copy alone is > 128 MiB


def encode_sparse(sae: Any, X: np.ndarray, block_rows: int = 4096) -> sparse.csr_matrix:
    """SAE codes of raw activations X `[n, d_in]` as CSR `[n, d_sae]` float32.

    An object with its own `encode_csr(X)` (e.g. `baselines.TokenCodes`, a token-identity
    "SAE") is asked directly, so floors go through the same matching path without densifying.
    """
    if hasattr(sae, "encode_csr"):
        return sae.encode_csr(X)
    parts = []
    with torch.no_grad():
        for s in range(0, X.shape[0], block_rows):
            codes = sae.encode(torch.as_tensor(np.asarray(X[s : s + block_rows], np.float32)))
            parts.append(sparse.csr_matrix(codes.detach().float().cpu().numpy()))
    return sparse.vstack(parts, format="csr") if parts else sparse.csr_matrix((0, 0), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# correlation


def _column_sums(C: sparse.csr_matrix, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Σ w·x and Σ w·x² per column `[m]` (float64) of C `[n, m]`, row weights w `[n]` (None: all 1).

    `bincount` over the stored entries adds them in the order `C.T @ w` does (row by row, in
    float64), with squares in C's precision as `C.multiply(C)`: the same numbers without a
    transposed copy and a sparse elementwise product per call."""
    C = C if C.format == "csr" else C.tocsr()
    x, x2 = C.data.astype(np.float64), (C.data * C.data).astype(np.float64)
    if w is not None:
        wr = np.repeat(np.asarray(w, np.float64), np.diff(C.indptr))
        x, x2 = x * wr, x2 * wr
    return np.bincount(C.indices, x, minlength=C.shape[1]), np.bincount(C.indices, x2, minlength=C.shape[1])


def _moments(s: np.ndarray, s2: np.ndarray, nw: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sd) `[m]` from column sums Σx, Σx² over nw rows."""
    mean = s / nw
    return mean, np.sqrt(np.maximum(s2 / nw - mean**2, 0.0))


def _mean_sd(C: sparse.csr_matrix, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and sd `[m]` (float64) of C `[n, m]` under row weights w `[n]` (None: all 1)."""
    return _moments(*_column_sums(C, w), float(C.shape[0]) if w is None else w.sum())


def code_correlation(
    ca: sparse.csr_matrix,
    cb: sparse.csr_matrix,
    weights: np.ndarray | None = None,
    block_rows: int = 4096,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Pearson correlation `[m_a, m_b]` float32 between columns of ca `[n, m_a]` and cb `[n, m_b]`.

    Cross-products are accumulated over row blocks, then turned into correlations in place, row
    block by row block, so peak memory is the output plus one block. Dead features (sd 0) get
    correlation 0. `weights [n]` are row multiplicities (cluster bootstrap); `out` lets repeated
    calls reuse one buffer. When ca is not very sparse (> 5% nonzero, e.g. L1 SAE codes) a block
    of it is made dense and cb's nonzeros are walked (`cbᵀ·A`: nnz(cb)·m_a multiply-adds); a
    dense × dense product cost n·m_a·m_b, 70x more for a token-floor cb (one nonzero per row over
    a 4k-8k vocabulary). Same sums, in another float32 order (`test_code_correlation_paths_agree`).
    """
    n, m_a, m_b = ca.shape[0], ca.shape[1], cb.shape[1]
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    acc = np.zeros((m_a, m_b), np.float32) if out is None else out
    acc.fill(0.0)
    dense = (ca.nnz / max(ca.shape[0] * m_a, 1)) > 0.05
    for s in range(0, n, block_rows):
        wa = sparse.diags(w[s : s + block_rows].astype(np.float32)) @ ca[s : s + block_rows]
        if dense:
            acc += (cb[s : s + block_rows].T @ wa.toarray()).T  # [m_b, m_a] from cb's nonzeros
        else:
            # a CSR product has no duplicate entries (csr_matmat uses a dense row accumulator),
            # so the fancy-index += below is safe without an expensive sum_duplicates sort
            prod = (wa.T.tocsr() @ cb[s : s + block_rows]).tocoo()
            acc[prod.row, prod.col] += prod.data
    mean_a, sd_a = _mean_sd(ca, weights if weights is None else w)
    mean_b, sd_b = _mean_sd(cb, weights if weights is None else w)
    inv_b = np.where(sd_b > 0, 1.0 / np.where(sd_b > 0, sd_b, 1.0), 0.0).astype(np.float32)
    nw = np.float32(w.sum())
    for r in range(0, m_a, 1024):
        inv_a = np.where(sd_a[r : r + 1024] > 0, 1.0 / np.where(sd_a[r : r + 1024] > 0, sd_a[r : r + 1024], 1.0), 0.0)
        blk = acc[r : r + 1024]
        blk /= nw
        blk -= np.outer(mean_a[r : r + 1024], mean_b).astype(np.float32)
        blk *= inv_a[:, None].astype(np.float32)
        blk *= inv_b[None, :]
    return acc


def pair_correlation(xa: sparse.csr_matrix, xb: sparse.csr_matrix) -> np.ndarray:
    """Column-wise Pearson correlation `[K]` between xa `[n, K]` and xb `[n, K]` (pair i = column i)."""
    return _pair_corr(xa.shape[0], _mean_sd(xa), _mean_sd(xb), _cross_sums(xa, None, xb))


DENSE_LOOKUP_MAX = 64 * 1024 * 1024
"""Largest n·K (float32 entries, 256 MiB) for which `pair_null` keeps A's codes dense for `_cross_sums`."""


def _cross_sums(xa: sparse.csr_matrix, dense_a: np.ndarray | None, xb: sparse.csr_matrix) -> np.ndarray:
    """Σ_i xa[i, k]·xb[i, k] `[K]` float32, as `xa.multiply(xb).sum(0)`.

    With `dense_a` (xa.toarray().ravel()) the products are formed at xb's nonzeros by looking up
    A's value, instead of merging both rows' index lists (A holds most nonzeros; this is most of a
    null draw). The products are the same float32 numbers and are summed per column in the same
    row order (zeros where A is 0 add nothing), so the sums are bit-identical."""
    if dense_a is None:
        return np.asarray(xa.multiply(xb).sum(0)).ravel()
    rows = np.repeat(np.arange(xb.shape[0], dtype=np.int64), np.diff(xb.indptr))
    prod = xb.data * dense_a.take(rows * xb.shape[1] + xb.indices)
    return np.asarray(sparse.csr_matrix((prod, xb.indices, xb.indptr), shape=xb.shape).sum(0)).ravel()


def _pair_corr(n: int, mom_a: tuple[np.ndarray, np.ndarray], mom_b: tuple[np.ndarray, np.ndarray],
               cross: np.ndarray) -> np.ndarray:  # fmt: skip
    """Correlations `[K]` from both sides' (mean, sd) over n paired rows and their cross sums (`_cross_sums`)."""
    (ma, sa), (mb, sb) = mom_a, mom_b
    cov = cross / n - ma * mb
    den = sa * sb
    return np.where(den > 0, cov / np.where(den > 0, den, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------
# matchings


def mutual_nn(sim_rows: Callable[[int, int], np.ndarray], m_a: int, m_b: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours from a similarity given by row blocks `sim_rows(r0, r1) -> [r1-r0, m_b]`.

    The full m_a × m_b matrix is never needed at once (decoder cosines are computed per block).
    """
    row_best = np.empty(m_a, np.int64)
    col_val = np.full(m_b, -np.inf)
    col_best = np.zeros(m_b, np.int64)
    for r0 in range(0, m_a, block):
        blk = sim_rows(r0, min(r0 + block, m_a))
        row_best[r0 : r0 + len(blk)] = blk.argmax(1)
        bv, ba = blk.max(0), blk.argmax(0) + r0
        better = bv > col_val
        col_val[better], col_best[better] = bv[better], ba[better]
    ia = np.nonzero(col_best[row_best] == np.arange(m_a))[0]
    return ia, row_best[ia]


def _top_per_row(block: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) indices of each row's c largest entries of block `[b, m]`, as flat arrays `[b·c]`."""
    c = min(c, block.shape[1])
    top = np.argpartition(block, block.shape[1] - c, axis=1)[:, -c:]
    return np.repeat(np.arange(block.shape[0]), c), top.ravel().copy()


def hungarian(S: np.ndarray, n_candidates: int = 16, dense_max: int = DENSE_HUNGARIAN_MAX) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one assignment maximising total similarity S `[m_a, m_b]`.

    Small problems: exact `linear_sum_assignment` (Kuhn 1955 / Crouse 2016). Large ones: exact
    LAPJVsp on a sparse graph holding each row's and each column's top `n_candidates`, plus a
    private "unmatched" column per row at similarity 0, so a feature is left unmatched rather
    than forced onto a negatively correlated partner. Pairs outside every top-list are
    essentially uncorrelated, so restricting to them changes nothing that could be significant.
    """
    m_a, m_b = S.shape
    if m_a * m_b <= dense_max:
        return linear_sum_assignment(S, maximize=True)
    rows, cols = [], []
    for r0 in range(0, m_a, 256):  # each row's top candidates
        rows_, cols_ = _top_per_row(S[r0 : r0 + 256], n_candidates)
        rows.append(rows_ + r0), cols.append(cols_)
    for c0 in range(0, m_b, 256):  # each column's top candidates (on a transposed copy of a slab)
        cols_, rows_ = _top_per_row(np.ascontiguousarray(S[:, c0 : c0 + 256].T), n_candidates)
        rows.append(rows_), cols.append(cols_ + c0)
    key = np.unique(np.concatenate(rows) * m_b + np.concatenate(cols))
    rows, cols = key // m_b, key % m_b
    # +2 keeps every weight strictly positive (LAPJVsp needs non-zero weights); dummies sit at 0 + 2.
    w = np.concatenate([S[rows, cols].astype(np.float64) + 2.0, np.full(m_a, 2.0)])
    graph = sparse.csr_matrix(
        (w, (np.concatenate([rows, np.arange(m_a)]), np.concatenate([cols, m_b + np.arange(m_a)]))),
        shape=(m_a, m_b + m_a),
    )
    ia, ib = min_weight_full_bipartite_matching(graph, maximize=True)
    real = ib < m_b
    return ia[real], ib[real]


def _normalize_rows(D: np.ndarray) -> np.ndarray:
    D = np.asarray(D, np.float32)
    return D / np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-12)


def decoder_cosine(dec_a: np.ndarray, dec_b: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Cosine `[K]` between mapped decoder rows dec_a[ia] `[K, d_b]` and dec_b[ib]."""
    return np.sum(_normalize_rows(dec_a[ia]) * _normalize_rows(dec_b[ib]), 1)


# ---------------------------------------------------------------------------------------------
# statistics per match


def token_stratified_pairing(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Null re-pairing that keeps what both models read: row i of A meets B's row rb[i] `[n]`, a
    uniformly random row with the same stratum (B's token id at the anchor); rows alone in their
    stratum keep their partner. A permutation within strata, so the +1 p-value stays exact."""
    strata = np.asarray(strata)
    by_stratum = np.argsort(strata, kind="stable")
    shuffled = np.lexsort((rng.random(len(strata)), strata))  # same strata order, random order within
    rb = np.empty(len(strata), np.int64)
    rb[by_stratum] = shuffled
    return rb


def pair_null(
    ca: sparse.csr_matrix, cb: sparse.csr_matrix, ia: np.ndarray, ib: np.ndarray,
    passage_ids: np.ndarray, n_null: int, rng: np.random.Generator, keep_null: bool = False,
    strata: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:  # fmt: skip
    """Held-out correlation `[K]` of each pair, how many shuffled-pairing draws reach it `[K]`,
    and (keep_null) all draws `[n_null, K]`; with `strata [n]` (B's token id per held-out row) a
    fourth item: how many of n_null token-stratified draws (`token_stratified_pairing`) reach it."""
    xa, xb = ca[:, ia].tocsr(), cb[:, ib].tocsr()
    obs = pair_correlation(xa, xb)
    idx = passage_index(passage_ids)
    n_ge = np.zeros(len(ia), np.int64)
    null = np.empty((n_null, len(ia))) if keep_null else None
    sums_a, sums_b = _column_sums(xa), _column_sums(xb)
    xb0 = sparse.vstack([xb, sparse.csr_matrix((1, xb.shape[1]), dtype=xb.dtype)], format="csr")  # + an empty row
    dense_a = xa.toarray().ravel() if xa.shape[0] * xa.shape[1] <= DENSE_LOOKUP_MAX else None
    for t in range(n_null):
        ra, rb = shuffled_pairing(idx, rng)
        draw = _shuffled_corr(xa, dense_a, xb0, sums_a, sums_b, ra, rb)
        n_ge += draw >= obs
        if keep_null:
            null[t] = draw
    if strata is None:
        return obs, n_ge, null
    # Within-stratum permutations of B's rows keep both sides' moments (same rows, same n), so only
    # the cross products are recomputed. Ties count against us: a B that is a function of the
    # token gives draw == obs exactly.
    n_ge_tok = np.zeros(len(ia), np.int64)
    mom_a, mom_b = _mean_sd(xa), _mean_sd(xb)
    for _ in range(n_null):
        draw = _pair_corr(xa.shape[0], mom_a, mom_b, _cross_sums(xa, dense_a, xb[token_stratified_pairing(strata, rng)]))
        n_ge_tok += draw >= obs - 1e-12
    return obs, n_ge, null, n_ge_tok


def _shuffled_corr(xa: sparse.csr_matrix, dense_a: np.ndarray | None, xb0: sparse.csr_matrix, sums_a: tuple,
                   sums_b: tuple, ra: np.ndarray, rb: np.ndarray) -> np.ndarray:  # fmt: skip
    """`pair_correlation(xa[ra], xb[rb])` `[K]` for a shuffled pairing that keeps rows ra of A (sorted)
    and rows rb of B: each side's sums are its totals (`_column_sums`) less the few rows left out,
    and B's rows are moved to their A partners' positions (xb0: xb plus an empty last row for A's
    rows left out), so A's codes, the bulk of the nonzeros, are never copied. The cross sums are the
    same numbers (`_cross_sums`); the moments differ from sums over the kept rows only by rounding
    (1e-16)."""
    n = xa.shape[0]
    pos = np.full(n, xb0.shape[0] - 1)
    pos[ra] = rb
    mom = []
    for C, (s, s2), kept in ((xa, sums_a, ra), (xb0, sums_b, rb)):  # both sides have n rows (xb0: + 1 empty)
        out = np.ones(n, bool)
        out[kept] = False
        if out.any():
            e, e2 = _column_sums(C[np.nonzero(out)[0]])
            s, s2 = s - e, s2 - e2
        mom.append(_moments(s, s2, float(len(ra))))
    return _pair_corr(len(ra), mom[0], mom[1], _cross_sums(xa, dense_a, xb0[pos]))


def _zscores(obs: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardise obs `[K]` and null `[n_null, K]` so that, under H0, they are exchangeable.

    obs is z-scored by the mean/sd of the pair's n_null null draws; each null draw by the mean/sd
    of the *other* n_null - 1 draws (leave-one-out). Standardising a draw by moments that include
    itself shrinks it relative to a fresh draw, which alone made pooled p-values anti-conservative
    (t- vs normal tails; ~2x excess false positives at n_null = 50). Leaving obs out of every
    standardisation keeps a strong true match from widening its own null.
    """
    N = null.shape[0]
    if N < 3:
        return np.full(obs.shape, np.nan), np.full(null.shape, np.nan)
    S, SS = null.sum(0), (null**2).sum(0)
    mu, sd = S / N, np.sqrt(np.maximum((SS - S**2 / N) / (N - 1), 0.0))
    mu_l = (S - null) / (N - 1)
    sd_l = np.sqrt(np.maximum((SS - null**2 - (N - 1) * mu_l**2) / (N - 2), 0.0))
    # A pair that never co-varies under shuffling (sd 0) carries no evidence either way.
    z_obs = np.where(sd > 0, (obs - mu) / np.where(sd > 0, sd, 1.0), np.where(obs > mu, np.inf, -np.inf))
    z_null = np.where(sd_l > 0, (null - mu_l) / np.where(sd_l > 0, sd_l, 1.0), np.nan)
    return z_obs, z_null


def p_values(obs: np.ndarray, null: np.ndarray, kind: str = "empirical", strata: np.ndarray | None = None) -> np.ndarray:
    """One-sided p `[K]` of obs `[K]` against the shuffled-pairing null `[n_null, K]`.

    empirical (default): (1 + #{null_k >= obs_k}) / (1 + n_null). Exact (valid whatever the
        codes look like) but never below 1/(n_null + 1), so BH at level q over K matches rejects
        nothing unless more than K / (q·(n_null + 1)) of them are real: n_null must grow with K.
    pooled: each pair's obs and null draws are z-scored by that pair's own null (leave-one-out,
        see `_zscores`) and obs is compared with the null z-scores of all pairs in its stratum
        (`strata [K]`, firing-frequency bins), pooling K·n_null draws for resolution. Calibrated
        when features fire often enough to co-fire several times by chance; anti-conservative
        (measured ~7x excess at p < 0.001) for very sparse pairs with < 1 expected co-firing.
    normal: normal tail of the z-score; anti-conservative for sparse codes, for comparison only.
    """
    if null.shape[0] == 0:
        return np.full(obs.shape, np.nan)
    if kind == "empirical":
        return (1 + (null >= obs[None, :]).sum(0)) / (1 + null.shape[0])
    z_obs, z_null = _zscores(obs, null)
    if kind == "normal":
        return sps.norm.sf(z_obs)
    if kind != "pooled":
        raise ValueError(f"unknown p-value kind {kind!r}; expected 'empirical', 'pooled' or 'normal'")
    strata = np.zeros(len(obs), np.int64) if strata is None else np.asarray(strata)
    p = np.empty(len(obs))
    for s in np.unique(strata):
        cols = strata == s
        pool = np.sort(z_null[:, cols].ravel())
        pool = pool[np.isfinite(pool)]
        n_ge = len(pool) - np.searchsorted(pool, z_obs[cols], side="left")
        p[cols] = (1 + n_ge) / (1 + len(pool))
    return p


def frequency_strata(freq_a: np.ndarray, freq_b: np.ndarray, min_per_stratum: int = 50, max_strata: int = 10) -> np.ndarray:
    """Quantile bins `[K]` of log(freq_a·freq_b): pairs whose null tails look alike."""
    k = len(freq_a)
    n_bins = int(np.clip(k // min_per_stratum, 1, max_strata))
    if n_bins == 1:
        return np.zeros(k, np.int64)
    key = np.log(np.maximum(freq_a * freq_b, 1e-12))
    edges = np.quantile(key, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, key, side="right")


def stability(
    ca: sparse.csr_matrix, cb: sparse.csr_matrix, passage_ids: np.ndarray,
    matchers: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]],
    matches: dict[str, tuple[np.ndarray, np.ndarray]],
    n_boot: int, rng: np.random.Generator, buffer: np.ndarray | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """For each method, fraction `[K]` of passage-bootstrap resamples in which each match recurs."""
    m_b = cb.shape[1]
    hits = {k: np.zeros(len(v[0])) for k, v in matches.items()}
    if n_boot == 0:
        return {k: np.full(len(v[0]), np.nan) for k, v in matches.items()}
    idx = passage_index(passage_ids)
    for _ in range(n_boot):
        S = code_correlation(ca, cb, bootstrap_weights(idx, rng), out=buffer)
        buffer = S
        for name, fn in matchers.items():
            ja, jb = fn(S)
            ia, ib = matches[name]
            hits[name] += np.isin(ia * m_b + ib, ja * m_b + jb)
    return {k: v / n_boot for k, v in hits.items()}


# ---------------------------------------------------------------------------------------------
# driver


@dataclass
class Matches:
    """Matched pairs of one method, with per-match statistics (arrays of length K)."""

    method: str
    feat_a: np.ndarray
    feat_b: np.ndarray
    act_corr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dec_cos: np.ndarray = field(default_factory=lambda: np.zeros(0))
    freq_a: np.ndarray = field(default_factory=lambda: np.zeros(0))
    freq_b: np.ndarray = field(default_factory=lambda: np.zeros(0))
    p_value: np.ndarray = field(default_factory=lambda: np.zeros(0))
    q_value: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stability: np.ndarray = field(default_factory=lambda: np.zeros(0))
    p_shuffle: np.ndarray | None = None
    p_token: np.ndarray | None = None
    n_passages_a: np.ndarray | None = None
    n_passages_b: np.ndarray | None = None
    n_tokens_a: np.ndarray | None = None
    n_tokens_b: np.ndarray | None = None
    tested: np.ndarray | None = None
    min_corr: float = 0.0
    """Effect-size threshold: a significant match also needs held-out act_corr >= min_corr."""

    def __post_init__(self) -> None:
        k = len(self.feat_a)
        nan = lambda: np.full(k, math.nan)  # noqa: E731
        for name in ("p_shuffle", "p_token", "n_passages_a", "n_passages_b", "n_tokens_a", "n_tokens_b"):
            if getattr(self, name) is None:
                setattr(self, name, nan())
        if self.tested is None:
            self.tested = np.ones(k, bool)

    def __len__(self) -> int:
        return len(self.feat_a)

    def significant(self, q: float = 0.05, min_corr: float | None = None) -> np.ndarray:
        """Tested pairs with q < q and held-out act_corr >= min_corr (default: self.min_corr) `[K]` bool."""
        min_corr = self.min_corr if min_corr is None else min_corr
        return self.tested & (np.nan_to_num(self.q_value, nan=1.0) < q) & (np.nan_to_num(self.act_corr, nan=-1.0) >= min_corr)

    def rows(self, layer_a: int, layer_b: int) -> list[dict]:
        cols = ("act_corr", "dec_cos", "freq_a", "freq_b", "p_value", "q_value", "stability", "p_shuffle", "p_token")
        ints = ("n_passages_a", "n_passages_b", "n_tokens_a", "n_tokens_b")
        return [
            {"layer_a": layer_a, "layer_b": layer_b, "feat_a": int(self.feat_a[i]), "feat_b": int(self.feat_b[i]),
             "method": self.method, **{c: float(getattr(self, c)[i]) for c in cols},
             **{c: (int(v) if math.isfinite(v := float(getattr(self, c)[i])) else "") for c in ints},
             "tested": int(bool(self.tested[i]))}
            for i in range(len(self))
        ]  # fmt: skip


def support(C: sparse.csr_matrix, passage_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per feature of codes C `[n, m]`: tokens it fires on `[m]` and distinct passages it fires in `[m]`."""
    fires = (C > 0).tocsr().astype(np.float32)
    n_tokens = np.asarray(fires.sum(0)).ravel().astype(np.int64)
    inv = passage_index(passage_ids).inverse
    G = sparse.csr_matrix((np.ones(len(inv), np.float32), (inv, np.arange(len(inv)))), shape=(int(inv.max(initial=-1)) + 1, len(inv)))
    n_passages = (G @ fires).getnnz(axis=0).astype(np.int64)
    return n_tokens, n_passages


def band_of(freq: np.ndarray) -> np.ndarray:
    """Firing-frequency band name `[K]` (see FREQ_BANDS)."""
    out = np.empty(len(freq), object)
    for lo, hi, name in FREQ_BANDS:
        out[(freq >= lo) & (freq < hi)] = name
    return out


def support_counts(
    m: Matches, n_tokens_a: np.ndarray, n_passages_a: np.ndarray, n_heldout: int, q: float,
    min_passages: int, min_tokens: int,
) -> dict[str, float]:  # fmt: skip
    """Counts for one method: A's features that are dead / rare (below the support rule) / tested
    on held-out, and significant matches in total and per firing-frequency band of A's feature."""
    dead = n_tokens_a == 0
    rare = ~dead & ((n_passages_a < min_passages) | (n_tokens_a < min_tokens))
    sig = m.significant(q)
    out = {
        "n_features_a": float(len(n_tokens_a)), "n_dead_a": float(dead.sum()), "n_rare_a": float(rare.sum()),
        "n_supported_a": float((~dead & ~rare).sum()), "n_tested": float(m.tested.sum()),
        "n_significant": float(sig.sum()),
        "significant_share": float(sig.sum() / max(m.tested.sum(), 1)),
    }  # fmt: skip
    bands = band_of(np.asarray(n_tokens_a, np.float64)[m.feat_a] / max(n_heldout, 1))
    for _, _, name in FREQ_BANDS:
        out[f"n_significant_{name}"] = float((sig & (bands == name)).sum())
        out[f"n_tested_{name}"] = float((m.tested & (bands == name)).sum())
    return out


def _freq(C: sparse.csr_matrix) -> np.ndarray:
    return np.asarray((C > 0).sum(0)).ravel() / max(C.shape[0], 1)


def match_features(
    train_a: sparse.csr_matrix, train_b: sparse.csr_matrix, pid_train: np.ndarray,
    test_a: sparse.csr_matrix, test_b: sparse.csr_matrix, pid_test: np.ndarray,
    dec_a: np.ndarray | None = None, dec_b: np.ndarray | None = None,
    methods: tuple[str, ...] = ("hungarian", "mnn", "mnn_dec"),
    n_null: int = 1000, n_boot: int = 20, pvalue: str = "empirical",
    rng: np.random.Generator | None = None, strata: np.ndarray | None = None,
    min_passages: int = 0, min_tokens: int = 0, min_corr: float = 0.0,
) -> dict[str, Matches]:  # fmt: skip
    """Match SAE features of A `[·, m_a]` to B `[·, m_b]`: choose on train codes, test on held-out.

    dec_a `[m_a, d_b]`: A's decoder rows already mapped into B's space (rows @ Procrustes R);
    dec_b `[m_b, d_b]`. Without decoders, `mnn_dec` is skipped and dec_cos is NaN.
    strata `[n_test]`: B's token id at each held-out anchor; adds the token-stratified null
    (p_value = max(p_shuffle, p_token)). A pair is tested only when both features fire in
    >= min_passages held-out passages and on >= min_tokens held-out tokens; `min_corr` is the
    effect-size threshold `Matches.significant` applies next to q.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    m_a, m_b = train_a.shape[1], train_b.shape[1]
    have_dec = dec_a is not None and dec_b is not None
    S = code_correlation(train_a, train_b)
    act_matchers = {
        "hungarian": lambda M: hungarian(M),
        "mnn": lambda M: mutual_nn(lambda r0, r1: M[r0:r1], m_a, m_b),
    }
    act_matchers = {k: v for k, v in act_matchers.items() if k in methods}
    found = {k: fn(S) for k, fn in act_matchers.items()}
    if "mnn_dec" in methods and have_dec:
        da, db = _normalize_rows(dec_a), _normalize_rows(dec_b)
        found["mnn_dec"] = mutual_nn(lambda r0, r1: da[r0:r1] @ db.T, m_a, m_b)
    stab = stability(train_a, train_b, pid_train, act_matchers, {k: found[k] for k in act_matchers}, n_boot, rng, buffer=S)
    del S
    freq_a, freq_b = _freq(test_a), _freq(test_b)
    (tok_a, pas_a), (tok_b, pas_b) = support(test_a, pid_test), support(test_b, pid_test)
    ok_a = (pas_a >= min_passages) & (tok_a >= max(min_tokens, 1))
    ok_b = (pas_b >= min_passages) & (tok_b >= max(min_tokens, 1))
    # one null for the union of all methods' *tested* pairs (Hungarian and MNN share most of theirs)
    keys = {name: np.asarray(ia, np.int64) * m_b + np.asarray(ib, np.int64) for name, (ia, ib) in found.items()}
    union = np.unique(np.concatenate(list(keys.values()))) if keys else np.zeros(0, np.int64)
    union = union[ok_a[union // m_b] & ok_b[union % m_b]]
    ua, ub = union // m_b, union % m_b
    p_tok = np.full(len(union), math.nan)
    if pvalue == "empirical":
        res = pair_null(test_a, test_b, ua, ub, pid_test, n_null, rng, strata=strata)
        obs, n_ge = res[0], res[1]
        p_shuf = (1 + n_ge) / (1 + n_null) if n_null else np.full(len(union), np.nan)
    else:
        res = pair_null(test_a, test_b, ua, ub, pid_test, n_null, rng, keep_null=True, strata=strata)
        obs, null = res[0], res[2]
        p_shuf = p_values(obs, null, pvalue, frequency_strata(freq_a[ua], freq_b[ub]))
    if strata is not None and n_null:
        p_tok = (1 + res[3]) / (1 + n_null)
    p_all = p_shuf if strata is None else np.fmax(p_shuf, p_tok)
    out = {}
    for name, key in keys.items():
        ia, ib = key // m_b, key % m_b
        pos = np.searchsorted(union, key)
        tested = np.zeros(len(key), bool)
        if len(union):
            tested = union[np.minimum(pos, len(union) - 1)] == key

        def pick(v: np.ndarray) -> np.ndarray:
            got = np.full(len(key), math.nan)
            got[tested] = v[pos[tested]]
            return got

        p = pick(p_all)
        corr = pick(obs)
        if (~tested).any():  # untested pairs still show their held-out correlation (no test)
            corr[~tested] = pair_correlation(test_a[:, ia[~tested]].tocsr(), test_b[:, ib[~tested]].tocsr())
        out[name] = Matches(
            method=name, feat_a=ia, feat_b=ib, act_corr=corr,
            dec_cos=decoder_cosine(dec_a, dec_b, ia, ib) if have_dec else np.full(len(ia), math.nan),
            freq_a=freq_a[ia], freq_b=freq_b[ib], p_value=p, q_value=bh_qvalues(p),
            stability=stab.get(name, np.full(len(ia), math.nan)),
            p_shuffle=pick(p_shuf), p_token=pick(p_tok), n_passages_a=pas_a[ia].astype(float), n_passages_b=pas_b[ib].astype(float),
            n_tokens_a=tok_a[ia].astype(float), n_tokens_b=tok_b[ib].astype(float), tested=tested, min_corr=min_corr,
        )  # fmt: skip
    return out


def read_matches(path: str | Path, method: str = "hungarian", tested_only: bool = True) -> list[dict[str, Any]]:
    """Rows of `feature_matches.csv` for one matching method, numbers parsed; rows without a q-value skipped.

    Each row: layer_a, layer_b, feat_a, feat_b (int), act_corr, dec_cos, freq_a, freq_b, p_value,
    q_value, stability, p_shuffle, p_token, n_passages_a/b, n_tokens_a/b (float), tested (bool).
    Files written before the support columns existed read with NaN for them and tested = True.
    With `tested_only`, pairs that fail the support rule (`tested` 0) are left out. Later stages
    read matches only through this function.
    """
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["method"] != method:
                continue
            try:
                row = {c: int(r[c]) for c in ("layer_a", "layer_b", "feat_a", "feat_b")}
                row.update({c: float(r[c]) for c in MATCH_COLUMNS if c not in row and c not in SUPPORT_COLUMNS and c != "method"})
            except (KeyError, ValueError):
                continue
            for c in SUPPORT_COLUMNS[:-1]:
                v = r.get(c)
                row[c] = float(v) if v not in (None, "") else math.nan
            row["tested"] = r.get("tested") in (None, "", "1", "True", "true")
            if tested_only and not row["tested"]:
                continue
            if math.isfinite(row["q_value"]) and math.isfinite(row["act_corr"]):
                out.append(row)
    return out
