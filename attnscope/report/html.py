"""`attnscope report`: statistics as markdown, CSV and JSON, plus one self-contained HTML page
(tables + the interactive figures, plotly.js inlined: it opens with no network)."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import pandas as pd

from attnscope.report import tables
from attnscope.report.stats import StatsReport, run_analyses
from attnscope.store.files import atomic_output, check_output_dir

__all__ = ["build_report", "write_report", "render_html"]

_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.meta{color:#555;font-size:.85em}.note{color:#8a5a00}.figure{margin:1.5em 0}
"""


def build_report(source=None, *, score: str = "helmet_32k", revision: str = "final", probe: str | None = None,
                 n_resamples: int = 9999, seed: int = 0) -> StatsReport:
    """The statistics for `score` from a store (or the registry alone when `source` is None)."""
    table = tables.model_table(source, revision=revision, probe=probe)
    architecture = tables.model_table(None) if source is not None else None
    return run_analyses(table, score, architecture=architecture, n_resamples=n_resamples, seed=seed)


def _frame_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}", border=0, escape=True)


def render_html(report: StatsReport, figures: list, *, command: str = "", skipped: dict | None = None) -> str:
    """One HTML page: header (data, command, provenance), fits, correlations, figures, models."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    from attnscope import __version__

    fits = report.fits_frame()
    show = ["analysis", "n", "r2", "adj_r2", "loo_r2", "term", "estimate", "ci_low", "ci_high", "p_value", "note"]
    parts = [f"<h1>attnscope report: {html.escape(report.score)}</h1>",
             "<p class='meta'>data: " + html.escape(report.store) + "<br>made by: " + html.escape(command or "-") +
             f"<br>attnscope {__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}<br>"
             "scores and features: " + html.escape(report.provenance) + "</p>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in report.notes]
    cors = report.correlations_frame()
    cshow = ["x", "y", "n", "pearson_r", "pearson_ci_low", "pearson_ci_high", "pearson_p", "spearman_rho",
             "spearman_ci_low", "spearman_ci_high", "spearman_p", "method", "n_resamples", "seed", "note"]
    parts += ["<h2>Fits (OLS with intercept, 95% CIs; LOO R² from refits)</h2>", _frame_html(fits[show]),
              "<h2>Correlations (95% bootstrap CIs)</h2>", _frame_html(cors[[c for c in cshow if c in cors]])]
    parts.append("<h2>Figures</h2>")
    for i, (name, stem, fig) in enumerate(figures):
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"fig-{i}",
                          config={"displaylogo": False, "responsive": True})
        parts.append(f"<div class='figure' id='{html.escape(stem)}'>{div}</div>")
    for name, why in (skipped or {}).items():
        parts.append(f"<p class='note'>figure {html.escape(name)} not drawn: {html.escape(why)}</p>")
    models = report.table
    if "revision" in models and not models["revision"].astype(bool).any():
        models = models.drop(columns="revision")
    parts += ["<h2>Models</h2>", _frame_html(models)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>attnscope report: {html.escape(report.score)}</title><style>{_CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def write_report(source=None, out: str | Path = "attnscope-report", *, score: str = "helmet_32k",
                 revision: str = "final", probe: str | None = None, command: str = "", n_resamples: int = 9999,
                 seed: int = 0, html_page: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """Write report.md, fits.csv, correlations.csv, models.csv, report.json and report.html.

    `out` must be a new or empty folder unless `overwrite` (then these files are replaced, each
    atomically; other files stay)."""
    from attnscope.report.figures import interactive_figures

    from attnscope.validate import check_count

    check_count("n_resamples", n_resamples, none_ok=False)  # scipy's bootstrap needs >= 1
    check_count("seed", seed, minimum=0, none_ok=False)
    out = Path(out)
    check_output_dir(out, overwrite=overwrite)
    rep = build_report(source, score=score, revision=revision, probe=probe, n_resamples=n_resamples, seed=seed)
    figs, skipped = interactive_figures(source, score) if html_page else ([], {})
    paths = {"markdown": out / "report.md", "fits_csv": out / "fits.csv",
             "correlations_csv": out / "correlations.csv", "models_csv": out / "models.csv",
             "json": out / "report.json"}
    d = rep.to_dict()
    d["command"] = command
    texts = {"markdown": rep.to_markdown() + f"\n\nmade by: `{command}`\n",
             "fits_csv": rep.fits_frame().to_csv(index=False),
             "correlations_csv": rep.correlations_frame().to_csv(index=False),
             "models_csv": rep.table.to_csv(index=False), "json": json.dumps(d, indent=2)}
    if html_page:
        paths["html"] = out / "report.html"
        texts["html"] = render_html(rep, figs, command=command, skipped=skipped)
    for name, text in texts.items():  # everything computed first: an error leaves no half report
        with atomic_output(paths[name], overwrite=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths
