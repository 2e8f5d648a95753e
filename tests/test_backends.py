"""Backends: the same metrics through TransformerLens and nnsight as through attnscope's own
attention function, the user's (pre-hooked) models left as they were, and clear errors."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import attnscope
from attnscope.errors import BackendError, UnsupportedModelError

tl = pytest.importorskip("transformer_lens")
nnsight = pytest.importorskip("nnsight")
from nnsight.intervention.source import STATE  # noqa: E402
from nnsight.modeling.transformers import TransformersModel  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

from attnscope.backends.nnsight import find_attention_call  # noqa: E402
from attnscope.backends.transformer_lens import bridge_source  # noqa: E402

METRICS = ("sink_mass", "token0_mass", "entropy", "mean_distance", "position_profile",
           "distance_profile")
ATOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def assert_same(ds, ref, names, where=""):
    assert list(ds.layer.values) == list(ref.layer.values)
    for name in names:
        want = ref[name].values
        tol = ATOL * max(1.0, float(np.abs(want).max())) if name == "mean_distance" else ATOL
        err = float(np.abs(ds[name].values - want).max())
        assert err <= tol, f"{where} {name}: max abs error {err:.2e} > {tol:.1e}"


def module_state(hf_model):
    """What a backend could leave behind on a transformers model."""
    return (hf_model.config._attn_implementation,
            [(n, type(m).__name__, "forward" in m.__dict__, STATE in m.__dict__)
             for n, m in hf_model.named_modules()])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """Tiny GQA llama (4 query heads over 2 KV heads) with a tokenizer."""
    from attnscope.testing import make_tiny_model

    return attnscope.load(str(make_tiny_model("llama", tmp_path_factory.mktemp("bk") / "llama")))


@pytest.fixture(scope="module")
def tiny_ids():
    torch.manual_seed(1)
    return torch.randint(3, 300, (64,)).tolist()


def boot(lm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(lm.name, hf_model=copy.deepcopy(lm.model),
                                                   tokenizer=lm.tokenizer)


def test_tiny_gqa_every_backend_matches_native(tiny_llama, tiny_ids):
    kw = dict(token_ids=tiny_ids, metrics=METRICS + ("pattern",), spans={"needle": (30, 34)},
              min_query_position=4)
    ref = attnscope.analyze(tiny_llama, **kw)
    assert ref.attrs["backend"] == "native"
    before = module_state(tiny_llama.model)
    bridge = boot(tiny_llama)
    nn_model = TransformersModel(copy.deepcopy(tiny_llama.model), tokenizer=tiny_llama.tokenizer)
    runs = {
        "hf->transformer_lens": attnscope.analyze(tiny_llama, backend="transformer_lens", **kw),
        "hf->nnsight": attnscope.analyze(tiny_llama, backend="nnsight", **kw),
        "bridge (rotary hooks)": attnscope.analyze(bridge, **kw),
        "bridge (hook_pattern)": attnscope.analyze(bridge_source(bridge, hooks="pattern"), **kw),
        "nnsight model": attnscope.analyze(nn_model, **kw),
        "nnsight model, native": attnscope.analyze(nn_model, backend="native", **kw),
    }
    for where, ds in runs.items():
        assert_same(ds, ref, METRICS + ("span_mass", "pattern"), where)
    assert runs["bridge (rotary hooks)"].attrs["backend"] == "transformer_lens"
    assert runs["nnsight model"].attrs["backend"] == "nnsight"
    # asking a peer to run a plain model leaves that model exactly as it was
    assert module_state(tiny_llama.model) == before


def test_smollm2_real_text_through_peers(smollm2, prose):
    ids = smollm2.tokenizer(prose)["input_ids"][:512]
    kw = dict(token_ids=ids, metrics=METRICS, spans={"early": (5, 9), "middle": (250, 290)})
    ref = attnscope.analyze(smollm2, **kw)
    bridge = boot(smollm2)
    assert_same(attnscope.analyze(bridge, **kw), ref, METRICS + ("span_mass",), "bridge")
    nn_model = TransformersModel(smollm2.model, tokenizer=smollm2.tokenizer)
    assert_same(attnscope.analyze(nn_model, **kw), ref, METRICS + ("span_mass",), "nnsight")
    # full maps straight from TransformerLens's hook_pattern, on a few layers
    kw_p = dict(token_ids=ids[:128], metrics=("pattern", "sink_mass"), layers=[0, 14, 29])
    ref_p = attnscope.analyze(smollm2, **kw_p)
    assert_same(attnscope.analyze(bridge_source(bridge, hooks="pattern"), **kw_p), ref_p,
                ("pattern", "sink_mass"), "hook_pattern")
    assert int((ref.token0_mass > 0.5).sum()) >= 20  # real sinks, so the comparison means something


def test_prehooked_bridge_keeps_its_hooks_and_they_apply(tiny_llama, tiny_ids):
    bridge = boot(tiny_llama)
    calls = []
    # the user's edit sharpens layer 2's attention; attnscope's hooks on the same point see it
    bridge.add_hook("blocks.2.attn.hook_rot_q", lambda x, hook: x * 50)
    bridge.add_perma_hook("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1))
    ids = torch.tensor([tiny_ids])
    with torch.no_grad():
        logits_before = bridge(ids)
    counts = {n: len(hp.fwd_hooks) for n, hp in bridge.hook_dict.items()}
    level = getattr(bridge, "context_level", 0)
    n_calls = len(calls)
    ds = attnscope.analyze(bridge, token_ids=tiny_ids, metrics=METRICS)
    assert len(calls) == n_calls + 1  # the user's hooks fired during attnscope's run
    assert {n: len(hp.fwd_hooks) for n, hp in bridge.hook_dict.items()} == counts
    assert getattr(bridge, "context_level", 0) == level
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), logits_before, rtol=0, atol=0)
    # the statistics are those of the hooked model: layers 0-1 as native, layer 2 sharper
    ref = attnscope.analyze(tiny_llama, token_ids=tiny_ids, metrics=METRICS)
    assert_same(ds.sel(layer=[0, 1]), ref.sel(layer=[0, 1]), METRICS, "hooked bridge, layers 0-1")
    assert float((ref.entropy.sel(layer=2) - ds.entropy.sel(layer=2)).min()) > 0.1


def test_prehooked_nnsight_model_keeps_its_edits_and_hooks(tiny_llama, tiny_ids):
    hf = copy.deepcopy(tiny_llama.model)
    nn_model = TransformersModel(hf, tokenizer=tiny_llama.tokenizer)
    with nn_model.edit(inplace=True):  # a default intervention, replayed on every trace
        q_proj = nn_model.model.layers[2].self_attn.q_proj
        q_proj.output = q_proj.output * 50  # sharpens layer 2's attention
    seen = []
    handle = hf.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(1))
    ids = torch.tensor([tiny_ids])
    with nn_model.trace(ids):
        out_before = nnsight.save(nn_model.output.logits)
    state_before = module_state(hf)
    sourced_before = [m.__dict__[STATE].sourced for m in hf.modules() if STATE in m.__dict__]
    n_edits = len(nn_model._edits)
    ds = attnscope.analyze(nn_model, token_ids=tiny_ids, metrics=METRICS)
    assert seen  # the user's torch hook ran inside attnscope's trace
    assert len(nn_model._edits) == n_edits and module_state(hf) == state_before
    assert [m.__dict__[STATE].sourced for m in hf.modules() if STATE in m.__dict__] == sourced_before
    with nn_model.trace(ids):
        out_after = nnsight.save(nn_model.output.logits)
    torch.testing.assert_close(out_after, out_before, rtol=0, atol=0)
    ref = attnscope.analyze(tiny_llama, token_ids=tiny_ids, metrics=METRICS)
    assert_same(ds.sel(layer=[0, 1]), ref.sel(layer=[0, 1]), METRICS, "edited nnsight, layers 0-1")
    assert float((ref.entropy.sel(layer=2) - ds.entropy.sel(layer=2)).min()) > 0.1
    handle.remove()


def test_attention_call_is_found_by_what_it_is():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    class RenamedAttention(torch.nn.Module):
        """Calls the interface under another name, after another call of that same name."""

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 16)
            self.layer_idx = 0
            self.scaling = 0.5

        def forward(self, x):
            b, t, _ = x.shape
            fn = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", sdpa_attention_forward)
            fn = getattr(fn, "__wrapped__", fn)
            q = self.proj(x).view(b, t, 2, 8).transpose(1, 2)
            out, _ = fn(self, q, q, q, None, scaling=self.scaling, is_causal=True)
            return out.reshape(b, t, 16)

    class NoInterfaceAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer_idx = 0

        def forward(self, x):
            return torch.softmax(x @ x.transpose(-1, -2), -1) @ x

    renamed = nnsight.NNsight(torch.nn.Sequential(RenamedAttention()))
    label = find_attention_call(renamed[0].source)
    assert label.startswith("fn_") and label != "fn_0"
    x = torch.randn(1, 5, 8)
    with renamed.trace(x):
        args = nnsight.save(getattr(renamed[0].source, label).inputs[0])
    assert args[0] is renamed[0]._module and args[1].shape == (1, 2, 5, 8)
    plain = nnsight.NNsight(torch.nn.Sequential(NoInterfaceAttention()))
    with pytest.raises(UnsupportedModelError, match="attention-interface call.*backend='native'"):
        find_attention_call(plain[0].source)


@pytest.mark.parametrize("backend,module,extra", [("transformer_lens", "transformer_lens", "tl"),
                                                  ("nnsight", "nnsight", "nnsight")])
def test_missing_extra_says_what_to_install(tiny_llama, tiny_ids, monkeypatch, backend, module,
                                            extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(BackendError, match=rf"pip install 'attnscope\[{extra}\]'"):
        attnscope.analyze(tiny_llama, token_ids=tiny_ids, backend=backend)


def test_import_and_native_analyze_work_without_the_peers(tiny_llama):
    code = (
        "import sys\n"
        "sys.modules['transformer_lens'] = None; sys.modules['nnsight'] = None\n"
        "import attnscope, attnscope.backends, attnscope.backends.transformer_lens\n"
        "lm = attnscope.load(sys.argv[1])\n"
        "ds = attnscope.analyze(lm, token_ids=list(range(3, 40)), metrics=['sink_mass'])\n"
        "assert ds.attrs['backend'] == 'native', ds.attrs\n"
        "print('ok', ds.sink_mass.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, tiny_llama.path], capture_output=True,
                         text=True, timeout=300, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok (4, 4)" in out.stdout


def test_wrong_backend_for_the_object_is_refused(tiny_llama, tiny_ids):
    bridge = boot(tiny_llama)
    with pytest.raises(BackendError, match="backend='transformer_lens'"):
        attnscope.analyze(bridge, token_ids=tiny_ids, backend="native")
    with pytest.raises(BackendError, match="unknown backend"):
        attnscope.analyze(tiny_llama, token_ids=tiny_ids, backend="pytorch")
    with pytest.raises(BackendError, match="one sequence at a time"):
        attnscope.analyze(bridge, token_ids=[tiny_ids, tiny_ids[:40]])


# ------------------------------------------------------------------- tokenisation, rewritten models
TEXT = "The quick brown fox jumps over the lazy dog. A second sentence follows the first one here."


def test_bridge_tokenises_text_like_the_native_path(tiny_llama):
    """TransformerLens reloads the tokenizer with add_bos_token=True; analyze(bridge, text) must
    still see the model's own token ids, so it equals the native result."""
    bridge = boot(tiny_llama)
    native_ids = tiny_llama.tokenizer(TEXT)["input_ids"]
    assert len(bridge.tokenizer(TEXT)["input_ids"]) == len(native_ids) + 1  # the BOS TransformerLens adds
    ref = attnscope.analyze(tiny_llama, TEXT, metrics=METRICS, min_query_position=4)
    ds = attnscope.analyze(bridge, TEXT, metrics=METRICS, min_query_position=4)
    assert ds.attrs["n_tokens"] == ref.attrs["n_tokens"] == len(native_ids)
    assert_same(ds, ref, METRICS, "bridge(text)")


def test_model_rewritten_by_a_bridge_gets_a_clear_error(tiny_llama, tiny_ids):
    """Booting a bridge on a model rewrites it in place; the native and nnsight paths then cannot
    see attention: one clear error (was nnsight's OutOfOrderError)."""
    rewritten = copy.deepcopy(tiny_llama.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers("tiny", hf_model=rewritten, tokenizer=tiny_llama.tokenizer)
    assert attnscope.analyze(bridge, token_ids=tiny_ids, metrics=("sink_mass",)).sizes["layer"] == 4
    for model in (rewritten, TransformersModel(rewritten, tokenizer=tiny_llama.tokenizer)):
        with pytest.raises(BackendError, match="rewritten in place by TransformerBridge.boot_transformers"):
            attnscope.analyze(model, token_ids=tiny_ids)


@pytest.mark.parametrize("family", ["gpt_oss", "inkling2_text", "deepseek_v32"])
def test_nnsight_applies_the_attention_contract(family, single_thread):
    """Learned sinks, a position bias with per-query sinks, a sparse selection: the nnsight path
    reads the same kwargs through read_kwargs and equals the native path."""
    pytest.importorskip("nnsight")
    from attnscope import zoo
    from attnscope.testing import make_tiny_tokenizer

    tiny = zoo.tiny_model(family)
    ids, tok = tiny.input_ids[0].tolist(), make_tiny_tokenizer()
    native = attnscope.analyze(tiny.model, token_ids=ids, tokenizer=tok, min_query_position=4)
    peer = attnscope.analyze(tiny.model, token_ids=ids, tokenizer=tok, min_query_position=4, backend="nnsight")
    assert peer.attrs["backend"] == "nnsight"
    for name in native.data_vars:
        assert float(np.nanmax(np.abs(native[name].values - peer[name].values))) <= 1e-5 * max(
            1.0, float(np.nanmax(np.abs(native[name].values)))), name
