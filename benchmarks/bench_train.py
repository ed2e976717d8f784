"""crossdict's TopK SAE trainer vs SAELens 6.x's `SAETrainer`, fairly: speed *and* what was learned.

    PYTHONPATH=src python benchmarks/bench_train.py                                   # sae_lens.synthetic data
    PYTHONPATH=src python benchmarks/bench_train.py --source cache --cache runs/embedded/cache --layer 8
    PYTHONPATH=src python benchmarks/bench_train.py --only sae_lens --lrs 2e-3        # one trainer, one lr
                                                                                      # (for whole-process A/B timing)

Both trainers see the same batches in the same order (crossdict's `BatchStream` over one in-memory
array), the same input scaling, the same initial `b_dec`, the same width, k, batch size, Adam, learning
rate and schedule, and the same number of tokens. SAELens is driven through its own `SAETrainer.fit()`
(its real training loop: dead-latent tracking, AuxK, gradient clipping) with an iterator of batches.

SAELens options, from its docs (docs/training_saes.md, docs/synthetic_data.md, the TopK config docstring):
- `normalize_activations="expected_average_only_in"`: the docs' recommended input normalisation (the
  tutorial and the Anthropic-style setups use it). We hand its trainer crossdict's scale factor
  (`activation_scaler.scaling_factor`), so the two inputs are identical and no batches are spent on
  estimating it; SAELens folds the factor into the weights at the end, as it always does.
- `decoder_init_norm=1.0`: the default 0.1 is the "heuristic" init of Anthropic's April 2024 update for
  L1 SAEs; TopK (Gao et al. 2024 §A.1) starts with unit-norm decoder rows and encoder = decoder^T,
  which crossdict does too. With 0.1 a short run ends with reconstructions ~0.1 of the input's norm.
- `b_dec` at the (scaled) data mean: SAELens 6.x has no b_dec-init option (it starts at 0); crossdict
  starts at the data mean (Gao et al. use the geometric median). Set by hand so init is not compared.
- `aux_loss_coefficient=1.0` (SAELens's default; its AuxK loss is a plain sum of squares like its MSE,
  not variance-normalised, so crossdict's 1/32 on a normalised loss is not the same weight) and
  SAELens's own k_aux = d_in / 2; `rescale_acts_by_decoder_norm=True` (default).
- lr schedule: constant with linear warm-up and linear decay to 0 over the last 20% (the docs'
  tutorial: `lr_decay_steps = total // 5`); SAELens's `LinearLR` warm-up/decay equals crossdict's
  `lr_at` step for step.

Quality on planted data uses `sae_lens.synthetic`'s own generators (orthogonalised `FeatureDictionary`
with a bias, Zipfian firing, low-rank correlated firing as in SynthSAEBench, noisy magnitudes) and its
`eval_sae_on_synthetic_data` (MCC = Hungarian-matched mean |cos| to the ground truth, explained variance,
dead latents) on fresh held-out samples. Every data seed is derived from a fixed base by
`data_seed(tag)`, so none can equal an SAE's init seed (a FeatureDictionary seeded 0 at the SAE's shape
*is* crossdict's seed-0 initial decoder: same generator, same draws).

Speed: tokens/s from the median step time over interleaved repeats, and the encoder-bound limit: with a
sparse decoder a TopK step is bound by the dense encoder forward, 2 * d_in * d_sae FLOP per token, so
limit = (this machine's measured fp32 matmul GFLOP/s, same threads) / (2 * d_in * d_sae).
`--profile` prints torch.profiler's top operators for a few of crossdict's steps.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from crossdict.config import SAEConfig
from crossdict.train import BatchStream, input_scale_and_mean, train_sae

DATA_SEED_BASE = 14_2024
"""Root of every data seed; SAE init seeds are small integers (0, 1, ...) and never pass through here."""
TRAINERS = ("crossdict", "SAELens")


def data_seed(tag: str) -> int:
    """A 63-bit seed for one use of randomness in the data (`tag`), independent of any SAE seed."""
    digest = hashlib.sha256(f"{DATA_SEED_BASE}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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


# --- data ---------------------------------------------------------------------------------------


def planted_model(d: int, n_feat: int):
    """(FeatureDictionary, ActivationGenerator) from `sae_lens.synthetic`: Zipfian, correlated firing."""
    from sae_lens.synthetic import (ActivationGenerator, FeatureDictionary, generate_random_low_rank_correlation_matrix,
                                    zipfian_firing_probabilities)

    torch.manual_seed(data_seed("orthogonalise"))  # orthogonal_initializer draws nothing, but be safe
    fd = FeatureDictionary(n_feat, d, bias=1.0, seed=data_seed("dictionary"))
    corr = generate_random_low_rank_correlation_matrix(n_feat, rank=25, correlation_scale=0.1, seed=data_seed("correlation"))
    gen = ActivationGenerator(n_feat, zipfian_firing_probabilities(n_feat, exponent=1.0, max_prob=0.3, min_prob=0.005),
                              std_firing_magnitudes=0.3, mean_firing_magnitudes=1.0, correlation_matrix=corr)
    return fd, gen


@torch.no_grad()
def sample(fd, gen, n: int, tag: str, block: int = 16384) -> np.ndarray:
    """`n` hidden activations `[n, d]` float32 (the generators draw from torch's global RNG)."""
    state = torch.get_rng_state()
    torch.manual_seed(data_seed(tag))
    out = np.concatenate([fd(gen.sample(min(block, n - s))).numpy() for s in range(0, n, block)])
    torch.set_rng_state(state)
    return out.astype(np.float32)


def synthetic_data(d: int, n_feat: int, n: int, cache_dir: Path | None) -> tuple[np.ndarray, object, object]:
    """Training rows (cached as .npy under `cache_dir`, so repeated processes skip generating them)."""
    fd, gen = planted_model(d, n_feat)
    path = None if cache_dir is None else cache_dir / f"synthetic_{DATA_SEED_BASE}_{d}_{n_feat}_{n}.npy"
    if path is not None and path.is_file():
        return np.load(path), fd, gen
    x = sample(fd, gen, n, "train")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, x)
        tmp.replace(path)
    return x, fd, gen


def cache_data(cache_dir: str, model: str, layer: int | None, n_held: int = 8192) -> tuple[np.ndarray, np.ndarray, str]:
    """(train rows, held-out rows) of one cached layer, massive activations left out as `crossdict train` does."""
    from crossdict.cache import ActivationCache
    from crossdict.train import drop_massive, massive_activation_threshold

    cache = ActivationCache(cache_dir)
    layer = layer if layer is not None else cache.layers(model)[0]
    acts = cache.acts(model, layer)
    train, held = cache.rows(model, "train"), cache.rows(model, "heldout")
    max_norm = massive_activation_threshold(acts, train, 10.0)
    train, held = drop_massive(acts, train, max_norm), drop_massive(acts, held, max_norm)[:n_held]
    return acts.take(train), acts.take(held), f"cache {cache_dir} model {model} layer {layer}"


# --- trainers -----------------------------------------------------------------------------------


def sae_config(d_in: int, expansion: int, k: int, lr: float, batch: int, tokens: int) -> SAEConfig:
    steps = tokens // batch
    return SAEConfig(architecture="topk", expansion_factor=expansion, k=k, lr=lr, batch_size=batch,
                     train_tokens=steps * batch, lr_warmup_steps=max(1, steps // 20), lr_decay_fraction=0.2,
                     checkpoint_every=10**9)


def run_crossdict(x: np.ndarray, cfg: SAEConfig, sae_seed: int) -> tuple[float, object]:
    """(median seconds per step, trained SAE)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = InMemory(x)
        sae = train_sae(data, np.arange(len(x)), cfg, seed=sae_seed, out_dir=tmp, resume=False, progress=False)
        return median_step_s(data.stamps[1:]), sae  # stamps[0]: the input-scale sample


def run_sae_lens(x: np.ndarray, cfg: SAEConfig, sae_seed: int) -> tuple[float, object]:
    """SAELens's `SAETrainer.fit()` on crossdict's batches, configured as above; (median s/step, SAE)."""
    warnings.filterwarnings("ignore")
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_in = x.shape[1]
    n_steps = cfg.train_tokens // cfg.batch_size
    rows = np.arange(len(x))
    scale, mean = input_scale_and_mean(InMemory(x), rows, sae_seed)  # what crossdict's trainer computes
    torch.manual_seed(sae_seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_in * cfg.expansion_factor, k=cfg.k, decoder_init_norm=1.0,
        normalize_activations="expected_average_only_in"))
    with torch.no_grad():
        sae.b_dec.copy_(torch.from_numpy(mean))  # scaled space, like crossdict's
    stream = BatchStream(rows, cfg.batch_size, seed=sae_seed)  # crossdict's batches, in crossdict's order
    stamps: list[float] = []

    def batches():
        step = 0
        while True:
            stamps.append(time.perf_counter())
            yield torch.from_numpy(x[stream(step)])
            step += 1

    tcfg = SAETrainerConfig(
        total_training_samples=n_steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr,
        lr_warm_up_steps=cfg.lr_warmup_steps, lr_decay_steps=int(n_steps * cfg.lr_decay_fraction),
        dead_feature_window=max(1, cfg.dead_tokens_threshold // cfg.batch_size),
        logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(tcfg, sae, batches())
    trainer.activation_scaler.scaling_factor = scale  # crossdict's factor; fit() skips its own estimate
    trainer.fit()
    sae.eval()
    return median_step_s(stamps), sae


# --- quality ------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_quality(sae, held: np.ndarray, block: int = 2048) -> dict[str, float]:
    """Whole-set FVU (SSE / total sum of squares about the mean, float64), L0, dead fraction on `held`."""
    xs = torch.from_numpy(held).double()
    sse, l0, fired = 0.0, 0.0, None
    for s in range(0, len(held), block):
        xb = torch.from_numpy(held[s : s + block])
        codes = sae.encode(xb)
        sse += float((sae.decode(codes).double() - xb.double()).pow(2).sum())
        active = codes > 0
        l0 += float(active.sum())
        fired = active.any(0) if fired is None else fired | active.any(0)
    return {"fvu": sse / float((xs - xs.mean(0)).pow(2).sum()), "l0": l0 / len(held), "dead": float((~fired).double().mean())}


def synthetic_quality(sae, fd, gen, n: int = 20_000) -> dict[str, float]:
    """SAELens's own `eval_sae_on_synthetic_data` on `n` fresh samples (the same ones for every SAE)."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    state = torch.get_rng_state()
    torch.manual_seed(data_seed("eval"))
    r = eval_sae_on_synthetic_data(sae, fd, gen, num_samples=n, batch_size=4096)
    torch.set_rng_state(state)
    w, gt = sae.W_dec.detach(), fd.feature_vectors.detach()
    cos = torch.nn.functional.normalize(gt, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    return {"fvu": 1 - r.explained_variance, "l0": r.sae_l0, "dead": r.dead_latents / w.shape[0], "mcc": r.mcc,
            "mean_max_cos": float(cos.abs().max(1).values.mean())}


# --- speed limit --------------------------------------------------------------------------------


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` fp32 n x n matmul rate at the current torch thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def profile_crossdict(x: np.ndarray, cfg: SAEConfig, steps: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    short = SAEConfig(**{**cfg.__dict__, "train_tokens": steps * cfg.batch_size, "lr_warmup_steps": 1})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_crossdict(x, short, 0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=["synthetic", "cache"], default="synthetic")
    p.add_argument("--cache", default="/work/baseline/embedded/cache", help="activation cache dir (--source cache)")
    p.add_argument("--model", default="a")
    p.add_argument("--layer", type=int, default=8)
    p.add_argument("--d", type=int, default=256, help="synthetic hidden size")
    p.add_argument("--features", type=int, default=2048, help="synthetic ground-truth features")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=500_000)
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 6e-3])
    p.add_argument("--sae-seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs per trainer and lr; the fastest counts")
    p.add_argument("--only", choices=["crossdict", "sae_lens"], help="run one trainer (whole-process A/B timing)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "crossdict-bench"),
                   help="where generated synthetic rows are kept between processes ('' = nowhere)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of crossdict's trainer")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bar

    fd = gen = None
    if a.source == "synthetic":
        x, fd, gen = synthetic_data(a.d, a.features, a.tokens, Path(a.data_dir) if a.data_dir else None)
        held, source = None, f"sae_lens.synthetic: {a.features} features in d={a.d}, Zipfian + low-rank correlated"
    else:
        x, held, source = cache_data(a.cache, a.model, a.layer)
    d_in, d_sae = x.shape[1], x.shape[1] * a.expansion
    print(f"data: {source}; {len(x):,} training rows; d_in={d_in}, d_sae={d_sae}, k={a.k}, batch={a.batch}, "
          f"tokens={a.tokens:,}; torch threads={torch.get_num_threads()}, load avg={os.getloadavg()[0]:.2f}")

    peak = matmul_gflops()
    limit = peak * 1e9 / (2 * d_in * d_sae)
    names = {"crossdict": "crossdict", "sae_lens": "SAELens"}
    trainers = [names[a.only]] if a.only else list(TRAINERS)
    rows: dict[tuple[float, str], dict] = {}
    for lr in a.lrs:
        cfg = sae_config(d_in, a.expansion, a.k, lr, a.batch, a.tokens)
        for _ in range(a.repeats):  # interleaved, so both see the same background load
            for name in trainers:
                step_s, sae = (run_crossdict if name == "crossdict" else run_sae_lens)(x, cfg, a.sae_seed)
                q = synthetic_quality(sae, fd, gen) if fd is not None else heldout_quality(sae, held)
                print(f"  lr {lr:.0e} {name}: {a.batch / step_s:,.0f} tokens/s, "
                      + ", ".join(f"{c} {v:.3f}" for c, v in q.items()), flush=True)
                prev = rows.get((lr, name))
                if prev is None or step_s < prev["step_s"]:
                    rows[(lr, name)] = {"step_s": step_s, **q}

    print(f"\nfp32 matmul: {peak:.1f} GFLOP/s -> encoder-bound limit {limit:,.0f} tokens/s "
          f"(2 * {d_in} * {d_sae} FLOP/token)")
    cols = ["mcc", "mean_max_cos"] if fd is not None else []
    print(f"{'lr':>8} {'trainer':<10}{'tokens/s':>10}{'% limit':>9}{'FVU':>8}{'L0':>7}{'dead':>7}"
          + "".join(f"{c:>13}" for c in cols))
    for (lr, name), r in rows.items():
        tps = a.batch / r["step_s"]
        print(f"{lr:>8.0e} {name:<10}{tps:>10,.0f}{100 * tps / limit:>8.0f}%{r['fvu']:>8.3f}{r['l0']:>7.1f}"
              f"{r['dead']:>7.3f}" + "".join(f"{r[c]:>13.3f}" for c in cols))
        if name == "SAELens" and r["fvu"] >= 1:
            print("  ^ SAELens worse than predicting the mean: misconfigured, not beaten")
    for lr in a.lrs:
        if (lr, "crossdict") in rows and (lr, "SAELens") in rows:
            o, s = rows[(lr, "crossdict")], rows[(lr, "SAELens")]
            extra = f", MCC {o['mcc'] - s['mcc']:+.3f}" if fd is not None else ""
            print(f"lr {lr:.0e}: speed crossdict / SAELens {s['step_s'] / o['step_s']:.2f}x (median step); "
                  f"FVU {o['fvu'] - s['fvu']:+.3f}{extra} (crossdict - SAELens)")
    if a.profile:
        profile_crossdict(x, sae_config(d_in, a.expansion, a.k, a.lrs[0], a.batch, a.tokens))


if __name__ == "__main__":
    main()
