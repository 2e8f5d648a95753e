"""Figures of where attention goes: attention received per key, and span-to-span mass
(docs/received.md). The cache-policy figure is attnscope.policies.policy_figure.

Scripts: figures/fig_received.py, figures/fig_span_to_span.py, figures/fig_policies.py.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from attnscope.report.figures import WIDTH, style


def received_records(ds: xr.Dataset, tokens: list[str], top: int = 12) -> list[dict]:
    """The heavy hitters (H2O's ranking): the `top` keys with the largest accumulated attention
    r_j, as a share of all attention (r_j / L, L = the query rows), averaged over layers and
    heads; with their token text and mean received attention rbar_j."""
    L = ds.sizes["key"]
    share = (ds.received / L).mean(("layer", "head")).values
    rbar = ds.received_mean.mean(("layer", "head")).values
    order = np.argsort(-share, kind="stable")[:top]
    return [{"position": int(j), "token": tokens[j], "received_share": float(share[j]),
             "received_mean": float(rbar[j])} for j in order]


def draw_received(ds: xr.Dataset, tokens: list[str], title: str | None = None, top: int = 12):
    """(a) the mean attention each key receives from the queries that see it (rbar_j, mean over
    heads) per layer and key position; (b) the heavy hitters: the keys with the largest share of
    all attention (r_j / L, mean over layers and heads)."""
    import matplotlib.colors as mcolors

    rbar = ds.received_mean.mean("head").values  # [layer, key]
    recs = received_records(ds, tokens, top)
    with style() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(WIDTH * 2.3, 3.0), gridspec_kw={"width_ratios": [1.6, 1]})
        fig.subplots_adjust(wspace=0.75)
        ax = axes[0]
        positive = rbar[np.isfinite(rbar) & (rbar > 0)]
        lo, hi = float(np.percentile(positive, 1)), float(np.percentile(positive, 99.9))
        im = ax.imshow(np.clip(rbar, lo, hi), aspect="auto", origin="lower", interpolation="nearest",
                       norm=mcolors.LogNorm(vmin=lo, vmax=hi), cmap="viridis",
                       extent=(-0.5, rbar.shape[1] - 0.5, ds.layer.values[0] - 0.5, ds.layer.values[-1] + 0.5))
        ax.set_xlabel("key position")
        ax.set_ylabel("layer")
        ax.set_title("mean attention a key receives from the\nqueries that see it (rbar_j, mean over heads)")
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        ax = axes[1]
        labels = [f"{r['position']}: {r['token'].strip() or repr(r['token'])}" for r in recs][::-1]
        ax.barh(range(len(recs)), [r["received_share"] for r in recs][::-1], color="#0072B2")
        ax.set_yticks(range(len(recs)))
        ax.set_yticklabels(labels)
        ax.set_xscale("log")
        ax.set_xlabel("share of all attention, r_j / L\n(mean over layers and heads)")
        ax.set_title(f"heavy hitters (H2O ranking): top {len(recs)}")
        if title:
            fig.suptitle(title, y=1.05)
    return fig


PAIRS = (("question", "needle_value"), ("final", "needle_value"), ("haystack", "needle"),
         ("needle", "sink"), ("question", "sink"), ("final", "sink"))


def span_records(ds: xr.Dataset) -> list[dict]:
    """span_to_span per layer for the PAIRS: mean and max over heads (mean over prompts)."""
    s2s = ds.span_to_span
    trials = [d for d in s2s.dims if d not in ("query_span", "key_span", "layer", "head")]
    s2s = s2s.mean(trials)
    out = []
    for a, b in PAIRS:
        if a not in s2s.query_span.values or b not in s2s.key_span.values:
            continue
        cell = s2s.sel(query_span=a, key_span=b)
        for layer in s2s.layer.values:
            v = cell.sel(layer=layer).values
            out.append({"query_span": a, "key_span": b, "layer": int(layer), "mean_over_heads": float(v.mean()),
                        "max_over_heads": float(v.max())})
    return out


def draw_span_to_span(ds: xr.Dataset, title: str | None = None):
    """Mass from query span A to key span B per layer: mean over heads, and the strongest head."""
    recs = span_records(ds)
    colors = ["#0072B2", "#56B4E9", "#009E73", "#D55E00", "#E69F00", "#CC79A7"]
    with style() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(WIDTH * 2.1, 2.8), sharey=True)
        for (a, b), color in zip(PAIRS, colors):
            rows = [r for r in recs if r["query_span"] == a and r["key_span"] == b]
            if not rows:
                continue
            x = [r["layer"] for r in rows]
            style_kw = {"ls": "--"} if b == "sink" else {}
            axes[0].plot(x, [r["mean_over_heads"] for r in rows], color=color, label=f"{a} → {b}", **style_kw)
            axes[1].plot(x, [r["max_over_heads"] for r in rows], color=color, **style_kw)
        for ax, what in zip(axes, ("mean over heads", "strongest head")):
            ax.set_xlabel("layer")
            ax.set_yscale("log")
            ax.set_title(f"span → span attention mass ({what})")
        axes[0].set_ylabel("mass (mean over the query span)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.2))
        if title:
            fig.suptitle(title, y=1.04)
    return fig
