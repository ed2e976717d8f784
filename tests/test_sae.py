"""SAE stage: planted-feature recovery, exact resume, SAELens format, bad inputs, LM-loss recovered."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crossdict import train as train_mod  # noqa: E402
from crossdict.backend import Batch  # noqa: E402
from crossdict.cache import CACHE_FORMAT, ActivationCache, ShardData, write_manifest, write_shard  # noqa: E402
from crossdict.config import ModelConfig, RunConfig, SAEConfig  # noqa: E402
from crossdict.sae import SAE, SAEFormatError, SAESpec, load_sae, save_sae  # noqa: E402
from crossdict.train import (  # noqa: E402
    BatchStream,
    CheckpointError,
    evaluate_sae,
    lm_loss_recovered,
    run_train,
    train_sae,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


# --- helpers ------------------------------------------------------------------------------------


def planted(n: int, d: int = 128, n_feat: int = 512, active: int = 4, noise: float = 0.01, seed: int = 0):
    """x = sum of `active` random unit directions (of `n_feat`) with magnitudes U(0.5, 1.5), plus noise."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_feat, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, n_feat)), axis=1)[:, :active]
    mags = rng.uniform(0.5, 1.5, (n, active))
    x = np.einsum("na,nad->nd", mags, dirs[idx]) + noise * rng.standard_normal((n, d))
    return x.astype(np.float32), dirs


def write_cache(cache_dir: Path, acts: dict[str, dict[int, np.ndarray]], n_shards: int = 2,
                heldout_every: int = 5, d_model: dict[str, int] | None = None) -> ActivationCache:
    """A tiny activation cache: rows split into `n_shards`, every `heldout_every`-th passage held out."""
    n = {k: next(iter(v.values())).shape[0] for k, v in acts.items()}
    cuts = {k: np.linspace(0, n[k], n_shards + 1).astype(int) for k in acts}
    for s in range(n_shards):
        tokens, part = {}, {}
        for k in acts:
            lo, hi = cuts[k][s], cuts[k][s + 1]
            rows = np.arange(lo, hi)
            passage = rows // 10
            tok = np.zeros((hi - lo, 6), np.int64)
            tok[:, 0], tok[:, 1], tok[:, 5] = passage, rows % 10 + 1, (passage % heldout_every == 0)
            tokens[k] = tok
            part[k] = {layer: a[lo:hi] for layer, a in acts[k].items()}
        write_shard(cache_dir, s, ShardData(tokens, part, np.zeros((0, 2), np.int64)))
    models = {k: {"name": f"model-{k}", "d_model": (d_model or {}).get(k, next(iter(acts[k].values())).shape[1]),
                  "layers": sorted(acts[k])} for k in acts}
    write_manifest(cache_dir, {"format": CACHE_FORMAT, "complete": True, "n_shards": n_shards, "models": models})
    return ActivationCache(cache_dir)


class Arr:
    """In-memory stand-in for ShardedArray (`train_sae` accepts anything with `.take` and `.shape`)."""

    def __init__(self, x: np.ndarray):
        self.x, self.shape = x, x.shape

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(rows)].astype(np.float32)


def best_cos(sae: SAE, dirs: np.ndarray) -> np.ndarray:
    w = sae.W_dec.detach().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    return (dirs @ w.T).max(1)


def small_cfg(**kw) -> SAEConfig:
    base = dict(architecture="topk", expansion_factor=4, k=4, lr=2e-3, lr_warmup_steps=5, batch_size=64,
                train_tokens=64 * 40, checkpoint_every=10, dead_tokens_threshold=500, aux_k=16)
    base.update(kw)
    return SAEConfig(**base)


# --- planted features ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory):
    x, dirs = planted(60_000)
    cache = write_cache(tmp_path_factory.mktemp("planted"), {"a": {0: x}, "b": {0: x[:, :64]}})
    return cache, dirs


@pytest.mark.parametrize("arch,steps,extra,target", [
    ("topk", 600, {}, 0.9),
    ("l1", 800, {"l1_coefficient": 2.0, "l1_warmup_steps": 50}, 0.8),
])
def test_planted_features_recovered(planted_cache, tmp_path, arch, steps, extra, target):
    cache, dirs = planted_cache
    cfg = SAEConfig(architecture=arch, expansion_factor=8, k=4, lr=2e-3, lr_warmup_steps=20, batch_size=256,
                    train_tokens=256 * steps, checkpoint_every=10**6, dead_tokens_threshold=5000, aux_k=64, **extra)
    acts = cache.acts("a", 0)
    sae = train_sae(acts, cache.rows("a", "train"), cfg, seed=0, out_dir=tmp_path, resume=False, progress=False)
    cos = best_cos(sae, dirs)
    m = evaluate_sae(sae, acts, cache.rows("a", "heldout"))
    print(f"\n[planted {arch}] mean best cos {cos.mean():.4f}, frac>0.9 {np.mean(cos > 0.9):.3f}, "
          f"held-out FVU {m['fvu']:.4f}, L0 {m['l0']:.2f}, dead {m['dead_frac']:.3f}, dense {m['dense_frac']:.3f}")
    assert cos.mean() >= target
    assert m["fvu"] < 0.3 and m["dense_frac"] == 0.0
    if arch == "topk":
        assert m["l0"] <= 4.0
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["step"] == steps - 1
    assert log[-1]["fvu"] < log[0]["fvu"]
    assert set(log[0]) >= {"step", "fvu", "l0", "dead_frac", "lr"}
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_heldout_fvu_is_whole_set_not_mean_of_blocks(planted_cache):
    cache, _ = planted_cache
    acts, rows = cache.acts("a", 0), cache.rows("a", "heldout")
    sae = SAE(SAESpec("topk", 128, 256, k=4, input_scale=5.0))
    a = evaluate_sae(sae, acts, rows, block_rows=4096)
    b = evaluate_sae(sae, acts, rows, block_rows=777)
    x = torch.from_numpy(acts.take(rows)).double()
    x_hat = sae.decode(sae.encode(x.float())).detach().double()
    ref = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert a["fvu"] == pytest.approx(ref, rel=1e-6) and b["fvu"] == pytest.approx(ref, rel=1e-6)
    assert a["n_tokens"] == len(rows)


# --- sparse kernels -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_backward_matches_dense_autograd(arch):
    torch.manual_seed(0)
    spec = SAESpec(arch, 16, 64, k=3, input_scale=0.7, aux_k=8)
    sae = SAE(spec)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    sae.train()
    out = sae(x, dead_mask=dead)
    out.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}

    # Dense reference: same selection, plain autograd through dense matmuls.
    ref = SAE(spec)
    ref.load_state_dict(sae.state_dict())
    ref.threshold.copy_(sae.threshold)
    sae_in = x * spec.input_scale - ref.b_dec
    pre = sae_in @ ref.W_enc.T + ref.b_enc
    codes = torch.zeros_like(pre).scatter(1, out.latent_indices, pre.gather(1, out.latent_indices).relu())
    codes = codes * (out.dense_codes(64) > 0)
    recon = codes @ ref.W_dec + ref.b_dec
    target = x * spec.input_scale
    fvu = (recon - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    resid = (target - recon).detach()
    aux_idx = pre.detach().masked_fill(~dead, float("-inf")).topk(8, dim=-1).indices
    aux_codes = torch.zeros_like(pre).scatter(1, aux_idx, pre.gather(1, aux_idx).relu())
    e_hat = aux_codes @ ref.W_dec
    auxk = min(int(dead.sum()) / 8, 1.0) * (e_hat - resid).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum()
    (fvu + spec.aux_coefficient * auxk).backward()
    assert torch.allclose(out.fvu, fvu.detach(), atol=1e-6)
    for n, p in ref.named_parameters():
        assert torch.allclose(sparse_grads[n], p.grad, atol=1e-5, rtol=1e-4), n


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "l1", "batchtopk"])
def test_resume_is_bit_identical(tmp_path, arch):
    x, _ = planted(4000, d=32, n_feat=64, seed=1)
    acts, rows = Arr(x), np.arange(3000)
    cfg = small_cfg(architecture=arch, dead_tokens_threshold=200, l1_warmup_steps=10)
    straight = train_sae(acts, rows, cfg, seed=3, out_dir=tmp_path / "straight", resume=False, progress=False)
    partial = train_sae(acts, rows, cfg, seed=3, out_dir=tmp_path / "resumed", resume=False, progress=False, max_steps=20)
    assert (tmp_path / "resumed" / "checkpoint.safetensors").is_file()
    assert not (tmp_path / "resumed" / "cfg.json").exists()  # killed before the end: no final SAE
    assert not torch.equal(partial.W_dec, straight.W_dec)
    resumed = train_sae(acts, rows, cfg, seed=3, out_dir=tmp_path / "resumed", resume=True, progress=False)
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert (tmp_path / "straight" / "training_log.jsonl").read_text() == (tmp_path / "resumed" / "training_log.jsonl").read_text()
    # and the saved files are identical too
    a = load_sae(tmp_path / "straight")
    b = load_sae(tmp_path / "resumed")
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.b_dec, b.b_dec)


def test_auto_resume_says_so_and_restarts_a_checkpoint_of_another_config(tmp_path, capsys):
    """Issue 15 item 5: `crossdict train` resumes a matching checkpoint by default ("resuming from step N of M");
    one made for another config (here another lr) is not resumed silently: training restarts, with a message."""
    x, _ = planted(3000, d=32, n_feat=64, seed=1)
    acts, rows = Arr(x), np.arange(2500)
    cfg = small_cfg()
    straight = train_sae(acts, rows, cfg, seed=3, out_dir=tmp_path / "straight", resume=False, progress=False)
    train_sae(acts, rows, cfg, seed=3, out_dir=tmp_path / "resumed", resume=False, progress=False, max_steps=20)
    capsys.readouterr()
    resumed = train_sae(acts, rows, cfg, seed=3, out_dir=tmp_path / "resumed", resume="auto", progress=False)
    assert "resuming this SAE from step 20 of 40" in capsys.readouterr().out
    assert torch.equal(resumed.W_dec, straight.W_dec)

    other = small_cfg(lr=1e-3)
    fresh = train_sae(acts, rows, other, seed=3, out_dir=tmp_path / "fresh", resume=False, progress=False)
    train_sae(acts, rows, cfg, seed=3, out_dir=tmp_path / "other", resume=False, progress=False, max_steps=20)
    capsys.readouterr()
    restarted = train_sae(acts, rows, other, seed=3, out_dir=tmp_path / "other", resume="auto", progress=False)
    out = capsys.readouterr().out
    assert "belongs to a different run" in out and "lr" in out and "from the start" in out
    assert torch.equal(restarted.W_dec, fresh.W_dec)  # the lr=2e-3 checkpoint was not mixed in
    train_sae(acts, rows, cfg, seed=3, out_dir=tmp_path / "other2", resume=False, progress=False, max_steps=20)
    with pytest.raises(train_mod.StaleCheckpointError, match="different run"):  # an explicit resume=True refuses
        train_sae(acts, rows, other, seed=3, out_dir=tmp_path / "other2", resume=True, progress=False)


def test_batch_stream_is_deterministic_and_covers_epochs():
    rows = np.arange(100, 150)
    s = BatchStream(rows, 16, seed=7)
    first_epoch = np.concatenate([s(i) for i in range(3)] + [s(3)[:2]])
    assert sorted(first_epoch.tolist()) == rows.tolist()
    assert np.array_equal(BatchStream(rows, 16, seed=7)(5), s(5))
    assert not np.array_equal(BatchStream(rows, 16, seed=8)(0), s(0))


# --- SAELens format -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,sl_arch", [("l1", "standard"), ("topk", "topk"), ("batchtopk", "jumprelu")])
def test_sae_lens_round_trip(tmp_path, arch, sl_arch):
    from sae_lens import SAE as SaeLensSAE

    x, _ = planted(3000, d=32, n_feat=64, seed=2)
    x = x * 13.0 + 4.0  # far from unit scale and off-centre, so the folded scale and b_dec matter
    cfg = small_cfg(architecture=arch, l1_coefficient=1.0, train_tokens=64 * 30)
    meta = {"model_name": "model-a", "hook_name": "blocks.3.hook_resid_post"}
    ours = train_sae(Arr(x), np.arange(2500), cfg, seed=0, out_dir=tmp_path, resume=False, progress=False, metadata=meta)
    assert ours.spec.input_scale != pytest.approx(1.0, abs=0.1)
    assert {p.name for p in tmp_path.iterdir()} >= {"cfg.json", "sae_weights.safetensors", "crossdict.json"}

    theirs = SaeLensSAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == sl_arch
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert tuple(theirs.W_enc.shape) == (32, 128) and tuple(theirs.W_dec.shape) == (128, 32)
    raw = torch.from_numpy(x[2500:])
    ours.eval()
    with torch.no_grad():
        c_ours, c_theirs = ours.encode(raw), theirs.encode(raw)
        assert (c_ours > 0).any()
        assert torch.allclose(c_ours, c_theirs, atol=1e-4, rtol=1e-5)
        assert torch.equal(c_ours > 0, c_theirs > 0) or (c_ours - c_theirs).abs().max() < 1e-4
        assert torch.allclose(ours.decode(c_ours), theirs.decode(c_theirs), atol=1e-4, rtol=1e-5)
        assert torch.allclose(ours.decode(c_ours), theirs(raw), atol=1e-4, rtol=1e-5)
        loaded = load_sae(tmp_path)
        assert loaded.spec == ours.spec
        assert torch.allclose(loaded.encode(raw), c_ours, atol=1e-5, rtol=1e-6)
        assert torch.allclose(loaded.reconstruct(raw), ours.reconstruct(raw), atol=1e-5, rtol=1e-6)


def test_load_sae_rejects_bad_files(tmp_path):
    sae = SAE(SAESpec("topk", 8, 32, k=2, input_scale=2.0))
    save_sae(sae, tmp_path)
    (tmp_path / "digests.json").unlink()  # hand-edited below, like a foreign SAE: the format checks are under test
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "sae_weights.safetensors"))
    state["W_dec"] = state["W_dec"][:, :4].contiguous()
    save_file(state, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match=r"sae_weights.safetensors: tensor 'W_dec' has shape \[32, 4\], expected \[32, 8\]"):
        load_sae(tmp_path)
    del state["W_dec"]
    save_file(state, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match="tensor 'W_dec' missing"):
        load_sae(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "k": 5}))
    with pytest.raises(SAEFormatError, match="k=5 but .*crossdict.json says 2"):
        load_sae(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="unreadable"):
        load_sae(tmp_path)
    with pytest.raises(SAEFormatError, match="missing"):
        load_sae(tmp_path / "nope")


# --- bad inputs -----------------------------------------------------------------------------------


def test_config_errors():
    acts, rows = Arr(np.ones((100, 8), np.float32)), np.arange(100)
    with pytest.raises(ValueError, match=r"sae.k=40 must be between 1 and d_sae=32"):
        train_sae(acts, rows, small_cfg(k=40), 0, Path("/nonexistent"), False, progress=False)
    with pytest.raises(ValueError, match=r"l1_coefficient \(lambda\) must be >= 0, got -1"):
        train_sae(acts, rows, small_cfg(architecture="l1", l1_coefficient=-1.0), 0, Path("/nonexistent"), False)
    with pytest.raises(ValueError, match="less than one batch"):
        train_sae(acts, rows, small_cfg(train_tokens=10), 0, Path("/nonexistent"), False)
    with pytest.raises(ValueError, match="lr must be a positive"):
        train_sae(acts, rows, small_cfg(lr=0.0), 0, Path("/nonexistent"), False)
    with pytest.raises(ValueError, match="no training rows"):
        train_sae(acts, rows[:0], small_cfg(), 0, Path("/nonexistent"), False)


def test_nan_activations_name_step_and_count(tmp_path):
    x, _ = planted(2000, d=16, n_feat=32, seed=3)
    rows = np.arange(2000)
    cfg = small_cfg()
    stream = BatchStream(rows, cfg.batch_size, seed=0)
    bad_row = int(stream(7)[5])  # first appears at step 7 (steps 0-6 use other rows: 2000 > 8 * 64)
    x[bad_row, :3] = np.nan
    x[bad_row, 5] = np.inf
    with pytest.raises(FloatingPointError, match=r"training step 7: 4 non-finite activation values"):
        train_sae(Arr(x), rows, cfg, 0, tmp_path, False, progress=False)


def test_cache_d_model_mismatch(tmp_path):
    x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    write_cache(tmp_path / "run" / "cache", {"a": {1: x}, "b": {2: x}}, d_model={"a": 16, "b": 8})
    cfg = RunConfig(ModelConfig("model-a", [1]), ModelConfig("model-b", [2]), run_name="run", output_dir=str(tmp_path),
                    sae=small_cfg(train_tokens=64 * 2))
    with pytest.raises(ValueError, match=r"manifest says model a \(model-a\) has d_model=16, but blocks.1.hook_resid_post has 8 columns"):
        run_train(cfg, progress=False)
    sae = SAE(SAESpec("topk", 16, 32, k=2))
    with pytest.raises(ValueError, match="d_model=8 but the SAE expects d_in=16"):
        evaluate_sae(sae, Arr(x), np.arange(10))


def test_truncated_checkpoint_is_reported_and_kept(tmp_path):
    x, _ = planted(2000, d=16, n_feat=32, seed=4)
    acts, rows, cfg = Arr(x), np.arange(2000), small_cfg()
    train_sae(acts, rows, cfg, 0, tmp_path, False, progress=False, max_steps=10)
    ckpt = tmp_path / "checkpoint.safetensors"
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint.safetensors is corrupt \(truncated: \d+ bytes, \d+ were written\); it was left in place"):
        train_sae(acts, rows, cfg, 0, tmp_path, True, progress=False)
    assert ckpt.read_bytes() == blob[: len(blob) // 2]  # left in place for inspection, not overwritten


def test_crash_while_checkpointing_keeps_old_checkpoint(tmp_path, monkeypatch):
    x, _ = planted(2000, d=16, n_feat=32, seed=4)
    acts, rows, cfg = Arr(x), np.arange(2000), small_cfg()
    train_sae(acts, rows, cfg, 0, tmp_path, False, progress=False, max_steps=10)
    ckpt = tmp_path / "checkpoint.safetensors"
    blob = ckpt.read_bytes()

    def dying_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(train_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_sae(acts, rows, cfg, 0, tmp_path, True, progress=False)
    assert ckpt.read_bytes() == blob
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_foreign_checkpoint_is_rejected(tmp_path):
    x, _ = planted(2000, d=16, n_feat=32, seed=5)
    acts, rows = Arr(x), np.arange(2000)
    train_sae(acts, rows, small_cfg(), 0, tmp_path, False, progress=False, max_steps=10)
    ckpt = tmp_path / "checkpoint.safetensors"
    blob = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match=r"belongs to a different run \(sae_config"):
        train_sae(acts, rows, small_cfg(lr=1e-3), 0, tmp_path, True, progress=False)
    with pytest.raises(CheckpointError, match=r"seed: checkpoint has 0, this run has 1"):
        train_sae(acts, rows, small_cfg(), 1, tmp_path, True, progress=False)
    assert ckpt.read_bytes() == blob
    # `crossdict run` (resume="auto") restarts a changed SAE instead of refusing, and says why.
    fresh = train_sae(acts, rows, small_cfg(lr=1e-3), 0, tmp_path / "auto", False, progress=False)
    auto_dir = tmp_path / "auto2"
    auto_dir.mkdir()
    (auto_dir / "checkpoint.safetensors").write_bytes(blob)
    restarted = train_sae(acts, rows, small_cfg(lr=1e-3), 0, auto_dir, "auto", progress=False)
    for a, b in zip(fresh.state_dict().values(), restarted.state_dict().values()):
        assert torch.equal(a, b)
    (tmp_path / "digests.json").unlink()  # crossdict did not write what follows
    save_file({"w": torch.zeros(3)}, str(ckpt))  # some other program's safetensors file
    with pytest.raises(CheckpointError, match="not a crossdict SAE checkpoint"):
        train_sae(acts, rows, small_cfg(), 0, tmp_path, True, progress=False)


# --- LM loss recovered ------------------------------------------------------------------------------


class TinyGPT2Backend:
    """A fake `Backend` around a random 2-layer GPT-2: char-level tokens, BOS first, right padding."""

    name, n_layers, d_model, has_bos = "tiny-gpt2", 2, 32, True

    def __init__(self):
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, initializer_range=0.3,
                         bos_token_id=0, eos_token_id=0)
        self.model = GPT2LMHeadModel(cfg).eval()

    def tokenize(self, texts: list[str], max_ctx: int) -> Batch:
        seqs = [[0] + [1 + ord(c) % 63 for c in t][: max_ctx - 1] for t in texts]
        n = max(map(len, seqs))
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        offsets = torch.full((len(seqs), n, 2), -1, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
            offsets[i, 1 : len(s), 0] = torch.arange(len(s) - 1)
            offsets[i, 1 : len(s), 1] = torch.arange(1, len(s))
        return Batch(ids, mask, offsets, texts)

    def _run(self, batch: Batch, edits: dict, seen: dict):
        def hook(layer):
            def fn(mod, inp, out):
                h = out[0] if isinstance(out, tuple) else out
                if layer in edits:
                    h = edits[layer](h)
                seen[layer] = h
                return (h, *out[1:]) if isinstance(out, tuple) else h
            return fn

        handles = [self.model.transformer.h[i].register_forward_hook(hook(i)) for i in range(self.n_layers)]
        try:
            with torch.no_grad():
                return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        finally:
            for h in handles:
                h.remove()

    def hidden_states(self, batch: Batch, layers: list[int]) -> dict[int, torch.Tensor]:
        seen: dict = {}
        self._run(batch, {}, seen)
        return {layer: seen[layer] for layer in layers}

    def logits(self, batch: Batch, edits: dict | None = None) -> torch.Tensor:
        return self._run(batch, edits or {}, {})


class FnSAE:
    def __init__(self, enc, dec):
        self.encode, self.decode = enc, dec


def test_lm_loss_recovered_on_tiny_gpt2():
    backend = TinyGPT2Backend()
    texts = ["the cat sat on the mat", "sparse autoencoders find features", "hi", "def f(x): return x + 1"]
    batches = [backend.tokenize(texts[:2], 24), backend.tokenize(texts[2:], 24)]
    layer = 0

    ident = lm_loss_recovered(backend, FnSAE(lambda h: h, lambda c: c), layer, batches)
    print(f"\n[lm-loss identity] {ident}")
    assert ident["loss_sae"] == pytest.approx(ident["loss_clean"], abs=1e-6)
    assert ident["loss_zero"] != pytest.approx(ident["loss_clean"], abs=1e-3)
    assert ident["frac_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert ident["frac_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    # positions: content tokens with a real next token: (22 + 33 capped to 23) + (2 + 22) - 4 BOS... count directly
    expected = sum(int((b.is_content[:, :-1] & b.attention_mask[:, 1:].bool()).sum()) for b in batches)
    assert ident["n_tokens"] == expected

    # Zero "reconstruction" = zero ablation; mean "reconstruction" = mean ablation.
    zero = lm_loss_recovered(backend, FnSAE(lambda h: h, lambda c: torch.zeros_like(c)), layer, batches)
    assert zero["frac_recovered_zero"] == pytest.approx(0.0, abs=1e-6)
    assert zero["loss_sae"] == pytest.approx(zero["loss_zero"], abs=1e-6)

    # A real (untrained) SAE loses information: strictly between "no recovery" and "full".
    torch.manual_seed(0)
    sae = SAE(SAESpec("topk", 32, 128, k=4, input_scale=0.5))
    rnd = lm_loss_recovered(backend, sae, layer, batches)
    assert rnd["loss_sae"] != pytest.approx(rnd["loss_clean"], abs=1e-4)
    assert rnd["frac_recovered_zero"] < 1.0
    # The clean loss handed on from another layer gives the same numbers, and is a plain log-softmax NLL.
    again = lm_loss_recovered(backend, sae, layer, batches, clean_loss=rnd["loss_clean"])
    assert again == pytest.approx(rnd)
    nll, n = 0.0, 0
    for b in batches:
        logp = torch.log_softmax(backend.logits(b)[:, :-1], -1)
        valid = b.is_content[:, :-1] & b.attention_mask[:, 1:].bool()
        nll -= float(logp.gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)[valid].sum())
        n += int(valid.sum())
    assert rnd["loss_clean"] == pytest.approx(nll / n, rel=1e-5)


def test_lm_loss_kl_and_the_same_norm_random_error_see_a_pure_rescaling_as_harmless():
    """An "SAE" that halves h after the last block: the final LayerNorm divides the rescaling away, so its CE and KL
    barely move, while a random error of the same per-token norm (Gurnee 2024) does move them; its error is all
    radial (err_radial_share 1 vs 1/d), so the baseline that keeps only the orthogonal part is the identity."""
    backend = TinyGPT2Backend()
    batches = [backend.tokenize(["the cat sat on the mat", "sparse autoencoders find features"], 24)]
    ident = lm_loss_recovered(backend, FnSAE(lambda h: h, lambda c: c), 1, batches)
    assert ident["kl_sae"] == pytest.approx(0.0, abs=1e-7) and ident["kl_recovered_zero"] == pytest.approx(1.0, abs=1e-6)
    assert ident["kl_zero"] > 1e-3 and ident["kl_rand_err"] == pytest.approx(0.0, abs=1e-7)  # zero error, zero noise
    zero = lm_loss_recovered(backend, FnSAE(lambda h: h, lambda c: torch.zeros_like(c)), 1, batches)
    assert zero["kl_recovered_zero"] == pytest.approx(0.0, abs=1e-6)
    half = lm_loss_recovered(backend, FnSAE(lambda h: h, lambda c: 0.5 * c), 1, batches)
    print(f"\n[lm-loss shrinkage] {half}")
    assert half["err_radial_share"] == pytest.approx(1.0, abs=1e-6) and half["random_radial_share"] == 1 / 32
    assert half["kl_sae"] < 1e-3 * half["kl_rand_err"]
    assert abs(half["loss_rand_err"] - half["loss_clean"]) > 100 * abs(half["loss_sae"] - half["loss_clean"])  # random model: either sign
    assert half["kl_rand_perp_err"] == pytest.approx(0.0, abs=1e-7)
    # a random-direction "SAE error" is as harmful as its same-norm random baseline, and its radial share is ~1/d
    g = torch.Generator().manual_seed(3)
    noisy = lm_loss_recovered(backend, FnSAE(lambda h: h, lambda c: c + 2.0 * torch.randn(c.shape, generator=g)), 1,
                              batches)
    assert 0.3 < noisy["kl_sae"] / noisy["kl_rand_err"] < 3 and noisy["err_radial_share"] < 0.2


def test_lm_loss_leaves_bos_and_padding_untouched():
    backend = TinyGPT2Backend()
    batch = backend.tokenize(["abcdef", "ab"], 16)
    seen = []

    def enc(h):
        seen.append(h)
        return h

    out = lm_loss_recovered(backend, FnSAE(enc, lambda c: c.flip(-1) * 3.0), 1, [batch])
    clean = backend.logits(batch)
    # The splice sees the whole residual but replaces content positions only: BOS and padding rows keep
    # their clean values, so BOS logits are unchanged.
    edited = backend.logits(batch, {1: lambda h: torch.where(batch.is_content[..., None], h.flip(-1) * 3.0, h)})
    assert torch.allclose(clean[:, 0], edited[:, 0])
    assert not torch.allclose(clean[0, 1:], edited[0, 1:])
    assert seen and seen[0].shape == (2, 7, 32)

    # The edit functions lm_loss_recovered hands the backend leave non-content rows alone.
    captured = []
    real_logits = backend.logits
    backend.logits = lambda b, edits=None: (captured.append(edits), real_logits(b, edits))[1]
    lm_loss_recovered(backend, FnSAE(lambda h: h, lambda c: c + 7.0), 1, [batch])
    h = torch.randn(2, 7, 32)
    for edits in captured[1:]:  # sae, zero, mean, same-norm random error, its orthogonal part
        new = edits[1](h)
        assert torch.equal(new[~batch.is_content], h[~batch.is_content])
        assert not torch.equal(new[batch.is_content], h[batch.is_content])
    assert captured[0] is None and len(captured) == 6
    assert out["loss_sae"] > out["loss_clean"]


# --- stage entry point ------------------------------------------------------------------------------


def test_run_train_writes_saes_metrics_and_skips_on_rerun(tmp_path, capsys):
    xa, _ = planted(3000, d=16, n_feat=32, seed=6)
    xb, _ = planted(3000, d=24, n_feat=48, seed=7)
    run_dir = tmp_path / "runs" / "tiny"
    write_cache(run_dir / "cache", {"a": {1: xa, 2: xa * 2}, "b": {3: xb, 4: xb + 1}})
    cfg = RunConfig(ModelConfig("org/model-a", [1, 2]), ModelConfig("model-b", [3, 4]), run_name="tiny",
                    output_dir=str(tmp_path / "runs"), sae=small_cfg(train_tokens=64 * 20, seeds=[0, 1]))
    rows = run_train(cfg, progress=False)
    assert len(rows) == 2 * 2 * 2
    assert {(r["model"], r["layer"], r["seed"]) for r in rows} == {
        (m, layer, s) for m, layers in (("org/model-a", (1, 2)), ("model-b", (3, 4))) for layer in layers for s in (0, 1)}
    for r in rows:
        assert 0 <= r["fvu"] < 1.5 and r["l0"] <= 4 and r["loss_sae"] == ""
    d0 = cfg.sae_dir("a", 1, 0)
    assert d0 == run_dir / "saes" / "org__model-a" / "blocks.1.hook_resid_post"
    assert (cfg.sae_dir("b", 4, 1)).name == "blocks.4.hook_resid_post.seed1"
    metrics = json.loads((d0 / "metrics.json").read_text())
    assert set(metrics) >= {"fvu", "l0", "dead_frac", "dense_frac"}
    csv_text = (cfg.report_dir / "sae_metrics.csv").read_text().splitlines()
    assert csv_text[0].startswith("model,layer,hook_name,seed,architecture,d_sae,fvu,l0,dead_frac,dense_frac,excluded_frac,masked_rows,loss_clean")
    assert len(csv_text) == 9

    mtime = (d0 / "sae_weights.safetensors").stat().st_mtime_ns
    again = run_train(cfg, progress=False)
    assert (d0 / "sae_weights.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained
    assert [r["fvu"] for r in again] == [r["fvu"] for r in rows]

    cfg.sae.k = 3  # a changed config retrains
    third = run_train(cfg, seeds=[0], progress=False)
    assert len(third) == 4 and (d0 / "sae_weights.safetensors").stat().st_mtime_ns != mtime
    assert json.loads((d0 / "cfg.json").read_text())["k"] == 3


def test_run_train_with_backends_fills_lm_loss_columns(tmp_path):
    """End to end on a real (tiny) model: cache its layer-0/1 residuals, train SAEs, splice them back in."""
    backend = TinyGPT2Backend()
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdefgh ij"), size=30)) for _ in range(120)]
    batch = backend.tokenize(texts, 32)
    hs = backend.hidden_states(batch, [0, 1])
    content = batch.is_content
    acts = {layer: hs[layer][content].detach().numpy().astype(np.float32) for layer in (0, 1)}
    run_dir = tmp_path / "runs" / "gpt"
    write_cache(run_dir / "cache", {"a": {0: acts[0]}, "b": {1: acts[1]}})
    cfg = RunConfig(ModelConfig("tiny-a", [0], max_ctx=32), ModelConfig("tiny-b", [1], max_ctx=32), run_name="gpt",
                    output_dir=str(tmp_path / "runs"),
                    sae=SAEConfig(expansion_factor=4, k=8, lr=3e-3, lr_warmup_steps=10, batch_size=128,
                                  train_tokens=128 * 150, dead_tokens_threshold=2000, aux_k=32))
    rows = run_train(cfg, backends={"a": backend, "b": backend}, progress=False, lm_texts=texts[:8])
    print("\n[run_train + tiny GPT-2]", [(r["hook_name"], round(r["fvu"], 3), round(r["frac_recovered_zero"], 3),
                                        round(r["frac_recovered_mean"], 3)) for r in rows])
    for r in rows:
        # A random model: ablations may even lower the loss, so compare distances to the clean loss.
        assert r["fvu"] < 0.5
        assert abs(r["loss_sae"] - r["loss_clean"]) < 0.5 * abs(r["loss_mean"] - r["loss_clean"])
        assert abs(r["loss_sae"] - r["loss_clean"]) < 0.5 * abs(r["loss_zero"] - r["loss_clean"])
        assert 0.5 < r["frac_recovered_zero"] < 1.5 and 0.5 < r["frac_recovered_mean"] < 1.5
    import csv

    csv_rows = list(csv.DictReader((cfg.report_dir / "sae_metrics.csv").open()))
    assert all(r[c] != "" for r in csv_rows for c in train_mod.CSV_COLUMNS)  # every column filled
    assert all(r[c] == "" for r in csv_rows for c in train_mod.SEED_COLUMNS)  # one seed: no seed stability


def test_lm_eval_seeds_first_leaves_the_other_seeds_lm_columns_empty_and_a_rerun_computes_nothing(tmp_path):
    backend = TinyGPT2Backend()
    rng = np.random.default_rng(1)
    texts = ["".join(rng.choice(list("abcdefgh ij"), size=30)) for _ in range(60)]
    batch = backend.tokenize(texts, 32)
    hs = backend.hidden_states(batch, [0, 1])
    acts = {layer: hs[layer][batch.is_content].detach().numpy().astype(np.float32) for layer in (0, 1)}
    write_cache(tmp_path / "runs" / "gpt" / "cache", {"a": {0: acts[0]}, "b": {1: acts[1]}})
    cfg = RunConfig(ModelConfig("tiny-a", [0], max_ctx=32), ModelConfig("tiny-b", [1], max_ctx=32), run_name="gpt",
                    output_dir=str(tmp_path / "runs"),
                    sae=small_cfg(expansion_factor=2, k=8, batch_size=128, train_tokens=128 * 10, seeds=[0, 1],
                                  lm_eval_passages=4, lm_eval_seeds="first"))
    forwards = []
    real_logits = backend.logits
    backend.logits = lambda b, edits=None: (forwards.append(1), real_logits(b, edits))[1]
    run = lambda: run_train(cfg, backends={"a": backend, "b": backend}, progress=False, lm_texts=texts[:4])  # noqa: E731
    rows = run()
    assert forwards  # seed 0 of each model was evaluated
    csv_path = cfg.report_dir / "sae_metrics.csv"
    import csv

    table = list(csv.DictReader(csv_path.open()))
    assert [r["seed"] for r in table] == ["0", "1", "0", "1"]
    for r in table:
        assert all(r[c] != "" for c in ("fvu", "l0", "seed_shared_dec")), r
        assert all((r[c] != "") == (r["seed"] == "0") for c in train_mod.LM_COLUMNS), r  # LM columns: seed 0 only
    assert "kl_sae" not in json.loads((cfg.sae_dir("a", 0, 1) / "metrics.json").read_text())

    # A rerun reuses every SAE, evaluates nothing (seed 1 is left out on purpose, not missing) and writes the same CSV.
    before, weights = csv_path.read_bytes(), cfg.sae_dir("b", 1, 1) / "sae_weights.safetensors"
    mtime, forwards[:] = weights.stat().st_mtime_ns, []
    assert run() == rows and not forwards
    assert csv_path.read_bytes() == before and weights.stat().st_mtime_ns == mtime

    # "all" evaluates seed 1 only (seed 0's numbers are reused): per model a clean pass, 2 ablations, 3 conditions.
    cfg.sae.lm_eval_seeds = "all"
    n_batches = len(train_mod._lm_batches(cfg, "a", backend, texts[:4]))
    rows_all = run()
    assert len(forwards) == 2 * 6 * n_batches
    assert all(r["kl_sae"] != "" for r in rows_all) and [r["kl_sae"] for r in rows_all[::2]] == [r["kl_sae"] for r in rows[::2]]
    # ... and back to "first": seed 1's measured numbers stay in metrics.json but not in the CSV
    cfg.sae.lm_eval_seeds = "first"
    forwards[:] = []
    assert run() == rows and not forwards and csv_path.read_bytes() == before


def test_lm_eval_seeds_is_checked_shared_by_all_layers_and_absent_from_the_default_stage_record():
    from crossdict.config import ConfigError, config_from_dict
    from crossdict.pipeline import _train_config

    base = {"model_a": {"name": "a", "layers": [1]}, "model_b": {"name": "b", "layers": [2]}}
    with pytest.raises(ConfigError, match="lm_eval_seeds: 'some' is not allowed"):
        config_from_dict({**base, "sae": {"lm_eval_seeds": "some"}})
    with pytest.raises(ConfigError, match="cannot differ between layers"):
        config_from_dict({**base, "sae": {"per_layer": {"a.1": {"lm_eval_seeds": "first"}}}})
    cfg = config_from_dict(base)
    assert cfg.sae.lm_eval_seeds == "all" and "lm_eval_seeds" not in _train_config(cfg)["sae"]  # old records stay current
    first = config_from_dict({**base, "sae": {"lm_eval_seeds": "first"}})
    assert _train_config(first)["sae"]["lm_eval_seeds"] == "first"  # changing it reruns the train stage
    assert train_mod._config_dict(first.sae) == train_mod._config_dict(cfg.sae)  # the SAEs' fingerprint: no retraining


def test_lr_schedule_warmup_then_linear_decay():
    cfg = small_cfg(lr=1.0, lr_warmup_steps=10, lr_decay_fraction=0.2)
    lrs = [train_mod.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == 1.0 and lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(scale_exp=st.floats(-3, 3), arch=st.sampled_from(["l1", "topk", "batchtopk"]), seed=st.integers(0, 2**16))
def test_saved_sae_encodes_raw_activations_like_the_original(tmp_path_factory, scale_exp, arch, seed):
    torch.manual_seed(seed)
    s = 10.0**scale_exp
    sae = SAE(SAESpec(arch, 12, 48, k=3, input_scale=s))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
        sae.threshold.fill_(0.1)
    path = tmp_path_factory.mktemp("rt")
    save_sae(sae, path)
    back = load_sae(path)
    x = torch.randn(64, 12) / s  # raw activations at the scale the SAE was fitted to
    c0, c1 = sae.encode(x), back.encode(x)
    same_support = (c0 > 0) == (c1 > 0)
    assert same_support.float().mean() > 0.99  # a value sitting exactly on a threshold may flip
    assert torch.allclose(c0 * same_support, c1 * same_support, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sae.decode(c0), back.decode(c0), rtol=1e-5, atol=1e-5 / s)


def test_massive_activations_are_left_out_and_that_saves_the_dictionary(tmp_path):
    """1% of tokens with a 300x-norm 'sink' direction: kept in, they eat the loss and features stay unlearned."""
    from crossdict.train import drop_massive, massive_activation_threshold

    x, dirs = planted(30_000, d=64, n_feat=256, seed=3)
    rng = np.random.default_rng(4)
    sink_rows = rng.choice(len(x), size=300, replace=False)
    sink = rng.standard_normal(64)
    x[sink_rows] += 300.0 * sink / np.linalg.norm(sink)
    acts, rows = Arr(x), np.arange(len(x))
    max_norm = massive_activation_threshold(acts, rows, 10.0)
    kept = drop_massive(acts, rows, max_norm)
    assert set(rows) - set(kept) == set(sink_rows)  # exactly the planted sinks go
    assert massive_activation_threshold(acts, rows, 0.0) is None and len(drop_massive(acts, rows, None)) == len(rows)
    cfg = small_cfg(expansion_factor=4, k=4, batch_size=256, train_tokens=256 * 300, dead_tokens_threshold=5000, aux_k=32)
    normal = np.setdiff1d(rows, sink_rows)
    with_sinks = train_sae(acts, rows, cfg, 0, tmp_path / "all", False, progress=False)
    without = train_sae(acts, kept, cfg, 0, tmp_path / "kept", False, progress=False)
    cos_all, cos_kept = best_cos(with_sinks, dirs).mean(), best_cos(without, dirs).mean()
    fvu_all, fvu_kept = evaluate_sae(with_sinks, acts, normal)["fvu"], evaluate_sae(without, acts, normal)["fvu"]
    print(f"\n[massive] planted-feature cos {cos_all:.3f} -> {cos_kept:.3f}; FVU on normal tokens {fvu_all:.3f} -> {fvu_kept:.3f}")
    assert cos_kept > cos_all + 0.05 and fvu_kept < fvu_all


def test_lm_loss_keeps_massive_positions_clean():
    backend = TinyGPT2Backend()
    batches = [backend.tokenize(["the cat sat on the mat", "sparse autoencoders find features"], 24)]
    zero = FnSAE(lambda h: h, lambda c: torch.zeros_like(c))
    spliced = lm_loss_recovered(backend, zero, 0, batches)
    untouched = lm_loss_recovered(backend, zero, 0, batches, max_norm=1e-6)  # every position counts as massive
    assert spliced["loss_sae"] != pytest.approx(spliced["loss_clean"], abs=1e-3)
    assert untouched["loss_sae"] == pytest.approx(untouched["loss_clean"], abs=1e-6)
    assert untouched["loss_zero"] == pytest.approx(untouched["loss_clean"], abs=1e-6)


def test_batchtopk_threshold_is_usable_after_few_steps(tmp_path):
    """The inference threshold tracks the batch's smallest kept activation from the first step on.

    An EMA started at 0 without bias correction sits at 1 - 0.99**30 = 26% of its target after 30
    steps, so held-out L0 explodes (issue 14: 1,010 instead of 32).
    """
    x, _ = planted(12_000, d=64, n_feat=256, active=8, seed=2)
    acts, k = Arr(x), 8
    cfg = small_cfg(architecture="batchtopk", k=k, batch_size=256, train_tokens=256 * 30, lr_warmup_steps=3)
    sae = train_sae(acts, np.arange(10_000), cfg, seed=5, out_dir=tmp_path, resume=False, progress=False)
    m = evaluate_sae(sae, acts, np.arange(10_000, 12_000))
    assert abs(m["l0"] - k) <= 0.2 * k, m
    # and it survives the SAELens-format round trip (saved as a JumpReLU threshold)
    assert float(load_sae(tmp_path).threshold) == pytest.approx(float(sae.threshold), rel=1e-6)
