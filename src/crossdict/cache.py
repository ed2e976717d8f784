"""On-disk activation cache: the file contract between extraction and every later stage.

Layout of `runs/<name>/cache/` (all arrays are plain `.npy`, memory-mappable, no pickles)::

    manifest.json                      what was extracted (models, layers, corpus, dtype) + counts
    shard_00000/
        a.tokens.npy                   int64 [n_tok_a, 6]  TOKEN_COLUMNS below
        a.blocks.8.hook_resid_post.npy  float [n_tok_a, d_model_a]  residual after block 8
        b.tokens.npy, b.blocks.5.hook_resid_post.npy, ...
        anchors.npy                    int64 [n_pairs, 2]  shard-local rows (row in a, row in b)
        passages.json                  {passage_id: text} exactly the characters both models read
        done.json                      written last: a shard without it is redone on resume
    shard_00001/ ...

Row r of `a.tokens.npy` describes row r of every `a.<hook>.npy` in that shard. Global row
indices (what `ActivationCache` returns) count rows across shards in shard order. BOS tokens are
never stored, so every stored token has a real character span.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from .utils import atomic_save_npy, atomic_write_json, load_npy, read_json

CACHE_FORMAT = "crossdict-activation-cache"
CACHE_VERSION = 1
TOKEN_COLUMNS = ("passage_id", "position", "char_start", "char_end", "token_id", "heldout")
"""Columns of `<model>.tokens.npy`; `position` counts BOS, `heldout` is 0/1 by passage hash."""

ModelKey = Literal["a", "b"]
Split = Literal["train", "heldout", "all"]


class CacheMismatchError(ValueError):
    """An existing cache was made for another config (models, layers, corpus or pairing)."""


def hook_name(layer: int) -> str:
    """TransformerLens name of the residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def shard_dir(cache_dir: Path, shard: int) -> Path:
    return Path(cache_dir) / f"shard_{shard:05d}"


@dataclass
class ShardData:
    """Everything one shard holds, as produced by extraction."""

    tokens: dict[str, np.ndarray]
    """model key -> int64 [n_tok, 6]"""
    acts: dict[str, dict[int, np.ndarray]]
    """model key -> layer -> float [n_tok, d_model]"""
    anchors: np.ndarray
    """int64 [n_pairs, 2] shard-local (row in a, row in b)"""
    texts: dict[int, str] | None = None
    """passage_id -> the text both models read (char spans index into it)"""


def write_shard(cache_dir: Path, shard: int, data: ShardData) -> dict:
    """Write one shard atomically (each file via temp + rename, `done.json` last)."""
    d = shard_dir(cache_dir, shard)
    d.mkdir(parents=True, exist_ok=True)
    for key, layers in data.acts.items():
        for layer, arr in layers.items():
            assert arr.shape[0] == data.tokens[key].shape[0]
            atomic_save_npy(d / f"{key}.{hook_name(layer)}.npy", arr)
        atomic_save_npy(d / f"{key}.tokens.npy", data.tokens[key].astype(np.int64))
    atomic_save_npy(d / "anchors.npy", data.anchors.astype(np.int64))
    if data.texts is not None:
        atomic_write_json(d / "passages.json", {str(k): v for k, v in data.texts.items()})
    counts = {
        "n_passages": int(len(np.unique(data.tokens["a"][:, 0]))) if len(data.tokens["a"]) else 0,
        "n_tokens_a": int(data.tokens["a"].shape[0]),
        "n_tokens_b": int(data.tokens["b"].shape[0]),
        "n_pairs": int(data.anchors.shape[0]),
    }
    atomic_write_json(d / "done.json", counts)
    return counts


def shard_is_done(cache_dir: Path, shard: int) -> bool:
    return (shard_dir(cache_dir, shard) / "done.json").is_file()


class ShardedArray:
    """Rows of one `<model>.<hook>.npy` across all shards, memory-mapped, read on demand.

    Shape `[n_rows, d_model]`; indexing with an integer array gathers rows from whichever shards
    hold them, so a trainer can draw shuffled batches without loading the whole cache.
    """

    def __init__(self, paths: list[Path]):
        self.parts = [load_npy(p) for p in paths]
        if not self.parts:
            raise ValueError("no shards to read")
        dims = {p.shape[1] for p in self.parts}
        if len(dims) != 1:
            raise ValueError(f"shards disagree on d_model: {sorted(dims)} in {paths[0].parent.parent}")
        self.d = dims.pop()
        self.offsets = np.cumsum([0] + [p.shape[0] for p in self.parts])
        self.dtype = self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets[-1]), self.d

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Gather rows (any order) as float32 `[len(rows), d_model]`."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = rows[sel] - self.offsets[s]
            order = np.argsort(local)  # sorted reads are much faster on a memmap
            out[sel[order]] = self.parts[s][local[order]]
        return out

    def iter_blocks(self, block_rows: int = 65536) -> Iterator[np.ndarray]:
        """Stream all rows in order as float32 blocks `[<=block_rows, d_model]`."""
        for part in self.parts:
            for start in range(0, part.shape[0], block_rows):
                yield np.asarray(part[start : start + block_rows], dtype=np.float32)


class ActivationCache:
    """Read side of the cache. Stages after extraction use only this class (or the files above)."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        self.manifest = read_json(self.dir / "manifest.json", "activation cache manifest")
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"{self.dir}/manifest.json is not a crossdict activation cache")
        if not self.manifest.get("complete"):
            raise ValueError(
                f"activation cache {self.dir} is incomplete (extraction was interrupted); "
                "rerun `crossdict extract` to finish it"
            )
        self.n_shards = int(self.manifest["n_shards"])
        self._tokens: dict[str, np.ndarray] = {}

    def model_info(self, key: ModelKey) -> dict:
        return self.manifest["models"][key]

    def layers(self, key: ModelKey) -> list[int]:
        return list(self.manifest["models"][key]["layers"])

    def d_model(self, key: ModelKey) -> int:
        return int(self.manifest["models"][key]["d_model"])

    def acts(self, key: ModelKey, layer: int) -> ShardedArray:
        """Residual activations of model `key` after block `layer`, `[n_tokens, d_model]`."""
        if layer not in self.layers(key):
            raise KeyError(
                f"layer {layer} of model {key} ({self.model_info(key)['name']}) is not in the cache; "
                f"cached layers: {self.layers(key)}"
            )
        paths = [shard_dir(self.dir, s) / f"{key}.{hook_name(layer)}.npy" for s in range(self.n_shards)]
        return ShardedArray(paths)

    def tokens(self, key: ModelKey) -> np.ndarray:
        """Token index `[n_tokens, 6]` (TOKEN_COLUMNS), global row order."""
        if key not in self._tokens:
            parts = [load_npy(shard_dir(self.dir, s) / f"{key}.tokens.npy", mmap=False) for s in range(self.n_shards)]
            self._tokens[key] = np.concatenate(parts)
        return self._tokens[key]

    def passage_texts(self) -> dict[int, str]:
        """`{passage_id: text}`: the characters both models read; token char spans index into these."""
        texts: dict[int, str] = {}
        for s in range(self.n_shards):
            path = shard_dir(self.dir, s) / "passages.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: this cache was written before passage texts were stored; "
                    f"delete {self.dir} and rerun `crossdict extract`"
                )
            texts.update({int(k): v for k, v in read_json(path, "passage texts").items()})
        return texts

    def rows(self, key: ModelKey, split: Split = "all") -> np.ndarray:
        """Global row indices of model `key`'s tokens in a split."""
        heldout = self.tokens(key)[:, 5]
        if split == "all":
            return np.arange(len(heldout))
        return np.nonzero(heldout == (1 if split == "heldout" else 0))[0]

    def anchor_pairs(self, split: Split = "all") -> np.ndarray:
        """Anchor pairs as global rows `[n_pairs, 2]` (row in a, row in b)."""
        parts = []
        off_a = off_b = 0
        for s in range(self.n_shards):
            d = shard_dir(self.dir, s)
            pairs = load_npy(d / "anchors.npy", mmap=False)
            parts.append(pairs + np.array([off_a, off_b]))
            done = read_json(d / "done.json", "shard marker")
            off_a += done["n_tokens_a"]
            off_b += done["n_tokens_b"]
        pairs = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        if split != "all":
            heldout = self.tokens("a")[pairs[:, 0], 5]
            pairs = pairs[heldout == (1 if split == "heldout" else 0)]
        return pairs

    def paired_acts(self, layer_a: int, layer_b: int, split: Split = "all") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Activations at anchor pairs, in RAM: `X_a [n, d_a]`, `X_b [n, d_b]`, `passage_id [n]`.

        Row i of X_a and X_b are the two models' states after reading exactly the same characters.
        """
        pairs = self.anchor_pairs(split)
        xa = self.acts("a", layer_a).take(pairs[:, 0])
        xb = self.acts("b", layer_b).take(pairs[:, 1])
        return xa, xb, self.tokens("a")[pairs[:, 0], 0].copy()


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write_json(Path(cache_dir) / "manifest.json", manifest)
