"""Offline stand-ins for the seed's hub models: real tokenizers, random weights, a hub-shaped cache.

The seed's pair (`configs/default.yaml`: EleutherAI/pythia-410m-deduped-v0 <-> gpt2-medium;
`configs/small.yaml`: pythia-70m-deduped-v0 <-> gpt2) loads through TransformerLens by hub name.
Everything but the trained weights can be had without a hub:

- **Tokenizers.** The `llama-cpp-python` source distribution on PyPI ships llama.cpp's vocabulary
  files `ggml-vocab-gpt-2.gguf` (GPT-2's 50257 tokens and 50000 merges) and `ggml-vocab-gpt-neox.gguf`
  (GPT-NeoX-20B's, which every Pythia model uses), plus llama.cpp's GPT-2 tokenization test vectors
  (`.inp`/`.out`). `fetch_vocab` downloads the pinned sdist with pip (never building it) and keeps
  only those files, checked by SHA-256.
- **Weights.** `build_standins` writes randomly initialised models with the real architectures
  (the hub's own `config.json` fields) into a directory laid out as the Hugging Face hub cache
  (`models--<org>--<name>/snapshots/<rev>/`, `refs/main`). With `HF_HUB_OFFLINE=1` and
  `HF_HUB_CACHE` pointing there, `HookedTransformer.from_pretrained_no_processing("gpt2")` and
  `crossdict run --config configs/small.yaml` load them by hub name.

Both steps are idempotent: a second call checks hashes and markers and returns in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = ("llama-cpp-python", "0.3.36")
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_VOCAB_MEMBER_DIR = "vendor/llama.cpp/models/"
VOCAB_FILES = {
    "ggml-vocab-gpt-2.gguf": "cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac",
    "ggml-vocab-gpt-2.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-gpt-2.gguf.out": "48e8c4cb3ad5c37915b225f872222567c1c4dd4d66951aa53460c8d152ff6d60",
    "ggml-vocab-gpt-neox.gguf": "ae593a7f9b8bb174ed4f5019e41530463e4dac7aa06e42dee8aa650d2bdac53d",
}

# The hub's config.json of each seed model, field for field (architecture, sizes, special ids).
_GPT2_COMMON = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_positions": 1024,
    "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
}
_PYTHIA_COMMON = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
    "initializer_range": 0.02, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
    "model_type": "gpt_neox", "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304,
}
SEED_MODELS: dict[str, dict] = {
    "gpt2": {**_GPT2_COMMON, "n_embd": 768, "n_head": 12, "n_layer": 12},
    "gpt2-medium": {**_GPT2_COMMON, "n_embd": 1024, "n_head": 16, "n_layer": 24, "n_special": 0,
                    "predict_special_tokens": True},
    "EleutherAI/pythia-70m-deduped-v0": {**_PYTHIA_COMMON, "hidden_size": 512, "intermediate_size": 2048,
                                         "num_attention_heads": 8, "num_hidden_layers": 6},
    "EleutherAI/pythia-410m-deduped-v0": {**_PYTHIA_COMMON, "hidden_size": 1024, "intermediate_size": 4096,
                                          "num_attention_heads": 16, "num_hidden_layers": 24},
}
SMALL_PAIR = ["EleutherAI/pythia-70m-deduped-v0", "gpt2"]
DEFAULT_PAIR = ["EleutherAI/pythia-410m-deduped-v0", "gpt2-medium"]
_MARKER = "crossdict_standin.json"
"""Written last into a finished snapshot: what it is (random weights!) and its seed."""
_FORMAT = 1


class StandinError(RuntimeError):
    """The stand-in files cannot be fetched, built or are incomplete; the message names the file."""


def default_dir() -> Path:
    return Path(os.environ.get("CROSSDICT_STANDINS", Path.home() / ".cache" / "crossdict" / "standins"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _vocab_ok(vocab_dir: Path) -> bool:
    return all((vocab_dir / n).is_file() and _sha256(vocab_dir / n) == h for n, h in VOCAB_FILES.items())


def fetch_vocab(root: str | Path | None = None, quiet: bool = True) -> Path:
    """Download the pinned llama-cpp-python sdist once and keep only the vocabulary files.

    Returns `<root>/vocab` holding `VOCAB_FILES`. pip's metadata step for the sdist needs the
    build backend `scikit-build-core` installed (`--no-build-isolation`); nothing is compiled.
    """
    vocab_dir = Path(root or default_dir()) / "vocab"
    if _vocab_ok(vocab_dir):
        return vocab_dir
    vocab_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=vocab_dir.parent, prefix=".fetch") as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
               f"{SDIST[0]}=={SDIST[1]}", "-d", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(tmp.glob("*.tar.gz"))
        if res.returncode != 0 or not sdists:
            hint = ("\nits metadata step needs scikit-build-core: pip install scikit-build-core"
                    if "scikit_build_core" in res.stderr or "scikit-build-core" in res.stderr else "")
            raise StandinError(f"could not download {SDIST[0]}=={SDIST[1]} from PyPI ({' '.join(cmd)}):\n"
                               f"{res.stderr.strip()[-1500:]}{hint}")
        if _sha256(sdists[0]) != SDIST_SHA256:
            raise StandinError(f"{sdists[0].name}: SHA-256 differs from the pinned {SDIST_SHA256}; not using it")
        out = tmp / "vocab"
        out.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and _VOCAB_MEMBER_DIR in member.name and name in VOCAB_FILES:
                    with tar.extractfile(member) as src, open(out / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        missing = [n for n in VOCAB_FILES if not (out / n).is_file()]
        if missing or not _vocab_ok(out):
            raise StandinError(f"{sdists[0].name} lacks or changed {missing or list(VOCAB_FILES)} under {_VOCAB_MEMBER_DIR}")
        shutil.rmtree(vocab_dir, ignore_errors=True)
        os.replace(out, vocab_dir)
    if not quiet:
        print(f"[crossdict] vocabularies from {SDIST[0]}=={SDIST[1]} in {vocab_dir}")
    return vocab_dir


def read_llamacpp_vectors(inp: str | Path, out: str | Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors, split exactly as its `tests/test-tokenizer-0.cpp` does.

    Texts are separated by "\\n__ggml_vocab_test__\\n"; line i of `out` holds text i's ids.
    """
    raw = Path(inp).read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(sep)
    lines = Path(out).read_bytes().decode("utf-8").splitlines()
    if len(texts) != len(lines):
        raise StandinError(f"{inp} has {len(texts)} texts but {out} has {len(lines)} lines")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def gpt2_tokenizer(vocab_dir: str | Path):
    """GPT-2's tokenizer (50257 tokens) from llama.cpp's vocabulary file, via transformers' GGUF reader."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(vocab_dir), gguf_file="ggml-vocab-gpt-2.gguf")
    tok.model_max_length = 1024
    return tok


def neox_tokenizer(vocab_dir: str | Path):
    """GPT-NeoX-20B's tokenizer (Pythia's), rebuilt from llama.cpp's `gptneox` vocabulary file.

    transformers refuses this GGUF architecture, so we build the byte-level BPE ourselves, as
    GPT-NeoX-20B's tokenizer.json has it: NFC normalizer, byte-level pre-tokenizer without prefix
    space, `<|endoftext|>` (0) and `<|padding|>` (1) special, and ids 50254-50276 the added
    (non-special) runs of 24 down to 2 spaces. llama.cpp pads the list to 50432 with `[PAD…]`
    entries that are not part of the tokenizer; we drop them.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(Path(vocab_dir) / "ggml-vocab-gpt-neox.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    n = next(i for i, t in enumerate(tokens) if t.startswith("[PAD"))  # 50277
    control = [i for i in range(n) if types[i] == 3]  # <|endoftext|>, <|padding|>
    added = [i for i in range(n) if types[i] == 4]  # the whitespace runs
    vocab = {t: i for i, t in enumerate(tokens[:n])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    bpe.add_tokens([AddedToken(tokens[i], special=False, normalized=True) for i in added])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=2048)
    if [bpe.token_to_id(t) for t in ("<|endoftext|>", "<|padding|>")] != [0, 1] or len(tok) != n:
        raise StandinError(f"{vocab_dir}/ggml-vocab-gpt-neox.gguf: unexpected special ids or vocabulary size {len(tok)}")
    return tok


def _repo_dir(cache: Path, name: str) -> Path:
    org, _, model = name.rpartition("/")
    return cache / ("models--" + (f"{org}--{model}" if org else model))


def _revision(name: str) -> str:
    """A fixed 40-hex revision per model (the hub uses commit hashes; ours says what it is)."""
    return hashlib.sha1(f"crossdict-standin:{name}:{_FORMAT}".encode()).hexdigest()


def snapshot_dir(cache: str | Path, name: str) -> Path:
    return _repo_dir(Path(cache), name) / "snapshots" / _revision(name)


TOKENIZERS = {"gpt2": gpt2_tokenizer, "gpt-neox-20b": neox_tokenizer}
# The class name the hub's tokenizer_config.json gives, so AutoTokenizer picks the same class.
_TOKENIZER_CLASS = {"gpt2": "GPT2Tokenizer", "gpt-neox-20b": "GPTNeoXTokenizer"}


def load_tokenizer(kind: str, root: str | Path | None = None):
    """The `gpt2` or `gpt-neox-20b` tokenizer, built from the GGUF vocabulary once and saved.

    Parsing a GGUF vocabulary takes ~10 s (100k string fields); the saved `tokenizer.json` loads
    in well under a second.
    """
    from transformers import AutoTokenizer

    root = Path(root or default_dir())
    out = root / "tokenizers" / kind
    if not (out / "tokenizer.json").is_file():
        tok = TOKENIZERS[kind](fetch_vocab(root))
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tok-{kind}."))
        try:
            tok.save_pretrained(tmp)
            cfg_path = tmp / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["tokenizer_class"] = _TOKENIZER_CLASS[kind]
            cfg_path.write_text(json.dumps(cfg, indent=2))
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(out)


def _tokenizer_for(name: str, root: Path):
    return load_tokenizer("gpt-neox-20b" if SEED_MODELS[name]["model_type"] == "gpt_neox" else "gpt2", root)


def _build_one(name: str, cache: Path, root: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = SEED_MODELS[name]
    repo = _repo_dir(cache, name)
    snap = snapshot_dir(cache, name)
    tmp = Path(tempfile.mkdtemp(dir=repo.parent if repo.parent.exists() else None, prefix=f".{repo.name}."))
    try:
        (tmp / "config.json").write_text(json.dumps(spec, indent=2))
        config = AutoConfig.from_pretrained(tmp)
        torch.manual_seed(seed)
        # No defaults from a device context: weights are drawn on CPU, N(0, initializer_range) as in training.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "config.json").write_text(json.dumps(spec, indent=2))  # the hub's fields, not a re-serialisation
        _tokenizer_for(name, root).save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"model": name, "weights": "random (stand-in, not the trained model)",
                                               "seed": seed, "format": _FORMAT}))
        snap.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(snap, ignore_errors=True)
        os.replace(tmp, snap)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(snap.name)


def check_standin(cache: str | Path, name: str) -> Path:
    """The snapshot of a finished stand-in, or `StandinError` naming the missing file."""
    snap = snapshot_dir(cache, name)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _MARKER):
        if not (snap / f).is_file():
            raise StandinError(f"stand-in {name!r} is incomplete: {snap / f} is missing (rebuild with "
                               f"`crossdict stand-ins --dir {Path(cache).parent}`)")
    ref = _repo_dir(Path(cache), name) / "refs" / "main"
    if not ref.is_file() or ref.read_text().strip() != snap.name:
        raise StandinError(f"stand-in {name!r}: {ref} is missing or does not name snapshot {snap.name}")
    return snap


def build_standins(root: str | Path | None = None, models: list[str] | None = None, seed: int = 0,
                   quiet: bool = True) -> Path:
    """Vocabularies plus random-weight stand-ins of `models` (default: all four seed models).

    Returns the hub cache directory `<root>/hub`; point `HF_HUB_CACHE` at it (with
    `HF_HUB_OFFLINE=1`) before anything imports huggingface_hub. Finished models are kept.
    """
    root = Path(root or default_dir())
    fetch_vocab(root, quiet=quiet)
    cache = root / "hub"
    for name in models or list(SEED_MODELS):
        if name not in SEED_MODELS:
            raise StandinError(f"no stand-in for {name!r}; known: {sorted(SEED_MODELS)}")
        marker = snapshot_dir(cache, name) / _MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("seed") == seed:
            try:
                check_standin(cache, name)
                continue
            except StandinError:
                pass
        cache.mkdir(parents=True, exist_ok=True)
        if not quiet:
            print(f"[crossdict] building stand-in {name} (random weights, seed {seed})")
        _build_one(name, cache, root, seed)
    return cache
