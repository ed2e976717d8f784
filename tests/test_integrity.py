"""Nothing silently wrong (issue 15, items 1-4): verified content digests, one writer per run dir,
clean interrupts and decoding errors, a real full disk, corpus sanity before any model runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from crossdict.config import config_from_dict

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_cfg(tiny_models, tmp_path, **over):
    """A run small enough to go end to end in seconds: one layer pair, no floor, sweep or transfer."""
    text = tmp_path / "corpus.txt"
    if not text.exists():
        from conftest import corpus_texts

        text.write_text("\n\n".join(corpus_texts(300)))
    d = {
        "run_name": "tiny", "output_dir": str(tmp_path / "runs"),
        "model_a": {"name": str(tiny_models["gpt2"]), "layers": [1], "max_ctx": 48},
        "model_b": {"name": str(tiny_models["llama"]), "layers": [1], "max_ctx": 40},
        "corpus": {"source": str(text), "max_passages": 80, "passage_chars": 300, "heldout_fraction": 0.3},
        "extract": {"batch_size": 16, "shard_passages": 32, "layer_sweep_tokens": 0, "random_floor": False},
        "sae": {"expansion_factor": 2, "k": 4, "batch_size": 128, "train_tokens": 128 * 12, "checkpoint_every": 5,
                "dead_tokens_threshold": 1000, "aux_k": 8},
        "align": {"n_bootstrap": 2, "n_null": 2, "n_match_null": 19, "n_match_bootstrap": 2, "metric_max_tokens": 300,
                  "retrieval_candidates": 30, "retrieval_queries": 60, "match_token_null": False},
        "transfer": {"enabled": False},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(d)


def write_cfg(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.fixture(scope="module")
def finished(tiny_models, tmp_path_factory):
    """A finished tiny run (extract, train, align, report), copied fresh by each test that damages it."""
    from crossdict.pipeline import run_all

    tmp = tmp_path_factory.mktemp("integrity")
    cfg = tiny_cfg(tiny_models, tmp)
    run_all(cfg, progress=False)
    return cfg


@pytest.fixture
def run_copy(finished, tiny_models, tmp_path):
    shutil.copytree(finished.run_dir, tmp_path / "runs" / "tiny")
    return tiny_cfg(tiny_models, tmp_path, corpus={"source": finished.corpus.source})  # the same corpus file


def _shard_file(cfg) -> Path:
    return cfg.cache_dir / "shard_00001" / "a.blocks.1.hook_resid_post.npy"


def _zeros_inside(path: Path, n: int = 65536) -> None:
    """Overwrite `n` bytes in the middle of `path` with zeros; the size stays the same."""
    size = path.stat().st_size
    n = min(n, size // 2)
    with open(path, "r+b") as f:
        f.seek(size // 2 - n // 2)
        f.write(b"\0" * n)


def _truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


# --- 1. digests -----------------------------------------------------------------------------------


def test_atomic_writes_record_digests_and_readers_catch_zeros_and_truncation(tmp_path):
    from crossdict.integrity import CorruptFileError
    from crossdict.utils import atomic_save_npy, atomic_write_json, load_npy, read_json

    arr = np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32)  # 256 KiB
    d = tmp_path / "cache" / "shard_00000"
    atomic_save_npy(d / "x.npy", arr)
    atomic_write_json(d / "done.json", {"n": 1})
    table = json.loads((d / "digests.json").read_text())
    assert table["algorithm"] == "xxh3_128" and set(table["files"]) == {"x.npy", "done.json"}
    assert table["files"]["x.npy"]["size"] == (d / "x.npy").stat().st_size
    np.testing.assert_array_equal(load_npy(d / "x.npy"), arr)

    _zeros_inside(d / "x.npy")  # same size: only the content hash can see it
    with pytest.raises(CorruptFileError, match=r"x\.npy is corrupt \(content changed.*crossdict extract"):
        load_npy(d / "x.npy")
    atomic_save_npy(d / "x.npy", arr)  # rewritten: good again (re-verified, not served from the memo)
    load_npy(d / "x.npy")
    _truncate(d / "done.json")
    with pytest.raises(CorruptFileError, match=r"done\.json is corrupt \(truncated: \d+ bytes, \d+ were written\)"):
        read_json(d / "done.json")


def test_a_damaged_alignment_map_or_crosscoder_is_named_with_its_stage(tmp_path):
    from crossdict.align import LinearMap
    from crossdict.integrity import CorruptFileError

    d = tmp_path / "runs" / "tiny" / "alignment" / "1_1"
    rng = np.random.default_rng(0)
    LinearMap("procrustes", rng.standard_normal((64, 48)).astype(np.float32), np.zeros(48, np.float32)).save(d)
    LinearMap.load(d, "procrustes")
    _zeros_inside(d / "procrustes.safetensors", 1024)
    with pytest.raises(CorruptFileError, match=r"procrustes\.safetensors is corrupt.*crossdict align"):
        LinearMap.load(d, "procrustes")


def test_extract_reextracts_a_corrupt_or_truncated_shard_byte_identically(finished, run_copy, capsys):
    from crossdict.extract import run_extract

    cfg = run_copy
    f = _shard_file(cfg)
    good = f.read_bytes()
    toks = cfg.cache_dir / "shard_00000" / "b.tokens.npy"
    good_toks = toks.read_bytes()
    _zeros_inside(f)
    _truncate(toks)
    capsys.readouterr()
    run_extract(cfg, progress=False)
    out = capsys.readouterr().out
    assert "reusing complete cache" not in out
    assert "shard_00001" in out and "a.blocks.1.hook_resid_post.npy" in out and "content changed" in out
    assert "b.tokens.npy" in out and "truncated" in out
    assert f.read_bytes() == good and toks.read_bytes() == good_toks


@pytest.mark.parametrize("damage", ["shard_zeros", "shard_truncated", "sae_weights_truncated", "sae_cfg_truncated"])
def test_run_reruns_the_stage_that_owns_a_damaged_file(run_copy, damage, capsys):
    from crossdict.pipeline import run_all
    from crossdict.sae import load_sae

    cfg = run_copy
    sae = cfg.sae_dir("a", 1)
    target = {"shard_zeros": _shard_file(cfg), "shard_truncated": _shard_file(cfg),
              "sae_weights_truncated": sae / "sae_weights.safetensors", "sae_cfg_truncated": sae / "cfg.json"}[damage]
    good = target.read_bytes()
    (_zeros_inside if damage == "shard_zeros" else _truncate)(target)
    capsys.readouterr()
    status = run_all(cfg, progress=False)
    out = capsys.readouterr().out
    owner = "extract" if damage.startswith("shard") else "train"
    assert status[owner] == "ran", out
    assert target.name in out and "corrupt" in out
    if owner == "train":
        assert status["extract"] == "skipped"
        load_sae(sae)  # a whole, loadable SAE again (retrained), not the broken file re-blessed
    else:
        assert target.read_bytes() == good  # re-extracted, byte-identical
    status = run_all(cfg, progress=False)
    assert set(status.values()) == {"skipped"}


@pytest.mark.parametrize("deleted", ["shard_dir", "shard_file", "alignment_dir"])
def test_a_deleted_output_fails_verify_and_reruns_the_stage_that_owns_it(run_copy, deleted, capsys):
    """Issue 15 acceptance: after `rm -r cache/shard_00001` (its digests.json goes with it), one deleted shard file or
    a deleted alignment directory, `crossdict run` said every stage "up to date, skipped" and `crossdict verify`
    exited 0; only a stage run alone failed, on "No such file"."""
    from crossdict.cli import main
    from crossdict.pipeline import run_all

    cfg = run_copy
    shard = cfg.cache_dir / "shard_00001"
    good = {p.name: p.read_bytes() for p in shard.iterdir() if p.is_file() and p.name != "digests.json"}
    target = {"shard_dir": shard, "shard_file": _shard_file(cfg),
              "alignment_dir": next((cfg.run_dir / "alignment").iterdir())}[deleted]
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    path = write_cfg(cfg, cfg.run_dir.parent.parent / "cfg.yaml")
    capsys.readouterr()
    assert main(["verify", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "MISSING" in err and str(target) in err, err
    status = run_all(cfg, progress=False)
    out = capsys.readouterr().out
    owner = "align" if deleted == "alignment_dir" else "extract"
    assert status[owner] == "ran" and "deleted" in out, out
    assert status["extract" if owner == "align" else "train"] == "skipped", out
    if owner == "extract":  # extracted again, byte-identical
        assert {p.name: p.read_bytes() for p in shard.iterdir() if p.is_file() and p.name != "digests.json"} == good
    assert main(["verify", "--config", str(path)]) == 0
    assert set(run_all(cfg, progress=False).values()) == {"skipped"}


def test_a_stage_run_alone_names_the_corrupt_file_and_what_to_rerun(run_copy, capsys):
    from crossdict.cli import main

    cfg = run_copy
    _truncate(cfg.sae_dir("b", 1) / "sae_weights.safetensors")
    path = write_cfg(cfg, cfg.run_dir.parent.parent / "cfg.yaml")
    assert main(["align", "--config", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "sae_weights.safetensors is corrupt (truncated" in err and "crossdict train" in err
    assert "Traceback" not in err


def test_verify_command_lists_bad_files_and_exits_nonzero(run_copy, capsys):
    from crossdict.cli import main

    cfg = run_copy
    path = write_cfg(cfg, cfg.run_dir.parent.parent / "cfg.yaml")
    assert main(["verify", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "0 bad" in out and "files ok" in out
    _zeros_inside(_shard_file(cfg))
    _truncate(cfg.sae_dir("a", 1) / "cfg.json")
    assert main(["verify", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "2 bad" in text and "a.blocks.1.hook_resid_post.npy" in text and "cfg.json" in text
    assert "crossdict extract" in text and "crossdict train" in text


def test_verify_an_old_run_without_digests_says_so_and_can_record_them(run_copy, capsys):
    from crossdict.cli import main

    cfg = run_copy
    for t in cfg.run_dir.rglob("digests.json"):
        t.unlink()
    path = write_cfg(cfg, cfg.run_dir.parent.parent / "cfg.yaml")
    assert main(["verify", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no digest recorded" in out and "0 bad" in out
    assert main(["verify", "--config", str(path), "--record-missing"]) == 0
    capsys.readouterr()
    _zeros_inside(_shard_file(cfg))
    assert main(["verify", "--config", str(path)]) == 1


# --- 2. one writer per run dir ----------------------------------------------------------------------


def _holder_process(run_dir: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from crossdict.integrity import run_lock
        with run_lock({str(run_dir)!r}, "train"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code, "--fake-argv"], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.mark.parametrize("command", ["run", "extract", "train", "align", "report"])
def test_a_second_writer_exits_at_once_naming_the_holder(tiny_models, tmp_path, capsys, command):
    from crossdict.cli import main

    cfg = tiny_cfg(tiny_models, tmp_path)
    path = write_cfg(cfg, tmp_path / "cfg.yaml")
    holder = _holder_process(cfg.run_dir)
    try:
        t0 = time.perf_counter()
        assert main([command, "--config", str(path), "--no-progress"]) == 1
        assert time.perf_counter() - t0 < 10
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "--fake-argv" in err and "another crossdict process" in err
        assert not (cfg.run_dir / "cache").exists() and not (cfg.run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (even killed): the lock is free again, the next writer gets it
    from crossdict.integrity import run_lock

    with run_lock(cfg.run_dir, "test"):
        assert json.loads((cfg.run_dir / ".crossdict.lock.json").read_text())["pid"] == os.getpid()


# --- 3. interrupts, decoding, a real full disk ------------------------------------------------------


def test_ctrl_c_ends_any_command_with_one_line_and_exit_130(tiny_models, tmp_path):
    cfg = tiny_cfg(tiny_models, tmp_path)
    path = write_cfg(cfg, tmp_path / "cfg.yaml")
    code = textwrap.dedent(f"""
        import sys, time
        import crossdict.evaluate
        def slow_align(*a, **k):
            print("aligning", flush=True)
            time.sleep(60)
        crossdict.evaluate.run_align = slow_align
        from crossdict.cli import main
        sys.exit(main(["align", "--config", {str(path)!r}, "--no-progress"]))
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert p.stdout.readline().strip() == "aligning"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines() == ["crossdict align: interrupted; rerun the same command to resume"]


def test_a_config_that_is_not_utf8_gets_a_clear_error(tmp_path, capsys):
    from crossdict.cli import main
    from crossdict.config import ConfigError, load_config

    p = tmp_path / "latin1.yaml"
    p.write_bytes("run_name: caf\xe9\nmodel_a: {name: smollm2-135m, layers: [8]}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml.*not UTF-8.*byte 0xe9"):
        load_config(p)
    assert main(["run", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "latin1.yaml" in err and "UTF-8" in err and "Traceback" not in err
    p.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 1 MiB tmpfs (needs root and mount); skipped, saying why, where the machine does not allow it."""
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk-full test needs a real small filesystem")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_real_full_disk_names_the_file_and_keeps_the_old_one(tiny_fs):
    from crossdict.sae import SAE, SAESpec, save_sae
    from crossdict.utils import atomic_save_npy, atomic_write_text, load_npy

    small = np.arange(1000, dtype=np.float32)
    atomic_save_npy(tiny_fs / "a.npy", small)
    big = np.ones((400, 1024), np.float32)  # 1.6 MB: np.save's short write ("... requested and ... written")
    with pytest.raises(OSError, match=r"disk full while writing .*a\.npy") as e:
        atomic_save_npy(tiny_fs / "a.npy", big)
    assert "requested and" not in str(e.value).split("(")[0]
    np.testing.assert_array_equal(load_npy(tiny_fs / "a.npy"), small)  # the old file, intact and verified
    assert not list(tiny_fs.glob(".*.tmp"))
    with pytest.raises(OSError, match=r"disk full while writing .*big\.txt"):
        atomic_write_text(tiny_fs / "big.txt", "x" * 2_000_000)
    sae = SAE(SAESpec("topk", 256, 1024, k=4))  # 2 MB of weights: safetensors' own write error
    with pytest.raises(OSError, match=r"disk full while writing .*sae_weights\.safetensors"):
        save_sae(sae, tiny_fs / "sae")
    assert not list(tiny_fs.rglob(".*.tmp"))


def test_a_real_full_disk_during_a_large_array_write_says_disk_full(tiny_fs):
    """numpy fallocates an array of >= 16 MiB before writing it: on a full disk that fails with "Not enough free space
    to write ... bytes after offset 128" (an OSError with no errno), not the short write of smaller arrays. Every cache
    shard and layer-sweep file of a real run is that large (issue 15: a 30 MiB tmpfs run said "[Errno None] cannot
    write .../layer_sweep/a.npy")."""
    from crossdict.utils import atomic_save_npy, load_npy

    small = np.arange(1000, dtype=np.float32)
    atomic_save_npy(tiny_fs / "a.npy", small)
    with pytest.raises(OSError, match=r"disk full while writing .*a\.npy") as e:
        atomic_save_npy(tiny_fs / "a.npy", np.zeros((4, 1 << 20), np.float32))  # 16 MiB
    assert "Not enough free space" in str(e.value)  # numpy's own words stay, in parentheses
    np.testing.assert_array_equal(load_npy(tiny_fs / "a.npy"), small)  # the old file, intact and verified
    assert not list(tiny_fs.glob(".*.tmp"))


def test_other_write_errors_name_the_file(tmp_path):
    from crossdict.utils import atomic_path

    with pytest.raises(OSError, match=r"cannot write .*x\.bin: "):
        with atomic_path(tmp_path / "x.bin") as tmp:
            raise OSError(5, "Input/output error")


# --- 4. corpus sanity before heavy work --------------------------------------------------------------


def _no_models(monkeypatch):
    from crossdict import extract

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the corpus was checked")

    monkeypatch.setattr(extract, "load_backends", refuse)


def test_random_bytes_corpus_is_refused_with_counts_before_any_model_loads(tiny_models, tmp_path, monkeypatch):
    from crossdict.corpus import CorpusError
    from crossdict.extract import run_extract

    junk = tmp_path / "junk.txt"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    cfg = tiny_cfg(tiny_models, tmp_path, corpus={"source": str(junk)})
    _no_models(monkeypatch)
    with pytest.raises(CorpusError, match=r"junk\.txt.*\d[\d,]* of [\d,]+ characters \(\d+%\) are U\+FFFD.*control") as e:
        run_extract(cfg, progress=False)
    assert "UTF-8" in str(e.value)
    assert not (cfg.cache_dir / "shard_00000").exists()


def test_prose_with_a_few_odd_characters_is_accepted():
    from crossdict.corpus import check_text_quality

    from conftest import corpus_texts

    texts = corpus_texts(50)
    texts[3] = texts[3] + "\ufffd\x07"  # a stray bad byte and a bell: fine
    check_text_quality(texts, "prose")


@pytest.mark.parametrize("max_passages", [1, 12])
def test_too_few_passages_per_split_fail_before_extraction(tiny_models, tmp_path, monkeypatch, max_passages):
    from crossdict.corpus import CorpusError
    from crossdict.extract import run_extract

    cfg = tiny_cfg(tiny_models, tmp_path, corpus={"max_passages": max_passages})
    _no_models(monkeypatch)
    with pytest.raises(CorpusError, match=r"train split has \d+ passages?, the held-out split \d+.*align\.min_passages=10"):
        run_extract(cfg, progress=False)
    assert not (cfg.cache_dir / "shard_00000").exists()
