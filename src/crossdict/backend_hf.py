"""Hugging Face backend: any transformers causal LM (GPT-2, GPT-NeoX, Llama, Gemma-3) via forward hooks.

The residual stream after block L is the output of decoder block L, the same tensor TransformerLens
calls `blocks.L.hook_resid_post` (and `output_hidden_states[L + 1]` for every block but the last,
whose HF hidden state already has the final norm applied).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .backend import Batch, Edit, check_layer_range
from .models import load_hf


class _StopForward(Exception):
    """Raised from the deepest requested block's hook: nothing after it needs computing."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM, whatever the architecture calls it."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "model.language_model.layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():  # fallback: the first ModuleList as long as the model is deep
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")


def _out_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_out(output, new: torch.Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def tokenize_batch(tokenizer, texts: list[str], max_ctx: int) -> Batch:
    """Tokenize with the model's own special-token convention; BOS/padding get offsets (-1, -1)."""
    enc = tokenizer(
        texts,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        truncation=True,
        max_length=max_ctx,
        padding=True,
        return_tensors="pt",
    )
    offsets = enc["offset_mapping"].clone()
    not_content = enc["special_tokens_mask"].bool() | ~enc["attention_mask"].bool()
    offsets[not_content] = -1
    return Batch(enc["input_ids"], enc["attention_mask"], offsets, list(texts))


def prepare_tokenizer(tokenizer):
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class HFBackend:
    """Backend over a transformers model held in memory (see `backend.Backend`)."""

    def __init__(self, model: nn.Module, tokenizer, name: str = "model", device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.name = name
        self.device = torch.device(device)
        self.blocks = decoder_blocks(model)
        self.n_layers = len(self.blocks)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.d_model = cfg.hidden_size
        self.has_bos = bool(tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else False
        self.info: dict = {}

    @classmethod
    def load(cls, name: str, dtype: str = "float32", device: str = "cpu") -> "HFBackend":
        model, tok, info = load_hf(name, getattr(torch, dtype))
        backend = cls(model, tok, name, device)
        backend.info = info
        return backend

    def tokenize(self, texts: list[str], max_ctx: int) -> Batch:
        return tokenize_batch(self.tokenizer, texts, max_ctx)

    def _check(self, layers) -> None:
        check_layer_range(layers, self.n_layers, self.name)

    @contextlib.contextmanager
    def _hooks(self, hooks: dict[int, callable]) -> Iterator[None]:
        handles = [self.blocks[layer].register_forward_hook(fn) for layer, fn in hooks.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _forward(self, batch: Batch):
        return self.model(
            input_ids=batch.input_ids.to(self.device),
            attention_mask=batch.attention_mask.to(self.device),
            use_cache=False,
        )

    @torch.inference_mode()
    def hidden_states(self, batch: Batch, layers: list[int]) -> dict[int, torch.Tensor]:
        self._check(layers)
        captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)

        def make_hook(layer: int):
            def hook(module, args, output):
                captured[layer] = _out_tensor(output).float()
                if layer == deepest:
                    raise _StopForward

            return hook

        with self._hooks({layer: make_hook(layer) for layer in set(layers)}):
            try:
                self._forward(batch)
            except _StopForward:
                pass
        return {layer: captured[layer] for layer in layers}

    @contextlib.contextmanager
    def output_vocab(self, ids: torch.Tensor) -> Iterator[None]:
        """Inside the block, `logits` returns only vocabulary columns `ids` `[n_ids]`.

        The unembedding is most of a forward pass for large vocabularies (Gemma-3: 262k rows, more
        FLOPs than all its blocks); comparisons over a known subset of tokens need only those rows.
        Tied input embeddings keep the full matrix: only the output head's parameter is swapped.
        """
        head = self.model.get_output_embeddings()
        full_w, full_b = head.weight, getattr(head, "bias", None)
        head.weight = nn.Parameter(full_w.detach()[ids.to(full_w.device)], requires_grad=False)
        if full_b is not None:
            head.bias = nn.Parameter(full_b.detach()[ids.to(full_b.device)], requires_grad=False)
        try:
            yield
        finally:
            head.weight = full_w
            if full_b is not None:
                head.bias = full_b

    @contextlib.contextmanager
    def output_rows(self, rows: torch.Tensor) -> Iterator[None]:
        """Inside the block, `logits` returns `[n_rows, vocab]`: only the positions `rows` `[batch, seq]` (bool) are
        unembedded, in row-major order (`logits(batch)[rows]`, without computing the others).

        Positions an edit cannot reach (padding, BOS, those before the first edited one: attention is causal)
        need no unembedding, the largest matmul of a forward for large vocabularies. The head's input is cut,
        so what the model does to the head's output (Gemma-2's soft-capping) still applies.
        """
        head = self.model.get_output_embeddings()
        full = head.forward
        head.forward = lambda h: full(h[rows.to(h.device)])
        try:
            yield
        finally:
            del head.forward

    @contextlib.contextmanager
    def start_after(self, layer: int, hidden: torch.Tensor) -> Iterator[None]:
        """Inside the block, a forward skips blocks 0..`layer`: block `layer` outputs `hidden` `[batch, seq, d]`
        (its cached clean output for the batch about to run) and the blocks before it pass their input on.

        Hooks on block `layer` (edits) still see and change `hidden`. Edits at `layer` leave everything
        before it as in the clean pass, so re-running those blocks for every intervention is waste
        (the transfer controls: up to 3/4 of Gemma-3's blocks at B13).
        """
        self._check([layer])
        skipped = list(self.blocks[: layer + 1])
        for blk in skipped[:-1]:
            blk.forward = lambda hidden_states, *args, **kwargs: hidden_states
        # In the model's dtype: `hidden_states` hands out float32, a bf16/fp16 model's next block wants its own.
        skipped[-1].forward = lambda hidden_states, *args, **kwargs: hidden.to(hidden_states.device, hidden_states.dtype)
        try:
            yield
        finally:
            for blk in skipped:
                del blk.forward

    @torch.inference_mode()
    def logits(self, batch: Batch, edits: dict[int, Edit] | None = None) -> torch.Tensor:
        edits = edits or {}
        self._check(list(edits))

        def make_hook(fn: Edit):
            def hook(module, args, output):
                x = _out_tensor(output)
                return _replace_out(output, fn(x).to(x.dtype))

            return hook

        with self._hooks({layer: make_hook(fn) for layer, fn in edits.items()}):
            return self._forward(batch).logits.float()
