"""Cache-policy what-ifs as exact reductions: the attention mass each query keeps (docs/received.md).

For query i (key index qa_i), a policy with cache budget B keeps a key set K(i, B); the kept
mass is

    kept_i(B) = sum_{j in K(i, B), j in V(i)} P_ij

with P the model's own probabilities (exp(s_ij - lse_i), so a model whose softmax has extra
sink logits keeps less than 1 even with every key cached). Policies (positions within the row):

- `streaming:S` (StreamingLLM, Xiao et al. 2024): the first S tokens and the last B - S keys,
  K = {j < S} u {i - j < B - S}; B > S;
- `window` (a sliding window): the last B keys, K = {i - j < B};
- `static_topk` (heavy hitters chosen in hindsight, a static H2O; Zhang et al. 2023): the B keys
  with the largest attention received r_j over the whole text (`received`, per layer and head);
  the query's own key is kept only if it is among them.

A query with i < B keeps its whole row under the two window policies. `streaming:S` with budget
B is exactly `AttentionEdit(window=B - S, keep_sinks=S)` and `window` is `AttentionEdit(window=B)`,
so the loss under the same cache can be measured through the edit (attnscope.policies).

Cost: one pass over the band of the widest window (query chunks x at most max(B) keys, one
float64 prefix sum gives every budget of the grid), and for `static_topk` one pass over the
max(B) chosen keys per head: O(T x max(B)) per head, never T x T unless max(B) ~ T.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnscope.capture.visibility import AttentionEdit
from attnscope.capture.interface import LayerAttention
from attnscope.errors import AttnscopeError

POLICY_KINDS = ("streaming", "window", "static_topk")
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Policy:
    """One cache policy: `kind` in POLICY_KINDS; `sinks` for streaming."""

    kind: str
    sinks: int = 0

    @property
    def label(self) -> str:
        return f"streaming:{self.sinks}" if self.kind == "streaming" else self.kind

    def edit(self, budget: int) -> AttentionEdit | None:
        """The attention edit that keeps exactly this policy's keys (None: not expressible;
        a static top-k key set is not an AttentionEdit)."""
        if self.kind == "window":
            return AttentionEdit(window=budget)
        if self.kind == "streaming":
            return AttentionEdit(window=budget - self.sinks, keep_sinks=self.sinks)
        return None


def parse_policy(text, default_sinks: int = 4) -> Policy:
    if isinstance(text, Policy):
        return text
    name, sep, arg = str(text).strip().partition(":")
    name = name.strip().lower()
    if name not in POLICY_KINDS:
        raise AttnscopeError(f"unknown policy {str(text)!r}; choose from streaming[:S], window, static_topk")
    if name != "streaming":
        if sep:
            raise AttnscopeError(f"policy {str(text)!r}: only streaming takes an argument (streaming:S sinks)")
        return Policy(name)
    sinks = default_sinks
    if sep:
        try:
            sinks = int(arg)
        except ValueError:
            raise AttnscopeError(f"policy {str(text)!r}: streaming:S needs an integer S (sink tokens)") from None
    if isinstance(sinks, bool) or sinks < 1:
        raise AttnscopeError(f"policy {str(text)!r}: streaming needs at least 1 sink token (window is the "
                             "policy without sinks)")
    return Policy("streaming", int(sinks))


@dataclass(frozen=True)
class PolicyGrid:
    """Policies x cache budgets (in tokens), as `analyze(policies=..., budgets=...)` measures them."""

    policies: tuple[Policy, ...]
    budgets: tuple[int, ...]

    @classmethod
    def make(cls, policies, budgets, *, default_sinks: int = 4) -> "PolicyGrid":
        if isinstance(policies, str):
            policies = [p for p in policies.split(",") if p.strip()]
        pols = tuple(parse_policy(p, default_sinks) for p in policies)
        if not pols:
            raise AttnscopeError("no cache policies given; choose from streaming[:S], window, static_topk")
        labels = [p.label for p in pols]
        if len(set(labels)) != len(labels):
            raise AttnscopeError(f"a policy is given twice: {', '.join(labels)}")
        if budgets is None or len(budgets) == 0:
            raise AttnscopeError("no cache budgets given (tokens, e.g. 64,128,256)")
        out = []
        for bgt in budgets:
            if isinstance(bgt, bool) or not isinstance(bgt, (int, np.integer)) or bgt < 1:
                raise AttnscopeError(f"cache budgets must be integers >= 1 (tokens), got {bgt!r}")
            out.append(int(bgt))
        if len(set(out)) != len(out):
            raise AttnscopeError(f"a cache budget is given twice: {out}")
        return cls(pols, tuple(sorted(out)))

    def check(self, n_tokens: int, what: str = "the input") -> None:
        """Budgets larger than the input, and streaming budgets that leave no window, are refused."""
        too_big = [b for b in self.budgets if b > n_tokens]
        if too_big:
            raise AttnscopeError(f"cache budget(s) {too_big} are larger than {what} ({n_tokens} tokens); "
                                 f"use budgets <= {n_tokens}")
        for p in self.policies:
            if p.kind == "streaming" and self.budgets[0] <= p.sinks:
                raise AttnscopeError(f"policy {p.label}: budget {self.budgets[0]} leaves no recent window "
                                     f"after {p.sinks} sink tokens; use budgets > {p.sinks}")

    @property
    def needs_received(self) -> bool:
        return any(p.kind == "static_topk" for p in self.policies)

    def windows(self) -> list[int]:
        """Every recent-window width the window-type policies need."""
        ws = set()
        for p in self.policies:
            if p.kind == "window":
                ws.update(self.budgets)
            elif p.kind == "streaming":
                ws.update(b - p.sinks for b in self.budgets)
        return sorted(ws)


def kept_mass_rows(attn: LayerAttention, b: int, start: int, q_rows: torch.Tensor, grid: PolicyGrid,
                   received: torch.Tensor | None, consume) -> None:
    """Exact kept mass of every selected query row under every policy and budget.

    Calls consume(c0, c1, kept [H, c, P, NB] float64) per chunk of q_rows[c0:c1] (the caller
    sums them per query group). `received` [H, L] (float64, the row's column sums) ranks the
    keys of `static_topk`.
    """
    H = attn.n_heads
    dev = attn.query.device
    P, NB = len(grid.policies), len(grid.budgets)
    budgets = torch.tensor(grid.budgets, device=dev)
    windows = grid.windows()
    w_max = max(windows) if windows else 0
    b_max = grid.budgets[-1]
    top = None
    if grid.needs_received:
        if received is None:
            raise AttnscopeError("static_topk needs the attention received by each key")
        k = min(b_max, received.shape[1])
        top = torch.argsort(-received, dim=1, stable=True)[:, :k] + start  # [H, k] key indices
    qa_all = q_rows + attn.q_offset
    width = max(w_max, b_max) + 1
    # a chunk of c rows computes c x (c + w_max) band scores, c x w_max of them used: c ~ w_max / 2
    # keeps the waste small without many tiny calls
    chunk = max(32, min(max(64, w_max // 2), _CHUNK_ELEMENTS // max(1, H * width)))
    for c0 in range(0, len(q_rows), chunk):
        r = q_rows[c0:c0 + chunk]
        qa = qa_all[c0:c0 + chunk]
        kept = torch.zeros((H, len(r), P, NB), dtype=torch.float64, device=dev)
        win = _window_masses(attn, b, start, r, qa, windows) if windows else {}
        sink_p = {}
        for pi, pol in enumerate(grid.policies):
            if pol.kind == "window":
                kept[:, :, pi] = torch.stack([win[int(B)] for B in grid.budgets], -1)
            elif pol.kind == "streaming":
                s = pol.sinks
                if s not in sink_p:
                    from attnscope.metrics.reductions import keyset_probs

                    sink_p[s] = keyset_probs(attn, b, r, start, start + s).double()  # [H, c, s]
                w = budgets - s  # [NB]
                jpos = torch.arange(start, start + s, device=dev)
                # sinks outside the recent window: j <= qa - w
                outside = jpos[None, None, :] <= (qa[:, None, None] - w[None, :, None])  # [c, NB, s]
                extra = torch.einsum("hcs,cns->hcn", sink_p[s], outside.double())
                kept[:, :, pi] = torch.stack([win[int(B) - s] for B in grid.budgets], -1) + extra
            else:
                kept[:, :, pi] = _topk_masses(attn, b, r, top, grid.budgets)
        consume(c0, c0 + len(r), kept)


def _window_masses(attn, b, start, r, qa, windows) -> dict[int, torch.Tensor]:
    """{w: [H, c] mass on the keys with qa - j < w} for one chunk of rows: the probabilities of
    the band of the widest window, times a [key, window] indicator per row (one batched matmul
    gives every window of the grid)."""
    w_max = max(windows)
    lo = max(start, int(qa.min()) - w_max + 1)
    hi = int(qa.max()) + 1
    logp = attn.log_probs(b, r, slice(lo, hi))  # [H, c, K]
    # plain causal rows can only hide keys after the chunk's first query: mask just those columns
    m_lo = min(hi, int(qa.min()) + 1) if attn.vis.causal_only else lo
    if m_lo < hi:
        vis = attn.visible(r, m_lo, hi)[b]
        logp[..., m_lo - lo:].masked_fill_(~vis, float("-inf"))
    p = logp.exp_()
    dist = qa[:, None] - torch.arange(lo, hi, device=qa.device)[None, :]  # [c, K]
    w = torch.tensor(windows, device=qa.device)
    inside = (dist[:, :, None] < w[None, None, :]).to(p.dtype)  # [c, K, W]
    masses = torch.bmm(p.transpose(0, 1), inside)  # [c, H, W]
    return {int(v): masses[:, :, i].T.double() for i, v in enumerate(windows)}


def _topk_masses(attn, b, r, top, budgets) -> torch.Tensor:
    """[H, c, NB] mass on each head's top-B keys by received attention (key indices `top`
    [H, k], strongest first), for every budget B."""
    H = attn.n_heads
    if attn.supports_features:
        kv = torch.arange(H, device=top.device) // attn.n_rep
        k_sel = attn.key[b][kv[:, None], top].float()  # [H, k, d]
        q = attn.query[b, :, r].float()  # [H, c, d]
        s = torch.matmul(q, k_sel.transpose(-1, -2)) * attn.scale
        if attn.softcap:
            s = torch.tanh(s / attn.softcap) * attn.softcap
        logp = s - attn.lse[b][:, r, None]
    else:  # a map read from a peer: the whole row, then the chosen keys
        S = attn.key.shape[2]
        logp = attn.log_probs(b, r, slice(0, S)).gather(-1, top[:, None, :].expand(-1, len(r), -1))
    vis = attn.vis(b, r[None, :, None], top[:, None, :])  # [H, c, k]
    p = logp.masked_fill(~vis, float("-inf")).exp()
    rank = torch.arange(top.shape[1], device=top.device)
    first = (rank[:, None] < torch.tensor(budgets, device=top.device)[None, :]).to(p.dtype)  # [k, NB]
    return torch.matmul(p, first).double()
