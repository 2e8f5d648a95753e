"""Attention received by every key, exactly, without a T x T map (docs/received.md).

For layer l, head h and key j, over the query rows R of the text that can see j:

    r_j  = sum_{i in R, j in V(i)} P_ij           (`received`: H2O's accumulated attention)
    n_j  = |{i in R : j in V(i)}|                 (how many queries see j; the same for every head)
    rbar_j = r_j / n_j                            (`received_mean`: alpha_j of Gu et al. 2025)

R is every real row of the text (positions 0..L-1), whatever the query selection: received
attention is a property of the key, like `token0_importance` (which is rbar_0).

Two exact ways, `received_pass=`:

- "chunked": the column sums of P over query chunks, P = exp(log_probs) with the visibility
  rule applied, accumulated in float64 (memory O(chunk x T)). Works for every LayerAttention
  (soft-capping, maps read from a peer). When the chunked row pass of `StatsRecorder` runs
  anyway (row metrics on CPU), its chunks already form sum_i p_ij: `ColumnSums.add` takes them,
  and only the rows it did not cover (the first `min_query_position` rows) are summed here.
- "swapped": r_j = exp(LSE of a swapped attention call): keys as queries, queries as keys,
  -lse_i as a score bias, the causal rule reversed, since
      log r_j = log sum_{i: j in V(i)} exp(scale q_i.k_j - lse_i).
  On CPU aten's fused flash op (one causal call on the reversed sequences with the bias as a
  broadcast [1, H, 1, T] mask, or key blocks with an additive mask where a window, padding or an
  edit applies); on CUDA FlexAttention with the bias as `score_mod` and the reversed rule as
  `mask_mod` (block-sparse).

"auto" is "swapped" (FlexAttention) on CUDA and "chunked" on CPU: there the two cost the same
(docs/benchmarks.md), and the chunked row pass already forms most of the column sums.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from attnscope.capture import kernels
from attnscope.capture.interface import LayerAttention
from attnscope.errors import AttnscopeError

RECEIVED_PASSES = ("auto", "chunked", "swapped")
DEFAULT_TOP_K = 16
_CHUNK_ELEMENTS = 1 << 20  # floats in one [H, chunk, K] block of the chunked pass
_MASK_ELEMENTS = 1 << 24  # floats in one [H, keys, queries] additive mask of the blocked swapped pass


def check_received_pass(value: str, what: str = "received_pass") -> str:
    if value not in RECEIVED_PASSES:
        raise AttnscopeError(f"{what} must be one of {', '.join(RECEIVED_PASSES)}, not {value!r}")
    return value


def check_top_k(k, what: str = "received_top_k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise AttnscopeError(f"{what} must be an integer >= 1, got {k!r}")
    return int(k)


def resolve_pass(attn: LayerAttention, requested: str) -> str:
    """The pass that computes the column sums of this layer: 'chunked', 'swapped_flash' or
    'swapped_flex'."""
    # q and k in hand (not a map read from a peer), and a score that is q.k alone: a score term
    # (position bias, float mask) or a sparse selection is applied only by the chunked pass
    swappable = attn.supports_features and attn.bias is None and attn.indices is None
    if requested == "chunked" or not swappable:
        return "chunked"
    cuda = attn.query.device.type == "cuda"
    if requested == "auto" and not cuda:
        return "chunked"
    if cuda or attn.softcap:  # the CPU flash op has no soft-capping; FlexAttention does
        if kernels.flex_available():
            return "swapped_flex"
        return "chunked"
    return "swapped_flash"


# ----------------------------------------------------------------------------- counts

def visible_counts(attn: LayerAttention, b: int, rows: torch.Tensor, k_lo: int, k_hi: int) -> torch.Tensor | None:
    """n_j for keys k_lo..k_hi-1 (key indices) over the query rows `rows` (ascending, contiguous),
    in closed form when only causality and a sliding window limit visibility; None otherwise
    (the passes then count from the mask they build)."""
    vis = attn.vis
    if vis.mask is not None or vis.edit is not None:
        return None
    if len(rows) == 0:
        return torch.zeros(k_hi - k_lo, dtype=torch.float64, device=rows.device)
    first, last = int(rows[0]) + vis.q_offset, int(rows[-1]) + vis.q_offset
    if last - first + 1 != len(rows):
        return None
    j = torch.arange(k_lo, k_hi, device=rows.device, dtype=torch.float64)
    hi = torch.full_like(j, float(last))
    if vis.window is not None:
        hi = torch.minimum(hi, j + vis.window - 1)
    lo = torch.clamp(j, min=float(first))
    return (hi - lo + 1).clamp(min=0)


class ColumnSums:
    """float64 accumulators r [H, K] and n [K] for keys k_lo..k_hi-1 of one batch row."""

    def __init__(self, n_heads: int, k_lo: int, k_hi: int, device, counts: torch.Tensor | None,
                 buffers: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`buffers`: (sums, counts) to reuse (zeroed here), so that a layer loop does not
        allocate them anew while the forward's own tensors come and go (see received_outputs)."""
        self.k_lo, self.k_hi = k_lo, k_hi
        if buffers is None:
            buffers = (torch.empty((n_heads, k_hi - k_lo), dtype=torch.float64, device=device),
                       torch.empty(k_hi - k_lo, dtype=torch.float64, device=device))
        self.sums = buffers[0].zero_()
        self._count_here = counts is None
        self.counts = buffers[1].zero_() if counts is None else buffers[1].copy_(counts)
        self.rows_done: torch.Tensor | None = None

    def add(self, col: torch.Tensor, lo: int, hi: int, n_rows: int, m_lo: int | None = None,
            vis: torch.Tensor | None = None) -> None:
        """Add col [H, hi-lo] = sum over Q query rows of P (0 where not visible) for keys lo..hi-1.
        Keys [lo, m_lo) are visible to all Q rows; `vis` [Q, hi-m_lo] says which rows see keys
        m_lo..hi-1 (None: all)."""
        a = lo - self.k_lo
        self.sums[:, a:a + (hi - lo)] += col
        if self._count_here:
            m_lo = hi if m_lo is None or vis is None else m_lo
            self.counts[a:a + (m_lo - lo)] += n_rows
            if vis is not None and m_lo < hi:
                self.counts[m_lo - self.k_lo:hi - self.k_lo] += vis.sum(0).double()


# ----------------------------------------------------------------------------- passes

def chunked(attn: LayerAttention, b: int, rows: torch.Tensor, acc: ColumnSums) -> None:
    """Column sums over `rows` (ascending) by query chunks of exp(log_probs), masked."""
    if len(rows) == 0:
        return
    H = attn.n_heads
    qa_all = rows + attn.q_offset
    local = attn.vis.local_span
    width = acc.k_hi - acc.k_lo
    span = width if local is None else min(local, width)
    chunk = max(32, _CHUNK_ELEMENTS // max(1, H * span))
    causal_only = attn.vis.causal_only
    for c0 in range(0, len(rows), chunk):
        r = rows[c0:c0 + chunk]
        qa = qa_all[c0:c0 + chunk]
        hi = min(acc.k_hi, int(qa.max()) + 1)
        lo = acc.k_lo if local is None else max(acc.k_lo, int(qa.min()) - local + 1)
        if lo >= hi:
            continue
        logp = attn.log_probs(b, r, slice(lo, hi))  # [H, c, K] before masking
        m_lo = min(hi, max(lo, int(qa.min()) + 1)) if causal_only else lo
        vis = None
        if m_lo < hi:
            vis = attn.visible(r, m_lo, hi)[b]
            logp[..., m_lo - lo:].masked_fill_(~vis, float("-inf"))
        acc.add(logp.exp_().sum(1).double(), lo, hi, len(r), m_lo, vis)


def _finite_lse(attn: LayerAttention, b: int, rows: torch.Tensor) -> torch.Tensor:
    """[H, Q] row LSE, with rows that see nothing (padding queries) at 0: they are masked out."""
    lse = attn.lse[b][:, rows].float()
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def swapped_flash(attn: LayerAttention, b: int, rows: torch.Tensor, acc: ColumnSums) -> None:
    """Column sums as the LSE of a swapped attention call, with aten's fused CPU flash op."""
    if len(rows) == 0:
        return
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    vis = attn.vis
    k_lo, k_hi = acc.k_lo, acc.k_hi
    q = attn.query[b:b + 1, :, rows].float()  # [1, H, Q, d]: the swapped call's keys (and values)
    k = kernels.repeat_kv(attn.key[b:b + 1, :, k_lo:k_hi].float(), attn.n_rep)  # its queries
    bias = -_finite_lse(attn, b, rows)  # [H, Q]
    first = int(rows[0]) + vis.q_offset
    square = (vis.causal_only and first == k_lo and int(rows[-1]) + vis.q_offset == k_hi - 1
              and len(rows) == k_hi - k_lo)
    if square:
        # key j sees query i iff i >= j: reversing both sequences makes that the causal rule
        _, lse = op(k.flip(2), q.flip(2), q.flip(2), 0.0, True,
                    attn_mask=bias.flip(1)[None, :, None, :].contiguous(), scale=attn.scale)
        acc.sums += lse[0].flip(1).double().exp()
        if acc._count_here:
            acc.counts += torch.arange(k_hi - k_lo, 0, -1, device=acc.counts.device, dtype=torch.float64)
        return
    qa = rows + vis.q_offset
    local = vis.local_span
    H = attn.n_heads
    step = max(16, _MASK_ELEMENTS // max(1, H * len(rows)))
    for j0 in range(k_lo, k_hi, step):
        j1 = min(k_hi, j0 + step)
        # the queries that may see a key of this block: at or after it, within reach of a window
        keep = qa >= j0
        if local is not None:
            keep &= qa <= j1 - 2 + local
        sel = torch.nonzero(keep).flatten()
        if len(sel) == 0:
            continue
        r = rows[sel]
        seen = vis.grid(r, j0, j1)[b].T  # [K, Q']: key j sees query i
        add = bias[:, sel][:, None, :] + torch.zeros(seen.shape, device=q.device).masked_fill_(~seen, float("-inf"))
        qs = q[:, :, sel]
        _, lse = op(k[:, :, j0 - k_lo:j1 - k_lo], qs, qs, 0.0, False, attn_mask=add[None], scale=attn.scale)
        a = j0 - k_lo
        acc.sums[:, a:a + (j1 - j0)] += torch.nan_to_num(lse[0].double(), nan=-math.inf).exp()
        if acc._count_here:
            acc.counts[a:a + (j1 - j0)] += seen.sum(1).double()


class _SwappedRule:
    """The visibility rule of a swapped call for FlexAttention's block mask: query index = key
    k_lo + q_idx of batch row b, key index = query row r0 + kv_idx."""

    def __init__(self, vis, k_lo: int, r0: int):
        self.inner, self.k_lo, self.r0 = vis, k_lo, r0
        self.mask = vis.mask

    def __call__(self, b, q_idx, kv_idx):
        return self.inner(b, kv_idx + self.r0, q_idx + self.k_lo)

    def cache_key(self) -> tuple:
        return ("received:swapped", self.inner.cache_key(), self.k_lo, self.r0)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def swapped_flex(attn: LayerAttention, b: int, rows: torch.Tensor, acc: ColumnSums) -> None:
    """Column sums as the LSE of a swapped FlexAttention call: `score_mod` subtracts lse_i (and
    soft-caps first where the model does), `mask_mod` is the reversed visibility rule. Compiled
    on CUDA (block-sparse, nothing materialised); uncompiled elsewhere, in key chunks (to check
    the logic without a GPU). `rows` must be contiguous."""
    from torch.nn.attention.flex_attention import flex_attention

    if len(rows) == 0:
        return
    r0 = int(rows[0])
    if int(rows[-1]) - r0 + 1 != len(rows):
        raise AttnscopeError("the swapped FlexAttention pass needs contiguous query rows")
    k_lo, k_hi = acc.k_lo, acc.k_hi
    vis1 = attn.vis.for_batch_row(b)
    q = attn.query[b:b + 1, :, rows].float()  # keys (and values) of the swapped call
    k = kernels.repeat_kv(attn.key[b:b + 1, :, k_lo:k_hi].float(), attn.n_rep)  # its queries
    lse_rows = _finite_lse(attn, b, rows)
    cap = float(attn.softcap) if attn.softcap else None

    def score_mod(score, bb, h, q_idx, kv_idx):
        if cap is not None:
            score = torch.tanh(score / cap) * cap
        return score - lse_rows[h, kv_idx]

    compiled = q.device.type in kernels.COMPILED_DEVICES
    try:
        from torch.nn.attention.flex_attention import AuxRequest
        aux_kwargs = {"return_aux": AuxRequest(lse=True)}
    except ImportError:  # torch < 2.9
        AuxRequest = None
        aux_kwargs = {"return_lse": True}
    fn = _compiled_flex() if compiled else flex_attention
    # only the LSE is read: a small zero value tensor of its own (passing q as key and value made
    # dynamo's aliasing guard fail, and torch 2.13 then crashed explaining the recompilation)
    v = q.new_zeros(q.shape[:-1] + (16,))
    n_keys = k_hi - k_lo
    step = n_keys if compiled else max(16, _MASK_ELEMENTS // max(1, attn.n_heads * len(rows)))
    import warnings

    for j0 in range(0, n_keys, step):
        j1 = min(n_keys, j0 + step)
        rule = _SwappedRule(vis1, k_lo + j0, r0)
        bm = kernels.block_mask(rule, 1, j1 - j0, len(rows), q.device, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile"
            res = fn(k[:, :, j0:j1], q, v, score_mod=score_mod, block_mask=bm, scale=attn.scale,
                     **aux_kwargs)
        lse = res[1].lse if AuxRequest is not None else res[1]
        acc.sums[:, j0:j1] += torch.nan_to_num(lse[0].double(), nan=-math.inf).exp()
    if acc._count_here:
        chunked_counts(attn, b, rows, acc)


def chunked_counts(attn: LayerAttention, b: int, rows: torch.Tensor, acc: ColumnSums) -> None:
    """n_j from the visibility rule in query chunks (only where no closed form applies)."""
    step = max(32, _CHUNK_ELEMENTS // max(1, acc.k_hi - acc.k_lo))
    for c0 in range(0, len(rows), step):
        r = rows[c0:c0 + step]
        acc.counts += attn.visible(r, acc.k_lo, acc.k_hi)[b].sum(0).double()


PASSES = {"chunked": chunked, "swapped_flash": swapped_flash, "swapped_flex": swapped_flex}


def column_sums(attn: LayerAttention, b: int, rows: torch.Tensor, k_lo: int, k_hi: int, *,
                received_pass: str = "auto", buffers=None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(r [H, K] float64, n [K] float64, the pass that ran) for keys k_lo..k_hi-1 (key indices)
    of batch row b over query rows `rows` (ascending)."""
    kind = resolve_pass(attn, received_pass)
    acc = ColumnSums(attn.n_heads, k_lo, k_hi, attn.query.device, visible_counts(attn, b, rows, k_lo, k_hi),
                     buffers)
    PASSES[kind](attn, b, rows, acc)
    return acc.sums, acc.counts, kind


# ----------------------------------------------------------------------------- outputs

def received_outputs(sums: torch.Tensor, counts: torch.Tensor, *, full: bool, top_k: int | None,
                     bins: int, n_rows: int, into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-row arrays from the column sums of one batch row (keys = its L real tokens).

    full: `received` [H, L] and `received_mean` [H, L] (NaN where no query sees the key).
    top_k: `received_top` [H, k] (r_j of the k keys that receive most, descending),
    `received_top_key` [H, k] (their positions), `received_top_mean` [H, k] (their rbar_j),
    and `received_bins` [H, bins]: sum_{j in bin} r_j / n_rows, the share of all attention
    (every query row) that lands in each of `bins` equal bins of key position.
    `into`: float32 [H, L] arrays to write `received` and `received_mean` into (views of one
    array for every layer, made before the first layer: a fresh mid-sized array per layer,
    living while the forward allocates and frees its large tensors, fragments the C heap so
    that the process keeps ~0.2 GiB more at 4K tokens).
    """
    out: dict[str, np.ndarray] = {}
    r = sums.cpu().numpy()
    n = counts.cpu().numpy()
    seen = n > 0
    if full:  # float32 (as stored): a 64K-token row is 2.4 MB per head and variable, not 4.7
        into = into or {name: np.empty(r.shape, np.float32) for name in ("received", "received_mean")}
        into["received"][...] = r
        into["received_mean"][...] = np.nan  # in place, no temporaries (see `into`)
        np.divide(r, n, out=into["received_mean"], where=seen[None, :], casting="same_kind")
        out.update(into)
    if top_k is not None:  # in torch, on the column sums: no [H, L] temporaries (see `into`)
        H, L = sums.shape
        k = min(top_k, L)
        vals, order = torch.topk(sums, k, dim=1)  # descending
        seen_t = counts[order] > 0
        means = torch.where(seen_t, vals / counts[order].clamp(min=1), torch.full_like(vals, float("nan")))
        pad = top_k - k  # a text shorter than k: the missing ranks are empty
        out["received_top"] = np.pad(vals.cpu().numpy(), ((0, 0), (0, pad)), constant_values=np.nan)
        out["received_top_key"] = np.pad(order.cpu().numpy(), ((0, 0), (0, pad)), constant_values=-1)
        out["received_top_mean"] = np.pad(means.cpu().numpy(), ((0, 0), (0, pad)), constant_values=np.nan)
        bin_idx = torch.div(torch.arange(L, device=sums.device) * bins, L, rounding_mode="floor").clamp(max=bins - 1)
        binned = torch.zeros((H, bins), dtype=sums.dtype, device=sums.device).index_add_(1, bin_idx, sums)
        out["received_bins"] = (binned / max(1, n_rows)).cpu().numpy()
    return out
