"""The seed's hub pair without a hub: real GPT-2 / GPT-NeoX tokenizers, random-weight stand-ins.

Vocabularies come from the pinned llama-cpp-python sdist on PyPI (downloaded once, cached under
~/.cache/crossdict/standins or $CROSSDICT_STANDINS); the stand-in models are built there once.
"""

from __future__ import annotations

import torch

from crossdict.backend_tlens import TLensBackend
from crossdict.extract import random_init_like


def test_random_floor_works_behind_the_tlens_backend(tiny_models, tiny_tokenizers):
    """The seed's configs use backend tlens with extract.random_floor on (the default)."""
    from transformers import AutoModelForCausalLM

    path = tiny_models["gpt2"]
    model = AutoModelForCausalLM.from_pretrained(path)
    backend = TLensBackend.from_hf(model, tiny_tokenizers["gpt2"], str(path), "tiny-gpt2")
    rand = random_init_like(backend, seed=3)
    batch = backend.tokenize(["Random weights give the floor."], 32)
    h_trained = backend.hidden_states(batch, [1])[1]
    h_rand = rand.hidden_states(batch, [1])[1]
    assert rand.n_layers == backend.n_layers and rand.d_model == backend.d_model
    assert h_rand.shape == h_trained.shape and not torch.allclose(h_rand, h_trained)


# --- vocabularies and tokenizers ------------------------------------------------------------------

import json  # noqa: E402
import re  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from crossdict import standins  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# transformers' tests/models/gpt_neox/test_tokenization_gpt_neox.py (integration_expected_token_ids,
# tokenizer EleutherAI/gpt-neox-20b) on the common integration text; its expected list has no ids
# for the " 😊" of that text, so we compare on the text without it.
NEOX_TEXT = ("This is a test\nI was born in 92000, and this is falsé.\n生活的真谛是\nHi  Hello\nHi   Hello\n\n \n  \n"
             " Hello\n<s>\nhi<s>there\nThe following string should be properly encoded: Hello.\nBut ird and ปี   ird   ด\n"
             "Hey how are you doing")
NEOX_IDS = [1552, 310, 247, 1071, 187, 42, 369, 5686, 275, 898, 6914, 13, 285, 436, 310, 21649, 860, 15, 187, 20025,
            46549, 5225, 48561, 33656, 238, 12105, 187, 12764, 50276, 12092, 187, 12764, 50275, 12092, 46603, 50276, 187,
            24387, 187, 29, 84, 31, 187, 5801, 29, 84, 31, 9088, 187, 510, 1563, 2876, 943, 320, 6283, 16202, 27, 24387,
            15, 187, 1989, 209, 1817, 285, 209, 2869, 238, 26863, 50275, 1817, 50275, 35071, 187, 8262, 849, 403, 368, 2509]


@pytest.fixture(scope="session")
def standin_root() -> Path:
    try:
        standins.fetch_vocab(standins.default_dir())
    except standins.StandinError as e:
        pytest.fail(f"cannot fetch the stand-in vocabularies (needs PyPI once): {e}")
    return standins.default_dir()


@pytest.fixture(scope="session")
def small_hub(standin_root) -> Path:
    return standins.build_standins(standin_root, standins.SMALL_PAIR)


@pytest.fixture
def hub_cache(monkeypatch, small_hub) -> Path:
    """Point huggingface_hub at the stand-in cache (read at call time; HF_HUB_OFFLINE is set in conftest)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(small_hub))
    return small_hub


def test_fetch_vocab_is_idempotent_and_checks_hashes(standin_root):
    t0 = time.perf_counter()
    vocab = standins.fetch_vocab(standin_root)
    assert time.perf_counter() - t0 < 5  # hashes only, no download
    assert sorted(p.name for p in vocab.iterdir()) == sorted(standins.VOCAB_FILES)


def test_gpt2_tokenizer_reproduces_llamacpp_test_vectors(standin_root):
    vocab = standins.fetch_vocab(standin_root)
    vectors = standins.read_llamacpp_vectors(vocab / "ggml-vocab-gpt-2.gguf.inp", vocab / "ggml-vocab-gpt-2.gguf.out")
    tok = standins.load_tokenizer("gpt2", standin_root)
    wrong = [(text, ids, tok(text, add_special_tokens=False)["input_ids"]) for text, ids in vectors
             if tok(text, add_special_tokens=False)["input_ids"] != ids]
    assert len(vectors) == 46 and wrong == []
    assert tok("Hello world")["input_ids"] == [15496, 995] and len(tok) == 50257


def test_neox_tokenizer_matches_gpt_neox_20b_ids_and_round_trips(standin_root):
    from conftest import corpus_texts

    tok = standins.load_tokenizer("gpt-neox-20b", standin_root)
    assert tok(NEOX_TEXT, add_special_tokens=False)["input_ids"] == NEOX_IDS
    assert len(tok) == 50277 and tok.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|padding|>"]
    for text in corpus_texts(200) + [NEOX_TEXT + " 😊 — ǅ e\u0301"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # NFC is the only normalisation: decoding gives back the NFC form of the text.
        import unicodedata

        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


# --- stand-in models through TransformerLens ------------------------------------------------------


@pytest.mark.parametrize("name", standins.SMALL_PAIR)
def test_tl_hub_load_matches_hf_hidden_states_after_bos(hub_cache, one_thread, name):
    from transformers import AutoModelForCausalLM

    backend = TLensBackend.load(name)
    spec = standins.SEED_MODELS[name]
    assert backend.n_layers == spec.get("n_layer", spec.get("num_hidden_layers"))
    assert backend.has_bos and backend.info["kind"] == "hub"
    texts = ["The quick brown fox  jumps\n\tover 3 lazy dogs.", "  Leading spaces, é and 😊 emoji"]
    batch = backend.tokenize(texts, 64)
    bos = backend.tokenizer.bos_token_id
    assert (batch.input_ids[:, 0] == bos).all() and (batch.offsets[:, 0] == -1).all()  # TL's BOS, not content
    # byte-level BPE spans: each text token's span is exactly the characters it encodes
    for row, text in enumerate(texts):
        n = int(batch.attention_mask[row].sum())
        ends = batch.offsets[row, 1:n, 1].tolist()
        assert ends == sorted(ends) and ends[-1] == len(text)
        pieces = backend.tokenizer.convert_ids_to_tokens(batch.input_ids[row, 1:n].tolist())
        for (s, e), piece in zip(batch.offsets[row, 1:n].tolist(), pieces):
            if piece.isascii():  # multi-byte characters split into byte tokens share one span
                assert backend.tokenizer.convert_tokens_to_string([piece]) == text[s:e]
    layers = [0, backend.n_layers // 2, backend.n_layers - 2]
    tl = backend.hidden_states(batch, layers)
    hf = AutoModelForCausalLM.from_pretrained(standins.snapshot_dir(hub_cache, name)).eval()
    with torch.no_grad():
        out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    mask = batch.attention_mask.bool()
    for layer in layers:  # hidden_states[L + 1] is block L's output (the last one is normed)
        torch.testing.assert_close(tl[layer][mask], out.hidden_states[layer + 1][mask], atol=2e-4, rtol=1e-4)


def _copy_snapshot(src_cache: Path, dst_cache: Path, name: str) -> Path:
    shutil.copytree(standins._repo_dir(src_cache, name), standins._repo_dir(dst_cache, name), symlinks=True,
                    copy_function=os.symlink)
    return standins.snapshot_dir(dst_cache, name)


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_standin_with_a_missing_file_names_it(small_hub, tmp_path, monkeypatch, missing):
    from huggingface_hub import constants

    snap = _copy_snapshot(small_hub, tmp_path, "gpt2")
    (snap / missing).unlink()
    with pytest.raises(standins.StandinError, match=rf"{snap / missing} is missing"):
        standins.check_standin(tmp_path, "gpt2")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=rf"could not load 'gpt2' from the model hub .*{re.escape(str(snap))} lacks {re.escape(missing)}"):
        TLensBackend.load("gpt2")


def test_config_without_n_ctx_names_the_config_file(small_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snap = _copy_snapshot(small_hub, tmp_path, "gpt2")
    cfg = json.loads((snap / "config.json").read_text())
    del cfg["n_ctx"]
    (snap / "config.json").unlink()
    (snap / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=rf"{snap / 'config.json'}: lacks a field .*n_ctx"):
        TLensBackend.load("gpt2")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            **extra}


@pytest.mark.parametrize("offline", ["1", "0"])
def test_failing_hub_gives_the_clear_message_within_seconds(tmp_path, offline):
    """Offline with an empty cache, or online against a hub that refuses connections."""
    # Imports first (tens of seconds on a loaded machine); the timed part is the load's failure.
    code = ("import time, transformers.generation, transformer_lens\n"
            "from transformers import GPT2LMHeadModel\n"
            "from crossdict.backend_tlens import TLensBackend\n"
            "t0 = time.perf_counter()\n"
            "try:\n    TLensBackend.load('gpt2')\n"
            "finally:\n    print(f'failed after {time.perf_counter() - t0:.2f} s')\n")
    env = _env(HF_HUB_OFFLINE=offline, HF_HUB_CACHE=str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9",
               TRANSFORMERS_OFFLINE=offline)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "could not load 'gpt2' from the model hub" in res.stderr and "packaged model" in res.stderr, res.stderr[-2000:]
    seconds = float(res.stdout.split("failed after ")[1].split()[0])
    # offline: at once; online: huggingface_hub's http_backoff retries a refused connection (~24 s measured)
    assert seconds < (10 if offline == "1" else 60), res.stdout
    print(f"offline={offline}: {res.stdout.strip()}")


# --- the seed's configs end to end ----------------------------------------------------------------

# Every stage, report included, at a budget that fits the fast suite. What costs time here is fixed by
# the real architectures, not by the data: TransformerLens building GPT-2 (124M weights drawn, then
# overwritten), the random-init floor drawing them again, d=768 eigendecompositions in SVCCA, and
# GPT-2's 50257-way unembedding in every transfer forward. So: layer 1 of each model (forward passes
# stop after block 2), 40 passages of 160 characters, one transfer passage of 60 characters, and no
# token/context input floors (their extra spaces double align's cost; the slow tests keep them).
FAST_BUDGET = [
    "corpus.source=builtin:pydocs", "corpus.max_passages=40", "corpus.passage_chars=160", "corpus.heldout_fraction=0.3",
    "model_a.max_ctx=40", "model_b.max_ctx=40", "model_a.layers=[1]", "model_b.layers=[1]", "device=cpu",
    "extract.batch_size=40", "extract.shard_passages=40", "extract.layer_sweep_tokens=120",
    "sae.expansion_factor=2", "sae.k=4", "sae.batch_size=256", "sae.train_tokens=1024", "sae.seeds=[0]",
    "sae.dead_tokens_threshold=500", "sae.aux_k=8", "sae.lm_eval_passages=1",
    "align.n_bootstrap=2", "align.n_null=2", "align.n_match_null=19", "align.n_match_bootstrap=2",
    "align.metric_max_tokens=300", "align.retrieval_candidates=50", "align.retrieval_queries=100",
    "align.input_floors=[]", "align.min_feature_passages=1", "align.min_feature_tokens=1",
    "transfer.n_features=1", "transfer.alphas=[4.0]", "transfer.n_random_controls=2", "transfer.n_passages=1",
    "transfer.passage_chars=60", "transfer.n_patch_features=1", "transfer.n_patch_controls=1",
    # random weights give no significant matches (and the token-stratified null explains every random-weight
    # match); transfer still needs a pair to inject
    "align.match_token_null=false", "align.q_threshold=0.999", "transfer.min_freq=0", "transfer.min_support_passages=1",
]
SMALL_BUDGET = [
    "corpus.source=builtin:pydocs", "corpus.max_passages=48", "corpus.passage_chars=300", "corpus.heldout_fraction=0.3",
    "model_a.max_ctx=64", "model_b.max_ctx=64", "device=cpu",
    "extract.batch_size=16", "extract.shard_passages=24", "extract.layer_sweep_tokens=200",
    "sae.expansion_factor=2", "sae.k=4", "sae.batch_size=256", "sae.train_tokens=2048", "sae.seeds=[0]",
    "sae.dead_tokens_threshold=1000", "sae.aux_k=8",
    "align.n_bootstrap=4", "align.n_null=4", "align.n_match_null=19", "align.n_match_bootstrap=2",
    "align.metric_max_tokens=300", "align.retrieval_candidates=50", "align.retrieval_queries=100",
    "align.min_feature_passages=2", "align.min_feature_tokens=2",
    "transfer.n_features=1", "transfer.alphas=[4.0]", "transfer.n_random_controls=4", "transfer.n_passages=4",
    "transfer.passage_chars=150", "transfer.n_patch_features=1", "transfer.n_patch_controls=2",
    "sae.lm_eval_passages=4",
    "align.match_token_null=false", "align.q_threshold=0.999", "transfer.min_freq=0", "transfer.min_support_passages=1",
]
STAGES = ["extract", "train", "align", "transfer", "report"]


def _cli_args(config: str, out: Path, budget: list[str], extra: list[str]) -> list[str]:
    sets = [a for kv in [*budget, f"output_dir={out}", *extra] for a in ("--set", kv)]
    return ["run", "--config", str(ROOT / config), "--no-progress", *sets]


def run_seed_config(config: str, hub: Path, out: Path, extra: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """`crossdict run` in a fresh process, as a user types it (HF_HUB_CACHE set before any import)."""
    cmd = [sys.executable, "-m", "crossdict.cli", *_cli_args(config, out, SMALL_BUDGET, extra)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(hub)),
                         capture_output=True, text=True, timeout=3000)
    return res, time.perf_counter() - t0


def stage_seconds(run: Path) -> dict[str, float]:
    return {s: json.loads((run / "stages" / f"{s}.json").read_text())["seconds"] for s in STAGES}


def check_finished_run(run: Path, names: list[str], layer_pairs: list[tuple[int, int]]) -> None:
    """Every stage recorded, the report's sections present, metrics and transfer rows for each layer pair."""
    import csv

    records = sorted(p.stem for p in (run / "stages").glob("*.json") if p.name != "digests.json")  # integrity table
    assert records == sorted(STAGES)
    html = (run / "report" / "index.html").read_text()
    for section in ('id="summary"', 'id="universality"', 'id="layers"', 'id="metrics"', 'id="saes"', 'id="matches"',
                    'id="transfer"', 'id="browser"', "data:image/png;base64,"):
        assert section in html, section
    assert all(n in html for n in names)
    rows = list(csv.DictReader((run / "report" / "metrics.csv").open()))
    for la, lb in layer_pairs:
        here = {(r["space"], r["metric"]): r for r in rows if (int(r["layer_a"]), int(r["layer_b"])) == (la, lb)}
        for key in [("resid", "linear_cka"), ("resid", "svcca"), ("resid_random_b", "linear_cka")]:
            assert key in here, (la, lb, key)
            assert 0.0 <= float(here[key]["value"]) <= 1.0 + 1e-6 and int(here[key]["n_passages"]) >= 2
    transfer = list(csv.DictReader((run / "report" / "transfer.csv").open()))
    assert {(int(r["layer_a"]), int(r["layer_b"])) for r in transfer} == set(layer_pairs)
    assert list(csv.DictReader((run / "report" / "stitching.csv").open()))


def check_tl_bos_and_pairing(run: Path, min_rate: float) -> dict:
    """TransformerLens prepends <|endoftext|> as BOS (never stored, never paired); content tokens are the tokenizer's."""
    import numpy as np

    from crossdict.cache import ActivationCache

    cache = ActivationCache(run / "cache")
    counts = json.loads((run / "cache" / "manifest.json").read_text())["counts"]
    texts = cache.passage_texts()
    for key, kind in (("a", "gpt-neox-20b"), ("b", "gpt2")):
        assert cache.model_info(key)["bos"] is True
        tok = standins.load_tokenizer(kind)
        rows = cache.tokens(key)  # [n, 6]: passage, position, start, end, token id, split
        for pid in list(texts)[:5]:
            mine = rows[rows[:, 0] == pid]
            assert mine[0, 1] == 1  # position 0 is TL's BOS, not content
            text = texts[pid][: int(mine[-1, 3])]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert mine[:, 4].tolist() == ids[: len(mine)], (key, pid)
        assert not np.isin(rows[:, 4], [tok.convert_tokens_to_ids("<|endoftext|>")]).any()
    assert counts["pairing_rate_a"] >= min_rate and counts["pairing_rate_b"] >= min_rate, counts
    return counts


def test_small_config_end_to_end_on_standins_fast(hub_cache, tmp_path, one_thread, capsys):
    """configs/small.yaml through the tlens backend on the stand-ins, every stage, in the fast suite (in-process)."""
    from crossdict.cli import main

    t0 = time.perf_counter()
    assert main(_cli_args("configs/small.yaml", tmp_path, FAST_BUDGET, [])) == 0, capsys.readouterr().err[-3000:]
    wall = time.perf_counter() - t0
    run = tmp_path / "small"
    check_finished_run(run, standins.SMALL_PAIR, [(1, 1)])
    counts = check_tl_bos_and_pairing(run, 0.85)
    with capsys.disabled():
        print(f"\nconfigs/small.yaml (fast budget) on stand-ins: {wall:.1f} s; stages {stage_seconds(run)}; "
              f"pairing rate A {counts['pairing_rate_a']:.3f} B {counts['pairing_rate_b']:.3f}")


@pytest.mark.slow  # ~300 s on the loaded 2-core machine: the fast test above covers the path in CI
def test_small_config_end_to_end_on_standins(small_hub, tmp_path):
    res, wall = run_seed_config("configs/small.yaml", small_hub, tmp_path, ["model_a.layers=[2]", "model_b.layers=[5]"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_finished_run(tmp_path / "small", standins.SMALL_PAIR, [(2, 5)])
    check_tl_bos_and_pairing(tmp_path / "small", 0.85)
    print(f"configs/small.yaml on stand-ins: {wall:.1f} s; stages {stage_seconds(tmp_path / 'small')}")


@pytest.mark.slow
def test_default_config_end_to_end_on_standins(standin_root, tmp_path):
    """The seed's default pair (24 blocks, d=1024 each) at its three layer pairs, every stage."""
    hub = standins.build_standins(standin_root, standins.DEFAULT_PAIR)
    # GPT-2-medium's forward (24 blocks, 50257-way unembedding) is ~3x GPT-2's: fewer transfer/LM-eval tokens
    res, wall = run_seed_config("configs/default.yaml", hub, tmp_path, [
        "extract.batch_size=8", "transfer.n_passages=2", "transfer.passage_chars=100", "sae.lm_eval_passages=2"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_finished_run(tmp_path / "default", standins.DEFAULT_PAIR, [(5, 5), (6, 6), (7, 7)])
    check_tl_bos_and_pairing(tmp_path / "default", 0.85)
    print(f"configs/default.yaml on stand-ins: {wall:.1f} s; stages {stage_seconds(tmp_path / 'default')}")
