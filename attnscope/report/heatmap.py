"""Layer x head heatmap of one metric (matplotlib), used by the demo and the figures."""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from attnscope.store.files import atomic_output


def heatmap_figure(da: xr.DataArray, metric: str | None = None, *, title: str | None = None,
                   source: str = ""):
    """A matplotlib Figure: layer (rows) x query head (columns) of a 2-D DataArray."""
    from matplotlib.figure import Figure

    metric = metric or str(da.name or "value")
    values = da.transpose("layer", "head").values
    fig = Figure(figsize=(1.6 + 0.3 * max(values.shape[1], 4), 1.2 + 0.11 * max(values.shape[0], 8)))
    ax = fig.subplots()
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0,
                   vmax=1 if metric.endswith("_mass") or metric == "needle_share" else None,
                   interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    step = max(1, values.shape[0] // 16)
    ax.set_yticks(range(0, values.shape[0], step), [str(v) for v in da.layer.values[::step]], fontsize=6)
    hstep = max(1, values.shape[1] // 16)
    ax.set_xticks(range(0, values.shape[1], hstep), [str(v) for v in da["head"].values[::hstep]], fontsize=6)
    ax.set_title(title or f"{metric} — {da.attrs.get('model', '')}")
    fig.colorbar(im, ax=ax, label=metric)
    if source:
        fig.text(0.01, 0.003, source, fontsize=5, color="gray")
    fig.tight_layout()
    return fig


def metric_heatmap(ds: xr.Dataset, metric: str, path: str | Path, *, title: str | None = None,
                   source: str = "", overwrite: bool = False) -> Path:
    """Write a layer x head heatmap of `ds[metric]` to `path` (PNG or PDF by suffix); an existing
    file is replaced only with `overwrite`."""
    da = ds[metric].assign_attrs(model=ds.attrs.get("model", ""))
    fig = heatmap_figure(da, metric, title=title, source=source)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"Description": source} if path.suffix == ".png" else {"Subject": source}
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format=path.suffix[1:], dpi=150, metadata=meta)
    return path
