"""Output files that never destroy what was there (docs/refusals.md, "Outputs").

Rules, checked before any compute (`check_output_file`, `check_output_dir`) and again at the
moment of writing (`atomic_output`):

* a result file is HDF5: its name ends in .h5 or .hdf5 (`--out x.png`, `x.json` or `newdir/` is
  refused), and every name fits the filesystem with room for the temporary name;
* an existing file is replaced only with `overwrite=True` (CLI `--overwrite`);
* a batch store (or the pending results of one) is never replaced, not even with `overwrite`;
* every file is written under a temporary name in its target folder, fsynced and renamed into
  place, so a crash or an error leaves the old file or the new one, never half of one;
* a path that is a symlink is written through: its target is replaced, the link stays;
* new files get the mode the user's umask gives (`tempfile.mkstemp` alone would make them 0600).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from attnscope.errors import OutputExistsError, StoreError
from attnscope.files import default_file_mode, fsync_dir, fsync_file, no_space_left

__all__ = ["default_file_mode", "is_batch_store", "check_output_file", "check_output_dir", "check_store_path",
           "atomic_output", "fsync_dir", "fsync_file", "HDF5_SUFFIXES"]

HDF5_SUFFIXES = (".h5", ".hdf5")
# what atomic_output adds to a name: ".<name>.<8 random characters>.tmp<suffix>"
_TEMP_EXTRA = len("..") + 8 + len(".tmp")
# what a batch store adds: "<name>.tmp-<8 random>" (consolidation), "<name>.lock", "<name>.d/"
_STORE_EXTRA = len(".tmp-") + 8


def is_batch_store(path: str | os.PathLike) -> bool:
    """True for an HDF5 file marked as an attnscope batch store, or a path with pending store
    results next to it (`<path>.d/`)."""
    import h5py

    path = Path(path)
    side = path.with_name(path.name + ".d")
    if side.is_dir() and any(p.suffix == ".h5" or p.name.endswith(".failed.json") for p in side.iterdir()):
        return True
    if not path.is_file():
        return False
    try:
        if not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("attnscope_kind")
    except (OSError, RuntimeError, ValueError, KeyError):
        return False
    return (kind.decode() if isinstance(kind, bytes) else kind) == "store"


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # a name too long for the filesystem, ...: not there
        return False


def _nearest_existing(path: Path) -> Path:
    p = path
    while not _exists(p) and p != p.parent:
        p = p.parent
    return p


def _name_max(path: Path) -> int:
    base = _nearest_existing(path)
    try:
        return int(os.pathconf(base if base.is_dir() else base.parent, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _check_name_lengths(shown: Path, real: Path, option: str, extra: int) -> None:
    """Every name in the path fits the filesystem (NAME_MAX bytes, 255 on Linux), the last one with
    `extra` bytes to spare for the temporary names attnscope writes beside it."""
    limit = _name_max(real)
    for part in real.parts[:-1]:  # the path itself is not repeated: it is the problem
        if len(os.fsencode(part)) > limit:
            raise OutputExistsError(f"{option}: the folder name {part[:32]}... is {len(os.fsencode(part))} bytes; "
                                    f"this filesystem allows {limit} bytes per name")
    n = len(os.fsencode(real.name))
    if n + extra > limit:
        room = f"; attnscope writes beside it under names {extra} bytes longer, so use at most {limit - extra}" \
            if extra else ""
        raise OutputExistsError(f"{option}: the name {real.name[:32]}... is {n} bytes; this filesystem allows "
                                f"{limit} bytes per name{room}")


def _check_hdf5_name(path, shown: Path, option: str, suffixes=HDF5_SUFFIXES, kind: str = "an HDF5 file") -> None:
    if str(path).endswith(("/", os.sep)):
        raise OutputExistsError(f"{option} {path} names a folder; give a file path such as "
                                f"{shown / ('result' + suffixes[0])}")
    if shown.suffix.lower() not in suffixes:
        what = f"not {shown.suffix!r}" if shown.suffix else "not a name without one"
        raise OutputExistsError(f"{option} {shown}: attnscope writes {kind} here; give a name ending in "
                                f"{' or '.join(suffixes)} ({what})")


def check_store_path(path: str | os.PathLike, option: str = "--out") -> Path:
    """A batch store's path, before anything runs: a new store gets an HDF5 name; every name fits
    the filesystem with the store's temporary and lock names (an existing store is resumed, a
    non-store refused, by StoreWriter)."""
    shown = Path(path).expanduser()
    real = shown.resolve()
    try:
        _check_name_lengths(shown, real, option, _STORE_EXTRA)
        if real.is_dir():
            raise OutputExistsError(f"{option} {shown} is a folder; give a file path such as {shown / 'store.h5'}")
        if not real.exists():  # an existing store is resumed whatever its name
            _check_hdf5_name(path, shown, option)
        _check_parent(shown, real, option)
    except OutputExistsError as exc:  # a store's path problems are StoreErrors, as StoreWriter's are
        raise StoreError(str(exc)) from None
    return real


def _check_parent(shown: Path, real: Path, option: str) -> None:
    base = _nearest_existing(real.parent)
    if not base.is_dir():
        raise OutputExistsError(f"{option} {shown}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{option} {shown}: cannot write in {base} (permission denied)")


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False, option: str = "--out",
                      suffixes: tuple[str, ...] = HDF5_SUFFIXES, kind: str = "an HDF5 file") -> Path:
    """Check an output file path before any compute; return the real path to write (symlinks
    resolved). Raises OutputExistsError (StoreError for a batch store) with a one-line reason.
    `suffixes`: the names the output's kind may have (an HDF5 result by default)."""
    shown = Path(path).expanduser()
    real = shown.resolve()
    _check_name_lengths(shown, real, option, _TEMP_EXTRA + len(real.suffix))
    if real.is_dir():
        raise OutputExistsError(f"{option} {shown} is a folder; give a file path such as {shown / 'result.h5'}")
    _check_hdf5_name(path, shown, option, suffixes, kind)
    if is_batch_store(real):
        raise StoreError(f"{option} {shown} is an attnscope batch store; no command replaces a store "
                         "(not even with --overwrite): choose another path")
    if real.exists() or real.is_symlink():
        if not real.is_file():
            raise OutputExistsError(f"{option} {shown} exists and is not a regular file; choose another path")
        if not overwrite:
            raise OutputExistsError(f"{option} {shown} already exists; pass --overwrite to replace it "
                                    "(or choose another path)")
    _check_parent(shown, real, option)
    return real


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False, option: str = "--out") -> Path:
    """Check an output folder before any compute: it must be absent or empty, or `overwrite` is
    given (then files of the same names are replaced, other files are left alone)."""
    shown = Path(path).expanduser()
    real = shown.resolve()
    _check_name_lengths(shown, real, option, 0)
    if real.exists() and not real.is_dir():
        raise OutputExistsError(f"{option} {shown} is a file; give a folder (created if missing)")
    if real.is_dir() and not overwrite and any(real.iterdir()):
        raise OutputExistsError(f"{option} {shown} is a folder that already has files; pass --overwrite to "
                                "write into it (files of the same names are replaced) or choose a new folder")
    _check_parent(shown, real, option)
    return real


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffix, so writers that infer the format
    from it work); on normal exit it is fsynced, given the umask's mode and renamed over
    `path`'s real target. On an error the temporary file is removed and `path` is untouched."""
    real = Path(path).expanduser().resolve()
    real.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp" + real.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    keep = False
    try:
        with no_space_left(tmp_path):  # whatever the caller writes (CSV, PNG, ...): one NoSpaceError
            yield tmp_path
            fsync_file(tmp_path)
        os.chmod(tmp_path, default_file_mode())
        if real.exists() and (not overwrite or is_batch_store(real)):
            # taken while we computed: neither file is lost, the new one keeps its temporary name
            keep = True
            what = "is an attnscope batch store" if is_batch_store(real) else "appeared while attnscope was computing"
            raise OutputExistsError(f"{real} {what}; not replaced: the new result is kept in {tmp_path} "
                                    "(rename it to use it)")
        os.replace(tmp_path, real)
        fsync_dir(real.parent)
    finally:
        if not keep:
            tmp_path.unlink(missing_ok=True)
