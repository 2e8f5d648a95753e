"""Metrics as reductions over a layer's attention probabilities (formulas in docs/metrics.md).

Two kinds, so that cost follows need:
- key-set metrics (`sink_mass`, `token0_mass`, `span_mass`) read P(i, j) = exp(s_ij - lse_i)
  only for the few keys in the set: O(T * |set|) per head, using the row log-sum-exp that the
  fused attention kernel returns anyway;
- row metrics (`entropy`, `mean_distance`, `position_profile`, `distance_profile`) need every
  probability of a row: one more pass over Q.K^T, chunked over queries (memory O(chunk * T)),
  causal rows cut at the query, windowed rows at the window start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from attnscope.capture.interface import LayerAttention

KEYSET_METRICS = ("sink_mass", "token0_mass", "span_mass")
ROW_METRICS = ("entropy", "mean_distance", "position_profile", "distance_profile")
ALL_METRICS = KEYSET_METRICS + ROW_METRICS + ("pattern",)
# distance_profile is opt-in: it needs a per-element scatter that costs more than the others
DEFAULT_METRICS = ("sink_mass", "token0_mass", "entropy", "mean_distance", "position_profile")
_CHUNK_ELEMENTS = 1 << 20  # floats in one [H, chunk, K] block: small enough to stay in cache, and to skip most of the masked upper triangle


def distance_bin_edges(max_length: int) -> np.ndarray:
    """Lower edges of the log2 distance bins: 0, 1, 2, 4, 8, ... (distance = query - key)."""
    n = 2 + int(math.floor(math.log2(max(max_length - 1, 1))))
    return np.array([0] + [2 ** k for k in range(n - 1)], dtype=np.int64)


def _distance_bins(dist: torch.Tensor) -> torch.Tensor:
    # 0 -> bin 0; d in [2^k, 2^(k+1)) -> bin k+1
    d = dist.clamp(min=1).float()
    return torch.where(dist <= 0, torch.zeros_like(dist), torch.floor(torch.log2(d)).long() + 1)


def keyset_probs(attn: LayerAttention, b: int, q_rows: torch.Tensor, k_lo: int, k_hi: int) -> torch.Tensor:
    """[H, Q, K] exact probabilities of keys k_lo..k_hi-1 for query rows q_rows of batch row b
    (0 where not visible): exp(score - lse), O(Q * K) per head."""
    s = attn.scores(b, q_rows, slice(k_lo, k_hi))
    vis = attn.visible(q_rows, k_lo, k_hi)[b]
    p = torch.exp(s - attn.lse[b][:, q_rows, None])
    return torch.where(vis[None], p, torch.zeros_like(p))


@dataclass
class RowPlan:
    """What to compute for one batch row: its real tokens and the chosen queries."""

    length: int  # real tokens in the row
    queries: np.ndarray  # positions within the row (0 = first real token)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)


class StatsRecorder:
    """Observer that reduces each wanted layer's attention to per-head statistics."""

    def __init__(self, metrics, plans: list[RowPlan], *, sink_tokens: int = 4, bins: int = 32,
                 layers=None, max_length: int | None = None):
        unknown = set(metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {', '.join(ALL_METRICS)}")
        self.metrics = tuple(metrics)
        self.plans = plans
        self.sink_tokens = sink_tokens
        self.bins = bins
        self.layers = None if layers is None else set(layers)
        # the fused kernel returns each row's log-sum-exp for free; row metrics reuse it too
        self.needs_lse = any(m in KEYSET_METRICS + ROW_METRICS for m in self.metrics)
        self.dist_edges = distance_bin_edges(max_length or max(p.length for p in plans))
        self.results: dict[int, list[dict[str, np.ndarray]]] = {}

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def observe(self, attn: LayerAttention) -> None:
        per_row = []
        for b, plan in enumerate(self.plans):
            start = int(attn.row_starts[b])
            q_rows = torch.as_tensor(plan.queries + start - attn.q_offset, device=attn.query.device)
            out: dict[str, np.ndarray] = {}
            if any(m in KEYSET_METRICS for m in self.metrics):
                out.update(self._keyset(attn, b, start, q_rows, plan))
            if any(m in ROW_METRICS for m in self.metrics):
                out.update(self._rows(attn, b, start, q_rows, plan))
            if "pattern" in self.metrics:
                out["pattern"] = self._pattern(attn, b, start, plan)
            per_row.append(out)
        self.results[attn.layer] = per_row

    def _keyset(self, attn, b, start, q_rows, plan) -> dict[str, np.ndarray]:
        out = {}
        if "sink_mass" in self.metrics or "token0_mass" in self.metrics:
            k = min(self.sink_tokens, plan.length)
            p = keyset_probs(attn, b, q_rows, start, start + k)
            out["sink_mass"] = p.sum(-1).mean(-1).cpu().numpy()
            out["token0_mass"] = p[..., 0].mean(-1).cpu().numpy()
        if "span_mass" in self.metrics:
            masses = []
            for s0, s1 in plan.spans.values():
                p = keyset_probs(attn, b, q_rows, start + s0, start + s1)
                masses.append(p.sum(-1).mean(-1).cpu().numpy())
            out["span_mass"] = np.stack(masses) if masses else np.zeros((0, attn.n_heads))
        return {k: v for k, v in out.items() if k in self.metrics}

    def _rows(self, attn, b, start, q_rows, plan) -> dict[str, np.ndarray]:
        # Cost is dominated by passes over [H, chunk, K]: scores (matmul), - lse, exp, and one
        # read each for entropy (a dot) and the column sums behind distance and position.
        H = attn.n_heads
        dev = attn.query.device
        want = set(self.metrics)
        sums = {m: torch.zeros((H,) + shape, dtype=torch.float64, device=dev) for m, shape in (
            ("entropy", ()), ("mean_distance", ()), ("position_profile", (self.bins,)),
            ("distance_profile", (len(self.dist_edges),))) if m in want}
        n_dist = len(self.dist_edges)
        q_abs_all = q_rows + attn.q_offset
        local = attn.window
        if attn.edit is not None and attn.edit.window is not None and not attn.edit.keep_sinks:
            local = attn.edit.window if local is None else min(local, attn.edit.window)
        span = plan.length if local is None else min(local, plan.length)
        chunk = max(32, _CHUNK_ELEMENTS // max(1, H * span))
        # Plain causal rows (no padding mask, window or edit) can only hide keys after the
        # chunk's first query: the mask bias then touches just those last columns.
        causal_only = attn.mask is None and attn.window is None and attn.edit is None
        buf = torch.empty(H * chunk * (span + chunk), device=dev)  # reused for p across chunks
        for c0 in range(0, len(q_rows), chunk):
            rows = q_rows[c0:c0 + chunk]
            qa = q_abs_all[c0:c0 + chunk]
            k_hi = int(qa.max()) + 1
            k_lo = start if local is None else max(start, int(qa.min()) - local + 1)
            logp = attn.log_probs(b, rows, slice(k_lo, k_hi))  # [H, c, K], before masking
            m_lo = int(qa.min()) + 1 if causal_only else k_lo
            if m_lo < k_hi:
                vis = attn.visible(rows, m_lo, k_hi)[b]  # [c, K']
                # a finite -1e30 instead of -inf: p = 0 there and p * log p stays 0, not NaN
                logp[..., m_lo - k_lo:].add_(torch.zeros(vis.shape, device=dev).masked_fill_(~vis, -1e30))
            p = torch.exp(logp, out=buf[:logp.numel()].view(logp.shape))
            if "entropy" in want:
                sums["entropy"] -= torch.linalg.vecdot(p, logp).sum(-1).double()
            del logp
            if "mean_distance" in want or "position_profile" in want:
                # both are linear in the key's position: reduce over queries first
                received = p.sum(1).double()  # [H, K]: mass each key receives from the chunk
                j = torch.arange(k_lo, k_hi, device=dev)
                if "mean_distance" in want:  # sum_i sum_j p_ij (i - j) = sum_i i - sum_j j recv_j
                    sums["mean_distance"] += qa.double().sum() - received @ j.double()
                if "position_profile" in want:
                    bin_idx = (((j - start) * self.bins) // plan.length).clamp(0, self.bins - 1)
                    sums["position_profile"].index_add_(1, bin_idx, received)
            if "distance_profile" in want:
                j = torch.arange(k_lo, k_hi, device=dev)
                idx = _distance_bins(qa[:, None] - j[None, :]).clamp(max=n_dist - 1)
                acc = torch.zeros(H, len(rows), n_dist, dtype=p.dtype, device=dev)
                acc.scatter_add_(2, idx[None].expand(H, -1, -1), p)
                sums["distance_profile"] += acc.sum(1).double()
            del p
        n = len(q_rows)
        return {k: (v / n).cpu().numpy() for k, v in sums.items()}

    def _pattern(self, attn, b, start, plan) -> np.ndarray:
        rows = torch.arange(start, start + plan.length, device=attn.query.device) - attn.q_offset
        s = attn.scores(b, rows, slice(start, start + plan.length))
        vis = attn.visible(rows, start, start + plan.length)[b]
        return torch.softmax(s.masked_fill(~vis[None], float("-inf")), dim=-1).cpu().numpy()
