"""Needle share, retrieval heads and the probe grid: parity with eager attention on the real
SmolLM2 (512- and 1024-token prompts) and on a tiny sliding-window model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import attnscope
from attnscope.capture.interface import capture
from attnscope.errors import AttnscopeError
from attnscope.probing import build_prompts, load_spec
from attnscope.probing.builder import Prompt
from attnscope.probing.needle import (
    RETRIEVAL_COUNTS,
    RETRIEVAL_SPANS,
    measure_niah,
    needle_share,
    retrieval_heads,
    run_probe,
)
from reference import eager_maps

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("probe_example", ROOT / "tools" / "probe_example.py")
probe_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe_example)


class ForwardCounter:
    """Counts forwards at the first attention layer: over the prompt (T > 1) or one token."""

    needs_lse = False

    def __init__(self):
        self.first, self.prompt_passes, self.steps = None, 0, 0

    def wants(self, layer):
        self.first = layer if self.first is None else self.first
        return layer == self.first

    def observe(self, attn):
        if attn.query.shape[2] > 1:
            self.prompt_passes += 1
        else:
            self.steps += 1


# ------------------------------------------------------------------ the documented example grid

@pytest.fixture(scope="module")
def example(smollm2):
    """The four trials of docs/probes.md's example (1024 tokens, 2 depths x 2 seeds), decoded."""
    return probe_example.measure(smollm2)


@pytest.fixture(scope="module")
def grid(example):
    return example["grid"]


def test_grid_dims_and_provenance(grid):
    assert grid.needle_share.dims == ("query_set", "span", "layer", "head", "length", "depth", "seed")
    assert list(grid.query_set.values) == ["question", "final", "answer"]
    assert grid.attrs["probe"] == "niah_single" and len(grid.attrs["probe_hash"]) == 64
    assert np.all(np.abs(grid.depth_actual.values - grid.depth.values[None, :, None]) < 0.05)
    assert grid.attrs["answer_mode"] == "greedy" and grid.attrs["prompt_passes"] == 1
    assert (grid.attrs["retrieval_count"], grid.attrs["retrieval_span"]) == ("steps", "needle_value")


def test_smollm2_retrieves_the_needle_with_needle_heads(grid):
    assert int(grid.correct.sum()) >= 3  # "most trials"
    share = grid.needle_share.sel(query_set="final", span="needle_value")
    uniform = grid.uniform_share.sel(query_set="final", span="needle_value")
    ratio = share.max(["layer", "head"]) / uniform
    assert float(ratio.min()) > 10  # some heads put many times the uniform share on the needle
    scores = grid.retrieval_score.where(grid.correct).mean(["length", "depth", "seed"])
    heads = retrieval_heads(grid)
    assert len(heads) == int((scores > grid.attrs["retrieval_threshold"]).sum()) >= 1
    assert list(heads.score) == sorted(heads.score, reverse=True)
    top = heads.iloc[0]
    assert float(scores.sel(layer=top["layer"], head=top["head"])) == pytest.approx(top["score"])
    # per prompt: how many heads pass, from that prompt's scores
    assert (grid.retrieval_heads == (grid.retrieval_score > 0.1).sum(["layer", "head"])).all()


def test_control_without_needle_has_no_needle_heads(example):
    n = probe_example.numbers(example)
    assert n["trials"][0]["ratio"] > 3 * n["control"]["ratio"], n


def test_docs_example_block_is_what_the_code_measures(example):
    """docs/probes.md's example numbers are exactly what tools/probe_example.py renders now."""
    block = probe_example.render(probe_example.numbers(example))
    assert probe_example.doc_block(probe_example.DOC.read_text()) == block, (
        "docs/probes.md is out of date: run `python tools/probe_example.py --write`")


# ------------------------------------------------------------------ parity at 512 tokens

@pytest.fixture(scope="module")
def p512(smollm2):
    spec = load_spec("niah_single")
    return build_prompts(spec, smollm2.tokenizer, lengths=[512], depths=[0.5], seeds=[0])[0]


@pytest.fixture(scope="module")
def greedy512(smollm2, p512):
    counter = ForwardCounter()
    with capture(smollm2.model, counter):
        m = measure_niah(smollm2, p512)
    return m, counter


@pytest.fixture(scope="module")
def eager512(smollm2, p512, greedy512):
    """Greedy decoding with transformers' eager attention (output_attentions, KV cache): per
    step, every layer's attention row of the query that predicts the step's token."""
    model = smollm2.model
    n_new = len(greedy512[0].generated)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    rows, first, generated, past = [], None, [], None
    x = torch.tensor([p512.token_ids])
    try:
        with torch.no_grad():
            for _ in range(n_new):
                out = model(input_ids=x, past_key_values=past, use_cache=True, output_attentions=True)
                past = out.past_key_values
                if first is None:
                    first = np.stack([a[0].float().numpy() for a in out.attentions])  # [layer, H, T, T]
                rows.append(np.stack([a[0, :, -1].float().numpy() for a in out.attentions]))  # [layer, H, S]
                generated.append(int(out.logits[0, -1].argmax()))
                x = torch.tensor([[generated[-1]]])
    finally:
        model.set_attn_implementation(previous)
    return {"prefill": first, "rows": rows, "generated": generated}


def test_one_prefill_then_single_token_steps(greedy512):
    m, counter = greedy512
    assert counter.prompt_passes == 1 == m.prompt_passes
    assert counter.steps == len(m.generated) - 1  # the prefill's last row predicts the first token


def test_greedy_path_equals_eager_decoding(greedy512, eager512, p512, smollm2):
    m, _ = greedy512
    assert m.generated == eager512["generated"]
    L = p512.length
    P = eager512["prefill"]  # [layer, H, L, L]
    q0, q1 = p512.spans["question"]
    for si, span in enumerate(m.spans):
        s0, s1 = p512.spans[span]
        for qs, rows in (("question", np.arange(q0, q1)), ("final", np.array([L - 1]))):
            want = P[:, :, rows, s0:s1].sum(-1).mean(-1)  # [layer, H]
            got = m.share[m.query_sets.index(qs), si]
            assert np.abs(got - want).max() <= 1e-5, (qs, span)
        # every decoding step's own query row, and the answer set as their mean
        eager_steps = np.stack([r[:, :, s0:s1].sum(-1) for r in eager512["rows"]])  # [step, layer, H]
        assert np.abs(m.step_share[:, si] - eager_steps).max() <= 1e-5, span
        want = eager_steps[m.answer_steps].mean(0)
        assert np.abs(m.share[m.query_sets.index("answer"), si] - want).max() <= 1e-5
        uniform = np.mean([(s1 - s0) / (L + k) for k in m.answer_steps])
        assert m.uniform[m.query_sets.index("answer"), si] == pytest.approx(uniform)
    assert np.abs(m.sink_mass - P[:, :, L - 1, :4].sum(-1)).max() <= 1e-5
    # the answer set: the steps that wrote the expected value, as the model wrote it
    steps = m.answer_steps
    assert steps == list(range(steps[0], steps[-1] + 1))
    assert smollm2.tokenizer.decode(m.generated[steps[0]:steps[-1] + 1]).strip() == p512.answer[0]


def _eager_retrieval(rows, generated, ids, span, count):
    """Wu et al.'s copy test on eager attention rows, written out: at step k a head copies when
    its top-1 key lies in the span and holds the generated token."""
    s0, s1 = span
    n_layers, n_heads = rows[0].shape[:2]
    steps = np.zeros((n_layers, n_heads))
    copied = [[set() for _ in range(n_heads)] for _ in range(n_layers)]
    for row, token in zip(rows, generated):
        for layer in range(n_layers):
            for head in range(n_heads):
                j = int(np.argmax(row[layer, head]))
                if s0 <= j < s1 and ids[j] == token:
                    steps[layer, head] += 1
                    copied[layer][head].add(j)
    if count == "steps":
        return steps / (s1 - s0)
    return np.array([[len(c) for c in layer] for layer in copied]) / (s1 - s0)


@pytest.mark.parametrize("count", RETRIEVAL_COUNTS)
@pytest.mark.parametrize("span", RETRIEVAL_SPANS)
def test_retrieval_scores_equal_eager_decoding_loop(greedy512, eager512, p512, count, span):
    m, _ = greedy512
    want = _eager_retrieval(eager512["rows"], eager512["generated"], p512.token_ids,
                            p512.spans[span], count)
    assert want.max() > 0  # SmolLM2 copies the value: the comparison is not all zeros
    np.testing.assert_allclose(m.retrieval_score(count, span), want, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def tf512(smollm2, p512):
    return needle_share(smollm2, p512)  # prompt + answer in one forward, use_cache=False


def test_unchanged_definitions_equal_the_previous_computation(greedy512, tf512, p512, smollm2):
    """Question and final shares and sink mass, now from the decoding prefill, equal what
    run_probe computed before (a teacher-forced forward over prompt + answer without a cache, and
    analyze() at the final position) to 1e-6."""
    m, _ = greedy512
    tf = tf512
    for qs in ("question", "final"):
        got = m.share[m.query_sets.index(qs)]
        assert np.abs(got - tf.needle_share.sel(query_set=qs).values).max() <= 1e-6, qs
        assert np.abs(m.uniform[m.query_sets.index(qs)] - tf.uniform_share.sel(query_set=qs).values).max() <= 1e-7
    sinks = attnscope.analyze(smollm2, token_ids=p512.token_ids, metrics=("sink_mass",),
                              queries=[p512.length - 1])
    assert np.abs(m.sink_mass - sinks.sink_mass.values).max() <= 1e-6


def test_teacher_forced_needle_share_equals_eager(smollm2, p512, tf512):
    ds = tf512
    answer = smollm2.tokenizer(" " + p512.answer[0], add_special_tokens=False)["input_ids"]
    maps = eager_maps(smollm2.model, torch.tensor([list(p512.token_ids) + answer]))
    q0, q1 = p512.spans["question"]
    L = p512.length
    groups = {"question": np.arange(q0, q1), "final": np.array([L - 1]),
              "answer": np.arange(L - 1, L - 1 + len(answer))}
    for layer in ds.layer.values:
        P = maps[layer][0]
        for g, rows in groups.items():
            for span in ds.span.values:
                s0, s1 = p512.spans[str(span)]
                want = P[:, rows, s0:s1].sum(-1).mean(-1)
                got = ds.needle_share.sel(query_set=g, span=span, layer=layer).values
                assert np.abs(got - want).max() <= 1e-5, (layer, g, span)
    s0, s1 = p512.spans["needle_value"]
    assert float(ds.uniform_share.sel(query_set="final", span="needle_value")) == pytest.approx((s1 - s0) / L)


# ------------------------------------------------------------------ a sliding-window cache

@pytest.fixture(scope="module")
def tiny_swa(tmp_path_factory, single_thread):
    from attnscope.testing import SAMPLE_TEXT, make_tiny_model

    lm = attnscope.load(str(make_tiny_model("olmo3", tmp_path_factory.mktemp("niah") / "olmo3")))
    ids = lm.tokenizer(SAMPLE_TEXT)["input_ids"]
    L = len(ids)
    # spans across the whole prompt: windowed layers (8 keys) drop most of them from the cache
    prompt = Prompt(text=SAMPLE_TEXT, token_ids=ids, length=L, depth_requested=0.5, depth_actual=0.5,
                    seed=0, spans={"question": (L - 10, L), "needle": (0, L), "needle_value": (L - 12, L - 2),
                                   "needle_key": (20, 40)}, answer=["haystack"], spec_hash="", spec_name="t")
    return lm, prompt


def test_sliding_window_cache_maps_keys_to_positions(tiny_swa):
    """olmo3's windowed layers keep only the last keys in the cache: top-1 keys and span shares of
    every decoding step equal eager attention rows of full forwards (no cache) over the sequence."""
    lm, p = tiny_swa
    m = measure_niah(lm, p, max_new_tokens=8)
    model = lm.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    seq, rows = list(p.token_ids), []
    try:
        with torch.no_grad():
            for token in m.generated:
                out = model(input_ids=torch.tensor([seq]), output_attentions=True, use_cache=False)
                assert int(out.logits[0, -1].argmax()) == token
                rows.append(np.stack([a[0, :, -1].numpy() for a in out.attentions]))
                seq.append(token)
    finally:
        model.set_attn_implementation(previous)
    for k, r in enumerate(rows):  # r: [layer, H, keys so far]
        assert np.array_equal(m.top_keys[k], r.argmax(-1))
        for si, span in enumerate(m.spans):
            s0, s1 = p.spans[span]
            assert np.abs(m.step_share[k, si] - r[:, :, s0:s1].sum(-1)).max() <= 1e-5
            # the uniform baseline is full causal attention's, not a windowed layer's
            assert m.step_uniform[k, si] == pytest.approx((s1 - s0) / (p.length + k))
    for count in RETRIEVAL_COUNTS:
        want = _eager_retrieval(rows, m.generated, p.token_ids, p.spans["needle"], count)
        np.testing.assert_allclose(m.retrieval_score(count, "needle"), want, rtol=0, atol=1e-12)


def test_forwards_per_answer_mode(tiny_swa):
    lm, p = tiny_swa
    for kwargs, passes, sets in (({"decode": False}, 1, ["question", "final"]),
                                 ({"decode": False, "answer_mode": "teacher_forced"}, 1, ["question", "final", "answer"]),
                                 ({"answer_mode": "teacher_forced", "max_new_tokens": 3}, 2, ["question", "final", "answer"])):
        counter = ForwardCounter()
        with capture(lm.model, counter):
            m = measure_niah(lm, p, **kwargs)
        assert counter.prompt_passes == passes == m.prompt_passes, kwargs
        assert m.query_sets == sets
    # the greedy answer set is empty when the continuation does not contain the answer
    m = measure_niah(lm, p, max_new_tokens=3)
    assert m.answer_queries == 0 and np.isnan(m.share[2]).all()


def test_bad_choices_are_refused_before_any_work():
    for kw in ({"answer_mode": "beam"}, {"retrieval_count": "tokens"}, {"retrieval_span": "sentence"}):
        with pytest.raises(AttnscopeError, match=next(iter(kw))):
            run_probe(None, "probes/niah_single.toml", **kw)


def test_cli_refuses_bad_probe_choices_before_loading(tmp_path):
    from typer.testing import CliRunner

    from attnscope.cli import app

    res = CliRunner().invoke(app, ["probe", "--model", str(tmp_path / "no-such-model"), "--spec",
                                   "probes/niah_single.toml", "--out", str(tmp_path / "o.h5"),
                                   "--retrieval-count", "tokens"])
    assert res.exit_code == 2 and "--retrieval-count" in res.output and "no-such-model" not in res.output
