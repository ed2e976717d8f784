"""`crossdict plan`: what a config will cost before running it: cache disk size, time here and on N workers.

Sizes are exact arithmetic on token counts (from the finished cache's manifest if there is one, else
from tokenizing a sample of the corpus exactly as extraction does). Times come from a short
calibration on this machine: one block of each model (built from its config with random weights:
no checkpoint needed) run on a full-length batch, and a few SAE training steps at the configured
width. Communication is not timed: the DDP estimate is compute only, and the gradient volume each
step all-reduces is printed beside it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from .config import RunConfig
from .models import PACKAGED, _dequantized_dir, resolve

SAMPLE_PASSAGES = 64
PAIRING_RATE_GUESS = 0.8
"""Anchor pairs per token of the shorter tokenization when no cache exists yet (the tiny and packaged pairs: 0.7-0.85)."""


@dataclass
class ModelInfo:
    name: str
    n_layers: int
    d_model: int
    hf_config: object | None
    """transformers config (for calibration), None when only the packaged table is known."""
    tokenizer_dir: str | None


def model_info(name: str) -> ModelInfo:
    """Depth, width and config of a model without loading its weights."""
    from transformers import AutoConfig

    path, gguf = None, None
    try:
        src = resolve(name)
        path, gguf = src.path, src.gguf_file
        if gguf is not None and (_dequantized_dir(src) / "config.json").is_file():
            path, gguf = str(_dequantized_dir(src)), None
    except ValueError:
        pass
    cfg = None
    if path is not None and gguf is None:
        try:
            cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            cfg = None
    if cfg is not None:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return ModelInfo(name, text.num_hidden_layers, text.hidden_size, cfg, path)
    if name in PACKAGED:
        return ModelInfo(name, PACKAGED[name]["n_layers"], PACKAGED[name]["d_model"], None, None)
    raise ValueError(f"cannot read the config of {name!r} without its files; run `make models` or `crossdict extract` once")


# --- token counts ---------------------------------------------------------------------------------


def token_counts(cfg: RunConfig, infos: dict[str, ModelInfo]) -> tuple[dict[str, int], int, int, str]:
    """(tokens per model, anchor pairs, passages, where the numbers come from)."""
    manifest = cfg.cache_dir / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("complete"):
            c = m["counts"]
            return {"a": c["n_tokens_a"], "b": c["n_tokens_b"]}, c["n_pairs"], c["n_passages"], "the finished cache"
    from .corpus import passages
    from .extract import truncate_to_common

    texts = passages(cfg.corpus)
    n = len(texts)
    sample = texts[:: max(1, n // SAMPLE_PASSAGES)][:SAMPLE_PASSAGES]
    toks = _tokenizers(infos)
    if toks is None:  # no tokenizer files: ~4 characters a token, capped at max_ctx
        per = {k: float(np.mean([min(len(t) / 4, cfg.model(k).max_ctx - 1) for t in sample])) for k in ("a", "b")}
        how = "a guess of 4 characters per token (tokenizers not available)"
    else:
        light = {k: SimpleNamespace(tokenizer=t, has_bos=_has_bos(t)) for k, t in toks.items()}
        cut = truncate_to_common(sample, light, {k: cfg.model(k).max_ctx for k in light})
        per = {k: float(np.mean([len(toks[k](t, add_special_tokens=False)["input_ids"]) for t in cut])) for k in light}
        how = f"tokenizing {len(sample)} sample passages"
    tokens = {k: int(per[k] * n) for k in per}
    return tokens, int(PAIRING_RATE_GUESS * min(tokens.values())), n, how


def _tokenizers(infos: dict[str, ModelInfo]):
    from transformers import AutoTokenizer

    out = {}
    for k, info in infos.items():
        if info.tokenizer_dir is None:
            return None
        try:
            out[k] = AutoTokenizer.from_pretrained(info.tokenizer_dir, local_files_only=True)
        except (OSError, ValueError):
            return None
    return out


def _has_bos(tok) -> bool:
    return tok.bos_token_id is not None and tok("a")["input_ids"][0] == tok.bos_token_id


# --- sizes ----------------------------------------------------------------------------------------


def disk_bytes(cfg: RunConfig, infos: dict[str, ModelInfo], tokens: dict[str, int], pairs: int) -> dict[str, int]:
    """Bytes on disk per part of the run directory."""
    item = np.dtype(cfg.extract.store_dtype).itemsize
    out = {}
    for k in ("a", "b"):
        out[f"cache: model {k} states"] = tokens[k] * len(cfg.model(k).layers) * infos[k].d_model * item
    out["cache: token index + anchors"] = (tokens["a"] + tokens["b"]) * 6 * 8 + pairs * 2 * 8
    if cfg.extract.random_floor:
        out["cache_random (floor)"] = tokens["b"] * len(cfg.model_b.layers) * infos["b"].d_model * item + \
            (tokens["a"] + tokens["b"]) * 6 * 8 + pairs * 16
    if cfg.extract.layer_sweep_tokens:
        out["layer sweep"] = sum(infos[k].n_layers * infos[k].d_model * 4 for k in "ab") * cfg.extract.layer_sweep_tokens
    out["SAEs"] = sum(2 * infos[k].d_model ** 2 * cfg.sae.expansion_factor * 4 * len(cfg.model(k).layers)
                      for k in "ab") * len(cfg.sae.seeds)
    return out


# --- calibration ----------------------------------------------------------------------------------


def block_seconds_per_token(info: ModelInfo, max_ctx: int, batch: int, device: torch.device) -> float | None:
    """Seconds per token for one decoder block of this architecture, timed on random weights."""
    if info.hf_config is None:
        return None
    from transformers import AutoModelForCausalLM

    c = copy.deepcopy(info.hf_config)
    text = c.get_text_config() if hasattr(c, "get_text_config") else c
    text.num_hidden_layers = 1
    if hasattr(text, "layer_types") and text.layer_types:
        text.layer_types = text.layer_types[:1]
    text.vocab_size = 512  # the unembedding is never run by extraction; keep it out of the timing
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(c).to(device).eval()
    ids = torch.randint(0, 512, (batch, max_ctx), device=device)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)  # warm-up
        t0 = time.perf_counter()
        reps = 0
        while reps < 2 or time.perf_counter() - t0 < 0.5:
            model(input_ids=ids, use_cache=False)
            reps += 1
    return (time.perf_counter() - t0) / reps / (batch * max_ctx)


def sae_seconds_per_token(d_in: int, cfg: RunConfig, device: torch.device) -> float:
    """Seconds per training token of one SAE at the configured width, k and architecture."""
    from .sae import SAE, SAESpec

    spec = SAESpec(cfg.sae.architecture, d_in, d_in * cfg.sae.expansion_factor, k=min(cfg.sae.k, d_in * cfg.sae.expansion_factor))
    sae = SAE(spec, device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    B = min(cfg.sae.batch_size, 2048)
    x = torch.randn(B, d_in, device=device)
    dead = torch.zeros(spec.d_sae, dtype=torch.bool, device=device)

    def step():
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    reps = 0
    while reps < 2 or time.perf_counter() - t0 < 0.5:
        step()
        reps += 1
    return (time.perf_counter() - t0) / reps / B


# --- the plan -------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _fmt_s(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def make_plan(cfg: RunConfig, workers: list[int], calibrate: bool = True) -> dict:
    """Everything `print_plan` shows, as numbers (bytes and seconds)."""
    from .utils import resolve_device

    infos = {k: model_info(cfg.model(k).name) for k in ("a", "b")}
    tokens, pairs, n_passages, source = token_counts(cfg, infos)
    n_shards = math.ceil(n_passages / cfg.extract.shard_passages)
    saes = [(k, layer, s) for k in "ab" for layer in cfg.model(k).layers for s in cfg.sae.seeds]
    plan = {"tokens": tokens, "pairs": pairs, "passages": n_passages, "shards": n_shards, "source": source,
            "n_saes": len(saes), "disk": disk_bytes(cfg, infos, tokens, pairs), "infos": infos}
    d_sae = {k: infos[k].d_model * cfg.sae.expansion_factor for k in "ab"}
    plan["grad_bytes_per_step"] = {k: 4 * (2 * infos[k].d_model * d_sae[k] + d_sae[k] + infos[k].d_model) for k in "ab"}
    if not calibrate:
        return plan
    device = resolve_device(cfg.device)
    t_block = {k: block_seconds_per_token(infos[k], cfg.model(k).max_ctx, cfg.extract.batch_size, device) for k in "ab"}
    extract_s = 0.0
    for k in "ab":
        if t_block[k] is None:
            plan["extract_s"] = None
            break
        blocks = max(cfg.model(k).layers) + 1  # the forward stops after the deepest cached block
        extract_s += t_block[k] * blocks * tokens[k]
        if cfg.extract.random_floor and k == "b":
            extract_s += t_block[k] * blocks * tokens[k]
    else:
        plan["extract_s"] = extract_s
    t_sae = {k: sae_seconds_per_token(infos[k].d_model, cfg, device) for k in "ab"}
    train_tokens = cfg.sae.train_tokens // cfg.sae.batch_size * cfg.sae.batch_size
    per_sae = [t_sae[k] * train_tokens for k, _, _ in saes]
    plan.update(device=str(device), threads=torch.get_num_threads(), t_block=t_block, t_sae=t_sae,
                per_sae_s=per_sae, train_s=sum(per_sae))
    plan["workers"] = {}
    for n in workers:
        ext = None if plan["extract_s"] is None else plan["extract_s"] * math.ceil(n_shards / n) / n_shards
        # Ranks take SAEs j, j+n, ...: the slowest rank's share bounds the time.
        modules = max(sum(per_sae[j::n]) for j in range(min(n, len(saes)))) if n <= len(saes) else None
        plan["workers"][n] = {"extract_s": ext if n <= n_shards else None, "train_ddp_s": plan["train_s"] / n,
                              "train_modules_s": modules}
    return plan


def print_plan(cfg: RunConfig, workers: list[int] | None = None, calibrate: bool = True) -> dict:
    workers = workers or [1, 2, 4, 8]
    p = make_plan(cfg, workers, calibrate)
    infos = p["infos"]
    print(f"crossdict plan for run {cfg.run_name!r}")
    for k in "ab":
        m = cfg.model(k)
        print(f"  model {k}: {m.name}  ({infos[k].n_layers} blocks, d_model {infos[k].d_model}); layers {m.layers}, "
              f"max_ctx {m.max_ctx}; d_sae {infos[k].d_model * cfg.sae.expansion_factor}")
    print(f"  corpus: {p['passages']} passages -> {p['shards']} shards of {cfg.extract.shard_passages}; "
          f"tokens A {p['tokens']['a']:,}, B {p['tokens']['b']:,}, anchor pairs ~{p['pairs']:,} (from {p['source']})")
    print(f"  SAEs: {p['n_saes']} (2 models x layers x {len(cfg.sae.seeds)} seeds), "
          f"{cfg.sae.train_tokens // cfg.sae.batch_size * cfg.sae.batch_size:,} training tokens each")
    print(f"disk ({cfg.extract.store_dtype}), under {cfg.run_dir}:")
    for part, n in p["disk"].items():
        print(f"  {part:<30} {_fmt_bytes(n):>10}")
    print(f"  {'total':<30} {_fmt_bytes(sum(p['disk'].values())):>10}")
    if not calibrate:
        return p
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"time, calibrated on this machine ({p['device']}, {p['threads']} threads, load average {load:.1f} on "
          f"{os.cpu_count()} cores: busier machines time slower; compute only, model loading not counted):")
    for k in "ab":
        tb = p["t_block"][k]
        print(f"  model {k}: {'n/a (no config files)' if tb is None else f'{tb * 1e6:.1f} us/token/block'}; "
              f"SAE step {p['t_sae'][k] * 1e6:.1f} us/token")
    ext = p["extract_s"]
    print(f"  extract (both models{', + random-init floor' if cfg.extract.random_floor else ''}): "
          f"{'n/a' if ext is None else _fmt_s(ext)};  train: {_fmt_s(p['train_s'])}")
    print(f"  {'workers':>7}  {'extract':>10}  {'train (DDP)':>12}  {'train (--distribute-modules)':>28}")
    for n, w in p["workers"].items():
        e = "too many" if w["extract_s"] is None and ext is not None else ("n/a" if w["extract_s"] is None else _fmt_s(w["extract_s"]))
        mod = "too many" if w["train_modules_s"] is None else _fmt_s(w["train_modules_s"])
        print(f"  {n:>7}  {e:>10}  {_fmt_s(w['train_ddp_s']):>12}  {mod:>28}")
    gb = p["grad_bytes_per_step"]
    print(f"  DDP all-reduces {_fmt_bytes(gb['a'])} (A) / {_fmt_bytes(gb['b'])} (B) of gradients per step "
          f"({cfg.sae.train_tokens // cfg.sae.batch_size} steps per SAE); not in the times above. "
          "'too many': more ranks than shards or SAEs (refused).")
    return p
