"""Benchmark: streaming linear CKA / SVCCA on memmapped activations, and SAE feature matching at m = 16k.

    PYTHONPATH=src python benchmarks/bench_metrics.py            # n = 1M x d = 1024, m = 16384 (~3-4 min)
    PYTHONPATH=src python benchmarks/bench_metrics.py --quick    # n = 100k, m = 4096 (~30 s)

Peak memory is measured with tracemalloc (numpy reports its buffers to it); the process RSS
would also count the memory-mapped pages of the 8 GB input files, which are page cache, not
working memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import sparse

from crossdict.matching import code_correlation, hungarian, match_features, mutual_nn
from crossdict.metrics import linear_cka, linear_cka_gram, svcca

LAST_CPU = [0.0]


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, peak traced MiB); the CPU seconds of the call go to LAST_CPU[0].

    Wall time is what a user waits; CPU time / wall time shows whether the 2 cores were ours
    (other jobs on the machine inflate wall time, not CPU time).
    """
    tracemalloc.start()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    dt = time.perf_counter() - t
    LAST_CPU[0] = time.process_time() - c
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, dt, peak


def make_memmaps(directory: Path, n: int, d: int, seed: int = 0, block: int = 65536) -> tuple[np.memmap, np.memmap]:
    """X with a decaying spectrum and mean 3; Y = a signed permutation of X's signal + noise.

    Drawing 2·n·d fresh normals costs more than the benchmark itself, so each block reuses one
    pool of normals, rolled by a random offset and sign-flipped per column (cheap, and the
    streaming code cannot tell).
    """
    rng = np.random.default_rng(seed)
    X = np.lib.format.open_memmap(directory / "x.npy", mode="w+", dtype=np.float32, shape=(n, d))
    Y = np.lib.format.open_memmap(directory / "y.npy", mode="w+", dtype=np.float32, shape=(n, d))
    scale = (1.0 / np.sqrt(np.arange(1, d + 1))).astype(np.float32)
    perm, sign = rng.permutation(d), rng.choice(np.float32([-1, 1]), d)
    pool = rng.standard_normal((block + 4096, d), dtype=np.float32)
    for s in range(0, n, block):
        b = min(block, n - s)
        o1, o2 = rng.integers(0, 4096, 2)
        flip = rng.choice(np.float32([-1, 1]), d)
        x = pool[o1 : o1 + b] * (scale * flip)
        X[s : s + b] = x + 3.0
        Y[s : s + b] = 0.6 * x[:, perm] * sign + 0.8 * pool[o2 : o2 + b, ::-1] * scale[perm]
    X.flush(), Y.flush()
    return np.load(directory / "x.npy", mmap_mode="r"), np.load(directory / "y.npy", mmap_mode="r")


def sparse_codes(n: int, m: int, k: int, n_shared: int, seed: int = 0) -> tuple[sparse.csr_matrix, sparse.csr_matrix, np.ndarray]:
    """TopK-like codes (k active of m per token); A's features < n_shared co-fire with B's perm[f]."""
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, m, (n, k))
    perm = rng.permutation(m)
    ib = np.where(ia < n_shared, perm[ia], rng.integers(0, m, (n, k)))
    va = rng.exponential(1.0, (n, k)).astype(np.float32)
    # shared slots: B's magnitude follows A's; private slots: independent magnitudes (a true null)
    vb = np.where(ia < n_shared, va * rng.uniform(0.5, 1.5, (n, k)), rng.exponential(1.0, (n, k))).astype(np.float32)
    indptr = np.arange(0, n * k + 1, k)
    A = sparse.csr_matrix((va.ravel(), ia.ravel(), indptr), shape=(n, m))
    B = sparse.csr_matrix((vb.ravel(), ib.ravel(), indptr), shape=(n, m))
    A.sum_duplicates(), B.sum_duplicates()
    return A, B, perm


def bench_cka(n: int, d: int, gram_ns: list[int], where: str | None = None) -> list[tuple[str, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        t = time.perf_counter()
        X, Y = make_memmaps(Path(tmp), n, d)
        print(f"  wrote 2 x [{n:,} x {d}] float32 memmaps ({2 * n * d * 4 / 2**30:.1f} GiB) in {time.perf_counter() - t:.1f}s", flush=True)
        cka, t_cka, mem_cka = timed(lambda: linear_cka(X, Y))
        c_cka = LAST_CPU[0]
        print(f"  streaming linear CKA = {cka:.4f}: {t_cka:.1f}s wall, {c_cka:.1f}s CPU, peak {mem_cka:.0f} MiB", flush=True)
        sv, t_sv, mem_sv = timed(lambda: svcca(X, Y, keep=0.99, method="moments"))
        c_sv = LAST_CPU[0]
        print(f"  streaming SVCCA      = {sv:.4f}: {t_sv:.1f}s wall, {c_sv:.1f}s CPU, peak {mem_sv:.0f} MiB", flush=True)
        # O(n²) Gram formula on the first rows, extrapolated quadratically in n (time and memory)
        gram = []
        for g in gram_ns:
            Xg, Yg = np.asarray(X[:g]), np.asarray(Y[:g])
            val, t_g, mem_g = min((timed(lambda: linear_cka_gram(Xg, Yg)) for _ in range(2)), key=lambda r: r[1])
            ref = linear_cka(Xg, Yg)
            gram.append((g, t_g, mem_g))
            print(f"  Gram CKA at n={g:,}: {t_g:.2f}s, peak {mem_g:.0f} MiB (|Gram - streaming| = {abs(val - ref):.1e})", flush=True)
        g, t_g, mem_g = gram[-1]
        t_extra, mem_extra = t_g * (n / g) ** 2, mem_g * (n / g) ** 2
        rows += [
            (f"linear CKA streaming, n={n:,} d={d}", t_cka, mem_cka),
            ("  (CPU seconds of the above, 2 threads)", c_cka, float("nan")),
            (f"SVCCA streaming (99% var), n={n:,} d={d}", t_sv, mem_sv),
            ("  (CPU seconds of the above, 2 threads)", c_sv, float("nan")),
            (f"linear CKA Gram O(n²), n={g:,} (measured)", t_g, mem_g),
            (f"linear CKA Gram O(n²), n={n:,} (extrapolated)", t_extra, mem_extra),
        ]
        print(f"  Gram / streaming at n={n:,}: {t_extra / t_cka:,.0f}x time, {mem_extra / max(mem_cka, 1):,.0f}x memory")
    return rows


def bench_matching(n: int, m: int, k: int, n_null: int, n_boot: int) -> list[tuple[str, float, float]]:
    A, B, perm = sparse_codes(n, m, k, n_shared=m // 4)
    pid = np.arange(n) // 64  # 64-token passages
    rows = []
    S, t, mem = timed(lambda: code_correlation(A, B))
    rows.append((f"code correlation {m}x{m}, n={n:,} (k={k})", t, mem))
    (ia, ib), t_h, mem_h = timed(lambda: hungarian(S))
    rows.append((f"Hungarian ({'dense' if m * m <= 4096**2 else 'sparse LAPJVsp'}) {m}x{m}", t_h, mem_h))
    (ja, jb), t_m, mem_m = timed(lambda: mutual_nn(lambda r0, r1: S[r0:r1], m, m))
    rows.append((f"mutual NN {m}x{m}", t_m, mem_m))
    shared = ia < m // 4
    print(f"  Hungarian recovers {np.mean(ib[shared] == perm[ia[shared]]):.3f} of planted shared pairs; MNN {len(ja)} pairs")
    del S
    n_tr = int(0.8 * n)
    res, t_all, mem_all = timed(lambda: match_features(
        A[:n_tr], B[:n_tr], pid[:n_tr], A[n_tr:], B[n_tr:], pid[n_tr:],
        methods=("hungarian", "mnn"), n_null=n_null, n_boot=n_boot, rng=np.random.default_rng(0)))  # fmt: skip
    hung = res["hungarian"]
    sig = hung.significant(0.05)
    correct = hung.feat_b == perm[hung.feat_a]
    print(f"  match_features: {sig.sum()} significant Hungarian matches, precision {correct[sig].mean():.3f}, "
          f"recall {np.sum(sig & correct) / (m // 4):.3f}")  # fmt: skip
    rows.append((f"match_features m={m} (n_null={n_null}, n_boot={n_boot})", t_all, mem_all))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n = 100k, m = 4096 (~30 s)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--m", type=int, default=None)
    ap.add_argument("--dir", default=None, help="where to put the memmaps (default: the system temp dir)")
    ap.add_argument("--skip-matching", action="store_true")
    args = ap.parse_args(argv)
    n = args.n or (100_000 if args.quick else 1_000_000)
    m = args.m or (4096 if args.quick else 16384)
    print(f"CKA / SVCCA (n={n:,}, d={args.d})", flush=True)
    rows = bench_cka(n, args.d, [1000, 2000, 4000] if not args.quick else [1000, 2000], args.dir)
    if not args.skip_matching:
        print(f"feature matching (m={m})", flush=True)
        rows += bench_matching(n=50_000 if not args.quick else 20_000, m=m, k=32, n_null=1000, n_boot=2)
    w = max(len(r[0]) for r in rows)
    print(f"\n{'benchmark':<{w}}  {'seconds':>12}  {'peak MiB':>12}")
    for name, t, mem in rows:
        print(f"{name:<{w}}  {t:>12,.2f}  {mem:>12,.0f}".replace("nan", "   "))


if __name__ == "__main__":
    sys.exit(main())
