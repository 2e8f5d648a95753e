"""Small file primitives every layer may use (models' caches, the store, reports).

They live at the top of the package, beside `errors.py`, so that `models/` can write its caches
the same way `store/` writes results without importing the store. Two rules hold for every file
attnscope creates:

* it gets the mode the user's umask gives, like a file made by `open()`: `tempfile` alone would
  make it 0600 (0700 for a folder), and colleagues on a shared cluster could not read a store or
  reuse a cache;
* it appears whole or not at all: written under a temporary name in its target folder, fsynced,
  renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "default_file_mode", "default_dir_mode", "fsync_dir", "fsync_file",
           "make_private_dir_public", "write_json_atomic"]


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
