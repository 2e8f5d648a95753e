"""Interactive (plotly) versions of the report's figures, with hover details, and an
attention-pattern viewer for short inputs. Same data and colours as figures.py."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from attnscope.errors import AttnscopeError, MemoryGuardError
from attnscope.report.figures import (QK_COLORS, QK_LABELS, _short, metric_label, qk_kind, score_label)

FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=12)
PATTERN_LIMIT = 400_000  # values embedded in one pattern viewer (a few MB of HTML)

__all__ = ["score_vs_count", "indicator_effects", "score_vs_metric", "score_vs_metrics", "score_vs_sink",
           "score_vs_sinks", "score_vs_needle", "layer_profiles", "head_heatmap", "needle_share", "checkpoints",
           "checkpoints_sink_rate", "query_profile", "pattern_viewer"]


def _go():
    try:
        import plotly.graph_objects as go
    except ImportError as exc:
        from attnscope.errors import FeatureUnavailableError

        raise FeatureUnavailableError("interactive figures need plotly: pip install 'attnscope[plot]'") from exc
    return go


def _layout(fig, title: str, x: str, y: str):
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="simple_white", font=FONT,
                      legend=dict(font=dict(size=10)), margin=dict(l=60, r=20, t=50, b=50))
    return fig


def _text_cols(df: pd.DataFrame, cols: Sequence[str]) -> np.ndarray:
    return df[[c for c in cols if c in df.columns]].astype(object).where(df.notna(), "").to_numpy()


def score_vs_count(table: pd.DataFrame, score: str = "helmet_32k"):
    """Score vs harmful-choice count; hover: model, QK norm, the four indicators, score."""
    go = _go()
    data = table.dropna(subset=[score, "harmful_count"])
    # the same deterministic jitter as the static figure, so models at one count stay apart
    offsets = data.groupby("harmful_count").cumcount()
    sizes = data.groupby("harmful_count")["harmful_count"].transform("size")
    data = data.assign(_x=data["harmful_count"] + (offsets - (sizes - 1) / 2) * 0.045)
    fig = go.Figure()
    for kind in QK_COLORS:
        d = data[data["qk_norm"].map(qk_kind) == kind]
        if d.empty:
            continue
        fig.add_trace(go.Scatter(
            x=d["_x"], y=d[score], mode="markers", name=QK_LABELS[kind],
            marker=dict(color=QK_COLORS[kind], size=9, line=dict(color="white", width=0.5)),
            customdata=_text_cols(d, ["model", "qk_norm", "has_gqa", "has_swa", "has_short_ctx", "harmful_count"]),
            hovertemplate="model %{customdata[0]}<br>QK norm %{customdata[1]}<br>GQA %{customdata[2]}, "
                          "SWA %{customdata[3]}, 4K ctx %{customdata[4]}<br>harmful choices %{customdata[5]}<br>"
                          f"{score} %{{y:.2f}}<extra></extra>"))
    if len(data) >= 3:
        from attnscope.report.stats import ols

        fit = ols(data, score, ["harmful_count"])
        b0, b1 = fit.coefficient("const")["estimate"], fit.coefficient("harmful_count")["estimate"]
        xs = np.array([data["harmful_count"].min(), data["harmful_count"].max()], float)
        fig.add_trace(go.Scatter(x=xs, y=b0 + b1 * xs, mode="lines", name=f"OLS (R² {fit.r2:.2f}, n {fit.n})",
                                 line=dict(color="#333333"), hoverinfo="skip"))
    fig = _layout(fig, f"{score_label(score)} vs harmful-choice count", "harmful architectural choices (count)",
                  score_label(score))
    fig.update_xaxes(dtick=1)
    return fig


def indicator_effects(table: pd.DataFrame, score: str = "helmet_32k"):
    """Coefficients of the four-indicator OLS with 95% CIs; hover: estimate, CI, p."""
    go = _go()
    from attnscope.report.stats import ols
    from attnscope.report.tables import INDICATORS

    fit = ols(table, score, list(INDICATORS))
    cs = [fit.coefficient(t) for t in INDICATORS]
    fig = go.Figure(go.Scatter(
        x=[c["estimate"] for c in cs], y=list(INDICATORS), mode="markers", marker=dict(color="#333333", size=9),
        error_x=dict(type="data", symmetric=False, array=[c["ci_high"] - c["estimate"] for c in cs],
                     arrayminus=[c["estimate"] - c["ci_low"] for c in cs]),
        customdata=[[c["ci_low"], c["ci_high"], c["p_value"]] for c in cs], name="",
        hovertemplate="%{y}<br>estimate %{x:.2f}<br>95% CI [%{customdata[0]:.2f}, %{customdata[1]:.2f}]"
                      "<br>p %{customdata[2]:.2g}<extra></extra>"))
    fig.add_vline(x=0, line_dash="dash", line_color="#888888")
    fig = _layout(fig, f"{score_label(score)}: effect of each harmful choice (R² {fit.r2:.2f}, n {fit.n})",
                  f"effect on {score_label(score)} (points, 95% CI)", "")
    fig.update_yaxes(autorange="reversed")
    return fig


def _qk_scatter(go, table: pd.DataFrame, score: str, metric: str, *, showlegend: bool = True):
    """One marker trace per QK-norm kind of `score` vs `metric`; hover: model, revision, QK norm."""
    data = table.dropna(subset=[score, metric])
    kinds = data["qk_norm"].map(qk_kind) if "qk_norm" in data else pd.Series("n/a", index=data.index)
    for kind in QK_COLORS:
        d = data[kinds == kind]
        if d.empty:
            continue
        yield go.Scatter(
            x=d[metric], y=d[score], mode="markers", name=QK_LABELS[kind], legendgroup=kind,
            showlegend=showlegend, marker=dict(color=QK_COLORS[kind], size=9),
            customdata=_text_cols(d, ["model", "revision", "qk_norm"]),
            hovertemplate="model %{customdata[0]}<br>revision %{customdata[1]}<br>QK norm %{customdata[2]}"
                          f"<br>{metric} %{{x:.4f}}<br>{score} %{{y:.2f}}<extra></extra>")


def score_vs_metric(table: pd.DataFrame, score: str = "helmet_32k", metric: str = "sink_mass"):
    """Score vs an attention metric; hover: model, revision, QK norm, metric, score."""
    go = _go()
    fig = go.Figure()
    for trace in _qk_scatter(go, table, score, metric):
        fig.add_trace(trace)
    return _layout(fig, f"{score_label(score)} vs {metric_label(metric)}", metric_label(metric), score_label(score))


def score_vs_metrics(table: pd.DataFrame, score: str = "helmet_32k",
                     metrics: Sequence[str] = ("sink_mass", "sink_rate")):
    """Score vs each metric in side-by-side panels (shared score axis); hover: model, revision,
    QK norm, metric, score."""
    go = _go()
    from plotly.subplots import make_subplots

    eps = table.attrs.get("sink_epsilon")
    fig = make_subplots(rows=1, cols=len(metrics), shared_yaxes=True,
                        subplot_titles=[metric_label(m).split(" (")[0] for m in metrics])
    for j, metric in enumerate(metrics, start=1):
        for trace in _qk_scatter(go, table, score, metric, showlegend=j == 1):
            fig.add_trace(trace, row=1, col=j)
        fig.update_xaxes(title_text=metric_label(metric, epsilon=eps), row=1, col=j)
    fig.update_yaxes(title_text=score_label(score), row=1, col=1)
    fig.update_layout(title=f"{score_label(score)} vs " + " and ".join(metric_label(m).split(" (")[0] for m in metrics),
                      template="simple_white", font=FONT, legend=dict(font=dict(size=10)))
    return fig


def score_vs_sink(table, score="helmet_32k"):
    return score_vs_metric(table, score, "sink_mass")


def score_vs_sinks(table, score="helmet_32k"):
    return score_vs_metrics(table, score, ("sink_mass", "sink_rate"))


def score_vs_needle(table, score="helmet_32k"):
    return score_vs_metric(table, score, "needle_share")


def _lines(df: pd.DataFrame, x: str, y: str, title: str, xlabel: str, ylabel: str, hover_extra=("revision",)):
    go = _go()
    fig = go.Figure()
    for model, d in df.groupby("model", sort=False):
        kind = qk_kind(d["qk_norm"].iloc[0]) if "qk_norm" in d else "n/a"
        d = d.sort_values(x) if x != "revision" else d
        fig.add_trace(go.Scatter(
            x=d[x], y=d[y], mode="lines+markers", name=_short(model), line=dict(color=QK_COLORS[kind]),
            customdata=_text_cols(d.assign(model=model), ["model", *hover_extra]),
            hovertemplate="model %{customdata[0]}<br>" +
                          "".join(f"{h} %{{customdata[{i + 1}]}}<br>" for i, h in enumerate(hover_extra)) +
                          f"{x} %{{x}}<br>{y} %{{y:.4f}}<extra></extra>"))
    return _layout(fig, title, xlabel, ylabel)


def layer_profiles(profiles: pd.DataFrame, score: str | None = None, metric: str = "sink_mass"):
    """Per-layer head-mean of `metric`, one line per model; hover: model, revision, layer, value."""
    return _lines(profiles, "layer", metric, f"{metric_label(metric).split(' (')[0]} by layer", "layer",
                  metric_label(metric))


def head_heatmap(da: xr.DataArray, score: str | None = None, metric: str | None = None, *,
                 title: str | None = None):
    """Layer x head heatmap; hover: model, revision, layer, head, value."""
    go = _go()
    metric = metric or da.attrs.get("metric") or str(da.name or "value")
    da = da.transpose("layer", "head")
    model, rev = str(da.attrs.get("model", "")), str(da.attrs.get("revision", "") or "")
    heads, layers = [int(h) for h in da["head"].values], [int(v) for v in da["layer"].values]
    custom = np.empty(da.shape + (2,), dtype=object)
    custom[..., 0], custom[..., 1] = model, rev or "-"
    fig = go.Figure(go.Heatmap(
        z=da.values, x=heads, y=layers, colorscale="Viridis", zmin=0,
        zmax=1 if metric.endswith("_mass") or metric == "needle_share" else None, colorbar=dict(title=metric),
        customdata=custom,
        hovertemplate="model %{customdata[0]}<br>revision %{customdata[1]}<br>layer %{y}, head %{x}<br>"
                      f"{metric} %{{z:.4f}}<extra></extra>"))
    t = title or f"{metric_label(metric).split(' (')[0]}: {_short(model)}" + (f" @ {rev}" if rev else "")
    fig = _layout(fig, t, "query head", "layer")
    fig.update_yaxes(autorange="reversed")
    return fig


def needle_share(needles: pd.DataFrame, score: str | None = None):
    """Needle share vs depth and vs length, one line per model (two panels)."""
    go = _go()
    from plotly.subplots import make_subplots

    cols = [c for c in ("depth", "length") if c in needles.columns and needles[c].notna().any()]
    fig = make_subplots(rows=1, cols=len(cols), subplot_titles=[f"needle share vs {c}" for c in cols],
                        shared_yaxes=True)
    for j, col in enumerate(cols, start=1):
        for model, d in needles.groupby("model", sort=False):
            kind = qk_kind(d["qk_norm"].iloc[0]) if "qk_norm" in d else "n/a"
            g = d.groupby(col)["needle_share"].mean()
            fig.add_trace(go.Scatter(
                x=g.index, y=g.values, mode="lines+markers", name=_short(model), legendgroup=model,
                showlegend=j == 1, line=dict(color=QK_COLORS[kind]),
                hovertemplate=f"model {model}<br>revision {d['revision'].iloc[0] or '-'}<br>{col} %{{x}}"
                              "<br>needle share %{y:.4f}<extra></extra>"), row=1, col=j)
        fig.update_xaxes(title_text="context length (tokens)" if col == "length" else "needle depth",
                         type="log" if col == "length" else "linear", row=1, col=j)
    fig.update_yaxes(title_text=metric_label("needle_share"), row=1, col=1)
    fig.update_layout(title="needle share vs depth and length", template="simple_white", font=FONT)
    return fig


def checkpoints(ckpts: pd.DataFrame, score: str | None = None, metric: str = "sink_mass"):
    """`metric` along training, one line per model; hover: model, revision, stage, value."""
    from attnscope.report.tables import revision_order

    order = sorted(dict.fromkeys(ckpts["revision"]), key=revision_order)
    df = ckpts.assign(revision=ckpts["revision"].replace("", "(none)"))
    fig = _lines(df, "revision", metric, f"{metric_label(metric).split(' (')[0]} across checkpoints",
                 "checkpoint (revision)", metric_label(metric, epsilon=ckpts.attrs.get("sink_epsilon")),
                 hover_extra=("stage",))
    fig.update_xaxes(categoryorder="array", categoryarray=[r or "(none)" for r in order])
    return fig


def checkpoints_sink_rate(ckpts: pd.DataFrame, score: str | None = None):
    return checkpoints(ckpts, score, metric="sink_rate")


def query_profile(profile: pd.DataFrame, score: str | None = None, *, title: str | None = None):
    """Query-resolved metrics against query position, one panel per metric, one line per layer
    group (a `tables.query_profile` table); hover: model, revision, layers, query bin, n, value."""
    go = _go()
    from plotly.subplots import make_subplots

    from attnscope.report.figures import _group_colours

    metrics = list(dict.fromkeys(profile["metric"]))
    groups = list(dict.fromkeys(profile["group"]))
    colours = ["rgba({:.0f},{:.0f},{:.0f},1)".format(*(255 * np.array(c[:3]))) for c in _group_colours(len(groups))]
    fig = make_subplots(rows=1, cols=len(metrics),
                        subplot_titles=[f"{metric_label(m).split(' (')[0]} vs query position" for m in metrics])
    for j, metric in enumerate(metrics, start=1):
        d = profile[profile["metric"] == metric]
        for colour, group in zip(colours, groups):
            g = d[d["group"] == group].sort_values("query_position")
            fig.add_trace(go.Scatter(
                x=g["query_position"], y=g["value"], mode="lines+markers", name=group, legendgroup=group,
                showlegend=j == 1, line=dict(color=colour),
                customdata=_text_cols(g, ["model", "revision", "layers", "query_start", "query_end", "n_queries"]),
                hovertemplate="model %{customdata[0]}<br>revision %{customdata[1]}<br>layers %{customdata[2]}"
                              "<br>queries [%{customdata[3]}, %{customdata[4]}) (%{customdata[5]})"
                              f"<br>{metric} %{{y:.4f}}<extra></extra>"), row=1, col=j)
        fig.update_xaxes(title_text="query position (tokens, bin centre)", row=1, col=j)
        fig.update_yaxes(title_text=metric_label(metric), row=1, col=j)
    first = profile.iloc[0]
    model, rev = str(first.get("model", "")), str(first.get("revision", "") or "")
    fig.update_layout(title=title or f"{_short(model)}" + (f" @ {rev}" if rev else "") + ": by query position",
                      template="simple_white", font=FONT, legend=dict(title="layers (head mean)", font=dict(size=10)))
    return fig


# ------------------------------------------------------------------------------ pattern viewer
def pattern_viewer(ds: xr.Dataset | xr.DataArray, tokens: Sequence[str], *, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, limit: int = PATTERN_LIMIT):
    """Attention maps of a short input with token labels on both axes; a slider picks the
    layer x head. `ds` is an `analyze(..., metrics=("pattern",))` result (dims layer, head, query,
    key) or its `pattern` DataArray; `tokens` are the input's token strings (one per key)."""
    go = _go()
    da = ds["pattern"] if isinstance(ds, xr.Dataset) else ds
    if "sequence" in da.dims:
        raise AttnscopeError("pattern_viewer shows one input; select a sequence first: ds.isel(sequence=i)")
    missing = [d for d in ("layer", "head", "query", "key") if d not in da.dims]
    if missing:
        raise AttnscopeError(f"pattern_viewer needs a pattern with dims layer, head, query, key; missing {missing} "
                             "(run analyze(..., metrics=('pattern',)))")
    if layers is not None:
        da = da.sel(layer=list(layers))
    if heads is not None:
        da = da.sel(head=list(heads))
    da = da.transpose("layer", "head", "query", "key")
    n_keys = da.sizes["key"]
    if len(tokens) != n_keys:
        raise AttnscopeError(f"{len(tokens)} token labels for {n_keys} key positions; pass one label per token")
    if da.size > limit:
        raise MemoryGuardError(f"the pattern has {da.size:,} values (> {limit:,}) to embed in one viewer; pass "
                               "layers=[...] and/or heads=[...] to show fewer maps, or a shorter input")
    qpos = [int(q) for q in (da["query"].values if "query" in da.coords else range(da.sizes["query"]))]
    # unique labels keep plotly from merging repeated tokens into one category
    klabels = [f"{i}: {_tok(t)}" for i, t in enumerate(tokens)]
    qlabels = [klabels[q] if 0 <= q < n_keys else str(q) for q in qpos]
    values = np.asarray(da.values, dtype=float)
    L, H = values.shape[:2]
    layer_ids, head_ids = [int(v) for v in da["layer"].values], [int(v) for v in da["head"].values]
    model = str(ds.attrs.get("model", "")) if isinstance(ds, xr.Dataset) else str(da.attrs.get("model", ""))

    def z(i, j):
        return np.where(np.isfinite(values[i, j]), values[i, j], None).tolist()

    fig = go.Figure(go.Heatmap(
        z=z(0, 0), x=klabels, y=qlabels, colorscale="Viridis", zmin=0, zmax=1, colorbar=dict(title="attention"),
        hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.4f}<extra></extra>"))
    steps = []
    for i in range(L):
        for j in range(H):
            steps.append(dict(method="update", label=f"L{layer_ids[i]}.H{head_ids[j]}",
                              args=[{"z": [z(i, j)]}, {"title": f"attention pattern {model} — layer "
                                                                f"{layer_ids[i]}, head {head_ids[j]}"}]))
    fig.update_layout(
        title=f"attention pattern {model} — layer {layer_ids[0]}, head {head_ids[0]}", template="simple_white",
        font=FONT, xaxis_title="key token", yaxis_title="query token",
        sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix="layer.head "), pad=dict(t=60))]
        if len(steps) > 1 else [],
        height=max(450, 14 * len(qlabels) + 200), width=max(550, 14 * n_keys + 250))
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=9))
    fig.update_xaxes(tickangle=-60, tickfont=dict(size=9))
    return fig


def _tok(t: Any) -> str:
    s = str(t).replace("Ġ", "·").replace("Ċ", "⏎").replace("\n", "⏎").replace(" ", "·")
    return s if len(s) <= 16 else s[:15] + "…"
