"""Stage 6, files -> `runs/<name>/report/index.html`: one self-contained page (no network, no CDN).

Reads only what earlier stages wrote (cache manifest, report CSVs, SAE training logs, transfer
outputs when present) plus the feature-browser data from `browser.py`. Plots are matplotlib PNGs
inlined as base64; the layer-correspondence heat map and every table are HTML, so their numbers
can be read (and tested) in the page; the feature browser is a few lines of inline JavaScript over
an embedded JSON blob.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .config import RunConfig
from .utils import atomic_write_text, read_json

PLOT_METRICS = ("linear_cka", "svcca", "pwcca", "rsa", "mutual_knn", "debiased_cka")
"""Residual metrics drawn in the metrics plot (masked raw space, `resid` rows)."""


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.is_file() else []


def _f(v, nd: int = 3) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(x) else f"{x:.{nd}f}"


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


# --- sections -----------------------------------------------------------------------------------


HEADLINE = (("linear_cka", "linear CKA"), ("svcca", "SVCCA"), ("procrustes_r2", "Procrustes R²"),
            ("retrieval_top1", "retrieval top-1"), ("topk_overlap", "top-k overlap (SAE)"),
            ("significant_share", "significant-match share (SAE)"))  # fmt: skip
"""The headline metrics (baselines.HEADLINE), in table order, with their labels: masked raw
activations (`resid`) and SAE codes, never the z-scored (`resid_z`) variant."""
_LABEL = dict(HEADLINE)
_LEAD = ("significant_share", "topk_overlap", "svcca", "linear_cka", "procrustes_r2", "retrieval_top1")
"""Which universality leads a layer pair's first sentence: the first with a finite value. Feature
metrics first: their ceiling is a measured one (two SAE seeds), the residual ones' is identity = 1."""
_FALLBACK_SPACE = {"linear_cka": "resid", "svcca": "resid", "topk_overlap": "sae"}
"""A run without `universality` rows: the annotated rows that carry the same floor columns."""
Z_LABEL = "z-scored per dimension (basis-dependent variant, not a headline)"


def headline_rows(metrics: list[dict]) -> dict[tuple[str, str, str], dict]:
    """`(layer_a, layer_b, metric) -> row` for the headline metrics: the `universality` row (value,
    floors, ceiling and universality [CI] from one joint passage resampling, see `baselines`),
    else the `resid` / `sae` row of the same metric. Adds `q_diff_floor` (BH over the run's
    paired floor tests of these rows, one family) when metrics.csv lacks it."""
    from .stats import bh_qvalues

    out: dict[tuple[str, str, str], dict] = {}
    for r in metrics:
        if r.get("space") == "universality" and r.get("metric") in _LABEL:
            out[(r["layer_a"], r["layer_b"], r["metric"])] = dict(r)
    for r in metrics:
        key = (r["layer_a"], r["layer_b"], r["metric"])
        if _FALLBACK_SPACE.get(r["metric"]) == r.get("space") and key not in out:
            out[key] = dict(r)
    rows = list(out.values())
    if rows and not any(math.isfinite(_num(r.get("q_diff_floor"))) for r in rows):
        q = bh_qvalues(np.array([_num(r.get("p_diff_floor")) for r in rows], np.float64))
        for r, v in zip(rows, q):
            r["q_diff_floor"] = float(v)
    return out


def beats_floor(r: dict, q: float = 0.05) -> bool | None:
    """Does the value beat its strongest input-sharing floor? (real − floor) > 0 with the paired,
    passage-resampled test's BH q (else p) below `q`; None when the row has no paired test."""
    d = _num(r.get("diff_floor"))
    p = _num(r.get("q_diff_floor"))
    p = p if math.isfinite(p) else _num(r.get("p_diff_floor"))
    if not (math.isfinite(d) and math.isfinite(p)):
        return None
    return bool(d > 0 and p < q)


def _floors(r: dict) -> dict[str, float]:
    vals = {k: _num(r.get(f"floor_{k}")) for k in ("token", "context", "random")}
    return {k: v for k, v in vals.items() if math.isfinite(v)}


def _strongest(r: dict) -> tuple[str, float]:
    fl = _floors(r)
    used = str(r.get("floor_used") or "")
    if used not in fl:
        used = max(fl, key=fl.get) if fl else ""
    return used, fl.get(used, math.nan)


def floor_value_ceiling(r: dict, nd: int = 3, q: float = 0.05) -> str:
    """One headline cell: strongest floor ▸ value ▸ ceiling; below it every floor (token, context,
    random weights) and universality [CI], marked when the value does not beat its floor."""
    used, fv = _strongest(r)
    ceil = _num(r.get("ceiling"))
    kind = str(r.get("ceiling_kind") or "") or "none"
    beat = beats_floor(r, q)
    head = (f"<span class=null>{_f(fv, nd)} ({html.escape(used or '–')})</span> ▸ <b>{_f(r.get('value'), nd)}</b> ▸ "
            f"<span class=null>{_f(ceil, nd) if math.isfinite(ceil) else 'no ceiling'} ({html.escape(kind)})</span>")
    floors = " · ".join(f"{k} {_f(_num(r.get(f'floor_{k}')), nd)}" for k in ("token", "context", "random"))
    u = f"universality {_f(r.get('universality'), 2)}"
    if math.isfinite(_num(r.get("universality_ci_low"))):
        u += f" [{_f(r.get('universality_ci_low'), 2)}, {_f(r.get('universality_ci_high'), 2)}]"
    verdict = {True: " <span class=ok>beats its floor</span>", False: " <span class=bad>does not beat its floor</span>",
               None: ""}[beat]  # fmt: skip
    state = {True: "beats", False: "below", None: "untested"}[beat]
    return (f'<div class=fvc data-metric="{html.escape(str(r.get("metric", "")))}" data-floor="{state}">{head}'
            f"<br><span class='null floors'>floors: {floors}</span><br><span class=null>{u}</span>{verdict}</div>")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _u_ci(r: dict) -> str:
    s = f"{_f(r.get('universality'), 2)}"
    if math.isfinite(_num(r.get("universality_ci_low"))):
        s += f" [{_f(r.get('universality_ci_low'), 2)}, {_f(r.get('universality_ci_high'), 2)}]"
    return s


def lead_sentences(la: str, lb: str, head: dict, q: float, resid: dict) -> str:
    """A layer pair's paragraph; its first sentence is the universality estimate with its CI, the
    next say which headline metrics do not beat their strongest floor and which do.

    head: `headline_rows`; resid: `(la, lb, space, metric) -> row` (for the shuffled null's p).
    """
    rows = {m: head[(la, lb, m)] for m, _ in HEADLINE if (la, lb, m) in head}
    lead = next((m for m in _LEAD if m in rows and math.isfinite(_num(rows[m].get("universality")))), None)
    if lead is None:
        return (f"<p class=lead data-pair='{la}-{lb}'><b>A{la} ↔ B{lb}</b>: no universality estimate (metrics.csv has "
                "no floors or ceilings for this pair; rerun the align stage).</p>")
    r = rows[lead]
    kind = "seed-to-seed ceiling" if r.get("ceiling_kind") == "seed" else "ceiling (identical representations)"
    others = [f"{_LABEL[m]} {_u_ci(rows[m])}" for m, _ in HEADLINE if m != lead and m in rows
              and math.isfinite(_num(rows[m].get("universality")))]  # fmt: skip
    name = {"significant_share": "significant-match share of SAE features", "topk_overlap": "top-k overlap of SAE "
            "features"}.get(lead, _LABEL[lead])  # fmt: skip
    out = (f"<b>A{la} ↔ B{lb}</b>: universality {_u_ci(r)} by {name} (0 = strongest input-sharing floor, "
           f"1 = {kind})" + (f"; by the other headline metrics {', '.join(others)}" if others else "") + ".")
    below = [m for m in rows if beats_floor(rows[m], q) is False]
    above = [m for m in rows if beats_floor(rows[m], q) is True]
    if below:
        fl = sorted({_strongest(rows[m])[0] for m in below})
        weak = [m for m in below if _beats_weak_only(rows[m], resid.get((la, lb, "resid", m)), q)]
        out += (f" <span class=bad>{_cap(_and([_LABEL[m] for m in below]))} {'does' if len(below) == 1 else 'do'} not beat "
                f"{'its' if len(below) == 1 else 'their'} strongest floor ({'/'.join(fl)})</span>: by "
                f"{'that metric' if len(below) == 1 else 'those metrics'} the two models share no more than reading the "
                "same tokens gives.")
        if weak:
            who = ("It clears" if len(below) == 1 else "Both clear" if len(below) == 2 else "They clear") \
                if weak == below else f"{_cap(_and([_LABEL[m] for m in weak]))} {'clears' if len(weak) == 1 else 'clear'}"
            out += f" {who} only the weaker controls (shuffled passages, random weights)."
    if above:
        qs = [_num(rows[m].get("q_diff_floor")) for m in above]
        qs = [v for v in qs if math.isfinite(v)]
        out += (f" {_cap(_and([_LABEL[m] for m in above]))} {'beats' if len(above) == 1 else 'beat'} "
                f"{'its' if len(above) == 1 else 'their'} strongest floor (paired passage-resampled test"
                + (f", BH q ≤ {_f(max(qs), 3)}" if qs else "") + ").")
    untested = [m for m in rows if beats_floor(rows[m], q) is None]
    if untested:
        out += f" {_cap(_and([_LABEL[m] for m in untested]))}: no paired test against the floor."
    return f"<p class=lead data-pair='{la}-{lb}'>{out}</p>"


def _beats_weak_only(r: dict, resid_row: dict | None, q: float) -> bool:
    """Below the input-sharing floor, yet above the random-weights floor (and the shuffled null where known)."""
    rnd = _num(r.get("floor_random"))
    if not math.isfinite(rnd) or not _num(r.get("value")) > rnd:
        return False
    p = _num((resid_row or {}).get("p_value"))
    return not math.isfinite(p) or p < q


def _mask_line(la: str, lb: str, manifest: dict, al: dict, get: dict) -> str:
    """Held-out anchor pairs the row mask left out for this pair, and the per-layer cache counts."""
    p = al.get((la, lb, "procrustes"), {})
    r = get.get((la, lb, "resid", "linear_cka"), {})
    n_m, n_ho = _num(p.get("n_masked")), _num(p.get("n_heldout"))
    info = (manifest.get("row_mask") or {}).get("layers", {})
    parts = []
    for key, layer in (("a", la), ("b", lb)):
        i = info.get(key, {}).get(layer)
        if i:
            parts.append(f"{key.upper()}{layer}: {i.get('dropped', 0)} of {i.get('n_rows', '?')} cached rows "
                         f"({i.get('dropped_massive', 0)} massive, {i.get('dropped_sink', 0)} attention sink)")
    s = ""
    if math.isfinite(n_m) and math.isfinite(n_ho):
        s = f"Row mask: {int(n_m)} of {int(n_m + n_ho)} held-out anchor pairs left out"
        if r.get("masked_a", "") != "":
            s += f" (A {r.get('masked_a')}, B {r.get('masked_b')})"
    if parts:
        s += ("; " if s else "Row mask: ") + "; ".join(parts)
    return f"<span class=null>{s}.</span>" if s else ""


def _summary(cfg: RunConfig, manifest: dict, metrics: list[dict], align: list[dict], matches: list[dict],
             stitching: list[dict]) -> str:
    c = manifest.get("counts", {})
    q = cfg.align.q_threshold
    models = "".join(
        f"<li><b>{k.upper()}</b>: {html.escape(m['name'])} ({m.get('n_layers', '?')} blocks, d={m.get('d_model', '?')}), "
        f"layers {m.get('layers')}</li>" for k, m in manifest.get("models", {}).items())
    data = (f"{c.get('n_passages', '?')} passages ({c.get('n_heldout_passages', '?')} held out) of "
            f"<code>{html.escape(cfg.corpus.source)}</code>; {c.get('n_tokens_a', '?')} tokens A, {c.get('n_tokens_b', '?')} tokens B, "
            f"{c.get('n_pairs', '?')} anchor pairs (pairing rate {_f(c.get('pairing_rate'))})")
    get = {(r["layer_a"], r["layer_b"], r["space"], r["metric"]): r for r in metrics}
    al = {(r["layer_a"], r["layer_b"], r["method"]): r for r in align}
    head = headline_rows(metrics)
    leads, cols = [], []
    for la, lb in cfg.layer_pairs:
        la, lb = str(la), str(lb)
        leads.append(lead_sentences(la, lb, head, q, get).replace("</p>", "<br>" + _mask_line(la, lb, manifest, al, get) + "</p>"))
        count = get.get((la, lb, "sae", "n_significant_hungarian"))
        if count is None:  # a run before support counts: the q column of feature_matches.csv
            n = sum(1 for m in matches if m["layer_a"] == la and m["layer_b"] == lb and m["method"] == "hungarian"
                    and _num(m["q_value"]) < q)  # fmt: skip
            count_cell = f"{n}"
        else:
            tested = get.get((la, lb, "sae", "n_tested_hungarian"), {}).get("value")
            count_cell = floor_value_ceiling(count, 0, q) + f"<span class=null>of {_f(tested, 0)} tested A features</span>"
        st = [s for s in stitching if str(s.get("layer_a")) == la and str(s.get("layer_b")) == lb
              and s.get("map") == "procrustes" and s.get("control", "") in ("", "none")]
        cols.append([floor_value_ceiling(head[(la, lb, m)], 3, q) if (la, lb, m) in head else "–" for m, _ in HEADLINE]
                    + [count_cell, _f(st[0].get("frac_recovered")) if st and "frac_recovered" in st[0]
                       else "<span class=null>– (transfer stage not run)</span>" if not stitching else "–"])
    labels = [lab for _, lab in HEADLINE] + [f"significant matches (count, q < {q})", "stitching loss recovered"]
    rows = [[f"<b>{html.escape(lab)}</b>"] + [c[i] for c in cols] for i, lab in enumerate(labels)]  # metrics down, pairs across
    table = _table(["metric"] + [f"A{la} ↔ B{lb}" for la, lb in cfg.layer_pairs], rows, "num headline")
    z = any(r.get("space") == "resid_z" for r in metrics)
    return (f'<section id="summary"><h2>Summary</h2><ul>{models}<li>{data}</li></ul>' + "".join(leads)
            + "<h3>Headline numbers: floor ▸ value ▸ ceiling (masked raw activations and SAE codes)</h3>" + table
            + "<p class=note>Every number is on held-out passages, on the rows the cache's row mask keeps (massive "
            "activations and the attention sink of a model without BOS left out). Each cell: the strongest floor ▸ the "
            "value ▸ the ceiling, then all three floors and universality = (value − floor) / (ceiling − floor). "
            "Floors share the input and go through the same code path: <i>token</i> (B replaced by its token id at the "
            "anchor), <i>context</i> (token id and the previous token) and <i>random</i> (a randomly initialised B). "
            "Ceiling: <i>seed</i> = two SAE seeds of the same model on the same data; <i>identity</i> = 1, what an "
            "identical representation scores. Brackets: 95% CI from half-samples of held-out passages, drawn jointly for "
            "value, floors and ceiling. <i>Beats its floor</i>: value − strongest floor &gt; 0 in a paired "
            f"passage-resampled test, BH q &lt; {q} over the run's headline rows (p floor 1/(B+1) with B = "
            f"{cfg.align.n_bootstrap} resamples). Significant matches: one-to-one matches of SAE features whose p beats "
            "both the shuffled-passage and the token-stratified null (BH q), counted among A's features with support; "
            "its token/context floor is the same count with B's SAE replaced by a token-identity code."
            + (f" Rows labelled <code>resid_z</code> / <code>:z</code> are {Z_LABEL}: they appear only in the detail "
               "tables below." if z else "") + "</p></section>")


def _detail_rows(la: str, lb: str, head: dict, get: dict, q: float) -> list[list]:
    cells = []

    def add(label: str, r: dict | None, nd: int = 3) -> None:
        if r is None:
            return
        beat = beats_floor(r, q)
        ceil = _num(r.get("ceiling"))
        cells.append([
            label, f"<b>{_f(r.get('value'), nd)}</b>", _f(r.get("floor_token"), nd), _f(r.get("floor_context"), nd),
            _f(r.get("floor_random"), nd), f"{_f(ceil, nd)} ({html.escape(str(r.get('ceiling_kind') or '–'))})",
            _u_ci(r), f"{_f(r.get('diff_floor'), nd)} [{_f(r.get('diff_floor_ci_low'), nd)}, {_f(r.get('diff_floor_ci_high'), nd)}]",
            f"{_f(r.get('p_diff_floor'), 3)} / {_f(r.get('q_diff_floor'), 3)}",
            {True: "<span class=ok>yes</span>", False: "<span class=bad>no</span>", None: "–"}[beat],
        ])  # fmt: skip

    for m, lab in HEADLINE:
        add(lab, head.get((la, lb, m)))
    add("significant matches (count)", get.get((la, lb, "sae", "n_significant_hungarian")), 0)
    z = get.get((la, lb, "resid_z", "linear_cka"))
    add(f"linear CKA, {Z_LABEL}", z)
    return cells


def _universality_section(cfg: RunConfig, metrics: list[dict]) -> str:
    """Per layer pair: value, token / context / random floor, ceiling, universality [CI] and the paired
    test against the strongest floor (space `universality` in metrics.csv, see `baselines`)."""
    head = headline_rows(metrics)
    if not head:
        return ""
    get = {(r["layer_a"], r["layer_b"], r["space"], r["metric"]): r for r in metrics}
    q = cfg.align.q_threshold
    cols = ["metric", "value", "token floor", "context floor", "random floor", "ceiling", "universality [95% CI]",
            "value − strongest floor [95% CI]", "p / q (paired, vs floor)", "beats its floor"]
    out = []
    for la, lb in cfg.layer_pairs:
        rows = _detail_rows(str(la), str(lb), head, get, q)
        if rows:
            out.append(f"<h3>A{la} ↔ B{lb}</h3>" + _table(cols, rows, "num"))
    return ('<section id="universality"><h2>Floors and ceilings</h2><p>Every headline number next to what the input alone '
            "gives (token and context floors), what an untrained B gives (random floor) and what the same model gives "
            "(seed ceiling), with the paired, passage-resampled test of value − strongest floor. q: Benjamini–Hochberg "
            "over the paired floor tests of the run's headline rows. A metric that does not beat its floor is "
            "explained by shared input.</p>" + "".join(out) + "</section>")


def _heat_table(rows: list[dict], field: str, pairs: set[tuple[int, int]], title: str) -> str:
    la_vals = sorted({int(r["layer_a"]) for r in rows})
    lb_vals = sorted({int(r["layer_b"]) for r in rows})
    v = {(int(r["layer_a"]), int(r["layer_b"])): _num(r[field]) for r in rows}
    finite = [x for x in v.values() if math.isfinite(x)]
    top = max(finite) if finite else 1.0
    head = "<th>A \\ B</th>" + "".join(f"<th>{lb}</th>" for lb in lb_vals)
    body = []
    for la in la_vals:
        best = max(lb_vals, key=lambda lb: v.get((la, lb), -1.0))
        cells = []
        for lb in lb_vals:
            x = v.get((la, lb), math.nan)
            shade = 0.0 if not math.isfinite(x) or top <= 0 else x / top
            cls = " class=pair" if (la, lb) in pairs else ""
            mark = " best" if lb == best else ""
            cells.append(f'<td{cls} data-value="{x:.4f}" style="background: rgba(180, 40, 40, {shade:.2f})" '
                         f'title="A{la} vs B{lb}: {x:.3f}"><span class="v{mark}">{x:.2f}</span></td>')
        body.append(f"<tr><th>{la}</th>{''.join(cells)}</tr>")
    return f'<div class=heat><h3>{title}</h3><table class="heatmap"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _layer_section(cfg: RunConfig, rows: list[dict], manifest: dict) -> str:
    if not rows:
        return ""
    pairs = set(cfg.layer_pairs)
    na = manifest.get("models", {}).get("a", {}).get("n_layers") or 1
    nb = manifest.get("models", {}).get("b", {}).get("n_layers") or 1
    has_z = any(math.isfinite(_num(r.get("cka_z"))) for r in rows)
    depth = []
    for la in sorted({int(r["layer_a"]) for r in rows}):
        cand = [r for r in rows if int(r["layer_a"]) == la]
        row = [f"A{la} ({(la + 1) / na:.2f})"]
        for field in ("cka", "cka_z") if has_z else ("cka",):
            best = max(cand, key=lambda r: _num(r[field]) if math.isfinite(_num(r[field])) else -1)
            row += [f"B{best['layer_b']} ({(int(best['layer_b']) + 1) / nb:.2f})", _f(best[field])]
        depth.append(row)
    src = rows[0].get("source", "")
    masked = rows[0].get("n_masked", "")
    return ('<section id="layers"><h2>Layer correspondence</h2>'
            f'<p>Linear CKA between every layer of A (rows) and every layer of B (columns) on {rows[0].get("n_pairs", "?")} '
            f'held-out anchor pairs ({html.escape(src)}), masked raw activations'
            + (f" ({html.escape(str(masked))} pairs left out by the row mask)" if masked not in ("", None) else "")
            + ". Outlined cells are the configured pairs; bold marks each row's best B layer. This map is a "
            "correspondence guide; it has no input-sharing floor (see the summary for floors and ceilings).</p>"
            + _heat_table(rows, "cka", pairs, "masked raw residual stream")
            + (_heat_table(rows, "cka_z", pairs, f"{Z_LABEL}") if has_z else "")
            + "<h3>Does relative depth line up?</h3>"
            + _table(["A layer (relative depth)", "best B layer (relative depth)", "linear CKA (masked raw)"]
                     + (["best B layer, z-scored (basis-dependent)", "CKA (z)"] if has_z else []), depth, "num")
            + "</section>")


def _metric_plots(cfg: RunConfig, metrics: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return ""
    get = {(r["layer_a"], r["layer_b"], r["space"], r["metric"]): r for r in metrics}
    pairs = [(str(a), str(b)) for a, b in cfg.layer_pairs]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.2), squeeze=False, sharex=True)
    marks = (("floor_token", "s", "#ee7733", "token floor"), ("floor_context", "D", "#aa3377", "context floor"),
             ("floor_random", "v", "#777777", "random-weights floor"))  # fmt: skip
    for ax, (la, lb) in zip(axes[0], pairs):
        names = [m for m in PLOT_METRICS if (la, lb, "resid", m) in get]
        for i, m in enumerate(names):
            r = get[(la, lb, "resid", m)]
            v, lo, hi = _num(r["value"]), _num(r["ci_low"]), _num(r["ci_high"])
            ax.barh(i, v, color="#4477aa", alpha=0.8)
            if math.isfinite(lo) and math.isfinite(hi) and lo <= v <= hi:
                ax.errorbar(v, i, xerr=[[v - lo], [hi - v]], color="k", capsize=3, lw=1)
            ax.plot(_num(r["null_mean"]), i, "x", color="#cc3311", ms=7, label="shuffled null" if i == 0 else None)
            for col, mk, color, lab in marks:
                if math.isfinite(_num(r.get(col))):
                    ax.plot(_num(r[col]), i, mk, color=color, ms=5, label=lab if i == 0 else None)
        ax.set_yticks(range(len(names)), names)
        ax.set_title(f"A{la} ↔ B{lb} (masked raw residuals)", fontsize=9)
        ax.set_xlim(-0.05, 1.0)
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.06), frameon=False)
    cols = ("value", "ci_low", "ci_high", "null_mean", "p_value", "q_value", "floor_token", "floor_context", "floor_random",
            "ceiling", "universality")  # fmt: skip

    def space(r: dict) -> str:
        sp = html.escape(r["space"])
        return f"{sp} <span class=null>(basis-dependent)</span>" if r["space"].startswith("resid_z") else sp

    rows = [[f"A{r['layer_a']} ↔ B{r['layer_b']}", space(r), html.escape(r["metric"])] + [_f(r.get(c)) for c in cols]
            for r in metrics]
    table = _table(["layers", "space", "metric", "value", "CI low", "CI high", "null mean", "p", "q (BH, run)", "token floor",
                    "context floor", "random floor", "ceiling", "universality"], rows, "num sortable")
    return ('<section id="metrics"><h2>Similarity metrics</h2><p>Masked raw residuals (<code>resid</code> rows). Bars: value '
            'with 95% CI; ×: shuffled-passage null; ■ token floor, ◆ context floor, ▼ random-weights floor. A bar that '
            'does not clear its token and context floors says no more than that both models read the same text. '
            'Ceiling: 1 (identical representations). These rows and the summary\'s draw their held-out tokens '
            '(≤ align.metric_max_tokens, whole passages) separately; where the two values differ (CKA is sensitive to which '
            'passages are drawn), read the summary\'s, whose value, floors and ceiling share one resampling.</p>'
            + _png(fig) + f"<details><summary>All metric rows of metrics.csv ({len(rows)})</summary>{table}</details></section>")


def _sae_section(cfg: RunConfig, sae_rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    for key in ("a", "b"):
        for layer in cfg.model(key).layers:
            log_path = cfg.sae_dir(key, layer) / "training_log.jsonl"
            if not log_path.is_file():
                continue
            log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            t = [r["tokens"] for r in log]
            label = f"{key.upper()} L{layer}"
            ax1.plot(t, [r["fvu"] for r in log], label=label, lw=1)
            ax2.plot(t, [r["dead_frac"] for r in log], label=label, lw=1)
    ax1.set(xlabel="training tokens", ylabel="FVU (train batch)", yscale="log", title="reconstruction")
    ax2.set(xlabel="training tokens", ylabel="dead latent fraction", title="dead latents")
    ax1.legend(fontsize=7)
    cols = ["model", "layer", "seed", "d_sae", "fvu", "l0", "dead_frac", "dense_frac", "seed_shared_dec", "seed_median_cos_dec",
            "seed_shared_enc", "loss_clean", "loss_sae", "frac_recovered_zero", "frac_recovered_mean", "kl_sae",
            "kl_recovered_zero", "loss_rand_err", "kl_rand_err", "err_radial_share", "err_top_pc_share", "wall_s"]
    cols = [c for c in cols if any(r.get(c, "") != "" for r in sae_rows) or c in ("model", "layer", "seed")]
    rows = [[html.escape(r.get(c, "")) if c in ("model",) else (_f(r.get(c)) if c not in ("layer", "seed", "d_sae") else r.get(c, ""))
             for c in cols] for r in sae_rows]
    return ('<section id="saes"><h2>Sparse autoencoders</h2>' + _png(fig) + _table(cols, rows, "num")
            + '<p class=note>FVU, L0 and dead fraction on held-out tokens; LM loss with the SAE spliced in, and the fraction of '
              'the loss gap to zero- and mean-ablation it recovers. Seed stability: the SAE against the same model and '
              'layer\'s SAE of another seed (column seed_ref of sae_metrics.csv), live latents matched one-to-one '
              '(Hungarian) on decoder (dec) or encoder (enc) cosine; shared = share with cosine &gt; 0.7 (Paulo &amp; '
              'Belrose 2025). It is the ceiling cross-model feature matching is read against. kl_sae: mean KL of the '
              'next-token distribution, clean vs spliced; kl_recovered_zero = 1 − kl_sae / kl_zero (SAEBench). '
              'loss_rand_err / kl_rand_err: the residual replaced by clean + a random vector of the SAE error\'s per-token '
              'norm (Gurnee 2024); err_radial_share: the SAE error\'s energy along each token\'s own residual direction '
              '(a random error puts 1/d there), err_top_pc_share: in the top-8 principal directions (random: 8/d).</p>'
            + _error_note(sae_rows) + _stability_note(cfg, sae_rows) + '</section>')


def _error_note(sae_rows: list[dict]) -> str:
    """Where the SAE error lives and what a random error of the same norm does (Gurnee 2024), one line per SAE."""
    lines = []
    for r in sae_rows:
        if str(r.get("seed")) != str(sae_rows[0].get("seed")) or _num(r.get("loss_rand_err")) != _num(r.get("loss_rand_err")):
            continue
        clean = _num(r.get("loss_clean"))
        d_sae, d_rand = _num(r.get("loss_sae")) - clean, _num(r.get("loss_rand_err")) - clean
        d_perp = _num(r.get("loss_rand_perp_err")) - clean
        lines.append(f"{html.escape(str(r.get('model')))} L{r.get('layer')}: the SAE adds {d_sae:+.3g} nats "
                     f"(KL {_f(r.get('kl_sae'))}), a same-norm random error {d_rand:+.3g} (KL {_f(r.get('kl_rand_err'))}); "
                     f"{100 * _num(r.get('err_radial_share')):.0f}% of the SAE error's energy lies along the token's own "
                     f"residual (random: {100 * _num(r.get('random_radial_share')):.2g}%), "
                     f"{100 * _num(r.get('err_top_pc_share')):.0f}% in the top-8 PCs (random: "
                     f"{100 * _num(r.get('random_top_pc_share')):.2g}%); a random error of the size of its part orthogonal to "
                     f"the residual adds {d_perp:+.3g} nats.")
    if not lines:
        return ""
    return ('<p class=note>Same-norm random error (Gurnee 2024 found SAE errors <em>worse</em> than random ones of the same '
            'norm). A pre-norm block reads its input through RMSNorm, which divides a pure rescaling of the residual away '
            '(only its weight against later blocks\' writes changes): err_radial_share is how much of the error is such a '
            'rescaling (shrinkage), and the random error of the norm of its orthogonal part compares what is left. An SAE '
            'error that costs more than its random baseline is pathological in Gurnee\'s sense.<br>' + "<br>".join(lines) + '</p>')


def _stability_note(cfg: RunConfig, sae_rows: list[dict]) -> str:
    """One line per layer pair: are both models' SAEs seed-stable enough for feature-level results to mean anything?"""
    from .stability import MAX_FVU, STABLE_SHARE

    def worst(column: str, key: str, layer: int, pick: Callable[[list[float]], float]) -> float:
        name = cfg.model(key).name
        vals = [_num(r.get(column)) for r in sae_rows if r.get("model") == name and str(r.get("layer")) == str(layer)]
        vals = [v for v in vals if not math.isnan(v)]
        return pick(vals) if vals else float("nan")

    items = []
    for la, lb in cfg.layer_pairs:
        sa, sb = worst("seed_shared_dec", "a", la, min), worst("seed_shared_dec", "b", lb, min)
        tag = f"A{la} ↔ B{lb} (seed-shared A {_f(sa, 2)}, B {_f(sb, 2)})"
        if math.isnan(sa) or math.isnan(sb):
            items.append(f"<li>{tag}: seed stability not measured (one SAE seed): feature-level results have no ceiling.</li>")
        elif min(sa, sb) < STABLE_SHARE:
            items.append(f"<li class=warn><b>{tag}: SAEs not seed-stable</b> (shared &lt; {STABLE_SHARE:.0%}): the "
                         "feature-level results of this pair (matches, transfer) are not interpretable; the "
                         "representation-level metrics (CKA, Procrustes, ...) do not use the SAEs and still are.</li>")
        else:
            fa, fb = worst("fvu", "a", la, max), worst("fvu", "b", lb, max)
            partial = [f"{k} {_f(v, 3)}" for k, v in (("A", fa), ("B", fb)) if v > MAX_FVU]
            if partial:
                items.append(f"<li class=warn>{tag}: stable (shared ≥ {STABLE_SHARE:.0%}), <b>but partial</b>: held-out "
                             f"FVU {', '.join(partial)} &gt; {MAX_FVU:g}, so its features describe only the part of the "
                             "residual stream the SAE reconstructs; read its matches and transfers as such.</li>")
            else:
                items.append(f"<li>{tag}: stable (shared ≥ {STABLE_SHARE:.0%}), FVU ≤ {MAX_FVU:g}.</li>")
    return "<p><b>Seed stability per layer pair</b></p><ul>" + "".join(items) + "</ul>"


def _match_section(cfg: RunConfig, matches: list[dict], seed_matches: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hung = [m for m in matches if m["method"] == "hungarian"]
    if not hung:
        return ""
    pairs = [(str(a), str(b)) for a, b in cfg.layer_pairs]
    fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(3.6 * (len(pairs) + 1), 3), squeeze=False)
    for ax, (la, lb) in zip(axes[0], pairs):
        ms = [m for m in hung if m["layer_a"] == la and m["layer_b"] == lb]
        sig = [_num(m["act_corr"]) for m in ms if _num(m["q_value"]) < cfg.align.q_threshold]
        ns = [_num(m["act_corr"]) for m in ms if not _num(m["q_value"]) < cfg.align.q_threshold]
        bins = [i / 25 - 0.2 for i in range(31)]
        ax.hist([ns, sig], bins=bins, stacked=True, color=["#bbbbbb", "#4477aa"], label=["q ≥ 0.05", "q < 0.05"])
        seed = [_num(m["act_corr"]) for m in seed_matches if m["method"] == "seed_a:hungarian" and m["layer_a"] == la]
        if seed:
            ax.hist(seed, bins=bins, histtype="step", color="#228833", label="seed-to-seed (A)")
        ax.set(title=f"A{la} ↔ B{lb}: matched-pair correlation", xlabel="activation correlation (held-out anchors)")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    ax = axes[0][-1]
    p = [_num(m["p_value"]) for m in hung if math.isfinite(_num(m["p_value"]))]
    ax.hist(p, bins=20, range=(0, 1), color="#4477aa")
    ax.axhline(len(p) / 20, color="#cc3311", ls="--", label="all null (uniform)")
    ax.set(title="match p-values (shuffled and token-stratified nulls)", xlabel="p-value")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=6)
    return ('<section id="matches"><h2>Feature matching</h2><p>One-to-one (Hungarian) matches of SAE latents, chosen by '
            'activation correlation on train anchors; the correlation shown is on held-out anchors. A pair is tested '
            'only when both features fire in enough held-out passages and tokens (dead and rare features are counted, '
            'not matched). Its p is the larger of two permutation p\'s: passages shuffled between the models, and B\'s '
            'rows re-paired within the same B token (token-stratified), so a match must beat reading the same token; then '
            'Benjamini–Hochberg q over the tested pairs. Under no shared features the p-values would be uniform (dashed '
            'line).</p>' + _png(fig) + "</section>")


def _crosscoder_section(cfg: RunConfig) -> str:
    """Crosscoder (issue 9): relative decoder norms, FVU vs the separate SAEs, agreement with SAE matching."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _csv(cfg.report_dir / "crosscoder.csv")
    path = cfg.report_dir / "crosscoder_summary.json"
    if not rows or not path.is_file():
        return ""
    summary = read_json(path, "crosscoder summary")
    pairs = summary.get("pairs", [])
    t = summary.get("exclusive_r", 0.1)
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.8 * len(pairs), 2.8), squeeze=False)
    for ax, p in zip(axes[0], pairs):
        la, lb = str(p["layer_a"]), str(p["layer_b"])
        r = {c: [_num(x["r"]) for x in rows if x["layer_a"] == la and x["layer_b"] == lb and x["class"] == c]
             for c in ("b_only", "shared", "a_only")}
        ax.hist(list(r.values()), bins=40, range=(0, 1), stacked=True, color=["#4477aa", "#999999", "#ee7733"],
                label=[f"B only ({len(r['b_only'])})", f"shared ({len(r['shared'])})", f"A only ({len(r['a_only'])})"])
        for x in (t, 1 - t):
            ax.axvline(x, color="k", lw=0.6, ls=":")
        ax.set(title=f"A{la} ↔ B{lb}", xlabel="relative decoder norm r = |d_A| / (|d_A| + |d_B|)", ylabel="latents")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6)
    table = [[f"A{p['layer_a']} ↔ B{p['layer_b']}", f"{p.get('n_shared')} / {p.get('n_a_only')} / {p.get('n_b_only')} / {p.get('n_dead')}",
              f"{_f(p.get('fvu_a'))} <span class=null>SAE {_f(p.get('sae_fvu_a_same_rows'))}</span>",
              f"{_f(p.get('fvu_b'))} <span class=null>SAE {_f(p.get('sae_fvu_b_same_rows'))}</span>", _f(p.get("l0"), 1),
              f"{_f(p.get('agreement'))} <span class=null>null {_f(p.get('agreement_null'))}; A-only {_f(p.get('agreement_a_only'))}, "
              f"B-only {_f(p.get('agreement_b_only'))}</span>", f"{_f(p.get('coverage'))} <span class=null>of {p.get('n_sig_sae_pairs') if p.get('n_sig_sae_pairs') is not None else '–'}</span>",
              f"{_f(p.get('median_dec_cos_mapped_shared'))} <span class=null>A-only {_f(p.get('median_dec_cos_mapped_a_only'))}, "
              f"B-only {_f(p.get('median_dec_cos_mapped_b_only'))}</span>"] for p in pairs]
    head = ["layers", "latents shared / A-only / B-only / dead", "FVU A (held-out)", "FVU B (held-out)", "L0",
            "agreement with matched SAE pairs", "SAE matches covered", "decoder cosine after Procrustes (median)"]
    return ('<section id="crosscoder"><h2>Crosscoder</h2><p>One dictionary over both models, trained on anchor-paired '
            f'tokens (Lindsey et al. 2024). r ≈ 0.5: a latent both models use; r ≤ {t} or ≥ {1 - t:g}: one model\'s own. '
            'FVU is compared with each model\'s separate SAE on the same held-out anchors at the same L0. Agreement: the share '
            'of shared latents whose two decoder rows are nearest (cosine ≥ ' + str(summary.get("agreement_min_cos", "")) +
            ') to the two halves of a significant SAE match; the null re-pairs them at random.</p>' + _png(fig)
            + _table(head, table, "num") + "</section>")


WEAK_PAIRS, WEAK_P_FLOOR = 16, 0.005
"""Below this many controlled pairs per layer pair, or above this p floor, the report calls the null test weak (the
defaults of TransferConfig, issue 13)."""


def _weak_null_note(transfer: list[dict], alpha: float) -> str:
    """A warning line when the controlled pairs are too few, or the controls too few, for the shares above to mean much."""
    ctrl = [r for r in transfer if _num(r["alpha"]) == alpha and r.get("control") not in (None, "", "none")
            and r["direction"] != "a_self"]
    if not ctrl:
        return ""
    per_pair = {}
    for r in ctrl:
        per_pair.setdefault((r["layer_a"], r["layer_b"]), set()).add((r["feat_a"], r["feat_b"]))
    n_pairs = min(len(v) for v in per_pair.values())
    floor = max(1 / (_num(r.get("n_controls")) + 1) for r in ctrl)
    if n_pairs >= WEAK_PAIRS and floor <= WEAK_P_FLOOR:
        return ""
    return (f"<p class=warn><b>Weak null test.</b> {n_pairs} controlled matched pair(s) per layer pair, p floor "
            f"{floor:.3g}: the shares above are anecdotes, not estimates, and a pair at the floor can fall short of "
            f"BH q &lt; 0.05 however well it agrees. A claim needs ≥ {WEAK_PAIRS} pairs and a p floor ≤ {WEAK_P_FLOOR} "
            "(the defaults: transfer.n_features 16, n_random_controls 199); the paired comparisons below do not use the "
            "controls and rest on every tested pair.</p>")


def _transfer_section(transfer: list[dict], stitching: list[dict], patching: list[dict], examples: list[dict],
                      q: float, paired: list[dict] | None = None, sae_transfer: list[dict] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not transfer and not stitching:
        return ""
    out = ('<section id="transfer"><h2>Causal transfer</h2><p>A matched feature\'s direction is added to B\'s residual '
           "stream (α in units of the feature's typical activation) and A's own direction to A's. <b>Agreement</b>: Spearman "
           "correlation, over the vocabulary strings both tokenizers share, of how much each string's log-probability "
           "changes in A and in B. Three nulls, each of the candidate's norm in B: <i>specificity</i> (other A features of "
           "similar firing rate sent through the same map), <i>on_manifold</i> (Gaussian directions with B's residual "
           "covariance, massive rows masked), <i>isotropic</i> (uniform random directions). p = (1 + #controls agreeing at "
           "least as well) / (n + 1), so its floor is 1/(n + 1); Benjamini–Hochberg within each named family (direction × "
           "null × α). <b>KL</b> and <b>|Δ log p|</b> (mean over positions and shared strings) are the effect sizes: a "
           "direction that agrees by doing nothing shows a tiny KL. Comparisons between directions are tested by a paired "
           "Wilcoxon signed-rank test across the same feature pairs, not by comparing significance counts.</p>")
    kinds = [k for k in ("b_mapped", "b_matched", "b_unmatched") if any(r["direction"] == k for r in transfer)]
    if kinds:
        alpha = max(_num(r["alpha"]) for r in transfer)
        trows = []
        for (la, lb) in sorted({(r["layer_a"], r["layer_b"]) for r in transfer}, key=lambda t: (_num(t[0]), _num(t[1]))):
            for k in kinds:
                for ctrl in ("specificity", "on_manifold", "isotropic"):
                    sel = [r for r in transfer if r["direction"] == k and _num(r["alpha"]) == alpha and r.get("control") == ctrl
                           and (r["layer_a"], r["layer_b"]) == (la, lb)]
                    if not sel:
                        continue
                    n_sig = sum(1 for r in sel if _num(r.get("q_value")) < q)
                    n_c = int(max(_num(r.get("n_controls")) for r in sel))
                    trows.append([f"A{la}↔B{lb}", k, ctrl, f"{n_sig}/{len(sel)}", f"{1 / (n_c + 1):.3g}",
                                  _f(float(np.nanmedian([_num(r["agreement"]) for r in sel]))),
                                  f'{float(np.nanmedian([_num(r["kl"]) for r in sel])):.3g}',
                                  f'{float(np.nanmedian([_num(r.get("abs_dlogp")) for r in sel])):.3g}'])
        if trows:
            out += (f"<p>Share of matched pairs beating each null at α = {alpha:g} (BH q &lt; {q}):</p>"
                    + _table(["layers", "direction", "null", "pairs beating it", "p floor", "median agreement",
                              "median KL", "median |Δ log p|"], trows, "num"))
            out += _weak_null_note(transfer, alpha)
        prow = [[f"A{r['layer_a']}↔B{r['layer_b']}", f"{r['x']} vs {r['y']}", str(r["n_pairs"]), _f(r["median_diff"]),
                 _f(r["rank_biserial"]), _f(r["p_value"]), _f(r.get("q_value"))]
                for r in (paired or []) if _num(r["alpha"]) == alpha]
        if prow:
            out += ("<p>Paired comparisons of agreement (Wilcoxon signed-rank across feature pairs, two-sided; BH per α):</p>"
                    + _table(["layers", "comparison", "pairs", "median difference", "rank-biserial", "p", "q"], prow, "num"))
        fig, ax = plt.subplots(figsize=(6.5, 3))
        for i, k in enumerate(kinds):
            sel = [r for r in transfer if r["direction"] == k and math.isfinite(_num(r["agreement"]))]
            ag = [_num(r["agreement"]) for r in sel]
            lo = [_num(r["control_mean"]) + 1.645 * _num(r["control_sd"]) for r in sel]
            xs = [i + (j % 9 - 4) * 0.04 for j in range(len(ag))]
            ax.scatter(xs, ag, s=14, label="matched pair" if i == 0 else None, color="#4477aa")
            ax.scatter(xs, lo, s=10, marker="_", color="#cc3311", label="controls: mean + 1.645 sd" if i == 0 else None)
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set(ylabel="agreement with A (Spearman)")
        ax.legend(fontsize=7)
        out += _png(fig)
    if examples:
        rows = [[f"A{e['layer_a']}:{e['feat_a']} ↔ B{e['layer_b']}:{e['feat_b']}",
                 html.escape(" · ".join(repr(x)[1:-1] for x in e.get("promoted_a", [])[:8])),
                 html.escape(" · ".join(repr(x)[1:-1] for x in e.get("promoted_b_mapped", [])[:8])),
                 html.escape(" · ".join(repr(x)[1:-1] for x in e.get("promoted_b_matched", [])[:8]))] for e in examples]
        out += ("<h3>Top promoted strings</h3>" +
                _table(["pair", "injected in A", "A's direction mapped into B", "B's matched feature"], rows, "promoted"))
    if transfer:
        cols = ["layer_a", "layer_b", "feat_a", "feat_b", "alpha", "direction", "control", "n_controls", "kl", "abs_dlogp",
                "agreement", "top_overlap", "control_mean", "control_z", "p_value", "q_value"]
        rows = [[html.escape(str(r.get(c, ""))) if not _is_float(r.get(c)) else _f(r.get(c)) for c in cols] for r in transfer[:400]]
        out += f"<details><summary>transfer.csv ({len(transfer)} rows)</summary>{_table(cols, rows, 'num sortable')}</details>"
    if stitching:
        cols = ["layer_a", "layer_b", "map", "control", "loss", "frac_recovered", "ci_low", "ci_high", "frac_recovered_zero",
                "n_patched"]
        rows = [[html.escape(str(r.get(c, ""))) if not _is_float(r.get(c)) else _f(r.get(c)) for c in cols] for r in stitching]
        out += ("<h3>Stitching: A's residual, mapped, in place of B's</h3><p>B's next-token loss when its residual at every "
                "anchor-paired position is replaced by A's mapped residual; loss recovered is 0 at mean ablation, 1 at "
                "clean (95% CI: bootstrap over passages). <i>shuffled</i>: the same map fed A's states from other positions and "
                "passages, for every map.</p>" + _table(cols, rows, "num"))
    if patching:
        cols = ["layer_a", "layer_b", "feat_a", "feat_b", "kl_patch", "kl_ablate", "kl_random_mean", "n_controls", "p_value",
                "q_value"]
        rows = [[html.escape(str(r.get(c, ""))) if not _is_float(r.get(c)) else _f(r.get(c)) for c in cols] for r in patching]
        out += ("<h3>Feature patching</h3><p>B's matched feature set to A's feature activation at paired positions (SAE "
                "error term kept). Small KL = A's feature carries what B's feature says; compared with patching random "
                "live B features the same way and with ablating the feature.</p>" + _table(cols, rows, "num"))
    if sae_transfer:
        cols = ["layer_a", "layer_b", "sae", "map", "fvu", "ce_recovered", "kl_recovered", "kl", "err_top_pc_share",
                "random_top_pc_share"]
        rows = [[html.escape(str(r.get(c, ""))) if not _is_float(r.get(c)) else _f(r.get(c), 4) for c in cols]
                for r in sae_transfer]
        out += ("<h3>A's SAE carried into B</h3><p>B's residual is taken to A's space by the map's pseudo-inverse, encoded "
                "and decoded by A's SAE, and mapped back (no encoder refit). FVU on B's held-out residuals; CE and KL "
                "recovered with the reconstruction spliced in at every content position (zero ablation 0, clean 1). "
                "Rows: B's own SAE; B's own SAE's error replaced by a random error of the same per-token norm (Gurnee "
                "2024); A's SAE through each map; the same through a random orthogonal map (floor). err_top_pc_share: "
                "the share of the error's energy in B's top-8 principal directions, next to a random error's "
                "(random_top_pc_share): an SAE whose error avoids the high-variance directions hurts the loss less than "
                "a random error of the same norm.</p>" + _table(cols, rows, "num"))
    return out + "</section>"


def _is_float(v) -> bool:
    try:
        float(v)
        return not str(v).isdigit()
    except (TypeError, ValueError):
        return False


def _promoted(report_dir: Path) -> dict:
    """`"la:fa:fb" -> {"a": [...], "b": [...]}` top promoted strings, from transfer_examples.json when present."""
    path = report_dir / "transfer_examples.json"
    if not path.is_file():
        return {}
    data = read_json(path, "transfer examples")
    items = data if isinstance(data, list) else data.get("examples", [])
    out = {}
    for e in items:
        key = f"{e.get('layer_a')}:{e.get('feat_a')}:{e.get('feat_b')}"
        out[key] = {"a": e.get("promoted_a", e.get("top_a", [])), "b": e.get("promoted_b", e.get("top_b", []))}
    return out


# --- page ---------------------------------------------------------------------------------------


def write_report(cfg: RunConfig, per_pair: int = 60) -> Path:
    """Write `report/index.html` from the run's files; returns its path."""
    from .browser import browser_data

    rd = cfg.report_dir
    manifest = read_json(cfg.cache_dir / "manifest.json", "activation cache manifest")
    metrics, align, matches = _csv(rd / "metrics.csv"), _csv(rd / "alignment.csv"), _csv(rd / "feature_matches.csv")
    transfer, stitching, patching = _csv(rd / "transfer.csv"), _csv(rd / "stitching.csv"), _csv(rd / "feature_patching.csv")
    examples = read_json(rd / "transfer_examples.json", "transfer examples").get("examples", []) \
        if (rd / "transfer_examples.json").is_file() else []
    browser = browser_data(cfg, per_pair)
    promoted = _promoted(rd)
    for b in browser:
        b["promoted"] = promoted.get(f"{b['layer_a']}:{b['feat_a']}:{b['feat_b']}", {})
    body = (
        _summary(cfg, manifest, metrics, align, matches, stitching)
        + _universality_section(cfg, metrics)
        + _layer_section(cfg, _csv(rd / "layer_cka.csv"), manifest)
        + _metric_plots(cfg, metrics)
        + _sae_section(cfg, _csv(rd / "sae_metrics.csv"))
        + _match_section(cfg, matches, _csv(rd / "feature_matches_seed.csv"))
        + _crosscoder_section(cfg)
        + _transfer_section(transfer, stitching, patching, examples, cfg.align.q_threshold, _csv(rd / "transfer_paired.csv"),
                            _csv(rd / "sae_transfer.csv"))
        + _browser_section(browser)
        + _how_to_read(cfg, metrics)
    )
    names = f"{html.escape(cfg.model_a.name)} ↔ {html.escape(cfg.model_b.name)}"
    page = (_PAGE.replace("{{title}}", f"crossdict: {names}").replace("{{run}}", html.escape(cfg.run_name))
            .replace("{{version}}", __version__).replace("{{body}}", body)
            .replace("{{data}}", json.dumps(browser, separators=(",", ":")).replace("</", "<\\/")))
    path = rd / "index.html"
    atomic_write_text(path, page)
    print(f"[crossdict] report: {path} ({len(page) / 1e6:.1f} MB, {len(browser)} feature pairs in the browser)")
    return path


def _browser_section(browser: list[dict]) -> str:
    if not browser:
        return ('<section id="browser"><h2>Feature browser</h2><p>No significant matches to browse '
                '(feature_matches.csv missing or empty).</p></section>')
    return """<section id="browser"><h2>Feature browser</h2>
<p>Matched feature pairs (q &lt; 0.05), best correlation first. Type to filter (layer, feature id, promoted string);
click a column to sort; click a row to see where both features fire in the same held-out text:
<span class="hl-a">A's activation</span> and <span class="hl-b">B's activation</span> on exactly the characters both models read.</p>
<input id="filter" placeholder="filter: e.g. 8-5, 1234, ' the'">
<div class="browser"><div class="list"><table id="pairs" class="sortable num"><thead><tr>
<th data-k="pair">layers</th><th data-k="feat_a">feat A</th><th data-k="feat_b">feat B</th><th data-k="act_corr">corr</th>
<th data-k="dec_cos">dec cos</th><th data-k="stability">stability</th><th data-k="q_value">q</th></tr></thead><tbody></tbody></table></div>
<div id="detail"><p class=note>Choose a pair.</p></div></div></section>"""


def _how_to_read(cfg: RunConfig, metrics: list[dict]) -> str:
    """The reading guide, with this run's verdicts: which headline metrics beat their floor at every pair, at none."""
    head = headline_rows(metrics)
    q = cfg.align.q_threshold
    pairs = [(str(a), str(b)) for a, b in cfg.layer_pairs]
    verdict = ""
    if head:
        per = {m: [beats_floor(head[(la, lb, m)], q) for la, lb in pairs if (la, lb, m) in head] for m, _ in HEADLINE}
        always = [_LABEL[m] for m, v in per.items() if v and all(x is True for x in v)]
        never = [_LABEL[m] for m, v in per.items() if v and all(x is False for x in v)]
        mixed = [_LABEL[m] for m, v in per.items() if v and _LABEL[m] not in always + never]
        verdict = "<li><b>In this run</b>: " + "; ".join(filter(None, [
            f"beat their strongest floor at every layer pair: {_and(always)}" if always else "",
            f"at no layer pair: {_and(never)} (at most they clear the shuffled null and the random weights: no "
            "evidence of a shared learned representation)" if never else "",
            f"at some pairs: {_and(mixed)} (see each pair's sentence in the summary)" if mixed else ""])) + ".</li>"
    return f"""<section id="howto"><h2>How to read this report</h2><ul>
<li><b>Anchor pairs</b>: token i of A and token j of B are paired when both end at the same character, so both models have read exactly the same text.</li>
<li><b>Held-out</b>: every map and match is fitted on train passages; every number here is scored on held-out passages.</li>
<li><b>Masked raw space is the headline</b>: numbers are computed on raw residuals with massive activations and the attention sink of a model without BOS left out (the cache row mask, counted per pair in the summary). Per-dimension z-scoring ("resid_z", ":z") depends on each model's arbitrary basis (a rotated copy of the same model scores well below 1 there), so it is a labelled variant in the detail tables, never a headline.</li>
<li><b>Floor ▸ value ▸ ceiling</b>: two models that read the same text share a lot for that reason alone. The token floor (B replaced by its token id) and the context floor (token + previous token) measure what the input gives; the random-weights floor what an untrained B gives; the ceiling is what two SAE seeds of the same model reach (feature metrics) or 1 (residual metrics). A number means "shared learned representation" only where it beats its strongest floor in the paired test; its universality says how far it goes from that floor to the ceiling (0: nothing beyond the input, 1: as similar as the model is to itself).</li>
<li><b>The shuffled-passage null and the random-weights floor are weak</b>: they destroy "both models read the same token", so clearing them shows shared input, not shared features. A result that beats only them is reported as not surviving.</li>
<li><b>Significant matches</b> are counted among A's features that fire in enough held-out passages and tokens, and must beat the token-stratified null as well as the shuffled one; the same count with B's SAE replaced by a token-identity code is their floor.</li>
<li><b>Feature pairs</b>: correlation is over held-out paired tokens; decoder cosine compares directions after the Procrustes map; stability is the share of passage-bootstrap resamples in which the same match recurs.</li>
{verdict}</ul></section>"""


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;max-width:1400px;padding:0 20px 60px;color:#222}
h1{font-size:22px;margin:18px 0 4px} h2{border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:30px} h3{font-size:15px}
nav a{margin-right:12px} .ok{color:#1a7a1a;font-size:12px} .bad{color:#b02020} .fvc{font-size:13px} table.headline td{vertical-align:top;min-width:300px}\np.lead{margin:6px 0 10px;max-width:1250px} .note,.null{color:#666;font-size:12px} code{background:#f4f4f4;padding:0 3px}
table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 7px;text-align:left} th{background:#f6f6f6}
table.num td{font-variant-numeric:tabular-nums} img{max-width:100%}
.heat{display:inline-block;vertical-align:top;margin-right:24px} .heatmap td{width:34px;text-align:center;font-size:11px;padding:2px}
.heatmap td.pair{outline:2px solid #000} .heatmap .best{font-weight:bold}
.browser{display:flex;gap:16px;align-items:flex-start} .list{max-height:640px;overflow:auto;flex:0 0 480px}
#pairs tbody tr{cursor:pointer} #pairs tbody tr:hover{background:#eef} #pairs tr.sel{background:#dde}
#detail{flex:1;min-width:0} .cols{display:flex;gap:16px} .col{flex:1;min-width:0}
.ctx{font:12px/1.5 ui-monospace,monospace;white-space:pre-wrap;word-break:break-word;border:1px solid #eee;padding:4px;margin:4px 0}
.ctx .peak{outline:1px solid #000} .hl-a{background:rgba(230,120,20,.5)} .hl-b{background:rgba(40,100,220,.45)}
.lab{font-size:11px;color:#555} .who{float:left;font:bold 10px system-ui;color:#fff;background:#888;padding:0 4px;margin-right:6px} input#filter{width:420px;padding:4px;margin:6px 0} th[data-k]{cursor:pointer}
ul.prom{font:12px ui-monospace,monospace;columns:2;margin:4px 0}
</style></head><body>
<h1>{{title}}</h1><div class=note>run <code>{{run}}</code> · crossdict {{version}} · self-contained report (no network)</div>
<nav><a href="#summary">summary</a><a href="#universality">floors/ceilings</a><a href="#layers">layers</a><a href="#metrics">metrics</a><a href="#saes">SAEs</a>
<a href="#matches">matches</a><a href="#transfer">transfer</a><a href="#browser">feature browser</a><a href="#howto">how to read</a></nav>
{{body}}
<script id="browser-data" type="application/json">{{data}}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("browser-data").textContent);
const esc = s => s.replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\\"":"&quot;"}[c]));
function highlight(text, spans, cls, peak, max) {
  // spans: [[start, end, act]] relative to the text; opacity by activation / max
  const marks = new Array(text.length).fill(0);
  for (const [s, e, v] of spans) for (let i = s; i < e && i < text.length; i++) marks[i] = Math.max(marks[i], v);
  let out = "", i = 0;
  while (i < text.length) {
    let j = i; while (j < text.length && marks[j] === marks[i] && (i >= peak[0] && i < peak[1]) === (j >= peak[0] && j < peak[1])) j++;
    const seg = esc(text.slice(i, j)), v = marks[i], pk = i >= peak[0] && i < peak[1] ? " peak" : "";
    if (v > 0) { const a = Math.min(1, 0.15 + 0.85 * v / (max || 1)).toFixed(2);
      out += `<span class="${cls}${pk}" style="opacity:1;background-color:${cls === "hl-a" ? "rgba(230,120,20," : "rgba(40,100,220,"}${a})" title="${v}">${seg}</span>`; }
    else out += pk ? `<span class="peak">${seg}</span>` : seg;
    i = j;
  }
  return out;
}
function hist(h, color) {
  const w = 220, hh = 60, n = h.counts.length, m = Math.max(1, ...h.counts);
  let bars = "";
  h.counts.forEach((c, i) => { const bh = hh * c / m; bars += `<rect x="${i * w / n}" y="${hh - bh}" width="${w / n - 1}" height="${bh}" fill="${color}"><title>${h.edges[i]}–${h.edges[i + 1]}: ${c}</title></rect>`; });
  return `<svg class="hist" width="${w}" height="${hh + 14}">${bars}<text x="0" y="${hh + 12}" font-size="10">${h.edges[0]}</text><text x="${w}" y="${hh + 12}" font-size="10" text-anchor="end">${h.edges[h.edges.length - 1]}</text></svg><div class="lab">active on ${(100 * h.freq).toFixed(2)}% of held-out tokens</div>`;
}
function contexts(list, maxA, maxB) {
  if (!list.length) return "<p class=note>never active on held-out text</p>";
  return list.map(c => `<div class="context"><div class="lab">passage ${c.passage}, peak ${c.max}</div>
    <div class="ctx ctx-a"><span class="who">A</span>${highlight(c.text, c.a, "hl-a", c.peak, maxA)}</div>
    <div class="ctx ctx-b"><span class="who">B</span>${highlight(c.text, c.b, "hl-b", c.peak, maxB)}</div></div>`).join("");
}
function promoted(list) {
  if (!list || !list.length) return "<p class=note>no transfer run for this pair</p>";
  return "<ul class=prom>" + list.slice(0, 12).map(p => `<li>${esc(JSON.stringify(Array.isArray(p) ? p[0] : (p.token ?? p)))}${Array.isArray(p) ? " " + Number(p[1]).toFixed(2) : ""}</li>`).join("") + "</ul>";
}
function show(d, tr) {
  document.querySelectorAll("#pairs tr.sel").forEach(r => r.classList.remove("sel")); tr.classList.add("sel");
  const maxA = Math.max(1e-6, ...d.contexts_a.map(c => c.max)), maxB = Math.max(1e-6, ...d.contexts_b.map(c => c.max));
  document.getElementById("detail").innerHTML = `<h3>A${d.layer_a}:${d.feat_a} ↔ B${d.layer_b}:${d.feat_b}</h3>
    <div class="lab">activation correlation ${d.act_corr} · decoder cosine (mapped) ${d.dec_cos} · q ${d.q_value} · stability ${d.stability}</div>
    <div class="cols"><div class="col" id="detail-a"><h4>A's feature ${d.feat_a} (layer ${d.layer_a})</h4>${hist(d.hist_a, "rgb(230,120,20)")}
      <div class="lab">top held-out contexts of A's feature; first line A, second line B on the same text</div>${contexts(d.contexts_a, maxA, maxB)}
      <h4>promoted when injected in A</h4>${promoted(d.promoted && d.promoted.a)}</div>
    <div class="col" id="detail-b"><h4>B's feature ${d.feat_b} (layer ${d.layer_b})</h4>${hist(d.hist_b, "rgb(40,100,220)")}
      <div class="lab">top held-out contexts of B's feature; first line A, second line B on the same text</div>${contexts(d.contexts_b, maxA, maxB)}
      <h4>promoted when injected in B</h4>${promoted(d.promoted && d.promoted.b)}</div></div>`;
}
let rows = DATA.map((d, i) => ({...d, pair: `${d.layer_a}-${d.layer_b}`, i}));
function render() {
  const f = document.getElementById("filter").value.trim().toLowerCase();
  const tb = document.querySelector("#pairs tbody"); tb.innerHTML = "";
  for (const d of rows) {
    const hay = `${d.pair} ${d.feat_a} ${d.feat_b} ${JSON.stringify(d.promoted || {})}`.toLowerCase();
    if (f && !hay.includes(f)) continue;
    const tr = document.createElement("tr"); tr.dataset.i = d.i;
    tr.innerHTML = `<td>A${d.layer_a}↔B${d.layer_b}</td><td>${d.json_a ? `<a class="json" href="${d.json_a}">${d.feat_a}</a>` : d.feat_a}</td><td>${d.json_b ? `<a class="json" href="${d.json_b}">${d.feat_b}</a>` : d.feat_b}</td><td>${d.act_corr.toFixed(3)}</td><td>${d.dec_cos.toFixed(3)}</td><td>${d.stability.toFixed(2)}</td><td>${d.q_value.toExponential(1)}</td>`;
    tr.onclick = () => show(DATA[d.i], tr); tb.appendChild(tr);
  }
}
if (document.getElementById("pairs")) {
  document.getElementById("filter").oninput = render;
  document.querySelectorAll("#pairs th[data-k]").forEach(th => th.onclick = () => {
    const k = th.dataset.k, dir = th.dataset.dir === "asc" ? -1 : 1; th.dataset.dir = dir === 1 ? "asc" : "desc";
    rows.sort((x, y) => (x[k] > y[k] ? 1 : x[k] < y[k] ? -1 : 0) * dir); render(); });
  render();
}
document.querySelectorAll("table.sortable:not(#pairs)").forEach(tbl => tbl.querySelectorAll("th").forEach((th, col) => th.onclick = () => {
  const tb = tbl.tBodies[0], rs = [...tb.rows], dir = th.dataset.dir === "asc" ? -1 : 1; th.dataset.dir = dir === 1 ? "asc" : "desc";
  const key = r => { const t = r.cells[col].textContent, n = parseFloat(t); return isNaN(n) ? t : n; };
  rs.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * dir); rs.forEach(r => tb.appendChild(r)); }));
</script></body></html>
"""
