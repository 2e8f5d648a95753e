"""`ds.attnscope`: plots straight from an analyze() result (an xarray Dataset accessor).

    ds = attnscope.analyze(lm, text)
    ds.attnscope.sink_heatmap()                  # plotly: layer x head, hover model/layer/head/value
    ds.attnscope.heatmap("entropy", static=True) # matplotlib Figure instead
    ds.attnscope.layer_profile("sink_mass")
    ds.attnscope.pattern_viewer(tokens)          # needs analyze(..., metrics=("pattern",))
    ds.attnscope.query_profile_data()            # needs analyze(..., query_bins=N): tidy DataFrame
    ds.attnscope.query_profile(static=True)      # sink mass and entropy vs query position per layer group

Registered when attnscope is imported; plotly/matplotlib are imported only when a method runs.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import xarray as xr

from attnscope.errors import AttnscopeError


@xr.register_dataset_accessor("attnscope")
class AttnscopeAccessor:
    """Plot methods of attnscope results."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def _map(self, metric: str, span: str | None) -> xr.DataArray:
        ds = self._ds
        if metric not in ds:
            raise AttnscopeError(f"this result has no {metric!r}; it has {list(ds.data_vars)} "
                                 "(choose another metric or re-run analyze with it)")
        da = ds[metric]
        if "span" in da.dims:
            spans = [str(s) for s in da["span"].values]
            if span is None and len(spans) > 1:
                raise AttnscopeError(f"{metric} has spans {spans}; pass span=NAME")
            da = da.sel(span=span or spans[0])
        extra = [d for d in da.dims if d not in ("layer", "head")]
        if any(d in extra for d in ("query", "key", "bin", "distance_bin")):
            raise AttnscopeError(f"{metric} is not one value per layer x head (dims {da.dims})")
        da = da.mean(extra) if extra else da  # mean over sequences / grid points
        return da.assign_attrs(model=ds.attrs.get("model", ""), revision=ds.attrs.get("revision", "") or "",
                               metric=metric)

    def heatmap(self, metric: str = "sink_mass", *, span: str | None = None, static: bool = False,
                title: str | None = None):
        """Layer x head heatmap of `metric` (mean over any other dims): plotly, or matplotlib if static."""
        da = self._map(metric, span)
        if static:
            from attnscope.report.figures import fig_head_heatmap

            return fig_head_heatmap(da, metric, title=title)
        from attnscope.report.interactive import head_heatmap

        return head_heatmap(da, metric=metric, title=title)

    def sink_heatmap(self, *, static: bool = False, title: str | None = None):
        """Layer x head heatmap of the attention mass on the first `sink_tokens` tokens."""
        return self.heatmap("sink_mass", static=static, title=title)

    def layer_profile(self, metric: str = "sink_mass", *, span: str | None = None, static: bool = False):
        """Head mean of `metric` per layer (one line)."""
        da = self._map(metric, span)
        df = pd.DataFrame({"model": da.attrs["model"] or "model", "revision": da.attrs["revision"] or "-",
                           "layer": da["layer"].values, metric: da.mean("head").values})
        if static:
            from attnscope.report.figures import fig_layer_profiles

            return fig_layer_profiles(df, metric)
        from attnscope.report.interactive import layer_profiles

        return layer_profiles(df, metric=metric)

    def query_profile_data(self, metrics: str | Sequence[str] = ("sink_mass", "entropy"), *,
                           groups: int | str | dict | None = 3, span: str | None = None) -> pd.DataFrame:
        """Query-resolved metrics as a tidy DataFrame (needs analyze(..., query_bins=N)): per metric,
        layer group (groups=3: early / middle / late thirds; "layer": each layer; or {label:
        [layers]}) and query bin, the head mean. Columns: model, revision, metric, group, layers,
        query_bin, query_start, query_end, query_position (bin centre), n_queries, value."""
        from attnscope.report.tables import query_profile

        return query_profile(self._ds, metrics, groups=groups, span=span)

    def query_profile(self, metrics: str | Sequence[str] = ("sink_mass", "entropy"), *,
                      groups: int | str | dict | None = 3, span: str | None = None, static: bool = False,
                      title: str | None = None):
        """`metrics` against query position, one panel per metric, one line per layer group:
        plotly, or matplotlib if static (needs analyze(..., query_bins=N))."""
        df = self.query_profile_data(metrics, groups=groups, span=span)
        if static:
            from attnscope.report.figures import fig_query_profile

            return fig_query_profile(df, title=title)
        from attnscope.report.interactive import query_profile

        return query_profile(df, title=title)

    def pattern_viewer(self, tokens: Sequence[str], *, layers: Sequence[int] | None = None,
                       heads: Sequence[int] | None = None):
        """Attention maps with token labels on both axes (needs the `pattern` metric)."""
        from attnscope.report.interactive import pattern_viewer

        if "pattern" not in self._ds:
            raise AttnscopeError("this result has no attention pattern; run "
                                 "attnscope.analyze(..., metrics=('pattern',)) on a short input")
        return pattern_viewer(self._ds, tokens, layers=layers, heads=heads)
