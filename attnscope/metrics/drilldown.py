"""Drill-down: the exact top-k keys of chosen queries, per layer and head (docs/drilldown.md).

For a query at position i, head h of layer l, the probability of key j is
P_ij = exp(s_ij - lse_i) with s_ij = scale * q_i . k_j (soft-capped if the model soft-caps) and
lse_i the row log-sum-exp the fused kernel returned (it includes a learned sink logit where a
model has one, so the real keys' probabilities may sum to less than 1). `TopKRecorder` scans the
keys a query can see in blocks of `key_block` keys through `LayerAttention.log_probs`, keeps the
k largest so far and never holds more than [H, Q, key_block + k] numbers per layer: O(|Q| x T)
work per head and no T x T map.

Order, ties included, is deterministic: by log-probability (descending), then by key position
(ascending: of two keys with equal probability the earlier one ranks first). Rows that see fewer
than k keys are padded with key -1 and probability 0.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from attnscope.capture.interface import LayerAttention, kernel_settings
from attnscope.errors import AttnscopeError

__all__ = ["TopKRecorder", "topk_keys", "check_topk", "check_positions", "check_layer_head",
           "token_strings", "DEFAULT_K"]

DEFAULT_K = 10
KEY_BLOCK = 4096  # keys per block of the scan: [H, Q, KEY_BLOCK] floats live at a time
QUERY_CHUNK = 64  # query rows scanned together (each chunk scans only the keys its rows can see)


# ------------------------------------------------------------------ checks (no model needed)
def check_topk(k, name: str = "k") -> int:
    """k (keys per query, layer and head) must be an integer >= 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise AttnscopeError(f"{name} (top-k keys) must be an integer >= 1, got {k!r}")
    return int(k)


def check_positions(positions: Sequence[int], n_tokens: int, what: str = "query") -> np.ndarray:
    """Sorted unique token positions, each inside [0, n_tokens)."""
    pos = np.asarray(list(positions), dtype=np.int64)
    if pos.size == 0:
        raise AttnscopeError(f"no {what} positions given")
    bad = pos[(pos < 0) | (pos >= n_tokens)]
    if bad.size:
        raise AttnscopeError(f"{what} position(s) {bad.tolist()} are outside the {n_tokens}-token input "
                             f"(positions 0-{n_tokens - 1})")
    return np.unique(pos)


def check_layer_head(layers: Sequence[int] | None, heads: Sequence[int] | None, n_layers: int | None,
                     n_heads: int | None) -> None:
    """Layers and heads must exist (numbered from 0); None means 'not known yet' and passes."""
    for what, values, n in (("layer", layers, n_layers), ("head", heads, n_heads)):
        if values is None:
            continue
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise AttnscopeError(f"{what} must be an integer >= 0, got {v!r}")
        if n is not None:
            beyond = sorted({int(v) for v in values if v >= n})
            if beyond:
                raise AttnscopeError(f"{what} {beyond[0] if len(beyond) == 1 else beyond} does not exist: "
                                     f"the model has {n} {what}s (0-{n - 1})")


def parse_positions(text: str, option: str = "--queries", n_tokens: int | None = None) -> list[int]:
    """'5,100,200', '100-103,500' (ranges inclusive) or, given n_tokens, 'last' (n_tokens - 1)
    -> positions. Only the syntax is checked here (check_positions checks the range)."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part == "last":
            if n_tokens is None:
                raise AttnscopeError(f"bad {option} {text!r}: 'last' needs the input's length")
            out.append(n_tokens - 1)
            continue
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise AttnscopeError(f"bad {option} {text!r}: use positions like 100,200, ranges like 0-3"
                                 + (" or last" if n_tokens is not None else "")) from None
        if b < a:
            raise AttnscopeError(f"bad {option} {text!r}: the range {part} runs backwards")
        out.extend(range(a, b + 1))
    if not out:
        raise AttnscopeError(f"{option} is empty: give token positions like 100,200")
    return out


# ------------------------------------------------------------------------------ the observer
class TopKRecorder:
    """Observer: the exact top-k keys (positions, log-probabilities) of chosen query positions,
    per layer and query head, and each row's mass on real keys. One text (batch row 0)."""

    needs_lse = True

    def __init__(self, queries: Sequence[int], k: int = DEFAULT_K, *, layers=None,
                 key_block: int = KEY_BLOCK):
        self.queries = np.asarray(queries, dtype=np.int64)
        self.k = check_topk(k)
        self.layers = None if layers is None else {int(x) for x in layers}
        self.key_block = int(key_block)
        # layer -> (keys int64 [H, Q, k], log_probs float32 [H, Q, k], row_mass float64 [H, Q])
        self.results: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.kernels: dict[int, str] = {}

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def observe(self, attn: LayerAttention) -> None:
        self.kernels[attn.layer] = attn.kernel
        b = 0
        start = int(attn.row_starts[b])  # the first real token (0: one unpadded text)
        dev = attn.query.device
        H, k = attn.n_heads, self.k
        Qn = len(self.queries)
        keys = torch.full((H, Qn, k), -1, dtype=torch.long, device=dev)
        logp = torch.full((H, Qn, k), float("-inf"), dtype=torch.float32, device=dev)
        mass = torch.zeros((H, Qn), dtype=torch.float64, device=dev)
        local = attn.vis.local_span
        for c0 in range(0, Qn, QUERY_CHUNK):
            pos = torch.as_tensor(self.queries[c0:c0 + QUERY_CHUNK], device=dev)
            rows = pos + start - attn.q_offset  # query rows of this layer call
            if int(rows.min()) < 0:
                raise AttnscopeError("a query position is before this forward's first query row")
            k_hi = int(rows.max()) + attn.q_offset + 1 - attn.key_start  # key indices, exclusive
            k_lo = start - attn.key_start
            if local is not None:
                k_lo = max(k_lo, int(rows.min()) + attn.q_offset - local + 1 - attn.key_start)
            k_lo = max(k_lo, 0)
            best_v, best_j, row_mass = _scan(attn, b, rows, k_lo, k_hi, k, self.key_block)
            best_j = torch.where(torch.isfinite(best_v), best_j + attn.key_start - start,
                                 torch.full_like(best_j, -1))  # key index -> token position
            keys[:, c0:c0 + len(rows)] = best_j
            logp[:, c0:c0 + len(rows)] = best_v
            mass[:, c0:c0 + len(rows)] = row_mass
        self.results[attn.layer] = (keys.cpu().numpy(), logp.cpu().numpy(), mass.cpu().numpy())


def _scan(attn: LayerAttention, b: int, rows: torch.Tensor, k_lo: int, k_hi: int, k: int,
          block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (log-probability, key index) over key indices [k_lo, k_hi) for `rows`, blockwise,
    and each row's summed probability over the visible keys. Ties: earlier key first."""
    H, Q = attn.n_heads, len(rows)
    dev = attn.query.device
    best_v = torch.full((H, Q, 0), float("-inf"), device=dev)
    best_j = torch.zeros((H, Q, 0), dtype=torch.long, device=dev)
    mass = torch.zeros((H, Q), dtype=torch.float64, device=dev)
    for a in range(k_lo, k_hi, block):
        z = min(a + block, k_hi)
        lp = attn.log_probs(b, rows, slice(a, z))  # [H, Q, K] score - lse, before masking
        vis = attn.visible(rows, a, z)[b]  # [Q, K]
        lp = lp.masked_fill(~vis[None], float("-inf"))
        mass += torch.exp(lp).sum(-1, dtype=torch.float64)
        j = torch.arange(a, z, device=dev).expand(H, Q, -1)
        # earlier blocks (smaller key indices) first: a stable sort keeps them ahead on ties
        cand_v = torch.cat([best_v, lp], dim=-1)
        cand_j = torch.cat([best_j, j], dim=-1)
        order = torch.sort(cand_v, dim=-1, descending=True, stable=True).indices[..., :k]
        best_v = torch.gather(cand_v, -1, order)
        best_j = torch.gather(cand_j, -1, order)
    if best_v.shape[-1] < k:  # fewer keys in range than k
        pad = k - best_v.shape[-1]
        best_v = torch.nn.functional.pad(best_v, (0, pad), value=float("-inf"))
        best_j = torch.nn.functional.pad(best_j, (0, pad), value=-1)
    return best_v, best_j, mass


# ------------------------------------------------------------------------------ tokens
def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own (a character split over several byte-level tokens shows
    as U+FFFD in each of them); without a tokenizer, '<id>'."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    unique = sorted(set(ids))
    texts = tokenizer.batch_decode([[i] for i in unique], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    table = dict(zip(unique, texts))
    return [table[i] for i in ids]


# ------------------------------------------------------------------------------ the API
def topk_keys(model, text: str | None = None, *, queries: Sequence[int] | str, k: int = DEFAULT_K,
              token_ids=None, tokenizer=None, layers: Sequence[int] | None = None,
              max_tokens: int | None = None, kernel: str = "auto",
              key_block: int = KEY_BLOCK) -> xr.Dataset:
    """The exact top-k keys of each chosen query position, per layer and query head, in one
    forward (no T x T map). `queries`: token positions (a list, or '100,200', '0-3').

    Returns an xarray Dataset with dims (layer, head, query, rank):
      key       int64   token position of the rank-th key (-1 where the row sees fewer keys)
      prob      float32 P(query -> key) = exp(score - lse), exact (0 where key is -1)
      log_prob  float32 score - lse
      row_mass  (layer, head, query) float64  sum of P over all real keys the query sees
                (1 up to rounding; less when the model has a learned sink logit)
      token_id  (position) the input's token ids; token (position) their strings
    """
    from attnscope.metrics.analyze import _resolve, _tokenize

    k = check_topk(k)
    source = _resolve(model, tokenizer, None)
    hf_model, tokenizer = source.hf_model, source.tokenizer
    seqs = _tokenize(tokenizer, text, token_ids, max_tokens)
    if len(seqs) != 1:
        raise AttnscopeError("topk_keys takes one text (or one sequence of token ids)")
    ids = seqs[0]
    if isinstance(queries, str):
        queries = parse_positions(queries, "queries")
    qpos = check_positions(queries, len(ids))
    from attnscope.metrics.analyze import model_depth
    from attnscope.models.introspect import config_value, text_config

    n_layers = model_depth(hf_model)
    check_layer_head(layers, None, n_layers, None)
    max_pos = config_value(text_config(hf_model), "max_position_embeddings")
    if max_pos and len(ids) > max_pos:
        from attnscope.errors import InputTooLongError

        raise InputTooLongError(f"the input has {len(ids)} tokens but the model has a context of {max_pos}; "
                                f"pass max_tokens={max_pos}")
    recorder = TopKRecorder(qpos, k, layers=layers, key_block=key_block)
    device = next(hf_model.parameters()).device
    with kernel_settings(kernel):
        source.run(recorder, torch.tensor([ids], device=device), None)
    if not recorder.results:
        raise AttnscopeError(f"{type(hf_model).__name__} produced no attention through attnscope's attention "
                             "function; it may not use transformers' AttentionInterface")
    return _to_dataset(recorder, ids, qpos, tokenizer, source.name, source.revision, hf_model)


def _to_dataset(recorder: TopKRecorder, ids, qpos, tokenizer, name, revision, hf_model) -> xr.Dataset:
    import attnscope

    layer_ids = sorted(recorder.results)
    keys = np.stack([recorder.results[L][0] for L in layer_ids])
    logp = np.stack([recorder.results[L][1] for L in layer_ids]).astype(np.float32)
    mass = np.stack([recorder.results[L][2] for L in layer_ids])
    prob = np.where(keys >= 0, np.exp(logp), 0.0).astype(np.float32)
    dims = ("layer", "head", "query", "rank")
    ds = xr.Dataset(
        {"key": (dims, keys), "prob": (dims, prob), "log_prob": (dims, logp),
         "row_mass": (dims[:3], mass),
         "token_id": (("position",), np.asarray(ids, dtype=np.int64)),
         "token": (("position",), np.asarray(token_strings(tokenizer, ids), dtype=object))},
        coords={"layer": layer_ids, "head": np.arange(keys.shape[1]), "query": qpos,
                "rank": np.arange(recorder.k), "position": np.arange(len(ids))},
        attrs={"model": name, "revision": revision or "", "model_class": type(hf_model).__name__,
               "n_tokens": len(ids), "k": recorder.k,
               "attention_kernels": json.dumps({str(k): v for k, v in sorted(recorder.kernels.items())}),
               "tie_order": "log_prob descending, then key position ascending",
               "attnscope_version": attnscope.__version__,
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return ds
