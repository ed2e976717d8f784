"""Both backends return the model's own residual stream, early exit changes nothing, edits work."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crossdict.backend_hf import HFBackend
from crossdict.backend_tlens import TLensBackend

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello  world \U0001F917 123 -- tabs\tand\nnewlines"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tiny_models):
    return request.param, tiny_models[request.param]


def _load(kind, name, path):
    """The tiny model (eager attention, as the TransformerLens bridge uses) and a backend over it."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    backend = HFBackend(model, tok, name) if kind == "hf" else TLensBackend.from_hf(model, tok, str(path), name)
    return model, backend


def _reference(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("kind", ["hf", "tlens"])
def test_hidden_states_match_output_hidden_states(model_dir, kind):
    model, backend = _load(kind, *model_dir)
    batch = backend.tokenize(TEXTS, max_ctx=64)
    ref = _reference(model, batch)
    mask = batch.attention_mask.bool()
    n = backend.n_layers
    # HF's last hidden state has the final norm applied; blocks before it are the plain residual.
    layers = list(range(n - 1))
    states = backend.hidden_states(batch, layers)
    for layer in layers:
        diff = (states[layer] - ref[layer + 1])[mask].abs().max().item()
        assert diff < 1e-4, (kind, model_dir[0], layer, diff)
    # Early exit: asking only for layer 0 stops after block 0 and gives the same tensor.
    early = backend.hidden_states(batch, [0])[0]
    assert torch.equal(early[mask], states[0][mask])


@pytest.mark.parametrize("kind", ["hf", "tlens"])
def test_edit_hook(model_dir, kind):
    model, backend = _load(kind, *model_dir)
    batch = backend.tokenize(TEXTS, max_ctx=64)
    clean = backend.logits(batch)
    same = backend.logits(batch, {1: lambda x: x.clone()})
    assert torch.equal(clean, same)
    # (A constant shift would be invisible: LayerNorm removes the mean; a random direction is not.)
    direction = torch.randn(backend.d_model, generator=torch.Generator().manual_seed(0))
    changed = backend.logits(batch, {1: lambda x: x + 10.0 * direction})
    assert (changed - clean).abs().max() > 1e-3


def test_bos_convention(tiny_models):
    from transformers import AutoTokenizer

    for name, has_bos in (("gpt2", False), ("llama", True)):
        tok = AutoTokenizer.from_pretrained(tiny_models[name])
        model = AutoModelForCausalLM.from_pretrained(tiny_models[name])
        b = HFBackend(model, tok, name)
        assert b.has_bos == has_bos
        batch = b.tokenize(["some text"], 16)
        # BOS is a token of the sequence but has no character span: it can never be an anchor.
        assert (batch.offsets[0, 0, 1] < 0).item() == has_bos


def test_layer_out_of_range_names_depth(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    b = HFBackend(AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]), tok, "tiny")
    with pytest.raises(ValueError, match="has 4 layers"):
        b.hidden_states(b.tokenize(["x y"], 8), [4])
