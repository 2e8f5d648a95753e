"""Cache-policy what-ifs beyond the kept mass (which test_received.py checks against eager maps):
the attention edit of each policy keeps exactly the policy's keys, the loss under it, needle
retrieval under it, the `attnscope policies` command and its figure, and `extract --received-top`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import attnscope
from attnscope import policies as P
from attnscope.cli import app
from attnscope.testing import SAMPLE_TEXT, make_tiny_model
from attnscope.tokens.ablate import ablated

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    """A tiny random llama (context 256) with its tokenizer, and its path."""
    path = make_tiny_model("llama", tmp_path_factory.mktemp("tiny_tok") / "llama")
    return path, attnscope.load(str(path))


@pytest.mark.parametrize("family", ["llama", "olmo3"])
def test_each_policys_edit_keeps_exactly_its_keys(tiny, family, single_thread):
    """Run the model under the policy's edit: every key the queries can then see is one the
    policy keeps, so its kept mass is the whole row (1) - and under any other budget it is not."""
    lm = tiny(family)
    torch.manual_seed(21)
    ids = torch.randint(3, 128, (70,)).tolist()
    for label, budget in (("streaming:3", 12), ("window", 10)):
        edit = P.parse_policy(label).edit(budget)
        with ablated(lm.model, edit):
            ds = attnscope.analyze(lm, token_ids=ids, metrics=(), policies=[label], budgets=[budget, budget + 8],
                                   min_query_position=4)
        assert ds.attrs["attention_edit"] == edit.describe()
        np.testing.assert_allclose(ds.kept_mass.sel(budget=budget), 1.0, atol=ATOL)
        free = attnscope.analyze(lm, token_ids=ids, metrics=(), policies=[label], budgets=[budget],
                                 min_query_position=4)
        assert float(free.kept_mass.min()) < 1 - 1e-3  # without the edit, the cache loses mass


def test_policy_losses(tiny_tok):
    path, lm = tiny_tok
    ids = lm.tokenizer(SAMPLE_TEXT)["input_ids"]
    ds = P.policy_losses(lm, ids, ["streaming:2", "window", "static_topk"], [6, 12, len(ids)])
    assert ds.loss.dims == ("policy", "budget")
    assert np.isnan(ds.loss.sel(policy="static_topk")).all()  # no edit keeps a per-head key set
    # a cache holding the whole input changes nothing, bit for bit
    assert float(np.abs(ds.delta_loss.sel(budget=len(ids)).sel(policy=["streaming:2", "window"])).max()) == 0.0
    assert float(np.abs(ds.delta_loss.sel(budget=6).sel(policy="window"))) > 1e-4
    # the chunked lm_head loss equals the loss from the model's own logits, under the same edit
    positions = np.arange(16, len(ids) - 1)
    with ablated(lm.model, P.parse_policy("window").edit(6)), torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].double()
    want = -torch.log_softmax(logits[positions], -1)[np.arange(len(positions)), ids[17:]].mean()
    assert abs(float(ds.loss.sel(policy="window", budget=6)) - float(want)) < 1e-5


SHORT_NIAH = """name = "niah_short"
task = "niah"
seeds = [0]

[grid]
lengths = [200]
depths = [0.5]
depth_tolerance = 0.5

[haystack]
type = "noise"
noise = "The sky is blue."

[needle]
number_digits = 2
template = "{key} is {value}."

[prompt]
prefix = ""
question = "What is {query}?"
answer_prefix = "It is"
"""


def test_policy_needle_and_figure(tiny_tok, tmp_path):
    _, lm = tiny_tok
    (tmp_path / "niah.toml").write_text(SHORT_NIAH)
    needle = P.policy_needle(lm, tmp_path / "niah.toml", ["streaming", "window"], [16, 200])
    assert needle.needle_correct.dims == ("policy", "budget")
    # a budget of the whole prompt hides nothing: the same answer and needle share as the full cache
    full = needle.sel(budget=200)
    np.testing.assert_array_equal(full.needle_correct.values, float(needle.needle_correct_baseline))
    ids = lm.tokenizer(SAMPLE_TEXT)["input_ids"]
    ds = P.run_policies(lm, ids, ["streaming", "window", "static_topk"], [8, 16, 32], loss=True)
    ds = ds.merge(needle.rename({"needle_share": "needle_share_final"}).assign_coords(budget=[8, 32]),
                  combine_attrs="override", join="left")
    paths = P.policy_figure(ds, tmp_path / "fig", command="a test", store="memory")
    assert sorted(p.suffix for p in paths) == [".json", ".pdf", ".png"]
    side = json.loads([p for p in paths if p.suffix == ".json"][0].read_text())
    assert side["command"] == "a test" and len(side["data"]) == 9
    assert {r["policy"] for r in side["data"]} == {"streaming:4", "window", "static_topk"}
    fig = P.draw_policy_figure(ds)
    assert len(fig.axes) == 3


def test_policies_command(tiny_tok, tmp_path):
    path, lm = tiny_tok
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 2, encoding="utf-8")
    res = CliRunner().invoke(app, ["policies", "-m", str(path), "-f", str(tmp_path / "text.txt"), "--out",
                                   str(tmp_path / "out"), "--budgets", "8,32", "-q"])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    stem = f"policies_{path.name}"
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [f"{stem}.h5", f"{stem}.json", f"{stem}.pdf", f"{stem}.png"]
    ds = attnscope.read_result(tmp_path / "out" / f"{stem}.h5")
    assert list(ds.policy.values) == ["streaming:4", "window", "static_topk"] and list(ds.budget.values) == [8, 32]
    assert "delta_loss" in ds and ds.kept_mass.dims == ("policy", "budget", "layer", "head")
    side = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
    assert side["command"].startswith("attnscope policies --model") and "--budgets 8,32" in side["command"]
    assert side["store"].endswith(f"{stem}.h5")
    # the same numbers through the Python API
    ids = lm.tokenizer(SAMPLE_TEXT * 2)["input_ids"]
    again = P.kept_mass(lm, token_ids=ids, budgets=[8, 32])
    np.testing.assert_allclose(again.kept_mass.values, ds.kept_mass.values, atol=1e-6)


def test_extract_records_received_compactly(tiny_tok, tmp_path):
    path, lm = tiny_tok
    (tmp_path / "probe.toml").write_text('name = "prose_recv"\ntask = "natural_text"\nseeds = [0]\n\n'
                                         '[grid]\nlengths = [48]\ndepths = [0.0]\n\n'
                                         '[haystack]\ntype = "prose"\ntext = "alice"\n')
    report = attnscope.extract([str(path)], None, [tmp_path / "probe.toml"], tmp_path / "s.h5", progress=False,
                               received_top=5)
    assert report.ok and report.succeeded == 1
    store = attnscope.open_store(tmp_path / "s.h5")
    ds = store.get(str(path), probe="prose_recv", received_top=5)
    assert ds.received_top.dims[-3:] == ("layer", "head", "rank") and ds.sizes["rank"] == 5
    top = ds.received_top.squeeze().values  # [layer, head, rank]
    assert (np.diff(top, axis=-1) <= 0).all()
    # the binned shares add up to the whole attention of every query (no sink logits here)
    np.testing.assert_allclose(ds.received_bins.squeeze().sum("bin"), 1.0, atol=1e-5)
    # the same task without received_top is another task (another key)
    plain = attnscope.extract([str(path)], None, [tmp_path / "probe.toml"], tmp_path / "s.h5", progress=False)
    assert plain.succeeded == 1 and plain.already_done == 0
    assert len(attnscope.open_store(tmp_path / "s.h5").tasks()) == 2
