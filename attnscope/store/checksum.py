"""Checksums on everything attnscope writes to HDF5 (result schema 2, store schema 2; docs/store.md).

Two layers, because HDF5's own filter cannot reach everything:

1. **Fletcher-32** (HDF5's checksum filter) on every array dataset. HDF5 checks it on every read,
   in any HDF5 reader (h5py, h5dump, netCDF tools): a changed byte makes the read fail.
2. **A SHA-256 digest** in the attribute `attnscope_digest` of each result group (and failure
   record, and the store's root) over what the filter cannot cover: every attribute (they live
   in object headers), scalar datasets and variable-length strings (HDF5 refuses filters on
   both), and each dataset's name, type, shape and filter settings (so a damaged header that
   drops the filter is caught too). Array data is left to Fletcher-32; `check_group(deep=True)`
   reads it so that the filter runs.

A store root's digest covers the root's attributes only (its groups change with every
consolidation, and each task group has its own digest).
"""

from __future__ import annotations

import hashlib
import struct

import h5py
import numpy as np

DIGEST_ATTR = "attnscope_digest"
_PREFIX = "sha256:"

__all__ = ["DIGEST_ATTR", "filterable", "group_digest", "attrs_digest", "seal", "seal_attrs",
           "check_group", "check_attrs"]


class DigestMismatch(Exception):
    """The stored digest is missing or differs from the content (caught and reworded by callers)."""


def filterable(values: np.ndarray) -> bool:
    """Whether HDF5 can put a Fletcher-32 filter on a dataset of these values (chunked layout:
    not a scalar, not a variable-length type)."""
    return np.ndim(values) > 0 and values.dtype.kind not in "OU"


def _feed(h, tag: bytes, payload: bytes) -> None:
    h.update(tag + struct.pack("<Q", len(payload)) + payload)


def _feed_value(h, v) -> None:
    if isinstance(v, str):
        _feed(h, b"s", v.encode("utf-8", "surrogatepass"))
    elif isinstance(v, bytes):
        _feed(h, b"b", v)
    else:
        a = np.asarray(v)
        _feed(h, b"h", repr(a.shape).encode())
        if a.dtype.kind == "O":
            for x in a.ravel():
                _feed_value(h, x)
        else:
            _feed(h, b"a", a.dtype.str.encode() + b"|" + np.ascontiguousarray(a).tobytes())


def _feed_attrs(h, attrs, skip: str | None = None) -> None:
    for key in sorted(attrs.keys()):
        if key == skip:
            continue
        _feed(h, b"k", key.encode())
        _feed_value(h, attrs[key])


def _feed_tree(h, group: h5py.Group, prefix: str, deep: bool) -> None:
    for name in sorted(group.keys()):
        obj = group[name]
        path = f"{prefix}{name}"
        if isinstance(obj, h5py.Group):
            _feed(h, b"g", path.encode())
            _feed_attrs(h, obj.attrs)
            _feed_tree(h, obj, path + "/", deep)
            continue
        _feed(h, b"d", path.encode())
        _feed(h, b"t", f"{obj.dtype.str}|{obj.shape}|{obj.chunks}|{obj.fletcher32}".encode())
        _feed_attrs(h, obj.attrs)
        if not obj.fletcher32:
            _feed_value(h, obj[()])
        elif deep:
            obj[()]  # read so that HDF5 checks every chunk's Fletcher-32


def group_digest(group: h5py.Group, *, deep: bool = False) -> str:
    """Digest of a group's attributes and its whole subtree (names relative to the group, so a
    group copied elsewhere keeps its digest). `deep` also reads every filtered array."""
    h = hashlib.sha256()
    _feed_attrs(h, group.attrs, skip=DIGEST_ATTR)
    _feed_tree(h, group, "", deep)
    return _PREFIX + h.hexdigest()


def attrs_digest(obj) -> str:
    """Digest of an object's attributes only (a store's root)."""
    h = hashlib.sha256()
    _feed_attrs(h, obj.attrs, skip=DIGEST_ATTR)
    return _PREFIX + h.hexdigest()


def seal(group: h5py.Group) -> None:
    """Write the group's digest (after everything else in it is written)."""
    group.attrs[DIGEST_ATTR] = group_digest(group)


def seal_attrs(obj) -> None:
    obj.attrs[DIGEST_ATTR] = attrs_digest(obj)


def _compare(stored, actual: str) -> None:
    if stored is None:
        raise DigestMismatch(f"no {DIGEST_ATTR} attribute")
    if isinstance(stored, bytes):
        stored = stored.decode("utf-8", "replace")
    if stored != actual:
        raise DigestMismatch("checksum mismatch (attributes, scalars or strings changed since written)")


def check_group(group: h5py.Group, *, deep: bool = False) -> None:
    """Raise DigestMismatch if the group's content no longer matches its digest; with `deep`,
    also read every array (HDF5 raises OSError where a Fletcher-32 checksum fails)."""
    _compare(group.attrs.get(DIGEST_ATTR), group_digest(group, deep=deep))


def check_attrs(obj) -> None:
    _compare(obj.attrs.get(DIGEST_ATTR), attrs_digest(obj))
