"""Figures of the loss-gap analysis: matplotlib (PNG + PDF) and plotly (HTML)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from attnscope.store.files import atomic_output

__all__ = ["plot_category_gaps", "plot_gap_vs_repeat"]


def _save_mpl(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        with atomic_output(p, overwrite=True) as tmp:  # the study's folder was checked up front
            fig.savefig(tmp, format=p.suffix[1:], dpi=150, bbox_inches="tight")
    return paths


def _errors(df: pd.DataFrame, mean: str) -> tuple[np.ndarray, np.ndarray]:
    return (df[mean] - df["ci_low"]).to_numpy(), (df["ci_high"] - df[mean]).to_numpy()


def plot_category_gaps(means: pd.DataFrame, stem, *, title: str = "Mean loss gap by token category",
                       label_a: str = "A", label_b: str = "B") -> list[Path]:
    """Horizontal bars of mean gap per category with CI whiskers (``category_means`` output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    df = means.dropna(subset=["mean"]).iloc[::-1]
    lo, hi = _errors(df, "mean")
    xlabel = f"gap = loss({label_a}) − loss({label_b}), nats (> 0: {label_b} better)"
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(df) + 1.5))
    ax.barh(df["category"], df["mean"], xerr=[lo, hi], color="#4c72b0", capsize=2)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    paths = _save_mpl(fig, stem)
    plt.close(fig)

    pfig = go.Figure(go.Bar(
        x=df["mean"], y=df["category"], orientation="h",
        error_x=dict(type="data", symmetric=False, array=hi, arrayminus=lo),
        customdata=np.stack([df["n_tokens"], df["n_docs"]], axis=1),
        hovertemplate="%{y}: %{x:.4f}<br>tokens %{customdata[0]}, docs %{customdata[1]}<extra></extra>",
    ))
    pfig.update_layout(title=title, xaxis_title=xlabel, height=25 * len(df) + 150)
    html = stem.with_suffix(".html")
    with atomic_output(html, overwrite=True) as tmp:
        pfig.write_html(tmp, include_plotlyjs="directory")
    return paths + [html]


def plot_gap_vs_repeat(by_repeat: pd.DataFrame, stem, *, title: str = "Loss gap vs repeated n-gram length",
                       label_a: str = "A", label_b: str = "B", far: int | None = None) -> list[Path]:
    """Mean gap per repeat-length bin with CI whiskers (``gap_by_repeat`` output).

    One series per value of its ``distance`` column (``near``/``far`` when the
    table was split at an attention window ``far``, else a single ``all``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    df = by_repeat.dropna(subset=["mean"])
    if "distance" not in df:
        df = df.assign(distance="all")
    order = [b for b in by_repeat["bin"].drop_duplicates()]
    pos = {b: k for k, b in enumerate(order)}
    names = {"all": "all tokens",
             "near": "earlier copy within the window" + (f" (≤ {far} tokens back)" if far else "")
                     + "; bin 0: no copy",
             "far": "earlier copy beyond the window" + (f" (> {far} tokens back)" if far else "")}
    ylabel = f"mean gap loss({label_a}) − loss({label_b}), nats"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    pfig = go.Figure()
    groups = list(df.groupby("distance", sort=False))
    for k, (dist, sub) in enumerate(groups):
        x = np.array([pos[b] for b in sub["bin"]], dtype=float) + (k - (len(groups) - 1) / 2) * 0.12
        lo, hi = _errors(sub, "mean")
        ax.errorbar(x, sub["mean"], yerr=[lo, hi], marker="o", capsize=3, label=names.get(dist, dist))
        pfig.add_trace(go.Scatter(
            x=sub["bin"], y=sub["mean"], mode="lines+markers", name=names.get(dist, dist),
            error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo),
            customdata=sub[["n_tokens"]].to_numpy(),
            hovertemplate="repeat %{x}: %{y:.4f}<br>tokens %{customdata[0]}<extra></extra>",
        ))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(order)), order)
    ax.set_xlabel("repeat length (tokens of the longest earlier verbatim run ending here)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    paths = _save_mpl(fig, stem)
    plt.close(fig)

    pfig.update_layout(title=title, xaxis_title="repeat length (tokens)", yaxis_title=ylabel,
                       xaxis=dict(categoryorder="array", categoryarray=order))
    html = stem.with_suffix(".html")
    with atomic_output(html, overwrite=True) as tmp:
        pfig.write_html(tmp, include_plotlyjs="directory")
    return paths + [html]
