"""Every metric equals the same reduction of eager attention maps (output_attentions=True)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attnscope
from reference import eager_maps, reference_metrics

ALL = ("sink_mass", "token0_mass", "entropy", "mean_distance", "position_profile",
       "distance_profile")
ATOL = 1e-5


def assert_matches(ds, maps, queries, spans=None, seq=None, length=None, max_length=None,
                   offset=0):
    for layer in ds.layer.values:
        P = maps[layer][0 if seq is None else seq]
        if length is not None:  # left-padded row: keep the real tokens
            P = P[:, offset:offset + length, offset:offset + length]
        ref = reference_metrics(P, queries, spans=spans, max_length=max_length)
        for name, want in ref.items():
            got = ds[name].sel(layer=layer)
            if seq is not None:
                got = got.isel(sequence=seq)
            got = got.values
            if name == "span_mass":
                got = got  # (span, head)
            # mean_distance is in tokens: its fp32 reference is good to ~1e-7 relative
            tol = ATOL * max(1.0, float(np.abs(want).max())) if name == "mean_distance" else ATOL
            err = float(np.abs(got - want).max())
            assert err <= tol, f"layer {layer} {name}: max abs error {err:.2e} > {tol:.1e}"


def test_smollm2_real_text_matches_eager(smollm2, prose):
    ids = smollm2.tokenizer(prose)["input_ids"][:640]
    spans = {"early": (5, 9), "middle": (300, 340)}
    ds = attnscope.analyze(smollm2, token_ids=ids, metrics=ALL, spans=spans)
    maps = eager_maps(smollm2.model, torch.tensor([ids]))
    queries = np.array(json.loads(ds.attrs["query_positions"]))
    assert queries[0] == 16 and queries[-1] == len(ids) - 1
    assert_matches(ds, maps, queries, spans=spans)
    # the real model has real sinks: many heads put most attention on token 0
    assert int((ds.token0_mass > 0.5).sum()) >= 20


def test_smollm2_full_pattern_matches_eager(smollm2, prose):
    ids = smollm2.tokenizer(prose)["input_ids"][:96]
    ds = attnscope.analyze(smollm2, token_ids=ids, metrics=("pattern",), layers=[0, 14, 29])
    maps = eager_maps(smollm2.model, torch.tensor([ids]))
    for layer in (0, 14, 29):
        np.testing.assert_allclose(ds.pattern.sel(layer=layer).values, maps[layer][0], atol=ATOL)
    assert list(ds.layer.values) == [0, 14, 29]


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo2", "olmo3", "olmo_hybrid"])
def test_tiny_families_match_eager(tiny, family):
    lm = tiny(family)
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 48))
    spans = {"needle": (20, 24)}
    ds = attnscope.analyze(lm, token_ids=ids[0].tolist(), metrics=ALL + ("pattern",), spans=spans,
                           queries="all", min_query_position=4)
    maps = eager_maps(lm.model, ids)
    queries = np.array(json.loads(ds.attrs["query_positions"]))
    assert_matches(ds, maps, queries, spans=spans)
    for layer in ds.layer.values:
        np.testing.assert_allclose(ds.pattern.sel(layer=layer).values, maps[layer][0], atol=ATOL)
    windows = json.loads(ds.attrs["windows"])
    if family == "olmo3":
        assert windows == {"0": 8, "1": 8, "2": 8, "3": None}
        # the window really bounds attention: nothing beyond 8 keys back in sliding layers
        assert float(ds.mean_distance.sel(layer=0).max()) < 8
    if family == "olmo_hybrid":
        assert list(ds.layer.values) == [3]
        assert json.loads(ds.attrs["skipped_layers"]) == {
            "0": "linear_attention", "1": "linear_attention", "2": "linear_attention"}


@pytest.mark.parametrize("family", ["llama", "olmo3"])
def test_padded_batch_matches_each_sequence_alone(tiny, family):
    lm = tiny(family)
    torch.manual_seed(2)
    a = torch.randint(3, 128, (40,)).tolist()
    b = torch.randint(3, 128, (27,)).tolist()
    kw = dict(metrics=ALL, spans={"s": (3, 6)}, queries="strided:10", min_query_position=4)
    batch = attnscope.analyze(lm, token_ids=[a, b], **kw)
    assert batch.sink_mass.dims == ("sequence", "layer", "head")
    for i, seq in enumerate((a, b)):
        alone = attnscope.analyze(lm, token_ids=seq, **kw)
        for name in ALL + ("span_mass",):
            got = batch[name].isel(sequence=i).values
            if name == "distance_profile":  # bins run to the batch's longest row; extra ones are 0
                n = alone.sizes["distance_bin"]
                assert np.all(got[..., n:] == 0)
                got = got[..., :n]
            np.testing.assert_allclose(got, alone[name].values, atol=ATOL,
                                       err_msg=f"{family} seq {i} {name}")
    # and against eager on the padded batch itself
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(a), 1
    ids[1, 13:], mask[1, 13:] = torch.tensor(b), 1
    maps = eager_maps(lm.model, ids, mask)
    q_b = np.array(json.loads(batch.attrs["query_positions"])[1])
    assert_matches(batch, maps, q_b, spans={"s": (3, 6)}, seq=1, length=27, offset=13,
                   max_length=40)


def test_model_output_is_unchanged_by_capture(tiny):
    """The attention function must compute what the model computes: logits equal eager."""
    lm = tiny("olmo3")
    ids = torch.randint(3, 128, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :11] = 0
    from attnscope.metrics.reductions import RowPlan, StatsRecorder

    with torch.no_grad():
        plans = [RowPlan(40, np.arange(4, 40)), RowPlan(29, np.arange(4, 29))]
        with attnscope.capture(lm.model, StatsRecorder(("sink_mass", "entropy"), plans)):
            ours = lm.model(input_ids=ids, attention_mask=mask).logits
        lm.model.set_attn_implementation("eager")
        try:
            ref = lm.model(input_ids=ids, attention_mask=mask).logits
        finally:
            lm.model.set_attn_implementation("attnscope")
    np.testing.assert_allclose(ours[0].numpy(), ref[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(ours[1, 11:].numpy(), ref[1, 11:].numpy(), atol=1e-5)


@pytest.mark.parametrize("queries,expected", [
    ("last:5", [43, 44, 45, 46, 47]),
    ("strided:4", [16, 26, 37, 47]),
    ("20,30,40", [20, 30, 40]),
])
def test_query_selections(tiny, queries, expected):
    lm = tiny("llama")
    ids = torch.randint(3, 128, (48,)).tolist()
    ds = attnscope.analyze(lm, token_ids=ids, metrics=ALL, queries=queries)
    assert json.loads(ds.attrs["query_positions"]) == expected
    maps = eager_maps(lm.model, torch.tensor([ids]))
    assert_matches(ds, maps, np.array(expected))
