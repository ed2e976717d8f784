"""Scale-out over torch.distributed, on CPU with the gloo backend: 2 ranks must give what 1 gives.

Ranks are spawned with `torch.multiprocessing` and join a gloo group through the same environment
variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...), so the code under test is the code
torchrun runs; one test launches the CLI under a real `torchrun`.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from crossdict.config import SAEConfig
from crossdict.distributed import Dist, DistributedConfigError, destroy, init_dist, split_work
from crossdict.sae import load_sae
from crossdict.train import train_sae


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest; same in the single-process reference


def _entry(rank: int, world: int, port: int, fn, args: tuple, err_dir: str) -> None:
    # As under torchrun, the rendezvous store lives in a parent process (the agent's role), not in rank 0:
    # otherwise rank 0 exiting first can take the store away while rank 1 is still leaving the group.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    dist = init_dist("cpu")
    finished = False
    try:
        fn(dist, *args)
        finished = True
    except Exception as e:  # the parent asserts on what each rank raised
        Path(err_dir, f"rank{rank}.json").write_text(json.dumps({"type": type(e).__name__, "msg": str(e),
                                                                 "tb": traceback.format_exc()}))
        raise
    finally:
        destroy(dist, finished)


def spawn(fn, world: int, *args, err_dir: Path) -> None:
    """Run `fn(dist, *args)` on `world` gloo ranks; raises if any rank failed (its error in err_dir)."""
    err_dir.mkdir(parents=True, exist_ok=True)
    store = tdist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    try:
        mp.spawn(_entry, args=(world, store.port, fn, args, str(err_dir)), nprocs=world, join=True)
    finally:
        del store


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


# --- sharded extraction ------------------------------------------------------------------------------


def extract_cfg(tiny_models, root: Path, **extract) -> dict:
    """4 shards of 16 passages from tests/test_extract.py's setup; floor on, sweep off (rank 0 only anyway)."""
    text = root.parent / "corpus.txt"
    if not text.exists():
        from conftest import corpus_texts

        text.write_text("\n\n".join(corpus_texts(400)))
    return {
        "run_name": "tiny", "output_dir": str(root),
        "model_a": {"name": str(tiny_models["gpt2"]), "layers": [1, 2], "max_ctx": 48},
        "model_b": {"name": str(tiny_models["llama"]), "layers": [0, 2], "max_ctx": 40},
        "corpus": {"source": str(text), "max_passages": 60, "passage_chars": 400},
        "extract": {"batch_size": 8, "shard_passages": 16, "random_floor": True, "layer_sweep_tokens": 0, **extract},
        "align": {"min_passages": 5},  # 9 of the 60 passages are held out; extraction checks the splits up front
    }


def cache_files(run_dir: Path) -> dict[str, bytes]:
    """Every array, passage text and shard marker of the main and floor caches, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("shard_*/*"))
            if p.suffix == ".npy" or p.name in ("passages.json", "done.json")}


@pytest.fixture(scope="module")
def one_rank_cache(tiny_models, tmp_path_factory) -> Path:
    from crossdict.config import config_from_dict
    from crossdict.extract import run_extract

    cfg = config_from_dict(extract_cfg(tiny_models, tmp_path_factory.mktemp("one") / "runs"))
    run_extract(cfg, progress=False)
    return cfg.run_dir


def _extract_worker(dist: Dist, cfg_dict: dict, die_after: int | None = None) -> None:
    from crossdict import extract
    from crossdict.config import config_from_dict

    if die_after is not None and dist.rank == 1:
        real = extract.write_shard
        calls = []

        def write_then_die(cache_dir, shard, data):
            if len(calls) == die_after:  # crash half-way through writing this shard: one file, no marker
                extract.atomic_save_npy(extract.shard_dir(cache_dir, shard) / "a.tokens.npy", data.tokens["a"])
                os._exit(3)
            calls.append(shard)
            return real(cache_dir, shard, data)

        extract.write_shard = write_then_die
    extract.run_extract(config_from_dict(cfg_dict), progress=False, dist=dist)


def test_two_rank_extraction_equals_one_rank(tiny_models, one_rank_cache, tmp_path):
    cfg = extract_cfg(tiny_models, tmp_path / "runs")
    spawn(_extract_worker, 2, cfg, err_dir=tmp_path / "err")
    run_dir = tmp_path / "runs" / "tiny"
    want, got = cache_files(one_rank_cache), cache_files(run_dir)
    assert len(want) > 40 and sorted(got) == sorted(want)
    assert any(k.startswith("cache_random/") for k in got)  # the floor was sharded too
    assert [k for k in want if got[k] != want[k]] == []
    m1, m2 = (json.loads((d / "cache" / "manifest.json").read_text()) for d in (one_rank_cache, run_dir))
    assert m2["complete"] and m2["counts"] == m1["counts"] and m2["corpus_fingerprint"] == m1["corpus_fingerprint"]


def test_rank_dying_mid_extraction_resumes_its_shards(tiny_models, one_rank_cache, tmp_path):
    from crossdict.cache import shard_dir, shard_is_done

    cfg = extract_cfg(tiny_models, tmp_path / "runs")
    cache_dir = tmp_path / "runs" / "tiny" / "cache"
    # Shards 0-3 are dealt 0,2 -> rank 0 and 1,3 -> rank 1; rank 1 dies while writing shard 3.
    with pytest.raises(mp.ProcessExitedException, match="exit code 3"):
        spawn(_extract_worker, 2, cfg, 1, err_dir=tmp_path / "err")
    assert not json.loads((cache_dir / "manifest.json").read_text())["complete"]
    assert shard_is_done(cache_dir, 1) and not shard_is_done(cache_dir, 3)
    assert (shard_dir(cache_dir, 3) / "a.tokens.npy").is_file()  # the half-written shard
    kept = {s: (shard_dir(cache_dir, s) / "a.blocks.2.hook_resid_post.npy").stat().st_mtime_ns
            for s in range(4) if shard_is_done(cache_dir, s)}
    spawn(_extract_worker, 2, cfg, err_dir=tmp_path / "err2")
    assert json.loads((cache_dir / "manifest.json").read_text())["complete"]
    for s, mtime in kept.items():  # finished shards were not redone
        assert (shard_dir(cache_dir, s) / "a.blocks.2.hook_resid_post.npy").stat().st_mtime_ns == mtime
    want, got = cache_files(one_rank_cache), cache_files(tmp_path / "runs" / "tiny")
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == []


def _mismatch_worker(dist: Dist, cfg_dict: dict) -> None:
    from crossdict.config import config_from_dict
    from crossdict.extract import run_extract

    if dist.rank == 1:
        cfg_dict = {**cfg_dict, "corpus": {**cfg_dict["corpus"], "max_passages": 30}}  # e.g. a stray --set
    run_extract(config_from_dict(cfg_dict), progress=False, dist=dist)


def test_mismatched_configs_across_ranks_are_refused(tiny_models, tmp_path):
    cfg = extract_cfg(tiny_models, tmp_path / "runs")
    with pytest.raises(mp.ProcessRaisedException, match="DistributedConfigError"):
        spawn(_mismatch_worker, 2, cfg, err_dir=tmp_path / "err")
    errs = rank_errors(tmp_path / "err")
    assert set(errs) <= {0, 1} and errs  # every rank that got to report refused
    for e in errs.values():
        assert e["type"] == "DistributedConfigError"
        assert "ranks [0] have config hash" in e["msg"] and "ranks [1] have config hash" in e["msg"]
        assert "same --config file" in e["msg"]
    assert not (tmp_path / "runs" / "tiny" / "cache").exists()  # refused before any work


def test_more_ranks_than_shards_is_a_clear_error(tiny_models, tmp_path):
    cfg = extract_cfg(tiny_models, tmp_path / "runs", shard_passages=64)  # 60 passages: 1 shard for 2 ranks
    with pytest.raises(mp.ProcessRaisedException, match="DistributedConfigError"):
        spawn(_extract_worker, 2, cfg, err_dir=tmp_path / "err")
    msg = next(iter(rank_errors(tmp_path / "err").values()))["msg"]
    assert "2 ranks but only 1 extraction shards" in msg
    assert "--nproc_per_node 1" in msg and "lower extract.shard_passages" in msg


def test_split_work_messages():
    split_work(4, Dist(rank=0, world_size=4), "shards", "x")  # even: silent
    with pytest.warns(UserWarning, match="5 shards over 2 ranks: ranks get 2 or 3"):
        split_work(5, Dist(rank=0, world_size=2), "shards", "lower extract.shard_passages")
    with pytest.raises(DistributedConfigError, match="3 ranks but only 2 SAEs"):
        split_work(2, Dist(rank=0, world_size=3), "SAEs", "y")


# --- cost model --------------------------------------------------------------------------------------


def test_plan_sizes_match_a_real_cache_and_times_scale(tiny_models, one_rank_cache, tmp_path, capsys):
    from crossdict.config import config_from_dict
    from crossdict.plan import make_plan, print_plan

    cfg = config_from_dict(extract_cfg(tiny_models, one_rank_cache.parent))
    plan = make_plan(cfg, [1, 2, 8], calibrate=False)
    assert plan["source"] == "the finished cache" and plan["shards"] == 4
    for k in ("a", "b"):  # states: exact arithmetic, the files add only their 128-byte .npy headers
        files = list((one_rank_cache / "cache").glob(f"shard_*/{k}.blocks.*.npy"))
        on_disk = sum(f.stat().st_size - 128 for f in files)
        assert plan["disk"][f"cache: model {k} states"] == on_disk
    # Without a cache the counts come from tokenizing the corpus as extraction does.
    fresh = config_from_dict(extract_cfg(tiny_models, tmp_path / "runs"))
    guess = make_plan(fresh, [1], calibrate=False)
    assert guess["source"].startswith("tokenizing")
    for k in ("a", "b"):
        assert guess["tokens"][k] == pytest.approx(plan["tokens"][k], rel=0.02)
    p = print_plan(cfg, [1, 2, 8])
    out = capsys.readouterr().out
    assert "us/token/block" in out and "too many" in out  # 8 ranks > 4 shards
    w = p["workers"]
    assert w[8]["extract_s"] is None and w[8]["train_modules_s"] is None  # 8 ranks > 4 SAEs: refused
    assert w[2]["extract_s"] == pytest.approx(w[1]["extract_s"] / 2) and w[1]["extract_s"] > 0
    assert w[2]["train_ddp_s"] == pytest.approx(w[1]["train_ddp_s"] / 2)


# --- SAE stage: one SAE per rank under a real torchrun, data-parallel run_train ----------------------


def train_run(tiny_models, one_rank_cache: Path, root: Path) -> dict:
    """The tiny config with a small SAE section, over a copy of the 1-rank cache."""
    import shutil

    shutil.copytree(one_rank_cache / "cache", root / "tiny" / "cache")
    return {**extract_cfg(tiny_models, root), "sae": {"expansion_factor": 2, "k": 4, "batch_size": 64,
                                                      "train_tokens": 64 * 12, "lr_warmup_steps": 2}}


def sae_tensors(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.glob("saes/*/*/sae_weights.safetensors"))}


def _run_train_worker(dist: Dist, cfg_dict: dict) -> None:
    from crossdict.config import config_from_dict
    from crossdict.train import run_train

    run_train(config_from_dict(cfg_dict), progress=False, dist=dist)


def test_train_under_torchrun_and_data_parallel(tiny_models, one_rank_cache, tmp_path):
    import csv
    import subprocess
    import sys

    from crossdict.config import config_from_dict, dump_config
    from crossdict.train import run_train

    ref = config_from_dict(train_run(tiny_models, one_rank_cache, tmp_path / "one"))
    run_train(ref, progress=False)
    want = sae_tensors(ref.run_dir)
    assert len(want) == 4

    # One SAE per rank, through the CLI under torchrun: each SAE trained alone, so bit-identical.
    cfg = config_from_dict(train_run(tiny_models, one_rank_cache, tmp_path / "tr"))
    (tmp_path / "tr.yaml").write_text(dump_config(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "crossdict.cli", "train", "--config", str(tmp_path / "tr.yaml"), "--distribute-modules",
                        "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 SAEs, whole SAEs dealt to 2 ranks" in r.stdout
    assert r.stdout.count("[crossdict] train done") == 1  # rank 0 reports
    assert sae_tensors(cfg.run_dir) == want
    rows = lambda d: [{k: v for k, v in row.items() if k != "wall_s"}  # noqa: E731
                      for row in csv.DictReader((d / "report" / "sae_metrics.csv").open())]
    assert rows(cfg.run_dir) == rows(ref.run_dir)

    # Data-parallel: every SAE over both ranks; equal to single-process within float tolerance.
    dp = config_from_dict(train_run(tiny_models, one_rank_cache, tmp_path / "dp"))
    spawn(_run_train_worker, 2, dp.to_dict(), err_dir=tmp_path / "err")
    for (k, layer, seed) in [("a", 1, 0), ("a", 2, 0), ("b", 0, 0), ("b", 2, 0)]:
        got, exp = load_sae(dp.sae_dir(k, layer, seed)), load_sae(ref.sae_dir(k, layer, seed))
        for name, w in exp.state_dict().items():
            torch.testing.assert_close(got.state_dict()[name], w, atol=2e-5, rtol=1e-4)
    for a, b in zip(rows(dp.run_dir), rows(ref.run_dir)):
        assert float(a["fvu"]) == pytest.approx(float(b["fvu"]), rel=1e-3)


def test_global_batch_must_split_evenly():
    from crossdict.train import _batch_slice

    assert _batch_slice(128, Dist(rank=1, world_size=2)) == (64, 128)
    with pytest.raises(DistributedConfigError, match=r"sae.batch_size=100 does not split evenly over 3 ranks.*e.g. 99"):
        _batch_slice(100, Dist(rank=0, world_size=3))
