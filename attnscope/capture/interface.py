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

from attnscope.capture import kernels
from attnscope.capture.visibility import AttentionEdit, Visibility, bool_mask, row_starts
from attnscope.errors import AttnscopeError

ATTN_IMPLEMENTATION = "attnscope"
# kept importable from here (older code and the peers' backends use these names)
_bool_mask, _row_starts = bool_mask, row_starts
__all__ = ["AttentionEdit", "LayerAttention", "Observer", "capture", "using_attnscope", "register",
           "set_edit", "set_windows", "windows_disabled", "layer_window", "index_layers",
           "kernel_settings"]


@dataclass
class LayerAttention:
    """What one attention layer saw in one forward, enough to recompute any probability exactly.

    Probability of key j for query row i: exp(score(i, j) - lse[i]) where visible(i, j),
    score = scale * q_i . k_j (softcapped if the model softcaps), lse = log-sum-exp of row i.
    Indices: query row i sits at key index `q_offset + i`; key index j holds the token at
    position `key_start + j` (key_start > 0 only in a sliding-window layer decoding past its
    window, whose cache dropped the oldest keys). `visible`, `scores` and `log_probs` take key
    indices; `metrics.reductions.keyset_probs` takes token positions.
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
    # the kernel that computed the layer's output (capture/kernels.py); "external" when a peer
    # library (TransformerLens, nnsight) ran the attention
    kernel: str = "external"
    key_start: int = 0

    # the feature pass needs q and k; attention read from a stored pattern has neither
    supports_features = True

    @property
    def vis(self) -> Visibility:
        return Visibility(self.q_offset, self.mask, self.window, self.edit, self.row_starts,
                          self.key_start)

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
        return self.vis.grid(q_rows, k_lo, k_hi)

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

    def expectations(self, b: int, q_rows: torch.Tensor, features: torch.Tensor, *,
                     with_keys: bool, rows_key=None) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The feature pass: E_p[f] = sum_j P_ij f(j) for query rows `q_rows` of batch row b.

        Attention calls in float32 (q and k as the layer's kernel received them, upcast) whose
        values are the key features [k_j if with_keys | features[j]] (`features` is [S, F]),
        at most max(64, d) value columns per call, so each call is an ordinary-sized attention
        (a wide value tensor is where fused kernels run out of on-chip memory). Returns
        (E [H, Q, d? + F], the row LSE [H, Q] of the first call, the kernel that ran).
        FlexAttention when available (compiled on CUDA), the reference kernel otherwise.
        """
        q = self.query[b:b + 1, :, q_rows].float()
        k = self.key[b:b + 1].float()
        f = features.float()[None, None].expand(1, self.n_kv_heads, -1, -1)
        width = max(64, k.shape[-1])
        parts = ([k] if with_keys else []) + [f[..., i:i + width].contiguous()
                                              for i in range(0, f.shape[-1], width)]
        forced = _SETTINGS["kernel"]
        kernel = "reference" if forced == "reference" or not kernels.flex_available() else "flex"
        vis = self.vis.for_batch_row(b)
        outs, lse, ran = [], None, kernel
        for v in parts:
            out, row_lse, ran = kernels.run(kernel, q, k, v, self.scale, vis, q_rows, self.softcap,
                                            True, rows_key=rows_key,
                                            precision=_SETTINGS["feature_precision"])
            outs.append(out[0])
            lse = row_lse[0] if lse is None else lse
        return torch.cat(outs, dim=-1), lse, ran


class Observer(Protocol):
    """Receives a LayerAttention for each wanted layer during a forward pass."""

    needs_lse: bool

    def wants(self, layer: int) -> bool: ...

    def observe(self, attn: LayerAttention) -> None: ...


_OBSERVERS: list[Observer] = []
# Kernel choice for the whole process ("auto" = kernels.choose decides; or a kernel's name), and
# the fp32 matmul mode of the compiled feature pass on CUDA ("ieee" exact, "tf32" faster).
_SETTINGS = {"kernel": "auto", "feature_precision": "ieee"}


@contextlib.contextmanager
def kernel_settings(kernel: str | None = None, feature_precision: str | None = None):
    """Force an attention kernel (e.g. 'reference' to check against eager) inside the block."""
    if kernel is not None and kernel != "auto" and kernel not in kernels.FORCEABLE:
        raise AttnscopeError(f"unknown kernel {kernel!r}; choose auto or one of "
                             f"{', '.join(kernels.FORCEABLE)}")
    if feature_precision not in (None, "ieee", "tf32"):
        raise AttnscopeError(f"feature_precision must be 'ieee' or 'tf32', not {feature_precision!r}")
    previous = dict(_SETTINGS)
    if kernel is not None:
        _SETTINGS["kernel"] = kernel
    if feature_precision is not None:
        _SETTINGS["feature_precision"] = feature_precision
    try:
        yield
    finally:
        _SETTINGS.update(previous)


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
    key_start = _key_start(kwargs.get("position_ids"), window, q_offset, S)
    if window is not None and window >= S:
        window = None  # a window longer than the input changes nothing
    mask = bool_mask(attention_mask)
    plain = window is None and edit is None and softcap is None
    kernel = kernels.choose(query.device, T, observed=bool(observers), plain=plain,
                            softcap=softcap, forced=_SETTINGS["kernel"])
    if kernel == "sdpa":
        # Exactly what the model would have run with sdpa.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                      scaling=scale, **{k: v for k, v in kwargs.items()
                                                        if k in ("is_causal",)})
    vis = Visibility(q_offset, mask, window, edit, row_starts(mask, query.shape[0], query.device),
                     key_start)
    out, lse, kernel = kernels.run(kernel, query, key, value, scale, vis, None, softcap, need_lse)
    if observers:
        attn = LayerAttention(layer, query, key, scale, q_offset, lse, mask, window, edit,
                              softcap, vis.row_starts, kernel, key_start)
        for obs in observers:
            obs.observe(attn)
    return out.transpose(1, 2).contiguous(), None


def _key_start(position_ids, window, q_offset: int, n_keys: int) -> int:
    """Token position of key 0. A sliding-window cache keeps only the last keys, so while
    decoding past the window key 0 is not token 0; the queries' positions say where it is.
    (In a left-padded batch the longest row has no padding: its position is the token index.)"""
    if window is None or q_offset == 0 or position_ids is None:
        return 0
    return max(0, int(position_ids[:, -1].max()) + 1 - n_keys)


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
