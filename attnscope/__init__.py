"""attnscope: exact attention statistics for Hugging Face causal LMs, at long context.

The public API is small:
    load(model, revision=None, ...)       -> LoadedModel
    analyze(model, text, metrics=..., ...) -> xarray.Dataset (dims layer, head, ...)
    sink_rate(model_or_result, texts)     -> sink rate of Gu et al. 2025 (per layer, per model)
    save_result(ds, path) / read_result(path)
    doctor(model, revision=None, ...)     -> DoctorReport (does the checkpoint run what it declares?)
    extract(models=..., revisions=..., probes=[...], out=store) -> ExtractReport   (batch)
    open_store(path)                       -> Store (.tasks(), .get(), .select(), .summary())
    run_probe(lm, "niah_single", lengths=[...]) -> xarray.Dataset (needle share, retrieval heads; shipped
                                           probe specs by name, `attnscope probes`, or a TOML path)
    topk_keys(lm, text, queries=[...], k=10) -> xarray.Dataset (exact top-k keys per layer, head, query)
    decompose_score(lm, text, layer=, head=, query=, key=) -> ScoreDecomposition (q.k over dims, RoPE pairs)
"""

__version__ = "0.1.0"

from attnscope.capture.interface import AttentionEdit, capture, set_edit  # noqa: E402
from attnscope.capture.queries import QuerySelection  # noqa: E402
from attnscope.metrics.analyze import analyze  # noqa: E402
from attnscope.metrics.sinks import sink_rate  # noqa: E402
from attnscope.models.doctor import DoctorReport, doctor  # noqa: E402
from attnscope.models.loading import LoadedModel, load  # noqa: E402
from attnscope.store.store import open_store  # noqa: E402
from attnscope.batch.extract import extract  # noqa: E402
from attnscope.probing.needle import run_probe  # noqa: E402
from attnscope.store.hdf5 import read_result, save_result  # noqa: E402
from attnscope.metrics.drilldown import topk_keys  # noqa: E402
from attnscope.metrics.decompose import decompose_score  # noqa: E402
from attnscope.report import accessor as _accessor  # noqa: E402,F401  (registers ds.attnscope)

__all__ = ["load", "LoadedModel", "analyze", "sink_rate", "QuerySelection", "AttentionEdit", "set_edit",
           "capture", "doctor", "DoctorReport", "extract", "open_store", "run_probe",
           "save_result", "read_result", "topk_keys", "decompose_score", "__version__"]
