"""The one interface both backends (`backend_hf.HFBackend`, `backend_tlens.TLensBackend`) provide.

Later stages (SAE evaluation, interventions) talk only to this interface:

- `tokenize(texts)` -> `Batch` with token ids, attention mask and each token's character span;
- `hidden_states(batch, layers)` -> residual stream after each requested block, stopping the forward
  pass after the deepest one (no later blocks, no unembedding);
- `logits(batch, edits)` -> next-token logits with optional edit functions applied to the residual
  stream after given blocks (injection, patching, SAE splicing all go through this).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol

import torch

Edit = Callable[[torch.Tensor], torch.Tensor]
"""Maps the residual stream `[batch, seq, d_model]` after a block to its replacement (same shape)."""


@dataclass
class Batch:
    input_ids: torch.Tensor
    """[batch, seq] token ids, right-padded, BOS first where the model uses one."""
    attention_mask: torch.Tensor
    """[batch, seq] 1 for real tokens, 0 for padding."""
    offsets: torch.Tensor
    """[batch, seq, 2] character span (start, end) of each token in its text; (-1, -1) for BOS and padding."""
    texts: list[str]

    @property
    def is_content(self) -> torch.Tensor:
        """[batch, seq] bool: a real text token (not BOS, not padding)."""
        return self.offsets[..., 1] >= 0


class Backend(Protocol):
    name: str
    n_layers: int
    d_model: int
    has_bos: bool
    """The model's tokenizer puts a BOS token first (Gemma does, SmolLM2 does not)."""

    def tokenize(self, texts: list[str], max_ctx: int) -> Batch: ...

    def hidden_states(self, batch: Batch, layers: list[int]) -> dict[int, torch.Tensor]:
        """`{layer: [batch, seq, d_model]}` residual stream after block `layer`, float32."""
        ...

    def logits(self, batch: Batch, edits: dict[int, Edit] | None = None) -> torch.Tensor:
        """`[batch, seq, vocab]` logits, with `edits[layer]` applied after block `layer`."""
        ...


def start_after(backend: Backend, layer: int, hidden: torch.Tensor) -> ContextManager[None]:
    """Context in which a forward of `backend` starts after block `layer` from `hidden` `[batch, seq, d_model]`,
    the clean residual there (`HFBackend.start_after`), where the backend can; elsewhere (TransformerLens) a
    no-op, and the forward re-runs blocks 0..`layer`. An edit at `layer` gives the same logits either way."""
    method = getattr(backend, "start_after", None)
    return method(layer, hidden) if method is not None else contextlib.nullcontext()


def check_layer_range(layers, n_layers: int, name: str) -> None:
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for {name}, which has {n_layers} layers")


def load_backend(name: str, backend: str = "hf", dtype: str = "float32", device: str = "cpu") -> Backend:
    """Load model `name` behind the named backend (`hf` or `tlens`)."""
    if backend == "tlens":
        from .backend_tlens import TLensBackend

        return TLensBackend.load(name, dtype, device)
    from .backend_hf import HFBackend

    return HFBackend.load(name, dtype, device)
