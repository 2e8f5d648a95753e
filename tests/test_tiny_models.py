"""Tiny random checkpoints of every registry class, introspection, and the reproduced defects."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attnscope import testing as T
from attnscope.models import olmpool
from attnscope.models.introspect import attention_layout, declared_rope_theta, effective_rope_theta

T_LEN = 24  # test inputs are longer than the tiny window (8)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Builds each kind once per module, on demand."""
    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = T.make_tiny_model(kind, root / kind)
        return built[kind]

    return get


def _load(path, kind=None, **kw):
    remote = kind in T.REMOTE_KINDS if kind else True
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, **kw).eval()


def _ids(path, remote):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    ids = tok(T.SAMPLE_TEXT, return_tensors="pt").input_ids[:, :T_LEN]
    assert ids.shape[1] == T_LEN
    return ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_kinds_cover_every_registry_class():
    df = olmpool.registry()
    assert set(df["model_type"]) <= set(T.MODEL_TYPE_TO_KIND)
    classes = {T._SPECS[T.MODEL_TYPE_TO_KIND[mt]][1] for mt in df["model_type"]}
    assert classes == set(df["hf_class"])


@pytest.mark.parametrize("kind", T.KINDS)
def test_every_kind_loads_offline_and_runs(tiny, kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tiny(kind)
    model = _load(path, kind)
    assert type(model).__name__ == T._SPECS[kind][1]
    assert model.config.model_type == T._SPECS[kind][2]
    ids = _ids(path, kind in T.REMOTE_KINDS)
    logits = _logits(model, ids)
    assert logits.shape == (1, T_LEN, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert model.config.hidden_size == 64 and model.config.num_attention_heads == 4


def test_seeded_build_is_reproducible(tmp_path):
    a = _load(T.make_tiny_model("llama", tmp_path / "a"), "llama")
    b = _load(T.make_tiny_model("llama", tmp_path / "b"), "llama")
    c = _load(T.make_tiny_model("llama", tmp_path / "c", num_hidden_layers=2), "llama")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert c.config.num_hidden_layers == 2 and len(attention_layout(c)) == 2


@pytest.mark.parametrize("kind", T.REMOTE_KINDS)
def test_remote_kinds_need_trust_remote_code(tiny, kind):
    path = tiny(kind)
    cfg = json.loads((path / "config.json").read_text())
    assert "AutoModelForCausalLM" in cfg["auto_map"] and (path / T.REMOTE_FILE).is_file()
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert type(model).__name__ == T._SPECS[kind][1]
    # like the published remote classes, they expose nothing through output_attentions
    with torch.no_grad():
        out = model(input_ids=_ids(path, True), output_attentions=True, use_cache=False)
    assert out.attentions is None


EXPECTED_QK = {"llama": "none", "qwen3": "headwise", "olmo2": "layerwise", "olmo3": "layerwise",
               "olmo_hybrid": "layerwise", "olmo3_preorder": "layerwise", "olmo3_preorder_no_qk": "none",
               "olmo2_headwise_qknorm": "headwise"}


@pytest.mark.parametrize("kind", T.KINDS)
def test_attention_layout(tiny, kind):
    layout = attention_layout(_load(tiny(kind), kind))
    assert [li.index for li in layout] == [0, 1, 2, 3]
    attn = [li for li in layout if li.kind == "attention"]
    assert all(li.qk_norm == EXPECTED_QK[kind] for li in attn)
    assert all((li.n_heads, li.n_kv_heads, li.head_dim) == (4, 2, 16) for li in attn)
    windows = [li.sliding_window for li in layout]
    if kind == "olmo_hybrid":
        assert [li.kind for li in layout] == ["recurrent"] * 3 + ["attention"]
        assert layout[0].qk_norm is None and layout[0].n_heads is None
    if kind == "olmo3":
        assert windows == [8, 8, 8, None] and not any(li.window_assumed for li in layout)
        assert [li.layer_type for li in layout] == ["sliding_attention"] * 3 + ["full_attention"]
    elif kind in ("olmo3_preorder", "olmo3_preorder_no_qk"):
        # remote configs carry a window but no layer_types: the OlmPool pattern is assumed, and said so
        assert windows == [8, 8, 8, None] and all(li.window_assumed for li in layout)
    else:
        assert windows == [None] * 4 and not any(li.window_assumed for li in layout)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "olmo3", "olmo3_preorder"])
def test_effective_theta_matches_declared_on_sound_checkpoints(tiny, kind):
    model = _load(tiny(kind), kind)
    eff, dec = effective_rope_theta(model), declared_rope_theta(model.config)
    assert dec == declared_rope_theta(tiny(kind))  # saved file and loaded config agree
    if isinstance(dec, dict):
        assert set(eff) == set(dec) and all(eff[k] == pytest.approx(dec[k], rel=1e-5) for k in dec)
    else:
        assert eff == pytest.approx(dec, rel=1e-5)


def test_effective_theta_reads_the_frequencies(tmp_path):
    path = T.make_tiny_model("llama", tmp_path / "m", rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    model = _load(path, "llama")
    assert effective_rope_theta(model) == pytest.approx(123456.0, rel=1e-5)
    with torch.no_grad():  # the value comes from the buffer, not the config
        model.model.rotary_emb.inv_freq.copy_(1.0 / (777.0 ** (torch.arange(0, 16, 2).float() / 16)))
    assert effective_rope_theta(model) == pytest.approx(777.0, rel=1e-5)


def test_defect_flat_rope_theta_falls_back_on_sliding_layers(tmp_path):
    path = T.make_flat_rope_theta_olmo3(tmp_path / "flat", theta=8_000_000.0)
    raw = json.loads((path / "config.json").read_text())
    assert "rope_parameters" not in raw and raw["rope_theta"] == 8_000_000.0
    assert declared_rope_theta(path) == 8_000_000.0
    eff = effective_rope_theta(_load(path, "olmo3"))
    assert eff["full_attention"] == pytest.approx(8_000_000.0, rel=1e-5)
    # transformers 5 applies the flat theta to full_attention only; sliding layers get the default
    assert eff["sliding_attention"] == pytest.approx(500_000.0, rel=1e-5)
    assert eff["sliding_attention"] != pytest.approx(declared_rope_theta(path), rel=1e-3)


def _window_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, sliding_window=None, **kw):
    """Eager attention that honours sliding_window (what the remote models assume the kernel does)."""
    groups = module.num_key_value_groups
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    tq, tk = query.shape[2], k.shape[2]
    i = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    allowed = j <= i
    if sliding_window:
        allowed &= (i - j) < sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


def test_defect_remote_swa_ignores_the_window(tiny):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    path = tiny("olmo3_preorder")
    ids = _ids(path, True)
    as_published = _logits(_load(path), ids)
    full = _logits(_load(path, sliding_window=None), ids)
    # the defect: a sliding-window model whose output equals a full-attention run
    assert torch.allclose(as_published, full, atol=1e-6)
    # ...although the window does reach the kernel: one that honours it changes the output
    AttentionInterface.register("attnscope_test_window_eager", _window_eager)
    AttentionMaskInterface.register("attnscope_test_window_eager", sdpa_mask)
    windowed = _logits(_load(path, attn_implementation="attnscope_test_window_eager"), ids)
    assert not torch.allclose(windowed, as_published, atol=1e-3)
    assert torch.allclose(
        _logits(_load(path, sliding_window=None, attn_implementation="attnscope_test_window_eager"), ids), full, atol=1e-5
    )


def test_native_olmo3_applies_its_window(tiny):
    path = tiny("olmo3")
    ids = _ids(path, False)
    # a window wider than the input is full attention
    assert not torch.allclose(_logits(_load(path, "olmo3"), ids),
                              _logits(_load(path, "olmo3", sliding_window=10 * T_LEN), ids), atol=1e-3)


@pytest.mark.parametrize("kind", ["olmo3_preorder_no_qk", "olmo3"])
def test_swa_config_without_layer_types(tmp_path, kind):
    path = T.make_swa_without_layer_types(tmp_path / kind, kind=kind)
    raw = json.loads((path / "config.json").read_text())
    assert "layer_types" not in raw and raw["sliding_window"] == T.TINY_WINDOW
    layout = attention_layout(_load(path, kind))
    assert [li.sliding_window for li in layout] == [8, 8, 8, None]
    # olmo3's config class rebuilds layer_types itself; the remote class has none, so it is assumed
    assert all(li.window_assumed for li in layout) == (kind != "olmo3")


def test_defect_wrong_norm_order_shows_in_text_loss(tmp_path):
    ref_path = tmp_path / "ref"
    path = T.make_wrong_norm_checkpoint(tmp_path / "wrong", reference_path=ref_path, train_steps=40)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Olmo3PreorderForCausalLM"]
    tok = AutoTokenizer.from_pretrained(ref_path)
    ref = _load(ref_path, "olmo3")
    wrong, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    # silent: every tensor found a slot, so loading reports nothing...
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref_loss, wrong_loss = T.text_loss(ref, tok), T.text_loss(wrong.eval(), tok)
    # ...but the plain-text loss gives it away
    assert ref_loss < 1.0
    assert wrong_loss > ref_loss + 2.0


def test_wrong_norm_without_renaming_reports_keys(tmp_path):
    path = T.make_wrong_norm_checkpoint(tmp_path / "wrong", train_steps=0, rename_keys=False)
    _, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    assert any("input_layernorm" in k for k in info["missing_keys"])
    assert any("post_feedforward_layernorm" in k for k in info["unexpected_keys"])


def test_tokenizer_is_local_and_byte_level():
    tok = T.make_tiny_tokenizer()
    assert len(tok) <= 384 and tok.pad_token_id is not None and tok.eos_token_id is not None
    text = "Ünïcode and unseen wörds: 東京"
    assert tok.decode(tok(text).input_ids) == text
