"""The GPU engine's logic on CPU: FlexAttention (uncompiled here) as the attention kernel, and the
feature pass for row metrics, against eager attention and float64 references.

Everything the CUDA path does except compiling runs here: masks for every layer kind, GQA,
offsets (KV cache), edits, padding, soft-capping, the LSE and the feature pass. The compiled
path is checked for tracing and for equal outputs on CPU (without the LSE, which compiled
FlexAttention on CPU does not return); the speed needs a GPU (benchmarks/scale.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attnscope
from attnscope.capture import kernels
from attnscope.capture.interface import capture, kernel_settings
from attnscope.capture.visibility import AttentionEdit, Visibility
from attnscope.errors import AttnscopeError
from attnscope.metrics.reductions import RowPlan, StatsRecorder, keyset_probs
from reference import captured_qk, eager_maps, fp64_maps, reference_metrics

ROW = ("entropy", "mean_distance", "position_profile")
METRICS = ("sink_mass", "token0_mass") + ROW
ATOL = 1e-5


def _errors(ds, maps_of, queries, spans=None, seq=None):
    """Max abs error per metric against reference_metrics of the maps (mean_distance relative)."""
    err = {}
    for layer in ds.layer.values:
        ref = reference_metrics(maps_of(int(layer)), queries, spans=spans)
        for name, want in ref.items():
            if name not in ds:
                continue
            got = ds[name].sel(layer=layer)
            got = (got if seq is None else got.isel(sequence=seq)).values
            scale = max(1.0, float(np.abs(want).max())) if name == "mean_distance" else 1.0
            err[name] = max(err.get(name, 0.0), float(np.abs(got - want).max()) / scale)
    return err


def _assert_small(err, tol=ATOL):
    assert err, "nothing was compared"
    bad = {k: v for k, v in err.items() if not v <= tol}
    assert not bad, f"errors above {tol:.0e}: {bad}"


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo2", "olmo3", "olmo_hybrid"])
def test_flex_and_feature_pass_match_eager(tiny, family, single_thread):
    lm = tiny(family)
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 56))
    spans = {"needle": (20, 24)}
    ds = attnscope.analyze(lm, token_ids=ids[0].tolist(), metrics=METRICS, spans=spans,
                           min_query_position=4, kernel="flex", row_pass="features")
    assert set(json.loads(ds.attrs["attention_kernels"]).values()) == {"flex"}
    assert set(json.loads(ds.attrs["row_pass"]).values()) == {"features:flex"}
    maps = eager_maps(lm.model, ids)
    queries = np.array(json.loads(ds.attrs["query_positions"]))
    _assert_small(_errors(ds, lambda L: maps[L][0], queries, spans))
    if family == "olmo3":  # the sliding layers really were windowed by the block mask
        assert float(ds.mean_distance.sel(layer=0).max()) < 8


def test_remote_code_model_through_flex(tmp_path, single_thread):
    """A remote-code SWA class (its own kernel ignores the window; attnscope applies it)."""
    from attnscope.testing import make_tiny_model

    lm = attnscope.load(str(make_tiny_model("olmo3_preorder", tmp_path / "remote")),
                        trust_remote_code=True)
    ids = lm.tokenizer(attnscope.testing.SAMPLE_TEXT)["input_ids"][:48]
    ds = attnscope.analyze(lm, token_ids=ids, metrics=METRICS, min_query_position=4,
                           kernel="flex", row_pass="features")
    layers = captured_qk(lm.model, torch.tensor([ids]))
    assert any(a.window for a in layers.values())
    queries = np.array(json.loads(ds.attrs["query_positions"]))
    _assert_small(_errors(ds, lambda L: fp64_maps(layers[L]), queries))


@pytest.mark.parametrize("family", ["llama", "olmo3"])
def test_flex_padded_batch_matches_eager(tiny, family, single_thread):
    lm = tiny(family)
    torch.manual_seed(2)
    a = torch.randint(3, 128, (44,)).tolist()
    b = torch.randint(3, 128, (29,)).tolist()
    kw = dict(metrics=METRICS, spans={"s": (3, 6)}, queries="strided:12", min_query_position=4,
              kernel="flex", row_pass="features")
    batch = attnscope.analyze(lm, token_ids=[a, b], **kw)
    ids = torch.zeros(2, 44, dtype=torch.long)
    mask = torch.zeros(2, 44, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(a), 1
    ids[1, 15:], mask[1, 15:] = torch.tensor(b), 1
    layers = captured_qk(lm.model, ids, mask)
    for seq, (length, offset) in enumerate([(44, 0), (29, 15)]):
        q = np.array(json.loads(batch.attrs["query_positions"])[seq])

        def real(L):
            return fp64_maps(layers[L], seq)[:, offset:offset + length, offset:offset + length]

        _assert_small(_errors(batch, real, q, {"s": (3, 6)}, seq=seq))
        alone = attnscope.analyze(lm, token_ids=[a, b][seq], **kw)
        for name in METRICS:
            # the same RoPE positions as alone (position_ids): equal to fp32 round-off
            np.testing.assert_allclose(batch[name].isel(sequence=seq).values, alone[name].values,
                                       atol=2e-6, err_msg=f"{family} seq {seq} {name}")


@pytest.mark.parametrize("kernel", ["flex", "cpu_flash", "reference"])
@pytest.mark.parametrize("family", ["llama", "olmo3"])
def test_kv_cache_offset_queries(tiny, family, kernel, single_thread):
    """A second chunk of queries against a cache (q_offset > 0) gives eager's logits, and its
    row LSE equals a float64 computation from the same q and k."""
    lm = tiny(family)
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (1, 44))
    with torch.no_grad():
        try:  # the fixture's model is shared: leave it routed through attnscope, as loaded
            lm.model.set_attn_implementation("eager")
            want = lm.model(input_ids=ids).logits[0, 30:]
            lm.model.set_attn_implementation("sdpa")
            past = lm.model(input_ids=ids[:, :30], use_cache=True).past_key_values
        finally:
            lm.model.set_attn_implementation("attnscope")

    class Keep:
        needs_lse = True
        seen = {}

        def wants(self, layer):
            return True

        def observe(self, attn):
            self.seen[attn.layer] = attn

    keep = Keep()
    with torch.no_grad(), kernel_settings(kernel), capture(lm.model, keep):
        got = lm.model(input_ids=ids[:, 30:], past_key_values=past, use_cache=True).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for attn in keep.seen.values():
        # a sliding layer's cache kept only its window: key index 0 is token key_start
        assert attn.key_start + attn.q_offset == 30 and attn.kernel == kernel
        assert (attn.key_start > 0) == (family == "olmo3" and attn.window is not None)
        P = fp64_maps(attn)
        # keyset_probs takes token positions: tokens 26..33, whichever of them the cache kept
        rows = torch.arange(attn.query.shape[2])
        got = keyset_probs(attn, 0, rows, 26, 34).numpy()
        want = np.zeros_like(got)
        for t in range(26, 34):
            if t >= attn.key_start:
                want[:, :, t - 26] = P[:, :, t - attn.key_start]
        np.testing.assert_allclose(got, want, atol=2e-6)
        q = attn.query[0].double()
        k = attn.key[0].double().repeat_interleave(attn.n_rep, 0)
        s = q @ k.transpose(-1, -2) * attn.scale
        vis = attn.visible(torch.arange(q.shape[1]), 0, k.shape[1])[0]
        lse = torch.logsumexp(s.masked_fill(~vis[None], float("-inf")), -1)
        np.testing.assert_allclose(attn.lse[0].numpy(), lse.numpy(), atol=2e-5)
        assert np.allclose(P.sum(-1), 1.0)


EDITS = [AttentionEdit(window=8), AttentionEdit(window=8, keep_sinks=2), AttentionEdit(drop_sinks=3),
         AttentionEdit(window=6, drop_sinks=1, layers=(1, 2))]


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.describe())
def test_flex_edits_match_reference_kernel_and_fp64(tiny, edit, single_thread):
    lm = tiny("llama")
    torch.manual_seed(4)
    ids = torch.randint(3, 128, (1, 40))
    attnscope.set_edit(lm.model, edit)
    try:
        flex = attnscope.analyze(lm, token_ids=ids[0].tolist(), metrics=METRICS, min_query_position=2,
                                 kernel="flex", row_pass="features")
        layers = captured_qk(lm.model, ids)
        with torch.no_grad(), kernel_settings("flex"):
            with attnscope.capture(lm.model, StatsRecorder(("sink_mass",), [RowPlan(40, np.arange(40))])):
                logits_flex = lm.model(input_ids=ids).logits
        with torch.no_grad(), kernel_settings("reference"):
            with attnscope.capture(lm.model, StatsRecorder(("sink_mass",), [RowPlan(40, np.arange(40))])):
                logits_ref = lm.model(input_ids=ids).logits
    finally:
        attnscope.set_edit(lm.model, None)
    torch.testing.assert_close(logits_flex, logits_ref, rtol=1e-5, atol=1e-5)
    queries = np.array(json.loads(flex.attrs["query_positions"]))
    _assert_small(_errors(flex, lambda L: fp64_maps(layers[L]), queries))
    for L in edit.layers or range(4):  # the edit really hid keys
        P = fp64_maps(layers[L])
        if edit.drop_sinks:
            assert (P[:, edit.drop_sinks:, :edit.drop_sinks] == 0).all()


def _tiny_gemma2(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma2", vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_hidden_layers=2, max_position_embeddings=256,
        sliding_window=12, attn_logit_softcapping=2.0, final_logit_softcapping=None,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger q/k so that soft-capping at 2.0 really bends the scores
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    model.save_pretrained(tmp_path / "gemma2")
    return attnscope.load(str(tmp_path / "gemma2"))


def test_softcapping_through_score_mod(tmp_path, single_thread):
    lm = _tiny_gemma2(tmp_path)
    torch.manual_seed(5)
    ids = torch.randint(3, 128, (1, 40))
    ds = attnscope.analyze(lm, token_ids=ids[0].tolist(), metrics=METRICS, min_query_position=4,
                           kernel="flex", row_pass="features")
    # soft-capping breaks the entropy identity: row metrics take the chunked pass
    assert set(json.loads(ds.attrs["row_pass"]).values()) == {"chunked"}
    layers = captured_qk(lm.model, ids)
    assert all(a.softcap == 2.0 for a in layers.values())
    maps = eager_maps(lm.model, ids)
    queries = np.array(json.loads(ds.attrs["query_positions"]))
    _assert_small(_errors(ds, lambda L: maps[L][0], queries))
    np.testing.assert_allclose(fp64_maps(layers[0]), maps[0][0], atol=2e-6)  # the cap is applied


def test_bf16_feature_pass_is_fp32_exact(tiny, single_thread):
    """In a bf16 model the feature pass runs in fp32 on the bf16 q/k the kernel received: it
    equals a float64 computation from those same q and k (kept in the same forward)."""
    from reference import QKRecorder

    lm = tiny("llama")
    lm.model.to(torch.bfloat16)
    try:
        torch.manual_seed(6)
        ids = torch.randint(3, 128, (1, 64))
        queries = np.arange(4, 64)
        stats = StatsRecorder(METRICS, [RowPlan(64, queries)], row_pass="features")
        qk = QKRecorder()
        with torch.no_grad(), kernel_settings("flex"), capture(lm.model, stats), capture(lm.model, qk):
            lm.model(input_ids=ids, use_cache=False)
        assert qk.layers[0].query.dtype == torch.bfloat16 and set(stats.row_passes.values()) == {"features:flex"}
        for layer, attn in qk.layers.items():
            ref = reference_metrics(fp64_maps(attn), queries)
            got = stats.results[layer][0]
            for name in ROW:  # fp32 from the bf16 q/k: fp32 accuracy
                scale = max(1.0, float(np.abs(ref[name]).max())) if name == "mean_distance" else 1.0
                assert np.abs(got[name] - ref[name]).max() / scale <= ATOL, (layer, name)
            # key-set metrics divide by the bf16 kernel's own LSE: bf16 accuracy
            np.testing.assert_allclose(got["sink_mass"], ref["sink_mass"], atol=2e-2)
    finally:
        lm.model.to(torch.float32)


def test_smollm2_flex_and_features_match_eager(smollm2, prose):
    ids = smollm2.tokenizer(prose)["input_ids"][:200]
    ds = attnscope.analyze(smollm2, token_ids=ids, metrics=METRICS, spans={"s": (50, 60)},
                           kernel="flex", row_pass="features", layers=[0, 5, 13, 22, 29])
    maps = eager_maps(smollm2.model, torch.tensor([ids]))
    queries = np.array(json.loads(ds.attrs["query_positions"]))
    _assert_small(_errors(ds, lambda L: maps[L][0], queries, {"s": (50, 60)}))


@pytest.mark.parametrize("row_pass", ["features", "chunked"])
def test_both_row_passes_agree(tiny, row_pass, single_thread):
    lm = tiny("olmo3")
    torch.manual_seed(7)
    ids = torch.randint(3, 128, (60,)).tolist()
    got = attnscope.analyze(lm, token_ids=ids, metrics=METRICS, row_pass=row_pass, min_query_position=4)
    maps = eager_maps(lm.model, torch.tensor([ids]))
    queries = np.array(json.loads(got.attrs["query_positions"]))
    _assert_small(_errors(got, lambda L: maps[L][0], queries))
    assert {v.split(":")[0] for v in json.loads(got.attrs["row_pass"]).values()} == {row_pass}


def test_compiled_flex_traces_and_matches_reference(monkeypatch):
    """The CUDA path compiles FlexAttention and its block masks. On CPU, compiled, it runs
    without the LSE: the masks (padding + window + edit + GQA, row lookup) and the soft-capping
    score_mod must trace, and the output must equal the reference kernel's."""
    monkeypatch.setattr(kernels, "COMPILED_DEVICES", {"cuda", "cpu"})
    kernels._BLOCK_MASKS.clear()
    torch.manual_seed(0)
    B, H, KVH, T, d = 2, 4, 2, 160, 16
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, KVH, T, d), torch.randn(B, KVH, T, d)
    mask = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
    mask[1, :, :, :30] = False
    vis = Visibility(0, mask, 64, AttentionEdit(window=32, keep_sinks=2), torch.tensor([0, 30]))
    want, _, _ = kernels.run("reference", q, k, v, 0.25, vis, None, 3.0, False)
    got, lse, ran = kernels.run("flex", q, k, v, 0.25, vis, None, 3.0, False)
    assert ran == "flex" and lse is None
    torch.testing.assert_close(got[:, :, 30:], want[:, :, 30:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    rows = torch.tensor([40, 41, 90, 150])  # the feature pass's row lookup
    vis1 = vis.for_batch_row(1)
    want_rows, _, _ = kernels.run("reference", q[1:, :, rows], k[1:], v[1:], 0.25, vis1, rows, None, False)
    got_rows, _, _ = kernels.run("flex", q[1:, :, rows], k[1:], v[1:], 0.25, vis1, rows, None, False,
                                 rows_key="rows")
    torch.testing.assert_close(got_rows, want_rows, rtol=1e-5, atol=1e-5)
    assert len(kernels._BLOCK_MASKS) == 2  # cached by rule, shapes and rows
    kernels._BLOCK_MASKS.clear()


def test_kernel_choice_and_forcing():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.choose(cpu, 512, observed=False, plain=True, softcap=None) == "sdpa"
    assert kernels.choose(cpu, 512, observed=True, plain=True, softcap=None) == "cpu_flash"
    assert kernels.choose(cpu, 1, observed=True, plain=True, softcap=None) == "grouped"
    assert kernels.choose(cpu, 512, observed=False, plain=False, softcap=None) == "cpu_flash"
    assert kernels.choose(cpu, 512, observed=True, plain=False, softcap=50.0) == "reference"
    assert kernels.choose(cuda, 512, observed=True, plain=False, softcap=50.0) == "flex"
    assert kernels.choose(cuda, 512, observed=False, plain=True, softcap=None) == "sdpa"
    assert kernels.choose(cpu, 512, observed=True, plain=True, softcap=None, forced="reference") == "reference"
    with pytest.raises(AttnscopeError, match="cpu_flash"):
        kernels.choose(cuda, 512, observed=True, plain=True, softcap=None, forced="cpu_flash")
    with pytest.raises(AttnscopeError, match="unknown kernel"):
        with kernel_settings("triton"):
            pass


def test_forced_reference_kernel_matches_eager(tiny, single_thread):
    lm = tiny("qwen3")
    ids = torch.randint(3, 128, (1, 40))
    ds = attnscope.analyze(lm, token_ids=ids[0].tolist(), metrics=METRICS, kernel="reference",
                           min_query_position=4)
    assert set(json.loads(ds.attrs["attention_kernels"]).values()) == {"reference"}
    assert ds.attrs["kernel_requested"] == "reference"
    maps = eager_maps(lm.model, ids)
    _assert_small(_errors(ds, lambda L: maps[L][0], np.array(json.loads(ds.attrs["query_positions"]))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled FlexAttention)")
def test_cuda_compiled_engine_matches_reference_kernel(tiny):
    lm = tiny("olmo3")
    lm.model.to("cuda", torch.bfloat16)
    try:
        ids = torch.randint(3, 128, (300,)).tolist()
        fast = attnscope.analyze(lm, token_ids=ids, metrics=METRICS)
        assert set(json.loads(fast.attrs["attention_kernels"]).values()) == {"flex"}
        assert set(json.loads(fast.attrs["row_pass"]).values()) == {"features:flex"}
        ref = attnscope.analyze(lm, token_ids=ids, metrics=METRICS, kernel="reference", row_pass="chunked")
        for name in METRICS:
            np.testing.assert_allclose(fast[name].values, ref[name].values, rtol=2e-2, atol=2e-2)
    finally:
        lm.model.to("cpu", torch.float32)


def test_padded_rows_get_their_own_rope_positions(tiny, single_thread):
    """A left-padded row is rotated as when it runs alone: its layer-0 queries (which depend only
    on its tokens and positions) equal the lone run's."""
    from reference import QKRecorder

    lm = tiny("llama")
    a, b = torch.randint(3, 128, (40,)).tolist(), torch.randint(3, 128, (27,)).tolist()
    plans = [RowPlan(40, np.arange(4, 40)), RowPlan(27, np.arange(4, 27))]
    batch_qk, alone_qk = QKRecorder(), QKRecorder()
    from attnscope.backends import native_source

    src = native_source(lm.model, None, "tiny", None)
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(a), 1
    ids[1, 13:], mask[1, 13:] = torch.tensor(b), 1
    with capture(lm.model, batch_qk):
        src.run(StatsRecorder(("sink_mass",), plans), ids, mask)
    with capture(lm.model, alone_qk):
        src.run(StatsRecorder(("sink_mass",), plans[1:]), torch.tensor([b]), None)
    q_batch = batch_qk.layers[0].query[1, :, 13:]
    q_alone = alone_qk.layers[0].query[0]
    torch.testing.assert_close(q_batch, q_alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel,row_pass", [("auto", "chunked"), ("cpu_flash", "chunked"),
                                             ("reference", "chunked"), ("flex", "features")])
def test_learned_sinks_every_metric_padded_batch(kernel, row_pass, single_thread):
    """gpt-oss-style learned sinks (one logit per head) through every kernel and both row passes,
    on a left-padded batch of 80 and 56 tokens: every metric equals eager's reduction (eager drops
    the sink's column, so a row sums to 1 - p_sink) and learned_sink_mass is that deficit."""
    from attnscope import zoo
    from attnscope.conformance import reference_statistics

    tiny = zoo.tiny_model("gpt_oss")
    model = tiny.model
    torch.manual_seed(5)
    rows = [torch.randint(3, 500, (80,)), torch.randint(3, 500, (56,))]
    metrics = ("sink_mass", "token0_mass", "entropy", "mean_distance", "position_profile",
               "distance_profile", "learned_sink_mass")
    spans = {"s": (10, 14)}
    ds = attnscope.analyze(model, token_ids=[r.tolist() for r in rows], metrics=metrics, spans=spans,
                           kernel=kernel, row_pass=row_pass, progress=False)
    assert float(ds.learned_sink_mass.min()) > 1e-3  # every head gives its sink a share
    for b, ids in enumerate(rows):
        maps = eager_maps(model, ids[None])
        queries = np.arange(16, len(ids))
        for layer in ds.layer.values:
            P = maps[int(layer)][0]
            assert float((1 - P.sum(-1)).mean()) > 1e-3  # eager drops the sink: rows short of 1
            want = reference_metrics(P, queries, spans=spans, max_length=80)
            want.update({k: v for k, v in reference_statistics(P, queries).items()
                         if k in ("entropy", "learned_sink_mass")})
            for name in metrics + ("span_mass",):
                got = ds[name].sel(layer=layer).isel(sequence=b).values
                tol = ATOL * max(1.0, float(np.abs(want[name]).max())) if name == "mean_distance" else ATOL
                assert np.abs(got - want[name]).max() <= tol, (name, int(layer), b)
