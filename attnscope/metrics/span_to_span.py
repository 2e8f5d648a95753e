"""Span-to-span mass: the attention queries in span A put on keys in span B (docs/received.md).

    m(A -> B) = (1/|A|) sum_{i in A} sum_{j in B, j in V(i)} P_ij

for named query spans A (`query_spans=`) and named key spans B (`spans=`), token positions
[start, end) within the text. The queries are exactly the positions of A (the query selection
does not apply); a query that cannot see B (B after it, or outside its window) adds 0. Cost: the
key-set path, O(|A| x |B|) per head, from the row log-sum-exp the kernel returned.
"""

from __future__ import annotations

import numpy as np
import torch

from attnscope.capture.interface import LayerAttention
from attnscope.errors import AttnscopeError


def check_spans(spans: dict, n_tokens: int, what: str = "span") -> None:
    """Every span inside [0, n_tokens) and non-empty (one line per refusal)."""
    for name, value in spans.items():
        try:
            s0, s1 = (int(v) for v in value)
        except (TypeError, ValueError):
            raise AttnscopeError(f"{what} {name!r} = {value!r}: give (start, end) token indices") from None
        if not 0 <= s0 < s1 <= n_tokens:
            raise AttnscopeError(f"{what} {name!r} = [{s0}, {s1}) is not inside the {n_tokens}-token input")


def span_to_span(attn: LayerAttention, b: int, start: int, query_spans: dict, key_spans: dict) -> np.ndarray:
    """[query span, key span, head] mean over each query span's rows of the mass on each key span."""
    from attnscope.metrics.reductions import keyset_probs

    out = np.zeros((len(query_spans), len(key_spans), attn.n_heads))
    dev = attn.query.device
    for a, (q0, q1) in enumerate(query_spans.values()):
        rows = torch.arange(start + q0, start + q1, device=dev) - attn.q_offset
        rows = rows[(rows >= 0) & (rows < attn.query.shape[2])]
        if len(rows) == 0:  # a decoding step does not hold this span's queries
            out[a] = np.nan
            continue
        for k, (k0, k1) in enumerate(key_spans.values()):
            p = keyset_probs(attn, b, rows, start + k0, start + k1)  # [H, |A|, |B|]
            out[a, k] = p.double().sum(-1).mean(-1).cpu().numpy()
    return out


class SpanToSpanRecorder:
    """Observer: span_to_span of the first forward that holds every query span (the prefill),
    per layer: results[layer] = [query span, key span, head]. Batch row 0, unpadded."""

    needs_lse = True

    def __init__(self, query_spans: dict, key_spans: dict, layers=None):
        self.query_spans, self.key_spans = dict(query_spans), dict(key_spans)
        self.layers = None if layers is None else set(layers)
        self.results: dict[int, np.ndarray] = {}

    def wants(self, layer: int) -> bool:
        return (self.layers is None or layer in self.layers) and layer not in self.results

    def observe(self, attn: LayerAttention) -> None:
        last = max(q1 for _, q1 in self.query_spans.values())
        if attn.q_offset == 0 and attn.query.shape[2] >= last:
            self.results[attn.layer] = span_to_span(attn, 0, 0, self.query_spans, self.key_spans)


def parse_spans(text: str, option: str = "--span", default_name: str = "span") -> dict[str, tuple[int, int]]:
    """`NAME=START:END[,NAME=START:END...]` (or one bare START:END, named `default_name`) ->
    {name: (start, end)}; token indices, END exclusive."""
    out: dict[str, tuple[int, int]] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, eq, rng = item.rpartition("=")
        name = name.strip() if eq else default_name
        try:
            start, end = (int(x) for x in rng.split(":"))
        except ValueError:
            raise AttnscopeError(f"bad {option} {item!r}: use NAME=START:END token indices, END exclusive") from None
        if not name or not 0 <= start < end:
            raise AttnscopeError(f"bad {option} {item!r}: need a name and 0 <= START < END (token indices, "
                                 "END exclusive)")
        if name in out:
            raise AttnscopeError(f"bad {option}: span {name!r} is given twice")
        out[name] = (start, end)
    if not out:
        raise AttnscopeError(f"{option} is empty: use NAME=START:END")
    return out
