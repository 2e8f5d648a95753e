"""Metrics as reductions over a layer's attention probabilities (formulas in docs/metrics.md).

Two kinds, so that cost follows need:
- key-set metrics (`sink_mass`, `token0_mass`, `span_mass`) read P(i, j) = exp(s_ij - lse_i)
  only for the few keys in the set: O(T * |set|) per head, using the row log-sum-exp that the
  fused attention kernel returns anyway;
- row metrics (`entropy`, `mean_distance`, `position_profile`, `distance_profile`) need every
  probability of a row. Each is an attention-weighted mean of a feature of the key, so one more
  attention call whose values are key features gives them all (the feature pass, the default on
  GPU); or one more pass over Q.K^T, chunked over queries (memory O(chunk * T), causal rows cut
  at the query, windowed rows at the window start; the default on CPU, and the only way for
  `distance_profile` and soft-capped models).
Both produce a value per query row, summed per query bin, so binned and overall means come from
the same pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from attnscope.capture.interface import LayerAttention
from attnscope.metrics.flow import FLOW_METRICS, Flow, FlowOptions

KEYSET_METRICS = ("sink_mass", "token0_mass", "span_mass", "token0_importance", "learned_sink_mass")
ROW_METRICS = ("entropy", "mean_distance", "position_profile", "distance_profile")
# received, received_top, kept_mass, span_to_span: attnscope/metrics/flow.py, docs/received.md
ALL_METRICS = KEYSET_METRICS + ROW_METRICS + ("pattern",) + FLOW_METRICS
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
    """[H, Q, K] exact probabilities of the keys at token positions k_lo..k_hi-1 for query rows
    q_rows of batch row b (0 where not visible, or dropped by a sliding-window cache):
    exp(score - lse), O(Q * K) per head."""
    lo, hi = k_lo - attn.key_start, k_hi - attn.key_start  # key indices
    a, z = max(lo, 0), min(hi, attn.key.shape[2])
    if a >= z:
        return torch.zeros((attn.n_heads, len(q_rows), k_hi - k_lo), device=attn.query.device)
    s = attn.scores(b, q_rows, slice(a, z))
    vis = attn.visible(q_rows, a, z)[b]
    p = torch.where(vis[None], torch.exp(s - attn.lse[b][:, q_rows, None]), torch.zeros_like(s))
    if (a, z) != (lo, hi):
        p = torch.nn.functional.pad(p, (a - lo, hi - z))
    return p


@dataclass
class RowPlan:
    """What to compute for one batch row: its real tokens, the chosen queries, and optionally
    the query bin of each query (`groups`, values 0..n_groups-1, ascending with the queries)."""

    length: int  # real tokens in the row
    queries: np.ndarray  # positions within the row (0 = first real token)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    groups: np.ndarray | None = None
    n_groups: int = 1
    group_starts: np.ndarray | None = None  # first position of each group (query bin)
    query_spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # span_to_span's A spans

    def group_index(self) -> np.ndarray:
        return np.zeros(len(self.queries), dtype=np.int64) if self.groups is None else self.groups


ROW_PASSES = ("auto", "features", "chunked")


class StatsRecorder:
    """Observer that reduces each wanted layer's attention to per-head statistics.

    Every metric is first a value per query row; rows are summed per query group (the query
    bins of `RowPlan.groups`, one group without bins), and the result holds the mean over all
    queries (`name`) and, with bins, the mean per group (`name + "@groups"`, group axis last).
    Row metrics come from the feature pass (one fused attention call whose values are key
    features, `LayerAttention.expectations`) or from the chunked pass over Q.K^T (`row_pass`).
    """

    def __init__(self, metrics, plans: list[RowPlan], *, sink_tokens: int = 4, bins: int = 32,
                 layers=None, max_length: int | None = None, row_pass: str = "auto",
                 learned_sinks_auto: bool = False, flow: Flow | None = None):
        unknown = set(metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {', '.join(ALL_METRICS)}")
        if row_pass not in ROW_PASSES:
            raise ValueError(f"row_pass must be one of {ROW_PASSES}, not {row_pass!r}")
        self.metrics = tuple(metrics)
        # learned_sink_mass joins the metrics at the first layer with a learned sink (the
        # default metrics of a model that has them); layers before it had none: 0 there
        self.learned_sinks_auto = learned_sinks_auto
        self.plans = plans
        self.sink_tokens = sink_tokens
        self.bins = bins
        self.layers = None if layers is None else set(layers)
        self.row_pass = row_pass
        # the fused kernel returns each row's log-sum-exp for free; row metrics reuse it too
        self.needs_lse = any(m in KEYSET_METRICS + ROW_METRICS + FLOW_METRICS for m in self.metrics)
        if flow is None and any(m in FLOW_METRICS for m in self.metrics):
            flow = Flow(self.metrics, FlowOptions(), bins)
        self.flow = flow  # received / kept_mass / span_to_span (None when none is asked for)
        self.dist_edges = distance_bin_edges(max_length or max(p.length for p in plans))
        self.results: dict[int, list[dict[str, np.ndarray]]] = {}
        self.kernels: dict[int, str] = {}  # layer -> the kernel that computed its output
        self.n_heads: dict[int, int] = {}  # layer -> its query heads
        self.calls: dict[int, tuple] = {}  # layer label -> (decoder layer, call): capture's labels
        self.skipped: dict[int, str] = {}  # layer label -> why capture did not measure it
        self.row_passes: dict[int, str] = {}  # layer -> "features" | "chunked"
        self._rows_cache: dict = {}

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def skip(self, layer: int, reason: str) -> None:
        self.skipped[layer] = reason

    def observe(self, attn: LayerAttention) -> None:
        if attn.sinks is not None and self.learned_sinks_auto and "learned_sink_mass" not in self.metrics:
            self.metrics += ("learned_sink_mass",)
        per_row = []
        self.kernels[attn.layer] = attn.kernel
        self.n_heads[attn.layer] = attn.n_heads
        self.calls[attn.layer] = (attn.decoder_layer, attn.call)
        for b, plan in enumerate(self.plans):
            start = int(attn.row_starts[b])
            q_rows, groups = self._rows(attn, b, start, plan)
            sums: dict[str, torch.Tensor] = {}  # metric -> [G, H, ...] sums over each group's rows
            columns = None  # the chunked row pass also sums P over its rows for `received`
            if any(m in KEYSET_METRICS for m in self.metrics):
                sums.update(self._keyset(attn, b, start, q_rows, groups, plan))
            if any(m in ROW_METRICS for m in self.metrics):
                if self._use_features(attn):
                    sums.update(self._row_features(attn, b, start, q_rows, groups, plan))
                else:
                    self.row_passes[attn.layer] = "chunked"
                    columns = self.flow.accumulator(attn, b, start, plan) if self.flow else None
                    sums.update(self._row_chunks(attn, b, start, q_rows, groups, plan, columns))
            flow_out = {}
            if self.flow is not None:
                flow_sums, flow_out = self.flow.measure(attn, b, start, q_rows, groups, plan, columns)
                sums.update(flow_sums)
            out = _finish(sums, plan)
            out.update(flow_out)
            if "token0_importance" in self.metrics:
                out["token0_importance"] = self._token0_importance(attn, b, start, plan)
            if "pattern" in self.metrics:
                out["pattern"] = self._pattern(attn, b, start, plan)
            per_row.append(out)
        self.results[attn.layer] = per_row

    def _rows(self, attn, b, start, plan):
        """Query rows of batch row b (and their groups) as device tensors, made once per layout."""
        key = (b, start, attn.q_offset, str(attn.query.device))
        if key not in self._rows_cache:
            dev = attn.query.device
            rows = torch.as_tensor(plan.queries + start - attn.q_offset, device=dev)
            groups = torch.as_tensor(plan.group_index(), device=dev)
            self._rows_cache[key] = (rows, groups)
        return self._rows_cache[key]

    def _use_features(self, attn) -> bool:
        # the entropy identity needs raw scores (no soft-capping, no score bias);
        # distance_profile bins i - j, which is not a feature of the key alone
        possible = (attn.supports_features and not attn.softcap and attn.bias is None
                    and "distance_profile" not in self.metrics)
        if self.row_pass == "features":
            return possible
        return possible and self.row_pass == "auto" and attn.query.device.type == "cuda"

    def _keyset(self, attn, b, start, q_rows, groups, plan) -> dict[str, torch.Tensor]:
        out = {}
        G = plan.n_groups
        if "sink_mass" in self.metrics or "token0_mass" in self.metrics:
            k = min(self.sink_tokens, plan.length)
            p = keyset_probs(attn, b, q_rows, start, start + k)
            out["sink_mass"] = _group_sum(p.sum(-1), groups, G)
            out["token0_mass"] = _group_sum(p[..., 0], groups, G)
        if "learned_sink_mass" in self.metrics:
            p = attn.sink_probs(b, q_rows)  # [H, Q]; none without a learned sink
            out["learned_sink_mass"] = _group_sum(
                torch.zeros((attn.n_heads, len(q_rows)), device=attn.query.device) if p is None else p,
                groups, G)
        if "span_mass" in self.metrics:
            masses = [_group_sum(keyset_probs(attn, b, q_rows, start + s0, start + s1).sum(-1), groups, G)
                      for s0, s1 in plan.spans.values()]
            # [G, span, H]: groups stay first
            out["span_mass"] = (torch.stack(masses, 1) if masses
                                else torch.zeros((G, 0, attn.n_heads), dtype=torch.float64))
        return {k: v for k, v in out.items() if k in self.metrics}

    def _token0_importance(self, attn, b, start, plan) -> np.ndarray:
        """alpha_0 of Gu et al. 2025: the mean attention token 0 receives from every query that
        sees it, (1/L) sum_{i=0}^{L-1} P_i0 - all rows of the text from position 0, whatever the
        query selection (it is a property of the key, not of a query set)."""
        rows = torch.arange(start, start + plan.length, device=attn.query.device) - attn.q_offset
        rows = rows[rows >= 0]  # a decoding step sees only its own rows
        p = keyset_probs(attn, b, rows, start, start + 1)[..., 0]  # [H, L]
        return p.double().mean(-1).cpu().numpy()

    def _row_features(self, attn, b, start, q_rows, groups, plan) -> dict[str, torch.Tensor]:
        """Row metrics from one fused attention call whose values are key features:
        entropy_i = lse_i - scale * q_i . E_p[k];  mean_distance_i = i - E_p[j];
        position_profile_i = E_p[one-hot(bin(j))]  (formulas in docs/metrics.md)."""
        want = set(self.metrics)
        dev = attn.query.device
        S = attn.key.shape[2]
        j = torch.arange(S, device=dev)
        cols = [j.float()[:, None]]
        if "position_profile" in want:
            bin_idx = (((j - start) * self.bins) // plan.length).clamp(0, self.bins - 1)
            cols.append(torch.nn.functional.one_hot(bin_idx, self.bins).float())
        with_keys = "entropy" in want
        rows_key = (hash(plan.queries.tobytes()), start, attn.q_offset, b)
        e, lse, kernel = attn.expectations(b, q_rows, torch.cat(cols, dim=1), with_keys=with_keys,
                                           rows_key=rows_key)
        self.row_passes[attn.layer] = f"features:{kernel}"
        d = attn.query.shape[-1] if with_keys else 0
        G = plan.n_groups
        out = {}
        # with a learned sink, E sums real keys only (total mass 1 - p_sink) and lse includes it
        sink, p_sink = attn.sink_logits(b, q_rows), attn.sink_probs(b, q_rows)
        if with_keys:
            q = attn.query[b, :, q_rows].float()
            ent = lse - attn.scale * torch.linalg.vecdot(q, e[..., :d])
            if sink is not None:  # the sink's own -p log p term: -p_sink * (sink - lse)
                ent = ent - p_sink * sink
            out["entropy"] = _group_sum(ent, groups, G)
        qa = (q_rows + attn.q_offset).double()
        if "mean_distance" in want:
            real = 1.0 if p_sink is None else (1.0 - p_sink.double())
            out["mean_distance"] = _group_sum(qa[None] * real - e[..., d].double(), groups, G)
        if "position_profile" in want:
            out["position_profile"] = _group_sum(e[..., d + 1:], groups, G)
        return out

    def _row_chunks(self, attn, b, start, q_rows, groups, plan, columns=None) -> dict[str, torch.Tensor]:
        """Row metrics from a pass over Q.K^T in query chunks, each chunk inside one group.

        Cost is dominated by passes over [H, chunk, K]: scores (matmul), - lse, exp, and one
        read each for entropy (a dot) and the column sums behind distance and position.
        """
        H = attn.n_heads
        dev = attn.query.device
        want = set(self.metrics)
        G = plan.n_groups
        sums = {m: torch.zeros((G, H) + shape, dtype=torch.float64, device=dev) for m, shape in (
            ("entropy", ()), ("mean_distance", ()), ("position_profile", (self.bins,)),
            ("distance_profile", (len(self.dist_edges),))) if m in want}
        n_dist = len(self.dist_edges)
        q_abs_all = q_rows + attn.q_offset
        local = attn.vis.local_span
        span = plan.length if local is None else min(local, plan.length)
        chunk = max(32, _CHUNK_ELEMENTS // max(1, H * span))
        # a block is [H, chunk, <= span + chunk] keys: with a small window the chunk term dominates,
        # so bound chunk * (span + chunk) too, and never exceed the rows there are
        chunk = min(chunk, max(32, math.isqrt(_CHUNK_ELEMENTS // H)), max(1, len(q_rows)))
        # Plain causal rows (no padding mask, window or edit) can only hide keys after the
        # chunk's first query: the mask bias then touches just those last columns.
        causal_only = attn.vis.causal_only
        buf = torch.empty(H * chunk * min(span + chunk, plan.length), device=dev)  # reused for p across chunks
        bounds = np.searchsorted(plan.group_index(), np.arange(G + 1))  # group g: rows [bounds[g], bounds[g+1])
        for g in range(G):
            for c0 in range(int(bounds[g]), int(bounds[g + 1]), chunk):
                c1 = min(c0 + chunk, int(bounds[g + 1]))
                rows = q_rows[c0:c1]
                qa = q_abs_all[c0:c1]
                k_hi = int(qa.max()) + 1
                k_lo = start if local is None else max(start, int(qa.min()) - local + 1)
                logp = attn.log_probs(b, rows, slice(k_lo, k_hi))  # [H, c, K], before masking
                m_lo = int(qa.min()) + 1 if causal_only else k_lo
                vis = None
                if m_lo < k_hi:
                    vis = attn.visible(rows, m_lo, k_hi)[b]  # [c, K']
                    # a finite -1e30 instead of -inf: p = 0 there and p * log p stays 0, not NaN
                    logp[..., m_lo - k_lo:].add_(torch.zeros(vis.shape, device=dev).masked_fill_(~vis, -1e30))
                if buf.numel() < logp.numel():  # spread-out queries under a window reach further back
                    buf = torch.empty(logp.numel(), device=dev)
                p = torch.exp(logp, out=buf[:logp.numel()].view(logp.shape))
                p_sink = attn.sink_probs(b, rows)  # [H, c] or None: the learned sink's share
                if "entropy" in want:
                    sums["entropy"][g] -= torch.linalg.vecdot(p, logp).sum(-1).double()
                    if p_sink is not None:  # the sink is one more outcome: -p log p
                        sums["entropy"][g] -= torch.special.xlogy(p_sink, p_sink).sum(-1).double()
                del logp
                if "mean_distance" in want or "position_profile" in want or columns is not None:
                    # both are linear in the key's position: reduce over queries first
                    received = p.sum(1).double()  # [H, K]: mass each key receives from the chunk
                    if columns is not None:
                        columns.add(received, k_lo, k_hi, len(rows), m_lo, vis)
                    j = torch.arange(k_lo, k_hi, device=dev)
                    if "mean_distance" in want:
                        # sum_i sum_j p_ij (i - j) = sum_i i (1 - p_sink_i) - sum_j j recv_j
                        real = 1.0 if p_sink is None else (1.0 - p_sink.double())
                        sums["mean_distance"][g] += (qa.double() * real).sum(-1) - received @ j.double()
                    if "position_profile" in want:
                        bin_idx = (((j - start) * self.bins) // plan.length).clamp(0, self.bins - 1)
                        sums["position_profile"][g].index_add_(1, bin_idx, received)
                if "distance_profile" in want:
                    j = torch.arange(k_lo, k_hi, device=dev)
                    idx = _distance_bins(qa[:, None] - j[None, :]).clamp(max=n_dist - 1)
                    acc = torch.zeros(H, len(rows), n_dist, dtype=p.dtype, device=dev)
                    acc.scatter_add_(2, idx[None].expand(H, -1, -1), p)
                    sums["distance_profile"][g] += acc.sum(1).double()
                del p
        return sums

    def _pattern(self, attn, b, start, plan) -> np.ndarray:
        rows = torch.arange(start, start + plan.length, device=attn.query.device) - attn.q_offset
        s = attn.scores(b, rows, slice(start, start + plan.length))
        vis = attn.visible(rows, start, start + plan.length)[b]
        s = s.masked_fill(~vis[None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        sink = attn.sink_logits(b, rows)
        if sink is not None:  # the learned sink takes its share: rows sum to 1 - p_sink
            lse = torch.logaddexp(lse, sink)
        return torch.exp(s - lse[..., None]).cpu().numpy()


def _group_sum(per_row: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[H, Q, ...] values per query row -> [G, H, ...] float64 sums over each group's rows."""
    x = per_row.double().movedim(1, 0)  # [Q, H, ...]
    out = torch.zeros((n_groups,) + tuple(x.shape[1:]), dtype=torch.float64, device=x.device)
    return out.index_add_(0, groups, x)


def _finish(sums: dict[str, torch.Tensor], plan: RowPlan) -> dict[str, np.ndarray]:
    """Group sums -> the mean over all queries, and with bins the mean per group (last axis)."""
    counts = np.bincount(plan.group_index(), minlength=plan.n_groups).astype(np.float64)
    out = {}
    for name, s in sums.items():
        s = s.cpu().numpy()
        out[name] = s.sum(0) / len(plan.queries)
        if plan.groups is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                per = s / counts.reshape((-1,) + (1,) * (s.ndim - 1))  # NaN for an empty bin
            out[name + "@groups"] = np.moveaxis(per, 0, -1)
    return out
