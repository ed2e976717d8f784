"""`crossdict` command line: one subcommand per pipeline stage, plus `run` for all of them.

    crossdict extract   --config configs/embedded.yaml     text -> activations (+ anchor pairs)
    crossdict train     --config ... [--seeds 0 1]         activations -> SAEs
    crossdict align     --config ... [--layers 8 15]       SAEs + activations -> maps, matches, metrics
    crossdict crosscode --config ... [--resume]            activations -> crosscoders (optional stage)
    crossdict report    --config ...                       run files -> report/index.html
    crossdict run       --config ...                       all stages, skipping finished ones
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .config import ConfigError, RunConfig, dump_config, load_config
from .utils import atomic_write_text


def _parse_override(s: str) -> tuple[str, object]:
    import yaml

    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--set expects key=value (e.g. sae.k=16), got {s!r}")
    k, v = s.split("=", 1)
    return k, yaml.safe_load(v)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--set", action="append", type=_parse_override, default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set corpus.max_passages=200 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossdict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="run both models over the corpus and cache hidden states + anchor pairs")
    _common(p)

    p = sub.add_parser("train", help="train one SAE per model and layer")
    _common(p)
    p.add_argument("--seeds", type=int, nargs="+", help="SAE seeds (default: sae.seeds from the config)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    p = sub.add_parser("align", help="fit maps A->B, match features, compute metrics with CIs and nulls")
    _common(p)
    p.add_argument("--layers", type=int, nargs="+", help="layers of model A (default: all configured)")
    p.add_argument("--layers-b", type=int, nargs="+", help="paired layers of model B (default: from the config)")

    p = sub.add_parser("crosscode", help="train one crosscoder per layer pair on anchor-paired activations, compare with the SAEs")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    p = sub.add_parser("report", help="write the self-contained HTML report from the run's files")
    _common(p)

    p = sub.add_parser("run", help="all stages end to end, skipping stages whose outputs match the config")
    _common(p)
    return parser


def _load(args) -> RunConfig:
    overrides = dict(args.set)
    cfg = load_config(args.config, overrides)
    return cfg


def _record_config(cfg: RunConfig) -> None:
    atomic_write_text(cfg.run_dir / "config.yaml", dump_config(cfg))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _load(args)
    except ConfigError as e:
        print(f"crossdict: config error: {e}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    t0 = time.perf_counter()
    try:
        if args.command == "extract":
            from .extract import run_extract

            _record_config(cfg)
            run_extract(cfg, progress=progress)
        elif args.command == "train":
            from .train import run_train

            run_train(cfg, seeds=args.seeds, resume=args.resume, progress=progress)
        elif args.command == "align":
            from .align import run_align

            run_align(cfg, layers_a=args.layers, layers_b=args.layers_b)
        elif args.command == "crosscode":
            from .crosscoder import run_crosscode

            run_crosscode(cfg, resume=args.resume, progress=progress)
        elif args.command == "report":
            from .report import write_report

            write_report(cfg)
        elif args.command == "run":
            from .pipeline import run_all

            run_all(cfg, progress=progress)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as e:
        if os.environ.get("CROSSDICT_DEBUG"):
            raise
        print(f"crossdict {args.command}: error: {e}", file=sys.stderr)
        return 1
    print(f"[crossdict] {args.command} done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
