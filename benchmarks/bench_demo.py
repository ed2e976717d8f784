"""Per-stage wall times of `crossdict run`, read from the stage records it leaves behind.

    PYTHONPATH=src python benchmarks/bench_demo.py runs/embedded                  # an existing run
    PYTHONPATH=src python benchmarks/bench_demo.py --run configs/embedded.yaml    # run it now, then report
    PYTHONPATH=src python benchmarks/bench_demo.py before/embedded after/embedded # side by side

Each finished stage writes `runs/<name>/stages/<stage>.json` with the seconds it took (`seconds`, set
by `pipeline.run_pipeline`); a stage that was skipped as current keeps the record of the run that made
it. With `--run` the whole `crossdict run` is also timed from outside (model loading and start-up
included), so the table's sum and the total can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

STAGE_ORDER = ("extract", "train", "crosscoder", "align", "transfer", "report")


def stage_seconds(run_dir: str | Path) -> dict[str, float | None]:
    """{stage: seconds} from `run_dir/stages/*.json`, in pipeline order; None where a record has no time."""
    stages = Path(run_dir) / "stages"
    if not stages.is_dir():
        raise SystemExit(f"{stages} does not exist: not a crossdict run directory (or no stage has finished)")
    out: dict[str, float | None] = {}
    records = [p for p in stages.glob("*.json") if p.name != "digests.json"]  # digests.json: the integrity table
    for path in sorted(records, key=lambda p: (STAGE_ORDER.index(p.stem) if p.stem in STAGE_ORDER else 99, p.stem)):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e})") from None
        out[path.stem] = rec.get("seconds")
    return out


def table(runs: dict[str, dict[str, float | None]], totals: dict[str, float] | None = None) -> str:
    """A Markdown table, one column per run."""
    names = list(runs)
    stages = [s for s in STAGE_ORDER if any(s in r for r in runs.values())]
    stages += sorted({s for r in runs.values() for s in r} - set(stages))
    fmt = lambda v: "—" if v is None else f"{v:,.1f}"  # noqa: E731
    lines = ["| stage | " + " | ".join(f"{n} (s)" for n in names) + " |", "|---|" + "---|" * len(names)]
    for s in stages:
        lines.append(f"| {s} | " + " | ".join(fmt(runs[n].get(s)) for n in names) + " |")
    lines.append("| sum of stages | " + " | ".join(fmt(sum(v for v in runs[n].values() if v is not None)) for n in names) + " |")
    if totals:
        lines.append("| `crossdict run`, whole process | " + " | ".join(fmt(totals.get(n)) for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="*", help="runs/<name> directories to report")
    p.add_argument("--run", metavar="CONFIG", help="run `crossdict run --config CONFIG` first and time it")
    a = p.parse_args()
    runs, totals = {}, {}
    if a.run:
        sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
        from crossdict.config import load_config

        run_dir = load_config(a.run).run_dir
        t, load0 = time.perf_counter(), os.getloadavg()[0]
        subprocess.run([sys.executable, "-m", "crossdict.cli", "run", "--config", a.run], check=True)
        totals[str(run_dir)] = time.perf_counter() - t
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the machine is shared: CPU time says more than wall
        print(f"whole run: {totals[str(run_dir)]:.1f} s wall, {ru.ru_utime + ru.ru_stime:.1f} s CPU (user+sys); "
              f"load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")
        runs[str(run_dir)] = stage_seconds(run_dir)
    for d in a.run_dirs:
        runs[d] = stage_seconds(d)
    if not runs:
        p.error("give a run directory or --run CONFIG")
    print(table(runs, totals or None))


if __name__ == "__main__":
    main()
