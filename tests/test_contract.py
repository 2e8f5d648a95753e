"""The attention contract (issue 18): every keyword argument of an attention call is applied,
known to be harmless, or refused with one line naming the family and the feature; families that
attnscope cannot see are refused before any weight loads (CLI: exit 2, one line, nothing
written)."""

from __future__ import annotations

import pytest
import torch

import attnscope
from attnscope import zoo
from attnscope.capture.interface import HARMLESS_KWARGS, attnscope_attention, split_mask
from attnscope.errors import UnsupportedModelError
from test_hostile import no_load, refused  # noqa: F401 (no_load is a fixture)


class _Module(torch.nn.Module):
    """An attention module as transformers' families have them."""

    def __init__(self, model_type="llama"):
        super().__init__()
        self.layer_idx, self.is_causal, self.num_key_value_groups = 0, True, 2
        self.config = type("Config", (), {"model_type": model_type})()


def _call(module=None, **kwargs):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    return attnscope_attention(module or _Module(), q, k, v, None, scaling=0.3, **kwargs)


@pytest.mark.parametrize("kwargs, words", [
    ({"block_indices": torch.zeros(1, 2, 6, 1, dtype=torch.long)}, ["llama", "block_indices=", "does not know"]),
    ({"alibi_slopes": torch.ones(4)}, ["alibi_slopes="]),  # a feature a future release might pass
    ({"cu_seq_lens_q": torch.tensor([0, 3, 6])}, ["packed sequences", "cu_seq_lens_q="]),
    ({"is_causal": False}, ["bidirectional attention"]),
    ({"sliding_window": (4, 4)}, ["a sliding window given as (4, 4)"]),
    ({"s_aux": torch.zeros(3)}, ["learned sinks of shape (3,)"]),
    ({"position_bias": torch.zeros(1, 4, 5, 6)}, ["position_bias of shape (1, 4, 5, 6)"]),
    ({"indices": torch.zeros(6, 2, dtype=torch.long)}, ["sparse selection indices of shape (6, 2)"]),
])
def test_an_attention_kwarg_is_applied_or_refused(kwargs, words):
    with pytest.raises(UnsupportedModelError) as err:
        _call(**kwargs)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)


def test_dropout_in_training_is_refused():
    module = _Module()
    module.train()
    with pytest.raises(UnsupportedModelError, match="attention dropout 0.1 in training mode"):
        _call(module, dropout=0.1)
    module.eval()
    _call(module, dropout=0.1)  # eval: dropout does nothing


def test_harmless_and_none_kwargs_change_nothing():
    plain = _call()[0]
    every = {name: 1 for name in HARMLESS_KWARGS}
    every.update(position_ids=torch.arange(6)[None], cu_seq_lens_q=None, indices=None, s_aux=None,
                 is_causal=True)
    assert torch.equal(_call(**every)[0], plain)


def test_a_float_mask_that_differs_by_head_is_a_score_term():
    """Doge's dynamic mask: per-head values on visible keys, finfo.min on hidden ones."""
    m = torch.randn(1, 4, 6, 6)
    hidden = torch.ones(6, 6, dtype=torch.bool).triu(1)
    m = m.masked_fill(hidden, torch.finfo(torch.float32).min)
    m[:, 1, 5, 0] = torch.finfo(torch.float32).min  # head 1 alone hides key 0 from query 5
    vis, bias = split_mask(m, 4)
    assert vis.shape == (1, 1, 6, 6) and bool(vis[0, 0, 5, 0])  # another head still sees it
    assert bias.shape == (1, 4, 6, 6) and float(bias[0, 1, 5, 0]) <= -1e29
    assert torch.equal(bias[0, 0, 3, :4], m[0, 0, 3, :4])
    plain = torch.zeros(1, 1, 6, 6).masked_fill(hidden, torch.finfo(torch.float32).min)
    vis, bias = split_mask(plain, 4)
    assert bias is None and torch.equal(vis[0, 0], ~hidden)


@pytest.mark.parametrize("model_type, words", [
    ("falcon", ["falcon", "fixed table of classes", "FALCON_ATTENTION_CLASSES"]),
    ("bloom", ["bloom", "AttentionInterface"]),
    ("mamba", ["mamba", "no softmax attention"]),
    ("deepseek_v4", ["deepseek_v4", "compressed KV"]),
])
def test_cli_refuses_a_family_before_any_weight_loads(tmp_path, no_load, monkeypatch, model_type, words):
    tiny = zoo.tiny_model(model_type)
    folder = tmp_path / model_type
    tiny.model.save_pretrained(folder)
    (tmp_path / "text.txt").write_text("plenty of words " * 20)
    monkeypatch.chdir(tmp_path)
    line = refused(["analyze", "-m", folder, "-f", "text.txt", "--out", "r.h5"], tmp_path, *words)
    assert "refuses rather than report wrong numbers" in line
    with pytest.raises(UnsupportedModelError):  # the API too, before from_pretrained (no_load)
        attnscope.load(str(folder))
