"""Where attention goes, against eager attention maps: attention received by every key (every
pass), cache-policy kept mass, span-to-span mass; on held-out text (alice, not the prose the
other parity tests use), a windowed tiny olmo3 and a padded batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attnscope
from attnscope.capture.interface import capture
from attnscope.errors import AttnscopeError
from attnscope.metrics import received as R
from attnscope.probing.texts import load_text
from reference import QKRecorder, eager_maps

ATOL = 1e-5


def counts_of(L: int, window: int | None) -> np.ndarray:
    """n_j: queries i >= j (within the window) of an L-token row."""
    j = np.arange(L)
    n = L - j
    return np.minimum(n, window) if window else n


def ref_received(P: np.ndarray, window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(r [H, L], rbar [H, L]) of one unpadded row's map P [H, L, L] (query x key)."""
    r = P.astype(np.float64).sum(1)
    return r, r / counts_of(P.shape[1], window)


def assert_received(ds, maps, window_of=lambda layer: None, seq=None, offset=0, length=None):
    for layer in ds.layer.values:
        P = maps[int(layer)][0 if seq is None else seq]
        if length is not None:
            P = P[:, offset:offset + length, offset:offset + length]
        r, rbar = ref_received(P, window_of(int(layer)))
        got = ds.sel(layer=layer) if seq is None else ds.sel(layer=layer).isel(sequence=seq)
        L = P.shape[1]
        if "received" in ds:
            # r_j counts up to L queries' worth of mass: compare relative to its size
            err = np.abs(got.received.values[:, :L] - r) / np.maximum(1.0, np.abs(r))
            assert err.max() <= ATOL, f"layer {layer}: received error {err.max():.1e}"
            assert np.abs(got.received_mean.values[:, :L] - rbar).max() <= ATOL
            assert np.isnan(got.received.values[:, L:]).all()  # a shorter row's padding
        if "received_top" in ds:
            k = ds.sizes["rank"]
            top = got.received_top_key.values
            vals = got.received_top.values
            for h in range(P.shape[0]):
                # the chosen keys carry the eager values, in descending order, and no other key
                # receives more than the k-th
                np.testing.assert_allclose(vals[h], r[h, top[h]], rtol=ATOL, atol=ATOL)
                assert (np.diff(vals[h]) <= 0).all()
                others = np.delete(r[h], top[h])
                assert others.size == 0 or others.max() <= vals[h, k - 1] * (1 + ATOL) + ATOL
            bins = ds.sizes["bin"]
            bin_of = np.minimum((np.arange(L) * bins) // L, bins - 1)
            want = np.stack([r[:, bin_of == b].sum(1) for b in range(bins)], 1) / L
            assert np.abs(got.received_bins.values - want).max() <= ATOL


@pytest.fixture(scope="module")
def held_out(smollm2):
    return smollm2.tokenizer(load_text("alice"))["input_ids"][2000:2384]


@pytest.mark.parametrize("received_pass", ["auto", "swapped", "chunked"])
def test_smollm2_received_matches_eager(smollm2, held_out, received_pass):
    ds = attnscope.analyze(smollm2, token_ids=held_out, metrics=("received", "received_top"),
                           received_pass=received_pass, received_top_k=8, layers=[0, 3, 14, 29])
    maps = eager_maps(smollm2.model, torch.tensor([held_out]))
    assert_received(ds, maps)
    ran = set(json.loads(ds.attrs["received_pass"]).values())
    assert ran == ({"swapped_flash"} if received_pass == "swapped" else {"chunked"})
    # alpha_0 of Gu et al. is the first key's mean received attention
    alpha = attnscope.analyze(smollm2, token_ids=held_out, metrics=("token0_importance",), layers=[0, 3, 14, 29])
    np.testing.assert_allclose(ds.received_mean.values[..., 0], alpha.token0_importance.values, atol=ATOL)
    # the sink: in most heads of the late layers the first token receives the most
    assert (ds.received_top_key.sel(layer=29).values[:, 0] == 0).sum() >= 5


def test_received_shares_the_chunked_row_pass(smollm2, held_out):
    """With row metrics on CPU the chunked row pass sums P over its (selected) rows; received adds
    the rows it skipped (the first 16) and equals the eager column sums."""
    ds = attnscope.analyze(smollm2, token_ids=held_out, metrics=("entropy", "received"), layers=[1, 20])
    assert set(json.loads(ds.attrs["received_pass"]).values()) == {"chunked:shared"}
    assert_received(ds, eager_maps(smollm2.model, torch.tensor([held_out])))
    # a selection that leaves rows out in the middle too
    ds = attnscope.analyze(smollm2, token_ids=held_out, metrics=("entropy", "received"), layers=[1],
                           queries="strided:40")
    assert_received(ds, eager_maps(smollm2.model, torch.tensor([held_out])))


@pytest.mark.parametrize("received_pass", ["swapped", "chunked"])
def test_windowed_model_received(tiny, received_pass, single_thread):
    """tiny olmo3: 3 sliding-window layers (window 8) and 1 full; the swapped call then runs in
    key blocks with an additive mask."""
    lm = tiny("olmo3")
    torch.manual_seed(11)
    ids = torch.randint(3, 128, (90,)).tolist()
    ds = attnscope.analyze(lm, token_ids=ids, metrics=("received", "received_top"), received_pass=received_pass,
                           received_top_k=5, min_query_position=4)
    windows = {int(k): v for k, v in json.loads(ds.attrs["windows"]).items()}
    assert sorted(windows.values(), key=str) == [8, 8, 8, None]
    assert_received(ds, eager_maps(lm.model, torch.tensor([ids])), window_of=windows.get)


@pytest.mark.parametrize("received_pass", ["swapped", "chunked"])
def test_padded_batch_received(tiny, received_pass, single_thread):
    lm = tiny("olmo3")
    torch.manual_seed(12)
    a, b = torch.randint(3, 128, (70,)).tolist(), torch.randint(3, 128, (45,)).tolist()
    ds = attnscope.analyze(lm, token_ids=[a, b], metrics=("received", "received_top"), received_pass=received_pass,
                           min_query_position=4)
    assert ds.received.dims == ("sequence", "layer", "head", "key") and ds.sizes["key"] == 70
    windows = {int(k): v for k, v in json.loads(ds.attrs["windows"]).items()}
    # each row against its lone run (a left-padded row is its lone run to round-off)
    for seq, ids in enumerate((a, b)):
        maps = eager_maps(lm.model, torch.tensor([ids]))
        assert_received(ds.isel(sequence=seq).expand_dims(sequence=[0]), maps, windows.get, seq=0)


def test_swapped_flex_pass_matches_eager(tiny, smollm2, held_out, single_thread):
    """The GPU pass (FlexAttention, score_mod = -lse_i, mask_mod = reversed rule), uncompiled on
    CPU: causal (SmolLM2), windowed and soft-capped layers."""

    class Keep(QKRecorder):  # each layer's LayerAttention, with its row LSE
        needs_lse = True

    for lm, ids in ((smollm2, held_out[:160]), (tiny("olmo3"), list(range(3, 83)))):
        keep = Keep()
        with torch.no_grad(), capture(lm.model, keep):
            lm.model(input_ids=torch.tensor([ids]), use_cache=False)
        maps = eager_maps(lm.model, torch.tensor([ids]))
        for layer in list(keep.layers)[:4]:
            attn = keep.layers[layer]
            T = len(ids)
            acc = R.ColumnSums(attn.n_heads, 0, T, "cpu", None)
            R.swapped_flex(attn, 0, torch.arange(T), acc)
            r, _ = ref_received(maps[layer][0], attn.window)
            assert (np.abs(acc.sums.numpy() - r) / np.maximum(1, r)).max() <= ATOL
            np.testing.assert_array_equal(acc.counts.numpy(), counts_of(T, attn.window))


def test_softcapped_model_received(tmp_path, single_thread):
    from test_engine import _tiny_gemma2

    lm = _tiny_gemma2(tmp_path)
    torch.manual_seed(5)
    ids = torch.randint(3, 128, (40,)).tolist()
    maps = eager_maps(lm.model, torch.tensor([ids]))
    for received_pass, ran in (("chunked", "chunked"), ("swapped", "swapped_flex")):
        ds = attnscope.analyze(lm, token_ids=ids, metrics=("received",), received_pass=received_pass,
                               min_query_position=4)
        assert set(json.loads(ds.attrs["received_pass"]).values()) == {ran}
        assert_received(ds, maps, window_of=lambda layer: 12 if layer % 2 == 0 else None)


# ----------------------------------------------------------------------------- kept mass
def ref_kept(P: np.ndarray, queries: np.ndarray, policy: str, budget: int) -> np.ndarray:
    """[H] mean over `queries` of the eager mass on the keys the policy keeps."""
    H, L, _ = P.shape
    i = np.arange(L)[:, None]
    j = np.arange(L)[None, :]
    if policy == "window":
        keep = np.broadcast_to(i - j < budget, (H, L, L))
    elif policy.startswith("streaming"):
        s = int(policy.split(":")[1])
        keep = np.broadcast_to((i - j < budget - s) | (j < s), (H, L, L))
    else:
        r = P.astype(np.float64).sum(1)
        top = np.argsort(-r, axis=1, kind="stable")[:, :budget]
        keep = np.zeros((H, L, L), dtype=bool)
        for h in range(H):
            keep[h][:, top[h]] = True
    return np.where(keep, P, 0).astype(np.float64)[:, queries].sum(-1).mean(-1)


POLICIES = ("streaming", "streaming:2", "window", "static_topk")


@pytest.mark.parametrize("model", ["smollm2", "olmo3"])
def test_kept_mass_matches_eager(model, smollm2, held_out, tiny):
    if model == "smollm2":
        lm, ids, budgets, layers = smollm2, held_out[:300], (8, 32, 100, 300), [0, 7, 22]
    else:
        lm, budgets, layers = tiny("olmo3"), (5, 9, 30), None
        torch.manual_seed(13)
        ids = torch.randint(3, 128, (80,)).tolist()
    ds = attnscope.analyze(lm, token_ids=ids, metrics=("sink_mass",), policies=POLICIES, budgets=budgets,
                           layers=layers, query_bins=3)
    assert ds.kept_mass.dims == ("policy", "budget", "layer", "head")
    assert list(ds.policy.values) == ["streaming:4", "streaming:2", "window", "static_topk"]
    maps = eager_maps(lm.model, torch.tensor([ids]))
    queries = np.array(json.loads(ds.attrs["query_positions"]))
    for layer in ds.layer.values:
        P = maps[int(layer)][0]
        for policy in ds.policy.values:
            for budget in ds.budget.values:
                want = ref_kept(P, queries, str(policy), int(budget))
                got = ds.kept_mass.sel(layer=layer, policy=policy, budget=budget).values
                assert np.abs(got - want).max() <= ATOL, (layer, policy, budget)
    # nested budgets keep more; the whole input keeps everything
    assert (ds.kept_mass.diff("budget") >= -ATOL).all()
    by_query = (ds.kept_mass_by_query * ds.query_count).sum("query_bin") / ds.query_count.sum()
    np.testing.assert_allclose(by_query, ds.kept_mass, atol=ATOL)
    if model == "smollm2":
        np.testing.assert_allclose(ds.kept_mass.sel(budget=300), 1.0, atol=ATOL)
        # SmolLM2 has sinks: with 4 sink tokens a small cache keeps far more than a plain window
        small = ds.kept_mass.sel(budget=32).mean(("layer", "head"))
        assert float(small.sel(policy="streaming:4")) > float(small.sel(policy="window")) + 0.1


def test_span_to_span_matches_eager(smollm2, held_out):
    spans = {"sink": (0, 4), "early": (40, 60), "late": (300, 340)}
    query_spans = {"q_late": (320, 384), "q_early": (50, 90)}
    ds = attnscope.analyze(smollm2, token_ids=held_out, metrics=("sink_mass",), spans=spans,
                           query_spans=query_spans, layers=[2, 17])
    assert ds.span_to_span.dims == ("query_span", "span", "layer", "head")
    maps = eager_maps(smollm2.model, torch.tensor([held_out]))
    for layer in (2, 17):
        P = maps[layer][0].astype(np.float64)
        for a, (q0, q1) in query_spans.items():
            for name, (k0, k1) in spans.items():
                want = P[:, q0:q1, k0:k1].sum(-1).mean(-1)
                got = ds.span_to_span.sel(layer=layer, query_span=a, span=name).values
                assert np.abs(got - want).max() <= ATOL
    # early queries cannot see the late span; the span_mass of the whole selection is still there
    assert float(np.abs(ds.span_to_span.sel(query_span="q_early", span="late")).max()) == 0.0
    assert "span_mass" in ds


def test_bad_flow_arguments_are_one_clear_error(smollm2, held_out):
    ids = held_out[:64]
    for kwargs, words in (
            (dict(metrics=("received_top",), received_top_k=0), "received_top_k"),
            (dict(metrics=("received",), received_pass="fast"), "received_pass"),
            (dict(spans={"a": (0, 4)}, query_spans={"q": (60, 70)}), "not inside the 64-token"),
            (dict(query_spans={"q": (10, 20)}), "span_to_span needs"),
            (dict(policies=("lru",), budgets=(8,)), "unknown policy 'lru'"),
            (dict(policies=("window",), budgets=(8, 100)), "larger than the input"),
            (dict(policies=("streaming",), budgets=(4, 8)), "no recent window"),
            (dict(policies=("window",), budgets=(0,)), "budgets must be integers >= 1"),
            (dict(metrics=("kept_mass",)), "kept_mass needs policies")):
        with pytest.raises(AttnscopeError, match=words):
            attnscope.analyze(smollm2, token_ids=ids, **kwargs)


def test_run_probe_span_to_span_matches_eager(smollm2):
    """NIAH prompts know their spans: question / haystack / needle / final -> sink / needle /
    needle value / question, from the prompt's own forward."""
    from attnscope.probing.builder import build_prompts
    from attnscope.probing.spec import load_spec

    ds = attnscope.run_probe(smollm2, "niah_single", lengths=[256], depths=[0.5], seeds=[0], decode=False,
                             layers=[0, 15, 29])
    assert list(ds.query_span.values) == ["question", "haystack", "needle", "final"]
    assert list(ds.key_span.values) == ["sink", "needle", "needle_value", "question"]
    prompt = build_prompts(load_spec("niah_single"), smollm2.tokenizer, lengths=[256], depths=[0.5], seeds=[0])[0]
    maps = eager_maps(smollm2.model, torch.tensor([prompt.token_ids]))
    spans = dict(prompt.spans, final=(255, 256), sink=(0, 4))
    got = ds.span_to_span.sel(length=256, depth=0.5, seed=0)
    for layer in (0, 15, 29):
        P = maps[layer][0].astype(np.float64)
        for a in got.query_span.values:
            q0, q1 = spans[str(a)]
            for k in got.key_span.values:
                k0, k1 = spans[str(k)]
                want = P[:, q0:q1, k0:k1].sum(-1).mean(-1)
                assert np.abs(got.sel(layer=layer, query_span=a, key_span=k).values - want).max() <= ATOL
    # the final query's needle-value mass is the needle share of the `final` query set
    np.testing.assert_allclose(got.sel(query_span="final", key_span="needle_value").values,
                               ds.needle_share.sel(length=256, depth=0.5, seed=0, query_set="final",
                                                   span="needle_value").values, atol=ATOL)


def test_padded_batch_kept_mass_and_span_to_span(tiny, single_thread):
    """A left-padded row measures what its lone run measures (positions count from its first
    real token)."""
    lm = tiny("olmo3")
    torch.manual_seed(14)
    a, b = torch.randint(3, 128, (64,)).tolist(), torch.randint(3, 128, (40,)).tolist()
    kw = dict(metrics=("sink_mass",), policies=POLICIES, budgets=(6, 20, 40), spans={"s": (2, 9), "t": (20, 30)},
              query_spans={"q": (30, 40)}, min_query_position=4)
    batch = attnscope.analyze(lm, token_ids=[a, b], **kw)
    for seq, ids in enumerate((a, b)):
        lone = attnscope.analyze(lm, token_ids=ids, **kw)
        for name in ("kept_mass", "span_to_span"):
            np.testing.assert_allclose(batch[name].isel(sequence=seq).values, lone[name].values, atol=ATOL)


@pytest.mark.parametrize("family", ["gpt_oss", "inkling2_text", "deepseek_v32", "hrm_text"])
@pytest.mark.parametrize("received_pass", ["swapped", "chunked"])
def test_received_on_families_with_sinks_biases_selections_and_repeats(family, received_pass, single_thread):
    """Learned sinks (columns of real keys sum to less than the queries), a position bias with
    per-query sinks, a sparse top-k selection, and modules run several times per forward (one
    `layer` entry per call): r_j equals eager's column sums call by call. The swapped pass gives
    way to the chunked one where the score has a bias term or the keys a selection."""
    from attnscope import zoo
    from attnscope.conformance import eager_reference

    tiny = zoo.tiny_model(family)
    ids = tiny.input_ids[0].tolist()
    ds = attnscope.analyze(tiny.model, token_ids=ids, metrics=("received",), received_pass=received_pass,
                           min_query_position=4, progress=False)
    _, maps, _ = eager_reference(tiny.model, tiny.input_ids)
    assert ds.sizes["layer"] == len(maps)
    for i, layer in enumerate(ds.layer.values):
        r = maps[i][0].double().numpy().sum(1)  # [H, L]
        got = ds.received.sel(layer=layer).values[:r.shape[0]]
        assert np.abs(got - r).max() <= ATOL * max(1.0, float(np.abs(r).max())), (family, int(layer))
