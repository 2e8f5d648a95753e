"""Statistics of the per-token loss gap (definitions and formulas in docs/tokens.md).

All functions take the annotated table (``compare`` + ``annotate``): one row
per token with doc_id, loss_a, loss_b, gap and the category columns.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from attnscope.errors import AttnscopeError

__all__ = [
    "indicators",
    "bootstrap_means",
    "category_means",
    "regress",
    "RegressionResult",
    "filtered_losses",
    "gap_by_repeat",
    "DEFAULT_FILTERS",
    "REPEAT_BINS",
]

#: repeat_len bin edges (left-closed): 0, 1, 2, 3, 4-7, 8-15, 16-31, 32+
REPEAT_BINS = (0, 1, 2, 3, 4, 8, 16, 32, np.inf)
#: a token counts as "repeated" when it completes a verbatim repeat of at least this many tokens
MIN_REPEAT = 4
CONTROLS = ("log_freq", "log_repeat", "log_position", "n_chars")


def indicators(table: pd.DataFrame, *, min_repeat: int = MIN_REPEAT, far: int | None = None) -> pd.DataFrame:
    """Boolean category columns (and numeric controls) built from the annotation columns.

    content, function, pos_<TAG> (every tag seen), open_bracket, close_bracket,
    open_<kind>/close_<kind> (round, square, curly, angle), tag_open, tag_close,
    repeated (repeat_len >= min_repeat), not_repeated_content; with ``far`` = W
    (an attention window) also repeated_near / repeated_far: repeated tokens
    whose most recent earlier occurrence ends within / beyond W tokens
    (repeat_distance <= W / > W); controls log_repeat = log(1 + repeat_len),
    log_position = log(1 + position).
    """
    out = pd.DataFrame(index=table.index)
    wc = table.get("word_class")
    if wc is not None:
        out["content"] = wc.eq("content")
        out["function"] = wc.eq("function")
        for tag in sorted(table["pos"].dropna().unique()):
            out[f"pos_{tag}"] = table["pos"].eq(tag)
    if "bracket_side" in table:
        side = table["bracket_side"]
        out["open_bracket"] = side.eq("open")
        out["close_bracket"] = side.eq("close")
        for kind in ("round", "square", "curly", "angle"):
            k = table["bracket_kind"].eq(kind)
            out[f"open_{kind}"] = k & side.eq("open")
            out[f"close_{kind}"] = k & side.eq("close")
    if "tag_side" in table:
        out["tag_open"] = table["tag_side"].eq("open")
        out["tag_close"] = table["tag_side"].eq("close")
    if "repeat_len" in table:
        out["repeated"] = table["repeat_len"] >= min_repeat
        if "content" in out:
            out["content_not_repeated"] = out["content"] & ~out["repeated"]
        if far is not None:
            if "repeat_distance" not in table:
                raise AttnscopeError("far= needs the repeat_distance column; annotate the table first")
            beyond = table["repeat_distance"] > far
            out["repeated_near"] = out["repeated"] & ~beyond
            out["repeated_far"] = out["repeated"] & beyond
        out["log_repeat"] = np.log1p(table["repeat_len"].astype(float))
    if "position" in table:
        out["log_position"] = np.log1p(table["position"].astype(float))
    for c in ("log_freq", "n_chars"):
        if c in table:
            out[c] = table[c].astype(float)
    return out


def bootstrap_means(
    values: np.ndarray,
    groups: np.ndarray,
    docs: np.ndarray,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Token-weighted mean of ``values`` per group, with a document bootstrap CI.

    Each replicate draws the documents with replacement (``numpy.random.
    default_rng(seed)``) and recomputes every group's mean as (sum of values
    over the drawn documents' tokens in the group) / (their count); the CI is
    the percentile interval of the replicates (replicates in which a group has
    no token are skipped for that group).
    """
    values = np.asarray(values, dtype=float)
    g_codes, g_names = pd.factorize(pd.Series(groups), sort=True)
    d_codes, d_names = pd.factorize(pd.Series(docs))
    keep = g_codes >= 0
    D, G = len(d_names), len(g_names)
    sums = np.zeros((D, G))
    cnts = np.zeros((D, G))
    np.add.at(sums, (d_codes[keep], g_codes[keep]), values[keep])
    np.add.at(cnts, (d_codes[keep], g_codes[keep]), 1.0)
    rng = np.random.default_rng(seed)
    # multiplicity of each document in each replicate
    w = rng.multinomial(D, np.full(D, 1.0 / D), size=n_boot) if D else np.zeros((n_boot, 0))
    bs, bc = w @ sums, w @ cnts
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = bs / bc
    alpha = (1 - ci) / 2
    lo = np.array([np.nanquantile(reps[:, j], alpha) if np.isfinite(reps[:, j]).any() else np.nan for j in range(G)])
    hi = np.array([np.nanquantile(reps[:, j], 1 - alpha) if np.isfinite(reps[:, j]).any() else np.nan for j in range(G)])
    n = cnts.sum(0)
    return pd.DataFrame(
        {
            "group": list(g_names),
            "n_tokens": n.astype(np.int64),
            "n_docs": (cnts > 0).sum(0).astype(np.int64),
            "mean": sums.sum(0) / np.where(n > 0, n, np.nan),
            "ci_low": lo,
            "ci_high": hi,
        }
    )


def category_means(
    table: pd.DataFrame,
    categories: Sequence[str] | None = None,
    *,
    value: str = "gap",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    min_repeat: int = MIN_REPEAT,
    far: int | None = None,
) -> pd.DataFrame:
    """Mean ``value`` over the tokens of each boolean category, with document-bootstrap CIs.

    ``categories`` names columns of :func:`indicators` (default: all boolean
    ones, plus ``all``). A token can be in several categories; each category is
    bootstrapped with the same document draws (same seed).
    """
    ind = indicators(table, min_repeat=min_repeat, far=far)
    ind["all"] = True
    if categories is None:
        categories = ["all"] + [c for c in ind.columns if ind[c].dtype == bool and c != "all"]
    missing = [c for c in categories if c not in ind]
    if missing:
        raise AttnscopeError(f"unknown categories {missing}; known: {sorted(ind.columns)}")
    rows = []
    for c in categories:
        mask = ind[c].to_numpy(dtype=bool)
        if not mask.any():
            rows.append({"group": c, "n_tokens": 0, "n_docs": 0, "mean": np.nan, "ci_low": np.nan, "ci_high": np.nan})
            continue
        # every category resamples all documents (same seed): one design across categories
        r = _bootstrap_category(table, mask, value, n_boot=n_boot, ci=ci, seed=seed)
        r["group"] = c
        rows.append(r)
    out = pd.DataFrame(rows).rename(columns={"group": "category"})
    out[["n_tokens", "n_docs"]] = out[["n_tokens", "n_docs"]].astype(np.int64)
    return out[["category", "n_tokens", "n_docs", "mean", "ci_low", "ci_high"]]


def _bootstrap_category(table, mask, value, *, n_boot, ci, seed) -> dict:
    groups = np.where(mask, 0, -1)
    r = bootstrap_means(
        np.where(mask, table[value].to_numpy(dtype=float), 0.0),
        pd.Series(groups).where(groups >= 0).to_numpy(),
        table["doc_id"].to_numpy(),
        n_boot=n_boot, ci=ci, seed=seed,
    )
    return r.iloc[0].to_dict()


@dataclass
class RegressionResult:
    """OLS of the gap on category indicators with controls."""

    table: pd.DataFrame  # term, coef, se, ci_low, ci_high, p_value
    n_obs: int
    n_docs: int
    r_squared: float
    cov_type: str
    formula: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "n_obs": self.n_obs,
            "n_docs": self.n_docs,
            "r_squared": self.r_squared,
            "cov_type": self.cov_type,
            "formula": self.formula,
            "terms": self.table.to_dict(orient="records"),
            **self.extra,
        }

    def to_markdown(self) -> str:
        dropped = self.extra.get("dropped_constant")
        lines = [
            f"OLS: `{self.formula}`  ",
            f"n = {self.n_obs} tokens in {self.n_docs} documents, R² = {self.r_squared:.4f}, "
            f"standard errors: {self.cov_type}" + ("  " if dropped else ""),
            *([f"left out (a single value on these tokens): {', '.join(dropped)}"] if dropped else []),
            "",
            "| term | coef | se | 95% CI | p |",
            "| --- | ---: | ---: | --- | ---: |",
        ]
        for r in self.table.itertuples():
            lines.append(f"| {r.term} | {r.coef:.4f} | {r.se:.4f} | [{r.ci_low:.4f}, {r.ci_high:.4f}] | {r.p_value:.3g} |")
        return "\n".join(lines) + "\n"


def regress(
    table: pd.DataFrame,
    categories: Sequence[str] = ("content", "function", "open_bracket", "close_bracket", "repeated"),
    controls: Sequence[str] = CONTROLS,
    *,
    value: str = "gap",
    cov_type: str = "cluster",
    alpha: float = 0.05,
    min_repeat: int = MIN_REPEAT,
    far: int | None = None,
    drop_constant: bool = False,
) -> RegressionResult:
    """OLS ``value ~ 1 + categories + controls`` (statsmodels).

    Category indicators enter as 0/1; a category's coefficient is the mean
    difference in gap between its tokens and otherwise-equal tokens outside all
    listed categories (baseline), holding the controls fixed. ``cov_type``:
    'cluster' (default; errors clustered by document, since tokens of one
    document are not independent), 'HC1' or 'nonrobust'. Rows with a missing
    value are dropped; constant columns are rejected, or with ``drop_constant`` left out of the
    fit and listed in ``extra["dropped_constant"]`` (a short corpus has no repeats, say).
    """
    import statsmodels.api as sm

    ind = indicators(table, min_repeat=min_repeat, far=far)
    cols = list(categories) + list(controls)
    missing = [c for c in cols if c not in ind]
    if missing:
        raise AttnscopeError(f"regress: no column {missing}; known: {sorted(ind.columns)}")
    X = ind[cols].astype(float)
    y = table[value].astype(float)
    ok = X.notna().all(axis=1) & y.notna()
    X, y = X[ok], y[ok]
    const = [c for c in cols if X[c].nunique() < 2]
    if const and not drop_constant:
        raise AttnscopeError(f"regress: {const} take a single value on these tokens; leave them out of "
                             "categories=/controls=, or pass drop_constant=True")
    cols = [c for c in cols if c not in const]
    X = X[cols]
    Xc = sm.add_constant(X, has_constant="add")
    model = sm.OLS(y.to_numpy(), Xc)
    docs = table.loc[ok, "doc_id"]
    if cov_type == "cluster":
        groups = pd.factorize(docs)[0]
        fit = model.fit(cov_type="cluster", cov_kwds={"groups": groups})
    elif cov_type in ("HC0", "HC1", "HC2", "HC3", "nonrobust"):
        fit = model.fit(cov_type=cov_type)
    else:
        raise AttnscopeError(f"cov_type={cov_type!r}: choose 'cluster', 'HC1' or 'nonrobust'")
    ci = np.asarray(fit.conf_int(alpha=alpha))
    res = pd.DataFrame(
        {
            "term": list(Xc.columns),
            "coef": np.asarray(fit.params),
            "se": np.asarray(fit.bse),
            "ci_low": ci[:, 0],
            "ci_high": ci[:, 1],
            "p_value": np.asarray(fit.pvalues),
        }
    )
    return RegressionResult(
        table=res,
        n_obs=int(fit.nobs),
        n_docs=int(docs.nunique()),
        r_squared=float(fit.rsquared),
        cov_type=cov_type,
        formula=f"{value} ~ 1" + "".join(f" + {c}" for c in cols),
        extra={"dropped_constant": const} if const else {},
    )


def _default_filters(split_repeats: bool = False) -> dict[str, Callable[[pd.DataFrame], pd.Series]]:
    filters = {
        "all": lambda i: pd.Series(True, index=i.index),
        "content_not_repeated": lambda i: i["content"] & ~i["repeated"],
        "function_not_repeated": lambda i: i["function"] & ~i["repeated"],
        "repeated": lambda i: i["repeated"],
        "open_bracket": lambda i: i["open_bracket"],
        "close_bracket": lambda i: i["close_bracket"],
    }
    if split_repeats:
        filters["repeated_near"] = lambda i: i["repeated_near"]
        filters["repeated_far"] = lambda i: i["repeated_far"]
        filters["not_repeated_far"] = lambda i: ~i["repeated_far"]
    return filters


DEFAULT_FILTERS = tuple(_default_filters())


def filtered_losses(
    table: pd.DataFrame,
    filters: Mapping[str, Callable[[pd.DataFrame], pd.Series]] | None = None,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    min_repeat: int = MIN_REPEAT,
    far: int | None = None,
) -> pd.DataFrame:
    """Mean loss of each model, and the gap with its CI, over filtered token sets.

    ``filters`` maps a name to a function of the :func:`indicators` frame
    returning a boolean mask (default: all, content_not_repeated,
    function_not_repeated, repeated, open_bracket, close_bracket; with ``far``
    also repeated_near, repeated_far and not_repeated_far).
    """
    ind = indicators(table, min_repeat=min_repeat, far=far)
    filters = filters or _default_filters(far is not None)
    rows = []
    for name, fn in filters.items():
        try:
            mask = np.asarray(fn(ind), dtype=bool)
        except KeyError as e:
            raise AttnscopeError(f"filter {name!r} needs column {e}; annotate the table first") from e
        row = {"filter": name, "n_tokens": int(mask.sum())}
        for col in ("loss_a", "loss_b"):
            if col in table:
                row[f"mean_{col}"] = float(table.loc[mask, col].mean()) if mask.any() else np.nan
        if mask.any():
            b = _bootstrap_category(table, mask, "gap", n_boot=n_boot, ci=ci, seed=seed)
            row.update(mean_gap=b["mean"], ci_low=b["ci_low"], ci_high=b["ci_high"])
        else:
            row.update(mean_gap=np.nan, ci_low=np.nan, ci_high=np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def gap_by_repeat(
    table: pd.DataFrame,
    bins: Sequence[float] = REPEAT_BINS,
    *,
    value: str = "gap",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    far: int | None = None,
) -> pd.DataFrame:
    """Mean gap per repeat-length bin (left-closed ``[lo, hi)``), document-bootstrap CIs.

    With ``far`` = W the tokens are split by ``repeat_distance`` into ``near``
    (<= W; with repeat_len 0 always here) and ``far`` (> W) rows, marked in a
    ``distance`` column ("all" without ``far``).
    """
    if far is not None:
        if "repeat_distance" not in table:
            raise AttnscopeError("far= needs the repeat_distance column; annotate the table first")
        beyond = table["repeat_distance"].to_numpy() > far
        parts = []
        for name, sel in (("near", ~beyond), ("far", beyond)):
            if sel.any():
                r = gap_by_repeat(table[sel], bins, value=value, n_boot=n_boot, ci=ci, seed=seed)
                r["distance"] = name
                parts.append(r)
        return pd.concat(parts, ignore_index=True)
    edges = np.asarray(bins, dtype=float)
    b = np.searchsorted(edges, table["repeat_len"].to_numpy(dtype=float), side="right") - 1
    labels = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if np.isinf(hi):
            labels.append(f"{int(lo)}+")
        elif hi - lo == 1:
            labels.append(f"{int(lo)}")
        else:
            labels.append(f"{int(lo)}-{int(hi) - 1}")
    valid = (b >= 0) & (b < len(labels))
    r = bootstrap_means(
        table[value].to_numpy(dtype=float)[valid], b[valid], table["doc_id"].to_numpy()[valid],
        n_boot=n_boot, ci=ci, seed=seed,
    )
    r["bin"] = [labels[int(g)] for g in r["group"]]
    r["repeat_lo"] = [edges[int(g)] for g in r["group"]]
    r["distance"] = "all"
    return r[["bin", "repeat_lo", "distance", "n_tokens", "n_docs", "mean", "ci_low", "ci_high"]]
