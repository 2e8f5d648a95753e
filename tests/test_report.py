"""Report: statistics against independent computations, tables joined with the registry, figures
from a store of tiny-model results, the plotly views, the CLI, the HTML page in headless
Chromium, and the example notebook."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats as sps

import attnscope
from attnscope.errors import AttnscopeError, MemoryGuardError
from attnscope.report import figures as F
from attnscope.report import interactive as I
from attnscope.report import stats as S
from attnscope.report import tables as T

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- fixed data
@pytest.fixture(scope="module")
def fixed():
    """Fixed data with a missing value: y = 2 + 1.5 x1 - 0.7 x2 + noise (seeded)."""
    rng = np.random.default_rng(12)
    n = 15
    df = pd.DataFrame({"model": [f"m{i}" for i in range(n)], "x1": rng.normal(size=n),
                       "x2": rng.integers(0, 4, n).astype(float)})
    df["y"] = 2 + 1.5 * df["x1"] - 0.7 * df["x2"] + rng.normal(scale=0.8, size=n)
    df.loc[3, "x2"] = np.nan  # listwise deletion leaves n = 14
    return df


def _lstsq(y, X):
    Xc = np.column_stack([np.ones(len(y)), X])
    beta, *_ = np.linalg.lstsq(Xc, y, rcond=None)
    return Xc, beta


def test_ols_matches_numpy_least_squares_and_manual_loo(fixed):
    fit = S.ols(fixed, "y", ["x1", "x2"])
    d = fixed.dropna()
    y, X = d["y"].to_numpy(), d[["x1", "x2"]].to_numpy()
    n, k = len(y), 2
    Xc, beta = _lstsq(y, X)
    resid = y - Xc @ beta
    ss_res, ss_tot = resid @ resid, ((y - y.mean()) ** 2).sum()
    r2 = 1 - ss_res / ss_tot
    assert fit.n == n == 14
    assert fit.r2 == pytest.approx(r2, abs=1e-12)
    assert fit.adj_r2 == pytest.approx(1 - (1 - r2) * (n - 1) / (n - k - 1), abs=1e-12)
    # coefficients and t-based 95% intervals
    sigma2 = ss_res / (n - k - 1)
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(Xc.T @ Xc)))
    t = sps.t.ppf(0.975, n - k - 1)
    for i, term in enumerate(["const", "x1", "x2"]):
        c = fit.coefficient(term)
        assert c["estimate"] == pytest.approx(beta[i], abs=1e-10)
        assert c["ci_low"] == pytest.approx(beta[i] - t * se[i], abs=1e-10)
        assert c["ci_high"] == pytest.approx(beta[i] + t * se[i], abs=1e-10)
    # leave-one-out: refit without row i, predict row i
    press = 0.0
    for i in range(n):
        keep = np.arange(n) != i
        _, b = _lstsq(y[keep], X[keep])
        press += (y[i] - (b[0] + X[i] @ b[1:])) ** 2
    assert fit.loo_r2 == pytest.approx(1 - press / ss_tot, abs=1e-10)
    assert fit.loo_r2 < fit.r2  # out-of-sample fit is worse than in-sample
    assert fit.models == list(d["model"])


def test_degenerate_fits_say_why(fixed):
    few = S.ols(fixed.head(3), "y", ["x1", "x2"])
    assert math.isnan(few.r2) and "too few" in few.note
    const = S.ols(fixed.assign(c=1.0), "y", ["x1", "c"])
    assert math.isnan(const.r2) and "c constant" in const.note
    with pytest.raises(AttnscopeError, match="sink_mass"):
        S.ols(fixed, "y", ["sink_mass"])


def test_correlations_match_numpy_and_bootstrap_is_seeded(fixed):
    c = S.correlation(fixed, "x1", "y", n_resamples=999, seed=3)
    d = fixed.dropna(subset=["x1", "y"])
    assert c.n == len(d) == 15
    assert c.pearson_r == pytest.approx(np.corrcoef(d["x1"], d["y"])[0, 1], abs=1e-12)
    ranks = np.corrcoef(sps.rankdata(d["x1"]), sps.rankdata(d["y"]))[0, 1]
    assert c.spearman_rho == pytest.approx(ranks, abs=1e-12)
    assert c.pearson_ci[0] < c.pearson_r < c.pearson_ci[1] <= 1
    assert c.spearman_ci[0] < c.spearman_rho < c.spearman_ci[1] <= 1
    again = S.correlation(fixed, "x1", "y", n_resamples=999, seed=3)
    other = S.correlation(fixed, "x1", "y", n_resamples=999, seed=4)
    assert again.pearson_ci == c.pearson_ci
    assert other.pearson_ci != c.pearson_ci
    # the CI is scipy's paired BCa bootstrap with the same generator
    ref = sps.bootstrap((d["x1"].to_numpy(), d["y"].to_numpy()), lambda a, b: sps.pearsonr(a, b).statistic,
                        paired=True, vectorized=False, n_resamples=999, rng=np.random.default_rng(3))
    assert c.pearson_ci == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    ref = sps.bootstrap((d["x1"].to_numpy(), d["y"].to_numpy()), lambda a, b: sps.spearmanr(a, b).statistic,
                        paired=True, vectorized=False, n_resamples=999, rng=np.random.default_rng(3))
    assert c.spearman_ci == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    # ties (a discrete predictor such as the harmful-choice count) use average ranks, as spearmanr does
    t = S.correlation(fixed, "x2", "y", n_resamples=199, seed=1)
    dd = fixed.dropna(subset=["x2"])
    assert t.spearman_rho == pytest.approx(sps.spearmanr(dd["x2"], dd["y"]).statistic, abs=1e-12)


def test_registry_only_analyses_use_all_26_models():
    table = T.model_table(None)
    assert len(table) == 26 and table["in_registry"].all()
    rep = S.run_analyses(table, "helmet_32k", n_resamples=199)
    count = rep.fits[0]
    y, x = table["helmet_32k"].to_numpy(float), table["harmful_count"].to_numpy(float)
    Xc, beta = _lstsq(y, x[:, None])
    r2 = 1 - ((y - Xc @ beta) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert count.n == 26 and count.r2 == pytest.approx(r2, abs=1e-12)
    assert count.coefficient("harmful_count")["estimate"] < 0  # more harmful choices, lower HELMET
    four = rep.fits[1]
    assert [c["term"] for c in four.coefficients] == ["const", *T.INDICATORS]
    assert len(rep.fits) == 2 and len(rep.correlations) == 1  # no metric without a store
    # scores with gaps: rows without the score are left out, n says how many remain
    ruler = S.run_analyses(table, "ruler_64k", n_resamples=199)
    assert ruler.fits[0].n == table["ruler_64k"].notna().sum() < 26
    d = json.loads(rep.to_json())  # strict JSON: NaN became null
    assert d["fits"][0]["n"] == 26 and "olmpool.com" in d["provenance"]
    md = rep.to_markdown()
    assert "helmet_32k ~ harmful_count" in md and "| I_pre_32kv_8k_12k |" in md
    with pytest.raises(AttnscopeError, match="unknown score"):
        S.run_analyses(table, "helmet_128k")


def test_registry_names_map_short_names_hub_ids_and_folders():
    reg = T.registry_table()
    assert T.registry_name("J_pre_16kv_8k_14k", reg) == "J_pre_16kv_8k_14k"
    assert T.registry_name("allenai/j_PRE_16kv_8k_14k", reg) == "J_pre_16kv_8k_14k"
    assert T.registry_name("/ckpts/J_pre_16kv_8k_14k/", reg) == "J_pre_16kv_8k_14k"
    assert T.registry_name("J_pre", reg) is None  # prefixes never match
    assert T.registry_name("smollm2", reg) is None


def test_revision_choice_and_order():
    revs = ["step1000", "longcontext-step2385", "step34000", "longcontext-step500"]
    assert T.choose_revision(revs) == "longcontext-step2385"
    assert T.choose_revision(["step1000", "step34000"]) == "step34000"
    assert sorted(revs, key=T.revision_order) == ["step1000", "step34000", "longcontext-step500",
                                                  "longcontext-step2385"]


# ----------------------------------------------------------------------------- tiny-model data
# Tiny random models, labelled with OlmPool names so the join with the registry can be exercised
# (their attention numbers are the tiny models', not OlmPool's), plus one model outside OlmPool.
LABELS = {"llama": "allenai/I_pre_32kv_8k_12k", "qwen3": "K_post_HQK_8kv_12k",
          "olmo2": "H_post_LQK_32kv_8k_11k", "olmo3": "tiny-olmo3"}
REVISIONS = ["step1000", "step34000", "longcontext-step2385"]
LENGTHS, DEPTHS = [48, 96], [0.25, 0.75]
QUERY_BINS = 4


def _ids(revision_index: int, length: int, depth: float) -> list[int]:
    rng = np.random.default_rng(1000 * revision_index + length + int(100 * depth))
    return rng.integers(3, 120, size=length).tolist()


def _needle_result(lm, revision_index: int, length: int, depth: float) -> xr.Dataset:
    ids = _ids(revision_index, length, depth)
    start = 16 + int(depth * (length - 24))
    ds = attnscope.analyze(lm, token_ids=ids, spans={"needle": (start, start + 6)}, query_bins=QUERY_BINS,
                           metrics=("sink_mass", "token0_mass", "token0_importance", "entropy", "mean_distance"))
    return ds.expand_dims(length=[length], depth=[depth])


@pytest.fixture(scope="module")
def results(tiny):
    """{(model label, revision, length, depth): Dataset} from tiny models of four families."""
    return {(label, rev, L, d): _needle_result(lm, r, L, d) for lm, label, r, rev, L, d in _grid(tiny)}


def _grid(tiny):
    """(model, label, revision index, revision, length, depth) for every cell of the test grid."""
    for kind, label in LABELS.items():
        lm = tiny(kind)
        for r, rev in enumerate(REVISIONS):
            for L in LENGTHS:
                for d in DEPTHS:
                    yield lm, label, r, rev, L, d


@pytest.fixture(scope="module")
def store_path(results, tmp_path_factory):
    StoreWriter = pytest.importorskip("attnscope.store.store", reason="the batch store is not in this "
                                      "attnscope yet").StoreWriter
    path = tmp_path_factory.mktemp("store") / "tiny.h5"
    with StoreWriter(path, consolidate_ratio=0) as w:
        for i, ((label, rev, L, d), ds) in enumerate(results.items()):
            params = {"length": L, "depth": d, "query_bins": QUERY_BINS}
            w.put(f"task{i:03d}", ds.assign_attrs(
                task_model=label, task_revision=rev, task_probe="niah_tiny", task_probe_hash="h0",
                task_params=json.dumps(params, sort_keys=True), task_dtype="float32"))
    return path


def test_figures_from_datasets_have_their_axes(results):
    ds = results[("allenai/I_pre_32kv_8k_12k", "longcontext-step2385", 96, 0.25)]
    da = ds["sink_mass"].isel(length=0, depth=0).assign_attrs(model="tiny llama", revision="r")
    fig = F.fig_head_heatmap(da, "sink_mass")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("query head", "layer")
    assert "tiny llama" in ax.get_title() and ax.images[0].get_array().shape == (4, 4)
    prof = pd.DataFrame({"model": "tiny llama", "layer": ds.layer.values,
                         "sink_mass": ds["sink_mass"].mean(["head", "length", "depth"]).values})
    fig = F.fig_layer_profiles(prof, "sink_mass")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "layer" and ax.get_ylabel().startswith("sink mass")
    assert np.allclose(ax.lines[0].get_ydata(), prof["sink_mass"])
    fig = F.fig_score_vs_count(T.model_table(None), "ruler_64k")
    ax = fig.axes[0]
    assert ax.get_title() == "RULER 64K score vs harmful-choice count"
    assert ax.get_xlabel() == "harmful architectural choices (count)"
    assert sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets")) >= 24


def test_tables_from_a_store_join_the_registry(store_path, results):
    table = T.model_table(store_path)
    assert set(table["model"]) == set(LABELS.values())
    row = table.set_index("model").loc["allenai/I_pre_32kv_8k_12k"]
    assert row["registry_name"] == "I_pre_32kv_8k_12k" and row["revision"] == "longcontext-step2385"
    assert row["helmet_32k"] == 54.4 and row["harmful_count"] == 0
    # the store's sink mass is the mean over layers, heads and the probe's grid of that revision
    parts = [results[("allenai/I_pre_32kv_8k_12k", "longcontext-step2385", L, d)]["sink_mass"].values
             for L in LENGTHS for d in DEPTHS]
    assert row["sink_mass"] == pytest.approx(np.mean(parts), rel=1e-6)
    needle = np.mean([results[("allenai/I_pre_32kv_8k_12k", "longcontext-step2385", L, d)]["span_mass"]
                      .sel(span="needle").values for L in LENGTHS for d in DEPTHS])
    assert row["needle_share"] == pytest.approx(needle, rel=1e-6)
    outside = table.set_index("model").loc["tiny-olmo3"]
    assert not outside["in_registry"] and math.isnan(outside["helmet_32k"])
    rep = S.run_analyses(table, n_resamples=99)
    names = [f.name for f in rep.fits]
    assert "helmet_32k ~ sink_mass + harmful_count" in names and rep.fits[2].n == 3
    assert any("tiny-olmo3" in n for n in rep.notes)
    ck = T.checkpoint_table(store_path)
    assert list(ck[ck["model"] == "tiny-olmo3"]["revision"]) == REVISIONS


def test_every_figure_from_the_store(store_path, tmp_path):
    out = tmp_path / "figs"
    results = F.make_all(store_path, out, command="attnscope figures --store S --out D")
    assert all(not isinstance(r, str) for r in results.values()), results
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(F.FIGURES) - 2 + 2 * len(LABELS)  # head heatmaps, query profiles: one per model
    from PIL import Image

    for png in pngs:
        im = Image.open(png)
        assert np.asarray(im.convert("L")).std() > 5  # not blank
        assert str(store_path.absolute()) in im.info["Source"] and "attnscope figures" in im.info["Comment"]
        side = json.loads(png.with_suffix(".json").read_text())
        assert side["store"] == str(store_path.absolute()) and side["command"].startswith("attnscope figures")
        pdf = png.with_suffix(".pdf").read_bytes()
        assert f"/Keywords (store: {store_path.absolute()})".encode() in pdf
        assert b"/Creator (attnscope figures --store S --out D)" in pdf
    needle = json.loads((out / "needle_share.json").read_text())
    assert {r["depth"] for r in needle["data"]} == set(DEPTHS)
    # the drawing functions return figures with the expected axes
    [(stem, data)] = F.figure_data("needle_share", store_path)
    fig = F.fig_needle_share(data)
    assert [a.get_title() for a in fig.axes] == ["needle share vs depth", "needle share vs length"]
    assert len(fig.axes[0].lines) == len(LABELS)
    [(stem, data)] = F.figure_data("checkpoints", store_path)
    fig = F.fig_checkpoints(data)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == REVISIONS
    [(stem, data)] = F.figure_data("score_vs_sink", store_path)
    fig = F.fig_score_vs_metric(data, "helmet_32k", "sink_mass")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "HELMET 32K score" and ax.get_xlabel().startswith("sink mass")
    assert sum(len(c.get_offsets()) for c in ax.collections) == 3  # the three OlmPool-labelled models


def test_figure_script_and_cli(store_path, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "figures" / "fig_layer_profiles.py"), "--store", str(store_path),
                        "--out", str(tmp_path / "a")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    side = json.loads((tmp_path / "a" / "layer_profiles_sink_mass.json").read_text())
    assert side["command"].startswith("python figures/fig_layer_profiles.py --store")
    from typer.testing import CliRunner

    from attnscope.cli import app

    res = CliRunner().invoke(app, ["report", "--store", str(store_path), "--out", str(tmp_path / "r"), "--json",
                                   "--n-resamples", "99"])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "r" / "report.json").read_text())
    assert d["command"].startswith("attnscope report --store")
    fits = {f["name"]: f for f in d["fits"]}
    # architecture fits cover every OlmPool model; metric fits the store's 3 scored models, with the
    # count refitted on those same 3 for comparison
    assert fits["helmet_32k ~ harmful_count (all OlmPool models)"]["n"] == 26
    assert fits["helmet_32k ~ sink_mass"]["n"] == 3 and fits["helmet_32k ~ sink_mass"]["predictors"] == ["sink_mass"]
    assert fits["helmet_32k ~ harmful_count (the 3 models with sink_mass)"]["n"] == 3
    for name in ("report.md", "fits.csv", "correlations.csv", "models.csv", "report.html"):
        assert (tmp_path / "r" / name).stat().st_size > 100
    fits = pd.read_csv(tmp_path / "r" / "fits.csv")
    assert set(fits["term"]) >= {"const", "harmful_count", "sink_mass", "needle_share", *T.INDICATORS}
    res = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--registry-only" in res.output


# ------------------------------------------------------------------------ sink rate (Gu et al.)
@pytest.fixture(scope="module")
def eager_alpha0(tiny):
    """alpha_0 per (model label, revision, length, depth): [layer, head], from eager attention
    maps of the same token ids (key 0 is seen by all T queries: alpha_0 = sum_i A_i0 / T)."""
    import torch

    from reference import eager_maps

    out = {}
    for lm, label, r, rev, L, d in _grid(tiny):
        maps = eager_maps(lm.model, torch.tensor([_ids(r, L, d)]))
        out[(label, rev, L, d)] = np.stack([maps[k][0, :, :, 0].sum(-1) / L for k in sorted(maps)])
    return out


def _epsilon(alpha: dict) -> float:
    """A threshold inside the tiny models' alpha_0 range, away from every value (random tiny
    models put about ln(T)/T on token 0, below Gu et al.'s 0.3)."""
    values = np.sort(np.concatenate([a.ravel() for a in alpha.values()]))
    eps = float(np.quantile(values, 0.6))
    assert np.abs(values - eps).min() > 1e-5  # eager and streaming agree to ~1e-6: no value flips
    return eps


def test_sink_rate_in_the_tables_equals_eager_maps(store_path, eager_alpha0):
    eps = _epsilon(eager_alpha0)
    final = REVISIONS[-1]
    table = T.model_table(store_path, sink_epsilon=eps).set_index("model")
    assert table.attrs["sink_epsilon"] == eps
    for label in LABELS.values():
        hits = [eager_alpha0[(label, final, L, d)] > eps for L in LENGTHS for d in DEPTHS]
        assert table.loc[label, "sink_rate"] == pytest.approx(np.mean(hits), abs=1e-12)
    rates = table["sink_rate"].to_numpy()
    assert 0 < rates.min() < rates.max() < 1  # the threshold separates the models
    # per checkpoint, and per layer
    ck = T.checkpoint_table(store_path, "sink_rate", sink_epsilon=eps)
    for _, row in ck.iterrows():
        want = np.mean([eager_alpha0[(row["model"], row["revision"], L, d)] > eps for L in LENGTHS for d in DEPTHS])
        assert row["sink_rate"] == pytest.approx(want, abs=1e-12)
    prof = T.layer_profiles(store_path, sink_epsilon=eps)
    label = LABELS["olmo3"]
    got = prof[(prof.model == label) & (prof.revision == final)].sort_values("layer")["sink_rate"].to_numpy()
    want = np.mean([eager_alpha0[(label, final, L, d)] > eps for L in LENGTHS for d in DEPTHS], axis=(0, 2))
    np.testing.assert_allclose(got, want, atol=1e-12)
    # Gu et al.'s default threshold: tiny random models have no head above 0.3
    assert (T.model_table(store_path)["sink_rate"] == 0).all()
    with pytest.raises(AttnscopeError, match="epsilon"):
        T.sink_rate_rows(store_path, 1.2)


def test_sink_rate_statistics_and_figures_next_to_sink_mass(store_path, eager_alpha0):
    eps = _epsilon(eager_alpha0)
    table = T.model_table(store_path, sink_epsilon=eps)
    rep = S.run_analyses(table, "helmet_32k", n_resamples=99)
    fits = {f.name: f for f in rep.fits}
    scored = table.dropna(subset=["helmet_32k"])
    assert fits["helmet_32k ~ sink_rate"].n == 3 == len(scored)
    _, beta = _lstsq(scored["helmet_32k"].to_numpy(float), scored[["sink_rate"]].to_numpy(float))
    assert fits["helmet_32k ~ sink_rate"].coefficient("sink_rate")["estimate"] == pytest.approx(beta[1])
    assert "helmet_32k ~ sink_rate + harmful_count" in fits
    cor = next(c for c in rep.correlations if c.x == "sink_rate")
    assert cor.n == 3 and (cor.note or math.isclose(cor.pearson_r, np.corrcoef(scored["sink_rate"],
                                                                           scored["helmet_32k"])[0, 1]))
    assert "sink_rate" in rep.table.columns and any("alpha_0 >" in n for n in rep.notes)
    # static: sink mass and sink rate side by side, sharing the score axis
    fig = F.fig_score_vs_metrics(table, "helmet_32k", ("sink_mass", "sink_rate"))
    mass, rate = fig.axes[:2]
    assert mass.get_ylabel() == "HELMET 32K score" and rate.get_xlabel() == f"sink rate (heads with α₀ > {eps:g})"
    xs = np.sort(np.concatenate([c.get_offsets()[:, 0] for c in rate.collections if len(c.get_offsets())]))
    np.testing.assert_allclose(xs, np.sort(scored["sink_rate"].to_numpy(float)))
    assert mass.get_shared_y_axes().joined(mass, rate)
    # interactive: the same two panels
    view = I.score_vs_sinks(table, "helmet_32k")
    assert {tr.xaxis for tr in view.data} == {"x", "x2"}
    got = np.sort(np.concatenate([np.asarray(tr.x, float) for tr in view.data if tr.xaxis == "x2"]))
    np.testing.assert_allclose(got, np.sort(scored["sink_rate"].to_numpy(float)))
    assert "sink_rate" in view.data[-1].hovertemplate


# ------------------------------------------------------------------------ query-resolved profiles
def test_query_profile_is_the_group_mean_of_eager_bins(tiny, single_thread):
    import torch

    from reference import eager_maps, reference_metrics

    lm = tiny("llama")
    ids = np.random.default_rng(5).integers(3, 120, size=80).tolist()
    ds = attnscope.analyze(lm, token_ids=ids, metrics=("sink_mass", "entropy", "position_profile"), query_bins=5)
    df = ds.attnscope.query_profile_data(groups=2)
    assert list(dict.fromkeys(df["group"])) == ["L0–1", "L2–3"] and len(df) == 2 * 2 * 5
    maps = eager_maps(lm.model, torch.tensor([ids]))
    starts = ds.query_bin.values
    edges = list(starts) + [80]
    assert df["query_start"].tolist()[:5] == list(starts) and df["query_end"].tolist()[:5] == edges[1:]
    for (metric, group), g in df.groupby(["metric", "group"]):
        layers = [int(v) for v in g["layers"].iloc[0].split(",")]
        want = [np.mean([reference_metrics(maps[L][0], np.arange(edges[b], edges[b + 1]))[metric].mean()
                         for L in layers]) for b in range(5)]
        np.testing.assert_allclose(g.sort_values("query_bin")["value"].to_numpy(), want, atol=2e-5)
        assert g["n_queries"].tolist() == [edges[b + 1] - edges[b] for b in range(5)]
    assert [g for g, _ in T.layer_groups(ds.layer.values, 3)] == ["early (L0–1)", "middle (L2)", "late (L3)"]
    assert len(ds.attnscope.query_profile_data(groups="layer")["group"].unique()) == 4
    custom = ds.attnscope.query_profile_data("sink_mass", groups={"first": [0], "rest": [1, 2, 3]})
    assert set(custom["group"]) == {"first", "rest"}
    # figures: one panel per metric, one line per group, the table's values
    fig = ds.attnscope.query_profile(static=True)
    assert len(fig.axes) == 2 and all(len(ax.lines) == 3 for ax in fig.axes)
    early = df[(df.metric == "sink_mass")]
    groups3 = ds.attnscope.query_profile_data(groups=3)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(),
                               groups3[(groups3.metric == "sink_mass") & (groups3.group == "early (L0–1)")]["value"])
    assert fig.axes[0].get_xlabel() == "query position (tokens, bin centre)"
    assert fig.axes[1].get_ylabel().startswith("attention entropy") and early["value"].notna().all()
    view = ds.attnscope.query_profile()
    assert len(view.data) == 2 * 3 and "layers" in view.data[0].hovertemplate and "queries" in view.data[0].hovertemplate
    np.testing.assert_allclose(np.asarray(view.data[0].y, float), fig.axes[0].lines[0].get_ydata())
    # clear errors
    plain = attnscope.analyze(lm, token_ids=ids, metrics=("sink_mass",))
    with pytest.raises(AttnscopeError, match="query_bins=N"):
        plain.attnscope.query_profile()
    with pytest.raises(AttnscopeError, match="no mean_distance_by_query"):
        ds.attnscope.query_profile_data("mean_distance")
    with pytest.raises(AttnscopeError, match="profile"):
        ds.attnscope.query_profile_data("position_profile")
    with pytest.raises(AttnscopeError, match="groups"):
        ds.attnscope.query_profile_data(groups=9)
    # a padded batch: rows of one length share their bins and are averaged; other lengths refuse
    other = np.random.default_rng(6).integers(3, 120, size=80).tolist()
    batch = attnscope.analyze(lm, token_ids=[ids, other], metrics=("sink_mass",), query_bins=5)
    both = batch.attnscope.query_profile_data("sink_mass")
    alone = attnscope.analyze(lm, token_ids=other, metrics=("sink_mass",), query_bins=5)
    mean = (ds.attnscope.query_profile_data("sink_mass")["value"].to_numpy()
            + alone.attnscope.query_profile_data("sink_mass")["value"].to_numpy()) / 2
    np.testing.assert_allclose(both["value"].to_numpy(), mean, atol=1e-5)
    ragged = attnscope.analyze(lm, token_ids=[ids, other[:60]], metrics=("sink_mass",), query_bins=5)
    with pytest.raises(AttnscopeError, match="isel"):
        ragged.attnscope.query_profile_data("sink_mass")
    row = ragged.isel(sequence=1).attnscope.query_profile_data("sink_mass")
    short = attnscope.analyze(lm, token_ids=other[:60], metrics=("sink_mass",), query_bins=5)
    want = short.attnscope.query_profile_data("sink_mass")
    np.testing.assert_allclose(row["value"].to_numpy(), want["value"].to_numpy(), atol=1e-5)
    assert row["query_end"].tolist() == want["query_end"].tolist() and want["query_end"].iloc[-1] == 60


def test_store_query_profiles_average_the_grid(store_path, results):
    profiles = dict(T.query_profiles(store_path))
    label, final, L = LABELS["qwen3"], REVISIONS[-1], max(LENGTHS)
    df = profiles[(label, final, "niah_tiny", L)]
    # independent: mean over the probe's depths, then over the group's layers and the heads
    stack = np.stack([results[(label, final, L, d)]["sink_mass_by_query"].isel(length=0, depth=0).values
                      for d in DEPTHS])  # [depth, layer, head, bin]
    for group, layers in T.layer_groups(range(4), 3):
        got = df[(df.metric == "sink_mass") & (df.group == group)].sort_values("query_bin")["value"].to_numpy()
        np.testing.assert_allclose(got, stack[:, layers].mean(axis=(0, 1, 2)), rtol=1e-6)
    assert set(df["length"]) == {L} and df.attrs["n_tasks"] == len(DEPTHS)
    [(stem, data)] = [(s, d) for s, d in F.figure_data("query_profiles", store_path) if label.rsplit("/")[-1] in s]
    fig = F.fig_query_profile(data)
    assert f"{L:,} tokens" in fig._suptitle.get_text() and len(fig.axes[0].lines) == 3


def test_plotly_views_carry_hover_details(results, tiny):
    ds = results[("H_post_LQK_32kv_8k_11k", "step1000", 48, 0.25)].assign_attrs(model="tiny olmo2",
                                                                                revision="step1000")
    fig = ds.attnscope.sink_heatmap()
    tr = fig.data[0]
    assert tr.type == "heatmap" and np.asarray(tr.z).shape == (4, 4)
    for word in ("model", "revision", "layer", "head", "sink_mass"):
        assert word in tr.hovertemplate
    assert tr.customdata[0][0][0] == "tiny olmo2"
    assert fig.layout.xaxis.title.text == "query head"
    assert ds.attnscope.heatmap("span_mass", span="needle").data[0].type == "heatmap"
    mpl = ds.attnscope.sink_heatmap(static=True)
    assert mpl.axes[0].get_ylabel() == "layer"
    prof = ds.attnscope.layer_profile()
    assert list(prof.data[0].x) == [0, 1, 2, 3]
    # pattern viewer: token labels on both axes, a slider step per layer x head
    lm = tiny("llama")
    ids = [5, 17, 33, 17, 60, 2, 9, 11]
    pat = attnscope.analyze(lm, token_ids=ids, metrics=("pattern",), min_query_position=0)
    tokens = [f"t{i}" for i in ids]
    view = pat.attnscope.pattern_viewer(tokens)
    hm = view.data[0]
    assert list(hm.x) == [f"{i}: t{t}" for i, t in enumerate(ids)]
    assert len(hm.y) == len(pat["query"]) and hm.y[-1] == f"7: t{ids[-1]}"
    assert len(view.layout.sliders[0].steps) == 4 * 4
    assert np.allclose(np.asarray(hm.z, float), pat["pattern"].isel(layer=0, head=0).values, equal_nan=True)
    with pytest.raises(AttnscopeError, match="token labels"):
        pat.attnscope.pattern_viewer(tokens[:-1])
    with pytest.raises(MemoryGuardError):
        I.pattern_viewer(pat, tokens, limit=10)


def test_html_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    from attnscope.report.html import write_report

    paths = write_report(None, tmp_path / "r", score="helmet_32k", n_resamples=199, command="test")
    page = paths["html"]
    text = page.read_text()
    # self-contained: no external script, style sheet or image; plotly.js inlined
    assert not re.findall(r"<(?:script|link|img|iframe)[^>]*(?:src|href)\s*=\s*[\"']?(?:https?:)?//", text)
    assert text.count("<script") >= 2 and "Plotly.newPlot" in text
    shot = tmp_path / "shot.png"
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--no-first-run", "--disable-extensions", "--enable-logging=stderr", "--v=0",
                        f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,1400",
                        "--virtual-time-budget=5000", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert shot.exists(), r.stderr[-2000:]
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    from PIL import Image

    px = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert px.std() > 10  # text, tables and the rendered plot
    # the plotly figure itself drew: coloured (non-grey) pixels of the QK-norm palette
    colourful = (px.max(axis=2) - px.min(axis=2)) > 60
    assert colourful.sum() > 200


def test_example_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    nb = nbformat.read(ROOT / "attnscope" / "data" / "notebooks" / "quickstart.ipynb", as_version=4)  # shipped
    # a kernel on this interpreter (the venv's) that imports this checkout's attnscope
    kdir = tmp_path / "jupyter" / "kernels" / "attnscope-test"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "attnscope test", "language": "python", "env": {"PYTHONPATH": str(ROOT)}}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="attnscope-test",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    # the plot cells produced plotly figures, the static cell a PNG
    assert sum("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs) >= 5
    assert any("image/png" in o.get("data", {}) for o in outputs)


# ------------------------------------------------------------------- the real pipeline's tasks
@pytest.fixture(scope="module")
def pipeline_store(tmp_path_factory):
    """A store written by attnscope.extract (natural-text probe) from tiny models in folders named
    after OlmPool models, plus run_probe needle tasks (decode off) committed with StoreWriter."""
    store_mod = pytest.importorskip("attnscope.store.store", reason="the batch store is not in this attnscope")
    from attnscope.probing import load_spec
    from attnscope.testing import make_tiny_model

    base = tmp_path_factory.mktemp("pipeline")
    folders = {}
    for kind, name in (("llama", "I_pre_32kv_8k_12k"), ("qwen3", "K_post_HQK_8kv_12k"),
                       ("olmo2", "H_post_LQK_32kv_8k_11k")):
        folders[name] = make_tiny_model(kind, base / name, max_position_embeddings=1024) or base / name
    text = (ROOT / "attnscope" / "data" / "probes" / "natural_text.toml").read_text()
    (base / "prose.toml").write_text(text.replace('name = "natural_text"', 'name = "prose_tiny"')
                                     .replace("lengths = [512, 1024, 2048, 4096, 8192]", "lengths = [64, 128]"))
    niah = (ROOT / "attnscope" / "data" / "probes" / "niah_single.toml").read_text()
    (base / "niah.toml").write_text(niah.replace('name = "niah_single"', 'name = "niah_tiny"')
                                    .replace("depth_tolerance = 0.05", "depth_tolerance = 0.2"))
    store = base / "pipeline.h5"
    rep = attnscope.extract([str(base / n) for n in folders], None, [str(base / "prose.toml")], store,
                            progress=False, query_bins=4)
    assert rep.succeeded == 3 * 2 * 2 and not rep.failures
    spec = load_spec(base / "niah.toml")
    needles = {}
    with store_mod.StoreWriter(store, consolidate_ratio=0) as w:
        for i, name in enumerate(folders):
            lm = attnscope.load(str(base / name))
            for L in (320, 448):
                ds = attnscope.run_probe(lm, spec, lengths=[L], depths=[0.25, 0.75], seeds=[0], decode=False)
                for d in (0.25, 0.75):
                    one = ds.sel(length=[L], depth=[d])
                    needles[(name, L, d)] = one
                    w.put(f"niah{i}{L}{int(d * 100)}", one.assign_attrs(
                        task_model=str(base / name), task_revision="", task_probe="niah_tiny",
                        task_probe_hash=spec.content_hash, task_params=json.dumps({"length": L, "depth": d}),
                        task_dtype="float32"))
    return store, base, needles


def test_pipeline_store_natural_text_and_needle_tasks(pipeline_store, tmp_path):
    store, base, needles = pipeline_store
    table = T.model_table(store)
    assert set(table["registry_name"]) == {"I_pre_32kv_8k_12k", "K_post_HQK_8kv_12k", "H_post_LQK_32kv_8k_11k"}
    row = table.set_index("registry_name").loc["K_post_HQK_8kv_12k"]
    assert row["model"] == str(base / "K_post_HQK_8kv_12k") and row["qk_norm"] == "headwise"
    assert row["probes"] == "niah_tiny,prose_tiny"
    # needle share: run_probe's share of the value span from the final position, mean over grid
    expect = np.mean([needles[("K_post_HQK_8kv_12k", L, d)]["needle_share"]
                      .sel(query_set="final", span="needle_value").values for L in (320, 448) for d in (0.25, 0.75)])
    assert row["needle_share"] == pytest.approx(expect, rel=1e-6)
    nt = T.needle_table(store)
    assert set(nt["length"]) == {320, 448} and set(nt["depth"]) == {0.25, 0.75}
    maps = T.head_maps(store, "needle_share")
    assert set(k[2] for k in maps) == {"niah_tiny"} and maps[next(iter(maps))].shape == (4, 4)
    results = F.make_all(store, tmp_path / "figs", command="attnscope figures")
    assert not isinstance(results["needle_share"], str) and not isinstance(results["score_vs_needle"], str)
    assert isinstance(results["checkpoints"], list)  # one revision per model: still drawn
    [(stem, data)] = F.figure_data("score_vs_needle", store)
    assert data["needle_share"].notna().sum() == 3
    # the sink rate comes from the natural-text tasks' alpha_0 (needle tasks have none), pooled
    st = attnscope.open_store(store)
    tasks = st.tasks()
    prose = tasks[(tasks["probe"] == "prose_tiny") & (tasks["model"] == row["model"])]
    assert set(prose["query_bins"]) == {4} and tasks.loc[tasks["probe"] == "niah_tiny", "query_bins"].isna().all()
    alpha = np.concatenate([st.task(k)["token0_importance"].values.ravel() for k in prose["key"]])
    eps = float(np.quantile(alpha, 0.5)) + 1e-7
    rated = T.model_table(store, sink_epsilon=eps).set_index("registry_name")
    assert rated.loc["K_post_HQK_8kv_12k", "sink_rate"] == pytest.approx((alpha > eps).mean(), abs=1e-12)
    assert isinstance(results["query_profiles"], list) and isinstance(results["score_vs_sinks"], list)
