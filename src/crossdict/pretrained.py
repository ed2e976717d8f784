"""Pretrained SAEs in: SAELens directories and registry, sparsify and dictionary_learning checkpoints.

Every source is loaded *through SAELens* (`sae_lens.SAE.load_from_disk` with a converter, or
`SAE.from_pretrained`), so crossdict encodes and decodes with SAELens's own code, activation
normalization included, for every architecture SAELens knows (standard, TopK, JumpReLU, gated, ...).

    model_b:
      layers: [5, 9]
      sae_source: saelens:gemma-scope-2-270m-pt-res-all/layer_5_width_16k_l0_small   # every layer
      sae_source: {5: path/to/sae_dir, 9: train}                                     # or per layer

A source is `train` (crossdict trains it), `saelens:<release>/<sae_id>` (SAELens's registry, the
`pretrained_saes.yaml` shipped inside sae_lens), or a local directory recognised by its files:
`cfg.json` + `sae_weights.safetensors` (SAELens), `cfg.json` + `sae.safetensors` (EleutherAI sparsify,
one directory per hook), `ae.pt` + `config.json` (dictionary_learning).

The train stage does not train a pretrained SAE: it loads it, checks its hook against the configured
layer and its d_in against the model, and writes `pretrained.json` (source, kind, hook, sha256 of the
source files) into the SAE's usual directory (`RunConfig.sae_dir`). `sae.load_sae` on that directory
returns a `PretrainedSAE`: the one adapter every later stage sees, with the interface of `sae.SAE`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import RunConfig
from .utils import atomic_write_json, remove_file

SOURCE_FILE = "pretrained.json"
"""Written into `RunConfig.sae_dir(key, layer)` for a pretrained SAE; `sae.load_sae` follows it."""
TRAIN = "train"
REGISTRY_PREFIX = "saelens:"


class PretrainedSAEError(ValueError):
    """A pretrained SAE cannot be found, read, or does not fit the configured model and layer."""


# --- which layers are pretrained ----------------------------------------------------------------


def source_for(cfg: RunConfig, key: str, layer: int) -> str:
    """The configured `sae_source` of (model, layer): a string for all layers or a per-layer mapping."""
    src = cfg.model(key).sae_source
    if isinstance(src, dict):
        return str(src.get(layer, TRAIN))
    return src


def pretrained_layers(cfg: RunConfig) -> list[tuple[str, int, str]]:
    """(model key, layer, source) of every layer whose SAE is not trained by crossdict."""
    return [(k, la, source_for(cfg, k, la)) for k in ("a", "b") for la in cfg.model(k).layers
            if source_for(cfg, k, la) != TRAIN]


def without_pretrained(cfg: RunConfig) -> RunConfig:
    """The config the SAE trainer sees: pretrained layers removed (their SAEs are loaded, not trained)."""
    pre = {(k, la) for k, la, _ in pretrained_layers(cfg)}
    models = {f"model_{k}": replace(cfg.model(k), layers=[la for la in cfg.model(k).layers if (k, la) not in pre])
              for k in ("a", "b")}
    return replace(cfg, **models)


# --- hooks --------------------------------------------------------------------------------------

_HOOKS = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),  # resid_pre of block L+1 is resid_post of block L
    (re.compile(r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)$"), 0),  # HF module output = block L
]


def hook_layer(hook_name: str) -> int | None:
    """Block whose residual output (`blocks.L.hook_resid_post`, HF `hidden_states[L+1]`) this hook reads; None if not residual."""
    for rx, shift in _HOOKS:
        m = rx.match(hook_name)
        if m:
            return int(m.group(1)) + shift
    return None


def check_hook(hook_name: str | None, layer: int, where: str) -> None:
    """The SAE's hook must read the residual stream after block `layer`, the configured layer."""
    if not hook_name:
        raise PretrainedSAEError(f"{where}: the SAE does not say which hook it was trained on (no hook_name); "
                                 f"crossdict needs blocks.{layer}.hook_resid_post")
    got = hook_layer(hook_name)
    if got is None:
        raise PretrainedSAEError(f"{where}: hook {hook_name!r} is not a residual-stream hook; crossdict layer {layer} is "
                                 f"blocks.{layer}.hook_resid_post (HF: output of model.layers.{layer}, hidden_states[{layer + 1}])")
    if got != layer:
        raise PretrainedSAEError(
            f"{where}: the SAE was trained on {hook_name!r} = output of block {got} (blocks.{got}.hook_resid_post, "
            f"HF hidden_states[{got + 1}]), but it is configured for layer {layer} (blocks.{layer}.hook_resid_post, "
            f"hidden_states[{layer + 1}]). Note hidden_states[L+1] is block L's output: set the layer to {got} "
            f"or pick the SAE for layer {layer}")


# --- converters (SAELens `PretrainedSaeDiskLoader` signature) -----------------------------------


def sparsify_disk_loader(path: str | Path, device: str = "cpu", cfg_overrides: dict | None = None
                         ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """EleutherAI sparsify `SparseCoder.save_to_disk` layout -> a SAELens TopK SAE.

    Layout (sparsify/sparse_coder.py, 1.3.3): `cfg.json` = SparseCoderConfig + d_in; `sae.safetensors`
    holds `encoder.weight` [d_sae, d_in], `encoder.bias`, `W_dec` [d_sae, d_in], `b_dec`; encode is
    top-k of relu(encoder(x - b_dec)), decode W_dec^T acts + b_dec. The hook is the directory name
    (`layers.L` = output of model.layers[L]). We do not use SAELens's own `sparsify_disk_loader`:
    in sae-lens 6.54 it reads d_sae=0 when `num_latents` is 0 (sparsify's default) and transposes W_dec.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "cfg.json").read_text())
    for bad in ("transcode", "skip_connection"):
        if cfg.get(bad):
            raise PretrainedSAEError(f"{path}/cfg.json: {bad}=true (a transcoder / skip SAE) is not a residual SAE")
    if cfg.get("activation", "topk") != "topk":
        raise PretrainedSAEError(f"{path}/cfg.json: activation {cfg.get('activation')!r} is not supported (only topk)")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or d_in * int(cfg["expansion_factor"]))
    state = load_file(str(path / "sae.safetensors"), device=device)
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if name not in state:
            raise PretrainedSAEError(f"{path}/sae.safetensors: tensor {name!r} missing; has {sorted(state)}")
    out = {
        "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": int(cfg["k"]), "dtype": "float32", "device": device,
        "apply_b_dec_to_input": True, "normalize_activations": "none", "rescale_acts_by_decoder_norm": False,
        "metadata": {"hook_name": path.name, "model_name": None, "sae_lens_version": "6.0.0", "training_library": "sparsify"},
        **(cfg_overrides or {}),
    }
    st = {"W_enc": state["encoder.weight"].float().T.contiguous(), "b_enc": state["encoder.bias"].float(),
          "W_dec": state["W_dec"].float().contiguous(), "b_dec": state["b_dec"].float()}
    return out, st


_DL_ARCH = {"AutoEncoder": "standard", "AutoEncoderTopK": "topk", "JumpReluAutoEncoder": "jumprelu",
            "BatchTopKSAE": "jumprelu", "MatryoshkaBatchTopKSAE": "jumprelu", "GatedAutoEncoder": "gated"}


def dictionary_learning_disk_loader(path: str | Path, device: str = "cpu", cfg_overrides: dict | None = None
                                    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """dictionary_learning (saprmarks) `ae.pt` + `config.json` -> a SAELens SAE.

    The mapping is SAELens's own `dictionary_learning_sae_huggingface_loader_1`, read from disk, with
    `torch.load(weights_only=True)`. dictionary_learning/dictionary.py: AutoEncoder has `bias` (b_dec),
    `encoder.weight` [d_sae, d_in], `encoder.bias`, `decoder.weight` [d_in, d_sae]; encode
    relu(encoder(x - bias)), decode decoder(f) + bias. `trainer.layer` L reads the output of block L.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    trainer = config.get("trainer", {})
    dict_class = trainer.get("dict_class")
    if dict_class not in _DL_ARCH:
        raise PretrainedSAEError(f"{path}/config.json: trainer.dict_class {dict_class!r} not supported; "
                                 f"expected one of {sorted(_DL_ARCH)}")
    arch = _DL_ARCH[dict_class]
    try:
        sd = torch.load(path / "ae.pt", map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, pickled code objects, ...
        raise PretrainedSAEError(f"{path}/ae.pt: unreadable with torch.load(weights_only=True): {e}") from None
    W_enc = sd["W_enc"] if "W_enc" in sd else sd["encoder.weight"].T
    W_dec = sd["W_dec"] if "W_dec" in sd else sd["decoder.weight"].T
    state = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": sd.get("b_dec", sd.get("bias", sd.get("decoder_bias")))}
    for src, dst in (("encoder.bias", "b_enc"), ("b_enc", "b_enc"), ("mag_bias", "b_mag"), ("gate_bias", "b_gate"),
                     ("r_mag", "r_mag")):
        if src in sd:
            state[dst] = sd[src]
    if arch == "jumprelu" and "threshold" in sd:
        thr = sd["threshold"]
        state["threshold"] = thr.expand(W_enc.shape[1]).clone() if thr.ndim == 0 else thr
    missing = [k for k, v in state.items() if v is None]
    if missing:
        raise PretrainedSAEError(f"{path}/ae.pt: tensors for {missing} missing; has {sorted(sd)}")
    layer = trainer.get("layer")
    out = {
        "architecture": arch, "d_in": int(trainer["activation_dim"]), "d_sae": int(trainer["dict_size"]),
        "dtype": "float32", "device": device, "normalize_activations": "none",
        # dictionary_learning's JumpReluAutoEncoder does not subtract b_dec before encoding (as in SAELens's loader)
        "apply_b_dec_to_input": dict_class != "JumpReluAutoEncoder",
        "metadata": {"hook_name": None if layer is None else f"blocks.{layer}.hook_resid_post",
                     "model_name": trainer.get("lm_name"), "sae_lens_version": "6.0.0",
                     "training_library": "dictionary_learning"},
        **(cfg_overrides or {}),
    }
    if arch == "topk":
        out["k"] = int(trainer["k"])
        out["rescale_acts_by_decoder_norm"] = False
    return out, {k: v.float().contiguous() for k, v in state.items()}


# --- sources ------------------------------------------------------------------------------------

KINDS = {
    "saelens": (("cfg.json", "sae_weights.safetensors"), None),
    "sparsify": (("cfg.json", "sae.safetensors"), sparsify_disk_loader),
    "dictionary_learning": (("config.json", "ae.pt"), dictionary_learning_disk_loader),
}


def source_kind(source: str) -> str:
    """`saelens_registry` or the local directory kind (by its files); a clear error for anything else."""
    if source.startswith(REGISTRY_PREFIX):
        return "saelens_registry"
    path = Path(source)
    if not path.is_dir():
        raise PretrainedSAEError(f"sae_source {source!r}: no such directory (expected 'train', "
                                 f"'saelens:<release>/<sae_id>' or an SAE directory)")
    for kind, (files, _) in KINDS.items():
        if all((path / f).is_file() for f in files):
            return kind
    layouts = "; ".join(f"{k}: {' + '.join(f)}" for k, (f, _) in KINDS.items())
    raise PretrainedSAEError(f"sae_source {source!r}: not a known SAE layout ({layouts}); it holds "
                             f"{sorted(p.name for p in path.iterdir())[:12]}")


@dataclass
class RegistryEntry:
    """One release of SAELens's registry: the fields of `sae_lens`'s `PretrainedSAELookup` that we use."""

    repo_id: str
    model: str
    conversion_func: str | None
    saes_map: dict[str, str]
    """SAE id -> folder in the repo."""


_REGISTRY: dict[str, RegistryEntry] | None = None


def registry() -> dict[str, RegistryEntry]:
    """`sae_lens/pretrained_saes.yaml`, the file `SAE.from_pretrained` resolves names with, read without
    importing sae_lens (16 s of CPU here), so a bad name or an offline miss fails in about a second."""
    global _REGISTRY
    if _REGISTRY is None:
        import importlib.util

        import yaml

        spec = importlib.util.find_spec("sae_lens")
        if spec is None or not spec.submodule_search_locations:
            raise PretrainedSAEError("saelens: sources need the sae-lens package (pip install sae-lens)")
        path = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with path.open() as f:
            raw = yaml.load(f, Loader=loader)
        _REGISTRY = {name: RegistryEntry(v["repo_id"], v.get("model", ""), v.get("conversion_func"),
                                         {s["id"]: s["path"] for s in v.get("saes", [])}) for name, v in raw.items()}
    return _REGISTRY


def _registry_entry(source: str) -> tuple[str, str, Any]:
    """(release, sae_id, lookup) from the registry bundled in sae_lens; unknown names list what exists."""
    rest = source[len(REGISTRY_PREFIX):]
    if "/" not in rest:
        raise PretrainedSAEError(f"sae_source {source!r}: expected 'saelens:<release>/<sae_id>'")
    release, sae_id = rest.split("/", 1)
    directory = registry()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.5)
        raise PretrainedSAEError(f"sae_source {source!r}: release {release!r} is not in SAELens's registry "
                                 f"(sae_lens/pretrained_saes.yaml); closest: {close}")
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        ids = sorted(lookup.saes_map)
        close = difflib.get_close_matches(sae_id, ids, n=3, cutoff=0.5)
        raise PretrainedSAEError(f"sae_source {source!r}: release {release!r} has no SAE id {sae_id!r}"
                                 f"{f' (did you mean {close[0]!r}?)' if close else ''}; its {len(ids)} ids: {', '.join(ids)}")
    return release, sae_id, lookup


def registry_hook(path_in_repo: str) -> str | None:
    """Hook named by a registry path such as `resid_post_all/layer_13_width_16k_l0_small`."""
    m = re.search(r"layer_(\d+)", path_in_repo)
    if m and "resid_post" in path_in_repo:
        return f"blocks.{m.group(1)}.hook_resid_post"
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _registry_help(source: str) -> tuple[str, str, Any, str]:
    """(release, sae_id, lookup, what-to-do text naming release, hook, repo and the download command)."""
    release, sae_id, lookup = _registry_entry(source)
    path = lookup.saes_map[sae_id]
    hook = registry_hook(path) or "(see the SAE's config)"
    how = (f"release {release!r}, SAE {sae_id!r}, hook {hook}, Hugging Face repo {lookup.repo_id!r} (folder {path!r}). "
           f"Pre-download it where the hub is reachable: huggingface-cli download {lookup.repo_id} --include '{path}/*' "
           f"(fills the HF cache; this sae_source then loads offline), or add --local-dir DIR and set sae_source to DIR/{path}"
           + ("" if lookup.conversion_func is None else
              f" (only if that folder holds SAELens's cfg.json + sae_weights.safetensors; this release uses "
              f"SAELens's {lookup.conversion_func!r} converter, so keep the saelens: source and the HF cache)"))
    return release, sae_id, lookup, how


def _cached(repo_id: str, folder: str) -> bool:
    """Whether the HF cache already holds files of `repo_id` under `folder` (no network)."""
    from huggingface_hub import snapshot_download

    try:
        snap = Path(snapshot_download(repo_id, allow_patterns=[f"{folder}/*"], local_files_only=True))
    except Exception:
        return False
    return any((snap / folder).glob("*"))


def _load_registry(source: str, device: str) -> tuple[Any, list[Path]]:
    from sae_lens import SAE

    release, sae_id, lookup, how = _registry_help(source)
    if _hub_offline() and not _cached(lookup.repo_id, lookup.saes_map[sae_id]):
        raise PretrainedSAEError(f"sae_source {source!r}: offline (HF_HUB_OFFLINE is set) and not in the HF cache. {how}")
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except Exception as e:  # offline / not cached / network: one message that says what to do
        raise PretrainedSAEError(f"sae_source {source!r}: cannot load: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:300] if str(e) else ''}. {how}") from None
    return sae, []


def check_sources(cfg: RunConfig) -> None:
    """Fail in seconds, before any model is loaded: every local source has a known layout, every registry
    name exists, and offline every registry SAE is already in the HF cache."""
    for key, layer, source in pretrained_layers(cfg):
        where = f"model_{key} ({cfg.model(key).name}) layer {layer}:"
        try:
            if source_kind(source) == "saelens_registry":
                _, sae_id, lookup, how = _registry_help(source)
                hook = registry_hook(lookup.saes_map[sae_id])
                if hook is not None:
                    check_hook(hook, layer, f"sae_source {source!r}")
                if _hub_offline() and not _cached(lookup.repo_id, lookup.saes_map[sae_id]):
                    raise PretrainedSAEError(f"sae_source {source!r}: offline (HF_HUB_OFFLINE is set) and not in "
                                             f"the HF cache. {how}")
        except PretrainedSAEError as e:
            raise PretrainedSAEError(f"{where} {e}") from None


def load_source(source: str, device: str = "cpu") -> tuple[Any, list[Path], str]:
    """(SAELens SAE, its local files for digests, kind); every failure a `PretrainedSAEError` naming the file."""
    from sae_lens import SAE

    kind = source_kind(source)
    if kind == "saelens_registry":
        sae, files = _load_registry(source, device)
    else:
        names, converter = KINDS[kind]
        files = [Path(source) / n for n in names]
        kwargs = {} if converter is None else {"converter": converter}
        try:
            sae = SAE.load_from_disk(source, device=device, **kwargs)
        except PretrainedSAEError:
            raise
        except Exception as e:  # corrupt safetensors, bad JSON, shape mismatch: name the directory and the cause
            raise PretrainedSAEError(f"sae_source {source!r} ({kind}): SAELens could not load it "
                                     f"(truncated or corrupt file?): {type(e).__name__}: {str(e)[:400]}") from None
    for name, t in sae.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PretrainedSAEError(f"sae_source {source!r}: tensor {name!r} holds non-finite values")
    sae.eval()
    return sae, files, kind


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:20]


def source_digest(source: str) -> str:
    """sha256 of a local source's files (changes when the files change); the string itself for the registry."""
    if source.startswith(REGISTRY_PREFIX):
        return source
    kind = source_kind(source)
    files = [Path(source) / n for n in KINDS[kind][0]]
    return _digest(files)


# --- the adapter --------------------------------------------------------------------------------


@dataclass
class PretrainedSpec:
    """What downstream code reads from `sae.spec`: inputs are raw activations (scale 1), metadata."""

    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None
    input_scale: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)


class PretrainedSAE(nn.Module):
    """A SAELens SAE behind crossdict's SAE interface: `encode` raw `[..., d_in]` -> dense codes `[..., d_sae]`,
    `decode` codes -> raw reconstruction, `W_dec` `[d_sae, d_in]`, `W_enc` `[d_sae, d_in]`, `b_dec`, `spec`.

    Encoding and decoding are SAELens's own (normalization, thresholds, top-k); nothing is re-implemented.
    """

    def __init__(self, inner: Any, spec: PretrainedSpec):
        super().__init__()
        self.inner, self.spec = inner, spec

    @property
    def d_in(self) -> int:
        return self.spec.d_in

    @property
    def d_sae(self) -> int:
        return self.spec.d_sae

    @property
    def W_dec(self) -> Tensor:
        return self.inner.W_dec

    @property
    def W_enc(self) -> Tensor:
        return self.inner.W_enc.T

    @property
    def b_dec(self) -> Tensor:
        return self.inner.b_dec

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.inner.encode(x.to(self.inner.W_dec.dtype))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return self.inner.decode(codes.to(self.inner.W_dec.dtype))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def _hook_of(sae: Any) -> str | None:
    meta = getattr(sae.cfg, "metadata", None)
    return getattr(meta, "hook_name", None) if meta is not None else None


def open_source(source: str, layer: int, d_model: int, where: str, device: str = "cpu") -> tuple[PretrainedSAE, list[Path], str]:
    """Load `source` and check it against the configured layer and the model's width."""
    inner, files, kind = load_source(source, device)
    hook = _hook_of(inner)
    if kind == "saelens_registry" and not hook:
        hook = registry_hook(_registry_entry(source)[2].saes_map[source.split("/", 1)[1]])
    check_hook(hook, layer, f"{where} sae_source {source!r}")
    d_in = int(inner.cfg.d_in)
    if d_in != d_model:
        raise PretrainedSAEError(f"{where} sae_source {source!r}: the SAE has d_in={d_in} but the model's residual "
                                 f"stream has d_model={d_model}: it was trained on another model")
    arch = inner.cfg.architecture() if callable(getattr(inner.cfg, "architecture", None)) else str(kind)
    spec = PretrainedSpec(arch, d_in, int(inner.cfg.d_sae), getattr(inner.cfg, "k", None),
                          metadata={"hook_name": hook, "source": source, "kind": kind})
    return PretrainedSAE(inner, spec), files, kind


def link(cfg: RunConfig, key: str, layer: int, d_model: int, max_norm: float | None = None) -> PretrainedSAE:
    """Load, check and record one pretrained SAE: `sae_dir/pretrained.json` (nothing else there is touched)."""
    source = source_for(cfg, key, layer)
    where = f"model_{key} ({cfg.model(key).name}) layer {layer}:"
    sae, files, kind = open_source(source, layer, d_model, where)
    sae.spec.metadata["max_norm"] = max_norm
    record = {"format": "crossdict-pretrained", "version": 1, "source": source, "kind": kind,
              "digest": _digest(files) if files else source, "hook_name": sae.spec.metadata["hook_name"],
              "architecture": sae.spec.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "max_norm": max_norm}
    out = cfg.sae_dir(key, layer)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SOURCE_FILE, record)
    return sae


def load_linked(path: str | Path, device: str | torch.device = "cpu") -> PretrainedSAE:
    """The SAE a `pretrained.json` points at, checked against what the train stage recorded."""
    path = Path(path)
    rec = json.loads((path / SOURCE_FILE).read_text())
    source = rec["source"]
    if rec.get("kind") != "saelens_registry":
        now = source_digest(source)
        if now != rec["digest"]:
            raise PretrainedSAEError(f"{path / SOURCE_FILE}: the files of {source!r} changed since the train stage "
                                     "checked them; rerun `crossdict run` (or `crossdict train`)")
    inner, _, kind = load_source(source, str(device))
    spec = PretrainedSpec(rec["architecture"], int(rec["d_in"]), int(rec["d_sae"]), getattr(inner.cfg, "k", None),
                          metadata={"hook_name": rec["hook_name"], "source": source, "kind": kind, "max_norm": rec.get("max_norm")})
    return PretrainedSAE(inner, spec)


def is_linked(path: str | Path) -> bool:
    return (Path(path) / SOURCE_FILE).is_file()


def clear_stale(cfg: RunConfig) -> None:
    """Drop `pretrained.json` where a layer is trained again (the record would shadow the trained SAE)."""
    pre = {(k, la) for k, la, _ in pretrained_layers(cfg)}
    for key in ("a", "b"):
        for layer in cfg.model(key).layers:
            if (key, layer) not in pre:
                for seed in cfg.sae.seeds:
                    remove_file(cfg.sae_dir(key, layer, seed) / SOURCE_FILE)
