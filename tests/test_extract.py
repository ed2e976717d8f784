"""Extraction end to end on two tiny local models: counts, anchors, resume, reuse, refusal, corruption."""

import numpy as np
import pytest

from crossdict.cache import ActivationCache, CacheMismatchError, shard_dir
from crossdict.config import config_from_dict
from crossdict.extract import run_extract


def make_cfg(tiny_models, tmp_path, **corpus):
    text = tmp_path / "corpus.txt"
    if not text.exists():
        from conftest import corpus_texts

        text.write_text("\n\n".join(corpus_texts(400)))
    return config_from_dict({
        "run_name": "tiny", "output_dir": str(tmp_path / "runs"),
        "model_a": {"name": str(tiny_models["gpt2"]), "layers": [1, 2], "max_ctx": 48},
        "model_b": {"name": str(tiny_models["llama"]), "layers": [0, 2], "max_ctx": 40},
        "corpus": {"source": str(text), "max_passages": 60, "passage_chars": 400, **corpus},
        "extract": {"batch_size": 8, "shard_passages": 16},
        "align": {"min_passages": 5},  # 9 of the 60 passages are held out; extraction checks the splits up front
    })


def test_extract_counts_and_anchors(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path)
    cache = run_extract(cfg, progress=False)
    m = cache.manifest
    assert m["complete"] and m["n_shards"] == 4
    toks_a, toks_b = cache.tokens("a"), cache.tokens("b")
    assert len(toks_a) == m["counts"]["n_tokens_a"] == cache.acts("a", 1).shape[0]
    assert cache.acts("b", 2).shape == (len(toks_b), 48)
    # Token index: no BOS rows, positions below max_ctx, spans inside the passage.
    assert (toks_a[:, 3] > 0).all() and (toks_b[:, 1] >= 1).all()  # llama rows start after BOS
    assert toks_a[:, 1].max() < 48 and toks_b[:, 1].max() < 40
    # Anchors: same passage, same end offset, pairing rate well above zero.
    pairs = cache.anchor_pairs()
    assert (toks_a[pairs[:, 0], 0] == toks_b[pairs[:, 1], 0]).all()
    assert (toks_a[pairs[:, 0], 3] == toks_b[pairs[:, 1], 3]).all()
    assert m["counts"]["pairing_rate"] > 0.3
    # Both models read the same characters: the last character each saw is the same per passage.
    texts = cache.passage_texts()
    for pid in np.unique(toks_a[:, 0])[:10]:
        assert toks_a[toks_a[:, 0] == pid, 3].max() == toks_b[toks_b[:, 0] == pid, 3].max()
        # The stored text is what was read: every span lies inside it, the last one ends at its end.
        assert texts[pid][toks_a[toks_a[:, 0] == pid, 3].max():].strip() == ""
    assert set(texts) == set(np.unique(toks_a[:, 0]).tolist())
    # Splits partition the anchors and follow passages.
    tr, ho = cache.anchor_pairs("train"), cache.anchor_pairs("heldout")
    assert len(tr) + len(ho) == len(pairs) and len(ho) > 0
    assert not set(toks_a[tr[:, 0], 0]) & set(toks_a[ho[:, 0], 0])
    xa, xb, pid = cache.paired_acts(1, 2, "heldout")
    assert xa.shape == (len(ho), 32) and xb.shape == (len(ho), 48) and len(pid) == len(ho)


def test_stored_states_equal_a_fresh_forward(tiny_models, tmp_path):
    from crossdict.extract import truncate_to_common, load_backends
    from crossdict.corpus import passages

    cfg = make_cfg(tiny_models, tmp_path)
    cache = run_extract(cfg, progress=False)
    backends = load_backends(cfg)
    texts = truncate_to_common(passages(cfg.corpus), backends, {"a": 48, "b": 40})
    b = backends["b"]
    batch = b.tokenize([texts[3]], 40)
    state = b.hidden_states(batch, [2])[2][0, batch.is_content[0]]
    toks = cache.tokens("b")
    rows = np.nonzero(toks[:, 0] == 3)[0]
    np.testing.assert_allclose(cache.acts("b", 2).take(rows), state.numpy(), atol=1e-5)


def test_resume_reuse_and_mismatch(tiny_models, tmp_path, capsys):
    cfg = make_cfg(tiny_models, tmp_path)
    run_extract(cfg, progress=False)
    before = np.array(ActivationCache(cfg.cache_dir).acts("a", 2).take(np.arange(50)))
    # Second run: reused, nothing recomputed.
    run_extract(cfg, progress=False)
    assert "reusing complete cache" in capsys.readouterr().out
    # Simulate a crash during shard 2: marker gone, manifest incomplete -> only shard 2 redone.
    (shard_dir(cfg.cache_dir, 2) / "done.json").unlink()
    import json

    from crossdict.cache import write_manifest

    man = json.loads((cfg.cache_dir / "manifest.json").read_text())
    man["complete"] = False
    write_manifest(cfg.cache_dir, man)  # as extraction writes it (a hand edit would fail its digest)
    with pytest.raises(ValueError, match="incomplete"):
        ActivationCache(cfg.cache_dir)
    mtime0 = (shard_dir(cfg.cache_dir, 0) / "a.tokens.npy").stat().st_mtime_ns
    cache = run_extract(cfg, progress=False)
    assert (shard_dir(cfg.cache_dir, 0) / "a.tokens.npy").stat().st_mtime_ns == mtime0
    np.testing.assert_array_equal(cache.acts("a", 2).take(np.arange(50)), before)
    # A config that changes what would be cached is refused with the differing keys named.
    other = make_cfg(tiny_models, tmp_path, max_passages=30)
    with pytest.raises(CacheMismatchError, match=r"corpus.max_passages: cache has 60, config asks 30") as err:
        run_extract(other, progress=False)
    assert f"rm -r {cfg.cache_dir}" in str(err.value) and "--set run_name=" in str(err.value)  # the way past it (README)
    import shutil

    shutil.rmtree(cfg.cache_dir)  # ... which works: the new config extracts
    assert ActivationCache(run_extract(other, progress=False).dir).manifest["counts"]["n_passages"] <= 30


def test_truncated_cache_file(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path)
    run_extract(cfg, progress=False)
    f = shard_dir(cfg.cache_dir, 1) / "b.blocks.2.hook_resid_post.npy"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"b.blocks.2.hook_resid_post.npy is corrupt \(truncated: 1000 bytes"):
        ActivationCache(cfg.cache_dir).acts("b", 2)


def test_layer_out_of_range_before_loading(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path)
    cfg.model_b.layers = [0, 3]
    with pytest.raises(ValueError, match="which has 3 layers"):
        run_extract(cfg, progress=False)


def test_random_floor_and_layer_sweep(tiny_models, tmp_path, capsys):
    from crossdict.extract import LAYER_SWEEP, RANDOM_CACHE

    cfg = make_cfg(tiny_models, tmp_path)
    cache = run_extract(cfg, progress=False)
    # Floor: same tokens and anchors as the main cache, B's states from other (random) weights.
    rc = ActivationCache(cfg.run_dir / RANDOM_CACHE)
    np.testing.assert_array_equal(rc.anchor_pairs("heldout"), cache.anchor_pairs("heldout"))
    np.testing.assert_array_equal(rc.tokens("b"), cache.tokens("b"))
    main_b, rand_b = cache.acts("b", 2).take(np.arange(200)), rc.acts("b", 2).take(np.arange(200))
    assert rand_b.shape == main_b.shape and np.abs(rand_b - main_b).mean() > 0.1 * np.abs(main_b).mean()
    # Sweep: every layer, and at the cached layers exactly the cached states at the same anchors.
    sweep = cfg.cache_dir / LAYER_SWEEP
    xa, xb, pid = np.load(sweep / "a.npy"), np.load(sweep / "b.npy"), np.load(sweep / "passage_id.npy")
    n_layers = [cache.model_info(k)["n_layers"] for k in ("a", "b")]
    assert xa.shape[:2] == (n_layers[0], len(pid)) and xb.shape[:2] == (n_layers[1], len(pid)) and len(pid) > 0
    ho = cache.anchor_pairs("heldout")
    first = pid[0]
    rows = ho[cache.tokens("a")[ho[:, 0], 0] == first]
    n = len(rows)
    np.testing.assert_allclose(xa[2, :n], cache.acts("a", 2).take(rows[:, 0]), atol=1e-5)
    np.testing.assert_allclose(xb[0, :n], cache.acts("b", 0).take(rows[:, 1]), atol=1e-5)
    # A second run reuses both without loading a model.
    capsys.readouterr()
    run_extract(cfg, progress=False)
    assert "loaded" not in capsys.readouterr().out


def test_one_extract_loads_each_model_once(tiny_models, tmp_path, monkeypatch):
    """Main cache, random floor and sweep share one load (issue 14/15: it used to load both models twice)."""
    import crossdict.extract as ex

    calls = []
    real = ex.load_backends
    monkeypatch.setattr(ex, "load_backends", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = make_cfg(tiny_models, tmp_path)
    run_extract(cfg, progress=False)
    assert (cfg.run_dir / ex.RANDOM_CACHE / "manifest.json").is_file() and (cfg.cache_dir / ex.LAYER_SWEEP).is_dir()
    assert len(calls) == 1
