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

import numpy as np

from . import __version__
from .config import RunConfig
from .utils import atomic_write_text, read_json

HEADLINE_METRICS = ("linear_cka", "svcca", "pwcca", "rsa", "mutual_knn", "debiased_cka")


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


def _summary(cfg: RunConfig, manifest: dict, metrics: list[dict], align: list[dict], matches: list[dict],
             stitching: list[dict]) -> str:
    c = manifest.get("counts", {})
    models = "".join(
        f"<li><b>{k.upper()}</b>: {html.escape(m['name'])} ({m.get('n_layers', '?')} blocks, d={m.get('d_model', '?')}), "
        f"layers {m.get('layers')}</li>" for k, m in manifest.get("models", {}).items())
    data = (f"{c.get('n_passages', '?')} passages ({c.get('n_heldout_passages', '?')} held out) of "
            f"<code>{html.escape(cfg.corpus.source)}</code>; {c.get('n_tokens_a', '?')} tokens A, {c.get('n_tokens_b', '?')} tokens B, "
            f"{c.get('n_pairs', '?')} anchor pairs (pairing rate {_f(c.get('pairing_rate'))})")
    get = {(r["layer_a"], r["layer_b"], r["space"], r["metric"]): r for r in metrics}
    al = {(r["layer_a"], r["layer_b"], r["method"]): r for r in align}
    rows = []
    for la, lb in cfg.layer_pairs:
        la, lb = str(la), str(lb)
        p = al.get((la, lb, "procrustes:z"), al.get((la, lb, "procrustes"), {}))
        cka = get.get((la, lb, "resid_z", "linear_cka"), {})
        floor = get.get((la, lb, "resid_z_random_b", "linear_cka"), {})
        svcca = get.get((la, lb, "resid_z", "svcca"), {})
        topk = get.get((la, lb, "sae", "topk_overlap"), {})
        n_sig = sum(1 for m in matches if m["layer_a"] == la and m["layer_b"] == lb and m["method"] == "hungarian"
                    and _num(m["q_value"]) < cfg.align.q_threshold)
        st = [s for s in stitching if str(s.get("layer_a")) == la and str(s.get("layer_b")) == lb
              and s.get("map") == "procrustes" and s.get("control", "") in ("", "none")]
        rows.append([
            f"A{la} ↔ B{lb}",
            f"{_f(p.get('r2'))} [{_f(p.get('r2_ci_low'))}, {_f(p.get('r2_ci_high'))}] <span class=null>null {_f(p.get('r2_null_mean'))}</span>",
            f"{_f(p.get('top1'))} <span class=null>chance {_f(p.get('chance_top1'), 4)}</span>",
            f"{_f(cka.get('value'))} [{_f(cka.get('ci_low'))}, {_f(cka.get('ci_high'))}] <span class=null>null {_f(cka.get('null_mean'))}; "
            f"random-B floor {_f(floor.get('value'))}</span>",
            f"{_f(svcca.get('value'))} [{_f(svcca.get('ci_low'))}, {_f(svcca.get('ci_high'))}] <span class=null>null {_f(svcca.get('null_mean'))}</span>",
            f"{n_sig}",
            f"{_f(topk.get('value'))} <span class=null>null {_f(topk.get('null_mean'))}</span>",
            _f(st[0].get("frac_recovered")) if st and "frac_recovered" in st[0] else "–",
        ])
    table = _table(["layers", "Procrustes R² (held-out, z-scored)", "retrieval top-1", "linear CKA (z-scored)", "SVCCA (z-scored)",
                    f"matched features (q < {cfg.align.q_threshold})", "top-k overlap", "stitching loss recovered"], rows, "num")
    return (f'<section id="summary"><h2>Summary</h2><ul>{models}<li>{data}</li></ul>{table}'
            '<p class=note>Brackets: 95% CI from resampling held-out passages. Null: the same statistic with passages '
            'shuffled between the models. Floor: A against a randomly initialised B of the same architecture.</p></section>')


_UNIV_LABELS = {"linear_cka": "linear CKA", "svcca": "SVCCA", "procrustes_r2": "Procrustes R²",
                "retrieval_top1": "retrieval top-1", "topk_overlap": "top-k overlap (SAE)",
                "significant_share": "significant matches (share of tested A features)"}  # fmt: skip


def floor_value_ceiling(r: dict) -> str:
    """One headline cell: strongest input-sharing floor ▸ value ▸ ceiling, universality [CI] below."""
    floor = max((_num(r.get(f"floor_{k}")) for k in ("token", "context", "random")), default=math.nan,
                key=lambda v: v if math.isfinite(v) else -math.inf)  # fmt: skip
    u = (f"<br><span class=null>universality {_f(r.get('universality'), 2)} "
         f"[{_f(r.get('universality_ci_low'), 2)}, {_f(r.get('universality_ci_high'), 2)}]</span>")
    return (f"<span class=null>{_f(floor)} ({html.escape(str(r.get('floor_used', '')) or '–')})</span> ▸ "
            f"<b>{_f(r.get('value'))}</b> ▸ <span class=null>{_f(r.get('ceiling'))} ({html.escape(str(r.get('ceiling_kind', '')) or '–')})</span>{u}")


def _universality_section(cfg: RunConfig, metrics: list[dict]) -> str:
    """Floors, values and ceilings per layer pair (space `universality` in metrics.csv, see `baselines`)."""
    rows = [r for r in metrics if r.get("space") == "universality"]
    if not rows:
        return ""
    get = {(r["layer_a"], r["layer_b"], r["metric"]): r for r in rows}
    sentences, table = [], []
    for la, lb in cfg.layer_pairs:
        la, lb = str(la), str(lb)
        cells = [get.get((la, lb, m)) for m in _UNIV_LABELS]
        if not any(cells):
            continue
        head = get.get((la, lb, "topk_overlap")) or get.get((la, lb, "linear_cka"))
        if head is not None and math.isfinite(_num(head.get("universality"))):
            which = "top-k overlap of SAE features" if head["metric"] == "topk_overlap" else "linear CKA"
            sentences.append(
                f"<li><b>A{la} ↔ B{lb}</b>: universality {_f(head['universality'], 2)} "
                f"[{_f(head['universality_ci_low'], 2)}, {_f(head['universality_ci_high'], 2)}] by {which}, i.e. the "
                f"cross-model value sits that far from its {html.escape(head.get('floor_used', ''))} floor towards its "
                f"{html.escape(head.get('ceiling_kind', ''))} ceiling (paired test vs floor p = {_f(head.get('p_diff_floor'), 3)}).</li>")
        table.append([f"A{la} ↔ B{lb}"] + [floor_value_ceiling(c) if c else "–" for c in cells])
    return ('<section id="universality"><h2>Floors and ceilings</h2><ul>' + "".join(sentences) + "</ul>"
            + _table(["layers"] + list(_UNIV_LABELS.values()), table, "num")
            + "<p class=note>Each cell: floor ▸ value ▸ ceiling. Floor: the strongest of B replaced by its token id "
            "(token), by token + previous token (context), and a randomly initialised B (random), each through the "
            "same code path. Ceiling: 1 for an identical representation (identity), or A's and B's SAE seed 0 vs "
            "seed 1 (seed). Universality = (value − floor) / (ceiling − floor); brackets: 95% CI from the same "
            "half-samples of held-out passages for value, floor and ceiling.</p></section>")


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
    depth = []
    for la in sorted({int(r["layer_a"]) for r in rows}):
        cand = [r for r in rows if int(r["layer_a"]) == la]
        best = max(cand, key=lambda r: _num(r["cka_z"]) if math.isfinite(_num(r["cka_z"])) else -1)
        depth.append([f"A{la} ({(la + 1) / na:.2f})", f"B{best['layer_b']} ({(int(best['layer_b']) + 1) / nb:.2f})", _f(best["cka_z"])])
    src = rows[0].get("source", "")
    return ('<section id="layers"><h2>Layer correspondence</h2>'
            f'<p>Linear CKA between every layer of A (rows) and every layer of B (columns) on {rows[0].get("n_pairs", "?")} '
            f'held-out anchor pairs ({html.escape(src)}). Outlined cells are the configured pairs; bold marks each row\'s best B layer. '
            'Raw residuals are dominated by a few rogue dimensions (massive activations), so the z-scored map is the one to read.</p>'
            + _heat_table(rows, "cka_z", pairs, "z-scored dimensions") + _heat_table(rows, "cka", pairs, "raw residual stream")
            + "<h3>Does relative depth line up?</h3>"
            + _table(["A layer (relative depth)", "best B layer (relative depth)", "CKA (z)"], depth, "num") + "</section>")


def _metric_plots(cfg: RunConfig, metrics: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return ""
    get = {(r["layer_a"], r["layer_b"], r["space"], r["metric"]): r for r in metrics}
    pairs = [(str(a), str(b)) for a, b in cfg.layer_pairs]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.2), squeeze=False, sharex=True)
    for ax, (la, lb) in zip(axes[0], pairs):
        names = [m for m in HEADLINE_METRICS if (la, lb, "resid_z", m) in get]
        for i, m in enumerate(names):
            r = get[(la, lb, "resid_z", m)]
            v, lo, hi = _num(r["value"]), _num(r["ci_low"]), _num(r["ci_high"])
            ax.barh(i, v, color="#4477aa", alpha=0.8)
            if math.isfinite(lo) and math.isfinite(hi):
                ax.errorbar(v, i, xerr=[[v - lo], [hi - v]], color="k", capsize=3, lw=1)
            ax.plot(_num(r["null_mean"]), i, "x", color="#cc3311", ms=7, label="shuffled null" if i == 0 else None)
            fl = get.get((la, lb, "resid_z_random_b", m))
            if fl:
                ax.plot(_num(fl["value"]), i, "v", color="#777777", ms=6, label="random-B floor" if i == 0 else None)
            for key, layer in (("a", la), ("b", lb)):
                ce = get.get((layer, layer, f"sae_seed_{key}", m))
                if ce:
                    ax.plot(_num(ce["value"]), i, "^", color="#228833", ms=6)
        ax.set_yticks(range(len(names)), names)
        ax.set_title(f"A{la} ↔ B{lb} (z-scored residuals)", fontsize=9)
        ax.set_xlim(-0.05, 1.0)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    rows = [[f"A{r['layer_a']} ↔ B{r['layer_b']}", r["space"], r["metric"], _f(r["value"]), f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}]",
             _f(r["null_mean"]), _f(r["p_value"])] for r in metrics]
    table = _table(["layers", "space", "metric", "value", "95% CI", "null mean", "p"], rows, "num sortable")
    return ('<section id="metrics"><h2>Similarity metrics</h2><p>Bars: value with 95% CI; ×: shuffled-pairing null; ▼: '
            'A against a randomly initialised B (floor); ▲: seed-to-seed SAE ceiling where two seeds were trained.</p>'
            + _png(fig) + f"<details><summary>All metrics ({len(rows)} rows)</summary>{table}</details></section>")


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
    from .stability import STABLE_SHARE

    def shared(key: str, layer: int) -> float:
        name = cfg.model(key).name
        vals = [_num(r.get("seed_shared_dec")) for r in sae_rows if r.get("model") == name and str(r.get("layer")) == str(layer)]
        vals = [v for v in vals if not math.isnan(v)]
        return min(vals) if vals else float("nan")

    items = []
    for la, lb in cfg.layer_pairs:
        sa, sb = shared("a", la), shared("b", lb)
        tag = f"A{la} ↔ B{lb} (seed-shared A {_f(sa, 2)}, B {_f(sb, 2)})"
        if math.isnan(sa) or math.isnan(sb):
            items.append(f"<li>{tag}: seed stability not measured (one SAE seed): feature-level results have no ceiling.</li>")
        elif min(sa, sb) < STABLE_SHARE:
            items.append(f"<li class=warn><b>{tag}: SAEs not seed-stable</b> (shared &lt; {STABLE_SHARE:.0%}): the "
                         "feature-level results of this pair (matches, transfer) are not interpretable; the "
                         "representation-level metrics (CKA, Procrustes, ...) do not use the SAEs and still are.</li>")
        else:
            items.append(f"<li>{tag}: stable (shared ≥ {STABLE_SHARE:.0%}).</li>")
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
    ax.set(title="match p-values vs the shuffled null", xlabel="p-value")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=6)
    return ('<section id="matches"><h2>Feature matching</h2><p>One-to-one (Hungarian) matches of SAE latents by activation '
            'correlation over anchor-paired train tokens; each match\'s p-value comes from a null that shuffles passages '
            'between the models, then Benjamini–Hochberg q-values. Under no shared features the p-values would be uniform '
            '(dashed line).</p>' + _png(fig) + "</section>")


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
        + _HOW_TO_READ
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


_HOW_TO_READ = """<section id="howto"><h2>How to read this report</h2><ul>
<li><b>Anchor pairs</b>: token i of A and token j of B are paired when both end at the same character, so both models have read exactly the same text.</li>
<li><b>Held-out</b>: every map and match is fitted on train passages; every number here is scored on held-out passages.</li>
<li><b>CI, null, floor, ceiling</b>: a metric matters when its CI clears the shuffled-pairing null and the random-weights floor; the seed-to-seed SAE ceiling says how similar two dictionaries of the <i>same</i> model are.</li>
<li><b>Masked raw space</b>: every number is computed on raw residuals with massive activations and the attention sink of a model without BOS left out (the cache row mask); z-scored ("resid_z", ":z") numbers depend on each model's basis and are a labelled variant, not the headline.</li>
<li><b>Feature pairs</b>: correlation is over paired tokens; decoder cosine compares directions after the Procrustes map; stability is the share of passage-bootstrap resamples in which the same match recurs.</li>
</ul></section>"""


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;max-width:1400px;padding:0 20px 60px;color:#222}
h1{font-size:22px;margin:18px 0 4px} h2{border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:30px} h3{font-size:15px}
nav a{margin-right:12px} .note,.null{color:#666;font-size:12px} code{background:#f4f4f4;padding:0 3px}
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
