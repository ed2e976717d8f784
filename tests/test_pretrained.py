"""Pretrained SAEs in: SAELens (trained by SAELens's own trainer), sparsify, dictionary_learning, the registry."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from crossdict.pretrained import PretrainedSAEError, open_source, pretrained_layers
from saelens_fixtures import train_saelens_sae


@pytest.fixture(scope="module")
def pretrained_run(tiny_models, tmp_path_factory, one_thread):
    """A pretrained (SAELens TopK, both layers), B mixed: layer 1 SAELens JumpReLU, layer 2 trained by crossdict."""
    from crossdict.cache import ActivationCache
    from crossdict.extract import run_extract
    from crossdict.pipeline import run_all
    from test_pipeline import tiny_run_config

    tmp = tmp_path_factory.mktemp("pretrained")
    base = tiny_run_config(tiny_models, tmp)
    run_extract(base, progress=False)
    cache = ActivationCache(base.cache_dir)
    dirs = {}
    for key, layer, arch in (("a", 1, "topk"), ("a", 3, "topk"), ("b", 1, "jumprelu")):
        X = torch.from_numpy(np.asarray(cache.acts(key, layer).take(cache.rows(key, "train")), np.float32))
        d = cache.d_model(key)
        dirs[(key, layer)] = train_saelens_sae(X, arch, tmp / f"saelens_{key}{layer}", f"blocks.{layer}.hook_resid_post",
                                               2 * d, k=4, steps=40)
    data = base.to_dict()
    data["model_a"]["sae_source"] = {1: str(dirs[("a", 1)]), 3: str(dirs[("a", 3)])}
    data["model_b"]["sae_source"] = {1: str(dirs[("b", 1)])}
    from crossdict.config import config_from_dict

    cfg = config_from_dict(data)
    status = run_all(cfg, progress=False)
    return cfg, status, dirs, cache


def test_run_with_saelens_trained_saes_completes_and_lists_matches(pretrained_run):
    cfg, status, dirs, _ = pretrained_run
    assert status["train"] == "ran" and status["report"] == "ran"
    assert [(k, la) for k, la, _ in pretrained_layers(cfg)] == [("a", 1), ("a", 3), ("b", 1)]
    # Pretrained SAEs were recorded, not trained; B layer 2 was trained by crossdict.
    for (k, la) in dirs:
        rec = json.loads((cfg.sae_dir(k, la) / "pretrained.json").read_text())
        assert rec["source"] == str(dirs[(k, la)]) and rec["hook_name"] == f"blocks.{la}.hook_resid_post"
        assert not (cfg.sae_dir(k, la) / "crossdict.json").exists()
    assert (cfg.sae_dir("b", 2) / "crossdict.json").is_file()
    rows = list(csv.DictReader((cfg.report_dir / "sae_metrics.csv").open()))
    assert [r["seed"] for r in rows] == ["pretrained", "pretrained", "pretrained", "0"]
    assert rows[0]["architecture"] == "topk (saelens)" and rows[2]["architecture"] == "jumprelu (saelens)"
    assert float(rows[0]["fvu"]) < 1.0 and abs(float(rows[0]["l0"]) - 4.0) < 1e-6  # TopK k=4
    matches = list(csv.DictReader((cfg.report_dir / "feature_matches.csv").open()))
    for la, lb in cfg.layer_pairs:  # one-to-one matches over the pretrained (and the mixed) dictionaries
        hung = [m for m in matches if m["method"] == "hungarian" and (m["layer_a"], m["layer_b"]) == (str(la), str(lb))]
        assert len(hung) == min(2 * 32, 2 * 48 if lb == 1 else 2 * 48), (la, lb, len(hung))
        assert all(0 <= float(m["q_value"]) <= 1 for m in hung)
    sig = [m for m in matches if m["method"] == "hungarian" and float(m["q_value"]) < cfg.align.q_threshold]
    assert sig, "no significant matches"
    html = (cfg.report_dir / "index.html").read_text()
    assert 'id="browser"' in html and f'{sig[0]["feat_a"]}' in html


def test_codes_and_reconstructions_equal_saelens_on_heldout_rows(pretrained_run):
    from sae_lens import SAE

    from crossdict.sae import load_sae

    cfg, _, dirs, cache = pretrained_run
    for (k, la), d in dirs.items():
        ours = load_sae(cfg.sae_dir(k, la))  # what every later stage gets
        ref = SAE.load_from_disk(str(d))
        x = torch.from_numpy(np.asarray(cache.acts(k, la).take(cache.rows(k, "heldout")[:300]), np.float32))
        with torch.no_grad():
            codes_ref = ref.encode(x)
            rec_ref = ref.decode(codes_ref)
        codes = ours.encode(x)
        assert codes.shape == codes_ref.shape and (codes_ref > 0).any()
        assert torch.allclose(codes, codes_ref, atol=1e-5, rtol=0)
        assert torch.allclose(ours.decode(codes), rec_ref, atol=1e-5, rtol=0)
        assert torch.equal(ours.W_dec, ref.W_dec)


def test_corrupted_weights_fail_the_train_stage_and_overwrite_nothing(pretrained_run, capsys):
    from crossdict.pipeline import run_all

    cfg, _, dirs, _ = pretrained_run
    watched = [cfg.report_dir / f for f in ("index.html", "feature_matches.csv", "metrics.csv", "sae_metrics.csv")]
    before = {p: p.read_bytes() for p in watched}
    w = dirs[("a", 3)] / "sae_weights.safetensors"
    good = w.read_bytes()
    try:
        w.write_bytes(good[: len(good) // 2])
        with pytest.raises(PretrainedSAEError, match="saelens_a3.*could not load"):
            run_all(cfg, progress=False)
        assert {p: p.read_bytes() for p in watched} == before
    finally:
        w.write_bytes(good)


def test_sparsify_checkpoint_written_by_sparsify_loads_and_matches(tmp_path, one_thread):
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    sc = sparsify.SparseCoder(24, sparsify.SparseCoderConfig(expansion_factor=4, k=5))
    with torch.no_grad():
        sc.b_dec.normal_()
        sc.encoder.bias.normal_(0, 0.1)
    sc.save_to_disk(tmp_path / "layers.2")  # sparsify names the directory by hookpoint: output of model.layers[2]
    sae, _, kind = open_source(str(tmp_path / "layers.2"), 2, 24, "test")
    assert kind == "sparsify" and sae.d_sae == 96
    x = torch.randn(50, 24)
    out = sc.encode(x)
    dense = torch.zeros(50, 96).scatter_(1, out.top_indices, out.top_acts)
    assert torch.allclose(sae.encode(x), dense, atol=1e-5)
    with torch.no_grad():
        ref = sc.decode(out.top_acts, out.top_indices)
    assert torch.allclose(sae.decode(sae.encode(x)), ref, atol=1e-5)
    with pytest.raises(PretrainedSAEError, match=r"output of block 2 .*configured for layer 3.*hidden_states\[4\]"):
        open_source(str(tmp_path / "layers.2"), 3, 24, "test")


def _dictionary_learning_checkpoint(path, d_in=20, d_sae=40, layer=1):
    """An `AutoEncoder` checkpoint as dictionary_learning saves it (dictionary.py: state_dict of the module,
    trainer config in config.json); written by hand, the package pins nnsight<0.4 and would not install here."""
    g = torch.Generator().manual_seed(1)
    sd = {"bias": torch.randn(d_in, generator=g), "encoder.weight": torch.randn(d_sae, d_in, generator=g) * 0.3,
          "encoder.bias": torch.randn(d_sae, generator=g) * 0.1, "decoder.weight": torch.randn(d_in, d_sae, generator=g)}
    path.mkdir(parents=True)
    torch.save(sd, path / "ae.pt")
    (path / "config.json").write_text(json.dumps({
        "trainer": {"dict_class": "AutoEncoder", "trainer_class": "StandardTrainer", "activation_dim": d_in,
                    "dict_size": d_sae, "layer": layer, "lm_name": "EleutherAI/pythia-70m-deduped",
                    "submodule_name": f"resid_post_layer_{layer}"},
        "buffer": {"d_submodule": d_in, "ctx_len": 128}}))
    return sd


def test_dictionary_learning_checkpoint_loads_and_matches(tmp_path):
    sd = _dictionary_learning_checkpoint(tmp_path / "ae")
    sae, _, kind = open_source(str(tmp_path / "ae"), 1, 20, "test")
    assert kind == "dictionary_learning" and sae.spec.architecture == "standard"
    x = torch.randn(64, 20)
    f = torch.relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])  # AutoEncoder.encode
    assert (f > 0).any() and torch.allclose(sae.encode(x), f, atol=1e-5)
    assert torch.allclose(sae.decode(f), f @ sd["decoder.weight"].T + sd["bias"], atol=1e-5)  # AutoEncoder.decode
    with pytest.raises(PretrainedSAEError, match="d_in=20 but the model's residual stream has d_model=32"):
        open_source(str(tmp_path / "ae"), 1, 32, "test")
    (tmp_path / "ae" / "ae.pt").write_bytes(b"not a zip")
    with pytest.raises(PretrainedSAEError, match=r"ae.pt: unreadable with torch.load\(weights_only=True\)"):
        open_source(str(tmp_path / "ae"), 1, 20, "test")


def test_hook_mismatches_are_clear(tmp_path):
    from crossdict.pretrained import check_hook, hook_layer

    assert hook_layer("blocks.4.hook_resid_post") == 4 and hook_layer("blocks.5.hook_resid_pre") == 4
    assert hook_layer("model.layers.4") == 4 and hook_layer("layers.4") == 4 and hook_layer("blocks.4.hook_mlp_out") is None
    with pytest.raises(PretrainedSAEError, match="not a residual-stream hook"):
        check_hook("blocks.4.hook_mlp_out", 4, "x")
    with pytest.raises(PretrainedSAEError, match=r"blocks.5.hook_resid_post.*hidden_states\[6\].*layer 4"):
        check_hook("blocks.5.hook_resid_post", 4, "x")


def test_registry_unknown_release_and_id_and_offline_message(monkeypatch):
    with pytest.raises(PretrainedSAEError, match=r"release 'gemma-scope-2-270m-pt-rez' is not in .*closest: \['gemma-scope-2-270m-pt-res"):
        open_source("saelens:gemma-scope-2-270m-pt-rez/layer_5_width_16k_l0_small", 5, 640, "test")
    with pytest.raises(PretrainedSAEError) as e:
        open_source("saelens:gemma-scope-2-270m-pt-res/layer_13_width_16k_l0_small", 13, 640, "test")
    assert "has no SAE id 'layer_13_width_16k_l0_small'" in str(e.value)
    assert "layer_12_width_16k_l0_small, " in str(e.value) and "layer_9_width_65k_l0_small" in str(e.value)  # the id list
    import time

    t0 = time.perf_counter()
    with pytest.raises(PretrainedSAEError) as e:
        open_source("saelens:gemma-scope-2-270m-pt-res-all/layer_13_width_16k_l0_small", 13, 640, "test")
    msg = str(e.value)
    assert time.perf_counter() - t0 < 30
    for part in ("release 'gemma-scope-2-270m-pt-res-all'", "hook blocks.13.hook_resid_post", "'google/gemma-scope-2-270m-pt'",
                 "huggingface-cli download google/gemma-scope-2-270m-pt --include 'resid_post_all/layer_13_width_16k_l0_small/*'",
                 "HF_HUB_OFFLINE"):
        assert part in msg, (part, msg)


def test_config_accepts_a_string_or_a_layer_mapping(tiny_models, tmp_path):
    from crossdict.config import ConfigError, config_from_dict
    from test_pipeline import tiny_run_config

    data = tiny_run_config(tiny_models, tmp_path).to_dict()
    data["model_b"]["sae_source"] = {2: "some/dir"}
    cfg = config_from_dict(data)
    assert pretrained_layers(cfg) == [("b", 2, "some/dir")]
    data["model_b"]["sae_source"] = {7: "some/dir"}
    with pytest.raises(ConfigError, match=r"sae_source names layers \[7\]"):
        config_from_dict(data)
    data["model_b"]["sae_source"] = 3
    with pytest.raises(ConfigError, match="sae_source"):
        config_from_dict(data)
