"""The train stage when some SAEs are pretrained: check and record those, train the rest, one metrics CSV.

Pretrained SAEs are checked first (hook vs layer, d_in vs model, readable finite weights), so a bad
source fails before any training and before any downstream file is touched.
"""

from __future__ import annotations

import csv
import io
import time

from .cache import ActivationCache
from .config import RunConfig
from .pretrained import link, pretrained_layers, without_pretrained
from .cache import hook_name
from .train import CSV_COLUMNS, drop_massive, evaluate_sae, massive_activation_threshold, run_train
from .utils import atomic_write_text


def _pretrained_row(cfg: RunConfig, cache: ActivationCache, key: str, layer: int) -> dict:
    """Load, check and record one pretrained SAE; its held-out FVU / L0 like a trained one (same token filter)."""
    t0 = time.perf_counter()
    acts = cache.acts(key, layer)
    max_norm = massive_activation_threshold(acts, cache.rows(key, "train"), cfg.sae.max_norm_ratio)
    sae = link(cfg, key, layer, cache.d_model(key), max_norm)
    metrics = evaluate_sae(sae, acts, drop_massive(acts, cache.rows(key, "heldout"), max_norm))
    # Readers key rows by the first seed; "architecture" says the SAE is pretrained.
    row = {"model": cfg.model(key).name, "layer": layer, "hook_name": hook_name(layer), "seed": cfg.sae.seeds[0],
           "architecture": f"{sae.spec.architecture} (pretrained {sae.spec.metadata['kind']})", "d_sae": sae.d_sae,
           "train_tokens": 0, "wall_s": round(time.perf_counter() - t0, 2)}
    row.update({c: metrics.get(c, "") for c in CSV_COLUMNS if c not in row})
    return row


def run_train_with_pretrained(cfg: RunConfig, resume: bool | str = "auto", backends: dict | None = None,
                              progress: bool = True) -> list[dict]:
    """Record every pretrained SAE (`pretrained.json`), train the others, write `report/sae_metrics.csv`."""
    cache = ActivationCache(cfg.cache_dir)
    pre_rows = {(k, la): _pretrained_row(cfg, cache, k, la) for k, la, _ in pretrained_layers(cfg)}
    for (k, la), r in pre_rows.items():
        print(f"[crossdict] train: model {k} layer {la}: pretrained {r['architecture']} SAE, d_sae {r['d_sae']}, "
              f"held-out FVU {float(r['fvu']):.3f}, L0 {float(r['l0']):.1f} (not trained)")
    trained = without_pretrained(cfg)
    rows = run_train(trained, resume=resume, backends=backends, progress=progress) \
        if trained.model_a.layers or trained.model_b.layers else []
    jobs = [(k, la, s) for k in ("a", "b") for la in trained.model(k).layers for s in cfg.sae.seeds]  # run_train's order
    by_key = dict(zip(jobs, rows))
    out = []
    for key in ("a", "b"):
        for layer in cfg.model(key).layers:
            if (key, layer) in pre_rows:
                out.append(pre_rows[(key, layer)])
            else:
                out += [r for (k, la, _), r in by_key.items() if k == key and la == layer]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    for r in out:
        w.writerow({c: (f"{v:.6g}" if isinstance(v, float) else v) for c, v in r.items() if c in CSV_COLUMNS})
    atomic_write_text(cfg.report_dir / "sae_metrics.csv", buf.getvalue())
    return out
