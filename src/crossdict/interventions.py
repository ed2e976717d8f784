"""Stage 5, causal transfer: does a feature found in model A steer model B the way it steers A?

Everything goes through the backends' edit hook (`Backend.logits(batch, edits)`) on held-out
passages (cut to `transfer.passage_chars` characters at whitespace, so both models read the same
text). Three experiments:

Feature injection. For a matched SAE pair (feat_a of A's SAE at layer_a, feat_b of B's at layer_b)
add α·v to the residual stream after the layer at every content position, where v is

    a_self       in A: A's decoder row of feat_a (raw space), scaled to s_a·‖d_a‖
    b_matched    in B: B's decoder row of feat_b
    b_mapped     in B: A's decoder row sent through the linear part of the Procrustes map
    b_unmatched  in B: the decoder row of a random B feature not matched to feat_a (control)
    random       in B: `n_random_controls` Gaussian directions (controls)

s is the feature's typical activation (its mean where it fires), so α = 1 adds the feature at
its usual strength. Every B direction gets the norm s_b·‖d_b‖ of the matched B feature: kinds
then differ only in direction, and one set of random controls serves all of them.
Per run: KL(clean ‖ steered) of next-token distributions (mean over content positions), and the
mean change of every token's log-probability. Cross-model agreement compares A's change with B's
over the vocabulary strings both tokenizers share: Spearman rank correlation, and the overlap of
the top promoted strings. A direction transfers when its agreement beats the random directions:
p = (1 + #controls ≥ it) / (n + 1), Benjamini–Hochberg over pairs.

Stitching. B's residual at anchor-paired positions is replaced by A's residual mapped through a
fitted map; the rest of B runs on it. Loss recovered = (L_mean − L_stitched) / (L_mean − L_clean),
mean ablation (B's train mean at those positions) = 0, clean = 1; zero ablation and a map applied to
A's residuals from shuffled positions (other passages) are the controls.

Feature patching. At paired positions, B's matched feature's activation is set to A's feature's
activation (in B's units: times s_b / s_a), keeping the SAE error term, so only that feature moves.
KL(clean ‖ patched) is compared with the same patch on random live B features (lower = A's
feature carries B's feature's information) and with ablating the feature.

Outputs: `report/transfer.csv`, `report/transfer_examples.json` (top promoted strings),
`report/stitching.csv`, `report/feature_patching.csv`, all written at the end, atomically.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from .align import LinearMap, map_dir
from .anchors import anchor_pairs
from .backend import Backend, Batch, Edit
from .cache import ActivationCache
from .config import RunConfig
from .matching import read_matches
from .sae_transfer import SAE_TRANSFER_COLUMNS, sae_transfer_rows
from .stats import bh_qvalues
from .transfer_controls import (
    CONTROL_KINDS,
    control_vectors,
    covariance_root,
    frequency_matched,
    normal_rows,
    paired_test,
    repeat_batch,
    shifts_many,
)
from .utils import atomic_write_json, atomic_write_text

TRANSFER_COLUMNS = (
    "layer_a", "layer_b", "feat_a", "feat_b", "act_corr", "match_q", "alpha", "direction", "control", "n_controls",
    "kl", "abs_dlogp", "agreement", "top_overlap", "control_mean", "control_sd", "control_z", "control_percentile",
    "p_value", "family", "q_value", "top_a", "top_b",
)  # fmt: skip
STITCH_COLUMNS = ("layer_a", "layer_b", "map", "control", "loss", "frac_recovered", "ci_low", "ci_high",
                  "frac_recovered_zero", "n_tokens", "n_patched", "n_passages")
PATCH_COLUMNS = (
    "layer_a", "layer_b", "feat_a", "feat_b", "kl_patch", "kl_ablate", "kl_random_mean", "random_percentile", "p_value",
    "n_controls", "family", "q_value", "n_patched",
)  # fmt: skip
PAIRED_COLUMNS = ("layer_a", "layer_b", "alpha", "x", "y", "metric", "test", "n_pairs", "median_x", "median_y",
                  "median_diff", "rank_biserial", "statistic", "p_value", "family", "q_value")
STITCH_MAPS = ("procrustes", "ridge", "procrustes_z", "ridge_z")


class TransferError(ValueError):
    """A transfer request cannot be served: unknown feature, no significant match, missing SAE or map."""


# --- vocabulary strings shared by two tokenizers --------------------------------------------------


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))


def vocab_strings(tokenizer, vocab_size: int | None = None) -> list[str | None]:
    """The text each token id stands for, leading space kept; None for special, partial-UTF-8 or absent ids.

    `tokenizer.decode([id])` is no use here: SentencePiece decoders drop a leading space, so " the"
    and "the" would collide. We undo the vocabulary's own encoding instead: GPT-2's byte-to-unicode
    table for byte-level BPE, '▁' -> ' ' and `<0xNN>` byte fallback for SentencePiece vocabularies.
    """
    n = len(tokenizer) if vocab_size is None else vocab_size
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(n, len(tokenizer)))))
    special = set(tokenizer.all_special_ids)
    out: list[str | None] = [None] * n
    if _is_byte_level(tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        for i, t in enumerate(tokens):
            if t is None or i in special:
                continue
            try:
                out[i] = bytes(byte_of[c] for c in t).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                pass
        return out
    for i, t in enumerate(tokens):
        if t is None or i in special:
            continue
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", t)
        if m:
            b = int(m.group(1), 16)
            out[i] = chr(b) if b < 128 else None
        elif not (t.startswith("<") and t.endswith(">") and len(t) > 2):
            out[i] = t.replace("▁", " ")
    return out


@dataclass
class SharedVocab:
    """Token ids of the strings both vocabularies hold: `ids_a[i]` and `ids_b[i]` spell `strings[i]`."""

    ids_a: np.ndarray
    ids_b: np.ndarray
    strings: list[str]


def shared_vocab(strings_a: list[str | None], strings_b: list[str | None]) -> SharedVocab:
    first_b: dict[str, int] = {}
    for j, s in enumerate(strings_b):
        if s and s not in first_b:
            first_b[s] = j
    ids_a, ids_b, strings, seen = [], [], [], set()
    for i, s in enumerate(strings_a):
        if s and s in first_b and s not in seen:
            seen.add(s)
            ids_a.append(i)
            ids_b.append(first_b[s])
            strings.append(s)
    if len(strings) < 100:
        raise TransferError(f"the two tokenizers share only {len(strings)} vocabulary strings; need >= 100 to compare "
                            "promoted tokens across models")
    return SharedVocab(np.array(ids_a), np.array(ids_b), strings)


def subsample_vocab(vocab: SharedVocab, n: int | None, seed: int) -> SharedVocab:
    """At most `n` of the shared strings, drawn uniformly with `seed`, kept in vocabulary order (None: all)."""
    if n is None or len(vocab.strings) <= n:
        return vocab
    keep = np.sort(np.random.default_rng(seed).choice(len(vocab.strings), n, replace=False))
    return SharedVocab(vocab.ids_a[keep], vocab.ids_b[keep], [vocab.strings[i] for i in keep])


# --- next-token effects -----------------------------------------------------------------------------


def add_at(vector: torch.Tensor, positions: torch.Tensor) -> Edit:
    """Edit adding `vector` `[d_model]` to the residual at `positions` `[batch, seq]` (bool)."""

    def edit(h: torch.Tensor) -> torch.Tensor:
        m = positions.to(h.device)[..., None].to(h.dtype)
        return h + m * vector.to(h.device, h.dtype)

    return edit


@dataclass
class CleanRun:
    """One model's clean pass over the transfer batches: the reference for every intervention."""

    batches: list[Batch]
    logp: list[torch.Tensor]
    """Per batch, log-probs `[n_measured, vocab]` at the measured (content) positions."""
    nll: float = math.nan
    """Mean next-token NLL over content positions that have a next content token."""
    memo: dict = field(default_factory=dict)

    @property
    def n_positions(self) -> int:
        return sum(int(x.shape[0]) for x in self.logp)


def clean_run(backend: Backend, batches: list[Batch]) -> CleanRun:
    run = CleanRun(batches, [F.log_softmax(backend.logits(b), -1)[b.is_content] for b in batches])
    per_all = np.concatenate([_reference(run, i).passage_sums(_reference(run, i).nll) for i in range(len(batches))])
    run.nll = float(per_all[:, 0].sum()) / max(int(per_all[:, 1].sum()), 1)
    run.memo["nll_passages"] = per_all
    return run


@dataclass
class Effect:
    kl: float
    """Mean over measured positions of KL(clean ‖ edited) of the next-token distribution (NaN when not asked for)."""
    dlogp: np.ndarray | None
    """`[vocab]` mean change of each token's log-probability (None when not asked for)."""
    nll: float
    """Mean next-token NLL of the edited model over content positions that have a next content token."""
    abs_dlogp: float = math.nan
    """Mean over measured positions and the `ids` given (shared strings) of |Δ log p|: the effect size."""
    nll_passages: np.ndarray | None = None
    """`[n_passages, 2]` summed next-token NLL and its token count per passage (for CIs over passages)."""


def _vocab_restricted(backend: Backend, ids: np.ndarray | None) -> Any:
    """Context in which `backend.logits` computes only columns `ids` (HF backend), else a no-op."""
    if ids is None or not hasattr(backend, "output_vocab"):
        return contextlib.nullcontext()
    return backend.output_vocab(torch.from_numpy(np.asarray(ids)))


def clean_hidden(backend: Backend, clean: CleanRun, layer: int) -> list[torch.Tensor]:
    """Per clean batch, the residual `[b, seq, d]` after block `layer` (computed once, kept in `clean.memo`)."""
    key = ("hidden", id(backend), layer)
    if key not in clean.memo:
        clean.memo[key] = [backend.hidden_states(b, [layer])[layer] for b in clean.batches]
    return clean.memo[key]


def from_clean(backend: Backend, clean: CleanRun, index: int, edits: dict[int, Edit], copies: int = 1) -> Any:
    """Context that starts the forward of clean batch `index` (stacked `copies` times) after the edited block,
    from the cached clean residual, when there is one edited block and the backend can (`start_after`).

    Blocks before an edit are the clean pass, bit for bit in exact arithmetic: one run of them serves every
    intervention at that layer (controls, directions, patches, splices)."""
    if len(edits) != 1 or not hasattr(backend, "start_after"):
        return contextlib.nullcontext()
    layer = next(iter(edits))
    h = clean_hidden(backend, clean, layer)[index]
    return backend.start_after(layer, h.repeat(copies, 1, 1) if copies > 1 else h)


@dataclass
class _Reference:
    """Clean batch `i` as every intervention compares with it, per content row (the rows of `clean.logp[i]`)."""

    nll: torch.Tensor
    """`[n]` clean NLL of the next token, 0 where it is not content (the row is not scored)."""
    valid: torch.Tensor
    """`[n]` bool: the next token is content, the row counts in the NLL."""
    target: torch.Tensor
    """`[n]` the next token's id (0 where not valid)."""
    passage: torch.Tensor
    """`[n]` the passage (batch row) each content row belongs to."""
    count: np.ndarray
    """`[b]` scored rows per passage."""

    def passage_sums(self, nll: torch.Tensor) -> np.ndarray:
        """`[b, 2]` summed NLL and count per passage over the scored rows, from `nll` `[n]` per content row."""
        total = torch.zeros(len(self.count), dtype=torch.float64)
        total.index_add_(0, self.passage[self.valid], nll[self.valid].double())
        return np.stack([total.numpy(), self.count], 1)


def _reference(clean: CleanRun, i: int) -> _Reference:
    key = ("reference", i)
    if key not in clean.memo:
        b, logp0 = clean.batches[i], clean.logp[i]
        content = b.is_content
        valid, target = torch.zeros_like(content), torch.zeros_like(b.input_ids)
        valid[:, :-1], target[:, :-1] = content[:, :-1] & content[:, 1:], b.input_ids[:, 1:]
        valid, target = valid[content], target[content]
        nll = torch.where(valid, -logp0.gather(1, target[:, None].to(logp0.device))[:, 0].cpu(), 0.0)
        passage = torch.arange(len(b.texts))[:, None].expand_as(content)[content]
        clean.memo[key] = _Reference(nll, valid, target, passage, np.bincount(passage[valid], minlength=len(b.texts)))
    return clean.memo[key]


def _clean_probs(clean: CleanRun, i: int) -> torch.Tensor:
    """`[n, vocab]` clean next-token probabilities of batch `i`: exp(logp0) once, not once per intervention."""
    key = ("p", i)
    if key not in clean.memo:
        clean.memo[key] = clean.logp[i].exp()
    return clean.memo[key]


@dataclass
class _Sums:
    """One intervention's running sums over the clean batches (see `Effect`)."""

    kl: float = 0.0
    abs_dlogp: float = 0.0
    dlogp: torch.Tensor | float = 0.0
    n: int = 0
    per: list[np.ndarray] = field(default_factory=list)

    def effect(self, kl: bool, dlogp: bool, ids: bool) -> Effect:
        per = np.concatenate(self.per)
        return Effect(self.kl / self.n if kl else math.nan,
                      (self.dlogp / self.n).float().cpu().numpy() if dlogp else None,
                      float(per[:, 0].sum()) / max(int(per[:, 1].sum()), 1),
                      self.abs_dlogp / self.n if ids else math.nan, per)


def _add_copy(s: _Sums, clean: CleanRun, i: int, rows: torch.Tensor, logits: torch.Tensor, sub: torch.Tensor | None,
              kl: bool, dlogp: bool) -> None:
    """Add batch `i` of one edited copy to `s`: content rows `rows` `[m]` (ascending) have `logits` `[m, vocab]`,
    every other content row is the clean one (the edit cannot reach it) and adds 0 to KL and Δlog p.

    KL(clean ‖ edited) = Σ p0·(logp0 − logp) is formed from the difference, not as Σ p0·logp0 − Σ p0·logp: small
    KLs (a patched feature: 1e-4 nats) would cancel in float32. The difference is taken in place, so the one
    `[m, vocab]` allocation is the log-softmax."""
    ref, logp0 = _reference(clean, i), clean.logp[i]
    nll = ref.nll.clone()
    logp = F.log_softmax(logits, -1)
    ok = ref.valid[rows]
    nll[rows[ok]] = -logp[ok].gather(1, ref.target[rows[ok]][:, None].to(logp.device))[:, 0].cpu()
    s.per.append(ref.passage_sums(nll))
    s.n += int(logp0.shape[0])
    if dlogp and not torch.is_tensor(s.dlogp):
        s.dlogp = torch.zeros(logp0.shape[-1], dtype=torch.float64, device=logp0.device)
    if not len(rows) or not (kl or dlogp or sub is not None):
        return
    p0 = _clean_probs(clean, i) if kl else None
    starts = np.r_[0, np.nonzero(np.diff(rows.numpy()) != 1)[0] + 1, len(rows)]
    for a, e in zip(starts[:-1], starts[1:]):  # runs of consecutive rows: views of the clean tensors, no copies
        c = int(rows[a])
        d = logp[a:e].sub_(logp0[c : c + e - a])  # Δlog p
        if sub is not None:
            s.abs_dlogp += float(d[:, sub].abs().mean(1).sum())
        if dlogp:
            s.dlogp += d.sum(0, dtype=torch.float64)
        if kl:
            s.kl -= float(d.mul_(p0[c : c + e - a]).sum())


def _edited_logits(backend: Backend, clean: CleanRun, i: int, edits: list[dict[int, Edit]],
                   max_floats: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per copy j of clean batch `i` with `edits[j]`: (j, content rows `[m]` the edit can reach, their logits
    `[m, vocab]`), in any order.

    With a backend that can start after a block and unembed chosen rows, an edit of one block is applied to the
    cached clean residual directly, copies editing the same block are stacked along the batch (chunks of at most
    `max_floats` logits) and only rows at or after a copy's first changed position are unembedded: the rows
    before it are the clean ones exactly (attention is causal), and a copy whose edit changes nothing runs no
    forward. Otherwise one forward per copy, every content row.
    """
    b = clean.batches[i]
    content = b.is_content
    vocab = int(clean.logp[i].shape[-1])
    fast = hasattr(backend, "start_after") and hasattr(backend, "output_rows")
    chunk: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (j, edited residual, reach, rows)
    at: list[int] = []  # the block the chunk's copies edit

    def run() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        if not chunk:
            return
        reach = torch.cat([r for _, _, r, _ in chunk])
        with backend.start_after(at[0], torch.cat([x for _, x, _, _ in chunk])), backend.output_rows(reach):
            logits = backend.logits(repeat_batch(b, len(chunk)))
        for (j, _, _, rows), part in zip(chunk, logits.split([len(r) for *_, r in chunk])):
            yield j, rows, part
        chunk.clear()

    for j, e in enumerate(edits):
        if not fast or len(e) != 1:
            with from_clean(backend, clean, i, e):
                yield j, torch.arange(int(content.sum())), backend.logits(b, e)[content]
            continue
        (layer,) = e
        h = clean_hidden(backend, clean, layer)[i]
        x = e[layer](h.clone()).to(h.dtype)  # a clone: an edit writing into its input must not touch the cache
        reach = ((x != h).any(-1).cpu().cumsum(1) > 0) & content  # [b, seq] at or after the first changed position
        rows = torch.nonzero(reach[content])[:, 0]
        if not len(rows):
            yield j, rows, torch.zeros(0, vocab)
            continue
        if chunk and (at[0] != layer or (sum(len(r) for *_, r in chunk) + len(rows)) * vocab > max_floats):
            yield from run()
        at[:] = [layer]
        chunk.append((j, x, reach, rows))
    yield from run()


EditsFor = Callable[[int, Batch], dict[int, Edit]]
"""`(batch_index, batch) -> {layer: edit}`: one intervention, as applied to each clean batch."""


def edited_effects(backend: Backend, clean: CleanRun, edits_for: list[EditsFor], ids: np.ndarray | None = None,
                   kl: bool = True, dlogp: bool = True, max_floats: int = 2**27) -> list[Effect]:
    """Run every batch with each `edits_for[j](batch_index, batch)` and compare with the clean pass.

    `kl` / `dlogp` False: that part of the `Effect` is not computed (NaN / None), which saves passes over
    `[positions, vocab]` (stitching needs only the NLL). Interventions are stacked along the batch (`_edited_logits`,
    `max_floats` bounds the logits held at once: 2**27 floats, 512 MB); the numbers are those of one forward per
    intervention up to float rounding (the stacked matmuls have other shapes).
    """
    sub = None if ids is None else torch.from_numpy(np.asarray(ids))
    sums = [_Sums() for _ in edits_for]
    for i, b in enumerate(clean.batches):
        for j, rows, logits in _edited_logits(backend, clean, i, [f(i, b) for f in edits_for], max_floats):
            _add_copy(sums[j], clean, i, rows, logits, sub, kl, dlogp)
    return [s.effect(kl, dlogp, sub is not None) for s in sums]


def edited_effect(backend: Backend, clean: CleanRun, edits_for: EditsFor, ids: np.ndarray | None = None,
                  kl: bool = True, dlogp: bool = True) -> Effect:
    """`edited_effects` of one intervention."""
    return edited_effects(backend, clean, [edits_for], ids, kl, dlogp)[0]


def inject(backend: Backend, clean: CleanRun, layer: int, vector: torch.Tensor, ids: np.ndarray | None = None) -> Effect:
    """Add `vector` `[d_model]` after block `layer` at every content position (|Δ log p| over `ids`)."""
    return edited_effect(backend, clean, lambda i, b: {layer: add_at(vector, b.is_content)}, ids)


def inject_shift(backend: Backend, clean: CleanRun, layer: int, vector: torch.Tensor, ids: np.ndarray) -> np.ndarray:
    """`[len(ids)]` mean logit change of tokens `ids` when `vector` is added at every content position.

    For rank comparisons (agreement) this equals the log-prob change up to a constant: the
    normaliser's change is the same for every token at a position. Only the `ids` rows of the
    unembedding run, which makes the random-direction controls several times cheaper.
    """
    sub = torch.from_numpy(np.asarray(ids))
    total, n = None, 0
    with _vocab_restricted(backend, ids):
        for i, b in enumerate(clean.batches):
            edits = {layer: add_at(vector, b.is_content)}
            with from_clean(backend, clean, i, edits):
                logits = backend.logits(b, edits)
            if logits.shape[-1] != len(ids):  # the backend cannot restrict its vocabulary
                logits = logits[..., sub]
            s = logits[b.is_content].sum(0, dtype=torch.float64)
            total, n = (s if total is None else total + s), n + int(b.is_content.sum())
    clean_part = _clean_logits_mean(clean, backend, ids)
    return ((total / n).float() - clean_part).numpy()


def _clean_logits_mean(clean: CleanRun, backend: Backend, ids: np.ndarray) -> torch.Tensor:
    key = ("clean_shift", id(backend), len(ids))
    if key not in clean.memo:
        total, n = None, 0
        with _vocab_restricted(backend, ids):
            for b in clean.batches:
                logits = backend.logits(b)
                if logits.shape[-1] != len(ids):
                    logits = logits[..., torch.from_numpy(np.asarray(ids))]
                s = logits[b.is_content].sum(0, dtype=torch.float64)
                total, n = (s if total is None else total + s), n + int(b.is_content.sum())
        clean.memo[key] = (total / n).float()
    return clean.memo[key]


def agreement(xa: np.ndarray, xb: np.ndarray, top: int = 20) -> tuple[float, float]:
    """(Spearman ρ, top-`top` overlap) of two models' log-prob changes `[n_shared]`, aligned by shared string."""
    if np.ptp(xa) == 0 or np.ptp(xb) == 0:
        return math.nan, math.nan
    rho = float(spearmanr(xa, xb).statistic)
    ta, tb = set(np.argsort(-xa)[:top].tolist()), set(np.argsort(-xb)[:top].tolist())
    return rho, len(ta & tb) / top


def promoted(dlogp: np.ndarray, strings: list[str | None], top: int = 20) -> list[str]:
    """The `top` strings whose log-probability rises most."""
    out = []
    for i in np.argsort(-dlogp):
        if i < len(strings) and strings[i] and strings[i].strip():
            out.append(strings[i])
            if len(out) == top:
                break
    return out


def control_stats(value: float, controls: np.ndarray) -> dict[str, float]:
    """Where `value` falls among control values: z-score, percentile, one-sided permutation p."""
    c = controls[np.isfinite(controls)]
    if len(c) == 0:
        return {"control_mean": math.nan, "control_sd": math.nan, "control_z": math.nan, "control_percentile": math.nan,
                "p_value": math.nan}
    if not math.isfinite(value):  # no change at all (a zero or null-space direction): it beats nothing
        return {"control_mean": float(c.mean()), "control_sd": math.nan, "control_z": math.nan,
                "control_percentile": 0.0, "p_value": 1.0}
    sd = float(c.std(ddof=1)) if len(c) > 1 else math.nan
    return {"control_mean": float(c.mean()), "control_sd": sd,
            "control_z": (value - float(c.mean())) / sd if sd and sd > 0 else math.nan,
            "control_percentile": float((c < value).mean()),
            "p_value": (1 + int((c >= value).sum())) / (len(c) + 1)}


# --- inputs: passages, SAEs, maps, matches ------------------------------------------------------------


def cut_text(text: str, max_chars: int) -> str:
    """At most `max_chars` characters, cut at whitespace so both tokenizers see whole words."""
    if len(text) <= max_chars:
        return text
    ws = max(text.rfind(" ", 0, max_chars + 1), text.rfind("\n", 0, max_chars + 1))
    return text[: ws if ws > 0 else max_chars]


def heldout_passages(cache: ActivationCache) -> list[int]:
    tok = cache.tokens("a")
    return sorted(set(tok[tok[:, 5] == 1, 0].tolist()))


def heldout_texts(cache: ActivationCache, n: int, max_chars: int, pids: list[int] | None = None) -> list[str]:
    """Held-out passages the models read during extraction (`pids`, else the first `n`), cut to `max_chars`."""
    pids = heldout_passages(cache)[:n] if pids is None else pids
    texts = cache.passage_texts()
    out = [cut_text(texts[p], max_chars) for p in pids]
    if not out:
        raise TransferError(f"the cache {cache.dir} holds no held-out passages to run interventions on")
    return out


def batches_for(backend: Backend, texts: list[str], max_ctx: int, batch_size: int) -> list[Batch]:
    return [backend.tokenize(texts[i : i + batch_size], max_ctx) for i in range(0, len(texts), batch_size)]


def raw_decoder(sae: Any) -> torch.Tensor:
    """`[d_sae, d_model]` decoder rows in raw activation space (a unit code adds this row)."""
    return sae.W_dec.detach().float() / float(sae.spec.input_scale)


def typical_activation(sae: Any, acts: Any, rows: np.ndarray, max_rows: int = 8192, seed: int = 0) -> np.ndarray:
    """`[d_sae]` mean activation of each latent where it fires, over up to `max_rows` cache rows (0: never fired)."""
    return activation_stats(sae, acts, rows, max_rows, seed)[0]


def activation_stats(sae: Any, acts: Any, rows: np.ndarray, max_rows: int = 8192, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(`[d_sae]` mean activation where it fires, `[d_sae]` firing rate) over up to `max_rows` cache rows."""
    from .sae import feature_activations

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(rows, min(len(rows), max_rows), replace=False))
    total, fired = np.zeros(sae.d_sae), np.zeros(sae.d_sae)
    for s in range(0, len(rows), 1024):
        vals = feature_activations(sae, acts, rows[s : s + 1024], np.arange(sae.d_sae))
        total += vals.sum(0)
        fired += (vals > 0).sum(0)
    return np.where(fired > 0, total / np.maximum(fired, 1), 0.0), fired / max(len(rows), 1)


@dataclass
class MatchedPair:
    layer_a: int
    layer_b: int
    feat_a: int
    feat_b: int
    act_corr: float
    q_value: float
    p_value: float = math.nan
    """Its p-value (before Benjamini–Hochberg); NaN when not known."""
    min_freq: float = 1.0
    """The smaller of the two features' firing frequencies on train tokens."""
    n_passages: float = math.inf
    """The fewer of the two features' held-out firing passages (support rule); inf when not known."""


def load_matches(path: Path) -> list[MatchedPair]:
    if not path.is_file():
        raise TransferError(f"no feature matches at {path}; run the align stage first (crossdict align)")
    return [MatchedPair(r["layer_a"], r["layer_b"], r["feat_a"], r["feat_b"], r["act_corr"], r["q_value"],
                        r.get("p_value", math.nan), min(r["freq_a"], r["freq_b"]),
                        min(r.get("n_passages_a", math.inf), r.get("n_passages_b", math.inf)))
            for r in read_matches(path)]


def firing_passages(sae: Any, acts: Any, tokens: np.ndarray, rows: np.ndarray, feats: np.ndarray,
                    max_rows: int = 8192) -> dict[int, set[int]]:
    """`{feat: set of passage ids}` where each latent of `feats` fires, over held-out cache `rows` (whole
    passages, the first up to `max_rows` rows); for the support rule when feature_matches.csv lacks it."""
    from .sae import feature_activations

    rows = np.sort(rows)
    pids = tokens[rows, 0]
    if len(rows) > max_rows:
        keep = pids <= pids[max_rows - 1]
        rows, pids = rows[keep], pids[keep]
    feats = np.unique(np.asarray(feats, int))
    vals = feature_activations(sae, acts, rows, feats)
    return {int(f): set(np.unique(pids[vals[:, j] > 0]).tolist()) for j, f in enumerate(feats)}


def with_support(cfg: RunConfig, cache: ActivationCache, la: int, lb: int, sae_a: Any, sae_b: Any,
                 matches: list[MatchedPair]) -> tuple[list[MatchedPair], dict[int, set[int]]]:
    """The pairs at (la, lb) with their held-out support filled in where unknown, and A's firing passages."""
    here = [m for m in matches if m.layer_a == la and m.layer_b == lb and m.q_value < cfg.align.q_threshold]
    if not here:
        return [], {}
    fa = firing_passages(sae_a, cache.acts("a", la), cache.tokens("a"), cache.rows("a", "heldout"), [m.feat_a for m in here])
    fb = None
    if any(not math.isfinite(m.n_passages) for m in here):
        fb = firing_passages(sae_b, cache.acts("b", lb), cache.tokens("b"), cache.rows("b", "heldout"),
                             [m.feat_b for m in here])
    out = []
    for m in here:
        n = m.n_passages if fb is None else min(len(fa[m.feat_a]), len(fb[m.feat_b]))
        out.append(dataclasses.replace(m, n_passages=n))
    return out, fa


def choose_passages(fires: dict[Any, set[int]], feats: list[Any], heldout: list[int], n: int) -> list[int]:
    """`n` held-out passage ids where the tested A features fire most (ties: passage order)."""
    score = {p: sum(p in fires.get(f, ()) for f in feats) for p in heldout}
    return sorted(sorted(heldout, key=lambda p: (-score[p], p))[:n])


def nearest_candidates(dec_a: torch.Tensor, dec_b: torch.Tensor, rotation: np.ndarray, feat_a: int, n: int = 5) -> list[tuple[int, float]]:
    """B features whose decoder rows are closest (cosine) to A's row `feat_a` mapped by `rotation`."""
    v = torch.from_numpy(np.asarray(rotation, np.float32)).T @ dec_a[feat_a]
    cos = F.normalize(dec_b, dim=1) @ F.normalize(v, dim=0)
    top = torch.topk(cos, min(n, len(cos)))
    return [(int(i), round(float(c), 3)) for c, i in zip(top.values, top.indices)]


# --- the three experiments ----------------------------------------------------------------------------


@dataclass
class Side:
    """One model at one layer, ready for interventions."""

    backend: Backend
    layer: int
    sae: Any
    clean: CleanRun
    strings: list[str | None]


def injection_rows(pair: MatchedPair, a: Side, b: Side, linear: np.ndarray, s_a: float, s_b: float, alphas: list[float],
                   vocab: SharedVocab, unmatched_b: int, s_unmatched: float, n_controls: int, top: int,
                   gen: torch.Generator, freq_a: np.ndarray | None = None, cov_root: torch.Tensor | None = None,
                   kinds: tuple[str, ...] = CONTROL_KINDS) -> tuple[list[dict], dict]:
    """transfer.csv rows for one matched pair (every α × direction kind × control kind) and its promoted strings.

    Controls (see transfer_controls): `specificity` needs `freq_a` (A's firing rates, for frequency
    matching), `on_manifold` needs `cov_root`; kinds whose input is missing are skipped. Every
    control vector has the norm of the candidate B direction (s_b·‖d_b‖).
    """
    dec_a, dec_b = raw_decoder(a.sae), raw_decoder(b.sae)
    W = torch.from_numpy(np.asarray(linear, np.float32))
    u_a = dec_a[pair.feat_a] * s_a
    norm_b = float((dec_b[pair.feat_b] * s_b).norm())
    unit = lambda v: v / v.norm().clamp_min(1e-12)  # noqa: E731
    directions = {
        "b_matched": unit(dec_b[pair.feat_b]),
        "b_mapped": _unit_or_zero(W.T @ dec_a[pair.feat_a], float(dec_a[pair.feat_a].norm())),
        "b_unmatched": unit(dec_b[unmatched_b] * max(s_unmatched, 1e-12)),
    }
    inputs = {"specificity": freq_a, "on_manifold": cov_root, "isotropic": True}
    kinds = tuple(k for k in kinds if inputs[k] is not None)
    mapped_others = None
    if "specificity" in kinds:
        others = frequency_matched(np.asarray(freq_a), pair.feat_a, n_controls)
        mapped_others = dec_a[torch.from_numpy(others)] @ W
    ctrl_unit = {k: control_vectors(k, n_controls, 1.0, dec_b.shape[1], gen, mapped_a=mapped_others, cov_root=cov_root)
                 for k in kinds}
    rows, example = [], {}
    for alpha in alphas:
        eff_a = inject(a.backend, a.clean, a.layer, alpha * u_a, vocab.ids_a)
        xa = eff_a.dlogp[vocab.ids_a]
        clean_part = _clean_logits_mean(b.clean, b.backend, vocab.ids_b)
        ctrl_agree = {}
        for k, units in ctrl_unit.items():
            shifts = shifts_many(b.backend, b.clean.batches, b.layer, alpha * norm_b * units, vocab.ids_b,
                                 lambda: _vocab_restricted(b.backend, vocab.ids_b),
                                 hidden=clean_hidden(b.backend, b.clean, b.layer)) - clean_part
            ctrl_agree[k] = np.array([agreement(xa, x.numpy(), top)[0] for x in shifts])
        base = {"layer_a": pair.layer_a, "layer_b": pair.layer_b, "feat_a": pair.feat_a, "feat_b": pair.feat_b,
                "act_corr": pair.act_corr, "match_q": pair.q_value, "alpha": alpha}
        top_a = promoted(eff_a.dlogp, a.strings, top)
        rows.append({**base, "direction": "a_self", "control": "none", "kl": eff_a.kl, "abs_dlogp": eff_a.abs_dlogp,
                     "top_a": "|".join(top_a[:8])})
        for kind, u in directions.items():
            eff = inject(b.backend, b.clean, b.layer, alpha * norm_b * u, vocab.ids_b)
            rho, overlap = agreement(xa, eff.dlogp[vocab.ids_b], top)
            top_b = promoted(eff.dlogp, b.strings, top)
            for k, c in ctrl_agree.items():
                rows.append({**base, "direction": kind, "control": k, "n_controls": len(c), "kl": eff.kl,
                             "abs_dlogp": eff.abs_dlogp, "agreement": rho, "top_overlap": overlap,
                             **control_stats(rho, c), "family": f"inject {kind} vs {k} alpha={alpha:g}",
                             "top_a": "|".join(top_a[:8]), "top_b": "|".join(top_b[:8])})
            if not ctrl_agree:  # a pair without controls (transfer.n_control_features): effect and agreement only
                rows.append({**base, "direction": kind, "control": "none", "kl": eff.kl, "abs_dlogp": eff.abs_dlogp,
                             "agreement": rho, "top_overlap": overlap, "top_a": "|".join(top_a[:8]),
                             "top_b": "|".join(top_b[:8])})
            if alpha == max(alphas):
                example[f"promoted_{kind}"] = top_b
        if alpha == max(alphas):
            example.update({"layer_a": pair.layer_a, "layer_b": pair.layer_b, "feat_a": pair.feat_a, "feat_b": pair.feat_b,
                            "alpha": alpha, "promoted_a": top_a, "promoted_b": example.get("promoted_b_mapped", [])})
    return rows, example


def _unit_or_zero(v: torch.Tensor, ref: float, tol: float = 1e-5) -> torch.Tensor:
    """v / ‖v‖, or 0 when the map sends the direction (norm `ref` before it) into its null space:
    rescaling float noise to full norm would inject a random direction instead of nothing."""
    n = float(v.norm())
    return torch.zeros_like(v) if n <= tol * max(ref, 1e-30) else v / n


def paired_positions(batch_a: Batch, batch_b: Batch) -> list[np.ndarray]:
    """Per passage, anchor pairs `[n, 2]` (position in A, position in B) of the two tokenizations."""
    return [anchor_pairs(batch_a.offsets[i].numpy(), batch_b.offsets[i].numpy()) for i in range(len(batch_a.texts))]


def _replace_at(values: list[torch.Tensor], pairs: list[np.ndarray]) -> Edit:
    """Edit writing `values[i]` `[n_i, d_b]` into passage i's B positions `pairs[i][:, 1]`."""

    def edit(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        for i, (v, p) in enumerate(zip(values, pairs)):
            h[i, torch.from_numpy(p[:, 1])] = v.to(h.dtype)
        return h

    return edit


def _keep_normal(pairs: list[np.ndarray], hs_a: torch.Tensor, hs_b: torch.Tensor, max_a: float | None,
                 max_b: float | None, sink_a: bool = False, sink_b: bool = False) -> list[np.ndarray]:
    """Drop pairs where either residual is a massive activation (attention sink) the maps were not made for.

    The cache's row-mask rule (`cache.py`, "Row mask"): norm above the layer's `max_norm`, or position 0
    of a model without BOS (`sink_a` / `sink_b`), whose first token is the attention sink."""
    out = []
    for i, p in enumerate(pairs):
        keep = normal_rows(hs_a[i, p[:, 0]].norm(dim=-1), max_a) & normal_rows(hs_b[i, p[:, 1]].norm(dim=-1), max_b)
        if sink_a:
            keep &= p[:, 0] != 0
        if sink_b:
            keep &= p[:, 1] != 0
        out.append(p[keep])
    return out


@dataclass
class Pairing:
    """A's and B's transfer batches aligned: per B batch, per passage, the anchor pairs kept."""

    pairs: list[list[np.ndarray]]
    hs_a: list[torch.Tensor]
    """Per batch, A's residual `[b, seq_a, d_a]` at layer_a."""
    n_patched: int


def pair_batches(a: Side, b: Side, max_a: float | None, max_b: float | None) -> Pairing:
    pairs, n = [], 0
    hs_a = clean_hidden(a.backend, a.clean, a.layer)  # the cached clean states: patching and splicing reuse them
    for ba, bb, ha, hb in zip(a.clean.batches, b.clean.batches, hs_a, clean_hidden(b.backend, b.clean, b.layer)):
        p = _keep_normal(paired_positions(ba, bb), ha, hb, max_a, max_b,
                         not getattr(a.backend, "has_bos", True), not getattr(b.backend, "has_bos", True))
        pairs.append(p)
        n += sum(len(x) for x in p)
    if n == 0:
        raise TransferError("no anchor-paired positions in the transfer passages")
    return Pairing(pairs, hs_a, n)


def stitching_rows(a: Side, b: Side, maps: dict[str, LinearMap], pairing: Pairing, mean_b: np.ndarray,
                   gen: torch.Generator, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """stitching.csv rows: B's loss with A's mapped residual at paired positions, vs ablations and controls.

    Every map also runs on A's states from shuffled positions (other positions and passages): the
    control for "any plausible residual recovers the loss". `ci_low`/`ci_high`: 95% percentile
    bootstrap of frac_recovered over passages (each resample recomputes clean, mean and stitched loss).
    """
    base = {"layer_a": a.layer, "layer_b": b.layer, "n_tokens": sum(int(x.shape[0]) for x in b.clean.logp),
            "n_patched": pairing.n_patched, "n_passages": sum(len(p) for p in pairing.pairs)}

    def values_from(fn: Callable[[int, int], torch.Tensor]) -> list[list[torch.Tensor]]:
        return [[fn(k, i) for i in range(len(pairing.pairs[k]))] for k in range(len(pairing.pairs))]

    def replace(values: list[list[torch.Tensor]]) -> EditsFor:
        return lambda k, bb: {b.layer: _replace_at(values[k], pairing.pairs[k])}

    def shuffle(mapped: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        flat = torch.cat([v for per in mapped for v in per])
        perm = flat[torch.randperm(len(flat), generator=gen)]
        out, at = [], 0
        for per in mapped:
            out.append([])
            for v in per:
                out[-1].append(perm[at : at + len(v)])
                at += len(v)
        return out

    d_b = b.backend.d_model
    mean = torch.from_numpy(np.asarray(mean_b, np.float32))
    edits = {"mean": replace(values_from(lambda k, i: mean.expand(len(pairing.pairs[k][i]), d_b))),
             "zero": replace(values_from(lambda k, i: torch.zeros(len(pairing.pairs[k][i]), d_b)))}
    rows = [{**base, "map": "none", "control": c, "key": c} for c in ("clean", "mean", "zero")]
    for name, mp in maps.items():  # the shuffles draw from `gen` in map order, as when each ran on its own
        W, bias = torch.from_numpy(mp.weight), torch.from_numpy(mp.bias)
        mapped = values_from(lambda k, i: pairing.hs_a[k][i, torch.from_numpy(pairing.pairs[k][i][:, 0])] @ W + bias)
        edits[name], edits[f"{name}_shuffled"] = replace(mapped), replace(shuffle(mapped))
        rows += [{**base, "map": name, "control": "none", "key": name},
                 {**base, "map": name, "control": "shuffled", "key": f"{name}_shuffled"}]
    effects = edited_effects(b.backend, b.clean, list(edits.values()), kl=False, dlogp=False)  # only the NLL is used
    per = {"clean": b.clean.memo["nll_passages"], **{k: e.nll_passages for k, e in zip(edits, effects)}}
    rng = np.random.default_rng(seed)
    n_p = len(per["clean"])
    boot = rng.integers(0, n_p, size=(n_boot, n_p))

    def loss(key: str, idx: np.ndarray | None = None) -> np.ndarray | float:
        x = per[key] if idx is None else per[key][idx]
        return x[..., 0].sum(-1) / np.maximum(x[..., 1].sum(-1), 1)

    for r in rows:
        key = r.pop("key")
        r["loss"] = float(loss(key))
        for col, abl in (("frac_recovered", "mean"), ("frac_recovered_zero", "zero")):
            gap = loss(abl) - loss("clean")
            r[col] = float((loss(abl) - loss(key)) / gap) if abs(gap) > 1e-12 else math.nan
        gaps = loss("mean", boot) - loss("clean", boot)
        with np.errstate(divide="ignore", invalid="ignore"):
            fr = (loss("mean", boot) - loss(key, boot)) / gaps
        fr = fr[np.isfinite(fr)]
        r["ci_low"], r["ci_high"] = (float(np.quantile(fr, 0.025)), float(np.quantile(fr, 0.975))) if len(fr) else (math.nan, math.nan)
    return rows


def feature_patch_rows(pairs: list[MatchedPair], a: Side, b: Side, pairing: Pairing, s_a: np.ndarray, s_b: np.ndarray,
                       alive_b: np.ndarray, n_controls: int, gen: np.random.Generator) -> list[dict]:
    """feature_patching.csv rows: set B's matched feature to A's feature activation, vs random B features."""
    dec_b = raw_decoder(b.sae)
    codes_a = [a.sae.encode(h) for h in pairing.hs_a]  # [b, seq_a, d_sae_a] per batch

    def patch(feat_b: int, scale: float, values_a: Callable[[int, int], torch.Tensor]) -> EditsFor:
        """Set `feat_b`'s code at the paired B positions to `values_a` times `scale`. A patch that moves nothing
        (neither feature fires) runs no forward: `edited_effects` sees the residual unchanged and gives KL 0."""

        def edits(k: int, bb: Batch) -> dict[int, Edit]:
            def edit(h: torch.Tensor) -> torch.Tensor:
                h = h.clone()
                for i, p in enumerate(pairing.pairs[k]):
                    pos = torch.from_numpy(p[:, 1])
                    old = b.sae.encode(h[i, pos])[:, feat_b]
                    new = values_a(k, i) * scale
                    h[i, pos] += (new - old)[:, None] * dec_b[feat_b]  # SAE error term and other latents untouched
                return h

            return {b.layer: edit}

        return edits

    rows = []
    for pr in pairs:
        fa = pr.feat_a
        from_a = lambda k, i: codes_a[k][i, torch.from_numpy(pairing.pairs[k][i][:, 0]), fa]  # noqa: E731
        zero = lambda k, i: torch.zeros(len(pairing.pairs[k][i]))  # noqa: E731
        pool = alive_b[alive_b != pr.feat_b]
        controls = [patch(int(f), s_b[int(f)] / max(s_a[fa], 1e-12), from_a)
                    for f in gen.choice(pool, min(n_controls, len(pool)), replace=False)]
        kl_patch, kl_ablate, *ctrl = (e.kl for e in edited_effects(
            b.backend, b.clean, [patch(pr.feat_b, s_b[pr.feat_b] / max(s_a[fa], 1e-12), from_a),
                                 patch(pr.feat_b, 1.0, zero), *controls], dlogp=False))
        ctrl = np.array(ctrl)
        rows.append({"layer_a": pr.layer_a, "layer_b": pr.layer_b, "feat_a": fa, "feat_b": pr.feat_b, "kl_patch": kl_patch,
                     "kl_ablate": kl_ablate, "kl_random_mean": float(ctrl.mean()) if len(ctrl) else math.nan,
                     "random_percentile": float((ctrl < kl_patch).mean()) if len(ctrl) else math.nan,
                     "p_value": (1 + int((ctrl <= kl_patch).sum())) / (len(ctrl) + 1), "n_controls": len(ctrl),
                     "n_patched": pairing.n_patched})
    return rows


# --- stage entry point ------------------------------------------------------------------------------


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: (f"{r[c]:.6g}" if isinstance(r.get(c), float) else r.get(c, "")) for c in columns})
    atomic_write_text(path, buf.getvalue())


def _load_side_files(cfg: RunConfig, key: str, layer: int) -> Any:
    from .sae import load_sae

    path = cfg.sae_dir(key, layer)
    if not path.is_dir():
        raise TransferError(f"no SAE for model {key} ({cfg.model(key).name}) layer {layer} at {path}; configured layers "
                            f"with SAEs: {cfg.model(key).layers} (run crossdict train)")
    return load_sae(path)


def _load_maps(cfg: RunConfig, la: int, lb: int) -> dict[str, LinearMap]:
    """The saved maps transfer uses at (la, lb): Procrustes, `transfer.direction_map` and the stitched ones."""
    d = map_dir(cfg.run_dir, la, lb)
    if not (d / "procrustes.safetensors").is_file():
        raise TransferError(f"no alignment for layers (a={la}, b={lb}) at {d}; run crossdict align for this layer pair")
    # A _z map on disk with align.standardized_space off is stale (an earlier align run's): this config fits none.
    saved = [m for m in STITCH_MAPS if (d / f"{m}.safetensors").is_file()
             and (cfg.align.standardized_space or not m.endswith("_z"))]
    tcfg = cfg.transfer
    want = {"procrustes", tcfg.direction_map, *(saved if tcfg.maps is None else tcfg.maps)}  # procrustes: error hints
    missing = [m for m in STITCH_MAPS if m in want and m not in saved]
    if missing:
        z = (" The _z maps are fitted (and used) only with align.standardized_space: true."
             if any(m.endswith("_z") for m in missing) else "")
        raise TransferError(f"layers (a={la}, b={lb}): transfer.direction_map {tcfg.direction_map!r} and transfer.maps "
                            f"{tcfg.maps} need the map(s) {missing}, but the align stage saved only {saved} at {d}.{z} "
                            f"Choose among {saved}, or rerun crossdict align")
    return {m: LinearMap.load(d, m) for m in saved if m in want}


def _stitched_maps(cfg: RunConfig, maps: dict[str, LinearMap]) -> dict[str, LinearMap]:
    """The maps stitching and sae_transfer run (`transfer.maps`, else every saved one), in `STITCH_MAPS` order."""
    return {m: mp for m, mp in maps.items() if cfg.transfer.maps is None or m in cfg.transfer.maps}


def _check_alpha(alphas: list[float]) -> list[float]:
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise TransferError(f"alpha must be a finite number, got {bad}")
    return [float(a) for a in alphas if a != 0.0]  # α = 0 is the identity (tests check it is bit-exact)


def null_resolution_hint(cfg: RunConfig, tested: list[MatchedPair]) -> str:
    """Why no match can pass when the shuffle null is too coarse for the number of tests, with the numbers; else "".

    An empirical p-value is at least 1/(n+1) (n = align.n_match_null draws). Benjamini–Hochberg over m tests gives
    the k pairs at that floor q = m / (k (n+1)); when that is >= q_threshold, no pair can pass whatever the data."""
    n, thr = cfg.align.n_match_null, cfg.align.q_threshold
    p = np.array([m.p_value for m in tested], np.float64)
    p = p[np.isfinite(p)]
    if cfg.align.match_pvalue != "empirical" or n < 1 or not len(p):
        return ""
    floor = 1.0 / (n + 1)
    k = int((p <= floor * (1 + 1e-9)).sum())
    if k == 0 or len(p) * floor / k < thr:
        return ""
    m = len(p)
    need = math.floor(m / thr)
    while m / (need + 1) >= thr:
        need += 1
    return (f". The shuffle null's resolution is the cause: with align.n_match_null={n} the smallest p-value is "
            f"1/{n + 1} = {floor:.2g}; {k} of the {m} tested pairs reached it, and Benjamini–Hochberg over {m} tests gives "
            f"them q = {m * floor / k:.2g} >= align.q_threshold {thr}. Raise align.n_match_null to at least {need} "
            f"(then one pair at the floor reaches q < {thr}) and rerun align, or test fewer pairs")


def select_pairs(cfg: RunConfig, la: int, lb: int, matches: list[MatchedPair], feature_idx: int | None, d_sae_a: int,
                 candidates: Callable[[int], list]) -> list[MatchedPair]:
    """The matched pairs to test at (la, lb): `feature_idx` alone, or the top `transfer.n_features` by correlation."""
    sig = [m for m in matches if m.layer_a == la and m.layer_b == lb and m.q_value < cfg.align.q_threshold]
    if feature_idx is None:
        common = sorted((m for m in sig if m.min_freq >= cfg.transfer.min_freq
                         and m.n_passages >= cfg.transfer.min_support_passages), key=lambda m: -m.act_corr)
        if not common:
            hint = "" if sig else null_resolution_hint(cfg, [m for m in matches if (m.layer_a, m.layer_b) == (la, lb)])
            raise TransferError(f"layers (a={la}, b={lb}) have no significant feature matches (q < {cfg.align.q_threshold}) "
                                f"whose features both fire on >= {cfg.transfer.min_freq} of train tokens (transfer.min_freq) "
                                f"and in >= {cfg.transfer.min_support_passages} held-out passages "
                                "(transfer.min_support_passages)" + hint)
        return common[: cfg.transfer.n_features]
    if not 0 <= feature_idx < d_sae_a:
        raise TransferError(f"--feature_idx {feature_idx} is out of range: A's SAE at layer {la} has {d_sae_a} features "
                            f"(0..{d_sae_a - 1})")
    hit = [m for m in sig if m.feat_a == feature_idx]
    if not hit:
        near = ", ".join(f"B feature {f} (decoder cosine {c})" for f, c in candidates(feature_idx))
        best = ", ".join(str(m.feat_a) for m in sorted(sig, key=lambda m: -m.act_corr)[:8])
        raise TransferError(f"feature {feature_idx} of A (layer {la}) has no significant match in B layer {lb} "
                            f"(q < {cfg.align.q_threshold}). Nearest B features after the Procrustes map: {near}. "
                            f"A features with the strongest significant matches: {best}")
    return hit


def sweep_plan(cfg: RunConfig, cache: ActivationCache, matches: list[MatchedPair], plan: dict, feature_idx: int | None,
               fires: dict) -> dict[tuple[int, int], list[MatchedPair]]:
    """The pairs the full sweep tests at every configured layer pair: passages are chosen for them, so a
    one-feature run reads the same passages as the sweep (and reproduces its numbers)."""
    if feature_idx is None and set(plan) == set(cfg.layer_pairs):
        return plan
    out = {}
    for la, lb in cfg.layer_pairs:
        try:
            here = [m for m in matches if (m.layer_a, m.layer_b) == (la, lb)]
            if (la, lb) not in fires:  # fills `fires` for layer pairs this run does not test
                here, fires[(la, lb)] = with_support(cfg, cache, la, lb, _load_side_files(cfg, "a", la),
                                                     _load_side_files(cfg, "b", lb), matches)
            out[(la, lb)] = select_pairs(cfg, la, lb, here, None, 0, lambda f: [])
        except TransferError:
            continue
    return out


def run_transfer(cfg: RunConfig, backends: dict[str, Backend] | None = None, layer_a: int | None = None,
                 feature_idx: int | None = None, alphas: list[float] | None = None, progress: bool = True) -> dict:
    """Injection, stitching and feature patching for every configured layer pair (or one feature); writes the CSVs.

    With `feature_idx` (A's feature at `layer_a`), only that pair is injected and the results go to
    `report/transfer_L<la>_F<feature>.csv`, leaving the sweep's files as they are.
    """
    tcfg = cfg.transfer
    alphas = _check_alpha(list(tcfg.alphas if alphas is None else alphas))
    if not alphas:
        raise TransferError("no non-zero alpha to test (alpha = 0 leaves the model unchanged)")
    pairs_ab = cfg.layer_pairs if layer_a is None else [p for p in cfg.layer_pairs if p[0] == layer_a]
    if not pairs_ab:
        raise TransferError(f"layer {layer_a} of model A is not configured (model_a.layers: {cfg.model_a.layers}); its "
                            "SAE and alignment do not exist")
    matches = loaded_matches = load_matches(cfg.report_dir / "feature_matches.csv")
    cache = ActivationCache(cfg.cache_dir)
    loaded = {(la, lb): (_load_side_files(cfg, "a", la), _load_side_files(cfg, "b", lb), _load_maps(cfg, la, lb))
              for la, lb in pairs_ab}  # every input checked before any model runs
    plan, fires = {}, {}
    for (la, lb), (sae_a, sae_b, maps) in loaded.items():
        here, fires[(la, lb)] = with_support(cfg, cache, la, lb, sae_a, sae_b, matches)
        matches = [m for m in matches if (m.layer_a, m.layer_b) != (la, lb)] + here
        cand = lambda f, sa=sae_a, sb=sae_b, m=maps: nearest_candidates(raw_decoder(sa), raw_decoder(sb),  # noqa: E731
                                                                        m["procrustes"].weight, f)
        # with_support kept only the significant pairs; the rest of the tested ones feed select_pairs' null-resolution hint
        unsig = [m for m in loaded_matches if (m.layer_a, m.layer_b) == (la, lb) and not m.q_value < cfg.align.q_threshold]
        plan[(la, lb)] = select_pairs(cfg, la, lb, matches + unsig, feature_idx, sae_a.d_sae, cand)

    if backends is None:
        from .extract import load_backends

        backends = load_backends(cfg)
    union: dict[tuple[int, int], set[int]] = {}
    tested: list[tuple[int, int]] = []
    for (la, lb), todo in sweep_plan(cfg, cache, matches, plan, feature_idx, fires).items():  # keyed by layer: ids differ per layer
        for m in todo:
            union[(la, m.feat_a)] = fires[(la, lb)].get(m.feat_a, set())
            tested.append((la, m.feat_a))
    texts = heldout_texts(cache, tcfg.n_passages, tcfg.passage_chars,
                          choose_passages(union, tested, heldout_passages(cache), tcfg.n_passages))
    cleans = {k: clean_run(backends[k], batches_for(backends[k], texts, cfg.model(k).max_ctx, tcfg.batch_size))
              for k in ("a", "b")}
    strings = {k: vocab_strings(backends[k].tokenizer, int(cleans[k].logp[0].shape[-1])) for k in ("a", "b")}
    vocab = subsample_vocab(shared_vocab(strings["a"], strings["b"]), tcfg.max_shared_strings, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    transfer, examples, stitching, patching, sae_transfer = [], [], [], [], []
    for (la, lb), (sae_a, sae_b, maps) in loaded.items():
        a_rows, b_rows = cache.rows("a", "train"), cache.rows("b", "train")
        s_a, freq_a = activation_stats(sae_a, cache.acts("a", la), a_rows, seed=cfg.seed)
        s_b = typical_activation(sae_b, cache.acts("b", lb), b_rows, seed=cfg.seed)
        cov_rows = np.sort(rng.choice(b_rows, min(len(b_rows), 20000), replace=False))
        cov_root = covariance_root(cache.acts("b", lb).take(cov_rows), sae_b.spec.metadata.get("max_norm"))
        alive_b = np.nonzero(s_b > 0)[0]
        sides = {}
        for k, layer, sae in (("a", la, sae_a), ("b", lb, sae_b)):
            sides[k] = Side(backends[k], layer, sae, cleans[k], strings[k])
        a, b = sides["a"], sides["b"]
        matched_b = {m.feat_b for m in matches if m.layer_a == la and m.layer_b == lb}
        pool = np.array([f for f in alive_b if f not in matched_b] or list(alive_b))
        todo = plan[(la, lb)]
        n_ctrl = len(todo) if tcfg.n_control_features is None or feature_idx is not None else tcfg.n_control_features
        for i, pr in enumerate(tqdm(todo, desc=f"inject A{la}->B{lb}", disable=not progress)):
            unmatched = int(rng.choice(pool))
            rows, ex = injection_rows(pr, a, b, maps[tcfg.direction_map].weight, float(s_a[pr.feat_a]), float(s_b[pr.feat_b]),
                                      alphas, vocab, unmatched, float(s_b[unmatched]), tcfg.n_random_controls,
                                      tcfg.top_strings, gen, freq_a=freq_a, cov_root=cov_root,
                                      kinds=CONTROL_KINDS if i < n_ctrl else ())
            transfer += rows
            examples.append(ex)
        if feature_idx is not None:
            continue
        ratio = cfg.sae.max_norm_ratio  # the cache's row mask thresholds, the ones every other stage used
        pairing = pair_batches(a, b, cache.mask_info("a", la, ratio)["max_norm"], cache.mask_info("b", lb, ratio)["max_norm"])
        mean_b = cache.acts("b", lb).take(np.sort(rng.choice(b_rows, min(len(b_rows), 20000), replace=False))).mean(0)
        stitching += stitching_rows(a, b, _stitched_maps(cfg, maps), pairing, mean_b, gen, seed=cfg.seed)
        ho = cache.rows("b", "heldout")
        y_ho = torch.from_numpy(np.asarray(cache.acts("b", lb).take(np.sort(rng.choice(ho, min(len(ho), 4096), replace=False))),
                                           np.float32))
        sae_transfer += sae_transfer_rows(la, lb, b.backend, b.clean, lb, sae_a, sae_b, _stitched_maps(cfg, maps), y_ho,
                                          sae_b.spec.metadata.get("max_norm"), cfg.seed)
        patching += feature_patch_rows(todo[: tcfg.n_patch_features], a, b, pairing, s_a, s_b, alive_b,
                                       tcfg.n_patch_controls, rng)
    bh_by_family(transfer)
    for r in patching:
        r["family"] = "patch vs random live B features"
    bh_by_family(patching)
    paired = paired_rows(transfer)
    bh_by_family(paired)
    rd = cfg.report_dir
    if feature_idx is not None:
        out = rd / f"transfer_L{pairs_ab[0][0]}_F{feature_idx}.csv"
        _write_csv(out, TRANSFER_COLUMNS, transfer)
    else:
        _write_csv(rd / "stitching.csv", STITCH_COLUMNS, stitching)
        _write_csv(rd / "feature_patching.csv", PATCH_COLUMNS, patching)
        atomic_write_json(rd / "transfer_examples.json", {"alphas": alphas, "examples": examples})
        _write_csv(rd / "transfer.csv", TRANSFER_COLUMNS, transfer)
        _write_csv(rd / "transfer_paired.csv", PAIRED_COLUMNS, paired)
        _write_csv(rd / "sae_transfer.csv", SAE_TRANSFER_COLUMNS, sae_transfer)
    summary = transfer_summary(transfer, max(alphas), cfg.align.q_threshold, paired)
    for line in summary["lines"]:
        print(f"[crossdict] transfer: {line}")
    return {"transfer": transfer, "stitching": stitching, "patching": patching, "examples": examples, "paired": paired,
            "sae_transfer": sae_transfer,
            **summary}


def bh_by_family(rows: list[dict]) -> None:
    """Benjamini–Hochberg q-values within each `family` (rows without a p-value or family are left alone)."""
    fams: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("family") and isinstance(r.get("p_value"), float) and math.isfinite(r["p_value"]):
            fams.setdefault(r["family"], []).append(r)
    for sel in fams.values():
        for r, q in zip(sel, bh_qvalues(np.array([r["p_value"] for r in sel], float))):
            r["q_value"] = float(q)


PAIRED_COMPARISONS = (("b_mapped", "b_matched"), ("b_mapped", "b_unmatched"), ("b_matched", "b_unmatched"))


def paired_rows(rows: list[dict]) -> list[dict]:
    """transfer_paired.csv: per layer pair and α, agreement of direction x vs y across the same feature pairs.

    Wilcoxon signed-rank over feature pairs (the claim "x transfers better than y" is a comparison,
    so it is tested as one, not as a difference of two significance counts). Family: one per α.
    """
    out = []
    agree = {}
    for r in rows:
        if r["direction"] in ("b_mapped", "b_matched", "b_unmatched"):
            agree[(r["layer_a"], r["layer_b"], r["alpha"], r["direction"], r["feat_a"], r["feat_b"])] = r["agreement"]
    groups = sorted({(k[0], k[1], k[2]) for k in agree})
    for la, lb, alpha in groups:
        feats = sorted({(k[4], k[5]) for k in agree if k[:3] == (la, lb, alpha)})
        for x, y in PAIRED_COMPARISONS:
            vx = np.array([agree.get((la, lb, alpha, x, *f), math.nan) for f in feats], float)
            vy = np.array([agree.get((la, lb, alpha, y, *f), math.nan) for f in feats], float)
            if not (np.isfinite(vx).any() and np.isfinite(vy).any()):
                continue
            out.append({"layer_a": la, "layer_b": lb, "alpha": alpha, "x": x, "y": y, "metric": "agreement",
                        "test": "wilcoxon signed-rank, two-sided", "median_x": float(np.nanmedian(vx)),
                        "median_y": float(np.nanmedian(vy)), **paired_test(vx, vy),
                        "family": f"paired agreement alpha={alpha:g}"})
    return out


def transfer_summary(rows: list[dict], alpha: float, q: float, paired: list[dict] | None = None) -> dict:
    """What was tested, in words: per direction and control kind at `alpha`, the share of matched pairs whose
    agreement exceeds that null's controls with BH q < `q` (permutation p = (1 + #controls ≥ it)/(n + 1)), the
    median KL; then the paired tests."""
    out, lines = {}, []
    for kind in ("b_mapped", "b_matched", "b_unmatched"):
        for ctrl in CONTROL_KINDS:
            sel = [r for r in rows if r["direction"] == kind and r["alpha"] == alpha and r.get("control", "isotropic") == ctrl]
            if not sel:
                continue
            n_sig = sum(1 for r in sel if _num(r.get("q_value", 1.0)) < q)
            out[f"{kind}/{ctrl}"] = n_sig / len(sel)
            n_c = int(max(_num(r.get("n_controls", 0)) for r in sel) or 0)
            med = float(np.nanmedian([_num(r["agreement"]) for r in sel]))
            kl = float(np.nanmedian([_num(r["kl"]) for r in sel]))
            lines.append(f"{kind} vs {ctrl} null: {n_sig}/{len(sel)} matched pairs have agreement (Spearman) above "
                         f"the {n_c} {ctrl} controls' at BH q < {q} (p floor 1/{n_c + 1} = {1 / (n_c + 1):.3g}) at "
                         f"alpha={alpha:g}; median agreement {med:.3f}, median KL {kl:.3g}")
    for r in paired or []:
        if _num(r["alpha"]) == alpha:
            lines.append(f"A{r['layer_a']}-B{r['layer_b']} {r['x']} vs {r['y']} (paired Wilcoxon over {r['n_pairs']} pairs): "
                         f"median difference {_num(r['median_diff']):.3f}, rank-biserial {_num(r['rank_biserial']):.2f}, "
                         f"p {_num(r['p_value']):.3g}, BH q {_num(r.get('q_value', math.nan)):.3g}")
    return {"share_significant": out, "lines": lines}


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
