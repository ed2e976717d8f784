"""Anchor pairs: which token of model A and which token of model B have read the same characters.

Tokenizers cut the same text differently, so token i of A and token i of B mean nothing together.
But a causal model's state at a token depends only on the text up to that token's end. If A's token
i and B's token j both end at character c, both models have read exactly `text[:c]`: that pair is an
anchor. Where several tokens of one model end at c (byte-level BPE splits an emoji into pieces that
all report the character's span) we take the last one, the one that has read the whole character.
"""

from __future__ import annotations

import numpy as np

Pairing = str  # "end_offset" | "word_final"


def _last_token_per_end(ends: np.ndarray) -> dict[int, int]:
    """end offset -> index of the last content token ending there (ends < 0 mark BOS/padding)."""
    out: dict[int, int] = {}
    for i, e in enumerate(ends.tolist()):
        if e > 0:
            out[e] = i  # later tokens overwrite earlier ones with the same end
    return out


def anchor_pairs(
    offsets_a: np.ndarray, offsets_b: np.ndarray, text: str | None = None, pairing: Pairing = "end_offset"
) -> np.ndarray:
    """Pair tokens of one text across two tokenizations.

    Args:
        offsets_a: `[n_a, 2]` character spans of A's tokens; (-1, -1) for BOS/padding.
        offsets_b: `[n_b, 2]` character spans of B's tokens.
        text: the text (needed for `word_final`).
        pairing: `end_offset` pairs every shared end; `word_final` only ends followed by whitespace,
            punctuation or the end of the text (both models have read a complete word).
    Returns:
        `[n_pairs, 2]` int64 (token index in A, token index in B), in text order.
    """
    last_a = _last_token_per_end(np.asarray(offsets_a)[:, 1])
    last_b = _last_token_per_end(np.asarray(offsets_b)[:, 1])
    ends = sorted(set(last_a) & set(last_b))
    if pairing == "word_final":
        if text is None:
            raise ValueError("word_final pairing needs the text")
        ends = [e for e in ends if e >= len(text) or not text[e].isalnum()]
    elif pairing != "end_offset":
        raise ValueError(f"unknown pairing {pairing!r}; expected 'end_offset' or 'word_final'")
    return np.array([(last_a[e], last_b[e]) for e in ends], dtype=np.int64).reshape(-1, 2)
