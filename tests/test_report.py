"""Issue 18: the report says what the numbers mean: floor ▸ value ▸ ceiling, universality first, masked raw headline."""

from __future__ import annotations

import math
import re

import pytest

from crossdict.baselines import BASELINE_COLUMNS
from crossdict.config import config_from_dict
from crossdict.evaluate import METRIC_COLUMNS, write_csv
from crossdict.report import beats_floor, headline_rows, write_report
from crossdict.utils import atomic_write_json

# Floors, values, ceilings and universality [CI] of the embedded demo's A8 <-> B5 (report/metrics.csv, `universality`
# rows): linear CKA and retrieval do not beat their strongest floor, the other four do.
DEMO = {  # metric: (value, token, context, random, ceiling, kind, u, u_lo, u_hi, diff, p_diff)
    "linear_cka": (0.142, 0.204, 0.157, 0.049, 1.0, "identity", -0.078, -0.150, -0.011, -0.062, 1.0),
    "svcca": (0.680, 0.364, 0.311, 0.105, 1.0, "identity", 0.496, 0.466, 0.516, 0.316, 0.0196),
    "procrustes_r2": (0.232, 0.171, 0.111, -0.014, 1.0, "identity", 0.073, 0.036, 0.108, 0.060, 0.0196),
    "retrieval_top1": (0.151, 0.112, 0.196, 0.020, 1.0, "identity", -0.056, -0.076, -0.023, -0.045, 1.0),
    "topk_overlap": (0.198, 0.158, 0.139, math.nan, 0.411, "seed", 0.155, 0.136, 0.179, 0.039, 0.0196),
    "significant_share": (0.299, 0.0, 0.080, math.nan, 0.605, "seed", 0.417, 0.383, 0.458, 0.219, 0.0196),
}


def _urow(la, lb, metric, v):
    value, tok, ctx, rnd, ceil, kind, u, lo, hi, d, p = v
    floors = {"token": tok, "context": ctx, "random": rnd}
    used = max((k for k in floors if math.isfinite(floors[k])), key=floors.get)
    return {"layer_a": la, "layer_b": lb, "space": "universality", "metric": metric, "value": value, "split": "heldout",
            "floor_token": tok, "floor_context": ctx, "floor_random": rnd, "ceiling": ceil, "ceiling_kind": kind,
            "universality": u, "universality_ci_low": lo, "universality_ci_high": hi, "diff_floor": d,
            "diff_floor_ci_low": d - 0.03, "diff_floor_ci_high": d + 0.03, "p_diff_floor": p, "floor_used": used}  # fmt: skip


def _run(tmp_path, z: bool = True, universality: bool = True):
    """A finished run's files as the align stage writes them: cache manifest (with the row mask), metrics.csv,
    alignment.csv; no SAEs, no matches, no transfer."""
    cfg = config_from_dict({"run_name": "fx", "output_dir": str(tmp_path), "model_a": {"name": "toy-a", "layers": [1]},
                            "model_b": {"name": "toy-b", "layers": [2]}})  # fmt: skip
    atomic_write_json(cfg.cache_dir / "manifest.json", {
        "models": {"a": {"name": "toy-a", "n_layers": 4, "d_model": 8, "layers": [1]},
                   "b": {"name": "toy-b", "n_layers": 4, "d_model": 8, "layers": [2]}},
        "counts": {"n_passages": 100, "n_heldout_passages": 20, "n_tokens_a": 2000, "n_tokens_b": 1900, "n_pairs": 1800},
        "row_mask": {"layers": {"a": {"1": {"n_rows": 2000, "dropped": 37, "dropped_massive": 12, "dropped_sink": 25}},
                                "b": {"2": {"n_rows": 1900, "dropped": 0, "dropped_massive": 0, "dropped_sink": 0}}}}})
    rows = [_urow("1", "2", m, v) for m, v in DEMO.items()] if universality else []
    # the `resid` rows (another passage subsample): values that must not reach the headline when universality rows exist
    rows.append({"layer_a": "1", "layer_b": "2", "space": "resid", "metric": "linear_cka", "value": 0.129, "p_value": 0.0196,
                 "floor_token": 0.251, "floor_context": 0.176, "floor_random": 0.055, "ceiling": 1.0,
                 "ceiling_kind": "identity", "universality": -0.163, "floor_used": "token", "masked_a": 7, "masked_b": 0})  # fmt: skip
    rows.append({"layer_a": "1", "layer_b": "2", "space": "sae", "metric": "n_significant_hungarian", "value": 235,
                 "floor_token": 0, "floor_context": 21, "ceiling": 476, "ceiling_kind": "seed", "universality": 0.47})  # fmt: skip
    rows.append({"layer_a": "1", "layer_b": "2", "space": "sae", "metric": "n_tested_hungarian", "value": 545})
    if z:  # z-scored variant scoring far higher than the masked raw number: it must not be the headline
        rows.append({"layer_a": "1", "layer_b": "2", "space": "resid_z", "metric": "linear_cka", "value": 0.987,
                     "floor_random": 0.167, "ceiling": 1.0, "ceiling_kind": "identity", "universality": 0.98})  # fmt: skip
    write_csv(cfg.report_dir / "metrics.csv", METRIC_COLUMNS + BASELINE_COLUMNS, rows)
    with (cfg.report_dir / "alignment.csv").open("w") as f:
        f.write("layer_a,layer_b,method,n_train,n_heldout,r2,top1,n_masked\n1,2,procrustes,900,393,0.2,0.15,7\n")
    return cfg, write_report(cfg).read_text()


def _section(page: str, sid: str) -> str:
    return page.split(f'<section id="{sid}">')[1].split("</section>")[0]


def test_summary_leads_with_universality_and_names_the_metrics_below_their_floor(tmp_path):
    _, page = _run(tmp_path)
    summary = _section(page, "summary")
    lead = re.search(r"<p class=lead data-pair='1-2'>(.*?)</p>", summary).group(1)
    first = lead.split("). ")[0]
    # the first sentence is the universality estimate with its CI (the feature metric: a measured seed ceiling)
    assert first.startswith("<b>A1 ↔ B2</b>: universality 0.42 [0.38, 0.46] by significant-match share")
    assert "linear CKA -0.08 [-0.15, -0.01]" in first and "retrieval top-1 -0.06 [-0.08, -0.02]" in first
    below = re.search(r"<span class=bad>(.*?)</span>", lead).group(1)
    assert below == "Linear CKA and retrieval top-1 do not beat their strongest floor (context/token)"
    assert "Both clear only the weaker controls (shuffled passages, random weights)" in lead  # above the random floor
    assert "SVCCA, Procrustes R², top-k overlap (SAE) and significant-match share (SAE) beat their strongest floor" in lead
    assert "Row mask: 7 of 400 held-out anchor pairs left out (A 7, B 0)" in lead
    assert "A1: 37 of 2000 cached rows (12 massive, 25 attention sink)" in lead


def test_headline_cells_show_floor_value_ceiling_with_every_floor(tmp_path):
    _, page = _run(tmp_path)
    summary = _section(page, "summary")
    cells = dict(re.findall(r'<div class=fvc data-metric="(\w+)" data-floor="\w+">(.*?)</div>', summary))
    assert set(cells) == set(DEMO) | {"n_significant_hungarian"}
    for metric, (value, tok, ctx, rnd, ceil, kind, u, lo, hi, *_rest) in DEMO.items():
        floors = {"token": tok, "context": ctx, "random": rnd}
        used = max((k for k in floors if math.isfinite(floors[k])), key=floors.get)
        c = cells[metric]
        assert f"{floors[used]:.3f} ({used})</span> ▸ <b>{value:.3f}</b> ▸ <span class=null>{ceil:.3f} ({kind})" in c, metric
        assert f"floors: token {tok:.3f} · context {ctx:.3f} · random {'–' if math.isnan(rnd) else f'{rnd:.3f}'}" in c
        assert f"universality {u:.2f} [{lo:.2f}, {hi:.2f}]" in c
    assert "does not beat its floor" in cells["linear_cka"] and "beats its floor" in cells["svcca"]
    assert "21 (context)</span> ▸ <b>235</b> ▸ <span class=null>476 (seed)" in cells["n_significant_hungarian"]
    detail = _section(page, "universality")
    assert "<td>retrieval top-1</td><td><b>0.151</b></td><td>0.112</td><td>0.196</td><td>0.020</td>" in detail


def test_summary_never_headlines_the_z_scored_space(tmp_path):
    _, page = _run(tmp_path)
    summary = _section(page, "summary")
    assert "0.987" not in summary and "0.129" not in summary  # neither resid_z nor the resid row's other subsample
    assert "0.142" in summary
    assert "basis-dependent variant, not a headline" in summary  # resid_z is named only as a labelled variant
    detail = _section(page, "universality")
    assert "linear CKA, z-scored per dimension (basis-dependent variant, not a headline)</td><td><b>0.987</b>" in detail
    # without z-scored rows (align.standardized_space off) the report renders and never mentions them
    _, page = _run(tmp_path / "noz", z=False)
    assert "resid_z" not in _section(page, "summary") and "0.142" in _section(page, "summary")
    assert "z-scored per dimension" not in _section(page, "universality")


def test_run_without_universality_rows_falls_back_to_annotated_rows(tmp_path):
    _, page = _run(tmp_path, universality=False)
    summary = _section(page, "summary")
    assert "0.251 (token)</span> ▸ <b>0.129</b> ▸ <span class=null>1.000 (identity)" in summary
    assert "universality -0.16" in summary and "0.987" not in summary


def test_beats_floor_uses_the_paired_test_and_bh_over_the_headline_rows():
    rows = [_urow("1", "2", m, v) for m, v in DEMO.items()]
    head = headline_rows([{k: str(v) for k, v in r.items()} for r in rows])
    q = {m: head[("1", "2", m)]["q_diff_floor"] for m in DEMO}
    assert q["svcca"] == pytest.approx(0.0196 * 6 / 4) and q["linear_cka"] == pytest.approx(1.0)
    assert [beats_floor(head[("1", "2", m)]) for m in DEMO] == [False, True, True, False, True, True]
    assert beats_floor({"diff_floor": "0.2", "p_diff_floor": "0.04", "q_diff_floor": "0.06"}) is False  # q, not p
    assert beats_floor({"diff_floor": "nan", "p_diff_floor": "nan"}) is None


def test_metrics_csv_carries_the_bh_q_of_the_floor_test_and_the_report_reads_it():
    from crossdict.baselines import annotate

    rows = [_urow("1", "2", m, v) for m, v in DEMO.items()]
    rows.append({"layer_a": "1", "layer_b": "2", "space": "resid", "metric": "svcca", "value": 0.68})
    out = {(r["space"], r["metric"]): r for r in annotate(rows)}
    assert "q_diff_floor" in BASELINE_COLUMNS
    assert out[("universality", "svcca")]["q_diff_floor"] == pytest.approx(0.0196 * 6 / 4)
    assert out[("universality", "linear_cka")]["q_diff_floor"] == pytest.approx(1.0)
    assert out[("resid", "svcca")]["q_diff_floor"] == pytest.approx(0.0196 * 6 / 4)  # copied to its headline row
    stored = [{**r, "q_diff_floor": 0.5} for r in rows[:6]]  # the report uses the stored q, not its own
    assert headline_rows(stored)[("1", "2", "svcca")]["q_diff_floor"] == 0.5 and not beats_floor(stored[1])


def test_transfer_section_calls_a_null_test_weak_below_16_controlled_pairs_or_above_a_p_floor_of_0005():
    """Issue 13: the demo's budget (one controlled pair per layer pair, 39 controls) is said to be weak in the report,
    the defaults' (16 pairs, 199 controls) is not; pairs without controls (control 'none') do not count."""
    from crossdict.report import _weak_null_note

    def rows(n_pairs: int, n_controls: int, bare: int = 0) -> list[dict]:
        out = []
        for la, lb in (("8", "5"), ("15", "9")):
            for f in range(n_pairs + bare):
                ctrl = ("specificity", "isotropic") if f < n_pairs else ("none",)
                for c in ctrl:
                    out.append({"layer_a": la, "layer_b": lb, "feat_a": str(f), "feat_b": str(f + 100), "alpha": "2",
                                "direction": "b_mapped", "control": c, "n_controls": "" if c == "none" else str(n_controls)})
        return out

    weak = _weak_null_note(rows(1, 39, bare=7), 2.0)
    assert "Weak null test" in weak and "1 controlled" in weak and "0.025" in weak
    assert "Weak null test" in _weak_null_note(rows(16, 39), 2.0)
    assert "Weak null test" in _weak_null_note(rows(8, 199, bare=8), 2.0)  # bare pairs are not controlled pairs
    assert _weak_null_note(rows(16, 199), 2.0) == ""
    assert _weak_null_note(rows(0, 199, bare=4), 2.0) == ""  # nothing controlled: no share to qualify
