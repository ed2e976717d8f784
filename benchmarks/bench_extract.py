"""Throughput of `crossdict extract` vs a plain HF forward with output_hidden_states=True.

Same model, same batches, same machine, same run. Ours stops after the deepest requested block
(no later blocks, no unembedding over the vocabulary) and keeps only the requested layers; the
baseline is what one writes first: `model(**batch, output_hidden_states=True)`.

    python benchmarks/bench_extract.py [--config configs/embedded.yaml] [--passages 64]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from crossdict.config import load_config  # noqa: E402
from crossdict.corpus import passages  # noqa: E402
from crossdict.extract import extract_shard, load_backends, truncate_to_common  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/embedded.yaml")
    ap.add_argument("--passages", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(args.config, {"corpus.max_passages": args.passages})
    torch.set_num_threads(os.cpu_count() or 1)
    backends = load_backends(cfg)
    texts = truncate_to_common(passages(cfg.corpus), backends, {k: cfg.model(k).max_ctx for k in backends})
    bs = cfg.extract.batch_size
    print(f"{len(texts)} passages, batch {bs}, torch threads {torch.get_num_threads()}, "
          f"layers A {cfg.model_a.layers} of {backends['a'].n_layers}, B {cfg.model_b.layers} of {backends['b'].n_layers}")

    rows = []
    for k, backend in backends.items():
        batches = [backend.tokenize(texts[i : i + bs], cfg.model(k).max_ctx) for i in range(0, len(texts), bs)]
        n_tok = sum(int(b.attention_mask.sum()) for b in batches)
        layers = cfg.model(k).layers

        def ours():
            for b in batches:
                backend.hidden_states(b, layers)

        @torch.inference_mode()
        def plain():
            for b in batches:
                backend.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)

        ours()  # warm-up
        t_ours, t_plain = best_of(ours, args.repeats), best_of(plain, args.repeats)
        rows.append((backend.name, n_tok, t_ours, t_plain))

    # The whole extraction path (both models, token index, anchors, float copies), as the CLI runs it.
    ids = list(range(len(texts)))
    t_full = best_of(lambda: extract_shard(texts, ids, [False] * len(texts), backends, cfg, np.dtype("float32")), 1)

    print(f"\n{'model':<16}{'tokens':>8}{'ours tok/s':>12}{'plain HF tok/s':>16}{'ratio':>8}")
    for name, n_tok, t_o, t_p in rows:
        print(f"{name:<16}{n_tok:>8}{n_tok / t_o:>12.0f}{n_tok / t_p:>16.0f}{t_p / t_o:>7.2f}x")
    n_all = sum(r[1] for r in rows)
    t_plain_all = sum(r[3] for r in rows)
    print(f"{'both (forward)':<16}{n_all:>8}{n_all / sum(r[2] for r in rows):>12.0f}{n_all / t_plain_all:>16.0f}"
          f"{t_plain_all / sum(r[2] for r in rows):>7.2f}x")
    print(f"{'crossdict extract':<16}{n_all:>8}{n_all / t_full:>12.0f}{n_all / t_plain_all:>16.0f}{t_plain_all / t_full:>7.2f}x"
          "   (full path: both models + token index + anchors)")


if __name__ == "__main__":
    main()
