"""Crosscoder (issue 9): planted shared/private features, exact resume, file format, bad inputs, the stage."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from align_fixtures import write_synthetic_cache
from crossdict.cache import ActivationCache
from crossdict.config import CrosscoderConfig, config_from_dict
from crossdict.crosscoder import (Crosscoder, CrosscoderFormatError, CrosscoderSpec, PairedStreams, SAEContext, StreamInfo,
                                  analyse, auroc, evaluate_crosscoder, load_crosscoder, relative_norm, run_crosscode,
                                  save_crosscoder, streams_from_cache, train_crosscoder)

N_SHARED, N_PRIV, D_A, D_B = 24, 12, 32, 40


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: with threads, contention on a shared 2-core machine costs 20x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted_pair(n: int = 20000, p: float = 0.04, seed: int = 0):
    """Two "models": the same N_SHARED events written in different random bases, plus N_PRIV private features each."""
    rng = np.random.default_rng(seed)
    m = N_SHARED + N_PRIV
    DA = rng.standard_normal((m, D_A))
    DB = rng.standard_normal((m, D_B))
    DA /= np.linalg.norm(DA, axis=1, keepdims=True)
    DB /= np.linalg.norm(DB, axis=1, keepdims=True)

    def fire(k):
        return (rng.random((n, k)) < p) * (0.5 + rng.exponential(1.0, (n, k)))

    S, PA, PB = fire(N_SHARED), fire(N_PRIV), fire(N_PRIV)
    xa = S @ DA[:N_SHARED] + PA @ DA[N_SHARED:] + 0.02 * rng.standard_normal((n, D_A)) + 0.3
    xb = S @ DB[:N_SHARED] + PB @ DB[N_SHARED:] + 0.02 * rng.standard_normal((n, D_B)) - 0.2
    return xa.astype(np.float32), xb.astype(np.float32), DA, DB


def small_cfg(arch: str = "topk", steps: int = 400, **kw) -> CrosscoderConfig:
    base = dict(architecture=arch, expansion_factor=2, k=4, batch_size=256, train_tokens=256 * steps, lr=3e-3, lr_warmup_steps=20,
                dead_tokens_threshold=5000, aux_k=16, checkpoint_every=10**6, l1_warmup_steps=50, l1_coefficient=1.0)
    return CrosscoderConfig(**{**base, **kw})


def recovered_r(cc: Crosscoder, DA: np.ndarray, DB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each planted feature (shared, A-private, B-private), the best latent's concatenated decoder cosine and its r."""
    sa, sb = (s.input_scale for s in cc.spec.streams)
    true = np.zeros((N_SHARED + 2 * N_PRIV, D_A + D_B))
    true[:N_SHARED, :D_A], true[:N_SHARED, D_A:] = sa * DA[:N_SHARED], sb * DB[:N_SHARED]
    true[N_SHARED : N_SHARED + N_PRIV, :D_A] = sa * DA[N_SHARED:]
    true[N_SHARED + N_PRIV :, D_A:] = sb * DB[N_SHARED:]
    W = cc.W_dec.detach().double().numpy()
    cos = (true / np.linalg.norm(true, axis=1, keepdims=True)) @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T
    return cos.max(1), relative_norm(cc)[cos.argmax(1)]


# --- planted features ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "l1"])
def test_planted_shared_features_have_r_half_and_private_ones_r_zero_or_one(tmp_path, arch):
    xa, xb, DA, DB = planted_pair()
    ps = PairedStreams.from_arrays([xa, xb], ["a", "b"])
    cc = train_crosscoder(ps, small_cfg(arch, steps=400 if arch == "topk" else 800), tmp_path, progress=False)
    best_cos, r = recovered_r(cc, DA, DB)
    assert (best_cos > 0.9).mean() >= 0.9, np.round(best_cos, 2)  # the dictionary found the planted features
    shared = np.arange(len(r)) < N_SHARED
    a_priv, b_priv = ~shared & (np.arange(len(r)) < N_SHARED + N_PRIV), np.arange(len(r)) >= N_SHARED + N_PRIV
    sep = auroc(-np.abs(r - 0.5), shared)  # shared latents sit nearer r = 0.5 than private ones
    assert sep >= 0.95, (sep, np.round(r, 2))
    assert 0.35 < np.median(r[shared]) < 0.65
    assert np.median(r[a_priv]) > 0.9 and np.median(r[b_priv]) < 0.1
    ev = evaluate_crosscoder(cc, ps)
    assert max(ev["fvu"].values()) < 0.1 and ev["l0"] <= (4 if arch == "topk" else 8)


def test_unpaired_streams_show_no_shared_features(tmp_path):
    # Negative control: same data, B's rows shuffled, so nothing is shared any more. The crosscoder must
    # then split every "shared" feature into two one-sided latents: the separation above disappears.
    xa, xb, DA, DB = planted_pair()
    xb = xb[np.random.default_rng(1).permutation(len(xb))]
    cc = train_crosscoder(PairedStreams.from_arrays([xa, xb], ["a", "b"]), small_cfg(), tmp_path, progress=False)
    best_cos, r = recovered_r(cc, DA, DB)
    assert np.median(best_cos[:N_SHARED]) < 0.85  # no latent writes a planted shared feature into both models
    assert auroc(-np.abs(r - 0.5), np.arange(len(r)) < N_SHARED) < 0.8


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auroc(s, y) == pytest.approx(np.mean(pairs))


# --- the model ----------------------------------------------------------------------------------


def tiny_cc(arch: str = "topk", d=(5, 7), d_latent: int = 12, k: int = 3) -> Crosscoder:
    streams = [StreamInfo("a:1", d[0], 0.5), StreamInfo("b:2", d[1], 2.0)]
    cc = Crosscoder(CrosscoderSpec(arch, streams, d_latent, k, l1_coefficient=0.7))
    cc.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        cc.b_dec.normal_(generator=torch.Generator().manual_seed(1))
        cc.b_enc.normal_(generator=torch.Generator().manual_seed(2))
        cc.W_dec.mul_(torch.rand(d_latent, 1, generator=torch.Generator().manual_seed(3)) + 0.5)
    return cc


@pytest.mark.parametrize("arch", ["topk", "l1"])
def test_codes_sum_per_model_encoders_and_losses_are_per_model(arch):
    cc = tiny_cc(arch)
    g = torch.Generator().manual_seed(4)
    xa, xb = torch.randn(50, 5, generator=g), torch.randn(50, 7, generator=g)
    # Reference written per model: pre = sum_m (s_m x_m - b_dec_m) W_enc_m^T + b_enc.
    pre = sum((x * s - cc.b_dec[sl]) @ cc.W_enc[:, sl].T for x, s, sl in zip((xa, xb), (0.5, 2.0), cc.slices)) + cc.b_enc
    codes = pre.relu() if arch == "l1" else torch.zeros_like(pre).scatter(1, pre.topk(3).indices, pre.topk(3).values.relu())
    torch.testing.assert_close(cc.encode([xa, xb]), codes)
    out = cc([xa, xb])
    for m, (x, s) in enumerate(zip((xa, xb), (0.5, 2.0))):
        x_hat = (codes @ cc.W_dec[:, cc.slices[m]] + cc.b_dec[cc.slices[m]]) / s
        torch.testing.assert_close(out.x_hat[m], x_hat)
        fvu = ((x_hat - x) * s).pow(2).sum() / ((x - x.mean(0)) * s).pow(2).sum()
        torch.testing.assert_close(out.fvu[m], fvu)
    if arch == "l1":  # Anthropic: L1 weighted by the *sum* of per-model decoder norms, not the concatenated norm
        norms = cc.W_dec[:, :5].norm(dim=1) + cc.W_dec[:, 5:].norm(dim=1)
        torch.testing.assert_close(out.l1_loss, (codes * norms).sum(1).mean())
        torch.testing.assert_close(out.loss, out.mse.sum() + 0.7 * out.l1_loss)
    else:
        torch.testing.assert_close(out.loss, out.fvu.sum())
    r = relative_norm(cc)
    na, nb = cc.W_dec[:, :5].norm(dim=1), cc.W_dec[:, 5:].norm(dim=1)
    np.testing.assert_allclose(r, (na / (na + nb)).detach().numpy(), rtol=1e-5)


# --- resume and files ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "l1"])
def test_resume_is_bit_identical(tmp_path, arch):
    xa, xb, _, _ = planted_pair(n=3000)
    ps = PairedStreams.from_arrays([xa, xb], ["a", "b"])
    cfg = small_cfg(arch, steps=40, checkpoint_every=15, dead_tokens_threshold=512)
    straight = train_crosscoder(ps, cfg, tmp_path / "straight", progress=False)
    part = train_crosscoder(ps, cfg, tmp_path / "resumed", progress=False, max_steps=22)
    assert (tmp_path / "resumed" / "checkpoint.safetensors").is_file() and not (tmp_path / "resumed" / "cfg.json").exists()
    assert not torch.equal(part.W_dec, straight.W_dec)
    resumed = train_crosscoder(ps, cfg, tmp_path / "resumed", resume=True, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert (tmp_path / "straight" / "training_log.jsonl").read_text() == (tmp_path / "resumed" / "training_log.jsonl").read_text()
    assert not (tmp_path / "resumed" / "checkpoint.safetensors").exists()
    # A checkpoint of another run (other seed) is refused, naming the difference.
    train_crosscoder(ps, cfg, tmp_path / "other", progress=False, max_steps=15)
    with pytest.raises(ValueError, match="different run.*seed"):
        train_crosscoder(ps, small_cfg(arch, steps=40, checkpoint_every=15, seed=1), tmp_path / "other", resume=True, progress=False)


def test_save_load_round_trip_and_clear_errors(tmp_path):
    cc = tiny_cc("topk")
    save_crosscoder(cc, tmp_path / "cc")
    cfg = json.loads((tmp_path / "cc" / "cfg.json").read_text())
    assert cfg["format"] == "crossdict-crosscoder" and [s["name"] for s in cfg["streams"]] == ["a:1", "b:2"]
    back = load_crosscoder(tmp_path / "cc")
    x = [torch.randn(9, 5), torch.randn(9, 7)]
    for a, b in zip(cc.decode(cc.encode(x)), back.decode(back.encode(x))):
        torch.testing.assert_close(a, b)

    with pytest.raises(CrosscoderFormatError, match="no crosscoder at"):
        load_crosscoder(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    save_crosscoder(cc, bad)
    (bad / "digests.json").unlink()  # hand-edited below: the format checks, not the digests, are under test
    (bad / "cfg.json").write_text(json.dumps({**cfg, "d_latent": 13}))
    with pytest.raises(CrosscoderFormatError, match=r"'b_enc' has shape \[12\], expected \[13\]"):
        load_crosscoder(bad)
    (bad / "cfg.json").write_text(json.dumps({**cfg, "format": "crossdict-sae"}))
    with pytest.raises(CrosscoderFormatError, match="expected 'crossdict-crosscoder'"):
        load_crosscoder(bad)
    (bad / "cfg.json").write_text(json.dumps({**cfg, "streams": cfg["streams"][:1]}))
    with pytest.raises(CrosscoderFormatError, match="at least 2 activation streams"):
        load_crosscoder(bad)
    (bad / "cfg.json").write_text('{"format": "crossdict-cross')
    with pytest.raises(CrosscoderFormatError, match="not valid JSON"):
        load_crosscoder(bad)
    (bad / "crosscoder_weights.safetensors").unlink()
    with pytest.raises(CrosscoderFormatError, match="crosscoder file missing: .*crosscoder_weights.safetensors"):
        load_crosscoder(bad)


# --- bad inputs ----------------------------------------------------------------------------------


def test_one_stream_and_unequal_rows_are_refused():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match=r"at least 2 activation streams.*got 1: \['a:8'\]"):
        PairedStreams.from_arrays([x], ["a:8"])
    with pytest.raises(ValueError, match="at least 2 activation streams"):
        Crosscoder(CrosscoderSpec("topk", [StreamInfo("a:8", 4)], 8, 2))
    with pytest.raises(ValueError, match="same number of rows.*a:8: 10, b:5: 9"):
        PairedStreams.from_arrays([x, x[:9]], ["a:8", "b:5"])
    cc = tiny_cc()
    with pytest.raises(ValueError, match=r"same number of rows, got \[4, 3\]"):
        cc.encode([torch.zeros(4, 5), torch.zeros(3, 7)])


def test_anchor_pairs_from_another_run_are_refused(tmp_path):
    write_synthetic_cache(tmp_path / "cache", n_passages=20, tokens=10)
    cache = ActivationCache(tmp_path / "cache")
    own = streams_from_cache(cache, [("a", 1), ("b", 2)], "train")
    assert own.n == len(cache.anchor_pairs("train")) and own.names == ["a:1", "b:2"]
    pairs = cache.anchor_pairs("all")
    with pytest.raises(ValueError, match="at least 2 activation streams"):
        streams_from_cache(cache, [("a", 1)])
    shifted = pairs.copy()
    shifted[:, 1] = np.roll(shifted[:, 1], 1)  # every A token paired with the B token before it
    with pytest.raises(ValueError, match="did not read the same characters.*different run"):
        streams_from_cache(cache, [("a", 1), ("b", 2)], pairs=shifted)
    with pytest.raises(ValueError, match="index row 200 of model a.*different run"):
        streams_from_cache(cache, [("a", 1), ("b", 2)], pairs=np.vstack([pairs, [[200, 0]]]))
    streams_from_cache(cache, [("a", 1), ("b", 2)], pairs=pairs[::2])  # a genuine subset of this run's anchors is fine


# --- the stage ------------------------------------------------------------------------------------


def stage_config(tmp_path, **cc):
    return config_from_dict({
        "run_name": "toy", "output_dir": str(tmp_path / "runs"),
        "model_a": {"name": "toy-a", "layers": [1, 3]}, "model_b": {"name": "toy-b", "layers": [2, 4]},
        "sae": {"k": 4, "expansion_factor": 2, "max_norm_ratio": 0},
        "crosscoder": {"enabled": True, "expansion_factor": 2, "batch_size": 256, "train_tokens": 256 * 30, "lr": 3e-3,
                       "dead_tokens_threshold": 2000, "aux_k": 8, "checkpoint_every": 10, **cc},
    })


def test_stage_writes_files_reuses_and_scores_agreement_with_sae_matches(tmp_path):
    from crossdict.align import fit_maps, map_dir
    from crossdict.report import _crosscoder_section
    from crossdict.sae import SAE, SAESpec, save_sae

    cfg = stage_config(tmp_path)
    write_synthetic_cache(cfg.cache_dir)
    summary = run_crosscode(cfg, layer_pairs=[(1, 2)], progress=False)
    out = cfg.run_dir / "crosscoder" / "1_2"
    cc = load_crosscoder(out)
    assert cc.spec.k == 4 and cc.d_latent == 48 and [s.name for s in cc.spec.streams] == ["a:1", "b:2"]
    p = summary["pairs"][0]
    assert p["n_shared"] + p["n_a_only"] + p["n_b_only"] + p["n_dead"] == 48
    assert 0 < p["fvu_a"] < 1 and 0 < p["fvu_b"] < 1 and p["l0"] <= 4
    assert p["agreement"] is None and p["has_procrustes"] is False  # no SAEs, no maps yet: reported as missing
    rows = list(csv.DictReader((cfg.report_dir / "crosscoder.csv").open()))
    assert len(rows) == 48 and rows[0]["class"] in ("shared", "a_only", "b_only", "dead")

    # Now the post-hoc route: SAEs whose features 0..L-1 are the crosscoder's own decoder rows (so the nearest SAE
    # feature of latent i is i on both sides), matches that pair i <-> i for even latents only, and a Procrustes map.
    L = cc.d_latent
    for key, m in (("a", 0), ("b", 1)):
        d = cc.spec.streams[m].d_in
        sae = SAE(SAESpec("topk", d, L + 8, k=4))
        with torch.no_grad():
            sae.W_dec[:L] = cc.decoder(m)
            sae.W_dec[L:] = 0.01 * torch.randn(8, d)
        save_sae(sae, cfg.sae_dir(key, 1 if key == "a" else 2))
    cfg.report_dir.mkdir(parents=True, exist_ok=True)
    with (cfg.report_dir / "feature_matches.csv").open("w") as f:
        f.write("layer_a,layer_b,feat_a,feat_b,method,act_corr,dec_cos,freq_a,freq_b,p_value,q_value,stability\n")
        for i in range(L):
            f.write(f"1,2,{i},{i},hungarian,0.5,0.1,0.1,0.1,0.001,{0.01 if i % 2 == 0 else 0.5},1\n")
            f.write(f"1,2,{i},{(i + 1) % L},mnn,0.5,0.1,0.1,0.1,0.001,0.01,1\n")  # other methods do not count
    xa, xb, _ = ActivationCache(cfg.cache_dir).paired_acts(1, 2, "train")
    fit_maps(xa, xb, ["procrustes"])["procrustes"].save(map_dir(cfg.run_dir, 1, 2))

    p = run_crosscode(cfg, layer_pairs=[(1, 2)], progress=False)["pairs"][0]
    assert torch.equal(load_crosscoder(out).W_dec, cc.W_dec)  # reused, not retrained
    rows = list(csv.DictReader((cfg.report_dir / "crosscoder.csv").open()))
    shared = [r for r in rows if r["class"] == "shared"]
    assert shared, "the toy pair should have shared latents"
    assert all(int(r["sae_feat_a"]) == int(r["latent"]) == int(r["sae_feat_b"]) for r in rows)
    expect = np.mean([int(r["latent"]) % 2 == 0 for r in shared])
    assert p["agreement"] == pytest.approx(expect)
    assert all(r["matched_sae_pair"] == str(int(int(r["latent"]) % 2 == 0)) for r in rows)
    assert 0 <= p["agreement_null"] < 1 and p["n_sig_sae_pairs"] == L // 2
    assert all(np.isfinite(float(r["dec_cos_mapped"])) for r in rows) and p["has_procrustes"]
    assert p["sae_fvu_a_same_rows"] > 0.9  # those toy SAEs reconstruct nothing (encoder untrained): the comparison is live
    html = _crosscoder_section(cfg)
    assert 'id="crosscoder"' in html and "data:image/png;base64," in html and f"{p['n_shared']} / {p['n_a_only']}" in html


def test_config_switch_adds_the_stage_only_when_enabled(tmp_path):
    from crossdict.pipeline import stages

    names = [s.name for s in stages(stage_config(tmp_path, enabled=False))]
    assert names == ["extract", "train", "align", "transfer", "report"]
    st = stages(stage_config(tmp_path))
    assert [s.name for s in st] == ["extract", "train", "align", "transfer", "crosscoder", "report"] and "crosscoder" in st[-1].upstream
    from crossdict.config import ConfigError

    with pytest.raises(ConfigError, match="crosscoder.exclusive_r: 0.6 is out of range"):
        stage_config(tmp_path, exclusive_r=0.6)
    with pytest.raises(ConfigError, match="unknown config key 'crosscoder.expansion'"):
        stage_config(tmp_path, expansion=2)


def test_analyse_without_sae_route_leaves_columns_empty():
    cc = tiny_cc()
    cols, summary = analyse(cc, np.r_[np.zeros(2), np.full(10, 0.1)], 0.1, SAEContext())
    assert (cols["class"][:2] == "dead").all() and summary["n_dead"] == 2
    assert np.isnan(cols["dec_cos_mapped"]).all() and (cols["matched_sae_pair"] == -1).all() and np.isnan(summary["agreement"])
    assert sum(summary["r_histogram"]["counts"]) == 10


def test_cli_crosscode(tmp_path, capsys):
    import yaml

    from crossdict.cli import main

    cfg = stage_config(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["crosscode", "--config", str(path), "--no-progress"]) == 1  # no cache yet: a clear error, no traceback
    assert "crossdict crosscode: error:" in capsys.readouterr().err
    write_synthetic_cache(cfg.cache_dir)
    assert main(["crosscode", "--config", str(path), "--no-progress", "--set", "crosscoder.train_tokens=2560"]) == 0
    summary = json.loads((cfg.report_dir / "crosscoder_summary.json").read_text())
    assert [(p["layer_a"], p["layer_b"]) for p in summary["pairs"]] == [(1, 2), (3, 4)]
    assert all(p["train_tokens"] == 2560 for p in summary["pairs"])
    assert (cfg.run_dir / "crosscoder" / "3_4" / "crosscoder_weights.safetensors").is_file()


def test_heldout_fvu_is_whole_set_per_stream_in_any_block_size():
    cc = tiny_cc()
    g = np.random.default_rng(5)
    xa = (g.standard_normal((300, 5)) + 40.0).astype(np.float32)  # a large mean: naive sum-of-squares would cancel
    xb = (3 * g.standard_normal((300, 7))).astype(np.float32)
    ps = PairedStreams.from_arrays([xa, xb], ["a:1", "b:2"])
    x_hat = [t.detach().double().numpy() for t in cc.decode(cc.encode([torch.from_numpy(xa), torch.from_numpy(xb)]))]
    want = [((h - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum() for h, x in zip(x_hat, (xa.astype(np.float64), xb.astype(np.float64)))]
    for block in (300, 64, 7):
        ev = evaluate_crosscoder(cc, ps, block_rows=block)
        np.testing.assert_allclose([ev["fvu"]["a:1"], ev["fvu"]["b:2"]], want, rtol=1e-5)
        assert ev["l0"] == pytest.approx(3.0, abs=0.5) and ev["n_pairs"] == 300


def test_stage_reads_the_cache_row_mask_spikes_and_sink_left_out(tmp_path, monkeypatch):
    """Issue 18: the crosscoder trains and scores on the rows the cache's row mask keeps (massive activations
    *and* the attention sink of a model without BOS), not on a threshold of its own."""
    import crossdict.crosscoder as cc_mod
    from crossdict.cache import CACHE_FORMAT, ShardData, write_manifest, write_row_masks, write_shard

    rng = np.random.default_rng(0)
    n_pass, per = 60, 25
    pid = np.repeat(np.arange(n_pass), per)
    n = len(pid)
    pos = np.tile(np.arange(per), n_pass)  # B has no BOS: its position-0 rows are the attention sink
    z = rng.standard_normal((n, 8))
    xa = (z @ rng.standard_normal((8, 24)) + 0.2 * rng.standard_normal((n, 24))).astype(np.float32)
    xb = (z @ rng.standard_normal((8, 16)) + 0.2 * rng.standard_normal((n, 16))).astype(np.float32)
    spike = rng.choice(np.nonzero(pos > 0)[0], n // 100, replace=False)
    xa[spike] *= 200 * np.median(np.linalg.norm(xa, axis=1)) / np.linalg.norm(xa[spike], axis=1, keepdims=True)
    tok = np.stack([pid, pos, pos * 4, pos * 4 + 4, rng.integers(0, 1000, n), (pid % 5 == 0).astype(int)], 1)
    write_shard(tmp_path / "runs" / "toy" / "cache", 0,
                ShardData({"a": tok, "b": tok.copy()}, {"a": {1: xa}, "b": {2: xb}}, np.stack([np.arange(n)] * 2, 1)))
    cfg = stage_config(tmp_path)
    cfg.sae.max_norm_ratio = 10.0
    write_manifest(cfg.cache_dir, {"format": CACHE_FORMAT, "version": 1, "complete": True, "n_shards": 1, "models": {
        "a": {"name": "toy-a", "d_model": 24, "layers": [1]}, "b": {"name": "toy-b", "d_model": 16, "layers": [2], "bos": False}}})
    write_row_masks(ActivationCache(cfg.cache_dir), 10.0)
    cache = ActivationCache(cfg.cache_dir)
    masked = np.zeros(n, bool)
    masked[spike] = True
    masked |= pos == 0
    assert (~cache.row_mask("a", 1) | ~cache.row_mask("b", 2)).sum() == masked.sum()  # the fixture masks what it plants

    seen = {}
    real_train, real_eval = cc_mod.train_crosscoder, cc_mod.evaluate_crosscoder
    monkeypatch.setattr(cc_mod, "train_crosscoder", lambda ps, *a, **k: seen.setdefault("train", ps) and real_train(ps, *a, **k))
    monkeypatch.setattr(cc_mod, "evaluate_crosscoder", lambda c, ps, *a, **k: seen.setdefault("heldout", ps) and real_eval(c, ps, *a, **k))
    p = run_crosscode(cfg, layer_pairs=[(1, 2)], progress=False)["pairs"][0]
    held = tok[:, 5] == 1
    for split, want in (("train", ~held & ~masked), ("heldout", held & ~masked)):
        rows = seen[split].rows[:, 0]
        assert not masked[rows].any(), f"{split}: masked rows reached the crosscoder"
        assert set(rows.tolist()) == set(np.nonzero(want)[0].tolist())  # and every kept row did
    assert p["n_train_pairs"] == int((~held & ~masked).sum()) and p["n_heldout_pairs"] == int((held & ~masked).sum())
    assert p["excluded_frac_heldout"] == pytest.approx((held & masked).sum() / held.sum())
