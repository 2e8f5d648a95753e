"""The sink rate of Gu et al. 2025 ("When Attention Sink Emerges in Language Models: An Empirical
View", ICLR 2025; reference code sail-sg/Attention-Sink, eval_sink_open_source.py).

Importance of key j in layer l, head h (their alpha): the mean attention it receives from the
queries that can see it,

    alpha_j = (1 / (T - j)) * sum_{i >= j} A_ij,

and the sink rate at threshold epsilon is the fraction of (layer, head) with alpha_0 > epsilon
(epsilon = 0.3 in the paper). Their measurement: every query from position 0 (query 0 included,
whose whole attention is on token 0), on the first 64 tokens of each text (tokenised with the
model's special tokens), thresholded per text and averaged over texts, layers and heads.

attnscope computes alpha_0 exactly as the metric `token0_importance` (all rows of the text from
position 0, whatever the query selection, from the row log-sum-exp: O(T) per head).
"""

from __future__ import annotations

from typing import Sequence

import xarray as xr

from attnscope.errors import AttnscopeError

SINK_EPSILON = 0.3
GU_TOKENS = 64  # the input length of Gu et al.'s measurement


def sink_rate(source, texts: str | Sequence[str] | None = None, *, epsilon: float = SINK_EPSILON,
              max_tokens: int | None = GU_TOKENS, **analyze_kwargs) -> xr.Dataset:
    """Sink rate per layer and for the model, with alpha_0 per head.

    `source` is either an `analyze()` result holding `token0_importance`, or a model; with a
    model, `texts` are analysed (one left-padded batch, each cut to `max_tokens` tokens: 64, as
    Gu et al.; None = whole texts) for `token0_importance` first. Gu et al.'s rule: every text
    has at least 64 tokens (shorter ones raise alpha_0: fewer queries, each seeing fewer keys), so
    a text shorter than `max_tokens` is refused; with max_tokens=None whole texts of any length
    are measured. The texts' lengths are in attrs["n_tokens"] either way.

    Returns a Dataset: `token0_importance` (alpha_0, [sequence,] layer, head), `sink_rate_by_layer`
    (layer) and `sink_rate` (scalar): fractions of heads with alpha_0 > epsilon, thresholded per
    text and averaged over texts as in the reference code.
    """
    if not 0.0 < epsilon < 1.0:
        raise AttnscopeError(f"epsilon must be in (0, 1), not {epsilon!r}")
    if isinstance(source, xr.Dataset):
        ds = source
    else:
        if texts is None:
            raise AttnscopeError("sink_rate(model, texts): give the texts to measure on")
        from attnscope.metrics.analyze import analyze

        if max_tokens is not None:
            _check_lengths(source, texts, max_tokens, analyze_kwargs.get("tokenizer"))
        # alpha_0 uses every query from position 0 whatever the query selection: a text shorter
        # than analyze's default first query (16) must not fail on that selection
        analyze_kwargs.setdefault("min_query_position", 0)
        ds = analyze(source, texts, metrics=("token0_importance",), max_tokens=max_tokens,
                     **analyze_kwargs)
    if "token0_importance" not in ds:
        raise AttnscopeError(
            "this result has no token0_importance (alpha_0); re-run analyze with "
            "metrics=(..., 'token0_importance'), or call sink_rate(model, texts)")
    alpha = ds["token0_importance"]
    hit = (alpha > epsilon).astype(float)
    others = [d for d in hit.dims if d not in ("layer",)]
    by_layer = hit.mean([d for d in others])
    n_tokens = ds.attrs.get("n_tokens", "")
    return xr.Dataset(
        {"token0_importance": alpha, "sink_rate_by_layer": by_layer, "sink_rate": hit.mean()},
        attrs={"epsilon": float(epsilon), "model": ds.attrs.get("model", ""),
               "revision": ds.attrs.get("revision", ""), "n_tokens": n_tokens,
               "gu_setting": _gu_setting(n_tokens),
               "definition": "fraction of (layer, head) with alpha_0 > epsilon; alpha_0 = mean "
                             "attention on token 0 over every query from position 0 (Gu et al. 2025)"})


def _gu_setting(n_tokens) -> bool:
    """Whether every text was measured at Gu et al.'s 64 tokens (n_tokens: an int or a JSON list)."""
    import json

    lengths = json.loads(n_tokens) if isinstance(n_tokens, str) and n_tokens else n_tokens
    lengths = lengths if isinstance(lengths, list) else [lengths]
    return bool(lengths) and all(n == GU_TOKENS for n in lengths)


def _check_lengths(source, texts, max_tokens: int, tokenizer=None) -> None:
    """Every text has at least `max_tokens` tokens (Gu et al.'s rule at 64): a shorter one would be
    measured on fewer queries, each seeing fewer keys, which raises alpha_0."""
    tok = tokenizer if tokenizer is not None else getattr(source, "tokenizer", None)
    if tok is None:
        return  # analyze says that text needs a tokenizer
    seqs = [texts] if isinstance(texts, str) else list(texts)
    short = [(i, n) for i, t in enumerate(seqs) if (n := len(tok(t)["input_ids"])) < max_tokens]
    if short:
        listed = ", ".join(f"text {i}: {n}" for i, n in short[:5]) + (" ..." if len(short) > 5 else "")
        raise AttnscopeError(
            f"{len(short)} text(s) have fewer than max_tokens={max_tokens} tokens ({listed}); Gu et al. measure "
            f"alpha_0 on {GU_TOKENS} tokens of each text, and shorter inputs raise it. Pass longer texts, or "
            "max_tokens=None to measure whole texts of any length (their lengths are recorded in n_tokens)")
