"""CPU seconds of each align-stage task and the time they take on N idle cores.

    PYTHONPATH=src python benchmarks/bench_align.py --config configs/embedded.yaml --workers 2 \\
        --set align.standardized_space=false [--set output_dir=/tmp/runs ...]

Runs the whole align stage of the config's run (it rewrites the run's report CSVs and maps), with
`align.workers` = --workers, and records the process CPU time of every task in the process that ran
it. Prints the tasks, their sum and the makespan of handing them out longest first (as the stage
does) to --workers processes that each have a core of their own: the idle-machine time. Wall time on
a shared machine measures the other jobs as much as this one; CPU time does not (much).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import yaml

from crossdict import evaluate
from crossdict.config import load_config

LOG_ENV = "CROSSDICT_BENCH_TASK_LOG"


def timed_task(cfg, kind, arg, progress):  # noqa: ANN001, ANN201 (evaluate._run_task's signature)
    """`evaluate._run_task`, appending its CPU seconds to the file named by LOG_ENV."""
    run = getattr(evaluate, "_untimed_run_task", evaluate._run_task)
    t0 = time.process_time()
    out = run(cfg, kind, arg, progress)
    with open(os.environ[LOG_ENV], "a") as f:
        key = [arg[1][0]] if kind == "layer_cka" else list(arg)  # first A layer of a sweep part, or the layer pair
        f.write(json.dumps({"kind": kind, "key": key, "cpu": time.process_time() - t0}) + "\n")
    return out


def makespan(seconds: list[float], workers: int) -> float:
    """Finish time of tasks taken in this order by the first free of `workers` workers."""
    free = [0.0] * workers
    for s in seconds:
        free[free.index(min(free))] += s
    return max(free)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (YAML value)")
    args = p.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = load_config(args.config, {**overrides, "align.workers": args.workers})
    log = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False).name
    os.environ[LOG_ENV] = log  # inherited by the workers
    evaluate._untimed_run_task = evaluate._run_task  # workers=1: the stage calls timed_task in this process
    evaluate._run_task = timed_task
    t0 = time.perf_counter()
    evaluate.run_align(cfg, progress=False)
    wall = time.perf_counter() - t0
    tasks = [json.loads(line) for line in open(log)]
    # in the order the stage hands them out: SAE parts and residual parts by layer pair, then the sweep's parts
    kinds, pairs = ("sae", "resid", "layer_cka"), [list(p) for p in cfg.layer_pairs]
    tasks.sort(key=lambda t: (kinds.index(t["kind"]), pairs.index(t["key"]) if t["kind"] != "layer_cka" else t["key"][0]))
    for t in tasks:
        print(f"{t['kind'] + ' ' + str(t['key']):40s} {t['cpu']:8.1f} s CPU")
    total = sum(t["cpu"] for t in tasks)
    print(f"{'sum':40s} {total:8.1f} s CPU")
    print(f"makespan on {args.workers} idle cores (longest first): {makespan([t['cpu'] for t in tasks], args.workers):.1f} s; "
          f"wall here {wall:.1f} s (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
