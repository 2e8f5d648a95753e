"""Layer x head heatmap of one metric (matplotlib), used by the demo and the figures."""

from __future__ import annotations

from pathlib import Path

import xarray as xr


def metric_heatmap(ds: xr.Dataset, metric: str, path: str | Path, *, title: str | None = None,
                   source: str = "") -> Path:
    """Write a layer x head heatmap of `ds[metric]` to `path` (PNG or PDF by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = ds[metric].transpose("layer", "head").values
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * values.shape[1], 1.0 + 0.22 * values.shape[0]))
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0,
                   vmax=1 if metric.endswith("_mass") else None, interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(values.shape[0]), [str(v) for v in ds.layer.values], fontsize=6)
    ax.set_xticks(range(values.shape[1]), [str(v) for v in ds["head"].values], fontsize=7)
    ax.set_title(title or f"{metric} — {ds.attrs.get('model', '')}", fontsize=9)
    fig.colorbar(im, ax=ax, label=metric)
    if source:
        fig.text(0.01, 0.003, source, fontsize=5, color="gray")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, metadata={"Description": source} if path.suffix == ".png" else None)
    plt.close(fig)
    return path
