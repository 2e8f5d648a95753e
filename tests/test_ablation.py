"""Attention ablations (AttentionEdit through attnscope's attention function) and the window study.

Correctness: an edit that hides nothing leaves logits bit-for-bit unchanged; an edit equals
an eager float64 recomputation with the same explicit mask (logits and attention maps);
dropped sinks get exactly zero attention and the rest renormalises. The study: SmolLM2
against itself restricted to a 64-token window, on real prose and code with repeated passages.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import attnscope
from attnscope import AttentionEdit, set_edit
from attnscope.errors import SpecError
from attnscope.tokens import ablated, apply_ablation, parse_ablation

REF_IMPL = "attnscope_test_explicit_mask"


# ------------------------------------------------------------------ spec


def test_parse_ablation_round_trips_through_describe():
    cases = {
        "window:64": AttentionEdit(window=64),
        "window:64,sinks:4": AttentionEdit(window=64, keep_sinks=4),
        " sinks:2 , window:8": AttentionEdit(window=8, keep_sinks=2),
        "nosink:1": AttentionEdit(drop_sinks=1),
        "window:16;nosink:2": AttentionEdit(window=16, drop_sinks=2),
        "window:8,layers:0-2+5": AttentionEdit(window=8, layers=(0, 1, 2, 5)),
    }
    for text, edit in cases.items():
        assert parse_ablation(text) == edit, text
        assert parse_ablation(edit.describe()) == edit
    assert parse_ablation(AttentionEdit(window=3)) == AttentionEdit(window=3)
    for bad in ("window", "window:x", "window:0", "sinks:4", "nosink:2,sinks:2,window:8", "foo:1",
                "window:4,window:5", "layers:1", "window:4,layers:3-1", "window:4,layers:a"):
        with pytest.raises(SpecError):
            parse_ablation(bad)


# ------------------------------------------------------------------ exactness


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_window_covering_the_input_leaves_logits_exactly_unchanged(which, tiny, smollm2):
    lm = tiny("llama") if which == "tiny" else smollm2
    n = 48 if which == "tiny" else 64
    ids = _ids(n, lm.model.config.vocab_size)
    base = _logits(lm.model, ids)
    edits = [AttentionEdit(window=n), AttentionEdit(window=n + 500, keep_sinks=4)]
    if which == "tiny":  # each SmolLM2 forward is slow on a shared CPU: two edits there
        edits += [AttentionEdit(window=n, keep_sinks=4), AttentionEdit(window=n, layers=(0, 1))]
    try:
        for edit in edits:
            set_edit(lm.model, edit)
            assert torch.equal(_logits(lm.model, ids), base), edit
        # one key fewer does change them: the comparison above can fail
        set_edit(lm.model, AttentionEdit(window=n - 1))
        assert not torch.equal(_logits(lm.model, ids), base)
    finally:
        set_edit(lm.model, None)
    assert torch.equal(_logits(lm.model, ids), base)  # removing the edit restores the model


def _allowed(n: int, edit: AttentionEdit) -> torch.Tensor:
    """The edit's visibility, written out directly: bool [query, key]."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    ok = j <= i
    if edit.window is not None:
        ok &= ((i - j) < edit.window) | (j < edit.keep_sinks)
    ok &= j >= edit.drop_sinks
    return ok | (i == j)


def _reference(hf_model, ids, edit: AttentionEdit):
    """Logits and per-layer maps from a float64 eager attention under an explicit mask."""
    from transformers import AttentionInterface

    n = ids.shape[1]
    allowed, causal = _allowed(n, edit), _allowed(n, AttentionEdit())
    maps = {}

    def eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(rep, dim=1).double()
        v = value.repeat_interleave(rep, dim=1).double()
        s = query.double() @ k.transpose(-1, -2) * scaling
        mask = allowed if edit.applies(layer) else causal
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        maps[layer] = p[0].numpy()
        return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register(REF_IMPL, eager)
    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(REF_IMPL)
    try:
        logits = _logits(hf_model, ids)
    finally:
        hf_model.set_attn_implementation(previous)
    return logits, maps


EDITS = [AttentionEdit(window=8), AttentionEdit(window=8, keep_sinks=2), AttentionEdit(drop_sinks=3),
         AttentionEdit(window=6, drop_sinks=1, layers=(1, 2))]


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.describe())
def test_edit_matches_eager_attention_with_the_same_explicit_mask(tiny, edit):
    lm = tiny("llama")
    n = 40
    ids = _ids(n, lm.model.config.vocab_size, seed=1)
    ref_logits, ref_maps = _reference(lm.model, ids, edit)
    try:
        set_edit(lm.model, edit)
        logits = _logits(lm.model, ids)
        ds = attnscope.analyze(lm, token_ids=ids[0].tolist(), metrics=("pattern",))
    finally:
        set_edit(lm.model, None)
    plain = _logits(lm.model, ids)
    assert sorted(ref_maps) == list(range(lm.model.config.num_hidden_layers))  # the reference ran
    assert not torch.allclose(ref_logits, plain, atol=1e-3)  # the edit matters on this input
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert ds.attrs["attention_edit"] == edit.describe()
    allowed = _allowed(n, edit).numpy()
    for layer, ref in ref_maps.items():
        got = ds["pattern"].sel(layer=layer).values
        np.testing.assert_allclose(got, ref, atol=2e-5)
        if edit.applies(layer):
            assert (got[:, ~allowed] == 0).all()  # hidden keys get exactly nothing


def test_smollm2_window_matches_eager_reference(smollm2):
    edit = AttentionEdit(window=16, keep_sinks=1)
    ids = smollm2.tokenizer("Alice was beginning to get very tired of sitting by her sister on the bank, "
                            "and of having nothing to do: once or twice she had peeped into the book her "
                            "sister was reading, but it had no pictures or conversations in it.",
                            return_tensors="pt")["input_ids"]
    ref_logits, ref_maps = _reference(smollm2.model, ids, edit)
    assert len(ref_maps) == smollm2.model.config.num_hidden_layers and ids.shape[1] > 32
    with ablated(smollm2.model, edit):
        logits = _logits(smollm2.model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(_logits(smollm2.model, ids), ref_logits, atol=1e-2)


def test_dropped_sinks_get_zero_attention_and_rows_renormalise(tiny):
    lm = tiny("qwen3")
    k, n = 4, 36
    ids = _ids(n, lm.model.config.vocab_size, seed=2)[0].tolist()
    before = attnscope.analyze(lm, token_ids=ids, metrics=("pattern", "sink_mass"), sink_tokens=k)
    apply_ablation(lm.model, f"nosink:{k}")
    try:
        ds = attnscope.analyze(lm, token_ids=ids, metrics=("pattern", "sink_mass"), sink_tokens=k)
    finally:
        apply_ablation(lm.model, None)
    P = ds["pattern"].values  # [layer, head, query, key]
    assert ds.attrs["attention_edit"] == f"nosink:{k}"
    assert (P[:, :, k:, :k] == 0).all()
    assert float(before["pattern"].values[:, :, k:, :k].sum(-1).min()) > 0  # there was mass to remove
    for q in range(k):  # a query among the sinks sees only itself
        assert np.allclose(P[:, :, q, q], 1.0)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-5)
    assert (ds["sink_mass"].values == 0).all() and (before["sink_mass"].values > 0).all()


def test_ablated_switches_a_plain_model_to_attnscope_and_back():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    model = LlamaForCausalLM(cfg).eval()
    impl = model.config._attn_implementation
    ids = _ids(30, 64)
    base = _logits(model, ids)
    with ablated(model, "window:4"):
        windowed = _logits(model, ids)
        assert model.config._attn_implementation == "attnscope"
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(windowed[:, :4], base[:, :4], rtol=1e-5, atol=1e-5)  # within the window
    assert not torch.allclose(windowed[:, 4:], base[:, 4:], atol=1e-3)
    assert torch.equal(_logits(model, ids), base)
    apply_ablation(model, "window:4")  # in place: switches to attnscope's attention, keeps the edit
    assert model.config._attn_implementation == "attnscope"
    torch.testing.assert_close(_logits(model, ids), windowed, rtol=1e-6, atol=1e-6)
    apply_ablation(model, None)
    torch.testing.assert_close(_logits(model, ids), base, rtol=1e-5, atol=1e-5)


def test_cli_analyze_with_ablation(tmp_path):
    from typer.testing import CliRunner

    from attnscope.cli import app
    from attnscope.store.hdf5 import read_result
    from attnscope.testing import make_tiny_model

    path = make_tiny_model("llama", tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log " * 4)
    args = ["analyze", "-m", str(path), "-f", str(text), "--metrics", "sink_mass", "--json"]
    plain = CliRunner().invoke(app, args)
    cut = CliRunner().invoke(app, args + ["--ablate", "nosink:4", "--out", str(tmp_path / "r.h5")])
    assert plain.exit_code == 0 and cut.exit_code == 0, plain.output + cut.output
    sink_plain = np.array(json.loads(plain.stdout)["metrics"]["sink_mass"])
    sink_cut = np.array(json.loads(cut.stdout)["metrics"]["sink_mass"])
    assert (sink_plain > 0).all() and (sink_cut == 0).all()
    assert read_result(tmp_path / "r.h5").attrs["attention_edit"] == "nosink:4"
    bad = CliRunner().invoke(app, args + ["--ablate", "window:-3"])
    assert bad.exit_code == 2 and "window:-3" in bad.output


# ------------------------------------------------------------------ the window study on SmolLM2

WINDOW = 64
# Each query sees its last 64 tokens plus the first 4 (the attention sinks). Without the sinks
# SmolLM2 loses ~1.5 nats on every token (its heads park attention on token 0), which swamps
# the effect of range; docs/tokens.md gives the numbers of both variants.
STUDY_EDIT = f"window:{WINDOW},sinks:4"


@pytest.fixture(scope="module")
def window_study(smollm2, tmp_path_factory):
    """SmolLM2 (A) against SmolLM2 restricted to a 64-token window (B), through run_study."""
    from attnscope.tokens import repeat_corpus, run_study

    docs, kinds = repeat_corpus()
    out = tmp_path_factory.mktemp("window_study")
    model = smollm2.model
    paths = run_study(smollm2, None, None, None, docs, out, ablate_b=STUDY_EDIT, kinds=kinds,
                      label_a="SmolLM2", label_b="SmolLM2", window=2048, batch_size=1, n_boot=200,
                      progress=False)
    assert all(getattr(m, "_attnscope_edit", None) is None for m in model.modules())  # A is left unedited
    table = pd.read_parquet(paths["tokens"]) if paths["tokens"].suffix == ".parquet" else pd.read_csv(paths["tokens"])
    return table, paths, docs


def test_window_study_far_repeats_lose_most(window_study):
    """gap = loss_A - loss_B; B (windowed) is worse where gap < 0."""
    table, _, docs = window_study
    assert len(table) > 2500 and table["doc_id"].nunique() == len(docs)
    far = (table["repeat_len"] >= 4) & (table["repeat_distance"] > WINDOW)
    assert far.sum() > 300
    g_far, g_other = table.loc[far, "gap"].mean(), table.loc[~far, "gap"].mean()
    # B loses on the tokens A copies from beyond B's reach, far more than elsewhere ...
    assert g_far < 0 and g_far < 3 * g_other, (g_far, g_other)
    # ... in every document, prose and code
    for doc, sub in table.groupby("doc_id"):
        f = (sub["repeat_len"] >= 4) & (sub["repeat_distance"] > WINDOW)
        assert sub.loc[f, "gap"].mean() < 3 * sub.loc[~f, "gap"].mean(), doc
    # while a repeat whose earlier copy is inside the window costs B little
    near = (table["repeat_len"] >= 4) & (table["repeat_distance"] <= WINDOW)
    assert near.sum() > 60
    assert table.loc[near, "gap"].mean() > 0.25 * g_far


def test_window_study_gap_grows_with_repeat_length(window_study):
    from scipy.stats import spearmanr

    table, paths, _ = window_study
    far = table[(table["repeat_len"] >= 1) & (table["repeat_distance"] > WINDOW)]
    rho, p = spearmanr(far["repeat_len"], -far["gap"])
    assert rho > 0.2 and p < 1e-6, (rho, p)
    by = pd.read_csv(paths["gap_by_repeat"])
    by = by[(by["distance"] == "far") & (by["n_tokens"] >= 20)].sort_values("repeat_lo")
    assert len(by) >= 5
    assert by["mean"].iloc[-1] < by["mean"].iloc[0] - 1.0  # longest runs lose > 1 nat more than shortest
    assert spearmanr(np.arange(len(by)), by["mean"])[0] < -0.9  # and the bins fall (almost) monotonically


def test_window_study_regression_isolates_far_repeats(window_study):
    from attnscope.tokens import regress

    table, paths, _ = window_study
    reg = regress(table, ["repeated_near", "repeated_far"], far=WINDOW)
    terms = reg.table.set_index("term")
    assert {"log_freq", "log_repeat", "log_position", "n_chars"} <= set(terms.index)
    assert terms.loc["repeated_far", "coef"] < -0.5 and terms.loc["repeated_far", "p_value"] < 0.01
    assert terms.loc["repeated_far", "coef"] < terms.loc["repeated_near", "coef"]
    # the study's own regression (written to regression.json) agrees
    summary = json.loads(paths["regression_json"].read_text())
    assert summary["ablate_b"] == STUDY_EDIT and summary["far"] == WINDOW
    far_row = next(t for t in summary["regression"]["terms"] if t["term"] == "repeated_far")
    assert far_row["coef"] < -0.5 and far_row["p_value"] < 0.01
    for f in ("gap_by_category.png", "gap_vs_repeat.png", "regression.md"):
        assert (paths["regression_md"].parent / f).stat().st_size > 0
