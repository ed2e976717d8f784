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

    row_mask/
        a.8.npy                        bool [n_tok_a] global rows of model a kept at layer 8 (see below)

Row r of `a.tokens.npy` describes row r of every `a.<hook>.npy` in that shard. Global row
indices (what `ActivationCache` returns) count rows across shards in shard order. BOS tokens are
never stored, so every stored token has a real character span.

Row mask: rows every statistic leaves out, one rule for every stage (maps, metrics, matching,
layer sweep, SAE training/eval, transfer): massive activations, i.e. residual norm above
`max_norm_ratio` x the median train-row norm of that layer (Sun et al. 2024), and position 0 of a
model without BOS, whose first content token is the attention sink (Xiao et al. 2023). A handful of
such rows (68 of 8,956 held-out anchors of SmolLM2-135M) carried 97% of the raw variance and set
CKA/Procrustes by themselves. Extraction writes `row_mask/` and the manifest's `row_mask` field
(rule, ratio, threshold and counts per model and layer); `ActivationCache.row_mask` is the one
reader, and computes the same mask in memory for a cache written before masks existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from . import integrity
from .utils import atomic_save_npy, atomic_write_json, load_npy, read_json, remove_file

DEFAULT_MAX_NORM_RATIO = 10.0
"""`sae.max_norm_ratio`'s default: the mask rule for a cache whose manifest names none."""
MASK_SAMPLE_ROWS = 16384
"""Train rows (seeded sample) whose median norm sets the massive-activation threshold."""
ROW_MASK_DIR = "row_mask"

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
    """The shard has its `done.json` and every file in it matches its recorded digest (module
    `integrity`). A damaged shard loses its marker here, saying which file, so extraction redoes it."""
    d = shard_dir(cache_dir, shard)
    if not (d / "done.json").is_file():
        return False
    bad = integrity.bad_files([d])
    bad += [integrity.FileStatus(d / n, "missing (its digest is recorded, the file is gone)")
            for n in integrity.recorded_names(d) if not (d / n).is_file()]
    if bad:
        print(f"[crossdict] extract: {d} is damaged, it will be extracted again: "
              + "; ".join(f"{s.path.name} {s.status}" for s in bad))
        remove_file(d / "done.json")
        return False
    return True


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
        self._masks: dict[tuple, tuple[np.ndarray, dict]] = {}

    # --- the row mask (module docstring): the one reader every stage uses -----------------------

    def sink_rows(self, key: ModelKey) -> np.ndarray:
        """bool `[n_tokens]`: position 0 of a model without BOS (its first token is the attention sink)."""
        if self.model_info(key).get("bos", True):
            return np.zeros(len(self.tokens(key)), bool)
        return self.tokens(key)[:, 1] == 0

    def mask_ratio(self) -> float:
        """The max_norm_ratio the stored masks were made with (the default for a cache without)."""
        return float((self.manifest.get("row_mask") or {}).get("max_norm_ratio", DEFAULT_MAX_NORM_RATIO))

    def _mask(self, key: ModelKey, layer: int, ratio: float | None) -> tuple[np.ndarray, dict]:
        ratio = self.mask_ratio() if ratio is None else float(ratio)
        if (key, layer, ratio) not in self._masks:
            stored = self.manifest.get("row_mask") or {}
            path = self.dir / ROW_MASK_DIR / f"{key}.{layer}.npy"
            info = stored.get("layers", {}).get(key, {}).get(str(layer))
            if stored.get("max_norm_ratio") == ratio and info is not None and path.is_file():
                keep = load_npy(path, mmap=False).astype(bool)
                if len(keep) != len(self.tokens(key)):
                    raise ValueError(f"{path} has {len(keep)} rows, the cache {len(self.tokens(key))}; re-extract")
                self._masks[(key, layer, ratio)] = keep, info
            else:  # a cache made before masks existed, or another ratio: the same rule, in memory
                self._masks[(key, layer, ratio)] = compute_row_mask(self, key, layer, ratio)
        return self._masks[(key, layer, ratio)]

    def row_mask(self, key: ModelKey, layer: int | None = None, ratio: float | None = None) -> np.ndarray:
        """Rows of model `key` that statistics use, bool `[n_tokens]` (True = keep) at `layer`, or
        kept at every cached layer when `layer` is None. `ratio`: sae.max_norm_ratio (None: the stored one)."""
        layers = self.layers(key) if layer is None else [layer]
        keep = np.ones(len(self.tokens(key)), bool)
        for lay in layers:
            keep &= self._mask(key, lay, ratio)[0]
        return keep

    def mask_info(self, key: ModelKey, layer: int, ratio: float | None = None) -> dict:
        """`{max_norm, n_rows, dropped, dropped_massive, dropped_sink}` of one layer's mask."""
        return self._mask(key, layer, ratio)[1]

    def pair_mask(self, layer_a: int, layer_b: int, split: Split = "all", ratio: float | None = None) -> np.ndarray:
        """Anchor pairs of `anchor_pairs(split)` whose A row and B row are both kept, bool `[n_pairs]`."""
        pairs = self.anchor_pairs(split)
        return self.row_mask("a", layer_a, ratio)[pairs[:, 0]] & self.row_mask("b", layer_b, ratio)[pairs[:, 1]]

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

    def paired_acts(self, layer_a: int, layer_b: int, split: Split = "all", masked: bool = False,
                    ratio: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Activations at anchor pairs, in RAM: `X_a [n, d_a]`, `X_b [n, d_b]`, `passage_id [n]`.

        Row i of X_a and X_b are the two models' states after reading exactly the same characters.
        `masked`: only the pairs `pair_mask` keeps.
        """
        pairs = self.anchor_pairs(split)
        if masked:
            pairs = pairs[self.pair_mask(layer_a, layer_b, split, ratio)]
        xa = self.acts("a", layer_a).take(pairs[:, 0])
        xb = self.acts("b", layer_b).take(pairs[:, 1])
        return xa, xb, self.tokens("a")[pairs[:, 0], 0].copy()


def massive_threshold(acts: "ShardedArray", rows: np.ndarray, ratio: float, sample: int = MASK_SAMPLE_ROWS) -> float | None:
    """Residual norm above which a token is a massive activation: ratio x median norm of (a seeded
    sample of) `rows`; None when `ratio` is 0 (the rule is off) or there are no rows."""
    if ratio <= 0 or len(rows) == 0:
        return None
    pick = np.sort(np.random.default_rng(0).choice(rows, size=min(sample, len(rows)), replace=False))
    return float(ratio * np.median(np.linalg.norm(acts.take(pick), axis=1)))


def row_norms(acts: "ShardedArray", block_rows: int = 65536) -> np.ndarray:
    """L2 norm of every row `[n_rows]` float64, streamed."""
    return np.concatenate([np.linalg.norm(b.astype(np.float64), axis=1) for b in acts.iter_blocks(block_rows)] or [np.zeros(0)])


def compute_row_mask(cache: "ActivationCache", key: ModelKey, layer: int, ratio: float) -> tuple[np.ndarray, dict]:
    """(keep `[n_tokens]` bool, info) for one cached layer under the module docstring's rule."""
    acts = cache.acts(key, layer)
    thr = massive_threshold(acts, cache.rows(key, "train"), ratio)
    keep = np.ones(len(acts), bool)
    massive = np.zeros(len(acts), bool) if thr is None else row_norms(acts) > thr
    sink = cache.sink_rows(key)
    keep &= ~(massive | sink)
    info = {"max_norm": thr, "n_rows": int(len(keep)), "dropped": int((~keep).sum()),
            "dropped_massive": int(massive.sum()), "dropped_sink": int(sink.sum())}
    return keep, info


def write_row_masks(cache: "ActivationCache", ratio: float) -> dict:
    """Compute and store every cached layer's row mask and its manifest field (idempotent: a mask
    made under the same ratio is kept). Returns the manifest's `row_mask` field."""
    current = cache.manifest.get("row_mask")
    masks = [cache.dir / ROW_MASK_DIR / f"{k}.{layer}.npy" for k in ("a", "b") for layer in cache.layers(k)]
    if current is not None and current.get("max_norm_ratio") == ratio and all(
        p.is_file() and integrity.problem(p) is None for p in masks  # a damaged mask is recomputed
    ):
        return current
    field_: dict = {"rule": "norm > max_norm_ratio x median train norm, or position 0 of a model without BOS",
                    "max_norm_ratio": ratio, "layers": {}}
    for k in ("a", "b"):
        field_["layers"][k] = {}
        for layer in cache.layers(k):
            keep, info = compute_row_mask(cache, k, layer, ratio)
            atomic_save_npy(cache.dir / ROW_MASK_DIR / f"{k}.{layer}.npy", keep)
            field_["layers"][k][str(layer)] = info
    manifest = read_json(cache.dir / "manifest.json", "activation cache manifest")  # additive: keep other fields
    manifest["row_mask"] = field_
    write_manifest(cache.dir, manifest)
    cache.manifest = manifest
    cache._masks.clear()
    return field_


VOLATILE_MANIFEST_FIELDS = ("extract_seconds", "tokens_per_second", "crossdict", "row_mask")
"""Manifest fields that do not define the cached data: timings, the writing version, and the row mask's
summary (rewritten whenever `sae.max_norm_ratio` changes; that key is in every consumer's own config)."""


def manifest_identity(manifest: dict) -> dict:
    """The manifest without its volatile fields (and without each model's load time): what defines the data.

    SAE fingerprints and stage digests hash this, so re-writing a manifest's timings reruns nothing."""
    out = {k: v for k, v in manifest.items() if k not in VOLATILE_MANIFEST_FIELDS}
    models = {}
    for key, m in (manifest.get("models") or {}).items():
        m = dict(m)
        if isinstance(m.get("source"), dict):
            m["source"] = {k: v for k, v in m["source"].items() if k != "load_s"}
        models[key] = m
    if models:
        out["models"] = models
    return out


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write_json(Path(cache_dir) / "manifest.json", manifest)
