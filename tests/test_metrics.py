"""Known-answer tests for similarity metrics and statistics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from scipy.stats import ortho_group

from crossdict import metrics as M
from crossdict.matching import code_correlation, pair_correlation
from crossdict.stats import (
    InsufficientDataError,
    bh_qvalues,
    bootstrap_weights,
    passage_index,
    passage_subsample,
    shuffled_pairing,
    with_ci,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def related(rng: np.random.Generator, n: int = 400, d_a: int = 12, d_b: int = 9, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    z = rng.standard_normal((n, 5))
    X = z @ rng.standard_normal((5, d_a)) + noise * rng.standard_normal((n, d_a)) + 3.0
    Y = z @ rng.standard_normal((5, d_b)) + noise * rng.standard_normal((n, d_b)) - 1.0
    return X, Y


# ------------------------------------------------------------------------------------------ CKA


def test_cka_self_is_one(rng):
    X, _ = related(rng)
    assert M.linear_cka(X, X) == pytest.approx(1.0, abs=1e-5)
    assert M.linear_cka_gram(X, X) == pytest.approx(1.0, abs=1e-10)
    assert M.debiased_cka(X, X) == pytest.approx(1.0, abs=1e-8)


def test_streaming_linear_cka_equals_gram_formula(rng):
    X, Y = related(rng, n=301)
    streamed = M.linear_cka_from_moments(M.cross_moments(X, Y, block_rows=17))  # many uneven blocks
    assert streamed == pytest.approx(M.linear_cka_gram(X, Y), rel=1e-5)


def test_streaming_moments_survive_large_means(rng):
    """Residual streams have huge-mean dimensions; the shifted accumulation must not cancel."""
    X, Y = related(rng, n=500)
    X[:, 0] += 1e4
    streamed = M.linear_cka_from_moments(M.cross_moments(X.astype(np.float32), Y, block_rows=64))
    assert streamed == pytest.approx(M.linear_cka_gram(X, Y), rel=1e-4)


def test_streaming_cka_on_memmap(tmp_path, rng):
    X, Y = related(rng, n=1000)
    mx = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=X.shape)
    my = np.lib.format.open_memmap(tmp_path / "y.npy", mode="w+", dtype=np.float32, shape=Y.shape)
    mx[:], my[:] = X, Y
    mx.flush(), my.flush()
    got = M.linear_cka(np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r"), block_rows=128)
    assert got == pytest.approx(M.linear_cka_gram(X, Y), rel=1e-5)


def test_cka_invariant_to_orthogonal_and_isotropic_scale(rng):
    X, Y = related(rng)
    Q = ortho_group.rvs(X.shape[1], random_state=3)
    base = M.linear_cka(X, Y)
    assert M.linear_cka(7.5 * X @ Q + 2.0, Y) == pytest.approx(base, rel=1e-5)
    assert M.linear_cka_gram(X @ Q * 0.1, Y) == pytest.approx(base, rel=1e-5)
    assert M.debiased_cka(X @ Q * 3, Y) == pytest.approx(M.debiased_cka(X, Y), rel=1e-8)
    # ... but not to an arbitrary invertible map (CKA is not CCA)
    A = rng.standard_normal((X.shape[1], X.shape[1])) * np.linspace(0.1, 5, X.shape[1])
    assert abs(M.linear_cka(X @ A, Y) - base) > 1e-3


def test_debiased_cka_near_zero_for_independent_data(rng):
    X, Y = rng.standard_normal((500, 50)), rng.standard_normal((500, 60))
    assert abs(M.debiased_cka(X, Y)) < 0.02
    assert M.linear_cka(X, Y) > 0.05  # the biased estimator is visibly off at n/d = 10


def test_debiased_cka_feature_form_equals_gram_form(rng):
    X, Y = related(rng, n=60, d_a=8, d_b=70)  # n < d_b -> Gram form; force the feature form below
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    gram = M.debiased_cka(X, Y)
    f = lambda A, B: M._hsic_unbiased_features(A, B, np.sum((A.T @ B) ** 2))  # noqa: E731
    feat = f(Xc, Yc) / np.sqrt(f(Xc, Xc) * f(Yc, Yc))
    assert feat == pytest.approx(gram, rel=1e-8)
    P = M.debiased_cka_pairwise(M.linear_gram(X), M.linear_gram(Y))
    assert P == pytest.approx(gram, rel=1e-8)


def test_pairwise_forms_match_direct(rng):
    X, Y = related(rng, n=200)
    assert M.cka_pairwise(M.linear_gram(X), M.linear_gram(Y)) == pytest.approx(M.linear_cka_gram(X, Y), rel=1e-8)
    assert M.cka_pairwise(M.rbf_gram(X), M.rbf_gram(Y)) == pytest.approx(M.rbf_cka(X, Y), rel=1e-8)
    assert M.rsa_pairwise(M.correlation_rdm(X), M.correlation_rdm(Y)) == pytest.approx(M.rsa(X, Y), abs=1e-6)
    assert M.mutual_knn_pairwise(M.cosine_sim(X), M.cosine_sim(Y), 10) == pytest.approx(M.mutual_knn(X, Y, 10), abs=1e-12)
    Xs = sparse.csr_matrix(np.maximum(X - 3, 0))
    assert M.cka_pairwise(M.linear_gram(Xs), M.linear_gram(Y)) == pytest.approx(M.linear_cka_gram(Xs.toarray(), Y), rel=1e-8)


def test_rbf_rsa_knn_sanity(rng):
    X, Y = related(rng, n=300)
    Z = rng.standard_normal((300, 9))
    assert M.rbf_cka(X, X) == pytest.approx(1.0)
    assert M.rsa(X, X) == pytest.approx(1.0)
    assert M.mutual_knn(X, X) == pytest.approx(1.0)
    assert M.rbf_cka(X, Y) > M.rbf_cka(X, Z) + 0.2
    assert M.rsa(X, Y) > 0.3 > abs(M.rsa(X, Z))
    assert M.mutual_knn(X, Y) > M.mutual_knn(X, Z) + 0.1


# ------------------------------------------------------------------------------------------ CCA


def _cca_reference(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Textbook CCA: QR of each centered block, singular values of QxᵀQy."""
    qx, _ = np.linalg.qr(X - X.mean(0))
    qy, _ = np.linalg.qr(Y - Y.mean(0))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def test_cca_matches_textbook_and_both_paths_agree(rng):
    X, Y = related(rng)
    ref = _cca_reference(X, Y)
    for method in ("moments", "data"):
        rho = M.cca(X, Y, 1.0, 1.0, method).rho
        np.testing.assert_allclose(rho, ref, atol=1e-6)
    for fn in (M.svcca, M.pwcca):
        assert fn(X, Y, 0.99, "moments") == pytest.approx(fn(X, Y, 0.99, "data"), abs=1e-6)


def test_cca_invariant_to_invertible_linear_maps(rng):
    X, Y = related(rng)
    A = rng.standard_normal((X.shape[1], X.shape[1])) + 3 * np.eye(X.shape[1])
    B = rng.standard_normal((Y.shape[1], Y.shape[1])) + 3 * np.eye(Y.shape[1])
    base = M.cca(X, Y).rho
    np.testing.assert_allclose(M.cca(X @ A + 5, Y @ B - 2).rho, base, atol=1e-6)
    assert M.svcca(X @ A, Y @ B, keep=1.0) == pytest.approx(M.svcca(X, Y, keep=1.0), abs=1e-6)


def test_cca_recovers_planted_canonical_correlations(rng):
    """X has 2 signal dims with population correlations 0.9 and 0.5 to Y; the rest is noise."""
    n = 20000
    s = rng.standard_normal((n, 2))
    rho = np.array([0.9, 0.5])
    X = np.concatenate([s, rng.standard_normal((n, 3))], 1) @ rng.standard_normal((5, 5))
    ys = rho * s + np.sqrt(1 - rho**2) * rng.standard_normal((n, 2))
    Y = np.concatenate([ys, rng.standard_normal((n, 2))], 1) @ rng.standard_normal((4, 4))
    got = M.cca(X, Y).rho
    np.testing.assert_allclose(got[:2], rho, atol=0.02)
    assert got[2:].max() < 0.05
    assert M.svcca(X, X @ rng.standard_normal((5, 5)), keep=1.0) == pytest.approx(1.0, abs=1e-6)


def test_pwcca_downweights_noise_directions(rng):
    """PWCCA weights by how much of X's variance a canonical direction explains (Morcos et al. 2018)."""
    n = 5000
    s = rng.standard_normal(n)
    X = np.stack([10 * s, 0.1 * rng.standard_normal(n)], 1)  # big shared dim + tiny private dim
    Y = np.stack([s + 0.1 * rng.standard_normal(n), rng.standard_normal(n)], 1)
    assert M.pwcca(X, Y, keep=1.0) > M.svcca(X, Y, keep=1.0) + 0.3


# ------------------------------------------------------------------------------------------ stats


def test_bh_qvalues_hand_checked():
    # sorted p: .005 .01 .03 .04 -> p*m/rank = .02 .02 .04 .04 -> running min from the top
    q = bh_qvalues(np.array([0.01, 0.04, 0.03, 0.005]))
    np.testing.assert_allclose(q, [0.02, 0.04, 0.04, 0.02])
    q = bh_qvalues(np.array([0.01, np.nan, 0.02, 0.9]))
    np.testing.assert_allclose(q, [0.03, np.nan, 0.03, 0.9])


def test_shuffled_pairing_permutes_passages_rank_matched(rng):
    pid = np.repeat([10, 11, 12, 13, 14], [3, 5, 2, 4, 4])
    idx = passage_index(pid)
    for derange in (False, True):
        for _ in range(20):
            ra, rb = shuffled_pairing(idx, rng, derange=derange)
            if derange:
                assert np.all(pid[ra] != pid[rb])
            # rank-matched within passages and truncated to the shorter one
            np.testing.assert_array_equal(idx.rank[ra], idx.rank[rb])
            partners = []
            for g in np.unique(pid):
                partner = np.unique(pid[rb[pid[ra] == g]])
                assert len(partner) == 1
                assert (pid[ra] == g).sum() == min((pid == g).sum(), (pid == partner[0]).sum())
                partners.append(partner[0])
            assert sorted(partners) == [10, 11, 12, 13, 14]  # a permutation: each B passage used once


def test_passage_null_is_exact_for_independent_sparse_codes(rng):
    """Permutation p-values of independent sparse features are uniform, also in the tail.

    (Derangement-only nulls fail this: p <= 0.01 came out 2-3x too often.)
    """
    from crossdict.matching import pair_null

    n, m, k = 3200, 1500, 16
    def codes(r):
        C = sparse.csr_matrix((r.exponential(1, n * k).astype(np.float32), r.integers(0, m, n * k), np.arange(0, n * k + 1, k)), shape=(n, m))
        C.sum_duplicates()
        return C
    A, B = codes(np.random.default_rng(1)), codes(np.random.default_rng(2))
    _, n_ge, _ = pair_null(A, B, np.arange(m), rng.permutation(m), np.arange(n) // 64, 300, rng)
    p = (1 + n_ge) / 301
    assert (p <= 0.05).mean() < 0.065 and (p <= 0.01).mean() < 0.018


def test_passage_subsample_keeps_whole_passages(rng):
    pid = np.repeat(np.arange(50), 20)
    sub = passage_subsample(pid, 200, rng)
    assert len(sub) == 200
    kept = np.unique(pid[sub])
    assert all((pid[sub] == g).sum() == 20 for g in kept)


def test_with_ci_detects_shared_structure_and_its_absence(rng):
    pid = np.repeat(np.arange(30), 20)
    X, Y = related(rng, n=600)
    res = with_ci(M.linear_cka, X, Y, pid, n_boot=50, n_null=50, rng=rng)
    assert res.ci_low <= res.value <= res.ci_high
    assert res.p_value == pytest.approx(1 / 51)
    assert res.null_mean < res.value
    Z = rng.standard_normal((600, 9))
    res0 = with_ci(M.debiased_cka, X, Z, pid, n_boot=0, n_null=50, rng=rng)
    assert res0.p_value > 0.05


def test_with_ci_too_few_passages_says_how_many():
    X = np.zeros((10, 2))
    with pytest.raises(InsufficientDataError, match="needs at least 10 distinct passages"):
        with_ci(M.linear_cka, X, X, np.zeros(10), n_boot=5, n_null=5, min_passages=10)


@pytest.mark.parametrize("ci", ["half_sample", "bootstrap"])
def test_passage_resampling_ci_coverage(ci):
    """95% passage-resampling CIs of a correlation cover the population value in >= 90% of 100 sims.

    Tokens share a passage-level component, so resampling tokens would under-cover here.
    """
    rho, n_pass, per = 0.5, 60, 8
    corr = lambda a, b: float(np.corrcoef(a[:, 0], b[:, 0])[0, 1])  # noqa: E731
    covered = 0
    for sim in range(100):
        r = np.random.default_rng(1000 + sim)
        pid = np.repeat(np.arange(n_pass), per)
        # passage effect and token noise have the same correlation, so corr(x, y) = rho exactly
        u = r.multivariate_normal([0, 0], [[1, rho], [rho, 1]], n_pass)[pid]
        e = r.multivariate_normal([0, 0], [[1, rho], [rho, 1]], len(pid))
        x, y = (u + e)[:, :1], (u + e)[:, 1:]
        res = with_ci(corr, x, y, pid, n_boot=200, n_null=0, rng=r, ci=ci)
        covered += res.ci_low <= rho <= res.ci_high
    assert covered >= 90


# ------------------------------------------------------------------------------------------ codes


def test_streaming_code_correlation_equals_corrcoef(rng):
    n, m_a, m_b = 500, 30, 20
    for density in (0.02, 0.3):  # sparse-product path and dense path
        Ad = sparse.random(n, m_a, density, random_state=1, dtype=np.float32).toarray()
        Bd = sparse.random(n, m_b, density, random_state=2, dtype=np.float32).toarray()
        Bd[:, :5] = Ad[:, :5] * 2 + sparse.random(n, 5, density, random_state=3).toarray()
        Ad[:, 7] = 0  # a dead feature gets correlation 0, not NaN
        A, B = sparse.csr_matrix(Ad), sparse.csr_matrix(Bd)
        got = code_correlation(A, B, block_rows=64)
        with np.errstate(invalid="ignore", divide="ignore"):
            ref = np.nan_to_num(np.corrcoef(Ad.T, Bd.T)[:m_a, m_a:])
        np.testing.assert_allclose(got, ref, atol=2e-5)
    # bootstrap multiplicities == correlation over physically repeated rows
    w = bootstrap_weights(passage_index(np.repeat(np.arange(50), 10)), rng)
    rows = np.repeat(np.arange(n), w.astype(int))
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nan_to_num(np.corrcoef(Ad[rows].T, Bd[rows].T)[:m_a, m_a:])
    np.testing.assert_allclose(code_correlation(A, B, w, block_rows=100), ref, atol=2e-5)
    ref5 = np.corrcoef(Ad[:, :5].T, Bd[:, :5].T)[:5, 5:]
    np.testing.assert_allclose(pair_correlation(A[:, :5].tocsr(), B[:, :5].tocsr()), np.diag(ref5), atol=2e-5)


def test_topk_overlap_known_answers():
    codes = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    ident = np.arange(4)
    assert M.topk_overlap(codes, codes, ident, ident, k=2) == pytest.approx(1.0)  # empty row skipped
    # A's features {0,1} map to B's {1,0}; B = A with columns 0,1 swapped -> identical sets
    B = codes[:, [1, 0, 2, 3]]
    assert M.topk_overlap(codes, B, np.array([0, 1, 2, 3]), np.array([1, 0, 2, 3]), k=2) == pytest.approx(1.0)
    # no matching at all -> 0
    assert M.topk_overlap(codes, codes, np.array([], int), np.array([], int), k=2) == 0.0
    # row 0: A top2 {0,1} -> mapped {0}; B top2 {0,1}: J = 1/2. Row 1: {3}->{} vs {3}: 0
    assert M.topk_overlap(codes, codes, np.array([0]), np.array([0]), k=2) == pytest.approx(0.25)


def test_heldout_cca_removes_overfitting(rng):
    """In-sample SVCCA of independent data is far from 0 at n/d = 5; cross-validated SVCCA is ≈ 0,
    and on planted structure it recovers the population canonical correlation."""
    n, d = 400, 40
    X, Y = rng.standard_normal((2 * n, d)), rng.standard_normal((2 * n, d))
    assert M.svcca(X[:n], Y[:n], keep=1.0) > 0.2
    h = M.HeldoutCCA.fit(X[:n], Y[:n], keep=1.0)
    assert abs(h.score(*h.variates(X[n:], Y[n:]))["svcca"]) < 0.05
    s = rng.standard_normal((4 * n, 1))
    X2 = np.concatenate([s, rng.standard_normal((4 * n, 3))], 1)
    Y2 = np.concatenate([0.8 * s + 0.6 * rng.standard_normal((4 * n, 1)), rng.standard_normal((4 * n, 3))], 1)
    h = M.HeldoutCCA.fit(X2[: 2 * n], Y2[: 2 * n], keep=1.0)
    U, V = h.variates(X2[2 * n :], Y2[2 * n :])
    assert M.columnwise_corr(U, V)[0] == pytest.approx(0.8, abs=0.05)


def test_pairwise_kernels_equal_the_direct_formulas(rng):
    """The expanded-trace forms of cka_pairwise / debiased_cka_pairwise (no centred copies) give the
    numbers of the direct formulas (double-centre, zero the diagonal) on resampled sub-matrices."""

    def cka_direct(K, L):
        Kc, Lc = M._double_center(K), M._double_center(L)
        den = np.linalg.norm(Kc) * np.linalg.norm(Lc)
        return float(np.sum(Kc * Lc) / den) if den > 0 else float("nan")

    def dcka_direct(K, L):
        h = M._hsic_unbiased_gram
        return h(K, L) / np.sqrt(h(K, K) * h(L, L))

    X, Y = related(rng, n=300)
    Xs = sparse.csr_matrix(np.maximum(X - 2, 0))
    for Ka, Kb in ((M.linear_gram(X), M.linear_gram(Y)), (M.rbf_gram(X), M.rbf_gram(Y)), (M.linear_gram(Xs), M.linear_gram(Y))):
        for rows in (np.arange(300), np.sort(rng.choice(300, 140, replace=False)), rng.integers(0, 300, 300)):
            P, Q = Ka[rows], Kb[rows]
            assert M.cka_pairwise(P, Q) == pytest.approx(cka_direct(P.M, Q.M), rel=1e-10, abs=1e-12)
            if Ka.M is not None and (P.M == P.M.T).all():
                assert M.debiased_cka_pairwise(P, Q) == pytest.approx(dcka_direct(P.M, Q.M), rel=1e-9, abs=1e-12)
    const = M.Pairwise(np.full((50, 50), 3.0))
    assert np.isnan(M.cka_pairwise(const, M.linear_gram(X[:50]))) and np.isnan(cka_direct(const.M, M.linear_gram(X[:50]).M))


def _old_mean_sd(C: sparse.csr_matrix, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The previous `matching._mean_sd`: transposed sparse products."""
    nw = w.sum()
    mean = np.asarray(C.T @ w).ravel() / nw
    sq = np.asarray(C.multiply(C).T @ w).ravel() / nw
    return mean, np.sqrt(np.maximum(sq - mean**2, 0.0))


def _sparse_codes(rng: np.random.Generator, n: int, m: int, per_row: int) -> sparse.csr_matrix:
    C = sparse.csr_matrix((rng.exponential(1, n * per_row).astype(np.float32), rng.integers(0, m, n * per_row),
                           np.arange(0, n * per_row + 1, per_row)), shape=(n, m))  # fmt: skip
    C.sum_duplicates()
    return C


def test_column_moments_equal_the_sparse_products_exactly(rng):
    """`_mean_sd` by bincount over stored entries gives the numbers of C.T @ w bit for bit
    (weighted and unweighted), so match correlations and their ties are unchanged."""
    from crossdict.matching import _mean_sd

    C = _sparse_codes(rng, 700, 90, 6)
    w = bootstrap_weights(passage_index(np.repeat(np.arange(70), 10)), rng)
    for got, ref in ((_mean_sd(C), _old_mean_sd(C, np.ones(700))), (_mean_sd(C, w), _old_mean_sd(C, w))):
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_code_correlation_paths_agree(rng):
    """The dense-A path (B's nonzeros walked against a dense block of A) and the sparse path give the
    float64 correlations within float32 rounding, with a one-hot B over a wide vocabulary (the
    token floor), bootstrap weights and several row blocks."""
    n = 900
    A = _sparse_codes(rng, n, 40, 8)  # ~18% nonzero: the dense-A path
    tok = rng.integers(0, 300, n)
    B = sparse.csr_matrix((np.ones(n, np.float32), (np.arange(n), tok)), shape=(n, 300))
    w = bootstrap_weights(passage_index(np.repeat(np.arange(90), 10)), rng)
    rows = np.repeat(np.arange(n), w.astype(int))
    Ad, Bd = A.toarray().astype(np.float64)[rows], B.toarray().astype(np.float64)[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nan_to_num(np.corrcoef(Ad.T, Bd.T)[:40, 40:])
    assert A.nnz / (n * 40) > 0.05
    np.testing.assert_allclose(code_correlation(A, B, w, block_rows=128), ref, atol=1e-6)
    A_sparse = _sparse_codes(rng, n, 400, 4)  # 1% nonzero: the sparse × sparse path
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nan_to_num(np.corrcoef(A_sparse.toarray().T.astype(np.float64), B.toarray().T)[:400, 400:])
    np.testing.assert_allclose(code_correlation(A_sparse, B, block_rows=128), ref, atol=1e-6)


def test_pair_null_equals_correlations_of_re_paired_rows(rng):
    """`pair_null`'s draws (moments as totals less the rows a pairing leaves out; B moved to A's rows)
    count what correlating the re-paired rows directly counts, for the shuffled and the
    token-stratified null, including exact ties (a B that is a function of the token)."""
    from crossdict.matching import pair_null, token_stratified_pairing

    pid = np.repeat(np.arange(30), rng.integers(10, 40, 30))
    n, K = len(pid), 60
    A = _sparse_codes(rng, n, K, 5)
    strata = rng.integers(0, 25, n)
    B_tok = sparse.csr_matrix((np.ones(n, np.float32), (np.arange(n), strata % K)), shape=(n, K))  # B = token
    for B in (_sparse_codes(rng, n, K, 3) + A.multiply(0.5), B_tok):
        ia, ib = np.arange(K), rng.permutation(K)
        obs, n_ge, null, n_tok = pair_null(A, B, ia, ib, pid, 60, np.random.default_rng(4), keep_null=True, strata=strata)
        r = np.random.default_rng(4)
        xa, xb = A[:, ia].tocsr(), B[:, ib].tocsr()
        idx = passage_index(pid)
        ref = np.array([pair_correlation(xa[ra], xb[rb]) for ra, rb in (shuffled_pairing(idx, r) for _ in range(60))])
        np.testing.assert_allclose(null, ref, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(n_ge, (ref >= obs).sum(0))
        ref_tok = sum(pair_correlation(xa, xb[token_stratified_pairing(strata, r)]) >= obs - 1e-12 for _ in range(60))
        np.testing.assert_array_equal(n_tok, ref_tok)
    assert (n_tok == 60).all()  # B = token: every within-token draw ties the observed correlation
    from crossdict.matching import _cross_sums

    Bp = B[rng.permutation(n)]  # A's codes looked up at B's nonzeros: the elementwise product's sums, bit for bit
    np.testing.assert_array_equal(_cross_sums(A, A.toarray().ravel(), Bp), np.asarray(A.multiply(Bp).sum(0)).ravel())


def test_rsa_on_rank_rdms_equals_spearman_on_every_resample(rng):
    """`rsa_pairwise` on `rdm_ranks` RDMs (ranking by counting) equals Spearman on the distances, bit
    for bit, on half-samples, bootstrap rows (duplicated tokens) and shuffled pairings, with ties."""
    X, Y = related(rng, n=120)
    Da, Db = M.correlation_rdm(X), M.correlation_rdm(np.round(Y, 1))  # rounding: tied distances
    Db.M = np.round(Db.M, 2)
    Ra, Rb = M.rdm_ranks(Da), M.rdm_ranks(Db)
    idx = passage_index(np.repeat(np.arange(12), 10))
    from crossdict.stats import bootstrap_rows, half_sample_rows

    for _ in range(5):
        for ra, rb in ((r := half_sample_rows(idx, rng), r), (r := bootstrap_rows(idx, rng), r), shuffled_pairing(idx, rng)):
            assert M.rsa_pairwise(Ra[ra], Rb[rb]) == M.rsa_pairwise(Da[ra], Db[rb])
    const = M.Pairwise(np.ones((20, 20)))
    assert np.isnan(M.rsa_pairwise(M.rdm_ranks(const), Rb[np.arange(20)]))


def test_shared_resamples_give_each_gram_metric_its_own_numbers(rng):
    """`gram_cka_family` under `with_ci` (one gather of both Gram matrices per resample, shared by linear
    and debiased CKA) gives each metric what its own `with_ci` gives on the same draws."""
    X, Y = related(rng, n=300)
    K, L = M.linear_gram(X), M.linear_gram(Y)
    pid = np.repeat(np.arange(30), 10)
    both = with_ci(M.gram_cka_family, K, L, pid, 20, 20, np.random.default_rng(1))
    for name, fn in (("linear_cka", M.cka_pairwise), ("debiased_cka", M.debiased_cka_pairwise)):
        alone = with_ci(fn, K, L, pid, 20, 20, np.random.default_rng(1))
        assert both[name] == alone, name
