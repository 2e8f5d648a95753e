"""Small file primitives every layer may use (models' caches, the store, reports).

They live at the top of the package, beside `errors.py`, so that `models/` can write its caches
the same way `store/` writes results without importing the store. Two rules hold for every file
attnscope creates:

* it gets the mode the user's umask gives, like a file made by `open()`: `tempfile` alone would
  make it 0600 (0700 for a folder), and colleagues on a shared cluster could not read a store or
  reuse a cache;
* it appears whole or not at all: written under a temporary name in its target folder, fsynced,
  renamed into place;
* a full disk is one error (`NoSpaceError`: "no space left on <folder>: N bytes needed"), never a
  half-written file: bytes are reserved (`posix_fallocate`) before they are written. HDF5 files
  are built in memory first and written as bytes (`write_reserved`), because h5py turns a failed
  write into a crash (exit 139) instead of an exception.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from attnscope.errors import NoSpaceError

__all__ = ["atomic_path", "default_file_mode", "default_dir_mode", "fsync_dir", "fsync_file",
           "follow_umask", "make_private_dir_public", "no_space_left", "reserve", "write_json_atomic",
           "write_reserved"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (and put it straight back)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0o666 minus the process umask: the mode `open()` would give a new file."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """0o777 minus the process umask: the mode `mkdir()` would give a new folder."""
    return 0o777 & ~_umask()


def make_private_dir_public(path: str | os.PathLike) -> None:
    """Give a folder from `tempfile.mkdtemp` (0700) the mode the umask gives."""
    os.chmod(path, default_dir_mode())


def follow_umask(folder: str | os.PathLike) -> None:
    """Give every file directly in `folder` the umask's mode: for folders another library wrote
    (transformers' `save_pretrained` writes model.safetensors through a 0600 temporary file)."""
    mode = default_file_mode()
    for p in Path(folder).iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def _free_bytes(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free} bytes free"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def no_space_left(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk (ENOSPC, a quota) inside the block into one NoSpaceError naming the folder
    of `path` and the bytes the write needed (None: unknown ahead, so more than `path` holds when
    the disk filled)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        path = Path(path)
        if needed is None:
            try:
                written = path.stat().st_size
            except OSError:
                written = 0
            amount = f"more than {written} bytes needed"
        else:
            amount = f"{needed} bytes needed"
        raise NoSpaceError(f"no space left on {path.parent}: {amount} ({_free_bytes(path.parent)}); "
                           "free some space or write elsewhere") from None


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate `length` bytes of a file from `offset` (extending it), so that writing them cannot
    fail for lack of space; a filesystem without fallocate is left to the write itself."""
    if length <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno in _FULL:
            raise
        # EOPNOTSUPP, EINVAL: no reservation here; the write below still reports a full disk


def write_reserved(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` (created or truncated), its space reserved first: a full disk is a
    NoSpaceError before any byte is written (the caller removes the file)."""
    with no_space_left(path, len(data)), open(path, "wb") as fh:
        reserve(fh.fileno(), 0, len(data))
        fh.write(data)
        fh.flush()


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder (named `<name>.<random>.tmp`); on normal exit the
    file written there is fsynced, given the umask's mode and renamed over `path`, so readers see
    the old file or the new one, never half of one. On an error it is removed. Creates the parent
    folders (with the umask's mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        with no_space_left(tmp):  # whatever the caller writes: a full disk is one NoSpaceError
            yield Path(tmp)
            fsync_file(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, data, *, indent: int | None = None) -> None:
    """Write `data` as JSON to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=True), encoding="utf-8")
