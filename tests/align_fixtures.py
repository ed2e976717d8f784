"""Synthetic data shared by test_align.py / test_metrics.py: tiny caches, SAE stand-ins, sparse codes.

(A plain module rather than conftest.py, so it cannot collide with other test suites' fixtures.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import sparse

from crossdict.cache import CACHE_FORMAT, ShardData, write_manifest, write_shard


class StandInSAE:
    """Minimal object with the two attributes the align stage uses: encode() and W_dec [d_sae, d_in]."""

    def __init__(self, W_enc: np.ndarray, b_enc: np.ndarray, W_dec: np.ndarray, k: int):
        self.W_enc = torch.as_tensor(W_enc, dtype=torch.float32)
        self.b_enc = torch.as_tensor(b_enc, dtype=torch.float32)
        self.W_dec = torch.as_tensor(W_dec, dtype=torch.float32)
        self.k = k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(x @ self.W_enc + self.b_enc)
        top = torch.topk(pre, self.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, top.indices, top.values)


def random_sae(d_in: int, d_sae: int, k: int, seed: int) -> StandInSAE:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    return StandInSAE(W.T, np.zeros(d_sae, np.float32), W, k)


def write_synthetic_cache(
    cache_dir: Path, n_passages: int = 60, tokens: int = 25, layers_a=(1, 3), layers_b=(2, 4),
    d_a: int = 24, d_b: int = 16, n_latent: int = 8, seed: int = 0, random_b: bool = False,
) -> None:  # fmt: skip
    """A cache where both models read the same latent signal z through different linear maps.

    Every token is an anchor (pairing is 1:1); one passage in five is held out. Later layers mix
    in more noise, so layer correspondence has structure. With random_b, model b's activations are
    independent of the latent (a randomly initialised model).
    """
    rng = np.random.default_rng(seed)
    maps_a = {l: rng.standard_normal((n_latent, d_a)) for l in layers_a}
    maps_b = {l: rng.standard_normal((n_latent, d_b)) for l in layers_b}
    per_shard = n_passages // 2
    for shard in range(2):
        pids = np.arange(shard * per_shard, (shard + 1) * per_shard)
        n = len(pids) * tokens
        pid = np.repeat(pids, tokens)
        pos = np.tile(np.arange(1, tokens + 1), len(pids))
        tok = np.stack([pid, pos, pos * 4, pos * 4 + 4, rng.integers(0, 1000, n), (pid % 5 == 0).astype(int)], 1)
        # latent with passage-level offsets (dependence within passages, as in real text)
        z = rng.standard_normal((n, n_latent)) + 0.5 * rng.standard_normal((len(pids), n_latent))[pid - pids[0]]
        acts_a = {l: (z @ maps_a[l] + (0.2 + 0.3 * i) * rng.standard_normal((n, d_a))).astype(np.float32) for i, l in enumerate(layers_a)}
        zb = rng.standard_normal(z.shape) if random_b else z
        acts_b = {l: (zb @ maps_b[l] + (0.2 + 0.3 * i) * rng.standard_normal((n, d_b))).astype(np.float32) for i, l in enumerate(layers_b)}
        anchors = np.stack([np.arange(n), np.arange(n)], 1)
        write_shard(cache_dir, shard, ShardData({"a": tok, "b": tok.copy()}, {"a": acts_a, "b": acts_b}, anchors))
    write_manifest(cache_dir, {
        "format": CACHE_FORMAT, "version": 1, "complete": True, "n_shards": 2,
        "models": {"a": {"name": "toy-a", "d_model": d_a, "layers": list(layers_a)},
                   "b": {"name": "toy-b", "d_model": d_b, "layers": list(layers_b)}},
    })  # fmt: skip


def shared_private_codes(
    rng: np.random.Generator, n_passages: int = 200, tokens: int = 40, m: int = 64, n_shared: int = 24, p: float = 0.05,
) -> tuple[sparse.csr_matrix, sparse.csr_matrix, np.ndarray, dict[int, int]]:  # fmt: skip
    """Codes of two "models": A's features 0..n_shared-1 fire with B's feature truth[i] (same events,
    independent magnitudes); the rest are private. Firing rates vary by passage (topic)."""
    n = n_passages * tokens
    pid = np.repeat(np.arange(n_passages), tokens)
    rate = p * rng.gamma(2.0, 0.5, size=(n_passages, m))[pid]
    events = rng.random((n, n_shared)) < rate[:, :n_shared]
    mag = rng.exponential(1.0, (n, n_shared))
    A, B = np.zeros((n, m)), np.zeros((n, m))
    A[:, :n_shared] = events * mag * rng.uniform(0.5, 1.5, (n, n_shared))
    B[:, :n_shared] = events * mag * rng.uniform(0.5, 1.5, (n, n_shared))
    A[:, n_shared:] = (rng.random((n, m - n_shared)) < rate[:, n_shared:]) * rng.exponential(1.0, (n, m - n_shared))
    B[:, n_shared:] = (rng.random((n, m - n_shared)) < p) * rng.exponential(1.0, (n, m - n_shared))
    perm = rng.permutation(m)  # B's column c holds latent feature perm[c]
    B = B[:, perm]
    truth = {j: int(np.nonzero(perm == j)[0][0]) for j in range(n_shared)}
    return sparse.csr_matrix(A.astype(np.float32)), sparse.csr_matrix(B.astype(np.float32)), pid, truth
