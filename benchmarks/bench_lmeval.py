"""The train stage's LM eval, old (per SAE, full forwards) vs new (`train.LMEval`), on a finished run's SAEs.

    PYTHONPATH=src python benchmarks/bench_lmeval.py --run runs/embedded --model b --layer 9
    PYTHONPATH=src python benchmarks/bench_lmeval.py --run runs/embedded --model a --layer 15 --old-rev 7189cd6

Evaluates every seed's SAE of one (model, layer) exactly as `run_train` does (its `_lm_batches`, the SAE's
`max_norm`, the clean loss handed from the first seed to the next) with the old `lm_loss_recovered`, loaded
from git revision `--old-rev` (the last one before `LMEval`), then with the new one on one fresh `LMEval`.
Process CPU time (one thread, so a loaded machine does not blur it) of each, split for the new one into the
clean pass (once per model; it keeps the residual after every configured layer, as in `run_train`), the
layer (zero and mean ablation: once per layer) and each SAE's own conditions; the largest absolute and
relative difference of the returned numbers, and of the new numbers against the run's
`report/sae_metrics.csv` (6 significant digits). The run directory is only read.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from crossdict.backend import load_backend
from crossdict.config import load_config
from crossdict.sae import load_sae
from crossdict.train import LMEval, _lm_batches, lm_loss_recovered

ROOT = Path(__file__).resolve().parents[1]


def old_train(rev: str):
    """`crossdict/train.py` as of git revision `rev`, imported as a module of the installed package."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/crossdict/train.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path("/tmp") / f"crossdict_train_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("crossdict._train_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def cpu(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def diff(new: dict, old: dict) -> tuple[float, float, str]:
    """(max abs difference, max relative difference, the key of the latter) over `old`'s numeric keys."""
    worst_abs, worst_rel, key = 0.0, 0.0, ""
    for k, v in old.items():
        if not isinstance(v, (int, float)) or math.isnan(v):
            continue
        a = abs(float(new[k]) - float(v))
        r = a / max(abs(float(v)), 1e-12)
        worst_abs = max(worst_abs, a)
        if r > worst_rel:
            worst_rel, key = r, k
    return worst_abs, worst_rel, key


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a finished run directory (config.yaml, saes/, report/)")
    p.add_argument("--model", choices=["a", "b"], required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--old-rev", default="7189cd6")
    p.add_argument("--skip-old", action="store_true", help="time the new evaluation only")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    m = cfg.model(args.model)
    backend = load_backend(m.name, m.backend, m.dtype)
    batches = _lm_batches(cfg, args.model, backend)
    dirs = [run / "saes" / cfg.sae_dir(args.model, args.layer, s).relative_to(cfg.run_dir / "saes") for s in cfg.sae.seeds]
    saes = [load_sae(d) for d in dirs]
    max_norm = saes[0].spec.metadata.get("max_norm")
    tag = f"{m.name} layer {args.layer}"
    print(f"[bench_lmeval] {tag}: {len(batches)} batch(es), {sum(int(b.is_content.sum()) for b in batches)} content "
          f"tokens, seeds {cfg.sae.seeds}, max_norm {max_norm}", flush=True)
    report = {"model": m.name, "layer": args.layer}

    ev = LMEval(backend, batches, m.layers)  # as run_train makes it: the clean pass keeps every layer's residual
    _, report["new_clean_s"] = cpu(ev.clean)
    _, report["new_layer_s"] = cpu(lambda: ev.layer(args.layer, max_norm))
    new, report["new_sae_s"] = [], []
    for seed, sae in zip(cfg.sae.seeds, saes):
        out, t = cpu(lambda: lm_loss_recovered(backend, sae, args.layer, ev, max_norm=max_norm))
        new.append(out)
        report["new_sae_s"].append(t)
    report["new_total_s"] = report["new_clean_s"] + report["new_layer_s"] + sum(report["new_sae_s"])
    print(f"[bench_lmeval] new: {json.dumps(report)}", flush=True)
    del ev

    if not args.skip_old:
        old_mod, old, clean_loss, report["old_sae_s"] = old_train(args.old_rev), [], None, []
        for seed, sae in zip(cfg.sae.seeds, saes):
            out, t = cpu(lambda: old_mod.lm_loss_recovered(backend, sae, args.layer, batches, clean_loss, max_norm))
            clean_loss = out["loss_clean"]  # run_train hands it on
            old.append(out)
            report["old_sae_s"].append(t)
        report["old_total_s"] = sum(report["old_sae_s"])
        report["speedup"] = report["old_total_s"] / report["new_total_s"]
        report["vs_old"] = [diff(n, o) for n, o in zip(new, old)]

    table = {(r["model"], r["layer"], r["seed"]): r for r in csv.DictReader((run / "report" / "sae_metrics.csv").open())}
    report["vs_csv"] = []
    for seed, out in zip(cfg.sae.seeds, new):
        row = table.get((m.name, str(args.layer), str(seed)))
        if row is not None:
            ref = {k: float(row[k]) for k in out if row.get(k, "") != ""}
            report["vs_csv"].append(diff(out, ref))
    print(f"[bench_lmeval] {json.dumps(report)}")


if __name__ == "__main__":
    main()
