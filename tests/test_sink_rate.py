"""Sink rate (Gu et al. 2025): alpha_0 and the rate equal a direct computation from eager maps,
done the way the reference code (sail-sg/Attention-Sink, eval_sink_open_source.py) does it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope
from attnscope.errors import AttnscopeError
from reference import eager_maps


def _reference_rate(maps: dict, epsilon: float):
    """maps: {layer: [N, H, T, T]}. The reference code's computation: importance of key j =
    sum over queries of A_ij / (T - j); rate = mean over (sample, layer, head) of alpha_0 > eps."""
    layers = sorted(maps)
    A = np.stack([maps[L] for L in layers], axis=1).astype(np.float64)  # [N, L, H, T, T]
    T = A.shape[-1]
    ratios = np.arange(T, 0, -1)[None, None, None, None, :]
    importance = (A / ratios).sum(axis=-2)  # [N, L, H, T]
    alpha0 = importance[..., 0]
    hit = alpha0 > epsilon
    return alpha0, hit.mean(axis=(0, 2)), hit.mean()


def test_smollm2_sink_rate_matches_reference_code(smollm2, prose):
    tok = smollm2.tokenizer
    words = prose.split()
    texts = [" ".join(words[i * 120:(i + 1) * 120]) for i in range(4)]
    rate = attnscope.sink_rate(smollm2, texts)  # 64 tokens each, every query from 0
    ids = torch.tensor([tok(t)["input_ids"][:64] for t in texts])
    maps = eager_maps(smollm2.model, ids)
    alpha0, by_layer, overall = _reference_rate(maps, 0.3)
    np.testing.assert_allclose(rate.token0_importance.transpose("sequence", "layer", "head").values,
                               alpha0, atol=1e-5)
    np.testing.assert_allclose(rate.sink_rate_by_layer.values, by_layer, atol=1e-12)
    assert float(rate.sink_rate) == pytest.approx(overall)
    assert 0.2 < float(rate.sink_rate) < 1.0  # the real model has sinks, not everywhere
    assert rate.attrs["epsilon"] == 0.3


def test_token0_importance_ignores_the_query_selection(tiny, single_thread):
    lm = tiny("olmo3")
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (1, 48))
    ds = attnscope.analyze(lm, token_ids=ids[0].tolist(), metrics=("token0_importance", "token0_mass"),
                           queries="last:5")
    maps = eager_maps(lm.model, ids)
    alpha0, by_layer, overall = _reference_rate({L: m for L, m in maps.items()}, 0.3)
    np.testing.assert_allclose(ds.token0_importance.values, alpha0[0], atol=1e-6)
    # token0_mass follows the query selection; alpha_0 does not
    assert not np.allclose(ds.token0_mass.values, ds.token0_importance.values)
    for eps in (0.1, 0.3, 0.6):
        _, by_layer, overall = _reference_rate(maps, eps)
        rate = attnscope.sink_rate(ds, epsilon=eps)
        np.testing.assert_allclose(rate.sink_rate_by_layer.values, by_layer)
        assert float(rate.sink_rate) == pytest.approx(overall)


def test_sink_rate_bad_input(tiny):
    lm = tiny("llama")
    ds = attnscope.analyze(lm, token_ids=list(range(3, 40)), metrics=("sink_mass",))
    with pytest.raises(AttnscopeError, match="no token0_importance"):
        attnscope.sink_rate(ds)
    with pytest.raises(AttnscopeError, match="epsilon"):
        attnscope.sink_rate(ds, epsilon=1.5)
    with pytest.raises(AttnscopeError, match="texts"):
        attnscope.sink_rate(lm)
