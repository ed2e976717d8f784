"""The shared LM eval (`train.LMEval`) against the per-SAE evaluation it replaced, on the tiny HF models.

`_old_lm_loss_recovered` is the evaluation as it was (commit 7189cd6): every condition a full forward with full
logits, the clean pass once per SAE, two log-softmaxes per KL. The shared one must give the same numbers while
running the clean pass once per model, the ablations once per layer, and no block before the edited one.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crossdict.backend import Batch  # noqa: E402
from crossdict.backend_hf import HFBackend  # noqa: E402
from crossdict.sae import SAE, SAESpec  # noqa: E402
from crossdict.train import LMEval, error_geometry, lm_loss_recovered, same_norm_random_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Sparse autoencoders find features.",
         "def f(x): return x + 1  # a short one",
         "Lists, tuples and dictionaries are the built-in containers of the language."]


# --- the evaluation as it was -------------------------------------------------------------------


def _old_valid_next(batch: Batch) -> torch.Tensor:
    valid = batch.is_content[:, :-1] & batch.attention_mask[:, 1:].bool()
    return torch.cat([valid, torch.zeros_like(valid[:, :1])], 1)


def _old_nll(logits: torch.Tensor, batch: Batch) -> tuple[float, int]:
    valid = _old_valid_next(batch)
    target = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, :1]], 1).masked_fill(~valid, -100).to(logits.device)
    nll = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), target.view(-1), ignore_index=-100, reduction="sum")
    return float(nll), int(valid.sum())


def _old_kl(clean_logits: torch.Tensor, logits: torch.Tensor, batch: Batch) -> float:
    valid = _old_valid_next(batch).to(logits.device)
    total = 0.0
    for i in range(logits.shape[0]):
        if valid[i].any():
            lp0 = F.log_softmax(clean_logits[i][valid[i]].float(), -1)
            lp = F.log_softmax(logits[i][valid[i]].float(), -1)
            total += float(F.kl_div(lp, lp0, log_target=True, reduction="sum"))
    return total


@torch.no_grad()
def _old_lm_loss_recovered(backend, sae: Any, layer: int, batches: Iterable[Batch], clean_loss: float | None = None,
                           max_norm: float | None = None, seed: int = 0) -> dict[str, float]:
    batches = list(batches)
    if hasattr(sae, "eval"):
        sae.eval()
    total, count, rows = None, 0, []
    for b in batches:
        h = backend.hidden_states(b, [layer])[layer]
        m = b.is_content.to(h.device)
        if max_norm is not None:
            m = m & (h.norm(dim=-1) <= max_norm)
        s = h[b.is_content.to(h.device)].double().sum(0)
        total = s if total is None else total + s
        count += int(b.is_content.sum())
        rows.append(h[m].float())
    mean = (total / count).float()
    recon = lambda h: sae.decode(sae.encode(h.float()))  # noqa: E731

    def masked(fn, mask):
        def edit(h):
            m = mask.to(h.device)
            if max_norm is not None:
                m = m & (h.norm(dim=-1) <= max_norm)
            return torch.where(m[..., None], fn(h).to(h.dtype), h)

        return edit

    kinds = {"sae": recon, "zero": lambda h: torch.zeros_like(h), "mean": lambda h: mean.to(h.device).expand_as(h)}
    sums = {k: 0.0 for k in ("clean", *kinds, "rand_err", "rand_perp_err")}
    kls = {k: 0.0 for k in sums if k != "clean"}
    n_tok = 0
    for i, b in enumerate(batches):
        clean = backend.logits(b)
        nll, n = _old_nll(clean, b)
        sums["clean"] += nll
        these = {**kinds, "rand_err": same_norm_random_error(recon, seed + i),
                 "rand_perp_err": same_norm_random_error(recon, seed + i, perp_only=True)}
        for kind, fn in these.items():
            logits = backend.logits(b, edits={layer: masked(fn, b.is_content)})
            sums[kind] += _old_nll(logits, b)[0]
            kls[kind] += _old_kl(clean, logits, b)
        n_tok += n
    loss = {k: v / n_tok for k, v in sums.items()}
    if clean_loss is not None:
        loss["clean"] = clean_loss
    out = {f"loss_{k}": v for k, v in loss.items()}
    out.update({f"kl_{k}": v / n_tok for k, v in kls.items()})
    for abl in ("zero", "mean"):
        gap = loss[abl] - loss["clean"]
        out[f"frac_recovered_{abl}"] = (loss[abl] - loss["sae"]) / gap if abs(gap) > 1e-12 else float("nan")
        kl_abl = out[f"kl_{abl}"]
        out[f"kl_recovered_{abl}"] = 1.0 - out["kl_sae"] / kl_abl if kl_abl > 1e-12 else float("nan")
    h = torch.cat(rows)
    out.update(error_geometry(h, recon(h).float()) if len(h) > 1 else {})
    out["n_tokens"] = n_tok
    return out


# --- helpers ------------------------------------------------------------------------------------


def _sae(d: int, seed: int) -> SAE:
    """An untrained TopK SAE, 4x wide, half its latents active: a rough reconstruction, different per seed."""
    torch.manual_seed(seed)
    return SAE(SAESpec("topk", d, 4 * d, k=2 * d)).eval()


def _load(path, dtype: str = "float32") -> HFBackend:
    """The tiny Llama with its unembedding x 30: a random model's next-token distribution is nearly uniform, so
    its ablation gaps are ~0.01 nats and frac_recovered a ratio of float noise; sharpened, they are ~1 nat."""
    backend = HFBackend.load(str(path), dtype=dtype)
    with torch.no_grad():
        backend.model.get_output_embeddings().weight.mul_(30.0)
    return backend


def _batches(backend) -> list[Batch]:
    """Two right-padded batches of different lengths (the random baselines draw once per batch)."""
    return [backend.tokenize(TEXTS[:2], 24), backend.tokenize(TEXTS[2:], 24)]


def _assert_same(new: dict, old: dict) -> None:
    assert list(new) == list(old)  # same keys, same order (metrics.json)
    for k in old:
        # Float summation order only (rel 2e-7 on SmolLM2 / Gemma-3, benchmarks/bench_lmeval.py); the recovered
        # fractions divide by an ablation gap that can be small on a random model, which amplifies it.
        rel = 1e-4 if "recovered" in k else 2e-5
        tol = 1e-7
        if k.startswith("frac_recovered_"):  # (L_abl - L_sae) / (L_abl - L_clean): the losses' 2e-5, propagated
            la, ls, lc = (old[f"loss_{n}"] for n in (k.removeprefix("frac_recovered_"), "sae", "clean"))
            tol = 2e-5 * (abs(la) + abs(ls) + abs(old[k]) * (abs(la) + abs(lc))) / max(abs(la - lc), 1e-12)
        assert new[k] == pytest.approx(old[k], rel=rel, abs=tol), k


class FullForwards:
    """The backend interface without `start_after` (like the TransformerLens backend): every forward runs whole."""

    def __init__(self, backend: HFBackend):
        self.inner = backend
        self.name, self.n_layers, self.d_model, self.has_bos = backend.name, backend.n_layers, backend.d_model, backend.has_bos

    def tokenize(self, texts, max_ctx):
        return self.inner.tokenize(texts, max_ctx)

    def hidden_states(self, batch, layers):
        return self.inner.hidden_states(batch, layers)

    def logits(self, batch, edits=None):
        return self.inner.logits(batch, edits)


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shared_lm_eval_gives_the_old_numbers_for_two_layers_and_two_saes_each(tiny_models, dtype):
    backend = _load(tiny_models["llama"], dtype)
    batches = _batches(backend)
    ev = LMEval(backend, batches, layers=[1])  # layer 1's clean residual from the clean pass, layer 0's by a forward
    d = backend.d_model
    h1 = torch.cat([backend.hidden_states(b, [1])[1][b.is_content] for b in batches])
    max_norm = float(h1.norm(dim=-1).quantile(0.8))  # a fifth of layer 1's tokens count as massive: kept clean
    for layer, mn in ((0, None), (1, max_norm)):
        for seed in (0, 1):
            sae = _sae(d, 10 * layer + seed)
            new = lm_loss_recovered(backend, sae, layer, ev, max_norm=mn, seed=seed)
            old = _old_lm_loss_recovered(backend, sae, layer, batches, max_norm=mn, seed=seed)
            print(f"\n[lm eval {dtype}] layer {layer} seed {seed}: kl_sae {new['kl_sae']:.4g} (old {old['kl_sae']:.4g}), "
                  f"loss_sae {new['loss_sae']:.5g} (old {old['loss_sae']:.5g})")
            _assert_same(new, old)
            # not vacuous: every condition moves the model, each differently
            kls = [new[f"kl_{k}"] for k in ("sae", "zero", "mean", "rand_err", "rand_perp_err")]
            assert min(kls) > 1e-4 and len({round(k, 6) for k in kls}) == 5, kls
    # Without `start_after` every forward runs whole, and the numbers are the same.
    sae = _sae(d, 11)
    _assert_same(lm_loss_recovered(FullForwards(backend), sae, 1, batches, max_norm=max_norm, seed=1),
                 lm_loss_recovered(backend, sae, 1, ev, max_norm=max_norm, seed=1))


def test_edited_forwards_skip_the_blocks_before_the_edit_and_the_clean_pass_runs_once_per_model(tiny_models):
    """Counts forwards (`backend.logits` calls) and runs of block 0 and of the last block."""
    backend = _load(tiny_models["llama"])
    batches = _batches(backend)
    ev = LMEval(backend, batches, layers=[1])  # the clean pass keeps layer 1's residual, not layer 0's
    d, nb = backend.d_model, len(batches)
    block0, last = [], []  # calls of block 0's first submodule, of the last block's
    hooks = [next(backend.blocks[0].children()).register_forward_hook(lambda *a: block0.append(1)),
             next(backend.blocks[-1].children()).register_forward_hook(lambda *a: last.append(1))]
    real_logits, forwards = backend.logits, []
    backend.logits = lambda b, edits=None: (forwards.append(1), real_logits(b, edits))[1]
    try:
        def run(layer: int, seed: int) -> tuple[int, int]:
            block0.clear(), last.clear(), forwards.clear()
            lm_loss_recovered(backend, _sae(d, seed), layer, ev, seed=seed)
            return len(block0), len(forwards)

        # first SAE: the clean pass runs block 0 (and keeps layer 1's residual); the 5 edited conditions do not
        assert run(1, 0) == (nb, 6 * nb)
        assert len(last) == 6 * nb  # every forward still runs the blocks after the edit
        # the second seed at that layer: its own 3 conditions only (clean pass and ablations are reused)
        assert run(1, 1) == (0, 3 * nb)
        # a layer the clean pass did not keep: a forward up to it, its 2 ablations and the SAE's 3 conditions
        assert run(0, 2) == (nb, 5 * nb)
        assert len(last) == 5 * nb  # the forward up to layer 0 stops there
    finally:
        for h in hooks:
            h.remove()
        del backend.logits
    with pytest.raises(ValueError, match="another backend"):
        lm_loss_recovered(_load(tiny_models["llama"]), _sae(d, 0), 1, ev)
