"""attnscope: exact attention statistics for Hugging Face causal LMs, at long context.

The public API is small:
    load(model, revision=None, ...)       -> LoadedModel
    analyze(model, text, metrics=..., ...) -> xarray.Dataset (dims layer, head, ...)
    save_result(ds, path) / read_result(path)
"""

__version__ = "0.1.0"

from attnscope.capture.interface import AttentionEdit, capture, set_edit  # noqa: E402
from attnscope.capture.queries import QuerySelection  # noqa: E402
from attnscope.metrics.analyze import analyze  # noqa: E402
from attnscope.models.loading import LoadedModel, load  # noqa: E402
from attnscope.report import accessor as _accessor  # noqa: E402,F401  (registers ds.attnscope)

__all__ = ["load", "LoadedModel", "analyze", "QuerySelection", "AttentionEdit", "set_edit",
           "capture", "__version__"]
