"""Text in, passages out: the corpus sources and the deterministic train / held-out split.

Sources (`corpus.source` in the config):
- `builtin:pydocs`: real English prose that ships with every Python, so it works with no network:
  the language reference topics (`pydoc_data.topics`), then the docstrings of the standard library,
  then those of installed scientific packages (numpy, scipy, torch, transformers). Over 1M tokens.
- `hf:<dataset>/<config>:<split>`: a Hugging Face dataset, e.g. `hf:wikitext/wikitext-103-raw-v1:train`.
- a `.txt` file (documents separated by blank lines), a `.jsonl` file (one document per line, the
  text in `text_field`), or a directory of such files (sorted by name).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from .config import CorpusConfig

MIN_PASSAGE_CHARS = 64
MAX_BAD_CHAR_FRACTION = 0.25
"""Refuse a corpus whose characters are more than this fraction U+FFFD (bytes that were not UTF-8)
or control characters: random bytes give ~60%, prose in any language ~0 (a Latin-1 file read as
UTF-8 a few %, which only warns)."""
WARN_BAD_CHAR_FRACTION = 0.01
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufffd]")
_SKIP_STDLIB = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
_EXTRA_PACKAGES = ("numpy", "scipy", "torch", "transformers")


class CorpusError(ValueError):
    """The corpus is missing, empty or of an unknown kind."""


def _docstrings(root: Path, skip: set[str]) -> Iterator[str]:
    """Docstrings of modules, classes and functions under `root`, in sorted file order."""
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    yield doc


def builtin_pydocs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    yield from _docstrings(Path(sysconfig.get_paths()["stdlib"]), _SKIP_STDLIB)
    for pkg in _EXTRA_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            yield from _docstrings(Path(list(spec.submodule_search_locations)[0]), {"tests", "testing"})


def _text_file_docs(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if text_field not in row:
                    raise CorpusError(f"{path}:{lineno}: no field {text_field!r} (fields: {sorted(row)}); set corpus.text_field")
                yield str(row[text_field])
    else:
        yield from re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))


def _hf_docs(spec: str, text_field: str) -> Iterator[str]:
    m = re.fullmatch(r"hf:([^/:]+(?:/[^/:]+)?)/([^/:]+):(\w+)", spec)
    if not m:
        raise CorpusError(f"corpus.source {spec!r}: expected hf:<dataset>/<config>:<split>, e.g. hf:wikitext/wikitext-103-raw-v1:train")
    dataset, config, split = m.groups()
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset, config, split=split)
    except Exception as e:  # datasets raises many types for "no hub"; say what to do instead
        raise CorpusError(
            f"could not load dataset {dataset}/{config}:{split} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Without a reachable hub use corpus.source: builtin:pydocs or a local .txt/.jsonl file."
        ) from None
    for row in ds:
        yield row[text_field]


def documents(cfg: CorpusConfig) -> Iterator[str]:
    src = cfg.source
    if src == "builtin:pydocs":
        yield from builtin_pydocs()
        return
    if src.startswith("builtin:"):
        raise CorpusError(f"corpus.source {src!r}: the only built-in corpus is 'builtin:pydocs'")
    if src.startswith("hf:"):
        yield from _hf_docs(src, cfg.text_field)
        return
    path = Path(src).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus.source: {path} does not exist (expected builtin:pydocs, hf:..., a .txt/.jsonl file or a directory)")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"corpus.source: directory {path} has no .txt or .jsonl files")
    for f in files:
        yield from _text_file_docs(f, cfg.text_field)


def split_passages(doc: str, passage_chars: int) -> Iterator[str]:
    """Cut a document into passages of at most ~`passage_chars`, always at whitespace."""
    doc = doc.strip()
    while doc:
        if len(doc) <= passage_chars:
            cut = len(doc)
        else:
            cut = max(doc.rfind(" ", 0, passage_chars), doc.rfind("\n", 0, passage_chars))
            if cut <= 0:  # one huge "word": cut at the next whitespace instead
                nxt = re.search(r"\s", doc[passage_chars:])
                cut = passage_chars + nxt.start() if nxt else len(doc)
        yield doc[:cut].rstrip()
        doc = doc[cut:].lstrip()


def passages(cfg: CorpusConfig, docs: Iterable[str] | None = None) -> list[str]:
    """The first `max_passages` passages (>= 64 characters) of the corpus, in a fixed order."""
    out: list[str] = []
    for doc in documents(cfg) if docs is None else docs:
        for p in split_passages(doc, cfg.passage_chars):
            if len(p) >= MIN_PASSAGE_CHARS:
                out.append(p)
                if len(out) >= cfg.max_passages:
                    return out
    if not out:
        raise CorpusError(f"corpus {cfg.source!r} is empty: no passage of at least {MIN_PASSAGE_CHARS} characters")
    return out


def check_text_quality(texts: list[str], source: str) -> None:
    """Raise `CorpusError` (with counts) if the passages are mostly U+FFFD or control characters."""
    total = sum(len(t) for t in texts)
    bad = sum(len(_BAD_CHARS.findall(t)) for t in texts)
    repl = sum(t.count("\ufffd") for t in texts)
    frac = bad / max(1, total)
    what = (f"{bad:,} of {total:,} characters ({100 * frac:.0f}%) are U+FFFD replacement characters ({repl:,}: bytes "
            f"that are not UTF-8) or control characters ({bad - repl:,})")
    if frac > MAX_BAD_CHAR_FRACTION:
        raise CorpusError(f"corpus {source!r}: {what}, in {len(texts)} passages; this is not text (a binary file, or "
                          "another encoding?): convert it to UTF-8 text")
    if frac > WARN_BAD_CHAR_FRACTION:
        print(f"[crossdict] extract: warning: corpus {source!r}: {what}; is it UTF-8?")


def check_splits(texts: list[str], heldout_fraction: float, min_passages: int, source: str) -> tuple[int, int]:
    """(train, held-out) passage counts; raise `CorpusError` if either has fewer than `min_passages`
    (what align needs for its passage-resampled CIs), before any model runs."""
    n_held = sum(is_heldout(t, heldout_fraction) for t in texts)
    n_train = len(texts) - n_held
    if min(n_train, n_held) < min_passages:
        raise CorpusError(
            f"corpus {source!r}: of {len(texts)} passages, the train split has {n_train} "
            f"passage{'s' if n_train != 1 else ''}, the held-out split {n_held} (corpus.heldout_fraction={heldout_fraction}); "
            f"each needs at least align.min_passages={min_passages}: add text or raise corpus.max_passages "
            "(or lower align.min_passages)"
        )
    return n_train, n_held


def is_heldout(passage: str, heldout_fraction: float) -> bool:
    """Deterministic split by content hash: the same passage is held out in every run and tool."""
    h = int.from_bytes(hashlib.sha256(passage.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < heldout_fraction


def common_prefix_length(text: str, tokenizers: list, max_ctx: list[int], n_special: list[int]) -> int:
    """Characters of `text` (cut at whitespace) that every tokenizer fits into its `max_ctx` tokens.

    `n_special[i]` is how many special tokens (BOS) tokenizer i adds, which also count against max_ctx.
    """
    limit = len(text)
    for tok, ctx, n_sp in zip(tokenizers, max_ctx, n_special):
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        budget = ctx - n_sp
        if len(offsets) > budget:
            limit = min(limit, offsets[budget - 1][1])
    if limit < len(text):
        # Cut at whitespace so the last word is whole: tokenizers then split the cut text the same
        # way as the full one, and both models read exactly these characters.
        ws = max(text.rfind(" ", 0, limit + 1), text.rfind("\n", 0, limit + 1))
        limit = ws if ws > 0 else limit
    return len(text[:limit].rstrip())
