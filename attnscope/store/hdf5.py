"""An xarray Dataset <-> an HDF5 group, with h5py (schema in docs/store.md).

Group layout (schema version 1):
    attrs:  attnscope_kind = "result", attnscope_schema = 1, plus the Dataset's attrs
    <var>:  one HDF5 dataset per data variable, attr `dims` = JSON list of dim names
    coords/<name>: one HDF5 dataset per coordinate (strings stored as UTF-8)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import xarray as xr

from attnscope.errors import StoreError

SCHEMA_VERSION = 1
RESULT_KIND = "result"


def _attr_value(value):
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, str):
        return str(value)  # np.str_ has no HDF5 conversion
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    return json.dumps(value)


def write_dataset(group: h5py.Group, ds: xr.Dataset) -> None:
    """Write `ds` into an (empty) h5py group."""
    group.attrs["attnscope_kind"] = RESULT_KIND
    group.attrs["attnscope_schema"] = SCHEMA_VERSION
    for key, value in ds.attrs.items():
        group.attrs[key] = _attr_value(value)
    coords = group.create_group("coords")
    for name, coord in ds.coords.items():
        values = coord.values
        if values.dtype.kind in "UO":
            coords.create_dataset(name, data=np.array([str(v) for v in values], dtype=h5py.string_dtype()))
        else:
            coords.create_dataset(name, data=values)
        coords[name].attrs["dims"] = json.dumps(list(coord.dims))
    for name, var in ds.data_vars.items():
        values = var.values
        if values.dtype.kind in "UO":  # text variables (e.g. generated answers) as UTF-8 strings
            values = np.array(values.astype(str).tolist(), dtype=h5py.string_dtype())
        big = var.size > 4096 and values.dtype.kind != "O"
        dset = group.create_dataset(name, data=values, compression="gzip" if big else None,
                                    shuffle=big)
        dset.attrs["dims"] = json.dumps(list(var.dims))
        for key, value in var.attrs.items():
            dset.attrs[key] = _attr_value(value)


def read_dataset(group: h5py.Group) -> xr.Dataset:
    """Read a group written by `write_dataset` back into an xarray Dataset."""
    if group.attrs.get("attnscope_kind") != RESULT_KIND:
        raise StoreError(f"HDF5 group {group.name!r} in {group.file.filename} is not an attnscope result")
    schema = int(group.attrs.get("attnscope_schema", -1))
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
    attrs = {}
    for key, value in group.attrs.items():
        if key in ("attnscope_kind", "attnscope_schema"):
            continue
        attrs[key] = value.item() if isinstance(value, np.generic) else value
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def save_result(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write one result to its own HDF5 file, atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            write_dataset(f, ds)
            f.flush()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
        if group not in f:
            raise StoreError(f"{path} has no group {group!r}")
        return read_dataset(f[group])
