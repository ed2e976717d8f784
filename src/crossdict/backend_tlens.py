"""TransformerLens backend: hook points by name, `stop_at_layer` early exit, `run_with_hooks` edits.

Hub names that TransformerLens supports load as `HookedTransformer` *without* weight processing
(no LayerNorm folding or weight centering), so the residual stream is the model's own and equals
the HF backend's. Everything else (packaged GGUF models, local directories) is wrapped in a
`TransformerBridge` around the HF model, which runs the HF modules themselves.
"""

from __future__ import annotations

import torch

from .backend import Batch, Edit, check_layer_range
from .backend_hf import prepare_tokenizer, tokenize_batch
from .cache import hook_name
from .models import load_hf, resolve


def _is_tl_official(name: str) -> bool:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
        return True
    except ValueError:
        return False


def _cached_file(repo_id: str, filename: str) -> str | None:
    """Path of `filename` of `repo_id` in the local Hugging Face cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, filename)
    return path if isinstance(path, str) else None


def _cache_gaps(repo_id: str) -> str:
    """' (the local cache's snapshot <dir> lacks config.json, ...)' when `repo_id` is cached but incomplete, else ''.

    huggingface_hub's offline error says only "couldn't find them in the cached files"; a cache
    that holds the repository but misses a file (an interrupted copy, a hand-built stand-in) should
    name that file.
    """
    from pathlib import Path

    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = repo / "refs" / "main"
    snaps = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else sorted((repo / "snapshots").glob("*"))
    snaps = [s for s in snaps if s.is_dir()]
    if not snaps:
        return ""
    snap = snaps[0]
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    missing = [f for f in ("config.json",) if not (snap / f).is_file()]
    if not any((snap / w).is_file() for w in weights):
        missing.append("model.safetensors")
    return f"; the local cache's snapshot {snap} lacks {', '.join(missing)}" if missing else ""


class TLensBackend:
    """Backend over a TransformerLens model (see `backend.Backend`)."""

    def __init__(self, tl_model, tokenizer, name: str = "model", device: str | torch.device = "cpu", hf_config=None):
        self.model = tl_model.to(device).eval()
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.name = name
        self.device = torch.device(device)
        self.n_layers = tl_model.cfg.n_layers
        self.d_model = tl_model.cfg.d_model
        bos = tokenizer.bos_token_id
        self.has_bos = bos is not None and tokenizer("a")["input_ids"][0] == bos
        self.info: dict = {}
        self.hf_config = hf_config
        """The transformers config of the architecture (random-init floor: `extract.random_init_like`)."""

    @classmethod
    def from_hf(cls, hf_model, tokenizer, model_dir: str, name: str = "model", device: str = "cpu") -> "TLensBackend":
        """Wrap an in-memory HF model; `model_dir` is where its config.json lives (read by the bridge)."""
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(model_dir, hf_model=hf_model, tokenizer=tokenizer, device=device)
        return cls(bridge, tokenizer, name, device, hf_config=hf_model.config)

    @classmethod
    def load(cls, name: str, dtype: str = "float32", device: str = "cpu") -> "TLensBackend":
        src = resolve(name)
        if src.kind == "hub" and _is_tl_official(name):
            from transformer_lens import HookedTransformer

            from transformers import AutoConfig

            try:
                model = HookedTransformer.from_pretrained_no_processing(name, dtype=getattr(torch, dtype), device=device)
                hf_config = AutoConfig.from_pretrained(name)
            except OSError as e:
                raise RuntimeError(
                    f"could not load {name!r} from the model hub ({str(e).splitlines()[0]}{_cache_gaps(name)}); "
                    "without a hub use a "
                    "packaged model (smollm2-135m, gemma3-270m), a local directory or a .gguf file"
                ) from None
            except (AttributeError, KeyError) as e:  # TransformerLens reads fields such as n_ctx unguarded
                raise RuntimeError(
                    f"{_cached_file(name, 'config.json') or name + '/config.json'}: lacks a field TransformerLens "
                    f"needs to build {name!r} ({e})"
                ) from None
            backend = cls(model, model.tokenizer, name, device, hf_config=hf_config)
            backend.info = {"name": name, "kind": "hub", "weights": name}
            return backend
        hf_model, tok, info = load_hf(name, getattr(torch, dtype))
        backend = cls.from_hf(hf_model, tok, info["weights"], name, device)
        backend.info = info
        return backend

    def tokenize(self, texts: list[str], max_ctx: int) -> Batch:
        return tokenize_batch(self.tokenizer, texts, max_ctx)

    def _check(self, layers) -> None:
        check_layer_range(layers, self.n_layers, self.name)

    # Padding is on the right and attention is causal, so real tokens never see padding: the
    # models need no attention mask, and positions match the unpadded run.
    @torch.inference_mode()
    def hidden_states(self, batch: Batch, layers: list[int]) -> dict[int, torch.Tensor]:
        self._check(layers)
        names = [hook_name(layer) for layer in layers]
        _, cache = self.model.run_with_cache(
            batch.input_ids.to(self.device), names_filter=lambda n: n in names, stop_at_layer=max(layers) + 1
        )
        return {layer: cache[hook_name(layer)].float() for layer in layers}

    @torch.inference_mode()
    def logits(self, batch: Batch, edits: dict[int, Edit] | None = None) -> torch.Tensor:
        edits = edits or {}
        self._check(list(edits))
        hooks = [(hook_name(layer), lambda act, hook, fn=fn: fn(act).to(act.dtype)) for layer, fn in edits.items()]
        return self.model.run_with_hooks(batch.input_ids.to(self.device), fwd_hooks=hooks).float()

