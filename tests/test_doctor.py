"""The model doctor and load()'s explicit defect handling, on tiny checkpoints (attnscope.testing)."""

import json
import logging
import shutil

import numpy as np
import pytest

from test_families import off_by_a_little_engine  # noqa: F401 (a fixture)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import attnscope
from attnscope import testing as T
from attnscope.cli import app
from attnscope.errors import ModelNotFoundError, RemoteCodeError
from attnscope.models.doctor import WINDOW_TOL, doctor
from attnscope.models.introspect import declared_rope_theta, effective_rope_theta

W = T.TINY_WINDOW
T_LEN = 24  # longer than the tiny window


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Builds each tiny checkpoint once per module, on demand."""
    root = tmp_path_factory.mktemp("doctor")
    built = {}
    makers = {
        "flat": lambda p: T.make_flat_rope_theta_olmo3(p, theta=8_000_000.0),
        "no_layer_types": lambda p: T.make_swa_without_layer_types(p, kind="olmo3_preorder_no_qk"),
        "wrong_norm": lambda p: T.make_wrong_norm_checkpoint(p, reference_path=root / "wrong_norm_ref"),
        "wrong_norm_keys": lambda p: T.make_wrong_norm_checkpoint(p, train_steps=0, rename_keys=False),
        # the head/layer counts of an OlmPool llama (G_pre_8kv_8k_14k), at hidden size 128
        "pool_llama": lambda p: T.make_tiny_model("llama", p, hidden_size=128, intermediate_size=64,
                                                  num_attention_heads=32, num_key_value_heads=8,
                                                  num_hidden_layers=32),
    }

    def get(kind):
        if kind not in built:
            path = root / kind
            built[kind] = makers[kind](path) if kind in makers else T.make_tiny_model(kind, path)
        return built[kind]

    return get


def _by_name(report, name):
    return {c.scope: c for c in report.get(name)}


# ---------------------------------------------------------------------------------------------
# healthy models


@pytest.mark.parametrize("kind", ["llama", "olmo3"])
def test_doctor_passes_healthy_tiny_models(ckpt, kind):
    report = doctor(str(ckpt(kind)))
    assert report.ok and report.status == "pass", [c for c in report.checks if c.status != "pass"]
    assert {c.status for c in report.checks} <= {"pass", "skip"}
    theta = _by_name(report, "rope_theta")
    assert all(c.status == "pass" for c in theta.values())
    assert report.get("weights")[0].measured == {"missing": 0, "unexpected": 0, "mismatched": 0}
    assert report.get("loss")[0].status == "pass"
    windows = _by_name(report, "window")
    if kind == "olmo3":
        assert set(windows) == {"layer 0", "layer 1", "layer 2"}  # layer 3 is full attention
        for c in windows.values():
            # native olmo3 builds a sliding mask itself: no mass beyond the window either way
            assert c.measured["attnscope_beyond_mass"] < WINDOW_TOL
            assert c.measured["native_beyond_mass"] < WINDOW_TOL
        assert report.get("window_output")[0].measured["max_abs_logit_diff"] == 0.0
        assert report.get("window_layout")[0].status == "pass"
    else:
        assert not windows and not report.get("window_layout")


def test_doctor_checks_parity_with_eager_and_catches_a_wrong_engine(ckpt, off_by_a_little_engine):
    """eager_parity runs attnscope.conformance on the first 48 tokens: a 1% error in the
    attention function's scale fails it (the healthy runs above pass it)."""
    report = doctor(str(ckpt("llama")))
    parity = report.get("eager_parity")[0]
    assert parity.status == "fail" and "WRONG" in parity.explanation and not report.ok


@pytest.mark.parametrize("kind", ["llama", "olmo3"])
def test_doctor_parity_passes_and_leaves_the_model_on_attnscope(ckpt, kind):
    import attnscope

    lm = attnscope.load(str(ckpt(kind)))
    parity = doctor(lm).get("eager_parity")[0]
    assert parity.status == "pass", parity.explanation
    assert parity.measured["analyze.entropy"] <= 1e-5 and parity.measured["logits.logits"] <= 1e-4
    assert lm.model.config._attn_implementation == "attnscope"


def test_loss_check_matches_plain_transformers_loss(ckpt):
    path = ckpt("olmo3")
    tok = AutoTokenizer.from_pretrained(path)
    ref = T.text_loss(AutoModelForCausalLM.from_pretrained(path).eval(), tok, T.SAMPLE_TEXT)
    report = doctor(str(path), text=T.SAMPLE_TEXT, reference_loss=ref, loss_margin=0.01)
    loss = report.get("loss")[0]
    assert loss.status == "pass"
    assert loss.measured["loss"] == pytest.approx(ref, abs=1e-4)
    assert loss.measured["tokens"] == len(tok(T.SAMPLE_TEXT).input_ids)


# ---------------------------------------------------------------------------------------------
# flat rope theta


def test_load_fixes_flat_rope_theta(ckpt, caplog):
    path = ckpt("flat")
    declared = declared_rope_theta(path)
    assert declared == 8_000_000.0
    with caplog.at_level(logging.WARNING, logger="attnscope"):
        fixed = attnscope.load(str(path))
    eff = effective_rope_theta(fixed.model)
    assert set(eff) == {"full_attention", "sliding_attention"}
    assert all(v == pytest.approx(declared, rel=1e-5) for v in eff.values())
    assert fixed.info["rope"]["fixed"] and fixed.info["rope"]["wrong_types"] == ["sliding_attention"]
    # transformers alone would have run the sliding layers at the class default
    assert fixed.info["rope"]["native_effective"]["sliding_attention"] == pytest.approx(500_000.0, rel=1e-5)
    assert any("rope_theta" in r.getMessage() for r in caplog.records)  # never silent
    assert any("rope_theta" in f for f in fixed.info["fixes"])
    ds = attnscope.analyze(fixed, text=T.SAMPLE_TEXT, metrics=("sink_mass",))
    assert "rope_theta" in ds.attrs["load_fixes"]

    unfixed = attnscope.load(str(path), fix_rope=False)
    assert effective_rope_theta(unfixed.model)["sliding_attention"] == pytest.approx(500_000.0, rel=1e-5)
    assert not unfixed.info["rope"]["fixed"] and unfixed.info["fixes"] == []
    # the repair changes what the sliding layers compute
    ids = fixed.tokenizer(T.SAMPLE_TEXT, return_tensors="pt").input_ids[:, :T_LEN]
    with torch.no_grad():
        a = fixed.model(input_ids=ids, use_cache=False).logits
        b = unfixed.model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(a, b, atol=1e-4)


def test_doctor_flags_flat_rope_theta(ckpt):
    path = str(ckpt("flat"))
    report = doctor(path)  # fixed at load: flagged as a warning
    theta = _by_name(report, "rope_theta")
    assert theta["full_attention"].status == "pass"
    sliding = theta["sliding_attention"]
    assert sliding.status == "warn" and sliding.expected == 8_000_000.0
    assert sliding.measured["transformers"] == pytest.approx(500_000.0, rel=1e-5)
    assert sliding.measured["effective"] == pytest.approx(8_000_000.0, rel=1e-5)
    assert report.ok

    report = doctor(path, fix_rope=False)  # left as transformers builds it: a failure
    sliding = _by_name(report, "rope_theta")["sliding_attention"]
    assert sliding.status == "fail" and sliding.measured == pytest.approx(500_000.0, rel=1e-5)
    assert not report.ok and report.status == "fail"


# ---------------------------------------------------------------------------------------------
# sliding windows


def _recording_window_eager(store):
    """Eager attention that honours sliding_window and records its probabilities per layer."""

    def fn(module, query, key, value, attention_mask, scaling, dropout=0.0, sliding_window=None, **kw):
        g = module.num_key_value_groups
        k, v = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        i = torch.arange(query.shape[2])[:, None] + (k.shape[2] - query.shape[2])
        j = torch.arange(k.shape[2])[None, :]
        allowed = j <= i
        if sliding_window:
            allowed &= (i - j) < sliding_window
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")).float(), dim=-1).to(query.dtype)
        store[module.layer_idx] = probs.detach()
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs

    return fn


def test_doctor_flags_remote_kernel_that_ignores_the_window(ckpt):
    report = doctor(str(ckpt("olmo3_preorder")), trust_remote_code=True)
    windows = _by_name(report, "window")
    assert set(windows) == {"layer 0", "layer 1", "layer 2"}
    for c in windows.values():
        assert c.status == "warn" and c.expected == {"window": W, "beyond_mass": 0.0}
        assert c.measured["attnscope_beyond_mass"] < WINDOW_TOL  # attnscope applies the window
        assert c.measured["native_beyond_mass"] > 0.3  # sdpa/eager let it attend everywhere
        assert "ignores this window" in c.explanation
    out = report.get("window_output")[0]
    assert out.status == "warn" and out.measured["max_abs_logit_diff"] > 0.1
    assert report.ok  # attnscope repairs it: a warning, not a failure


def test_capture_applies_the_declared_window_with_eager_parity(ckpt):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    path = ckpt("olmo3_preorder")
    lm = attnscope.load(str(path), trust_remote_code=True)
    ids = lm.tokenizer(T.SAMPLE_TEXT, return_tensors="pt").input_ids[:, :T_LEN]
    ds = attnscope.analyze(lm, token_ids=ids[0].tolist(), metrics=("pattern",))
    assert json.loads(ds.attrs["windows"]) == {"0": W, "1": W, "2": W, "3": None}

    store = {}
    AttentionInterface.register("attnscope_test_doctor_eager", _recording_window_eager(store))
    AttentionMaskInterface.register("attnscope_test_doctor_eager", sdpa_mask)
    ref = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                               attn_implementation="attnscope_test_doctor_eager").eval()
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, use_cache=False).logits
        ours = lm.model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(ours, ref_logits, atol=1e-5)  # the model's output with the window applied

    q = np.arange(T_LEN)[:, None]
    k = np.arange(T_LEN)[None, :]
    for layer in range(4):
        P = ds["pattern"].sel(layer=layer).values  # [H, T, T]
        np.testing.assert_allclose(P, store[layer][0].numpy(), atol=1e-5)
        beyond = P[:, (q - k) >= W]
        if layer < 3:
            assert (beyond == 0).all()  # exactly zero beyond the window
        else:
            assert beyond.sum() > 0.1  # the full layer attends far


def test_swa_without_layer_types_is_flagged_as_assumed(ckpt):
    path = ckpt("no_layer_types")
    assert "layer_types" not in json.loads((path / "config.json").read_text())
    lm = attnscope.load(str(path), trust_remote_code=True)
    assert lm.info["windows_assumed"] is True
    assert lm.info["windows"] == {0: W, 1: W, 2: W, 3: None}
    assert any("layer_types" in f for f in lm.info["fixes"])
    ds = attnscope.analyze(lm, text=T.SAMPLE_TEXT, metrics=("sink_mass",))
    assert ds.attrs["windows_assumed"] is True
    assert json.loads(ds.attrs["windows"]) == {"0": W, "1": W, "2": W, "3": None}

    report = doctor(lm)
    layout = report.get("window_layout")[0]
    assert layout.status == "warn" and layout.measured["window_layers"] == [0, 1, 2]
    assert "assumed" in layout.explanation
    assert all("assumed" in c.explanation for c in report.get("window"))

    # a model with layer_types is not reported as assumed
    native = attnscope.load(str(ckpt("olmo3")))
    assert native.info["windows_assumed"] is False
    assert attnscope.analyze(native, text=T.SAMPLE_TEXT, metrics=("sink_mass",)).attrs["windows_assumed"] is False


# ---------------------------------------------------------------------------------------------
# wrong block class


def test_doctor_flags_wrong_norm_checkpoint_by_loss(ckpt):
    wrong = ckpt("wrong_norm")
    ref_path = wrong.parent / "wrong_norm_ref"
    tok = AutoTokenizer.from_pretrained(ref_path)
    ref_loss = T.text_loss(AutoModelForCausalLM.from_pretrained(ref_path).eval(), tok, T.SAMPLE_TEXT)
    # the correctly loaded model passes against its own loss...
    good = doctor(str(ref_path), text=T.SAMPLE_TEXT, reference_loss=ref_loss, loss_margin=0.25)
    assert good.get("loss")[0].status == "pass"
    # ...the same weights under the pre-norm class load silently, but the loss gives it away
    bad = doctor(str(wrong), trust_remote_code=True, text=T.SAMPLE_TEXT, reference_loss=ref_loss,
                 loss_margin=0.25)
    assert bad.get("weights")[0].status == "pass"
    loss = bad.get("loss")[0]
    assert loss.status == "fail" and loss.measured["loss"] > ref_loss + 0.25
    assert not bad.ok
    # against the registry row of the published defect, the norm placement is flagged too
    as_g = doctor(str(wrong), trust_remote_code=True, as_name="G_post_LQK_8kv_4k_14k_SWA",
                  text=T.SAMPLE_TEXT)
    norm = as_g.get("feature:norm")[0]
    assert norm.status == "fail" and (norm.measured, norm.expected) == ("pre", "post")
    assert as_g.get("feature:qk_norm")[0].status == "pass"
    assert any("post-norm weights" in c.explanation for c in as_g.get("registry"))


def test_doctor_flags_missing_and_unexpected_weights(ckpt):
    report = doctor(str(ckpt("wrong_norm_keys")), trust_remote_code=True)
    weights = report.get("weights")[0]
    assert weights.status == "fail" and not report.ok
    # 4 layers: input_layernorm newly initialised, post_feedforward_layernorm unused
    assert weights.measured == {"missing": 4, "unexpected": 4, "mismatched": 0}
    assert "input_layernorm" in weights.explanation and "post_feedforward_layernorm" in weights.explanation


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_features_match_and_mismatch(ckpt):
    path = str(ckpt("pool_llama"))
    match = doctor(path, as_name="G_pre_8kv_8k_14k", loss_tokens=32)
    assert match.registry_name == "G_pre_8kv_8k_14k"
    feats = {c.name: c for c in match.checks if c.name.startswith("feature:")}
    assert set(feats) >= {"feature:qk_norm", "feature:n_heads", "feature:kv_heads", "feature:n_layers",
                          "feature:norm", "feature:swa"}
    assert all(c.status == "pass" for c in feats.values()), feats
    assert match.ok

    # the same llama checked as a layerwise-QK-norm, full-MHA, post-norm Olmo 3 model
    wrong = doctor(path, as_name="B_post_LQK_32kv_4k_11k", loss_tokens=32)
    got = {c.name: c for c in wrong.checks if c.name.startswith("feature:")}
    assert (got["feature:qk_norm"].status, got["feature:qk_norm"].measured,
            got["feature:qk_norm"].expected) == ("fail", "none", "layerwise")
    assert (got["feature:kv_heads"].measured, got["feature:kv_heads"].expected) == (8, 32)
    assert got["feature:kv_heads"].status == "fail" and got["feature:norm"].status == "fail"
    assert got["feature:n_heads"].status == "pass"
    assert got["feature:class"].status == "warn"
    assert not wrong.ok

    # an SWA registry row whose config carries no window: the model runs full attention
    swa = doctor(path, as_name="F_pre_8kv_8k_14k_SWA", loss_tokens=32)
    c = swa.get("feature:swa")[0]
    assert c.status == "fail" and c.measured["window_layers"] == [] and "no window" in c.explanation

    with pytest.raises(ModelNotFoundError, match="not an OlmPool model"):
        doctor(path, as_name="Z_pre_1kv_1k")
    assert doctor(path, loss_tokens=32).get("registry")[0].status == "skip"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A local Hugging Face cache, used offline: load() takes its real Hub path without network."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def add(repo_id, folder):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        return repo_id

    return add


def test_hub_model_found_in_registry_by_name(ckpt, hub_cache):
    repo = hub_cache("allenai/G_pre_8kv_8k_14k", ckpt("pool_llama"))
    report = doctor(repo, loss_tokens=32)
    assert report.registry_name == "G_pre_8kv_8k_14k"
    assert all(c.status == "pass" for c in report.checks if c.name.startswith("feature:"))


def test_hub_remote_code_needs_opt_in(ckpt, hub_cache, tmp_path):
    repo = hub_cache("tiny-org/remote-swa", ckpt("olmo3_preorder"))
    with pytest.raises(RemoteCodeError, match="trust_remote_code"):
        attnscope.load(repo)
    lm = attnscope.load(repo, trust_remote_code=True)
    assert lm.source == "hub" and type(lm.model).__name__ == "Olmo3PreorderForCausalLM"
    # an auto_map is refused even where transformers would quietly use a native class instead
    native = tmp_path / "llama_with_auto_map"
    shutil.copytree(ckpt("llama"), native)
    cfg = json.loads((native / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLlama"}
    (native / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RemoteCodeError):
        attnscope.load(hub_cache("tiny-org/llama-auto-map", native))


# ---------------------------------------------------------------------------------------------
# CLI

runner = CliRunner()


def test_cli_json_and_exit_codes(ckpt):
    res = runner.invoke(app, ["doctor", str(ckpt("llama")), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["ok"] is True and data["status"] == "pass"
    assert {c["name"] for c in data["checks"]} >= {"rope_theta", "weights", "loss"}
    assert all(set(c) == {"name", "scope", "status", "measured", "expected", "explanation"}
               for c in data["checks"])

    res = runner.invoke(app, ["doctor", str(ckpt("flat")), "--no-fix-rope", "--json"])
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["ok"] is False
    assert any(c["name"] == "rope_theta" and c["status"] == "fail" for c in data["checks"])

    res = runner.invoke(app, ["doctor", str(ckpt("olmo3_preorder"))])  # remote code, no opt-in
    assert res.exit_code == 2 and "trust_remote_code" in res.stderr


def test_cli_table(ckpt):
    res = runner.invoke(app, ["doctor", str(ckpt("olmo3_preorder")), "--trust-remote-code"])
    assert res.exit_code == 0, res.output  # warnings only
    assert "window_output" in res.stdout and "warn" in res.stdout
    assert "0 failed" in res.stdout and "load fix:" in res.stdout


# ---------------------------------------------------------------------------------------------
# the default loss threshold on the real model


def test_default_loss_threshold_separates_real_from_random_smollm2(smollm2):
    import dataclasses

    report = doctor(smollm2, loss_tokens=256)
    loss = report.get("loss")[0]
    assert loss.status == "pass" and loss.measured["loss"] < 5.0  # a working 135M model on prose
    assert report.ok
    # the same architecture with freshly initialised weights: what a broken load amounts to
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(smollm2.config, attn_implementation="attnscope").eval()
    broken = dataclasses.replace(smollm2, model=random_model, info={})
    loss = doctor(broken, loss_tokens=256).get("loss")[0]
    assert loss.status == "fail" and loss.measured["loss"] > 8.0
    assert loss.measured["uniform_loss"] == pytest.approx(np.log(smollm2.config.vocab_size))
