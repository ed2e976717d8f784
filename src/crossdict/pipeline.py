"""`crossdict run`: extract -> train -> align -> transfer -> report, each stage skipped when its outputs are current.

A stage is current when the record it left in `runs/<name>/stages/<stage>.json` names the same
inputs (its config sections plus a digest of every upstream stage's output files) and its own
output files still have the digest recorded. So a finished run reruns in seconds without loading a
model; a config change reruns exactly the stages it reaches, and says which key made it (except a
change to what the activation cache holds, which extraction refuses, naming the keys: see README); an
edited or deleted output file reruns the stage that owns it. An interrupted stage left no record:
it runs again and resumes inside (extraction by shard, SAE training from its last checkpoint).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .config import RunConfig, dump_config
from .integrity import FileStatus, bad_files, scan
from .utils import atomic_write_json, atomic_write_text, read_json, remove_file


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


# --- stages -------------------------------------------------------------------------------------


class Context:
    """What stages share within one `crossdict run`: the models, loaded at most once, only if needed."""

    def __init__(self, cfg: RunConfig, progress: bool):
        self.cfg, self.progress = cfg, progress
        self._backends = None

    def backends(self) -> dict:
        if self._backends is None:
            from .extract import load_backends

            self._backends = load_backends(self.cfg)
        return self._backends


@dataclass
class Stage:
    name: str
    config: Callable[[RunConfig], dict]
    """The config values this stage's outputs depend on."""
    upstream: tuple[str, ...]
    """Stages whose outputs this one reads."""
    outputs: Callable[[RunConfig], list[Path]]
    run: Callable[[Context], None]


def _extract_outputs(cfg: RunConfig) -> list[Path]:
    from .extract import LAYER_SWEEP, RANDOM_CACHE

    out = [cfg.cache_dir / "manifest.json"]
    if cfg.extract.random_floor:
        out.append(cfg.run_dir / RANDOM_CACHE / "manifest.json")
    if cfg.extract.layer_sweep_tokens > 0:
        out.append(cfg.cache_dir / LAYER_SWEEP / "sweep.json")
    return out


def _extract_lazily(ctx: Context) -> None:
    from .extract import run_extract

    run_extract(ctx.cfg, backends=ctx.backends, progress=ctx.progress)  # loads the models only if it must


def _train_outputs(cfg: RunConfig) -> list[Path]:
    from .pretrained import SOURCE_FILE, pretrained_layers

    out = [cfg.report_dir / "sae_metrics.csv"]
    pre = {(k, la) for k, la, _ in pretrained_layers(cfg)}
    for key in ("a", "b"):
        for layer in cfg.model(key).layers:
            if (key, layer) in pre:  # loaded, not trained: the checked record of its source
                out.append(cfg.sae_dir(key, layer) / SOURCE_FILE)
                continue
            for seed in cfg.sae.seeds:
                d = cfg.sae_dir(key, layer, seed)
                out += [d / "cfg.json", d / "sae_weights.safetensors"]
    return out


def _run_train(ctx: Context) -> None:
    from .pretrained import clear_stale, pretrained_layers
    from .train import run_train

    clear_stale(ctx.cfg)
    if pretrained_layers(ctx.cfg):
        from .pretrained_stage import run_train_with_pretrained

        run_train_with_pretrained(ctx.cfg, resume="auto", backends=ctx.backends(), progress=ctx.progress)
    else:
        run_train(ctx.cfg, resume="auto", backends=ctx.backends(), progress=ctx.progress)


def _train_config(c: RunConfig) -> dict:
    out = {"sae": asdict(c.sae), "layers": [c.model_a.layers, c.model_b.layers]}
    if c.sae.lm_eval_seeds == "all":  # the default: records written before the key existed stay current
        del out["sae"]["lm_eval_seeds"]
    from .pretrained import pretrained_layers, source_digest

    pre = pretrained_layers(c)
    if pre:  # only then, so runs without pretrained SAEs keep their records
        out["sae_sources"] = {f"{k}{la}": f"{src}@{source_digest(src)}" for k, la, src in pre}
    return out


ALIGN_FILES = ("metrics.csv", "alignment.csv", "feature_matches.csv", "layer_cka.csv")


def _run_align(ctx: Context) -> None:
    from .evaluate import run_align

    run_align(ctx.cfg, progress=ctx.progress)


def _align_config(c: RunConfig) -> dict:
    """What the align stage's outputs depend on: not `align.workers`, which changes only its time."""
    align = {k: v for k, v in asdict(c.align).items() if k != "workers"}
    return {"align": align, "seed": c.seed, "layer_pairs": c.layer_pairs}


TRANSFER_FILES = ("transfer.csv", "transfer_paired.csv", "transfer_examples.json", "stitching.csv", "feature_patching.csv",
                  "sae_transfer.csv")


def _transfer_outputs(cfg: RunConfig) -> list[Path]:
    return [cfg.report_dir / f for f in TRANSFER_FILES] if cfg.transfer.enabled else []


def _run_transfer(ctx: Context) -> None:
    if ctx.cfg.transfer.enabled:
        from .interventions import run_transfer

        run_transfer(ctx.cfg, backends=ctx.backends(), progress=ctx.progress)


def _run_crosscoder(ctx: Context) -> None:
    from .crosscoder import run_crosscode

    run_crosscode(ctx.cfg, resume="auto", progress=ctx.progress)


def _crosscoder_stage(cfg: RunConfig) -> list[Stage]:
    """The optional crosscoder stage (issue 9), only when `crosscoder.enabled`."""
    if not cfg.crosscoder.enabled:
        return []
    from .crosscoder import CFG_FILE, SUMMARY_FILE, WEIGHTS_FILE, crosscoder_dir

    def outputs(c: RunConfig) -> list[Path]:
        files = [crosscoder_dir(c, la, lb) / f for la, lb in c.layer_pairs for f in (CFG_FILE, WEIGHTS_FILE)]
        return files + [c.report_dir / f for f in ("crosscoder.csv", SUMMARY_FILE)]

    return [Stage("crosscoder", lambda c: {"crosscoder": asdict(c.crosscoder), "sae_k": c.sae.k, "max_norm_ratio": c.sae.max_norm_ratio,
                                           "q_threshold": c.align.q_threshold, "layer_pairs": c.layer_pairs, "seed": c.seed},
                  ("extract", "train", "align"), outputs, _run_crosscoder)]


def _run_report(ctx: Context) -> None:
    from .report import write_report

    write_report(ctx.cfg)


def stages(cfg: RunConfig) -> list[Stage]:
    """The pipeline, in data-flow order."""
    from .extract import cache_key

    return [
        Stage("extract", lambda c: {"cache": cache_key(c), "seed": c.seed, "random_floor": c.extract.random_floor,
                                    "layer_sweep_tokens": c.extract.layer_sweep_tokens},
              (), _extract_outputs, _extract_lazily),
        Stage("train", _train_config,
              ("extract",), _train_outputs, _run_train),
        Stage("align", _align_config, ("extract", "train"), lambda c: [c.report_dir / f for f in ALIGN_FILES], _run_align),
        Stage("transfer", lambda c: {"transfer": asdict(c.transfer), "seed": c.seed, "q": c.align.q_threshold},
              ("extract", "train", "align"), _transfer_outputs, _run_transfer),
        *_crosscoder_stage(cfg),
        Stage("report", lambda c: {"report_version": REPORT_VERSION, "run_name": c.run_name},
              ("extract", "train", "align", "transfer", *(("crosscoder",) if cfg.crosscoder.enabled else ())),
              lambda c: [c.report_dir / "index.html"], _run_report),
    ]


REPORT_VERSION = 2
"""Bump when the report's layout changes, so finished runs regenerate it."""


# --- records ------------------------------------------------------------------------------------


def files_digest(paths: list[Path], version: int | None = None) -> str | None:
    """sha256 over the files' bytes; None if any is missing (the stage must run).

    Files whose bytes hold timings count by what they say about the data, so re-writing them with new timings
    leaves their stage current: a cache `manifest.json` by its data-defining fields (`cache.manifest_identity`,
    from digest version 2), `sae_metrics.csv` without its `wall_s` column (from version 3: a retrained SAE that
    comes out byte-identical no longer reruns align and transfer). `version`: the digest version of the record
    compared against (records of older versions hold the digest their version computed)."""
    version = DIGEST_VERSION if version is None else version
    h = hashlib.sha256()
    for p in paths:
        if not p.is_file():
            return None
        h.update(str(p.name).encode())
        if p.name == "manifest.json" and version >= 2:
            h.update(_manifest_bytes(p))
            continue
        if p.name == "sae_metrics.csv" and version >= 3:
            h.update(_csv_without(p, TIMING_COLUMNS))
            continue
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:20]


DIGEST_VERSION = 3
"""2: cache manifests hashed by their data-defining fields (issue 15). 3: sae_metrics.csv without its timing
column. Records of older versions hold the digests their version computed."""
TIMING_COLUMNS = ("wall_s",)


def _csv_without(p: Path, columns: tuple[str, ...]) -> bytes:
    """The CSV's rows with `columns` left out, as bytes (its raw bytes if it is not a CSV with a header)."""
    raw = p.read_bytes()
    try:
        rows = list(csv.reader(io.StringIO(raw.decode())))
    except (UnicodeDecodeError, csv.Error):
        return raw
    if not rows:
        return raw
    keep = [i for i, c in enumerate(rows[0]) if c not in columns]
    return json.dumps([[r[i] if i < len(r) else None for i in keep] for r in rows]).encode()


def _manifest_bytes(p: Path) -> bytes:
    from .cache import manifest_identity

    try:
        m = json.loads(p.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return p.read_bytes()  # not JSON: its bytes (the stage that reads it names the problem)
    if not isinstance(m, dict):
        return p.read_bytes()
    return json.dumps(manifest_identity(m), sort_keys=True, default=str).encode()


def _record_path(cfg: RunConfig, name: str) -> Path:
    return cfg.run_dir / "stages" / f"{name}.json"


def _flatten(d: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, object] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def owned_dirs(cfg: RunConfig, name: str) -> list[Path]:
    """Directories whose files only stage `name` writes (checked against their digests before a skip)."""
    from .extract import RANDOM_CACHE

    return {"extract": [cfg.cache_dir, cfg.run_dir / RANDOM_CACHE], "train": [cfg.run_dir / "saes"],
            "align": [cfg.run_dir / "alignment"], "crosscoder": [cfg.run_dir / "crosscoder"]}.get(name, [])


def owned_files(cfg: RunConfig, name: str) -> list[str]:
    """Every file stage `name` owns now, relative to the run dir: its record lists them, so that a file deleted
    later, or a whole deleted directory (a shard, with its `digests.json`), reruns the stage."""
    return sorted(str(s.path.relative_to(cfg.run_dir)) for s in scan(owned_dirs(cfg, name))
                  if not s.status.startswith("missing"))


def deleted_files(cfg: RunConfig, name: str, record: dict | None) -> list[FileStatus]:
    """Files stage `name` owned when it finished (its record's `files`) that are gone now; for a record made
    before it listed them, the files a surviving `digests.json` names that are gone."""
    if record is not None and "files" in record:
        return [FileStatus(cfg.run_dir / f, f"missing (stage {name} wrote it; deleted since)")
                for f in record["files"] if not (cfg.run_dir / f).is_file()]
    return [s for s in scan(owned_dirs(cfg, name)) if s.status.startswith("missing")]


def damaged(cfg: RunConfig, name: str, record: dict | None = None) -> str | None:
    """None if every file stage `name` owns matches its recorded digest and none of them was deleted, else why it
    must run again.

    The stage then rewrites exactly those files: extraction redoes a damaged or deleted shard (`cache.shard_is_done`),
    training retrains a damaged SAE (`sae.is_complete`), align and crosscode rewrite all they own."""
    parts = []
    for what, found, status in (("corrupt", bad_files(owned_dirs(cfg, name)), True),
                                ("deleted", deleted_files(cfg, name, record), False)):
        if found:
            shown = "; ".join(f"{s.path.relative_to(cfg.run_dir)}" + (f" {s.status}" if status else "") for s in found[:3])
            parts.append(f"{len(found)} {what} file{'s' if len(found) > 1 else ''}: {shown}{'; ...' if len(found) > 3 else ''}")
    return "; ".join(parts) or None


def why_stale(record: dict | None, inputs: dict, outputs_digest: str | None) -> str | None:
    """None if the stage is current, else the reason it must run (naming changed keys)."""
    if record is None:
        return "no finished run of this stage yet"
    old, new = _flatten(json.loads(json.dumps(record.get("inputs", {}))), ""), _flatten(json.loads(json.dumps(inputs)), "")
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        ups = [k.split(".", 1)[1] for k in changed if k.startswith("upstream.")]
        keys = [k.split(".", 1)[1] for k in changed if k.startswith("config.")]
        parts = []
        if keys:
            shown = ", ".join(f"{k}: {old.get('config.' + k)!r} -> {new.get('config.' + k)!r}" for k in keys[:4])
            parts.append(f"config changed ({shown}{', ...' if len(keys) > 4 else ''})")
        if ups:
            parts.append(f"outputs of {', '.join(ups)} changed")
        return "; ".join(parts)
    if outputs_digest is None:
        return "outputs missing"
    if outputs_digest != record.get("outputs"):
        return "outputs were modified since they were written"
    return None


def run_all(cfg: RunConfig, progress: bool = True, only: list[str] | None = None) -> dict[str, str]:
    """Run every stage that is not current; returns {stage: 'ran' | 'skipped'}."""
    record_config(cfg)  # first write: an unwritable output_dir fails here, before any work
    from .pretrained import check_sources

    check_sources(cfg)  # a missing or unreachable pretrained SAE fails now, not after extraction
    t0 = time.perf_counter()
    ctx = Context(cfg, progress)
    digests: dict[str, str | None] = {}
    status: dict[str, str] = {}
    pipeline = stages(cfg)
    for i, stage in enumerate(pipeline, 1):
        inputs = {"config": stage.config(cfg), "upstream": {u: digests[u] for u in stage.upstream}}
        path = _record_path(cfg, stage.name)
        record = read_json(path, "stage record") if path.is_file() else None
        version = DIGEST_VERSION if record is None else min(int(record.get("digest_version", 1)), DIGEST_VERSION)
        reason = damaged(cfg, stage.name, record) or why_stale(record, inputs, files_digest(stage.outputs(cfg), version))
        if reason is None:
            print(f"[crossdict] stage {i}/{len(pipeline)} {stage.name}: up to date, skipped")
            digests[stage.name] = record["outputs"]
            status[stage.name] = "skipped"
            continue
        print(f"[crossdict] stage {i}/{len(pipeline)} {stage.name}: running ({reason}; {time.perf_counter() - t0:.0f} s so far)")
        remove_file(path)  # an interrupted stage must not look finished
        ts = time.perf_counter()
        stage.run(ctx)
        digests[stage.name] = files_digest(stage.outputs(cfg))
        if digests[stage.name] is None:
            missing = [str(p) for p in stage.outputs(cfg) if not p.is_file()]
            raise RuntimeError(f"stage {stage.name} finished without writing {missing}")
        atomic_write_json(path, {"inputs": inputs, "outputs": digests[stage.name], "digest_version": DIGEST_VERSION,
                                 "seconds": round(time.perf_counter() - ts, 1), "crossdict": __version__,
                                 "files": owned_files(cfg, stage.name)})
        status[stage.name] = "ran"
    _summary(cfg)
    print(f"[crossdict] run finished in {time.perf_counter() - t0:.0f} s")
    return status


# --- terminal summary ---------------------------------------------------------------------------


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
            if r["method"] in ("procrustes", "procrustes:z"):
                print(f"align A{r['layer_a']}->B{r['layer_b']} {r['method']:<13} held-out R2 {float(r['r2']):.3f} "
                      f"[{float(r['r2_ci_low']):.3f}, {float(r['r2_ci_high']):.3f}] (null {float(r['r2_null_mean']):.3f}); "
                      f"retrieval top-1 {float(r['top1']):.3f} vs chance {float(r['chance_top1']):.4f}")
    matches_csv = report / "feature_matches.csv"
    if matches_csv.is_file():
        rows = list(csv.DictReader(matches_csv.open()))
        for la, lb in cfg.layer_pairs:
            sig = [r for r in rows if r["layer_a"] == str(la) and r["layer_b"] == str(lb) and r["method"] == "hungarian"
                   and _is_num(r["q_value"]) and float(r["q_value"]) < cfg.align.q_threshold]
            print(f"matches A{la}<->B{lb}: {len(sig)} one-to-one (Hungarian) feature pairs with q < {cfg.align.q_threshold}")
    transfer_csv = report / "transfer.csv"
    if transfer_csv.is_file():
        from .interventions import transfer_summary

        rows = [{**r, "alpha": float(r["alpha"]), "q_value": float(r["q_value"]) if _is_num(r["q_value"]) else 1.0,
                 "agreement": float(r["agreement"]) if _is_num(r["agreement"]) else math.nan}
                for r in csv.DictReader(transfer_csv.open())]
        paired_csv = report / "transfer_paired.csv"
        paired = list(csv.DictReader(paired_csv.open())) if paired_csv.is_file() else []
        if rows:
            for line in transfer_summary(rows, max(r["alpha"] for r in rows), cfg.align.q_threshold, paired)["lines"]:
                print(f"transfer {line}")
    stitch_csv = report / "stitching.csv"
    if stitch_csv.is_file():
        for r in csv.DictReader(stitch_csv.open()):
            if r["control"] == "none":
                print(f"stitching A{r['layer_a']}->B{r['layer_b']} {r['map']:<13} loss recovered {float(r['frac_recovered']):.3f} "
                      f"(mean-ablation 0, clean 1)")
    html = report / "index.html"
    print(f"report: {html.resolve() if html.is_file() else report}")


def _is_num(v: str) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
