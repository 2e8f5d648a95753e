"""An xarray Dataset <-> an HDF5 group, with h5py (schema and checksums: docs/store.md).

Group layout (result schema 2; schema 1 = the same without checksums, still read):
    attrs:  attnscope_kind = "result", attnscope_schema = 2, plus the Dataset's attrs, and
            attnscope_digest (SHA-256 over attributes, scalars and strings: store/checksum.py)
    <var>:  one HDF5 dataset per data variable, attr `dims` = JSON list of dim names;
            arrays carry HDF5's Fletcher-32 checksum filter
    coords/<name>: one HDF5 dataset per coordinate (strings stored as UTF-8)
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import h5py
import numpy as np
import xarray as xr

from attnscope.errors import CorruptDataError, StoreError
from attnscope.files import write_reserved
from attnscope.store import checksum
from attnscope.store.files import atomic_output, check_output_file

SCHEMA_VERSION = 2
RESULT_KIND = "result"
# HDF5 >= 1.10 object formats: a single-chunk index instead of a B-tree per chunked dataset, so
# the Fletcher-32 filter (which needs chunking) costs a few bytes, not kilobytes, per array
LIBVER = ("v110", "latest")
_INTERNAL_ATTRS = ("attnscope_kind", "attnscope_schema", checksum.DIGEST_ATTR)
# what h5py raises on damaged files: OSError (a failed Fletcher-32 check, a bad header), others
# on mangled metadata
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError)


def _attr_value(value):
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, str):
        return str(value)  # np.str_ has no HDF5 conversion
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    return json.dumps(value)


def write_dataset(group: h5py.Group, ds: xr.Dataset) -> None:
    """Write `ds` into an (empty) h5py group, with checksums (Fletcher-32 on arrays, a digest
    over the rest)."""
    group.attrs["attnscope_kind"] = RESULT_KIND
    group.attrs["attnscope_schema"] = SCHEMA_VERSION
    for key, value in ds.attrs.items():
        group.attrs[key] = _attr_value(value)
    coords = group.create_group("coords")
    for name, coord in ds.coords.items():
        values = coord.values
        if values.dtype.kind in "UO":
            values = np.array([str(v) for v in values], dtype=h5py.string_dtype())
        coords.create_dataset(name, data=values, fletcher32=checksum.filterable(values))
        coords[name].attrs["dims"] = json.dumps(list(coord.dims))
    for name, var in ds.data_vars.items():
        values = var.values
        if values.dtype.kind in "UO":  # text variables (e.g. generated answers) as UTF-8 strings
            values = np.array(values.astype(str).tolist(), dtype=h5py.string_dtype())
        big = var.size > 4096 and values.dtype.kind != "O"
        dset = group.create_dataset(name, data=values, compression="gzip" if big else None,
                                    shuffle=big, fletcher32=checksum.filterable(values))
        dset.attrs["dims"] = json.dumps(list(var.dims))
        for key, value in var.attrs.items():
            dset.attrs[key] = _attr_value(value)
    checksum.seal(group)


def describe_h5_error(exc: BaseException) -> str:
    """One line for what h5py raised on reading damaged data."""
    text = f"{type(exc).__name__}: {exc}".split("\n")[0]
    if "filter returned failure" in text:
        return f"array data failed its Fletcher-32 checksum ({text})"
    return text


def schema_of(group: h5py.Group) -> int:
    return int(group.attrs.get("attnscope_schema", -1))


def read_dataset(group: h5py.Group, *, what: str | None = None) -> xr.Dataset:
    """Read a group written by `write_dataset` back into an xarray Dataset. Schema-2 groups are
    checked against their checksums; any damage raises one CorruptDataError naming `what` (by
    default the group) and the file."""
    what = what or f"group {group.name!r}"
    try:
        return _read_dataset(group)
    except (StoreError, checksum.DigestMismatch) as exc:
        if isinstance(exc, StoreError) and not isinstance(exc, CorruptDataError):
            raise
        raise CorruptDataError(f"{what} in {group.file.filename} is corrupt: {exc}") from exc
    except H5_ERRORS as exc:
        raise CorruptDataError(f"{what} in {group.file.filename} cannot be read back (corrupt): "
                               f"{describe_h5_error(exc)}") from exc


def _read_dataset(group: h5py.Group) -> xr.Dataset:
    if group.attrs.get("attnscope_kind") != RESULT_KIND:
        raise StoreError(f"HDF5 group {group.name!r} in {group.file.filename} is not an attnscope result")
    schema = schema_of(group)
    if schema > SCHEMA_VERSION:
        raise StoreError(f"{group.file.filename} uses result schema {schema}; this attnscope reads "
                         f"up to {SCHEMA_VERSION}: upgrade attnscope")
    coords = {}
    for name, dset in group["coords"].items():
        values = dset[()]
        if dset.dtype.kind == "O":
            values = np.array([v.decode() if isinstance(v, bytes) else v for v in values])
        coords[name] = (json.loads(dset.attrs["dims"]), values)
    data_vars = {}
    for name, dset in group.items():
        if name == "coords" or not isinstance(dset, h5py.Dataset):
            continue
        attrs = {k: v for k, v in dset.attrs.items() if k != "dims"}
        values = dset[()]
        if dset.dtype.kind == "O":
            values = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v, otypes=[str])(values) \
                if np.ndim(values) else np.array(values.decode() if isinstance(values, bytes) else values)
        data_vars[name] = (json.loads(dset.attrs["dims"]), values, attrs)
    if schema >= 2:  # arrays were checked by Fletcher-32 as they were read; now the rest
        checksum.check_group(group)
    attrs = {}
    for key, value in group.attrs.items():
        if key in _INTERNAL_ATTRS:
            continue
        attrs[key] = value.item() if isinstance(value, np.generic) else value
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def result_image(ds: xr.Dataset) -> memoryview:
    """The bytes of a result file holding `ds`, built in memory: written to disk as plain bytes
    (attnscope.files.write_reserved), a full disk is an exception, not h5py's crash."""
    buf = io.BytesIO()
    with h5py.File(buf, "w", libver=LIBVER) as f:
        write_dataset(f, ds)
    return buf.getbuffer()


def save_result(ds: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write one result to its own HDF5 file, atomically (a crash never leaves half a file).

    An existing file is replaced only with `overwrite=True`, and a batch store never; a symlink
    is written through. A full disk raises NoSpaceError (nothing is left behind). Returns `path`."""
    write_result(ds, check_output_file(path, overwrite=overwrite), overwrite=overwrite)
    return Path(path)


def write_result(ds: xr.Dataset, real: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """`save_result` for a path already checked (`check_output_file`) before the result was
    computed: if the path was taken meanwhile, the new result is kept under its temporary name
    and the OutputExistsError says where, so a long computation is never thrown away."""
    data = result_image(ds)
    with atomic_output(real, overwrite=overwrite) as tmp:
        write_reserved(tmp, data)
    return Path(real)


def open_h5(path: str | os.PathLike, mode: str = "r") -> h5py.File:
    """Open an HDF5 file with errors that say what is wrong."""
    path = Path(path)
    if mode == "r" and not path.is_file():
        raise StoreError(f"no such file: {path}")
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise StoreError(
            f"{path} is not a readable HDF5 file ({exc}); it may be corrupt or of another format") from exc


def read_result(path: str | os.PathLike, group: str = "/") -> xr.Dataset:
    """Read a result file written by `save_result` (or one group of a store)."""
    with open_h5(path) as f:
        try:
            present = group in f
        except H5_ERRORS as exc:
            raise CorruptDataError(f"{path} cannot be read back (corrupt): {describe_h5_error(exc)}") from exc
        if not present:
            raise StoreError(f"{path} has no group {group!r}")
        return read_dataset(f[group], what="the result" if group == "/" else f"group {group!r}")
