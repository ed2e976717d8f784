"""Anchor pairs: every pair ends at the same character, no token is paired twice, nothing is missed."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossdict.anchors import anchor_pairs
from crossdict.backend_hf import prepare_tokenizer, tokenize_batch

ADVERSARIAL = st.text(
    alphabet=st.sampled_from(list("ab xyz  \t\n0123456789.,;-_'\"éüßçñ中文字日本🤗🚀👍🏽\u200b\u00a0")) | st.characters(exclude_categories=("Cs",)),  # lone surrogates are not text
    min_size=1, max_size=80,
)


def _offsets(tok, text):
    batch = tokenize_batch(prepare_tokenizer(tok), [text], max_ctx=512)
    keep = batch.attention_mask[0].bool()
    return batch.offsets[0, keep].numpy()


def _check(offs_a, offs_b, text, pairing="end_offset"):
    pairs = anchor_pairs(offs_a, offs_b, text, pairing)
    assert pairs.shape[1] == 2
    assert len(set(pairs[:, 0])) == len(pairs) and len(set(pairs[:, 1])) == len(pairs), "token paired twice"
    for i, j in pairs:
        assert offs_a[i, 1] == offs_b[j, 1] > 0
        # the chosen token is the last one ending there: the model has read the whole character
        assert not (offs_a[i + 1 :, 1] == offs_a[i, 1]).any()
        assert not (offs_b[j + 1 :, 1] == offs_b[j, 1]).any()
    # completeness: every end shared by both tokenizations is paired (end_offset pairing)
    if pairing == "end_offset":
        shared = set(offs_a[:, 1][offs_a[:, 1] > 0]) & set(offs_b[:, 1][offs_b[:, 1] > 0])
        assert len(pairs) == len(shared)
    return pairs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ADVERSARIAL)
def test_pairs_on_adversarial_strings(tiny_tokenizers, text):
    offs_a = _offsets(tiny_tokenizers["gpt2"], text)
    offs_b = _offsets(tiny_tokenizers["llama"], text)
    _check(offs_a, offs_b, text)
    _check(offs_a, offs_b, text, "word_final")


def test_identical_tokenizers_pair_everything(tiny_tokenizers):
    text = "Pairs of the same tokenizer are the identity map, 123 times."
    offs = _offsets(tiny_tokenizers["gpt2"], text)
    pairs = anchor_pairs(offs, offs, text)
    np.testing.assert_array_equal(pairs[:, 0], pairs[:, 1])
    assert len(pairs) == len(np.unique(offs[:, 1]))


def test_hand_made_example():
    # "ab cd": A = [ab][ cd], B = [BOS][a][b][ c][d]  -> shared ends 2 and 5
    a = np.array([[0, 2], [2, 5]])
    b = np.array([[-1, -1], [0, 1], [1, 2], [2, 4], [4, 5]])
    np.testing.assert_array_equal(anchor_pairs(a, b, "ab cd"), [[0, 2], [1, 4]])
    # byte pieces of one character share its span: the last piece is the anchor
    a = np.array([[0, 1], [0, 1], [0, 1]])
    b = np.array([[0, 1]])
    np.testing.assert_array_equal(anchor_pairs(a, b, "\U0001F917"), [[2, 0]])
    with pytest.raises(ValueError, match="unknown pairing"):
        anchor_pairs(a, b, "x", "start_offset")
