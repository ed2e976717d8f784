"""The align stage: fit maps, score them, compute similarity metrics with CIs and nulls, match SAE features.

Outputs (all written atomically) under `runs/<name>/`:
  alignment/<la>_<lb>/<method>.{safetensors,json}   fitted maps
  report/alignment.csv        held-out R² (with passage-bootstrap CI and shuffled-pairing null) and
                              retrieval top-1/top-10 vs chance, per layer pair and method
  report/metrics.csv          layer_a, layer_b, space, metric, value, ci_low, ci_high, null_mean, p_value, split
  report/feature_matches.csv  one row per matched SAE feature pair (see `matching`)
  report/feature_matches_seed.csv  the same for SAE seed-vs-seed matching (ceiling), when present
  report/layer_cka.csv        linear CKA for every cached (layer of A, layer of B)

Spaces in metrics.csv: `resid` (raw residual streams), `resid_z` (every dimension z-scored with
train statistics, see `zscore`; alignment.csv methods with suffix `:z`), `sae` (SAE codes), `resid_random_b` / `resid_z_random_b` (A vs a
randomly initialised B: the floor, from `runs/<name>/cache_random` when present), `sae_seed_a` /
`sae_seed_b` (an SAE vs the same model's SAE trained with another seed: the ceiling).
All metrics are computed on held-out anchors; maps and matches are chosen on train anchors.

Cost on 2 CPU cores with the default config (200 resamples + 200 null draws per metric, 1000
null draws per match): ~4 min per layer pair at 100k anchors, d ≈ 600, 4.6k/5.1k-feature SAEs
(about half of it SAE matching and code metrics), plus the same again per seed-ceiling SAE pair;
~1 min per pair without SAEs (SmolLM2-135M vs Gemma-3-270M, 27k anchors, 3 pairs: 198 s).
`n_bootstrap`, `n_null`, `n_match_null` and `n_match_bootstrap` trade time for resolution.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import baselines
from .align import fit_maps, map_dir, unstandardize, procrustes_rotation, r2_with_ci, retrieval_accuracy
from .cache import ActivationCache
from .config import AlignConfig, RunConfig
from .matching import MATCH_COLUMNS, Matches, encode_sparse, match_features
from .metrics import (
    correlation_rdm,
    cosine_sim,
    cka_pairwise,
    HeldoutCCA,
    cka_family,
    debiased_cka_pairwise,
    linear_gram,
    match_invariance,
    mutual_knn_pairwise,
    rbf_gram,
    rsa_pairwise,
    jaccard_sets,
    topk_sets,
)
from .stats import InsufficientDataError, MetricResult, passage_subsample, with_ci
from .utils import atomic_write_text, load_npy

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("layer_a", "layer_b", "space", "metric", "value", "ci_low", "ci_high", "null_mean", "p_value", "split")
ALIGN_COLUMNS = (
    "layer_a", "layer_b", "method", "n_train", "n_heldout", "r2", "r2_ci_low", "r2_ci_high", "r2_null_mean",
    "r2_p_value", "top1", "top10", "chance_top1", "chance_top10", "candidates",
)  # fmt: skip
LAYER_CKA_COLUMNS = ("layer_a", "layer_b", "cka", "cka_z", "n_pairs", "source")


@dataclass
class Paired:
    """Anchor-paired activations of one split: xa `[n, d_a]`, xb `[n, d_b]`, pid `[n]`."""

    xa: np.ndarray
    xb: np.ndarray
    pid: np.ndarray

    @property
    def n(self) -> int:
        return len(self.pid)

    @property
    def n_passages(self) -> int:
        return len(np.unique(self.pid))

    def rows(self, r: np.ndarray) -> "Paired":
        return Paired(self.xa[r], self.xb[r], self.pid[r])


# ---------------------------------------------------------------------------------------------
# inputs and checks


def _load_paired(cache: ActivationCache, la: int, lb: int, split: str) -> Paired:
    xa, xb, pid = cache.paired_acts(la, lb, split)
    for key, layer, x in (("a", la, xa), ("b", lb, xb)):
        if x.shape[1] != cache.d_model(key):
            raise ValueError(
                f"cache {cache.dir}: model {key} layer {layer} has width {x.shape[1]} but the manifest says "
                f"d_model={cache.d_model(key)}; the cache mixes shards from different runs, re-extract it"
            )
    return Paired(xa, xb, pid)


def _require(tr: Paired, ho: Paired, acfg: AlignConfig, la: int, lb: int) -> None:
    where = f"layers (a={la}, b={lb})"
    for name, p in (("train", tr), ("held-out", ho)):
        if p.n < acfg.min_anchors:
            raise InsufficientDataError(
                f"{where}: {p.n} {name} anchor pairs, need at least align.min_anchors={acfg.min_anchors} to fit and "
                "score a map; extract more passages (corpus.max_passages) or adjust corpus.heldout_fraction"
            )
    if (acfg.n_bootstrap or acfg.n_null) and ho.n_passages < acfg.min_passages:
        raise InsufficientDataError(
            f"{where}: held-out anchors come from {ho.n_passages} passages, need at least "
            f"align.min_passages={acfg.min_passages} for passage-bootstrap CIs and shuffled-pairing nulls; "
            "extract more passages, raise corpus.heldout_fraction, or set align.n_bootstrap = align.n_null = 0"
        )


def _layer_pairs(
    cfg: RunConfig, cache: ActivationCache, layers_a: list[int] | None, layers_b: list[int] | None
) -> list[tuple[int, int]]:
    """Requested pairs: both lists -> paired by position; one list -> configured pairs filtered by it."""
    if layers_a is not None and layers_b is not None:
        if len(layers_a) != len(layers_b):
            raise ValueError(f"layers_a {layers_a} and layers_b {layers_b} must have the same length (paired by position)")
        pairs = list(zip(layers_a, layers_b))
    else:
        pairs = [
            (a, b) for a, b in cfg.layer_pairs
            if (layers_a is None or a in layers_a) and (layers_b is None or b in layers_b)
        ]  # fmt: skip
    if not pairs:
        raise ValueError(f"no layer pairs to align: configured {cfg.layer_pairs}, requested a={layers_a} b={layers_b}")
    for a, b in pairs:
        for key, layer in (("a", a), ("b", b)):
            if layer not in cache.layers(key):
                raise KeyError(
                    f"layer {layer} of model {key} is not in the cache {cache.dir}; cached layers: {cache.layers(key)}"
                )
    return pairs


def _load_sae(path: Path) -> Any:
    """Indirection so tests can substitute a stand-in SAE."""
    from .sae import load_sae

    return load_sae(path)


def _find_sae(cfg: RunConfig, key: str, layer: int, d_model: int, seed: int | None = None) -> Any | None:
    """The SAE for (model, layer, seed), None when no SAEs were trained; errors when this one is missing."""
    path = cfg.sae_dir(key, layer, seed)
    if not path.exists():
        root = path.parent
        if seed is None and root.is_dir() and any(root.iterdir()):
            raise FileNotFoundError(
                f"no SAE for model {key} ({cfg.model(key).name}) layer {layer}: {path} is missing although "
                f"{root} holds other SAEs; train it (crossdict train-sae) or leave layer {layer} out of the align request"
            )
        log.info("no SAE at %s; skipping SAE-space statistics for it", path)
        return None
    sae = _load_sae(path)
    d_in = int(sae.W_dec.shape[1])
    if d_in != d_model:
        raise ValueError(
            f"SAE {path} has d_in={d_in} but cached activations of model {key} layer {layer} have d_model={d_model}: "
            "the SAE and the activation cache come from different runs"
        )
    return sae


def _random_cache(cfg: RunConfig, cache: ActivationCache) -> ActivationCache | None:
    path = cfg.run_dir / "cache_random"
    if not (path / "manifest.json").is_file():
        log.info("no random-init cache at %s; skipping the random-model floor", path)
        return None
    rc = ActivationCache(path)
    for split in ("train", "heldout"):
        main, rand = cache.anchor_pairs(split), rc.anchor_pairs(split)
        if len(main) != len(rand):
            raise ValueError(
                f"anchor count mismatch: {path} has {len(rand)} {split} anchor pairs, {cache.dir} has {len(main)}; "
                "the random-init cache must be extracted from the same corpus and tokenizers"
            )
        if not np.array_equal(cache.tokens("b")[main[:, 1], :4], rc.tokens("b")[rand[:, 1], :4]):
            raise ValueError(f"{path} pairs different tokens (passage/position/characters) than {cache.dir}; re-extract it")
    return rc


def _decoder(sae: Any) -> np.ndarray:
    W = sae.W_dec
    return (W.detach().float().cpu().numpy() if hasattr(W, "detach") else np.asarray(W, np.float32))


def zscore(tr: Paired, ho: Paired) -> tuple[Paired, Paired]:
    """Standardise every dimension with the train split's mean and sd (both splits, both models).

    Residual streams have "rogue" dimensions (Timkey & van Schijndel 2021; massive activations,
    Sun et al. 2024): in SmolLM2-135M layer 15 one dimension carries 98% of the variance, so raw
    linear CKA, Procrustes and 99%-variance SVCCA mostly compare that one direction. The `resid_z`
    space gives every dimension equal weight.
    """

    (ma, sa), (mb, sb) = zscore_stats(tr.xa), zscore_stats(tr.xb)
    z = lambda p: Paired((p.xa - ma) / sa, (p.xb - mb) / sb, p.pid)  # noqa: E731
    return z(tr), z(ho)


def zscore_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and sd `[d]` (sd 1 where constant), float32."""
    mu, sd = X.mean(0, dtype=np.float64), X.std(0, dtype=np.float64)
    return mu.astype(np.float32), np.where(sd > 0, sd, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# metric blocks


def _rows(la: int, lb: int, space: str, results: dict[str, MetricResult], split: str = "heldout") -> list[dict]:
    return [
        {"layer_a": la, "layer_b": lb, "space": space, "metric": k, "value": r.value, "ci_low": r.ci_low,
         "ci_high": r.ci_high, "null_mean": r.null_mean, "p_value": r.p_value, "split": split}
        for k, r in results.items()
    ]  # fmt: skip


def _plain(value: float) -> MetricResult:
    return MetricResult(value, math.nan, math.nan, math.nan, math.nan)


def _ci(fn: Callable, A: Any, B: Any, pid: np.ndarray, acfg: AlignConfig, rng: np.random.Generator) -> Any:
    return with_ci(fn, A, B, pid, acfg.n_bootstrap, acfg.n_null, rng, min_passages=4, ci=acfg.ci_method)


def _pairwise_metrics(
    A: Any, B: Any, pid: np.ndarray, acfg: AlignConfig, rng: np.random.Generator, rbf: bool
) -> dict[str, MetricResult]:
    """O(n²) metrics on ≤ pairwise_max_tokens rows: token×token matrices built once, resampled by index."""
    sub = passage_subsample(pid, acfg.pairwise_max_tokens, rng)
    A, B, pid = A[sub], B[sub], pid[sub]
    out = {}
    if rbf:
        out["rbf_cka"] = _ci(cka_pairwise, rbf_gram(A), rbf_gram(B), pid, acfg, rng)
    rsub = passage_subsample(pid, acfg.rsa_max_tokens, rng)  # Spearman ranks n²/2 distances per resample
    out["rsa"] = _ci(rsa_pairwise, correlation_rdm(A[rsub]), correlation_rdm(B[rsub]), pid[rsub], acfg, rng)
    k = acfg.mknn_k
    out["mutual_knn"] = _ci(lambda P, Q: mutual_knn_pairwise(P, Q, k), cosine_sim(A), cosine_sim(B), pid, acfg, rng)
    return out


def resid_metrics(tr: Paired, ho: Paired, acfg: AlignConfig, rng: np.random.Generator) -> dict[str, MetricResult]:
    """All similarity metrics on raw activations of held-out anchors (≤ metric_max_tokens rows).

    SVCCA/PWCCA directions are fitted on the train anchors (see `metrics.HeldoutCCA`).
    """
    sub = passage_subsample(ho.pid, acfg.metric_max_tokens, rng)
    q = ho.rows(sub)
    out = _ci(cka_family, q.xa, q.xb, q.pid, acfg, rng)
    hcca = HeldoutCCA.fit(tr.xa, tr.xb, acfg.svcca_variance)
    U, V = hcca.variates(q.xa, q.xb)
    out.update(_ci(hcca.score, U, V, q.pid, acfg, rng))
    out.update(_pairwise_metrics(q.xa, q.xb, q.pid, acfg, rng, rbf=True))
    return out


def code_metrics(
    ca: Any, cb: Any, pid: np.ndarray, hung: Matches | None, acfg: AlignConfig, rng: np.random.Generator
) -> dict[str, MetricResult]:
    """Metrics on SAE codes (CSR `[n, m]`) of held-out anchors.

    SVCCA/PWCCA are not computed here: with m ≈ 16k features and a few thousand tokens, every
    CCA direction overfits (k >= n) and the numbers say nothing.
    """
    sub = passage_subsample(pid, acfg.metric_max_tokens, rng)
    ca, cb, pid = ca[sub], cb[sub], pid[sub]
    Ka, Kb = linear_gram(ca), linear_gram(cb)
    out = {
        "linear_cka": _ci(cka_pairwise, Ka, Kb, pid, acfg, rng),
        "debiased_cka": _ci(debiased_cka_pairwise, Ka, Kb, pid, acfg, rng),
    }
    out.update(_pairwise_metrics(ca, cb, pid, acfg, rng, rbf=False))
    if hung is not None and len(hung):
        ta, tb = topk_sets(ca, cb, hung.feat_a, hung.feat_b, acfg.top_k_overlap)  # once; resamples index rows
        out["topk_overlap"] = _ci(jaccard_sets, ta, tb, pid, acfg, rng)
    return out


def match_summary(matches: dict[str, Matches], m_a: int, alive_a: int, q: float) -> dict[str, MetricResult]:
    """Matching rates: fraction of A's live features with a BH-significant partner, their mean corr, invariance."""
    out = {}
    for name, m in matches.items():
        sig = m.significant(q)
        out[f"match_rate_{name}"] = _plain(sig.sum() / max(alive_a, 1))
        out[f"mean_match_corr_{name}"] = _plain(float(m.act_corr[sig].mean()) if sig.any() else math.nan)
        if np.isfinite(m.stability).any():
            out[f"invariance_{name}"] = _plain(match_invariance(m.stability))
    return out


def _codes(sae: Any, X: np.ndarray) -> Any:
    return encode_sparse(sae, X)


def sae_block(
    sae_a: Any, sae_b: Any, tr_a: np.ndarray, tr_b: np.ndarray, pid_tr: np.ndarray,
    ho_a: np.ndarray, ho_b: np.ndarray, pid_ho: np.ndarray, rotation: np.ndarray | None,
    acfg: AlignConfig, rng: np.random.Generator, strata: np.ndarray | None = None, keep: dict | None = None,
) -> tuple[dict[str, MetricResult], dict[str, Matches]]:  # fmt: skip
    """Encode, match features (train), test matches and compute code metrics (held-out).

    strata `[n_ho]`: B's token id per held-out anchor (token-stratified match null); `keep`, when
    given, receives the held-out codes ("ca", "cb") for the floors/ceilings in `baselines`.
    """
    sub = passage_subsample(pid_tr, acfg.match_max_tokens, rng)
    ctr_a, ctr_b = _codes(sae_a, tr_a[sub]), _codes(sae_b, tr_b[sub])
    cho_a, cho_b = _codes(sae_a, ho_a), _codes(sae_b, ho_b)
    dec_a, dec_b = _decoder(sae_a), _decoder(sae_b)
    if rotation is not None:
        dec_a = dec_a @ rotation  # A's decoder directions expressed in B's residual basis
    matches = match_features(
        ctr_a, ctr_b, pid_tr[sub], cho_a, cho_b, pid_ho, dec_a, dec_b,
        n_null=acfg.n_match_null, n_boot=acfg.n_match_bootstrap, pvalue=acfg.match_pvalue, rng=rng,
        strata=strata if acfg.match_token_null else None,
        min_passages=acfg.min_feature_passages, min_tokens=acfg.min_feature_tokens, min_corr=acfg.match_min_corr,
    )  # fmt: skip
    if keep is not None:
        keep.update(ca=cho_a, cb=cho_b)
    metrics = code_metrics(cho_a, cho_b, pid_ho, matches.get("hungarian"), acfg, rng)
    alive_a = int(np.count_nonzero(np.asarray((cho_a > 0).sum(0)).ravel()))
    metrics.update(match_summary(matches, cho_a.shape[1], alive_a, acfg.q_threshold))
    metrics.update({k: _plain(v) for k, v in baselines.match_count_metrics(matches, cho_a, pid_ho, acfg).items()})
    return metrics, matches


def _score_maps(
    maps: dict, tr_n: int, ho: Paired, acfg: AlignConfig, rng: np.random.Generator, la: int, lb: int, suffix: str = ""
) -> list[dict]:
    rows = []
    for name, mp in maps.items():
        y_hat = mp.transform(ho.xa)
        r2 = r2_with_ci(y_hat, ho.xb, ho.pid, acfg.n_bootstrap, acfg.n_null, rng, ci=acfg.ci_method)
        ret = retrieval_accuracy(y_hat, ho.xb, acfg.retrieval_candidates, rng, acfg.retrieval_queries)
        if ret["candidates"] < acfg.retrieval_candidates:
            log.info("layers (%d, %d): only %d held-out anchors, retrieval uses M=%d candidates", la, lb, ho.n, ret["candidates"])
        rows.append({
            "layer_a": la, "layer_b": lb, "method": name + suffix, "n_train": tr_n, "n_heldout": ho.n,
            "r2": r2.value, "r2_ci_low": r2.ci_low, "r2_ci_high": r2.ci_high, "r2_null_mean": r2.null_mean,
            "r2_p_value": r2.p_value, **{k: ret[k] for k in ("top1", "top10", "chance_top1", "chance_top10", "candidates")},
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# stage


@dataclass
class Report:
    metrics: list[dict]
    alignment: list[dict]
    matches: list[dict]
    seed_matches: list[dict]
    ceilings_done: set = field(default_factory=set)
    floors: Any = None  # baselines.Floors: B's token ids at the anchors
    ceilings: dict = field(default_factory=dict)  # (key, layer) -> baselines.CodePair of the seed ceiling


def _align_pair(
    cfg: RunConfig, cache: ActivationCache, rcache: ActivationCache | None, la: int, lb: int,
    rng: np.random.Generator, rep: Report,
) -> None:  # fmt: skip
    acfg = cfg.align
    tr, ho = _load_paired(cache, la, lb, "train"), _load_paired(cache, la, lb, "heldout")
    _require(tr, ho, acfg, la, lb)
    log.info("layers (a=%d, b=%d): %d train / %d held-out anchors", la, lb, tr.n, ho.n)

    maps = fit_maps(tr.xa, tr.xb, acfg.methods, acfg.ridge_alpha, acfg.svcca_variance, acfg.procrustes_scale)
    for mp in maps.values():
        mp.meta.update(layer_a=la, layer_b=lb, model_a=cfg.model_a.name, model_b=cfg.model_b.name)
        mp.save(map_dir(cfg.run_dir, la, lb))
    rep.alignment += _score_maps(maps, tr.n, ho, acfg, rng, la, lb)
    rep.metrics += _rows(la, lb, "resid", resid_metrics(tr, ho, acfg, rng))
    if acfg.standardized_space:
        ztr, zho = zscore(tr, ho)
        zmaps = fit_maps(ztr.xa, ztr.xb, acfg.methods, acfg.ridge_alpha, acfg.svcca_variance, acfg.procrustes_scale)
        rep.alignment += _score_maps(zmaps, tr.n, zho, acfg, rng, la, lb, suffix=":z")
        za, zb = zscore_stats(tr.xa), zscore_stats(tr.xb)
        for mp in zmaps.values():  # saved as raw-space affine maps, so transfer can apply them like the others
            raw = unstandardize(mp, *za, *zb)
            raw.meta.update(layer_a=la, layer_b=lb, model_a=cfg.model_a.name, model_b=cfg.model_b.name)
            raw.save(map_dir(cfg.run_dir, la, lb))
        rep.metrics += _rows(la, lb, "resid_z", resid_metrics(ztr, zho, acfg, rng))

    resid_floors = {}  # floors that share the input, through the same path as the real numbers (baselines)
    for name in acfg.input_floors:
        fb_tr, fb_ho = rep.floors.resid(name)
        ftr, fho = Paired(tr.xa, fb_tr, tr.pid), Paired(ho.xa, fb_ho, ho.pid)
        fmaps = fit_maps(ftr.xa, ftr.xb, acfg.methods, acfg.ridge_alpha, acfg.svcca_variance, acfg.procrustes_scale)
        rep.alignment += _score_maps(fmaps, tr.n, fho, acfg, rng, la, lb, suffix=f":{name}_b")
        rep.metrics += _rows(la, lb, f"resid_{name}_b", resid_metrics(ftr, fho, acfg, rng))
        resid_floors[name] = (ftr.xa, ftr.xb, fho.xa, fho.xb, fmaps["procrustes"])
    if rcache is not None:  # floor: trained A against randomly initialised B on the same anchors
        if lb in rcache.layers("b"):
            rb_tr = Paired(tr.xa, rcache.acts("b", lb).take(rcache.anchor_pairs("train")[:, 1]), tr.pid)
            rb_ho = Paired(ho.xa, rcache.acts("b", lb).take(rcache.anchor_pairs("heldout")[:, 1]), ho.pid)
            floor_maps = fit_maps(rb_tr.xa, rb_tr.xb, acfg.methods, acfg.ridge_alpha, acfg.svcca_variance, acfg.procrustes_scale)
            rep.alignment += _score_maps(floor_maps, tr.n, rb_ho, acfg, rng, la, lb, suffix=":random_b")
            rep.metrics += _rows(la, lb, "resid_random_b", resid_metrics(rb_tr, rb_ho, acfg, rng))
            resid_floors["random"] = (rb_tr.xa, rb_tr.xb, rb_ho.xa, rb_ho.xb, floor_maps["procrustes"])
            if acfg.standardized_space:  # the floor for the z-scored numbers, in the same space
                zrb_tr, zrb_ho = zscore(rb_tr, rb_ho)
                zfloor = fit_maps(zrb_tr.xa, zrb_tr.xb, acfg.methods, acfg.ridge_alpha, acfg.svcca_variance, acfg.procrustes_scale)
                rep.alignment += _score_maps(zfloor, tr.n, zrb_ho, acfg, rng, la, lb, suffix=":z:random_b")
                rep.metrics += _rows(la, lb, "resid_z_random_b", resid_metrics(zrb_tr, zrb_ho, acfg, rng))
        else:
            log.info("random-init cache has no layer %d of model b; skipping the floor for this pair", lb)

    sae_a = _find_sae(cfg, "a", la, cache.d_model("a"))
    sae_b = _find_sae(cfg, "b", lb, cache.d_model("b"))
    if sae_a is not None and sae_b is not None:
        R = maps["procrustes"].rotation if "procrustes" in maps else procrustes_rotation(tr.xa, tr.xb)
        keep: dict = {}
        strata = rep.floors.tok_ho
        metrics, matches = sae_block(sae_a, sae_b, tr.xa, tr.xb, tr.pid, ho.xa, ho.xb, ho.pid, R, acfg, rng, strata, keep)
        rep.metrics += _rows(la, lb, "sae", metrics)
        for m in matches.values():
            rep.matches += m.rows(la, lb)
        real = baselines.CodePair(keep["ca"], keep["cb"], matches.get("hungarian"))
        code_floors = {}
        for name in acfg.input_floors:  # B's SAE replaced by a token-identity encoder, same sae_block
            tok_sae, ids_tr, ids_ho = rep.floors.codes(name)
            fkeep: dict = {}
            fm, fmatch = sae_block(sae_a, tok_sae, tr.xa, ids_tr, tr.pid, ho.xa, ids_ho, ho.pid, R, acfg, rng, strata, fkeep)
            rep.metrics += _rows(la, lb, f"sae_{name}_b", fm)
            code_floors[name] = baselines.CodePair(fkeep["ca"], fkeep["cb"], fmatch.get("hungarian"))

    for key, layer, x_tr, x_ho in (("a", la, tr.xa, ho.xa), ("b", lb, tr.xb, ho.xb)):
        if (key, layer) not in rep.ceilings_done:  # a layer can appear in several pairs
            rep.ceilings_done.add((key, layer))
            _seed_ceiling(cfg, cache, key, layer, x_tr, tr.pid, x_ho, ho.pid, rng, rep)

    # universality = (cross − floor) / (ceiling − floor), jointly passage-resampled (baselines)
    rep.metrics += baselines.resid_rows(la, lb, (tr.xa, tr.xb, ho.xa, ho.xb, maps["procrustes"]), resid_floors, acfg, rng, ho.pid)
    if sae_a is not None and sae_b is not None:
        ceils = [rep.ceilings[k] for k in (("a", la), ("b", lb)) if k in rep.ceilings]
        tok_codes = rep.floors.codes("token")[0].encode_csr(rep.floors.tok_ho[:, None])
        rep.metrics += baselines.code_rows(la, lb, real, code_floors, ceils, tok_codes, acfg, rng, ho.pid)


def _seed_ceiling(cfg: RunConfig, cache: ActivationCache, key: str, layer: int, x_tr: np.ndarray, pid_tr: np.ndarray,
                  x_ho: np.ndarray, pid_ho: np.ndarray, rng: np.random.Generator, rep: Report) -> None:  # fmt: skip
    """Ceiling: the same model's SAEs from two seeds, matched exactly like the cross-model pair."""
    if len(cfg.sae.seeds) < 2 or not cfg.sae_dir(key, layer).exists():
        return
    other = _find_sae(cfg, key, layer, cache.d_model(key), seed=cfg.sae.seeds[1])
    if other is None:
        return
    base = _find_sae(cfg, key, layer, cache.d_model(key))
    keep: dict = {}
    metrics, matches = sae_block(base, other, x_tr, x_tr, pid_tr, x_ho, x_ho, pid_ho, None, cfg.align, rng,
                                 rep.floors.tok_ho, keep)  # fmt: skip
    rep.ceilings[(key, layer)] = baselines.CodePair(keep["ca"], keep["cb"], matches.get("hungarian"))
    rep.metrics += _rows(layer, layer, f"sae_seed_{key}", metrics)
    for m in matches.values():
        for row in m.rows(layer, layer):
            row["method"] = f"seed_{key}:{row['method']}"
            rep.seed_matches.append(row)


def _centered_with_norms(X: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Centered X and its ‖XᵀX‖_F, and the same with every dimension z-scored (rogue dimensions tamed)."""
    X = X - X.mean(0, dtype=np.float64).astype(np.float32)
    Z = X / np.maximum(X.std(0), 1e-6)
    norm = lambda M: float(np.linalg.norm((M.T @ M).astype(np.float64)))  # noqa: E731
    return X, norm(X), Z, norm(Z)


def _cka_grid(side_a: dict[int, np.ndarray], side_b: dict[int, np.ndarray], source: str) -> list[dict]:
    """Linear CKA (feature-space formula) for every (layer of A, layer of B); each layer prepared once."""
    prep_b = {lb: _centered_with_norms(X) for lb, X in side_b.items()}
    rows = []
    for la, Xa in side_a.items():
        A, na, Az, naz = _centered_with_norms(Xa)
        for lb, (B, nb, Bz, nbz) in prep_b.items():
            cka = float(np.sum((A.T @ B).astype(np.float64) ** 2) / (na * nb)) if na * nb > 0 else math.nan
            cka_z = float(np.sum((Az.T @ Bz).astype(np.float64) ** 2) / (naz * nbz)) if naz * nbz > 0 else math.nan
            rows.append({"layer_a": la, "layer_b": lb, "cka": cka, "cka_z": cka_z, "n_pairs": len(A), "source": source})
    return rows


def layer_cka(cache: ActivationCache, max_tokens: int, rng: np.random.Generator) -> list[dict]:
    """Linear CKA for every (layer of A, layer of B) on held-out anchors, raw and z-scored.

    Uses the all-layers sweep (`cache/layer_sweep`, every block of both models) when extraction
    wrote one; otherwise the cached layers only.
    """
    sweep = cache.dir / "layer_sweep"
    if (sweep / "sweep.json").is_file():
        xa, xb = load_npy(sweep / "a.npy", mmap=False), load_npy(sweep / "b.npy", mmap=False)
        if xa.shape[1] < 2:
            raise InsufficientDataError(f"{sweep} holds {xa.shape[1]} anchor pairs; layer CKA needs at least 2")
        return _cka_grid(dict(enumerate(xa)), dict(enumerate(xb)), "layer_sweep")
    pairs = cache.anchor_pairs("heldout")
    if len(pairs) < 2:
        raise InsufficientDataError(f"layer CKA needs at least 2 held-out anchor pairs, got {len(pairs)}")
    pid = cache.tokens("a")[pairs[:, 0], 0]
    pairs = pairs[passage_subsample(pid, max_tokens, rng)]
    side_a = {la: cache.acts("a", la).take(pairs[:, 0]) for la in cache.layers("a")}
    side_b = {lb: cache.acts("b", lb).take(pairs[:, 1]) for lb in cache.layers("b")}
    return _cka_grid(side_a, side_b, "cached_layers")


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r[c] for c in columns})
    atomic_write_text(path, buf.getvalue())


def run_align(cfg: RunConfig, layers_a: list[int] | None = None, layers_b: list[int] | None = None) -> None:
    """Stage entry: align each configured (or requested) layer pair and write the report CSVs."""
    cache = ActivationCache(cfg.cache_dir)
    pairs = _layer_pairs(cfg, cache, layers_a, layers_b)
    rcache = _random_cache(cfg, cache)
    rng = np.random.default_rng(cfg.seed)
    rep = Report([], [], [], [], floors=baselines.Floors.from_cache(cache, cfg.seed))
    for la, lb in pairs:
        _align_pair(cfg, cache, rcache, la, lb, rng, rep)
    report = cfg.report_dir
    write_csv(report / "metrics.csv", METRIC_COLUMNS + baselines.BASELINE_COLUMNS, baselines.annotate(rep.metrics))
    write_csv(report / "alignment.csv", ALIGN_COLUMNS, rep.alignment)
    write_csv(report / "feature_matches.csv", MATCH_COLUMNS, rep.matches)
    if rep.seed_matches:
        write_csv(report / "feature_matches_seed.csv", MATCH_COLUMNS, rep.seed_matches)
    write_csv(report / "layer_cka.csv", LAYER_CKA_COLUMNS, layer_cka(cache, cfg.align.layer_cka_max_tokens, rng))
    log.info("align: wrote %s", report)
