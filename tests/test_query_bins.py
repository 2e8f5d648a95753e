"""Query-resolved metrics: every metric per bin of query position, from the same pass, equal to
the same reduction of eager attention maps over each bin's queries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attnscope
from attnscope.errors import AttnscopeError
from reference import eager_maps, reference_metrics

METRICS = ("sink_mass", "token0_mass", "entropy", "mean_distance", "position_profile")
ATOL = 1e-5


def _check_bins(ds, maps, seq_len, spans=None):
    queries = np.array(json.loads(ds.attrs["query_positions"]))
    starts = ds.query_bin.values
    edges = list(starts) + [queries[-1] + 1]
    counts = ds.query_count.values
    for b in range(len(starts)):
        in_bin = queries[(queries >= edges[b]) & (queries < edges[b + 1])]
        assert counts[b] == len(in_bin)
        for layer in ds.layer.values:
            got_layer = ds.sel(layer=layer)
            if len(in_bin) == 0:
                assert np.isnan(got_layer["sink_mass_by_query"].isel(query_bin=b).values).all()
                continue
            ref = reference_metrics(maps[layer][0], in_bin, spans=spans)
            for name, want in ref.items():
                if name + "_by_query" not in ds:
                    continue
                got = got_layer[name + "_by_query"].isel(query_bin=b).values
                scale = max(1.0, float(np.abs(want).max())) if name == "mean_distance" else 1.0
                assert np.abs(got - want).max() / scale <= ATOL, (layer, b, name)
    # the bins, weighted by their query counts, give back the unbinned mean
    for name in list(ds.data_vars):
        if name.endswith("_by_query"):
            base = name[: -len("_by_query")]
            w = ds.query_count.values
            back = np.nansum(ds[name].values * w, axis=-1) / w.sum()
            np.testing.assert_allclose(back, ds[base].values, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("row_pass", ["chunked", "features"])
def test_query_bins_match_eager_per_bin(tiny, row_pass, single_thread):
    lm = tiny("olmo3")  # sliding layers + a global one
    torch.manual_seed(11)
    ids = torch.randint(3, 128, (1, 70))
    spans = {"needle": (30, 34)}
    ds = attnscope.analyze(lm, token_ids=ids[0].tolist(), metrics=METRICS, spans=spans,
                           min_query_position=4, query_bins=6, row_pass=row_pass)
    assert ds.sink_mass_by_query.dims == ("layer", "head", "query_bin")
    assert ds.span_mass_by_query.dims == ("span", "layer", "head", "query_bin")
    assert ds.position_profile_by_query.dims == ("layer", "head", "bin", "query_bin")
    assert list(ds.query_bin.values) == [4 + (b * 66) // 6 for b in range(6)]
    _check_bins(ds, eager_maps(lm.model, ids), 70, spans)


def test_query_bins_with_distance_profile_and_empty_bins(tiny, single_thread):
    lm = tiny("llama")
    ids = torch.randint(3, 128, (1, 60))
    ds = attnscope.analyze(lm, token_ids=ids[0].tolist(), metrics=METRICS + ("distance_profile",),
                           queries="20,21,22,50,59", query_bins=8)
    assert (ds.query_count.values == 0).any()  # explicit positions leave some bins empty
    _check_bins(ds, eager_maps(lm.model, ids), 60)


def test_smollm2_sink_by_query_position(smollm2, prose):
    ids = smollm2.tokenizer(prose)["input_ids"][:400]
    ds = attnscope.analyze(smollm2, token_ids=ids, metrics=("sink_mass", "entropy"), query_bins=4,
                           layers=[3, 15, 27])
    _check_bins(ds, eager_maps(smollm2.model, torch.tensor([ids])), 400)


def test_padded_batch_has_per_row_bins(tiny, single_thread):
    lm = tiny("llama")
    a, b = torch.randint(3, 128, (50,)).tolist(), torch.randint(3, 128, (30,)).tolist()
    ds = attnscope.analyze(lm, token_ids=[a, b], metrics=("sink_mass",), query_bins=4,
                           min_query_position=2)
    assert ds.sink_mass_by_query.dims == ("sequence", "layer", "head", "query_bin")
    assert list(ds.query_bin.values) == [0, 1, 2, 3]
    assert ds.query_bin_start.values.tolist() == [[2, 14, 26, 38], [2, 9, 16, 23]]
    alone = attnscope.analyze(lm, token_ids=b, metrics=("sink_mass",), query_bins=4,
                              min_query_position=2)
    np.testing.assert_allclose(ds.sink_mass_by_query.isel(sequence=1).values,
                               alone.sink_mass_by_query.values, atol=2e-6)


def test_too_many_bins_is_refused(tiny):
    lm = tiny("llama")
    with pytest.raises(AttnscopeError, match="more than the 24 query positions"):
        attnscope.analyze(lm, token_ids=list(range(3, 43)), query_bins=25)
    with pytest.raises(AttnscopeError, match="positive integer"):
        attnscope.analyze(lm, token_ids=list(range(3, 43)), query_bins=0)


def test_cli_query_bins_json(tmp_path):
    from typer.testing import CliRunner

    from attnscope.cli import app
    from attnscope.testing import SAMPLE_TEXT, make_tiny_model

    path = make_tiny_model("llama", tmp_path / "tiny")  # with its tokenizer
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    res = CliRunner().invoke(app, ["analyze", "--model", str(path), "--text-file", str(text),
                                   "--queries", "20,21,60", "--query-bins", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["query_bins"]) == 4 and out["dims"]["sink_mass_by_query"][-1] == "query_bin"
    assert None in out["metrics"]["sink_mass_by_query"][0][0]  # empty bins are null, not NaN
