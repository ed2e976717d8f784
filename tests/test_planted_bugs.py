"""Tests aimed at bugs that once survived the whole suite (issue 15): each fails with the bug planted.

- `word_final` pairing testing the character *before* the shared end (text[e-1]) instead of after it;
- matching q-values equal to the p-values (no Benjamini–Hochberg);
- the AuxK loss not scaled down when fewer than `aux_k` latents are dead;
- the decoder rows not renormalised to unit norm after each optimiser step;
- metric and transfer q-values equal to the p-values (the BH tests below cover every family);
- random transfer controls not scaled to the candidate's norm: `test_interventions.py::test_injection_controls_have_the_norm_of_the_injected_candidate`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossdict.anchors import anchor_pairs
from crossdict.config import SAEConfig
from crossdict.matching import match_features
from crossdict.sae import SAE, SAESpec
from crossdict.stats import bh_qvalues
from crossdict.train import train_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def test_word_final_keeps_ends_followed_by_a_non_word_character():
    # "a-b c": both tokenize as [a-][b][ c]; shared ends 2, 3, 5.
    # end 2 is followed by 'b' (inside the word "a-b"): not word-final. end 3 is followed by ' ': word-final.
    # end 5 is the end of the text: word-final. A check of text[e-1] gets all three wrong.
    offs = np.array([[0, 2], [2, 3], [3, 5]])
    pairs = anchor_pairs(offs, offs, "a-b c", "word_final")
    np.testing.assert_array_equal(pairs, [[1, 1], [2, 2]])
    # punctuation after the end counts as a word boundary, a letter does not
    offs = np.array([[0, 3], [3, 4], [4, 6]])
    np.testing.assert_array_equal(anchor_pairs(offs, offs, "cat,xy", "word_final"), [[0, 0], [2, 2]])
    np.testing.assert_array_equal(anchor_pairs(offs, offs, "catsxy", "word_final"), [[2, 2]])


def _bh_by_hand(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg step-up written out: q_(i) = min_{j >= i} p_(j) m / j."""
    m = len(p)
    order = np.argsort(p)
    q_sorted = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


def test_bh_qvalues_known_answer():
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan, 0.02])
    q = bh_qvalues(p)
    # m = 5 finite tests: sorted p 0.01 0.02 0.03 0.04 0.5 -> p*m/rank 0.05 0.05 0.05 0.05 0.5
    np.testing.assert_allclose(q[[0, 1, 2, 3, 5]], [0.05, 0.05, 0.05, 0.5, 0.05])
    assert np.isnan(q[4])


def test_match_q_values_are_benjamini_hochberg_of_their_p_values():
    from align_fixtures import shared_private_codes

    rng = np.random.default_rng(0)
    A, B, pid, _ = shared_private_codes(rng)
    tr, te = pid < 140, pid >= 140
    res = match_features(A[tr], B[tr], pid[tr], A[te], B[te], pid[te], n_null=100, n_boot=0, rng=rng)
    for name in ("hungarian", "mnn"):
        m = res[name]
        ok = np.isfinite(m.p_value)
        assert ok.sum() > 10
        np.testing.assert_allclose(m.q_value[ok], _bh_by_hand(m.p_value[ok]), rtol=1e-12, err_msg=name)
        assert (m.q_value[ok] > m.p_value[ok]).any(), name  # the correction did something


def test_auxk_loss_is_scaled_by_the_dead_fraction_of_aux_k():
    """Gao et al. 2024 / sparsify: with n_dead < aux_k latents the AuxK loss is scaled by n_dead / aux_k."""
    torch.manual_seed(0)
    spec = SAESpec("topk", 16, 64, k=3, aux_k=8)
    sae = SAE(spec)
    sae.train()
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 17, 40]] = True  # 3 dead latents, aux_k = 8 -> scale 3/8
    out = sae(x, dead_mask=dead)
    with torch.no_grad():
        target = x * spec.input_scale
        pre = (target - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        codes = torch.zeros_like(pre).scatter(1, out.latent_indices, pre.gather(1, out.latent_indices).relu())
        resid = target - (codes @ sae.W_dec + sae.b_dec)
        aux_codes = torch.zeros_like(pre)
        aux_codes[:, dead] = pre[:, dead].relu()  # all 3 dead latents are in the top aux_k
        e_hat = aux_codes @ sae.W_dec
        unscaled = (e_hat - resid).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum()
    assert out.auxk_loss.item() == pytest.approx(3 / 8 * unscaled.item(), rel=1e-5)


class _Arr:
    def __init__(self, x: np.ndarray):
        self.x, self.shape = x, x.shape

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(rows)]


def test_decoder_rows_stay_unit_norm_through_training(tmp_path):
    """TopK SAEs keep ||W_dec[i]|| = 1 (Gao et al. 2024); the radial-gradient projection alone drifts."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4096, 16)) * rng.uniform(0.5, 3.0, 16)).astype(np.float32)
    cfg = SAEConfig(architecture="topk", expansion_factor=4, k=4, lr=3e-2, lr_warmup_steps=1, batch_size=128,
                    train_tokens=128 * 30, checkpoint_every=10**6, dead_tokens_threshold=10**6, aux_k=16)
    sae = train_sae(_Arr(x), np.arange(len(x)), cfg, seed=0, out_dir=tmp_path, resume=False, progress=False)
    norms = sae.W_dec.detach().double().norm(dim=1).numpy()
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_metric_q_values_are_benjamini_hochberg_over_the_metric_family():
    """metrics.csv: q is BH across every metric row with a p-value (one family), not the p-value itself."""
    from crossdict.evaluate import add_qvalues

    p = [0.01, 0.04, 0.03, 0.5, 0.02]
    rows = [{"p_value": v} for v in p] + [{"p_value": float("nan")}]
    add_qvalues(rows)
    np.testing.assert_allclose([r["q_value"] for r in rows[:5]], [0.05, 0.05, 0.05, 0.5, 0.05])
    assert np.isnan(rows[5]["q_value"])


def test_transfer_q_values_are_benjamini_hochberg_within_each_family():
    """transfer.csv: q is BH within each named family (direction x control x alpha), not across, and not p."""
    from crossdict.interventions import bh_by_family

    rows = [{"family": "f1", "p_value": v} for v in (0.01, 0.04, 0.03, 0.5, 0.02)]
    rows += [{"family": "f2", "p_value": 0.01}, {"family": "f2", "p_value": 0.04}, {"p_value": 0.2}]
    bh_by_family(rows)
    np.testing.assert_allclose([r["q_value"] for r in rows[:7]], [0.05, 0.05, 0.05, 0.5, 0.05, 0.02, 0.04])
    assert "q_value" not in rows[7]  # no family: not corrected into any
