"""Batch extraction: models x revisions x probes into one resumable HDF5 store (docs/batch.md)."""

from attnscope.batch.extract import ExtractReport, extract
from attnscope.batch.plan import Plan, Task, make_plan

__all__ = ["extract", "ExtractReport", "make_plan", "Plan", "Task"]
