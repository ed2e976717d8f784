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
train statistics, see `zscore`; alignment.csv methods with suffix `:z`), `sae` (SAE codes), `resid_random_b` (A vs a
randomly initialised B: the floor of the raw and the z-scored numbers, from `runs/<name>/cache_random` when present), `sae_seed_a` /
`sae_seed_b` (an SAE vs the same model's SAE trained with another seed: the ceiling).
All metrics are computed on held-out anchors; maps and matches are chosen on train anchors.

Work is split into tasks: per layer pair a residual part (maps, residual metrics, floors) and an
SAE part (matches, code metrics, code floors, seed ceilings), plus the layer-CKA sweep in parts of
LAYER_CKA_CHUNK A layers. Every task draws from its own random stream (`_stream`), so `align.workers`
processes (`workers.run_tasks`) give the same CSVs as one.

Cost (embedded demo config, SmolLM2-135M vs Gemma-3-270M, ~45k train / ~9k held-out anchors per
pair, d ≈ 600, 1 x d L1 SAEs with two seeds, `standardized_space: false`; CPU seconds at 1 thread):
~35-45 s residual part and ~30-45 s SAE part per layer pair, ~7 s per 10 A layers of the 30 x 18
layer-CKA sweep, ~225-275 s in all; 120 s wall with 2 workers on an idle 2-core machine, 192 s with
one (benchmarks/RESULTS.md). `n_bootstrap`, `n_null`, `n_match_null` and
`n_match_bootstrap` trade time for resolution.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tqdm.auto import tqdm

from . import baselines, workers
from .align import fit_maps, map_dir, unstandardize, procrustes_rotation, r2_with_ci, retrieval_with_ci
from .cache import ActivationCache
from .config import AlignConfig, RunConfig
from .matching import MATCH_COLUMNS, Matches, encode_sparse, match_features
from .metrics import (
    correlation_rdm,
    cross_moments,
    cosine_sim,
    cka_pairwise,
    HeldoutCCA,
    cka_family,
    gram_cka_family,
    linear_gram,
    match_invariance,
    mutual_knn_pairwise,
    rbf_gram,
    rdm_ranks,
    rsa_pairwise,
    jaccard_sets,
    topk_sets,
)
from .stats import (
    InsufficientDataError,
    MetricResult,
    bh_qvalues,
    passage_index,
    resample_rows,
    require_passages,
    shuffled_pairing,
    summarise,
    with_ci,
    within_passage_subsample,
)
from .utils import atomic_write_text, load_npy

log = logging.getLogger(__name__)

METRIC_COLUMNS = (
    "layer_a", "layer_b", "space", "metric", "value", "ci_low", "ci_high", "null_mean", "p_value", "q_value", "split",
    "n_tokens", "n_passages", "masked_a", "masked_b",
)  # fmt: skip
"""q_value: BH across every metric row of the run with a p-value (one family); masked_a / masked_b:
held-out anchor pairs this layer pair left out because A's / B's row is masked (`cache.row_mask`)."""
ALIGN_COLUMNS = (
    "layer_a", "layer_b", "method", "n_train", "n_heldout", "r2", "r2_ci_low", "r2_ci_high", "r2_null_mean",
    "r2_p_value", "top1", "top1_ci_low", "top1_ci_high", "top1_null_mean", "top1_p_value", "top10", "chance_top1",
    "chance_top10", "candidates", "n_masked",
)  # fmt: skip
LAYER_CKA_COLUMNS = ("layer_a", "layer_b", "cka", "cka_z", "n_pairs", "n_masked", "source", "ci_low", "ci_high",
                     "null_mean", "p_value")  # fmt: skip


@dataclass
class Paired:
    """Anchor-paired activations of one split: xa `[n, d_a]`, xb `[n, d_b]`, pid `[n]`."""

    xa: np.ndarray
    xb: np.ndarray
    pid: np.ndarray
    masked: tuple[int, int] = (0, 0)
    """Pairs of this split left out by the row mask because A's row / B's row is masked."""
    dropped: int = 0
    """Pairs of this split left out by the row mask (either row masked)."""

    @property
    def n(self) -> int:
        return len(self.pid)

    @property
    def n_passages(self) -> int:
        return len(np.unique(self.pid))

    def rows(self, r: np.ndarray) -> "Paired":
        return Paired(self.xa[r], self.xb[r], self.pid[r], self.masked, self.dropped)


# ---------------------------------------------------------------------------------------------
# inputs and checks


def _load_paired(cache: ActivationCache, la: int, lb: int, split: str, ratio: float | None = None) -> Paired:
    """Masked anchor pairs of one split (`ActivationCache.row_mask`: massive rows, the attention sink)."""
    xa, xb, pid = cache.paired_acts(la, lb, split, masked=True, ratio=ratio)
    for key, layer, x in (("a", la, xa), ("b", lb, xb)):
        if x.shape[1] != cache.d_model(key):
            raise ValueError(
                f"cache {cache.dir}: model {key} layer {layer} has width {x.shape[1]} but the manifest says "
                f"d_model={cache.d_model(key)}; the cache mixes shards from different runs, re-extract it"
            )
    pairs = cache.anchor_pairs(split)
    masked = (int((~cache.row_mask("a", la, ratio)[pairs[:, 0]]).sum()), int((~cache.row_mask("b", lb, ratio)[pairs[:, 1]]).sum()))
    return Paired(xa, xb, pid, masked, len(pairs) - len(pid))


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


def _open_random(cfg: RunConfig) -> ActivationCache | None:
    """The random-init cache (`runs/<name>/cache_random`) when extraction wrote one (checked by `_random_cache`)."""
    path = cfg.run_dir / "cache_random"
    return ActivationCache(path) if (path / "manifest.json").is_file() else None


def _random_cache(cfg: RunConfig, cache: ActivationCache) -> ActivationCache | None:
    """`_open_random`, checked against the main cache: same anchors, same tokens."""
    rc = _open_random(cfg)
    if rc is None:
        log.info("no random-init cache at %s; skipping the random-model floor", cfg.run_dir / "cache_random")
        return None
    path = rc.dir
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
    z = lambda p: Paired((p.xa - ma) / sa, (p.xb - mb) / sb, p.pid, p.masked, p.dropped)  # noqa: E731
    return z(tr), z(ho)


def zscore_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and sd `[d]` (sd 1 where constant), float32."""
    mu, sd = X.mean(0, dtype=np.float64), X.std(0, dtype=np.float64)
    return mu.astype(np.float32), np.where(sd > 0, sd, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# metric blocks


def _rows(la: int, lb: int, space: str, results: dict[str, MetricResult], split: str = "heldout",
          masked: tuple[int, int] = (0, 0)) -> list[dict]:  # fmt: skip
    return [
        {"layer_a": la, "layer_b": lb, "space": space, "metric": k, "value": r.value, "ci_low": r.ci_low,
         "ci_high": r.ci_high, "null_mean": r.null_mean, "p_value": r.p_value, "q_value": math.nan, "split": split,
         "n_tokens": r.n_tokens, "n_passages": r.n_passages, "masked_a": masked[0], "masked_b": masked[1]}
        for k, r in results.items()
    ]  # fmt: skip


def add_qvalues(rows: list[dict]) -> None:
    """BH q-values across every metric row with a p-value (the run's metric rows are one family)."""
    q = bh_qvalues(np.array([float(r["p_value"]) for r in rows], np.float64)) if rows else []
    for r, v in zip(rows, q):
        r["q_value"] = float(v)


def _plain(value: float) -> MetricResult:
    return MetricResult(value, math.nan, math.nan, math.nan, math.nan)


_status: Callable[[str], None] = lambda what: None
"""Progress hook: `_run_task` points it at its task's bar, so every resampling loop (each metric's CI
and null, each map's R²/retrieval, matching nulls, code metrics) shows its name while it runs."""


def _ci(fn: Callable, A: Any, B: Any, pid: np.ndarray, acfg: AlignConfig, rng: np.random.Generator,
        what: str = "a metric") -> Any:  # fmt: skip
    """`stats.with_ci` with the run's resampling settings; fewer than align.min_passages passages is an error naming `what`."""
    _status(what)
    return with_ci(fn, A, B, pid, acfg.n_bootstrap, acfg.n_null, rng, min_passages=acfg.min_passages,
                   ci=acfg.ci_method, what=f"{what} (passage-resampling CI and shuffled-pairing null; align.min_passages)")


def _pairwise_metrics(
    A: Any, B: Any, pid: np.ndarray, acfg: AlignConfig, rng: np.random.Generator, rbf: bool
) -> dict[str, MetricResult]:
    """O(n²) metrics on ≤ pairwise_max_tokens rows: token×token matrices built once, resampled by index.

    Tokens are thinned *within* passages (`stats.within_passage_subsample`), so every held-out
    passage stays a resampling unit."""
    sub = within_passage_subsample(pid, acfg.pairwise_max_tokens, rng)
    A, B, pid = A[sub], B[sub], pid[sub]
    out = {}
    if rbf:
        out["rbf_cka"] = _ci(cka_pairwise, rbf_gram(A), rbf_gram(B), pid, acfg, rng, "rbf_cka")
    rsub = within_passage_subsample(pid, acfg.rsa_max_tokens, rng)  # Spearman ranks n²/2 distances per resample
    out["rsa"] = _ci(rsa_pairwise, rdm_ranks(correlation_rdm(A[rsub])), rdm_ranks(correlation_rdm(B[rsub])), pid[rsub],
                     acfg, rng, "rsa")
    k = acfg.mknn_k
    out["mutual_knn"] = _ci(lambda P, Q: mutual_knn_pairwise(P, Q, k), cosine_sim(A), cosine_sim(B), pid, acfg, rng,
                            "mutual_knn")
    return out


def resid_metrics(tr: Paired, ho: Paired, acfg: AlignConfig, rng: np.random.Generator,
                  hcca: HeldoutCCA | None = None) -> dict[str, MetricResult]:  # fmt: skip
    """All similarity metrics on masked held-out anchors of the given space (raw in the headline).

    Streaming metrics (CKA, SVCCA/PWCCA) use every held-out passage, thinned to ≤ metric_max_tokens
    tokens *within* passages; SVCCA/PWCCA directions are fitted on the train anchors (see
    `metrics.HeldoutCCA`; `hcca`: that fit, when the caller already made it).
    """
    q = ho.rows(within_passage_subsample(ho.pid, acfg.metric_max_tokens, rng))
    out = _ci(cka_family, q.xa, q.xb, q.pid, acfg, rng, "linear_cka / debiased_cka")
    hcca = HeldoutCCA.fit(tr.xa, tr.xb, acfg.svcca_variance) if hcca is None else hcca
    U, V = hcca.variates(q.xa, q.xb)
    out.update(_ci(hcca.score, U, V, q.pid, acfg, rng, "svcca / pwcca"))
    out.update(_pairwise_metrics(q.xa, q.xb, q.pid, acfg, rng, rbf=True))
    return out


def code_metrics(
    ca: Any, cb: Any, pid: np.ndarray, hung: Matches | None, acfg: AlignConfig, rng: np.random.Generator
) -> dict[str, MetricResult]:
    """Metrics on SAE codes (CSR `[n, m]`) of held-out anchors.

    SVCCA/PWCCA are not computed here: with m ≈ 16k features and a few thousand tokens, every
    CCA direction overfits (k >= n) and the numbers say nothing.
    """
    sub = within_passage_subsample(pid, acfg.metric_max_tokens, rng)
    ca, cb, pid = ca[sub], cb[sub], pid[sub]
    Ka, Kb = linear_gram(ca), linear_gram(cb)
    out = _ci(gram_cka_family, Ka, Kb, pid, acfg, rng, "SAE-code linear_cka / debiased_cka")  # resamples shared
    out.update(_pairwise_metrics(ca, cb, pid, acfg, rng, rbf=False))
    if hung is not None and len(hung):
        ta, tb = topk_sets(ca, cb, hung.feat_a, hung.feat_b, acfg.top_k_overlap)  # once; resamples index rows
        out["topk_overlap"] = _ci(jaccard_sets, ta, tb, pid, acfg, rng, "topk_overlap")
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
    codes_a: tuple[Any, Any] | None = None,
) -> tuple[dict[str, MetricResult], dict[str, Matches]]:  # fmt: skip
    """Encode, match features (train), test matches and compute code metrics (held-out).

    strata `[n_ho]`: B's token id per held-out anchor (token-stratified match null); `keep`, when
    given, receives the held-out codes ("ca", "cb") for the floors/ceilings in `baselines` and the
    train codes ("ctr_a", "ctr_b") of every train row. `codes_a`: (train, held-out) codes of sae_a on
    these rows from an earlier call (a floor or ceiling shares A's side with the real pair); used
    only when every train row is matched on (n_train <= align.match_max_tokens), as then no
    subsample is drawn and the codes are exactly those this call would compute.
    """
    full = len(pid_tr) <= acfg.match_max_tokens
    sub = within_passage_subsample(pid_tr, acfg.match_max_tokens, rng)
    if codes_a is not None and full:
        ctr_a, cho_a = codes_a
    else:
        ctr_a, cho_a = _codes(sae_a, tr_a[sub]), _codes(sae_a, ho_a)
    ctr_b, cho_b = _codes(sae_b, tr_b[sub]), _codes(sae_b, ho_b)
    dec_a, dec_b = _decoder(sae_a), _decoder(sae_b)
    if rotation is not None:
        dec_a = dec_a @ rotation  # A's decoder directions expressed in B's residual basis
    _status("feature matching (train) and match nulls (held-out)")
    matches = match_features(
        ctr_a, ctr_b, pid_tr[sub], cho_a, cho_b, pid_ho, dec_a, dec_b,
        n_null=acfg.n_match_null, n_boot=acfg.n_match_bootstrap, pvalue=acfg.match_pvalue, rng=rng,
        strata=strata if acfg.match_token_null else None,
        min_passages=acfg.min_feature_passages, min_tokens=acfg.min_feature_tokens, min_corr=acfg.match_min_corr,
    )  # fmt: skip
    if keep is not None:
        keep.update(ca=cho_a, cb=cho_b, **({"ctr_a": ctr_a, "ctr_b": ctr_b} if full else {}))
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
        _status(f"{name}{suffix} R² and retrieval")
        y_hat = mp.transform(ho.xa)
        if acfg.n_bootstrap or acfg.n_null:
            require_passages(ho.n_passages, acfg.min_passages, f"{name}{suffix} R² and retrieval (align.min_passages)")
        r2 = r2_with_ci(y_hat, ho.xb, ho.pid, acfg.n_bootstrap, acfg.n_null, rng, ci=acfg.ci_method)
        ret, top1 = retrieval_with_ci(y_hat, ho.xb, ho.pid, acfg.retrieval_candidates, acfg.retrieval_queries,
                                      acfg.n_bootstrap, acfg.n_null, rng, ci=acfg.ci_method)
        if ret["candidates"] < acfg.retrieval_candidates:
            log.info("layers (%d, %d): only %d held-out anchors, retrieval uses M=%d candidates", la, lb, ho.n, ret["candidates"])
        rows.append({
            "layer_a": la, "layer_b": lb, "method": name + suffix, "n_train": tr_n, "n_heldout": ho.n,
            "r2": r2.value, "r2_ci_low": r2.ci_low, "r2_ci_high": r2.ci_high, "r2_null_mean": r2.null_mean,
            "r2_p_value": r2.p_value, "top1_ci_low": top1.ci_low, "top1_ci_high": top1.ci_high,
            "top1_null_mean": top1.null_mean, "top1_p_value": top1.p_value, "n_masked": ho.dropped,
            **{k: ret[k] for k in ("top1", "top10", "chance_top1", "chance_top10", "candidates")},
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# stage


LAYER_CKA_CHUNK = 10
"""A layers per layer-CKA task: the sweep (30 x 18 cells for the demo) is split so it balances the pool."""
PARTS = ("resid", "sae")
"""The two tasks of a layer pair: residual maps, metrics and floors; SAE codes, matches, code floors and
seed ceilings. Each has its own RNG stream (`_stream`), so what it draws does not depend on which
process runs it or on what ran before: `align.workers` changes the schedule, not the numbers."""


def _stream(seed: int, *key: int) -> np.random.Generator:
    """A random stream of its own: child `key` of `SeedSequence(seed)`. Pair parts: (0, la, lb,
    PARTS index); layer-CKA sweep: (1,) for its token subsample, (1, la, lb) for each cell's CI."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass
class PartRows:
    """What one task (a part of a layer pair) adds to the report CSVs."""

    metrics: list[dict] = field(default_factory=list)
    alignment: list[dict] = field(default_factory=list)
    matches: list[dict] = field(default_factory=list)
    seed: dict[tuple[str, int], tuple[list[dict], list[dict]]] = field(default_factory=dict)
    """Seed-ceiling (metrics rows, feature_matches_seed rows) per (model key, layer)."""


@dataclass
class Report:
    """The report CSVs' rows, layer pair by layer pair."""

    metrics: list[dict] = field(default_factory=list)
    alignment: list[dict] = field(default_factory=list)
    matches: list[dict] = field(default_factory=list)
    seed_matches: list[dict] = field(default_factory=list)
    ceilings_done: set = field(default_factory=set)
    """(key, layer) whose seed-ceiling rows are written: a layer in several pairs gets them from its first pair."""

    def add_pair(self, parts: list[PartRows]) -> None:
        """Append one layer pair's parts in the order of the sequential stage: every part's metrics,
        then the seed ceilings not written yet, then the universality rows."""
        last = lambda r: r["space"] == "universality"  # noqa: E731
        self.metrics += [r for p in parts for r in p.metrics if not last(r)]
        for p in parts:
            self.alignment += p.alignment
            self.matches += p.matches
            for key, (rows, matches) in p.seed.items():
                if key not in self.ceilings_done:
                    self.ceilings_done.add(key)
                    self.metrics += rows
                    self.seed_matches += matches
        self.metrics += [r for p in parts for r in p.metrics if last(r)]


class _Bar:
    """One task's progress bar: a step per section; the postfix names the section and the
    resampling loop running (`_status`)."""

    def __init__(self, total: int, desc: str, progress: bool):
        self.bar = tqdm(total=total, desc=desc, leave=False, disable=not progress, position=workers.slot())
        self.phase = ""

    def section(self, name: str) -> None:
        self.phase = name

    def status(self, what: str) -> None:
        self.bar.set_postfix_str(f"{self.phase}: {what}", refresh=True)

    def step(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _pair_data(cfg: RunConfig, cache: ActivationCache, la: int, lb: int) -> tuple[Paired, Paired, baselines.Floors]:
    """Masked train and held-out anchor pairs of (la, lb) and B's token ids at them (the floors' input)."""
    acfg, ratio = cfg.align, cfg.sae.max_norm_ratio
    tr, ho = _load_paired(cache, la, lb, "train", ratio), _load_paired(cache, la, lb, "heldout", ratio)
    _require(tr, ho, acfg, la, lb)
    floors = baselines.Floors.from_cache(cache, cfg.seed)
    return tr, ho, floors.masked(cache.pair_mask(la, lb, "train", ratio), cache.pair_mask(la, lb, "heldout", ratio))


def _resid_space(tr: Paired, ho: Paired, acfg: AlignConfig, rng: np.random.Generator, la: int, lb: int, space: str,
                 suffix: str, out: PartRows, masked: tuple[int, int]) -> tuple[dict, tuple]:  # fmt: skip
    """Maps fitted on train, their held-out R² and retrieval (alignment.csv, method + suffix) and the
    similarity metrics (metrics.csv `space`) of one residual space. Returns the maps and the view
    (held-out CCA, held-out A, held-out B, Procrustes map) of `baselines.resid_rows`."""
    m = cross_moments(tr.xa, tr.xb)  # one pass over the train anchors for the maps and the held-out CCA
    maps = fit_maps(tr.xa, tr.xb, acfg.methods, acfg.ridge_alpha, acfg.svcca_variance, acfg.procrustes_scale, m)
    out.alignment += _score_maps(maps, tr.n, ho, acfg, rng, la, lb, suffix)
    hcca = HeldoutCCA.from_moments(m, acfg.svcca_variance)
    out.metrics += _rows(la, lb, space, resid_metrics(tr, ho, acfg, rng, hcca), masked=masked)
    return maps, (hcca, ho.xa, ho.xb, maps["procrustes"])


def _save_maps(cfg: RunConfig, maps: dict, la: int, lb: int, **meta: Any) -> None:
    for mp in maps.values():
        mp.meta.update(layer_a=la, layer_b=lb, model_a=cfg.model_a.name, model_b=cfg.model_b.name, **meta)
        mp.save(map_dir(cfg.run_dir, la, lb))


def _resid_part(cfg: RunConfig, cache: ActivationCache, la: int, lb: int, rng: np.random.Generator, bar: _Bar) -> PartRows:
    """Residual maps and metrics of (la, lb): masked raw, z-scored (optional), each floor; universality rows."""
    acfg, out = cfg.align, PartRows()
    tr, ho, floors = _pair_data(cfg, cache, la, lb)
    log.info("layers (a=%d, b=%d): %d train / %d held-out anchors after the row mask dropped %d / %d "
             "(held-out: %d with A's row masked, %d with B's)", la, lb, tr.n, ho.n, tr.dropped, ho.dropped, *ho.masked)
    bar.section("masked raw")
    maps, real = _resid_space(tr, ho, acfg, rng, la, lb, "resid", "", out, ho.masked)
    _save_maps(cfg, maps, la, lb, fitted_on="masked raw train anchors", n_masked=tr.dropped)
    bar.step()
    if acfg.standardized_space:  # basis-dependent variant, labelled as such (see `zscore`)
        bar.section("z-scored (basis-dependent)")
        ztr, zho = zscore(tr, ho)
        zmaps, _ = _resid_space(ztr, zho, acfg, rng, la, lb, "resid_z", ":z", out, ho.masked)
        za, zb = zscore_stats(tr.xa), zscore_stats(tr.xb)
        # saved as raw-space affine maps, so transfer can apply them like the others
        raw = {k: unstandardize(mp, *za, *zb) for k, mp in zmaps.items()}
        _save_maps(cfg, raw, la, lb, basis_dependent=True, n_masked=tr.dropped)
        bar.step()

    # floors that share the input, through the same path as the real numbers (baselines), on the same masked anchors
    facfg = acfg if acfg.floor_nulls else replace(acfg, n_null=0)  # floors: passage resamples, optional own null
    views = {}
    for name in acfg.input_floors:
        bar.section(f"{name} floor")
        fb_tr, fb_ho = floors.resid(name)
        ftr, fho = Paired(tr.xa, fb_tr, tr.pid, tr.masked, tr.dropped), Paired(ho.xa, fb_ho, ho.pid, ho.masked, ho.dropped)
        _, views[name] = _resid_space(ftr, fho, facfg, rng, la, lb, f"resid_{name}_b", f":{name}_b", out, ho.masked)
        bar.step()
    rcache = _open_random(cfg)
    if rcache is not None:  # floor: trained A against randomly initialised B on the same (masked) anchors
        bar.section("random-weights floor")
        if lb in rcache.layers("b"):
            ratio = cfg.sae.max_norm_ratio
            keep_tr, keep_ho = cache.pair_mask(la, lb, "train", ratio), cache.pair_mask(la, lb, "heldout", ratio)
            rb_tr = Paired(tr.xa, rcache.acts("b", lb).take(rcache.anchor_pairs("train")[keep_tr, 1]), tr.pid, tr.masked, tr.dropped)
            rb_ho = Paired(ho.xa, rcache.acts("b", lb).take(rcache.anchor_pairs("heldout")[keep_ho, 1]), ho.pid, ho.masked, ho.dropped)
            _, views["random"] = _resid_space(rb_tr, rb_ho, facfg, rng, la, lb, "resid_random_b", ":random_b", out, ho.masked)
            # no z-scored random floor: the z-scored space is a basis-dependent variant (issue 18), its
            # floors are the masked raw ones; it cost as much as a whole residual space per layer pair
        else:
            log.info("random-init cache has no layer %d of model b; skipping the floor for this pair", lb)
        bar.step()

    # universality = (cross − floor) / (ceiling − floor), jointly passage-resampled (baselines)
    bar.section("universality rows")
    _status("residual metrics, joint passage resamples")
    out.metrics += baselines.resid_rows(la, lb, real, views, acfg, rng, ho.pid)
    bar.step()
    return out


def _sae_part(cfg: RunConfig, cache: ActivationCache, la: int, lb: int, rng: np.random.Generator, bar: _Bar) -> PartRows:
    """SAE codes of (la, lb): matches and code metrics, the code floors, both seed ceilings; universality rows."""
    acfg, out = cfg.align, PartRows()
    tr, ho, floors = _pair_data(cfg, cache, la, lb)
    sae_a = _find_sae(cfg, "a", la, cache.d_model("a"))
    sae_b = _find_sae(cfg, "b", lb, cache.d_model("b"))
    keep: dict = {}
    real = None
    code_floors = {}
    if sae_a is not None and sae_b is not None:
        bar.section("SAE codes and matches")
        # A's decoder directions in B's basis: the rotation of the Procrustes map (`align.fit_procrustes`)
        R = procrustes_rotation(tr.xa, tr.xb).astype(np.float32)
        strata = floors.tok_ho
        metrics, matches = sae_block(sae_a, sae_b, tr.xa, tr.xb, tr.pid, ho.xa, ho.xb, ho.pid, R, acfg, rng, strata, keep)
        out.metrics += _rows(la, lb, "sae", metrics, masked=ho.masked)
        for m in matches.values():
            out.matches += m.rows(la, lb)
        real = baselines.CodePair(keep["ca"], keep["cb"], matches.get("hungarian"))
        bar.step()
        for name in acfg.input_floors:  # B's SAE replaced by a token-identity encoder, same sae_block
            bar.section(f"SAE codes vs {name} floor")
            tok_sae, ids_tr, ids_ho = floors.codes(name)
            fkeep: dict = {}
            fm, fmatch = sae_block(sae_a, tok_sae, tr.xa, ids_tr, tr.pid, ho.xa, ids_ho, ho.pid, R, acfg, rng, strata, fkeep,
                                   codes_a=(keep["ctr_a"], keep["ca"]) if "ctr_a" in keep else None)
            out.metrics += _rows(la, lb, f"sae_{name}_b", fm, masked=ho.masked)
            code_floors[name] = baselines.CodePair(fkeep["ca"], fkeep["cb"], fmatch.get("hungarian"))
            bar.step()

    ceilings = []
    for key, layer, x_tr, x_ho in (("a", la, tr.xa, ho.xa), ("b", lb, tr.xb, ho.xb)):
        # per layer pair: the ceiling must see the same masked held-out rows as the cross-model number
        bar.section(f"seed ceiling of {key.upper()}{layer}")
        base = None  # the seed-0 SAE's codes on these rows, from the real pair
        if real is not None and "ctr_a" in keep:
            base = (keep["ctr_a"], keep["ca"]) if key == "a" else (keep["ctr_b"], keep["cb"])
        ceiling = _seed_ceiling(cfg, cache, key, layer, x_tr, tr.pid, x_ho, ho.pid, rng, floors.tok_ho, out, base)
        if ceiling is not None:
            ceilings.append(ceiling)
        bar.step()

    if real is not None:  # universality = (cross − floor) / (ceiling − floor), jointly passage-resampled (baselines)
        bar.section("universality rows")
        _status("SAE metrics, joint passage resamples")
        tok_codes = floors.codes("token")[0].encode_csr(floors.tok_ho[:, None])
        out.metrics += baselines.code_rows(la, lb, real, code_floors, ceilings, tok_codes, acfg, rng, ho.pid)
    bar.step()
    return out


def _seed_ceiling(cfg: RunConfig, cache: ActivationCache, key: str, layer: int, x_tr: np.ndarray, pid_tr: np.ndarray,
                  x_ho: np.ndarray, pid_ho: np.ndarray, rng: np.random.Generator, strata: np.ndarray, out: PartRows,
                  base_codes: tuple[Any, Any] | None = None) -> baselines.CodePair | None:  # fmt: skip
    """Ceiling: the same model's SAEs from two seeds, matched exactly like the cross-model pair.

    Its rows go to `out.seed[(key, layer)]` (`Report.add_pair` writes a layer's rows once); returns
    the held-out codes and matches for this pair's universality rows."""
    if len(cfg.sae.seeds) < 2 or not cfg.sae_dir(key, layer).exists():
        return None
    other = _find_sae(cfg, key, layer, cache.d_model(key), seed=cfg.sae.seeds[1])
    if other is None:
        return None
    base = _find_sae(cfg, key, layer, cache.d_model(key))
    keep: dict = {}
    metrics, matches = sae_block(base, other, x_tr, x_tr, pid_tr, x_ho, x_ho, pid_ho, None, cfg.align, rng,
                                 strata, keep, codes_a=base_codes)  # fmt: skip
    seed_rows = []
    for m in matches.values():
        for row in m.rows(layer, layer):
            row["method"] = f"seed_{key}:{row['method']}"
            seed_rows.append(row)
    out.seed[(key, layer)] = (_rows(layer, layer, f"sae_seed_{key}", metrics), seed_rows)
    return baselines.CodePair(keep["ca"], keep["cb"], matches.get("hungarian"))


def _pair_sections(cfg: RunConfig, part: str) -> int:
    """Sections of a part's bar, one step each: raw, z-scored, floors, universality (resid); real
    pair, code floors, two seed ceilings, universality (sae)."""
    floors = len(cfg.align.input_floors)
    if part == "resid":
        return 2 + cfg.align.standardized_space + floors + (_open_random(cfg) is not None)
    return 4 + floors


def _run_task(cfg: RunConfig, kind: str, arg: Any, progress: bool) -> Any:
    """One task of the stage, in this process or a worker: a part of layer pair `arg` (kind in PARTS),
    or part of the layer-CKA sweep (kind "layer_cka", arg: the layer pairs, the A layers of the part)."""
    global _status
    cache = ActivationCache(cfg.cache_dir)
    if kind == "layer_cka":  # arg: (layer pairs, the A layers of this part of the grid)
        return layer_cka(cache, cfg.align.layer_cka_max_tokens, _stream(cfg.seed, 1), cfg.align, cfg.sae.max_norm_ratio,
                         arg[0], progress, arg[1], lambda la, lb: _stream(cfg.seed, 1, la, lb))  # fmt: skip
    la, lb = arg
    bar = _Bar(_pair_sections(cfg, kind), f"align A{la}-B{lb} {'residual' if kind == 'resid' else 'SAE'}", progress)
    _status = bar.status
    try:
        fn = _resid_part if kind == "resid" else _sae_part
        return fn(cfg, cache, la, lb, _stream(cfg.seed, 0, la, lb, PARTS.index(kind)), bar)
    finally:
        bar.close()
        _status = lambda what: None  # noqa: E731


def _centered_with_norms(X: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Centered X and its ‖XᵀX‖_F, and the same with every dimension z-scored (rogue dimensions tamed)."""
    X = X - X.mean(0, dtype=np.float64).astype(np.float32)
    Z = X / np.maximum(X.std(0), 1e-6)
    norm = lambda M: float(np.linalg.norm((M.T @ M).astype(np.float64)))  # noqa: E731
    return X, norm(X), Z, norm(Z)


def _cka_grid(side_a: dict[int, np.ndarray], side_b: dict[int, np.ndarray], keep_a: dict[int, np.ndarray],
              keep_b: dict[int, np.ndarray], source: str) -> list[dict]:  # fmt: skip
    """Linear CKA (feature-space formula) for every (layer of A, layer of B) on the rows both
    layers' masks keep; z-scored CKA alongside as the basis-dependent variant.

    A layer's centred rows and norms depend only on the rows kept, which are the same for most
    cells (the masks differ in a few layers), so they are computed once per (layer, kept rows)."""
    rows = []
    cache_b: dict[tuple[int, bytes], tuple] = {}
    for la, Xa in side_a.items():
        cache_a: dict[bytes, tuple] = {}
        for lb, Xb in side_b.items():
            keep = keep_a[la] & keep_b[lb]
            key = keep.tobytes()
            if key not in cache_a:
                cache_a[key] = _centered_with_norms(Xa[keep])
            if (lb, key) not in cache_b:
                cache_b[(lb, key)] = _centered_with_norms(Xb[keep])
            (A, na, Az, naz), (B, nb, Bz, nbz) = cache_a[key], cache_b[(lb, key)]
            cka = float(np.sum((A.T @ B).astype(np.float64) ** 2) / (na * nb)) if na * nb > 0 else math.nan
            cka_z = float(np.sum((Az.T @ Bz).astype(np.float64) ** 2) / (naz * nbz)) if naz * nbz > 0 else math.nan
            rows.append({"layer_a": la, "layer_b": lb, "cka": cka, "cka_z": cka_z, "n_pairs": int(keep.sum()),
                         "n_masked": int((~keep).sum()), "source": source, "ci_low": math.nan, "ci_high": math.nan,
                         "null_mean": math.nan, "p_value": math.nan})  # fmt: skip
    return rows


def _norm_keep(X: np.ndarray, ratio: float) -> np.ndarray:
    """The row-mask norm rule on rows of a layer with no cached train rows: ratio x their median norm."""
    norms = np.linalg.norm(X.astype(np.float64), axis=1)
    return norms <= ratio * np.median(norms) if ratio > 0 and len(norms) else np.ones(len(X), bool)


def _sweep_rows(cache: ActivationCache, pid: np.ndarray) -> np.ndarray | None:
    """Cache rows `[n, 2]` of the sweep's anchor pairs (the same held-out passages, paired the same
    way, in stored order), or None when the cache's pairs do not line up with the sweep's."""
    pairs = cache.anchor_pairs("heldout")
    ppid = cache.tokens("a")[pairs[:, 0], 0]
    order = list(dict.fromkeys(pid.tolist()))
    rows = np.concatenate([pairs[ppid == p] for p in order]) if order else np.zeros((0, 2), np.int64)
    rows = rows[: len(pid)]
    return rows if len(rows) == len(pid) and np.array_equal(cache.tokens("a")[rows[:, 0], 0], pid) else None


def _layer_keep(cache: ActivationCache, key: str, X: np.ndarray, rows: np.ndarray | None, ratio: float) -> dict[int, np.ndarray]:
    """Per layer of the sweep, the rows the row mask keeps: the cache's own mask at cached layers,
    the same norm rule (ratio x median of the sweep's rows) elsewhere, the sink always."""
    sink = np.ones(X.shape[1], bool)
    if rows is not None:
        sink = ~cache.sink_rows(key)[rows[:, 0 if key == "a" else 1]]
    out = {}
    for layer in range(X.shape[0]):
        if rows is not None and layer in cache.layers(key):
            out[layer] = cache.row_mask(key, layer, ratio)[rows[:, 0 if key == "a" else 1]]
        else:
            out[layer] = _norm_keep(X[layer], ratio) & sink
    return out


def _cell_cis(rows: list[dict], side_a: dict, side_b: dict, keep_a: dict, keep_b: dict, pid: np.ndarray,
              cells: set, acfg: AlignConfig, rng: Callable[[int, int], np.random.Generator],
              progress: bool = True) -> None:  # fmt: skip
    """Passage CI and shuffled-pairing null of linear CKA for the chosen cells (Gram form, resampled by
    index); rng(la, lb): the random stream of cell (la, lb)."""
    todo = [r for r in rows if (r["layer_a"], r["layer_b"]) in cells]
    for r in tqdm(todo, desc="layer CKA CIs", leave=False, disable=None if progress else True, position=workers.slot()):
        la, lb = r["layer_a"], r["layer_b"]
        keep = keep_a[la] & keep_b[lb]
        res = _ci(cka_pairwise, linear_gram(side_a[la][keep]), linear_gram(side_b[lb][keep]), pid[keep], acfg,
                  rng(la, lb), f"layer CKA A{la}-B{lb}")
        r.update(ci_low=res.ci_low, ci_high=res.ci_high, null_mean=res.null_mean, p_value=res.p_value)


def layer_cka_layers(cache: ActivationCache) -> list[int]:
    """The layers of A that `layer_cka` has rows for: every block (sweep) or the cached layers."""
    sweep = cache.dir / "layer_sweep"
    if (sweep / "sweep.json").is_file():
        return list(range(load_npy(sweep / "a.npy", mmap=True).shape[0]))
    return list(cache.layers("a"))


def layer_cka(cache: ActivationCache, max_tokens: int, rng: np.random.Generator, acfg: AlignConfig | None = None,
              ratio: float | None = None, pairs_of_interest: list[tuple[int, int]] | None = None,
              progress: bool = True, layers_a: list[int] | None = None,
              cell_rng: Callable[[int, int], np.random.Generator] | None = None) -> list[dict]:  # fmt: skip
    """Linear CKA for every (layer of A, layer of B) on masked held-out anchors, raw and z-scored.

    Uses the all-layers sweep (`cache/layer_sweep`, every block of both models) when extraction
    wrote one; otherwise the cached layers only. With `acfg`, the configured layer pairs and each
    A layer's best B layer get a passage CI and a shuffled-pairing null (columns ci_low ... p_value);
    when the sweep holds fewer than align.min_passages passages those stay empty and a warning says so.
    `layers_a`: only these rows of the grid (a cell's CI needs only its own A layer's row);
    `cell_rng(la, lb)`: each cell's own random stream (default: all draw from `rng`), so the grid can
    be computed in parts with the same numbers.
    """
    ratio = cache.mask_ratio() if ratio is None else ratio
    sweep = cache.dir / "layer_sweep"
    if (sweep / "sweep.json").is_file():
        xa, xb = load_npy(sweep / "a.npy", mmap=False), load_npy(sweep / "b.npy", mmap=False)
        if xa.shape[1] < 2:
            raise InsufficientDataError(f"{sweep} holds {xa.shape[1]} anchor pairs; layer CKA needs at least 2")
        pid = load_npy(sweep / "passage_id.npy", mmap=False)
        crow = _sweep_rows(cache, pid)
        if crow is None:
            log.warning("%s: sweep rows do not line up with the cache's held-out anchors; masking by the norm rule only", sweep)
        side_a, side_b = dict(enumerate(xa)), dict(enumerate(xb))
        keep_a, keep_b = _layer_keep(cache, "a", xa, crow, ratio), _layer_keep(cache, "b", xb, crow, ratio)
        source = "layer_sweep"
    else:
        pairs = cache.anchor_pairs("heldout")
        if len(pairs) < 2:
            raise InsufficientDataError(f"layer CKA needs at least 2 held-out anchor pairs, got {len(pairs)}")
        pid = cache.tokens("a")[pairs[:, 0], 0]
        sub = within_passage_subsample(pid, max_tokens, rng)
        pairs, pid = pairs[sub], pid[sub]
        side_a = {la: cache.acts("a", la).take(pairs[:, 0]) for la in cache.layers("a")}
        side_b = {lb: cache.acts("b", lb).take(pairs[:, 1]) for lb in cache.layers("b")}
        keep_a = {la: cache.row_mask("a", la, ratio)[pairs[:, 0]] for la in side_a}
        keep_b = {lb: cache.row_mask("b", lb, ratio)[pairs[:, 1]] for lb in side_b}
        source = "cached_layers"
    if layers_a is not None:
        side_a = {la: X for la, X in side_a.items() if la in layers_a}
    rows = _cka_grid(side_a, side_b, keep_a, keep_b, source)
    if acfg is not None and (acfg.n_bootstrap or acfg.n_null):
        n_pass = len(np.unique(pid))
        if n_pass < acfg.min_passages:
            log.warning("layer CKA: the %s holds %d passages, fewer than align.min_passages=%d; no CI or null for it "
                        "(raise extract.layer_sweep_tokens)", source, n_pass, acfg.min_passages)
        else:
            best = {}
            for r in rows:
                if np.isfinite(r["cka"]) and r["cka"] > best.get(r["layer_a"], (None, -np.inf))[1]:
                    best[r["layer_a"]] = (r["layer_b"], r["cka"])
            cells = {(la, lb) for la, (lb, _) in best.items()} | set(pairs_of_interest or [])
            _cell_cis(rows, side_a, side_b, keep_a, keep_b, pid, cells, acfg, cell_rng or (lambda la, lb: rng), progress)
    return rows


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:  # a column a row does not carry (e.g. universality rows: no masked counts) stays empty
        w.writerow({c: r.get(c, "") for c in columns})
    atomic_write_text(path, buf.getvalue())


def run_align(cfg: RunConfig, layers_a: list[int] | None = None, layers_b: list[int] | None = None,
              progress: bool = True) -> None:  # fmt: skip
    """Stage entry: align each configured (or requested) layer pair and write the report CSVs.

    Tasks (PARTS of every layer pair, and the layer-CKA sweep) run in `align.workers` processes
    (`workers.run_tasks`), the longest first; their rows are merged in layer-pair order, so the
    CSVs do not depend on the number of workers."""
    cache = ActivationCache(cfg.cache_dir)
    pairs = _layer_pairs(cfg, cache, layers_a, layers_b)
    _random_cache(cfg, cache)  # a random-init cache that does not fit fails here, before any work
    tasks = [(cfg, part, pair, progress) for part in ("sae", "resid") for pair in pairs]  # SAE parts take longest
    layers = layer_cka_layers(cache)
    chunks = [tuple(layers[i : i + LAYER_CKA_CHUNK]) for i in range(0, len(layers), LAYER_CKA_CHUNK)]
    tasks += [(cfg, "layer_cka", (pairs, chunk), progress) for chunk in chunks]
    bar = tqdm(total=len(pairs), desc="align layer pairs", disable=not progress, position=0)
    left = {pair: len(PARTS) for pair in pairs}

    def done(i: int, _: Any) -> None:
        kind, pair = tasks[i][1], tasks[i][2]
        if kind in PARTS:
            left[pair] -= 1
            bar.update(left[pair] == 0)

    try:
        results = workers.run_tasks(_run_task, tasks, cfg.align.workers, done)
    finally:
        bar.close()
    by_task = {(t[1], t[2]): r for t, r in zip(tasks, results) if t[1] in PARTS}
    grid = [row for t, r in zip(tasks, results) if t[1] == "layer_cka" for row in r]  # in layer order
    rep = Report()
    for pair in pairs:
        rep.add_pair([by_task[(part, pair)] for part in PARTS])
    add_qvalues(rep.metrics)
    report = cfg.report_dir
    write_csv(report / "metrics.csv", METRIC_COLUMNS + baselines.BASELINE_COLUMNS, baselines.annotate(rep.metrics))
    write_csv(report / "alignment.csv", ALIGN_COLUMNS, rep.alignment)
    write_csv(report / "feature_matches.csv", MATCH_COLUMNS, rep.matches)
    if rep.seed_matches:
        write_csv(report / "feature_matches_seed.csv", MATCH_COLUMNS, rep.seed_matches)
    write_csv(report / "layer_cka.csv", LAYER_CKA_COLUMNS, grid)
    log.info("align: wrote %s", report)
