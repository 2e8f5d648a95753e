"""The conformance suite (issue 18): on a tiny random model of every causal-LM family of the
installed transformers (attnscope.zoo), attnscope is EXACT (statistics and logits equal eager
attention's, in memory and through attnscope.load) or REFUSED with a message naming the family or
the feature; SKIP where the family is not a text decoder. WRONG or CRASH fails.

KNOWN_BROKEN lists the families that are WRONG or CRASH with the current engine (from
`tools/zoo_survey.py`), as strict xfails: when the engine is fixed for one, its test XPASSes and
fails until the entry is deleted.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from attnscope import conformance as C
from attnscope import zoo

pytestmark = pytest.mark.usefixtures("single_thread")

# family -> "STATUS path: what went wrong [features]" for families WRONG or CRASH with the current
# engine, as the survey measured it (none today); regenerate with
# `PYTHONPATH=. python tools/zoo_survey.py --known-broken`
KNOWN_BROKEN: dict[str, str] = {}

# Refused only at the first attention call: the feature shows in no config, only in the kwargs the
# model passes (docs/families.md). Every other refusal happens before any forward.
REFUSED_AT_CALL = {
    "minimax_m3_vl_text": "block-sparse selection (block_indices=) arrives only in the attention call",
}


def _documented_statuses() -> dict[str, str]:
    """family -> status in docs/families.md, if it was generated with this transformers version."""
    import transformers

    page = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text(encoding="utf-8")
    if f"transformers {transformers.__version__}," not in page:
        return {}
    return dict(re.findall(r"^\| `([^`]+)` \| ([A-Z_]+) \|", page, re.M))


DOCUMENTED = _documented_statuses()


def _family_params():
    for model_type in zoo.causal_lm_types():
        marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[model_type])]
                 if model_type in KNOWN_BROKEN else [])
        yield pytest.param(model_type, marks=marks, id=model_type)


# what a refusal may name instead of the family: the feature it cannot compute
_FEATURE_WORDS = {
    zoo.LEARNED_SINKS: ("sink",), zoo.MLA: ("mla", "head dim", "head size", "latent"),
    zoo.SLIDING_WINDOW: ("window",), zoo.CHUNKED_ATTENTION: ("chunk",), zoo.SOFTCAP: ("softcap", "soft-cap"),
    zoo.SPARSE_TOPK: ("indices", "sparse", "top-k", "topk"), zoo.SCORE_BIAS: ("bias", "alibi", "mask"),
    zoo.HYBRID: ("recurrent", "hybrid"), zoo.RECURRENT_ONLY: ("no attention", "recurrent"),
    zoo.SHARED_ATTENTION: ("shared", "repeated"), zoo.CROSS_ATTENTION: ("cross",),
    zoo.PER_LAYER_HEADS: ("head",), zoo.BYPASSES_INTERFACE: ("attentioninterface", "attention function"),
}


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def names_family_or_feature(message: str, model_type: str, features) -> bool:
    """Does a refusal name the family (its model_type, also inside a class name such as
    GPTNeoForCausalLM) or one of the features the family exercises?"""
    if _squash(model_type) in _squash(message):
        return True
    low = message.lower()
    return any(w in low for f in features for w in _FEATURE_WORDS.get(f, ()))


@pytest.mark.parametrize("model_type", list(_family_params()))
def test_family_is_exact_or_refused(model_type):
    try:
        result = C.check_family(model_type)
    except ImportError as exc:  # an optional package the family's model needs (gemma3n: timm)
        pytest.skip(f"{model_type} cannot be built here: {str(exc).strip().splitlines()[-1]}")
    if DOCUMENTED:  # the page says what the suite measures (regenerate: tools/zoo_survey.py --markdown)
        assert DOCUMENTED.get(model_type) == result.status, (
            f"docs/families.md says {model_type} is {DOCUMENTED.get(model_type)}, measured {result.status}")
    if result.status == C.SKIP:
        pytest.skip(result.reason)
    assert result.status in (C.EXACT, C.REFUSED), f"{model_type} {result.status}: {result.reason}"
    if result.status == C.REFUSED:
        assert result.refused_after_forward == (model_type in REFUSED_AT_CALL), (
            f"{model_type}: refused {result.refused_when}")
    for path in result.paths:
        if path.status == C.REFUSED:
            assert names_family_or_feature(path.detail, model_type, result.features), (
                f"{model_type}: the refusal names neither the family nor a feature "
                f"({', '.join(result.features) or 'none'}): {path.detail}")


# One family per feature the GPU engine serves: FlexAttention (uncompiled on CPU) with the
# feature pass must be as exact as the CPU kernels (sparse selections never go to FlexAttention).
FLEX_FAMILIES = {
    "gpt_oss": "learned sinks (per head), sliding window",
    "inkling2_text": "learned sinks per query, position_bias, ragged heads",
    "deepseek_v3": "MLA value heads",
    "deepseek_v32": "sparse top-k selection (reference kernel: FlexAttention is never given one)",
    "gemma2": "soft-capping",
    "doge": "per-head float mask",
    "hrm_text": "modules run several times per forward",
    "olmo_hybrid": "recurrent layers",
}


@pytest.mark.parametrize("model_type", sorted(FLEX_FAMILIES))
def test_family_exact_with_flex_and_the_feature_pass(model_type):
    result = C.check_family(model_type, through_load=False, kernel="flex", row_pass="features")
    if model_type == "deepseek_v32":  # forcing flex on a selection is refused, never wrong
        assert result.status == C.REFUSED and "sparse top-k" in result.reason, result.reason
        return
    assert result.status == C.EXACT, f"{model_type} ({FLEX_FAMILIES[model_type]}): {result.reason}"


@pytest.mark.parametrize("model_type", zoo.causal_lm_types())
def test_tiny_model_keeps_every_layer_kind(model_type):
    """Every kind of decoder layer of the default config (attention or mixer, MLP or MoE, by
    the classes of its parts) is in the tiny model: the layer plan dropped none."""
    try:
        missing = zoo.missing_layer_kinds(model_type)
    except zoo.FamilySkip as skip:
        pytest.skip(skip.reason)
    except ImportError as exc:
        pytest.skip(f"{model_type} cannot be built here: {str(exc).strip().splitlines()[-1]}")
    if missing is None:
        pytest.skip(f"{model_type}: the default config itself does not build")
    assert not missing, f"{model_type}: the tiny model lacks layers made of {missing}"


def test_reference_counts_the_learned_sink():
    """Rows summing to 0.8: the sink has 0.2, entropy counts it as one more outcome."""
    P = np.zeros((1, 3, 3))
    P[0, 2] = [0.4, 0.3, 0.1]  # query 2: p_sink = 0.2
    ref = C.reference_statistics(P, np.array([2]), sink_tokens=1, spans={"s": (1, 3)})
    probs = np.array([0.4, 0.3, 0.1, 0.2])
    assert ref["learned_sink_mass"][0] == pytest.approx(0.2)
    assert ref["sink_mass"][0] == pytest.approx(0.4)  # real keys only
    assert ref["span_mass"][0, 0] == pytest.approx(0.4)
    assert ref["entropy"][0] == pytest.approx(-(probs * np.log(probs)).sum())


def test_reference_without_sink_is_plain_entropy():
    P = np.full((2, 4, 4), 0.25)
    ref = C.reference_statistics(P, np.arange(4))
    assert np.allclose(ref["entropy"], np.log(4)) and np.allclose(ref["learned_sink_mass"], 0)


@pytest.fixture
def off_by_a_little_engine():
    """attnscope's attention function with its scale 1% off: what the harness must catch."""
    from transformers import AttentionInterface

    from attnscope.capture import interface

    interface.register()
    right = AttentionInterface._global_mapping[interface.ATTN_IMPLEMENTATION]

    def wrong(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = (scaling if scaling is not None else query.shape[-1] ** -0.5) * 1.01
        return right(module, query, key, value, attention_mask, scaling=scale, **kwargs)

    AttentionInterface.register(interface.ATTN_IMPLEMENTATION, wrong)
    yield
    AttentionInterface.register(interface.ATTN_IMPLEMENTATION, right)


def test_harness_catches_a_wrong_engine(off_by_a_little_engine):
    tiny = zoo.tiny_model("llama")
    result = C.check_model(tiny.model, tiny.input_ids, name="llama", through_load=False)
    assert result.status == C.WRONG
    assert {p.path for p in result.paths if p.status == C.WRONG} == {"analyze", "logits", "logits_capture"}


def test_harness_reports_a_crash_and_a_refusal(monkeypatch):
    import attnscope
    from attnscope.errors import UnsupportedModelError

    tiny = zoo.tiny_model("llama")

    def refuse(*args, **kwargs):
        raise UnsupportedModelError("llama: refused for the test")

    monkeypatch.setattr(attnscope, "analyze", refuse)
    result = C.check_model(tiny.model, tiny.input_ids, name="llama", through_load=False)
    assert result.status == C.REFUSED and result.refused_when == "analyze: before any forward"

    monkeypatch.setattr(attnscope, "analyze", lambda *a, **k: 1 / 0)
    result = C.check_model(tiny.model, tiny.input_ids, name="llama", through_load=False)
    assert result.status == C.CRASH and "ZeroDivisionError" in result.reason


def test_zoo_is_deterministic_and_non_uniform():
    a, b = zoo.tiny_model("gpt_oss"), zoo.tiny_model("gpt_oss")
    assert torch.equal(a.input_ids, b.input_ids)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert 1.0 <= a.score_std <= 3.0  # scores spread: attention far from uniform
    assert zoo.LEARNED_SINKS in a.features and zoo.SLIDING_WINDOW in a.features
    assert a.input_ids.shape == (1, zoo.N_TOKENS) and int(a.input_ids.max()) < a.config.vocab_size


def test_readme_claim_is_what_the_families_page_measured():
    """The README's counts are docs/families.md's (which the suite above keeps true)."""
    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "families.md").read_text(encoding="utf-8")
    readme = " ".join((root / "README.md").read_text(encoding="utf-8").split())
    counts = {s: int(n) for n, s in re.findall(r"(\d+) (EXACT|REFUSED|SKIP)\b", page)}
    total = int(re.search(r"(\d+) families,", page).group(1))
    assert f"each of the {total} causal-LM families" in readme
    assert f"{counts['EXACT']} families are exact" in readme
    assert f"{counts['REFUSED']} are refused" in readme
    assert f"{counts['SKIP']} are not text decoders" in readme
