"""The seed's hub pair without a hub: real GPT-2 / GPT-NeoX tokenizers, random-weight stand-ins.

Vocabularies come from the pinned llama-cpp-python sdist on PyPI (downloaded once, cached under
~/.cache/crossdict/standins or $CROSSDICT_STANDINS); the stand-in models are built there once.
"""

from __future__ import annotations

import torch

from crossdict.backend_tlens import TLensBackend
from crossdict.extract import random_init_like


def test_random_floor_works_behind_the_tlens_backend(tiny_models, tiny_tokenizers):
    """The seed's configs use backend tlens with extract.random_floor on (the default)."""
    from transformers import AutoModelForCausalLM

    path = tiny_models["gpt2"]
    model = AutoModelForCausalLM.from_pretrained(path)
    backend = TLensBackend.from_hf(model, tiny_tokenizers["gpt2"], str(path), "tiny-gpt2")
    rand = random_init_like(backend, seed=3)
    batch = backend.tokenize(["Random weights give the floor."], 32)
    h_trained = backend.hidden_states(batch, [1])[1]
    h_rand = rand.hidden_states(batch, [1])[1]
    assert rand.n_layers == backend.n_layers and rand.d_model == backend.d_model
    assert h_rand.shape == h_trained.shape and not torch.allclose(h_rand, h_trained)
