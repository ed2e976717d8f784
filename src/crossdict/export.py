"""Dashboards out: per-feature JSON in SAEDashboard's Neuronpedia layout, and Neuronpedia batch files.

Field names follow SAEDashboard (jbloomAus/SAEDashboard), `sae_dashboard/neuronpedia/neuronpedia_feature.py`:
`NeuronpediaDashboardFeature.to_dict` (one feature) and `NeuronpediaDashboardBatch.to_dict`
(`{model_id, layer, sae_set, features, settings}`, the batch Neuronpedia imports), with the values
filled as `neuronpedia_converter.py` fills them: `pos_str`/`pos_values` and `neg_str`/`neg_values` are the
top and bottom logits of the decoder direction times the unembedding, `freq_hist_data_bar_values` /
`_heights` the bin centres / counts of the nonzero activations, `activations` the top-activating
windows as `{bin_min: -1, bin_max: <max>, bin_contains: -1, tokens, values}` ("TOP ACTIVATIONS" group).

New, under the key `crossdict_matches`: the matched feature(s) in the other model, with activation
correlation, decoder cosine (after the map) and q-value, so a feature opened in a dashboard says
where its counterpart lives.

    report/export/saedashboard/<model>/<hook>/<feature>.json       --format saedashboard
    report/export/neuronpedia/<model>/<hook>/batch-0.json          --format neuronpedia
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import ActivationCache, hook_name
from .config import RunConfig
from .matching import read_matches
from .utils import atomic_write_json

FORMATS = ("saedashboard", "neuronpedia")
N_LOGITS, N_EXAMPLES, N_BINS, N_NEURONS = 10, 8, 40, 3
WINDOW_BEFORE, WINDOW_AFTER = 24, 4
"""Tokens of context kept before and after each top activation."""


def export_dir(cfg: RunConfig, fmt: str) -> Path:
    return cfg.report_dir / "export" / fmt


def feature_path(cfg: RunConfig, fmt: str, key: str, layer: int, feat: int) -> Path:
    """Where the JSON of one feature (saedashboard) or one SAE's batch (neuronpedia) goes."""
    d = export_dir(cfg, fmt) / cfg.model_slug(key) / hook_name(layer)
    return d / (f"{feat}.json" if fmt == "saedashboard" else "batch-0.json")


def relative_link(cfg: RunConfig, key: str, layer: int, feat: int) -> str:
    """Link from `report/index.html` to a feature's SAEDashboard JSON."""
    return feature_path(cfg, "saedashboard", key, layer, feat).relative_to(cfg.report_dir).as_posix()


def parse_feature(spec: str) -> tuple[str, int, int]:
    """`a:8:123` -> ('a', 8, 123): model, layer, feature index."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in ("a", "b") or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ValueError(f"--features expects MODEL:LAYER:FEATURE with MODEL a or b (e.g. a:8:123), got {spec!r}")
    return parts[0], int(parts[1]), int(parts[2])


def selected_features(cfg: RunConfig, extra: list[tuple[str, int, int]] | None = None) -> tuple[dict, dict]:
    """({(key, layer): sorted features}, {(key, layer, feat): [match dicts]}) for significant Hungarian matches + `extra`."""
    path = cfg.report_dir / "feature_matches.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `crossdict align` (or `crossdict run`) before exporting")
    feats: dict[tuple[str, int], set[int]] = {}
    partners: dict[tuple[str, int, int], list[dict]] = {}
    q = cfg.align.q_threshold
    for r in read_matches(path):
        la, lb, fa, fb = int(r["layer_a"]), int(r["layer_b"]), int(r["feat_a"]), int(r["feat_b"])
        info = {c: _num(r.get(c)) for c in ("act_corr", "dec_cos", "q_value", "p_value", "stability")}
        for (k, layer, f), (ok, olayer, of) in ((("a", la, fa), ("b", lb, fb)), (("b", lb, fb), ("a", la, fa))):
            partners.setdefault((k, layer, f), []).append(
                {"model": cfg.model(ok).name, "model_key": ok, "layer": olayer, "hook_name": hook_name(olayer),
                 "feature_index": of, "method": r.get("method", "hungarian"), **info,
                 "json": "../../" + relative_link(cfg, ok, olayer, of).split("/", 2)[2]})
            if r["q_value"] < q:
                feats.setdefault((k, layer), set()).add(f)
    for k, layer, f in extra or []:
        if layer not in cfg.model(k).layers:
            raise ValueError(f"--features {k}:{layer}:{f}: layer {layer} is not in model_{k}.layers {cfg.model(k).layers}")
        feats.setdefault((k, layer), set()).add(f)
    return {kl: sorted(v) for kl, v in feats.items()}, partners


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if not np.isfinite(f) else round(f, 5)


def _round(xs: Any) -> list[float]:
    return [round(float(x), 3) for x in np.asarray(xs).ravel()]


def unembedding(backend: Any) -> torch.Tensor:
    """The model's unembedding `[d_model, vocab]` (HF output embeddings or TransformerLens W_U)."""
    model = backend.model
    if hasattr(model, "W_U"):
        return model.W_U.detach().float().cpu()
    return model.get_output_embeddings().weight.detach().float().cpu().T


def _token_strings(text: str, tokens: np.ndarray) -> list[str]:
    """Each cached token's characters, the gap before it included, so "".join gives the text window."""
    out, prev = [], int(tokens[0, 2]) if len(tokens) else 0
    for t in tokens:
        out.append(text[prev:int(t[3])])
        prev = int(t[3])
    return out


def _examples(vals: np.ndarray, toks: np.ndarray, texts: dict[int, str]) -> list[dict]:
    """Top activations, one per passage: a window of token strings and the feature's value on each."""
    order = np.argsort(-vals, kind="stable")
    out, seen = [], set()
    for i in order:
        if vals[i] <= 0 or len(out) >= N_EXAMPLES:
            break
        pid = int(toks[i, 0])
        if pid in seen:
            continue
        seen.add(pid)
        same = np.nonzero(toks[:, 0] == pid)[0]
        same = same[np.argsort(toks[same, 1], kind="stable")]
        j = int(np.nonzero(same == i)[0][0])
        win = same[max(0, j - WINDOW_BEFORE): j + WINDOW_AFTER + 1]
        out.append({"bin_min": -1, "bin_max": round(float(vals[i]), 3), "bin_contains": -1,
                    "tokens": _token_strings(texts[pid], toks[win]), "values": _round(vals[win])})
    return out


def feature_json(feat: int, vals: np.ndarray, toks: np.ndarray, texts: dict[int, str], w_dec: torch.Tensor,
                 w_u: torch.Tensor | None, vocab: list[str | None] | None, matches: list[dict]) -> dict:
    """One feature in `NeuronpediaDashboardFeature.to_dict` layout (+ `crossdict_matches`).

    vals `[n_tokens]` held-out activations; w_dec `[d_in]` decoder row; w_u `[d_in, vocab]` or None.
    """
    active = vals[vals > 0]
    heights, edges = (np.histogram(active, bins=N_BINS) if len(active) else (np.zeros(0), np.zeros(1)))
    d = w_dec.float()
    top_n = torch.topk(d.abs(), min(N_NEURONS, d.numel())).indices
    out: dict[str, Any] = {
        "feature_index": int(feat),
        "neuron_alignment_indices": top_n.tolist(), "neuron_alignment_values": _round(d[top_n]),
        "neuron_alignment_l1": _round(d[top_n] / d.abs().sum().clamp_min(1e-12)),
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [],
        "frac_nonzero": round(len(active) / max(len(vals), 1), 6),
        "freq_hist_data_bar_values": _round((edges[:-1] + edges[1:]) / 2), "freq_hist_data_bar_heights": _round(heights),
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "num_tokens_for_dashboard": int(len(vals)),
        "activations": _examples(vals, toks, texts),
        "crossdict_matches": matches,
    }
    if w_u is not None:
        logits = d @ w_u  # [vocab]; SAEDashboard: feature direction times W_U, no final norm
        n = min(N_LOGITS, logits.numel())
        top, bot = torch.topk(logits, n), torch.topk(-logits, n)
        name = (lambda i: (vocab[i] if vocab and i < len(vocab) and vocab[i] is not None else f"<{i}>"))
        out.update(pos_str=[name(int(i)) for i in top.indices], pos_values=_round(top.values),
                   neg_str=[name(int(i)) for i in bot.indices], neg_values=_round(-bot.values))
        lh, le = np.histogram(logits.numpy(), bins=N_BINS)
        out.update(logits_hist_data_bar_heights=_round(lh), logits_hist_data_bar_values=_round((le[:-1] + le[1:]) / 2))
    return out


def run_export(cfg: RunConfig, fmt: str = "saedashboard", features: list[str] | None = None,
               backends: dict | None = None, progress: bool = True) -> list[Path]:
    """Write the JSON for every selected feature; returns the files written.

    `backends` (model key -> Backend) give the unembedding for the logit tables; None loads the models.
    """
    from .interventions import vocab_strings
    from .sae import feature_activations, load_sae

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {list(FORMATS)}")
    extra = [parse_feature(s) for s in features or []]
    chosen, partners = selected_features(cfg, extra)
    if not chosen:
        print(f"[crossdict] export: no significant matches (q < {cfg.align.q_threshold}) and no --features; nothing written")
        return []
    cache = ActivationCache(cfg.cache_dir)
    texts = cache.passage_texts()
    if backends is None:
        from .extract import load_backends

        backends = load_backends(cfg)
    written = []
    for (key, layer), feats in sorted(chosen.items()):
        sae = load_sae(cfg.sae_dir(key, layer))
        bad = [f for f in feats if not 0 <= f < sae.d_sae]
        if bad:
            raise ValueError(f"features {bad} out of range for model {key} layer {layer}: the SAE has {sae.d_sae} latents")
        rows = cache.rows(key, "heldout")
        toks = cache.tokens(key)[rows]
        vals = feature_activations(sae, cache.acts(key, layer), rows, np.asarray(feats))
        backend = backends[key]
        w_u, vocab = unembedding(backend), vocab_strings(backend.tokenizer)
        w_dec = sae.W_dec.detach().float().cpu() / float(sae.spec.input_scale)
        items = [feature_json(f, vals[:, j], toks, texts, w_dec[f], w_u, vocab, partners.get((key, layer, f), []))
                 for j, f in enumerate(feats)]
        if fmt == "saedashboard":
            for f, item in zip(feats, items):
                p = feature_path(cfg, fmt, key, layer, f)
                p.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(p, {"model_id": cfg.model(key).name, "layer": layer, "hook_name": hook_name(layer),
                                      "sae_set": _sae_set(cfg, key, layer), **item})
                written.append(p)
        else:
            p = feature_path(cfg, fmt, key, layer, 0)
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(p, {"model_id": cfg.model(key).name, "layer": layer, "sae_set": _sae_set(cfg, key, layer),
                                  "features": items,
                                  "settings": {"n_batches_to_sample_from": 0, "n_prompt_to_select": int(len(rows))}})
            written.append(p)
        if progress:
            print(f"[crossdict] export {fmt}: model {key} layer {layer}: {len(feats)} features")
    index = export_dir(cfg, fmt) / "index.json"
    atomic_write_json(index, {"format": fmt, "run": cfg.run_name,
                              "files": [p.relative_to(export_dir(cfg, fmt)).as_posix() for p in written]})
    return written


def _sae_set(cfg: RunConfig, key: str, layer: int) -> str:
    """Neuronpedia's SAE set name: the pretrained source, or this run's trained SAEs."""
    from .pretrained import TRAIN, source_for

    src = source_for(cfg, key, layer)
    return f"crossdict-{cfg.run_name}" if src == TRAIN else src
