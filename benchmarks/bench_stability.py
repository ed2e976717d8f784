"""Seed stability vs reconstruction vs wall time for SAE training recipes, on a real activation cache.

    PYTHONPATH=src python benchmarks/bench_stability.py --cache runs/embedded/cache --model a --layer 8 \
        --set architecture=l1 --set expansion_factor=2 --set l1_coefficient=5 --label "L1 l5 2xd"

Trains two seeds of one (model, layer) in one data pass (`train.train_saes`, exactly what the train stage
does), then reports per setting: decoder/encoder seed stability (`stability.seed_stability`: Hungarian on
cosine over live latents, share with cos > 0.7, median), held-out FVU, L0, dead fraction (mean over the two
seeds), wall and CPU time of the pass. Rows are the train stage's (`ActivationCache.row_mask`: massive
activations and a BOS-less model's attention sink left out), so FVU compares like with like with `sae_metrics.csv`. One JSON line per
run goes to stdout and, with --out, is appended to a JSONL file. The cache is only read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crossdict.cache import ActivationCache
from crossdict.config import SAEConfig
from crossdict.stability import live_latents, seed_stability, summary_columns
from crossdict.train import evaluate_sae, train_saes


def _value(field: dataclasses.Field, text: str):
    kind = {"int": int, "float": float, "str": str}.get(getattr(field.type, "__name__", str(field.type)), None)
    if kind is None:
        kind = {"int": int, "float": float}.get(str(field.type), str)
    return kind(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--model", default="a")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--set", action="append", default=[], help="sae.<field>=<value>, e.g. expansion_factor=2")
    p.add_argument("--label", default="")
    p.add_argument("--out", help="append the JSON line to this file")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    fields = {f.name: f for f in dataclasses.fields(SAEConfig)}
    base = dict(architecture="topk", expansion_factor=8, k=32, lr=2e-3, batch_size=1024, train_tokens=400_000,
                checkpoint_every=10**9)  # the demo's pre-issue-19 recipe
    for item in args.set:
        name, text = item.split("=", 1)
        base[name] = _value(fields[name], text)
    cfg = SAEConfig(**base)

    cache = ActivationCache(args.cache)
    acts = cache.acts(args.model, args.layer)
    train_rows, held_rows = cache.rows(args.model, "train"), cache.rows(args.model, "heldout")
    keep = cache.row_mask(args.model, args.layer, cfg.max_norm_ratio)  # what `train._layer_rows` uses
    train_rows, held_rows = train_rows[keep[train_rows]], held_rows[keep[held_rows]]
    meta = {"model_name": cache.manifest["models"][args.model]["name"], "hook_name": f"blocks.{args.layer}.hook_resid_post"}
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        saes = train_saes(acts, train_rows, cfg, args.seeds, [Path(tmp) / f"s{s}" for s in args.seeds], False,
                          progress=False, metadata=[meta] * len(args.seeds))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    evals = [evaluate_sae(s, acts, held_rows) for s in saes]
    live = [live_latents(s, acts, held_rows) for s in saes]
    stab = summary_columns(seed_stability(saes[0], saes[1], live[0], live[1]))
    rec = {"label": args.label, "model": args.model, "layer": args.layer, "sae": {k: base[k] for k in base if k != "checkpoint_every"},
           **{k: round(v, 4) for k, v in stab.items()},
           "fvu": round(float(np.mean([e["fvu"] for e in evals])), 4), "l0": round(float(np.mean([e["l0"] for e in evals])), 1),
           "dead_frac": round(float(np.mean([e["dead_frac"] for e in evals])), 4),
           "dense_frac": round(float(np.mean([e["dense_frac"] for e in evals])), 4),
           "wall_s_pass": round(wall, 1), "cpu_s_pass": round(cpu, 1), "n_seeds": len(args.seeds), "n_train_rows": len(train_rows)}
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
