"""Planted-feature recovery: crossdict's TopK trainer against SAELens's, on `sae_lens.synthetic` data.

Both train on the same batches with the same scaling, init, schedule, width and k (see
benchmarks/bench_train.py, which this test drives at a small size); recovery is SAELens's own
`eval_sae_on_synthetic_data` MCC against the ground-truth dictionary.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sae_lens.synthetic")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).parents[1] / "benchmarks" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bt = _bench()


def test_data_seeds_cannot_coincide_with_sae_init():
    """The planted dictionary is not any SAE's initial decoder (a seed-0 FeatureDictionary at the SAE's
    shape *is* crossdict's seed-0 init: same generator, same draws), and the data seeds are not small."""
    from sae_lens.synthetic import FeatureDictionary

    from crossdict.config import SAEConfig
    from crossdict.train import make_sae

    d, n_feat = 32, 256
    seeds = [bt.data_seed(t) for t in ("dictionary", "correlation", "train", "eval")]
    assert len(set(seeds)) == 4 and min(seeds) > 2**32
    fd, _ = bt.planted_model(d, n_feat)
    gt = torch.nn.functional.normalize(fd.feature_vectors.detach(), dim=1)

    def init_decoder(seed: int) -> torch.Tensor:
        sae = make_sae(d, SAEConfig(expansion_factor=n_feat // d), 1.0)
        sae.reset_parameters(torch.Generator().manual_seed(seed))  # what train_sae does with `seed`
        return sae.W_dec.detach()

    # the hazard is real: a FeatureDictionary seeded like the SAE reproduces its init
    same = FeatureDictionary(n_feat, d, seed=0, initializer=None).feature_vectors.detach()
    assert torch.allclose(same, init_decoder(0), atol=1e-6)
    for seed in range(4):
        cos = (gt @ torch.nn.functional.normalize(init_decoder(seed), dim=1).T).abs().max(1).values
        assert cos.mean() < 0.7, (seed, float(cos.mean()))  # chance (best of 256 random in d=32) ~0.5; equal: 1.0


def test_crossdict_recovers_planted_features_as_well_as_sae_lens():
    d, n_feat, k, tokens = 64, 512, 8, 100_000
    x, fd, gen = bt.synthetic_data(d, n_feat, tokens, None)
    cfg = bt.sae_config(d, n_feat // d, k, 6e-3, 1024, tokens)
    _, ours = bt.run_crossdict(x, cfg, 0)
    _, ref = bt.run_sae_lens(x, cfg, 0)
    q_ours, q_ref = bt.synthetic_quality(ours, fd, gen), bt.synthetic_quality(ref, fd, gen)
    print(f"\n[recovery] crossdict {q_ours}\n[recovery] SAELens   {q_ref}")
    assert q_ours["l0"] == pytest.approx(k) and q_ref["l0"] == pytest.approx(k)  # equal L0
    assert q_ref["fvu"] < 1  # SAELens is trained, not misconfigured
    assert q_ours["mcc"] >= q_ref["mcc"] - 0.02
    assert q_ours["mcc"] > 0.3  # and both are well above chance (random decoders: ~0.2 here)
    assert np.isfinite(q_ours["fvu"]) and q_ours["fvu"] <= q_ref["fvu"] + 0.02
