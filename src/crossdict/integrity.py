"""Content digests of the files crossdict writes, and one writer per run directory.

Digests. Every file written through `crossdict.utils.atomic_path` (cache shards and masks, SAE
weights and configs, checkpoints, alignment maps, crosscoders, stage records, report files) gets
its size and xxh3-128 digest recorded at write time in `digests.json` beside it, one such file per
directory::

    {"format": "crossdict-digests", "version": 1, "algorithm": "xxh3_128",
     "files": {"a.blocks.8.hook_resid_post.npy": {"size": 28311680, "xxh3_128": "9f2c..."}, ...}}

Readers (`utils.load_npy`, `utils.read_json`, `sae.load_sae`, `align.LinearMap.load`, crosscoder and
checkpoint loaders) call `verify` first: a size or digest mismatch raises `CorruptFileError` naming
the file and the stage that rewrites it. A file is hashed at most once per process (memo keyed by
path, size and mtime); xxh3-128 reads ~2 GB/s, so verifying the demo run's 1.4 GB costs well under
a second of CPU once it is in the page cache. A file with no recorded digest (a run directory made
before digests existed, or a file crossdict did not write) passes unchecked: `crossdict verify`
lists it as "no digest recorded", and `crossdict verify --record-missing` records its digest as it
is now. Deleting a file through `utils.remove_file` forgets its digest.

Lock. `run_lock(run_dir, command)` takes an OS file lock (`filelock`, fcntl/flock underneath, so a
killed holder releases it) on `<run_dir>/.crossdict.lock` for the whole of a writing command, and
writes the holder's pid, command line and start time into `.crossdict.lock.json` beside it; a second
writer gets `RunLockedError` naming them at once instead of interleaving its files with the first's.

This module imports only the standard library, xxhash and filelock, so `utils` can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import xxhash

DIGEST_FILE = "digests.json"
DIGEST_FORMAT = "crossdict-digests"
ALGORITHM = "xxh3_128"
LOCK_FILE = ".crossdict.lock"
HOLDER_FILE = ".crossdict.lock.json"
_BLOCK = 8 << 20

_verified: dict[tuple[str, int, int], str] = {}
"""(path, size, mtime_ns) -> digest that matched: each file is hashed once per process."""

# Which stage rewrites a file, by the first directory under the run dir (the remedy a message names).
_OWNER = {"cache": "extract", "cache_random": "extract", "saes": "train", "alignment": "align",
          "crosscoder": "crosscode", "report": "run", "stages": "run"}


class CorruptFileError(ValueError):
    """A file's bytes differ from the digest recorded when it was written (edited, truncated, bit rot)."""


class RunLockedError(RuntimeError):
    """Another crossdict process is writing into the same run directory."""


# --- digests --------------------------------------------------------------------------------------


def digest_file(path: str | Path) -> dict:
    """`{"size": bytes, "xxh3_128": hex}` of a file's current bytes (streamed in 8 MiB blocks)."""
    h = xxhash.xxh3_128()
    size = 0
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return {"size": size, ALGORITHM: h.hexdigest()}


def _table_path(path: Path) -> Path:
    return path.parent / DIGEST_FILE


def _read_table(directory: Path) -> dict[str, dict]:
    p = directory / DIGEST_FILE
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a damaged table only loses the check, never the data it describes
    return data.get("files", {}) if isinstance(data, dict) and data.get("algorithm") == ALGORITHM else {}


def _write_table(directory: Path, files: dict[str, dict]) -> None:
    # Not through utils.atomic_path: that would record a digest of the digest table.
    body = json.dumps({"format": DIGEST_FORMAT, "version": 1, "algorithm": ALGORITHM, "files": dict(sorted(files.items()))},
                      indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{DIGEST_FILE}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / DIGEST_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record(path: str | Path, digest: dict | None = None) -> dict:
    """Store `path`'s digest (computed now unless given) in its directory's `digests.json`."""
    path = Path(path)
    digest = digest or digest_file(path)
    table = _read_table(path.parent)
    table[path.name] = digest
    _write_table(path.parent, table)
    st = path.stat()
    _verified[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = digest[ALGORITHM]
    return digest


def forget(path: str | Path) -> None:
    """Drop `path`'s recorded digest (the file was deleted on purpose)."""
    path = Path(path)
    table = _read_table(path.parent)
    if path.name in table:
        del table[path.name]
        _write_table(path.parent, table)


def recorded(path: str | Path) -> dict | None:
    path = Path(path)
    return _read_table(path.parent).get(path.name)


def owner_hint(path: str | Path) -> str:
    """What to run so the stage that owns `path` rewrites it."""
    parts = Path(path).resolve().parts
    stage = next((_OWNER[p] for p in reversed(parts[:-1]) if p in _OWNER), None)
    if stage is None or stage == "run":
        return "delete it and rerun `crossdict run` (the stage that wrote it runs again)"
    return f"rerun `crossdict {stage}` or `crossdict run` (it rewrites this file), or delete the file and rerun"


def problem(path: str | Path) -> str | None:
    """Why `path` does not match its recorded digest, or None (it matches, or none is recorded)."""
    path = Path(path)
    want = recorded(path)
    if want is None:
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing (its digest is recorded, the file is gone)"
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if _verified.get(key) == want.get(ALGORITHM):
        return None
    if st.st_size != want["size"]:
        how = "truncated" if st.st_size < want["size"] else "longer than written"
        return f"{how}: {st.st_size} bytes, {want['size']} were written"
    got = digest_file(path)
    if got[ALGORITHM] != want.get(ALGORITHM):
        return f"content changed since it was written ({ALGORITHM} {got[ALGORITHM][:12]}..., recorded {want[ALGORITHM][:12]}...)"
    _verified[key] = got[ALGORITHM]
    return None


def verify(path: str | Path) -> None:
    """Raise `CorruptFileError` if `path` differs from its recorded digest (hashed once per process)."""
    why = problem(path)
    if why is not None:
        raise CorruptFileError(f"{path} is corrupt ({why}); {owner_hint(path)}")


@dataclass
class FileStatus:
    path: Path
    status: str
    """'ok', 'no digest recorded', or what is wrong ('truncated: ...', 'content changed ...', 'missing ...')."""


def scan(roots: Iterable[str | Path]) -> Iterator[FileStatus]:
    """Status of every file under `roots` and of every file a `digests.json` there names."""
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for directory in sorted({root, *(p for p in root.rglob("*") if p.is_dir())}):
            table = _read_table(directory)
            names = {p.name for p in directory.iterdir() if p.is_file() and not _bookkeeping(p.name)} | set(table)
            for name in sorted(names):
                path = directory / name
                if name not in table:
                    yield FileStatus(path, "no digest recorded")
                    continue
                why = problem(path)
                yield FileStatus(path, "ok" if why is None else why)


def bad_files(roots: Iterable[str | Path]) -> list[FileStatus]:
    """Files under `roots` that do not match their recorded digest, deleted ones left out (a reader
    reports a missing file itself)."""
    return [s for s in scan(roots) if s.status not in ("ok", "no digest recorded") and not s.status.startswith("missing")]


def _bookkeeping(name: str) -> bool:
    return name in (DIGEST_FILE, LOCK_FILE, HOLDER_FILE) or (name.startswith(".") and name.endswith(".tmp"))


# --- one writer per run directory ------------------------------------------------------------------


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold `<run_dir>/.crossdict.lock` for the block; raise `RunLockedError` at once if another process does."""
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the run directory {run_dir}: {e.strerror}; choose a writable output_dir") from None
    lock = FileLock(str(run_dir / LOCK_FILE), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise RunLockedError(f"another crossdict process is writing into {run_dir}: {_holder(run_dir)}; wait for it to "
                             f"finish (or stop it), then rerun") from None
    holder = run_dir / HOLDER_FILE
    try:
        info = {"pid": os.getpid(), "command": command, "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fd, tmp = tempfile.mkstemp(prefix=f".{HOLDER_FILE}.", suffix=".tmp", dir=run_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, holder)
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _holder(run_dir: Path) -> str:
    try:
        info = json.loads((run_dir / HOLDER_FILE).read_text())
        argv = " ".join(info.get("argv") or [info.get("command", "?")])
        return f"pid {info.get('pid')} running `{argv}` since {info.get('started')}"
    except (OSError, ValueError):
        return "a process whose details are not recorded yet"
