"""Passages: cut at whitespace, same characters for both tokenizers, deterministic split."""

import itertools

from crossdict.config import CorpusConfig
from crossdict.corpus import builtin_pydocs, common_prefix_length, is_heldout, passages, split_passages


def test_split_at_whitespace():
    doc = " ".join(f"word{i}" for i in range(500))
    parts = list(split_passages(doc, 100))
    assert all(len(p) <= 100 for p in parts)
    assert " ".join(parts) == doc  # nothing lost, every cut at a space


def test_common_truncation_fits_both(tiny_tokenizers):
    toks = [tiny_tokenizers["gpt2"], tiny_tokenizers["llama"]]
    text = " ".join(["Tokenizers differ, so the text must be cut to fit both models."] * 20)
    n = common_prefix_length(text, toks, [40, 32], [0, 1])
    cut = text[:n]
    assert 0 < n < len(text) and text[n] == " "
    assert len(toks[0](cut)["input_ids"]) <= 40
    assert len(toks[1](cut)["input_ids"]) <= 32  # BOS included
    assert common_prefix_length("short text", toks, [40, 32], [0, 1]) == len("short text")


def test_split_is_deterministic_and_near_fraction():
    ps = [f"passage number {i} about something" for i in range(4000)]
    held = [is_heldout(p, 0.2) for p in ps]
    assert held == [is_heldout(p, 0.2) for p in ps]
    assert 0.17 < sum(held) / len(held) < 0.23


def test_builtin_corpus_is_prose():
    ps = passages(CorpusConfig(source="builtin:pydocs", max_passages=50, passage_chars=600))
    assert len(ps) == 50 and all(64 <= len(p) <= 600 for p in ps)
    words = " ".join(ps).split()
    common = sum(w.lower() in {"the", "a", "of", "is", "to", "and"} for w in words)
    assert common / len(words) > 0.05  # English prose, not code


def test_builtin_corpus_has_a_million_tokens_worth():
    # ~4 characters per token for English BPE tokenizers: 1M tokens is about 4M characters.
    chars = sum(len(d) for d in itertools.islice(builtin_pydocs(), 200000))
    assert chars > 4_500_000, chars
