"""Alignment maps, feature matching and the align stage end to end, on planted structure."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from align_fixtures import random_sae, shared_private_codes, write_synthetic_cache
from crossdict import evaluate
from crossdict.align import LinearMap, fit_maps, procrustes_rotation, r2_score, retrieval_accuracy
from crossdict.evaluate import LAYER_CKA_COLUMNS, run_align
from crossdict.config import config_from_dict
from crossdict.matching import MATCH_COLUMNS, code_correlation, hungarian, match_features, mutual_nn
from crossdict.stats import InsufficientDataError


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ------------------------------------------------------------------------------------------ maps


def test_procrustes_recovers_planted_rotation(rng):
    X = rng.standard_normal((2000, 20)) * np.linspace(0.5, 3, 20) + 4.0
    R = ortho_group.rvs(20, random_state=1)
    Y = X @ R + 0.05 * rng.standard_normal((2000, 20)) - 2.0
    got = procrustes_rotation(X, Y)
    np.testing.assert_allclose(got, R, atol=0.01)
    ref, _ = orthogonal_procrustes(X - X.mean(0), Y - Y.mean(0))  # scipy's square solver agrees
    np.testing.assert_allclose(got, ref, atol=1e-8)
    mp = fit_maps(X, Y, ["procrustes"])["procrustes"]
    assert mp.meta["scale"] == pytest.approx(1.0, abs=0.01)
    assert r2_score(mp.transform(X), Y) > 0.99


@pytest.mark.parametrize("d_a,d_b", [(12, 30), (30, 12)])
def test_procrustes_recovers_planted_semi_orthogonal_map(rng, d_a, d_b):
    Q = ortho_group.rvs(max(d_a, d_b), random_state=2)[:d_a, :d_b]  # orthonormal rows or columns
    if d_a <= d_b:  # isometric embedding of A into a subspace of B
        X = rng.standard_normal((3000, d_a)) * np.linspace(0.5, 2, d_a)
        Y = 2.5 * X @ Q + 0.01 * rng.standard_normal((3000, d_b))
        assert np.allclose(Q @ Q.T, np.eye(d_a))
    else:  # B sees a d_b-dim projection of A
        Y = rng.standard_normal((3000, d_b)) * np.linspace(0.5, 2, d_b)
        X = Y @ Q.T / 2.5 + 0.01 * rng.standard_normal((3000, d_a))
    mp = fit_maps(X, Y, ["procrustes"])["procrustes"]
    np.testing.assert_allclose(mp.rotation, Q, atol=0.02)
    assert mp.meta["scale"] == pytest.approx(2.5, rel=0.02)
    assert r2_score(mp.transform(X), Y) > 0.99


def test_ridge_and_svcca_maps_fit_an_affine_relation(rng):
    X = rng.standard_normal((4000, 10))
    A = rng.standard_normal((10, 6))
    Y = X @ A + 1.0 + 0.1 * rng.standard_normal((4000, 6))
    maps = fit_maps(X[:3000], Y[:3000], ["ridge", "svcca", "procrustes"], ridge_alpha=1e-3, svcca_variance=1.0)
    np.testing.assert_allclose(maps["ridge"].weight, A, atol=0.02)
    assert r2_score(maps["ridge"].transform(X[3000:]), Y[3000:]) > 0.99
    assert r2_score(maps["svcca"].transform(X[3000:]), Y[3000:]) > 0.99
    assert r2_score(maps["procrustes"].transform(X[3000:]), Y[3000:]) < 0.95  # not a rotation


def test_map_save_load_roundtrip(tmp_path, rng):
    X, Y = rng.standard_normal((300, 8)), rng.standard_normal((300, 5))
    for name, mp in fit_maps(X, Y).items():
        mp.save(tmp_path)
        back = LinearMap.load(tmp_path, name)
        np.testing.assert_array_equal(back.transform(X), mp.transform(X))
        assert back.transform(X).shape == (300, 5)
        assert back.meta == mp.meta
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(FileNotFoundError, match="run the align stage"):
        LinearMap.load(tmp_path, "nope")


def test_r2_and_retrieval_known_answers(rng):
    Y = rng.standard_normal((800, 16))
    assert r2_score(Y, Y) == 1.0
    assert r2_score(np.broadcast_to(Y.mean(0), Y.shape), Y) == pytest.approx(0.0, abs=1e-12)
    perfect = retrieval_accuracy(Y, Y, n_candidates=100, rng=rng)
    assert perfect["top1"] == 1.0 and perfect["chance_top1"] == 0.01 and perfect["chance_top10"] == 0.1
    noise = retrieval_accuracy(rng.standard_normal(Y.shape), Y, n_candidates=100, rng=rng)
    assert abs(noise["top1"] - 0.01) < 0.02 and abs(noise["top10"] - 0.1) < 0.05
    small = retrieval_accuracy(Y[:50], Y[:50], n_candidates=1000, rng=rng)
    assert small["candidates"] == 50


# ------------------------------------------------------------------------------------------ matching


def test_matching_recovers_planted_shared_features_and_rejects_private():
    """Shared pairs are found with high precision and recall; private features stay above q 0.05.

    BH controls the *expected* false discovery proportion, so one seed may show a stray
    private feature; pooled over seeds the rate must be small (measured: ~3% over 30 seeds).
    """
    private_sig = {"hungarian": [], "mnn": []}
    for seed in range(3):
        rng = np.random.default_rng(seed)
        A, B, pid, truth = shared_private_codes(rng)
        tr, te = pid < 140, pid >= 140
        res = match_features(A[tr], B[tr], pid[tr], A[te], B[te], pid[te], n_null=200, n_boot=10 if seed == 0 else 0, rng=rng)
        for name in ("hungarian", "mnn"):
            m = res[name]
            correct = np.array([truth.get(a, -1) == b for a, b in zip(m.feat_a, m.feat_b)])
            sig = m.significant(0.05)
            assert correct[sig].mean() >= 0.9, name  # precision
            assert (sig & correct).sum() >= 0.9 * len(truth), name  # recall
            private_sig[name] += list(sig[m.feat_a >= len(truth)])
            assert np.all(m.q_value >= m.p_value)
            if seed == 0:
                assert m.stability[correct].mean() > 0.9 > m.stability[~correct].mean()
        assert np.isnan(res["hungarian"].dec_cos).all() and "mnn_dec" not in res  # no decoders given
    for name, flags in private_sig.items():
        assert np.mean(flags) <= 0.1, name


def test_sparse_hungarian_equals_dense_on_candidates(rng):
    A, B, pid, truth = shared_private_codes(rng, n_passages=80, m=200, n_shared=80)
    S = code_correlation(A, B)
    dense = dict(zip(*hungarian(S)))
    sparse_ = dict(zip(*hungarian(S, n_candidates=8, dense_max=0)))
    # every pair the sparse solver keeps is positively correlated, and the strong ones agree
    strong = [a for a, b in dense.items() if S[a, b] > 0.3]
    assert len(strong) >= 60
    assert all(sparse_.get(a) == dense[a] for a in strong)
    assert all(S[a, b] > 0 for a, b in sparse_.items())


def test_blockwise_mnn_equals_naive(rng):
    S = rng.standard_normal((57, 43))
    ia, ib = mutual_nn(lambda r0, r1: S[r0:r1], 57, 43, block=10)
    naive = [(i, S[i].argmax()) for i in range(57) if S[:, S[i].argmax()].argmax() == i]
    assert list(zip(ia, ib)) == naive


def test_decoder_directions_match_after_rotation(rng):
    """mnn_dec finds pairs whose decoder rows coincide once A's basis is rotated into B's."""
    A, B, pid, truth = shared_private_codes(rng, n_passages=60)
    R = ortho_group.rvs(16, random_state=4)
    dec_a = rng.standard_normal((64, 16))
    dec_b = rng.standard_normal((64, 16))
    for a, b in truth.items():
        dec_b[b] = dec_a[a] @ R
    res = match_features(A, B, pid, A, B, pid, dec_a @ R, dec_b, n_null=20, n_boot=0, rng=rng)
    m = res["mnn_dec"]
    found = dict(zip(m.feat_a, m.feat_b))
    assert all(found.get(a) == b for a, b in truth.items())
    hung = res["hungarian"]
    is_true = np.array([truth.get(a, -1) == b for a, b in zip(hung.feat_a, hung.feat_b)])
    np.testing.assert_allclose(hung.dec_cos[is_true], 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------ stage


def _config(tmp_path: Path, **align) -> object:
    return config_from_dict({
        "run_name": "toy", "output_dir": str(tmp_path),
        "model_a": {"name": "toy-a", "layers": [1, 3]}, "model_b": {"name": "toy-b", "layers": [2, 4]},
        "sae": {"seeds": [0, 1]},
        "align": {"n_bootstrap": 20, "n_null": 20, "n_match_bootstrap": 3, "retrieval_candidates": 100,
                  "metric_max_tokens": 300, "pairwise_max_tokens": 150, **align},
    })  # fmt: skip


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with open(path) as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


@pytest.fixture
def toy_run(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    write_synthetic_cache(cfg.cache_dir)
    saes = {}
    for key, layer, d in (("a", 1, 24), ("b", 2, 16), ("a", 3, 24), ("b", 4, 16)):
        for seed in (0, 1):
            path = cfg.sae_dir(key, layer, seed)
            path.mkdir(parents=True)
            saes[path] = random_sae(d, 48, 6, seed=100 * layer + seed)
    monkeypatch.setattr(evaluate, "_load_sae", lambda p: saes[Path(p)])
    return cfg, saes


def test_run_align_end_to_end(toy_run, caplog, capsys):
    cfg, _ = toy_run
    write_synthetic_cache(cfg.run_dir / "cache_random", random_b=True, seed=7)
    with caplog.at_level(logging.INFO):
        run_align(cfg)
    err = capsys.readouterr().err  # progress names each resampling loop while it runs (issue 14 item 4)
    for what in ("masked raw: linear_cka / debiased_cka", "masked raw: ridge R² and retrieval", "token floor: svcca",
                 "random-weights floor", "SAE codes and matches: feature matching", "seed ceiling of A1",
                 "SAE-code linear_cka / debiased_cka", "joint passage resamples"):
        assert what in err, what
    rep = cfg.report_dir

    cols, rows = _read(rep / "metrics.csv")
    assert cols[:10] == ["layer_a", "layer_b", "space", "metric", "value", "ci_low", "ci_high", "null_mean", "p_value",
                         "q_value"]
    assert {"split", "n_tokens", "n_passages", "masked_a", "masked_b"} <= set(cols)
    assert {"floor_token", "floor_context", "floor_random", "ceiling", "universality", "universality_ci_low"} <= set(cols)
    got = {(int(r["layer_a"]), int(r["layer_b"]), r["space"], r["metric"]): r for r in rows}
    for pair in ((1, 2), (3, 4)):  # floors that share the input, and universality between floor and ceiling
        for metric in ("linear_cka", "svcca", "procrustes_r2", "retrieval_top1", "topk_overlap", "significant_share"):
            u = got[(*pair, "universality", metric)]
            assert u["floor_used"] in ("token", "context", "random"), (pair, metric)
        cka = got[(*pair, "universality", "linear_cka")]
        assert float(cka["value"]) > float(cka["floor_token"]) and float(cka["ceiling"]) == 1.0
        lo, u, hi = (float(cka[c]) for c in ("universality_ci_low", "universality", "universality_ci_high"))
        assert lo <= u <= hi and float(cka["p_diff_floor"]) < 0.1
        assert float(got[(*pair, "resid", "linear_cka")]["floor_token"]) == float(got[(*pair, "resid_token_b", "linear_cka")]["value"])
        assert got[(*pair, "universality", "topk_overlap")]["ceiling_kind"] == "seed"
        assert (*pair, "sae_token_b", "n_significant_hungarian") in got and (*pair, "sae", "n_tested_hungarian") in got
        assert float(got[(*pair, "sae_token_b", "n_significant_hungarian")]["value"]) == 0.0  # token identity: no matches
    for pair in ((1, 2), (3, 4)):
        for metric in ("linear_cka", "debiased_cka", "svcca", "pwcca", "rbf_cka", "rsa", "mutual_knn"):
            r = got[(*pair, "resid", metric)]
            v, lo, hi, null, p = (float(r[c]) for c in ("value", "ci_low", "ci_high", "null_mean", "p_value"))
            assert lo <= v <= hi and null < v and p == pytest.approx(1 / 21), (pair, metric)
            floor = got[(*pair, "resid_random_b", metric)]
            assert float(floor["value"]) < v, (pair, metric)
            assert (*pair, "resid_z_random_b", metric) not in got  # z-scored: a labelled variant, raw floors only
        assert float(got[(*pair, "resid", "linear_cka")]["value"]) > 0.5
        assert float(got[(*pair, "resid_z", "linear_cka")]["value"]) > 0.5
        for metric in ("linear_cka", "debiased_cka", "rsa", "mutual_knn", "topk_overlap", "match_rate_hungarian", "invariance_hungarian"):
            assert (*pair, "sae", metric) in got
    assert (1, 1, "sae_seed_a", "match_rate_hungarian") in got and (4, 4, "sae_seed_b", "linear_cka") in got

    cols, rows = _read(rep / "alignment.csv")
    assert cols[:3] == ["layer_a", "layer_b", "method"] and "r2" in cols and "top1" in cols and "chance_top1" in cols
    by = {(int(r["layer_a"]), r["method"]): r for r in rows}
    for la in (1, 3):
        for m in ("procrustes", "svcca", "ridge"):
            assert float(by[(la, m)]["r2"]) > 0.3
            assert float(by[(la, m)]["top1"]) > 5 * float(by[(la, m)]["chance_top1"])
            assert float(by[(la, m + ":random_b")]["r2"]) < 0.1  # floor: nothing to align with
            assert (la, m + ":z:random_b") not in by
            assert float(by[(la, m + ":z")]["r2"]) > 0.3
    assert (cfg.run_dir / "alignment" / "1_2" / "procrustes.safetensors").is_file()
    assert LinearMap.load(cfg.run_dir / "alignment" / "3_4", "ridge").d_b == 16

    cols, rows = _read(rep / "feature_matches.csv")
    assert tuple(cols) == MATCH_COLUMNS
    assert {r["method"] for r in rows} == {"hungarian", "mnn", "mnn_dec"}
    assert any(r["tested"] == "1" for r in rows)
    for r in rows:
        if r["tested"] == "1":  # both features have held-out support; p = max(shuffled, token-stratified)
            assert 0.0 <= float(r["p_value"]) <= 1.0 and float(r["q_value"]) >= float(r["p_value"]) - 1e-12
            assert float(r["p_value"]) >= float(r["p_shuffle"]) and int(r["n_passages_a"]) >= 5
        else:
            assert r["p_value"] == "nan"
        assert -1.0 <= float(r["act_corr"]) <= 1.0 and -1.0 <= float(r["dec_cos"]) <= 1.0
    assert (rep / "feature_matches_seed.csv").is_file()

    cols, rows = _read(rep / "layer_cka.csv")
    assert cols == list(LAYER_CKA_COLUMNS) and cols[:5] == ["layer_a", "layer_b", "cka", "cka_z", "n_pairs"] and len(rows) == 4
    cka = {(int(r["layer_a"]), int(r["layer_b"])): float(r["cka"]) for r in rows}
    assert all(0.0 < v <= 1.0 for v in cka.values())
    assert all(0.0 < float(r["cka_z"]) <= 1.0 and r["source"] == "cached_layers" for r in rows)
    assert not list(rep.glob(".*.tmp"))


def test_workers_do_not_change_the_report(tmp_path, monkeypatch):
    """align.workers = 2 (spawned processes, one task per layer-pair part) writes the same bytes as
    workers = 1: every task draws from its own stream. Layer A1 sits in both pairs: its seed-ceiling
    rows are written once, from the first pair. Both runs use 1 BLAS thread per process (workers = 1 runs in
    a spawned process started with 1 thread; each of 2 workers gets cores // 2, patched to 1): the summation
    order of a matmul follows the thread count, and exact ties among retrieval scores break by rounding."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from crossdict import workers as workers_mod
    from crossdict.sae import SAE, SAESpec, save_sae

    monkeypatch.setattr(workers_mod, "cores", lambda: 2)
    out = {}
    for workers in (1, 2):
        cfg = _config(tmp_path / f"w{workers}", workers=workers, n_bootstrap=8, n_null=8, n_match_null=30)
        write_synthetic_cache(cfg.cache_dir)
        write_synthetic_cache(cfg.run_dir / "cache_random", random_b=True, seed=7)
        for key, layer, d in (("a", 1, 24), ("b", 2, 16), ("b", 4, 16)):
            for seed in (0, 1):
                torch.manual_seed(100 * layer + seed)
                save_sae(SAE(SAESpec("topk", d, 48, k=6)), cfg.sae_dir(key, layer, seed))
        if workers == 1:
            with workers_mod.thread_env(1), ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                pool.submit(run_align, cfg, layers_a=[1, 1], layers_b=[2, 4], progress=False).result()
        else:
            run_align(cfg, layers_a=[1, 1], layers_b=[2, 4], progress=False)
        out[workers] = {f: (cfg.report_dir / f).read_bytes() for f in
                        ("metrics.csv", "alignment.csv", "feature_matches.csv", "feature_matches_seed.csv", "layer_cka.csv")}
    for f in out[1]:
        assert out[1][f] == out[2][f], f
    _, rows = _read(tmp_path / "w2" / "toy" / "report" / "metrics.csv")
    seed_a = [r for r in rows if r["space"] == "sae_seed_a" and r["metric"] == "linear_cka"]
    assert [r["layer_a"] for r in seed_a] == ["1"]
    assert {r["layer_a"] for r in rows if r["space"] == "sae_seed_b" and r["metric"] == "linear_cka"} == {"2", "4"}
    assert {(r["layer_a"], r["layer_b"]) for r in rows if r["space"] == "universality" and r["metric"] == "topk_overlap"
            and r["ceiling_kind"] == "seed"} == {("1", "2"), ("1", "4")}


def test_layer_cka_in_parts_equals_the_whole_grid(tmp_path):
    """With a random stream per cell, the grid computed A layer by A layer (one task each) gives the
    rows of the whole grid, CIs and nulls included."""
    from crossdict.cache import ActivationCache
    from crossdict.evaluate import layer_cka

    cfg = _config(tmp_path, n_bootstrap=10, n_null=10)
    write_synthetic_cache(cfg.cache_dir)
    cache = ActivationCache(cfg.cache_dir)
    cell = lambda la, lb: np.random.default_rng([la, lb])  # noqa: E731
    run = lambda layers: layer_cka(cache, 500, np.random.default_rng(5), cfg.align, None, [(1, 2), (3, 4)],  # noqa: E731
                                   False, layers, cell)
    whole = run(None)
    parts = run([1]) + run([3])
    assert len(whole) == 4 and parts == whole
    assert sum(np.isfinite(r["p_value"]) for r in whole) >= 2


def test_run_align_without_saes_or_random_cache(tmp_path, caplog):
    cfg = _config(tmp_path, n_bootstrap=5, n_null=5)
    write_synthetic_cache(cfg.cache_dir)
    with caplog.at_level(logging.INFO):
        run_align(cfg, layers_a=[3], layers_b=[4])
    _, rows = _read(cfg.report_dir / "metrics.csv")
    # token / context floors need no SAE and no random cache; no seed ceiling: residual metrics only
    assert {r["space"] for r in rows} == {"resid", "resid_z", "resid_token_b", "resid_context_b", "universality"}
    assert {r["layer_a"] for r in rows} == {"3"}
    assert {r["metric"] for r in rows if r["space"] == "universality"} == {"linear_cka", "svcca", "procrustes_r2", "retrieval_top1"}
    _, rows = _read(cfg.report_dir / "feature_matches.csv")
    assert rows == []
    assert "cache_random" in caplog.text and "no SAE at" in caplog.text


def test_run_align_clear_errors(toy_run, tmp_path):
    cfg, saes = toy_run
    # an SAE trained on another model: wrong d_in
    saes[cfg.sae_dir("b", 2)] = random_sae(99, 48, 6, seed=0)
    with pytest.raises(ValueError, match=r"d_in=99 .* d_model=16.*different runs"):
        run_align(cfg, layers_a=[1], layers_b=[2])
    # SAEs exist for model a, but not for this layer: name the missing path
    import shutil

    shutil.rmtree(cfg.sae_dir("a", 3))
    with pytest.raises(FileNotFoundError, match=r"blocks\.3\.hook_resid_post is missing"):
        run_align(cfg, layers_a=[3], layers_b=[4])
    with pytest.raises(KeyError, match="cached layers"):
        run_align(cfg, layers_a=[7], layers_b=[4])


def test_run_align_too_few_passages(tmp_path):
    cfg = _config(tmp_path, min_passages=50)
    write_synthetic_cache(cfg.cache_dir)
    with pytest.raises(InsufficientDataError, match=r"12 passages, need at least align.min_passages=50"):
        run_align(cfg)


def test_random_cache_with_other_anchors_is_rejected(tmp_path):
    cfg = _config(tmp_path)
    write_synthetic_cache(cfg.cache_dir)
    write_synthetic_cache(cfg.run_dir / "cache_random", n_passages=20)
    with pytest.raises(ValueError, match="anchor count mismatch"):
        run_align(cfg)


def test_fast_r2_ci_equals_generic_with_ci(rng):
    """r2_with_ci's sufficient-statistics shortcut gives the same numbers as with_ci(r2_score)."""
    from crossdict.align import r2_with_ci
    from crossdict.stats import with_ci

    pid = np.repeat(np.arange(25), 12)
    Y = rng.standard_normal((300, 7)) + 50.0  # large mean: the shortcut must not cancel
    Y_hat = Y + 0.5 * rng.standard_normal(Y.shape)
    for ci in ("half_sample", "bootstrap"):
        fast = r2_with_ci(Y_hat, Y, pid, 30, 30, np.random.default_rng(5), ci=ci)
        slow = with_ci(r2_score, Y_hat, Y, pid, 30, 30, np.random.default_rng(5), ci=ci)
        for f in ("value", "ci_low", "ci_high", "null_mean", "p_value"):
            assert getattr(fast, f) == pytest.approx(getattr(slow, f), rel=1e-4, abs=1e-6), (ci, f)


def test_retrieval_null_from_one_similarity_matrix_equals_per_draw_products(rng):
    """The precomputed [n, n] similarity path of retrieval_with_ci draws the same distractors and
    gives the same null as recomputing Q̂[ra] Y[rb]ᵀ per draw (the old path, max_sim_entries=0)."""
    from crossdict.align import retrieval_with_ci

    pid = np.repeat(np.arange(30), 40)
    Y = rng.standard_normal((1200, 24)).astype(np.float32)
    Y_hat = (Y + 1.5 * rng.standard_normal(Y.shape)).astype(np.float32)
    fast = retrieval_with_ci(Y_hat, Y, pid, 200, 600, 20, 20, np.random.default_rng(3), null_queries=300)
    slow = retrieval_with_ci(Y_hat, Y, pid, 200, 600, 20, 20, np.random.default_rng(3), null_queries=300, max_sim_entries=0)
    assert 0.05 < fast[0]["top1"] < 0.95 and fast[1].null_mean < 0.05
    for f in ("value", "ci_low", "ci_high", "null_mean", "p_value"):
        assert getattr(fast[1], f) == getattr(slow[1], f), f
    np.testing.assert_array_equal(fast[0]["ranks"], slow[0]["ranks"])


def _argpartition_ranks(row: np.ndarray, partner: int, M: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """The previous sampler: M-1 distractors per draw as the smallest of n random keys, the partner's key
    set to +inf so it is never drawn; rank = distractors scoring >= the partner."""
    keys = rng.random((draws, len(row)))
    keys[:, partner] = np.inf
    distract = np.argpartition(keys, M - 2, axis=1)[:, : M - 1]
    return (row[distract] >= row[partner]).sum(1)


def test_retrieval_ranks_have_the_distribution_of_drawn_distractor_sets():
    """`retrieval_ranks` draws the number of distractors at or above the partner directly
    (hypergeometric) instead of drawing the distractor set: over many draws for one query it has
    the exact law of M-1 of the n-1 non-partners drawn without replacement, like the old sampler.
    A sampler that counted the partner, drew with replacement or could draw the partner fails."""
    from scipy import stats

    from crossdict.align import retrieval_ranks

    n, M, partner, draws = 60, 25, 7, 40_000
    row = np.linspace(0.0, 1.0, n)[::-1].copy()  # 13 rows score above the partner ...
    row[partner] = row[13]  # ... and row 13 ties with it (ties count against the partner): 13 at or above
    above = int((np.delete(row, partner) >= row[partner]).sum())
    assert above == 13
    new = retrieval_ranks(None, None, np.full(draws, partner), M, np.random.default_rng(1),
                          sims=lambda q: np.broadcast_to(row, (len(q), n)), n=n)
    old = _argpartition_ranks(row, partner, M, draws, np.random.default_rng(2))
    law = stats.hypergeom(n - 1, above, M - 1)
    support = np.arange(M)
    expected = law.pmf(support) * draws
    keep = expected >= 5  # chi-square bins; the rest pooled
    for ranks in (new, old):
        counts = np.bincount(ranks, minlength=M)[:M]
        obs = np.append(counts[keep], counts[~keep].sum())
        exp = np.append(expected[keep], expected[~keep].sum())
        assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3
    assert abs(new.mean() - law.mean()) < 4 * law.std() / np.sqrt(draws)
    assert abs(new.var() - law.var()) < 0.05 * law.var()  # with replacement (binomial) the variance is 1.6x
    wrong = stats.hypergeom(n - 1, above + 1, M - 1)  # the partner counted as one of the distractors
    assert abs(new.mean() - wrong.mean()) > 10 * law.std() / np.sqrt(draws)
    assert new.max() <= above and (new >= 0).all()
    # what the stage's stream yields afterwards does not depend on the similarities
    from crossdict.align import draw_ranks

    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    draw_ranks(np.full(500, 3), n, M, r1), draw_ranks(np.arange(500) % n, n, M, r2)
    assert r1.random() == r2.random()


def test_retrieval_is_at_chance_on_unrelated_data(rng):
    """Unrelated queries and targets: top-1 at 1/M and top-10 at 10/M within sampling error, in the
    estimate and in the null path that reads one similarity matrix."""
    from crossdict.align import retrieval_with_ci

    n, M, trials = 3000, 50, 4
    hits1 = hits10 = queries = 0
    for t in range(trials):
        Y, Y_hat = rng.standard_normal((n, 8)), rng.standard_normal((n, 8))
        ret = retrieval_accuracy(Y_hat, Y, n_candidates=M, rng=np.random.default_rng(t), max_queries=n)
        hits1, hits10, queries = hits1 + ret["top1"] * n, hits10 + ret["top10"] * n, queries + n
    for hits, p in ((hits1, 1 / M), (hits10, 10 / M)):
        assert abs(hits / queries - p) < 4 * np.sqrt(p * (1 - p) / queries), (hits / queries, p)
    pid = np.repeat(np.arange(60), 50)
    _, res = retrieval_with_ci(Y_hat, Y, pid, M, 500, 0, 40, np.random.default_rng(9), null_queries=1000)
    assert abs(res.null_mean - 1 / M) < 4 * np.sqrt((1 / M) * (1 - 1 / M) / 40_000)


def test_null_counts_from_the_similarity_matrix_equal_gathered_counts(rng):
    """`_null_above` (whole rows of Q̂Yᵀ less the rows a pairing leaves out) counts exactly what
    gathering the pairing's columns counts, ties included."""
    from crossdict.align import _null_above
    from crossdict.stats import passage_index, shuffled_pairing

    pid = np.repeat(np.arange(40), rng.integers(5, 30, 40))
    n = len(pid)
    G = np.round(rng.standard_normal((n, n)), 1).astype(np.float32)  # coarse values: many ties
    idx = passage_index(pid)
    for _ in range(5):
        ra, rb = shuffled_pairing(idx, rng)
        q = np.sort(rng.choice(len(ra), 200, replace=False))
        gathered = G[ra[q]][:, rb]
        ref = (gathered >= gathered[np.arange(len(q)), q][:, None]).sum(1) - 1
        np.testing.assert_array_equal(_null_above(G, ra, rb, q, block=64), ref)


def test_sae_block_reuses_codes_of_a_exactly(rng):
    """Passing A's codes from an earlier call (floors, ceilings) gives the same numbers as encoding again."""
    from align_fixtures import random_sae

    from crossdict.config import AlignConfig
    from crossdict.evaluate import sae_block

    pid_tr, pid_ho = np.repeat(np.arange(20), 30), np.repeat(np.arange(12), 30)
    xa_tr, xa_ho = rng.standard_normal((600, 8)).astype(np.float32), rng.standard_normal((360, 8)).astype(np.float32)
    xb_tr, xb_ho = xa_tr @ rng.standard_normal((8, 10)).astype(np.float32), xa_ho @ rng.standard_normal((8, 10)).astype(np.float32)
    sa, sb = random_sae(8, 24, 4, 1), random_sae(10, 24, 4, 2)
    acfg = AlignConfig(n_bootstrap=5, n_null=5, n_match_null=20, n_match_bootstrap=2, metric_max_tokens=200,
                       pairwise_max_tokens=150, rsa_max_tokens=100, min_passages=5, min_feature_passages=2, min_feature_tokens=3)
    keep: dict = {}
    R = procrustes_rotation(xa_tr, xb_tr)
    m1, _ = sae_block(sa, sb, xa_tr, xb_tr, pid_tr, xa_ho, xb_ho, pid_ho, R, acfg, np.random.default_rng(4), keep=keep)
    m2, _ = sae_block(sa, sb, xa_tr, xb_tr, pid_tr, xa_ho, xb_ho, pid_ho, R, acfg, np.random.default_rng(4),
                      codes_a=(keep["ctr_a"], keep["ca"]))
    assert m1.keys() == m2.keys() and len(m1) > 5
    for k in m1:
        np.testing.assert_equal([getattr(m1[k], f) for f in ("value", "ci_low", "ci_high", "p_value")],
                                [getattr(m2[k], f) for f in ("value", "ci_low", "ci_high", "p_value")])
