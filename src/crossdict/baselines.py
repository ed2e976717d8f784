"""Floors and ceilings: what a similarity number or match count means between "shares only the input"
and "the same model again".

Floors share the input with the real B and go through the same code path as the real number
(`evaluate` calls its own `resid_metrics` / `_score_maps` / `sae_block` on them):
  * token floor: B's representation replaced by its token identity at the anchor, as a fixed
    random Gaussian embedding of B's token id (`token_embedding`, width d_B) for the residual
    metrics, and as one-hot codes (`TokenCodes`) for SAE-space metrics and feature matching;
  * context floor: token plus previous token (`context_embedding`: sum of two independent fixed
    embeddings, so a linear map from A can read both; `TokenCodes` with both one-hot blocks);
  * random-weights floor: a randomly initialised B (`cache_random`, computed in `evaluate`).
Ceilings: the residual metrics are 1 for an identical representation ("identity"); SAE-space
metrics (top-k overlap, significant-match share) use a second SAE seed of the same model and layer
("seed": A seed 0 vs A seed 1 and B seed 0 vs B seed 1, matched through the same `sae_block`,
averaged).

Universality = (cross-model − floor) / (ceiling − floor), floor = the strongest floor present on
that resample. Its CI, and the paired test of (real − floor), come from *joint* passage
resampling (`joint_resamples`): every view (real, each floor, each ceiling) is evaluated on the
same half-sample of held-out passages, so their differences keep the pairing. The paired
p-value is the share of centred half-sample differences at least as large as the observed one
(+1 corrected; floor 1/(n_boot+1)), a shift test of H0: real ≤ floor.

The significant-match share per resample counts tested pairs that are significant on the full
held-out split (q, both nulls, effect size) *and* whose resampled held-out correlation beats the
best correlation A's feature reaches with any token-floor code on that resample
(`best_token_corr`): the match is more than token identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy import sparse

from .align import retrieval_accuracy
from .matching import Matches, code_correlation, pair_correlation, support_counts
from .metrics import HeldoutCCA, cross_moments, jaccard_sets, linear_cka_from_moments, topk_sets
from .stats import bh_qvalues, half_sample_ci, passage_index, passage_subsample, resample_rows

FLOORS = ("token", "context")
"""Input-sharing floors built here (the random-weights floor comes from `cache_random`)."""
BASELINE_COLUMNS = (
    "floor_token", "floor_context", "floor_random", "ceiling", "ceiling_kind", "universality",
    "universality_ci_low", "universality_ci_high", "diff_floor", "diff_floor_ci_low", "diff_floor_ci_high",
    "p_diff_floor", "floor_used", "q_diff_floor",
)  # fmt: skip
"""Columns `metrics.csv` gains: floors, ceiling, universality [CI] and the paired test of (real − floor)
(q_diff_floor: its BH q over the run's `universality` rows, one family)."""
HEADLINE = ("linear_cka", "svcca", "procrustes_r2", "retrieval_top1", "topk_overlap", "significant_share")
"""Metrics that get a universality row (space `universality`) per layer pair."""


# ---------------------------------------------------------------------------------------------
# floor inputs


def anchor_tokens(tokens_b: np.ndarray, rows_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B's token id at each anchor `[n]` and the token before it in the same passage `[n]` (-1 at a
    passage start). tokens_b: `cache.tokens("b")` `[n_tok, 6]` in global row order; rows_b `[n]`."""
    tokens_b = np.asarray(tokens_b)
    rows_b = np.asarray(rows_b, np.int64)
    tok = tokens_b[rows_b, 4].astype(np.int64)
    prev_row = np.maximum(rows_b - 1, 0)
    same = (rows_b > 0) & (tokens_b[prev_row, 0] == tokens_b[rows_b, 0])
    prev = np.where(same, tokens_b[prev_row, 4], -1).astype(np.int64)
    return tok, prev


def token_embedding(ids: np.ndarray, d: int, seed: int = 0) -> np.ndarray:
    """Fixed random Gaussian vector per token id `[n, d]` float32: the same id always gets the same
    vector (seeded by (seed, id)), whatever split or order it appears in."""
    ids = np.asarray(ids, np.int64)
    uniq, inv = np.unique(ids, return_inverse=True)
    table = np.stack([np.random.default_rng([seed, int(u) + 1]).standard_normal(d) for u in uniq]) if len(uniq) else np.zeros((0, d))
    return table.astype(np.float32)[inv.ravel()]


def context_embedding(tok: np.ndarray, prev: np.ndarray, d: int, seed: int = 0) -> np.ndarray:
    """Token plus previous token `[n, d]`: (E(tok) + E'(prev)) / √2 with independent tables."""
    return ((token_embedding(tok, d, seed) + token_embedding(prev, d, seed + 7919)) / np.sqrt(2.0)).astype(np.float32)


class TokenCodes:
    """A token-identity stand-in for B's SAE: `encode_csr(ids)` gives one-hot codes over a fixed
    vocabulary, so the token floor goes through `matching.encode_sparse` / `sae_block` unchanged.

    ids `[n, 1]` (token) or `[n, 2]` (token, previous token: two one-hot blocks). W_dec `[m, d]`
    is a fixed random embedding per code, so decoder-based numbers get their chance level.
    """

    def __init__(self, vocab: np.ndarray, d_model: int, context: bool = False, seed: int = 0):
        self.vocab = np.unique(np.asarray(vocab, np.int64))
        self.context = context
        m = len(self.vocab) * (2 if context else 1)
        self.W_dec = np.random.default_rng(seed).standard_normal((m, d_model)).astype(np.float32)

    def _onehot(self, ids: np.ndarray) -> sparse.csr_matrix:
        col = np.searchsorted(self.vocab, ids)
        ok = (col < len(self.vocab)) & (self.vocab[np.minimum(col, len(self.vocab) - 1)] == ids)
        n = len(ids)
        return sparse.csr_matrix((np.ones(ok.sum(), np.float32), (np.nonzero(ok)[0], col[ok])), shape=(n, len(self.vocab)))

    def encode_csr(self, X: np.ndarray) -> sparse.csr_matrix:
        X = np.asarray(X).astype(np.int64)
        blocks = [self._onehot(X[:, 0])] + ([self._onehot(X[:, 1])] if self.context else [])
        return sparse.hstack(blocks, format="csr", dtype=np.float32)


@dataclass
class Floors:
    """B's token ids at the anchors of both splits: the inputs of the token and context floors."""

    tok_tr: np.ndarray
    prev_tr: np.ndarray
    tok_ho: np.ndarray
    prev_ho: np.ndarray
    d_b: int
    seed: int = 0

    @classmethod
    def from_cache(cls, cache: Any, seed: int = 0) -> "Floors":
        tokens_b = cache.tokens("b")
        tr, ho = (anchor_tokens(tokens_b, cache.anchor_pairs(s)[:, 1]) for s in ("train", "heldout"))
        return cls(*tr, *ho, d_b=cache.d_model("b"), seed=seed)

    def masked(self, keep_tr: np.ndarray, keep_ho: np.ndarray) -> "Floors":
        """The same floors on the anchors a row mask keeps (bool `[n_tr]`, `[n_ho]`, as `cache.pair_mask`)."""
        return Floors(self.tok_tr[keep_tr], self.prev_tr[keep_tr], self.tok_ho[keep_ho], self.prev_ho[keep_ho],
                      self.d_b, self.seed)

    def resid(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(train `[n_tr, d_b]`, held-out `[n_ho, d_b]`) floor representation of B."""
        if name == "token":
            return token_embedding(self.tok_tr, self.d_b, self.seed), token_embedding(self.tok_ho, self.d_b, self.seed)
        if name == "context":
            return (context_embedding(self.tok_tr, self.prev_tr, self.d_b, self.seed),
                    context_embedding(self.tok_ho, self.prev_ho, self.d_b, self.seed))  # fmt: skip
        raise ValueError(f"unknown floor {name!r}; expected one of {FLOORS}")

    def codes(self, name: str) -> tuple[TokenCodes, np.ndarray, np.ndarray]:
        """(token-identity SAE, train ids `[n_tr, c]`, held-out ids `[n_ho, c]`) for `sae_block`."""
        ctx = name == "context"
        if name not in FLOORS:
            raise ValueError(f"unknown floor {name!r}; expected one of {FLOORS}")
        vocab = np.concatenate([self.tok_tr, self.tok_ho] + ([self.prev_tr, self.prev_ho] if ctx else []))
        ids = lambda t, p: np.stack([t, p], 1) if ctx else t[:, None]  # noqa: E731
        return TokenCodes(vocab, self.d_b, ctx, self.seed), ids(self.tok_tr, self.prev_tr), ids(self.tok_ho, self.prev_ho)


# ---------------------------------------------------------------------------------------------
# joint resampling, paired tests, universality


def joint_resamples(
    views: dict[str, Callable[[np.ndarray], float]], passage_ids: np.ndarray, n_boot: int,
    rng: np.random.Generator, ci: str = "half_sample",
) -> tuple[dict[str, float], dict[str, np.ndarray]]:  # fmt: skip
    """Each view `rows [r] -> float` on all rows and on n_boot passage resamples, the *same* rows for
    every view: (values {view: float}, resamples {view: [n_boot]})."""
    n = len(passage_ids)
    values = {k: float(fn(np.arange(n))) for k, fn in views.items()}
    idx = passage_index(passage_ids)
    boots = {k: np.empty(n_boot) for k in views}
    for b in range(n_boot):
        r = resample_rows(idx, rng, ci)
        for k, fn in views.items():
            boots[k][b] = fn(r)
    return values, boots


def universality(real: float | np.ndarray, floor: float | np.ndarray, ceiling: float | np.ndarray) -> Any:
    """(real − floor) / (ceiling − floor); NaN where the ceiling does not exceed the floor."""
    real, floor, ceiling = (np.asarray(v, np.float64) for v in (real, floor, ceiling))
    gap = ceiling - floor
    with np.errstate(invalid="ignore", divide="ignore"):
        u = np.where(gap > 0, (real - floor) / np.where(gap > 0, gap, 1.0), np.nan)
    return float(u) if u.ndim == 0 else u


def paired_test(real: float, floor: float, real_b: np.ndarray, floor_b: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float, float]:
    """(real − floor, CI low, CI high, one-sided p of H0 real ≤ floor) from jointly resampled values.

    The half-sample spread of d* = real* − floor* stands in for the sampling spread of d̂ (see
    `stats.half_sample_ci`); p = (1 + #{d* − med d* ≥ d̂}) / (1 + B).
    """
    d = float(real - floor)
    db = np.asarray(real_b, np.float64) - np.asarray(floor_b, np.float64)
    db = db[np.isfinite(db)]
    if not db.size or not math.isfinite(d):
        return d, math.nan, math.nan, math.nan
    lo, hi = half_sample_ci(d, db, alpha)
    p = float((1 + np.sum(db - np.median(db) >= d)) / (1 + db.size))
    return d, lo, hi, p


def _row(la: int, lb: int, metric: str, values: dict[str, float], boots: dict[str, np.ndarray],
         ceiling_kind: str, alpha: float = 0.05) -> dict:  # fmt: skip
    """One `universality` row from jointly resampled views real / floor_* / ceiling."""
    floors = [k for k in ("floor_token", "floor_context", "floor_random") if k in values and math.isfinite(values[k])]
    out = {"layer_a": la, "layer_b": lb, "space": "universality", "metric": metric, "value": values["real"],
           "ci_low": math.nan, "ci_high": math.nan, "null_mean": math.nan, "p_value": math.nan, "split": "heldout",
           "ceiling_kind": ceiling_kind, **{k: values.get(k, math.nan) for k in ("floor_token", "floor_context", "floor_random")}}  # fmt: skip
    out["ceiling"] = values.get("ceiling", math.nan)
    if not floors:
        return fill_baseline_columns(out)
    used = max(floors, key=lambda k: values[k])  # the strongest floor that shares the input
    f_b = np.max(np.stack([boots[k] for k in floors]), 0)
    c_b = boots["ceiling"] if "ceiling" in boots else np.full(len(f_b), out["ceiling"])
    u = universality(values["real"], values[used], out["ceiling"])
    ub = universality(boots["real"], f_b, c_b)
    ub = ub[np.isfinite(ub)]
    lo, hi = half_sample_ci(u, ub, alpha) if ub.size and math.isfinite(u) else (math.nan, math.nan)
    d, dlo, dhi, p = paired_test(values["real"], values[used], boots["real"], f_b, alpha)
    out.update(universality=u, universality_ci_low=lo, universality_ci_high=hi, diff_floor=d, diff_floor_ci_low=dlo,
               diff_floor_ci_high=dhi, p_diff_floor=p, floor_used=used.removeprefix("floor_"))  # fmt: skip
    return fill_baseline_columns(out)


def fill_baseline_columns(row: dict) -> dict:
    """Give a metrics.csv row every BASELINE_COLUMNS key (NaN / empty when it has none)."""
    for c in BASELINE_COLUMNS:
        row.setdefault(c, "" if c in ("ceiling_kind", "floor_used") else math.nan)
    return row


# ---------------------------------------------------------------------------------------------
# residual-space headline views


def retrieval_hits(Y_hat: np.ndarray, Y: np.ndarray, n_candidates: int, rng: np.random.Generator,
                   max_queries: int, block: int = 512) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-query top-1 hit `[q]` bool and the query rows `[q]` of `align.retrieval_accuracy` (the
    true partner among M candidates by cosine; ties count against)."""
    ret = retrieval_accuracy(Y_hat, Y, n_candidates, rng, max_queries, block, return_ranks=True)
    return ret["ranks"] < 1, ret["queries"]


def resid_views(
    hcca: HeldoutCCA, xa_ho: np.ndarray, xb_ho: np.ndarray, procrustes: Any,
    acfg: Any, rng: np.random.Generator, sub: np.ndarray,
) -> dict[str, Callable[[np.ndarray], float]]:  # fmt: skip
    """Headline residual metrics of one (A, B-or-floor) pair as functions of held-out rows of `sub`.

    hcca: SVCCA/PWCCA directions fitted on train (`metrics.HeldoutCCA`, as for the pair's metrics);
    procrustes: the fitted train map (`align.LinearMap`).
    """
    A, B = xa_ho[sub], xb_ho[sub]
    U, V = hcca.variates(A, B)
    Yh = procrustes.transform(A).astype(np.float64)
    Yc = B.astype(np.float64)
    err = np.sum((Yc - Yh) ** 2, 1)
    hit, queries = retrieval_hits(procrustes.transform(A), B, acfg.retrieval_candidates, rng, acfg.retrieval_queries)
    is_query = np.zeros(len(sub), bool)
    is_query[queries] = True
    hit_at = np.zeros(len(sub))
    hit_at[queries] = hit

    def r2(r: np.ndarray) -> float:
        Y = Yc[r]
        sst = np.sum((Y - Y.mean(0)) ** 2)
        return float(1 - err[r].sum() / sst) if sst > 0 else math.nan

    def top1(r: np.ndarray) -> float:
        q = is_query[r]
        return float(hit_at[r][q].mean()) if q.any() else math.nan

    return {
        "linear_cka": lambda r: linear_cka_from_moments(cross_moments(A[r], B[r])),
        "svcca": lambda r: hcca.score(U[r], V[r])["svcca"],
        "procrustes_r2": r2,
        "retrieval_top1": top1,
    }


def resid_rows(
    la: int, lb: int, real: tuple, floors: dict[str, tuple], acfg: Any, rng: np.random.Generator, pid_ho: np.ndarray,
) -> list[dict]:  # fmt: skip
    """Universality rows for the residual headline metrics (ceiling: identity = 1).

    real / floors[name]: (held-out CCA, xa_ho, xb_ho, procrustes map); floors keyed token /
    context / random. All views use the same ≤ metric_max_tokens held-out rows (whole passages).
    """
    sub = passage_subsample(pid_ho, acfg.metric_max_tokens, rng)
    views = {"real": resid_views(*real, acfg, rng, sub)}
    for name, args in floors.items():
        views[f"floor_{name}"] = resid_views(*args, acfg, rng, sub)
    rows = []
    for metric in ("linear_cka", "svcca", "procrustes_r2", "retrieval_top1"):
        values, boots = joint_resamples({k: v[metric] for k, v in views.items()}, pid_ho[sub], acfg.n_bootstrap, rng, acfg.ci_method)
        values["ceiling"] = 1.0
        rows.append(_row(la, lb, metric, values, boots, "identity"))
    return rows


# ---------------------------------------------------------------------------------------------
# SAE-space headline views


def best_token_corr(codes_a: sparse.csr_matrix, token_codes: sparse.csr_matrix) -> np.ndarray:
    """Per A feature `[m_a]`: the largest correlation it reaches with any token-floor code.

    Only codes that fire on these rows are correlated: one that never fires has sd 0, so its
    correlation is exactly 0 (`code_correlation`) and adds only 0 to the max. On a resample most
    of the vocabulary is absent; correlating the rest gives every entry the same value (each is
    computed from its own column), at a fraction of the cost."""
    token_codes = token_codes.tocsr()
    live = np.unique(token_codes.indices)
    if not len(live):
        return np.zeros(codes_a.shape[1], np.float32)
    best = code_correlation(codes_a, token_codes[:, live]).max(1)
    return np.maximum(best, np.float32(0.0)) if len(live) < token_codes.shape[1] else best


@dataclass
class CodePair:
    """Held-out codes of one (A, B-or-floor-or-seed) pair and its significant Hungarian matches."""

    ca: sparse.csr_matrix
    cb: sparse.csr_matrix
    matches: Matches | None


def code_views(pair: CodePair, token_codes: sparse.csr_matrix, acfg: Any) -> dict[str, Callable[[np.ndarray], float]]:
    """topk_overlap and significant_share (share of tested A features whose full-split significant
    match also beats A's best token-floor correlation on the resample) as functions of rows."""
    m = pair.matches
    if m is None or not len(m):
        return {"topk_overlap": lambda r: math.nan, "significant_share": lambda r: math.nan}
    ta, tb = topk_sets(pair.ca, pair.cb, m.feat_a, m.feat_b, acfg.top_k_overlap)
    sig = m.significant(acfg.q_threshold)
    n_tested = max(int(m.tested.sum()), 1)
    xa, xb = pair.ca[:, m.feat_a[sig]].tocsr(), pair.cb[:, m.feat_b[sig]].tocsr()

    def share(r: np.ndarray) -> float:
        if not sig.any():
            return 0.0
        xa_r = xa[r]
        corr = pair_correlation(xa_r, xb[r])
        best = best_token_corr(xa_r, token_codes[r])  # xa_r: A's codes of the significant features
        return float(np.sum(corr > best) / n_tested)

    return {"topk_overlap": lambda r: jaccard_sets(ta[r], tb[r]), "significant_share": share}


def code_rows(
    la: int, lb: int, real: CodePair, floors: dict[str, CodePair], ceilings: list[CodePair],
    token_codes: sparse.csr_matrix, acfg: Any, rng: np.random.Generator, pid_ho: np.ndarray,
) -> list[dict]:  # fmt: skip
    """Universality rows for the SAE headline metrics; ceiling = mean over the seed ceilings given
    (A seed 0 vs 1, B seed 0 vs 1) on the same resample. Without ceilings, ceiling is NaN."""
    views = {"real": code_views(real, token_codes, acfg)}
    views.update({f"floor_{k}": code_views(v, token_codes, acfg) for k, v in floors.items()})
    ceil_views = [code_views(c, token_codes, acfg) for c in ceilings]
    rows = []
    for metric in ("topk_overlap", "significant_share"):
        fns = {k: v[metric] for k, v in views.items()}
        if ceil_views:
            fns["ceiling"] = lambda r, metric=metric: float(np.nanmean([cv[metric](r) for cv in ceil_views]))
        values, boots = joint_resamples(fns, pid_ho, acfg.n_bootstrap, rng, acfg.ci_method)
        rows.append(_row(la, lb, metric, values, boots, "seed" if ceil_views else ""))
    return rows


def match_count_metrics(matches: dict[str, Matches], codes_a_ho: sparse.csr_matrix, pid_ho: np.ndarray, acfg: Any) -> dict[str, float]:
    """Support and significant-match counts per method (`matching.support_counts`), named
    `<count>_<method>` for metrics.csv."""
    from .matching import support

    n_tok, n_pas = support(codes_a_ho, pid_ho)
    out = {}
    for name, m in matches.items():
        counts = support_counts(m, n_tok, n_pas, codes_a_ho.shape[0], acfg.q_threshold, acfg.min_feature_passages, acfg.min_feature_tokens)
        out.update({f"{k}_{name}": v for k, v in counts.items()})
    return out


# ---------------------------------------------------------------------------------------------
# metrics.csv columns

_IDENTITY_ONE = {"linear_cka", "debiased_cka", "svcca", "pwcca", "rbf_cka", "rsa", "mutual_knn"}
"""Residual metrics that score exactly 1 for an identical representation (their ceiling)."""
_HEADLINE_OF = {("resid", "linear_cka"): "linear_cka", ("resid", "svcca"): "svcca",
                ("sae", "topk_overlap"): "topk_overlap"}  # fmt: skip


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def annotate(rows: list[dict]) -> list[dict]:
    """Add BASELINE_COLUMNS to every metrics row (in place; returns rows).

    A row of space `resid`, `resid_z` or `sae` gets the value of the same metric in its floor
    spaces (`<space>_token_b`, `<space>_context_b`, `<space>_random_b`) and its ceiling (identity
    1 for bounded residual metrics; for `sae`, the mean of the two seed ceilings `sae_seed_a` at
    layer_a and `sae_seed_b` at layer_b), and universality from the strongest floor. Headline
    metrics also get the jointly resampled universality CI and paired test from their
    `universality` row.
    """
    by = {(r["layer_a"], r["layer_b"], r["space"], r["metric"]): r for r in rows}
    uni = [r for r in rows if r.get("space") == "universality"]
    for r, q in zip(uni, bh_qvalues(np.array([_num(r.get("p_diff_floor")) for r in uni], np.float64))):
        r["q_diff_floor"] = float(q)
    for r in rows:
        fill_baseline_columns(r)
        space, metric, la, lb = r["space"], r["metric"], r["layer_a"], r["layer_b"]
        if space not in ("resid", "resid_z", "sae"):
            continue
        for f in ("token", "context", "random"):
            other = by.get((la, lb, f"{space}_{f}_b", metric))
            r[f"floor_{f}"] = _num(other["value"]) if other else math.nan
        if space == "sae":
            seeds = [by.get((la, la, "sae_seed_a", metric)), by.get((lb, lb, "sae_seed_b", metric))]
            vals = [_num(s["value"]) for s in seeds if s is not None]
            r["ceiling"], r["ceiling_kind"] = (float(np.nanmean(vals)), "seed") if vals and np.isfinite(vals).any() else (math.nan, "")
        elif metric in _IDENTITY_ONE:
            r["ceiling"], r["ceiling_kind"] = 1.0, "identity"
        floors = {f: r[f"floor_{f}"] for f in ("token", "context", "random") if math.isfinite(r[f"floor_{f}"])}
        if floors:
            used = max(floors, key=floors.get)
            r["floor_used"] = used
            r["universality"] = universality(_num(r["value"]), floors[used], r["ceiling"])
        u = by.get((la, lb, "universality", _HEADLINE_OF.get((space, metric), "")))
        if u is not None:
            for c in ("universality_ci_low", "universality_ci_high", "diff_floor", "diff_floor_ci_low",
                      "diff_floor_ci_high", "p_diff_floor", "q_diff_floor"):  # fmt: skip
                r[c] = u[c]
    return rows
