"""Floors that share the input (token / context identity), support rules and universality (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from align_fixtures import shared_private_codes
from crossdict.baselines import (
    TokenCodes, anchor_tokens, annotate, joint_resamples, paired_test, token_embedding, universality,
)
from crossdict.matching import match_features, read_matches, support, token_stratified_pairing, MATCH_COLUMNS


def _token_world(rng, n_passages=160, tokens=40, vocab=30, m_a=40):
    """A's SAE features are token detectors (feature j fires, with noisy magnitude, when B read
    token j % vocab, plus some noise firings): everything A and B share is the token."""
    n = n_passages * tokens
    pid = np.repeat(np.arange(n_passages), tokens)
    # Zipf-like token frequencies that vary by passage (topic), so passages differ
    base = 1.0 / np.arange(1, vocab + 1)
    tok = np.concatenate([rng.choice(vocab, tokens, p=(w := base * rng.gamma(2.0, 0.5, vocab)) / w.sum()) for _ in range(n_passages)])
    A = np.zeros((n, m_a))
    for j in range(m_a):
        on = (tok == j % vocab) & (rng.random(n) < 0.8)
        on |= rng.random(n) < 0.01
        A[on, j] = rng.exponential(1.0, on.sum()) + 0.5
    return sparse.csr_matrix(A.astype(np.float32)), tok, pid


def test_token_identity_b_is_not_a_significant_match():
    """B's codes = one-hot of B's token ids: the shuffled-passage null alone calls most token-detector
    matches significant; with the token-stratified null < 5% of A's tested features are."""
    rng = np.random.default_rng(0)
    A, tok, pid = _token_world(rng)
    B = TokenCodes(tok, 8).encode_csr(tok[:, None])
    tr, te = pid < 100, pid >= 100
    old = match_features(A[tr], B[tr], pid[tr], A[te], B[te], pid[te], n_null=100, n_boot=0, rng=rng)["hungarian"]
    new = match_features(A[tr], B[tr], pid[tr], A[te], B[te], pid[te], n_null=100, n_boot=0, rng=rng,
                         strata=tok[te], min_passages=5, min_tokens=20)["hungarian"]  # fmt: skip
    assert old.significant(0.05).sum() >= 0.5 * A.shape[1]  # the failure the issue describes
    assert new.tested.sum() >= 0.5 * A.shape[1]
    assert new.significant(0.05).sum() < 0.05 * new.tested.sum()
    assert np.all(new.p_value[new.tested] >= new.p_shuffle[new.tested])


def test_shared_features_survive_the_token_null():
    """The planted shared features (existing fixture) are still recovered when tokens are random strata."""
    rng = np.random.default_rng(1)
    A, B, pid, truth = shared_private_codes(rng)
    tok = rng.choice(20, size=A.shape[0], p=(w := 1.0 / np.arange(1, 21)) / w.sum())
    tr, te = pid < 140, pid >= 140
    m = match_features(A[tr], B[tr], pid[tr], A[te], B[te], pid[te], n_null=200, n_boot=0, rng=rng,
                       strata=tok[te], min_passages=5, min_tokens=20)["hungarian"]  # fmt: skip
    correct = np.array([truth.get(a, -1) == b for a, b in zip(m.feat_a, m.feat_b)])
    sig = m.significant(0.05)
    assert (sig & correct).sum() >= 0.9 * len(truth)
    assert correct[sig].mean() >= 0.9


def test_support_rule_counts_rare_features_without_testing_them():
    rng = np.random.default_rng(2)
    A, B, pid, truth = shared_private_codes(rng, n_passages=100)
    A = A.tolil()
    A[:, 0] = 0  # feature 0: dead on held-out
    A[:, 1] = 0
    A[0:3, 1] = 1.0  # feature 1: three tokens of one passage
    A = A.tocsr()
    n_tok, n_pas = support(A, pid)
    assert n_tok[0] == 0 and n_tok[1] == 3 and n_pas[1] == 1
    res = match_features(A, B, pid, A, B, pid, n_null=20, n_boot=0, rng=rng, min_passages=5, min_tokens=20)["hungarian"]
    for f in (0, 1):
        if f in res.feat_a:
            i = int(np.nonzero(res.feat_a == f)[0][0])
            assert not res.tested[i] and np.isnan(res.p_value[i]) and not res.significant()[i]
    assert res.tested.sum() > 0 and np.isfinite(res.q_value[res.tested]).all()


def test_read_matches_filters_untested_and_reads_old_files(tmp_path):
    rng = np.random.default_rng(3)
    A, B, pid, _ = shared_private_codes(rng, n_passages=60)
    m = match_features(A, B, pid, A, B, pid, n_null=20, n_boot=0, rng=rng, min_passages=30, min_tokens=20)["hungarian"]
    import csv

    path = tmp_path / "fm.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(MATCH_COLUMNS))
        w.writeheader()
        w.writerows(m.rows(1, 2))
    rows = read_matches(path)
    assert len(rows) == int(m.tested.sum()) > 0 and all(r["tested"] and r["n_passages_a"] >= 30 for r in rows)
    old = tmp_path / "old.csv"
    cols = MATCH_COLUMNS[:12]
    with open(old, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
        w.writeheader()
        w.writerows(m.rows(1, 2))
    assert len(read_matches(old)) == int(m.tested.sum())  # untested rows had NaN q


def test_stratified_pairing_keeps_strata_and_permutes():
    rng = np.random.default_rng(4)
    s = rng.integers(0, 5, 200)
    rb = token_stratified_pairing(s, rng)
    assert np.array_equal(np.sort(rb), np.arange(200)) and np.array_equal(s[rb], s)
    assert (rb != np.arange(200)).mean() > 0.5


def test_token_floor_inputs():
    tokens = np.array([[0, 0, 0, 0, 5, 0], [0, 1, 0, 0, 7, 0], [1, 0, 0, 0, 5, 1], [1, 1, 0, 0, 9, 1]])
    tok, prev = anchor_tokens(tokens, np.array([1, 2, 3]))
    assert tok.tolist() == [7, 5, 9] and prev.tolist() == [5, -1, 5]
    E = token_embedding(np.array([5, 7, 5]), 16, seed=0)
    np.testing.assert_array_equal(E[0], E[2])
    np.testing.assert_array_equal(token_embedding(np.array([7]), 16, 0)[0], E[1])  # order-independent
    codes = TokenCodes(np.array([5, 7, 9, -1]), 4, context=True).encode_csr(np.stack([tok, prev], 1))
    assert codes.shape == (3, 8) and np.all(codes.getnnz(1) == 2)


def test_universality_and_paired_test_on_shared_resamples():
    rng = np.random.default_rng(5)
    pid = np.repeat(np.arange(40), 10)
    x = rng.standard_normal(400)
    views = {"real": lambda r: 0.8 + 0.01 * x[r].mean(), "floor_token": lambda r: 0.3 + 0.01 * x[r].mean(),
             "ceiling": lambda r: 0.9 + 0.01 * x[r].mean()}  # fmt: skip
    values, boots = joint_resamples(views, pid, 50, rng)
    assert universality(values["real"], values["floor_token"], values["ceiling"]) == pytest.approx(5 / 6)
    # the shared noise cancels in the difference: a tiny, very significant gap
    d, lo, hi, p = paired_test(values["real"], values["floor_token"], boots["real"], boots["floor_token"])
    assert d == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5) and p == pytest.approx(1 / 51)
    assert np.isnan(universality(0.5, 0.6, 0.6))


def test_annotate_fills_floors_ceiling_and_universality():
    rows = [
        {"layer_a": 1, "layer_b": 2, "space": "sae", "metric": "topk_overlap", "value": 0.5},
        {"layer_a": 1, "layer_b": 2, "space": "sae_token_b", "metric": "topk_overlap", "value": 0.1},
        {"layer_a": 1, "layer_b": 2, "space": "sae_context_b", "metric": "topk_overlap", "value": 0.2},
        {"layer_a": 1, "layer_b": 1, "space": "sae_seed_a", "metric": "topk_overlap", "value": 0.7},
        {"layer_a": 2, "layer_b": 2, "space": "sae_seed_b", "metric": "topk_overlap", "value": 0.9},
        {"layer_a": 1, "layer_b": 2, "space": "resid", "metric": "linear_cka", "value": 0.6},
        {"layer_a": 1, "layer_b": 2, "space": "resid_token_b", "metric": "linear_cka", "value": 0.2},
    ]
    out = {(r["space"], r["metric"]): r for r in annotate(rows)}
    s = out[("sae", "topk_overlap")]
    assert s["floor_used"] == "context" and s["ceiling"] == pytest.approx(0.8) and s["universality"] == pytest.approx(0.5)
    r = out[("resid", "linear_cka")]
    assert r["ceiling"] == 1.0 and r["universality"] == pytest.approx(0.5) and np.isnan(r["floor_random"])


def test_report_section_shows_floor_value_ceiling_and_universality_first(tmp_path):
    from crossdict.config import config_from_dict
    from crossdict.report import _universality_section, floor_value_ceiling

    cfg = config_from_dict({"run_name": "t", "output_dir": str(tmp_path), "model_a": {"name": "a", "layers": [1]},
                            "model_b": {"name": "b", "layers": [2]}})  # fmt: skip
    row = {"layer_a": "1", "layer_b": "2", "space": "universality", "metric": "topk_overlap", "value": "0.3",
           "floor_token": "0.1", "floor_context": "0.05", "floor_random": "nan", "ceiling": "0.5", "ceiling_kind": "seed",
           "universality": "0.5", "universality_ci_low": "0.4", "universality_ci_high": "0.6", "p_diff_floor": "0.02",
           "floor_used": "token"}  # fmt: skip
    html = _universality_section(cfg, [row])  # the detail table; the summary's sentences: tests/test_report.py
    assert ("<td>top-k overlap (SAE)</td><td><b>0.300</b></td><td>0.100</td><td>0.050</td><td>–</td><td>0.500 (seed)</td>"
            "<td>0.50 [0.40, 0.60]</td>") in html
    assert "0.100 (token)</span> ▸ <b>0.300</b> ▸ <span class=null>0.500 (seed)" in floor_value_ceiling(row)


def test_best_token_corr_over_present_tokens_equals_the_whole_vocabulary():
    """Correlating A's codes only with the token codes that fire on the rows gives the max over the
    whole vocabulary bit for bit: absent tokens correlate exactly 0, so they matter only when every
    present token correlates negatively (then the best is 0)."""
    from crossdict.baselines import best_token_corr
    from crossdict.matching import code_correlation

    rng = np.random.default_rng(3)
    A, tok, _ = _token_world(rng, n_passages=40, vocab=30, m_a=12)
    codes = TokenCodes(np.arange(60), 8)  # 60-token vocabulary, tokens 30..59 never occur
    for rows in (np.arange(A.shape[0]), np.sort(rng.choice(A.shape[0], 300, replace=False))):
        T = codes.encode_csr(tok[rows, None])
        full = code_correlation(A[rows], T).max(1)
        np.testing.assert_array_equal(best_token_corr(A[rows], T), full)
    # a feature firing only on rows without a token code correlates negatively with every present token
    ids = np.where(np.arange(A.shape[0]) % 3 == 0, 99, tok)  # id 99 is not in the vocabulary: no code
    T = codes.encode_csr(ids[:, None])
    x = sparse.csr_matrix((ids == 99).astype(np.float32)[:, None])
    assert code_correlation(x, T[:, np.unique(T.indices)]).max() < 0
    np.testing.assert_array_equal(best_token_corr(x, T), code_correlation(x, T).max(1))  # 0, from absent tokens
