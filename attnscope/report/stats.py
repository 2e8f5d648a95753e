"""Statistics of the report: OLS fits and correlations across models (statsmodels / scipy).

Each fit regresses one long-context score on predictors, one row per model:
    score ~ harmful_count
    score ~ has_qk_norm + has_gqa + has_swa + has_short_ctx
    score ~ <metric>            (sink_mass, sink_rate, needle_share: needs a store)
    score ~ <metric> + harmful_count
and reports R², adjusted R², leave-one-out cross-validated R² (predictions from refits),
coefficients with confidence intervals, and n. Correlations give Pearson's r and Spearman's rho
with seeded bootstrap confidence intervals (scipy.stats.bootstrap, BCa). Formulas and references
are in docs/report.md.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from attnscope.errors import AttnscopeError
from attnscope.report.tables import INDICATORS, SCORES

DEFAULT_SCORE = "helmet_32k"
DEFAULT_METRICS = ("sink_mass", "sink_rate", "needle_share")
LOWER_IS_BETTER = {"longppl"}

__all__ = ["Fit", "Correlation", "StatsReport", "ols", "loo_predictions", "loo_r2", "correlation",
           "run_analyses", "DEFAULT_SCORE"]


@dataclass
class Fit:
    """One OLS fit: `score ~ predictors` over the models with no missing value."""

    name: str
    score: str
    predictors: list[str]
    n: int
    r2: float
    adj_r2: float
    loo_r2: float
    f_pvalue: float
    coefficients: list[dict[str, float]]  # term, estimate, std_err, ci_low, ci_high, p_value
    models: list[str] = field(default_factory=list)
    alpha: float = 0.05
    note: str = ""

    def coefficient(self, term: str) -> dict[str, float]:
        for c in self.coefficients:
            if c["term"] == term:
                return c
        raise KeyError(term)


@dataclass
class Correlation:
    """Pearson and Spearman correlation of x and y with bootstrap confidence intervals."""

    x: str
    y: str
    n: int
    pearson_r: float
    pearson_p: float
    pearson_ci: tuple[float, float]
    spearman_rho: float
    spearman_p: float
    spearman_ci: tuple[float, float]
    confidence: float
    n_resamples: int
    seed: int
    method: str = "BCa"
    note: str = ""


def _design(df: pd.DataFrame, score: str, predictors: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    missing = [c for c in (score, *predictors) if c not in df.columns]
    if missing:
        raise AttnscopeError(f"cannot fit {score} ~ {' + '.join(predictors)}: the table has no column(s) "
                             f"{missing}; metrics need a store (drop --registry-only) with those measurements")
    data = df.dropna(subset=[score, *predictors])
    y = data[score].to_numpy(dtype=float)
    X = data[list(predictors)].to_numpy(dtype=float)
    return data, y, X


def _with_const(X: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones(len(X)), X])


def loo_predictions(y: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Leave-one-out predictions: for each i, OLS (with intercept) refitted without row i predicts y_i."""
    import statsmodels.api as sm

    y = np.asarray(y, float)
    Xc = _with_const(np.asarray(X, float))
    n = len(y)
    pred = np.empty(n)
    for i in range(n):
        keep = np.arange(n) != i
        res = sm.OLS(y[keep], Xc[keep]).fit()
        pred[i] = float(res.predict(Xc[i:i + 1])[0])
    return pred


def loo_r2(y: np.ndarray, X: np.ndarray) -> float:
    """Cross-validated R² = 1 − PRESS / SS_tot, PRESS = Σ (y_i − ŷ_(−i))², SS_tot about the full mean."""
    y = np.asarray(y, float)
    pred = loo_predictions(y, X)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return float(1.0 - np.sum((y - pred) ** 2) / ss_tot) if ss_tot > 0 else math.nan


def ols(df: pd.DataFrame, score: str, predictors: Sequence[str], *, alpha: float = 0.05,
        name: str | None = None, label: str = "model") -> Fit:
    """OLS of `score` on `predictors` (plus an intercept) over the rows with no missing value."""
    import statsmodels.api as sm

    predictors = list(predictors)
    data, y, X = _design(df, score, predictors)
    n, k = len(y), len(predictors)
    name = name or f"{score} ~ {' + '.join(predictors)}"
    models = [str(m) for m in data[label]] if label in data.columns else []
    nan_coefs = [{"term": t, "estimate": math.nan, "std_err": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                  "p_value": math.nan} for t in ["const", *predictors]]
    if n < k + 2:
        return Fit(name, score, predictors, n, math.nan, math.nan, math.nan, math.nan, nan_coefs, models, alpha,
                   note=f"too few models ({n}) for {k + 1} parameters and a residual")
    Xc = _with_const(X)
    note = ""
    rank = np.linalg.matrix_rank(Xc)
    if rank < Xc.shape[1]:
        const = [p for p, col in zip(predictors, X.T) if np.ptp(col) == 0]
        return Fit(name, score, predictors, n, math.nan, math.nan, math.nan, math.nan, nan_coefs, models, alpha,
                   note="predictors are collinear" + (f" ({', '.join(const)} constant)" if const else ""))
    res = sm.OLS(y, Xc).fit()
    ci = res.conf_int(alpha=alpha)
    coefs = [{"term": t, "estimate": float(res.params[i]), "std_err": float(res.bse[i]),
              "ci_low": float(ci[i, 0]), "ci_high": float(ci[i, 1]), "p_value": float(res.pvalues[i])}
             for i, t in enumerate(["const", *predictors])]
    if n < k + 3:
        note = "LOO refits have no residual degrees of freedom"
        q2 = math.nan
    else:
        q2 = loo_r2(y, X)
    return Fit(name, score, predictors, n, float(res.rsquared), float(res.rsquared_adj), q2,
               float(res.f_pvalue), coefs, models, alpha, note)


def _bootstrap_ci(x: np.ndarray, y: np.ndarray, stat, *, n_resamples: int, confidence: float,
                  seed: int) -> tuple[tuple[float, float], str]:
    from scipy import stats

    with warnings.catch_warnings():
        # resamples with a constant column give undefined correlations (NaN); BCa then warns
        warnings.simplefilter("ignore")
        res = stats.bootstrap((x, y), stat, paired=True, vectorized=True, n_resamples=n_resamples,
                              confidence_level=confidence, method="BCa", rng=np.random.default_rng(seed))
        ci = (float(res.confidence_interval.low), float(res.confidence_interval.high))
        if not all(map(math.isfinite, ci)):
            res = stats.bootstrap((x, y), stat, paired=True, vectorized=True, n_resamples=n_resamples,
                                  confidence_level=confidence, method="percentile",
                                  rng=np.random.default_rng(seed))
            return (float(res.confidence_interval.low), float(res.confidence_interval.high)), "percentile"
    return ci, "BCa"


def _pearson(a, b, axis=-1):
    from scipy import stats

    return stats.pearsonr(a, b, axis=axis).statistic


def _spearman(a, b, axis=-1):
    """Spearman's rho = Pearson's r of the (average-tie) ranks; vectorised over resamples."""
    from scipy import stats

    return stats.pearsonr(stats.rankdata(a, axis=axis), stats.rankdata(b, axis=axis), axis=axis).statistic


def correlation(df: pd.DataFrame, x: str, y: str, *, confidence: float = 0.95, n_resamples: int = 9999,
                seed: int = 0) -> Correlation:
    """Pearson r and Spearman rho of columns x and y (rows with both present), each with a
    paired bootstrap CI (scipy.stats.bootstrap, BCa, `n_resamples`, seeded)."""
    from scipy import stats

    data, yv, X = _design(df, y, [x])
    xv = X[:, 0]
    n = len(yv)
    nan2 = (math.nan, math.nan)
    if n < 4 or np.ptp(xv) == 0 or np.ptp(yv) == 0:
        return Correlation(x, y, n, math.nan, math.nan, nan2, math.nan, math.nan, nan2, confidence, n_resamples,
                           seed, note="fewer than 4 pairs or a constant variable")
    pr = stats.pearsonr(xv, yv)
    sr = stats.spearmanr(xv, yv)
    p_ci, m1 = _bootstrap_ci(xv, yv, _pearson, n_resamples=n_resamples, confidence=confidence, seed=seed)
    s_ci, m2 = _bootstrap_ci(xv, yv, _spearman, n_resamples=n_resamples, confidence=confidence, seed=seed)
    method = m1 if m1 == m2 else f"pearson {m1}, spearman {m2}"
    return Correlation(x, y, n, float(pr.statistic), float(pr.pvalue), p_ci, float(sr.statistic),
                       float(sr.pvalue), s_ci, confidence, n_resamples, seed, method)


# ------------------------------------------------------------------------------------ the report
@dataclass
class StatsReport:
    """All fits and correlations for one score, with where the data came from."""

    score: str
    fits: list[Fit]
    correlations: list[Correlation]
    table: pd.DataFrame
    store: str
    provenance: str = ""
    notes: list[str] = field(default_factory=list)

    def fits_frame(self) -> pd.DataFrame:
        """One row per fit x term (tidy; the CSV)."""
        rows = []
        for f in self.fits:
            for c in f.coefficients:
                rows.append({"analysis": f.name, "score": f.score, "predictors": " + ".join(f.predictors),
                             "n": f.n, "r2": f.r2, "adj_r2": f.adj_r2, "loo_r2": f.loo_r2, "f_pvalue": f.f_pvalue,
                             **c, "ci_level": 1 - f.alpha, "note": f.note})
        return pd.DataFrame(rows)

    def correlations_frame(self) -> pd.DataFrame:
        rows = []
        for c in self.correlations:
            d = asdict(c)
            d["pearson_ci_low"], d["pearson_ci_high"] = d.pop("pearson_ci")
            d["spearman_ci_low"], d["spearman_ci_high"] = d.pop("spearman_ci")
            rows.append(d)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return _clean({"score": self.score, "store": self.store, "provenance": self.provenance,
                       "lower_is_better": self.score in LOWER_IS_BETTER, "notes": self.notes,
                       "fits": [asdict(f) for f in self.fits],
                       "correlations": [asdict(c) for c in self.correlations]})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [f"# attnscope report: {self.score}", "",
                 f"- data: {self.store}",
                 f"- scores and features: OlmPool registry. {self.provenance}".rstrip(),
                 f"- {self.score}: {'lower' if self.score in LOWER_IS_BETTER else 'higher'} is better",
                 "- statistics: OLS (statsmodels) with intercept; CIs at level "
                 f"{1 - (self.fits[0].alpha if self.fits else 0.05):.0%}; LOO R² from n refits; "
                 "bootstrap CIs: scipy.stats.bootstrap (paired, seeded). See docs/report.md.", ""]
        lines += [f"- note: {n}" for n in self.notes]
        lines += ["", "## Fits", "",
                  "| analysis | n | R² | adj. R² | LOO R² | term | estimate | CI | p |",
                  "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |"]
        for f in self.fits:
            for i, c in enumerate(f.coefficients):
                head = (f"{f.name}{' (' + f.note + ')' if f.note else ''}", str(f.n), _fmt(f.r2), _fmt(f.adj_r2),
                        _fmt(f.loo_r2)) if i == 0 else ("", "", "", "", "")
                lines.append("| " + " | ".join([*head, c["term"], _fmt(c["estimate"]),
                                                 f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]",
                                                 _fmt(c["p_value"], p=True)]) + " |")
        lines += ["", "## Correlations", "",
                  "| x | y | n | Pearson r | CI | Spearman ρ | CI | bootstrap |",
                  "| --- | --- | ---: | ---: | --- | ---: | --- | --- |"]
        for c in self.correlations:
            lines.append(f"| {c.x} | {c.y} | {c.n} | {_fmt(c.pearson_r)} | "
                         f"[{_fmt(c.pearson_ci[0])}, {_fmt(c.pearson_ci[1])}] | {_fmt(c.spearman_rho)} | "
                         f"[{_fmt(c.spearman_ci[0])}, {_fmt(c.spearman_ci[1])}] | "
                         f"{c.method}, {c.n_resamples} resamples, seed {c.seed}{'; ' + c.note if c.note else ''} |")
        models = self.table
        if "revision" in models and not models["revision"].astype(bool).any():
            models = models.drop(columns="revision")  # registry only
        lines += ["", "## Models", "", markdown_table(models), ""]
        return "\n".join(lines)


def _fmt(v: float, p: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if p and v < 1e-3:
        return f"{v:.1e}"
    return f"{v:.3f}"


def _clean(obj):
    """JSON-safe: NaN -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def markdown_table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A GitHub markdown table of `df` (no extra dependency)."""
    def cell(v):
        if isinstance(v, float):
            return "–" if not math.isfinite(v) else floatfmt.format(v)
        if v is None or (v is pd.NA):
            return "–"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


TABLE_COLUMNS = ("model", "revision", "qk_norm", "harmful_count", "sink_mass", "sink_rate", "needle_share",
                 "entropy")


def run_analyses(table: pd.DataFrame, score: str = DEFAULT_SCORE, *, metrics: Sequence[str] = DEFAULT_METRICS,
                 architecture: pd.DataFrame | None = None, alpha: float = 0.05, n_resamples: int = 9999,
                 seed: int = 0) -> StatsReport:
    """Every fit and correlation of the report for one score.

    `table` is `model_table(store)` (or `model_table(None)`, the registry alone). The
    architecture-only fits (count, four indicators) use `architecture` when given (the report
    passes the whole registry, so they always cover every OlmPool model), else `table`. Metric
    fits run for the metrics the table has, on the store's scored models; when those are not the
    same models as the architecture fits, the count is also fitted on them, like for like."""
    if score not in SCORES:
        raise AttnscopeError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")

    def scored_rows(df):
        return df[df[score].notna()] if score in df.columns else df.iloc[:0]

    scored = scored_rows(table)
    arch = scored_rows(architecture) if architecture is not None else scored
    label = " (all OlmPool models)" if architecture is not None else ""
    notes = []
    if "in_registry" in table.columns and (~table["in_registry"]).any():
        notes.append("models outside OlmPool (no scores) are listed but not fitted: "
                     + ", ".join(map(str, table.loc[~table["in_registry"], "model"])))
    if table.attrs.get("superseded"):
        notes.append(f"{table.attrs['superseded']} task(s) of the store measured a grid point that a newer "
                     "measurement (newer method, or with query bins) also measured; only the newer is read")
    if "sink_rate" in table.columns and table["sink_rate"].notna().any():
        notes.append(f"sink_rate: share of (task, seed, layer, head) with alpha_0 > "
                     f"{table.attrs.get('sink_epsilon', 0.3):g} (Gu et al. 2025) at the tasks' lengths")
    fits = [ols(arch, score, ["harmful_count"], alpha=alpha, name=f"{score} ~ harmful_count{label}"),
            ols(arch, score, list(INDICATORS), alpha=alpha, name=f"{score} ~ four indicators{label}")]
    cors = [correlation(arch, "harmful_count", score, n_resamples=n_resamples, seed=seed)]
    compared: set[frozenset] = set()  # model sets the count was already refitted on
    for m in metrics:
        if m not in scored.columns or scored[m].notna().sum() == 0:
            if m in table.columns:
                notes.append(f"{m}: no model with a {score} score has this metric in the store")
            continue
        fits.append(ols(scored, score, [m], alpha=alpha))
        fits.append(ols(scored, score, [m, "harmful_count"], alpha=alpha))
        cors.append(correlation(scored, m, score, n_resamples=n_resamples, seed=seed))
        subset = scored.dropna(subset=[m])
        models = frozenset(subset["model"]) if "model" in subset else frozenset(subset.index)
        if architecture is not None and len(subset) != len(arch) and models not in compared:
            compared.add(models)
            fits.append(ols(subset, score, ["harmful_count"], alpha=alpha,
                            name=f"{score} ~ harmful_count (the {len(subset)} models with {m})"))
    cols = [c for c in (*TABLE_COLUMNS, score) if c in table.columns]
    return StatsReport(score, fits, cors, table[cols].reset_index(drop=True), str(table.attrs.get("store", "")),
                       str(table.attrs.get("provenance", "")), notes)
