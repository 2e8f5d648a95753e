"""The attention function attnscope registers with transformers, and the capture session.

Every attention layer of every family that goes through transformers' `AttentionInterface`
calls `attnscope_attention(module, query, key, value, attention_mask, scaling=..., **kwargs)`
with the post-RoPE, post-QK-norm query `[B, H, T, d]` and the un-expanded key/value
`[B, KVH, S, d]`. We compute the layer's output with a fused kernel and, for layers an observer
wants, hand it a `LayerAttention` (query, key, per-row log-sum-exp, and the exact visibility
rule) from which statistics are computed without ever building a T x T map for all heads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

ATTN_IMPLEMENTATION = "attnscope"
# Elements of one block's [B, c, K] mask; bounds the extra memory of the blockwise path.
_BLOCK_ELEMENTS = 1 << 24
# At most this many queries (decoding steps) take the grouped path without KV expansion.
_SMALL_T = 8


@dataclass(frozen=True)
class AttentionEdit:
    """An ablation applied inside the attention function (docs/tokens.md, docs/design.md).

    window: restrict each query to the last `window` keys (itself included).
    keep_sinks: with `window`, the first `keep_sinks` tokens stay visible.
    drop_sinks: hide the first `drop_sinks` tokens (softmax renormalises over the rest).
    layers: attention layers the edit applies to (None = all).
    A query always sees itself, so no row is ever empty.
    """

    window: int | None = None
    keep_sinks: int = 0
    drop_sinks: int = 0
    layers: tuple[int, ...] | None = None

    def applies(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def hides_nothing(self, n_keys: int) -> bool:
        """True when no key of an `n_keys`-key input is hidden (window >= n_keys, no dropped sinks).

        The attention function then runs the unedited kernel, so such an edit leaves the
        model's outputs bit-for-bit unchanged.
        """
        return not self.drop_sinks and (self.window is None or self.window >= n_keys)

    def describe(self) -> str:
        parts = []
        if self.window is not None:
            parts.append(f"window:{self.window}" + (f",sinks:{self.keep_sinks}" if self.keep_sinks else ""))
        if self.drop_sinks:
            parts.append(f"nosink:{self.drop_sinks}")
        if self.layers is not None:
            parts.append("layers:" + "+".join(map(str, self.layers)))
        return ";".join(parts) or "none"


@dataclass
class LayerAttention:
    """What one attention layer saw in one forward, enough to recompute any probability exactly.

    Probability of key j for query row i: exp(score(i, j) - lse[i]) where visible(i, j),
    score = scale * q_i . k_j (softcapped if the model softcaps), lse = log-sum-exp of row i.
    Positions: query row i sits at absolute position `q_offset + i` among the keys.
    """

    layer: int
    query: torch.Tensor  # [B, H, T, d]
    key: torch.Tensor  # [B, KVH, S, d]
    scale: float
    q_offset: int
    lse: torch.Tensor | None  # [B, H, T] float32, None if no observer asked for it
    mask: torch.Tensor | None  # bool [B, 1, T, S] from the model; None means plain causal
    window: int | None
    edit: AttentionEdit | None
    softcap: float | None
    row_starts: torch.Tensor  # [B] absolute index of each row's first real token

    @property
    def n_heads(self) -> int:
        return self.query.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def visible(self, q_rows: torch.Tensor, k_lo: int, k_hi: int) -> torch.Tensor:
        """Bool [B, Q, K]: may query row q_rows[q] attend to key k_lo + k (per batch row)."""
        return _visibility(self.mask, q_rows, k_lo, k_hi, self.q_offset, self.window, self.edit,
                           self.row_starts)

    def scores(self, b: int, q_rows: torch.Tensor, keys: torch.Tensor | slice) -> torch.Tensor:
        """Float32 [H, Q, K] scaled (and softcapped) scores of batch row b; GQA mapped."""
        q = self.query[b, :, q_rows].float()  # [H, Q, d]
        k = self.key[b][:, keys].float()  # [KVH, K, d]
        H, Q, d = q.shape
        s = torch.matmul(q.view(self.n_kv_heads, self.n_rep * Q, d), k.transpose(-1, -2))
        s = s.view(H, Q, -1) * self.scale
        if self.softcap:
            s = torch.tanh(s / self.softcap) * self.softcap
        return s

    def log_probs(self, b: int, q_rows: torch.Tensor, keys: slice) -> torch.Tensor:
        """Float32 [H, Q, K] score - lse (log P before masking), needs `lse`.

        Without soft-capping, "- lse" is folded into the score matmul as [q*scale, -lse].[k, 1]:
        one pass over the [H, Q, K] block fewer than scores() followed by a subtraction.
        """
        if self.softcap:
            return self.scores(b, q_rows, keys).sub_(self.lse[b][:, q_rows, None])
        cache = self.__dict__.setdefault("_k_aug", {})
        if b not in cache:
            k = self.key[b].float()
            cache[b] = torch.cat([k, torch.ones(k.shape[:-1] + (1,), device=k.device)], dim=-1)
        q = torch.cat([self.query[b, :, q_rows].float() * self.scale,
                       -self.lse[b][:, q_rows, None]], dim=-1)  # [H, Q, d+1]
        H, Q, _ = q.shape
        out = torch.matmul(q.view(self.n_kv_heads, self.n_rep * Q, -1),
                           cache[b][:, keys].transpose(-1, -2))
        return out.view(H, Q, -1)


class Observer(Protocol):
    """Receives a LayerAttention for each wanted layer during a forward pass."""

    needs_lse: bool

    def wants(self, layer: int) -> bool: ...

    def observe(self, attn: LayerAttention) -> None: ...


_OBSERVERS: list[Observer] = []


def _visibility(mask, q_rows, k_lo, k_hi, q_offset, window, edit, row_starts) -> torch.Tensor:
    device = q_rows.device
    j = torch.arange(k_lo, k_hi, device=device)
    qa = (q_rows + q_offset)[:, None]  # absolute query positions [Q, 1]
    vis = (j[None, :] <= qa)[None]  # causal [1, Q, K]
    if mask is not None:
        vis = vis & mask[:, 0][:, q_rows][:, :, k_lo:k_hi]
    if window is not None:
        vis = vis & ((qa - j[None, :]) < window)[None]
    if edit is not None:
        rel = j[None, None, :] - row_starts[:, None, None]  # key position within its row
        if edit.window is not None:
            local = ((qa - j[None, :]) < edit.window)[None]
            if edit.keep_sinks:
                local = local | ((rel >= 0) & (rel < edit.keep_sinks))
            vis = vis & local
        if edit.drop_sinks:
            vis = vis & (rel >= edit.drop_sinks)
        vis = vis | (j[None, :] == qa)[None]  # a query always sees itself
    if vis.shape[0] != row_starts.shape[0]:
        vis = vis.expand(row_starts.shape[0], -1, -1)
    return vis


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype != torch.bool:  # additive float mask: 0 visible, very negative hidden
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask.dim() == 2:
        mask = mask[None, None]
    return mask[:, :1]


def _row_starts(mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    # first key any query may see = first real token (left padding); 0 otherwise
    seen = mask[:, 0].any(dim=1)
    starts = seen.int().argmax(dim=-1)
    return torch.where(seen.any(dim=-1), starts, torch.zeros_like(starts)).expand(batch)


def layer_window(module, kwargs) -> int | None:
    """The window a layer applies: its kernel kwarg, a declared override, or config.layer_types."""
    if getattr(module, "_attnscope_windows_off", False):
        return None  # inside windows_disabled(): only the model's own mask limits attention
    window = kwargs.get("sliding_window")
    if window is None:
        window = getattr(module, "_attnscope_window", None)
    if window is None:
        config = getattr(module, "config", None)
        types = getattr(config, "layer_types", None)
        idx = getattr(module, "layer_idx", None)
        if types and idx is not None and idx < len(types) and types[idx] == "sliding_attention":
            window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _few_queries(query, key, value, scale, q_offset, mask, window, edit, softcap, row_starts):
    """Decoding steps (a few queries against a long cache): grouped matmuls, no per-head copy
    of the cache, exact softmax in float32."""
    B, H, T, d = query.shape
    kvh = key.shape[1]
    q = query.float().reshape(B, kvh, (H // kvh) * T, d)
    s = torch.matmul(q, key.float().transpose(-1, -2)).view(B, H, T, -1) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    rows = torch.arange(T, device=query.device)
    vis = _visibility(mask, rows, 0, key.shape[2], q_offset, window, edit, row_starts)[:, None]
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.matmul(p.view(B, kvh, (H // kvh) * T, -1), value.float()).view(B, H, T, d)
    return out.to(query.dtype), lse


def _blockwise(query, key, value, scale, q_offset, mask, window, edit, softcap, row_starts,
               need_lse: bool):
    """Attention output (and row log-sum-exp) in query blocks with an exact explicit mask."""
    B, H, T, d = query.shape
    S = key.shape[2]
    n_rep = H // key.shape[1]
    k_all, v_all = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    local = window if window is not None else None
    if edit is not None and edit.window is not None and not edit.keep_sinks:
        local = edit.window if local is None else min(local, edit.window)
    block = max(16, min(T, _BLOCK_ELEMENTS // max(1, B * S)))
    fused = query.device.type == "cpu" and softcap is None
    outs, lses = [], []
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        k_hi = q_offset + i1
        k_lo = max(0, q_offset + i0 - local + 1) if local is not None else 0
        rows = torch.arange(i0, i1, device=query.device)
        vis = _visibility(mask, rows, k_lo, k_hi, q_offset, window, edit, row_starts)[:, None]
        q, k, v = query[:, :, i0:i1], k_all[:, :, k_lo:k_hi], v_all[:, :, k_lo:k_hi]
        if fused:
            add = torch.zeros(vis.shape, dtype=query.dtype, device=query.device)
            add.masked_fill_(~vis, float("-inf"))
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=add, scale=scale)
        else:
            s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            s = s.masked_fill(~vis, float("-inf"))
            lse = torch.logsumexp(s, dim=-1)
            out = torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v)
        # rows with no visible key (padding queries) would be NaN and poison later layers
        outs.append(torch.nan_to_num(out, nan=0.0))
        if need_lse:
            lses.append(lse.float())
    out = torch.cat(outs, dim=2)
    return out, (torch.cat(lses, dim=2) if need_lse else None)


def attnscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        **kwargs):
    """The registered attention function (signature fixed by transformers' AttentionInterface)."""
    layer = _layer_index(module)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    window = layer_window(module, kwargs)
    edit = getattr(module, "_attnscope_edit", None)
    if edit is not None and (not edit.applies(layer) or edit.hides_nothing(key.shape[2])):
        edit = None
    softcap = kwargs.get("softcap")
    observers = [o for o in _OBSERVERS if o.wants(layer)]
    need_lse = any(o.needs_lse for o in observers)
    T, S = query.shape[2], key.shape[2]
    q_offset = S - T
    if window is not None and window >= S:
        window = None  # a window longer than the input changes nothing
    mask = _bool_mask(attention_mask)

    plain = window is None and edit is None and softcap is None
    if plain and not observers:
        # Exactly what the model would have run with sdpa.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                      scaling=scale, **{k: v for k, v in kwargs.items()
                                                        if k in ("is_causal",)})
    row_starts = _row_starts(mask, query.shape[0], query.device)
    if plain and mask is None and q_offset == 0 and query.device.type == "cpu":
        q_rep = query.shape[1] // key.shape[1]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, _repeat_kv(key, q_rep), _repeat_kv(value, q_rep), 0.0, True, scale=scale)
        lse = lse.float() if need_lse else None
    elif query.shape[2] <= _SMALL_T:
        out, lse = _few_queries(query, key, value, scale, q_offset, mask, window, edit, softcap,
                                row_starts)
    else:
        out, lse = _blockwise(query, key, value, scale, q_offset, mask, window, edit, softcap,
                              row_starts, need_lse)
    if observers:
        attn = LayerAttention(layer, query, key, scale, q_offset, lse, mask, window, edit,
                              softcap, row_starts)
        for obs in observers:
            obs.observe(attn)
    return out.transpose(1, 2).contiguous(), None


def _layer_index(module) -> int:
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        idx = getattr(module, "_attnscope_layer", None)
    if idx is None:
        raise RuntimeError(
            f"{type(module).__name__} has no layer_idx; call attnscope.capture.interface.index_layers(model)")
    return int(idx)


def index_layers(model) -> None:
    """Number attention modules that lack `layer_idx` (some remote-code models) in module order."""
    n = 0
    for m in model.modules():
        if type(m).__name__.endswith("Attention") and hasattr(m, "forward"):
            if getattr(m, "layer_idx", None) is None:
                m._attnscope_layer = n
            n += 1


_REGISTERED = False


def register() -> None:
    """Register the attention function (and its mask builder) with transformers, once."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attnscope_attention)
    # Without a mask function under the same name, padded batches arrive with mask=None.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    _REGISTERED = True


def set_edit(model, edit: AttentionEdit | None) -> None:
    """Apply (or, with None, remove) an attention edit on every attention layer of `model`."""
    for m in model.modules():
        if type(m).__name__.endswith("Attention"):
            m._attnscope_edit = edit


def set_windows(model, windows: dict[int, int | None]) -> None:
    """Declare per-layer sliding windows the model's kernel would otherwise ignore."""
    for m in model.modules():
        if type(m).__name__.endswith("Attention") and getattr(m, "layer_idx", None) in windows:
            m._attnscope_window = windows[m.layer_idx]


@contextlib.contextmanager
def windows_disabled(model) -> Iterator[None]:
    """Inside, attnscope applies no sliding window of its own (neither the kernel's
    `sliding_window=` argument nor windows declared with `set_windows`): only the model's mask
    limits attention, which is what transformers' sdpa and eager kernels compute for it."""
    mods = [m for m in model.modules()
            if type(m).__name__.endswith("Attention") or hasattr(m, "layer_idx")]
    previous = [getattr(m, "_attnscope_windows_off", False) for m in mods]
    for m in mods:
        m._attnscope_windows_off = True
    try:
        yield
    finally:
        for m, p in zip(mods, previous):
            m._attnscope_windows_off = p


@contextlib.contextmanager
def using_attnscope(model) -> Iterator[None]:
    """Route the model's attention through attnscope for the duration; restore afterwards."""
    register()
    index_layers(model)  # remote-code attention modules may lack layer_idx
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield
    finally:
        if previous != ATTN_IMPLEMENTATION and previous is not None:
            model.set_attn_implementation(previous)


@contextlib.contextmanager
def capture(model, observer: Observer) -> Iterator[Observer]:
    """Call `observer` from every attention layer it wants, during forwards inside the block."""
    with using_attnscope(model):
        _OBSERVERS.append(observer)
        try:
            yield observer
        finally:
            _OBSERVERS.remove(observer)
