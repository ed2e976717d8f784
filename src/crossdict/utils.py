"""Small shared helpers: atomic file writes, seeding, hashing, environment guards."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import integrity


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_UMASK = os.umask(0)
os.umask(_UMASK)


_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT/EFBIG, numpy's short write ("429440 requested and 190432 written", errno None), numpy's
    failed fallocate of an array >= 16 MiB ("Not enough free space to write ... bytes after offset ...", errno None)
    or safetensors' Rust IoError ("No space left on device", "StorageFull")."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
        return True
    msg = str(e)
    return (" requested and " in msg and " written" in msg) or "No space left" in msg or "StorageFull" in msg \
        or "Disk quota exceeded" in msg or "Not enough free space" in msg


def _write_error(e: BaseException, path: Path) -> OSError | None:
    """The OSError to raise for a failed write of `path` (naming it), or None to re-raise `e` as it is."""
    if _is_disk_full(e):
        return OSError(errno.ENOSPC, f"disk full while writing {path} ({e}); the previous version of the file, if any, "
                                     "is intact, and finished stages are kept: free space and rerun")
    if isinstance(e, OSError):
        return OSError(e.errno, f"cannot write {path}: {e.strerror or e}")
    if type(e).__name__ == "SafetensorError":  # safetensors' own I/O errors are not OSErrors
        return OSError(errno.EIO, f"cannot write {path}: {e}")
    return None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Readers therefore see either the old file or the complete new one, never half a file. The new
    file's digest goes into `digests.json` beside it (`crossdict.integrity`), for readers to verify.
    A failed write raises an OSError naming `path` ("disk full while writing ..." for ENOSPC or a
    short write).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write to {path.parent}: {e.strerror}; choose a writable output_dir") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        digest = integrity.digest_file(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp_path, path)
        integrity.record(path, digest)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        err = _write_error(e, path) if isinstance(e, Exception) else None
        if err is not None:
            raise err from None
        raise


def remove_file(path: str | Path) -> None:
    """Delete `path` (if it exists) and forget its recorded digest."""
    path = Path(path)
    path.unlink(missing_ok=True)
    integrity.forget(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    integrity.verify(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON (truncated or corrupt?): {e}") from e


def load_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    """Load a `.npy` array (memory-mapped by default), verified against its digest, with a clear error if it is truncated."""
    path = Path(path)
    if path.is_file():
        integrity.verify(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"cache file {path} is unreadable (truncated or corrupt?): {e}") from e


def stable_hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode() if not isinstance(p, bytes) else p)
    return h.hexdigest()[:16]


def offline_hub() -> None:
    """Make huggingface_hub fail fast instead of hanging ~48 s when no hub is reachable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device; use device: cpu or auto")
    return torch.device(device)
