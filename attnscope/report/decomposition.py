"""The score-decomposition figure (matplotlib): one attention score as its per-dimension and
per-rotary-pair terms, the carrier dimensions highlighted, and what makes the key stand out
against the average key the query sees (docs/drilldown.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attnscope.metrics.decompose import ScoreDecomposition
from attnscope.store.files import atomic_output, check_output_file

__all__ = ["decomposition_figure", "write_decomposition", "sidecar_path"]

CARRIER = "#d95f02"
OTHER = "#7f9fbf"


def _tok(t: str) -> str:
    return repr(t)[1:-1] if t else "''"


def _bars(ax, x, values, highlight, *, width=0.8, labels=None):
    """Bars, `highlight` (indices) in orange, each labelled with labels[i] when given."""
    highlight = np.asarray(highlight, dtype=np.int64)
    colours = np.full(len(values), OTHER, dtype=object)
    colours[highlight] = CARRIER
    ax.bar(x, values, width=width, color=list(colours))
    ax.axhline(0, color="#333", lw=0.6)
    if labels is not None:
        for i in highlight[:8]:
            ax.annotate(labels[i], (x[i], values[i]), xytext=(0, 2 if values[i] >= 0 else -9),
                        textcoords="offset points", ha="center", fontsize=7, color=CARRIER)


def _n(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def decomposition_figure(dec: ScoreDecomposition, *, source: str = ""):
    """A matplotlib Figure with three panels: per dimension, per rotary pair (by wavelength),
    and the contrast with the mean visible key per pair (per dimension without a rope layout)."""
    from attnscope.extras import require
    from attnscope.report.figures import style

    require("the score-decomposition figure", "plot")
    with style() as plt:
        fig, axes = plt.subplots(3, 1, figsize=(9.5, 8.6))
        d = len(dec.per_dim)
        ax = axes[0]
        _bars(ax, np.arange(d), dec.per_dim, dec.carriers)
        ax.set_xlim(-1, d)
        ax.set_xlabel("head dimension d")
        ax.set_ylabel("c_d = scale·q_d·k_d")
        ax.set_title(f"per dimension: Σ c_d = {dec.raw_score:.6g}; orange: {_n(len(dec.carriers), 'dim')} "
                     f"{sorted(dec.carriers.tolist())[:12]}{' …' if len(dec.carriers) > 12 else ''} hold "
                     f"{dec.share:.0%} of Σ|c_d|", fontsize=9)
        if dec.rope is not None and len(dec.rope.pairs):
            r = dec.rope
            order = np.argsort(-r.omega, kind="stable")  # fastest pair first
            pp = dec.per_pair[order]
            cp = dec.contrast_per_pair[order]
            hi = np.flatnonzero(np.isin(order, dec.pair_carriers))
            chi = np.flatnonzero(np.isin(order, dec.contrast_pair_carriers))
            labels = [f"{w:.3g}" for w in r.wavelength[order]]
            step = max(1, len(order) // 16)
            dims = [f"{a},{b}" for a, b in r.pairs[order]]
            for ax, vals, high, what in ((axes[1], pp, hi, "C_p = c_a + c_b"),
                                         (axes[2], cp, chi, "C_p − mean over visible keys")):
                _bars(ax, np.arange(len(order)), vals, high, labels=dims)
                ax.set_xticks(np.arange(0, len(order), step), labels[::step], fontsize=7, rotation=45)
                ax.set_xlim(-1, len(order))
                ax.set_ylabel(what)
                ax.set_xlabel("rotary pair, fastest → slowest (label: wavelength 2π/ω in tokens)")
            unrot = (f"; {len(r.unrotated)} unrotated dims add {dec.per_dim[r.unrotated].sum():.4g}"
                     if len(r.unrotated) else "")
            axes[1].set_title(f"per rotary pair ({r.kind} layout, {len(r.pairs)} pairs, read from layer "
                              f"{dec.layer}'s forward){unrot}; orange (dims a,b): {_n(len(dec.pair_carriers), 'pair')} hold "
                              f"{dec.share:.0%} of Σ|C_p|", fontsize=9)
            axes[2].set_title(f"why this key stands out: score − mean score of the {dec.n_visible} visible keys = "
                              f"{dec.contrast:.4g}, per pair; orange: {_n(len(dec.contrast_pair_carriers), 'pair')} hold "
                              f"{dec.share:.0%}", fontsize=9)
        else:
            axes[1].text(0.5, 0.5, "no rotary pair view: " + dec.rope_note, ha="center", va="center",
                         transform=axes[1].transAxes, fontsize=9, wrap=True)
            axes[1].set_axis_off()
            ax = axes[2]
            _bars(ax, np.arange(d), dec.contrast_per_dim, dec.contrast_carriers)
            ax.set_xlim(-1, d)
            ax.set_xlabel("head dimension d")
            ax.set_ylabel("scale·q_d·(k_d − k̄_d)")
            ax.set_title(f"why this key stands out: score − mean score of the {dec.n_visible} visible keys = "
                         f"{dec.contrast:.4g}, per dimension", fontsize=9)
        cap = f", soft-capped {dec.score:.6g}" if dec.softcap else ""
        fig.suptitle(f"{dec.model}: layer {dec.layer}, head {dec.head} (kv head {dec.kv_head}) — query {dec.query} "
                     f"'{_tok(dec.query_token)}' → key {dec.key} '{_tok(dec.key_token)}'\n"
                     f"score {dec.raw_score:.6g}{cap}, P = exp(score − lse) = {dec.prob:.6g}"
                     + ("" if dec.visible else " (key not visible to this query)"), fontsize=10)
        if source:
            fig.text(0.01, 0.004, source, fontsize=6, color="gray")
        fig.tight_layout(rect=(0, 0.015, 1, 1))
    return fig


def sidecar_path(path: str | Path) -> Path:
    """The JSON written next to a figure: every number it draws."""
    p = Path(path)
    return p.with_name(p.stem + ".json")


def write_decomposition(dec: ScoreDecomposition, path: str | Path, *, command: str = "",
                        overwrite: bool = False) -> list[Path]:
    """Write the figure (PNG, PDF or SVG by suffix) and its JSON sidecar (same stem). Existing
    files are replaced only with `overwrite`; both paths are checked before anything is written."""
    from attnscope import __version__
    from attnscope.report.figures import style

    path = Path(path)
    side = sidecar_path(path)
    real = check_output_file(path, overwrite=overwrite, suffixes=(".png", ".pdf", ".svg"), kind="a figure")
    real_side = check_output_file(side, overwrite=overwrite, option="--out (its JSON sidecar)",
                                  suffixes=(".json",), kind="the figure's numbers")
    fig = decomposition_figure(dec, source=f"made by: {command}" if command else "")
    meta = {"png": {"Title": "score decomposition", "Description": command, "Software": f"attnscope {__version__}"},
            "pdf": {"Title": "score decomposition", "Subject": command, "Creator": f"attnscope {__version__}"},
            "svg": {"Title": "score decomposition", "Description": command}}[path.suffix.lower()[1:]]
    with style():
        with atomic_output(real, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format=path.suffix.lower()[1:], dpi=150, metadata=meta)
    data = {"command": command, "attnscope_version": __version__, "figure": path.name, **dec.to_dict()}
    with atomic_output(real_side, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return [path, side]
