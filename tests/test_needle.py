"""Needle share, retrieval heads and the probe grid on the real SmolLM2 (~1K-token prompts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.probing import build_prompts, load_spec
from attnscope.probing.needle import needle_share, run_probe
from reference import eager_maps


@pytest.fixture(scope="module")
def grid(smollm2):
    """Four single-needle trials at ~1K tokens (2 depths x 2 seeds), with greedy decoding."""
    return run_probe(smollm2, "niah_single", lengths=[1024], depths=[0.25, 0.75],
                     seeds=[0, 1])


def test_grid_dims_and_provenance(grid):
    assert grid.needle_share.dims == ("query_set", "span", "layer", "head", "length", "depth", "seed")
    assert list(grid.query_set.values) == ["question", "final", "answer"]
    assert grid.attrs["probe"] == "niah_single" and len(grid.attrs["probe_hash"]) == 64
    assert np.all(np.abs(grid.depth_actual.values - grid.depth.values[None, :, None]) < 0.05)


def test_smollm2_retrieves_the_needle_with_needle_heads(grid):
    assert int(grid.correct.sum()) >= 3  # "most trials"
    share = grid.needle_share.sel(query_set="final", span="needle_value")
    uniform = grid.uniform_share.sel(query_set="final", span="needle_value")
    ratio = share.max(["layer", "head"]) / uniform
    assert float(ratio.min()) > 10  # some heads put many times the uniform share on the needle
    # retrieval heads exist and are few
    scores = grid.retrieval_score.where(grid.correct).mean(["length", "depth", "seed"])
    strong = int((scores > grid.attrs["retrieval_threshold"]).sum())
    assert 1 <= strong <= 30


def test_control_without_needle_has_no_needle_heads(smollm2, grid):
    spec = load_spec("niah_single")
    p = build_prompts(spec, smollm2.tokenizer, lengths=[1024], depths=[0.25], seeds=[0])[0]
    n0, n1 = p.spans["needle"]
    ids = list(p.token_ids)
    width = n1 - n0
    ids[n0:n1] = ids[n0 - 3 * width:n0 - 2 * width]  # noise haystack where the needle was
    control = type(p)(**{**p.__dict__, "token_ids": ids})
    real = needle_share(smollm2, p)
    ctrl = needle_share(smollm2, control)
    sel = dict(query_set="final", span="needle_value")
    real_ratio = float(real.needle_share.sel(**sel).max() / real.uniform_share.sel(**sel))
    ctrl_ratio = float(ctrl.needle_share.sel(**sel).max() / ctrl.uniform_share.sel(**sel))
    assert real_ratio > 3 * ctrl_ratio, (real_ratio, ctrl_ratio)


def test_needle_share_equals_eager(smollm2):
    spec = load_spec("niah_single")
    p = build_prompts(spec, smollm2.tokenizer, lengths=[1024], depths=[0.5], seeds=[0])[0]
    ds = needle_share(smollm2, p)
    answer = smollm2.tokenizer(" " + p.answer[0], add_special_tokens=False)["input_ids"]
    ids = list(p.token_ids) + answer
    maps = eager_maps(smollm2.model, torch.tensor([ids]))
    q0, q1 = p.spans["question"]
    L = p.length
    groups = {"question": np.arange(q0, q1), "final": np.array([L - 1]),
              "answer": np.arange(L - 1, L - 1 + len(answer))}
    for layer in ds.layer.values:
        P = maps[layer][0]
        for g, rows in groups.items():
            for span in ds.span.values:
                s0, s1 = p.spans[str(span)]
                want = P[:, rows, s0:s1].sum(-1).mean(-1)
                got = ds.needle_share.sel(query_set=g, span=span, layer=layer).values
                assert np.abs(got - want).max() <= 1e-5, (layer, g, span)
    # uniform baseline: |span| / visible keys for the final query
    s0, s1 = p.spans["needle_value"]
    assert float(ds.uniform_share.sel(query_set="final", span="needle_value")) == pytest.approx((s1 - s0) / L)
