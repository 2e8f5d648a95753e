"""HDF5 storage: single results (hdf5.py) and the batch store (store.py, docs/batch.md)."""

from attnscope.store.store import Store, open_store

__all__ = ["Store", "open_store"]
