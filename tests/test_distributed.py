"""Scale-out over torch.distributed, on CPU with the gloo backend: 2 ranks must give what 1 gives.

Ranks are spawned with `torch.multiprocessing` and join a gloo group through the same environment
variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...), so the code under test is the code
torchrun runs; one test launches the CLI under a real `torchrun`.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from crossdict.config import SAEConfig
from crossdict.distributed import Dist, DistributedConfigError, destroy, init_dist, split_work
from crossdict.sae import load_sae
from crossdict.train import train_sae


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Both ranks share 2 cores; one intra-op thread each, and the same in the single-process reference.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple, err_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = init_dist("cpu")
    try:
        fn(dist, *args)
    except Exception as e:  # the parent asserts on what each rank raised
        Path(err_dir, f"rank{rank}.json").write_text(json.dumps({"type": type(e).__name__, "msg": str(e),
                                                                 "tb": traceback.format_exc()}))
        raise
    finally:
        destroy(dist)


def spawn(fn, world: int, *args, err_dir: Path) -> None:
    """Run `fn(dist, *args)` on `world` gloo ranks; raises if any rank failed (its error in err_dir)."""
    err_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(world, _free_port(), fn, args, str(err_dir)), nprocs=world, join=True)


def rank_errors(err_dir: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(err_dir.glob("rank*.json"))}


# --- data-parallel SAE training --------------------------------------------------------------------


def planted_rows(n: int = 2048, d: int = 32, seed: int = 0) -> np.ndarray:
    """Sparse sums of random unit directions, like tests/test_sae.py's `planted`."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((96, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, 96)), axis=1)[:, :3]
    x = np.einsum("na,nad->nd", rng.uniform(0.5, 1.5, (n, 3)), dirs[idx]) + 0.01 * rng.standard_normal((n, d))
    return x.astype(np.float32)


class Arr:
    def __init__(self, x: np.ndarray):
        self.x, self.shape = x, x.shape

    def take(self, rows):
        return self.x[np.asarray(rows)]


ARCHS = ("topk", "batchtopk", "l1")


def sae_cfg(arch: str) -> SAEConfig:
    # dead_tokens_threshold small enough that AuxK (global dead mask) is exercised within the run.
    return SAEConfig(architecture=arch, expansion_factor=4, k=4, batch_size=128, train_tokens=128 * 30,
                     lr=1e-3, lr_warmup_steps=3, l1_warmup_steps=3, l1_coefficient=1.0,
                     dead_tokens_threshold=128, checkpoint_every=1000)


def _train_worker(dist: Dist, out: str) -> None:
    x = planted_rows()
    for arch in ARCHS:
        train_sae(Arr(x), np.arange(len(x)), sae_cfg(arch), 0, Path(out) / arch, False, progress=False, dist=dist)


def test_ddp_training_matches_single_process(tmp_path):
    spawn(_train_worker, 2, str(tmp_path / "ddp"), err_dir=tmp_path / "err")
    x = planted_rows()
    for arch in ARCHS:
        ref = train_sae(Arr(x), np.arange(len(x)), sae_cfg(arch), 0, tmp_path / "one" / arch, False, progress=False)
        got = load_sae(tmp_path / "ddp" / arch)
        want = load_sae(tmp_path / "one" / arch)
        for name, w in want.state_dict().items():
            torch.testing.assert_close(got.state_dict()[name], w, atol=2e-5, rtol=1e-4, msg=f"{arch} {name}")
        # Not a trivial match: training moved the weights, and AuxK saw dead latents.
        log_one = [json.loads(s) for s in (tmp_path / "one" / arch / "training_log.jsonl").read_text().splitlines()]
        log_ddp = [json.loads(s) for s in (tmp_path / "ddp" / arch / "training_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log_ddp] == [r["step"] for r in log_one]
        for a, b in zip(log_one, log_ddp):
            for k in ("fvu", "l0", "loss", "auxk_loss", "l1_loss", "dead_frac"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (arch, a["step"], k)
        assert log_one[-1]["fvu"] < 0.95 * log_one[0]["fvu"]
        if arch != "l1":
            assert any(r["auxk_loss"] > 0 for r in log_one)
        assert ref.W_dec.shape == got.W_dec.shape
