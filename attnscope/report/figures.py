"""The report's figures: data from tables.py, drawn with matplotlib (PDF + PNG) or plotly.

Every figure is registered in FIGURES under a short name; `figures/fig_<name>.py` and
`attnscope figures` call `make_figure` / `make_all`, which write `<stem>.pdf`, `<stem>.png` and
`<stem>.json` (a sidecar naming the store, the command, the data plotted) per figure. The
drawing functions return matplotlib Figure objects so tests can inspect axes and titles.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from attnscope.errors import AttnscopeError, CorruptDataError, StoreError
from attnscope.report import tables
from attnscope.report.heatmap import heatmap_figure
from attnscope.store.files import atomic_output, check_output_dir

# Okabe-Ito colours (colour-blind safe), one per QK-norm kind, used by every figure and view
QK_COLORS = {"none": "#0072B2", "layerwise": "#E69F00", "headwise": "#009E73", "n/a": "#7F7F7F"}
QK_MARKERS = {"none": "o", "layerwise": "s", "headwise": "^", "n/a": "X"}
QK_LABELS = {"none": "no QK norm", "layerwise": "layerwise QK norm", "headwise": "headwise QK norm",
             "n/a": "not in OlmPool"}
STYLE = {
    "font.family": "DejaVu Sans", "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
    "grid.linewidth": 0.5, "lines.linewidth": 1.2, "lines.markersize": 4.5, "figure.dpi": 100,
    "savefig.dpi": 200, "savefig.bbox": "tight", "pdf.fonttype": 42, "ps.fonttype": 42,
    "svg.fonttype": "none",
}
WIDTH = 3.4  # inches: one column of a two-column paper

SCORE_LABELS = {"longppl": "LongPPL (lower is better)"}
METRIC_LABELS = {"sink_mass": "sink mass (attention on the first tokens)",
                 "token0_mass": "attention on token 0",
                 "sink_rate": "sink rate (heads with α₀ > ε)",
                 "token0_importance": "α₀ (mean attention on token 0, all queries)",
                 "needle_share": "needle share of attention",
                 "entropy": "attention entropy (nats)",
                 "mean_distance": "mean attention distance (tokens)"}

__all__ = ["QK_COLORS", "STYLE", "FIGURES", "style", "save_figure", "score_label", "metric_label",
           "fig_score_vs_count", "fig_score_vs_metric", "fig_score_vs_metrics", "fig_query_profile",
           "fig_layer_profiles", "fig_head_heatmap",
           "fig_needle_share", "fig_checkpoints", "fig_indicator_effects", "figure_data", "make_figure", "make_all"]


def score_label(score: str) -> str:
    if score in SCORE_LABELS:
        return SCORE_LABELS[score]
    m = re.fullmatch(r"(helmet|ruler)_(\d+)k", score)
    return f"{m.group(1).upper()} {m.group(2)}K score" if m else score


def metric_label(metric: str, epsilon: float | None = None) -> str:
    if metric == "sink_rate":
        from attnscope.metrics.sinks import SINK_EPSILON

        return METRIC_LABELS[metric].replace("ε", f"{SINK_EPSILON if epsilon is None else epsilon:g}")
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    if metric.startswith("span_mass_"):
        return f"attention on span {metric.removeprefix('span_mass_')!r}"
    return metric.replace("_", " ")


def qk_kind(v: Any) -> str:
    return v if isinstance(v, str) and v in QK_COLORS else "n/a"


@contextmanager
def style():
    """Matplotlib rc settings of every report figure (fonts, sizes, embedded TrueType in PDFs)."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield _Factory


class _Factory:
    """Figures outside pyplot: no global figure registry, no backend switch, nothing to close,
    and notebooks still display them (IPython's formatters handle any Figure)."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, squeeze: bool = True, **kw):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze, **kw)


def _pdf_png_metadata(title: str, description: str, store: str, command: str) -> tuple[dict, dict]:
    from attnscope import __version__

    png = {"Title": title, "Description": description, "Source": f"store: {store}", "Comment": command,
           "Software": f"attnscope {__version__}"}
    pdf = {"Title": title, "Subject": description, "Keywords": f"store: {store}", "Creator": command,
           "Author": f"attnscope {__version__}"}
    return png, pdf


def save_figure(fig, out: str | Path, stem: str, *, store: str, command: str,
                data: Any = None, extra: dict | None = None) -> list[Path]:
    """Write `stem`.pdf, `stem`.png (metadata naming store and command) and the sidecar `stem`.json."""
    from attnscope import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = fig._suptitle.get_text() if fig._suptitle else (fig.axes[0].get_title() if fig.axes else stem)
    description = f"made by: {command}; store: {store}"
    png_meta, pdf_meta = _pdf_png_metadata(title, description, store, command)
    paths = [out / f"{stem}.pdf", out / f"{stem}.png"]
    with style():
        for path, meta in zip(paths, (pdf_meta, png_meta)):
            with atomic_output(path, overwrite=True) as tmp:  # the folder was checked up front
                fig.savefig(tmp, format=path.suffix[1:], metadata=meta)
    side = {"figure": stem, "title": title, "store": store, "command": command,
            "files": [p.name for p in paths], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "attnscope_version": __version__, **(extra or {})}
    if data is not None:
        side["data"] = _records(data)
    sidecar = out / f"{stem}.json"
    with atomic_output(sidecar, overwrite=True) as tmp:
        tmp.write_text(json.dumps(side, indent=1, default=_json_default), encoding="utf-8")
    return [*paths, sidecar]


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def _records(data: Any) -> Any:
    if isinstance(data, pd.DataFrame):
        return json.loads(data.to_json(orient="records"))
    if isinstance(data, xr.DataArray):
        return {"dims": list(data.dims), "coords": {d: data[d].values.tolist() for d in data.dims},
                "values": np.where(np.isfinite(data.values), data.values, None).tolist()}
    return data


def _qk_legend(ax, kinds, loc="best", **kw) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=QK_COLORS[k], marker=QK_MARKERS[k], linestyle="", label=QK_LABELS[k])
               for k in QK_COLORS if k in set(kinds)]
    if handles:
        ax.legend(handles=handles, loc=loc, **kw)


def _source_note(fig, store: str) -> None:
    fig.text(0.0, -0.01, f"data: {store}", fontsize=5, color="0.45", ha="left", va="top")


# ------------------------------------------------------------------------------ static drawings
def fig_score_vs_count(table: pd.DataFrame, score: str = "helmet_32k", *, store: str = ""):
    """Score vs harmful-choice count, one point per model (jittered), with the OLS line and its
    95% confidence band; colour/marker = QK-norm kind."""
    import statsmodels.api as sm

    tables.require_columns(table, [score, "harmful_count", "qk_norm"], "score vs harmful count")
    data = table.dropna(subset=[score, "harmful_count"])
    if len(data) < 3:
        raise StoreError(f"fewer than 3 models have {score}; nothing to fit")
    from attnscope.report.stats import ols

    fit = ols(data, score, ["harmful_count"], label="model" if "model" in data else "registry_name")
    with style() as mpl:
        fig, ax = mpl.subplots(figsize=(WIDTH, 2.6))
        x = data["harmful_count"].to_numpy(float)
        # deterministic jitter so overlapping models at the same count stay visible
        offsets = data.groupby("harmful_count").cumcount().to_numpy() if len(data) else np.array([])
        sizes = data.groupby("harmful_count")["harmful_count"].transform("size").to_numpy()
        jitter = (offsets - (sizes - 1) / 2) * 0.045
        for kind in QK_COLORS:
            sel = data["qk_norm"].map(qk_kind).to_numpy() == kind
            if sel.any():
                ax.scatter(x[sel] + jitter[sel], data[score].to_numpy(float)[sel], c=QK_COLORS[kind],
                           marker=QK_MARKERS[kind], label=QK_LABELS[kind], zorder=3, edgecolor="white",
                           linewidth=0.4)
        grid = np.linspace(x.min() - 0.2, x.max() + 0.2, 50)
        res = sm.OLS(data[score].to_numpy(float), sm.add_constant(x)).fit()
        pred = res.get_prediction(sm.add_constant(grid)).summary_frame(alpha=0.05)
        ax.plot(grid, pred["mean"], color="0.2", zorder=2)
        ax.fill_between(grid, pred["mean_ci_lower"], pred["mean_ci_upper"], color="0.6", alpha=0.25, lw=0,
                        zorder=1)
        b = fit.coefficient("harmful_count")
        ax.text(0.98, 0.97, f"slope {b['estimate']:.2f} [{b['ci_low']:.2f}, {b['ci_high']:.2f}]\n"
                            f"R² {fit.r2:.2f}, LOO R² {fit.loo_r2:.2f}, n = {fit.n}",
                transform=ax.transAxes, ha="right", va="top", fontsize=6.5)
        ax.set_xticks(sorted(set(int(v) for v in x)))
        ax.set_xlabel("harmful architectural choices (count)")
        ax.set_ylabel(score_label(score))
        ax.set_title(f"{score_label(score)} vs harmful-choice count")
        _qk_legend(ax, data["qk_norm"].map(qk_kind), loc="best")
        if store:
            _source_note(fig, store)
        fig.tight_layout()
    return fig


def fig_score_vs_metric(table: pd.DataFrame, score: str = "helmet_32k", metric: str = "sink_mass", *,
                        store: str = ""):
    """Score vs an attention metric, one point per model, colour = QK-norm kind, OLS line."""
    return fig_score_vs_metrics(table, score, [metric], store=store)


def fig_score_vs_metrics(table: pd.DataFrame, score: str = "helmet_32k",
                         metrics: Sequence[str] = ("sink_mass", "sink_rate"), *, store: str = ""):
    """Score vs each attention metric side by side (shared score axis), one point per model,
    colour = QK-norm kind, OLS line with R², LOO R² and n per panel."""
    tables.require_columns(table, [score, *metrics], f"score vs {', '.join(metrics)}")
    for metric in metrics:
        if table.dropna(subset=[score, metric]).empty:
            raise StoreError(f"no model in the store has both {metric} and a {score} score (models outside "
                             "OlmPool have no scores)" + (_SINK_RATE_HINT if metric == "sink_rate" else ""))
    eps = table.attrs.get("sink_epsilon")
    with style() as mpl:
        fig, axes = mpl.subplots(1, len(metrics), figsize=(WIDTH * (1 + 0.85 * (len(metrics) - 1)), 2.6),
                                 squeeze=False, sharey=True)
        for ax, metric in zip(axes[0], metrics):
            data = table.dropna(subset=[score, metric])
            kinds = data["qk_norm"].map(qk_kind) if "qk_norm" in data else pd.Series("n/a", index=data.index)
            for kind in QK_COLORS:
                sel = (kinds == kind).to_numpy()
                if sel.any():
                    ax.scatter(data[metric].to_numpy(float)[sel], data[score].to_numpy(float)[sel],
                               c=QK_COLORS[kind], marker=QK_MARKERS[kind], label=QK_LABELS[kind], zorder=3,
                               edgecolor="white", linewidth=0.4)
            if len(data) >= 3 and data[metric].nunique() > 1:
                from attnscope.report.stats import ols

                fit = ols(data, score, [metric])
                b0, b1 = fit.coefficient("const")["estimate"], fit.coefficient(metric)["estimate"]
                xs = np.linspace(data[metric].min(), data[metric].max(), 20)
                ax.plot(xs, b0 + b1 * xs, color="0.2", zorder=2)
                ax.text(0.98, 0.03, f"R² {fit.r2:.2f}, LOO R² {fit.loo_r2:.2f}, n = {fit.n}",
                        transform=ax.transAxes, ha="right", va="bottom", fontsize=6.5)
            ax.set_xlabel(metric_label(metric, epsilon=eps))
            ax.set_title(f"{score_label(score)} vs {metric_label(metric).split(' (')[0]}" if len(metrics) == 1
                         else metric_label(metric).split(" (")[0])
            if ax is axes[0][0]:
                _qk_legend(ax, kinds, loc="best")
        axes[0][0].set_ylabel(score_label(score))
        if len(metrics) > 1:
            fig.suptitle(f"{score_label(score)} vs " + " and ".join(metric_label(m).split(" (")[0] for m in metrics),
                         fontsize=9)
        if store:
            _source_note(fig, store)
        fig.tight_layout()
    return fig


_SINK_RATE_HINT = ("; the sink rate needs alpha_0 (token0_importance), which natural-text tasks record "
                   "since method analyze-window/2: run `attnscope extract` again on the store")


def fig_query_profile(profile: pd.DataFrame, *, title: str | None = None, store: str = ""):
    """Query-resolved metrics against query position (bin centre), one panel per metric, one line
    per layer group (a `tables.query_profile` table)."""
    tables.require_columns(profile, ["metric", "group", "query_position", "value"], "query profile")
    metrics = list(dict.fromkeys(profile["metric"]))
    groups = list(dict.fromkeys(profile["group"]))
    colours = _group_colours(len(groups))
    with style() as mpl:
        fig, axes = mpl.subplots(1, len(metrics), figsize=(WIDTH * (1 + 0.9 * (len(metrics) - 1)), 2.5),
                                 squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            d = profile[profile["metric"] == metric]
            for colour, group in zip(colours, groups):
                g = d[d["group"] == group].sort_values("query_position")
                ax.plot(g["query_position"], g["value"], color=colour, marker="o", markersize=2.5, label=group)
            ax.set_xlabel("query position (tokens, bin centre)")
            ax.set_ylabel(metric_label(metric))
            ax.set_title(f"{metric_label(metric).split(' (')[0]} vs query position")
            if metric.endswith("_mass"):
                ax.set_ylim(bottom=0)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if len(groups) <= 12:
            axes[0][-1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=6,
                               title="layers (head mean)", title_fontsize=6)
        first = profile.iloc[0]
        model = _short(str(profile.attrs.get("model") or first.get("model", "")))
        rev = str(profile.attrs.get("revision") or first.get("revision", "") or "")
        length = profile.attrs.get("length")
        fig.suptitle(title or (model + (f" @ {rev}" if rev else "") + (f", {int(length):,} tokens" if length else "")),
                     fontsize=9)
        if store:
            _source_note(fig, store)
        fig.tight_layout()
    return fig


def _group_colours(n: int) -> list:
    """Ordered layer groups: a perceptually uniform, colour-blind safe ramp (early = dark)."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(x) for x in (np.linspace(0.0, 0.85, n) if n > 1 else [0.35])]


def _model_colours(models: list[str], kinds: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, linestyle) per model: the QK-norm colour; line styles tell models of a kind apart."""
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    out = {}
    for m, k in zip(models, kinds):
        i = seen.get(k, 0)
        seen[k] = i + 1
        out[m] = (QK_COLORS[k], styles[i % len(styles)])
    return out


def fig_layer_profiles(profiles: pd.DataFrame, metric: str = "sink_mass", *, store: str = ""):
    """`metric` (head mean) against layer, one line per model; colour = QK-norm kind."""
    tables.require_columns(profiles, ["model", "layer", metric], "layer profiles")
    data = profiles.dropna(subset=[metric])
    if data.empty:
        raise StoreError(f"no layer has {metric}")
    models = list(dict.fromkeys(data["model"]))
    kinds = [qk_kind(data.loc[data["model"] == m, "qk_norm"].iloc[0]) if "qk_norm" in data else "n/a"
             for m in models]
    cs = _model_colours(models, kinds)
    with style() as mpl:
        fig, ax = mpl.subplots(figsize=(WIDTH * 1.3, 2.6))
        for m in models:
            d = data[data["model"] == m].sort_values("layer")
            c, ls = cs[m]
            ax.plot(d["layer"], d[metric], color=c, linestyle=ls, label=_short(m), marker=".", markersize=2)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(metric_label(metric))
        ax.set_title(f"{metric_label(metric).split(' (')[0]} by layer")
        if len(models) <= 12:
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=6)
        else:
            _qk_legend(ax, kinds, loc="center left", bbox_to_anchor=(1.01, 0.5))
        if store:
            _source_note(fig, store)
        fig.tight_layout()
    return fig


def _short(model: str, n: int = 34) -> str:
    m = str(model).rstrip("/").rsplit("/", 1)[-1]
    return m if len(m) <= n else m[:n - 1] + "…"


def fig_head_heatmap(da: xr.DataArray, metric: str = "sink_mass", *, title: str | None = None, store: str = ""):
    """Layer x head heatmap of one model's `metric` (see heatmap.heatmap_figure), report style."""
    with style():
        rev = da.attrs.get("revision") or ""
        t = title or f"{metric_label(metric).split(' (')[0]}: {_short(da.attrs.get('model', ''))}" + \
            (f" @ {rev}" if rev else "")
        fig = heatmap_figure(da, metric, title=t)
        fig.axes[0].grid(False)
        if store:
            _source_note(fig, store)
    return fig


def fig_needle_share(needles: pd.DataFrame, *, store: str = ""):
    """Needle share vs depth (mean over lengths) and vs length (mean over depths), one line per model."""
    tables.require_columns(needles, ["model", "needle_share"], "needle share")
    models = list(dict.fromkeys(needles["model"]))
    kinds = [qk_kind(needles.loc[needles["model"] == m, "qk_norm"].iloc[0]) if "qk_norm" in needles else "n/a"
             for m in models]
    cs = _model_colours(models, kinds)
    axes_spec = [c for c in ("depth", "length") if c in needles.columns and needles[c].notna().any()]
    if not axes_spec:
        raise StoreError("needle tasks carry neither a depth nor a length parameter")
    with style() as mpl:
        fig, axes = mpl.subplots(1, len(axes_spec), figsize=(WIDTH * 1.9 if len(axes_spec) == 2 else WIDTH, 2.4),
                                 squeeze=False, sharey=True)
        for ax, col in zip(axes[0], axes_spec):
            for m in models:
                d = needles[needles["model"] == m].groupby(col)["needle_share"].mean()
                c, ls = cs[m]
                ax.plot(d.index, d.values, color=c, linestyle=ls, marker=QK_MARKERS[kinds[models.index(m)]],
                        label=_short(m))
            if col == "length":
                ax.set_xscale("log", base=2)
                ticks = sorted(needles["length"].dropna().unique())
                ax.set_xticks(ticks, [f"{int(t):,}" for t in ticks])
                ax.minorticks_off()
                ax.set_xlabel("context length (tokens)")
            else:
                ax.set_xlabel("needle depth (fraction of the haystack before it)")
            ax.set_title(f"needle share vs {col}")
        axes[0][0].set_ylabel(metric_label("needle_share"))
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=6)
        if store:
            _source_note(fig, store)
        fig.tight_layout()
    return fig


def fig_checkpoints(ckpts: pd.DataFrame, metric: str = "sink_mass", *, store: str = ""):
    """`metric` along training (pretraining steps, then context extension), one line per model."""
    tables.require_columns(ckpts, ["model", "revision", metric], "checkpoint figure")
    revs = sorted(dict.fromkeys(ckpts["revision"]), key=tables.revision_order)
    pos = {r: i for i, r in enumerate(revs)}
    models = list(dict.fromkeys(ckpts["model"]))
    kinds = [qk_kind(ckpts.loc[ckpts["model"] == m, "qk_norm"].iloc[0]) if "qk_norm" in ckpts else "n/a"
             for m in models]
    cs = _model_colours(models, kinds)
    with style() as mpl:
        fig, ax = mpl.subplots(figsize=(max(WIDTH, 0.45 * len(revs) + 2.2), 2.6))
        for m, k in zip(models, kinds):
            d = ckpts[ckpts["model"] == m]
            d = d.iloc[np.argsort([pos[r] for r in d["revision"]])]
            c, ls = cs[m]
            ax.plot([pos[r] for r in d["revision"]], d[metric], color=c, linestyle=ls, marker=QK_MARKERS[k],
                    label=_short(m))
        first_ext = next((i for i, r in enumerate(revs) if tables.revision_order(r)[0] >= 1), None)
        if first_ext is not None and first_ext > 0:
            ax.axvspan(first_ext - 0.5, len(revs) - 0.5, color="0.85", alpha=0.5, lw=0, zorder=0)
            ax.text(first_ext - 0.4, 0.99, "context extension", fontsize=6, va="top", color="0.3",
                    transform=ax.get_xaxis_transform())
        ax.set_xticks(range(len(revs)), [r or "(none)" for r in revs], rotation=45, ha="right", fontsize=6)
        ax.set_xlabel("checkpoint (revision)")
        ax.set_ylabel(metric_label(metric, epsilon=ckpts.attrs.get("sink_epsilon")))
        ax.set_title(f"{metric_label(metric).split(' (')[0]} across checkpoints")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=6)
        if store:
            _source_note(fig, store)
        fig.tight_layout()
    return fig


def fig_indicator_effects(table: pd.DataFrame, score: str = "helmet_32k", *, store: str = ""):
    """Coefficients of `score ~ has_qk_norm + has_gqa + has_swa + has_short_ctx` with 95% CIs."""
    from attnscope.report.stats import ols

    fit = ols(table, score, list(tables.INDICATORS), label="model")
    if not np.isfinite(fit.r2):
        raise StoreError(f"cannot fit {score} on the four indicators: {fit.note}")
    terms = list(tables.INDICATORS)
    labels = {"has_qk_norm": "QK norm", "has_gqa": "GQA", "has_swa": "sliding window", "has_short_ctx": "4K pretraining"}
    with style() as mpl:
        fig, ax = mpl.subplots(figsize=(WIDTH, 2.0))
        for i, t in enumerate(terms):
            c = fit.coefficient(t)
            ax.errorbar(c["estimate"], i, xerr=[[c["estimate"] - c["ci_low"]], [c["ci_high"] - c["estimate"]]],
                        fmt="o", color="0.2", capsize=2)
        ax.axvline(0, color="0.5", lw=0.8, ls="--")
        ax.set_yticks(range(len(terms)), [labels[t] for t in terms])
        ax.set_ylim(len(terms) - 0.5 + 0.6, -0.5)  # top to bottom, room for the fit line below
        ax.set_xlabel(f"effect on {score_label(score)} (points, 95% CI)")
        ax.set_title(f"{score_label(score)}: effect of each harmful choice")
        ax.text(0.98, 0.03, f"R² {fit.r2:.2f}, adj. R² {fit.adj_r2:.2f}, LOO R² {fit.loo_r2:.2f}, n = {fit.n}",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=6)
        if store:
            _source_note(fig, store)
        fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ figure registry
@dataclass
class FigureDef:
    name: str
    description: str
    needs_store: bool
    data: Callable[..., list[tuple[str, Any]]]   # (source, score) -> [(stem, data)]
    static: Callable[..., Any]                    # (data, score, store) -> matplotlib Figure
    interactive: Callable[..., Any]               # (data, score) -> plotly Figure


def _with_qk(df: pd.DataFrame) -> pd.DataFrame:
    reg = tables.registry_table()
    names = [tables.registry_name(m, reg) for m in df["model"]]
    qk = dict(zip(reg["name"], reg["qk_norm"]))
    return df.assign(registry_name=names, qk_norm=[qk.get(n, np.nan) for n in names])


def _final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of each model's report revision (`tables.choose_revision`)."""
    keep = [g[g["revision"] == tables.choose_revision(g["revision"])] for _, g in df.groupby("model", sort=False)]
    return pd.concat(keep, ignore_index=True) if keep else df


def _data_score_vs_count(source, score):
    table = tables.model_table(None)  # architecture only: always every OlmPool model
    cols = ["model", "qk_norm", "harmful_count", *tables.INDICATORS, score]
    return [(f"score_vs_count_{score}", table[cols])]


def _data_indicator_effects(source, score):
    [(_, table)] = _data_score_vs_count(source, score)
    return [(f"indicator_effects_{score}", table)]


def _data_score_vs_metric(metric):
    def data(source, score):
        table = tables.model_table(source)
        if metric not in table.columns:
            raise StoreError(f"no task in {tables.store_label(source)} has {metric}")
        cols = ["model", "revision", "registry_name", "qk_norm", "harmful_count", metric, score]
        return [(f"score_vs_{metric}_{score}", table[cols])]
    return data


def _data_score_vs_metrics(metrics):
    def data(source, score):
        table = tables.model_table(source)
        for metric in metrics:
            if metric not in table.columns:
                raise StoreError(f"no task in {tables.store_label(source)} has {metric}"
                                 + (_SINK_RATE_HINT if metric == "sink_rate" else ""))
        cols = ["model", "revision", "registry_name", "qk_norm", "harmful_count", *metrics, score]
        return [(f"score_vs_{'_'.join(metrics)}_{score}" if len(metrics) > 1 else f"score_vs_{metrics[0]}_{score}",
                 table[cols])]
    return data


def _data_query_profiles(source, score):
    out = []
    for (model, rev, probe, length), df in tables.query_profiles(source):
        stem = "query_profile_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{_short(model, 80)}_{probe}_{length}")
        out.append((stem, df))
    return out


def _data_layer_profiles(source, score):
    prof = tables.layer_profiles(source)
    prof = _final_rows(prof)
    cols = [c for c in prof.columns if c in tables.LAYER_METRICS or c.startswith("span_mass_")]
    prof = prof.groupby(["model", "revision", "layer"], sort=False)[cols].mean().reset_index()
    return [("layer_profiles_sink_mass", _with_qk(prof))]


def _data_head_heatmaps(source, score):
    maps = tables.head_maps(source, "sink_mass")
    chosen = {}
    for (model, rev, probe), da in maps.items():
        chosen.setdefault(model, []).append(rev)
    out = []
    for (model, rev, probe), da in maps.items():
        if rev != tables.choose_revision(chosen[model]):
            continue
        stem = "head_heatmap_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{_short(model, 80)}_{probe}")
        out.append((stem, da))
    return out


def _data_needle_share(source, score):
    nd = _final_rows(tables.needle_table(source))
    return [("needle_share", _with_qk(nd))]


def _data_checkpoints(metric):
    def data(source, score):
        table = tables.checkpoint_table(source, metric)
        if table[metric].isna().all():
            raise StoreError(f"no checkpoint in {tables.store_label(source)} has {metric}"
                             + (_SINK_RATE_HINT if metric == "sink_rate" else ""))
        return [(f"checkpoints_{metric}", table)]
    return data


def _interactive(name):
    def draw(data, score):
        from attnscope.report import interactive

        return getattr(interactive, name)(data, score=score)
    return draw


FIGURES: dict[str, FigureDef] = {f.name: f for f in [
    FigureDef("score_vs_count", "long-context score vs harmful-choice count, with the OLS fit (registry only)",
              False, _data_score_vs_count,
              lambda d, score, store: fig_score_vs_count(d, score, store=store), _interactive("score_vs_count")),
    FigureDef("indicator_effects", "effect of each harmful choice on the score (OLS on the four indicators)",
              False, _data_indicator_effects,
              lambda d, score, store: fig_indicator_effects(d, score, store=store), _interactive("indicator_effects")),
    FigureDef("score_vs_sink", "long-context score vs mean sink mass, coloured by QK-norm kind", True,
              _data_score_vs_metric("sink_mass"),
              lambda d, score, store: fig_score_vs_metric(d, score, "sink_mass", store=store),
              _interactive("score_vs_sink")),
    FigureDef("score_vs_sinks", "long-context score vs sink mass and vs sink rate (Gu et al.), side by side",
              True, _data_score_vs_metrics(("sink_mass", "sink_rate")),
              lambda d, score, store: fig_score_vs_metrics(d, score, ("sink_mass", "sink_rate"), store=store),
              _interactive("score_vs_sinks")),
    FigureDef("score_vs_needle", "long-context score vs needle share, coloured by QK-norm kind", True,
              _data_score_vs_metric("needle_share"),
              lambda d, score, store: fig_score_vs_metric(d, score, "needle_share", store=store),
              _interactive("score_vs_needle")),
    FigureDef("layer_profiles", "per-layer sink mass by model", True, _data_layer_profiles,
              lambda d, score, store: fig_layer_profiles(d, "sink_mass", store=store),
              _interactive("layer_profiles")),
    FigureDef("head_heatmaps", "layer x head sink-mass heatmap per model", True, _data_head_heatmaps,
              lambda d, score, store: fig_head_heatmap(d, "sink_mass", store=store),
              _interactive("head_heatmap")),
    FigureDef("needle_share", "needle share vs depth and length", True, _data_needle_share,
              lambda d, score, store: fig_needle_share(d, store=store), _interactive("needle_share")),
    FigureDef("checkpoints", "sink mass across checkpoints (pretraining -> extension)", True,
              _data_checkpoints("sink_mass"),
              lambda d, score, store: fig_checkpoints(d, "sink_mass", store=store), _interactive("checkpoints")),
    FigureDef("checkpoints_sink_rate", "sink rate (Gu et al.) across checkpoints", True,
              _data_checkpoints("sink_rate"),
              lambda d, score, store: fig_checkpoints(d, "sink_rate", store=store),
              _interactive("checkpoints_sink_rate")),
    FigureDef("query_profiles", "sink mass and entropy vs query position per layer group (tasks with query bins)",
              True, _data_query_profiles,
              lambda d, score, store: fig_query_profile(d, store=store), _interactive("query_profile")),
]}


def figure_data(name: str, source=None, score: str = "helmet_32k") -> list[tuple[str, Any]]:
    """The data one figure plots: [(file stem, DataFrame or DataArray)]."""
    if name not in FIGURES:
        raise AttnscopeError(f"unknown figure {name!r}; figures: {', '.join(FIGURES)}")
    f = FIGURES[name]
    if f.needs_store and source is None:
        raise AttnscopeError(f"figure {name!r} needs a store (--store PATH); only "
                             f"{[n for n, d in FIGURES.items() if not d.needs_store]} work from the registry alone")
    return f.data(source, score)


def make_figure(name: str, source=None, out: str | Path = "figures-out", *, score: str = "helmet_32k",
                command: str = "") -> list[Path]:
    """Draw one registered figure from `source` (a store path, or None for registry-only figures)
    into `out`: PDF, PNG and the JSON sidecar per file stem."""
    store = tables.store_label(source)
    paths: list[Path] = []
    for stem, data in figure_data(name, source, score):
        fig = FIGURES[name].static(data, score, store)
        paths += save_figure(fig, out, stem, store=store, command=command or f"attnscope figures ({name})",
                             data=data, extra={"score": score, "figure_kind": name})
    return paths


def make_all(source=None, out: str | Path = "figures-out", *, score: str = "helmet_32k", command: str = "",
             names: list[str] | None = None, overwrite: bool = False) -> dict[str, list[Path] | str]:
    """Every figure that the data allows; {name: paths, or the reason it was skipped}.

    A store path that is not a readable store, or a store with damaged tasks, raises (a figure
    is skipped only when the data lack what it plots). `out` must be a new or empty folder
    unless `overwrite`."""
    check_output_dir(out, overwrite=overwrite)
    if isinstance(source, (str, Path)):
        tables.open_store(source).tasks()  # foreign, corrupt or missing: one error, not N skips
    results: dict[str, list[Path] | str] = {}
    for name in names or list(FIGURES):
        f = FIGURES[name]
        if f.needs_store and source is None:
            results[name] = "skipped: needs a store"
            continue
        try:
            results[name] = make_figure(name, source, out, score=score, command=command)
        except CorruptDataError:
            raise
        except AttnscopeError as exc:
            results[name] = f"skipped: {exc}"
    return results


def interactive_figures(source=None, score: str = "helmet_32k", names: list[str] | None = None):
    """[(name, stem, plotly Figure)] for every figure the data allows, and {name: skip reason}."""
    figs, skipped = [], {}
    for name in names or list(FIGURES):
        f = FIGURES[name]
        if f.needs_store and source is None:
            continue
        try:
            for stem, data in f.data(source, score):
                figs.append((name, stem, f.interactive(data, score)))
        except CorruptDataError:
            raise
        except AttnscopeError as exc:
            skipped[name] = str(exc)
    return figs, skipped



def script_main(name: str, argv: list[str] | None = None) -> int:
    """Entry point of `figures/fig_<name>.py --store S --out DIR [--score S] [--registry-only]`."""
    import argparse
    import shlex
    import sys

    f = FIGURES[name]
    p = argparse.ArgumentParser(prog=f"figures/fig_{name}.py", description=f.description)
    p.add_argument("--store", help="batch store (.h5)" + ("" if f.needs_store else "; optional for this figure"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score", default="helmet_32k", help="score for the score figures (default helmet_32k)")
    p.add_argument("--registry-only", action="store_true", help="ignore any store (registry-only figures)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that has files")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = "python " + " ".join(shlex.quote(a) for a in [f"figures/fig_{name}.py", *argv])
    source = None if args.registry_only else args.store
    if f.needs_store and source is None:
        p.error(f"figure {name!r} needs --store PATH")
    try:
        check_output_dir(args.out, overwrite=args.overwrite)
        paths = make_figure(name, source, args.out, score=args.score, command=command)
    except AttnscopeError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
