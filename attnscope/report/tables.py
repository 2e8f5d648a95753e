"""Tables for the report: the only module that reads a batch store.

Everything downstream (statistics, figures, the HTML page) works on the DataFrames and
DataArrays built here, so it can be tested from `attnscope.analyze` results without a store.

    summary_table(source)      one row per task x layer (head means), as `Store.summary()`
    metrics_table(source)      one row per model x revision x probe (means over layers and heads)
    layer_profiles(source)     one row per model x revision x probe x layer
    head_maps(source, metric)  {(model, revision, probe): DataArray(layer, head)}
    model_table(source, ...)   one row per model: chosen revision's metrics joined with the registry
    registry_table()           the OlmPool registry's scores and features, one row per model
    current_tasks(source)      the finished tasks read (newest measuring method per grid point)
    sink_rate_rows(source)     per task x layer: heads with alpha_0 > epsilon (Gu et al.'s sink rate)
    query_profile(ds, ...)     tidy per-layer-group values of `<metric>_by_query` vs query position
    query_profiles(source)     the same for a store's tasks recorded with query bins

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
from attnscope.metrics.sinks import SINK_EPSILON

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
           "choose_revision", "store_label", "checkpoint_table", "needle_table", "needle_rows",
           "current_tasks", "sink_rate_rows", "layer_groups", "query_profile", "query_profiles"]


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


def _method_version(method: Any) -> int:
    """'analyze-window/2' -> 2; a method without a version ('run_probe', none recorded) -> 0."""
    _, _, v = (method if isinstance(method, str) else "").rpartition("/")
    return int(v) if v.isdigit() else 0


def current_tasks(source) -> pd.DataFrame:
    """The finished tasks the report reads (rows of `Store.tasks()`).

    A store can hold a grid point measured more than once: by an older measuring method (its
    task stays in the store when `extract` measures the point again under the new method's key)
    or with and without query bins (the base metrics are the same). Per point (model, revision,
    probe content, dtype and the parameters other than `query_bins`) only the task of the newest
    method version is read, and of those the one with the most query bins, so no point counts
    twice and no point mixes two measurements. `attrs["superseded"]` lists the keys left out."""
    store = _store(source)
    return _cached(store, "current", lambda: _current_tasks(store))


def _current_tasks(store) -> pd.DataFrame:
    tasks = store.tasks()
    if tasks.empty:
        tasks.attrs["superseded"] = []
        return tasks
    done = tasks[tasks["status"] == "done"].copy()
    done["revision"] = done["revision"].map(lambda r: r if isinstance(r, str) else "")
    params = [c for c in done.columns if c not in _TASK_COLUMNS and c != "query_bins"]
    ident = done[["model", "revision", "probe_hash", "dtype", *params]].astype(str)
    done["_point"] = ident.apply(lambda r: "\x1f".join(r), axis=1)
    done["_version"] = done["method"].map(_method_version) if "method" in done else 0
    done["_bins"] = done["query_bins"].fillna(0) if "query_bins" in done else 0
    ordered = done.sort_values(["_version", "_bins", "key"], ascending=[False, False, True])
    keep = ordered.drop_duplicates("_point").sort_index()
    out = keep.drop(columns=["_point", "_version", "_bins"])
    out.attrs["superseded"] = sorted(set(done["key"]) - set(out["key"]))
    return out


def summary_table(source) -> pd.DataFrame:
    """One row per finished task x layer with head means (`Store.summary()`) for the tasks that
    `current_tasks` reads; a missing revision becomes '' so that group-bys keep the tasks that
    have none."""
    if isinstance(source, pd.DataFrame):
        df = source.copy()
    else:
        store = _store(source)
        df = _cached(store, "summary", store.summary)
        if not df.empty:
            current = current_tasks(store)
            df = df[df["key"].isin(set(current["key"]))].reset_index(drop=True)
            df.attrs["superseded"] = len(current.attrs.get("superseded", []))
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


def layer_profiles(source, *, sink_epsilon: float = SINK_EPSILON) -> pd.DataFrame:
    """Per model x revision x probe x layer: each metric's mean over tasks (grid points) and heads,
    and the layer's `sink_rate` (see `metrics_table`)."""
    df = summary_table(source)
    cols = _metric_columns(df)
    out = df.groupby([*KEYS, "layer"], sort=True, dropna=False)[cols].mean().reset_index()
    rates = _sink_rates(source, df, [*KEYS, "layer"], sink_epsilon)
    if rates is not None:
        out = out.merge(rates, on=[*KEYS, "layer"], how="left")
    out.attrs = dict(df.attrs, sink_epsilon=sink_epsilon)
    return out


def metrics_table(source, *, sink_epsilon: float = SINK_EPSILON) -> pd.DataFrame:
    """Per model x revision x probe: each metric's mean over layers, heads and the probe's grid
    points; `needle_share` (run_probe's, else span_mass_needle) for needle probes; `n_tasks`;
    `sink_rate`: Gu et al.'s sink rate at `sink_epsilon`, the share of (task, seed, layer, head)
    with alpha_0 = token0_importance > epsilon (NaN unless every task of the group has alpha_0)."""
    df = summary_table(source)
    cols = _metric_columns(df)
    g = df.groupby(list(KEYS), sort=True, dropna=False)
    out = g[cols].mean()
    out["n_tasks"] = g["key"].nunique() if "key" in df.columns else np.nan
    out["n_layers"] = g["layer"].nunique()
    out = out.reset_index()
    rates = _sink_rates(source, df, list(KEYS), sink_epsilon)
    if rates is not None:
        out = out.merge(rates, on=list(KEYS), how="left")
    if f"span_mass_{NEEDLE_SPAN}" in out.columns:
        out["needle_share"] = out[f"span_mass_{NEEDLE_SPAN}"]
    needles = needle_rows(source)
    if not needles.empty:
        share = needles.groupby(list(KEYS))["needle_share"].mean().rename("_needle").reset_index()
        out = out.merge(share, on=list(KEYS), how="left")
        out["needle_share"] = out["_needle"].combine_first(out["needle_share"]) if "needle_share" in out \
            else out["_needle"]
        out = out.drop(columns="_needle")
    out.attrs = dict(df.attrs, sink_epsilon=sink_epsilon)
    return out


# ------------------------------------------------------------------------------------ sink rate
def sink_rate_rows(source, epsilon: float = SINK_EPSILON) -> pd.DataFrame:
    """The sink rate of Gu et al. 2025 from stored alpha_0 (`token0_importance`, see
    attnscope/metrics/sinks.py): one row per finished task x layer with `sink_heads` (values of
    alpha_0 > epsilon over heads, seeds and the task's grid point), `n_heads` (values counted) and
    `token0_importance` (their mean). Empty when no task recorded alpha_0 (or for a summary
    DataFrame as source). Columns: key, model, revision, probe, the task's parameters, layer, ..."""
    if not 0.0 < epsilon < 1.0:
        raise AttnscopeError(f"the sink-rate epsilon must be in (0, 1), not {epsilon!r}")
    if isinstance(source, pd.DataFrame):
        return pd.DataFrame()
    store = _store(source)
    return _cached(store, f"sink_rate:{float(epsilon)!r}", lambda: _sink_rate_rows(store, epsilon))


def _sink_rate_rows(store, epsilon: float) -> pd.DataFrame:
    rows = []
    for row, params, ds in _task_datasets(store):
        if "token0_importance" not in ds:
            continue
        alpha = ds["token0_importance"]
        others = [d for d in alpha.dims if d != "layer"]
        hits = (alpha > epsilon).sum(others)
        base = {"key": row["key"], "model": row["model"], "revision": row["revision"], "probe": row["probe"],
                **params}
        n = int(np.prod([alpha.sizes[d] for d in others]))
        rows += [dict(base, layer=int(layer), sink_heads=int(h), n_heads=n, token0_importance=float(m))
                 for layer, h, m in zip(alpha["layer"].values, hits.values, alpha.mean(others).values)]
    return pd.DataFrame(rows)


def _sink_rates(source, summary: pd.DataFrame, by: list[str], epsilon: float) -> pd.DataFrame | None:
    """`sink_rate` per `by` group: heads above epsilon / heads counted, pooled over the group's
    tasks, layers, seeds and heads; NaN for a group in which some task has no alpha_0 (measured
    before natural-text tasks recorded it), so a rate never stands for part of its tasks."""
    rows = sink_rate_rows(source, epsilon)
    if rows.empty:
        return None
    rows = rows.assign(revision=rows["revision"].map(lambda r: r if isinstance(r, str) else ""))
    g = rows.groupby(by, sort=True, dropna=False)
    out = (g["sink_heads"].sum() / g["n_heads"].sum()).rename("sink_rate").to_frame()
    with_alpha = g["key"].nunique()
    all_tasks = summary.groupby(by, sort=True, dropna=False)["key"].nunique()
    complete = with_alpha.reindex(out.index) == all_tasks.reindex(out.index)
    out.loc[~complete.to_numpy(), "sink_rate"] = np.nan
    return out.reset_index()


def _task_datasets(store, *, revision: str | None = None, probe: str | None = None):
    """(task row, params, Dataset) for every task `current_tasks` reads, revision '' for none."""
    tasks = current_tasks(store)
    if tasks.empty:
        return
    if revision is not None:
        tasks = tasks[tasks["revision"] == revision]
    if probe is not None:
        tasks = tasks[tasks["probe"] == probe]
    param_cols = [c for c in tasks.columns if c not in _TASK_COLUMNS]
    for _, row in tasks.iterrows():
        params = {c: row[c] for c in param_cols if not _missing(row[c])}
        yield row, params, store.task(row["key"])


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
                keep_unscored: bool = True, sink_epsilon: float = SINK_EPSILON) -> pd.DataFrame:
    """One row per model: the chosen revision's metrics (mean over the probes it ran, or only
    `probe`) joined with the registry's scores and features.

    Store models are mapped to OlmPool short names (`registry_name`); models outside OlmPool keep
    NaN scores and features (`in_registry` False). With `source=None` the result is the registry
    alone (26 rows). Columns: model, registry_name, in_registry, revision, probes, the metrics
    (sink_mass, token0_mass, entropy, mean_distance, needle_share, sink_rate at `sink_epsilon`
    (see `metrics_table`; from the probes that record alpha_0: natural text), ...), the features
    and scores."""
    reg = registry_table()
    if source is None:
        out = reg.rename(columns={"name": "registry_name"})
        out.insert(0, "model", out["registry_name"])
        out.insert(2, "in_registry", True)
        out.insert(3, "revision", "")
        out.attrs = dict(reg.attrs, store=store_label(None))
        return out
    metrics = metrics_table(source, sink_epsilon=sink_epsilon)
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
    joined.attrs = dict(reg.attrs, store=metrics.attrs.get("store", store_label(source)), sink_epsilon=sink_epsilon,
                        superseded=metrics.attrs.get("superseded", 0))
    return joined


def checkpoint_table(source, metric: str = "sink_mass", *, sink_epsilon: float = SINK_EPSILON) -> pd.DataFrame:
    """`metric` per model x revision (mean over probes), ordered along training, with the
    revision's stage and step and the model's QK-norm kind (NaN outside OlmPool)."""
    from attnscope.models.revisions import parse_revision

    metrics = metrics_table(source, sink_epsilon=sink_epsilon)
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


# ------------------------------------------------------------------------ query-resolved profiles
QUERY_METRICS = ("sink_mass", "entropy")
_NOT_PER_HEAD = ("bin", "distance_bin", "query", "key")


def layer_groups(layers: Iterable[int], groups: int | str | dict | None = 3) -> list[tuple[str, list[int]]]:
    """[(label, layers)]: `groups` = N splits the layers in order into N near-equal groups (3:
    early / middle / late thirds); "layer" or None: every layer alone; a dict {label: [layers]}."""
    layers = sorted(int(v) for v in layers)
    if groups is None or groups == "layer":
        return [(f"L{v}", [v]) for v in layers]
    if isinstance(groups, dict):
        out = [(str(k), sorted(int(v) for v in ls)) for k, ls in groups.items()]
        unknown = sorted({v for _, ls in out for v in ls} - set(layers))
        if unknown or any(not ls for _, ls in out):
            raise AttnscopeError(f"layer groups {groups} name layers {unknown} that the result does not have "
                                 f"(layers: {layers})" if unknown else f"layer groups {groups} have an empty group")
        return out
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or not 1 <= groups <= len(layers):
        raise AttnscopeError(f"groups must be a number of layer groups between 1 and the {len(layers)} layers, "
                             f"'layer', or a dict {{label: [layers]}}; not {groups!r}")
    parts = [[int(v) for v in p] for p in np.array_split(np.array(layers), int(groups))]
    names = ("early", "middle", "late") if groups == 3 else ("",) * int(groups)
    return [(f"{name} ({_layer_span(p)})".lstrip() if name else _layer_span(p), p) for name, p in zip(names, parts)]


def _layer_span(layers: list[int]) -> str:
    if len(layers) == 1:
        return f"L{layers[0]}"
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"L{layers[0]}–{layers[-1]}" + ("" if contiguous else f", {len(layers)} layers")


def query_bin_edges(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, counts) of the query bins of an analyze result with query_bins: bin b holds
    the selected queries i with starts[b] <= i < ends[b]; counts = how many. A padded batch is
    accepted when all its rows have the same bins (select one with ds.isel(sequence=i) if not)."""
    import json

    if "query_bin" not in ds.dims:
        raise AttnscopeError(_NO_BINS)
    starts = ds["query_bin_start"] if "query_bin_start" in ds else ds["query_bin"]
    counts = ds["query_count"] if "query_count" in ds else None
    qpos = json.loads(ds.attrs["query_positions"]) if "query_positions" in ds.attrs else None
    if qpos and isinstance(qpos[0], list):  # a padded batch: one list per row
        if "sequence" in ds.dims and ds.sizes["sequence"] != len(qpos):  # a row was selected
            qpos = None
        else:
            ends = {max(q) + 1 for q in qpos}
            qpos = qpos[0] if len(ends) == 1 else None
    other = [d for d in starts.dims if d != "query_bin"]
    s = starts.transpose(*other, "query_bin").values.reshape(-1, starts.sizes["query_bin"])
    if (s != s[0]).any():
        raise AttnscopeError("the rows of this batch have different query bins (their lengths differ); "
                             "select one text first: ds.isel(sequence=i)")
    starts = s[0].astype(int)
    if counts is not None:
        c = counts.transpose(*[d for d in counts.dims if d != "query_bin"], "query_bin").values
        counts = c.reshape(-1, c.shape[-1])[0].astype(int)
    else:
        counts = np.full(len(starts), -1)
    if qpos:
        last = int(max(qpos)) + 1
    elif (counts[:-1] == np.diff(starts)).all() and counts[-1] > 0:  # every position selected
        last = int(starts[-1] + counts[-1])
    else:  # no record of the last query: the last bin as wide as the one before
        last = int(starts[-1] + (starts[-1] - starts[-2] if len(starts) > 1 else 1))
    return starts, np.append(starts[1:], last), counts


_NO_BINS = ("this result has no query-resolved metrics (<metric>_by_query); re-run analyze with "
            "query_bins=N (CLI --query-bins N), or extract with --query-bins N")


def query_profile(ds: xr.Dataset, metrics: str | Iterable[str] = QUERY_METRICS, *,
                  groups: int | str | dict | None = 3, span: str | None = None) -> pd.DataFrame:
    """Query-resolved metrics as a tidy table: for each metric and layer group, the mean over the
    group's layers and heads (and any sequence, seed or grid dim) of `<metric>_by_query`, per
    query bin. Columns: model, revision, metric, group, layers, query_bin, query_start, query_end
    (the bin is [start, end)), query_position (bin centre), n_queries, value (NaN: empty bin)."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    have = sorted(v[: -len("_by_query")] for v in ds.data_vars if str(v).endswith("_by_query"))
    if not have:
        raise AttnscopeError(_NO_BINS)
    missing = [m for m in metrics if m not in have]
    if missing:
        raise AttnscopeError(f"this result has no {missing[0]}_by_query; its query-resolved metrics are {have} "
                             f"(re-run analyze with query_bins=N and metrics=(..., {missing[0]!r}))")
    starts, ends, counts = query_bin_edges(ds)
    grouping = layer_groups(ds["layer"].values, groups)
    rows = []
    for m in metrics:
        da = ds[f"{m}_by_query"]
        if "span" in da.dims:
            spans = [str(v) for v in da["span"].values]
            if span is None and len(spans) > 1:
                raise AttnscopeError(f"{m} has spans {spans}; pass span=NAME")
            da = da.sel(span=span or spans[0])
        if any(d in da.dims for d in _NOT_PER_HEAD):
            raise AttnscopeError(f"{m} is a profile, not one value per layer x head (dims {da.dims}); "
                                 "choose a scalar metric such as sink_mass or entropy")
        da = da.mean([d for d in da.dims if d not in ("layer", "query_bin")])
        for label, layers in grouping:
            values = da.sel(layer=layers).mean("layer").transpose("query_bin").values
            rows += [{"metric": m, "group": label, "layers": ",".join(map(str, layers)), "query_bin": b,
                      "query_start": int(starts[b]), "query_end": int(ends[b]),
                      "query_position": (starts[b] + ends[b] - 1) / 2, "n_queries": int(counts[b]),
                      "value": float(values[b])} for b in range(len(starts))]
    df = pd.DataFrame(rows)
    df.insert(0, "model", str(ds.attrs.get("model", "")))
    df.insert(1, "revision", str(ds.attrs.get("revision", "") or ""))
    df.attrs = {"model": df["model"].iloc[0], "revision": df["revision"].iloc[0],
                "n_tokens": str(ds.attrs.get("n_tokens", ""))}
    return df


def query_profiles(source, metrics: Iterable[str] = QUERY_METRICS, *, groups: int | str | dict | None = 3,
                   revision: str = "final") -> list[tuple[tuple[str, str, str, int], pd.DataFrame]]:
    """`query_profile` of a store's tasks recorded with query bins: per model (its report
    revision, `choose_revision`) and probe, at the longest length measured, averaged over the
    probe's depths and seeds. [((model, revision, probe, length), DataFrame)]."""
    store = _store(source)
    tasks = current_tasks(store)
    if "query_bins" not in tasks.columns or tasks["query_bins"].isna().all():
        raise StoreError(f"no task in {store_label(source)} recorded query bins; extract with --query-bins N")
    tasks = tasks[tasks["query_bins"].notna()]
    out = []
    for model, g in tasks.groupby("model", sort=True):
        rev = choose_revision(g["revision"], revision)
        for probe, p in g[g["revision"] == rev].groupby("probe", sort=True):
            length = int(p["length"].max())
            parts = []
            for k in p.loc[p["length"] == length, "key"]:
                ds = store.task(k)
                ds = ds.squeeze([d for d in ("length", "depth") if d in ds.dims], drop=True)
                parts.append(ds.drop_vars([c for c in ds.coords if c not in ds.dims]))
            try:
                ds = xr.concat(parts, dim="grid", join="exact", combine_attrs="override") if len(parts) > 1 \
                    else parts[0]
            except ValueError as exc:
                raise StoreError(f"{model} {probe} at length {length}: tasks with different query bins "
                                 f"({exc})") from exc
            df = query_profile(ds, metrics, groups=groups)
            df = df.assign(model=model, revision=rev, probe=probe, length=length)
            df.attrs.update(model=model, revision=rev, probe=probe, length=length, n_tasks=len(parts))
            out.append(((model, rev, probe, length), df))
    return out
