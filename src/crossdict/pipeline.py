"""`crossdict run`: extract -> train -> align, each stage skipped when its outputs match the config.

Stage outputs carry what they were made from (the cache manifest key, each SAE's fingerprint), so
rerunning after a finished run is fast, and an interrupted run resumes where it stopped: extraction
by shard, training from the last checkpoint. Alignment is recomputed on every run (~1 min per layer pair). Transfer and the HTML report
are not stages yet.
"""

from __future__ import annotations

import csv
import platform
import time

import torch

from . import __version__
from .config import RunConfig, dump_config
from .utils import atomic_write_text


def record_config(cfg: RunConfig) -> None:
    """`runs/<name>/config.yaml`: the resolved config plus versions, enough to reproduce the run."""
    import numpy
    import transformers

    header = (
        f"# crossdict {__version__}, python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, numpy {numpy.__version__}\n"
        f"# reproduce: crossdict run --config runs/{cfg.run_name}/config.yaml\n"
    )
    atomic_write_text(cfg.run_dir / "config.yaml", header + dump_config(cfg))


def _summary(cfg: RunConfig) -> None:
    report = cfg.report_dir
    print("\n== crossdict summary ==")
    sae_csv = report / "sae_metrics.csv"
    if sae_csv.is_file():
        for r in csv.DictReader(sae_csv.open()):
            print(f"SAE {r['model']:<14} layer {r['layer']:>2}: FVU {float(r['fvu']):.3f}  L0 {float(r['l0']):.1f}  "
                  f"dead {float(r['dead_frac']):.3f}  LM loss recovered (mean-abl.) {r.get('frac_recovered_mean') or 'n/a'}")
    align_csv = report / "alignment.csv"
    if align_csv.is_file():
        for r in csv.DictReader(align_csv.open()):
            if r["method"].startswith("procrustes"):
                print(f"align A{r['layer_a']}->B{r['layer_b']} {r['method']:<13} held-out R2 {float(r['r2']):.3f} "
                      f"[{float(r['r2_ci_low']):.3f}, {float(r['r2_ci_high']):.3f}] (null {float(r['r2_null_mean']):.3f}); "
                      f"retrieval top-1 {float(r['top1']):.3f} vs chance {float(r['chance_top1']):.4f}")
    matches_csv = report / "feature_matches.csv"
    if matches_csv.is_file():
        rows = list(csv.DictReader(matches_csv.open()))
        for la, lb in cfg.layer_pairs:
            sig = [r for r in rows if r["layer_a"] == str(la) and r["layer_b"] == str(lb) and r["method"] == "hungarian"
                   and _is_num(r["q_value"])
                   and float(r["q_value"]) < cfg.align.q_threshold]
            print(f"matches A{la}<->B{lb}: {len(sig)} one-to-one (Hungarian) feature pairs with q < {cfg.align.q_threshold}")
    print(f"report CSVs: {report}")


def _is_num(v: str) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def run_all(cfg: RunConfig, progress: bool = True) -> None:
    from .align import run_align
    from .extract import load_backends, run_extract
    from .train import run_train

    record_config(cfg)
    t0 = time.perf_counter()
    backends = load_backends(cfg)  # once: extraction and the SAEs' LM-loss evaluation share them
    print("[crossdict] stage 1/3: extract")
    run_extract(cfg, backends=backends, progress=progress)
    print(f"[crossdict] stage 2/3: train SAEs ({time.perf_counter() - t0:.0f} s so far)")
    run_train(cfg, backends=backends, progress=progress)
    print(f"[crossdict] stage 3/3: align, match, metrics ({time.perf_counter() - t0:.0f} s so far)")
    run_align(cfg)
    _summary(cfg)
    print(f"[crossdict] run finished in {time.perf_counter() - t0:.0f} s")
