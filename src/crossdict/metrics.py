"""Representation-similarity metrics between paired activations of two models.

Every function takes X `[n, d_a]` and Y `[n, d_b]` whose row i are the two models reading the
same characters, and returns one float, larger = more similar. Wrap them in
`stats.with_ci` for passage-bootstrap CIs and a shuffled-pairing null.

Linear CKA and SVCCA/PWCCA on many rows go through `cross_moments`, one streaming pass of
O(n·d²) over row blocks, so they work on memory-mapped `[1M, 1024]` arrays. When n < d (SAE
codes: 16k features, a few thousand tokens) the O(n²·d) Gram-matrix forms are cheaper and used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import linalg, sparse
from scipy import stats as sps
from scipy.spatial.distance import pdist, squareform

BLOCK_ROWS = 16384  # [16384, d] float32 blocks: 64 MiB at d = 1024; larger blocks measured no faster


# ---------------------------------------------------------------------------------------------
# streaming second moments


@dataclass
class Moments:
    """Centered cross-product sums (not divided by n), float64."""

    n: int
    mean_x: np.ndarray  # [d_a]
    mean_y: np.ndarray  # [d_b]
    cxx: np.ndarray  # [d_a, d_a]  Xcᵀ Xc
    cyy: np.ndarray  # [d_b, d_b]  Yc ᵀ Yc
    cxy: np.ndarray  # [d_a, d_b]  Xcᵀ Yc


def _dense32(X: Any) -> np.ndarray:
    if sparse.issparse(X):
        X = X.toarray()
    return np.asarray(X, dtype=np.float32)


def cross_moments(X: Any, Y: Any, block_rows: int = BLOCK_ROWS) -> Moments:
    """One pass over row blocks of X `[n, d_a]`, Y `[n, d_b]` (arrays or memmaps).

    Uses the shifted-data algorithm: products are accumulated on (x - s) with s the first
    block's mean, so the final correction n·δδᵀ (δ = mean - s) is tiny and float32 block
    products do not suffer catastrophic cancellation on residual streams with large means.
    numpy's `A.T @ A` dispatches to BLAS syrk (half the flops of a general matmul).
    """
    n = X.shape[0]
    if Y.shape[0] != n:
        raise ValueError(f"X and Y must have the same number of rows, got {n} and {Y.shape[0]}")
    if n < 2:
        raise ValueError(f"need at least 2 rows, got {n}")
    d_a, d_b = X.shape[1], Y.shape[1]
    sxx, syy, sxy = np.zeros((d_a, d_a)), np.zeros((d_b, d_b)), np.zeros((d_a, d_b))
    sx, sy = np.zeros(d_a), np.zeros(d_b)
    shift_x = shift_y = None
    bx = by = ones = None  # block buffers reused across blocks: fresh 256 MiB arrays cost page faults
    for start in range(0, n, block_rows):
        xr, yr = X[start : start + block_rows], Y[start : start + block_rows]
        if sparse.issparse(xr) or sparse.issparse(yr):
            xr, yr = _float(xr), _float(yr)
        if shift_x is None:
            dtype = np.result_type(_float(xr[:1]).dtype, _float(yr[:1]).dtype)
            shift_x, shift_y = _float(xr).mean(0).astype(dtype), _float(yr).mean(0).astype(dtype)
            rows = min(block_rows, n)
            bx, by, ones = np.empty((rows, d_a), dtype), np.empty((rows, d_b), dtype), np.ones(rows, dtype)
        b = xr.shape[0]
        xb, yb = np.subtract(xr, shift_x, out=bx[:b]), np.subtract(yr, shift_y, out=by[:b])
        sx += ones[:b] @ xb  # BLAS gemv; the values are centred, so float32 sums stay accurate
        sy += ones[:b] @ yb
        sxx += xb.T @ xb
        syy += yb.T @ yb
        sxy += xb.T @ yb
    dx, dy = sx / n, sy / n
    return Moments(
        n=n,
        mean_x=shift_x + dx,
        mean_y=shift_y + dy,
        cxx=sxx - n * np.outer(dx, dx),
        cyy=syy - n * np.outer(dy, dy),
        cxy=sxy - n * np.outer(dx, dy),
    )


def _float(X: Any) -> np.ndarray:
    """float64 stays float64 (exact reference computations); everything else becomes float32."""
    if sparse.issparse(X):
        X = X.toarray()
    return np.asarray(X, dtype=np.float64 if np.asarray(X).dtype == np.float64 else np.float32)


def _center(X: Any) -> np.ndarray:
    X = _dense32(X).astype(np.float64)
    return X - X.mean(0)


# ---------------------------------------------------------------------------------------------
# CKA (Kornblith et al. 2019)


def linear_cka_from_moments(m: Moments) -> float:
    """‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on centered data (Kornblith et al. 2019, eq. 5)."""
    den = np.linalg.norm(m.cxx) * np.linalg.norm(m.cyy)
    return float(np.sum(m.cxy**2) / den) if den > 0 else float("nan")


def linear_cka_gram(X: Any, Y: Any) -> float:
    """O(n²) reference: HSIC with centered linear Gram matrices K = XcXcᵀ, L = YcYcᵀ."""
    Xc, Yc = _center(X), _center(Y)
    K, L = Xc @ Xc.T, Yc @ Yc.T
    den = np.linalg.norm(K) * np.linalg.norm(L)
    return float(np.sum(K * L) / den) if den > 0 else float("nan")


def linear_cka(X: Any, Y: Any, block_rows: int = BLOCK_ROWS) -> float:
    """Linear CKA; feature-space O(n·d²) streaming, or the Gram form when n < d."""
    n, d = X.shape[0], max(X.shape[1], Y.shape[1])
    if n < d:
        return linear_cka_gram(X, Y)
    return linear_cka_from_moments(cross_moments(X, Y, block_rows))


def _hsic_unbiased_gram(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5), O(n²)."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    ones_k, ones_l = K.sum(0), L.sum(0)
    t1 = np.sum(K * L)
    t2 = ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2))
    t3 = 2.0 / (n - 2) * ones_k @ ones_l
    return float((t1 + t2 - t3) / (n * (n - 3)))


def _hsic_unbiased_features(Xc: np.ndarray, Yc: np.ndarray, cross: float) -> float:
    """Same estimator for linear kernels on centered data, without forming K or L.

    With centered rows K·1 = 0, so K̃·1 = -a where a_i = ‖x_i‖² (K̃ = K with zero diagonal):
    tr(K̃L̃) = ‖XᵀY‖² - Σ a_i b_i, 1ᵀK̃1 = -Σa, 1ᵀK̃L̃1 = Σ a_i b_i.
    """
    n = Xc.shape[0]
    a, b = np.sum(Xc**2, 1), np.sum(Yc**2, 1)
    ab = a @ b
    t1 = cross - ab
    t2 = a.sum() * b.sum() / ((n - 1) * (n - 2))
    t3 = 2.0 / (n - 2) * ab
    return float((t1 + t2 - t3) / (n * (n - 3)))


def debiased_cka(X: Any, Y: Any) -> float:
    """Linear CKA with unbiased HSIC (Song et al. 2012; Nguyen et al. 2021): ≈ 0 for independent data.

    Plain CKA is biased upward at small n / large d (two random matrices with n ≈ d have CKA
    far from 0); the debiased version removes that, which matters for bootstrap resamples.
    """
    n = X.shape[0]
    if n < 4:
        raise ValueError(f"debiased CKA needs n >= 4 rows, got {n}")
    Xc, Yc = _center(X), _center(Y)
    if n < max(Xc.shape[1], Yc.shape[1]):
        K, L = Xc @ Xc.T, Yc @ Yc.T
        hxy, hxx, hyy = _hsic_unbiased_gram(K, L), _hsic_unbiased_gram(K, K), _hsic_unbiased_gram(L, L)
    else:
        cxx, cyy, cxy = Xc.T @ Xc, Yc.T @ Yc, Xc.T @ Yc
        hxy = _hsic_unbiased_features(Xc, Yc, np.sum(cxy**2))
        hxx = _hsic_unbiased_features(Xc, Xc, np.sum(cxx**2))
        hyy = _hsic_unbiased_features(Yc, Yc, np.sum(cyy**2))
    den = hxx * hyy
    return float(hxy / np.sqrt(den)) if den > 0 else float("nan")


def _subsample(n: int, n_max: int, rng: np.random.Generator | None) -> np.ndarray:
    if n <= n_max:
        return np.arange(n)
    rng = np.random.default_rng(0) if rng is None else rng
    return np.sort(rng.choice(n, n_max, replace=False))


def _rbf_gram(X: np.ndarray, sigma_frac: float) -> np.ndarray:
    d2 = pdist(X, "sqeuclidean")
    med = np.median(np.sqrt(d2)) if d2.size else 0.0
    sigma = sigma_frac * med if med > 0 else 1.0
    return squareform(np.exp(-d2 / (2 * sigma**2)), checks=False) + np.eye(X.shape[0])  # diag: exp(0) = 1


def rbf_cka(X: Any, Y: Any, n_max: int = 1000, sigma_frac: float = 0.8, rng: np.random.Generator | None = None) -> float:
    """CKA with RBF kernels, bandwidth = sigma_frac × median distance (Kornblith et al. 2019), on ≤ n_max rows."""
    rows = _subsample(X.shape[0], n_max, rng)
    K, L = _rbf_gram(_center(X[rows]), sigma_frac), _rbf_gram(_center(Y[rows]), sigma_frac)
    H = lambda M: M - M.mean(0) - M.mean(1)[:, None] + M.mean()  # noqa: E731  (H M H)
    K, L = H(K), H(L)
    den = np.linalg.norm(K) * np.linalg.norm(L)
    return float(np.sum(K * L) / den) if den > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# CCA family (Raghu et al. 2017 SVCCA, Morcos et al. 2018 PWCCA)


@dataclass
class CCAResult:
    rho: np.ndarray  # [k] canonical correlations, descending
    weights: np.ndarray  # [k] PWCCA weights (sum 1) w.r.t. X's neurons (Morcos et al. 2018)
    a: np.ndarray | None = None  # [d_a, k] canonical directions, aᵀ Cxx a = I (moments form only)
    b: np.ndarray | None = None  # [d_b, k]


def _keep_top(var: np.ndarray, keep: float) -> int:
    """Number of leading directions holding `keep` of the variance (numerically null ones dropped)."""
    var = np.clip(var, 0.0, None)
    tol = var.max() * 1e-10 if var.size else 0.0
    var = np.where(var > tol, var, 0.0)
    if var.sum() <= 0:
        return 0
    frac = np.cumsum(var) / var.sum()
    k = int(np.searchsorted(frac, keep - 1e-12) + 1)
    return min(k, int(np.count_nonzero(var)))


def cca_from_moments(m: Moments, keep_x: float = 1.0, keep_y: float = 1.0) -> CCAResult:
    """CCA after the SVD step of SVCCA, from covariances only.

    SVD of the centered data = eigendecomposition of XcᵀXc; keep the top directions holding
    `keep` of the variance and whiten them (W = V Λ^-½). Canonical correlations are the singular
    values of Wxᵀ XcᵀYc Wy (Raghu et al. 2017).
    """
    lx, vx = np.linalg.eigh(m.cxx)  # LAPACK syevd via numpy: ~20x faster than scipy's default here
    ly, vy = np.linalg.eigh(m.cyy)
    lx, vx, ly, vy = lx[::-1], vx[:, ::-1], ly[::-1], vy[:, ::-1]
    kx, ky = _keep_top(lx, keep_x), _keep_top(ly, keep_y)
    wx = vx[:, :kx] / np.sqrt(lx[:kx])  # [d_a, kx], wxᵀ Cxx wx = I
    wy = vy[:, :ky] / np.sqrt(ly[:ky])
    u, rho, vt = linalg.svd(wx.T @ m.cxy @ wy, full_matrices=False)
    # Canonical variates h_i = Xc a_i are orthonormal, so ⟨h_i, x_j⟩ = (Cxx A)_{ji}.
    a, b = wx @ u, wy @ vt.T  # [d_a, k], [d_b, k]
    weights = np.abs(m.cxx @ a).sum(0)
    return CCAResult(np.clip(rho, 0.0, 1.0), weights / weights.sum(), a, b)


def cca_from_data(X: Any, Y: Any, keep_x: float = 1.0, keep_y: float = 1.0) -> CCAResult:
    """Same CCA from the data matrices: thin SVD per side, then QR and the SVD of QxᵀQy."""
    Xc, Yc = _center(X), _center(Y)

    def reduce(Z: np.ndarray, keep: float) -> np.ndarray:
        u, s, _ = linalg.svd(Z, full_matrices=False)
        k = _keep_top(s**2, keep)
        return u[:, :k] * s[:k]

    qx, _ = linalg.qr(reduce(Xc, keep_x), mode="economic")  # orthonormal basis of the kept subspace
    qy, _ = linalg.qr(reduce(Yc, keep_y), mode="economic")
    u, rho, _ = linalg.svd(qx.T @ qy, full_matrices=False)
    h = qx @ u  # [n, k] orthonormal canonical variates of X
    weights = np.abs(h.T @ Xc).sum(1)
    return CCAResult(np.clip(rho, 0.0, 1.0), weights / weights.sum())


def cca(X: Any, Y: Any, keep_x: float = 1.0, keep_y: float = 1.0, method: str = "auto") -> CCAResult:
    """CCA, via covariances when n >= d (streams over memmaps) else via the data (n < d)."""
    if method == "auto":
        method = "moments" if X.shape[0] >= max(X.shape[1], Y.shape[1]) else "data"
    if method == "moments":
        return cca_from_moments(cross_moments(X, Y), keep_x, keep_y)
    return cca_from_data(X, Y, keep_x, keep_y)


def svcca(X: Any, Y: Any, keep: float = 0.99, method: str = "auto") -> float:
    """Mean canonical correlation after keeping `keep` of the variance per side (Raghu et al. 2017)."""
    rho = cca(X, Y, keep, keep, method).rho
    return float(rho.mean()) if rho.size else float("nan")


def pwcca(X: Any, Y: Any, keep: float = 0.99, method: str = "auto") -> float:
    """Projection-weighted CCA (Morcos et al. 2018): canonical correlations weighted by how much of
    X's neurons each canonical direction accounts for, so noise directions count little."""
    r = cca(X, Y, keep, keep, method)
    return float(r.weights @ r.rho) if r.rho.size else float("nan")


# ---------------------------------------------------------------------------------------------
# neighbourhood / geometry metrics


def rsa(X: Any, Y: Any, n_max: int = 500, rng: np.random.Generator | None = None) -> float:
    """Representational similarity analysis (Kriegeskorte et al. 2008): Spearman ρ between the
    upper triangles of the two correlation-distance RDMs on ≤ n_max tokens."""
    rows = _subsample(X.shape[0], n_max, rng)
    ra, rb = pdist(_dense32(X[rows]), "correlation"), pdist(_dense32(Y[rows]), "correlation")
    ok = np.isfinite(ra) & np.isfinite(rb)  # constant rows (dead SAE tokens) have no correlation
    if ok.sum() < 3:
        return float("nan")
    return float(sps.spearmanr(ra[ok], rb[ok]).statistic)


def _knn(X: np.ndarray, k: int) -> np.ndarray:
    """Indices `[n, k]` of each row's k nearest other rows by cosine similarity."""
    Z = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    S = Z @ Z.T
    np.fill_diagonal(S, -np.inf)
    return np.argpartition(-S, k, axis=1)[:, :k]


def mutual_knn(X: Any, Y: Any, k: int = 10, n_max: int = 1000, rng: np.random.Generator | None = None) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024): mean |N_A(i) ∩ N_B(i)| / k."""
    rows = _subsample(X.shape[0], n_max, rng)
    n = len(rows)
    if n <= k:
        return float("nan")
    na, nb = _knn(_dense32(X[rows]), k), _knn(_dense32(Y[rows]), k)
    in_a = np.zeros((n, n), bool)
    in_a[np.arange(n)[:, None], na] = True
    return float(in_a[np.arange(n)[:, None], nb].sum(1).mean() / k)


# ---------------------------------------------------------------------------------------------
# SAE-code metrics


def _topk_active(C: Any, k: int, sentinel: int) -> np.ndarray:
    """Per row, indices of the ≤ k largest *positive* entries; missing slots hold `sentinel`."""
    C = _dense32(C)
    k = min(k, C.shape[1])
    idx = np.argpartition(-C, k - 1, axis=1)[:, :k]
    val = np.take_along_axis(C, idx, 1)
    return np.where(val > 0, idx, sentinel)


def topk_sets(
    codes_a: Any, codes_b: Any, feat_a: np.ndarray, feat_b: np.ndarray, k: int = 8, block_rows: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Per token, A's top-k active features mapped into B's index space (-1 = none / unmatched)
    and B's top-k active features (-2 = none): two int arrays `[n, k]` that resample by row."""
    to_b = np.full(codes_a.shape[1], -1, np.int64)
    to_b[np.asarray(feat_a, np.int64)] = np.asarray(feat_b, np.int64)
    ta, tb = [], []
    for s in range(0, codes_a.shape[0], block_rows):
        a = _topk_active(codes_a[s : s + block_rows], k, -1)
        ta.append(np.where(a >= 0, to_b[np.maximum(a, 0)], -1))
        tb.append(_topk_active(codes_b[s : s + block_rows], k, -2))
    return np.concatenate(ta), np.concatenate(tb)


def jaccard_sets(ta: np.ndarray, tb: np.ndarray) -> float:
    """Mean per-row Jaccard of two index sets `[n, k]` (negative entries = empty slots);
    rows where both sets are empty are skipped."""
    inter = ((ta[:, :, None] == tb[:, None, :]) & (ta[:, :, None] >= 0)).sum((1, 2))
    union = (ta >= 0).sum(1) + (tb >= 0).sum(1) - inter
    ok = union > 0
    return float(np.mean(inter[ok] / union[ok])) if ok.any() else float("nan")


def topk_overlap(codes_a: Any, codes_b: Any, feat_a: np.ndarray, feat_b: np.ndarray, k: int = 8) -> float:
    """Mean per-token Jaccard between B's top-k active features and A's top-k mapped through the matching.

    codes_a `[n, m_a]`, codes_b `[n, m_b]`; (feat_a[i], feat_b[i]) are matched pairs. A features
    without a match drop out of A's set. Tokens where both sets are empty are skipped.
    """
    return jaccard_sets(*topk_sets(codes_a, codes_b, feat_a, feat_b, k))


def match_invariance(stability: np.ndarray) -> float:
    """Invariance of a matching under passage resampling: the mean over matches of the fraction of
    bootstrap resamples in which the match recurs (= expected fraction of matches that recur)."""
    stability = np.asarray(stability, dtype=np.float64)
    return float(np.nanmean(stability)) if np.isfinite(stability).any() else float("nan")


# ---------------------------------------------------------------------------------------------
# resample-friendly forms (used by evaluate with stats.with_ci)


def cka_family(X: Any, Y: Any) -> dict[str, float]:
    """Linear CKA and debiased linear CKA from one moments pass (each resample: O(n·d²))."""
    m = cross_moments(X, Y)
    Xc, Yc = _float(X) - m.mean_x.astype(np.float32), _float(Y) - m.mean_y.astype(np.float32)
    hxy = _hsic_unbiased_features(Xc, Yc, np.sum(m.cxy**2))
    hxx = _hsic_unbiased_features(Xc, Xc, np.sum(m.cxx**2))
    hyy = _hsic_unbiased_features(Yc, Yc, np.sum(m.cyy**2))
    return {
        "linear_cka": linear_cka_from_moments(m),
        "debiased_cka": float(hxy / np.sqrt(hxx * hyy)) if hxx * hyy > 0 else float("nan"),
    }


def columnwise_corr(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Pearson correlation `[k]` of column i of U `[n, k]` with column i of V."""
    U, V = U - U.mean(0), V - V.mean(0)
    den = np.sqrt(np.einsum("ij,ij->j", U, U, dtype=np.float64) * np.einsum("ij,ij->j", V, V, dtype=np.float64))
    num = np.einsum("ij,ij->j", U, V, dtype=np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


@dataclass
class HeldoutCCA:
    """SVCCA / PWCCA cross-validated: canonical directions fitted on train anchors, scored on new ones.

    In-sample canonical correlations are inflated by overfitting (≈ d/n per direction), and a
    bootstrap resample that repeats passages overfits even more, so in-sample SVCCA has
    bootstrap CIs that sit above the estimate. Fitting the SVD+CCA directions once on the train
    split and correlating the projected held-out variates removes the optimism; resampling the
    held-out variates `[n, k]` is then cheap.
    """

    sv: CCAResult
    pw: CCAResult
    mean_x: np.ndarray
    mean_y: np.ndarray

    @classmethod
    def fit(cls, X: Any, Y: Any, keep: float = 0.99) -> "HeldoutCCA":
        return cls.from_moments(cross_moments(X, Y), keep)

    @classmethod
    def from_moments(cls, m: Moments, keep: float = 0.99) -> "HeldoutCCA":
        """The same fit from train moments already computed (the maps of `align.fit_maps` use them too)."""
        return cls(cca_from_moments(m, keep, keep), cca_from_moments(m, 1.0, 1.0), m.mean_x, m.mean_y)

    def variates(self, X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Canonical variates `[n, k_sv + k_pw]` of new rows (SVCCA directions, then PWCCA's)."""
        Xc = _float(X) - self.mean_x.astype(np.float32)
        Yc = _float(Y) - self.mean_y.astype(np.float32)
        A = np.concatenate([self.sv.a, self.pw.a], 1).astype(np.float32)
        B = np.concatenate([self.sv.b, self.pw.b], 1).astype(np.float32)
        return Xc @ A, Yc @ B

    def score(self, U: np.ndarray, V: np.ndarray) -> dict[str, float]:
        rho = columnwise_corr(U, V)
        k = self.sv.rho.size
        return {
            "svcca": float(rho[:k].mean()) if k else float("nan"),
            "pwcca": float(self.pw.weights @ rho[k:]) if self.pw.rho.size else float("nan"),
        }


class Pairwise:
    """An n×n token-by-token matrix (Gram, kernel, RDM, cosine) that resamples by rows.

    Computing it once on a subsample and indexing `P[rows]` for every bootstrap / null resample
    turns an O(n²·d) metric into O(n²) per resample. `ids` remembers the original token of each
    row, so duplicated tokens of a bootstrap resample are not each other's neighbours.
    """

    def __init__(self, M: np.ndarray, ids: np.ndarray | None = None, levels: int | None = None):
        self.M = M
        self.ids = np.arange(M.shape[0]) if ids is None else ids
        self.levels = levels
        """Set when M holds dense ranks 0..levels-1 of a matrix's entries instead of the entries (`rdm_ranks`)."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.M.shape

    def __len__(self) -> int:
        return self.M.shape[0]

    def __getitem__(self, rows: np.ndarray) -> "Pairwise":
        # two axis-wise takes: ~2-3x faster than M[np.ix_(rows, rows)] (one 2-D fancy index), same entries
        return Pairwise(self.M.take(rows, 0).take(rows, 1), self.ids[rows], self.levels)


def linear_gram(X: Any) -> Pairwise:
    """Gram matrix `[n, n]` of centered rows; works for dense or scipy-sparse X (SAE codes)."""
    if sparse.issparse(X):
        X = sparse.csr_matrix(X, dtype=np.float64)
        K = np.asarray((X @ X.T).todense())
        return Pairwise(_double_center(K))
    Xc = _center(X)
    return Pairwise(Xc @ Xc.T)


def rbf_gram(X: Any, sigma_frac: float = 0.8) -> Pairwise:
    return Pairwise(_rbf_gram(_center(X), sigma_frac))


def correlation_rdm(X: Any) -> Pairwise:
    """1 - Pearson correlation between token vectors (Kriegeskorte et al. 2008)."""
    return Pairwise(squareform(np.nan_to_num(pdist(_dense32(X), "correlation"), nan=1.0), checks=False))


def rdm_ranks(D: Pairwise) -> Pairwise:
    """D with every entry replaced by its dense rank among D's entries (equal entries, equal ranks).

    RSA's Spearman correlation depends only on the order of the distances, and the order of any
    subset of entries is the order of their ranks, so `rsa_pairwise` gives the same number on every
    resample; ranking a resample's entries becomes a counting pass over `levels` bins instead of
    the two sorts per resample that were most of RSA's cost."""
    uniq, codes = np.unique(D.M, return_inverse=True)
    return Pairwise(codes.reshape(D.M.shape).astype(np.intp), D.ids, levels=len(uniq))


def _average_ranks(codes: np.ndarray, levels: int) -> np.ndarray:
    """`scipy.stats.rankdata(codes)` (1-based, ties get their average rank) `[N]` float64 for dense rank
    codes `[N]` in 0..levels-1, by counting: a tie group ending at sorted position e holding c
    entries gets e - (c - 1)/2, the same half-integers."""
    count = np.bincount(codes, minlength=levels)
    return (np.cumsum(count) - (count - 1) / 2.0)[codes]


def cosine_sim(X: Any) -> Pairwise:
    Z = _dense32(X.toarray() if sparse.issparse(X) else X).astype(np.float64)
    Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    return Pairwise(Z @ Z.T)


def _double_center(K: np.ndarray) -> np.ndarray:
    return K - K.mean(0) - K.mean(1)[:, None] + K.mean()


def _centered_inner(K: np.ndarray, L: np.ndarray, kr: np.ndarray, lr: np.ndarray) -> float:
    """⟨HKH, HLH⟩_F for symmetric K, L `[n, n]` with row sums kr, lr, without forming HKH:
    tr(KL) − (2/n)·1ᵀKL1 + (1ᵀK1)(1ᵀL1)/n² (H idempotent, K and L symmetric)."""
    n = K.shape[0]
    return float(np.vdot(K, L) - 2.0 / n * (kr @ lr) + kr.sum() * lr.sum() / n**2)


def cka_pairwise(K: Pairwise, L: Pairwise) -> float:
    """CKA = ⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖) for any kernel (linear or RBF) Gram matrices.

    Computed from three Frobenius inner products and the row sums (`_centered_inner`): every
    passage resample calls this, and the double-centred copies cost 3x the time (same value to
    float64 rounding as centring first, `test_pairwise_kernels_equal_the_direct_formulas`)."""
    Km, Lm = np.asarray(K.M, np.float64), np.asarray(L.M, np.float64)
    kr, lr = Km.sum(1), Lm.sum(1)
    kk, ll = _centered_inner(Km, Km, kr, kr), _centered_inner(Lm, Lm, lr, lr)
    # a constant kernel centres to exactly 0; the expanded form leaves rounding dust of ~1e-16·‖K‖²
    tol = 1e-12
    if kk <= tol * max(float(np.vdot(Km, Km)), 1e-300) or ll <= tol * max(float(np.vdot(Lm, Lm)), 1e-300):
        return float("nan")
    return _centered_inner(Km, Lm, kr, lr) / float(np.sqrt(kk) * np.sqrt(ll))


def _hsic_unbiased_three(K: np.ndarray, L: np.ndarray) -> tuple[float, float, float]:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of (K, L), (K, K), (L, L) without zero-diagonal copies:
    with K̃ = K − diag(K), tr(K̃L̃) = ⟨K, L⟩ − Σ K_ii L_ii and K̃1 = K1 − diag(K)."""
    n = K.shape[0]
    dk, dl = np.diagonal(K), np.diagonal(L)
    ok, ol = K.sum(0) - dk, L.sum(0) - dl
    sk, sl = ok.sum(), ol.sum()

    def h(t1: float, sa: float, sb: float, ab: float) -> float:
        return float((t1 + sa * sb / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ab) / (n * (n - 3)))

    return (h(np.vdot(K, L) - dk @ dl, sk, sl, ok @ ol), h(np.vdot(K, K) - dk @ dk, sk, sk, ok @ ok),
            h(np.vdot(L, L) - dl @ dl, sl, sl, ol @ ol))  # fmt: skip


def debiased_cka_pairwise(K: Pairwise, L: Pairwise) -> float:
    """Debiased CKA from linear Gram matrices (unbiased HSIC, Song et al. 2012)."""
    if len(K) < 4:
        return float("nan")
    hxy, hxx, hyy = _hsic_unbiased_three(np.asarray(K.M, np.float64), np.asarray(L.M, np.float64))
    return float(hxy / np.sqrt(hxx * hyy)) if hxx * hyy > 0 else float("nan")


def gram_cka_family(K: Pairwise, L: Pairwise) -> dict[str, float]:
    """Linear and debiased CKA of one resample of Gram matrices (the Gram-form twin of `cka_family`):
    with `stats.with_ci` both metrics share each resample's two `[n, n]` gathers, most of their cost."""
    return {"linear_cka": cka_pairwise(K, L), "debiased_cka": debiased_cka_pairwise(K, L)}


def rsa_pairwise(Da: Pairwise, Db: Pairwise) -> float:
    """Spearman between the upper triangles of two RDMs, skipping pairs of duplicated tokens.

    RDMs of `rdm_ranks` are ranked by counting; the correlation of the ranks is then computed as
    `scipy.stats.spearmanr` does (constant input: NaN), so both forms give the same number."""
    iu = np.triu_indices(len(Da), 1)
    ok = (Da.ids[iu[0]] != Da.ids[iu[1]]) & (Db.ids[iu[0]] != Db.ids[iu[1]])
    if ok.sum() < 3:
        return float("nan")
    a, b = Da.M[iu][ok], Db.M[iu][ok]
    if Da.levels is None or Db.levels is None:
        return float(sps.spearmanr(a, b).statistic)
    if (a == a[0]).all() or (b == b[0]).all():
        return float("nan")
    ranks = np.column_stack((_average_ranks(a, Da.levels), _average_ranks(b, Db.levels)))
    return float(np.corrcoef(ranks, rowvar=False)[1, 0])


def mutual_knn_pairwise(Sa: Pairwise, Sb: Pairwise, k: int = 10) -> float:
    """Mutual kNN (Huh et al. 2024) from cosine-similarity matrices; copies of a token are excluded."""
    n = len(Sa)
    if n <= k + 1:
        return float("nan")

    def knn(S: Pairwise) -> np.ndarray:
        M = np.where(S.ids[:, None] == S.ids[None, :], -np.inf, S.M)
        return np.argpartition(-M, k, axis=1)[:, :k]

    na, nb = knn(Sa), knn(Sb)
    in_a = np.zeros((n, n), bool)
    in_a[np.arange(n)[:, None], na] = True
    return float(in_a[np.arange(n)[:, None], nb].sum(1).mean() / k)
