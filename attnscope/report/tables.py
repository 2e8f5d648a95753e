"""Tables for the report: the only module that reads a batch store.

Everything downstream (statistics, figures, the HTML page) works on the DataFrames and
DataArrays built here, so it can be tested from `attnscope.analyze` results without a store.

    summary_table(source)      one row per task x layer (head means), as `Store.summary()`
    metrics_table(source)      one row per model x revision x probe (means over layers and heads)
    layer_profiles(source)     one row per model x revision x probe x layer
    head_maps(source, metric)  {(model, revision, probe): DataArray(layer, head)}
    model_table(source, ...)   one row per model: chosen revision's metrics joined with the registry
    registry_table()           the OlmPool registry's scores and features, one row per model

`source` is a store path, an open `attnscope.store.Store`, or (for tables built from the
summary) a DataFrame shaped like `Store.summary()`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import xarray as xr

from attnscope.errors import AttnscopeError, FeatureUnavailableError, StoreError

SCORES = ("helmet_8k", "helmet_16k", "helmet_32k", "helmet_64k", "ruler_4k", "ruler_8k", "ruler_16k",
          "ruler_32k", "ruler_64k", "longppl")
INDICATORS = ("has_qk_norm", "has_gqa", "has_swa", "has_short_ctx")
FEATURES = ("qk_norm", "norm", "kv_heads", "pretrain_ctx", "swa", "fp8", *INDICATORS, "harmful_count")
# head-mean metrics that Store.summary() gives per layer; span masses come as span_mass_<span>
LAYER_METRICS = ("sink_mass", "token0_mass", "entropy", "mean_distance")
NEEDLE_SPAN = "needle"  # span name of analyze(..., spans={"needle": ...}) results (span_mass_needle)
# run_probe's needle tasks store `needle_share` (query_set, span, layer, head, ...); the report's
# needle share is the target value's share of attention from the last prompt position
NEEDLE_QUERY_SET = "final"
NEEDLE_VALUE_SPAN = "needle_value"
_TASK_COLUMNS = {"key", "status", "model", "revision", "probe", "probe_hash", "dtype", "method", "pending",
                 "error", "attempts", "_file"}
KEYS = ("model", "revision", "probe")
STAGE_ORDER = {"pretrain": 0, "longcontext": 1, "main": 2, "other": 3}

__all__ = ["SCORES", "INDICATORS", "open_store", "summary_table", "metrics_table", "layer_profiles",
           "head_maps", "registry_table", "registry_name", "model_table", "revision_order",
           "choose_revision", "store_label", "checkpoint_table", "needle_table", "needle_rows"]


# ------------------------------------------------------------------------------------ sources
def open_store(path: str | os.PathLike):
    """Open a batch store for reading (`attnscope.store.open_store`)."""
    try:
        from attnscope.store import open_store as _open
    except ImportError as exc:
        raise FeatureUnavailableError("this attnscope has no batch store reader (attnscope.store.open_store); "
                                      "update attnscope, or use --registry-only") from exc
    path = Path(path).expanduser()
    return _open(path)


def _store(source):
    if isinstance(source, (str, os.PathLike)):
        return open_store(source)
    return source


_CACHE: dict[tuple, pd.DataFrame] = {}


def _cached(store, what: str, build) -> pd.DataFrame:
    """A store-wide table, rebuilt only when the store (or its pending results) changed: figures
    and the report read the same tables many times."""
    path = Path(getattr(store, "path", ""))
    side = path.with_name(path.name + ".d")
    stamp = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in (path, side))
    key = (str(path.absolute()), what, stamp)
    if not path.name or key not in _CACHE:
        table = build()
        if not path.name:
            return table
        _CACHE.clear() if len(_CACHE) > 16 else None
        _CACHE[key] = table
    return _CACHE[key].copy()


def store_label(source) -> str:
    """How a figure or report names its data: the store's path, or 'registry only'."""
    if source is None:
        return "registry only (no store)"
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source).expanduser().absolute())
    if isinstance(source, pd.DataFrame):
        return str(source.attrs.get("store", "in-memory table"))
    return str(getattr(source, "path", source))


def summary_table(source) -> pd.DataFrame:
    """One row per finished task x layer with head means (`Store.summary()`); a missing revision
    becomes '' so that group-bys keep the tasks that have none."""
    if isinstance(source, pd.DataFrame):
        df = source.copy()
    else:
        store = _store(source)
        df = _cached(store, "summary", store.summary)
        df.attrs["store"] = store_label(getattr(store, "path", source))
    if df.empty:
        raise StoreError(f"{store_label(source)} has no finished task to report on; run `attnscope extract` first")
    missing = [c for c in (*KEYS, "layer") if c not in df.columns]
    if missing:
        raise StoreError(f"summary table lacks columns {missing}; it is not a Store.summary() table")
    df["revision"] = df["revision"].map(lambda r: r if isinstance(r, str) else "")
    return df


def _metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c in LAYER_METRICS or c.startswith("span_mass_")]


def layer_profiles(source) -> pd.DataFrame:
    """Per model x revision x probe x layer: each metric's mean over tasks (grid points) and heads."""
    df = summary_table(source)
    cols = _metric_columns(df)
    out = df.groupby([*KEYS, "layer"], sort=True, dropna=False)[cols].mean().reset_index()
    out.attrs = dict(df.attrs)
    return out


def metrics_table(source) -> pd.DataFrame:
    """Per model x revision x probe: each metric's mean over layers, heads and the probe's grid
    points; `needle_share` (run_probe's, else span_mass_needle) for needle probes; `n_tasks`."""
    df = summary_table(source)
    cols = _metric_columns(df)
    g = df.groupby(list(KEYS), sort=True, dropna=False)
    out = g[cols].mean()
    out["n_tasks"] = g["key"].nunique() if "key" in df.columns else np.nan
    out["n_layers"] = g["layer"].nunique()
    out = out.reset_index()
    if f"span_mass_{NEEDLE_SPAN}" in out.columns:
        out["needle_share"] = out[f"span_mass_{NEEDLE_SPAN}"]
    needles = needle_rows(source)
    if not needles.empty:
        share = needles.groupby(list(KEYS))["needle_share"].mean().rename("_needle").reset_index()
        out = out.merge(share, on=list(KEYS), how="left")
        out["needle_share"] = out["_needle"].combine_first(out["needle_share"]) if "needle_share" in out \
            else out["_needle"]
        out = out.drop(columns="_needle")
    out.attrs = dict(df.attrs)
    return out


def _task_datasets(store, *, revision: str | None = None, probe: str | None = None):
    """(task row, Dataset) for every finished task, revision '' for none."""
    tasks = store.tasks()
    if tasks.empty:
        return
    tasks = tasks[tasks["status"] == "done"].copy()
    tasks["revision"] = tasks["revision"].map(lambda r: r if isinstance(r, str) else "")
    if revision is not None:
        tasks = tasks[tasks["revision"] == revision]
    if probe is not None:
        tasks = tasks[tasks["probe"] == probe]
    param_cols = [c for c in tasks.columns if c not in _TASK_COLUMNS]
    for _, row in tasks.iterrows():
        params = {c: row[c] for c in param_cols if not _missing(row[c])}
        yield row, params, store.get(row["model"], row["revision"] or None, row["probe_hash"], **params)


def head_maps(source, metric: str = "sink_mass", *, revision: str | None = None,
              probe: str | None = None) -> dict[tuple[str, str, str], xr.DataArray]:
    """Layer x head maps of `metric` per model x revision x probe, averaged over the probe's grid
    points (and any dim other than layer and head; for `needle_share`, the report's query set and
    span are selected first)."""
    store = _store(source)
    maps: dict[tuple[str, str, str], list[xr.DataArray]] = {}
    for row, _, ds in _task_datasets(store, revision=revision, probe=probe):
        if metric not in ds:
            continue
        da = _select_needle(ds[metric]) if metric == "needle_share" else ds[metric]
        extra = [d for d in da.dims if d not in ("layer", "head")]
        maps.setdefault((row["model"], row["revision"], row["probe"]), []).append(da.mean(extra) if extra else da)
    out = {}
    for key, parts in sorted(maps.items()):
        da = xr.concat(parts, dim="grid").mean("grid") if len(parts) > 1 else parts[0]
        out[key] = da.transpose("layer", "head").assign_attrs(
            model=key[0], revision=key[1], probe=key[2], metric=metric, n_tasks=len(parts))
    if not out:
        raise StoreError(f"no finished task in {store_label(source)} has the metric {metric!r}")
    return out


def _select_needle(da: xr.DataArray) -> xr.DataArray:
    if "query_set" in da.dims:
        da = da.sel(query_set=NEEDLE_QUERY_SET)
    if "span" in da.dims:
        da = da.sel(span=NEEDLE_VALUE_SPAN)
    return da


def needle_rows(source) -> pd.DataFrame:
    """Needle share per needle task x layer (head mean; mean over seeds), from run_probe's
    `needle_share` (query set `final`, span `needle_value`); empty when no task has it.
    Columns: key, model, revision, probe, the task's parameters, layer, needle_share."""
    if isinstance(source, pd.DataFrame):
        return pd.DataFrame()
    store = _store(source)
    return _cached(store, "needles", lambda: _needle_rows(store))


def _needle_rows(store) -> pd.DataFrame:
    rows = []
    for row, params, ds in _task_datasets(store):
        if "needle_share" not in ds:
            continue
        da = _select_needle(ds["needle_share"])
        extra = [d for d in da.dims if d != "layer"]
        per_layer = da.mean(extra) if extra else da
        base = {"key": row["key"], "model": row["model"], "revision": row["revision"], "probe": row["probe"],
                **params}
        rows += [dict(base, layer=int(layer), needle_share=float(v))
                 for layer, v in zip(per_layer["layer"].values, per_layer.values)]
    return pd.DataFrame(rows)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


# ------------------------------------------------------------------------------------ registry
def registry_table() -> pd.DataFrame:
    """OlmPool scores and features, one row per model (with provenance in `.attrs`)."""
    from attnscope.models import olmpool

    reg = olmpool.registry()
    cols = ["name", "hf_name", *FEATURES, *SCORES]
    out = reg[cols].copy()
    for c in INDICATORS:
        out[c] = out[c].astype(int)
    out["harmful_count"] = out["harmful_count"].astype(int)
    out.attrs = {"provenance": reg.attrs.get("provenance", ""), "paper": reg.attrs.get("paper", "")}
    return out


def registry_name(model: str, registry: pd.DataFrame | None = None) -> str | None:
    """The OlmPool short name of a store's model name (short name, Hub id, or a local folder named
    after the model), or None for models outside OlmPool. Exact matches only (case-insensitive):
    a prefix never matches, so a test model is never mistaken for an OlmPool model."""
    reg = registry_table() if registry is None else registry
    text = str(model).strip().rstrip("/")
    candidates = {text.lower(), text.rsplit("/", 1)[-1].lower()}
    for name, hf in zip(reg["name"], reg["hf_name"]):
        if name.lower() in candidates or hf.lower() == text.lower():
            return name
    return None


def revision_order(revision: str) -> tuple[int, int, str]:
    """Sort key along training: pretraining steps, then extension steps, then main, then others."""
    from attnscope.models.revisions import parse_revision

    if not revision:
        return (STAGE_ORDER["main"], 0, "")
    r = parse_revision(revision)
    return (STAGE_ORDER[r.stage], r.step if r.step is not None else 0, r.name)


def choose_revision(revisions: Iterable[str], prefer: str = "final") -> str:
    """The revision to correlate with a model's scores (which are measured after extension).

    `prefer="final"`: `longcontext-step2385` if present, else the latest revision along training
    (extension after pretraining; no revision counts as `main`). Any other value names a revision;
    models without it are left out by the caller."""
    from attnscope.models.revisions import parse_revision

    revs = list(dict.fromkeys(revisions))
    if prefer != "final":
        return prefer
    for r in revs:
        if r and parse_revision(r).is_final:
            return r
    return max(revs, key=revision_order)


def model_table(source=None, *, revision: str = "final", probe: str | None = None,
                keep_unscored: bool = True) -> pd.DataFrame:
    """One row per model: the chosen revision's metrics (mean over the probes it ran, or only
    `probe`) joined with the registry's scores and features.

    Store models are mapped to OlmPool short names (`registry_name`); models outside OlmPool keep
    NaN scores and features (`in_registry` False). With `source=None` the result is the registry
    alone (26 rows). Columns: model, registry_name, in_registry, revision, probes, the metrics
    (sink_mass, token0_mass, entropy, mean_distance, needle_share, ...), the features and scores."""
    reg = registry_table()
    if source is None:
        out = reg.rename(columns={"name": "registry_name"})
        out.insert(0, "model", out["registry_name"])
        out.insert(2, "in_registry", True)
        out.insert(3, "revision", "")
        out.attrs = dict(reg.attrs, store=store_label(None))
        return out
    metrics = metrics_table(source)
    if probe is not None:
        metrics = metrics[metrics["probe"] == probe]
        if metrics.empty:
            raise StoreError(f"no finished task of probe {probe!r} in {store_label(source)}")
    rows = []
    mcols = [c for c in metrics.columns if c not in (*KEYS, "n_tasks", "n_layers")]
    for model, g in metrics.groupby("model", sort=True):
        rev = choose_revision(g["revision"], revision)
        sel = g[g["revision"] == rev]
        if sel.empty:
            continue
        row = {"model": model, "revision": rev, "probes": ",".join(sorted(sel["probe"].unique()))}
        row.update(sel[mcols].mean(skipna=True).to_dict())
        rows.append(row)
    if not rows:
        raise StoreError(f"no model in {store_label(source)} has revision {revision!r}")
    df = pd.DataFrame(rows)
    df.insert(1, "registry_name", [registry_name(m, reg) for m in df["model"]])
    df.insert(2, "in_registry", df["registry_name"].notna())
    joined = df.merge(reg.drop(columns=["hf_name"]).rename(columns={"name": "registry_name"}),
                      on="registry_name", how="left")
    if not keep_unscored:
        joined = joined[joined["in_registry"]].reset_index(drop=True)
    joined.attrs = dict(reg.attrs, store=metrics.attrs.get("store", store_label(source)))
    return joined


def checkpoint_table(source, metric: str = "sink_mass") -> pd.DataFrame:
    """`metric` per model x revision (mean over probes), ordered along training, with the
    revision's stage and step and the model's QK-norm kind (NaN outside OlmPool)."""
    from attnscope.models.revisions import parse_revision

    metrics = metrics_table(source)
    if metric not in metrics.columns:
        raise StoreError(f"no task in {store_label(source)} has the metric {metric!r}; "
                         f"available: {_metric_columns(metrics) + (['needle_share'] if 'needle_share' in metrics else [])}")
    df = metrics.groupby(["model", "revision"], sort=False)[metric].mean().reset_index()
    reg = registry_table()
    df["registry_name"] = [registry_name(m, reg) for m in df["model"]]
    df = df.merge(reg[["name", "qk_norm"]].rename(columns={"name": "registry_name"}), on="registry_name",
                  how="left")
    parsed = [parse_revision(r) if r else None for r in df["revision"]]
    df["stage"] = [p.stage if p else "main" for p in parsed]
    df["step"] = [p.step if p else np.nan for p in parsed]
    df["order"] = [revision_order(r) for r in df["revision"]]
    df = df.sort_values(["model", "order"]).drop(columns="order").reset_index(drop=True)
    df.attrs = dict(metrics.attrs)
    return df


def needle_table(source) -> pd.DataFrame:
    """Needle share per model x revision x probe x length x depth (mean over layers, heads and
    the remaining grid): run_probe's `needle_share` (query set `final`, span `needle_value`), or
    `span_mass_needle` of analyze results measured with a `needle` span."""
    df = summary_table(source)
    keys = [*KEYS] + [c for c in ("length", "depth") if c in df.columns]
    needles = needle_rows(source)
    col = f"span_mass_{NEEDLE_SPAN}"
    parts = []
    if not needles.empty:
        parts.append(needles.groupby([k for k in keys if k in needles.columns], sort=True)["needle_share"]
                     .mean().reset_index())
    if col in df.columns and df[col].notna().any():
        parts.append(df.dropna(subset=[col]).groupby(keys, sort=True)[col].mean().rename("needle_share")
                     .reset_index())
    if not parts:
        raise StoreError(f"no task in {store_label(source)} measured a needle share; run a needle probe "
                         "(the niah_* probes)")
    out = pd.concat(parts, ignore_index=True)
    out["revision"] = out["revision"].map(lambda r: r if isinstance(r, str) else "")
    out.attrs = dict(df.attrs)
    return out


def require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AttnscopeError(f"{what} needs columns {missing}, which the table does not have "
                             f"(columns: {list(df.columns)})")
