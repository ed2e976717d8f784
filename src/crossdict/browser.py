"""Feature-browser data: for the best matched feature pairs, where each feature fires in held-out text.

Reads the activation cache, the stored passage texts, both SAEs and `report/feature_matches.csv`;
returns plain JSON-able dicts that `report.py` embeds in the HTML. Because both models read exactly
the same characters, one text window can be highlighted with A's feature and with B's feature at
once: agreement (or disagreement) is visible token by token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import ActivationCache
from .config import RunConfig
from .matching import read_matches

WINDOW_BEFORE, WINDOW_AFTER = 160, 40
"""Characters of context shown before and after the activating token's end."""
N_CONTEXTS = 4
N_BINS = 16


MIN_FREQ = 1e-3
"""Pairs whose rarer feature fires on fewer train tokens than this come after the others: a correlation
of 1.0 between two features that each fire on one token is real but tells a reader little."""


def top_matches(path: Path, per_pair: int, q_threshold: float) -> list[dict]:
    """Hungarian matches with q < threshold, best correlation first (rare features last), at most `per_pair` per layer pair."""
    if not path.is_file():
        return []
    by_pair: dict[tuple[int, int], list[dict]] = {}
    for r in read_matches(path):
        if r["q_value"] < q_threshold:
            by_pair.setdefault((r["layer_a"], r["layer_b"]), []).append(r)
    out = []
    for rows in by_pair.values():
        rows.sort(key=lambda r: (min(r["freq_a"], r["freq_b"]) < MIN_FREQ, -r["act_corr"]))
        out += rows[:per_pair]
    return out


def _histogram(values: np.ndarray) -> dict:
    """Counts of the nonzero activations in N_BINS equal bins, and how often the feature fires."""
    active = values[values > 0]
    if len(active) == 0:
        return {"edges": [0.0, 1.0], "counts": [0], "freq": 0.0}
    counts, edges = np.histogram(active, bins=N_BINS)
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist(), "freq": round(len(active) / len(values), 5)}


def _window(text: str, end: int) -> tuple[int, int]:
    return max(0, end - WINDOW_BEFORE), min(len(text), end + WINDOW_AFTER)


def _spans(tokens: np.ndarray, values: np.ndarray, pid: int, lo: int, hi: int) -> list[list]:
    """[[start, end, activation], ...] relative to the window, for tokens of passage `pid` inside it that fire."""
    sel = (tokens[:, 0] == pid) & (tokens[:, 2] >= lo) & (tokens[:, 3] <= hi) & (values > 0)
    return [[int(t[2] - lo), int(t[3] - lo), round(float(v), 3)] for t, v in zip(tokens[sel], values[sel])]


def _contexts(lead_tokens: np.ndarray, lead_vals: np.ndarray, tokens: dict[str, np.ndarray], vals: dict[str, np.ndarray],
              texts: dict[int, str]) -> list[dict]:
    """Top activating tokens of the lead model (one per passage), each as a text window highlighted by both features."""
    order = np.argsort(-lead_vals, kind="stable")
    out, seen = [], set()
    for i in order:
        if lead_vals[i] <= 0 or len(out) >= N_CONTEXTS:
            break
        pid = int(lead_tokens[i, 0])
        if pid in seen:
            continue
        seen.add(pid)
        lo, hi = _window(texts[pid], int(lead_tokens[i, 3]))
        out.append({"passage": pid, "text": texts[pid][lo:hi], "peak": [int(lead_tokens[i, 2] - lo), int(lead_tokens[i, 3] - lo)],
                    "max": round(float(lead_vals[i]), 3),
                    "a": _spans(tokens["a"], vals["a"], pid, lo, hi), "b": _spans(tokens["b"], vals["b"], pid, lo, hi)})
    return out


def _json_links(cfg: RunConfig, la: int, lb: int, fa: int, fb: int) -> dict:
    """Links (relative to report/) to both features' `crossdict export` JSON, where it has been written."""
    from .export import feature_path, relative_link

    return {f"json_{k}": (relative_link(cfg, k, layer, f) if feature_path(cfg, "saedashboard", k, layer, f).is_file() else None)
            for k, layer, f in (("a", la, fa), ("b", lb, fb))}


def browser_data(cfg: RunConfig, per_pair: int = 60) -> list[dict]:
    """One entry per shown feature pair: match statistics, both histograms, top contexts led by A and by B."""
    from .sae import feature_activations, load_sae

    matches = top_matches(cfg.report_dir / "feature_matches.csv", per_pair, cfg.align.q_threshold)
    if not matches:
        return []
    cache = ActivationCache(cfg.cache_dir)
    texts = cache.passage_texts()
    rows = {k: cache.rows(k, "heldout") for k in ("a", "b")}
    tokens = {k: cache.tokens(k)[rows[k]] for k in ("a", "b")}
    out = []
    for la, lb in sorted({(int(m["layer_a"]), int(m["layer_b"])) for m in matches}):
        ms = [m for m in matches if int(m["layer_a"]) == la and int(m["layer_b"]) == lb]
        feats = {"a": np.array([int(m["feat_a"]) for m in ms]), "b": np.array([int(m["feat_b"]) for m in ms])}
        acts = {}
        for k, layer in (("a", la), ("b", lb)):
            sae = load_sae(cfg.sae_dir(k, layer))
            acts[k] = feature_activations(sae, cache.acts(k, layer), rows[k], feats[k])
        for j, m in enumerate(ms):
            vals = {k: acts[k][:, j] for k in ("a", "b")}
            out.append({
                "layer_a": la, "layer_b": lb, "feat_a": int(m["feat_a"]), "feat_b": int(m["feat_b"]),
                **{c: round(float(m[c]), 4) for c in ("act_corr", "dec_cos", "q_value", "stability", "freq_a", "freq_b")},
                "hist_a": _histogram(vals["a"]), "hist_b": _histogram(vals["b"]),
                "contexts_a": _contexts(tokens["a"], vals["a"], tokens, vals, texts),
                "contexts_b": _contexts(tokens["b"], vals["b"], tokens, vals, texts),
                **_json_links(cfg, la, lb, int(m["feat_a"]), int(m["feat_b"])),
            })
    return out
