"""The batch store: one HDF5 file of many task results, written so that no result is ever lost.

Layout (store schema 2, documented in docs/batch.md; schema 1 = the same without checksums,
read-only since schema 2):

    /                     attrs attnscope_kind = "store", attnscope_store_schema = 2, created,
                          attnscope_version, attnscope_digest (over the root's attributes)
    /tasks/<key>          one finished task: a result group (attnscope.store.hdf5.write_dataset,
                          Fletcher-32 on arrays + attnscope_digest) whose attrs also carry the task
                          identity (task_model, task_revision, task_probe, task_probe_hash,
                          task_params, task_dtype) and provenance (device, versions, timings, the
                          doctor's verdict, attempts, finished)
    /failures/<key>       the last failure of a task that has no result: attrs task_* as above,
                          error, traceback, attempts, finished, attnscope_digest
    /quarantine/tasks/<key>, /quarantine/failures/<key>
                          entries that failed their checksum, moved aside by a writer (never
                          deleted, never read); their tasks are measured again

Durability protocol (the proof is in docs/batch.md):
  1. A finished task is written to its own file `<store>.d/<key>.h5` under a temporary name,
     fsynced, renamed into place (atomic) and the directory fsynced. From then on it is complete.
  2. Consolidation copies the store to `<store>.tmp-*`, adds the pending task files, fsyncs it and
     renames it over the store (atomic); only then are the task files deleted. A task already in
     the store is never added twice, so a crash between rename and deletion only leaves a
     redundant file that the next consolidation drops.
  3. A crash leaves only temporary files (ignored, cleaned up) and complete task files.
Only one process writes (a lock file next to the store's real path); readers see the store plus
the pending task files. A writer first reads everything back (`verify`) and moves corrupt entries
aside.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np
import pandas as pd
import xarray as xr

from attnscope.errors import CorruptDataError, StoreError
from attnscope.files import atomic_path, no_space_left, reserve, write_json_atomic, write_reserved
from attnscope.store import checksum
from attnscope.store.files import (atomic_output, check_output_file, default_file_mode, fsync_dir,
                                   fsync_file)
from attnscope.store.hdf5 import (H5_ERRORS, LIBVER, describe_h5_error, read_dataset, result_image, schema_of,
                                  write_dataset)

STORE_KIND = "store"
STORE_SCHEMA = 2
TASKS = "tasks"
FAILURES = "failures"
QUARANTINE = "quarantine"
TASK_ATTRS = ("task_model", "task_revision", "task_probe", "task_probe_hash", "task_params", "task_dtype",
              "task_method")
_SUMMARY_METRICS = ("sink_mass", "token0_mass", "entropy", "mean_distance")

__all__ = ["Store", "StoreWriter", "VerifyReport", "open_store", "upgrade_store", "sidecar_dir",
           "STORE_SCHEMA"]


def sidecar_dir(path: str | os.PathLike) -> Path:
    """The folder `<store>.d/` holding finished tasks not yet consolidated into the store."""
    path = Path(path)
    return path.with_name(path.name + ".d")


_fsync_dir = fsync_dir
_fsync_file = fsync_file


def _hint(path: Path) -> str:
    return (f"`attnscope store verify {path}` lists every damaged task; `attnscope extract` into this "
            "store moves them aside (nothing is deleted) and measures them again")


def _what_to_do(for_writing: bool) -> str:
    """The end of a message about a file that is no usable store: a reader (verify, report,
    figures) is told to check the path, a writer (extract) to write elsewhere."""
    if for_writing:
        return "attnscope never overwrites it: move it away or pass another --out path"
    return "check the path: it should name a store that `attnscope extract` wrote"


def _check_store_file(f: h5py.File, path: Path, for_writing: bool = False) -> None:
    kind = f.attrs.get("attnscope_kind")
    if kind != STORE_KIND:
        what = f"an attnscope {kind!r} file" if kind else "an HDF5 file that attnscope did not write"
        raise StoreError(f"{path} is {what}, not an attnscope batch store; "
                         + ("attnscope neither uses it as a store nor overwrites it: pass another --out path"
                            if for_writing else _what_to_do(False)))
    try:
        schema = int(f.attrs.get("attnscope_store_schema", -1))
    except (TypeError, ValueError):
        schema = -1
    if schema > STORE_SCHEMA:
        raise StoreError(f"{path} uses store schema {schema}; this attnscope handles up to "
                         f"{STORE_SCHEMA}: upgrade attnscope")
    if schema < 1:
        raise StoreError(f"{path} has no valid store schema attribute; it is not a batch store")
    if schema >= 2:
        try:
            checksum.check_attrs(f)
        except checksum.DigestMismatch as exc:
            raise CorruptDataError(f"{path}: the store's own attributes are corrupt ({exc}); "
                                   f"{_what_to_do(for_writing)}") from None
    missing = [g for g in (TASKS, FAILURES) if not isinstance(f.get(g), h5py.Group)]
    if missing:
        raise CorruptDataError(f"{path} is marked as an attnscope store but has no {'/'.join(missing)} "
                               f"group: damaged or not written by attnscope; {_what_to_do(for_writing)}")


def _open_store_file(path: Path, for_writing: bool = False) -> h5py.File:
    """The store file open for reading, checked; `for_writing`: errors advise a writer (extract)."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path} exists but is not a readable HDF5 file ({exc}); it is corrupt or "
                         f"of another format. {_what_to_do(for_writing)}") from exc
    try:
        _check_store_file(f, path, for_writing)
    except StoreError:
        f.close()
        raise
    except H5_ERRORS as exc:
        f.close()
        raise CorruptDataError(f"{path} is a damaged HDF5 file ({type(exc).__name__}: {exc}); "
                               f"{_what_to_do(for_writing)}") from exc
    return f


def _store_schema(f: h5py.File) -> int:
    return int(f.attrs.get("attnscope_store_schema", -1))


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _identity(attrs) -> dict[str, Any]:
    out = {k.removeprefix("task_"): _attr(attrs.get(k)) for k in TASK_ATTRS}
    out["revision"] = out["revision"] or None
    out["params"] = json.loads(out["params"]) if out["params"] else {}
    return out


def _write_failure(group: h5py.Group, record: dict) -> None:
    for k, v in record.items():
        if k == checksum.DIGEST_ATTR:
            continue
        group.attrs[k] = v if isinstance(v, (str, int, float, np.generic)) else json.dumps(v)
    checksum.seal(group)


@dataclass
class _Pending:
    key: str
    path: Path
    failed: bool


def _pending_files(side: Path) -> list[_Pending]:
    if not side.is_dir():
        return []
    out = []
    for p in sorted(side.iterdir()):
        if p.name.endswith(".tmp"):
            continue
        if p.name.endswith(".failed.json"):
            out.append(_Pending(p.name.removesuffix(".failed.json"), p, True))
        elif p.suffix == ".h5":
            out.append(_Pending(p.stem, p, False))
    return out


def _new_store(path: Path) -> None:
    """An empty store at `path`, built in memory and written as bytes (a full disk: NoSpaceError)."""
    import io

    from attnscope import __version__

    buf = io.BytesIO()
    with h5py.File(buf, "w", libver=LIBVER) as f:
        f.attrs["attnscope_kind"] = STORE_KIND
        f.attrs["attnscope_store_schema"] = STORE_SCHEMA
        f.attrs["attnscope_version"] = __version__
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        checksum.seal_attrs(f)
        f.create_group(TASKS)
        f.create_group(FAILURES)
    write_reserved(path, buf.getbuffer())


# Space reserved in a store's copy before h5py appends to it: h5py crashes on a full disk (exit
# 139) instead of raising, so the bytes it will write are allocated first (HDF5 writes new
# objects at the end of its data and truncates the file to that end when it closes).
_APPEND_SLACK = 1 << 20


def _reserve_append(path: Path, incoming: int) -> None:
    """Allocate room in `path` for `incoming` bytes of HDF5 objects (twice that, plus 1 MiB, for
    the metadata of the copy); a full disk is a NoSpaceError before h5py writes anything."""
    size = path.stat().st_size
    extra = 2 * incoming + _APPEND_SLACK
    with no_space_left(path, size + extra):
        fd = os.open(path, os.O_RDWR)
        try:
            reserve(fd, size, extra)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------- verification
@dataclass
class CorruptEntry:
    """One entry that failed its checksum or could not be read back."""

    key: str
    where: str  # "tasks" | "failures" (in the store file) | "pending" (a file in <store>.d/)
    file: Path
    error: str


@dataclass
class VerifyReport:
    """What `Store.verify()` read: `checked` entries passed their checksums, `unverified` ones
    (schema 1, no checksums) were read back without error, `corrupt` lists the rest."""

    path: Path
    schema: int | None
    checked: int = 0
    unverified: int = 0
    quarantined: int = 0
    corrupt: list[CorruptEntry] = field(default_factory=list)
    done: set = field(default_factory=set)  # keys with a readable result
    failed: set = field(default_factory=set)  # keys with a readable failure record and no result

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def lines(self) -> list[str]:
        out = [f"{self.path}: store schema {self.schema if self.schema is not None else '-'}; "
               f"{self.checked} entr{'y' if self.checked == 1 else 'ies'} passed their checksums"
               + (f", {self.unverified} read back without error but carry no checksums (schema 1: "
                  "`attnscope store upgrade` writes a checksummed copy)" if self.unverified else "")
               + (f"; {self.quarantined} moved aside earlier (/{QUARANTINE})" if self.quarantined else "")]
        what = {TASKS: "task", FAILURES: "failure record", "pending": "pending task"}
        for c in self.corrupt:
            out.append(f"corrupt: {what[c.where]} {c.key} in {c.file}: {c.error}")
        return out


def _check_entry(g: h5py.Group, schema: int, *, failure: bool, deep: bool) -> bool:
    """Check one task or failure group; True if a checksum was compared (False: schema 1)."""
    if schema >= 2:
        checksum.check_group(g, deep=deep)
        return True
    if deep and not failure:
        read_dataset(g)
    else:
        dict(g.attrs)
    return False


def _verify(path: Path, side: Path) -> VerifyReport:
    """Read every entry of the store and its pending files back (see Store.verify)."""
    report = VerifyReport(path, None)
    store_done: set[str] = set()
    if path.exists():
        with _open_store_file(path) as f:
            report.schema = _store_schema(f)
            try:
                groups = [(where, key) for where in (TASKS, FAILURES) for key in f[where].keys()]
                report.quarantined = sum(len(f[f"{QUARANTINE}/{w}"]) for w in (TASKS, FAILURES)
                                         if f"{QUARANTINE}/{w}" in f)
            except H5_ERRORS as exc:
                raise CorruptDataError(f"{path}: the store's index of tasks is damaged ({type(exc).__name__}: "
                                       f"{exc}); attnscope never overwrites it: move it away") from exc
            for where, key in groups:
                try:
                    checked = _check_entry(f[f"{where}/{key}"], report.schema, failure=where == FAILURES,
                                           deep=True)
                except (*H5_ERRORS, StoreError, checksum.DigestMismatch) as exc:
                    report.corrupt.append(CorruptEntry(key, where, path, _describe(exc)))
                    continue
                report.checked += checked
                report.unverified += not checked
                (store_done if where == TASKS else report.failed).add(key)
    pending_failed = set()
    for p in _pending_files(side):
        try:
            if p.failed:
                record = json.loads(p.path.read_text(encoding="utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                pending_failed.add(p.key)
                report.unverified += 1  # a JSON record: read back, no checksum
                continue
            with h5py.File(p.path, "r") as g:
                checked = _check_entry(g, schema_of(g), failure=False, deep=True)
        except (*H5_ERRORS, StoreError, checksum.DigestMismatch) as exc:
            report.corrupt.append(CorruptEntry(p.key, "pending", p.path, _describe(exc)))
            continue
        report.checked += checked
        report.unverified += not checked
        store_done.add(p.key)
    report.done = store_done
    report.failed = (report.failed | pending_failed) - store_done
    return report


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (checksum.DigestMismatch, StoreError)):
        return str(exc)
    return describe_h5_error(exc)


class StoreWriter:
    """The single writer of a store: durable per-task commits plus journalled consolidation.

    `path` may be relative or a symlink: the writer works on the real path (the lock is taken
    there, a symlink is written through and stays a symlink). Opening reads the whole store back
    (`Store.verify`): entries that fail their checksum are moved aside (`/quarantine` in the
    store, `<key>.h5.corrupt` in `<store>.d/`; nothing is deleted) and count as not done, so the
    batch measures them again; `quarantined` lists them.

    `consolidate_ratio`: pending task files are folded into the store when their size reaches
    this fraction of the store's size (at least `min_consolidate_bytes`), which keeps the total
    copying linear in the store's size; 0 consolidates after every commit. `close()` always
    consolidates.
    """

    def __init__(self, path: str | os.PathLike, *, consolidate_ratio: float = 0.25,
                 min_consolidate_bytes: int = 64 << 20):
        from filelock import FileLock, Timeout

        self.path = Path(path).expanduser().resolve()  # the real file: one lock whatever the alias
        self.side = sidecar_dir(self.path)
        self.consolidate_ratio = consolidate_ratio
        self.min_consolidate_bytes = min_consolidate_bytes
        self.quarantined: list[CorruptEntry] = []
        if self.path.is_dir():
            raise StoreError(f"--out {path} is a folder; give a file path such as {Path(path) / 'store.h5'}")
        if self.path.exists():
            with _open_store_file(self.path, for_writing=True) as f:  # corrupt or foreign: never overwritten
                schema = _store_schema(f)
            if schema < STORE_SCHEMA:
                raise StoreError(f"{self.path} is a store of schema {schema} (written before stores had "
                                 f"checksums); this attnscope reads it but adds nothing to it: "
                                 f"`attnscope store upgrade {self.path} NEW.h5` writes a checksummed copy "
                                 "to extract into")
        try:
            self.side.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.side, prefix=".write-test.", suffix=".tmp")
            probe.close()
        except OSError as exc:
            raise StoreError(f"cannot write next to {self.path} ({exc}); choose a writable --out path") from exc
        self._lock = FileLock(str(self.path) + ".lock")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise StoreError(f"another attnscope process is writing {self.path} (lock {self._lock.lock_file}); "
                             "only one writer per store: wait for it or use another --out") from None
        try:
            self._cleanup_temporaries()
            self._quarantine_corrupt()
            self._done, self._failed = self._scan()
        except BaseException:
            self._lock.release()
            raise
        self._pending_bytes = sum(p.path.stat().st_size for p in _pending_files(self.side))

    # -- state ---------------------------------------------------------------------------------
    def _cleanup_temporaries(self) -> None:
        """Temporary files are what a crash leaves behind; they never hold a committed result."""
        for p in self.side.glob("*.tmp"):
            p.unlink(missing_ok=True)
        for p in self.path.parent.glob(self.path.name + ".tmp-*"):
            p.unlink(missing_ok=True)

    def _quarantine_corrupt(self) -> None:
        """Read everything back; move what fails its checksum aside (never delete it)."""
        report = _verify(self.path, self.side)
        self.quarantined = list(report.corrupt)
        in_store = []
        for c in report.corrupt:
            if c.where == "pending":
                target = c.file.with_name(c.file.name + ".corrupt")
                n = 1
                while target.exists():
                    n += 1
                    target = c.file.with_name(f"{c.file.name}.corrupt{n}")
                os.replace(c.file, target)
            else:
                in_store.append((c.where, c.key))
        if report.corrupt:
            _fsync_dir(self.side)
        if in_store:
            self._rewrite([], quarantine=in_store)

    def _scan(self) -> tuple[set[str], set[str]]:
        done: set[str] = set()
        failed: set[str] = set()
        if self.path.exists():
            with _open_store_file(self.path) as f:
                done.update(f[TASKS].keys())
                failed.update(f[FAILURES].keys())
        for p in _pending_files(self.side):
            (failed if p.failed else done).add(p.key)
        return done, failed - done

    @property
    def done(self) -> set[str]:
        """Keys of the tasks whose result is durably written (store or task file)."""
        return set(self._done)

    @property
    def failed(self) -> set[str]:
        return set(self._failed)

    # -- commits -------------------------------------------------------------------------------
    def put(self, key: str, ds: xr.Dataset) -> None:
        """Commit one task result: when this returns, the result survives any crash."""
        if key in self._done:
            return
        target = self.side / f"{key}.h5"
        data = result_image(ds)
        with atomic_path(target) as tmp:
            write_reserved(tmp, data)
        self._done.add(key)
        self._failed.discard(key)
        self._pending_bytes += target.stat().st_size
        self._maybe_consolidate()

    def put_failure(self, key: str, record: dict) -> None:
        """Record a task's final failure (error, traceback, attempts); a later success replaces it."""
        if key in self._done:
            return
        write_json_atomic(self.side / f"{key}.failed.json", record)
        self._failed.add(key)
        self._maybe_consolidate()

    def _maybe_consolidate(self) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        if self._pending_bytes >= max(self.consolidate_ratio * size,
                                      self.min_consolidate_bytes if self.consolidate_ratio > 0 else 0):
            self.consolidate()

    def consolidate(self) -> int:
        """Fold the pending task files into the store by a journalled copy; returns how many."""
        pending = _pending_files(self.side)
        if not pending:
            return 0
        self._rewrite(pending)
        for p in pending:  # now redundant; a crash here leaves files the next pass skips
            p.path.unlink(missing_ok=True)
        self._pending_bytes = 0
        return len(pending)

    def _rewrite(self, pending: list[_Pending], quarantine: list[tuple[str, str]] = ()) -> None:
        """The journalled copy: the store (or a new one) + pending files, corrupt entries moved to
        /quarantine, renamed over the store in one step."""
        fd, tmp_name = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".tmp-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if self.path.exists():
                with no_space_left(tmp, self.path.stat().st_size):
                    shutil.copyfile(self.path, tmp)
                mode = self.path.stat().st_mode & 0o777  # the store keeps the mode it has
            else:
                _new_store(tmp)
                mode = default_file_mode()
            _reserve_append(tmp, sum(p.path.stat().st_size for p in pending))
            with h5py.File(tmp, "a", libver=LIBVER) as dst:
                for where, key in quarantine:  # a link move: the damaged bytes are not even read
                    name, n = key, 1
                    while f"{QUARANTINE}/{where}/{name}" in dst:
                        n += 1
                        name = f"{key}.{n}"
                    dst.require_group(f"{QUARANTINE}/{where}")
                    dst.move(f"{where}/{key}", f"{QUARANTINE}/{where}/{name}")
                tasks, failures = dst[TASKS], dst[FAILURES]
                for p in pending:
                    if p.failed or p.key in tasks:
                        continue
                    with h5py.File(p.path, "r") as src:
                        src.copy(src["/"], tasks, name=p.key)
                    if p.key in failures:
                        del failures[p.key]
                for p in pending:
                    if not p.failed or p.key in tasks:
                        continue
                    record = json.loads(p.path.read_text(encoding="utf-8"))
                    if p.key in failures:
                        del failures[p.key]
                    _write_failure(failures.create_group(p.key), record)
            _fsync_file(tmp)
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)  # the commit point: the old store or the new one, never half
            _fsync_dir(self.path.parent)
        finally:
            if tmp.exists():
                tmp.unlink()

    def close(self) -> None:
        try:
            self.consolidate()
        finally:
            self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # keep the committed task files; the next run consolidates them
            self._lock.release()
            with contextlib.suppress(OSError):  # but no empty <store>.d/ from a run that saved nothing
                self.side.rmdir()


class Store:
    """Read access to a batch store (plus its pending, not yet consolidated task files).

    Every read checks what it reads: a damaged task raises one CorruptDataError naming the task
    and the file; `verify()` reads everything and lists each damaged entry."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().resolve()
        self.side = sidecar_dir(self.path)
        if not self.path.exists() and not _pending_files(self.side):
            raise StoreError(f"no batch store at {path} (and no pending results in {sidecar_dir(Path(path))})")
        self.schema = STORE_SCHEMA
        if self.path.exists():
            with _open_store_file(self.path) as f:
                self.schema = _store_schema(f)
        self._table: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, {len(self.tasks())} tasks)"

    def verify(self) -> VerifyReport:
        """Read every task and failure record (store and pending files) in full, checking each
        against its checksums (Fletcher-32 on arrays, the digest on the rest). Returns a
        VerifyReport; `.corrupt` names each damaged entry and its file. Raises StoreError only
        when the file itself is unusable (not HDF5, not a store, a damaged task index)."""
        return _verify(self.path, self.side)

    def _corrupt(self, key: str, file, exc: BaseException) -> CorruptDataError:
        return CorruptDataError(f"task {key} in {file} is corrupt ({_describe(exc)}); {_hint(self.path)}")

    # -- index ---------------------------------------------------------------------------------
    def _sources(self) -> Iterable[tuple[str, str, Any, bool, Path]]:
        """(key, status, attrs, pending, file) for every task: a result anywhere beats a failure,
        a pending failure beats an older consolidated one, and a consolidated result beats its
        not yet deleted task file. Each entry's digest is checked (not its arrays: `verify`)."""
        pending = _pending_files(self.side)
        pending_done = {p.key for p in pending if not p.failed}
        pending_failed = {p.key for p in pending if p.failed}
        store_done: set[str] = set()
        if self.path.exists():
            with _open_store_file(self.path) as f:
                schema = _store_schema(f)
                try:
                    task_keys, failure_keys = list(f[TASKS].keys()), list(f[FAILURES].keys())
                except H5_ERRORS as exc:
                    raise CorruptDataError(f"{self.path}: the store's index of tasks is damaged "
                                           f"({_describe(exc)}); attnscope never overwrites it") from exc
                for where, keys in ((TASKS, task_keys), (FAILURES, failure_keys)):
                    for key in keys:
                        if where == FAILURES and (key in store_done or key in pending_done
                                                  or key in pending_failed):
                            continue
                        try:
                            g = f[f"{where}/{key}"]
                            _check_entry(g, schema, failure=where == FAILURES, deep=False)
                            attrs = dict(g.attrs)
                        except (*H5_ERRORS, checksum.DigestMismatch) as exc:
                            raise self._corrupt(key, self.path, exc) from exc
                        if where == TASKS:
                            store_done.add(key)
                        yield key, "done" if where == TASKS else "failed", attrs, False, self.path
        for p in pending:
            if p.key in store_done or (p.failed and p.key in pending_done):
                continue
            try:
                if p.failed:
                    record = json.loads(p.path.read_text(encoding="utf-8"))
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                    yield p.key, "failed", record, True, p.path
                    continue
                with h5py.File(p.path, "r") as f:
                    _check_entry(f, schema_of(f), failure=False, deep=False)
                    attrs = dict(f.attrs)
            except (*H5_ERRORS, checksum.DigestMismatch) as exc:
                raise self._corrupt(p.key, p.path, exc) from exc
            yield p.key, "done", attrs, True, p.path

    def tasks(self) -> pd.DataFrame:
        """One row per task: key, status (done|failed), model, revision, probe, probe_hash, dtype,
        one column per probe parameter, pending (not yet consolidated), error, attempts."""
        if self._table is None:
            rows = []
            for key, status, attrs, pending, file in self._sources():
                ident = _identity(attrs)
                row = {"key": key, "status": status, "model": ident["model"], "revision": ident["revision"],
                       "probe": ident["probe"], "probe_hash": ident["probe_hash"], "dtype": ident["dtype"],
                       "method": ident["method"]}
                row.update(ident["params"])
                row.update({"pending": pending, "error": _attr(attrs.get("error")) if status == "failed" else None,
                            "attempts": _attr(attrs.get("attempts")), "_file": str(file)})
                rows.append(row)
            cols = ["key", "status", "model", "revision", "probe", "probe_hash", "dtype"]
            df = pd.DataFrame(rows, columns=None if rows else cols)
            self._table = df.sort_values(["model", "revision", "probe", "key"], na_position="first",
                                         ignore_index=True) if rows else df
        return self._table.drop(columns=["_file"], errors="ignore").copy()

    def _match(self, model=None, revision=None, probe=None, status="done", **params) -> pd.DataFrame:
        self.tasks()
        df = self._table
        if df.empty:
            return df
        mask = df["status"] == status
        if model is not None:
            mask &= df["model"] == model
        if revision is not None:
            mask &= df["revision"] == revision
        if probe is not None:
            mask &= (df["probe"] == probe) | (df["probe_hash"] == probe)
        for k, v in params.items():
            if k not in df.columns:
                raise StoreError(f"no task in {self.path} has a parameter {k!r}; parameters: "
                                 f"{[c for c in df.columns if c not in _FIXED_COLUMNS]}")
            mask &= df[k] == v
        return df[mask]

    def _read(self, row) -> xr.Dataset:
        key, file = row["key"], row["_file"]
        try:
            with h5py.File(file, "r") as f:
                g = f[f"{TASKS}/{key}"] if file == str(self.path) else f["/"]
                return read_dataset(g, what=f"task {key}")
        except CorruptDataError as exc:
            raise CorruptDataError(f"{exc}; {_hint(self.path)}") from exc
        except H5_ERRORS as exc:
            raise self._corrupt(key, file, exc) from exc

    # -- data ----------------------------------------------------------------------------------
    def get(self, model: str, revision: str | None = None, probe: str | None = None, **params) -> xr.Dataset:
        """The result of exactly one task (model, revision, probe name or hash, params)."""
        hits = self._match(model, revision, probe, **params)
        if revision is None and not hits.empty:
            hits = hits[hits["revision"].isna()] if hits["revision"].isna().any() else hits
        if len(hits) != 1:
            what = f"model={model!r} revision={revision!r} probe={probe!r} {params}"
            if hits.empty:
                raise StoreError(f"no finished task in {self.path} matches {what}; see Store.tasks()")
            raise StoreError(f"{len(hits)} tasks in {self.path} match {what}; add parameters "
                             f"({[c for c in hits.columns if c not in _FIXED_COLUMNS]}) to pick one")
        return self._read(hits.iloc[0])

    def select(self, model=None, revision=None, probe=None, variables=None, **params) -> xr.Dataset:
        """Every matching finished task, stacked along a `task` dim with coords key, model, revision,
        probe and each parameter (outer join: coords that differ between tasks give NaN)."""
        hits = self._match(model, revision, probe, **params)
        if hits.empty:
            raise StoreError(f"no finished task in {self.path} matches model={model!r} "
                             f"revision={revision!r} probe={probe!r} {params}")
        param_cols = [c for c in hits.columns if c not in _FIXED_COLUMNS]
        parts = []
        for _, row in hits.iterrows():
            ds = self._read(row)
            if variables is not None:
                ds = ds[list(variables)]
            # a task's own parameters (length, depth) become coords along `task`
            ds = ds.squeeze([d for d in param_cols if d in ds.dims and ds.sizes[d] == 1], drop=True)
            parts.append(ds.assign_attrs({}) if not hasattr(ds, "drop_attrs") else ds.drop_attrs())
        out = xr.concat(parts, dim="task", join="outer", combine_attrs="drop", coords="different",
                        compat="equals")
        task_coords = {"key": list(hits["key"]), "model": list(hits["model"]),
                       "revision": [r if isinstance(r, str) else "" for r in hits["revision"]],
                       "probe": list(hits["probe"])}
        for c in param_cols:
            task_coords[c] = list(hits[c])
        return out.assign_coords({k: ("task", v) for k, v in task_coords.items()})

    def summary(self) -> pd.DataFrame:
        """A tidy table: one row per (finished task, layer) with the head-mean of each scalar
        metric (sink_mass, token0_mass, entropy, mean_distance) and `span_mass_<span>` for each
        span (e.g. the needle share of attention) when the task has spans."""
        rows = []
        df = self._match()
        param_cols = [c for c in df.columns if c not in _FIXED_COLUMNS]
        for _, row in df.iterrows():
            ds = self._read(row)
            base = {"key": row["key"], "model": row["model"], "revision": row["revision"],
                    "probe": row["probe"], **{c: row[c] for c in param_cols}}
            for layer in ds["layer"].values:
                rec = dict(base, layer=int(layer))
                sel = ds.sel(layer=layer)
                for m in _SUMMARY_METRICS:
                    if m in ds:
                        rec[m] = float(sel[m].mean())
                if "span_mass" in ds and "span" in ds["span_mass"].dims:
                    for span in ds["span"].values:
                        rec[f"span_mass_{span}"] = float(sel["span_mass"].sel(span=span).mean())
                rows.append(rec)
        return pd.DataFrame(rows)

    def failures(self) -> pd.DataFrame:
        """The failed tasks with their error; tracebacks via `failure(key)`."""
        df = self.tasks()
        return df[df["status"] == "failed"].reset_index(drop=True) if not df.empty else df

    def failure(self, key: str) -> dict:
        """The full failure record (error, traceback, attempts) of one task."""
        for k, status, attrs, _, _ in self._sources():
            if k == key and status == "failed":
                return {a: _attr(v) for a, v in attrs.items()}
        raise StoreError(f"no failed task {key!r} in {self.path}")

    def task(self, key: str) -> xr.Dataset:
        """The result of the finished task `key` (a row of `tasks()`): reads one task also where a
        grid point was measured more than once (e.g. by an older method), which `get` refuses."""
        hits = self._match()
        hits = hits[hits["key"] == key] if not hits.empty else hits
        if hits.empty:
            raise StoreError(f"no finished task {key!r} in {self.path}; see Store.tasks()")
        return self._read(hits.iloc[0])


_FIXED_COLUMNS = {"key", "status", "model", "revision", "probe", "probe_hash", "dtype", "method", "pending", "error",
                  "attempts", "_file"}


def open_store(path: str | os.PathLike) -> Store:
    """Open a batch store for reading: `.tasks()`, `.get(...)`, `.select(...)`, `.summary()`,
    `.verify()`."""
    return Store(path)


def upgrade_store(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Write a checksummed (schema 2) copy of the store `src` (any schema, pending files
    included) to the new file `dst`; `src` is only read. Every task is read back in full on the
    way (a damaged one stops the upgrade with its name). Returns the number of entries copied."""
    store = Store(src)
    real = check_output_file(dst, option="the upgraded store")
    if real == store.path:
        raise StoreError("upgrade writes a new file: give a destination other than the store itself")
    n = 0
    incoming = sum(f.stat().st_size for f in [store.path, *(p.path for p in _pending_files(store.side))]
                   if f.exists())
    with atomic_output(real) as tmp:
        _new_store(tmp)
        _reserve_append(tmp, incoming)
        with h5py.File(tmp, "a", libver=LIBVER) as out:
            for key, status, attrs, _, file in list(store._sources()):
                if status == "done":
                    write_dataset(out[TASKS].create_group(key), store._read({"key": key, "_file": str(file)}))
                else:
                    _write_failure(out[FAILURES].create_group(key), {k: _attr(v) for k, v in attrs.items()})
                n += 1
    return n
