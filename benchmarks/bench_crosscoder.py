"""Crosscoder training cost vs the two separate SAEs it stands in for, at the embedded pair's shapes.

    PYTHONPATH=src python benchmarks/bench_crosscoder.py [--steps 60] [--batch 1024]

One crosscoder over (d_a=576, d_b=640) with 8 x 640 latents and k=32, against a TopK SAE per model
(8 x d latents, k=32) trained one after the other on the same paired rows: tokens/s and the held-out
FVU of each model at equal L0. Data: synthetic sparse sums sharing half of their features.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from crossdict.config import CrosscoderConfig, SAEConfig
from crossdict.crosscoder import PairedStreams, evaluate_crosscoder, train_crosscoder
from crossdict.train import evaluate_sae, train_sae


def paired_synthetic(n: int, d_a: int, d_b: int, n_feat: int = 4000, active: int = 24, seed: int = 0):
    """Features 0..n_feat/2 are written by both models (different random bases); the rest by one model each."""
    g = np.random.default_rng(seed)
    da, db = g.standard_normal((n_feat, d_a)), g.standard_normal((n_feat, d_b))
    da /= np.linalg.norm(da, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    half = n_feat // 2
    xa, xb = np.zeros((n, d_a), np.float32), np.zeros((n, d_b), np.float32)
    for s in range(0, n, 4096):
        m = min(4096, n - s)
        idx = g.integers(0, n_feat, (m, active))
        mag = g.uniform(0.5, 1.5, (m, active))
        own_b = np.where(idx < half, idx, g.integers(half, n_feat, idx.shape))  # shared ids, or a private B feature
        xa[s : s + m] = np.einsum("nk,nkd->nd", mag, da[idx])
        xb[s : s + m] = np.einsum("nk,nkd->nd", mag, db[own_b])
    return xa, xb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    n_train, n_held = args.steps * args.batch, 8192
    xa, xb = paired_synthetic(n_train + n_held, 576, 640)
    tr = PairedStreams.from_arrays([xa[:n_train], xb[:n_train]], ["a", "b"])
    ho = PairedStreams.from_arrays([xa[n_train:], xb[n_train:]], ["a", "b"])
    common = dict(batch_size=args.batch, train_tokens=n_train, lr=4e-4, lr_warmup_steps=10, checkpoint_every=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cc = train_crosscoder(tr, CrosscoderConfig(expansion_factor=8, k=32, **common), f"{tmp}/cc", progress=False)
        t_cc = time.perf_counter() - t0
        ev = evaluate_crosscoder(cc, ho)
        t_sae, fvu_sae = 0.0, {}
        for name, x_tr, x_ho in (("a", xa[:n_train], xa[n_train:]), ("b", xb[:n_train], xb[n_train:])):
            t0 = time.perf_counter()
            sae = train_sae(tr.acts[0 if name == "a" else 1], np.arange(n_train), SAEConfig(expansion_factor=8, k=32, **common),
                            0, f"{tmp}/{name}", False, progress=False)
            t_sae += time.perf_counter() - t0
            fvu_sae[name] = evaluate_sae(sae, ho.acts[0 if name == "a" else 1], np.arange(n_held))["fvu"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.batch} paired tokens")
    print(f"crosscoder (5120 latents, k=32): {n_train / t_cc:,.0f} paired tok/s; held-out FVU a {ev['fvu']['a']:.3f} "
          f"b {ev['fvu']['b']:.3f} at L0 {ev['l0']:.1f}")
    print(f"two SAEs (4608 + 5120 latents, k=32 each): {n_train / t_sae:,.0f} paired tok/s; FVU a {fvu_sae['a']:.3f} b {fvu_sae['b']:.3f}")
    print(f"crosscoder / SAEs throughput ratio: {t_sae / t_cc:.2f}x")


if __name__ == "__main__":
    main()
