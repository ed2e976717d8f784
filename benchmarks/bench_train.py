"""Our TopK SAE trainer vs SAELens's `SAETrainer` on the same activations: tokens/s and FVU.

    PYTHONPATH=src python benchmarks/bench_train.py                      # synthetic activations
    PYTHONPATH=src python benchmarks/bench_train.py --cache runs/x/cache --model a --layer 8

Both trainers see the same batches in the same order (an in-memory array; a cache is read into RAM
first so disk speed does not enter), the same k, d_sae, batch size, learning rate, warm-up and
decay, Adam, and the same input normalisation (mean ||x||^2 = d_in). SAELens is driven through its
own `SAETrainer.fit()` with an iterator of activation batches (no model, no wandb), i.e. its real
training loop, including its dead-latent AuxK loss. FVU is measured afterwards on held-out rows with
each library's own inference path.

Also reported: our throughput as dense-equivalent GFLOP/s (12 * n * d_in * d_sae FLOPs per step, what a
dense encoder+decoder forward+backward costs) against this machine's measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from crossdict.config import SAEConfig
from crossdict.train import BatchStream, train_sae


class InMemory:
    """Activations in RAM; records when each batch is requested (one per training step)."""

    def __init__(self, x: np.ndarray):
        self.x, self.shape, self.stamps = x, x.shape, []

    def take(self, rows: np.ndarray) -> np.ndarray:
        self.stamps.append(time.perf_counter())
        return self.x[rows]


def median_step_s(stamps: list[float]) -> float:
    """Median time between consecutive batch requests: robust to bursts of load from other processes."""
    return float(np.median(np.diff(stamps)))


def synthetic(n: int, d: int, n_feat: int, active: int, seed: int = 0) -> np.ndarray:
    """Sparse sums of random unit directions (power-law feature frequencies) plus noise `[n, d]`."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    freq = 1.0 / torch.arange(1, n_feat + 1).float() ** 0.7
    idx = torch.multinomial(freq, n * active, replacement=True, generator=g).view(n, active)
    mags = torch.rand(n, active, generator=g) + 0.5
    x = F.embedding_bag(idx, dirs, per_sample_weights=mags, mode="sum")
    x += 0.05 * torch.randn(n, d, generator=g) + 2.0 * dirs[0]  # noise and a large shared offset
    return x.numpy()


def matmul_peak_gflops(n: int = 4096, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def fvu(recon_fn, x: np.ndarray, block: int = 2048) -> float:
    sse, xs = 0.0, torch.from_numpy(x).double()
    with torch.no_grad():
        for s in range(0, len(x), block):
            xb = torch.from_numpy(x[s : s + block])
            sse += float((recon_fn(xb).double() - xb.double()).pow(2).sum())
    return sse / float((xs - xs.mean(0)).pow(2).sum())


def run_ours(x: np.ndarray, rows: np.ndarray, cfg: SAEConfig) -> tuple[float, float, object]:
    """(wall seconds, median seconds per step, trained SAE)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = InMemory(x)
        t = time.perf_counter()
        sae = train_sae(data, rows, cfg, seed=0, out_dir=tmp, resume=False, progress=False)
        wall = time.perf_counter() - t
        return wall, median_step_s(data.stamps[1:]), sae  # stamps[0]: the input-scale sample


def run_sae_lens(x: np.ndarray, rows: np.ndarray, cfg: SAEConfig, d_in: int) -> tuple[float, float, object]:
    warnings.filterwarnings("ignore")
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    n_steps = cfg.train_tokens // cfg.batch_size
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_in * cfg.expansion_factor, k=cfg.k, aux_loss_coefficient=cfg.aux_coefficient,
        normalize_activations="expected_average_only_in"))
    stream = BatchStream(rows, cfg.batch_size, seed=0)

    stamps: list[float] = []

    def batches():
        step = 0
        while True:
            stamps.append(time.perf_counter())
            yield torch.from_numpy(x[stream(step)])
            step += 1

    tcfg = SAETrainerConfig(
        total_training_samples=n_steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_warm_up_steps=cfg.lr_warmup_steps, lr_decay_steps=int(n_steps * cfg.lr_decay_fraction), lr_end=0.0,
        dead_feature_window=max(1, cfg.dead_tokens_threshold // cfg.batch_size), n_batches_for_norm_estimate=4)
    trainer = SAETrainer(tcfg, sae, batches())
    t = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t, median_step_s(stamps[tcfg.n_batches_for_norm_estimate:]), sae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", help="activation cache dir (default: synthetic activations)")
    p.add_argument("--model", default="a")
    p.add_argument("--layer", type=int)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="runs per trainer, interleaved; the fastest counts "
                   "(this machine's CPU time is shared, so single timings are noisy)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--skip-sae-lens", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bar

    if a.cache:
        from crossdict.cache import ActivationCache

        cache = ActivationCache(a.cache)
        layer = a.layer if a.layer is not None else cache.layers(a.model)[0]
        acts = cache.acts(a.model, layer)
        train_rows, held = cache.rows(a.model, "train"), cache.rows(a.model, "heldout")
        x = np.concatenate([acts.take(train_rows), acts.take(held[:8192])])
        rows, held_x, source = np.arange(len(train_rows)), x[len(train_rows):], f"cache {a.cache} model {a.model} layer {layer}"
    else:
        n_train = min(a.steps * a.batch, 65536)
        x = synthetic(n_train + 8192, a.d, n_feat=a.d * a.expansion, active=a.k // 2)
        rows, held_x, source = np.arange(n_train), x[n_train:], "synthetic"
    d_in = x.shape[1]
    cfg = SAEConfig(architecture="topk", expansion_factor=a.expansion, k=a.k, lr=a.lr, batch_size=a.batch,
                    train_tokens=a.steps * a.batch, lr_warmup_steps=max(1, a.steps // 10), lr_decay_fraction=0.2,
                    checkpoint_every=10**9, aux_k=256, dead_tokens_threshold=10 * a.batch)
    tokens = a.steps * a.batch
    print(f"data: {source}, d_in={d_in}, d_sae={d_in * a.expansion}, k={a.k}, batch={a.batch}, steps={a.steps}, "
          f"torch threads={torch.get_num_threads()}, load avg={os.getloadavg()[0]:.2f}")

    peak = matmul_peak_gflops()
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "SAELens SAETrainer": []}
    for _ in range(a.repeats):  # interleaved, so both see the same background load
        wall, step_s, ours = run_ours(x, rows, cfg)
        times["ours"].append((wall, step_s))
        if not a.skip_sae_lens:
            wall, step_s, sl = run_sae_lens(x, rows, cfg, d_in)
            times["SAELens SAETrainer"].append((wall, step_s))
    fvus = {"ours": fvu(ours.reconstruct, held_x)}
    if not a.skip_sae_lens:
        sl.eval()
        fvus["SAELens SAETrainer"] = fvu(sl, held_x)

    # tokens/s from the median step time (robust); best whole-run wall time shown alongside.
    res = {n: (a.batch / min(s for _, s in t), tokens / min(w for w, _ in t), fvus[n]) for n, t in times.items() if t}
    print(f"\n{'trainer':<22}{'tokens/s (median step)':>24}{'tokens/s (wall)':>17}{'held-out FVU':>15}")
    for name, (tps, tps_wall, f) in res.items():
        print(f"{name:<22}{tps:>24,.0f}{tps_wall:>17,.0f}{f:>15.4f}")
    if len(res) == 2:
        (tps_o, w_o, f_o), (tps_s, w_s, f_s) = res.values()
        print(f"\nspeed ratio ours / SAELens: {tps_o / tps_s:.2f}x per step, {w_o / w_s:.2f}x wall (target >= 1.5x); "
              f"FVU ours - SAELens at {tokens:,} tokens: {f_o - f_s:+.4f} ({'no worse' if f_o <= f_s + 1e-3 else 'WORSE'})")
    gflops = 12 * a.batch * d_in * d_in * a.expansion / 1e9 * res["ours"][0] / a.batch
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s; ours dense-equivalent: {gflops:.1f} GFLOP/s "
          f"= {100 * gflops / peak:.0f}% of peak (target >= 50%)")


if __name__ == "__main__":
    main()
