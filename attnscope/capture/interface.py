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
from attnscope.capture.visibility import AttentionEdit, Visibility, row_starts
from attnscope.errors import AttnscopeError, UnsupportedModelError

ATTN_IMPLEMENTATION = "attnscope"
# kept importable from here (the peers' backends use this name)
_row_starts = row_starts
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
    # additive score term [B|1, H|1, T, S] float32 (a relative-position bias, a per-head float
    # mask), or None; score(i, j) = softcap(scale * q_i . k_j) + bias[i, j]
    bias: torch.Tensor | None = None
    # learned sink logits [B|1, H, T|1] float32 (gpt-oss `s_aux`), or None: one more softmax entry
    # with no value, already included in `lse`, so real-key probabilities sum to < 1
    sinks: torch.Tensor | None = None
    # int [B, T, k]: the keys each row may see under a sparse top-k selection, or None
    indices: torch.Tensor | None = None
    # where the call sits: the decoder layer that made it (None if unknown) and how many calls
    # the same layer made before it in this forward (a module run several times, or shared)
    decoder_layer: int | None = None
    call: int = 0

    # the feature pass needs q and k; attention read from a stored pattern has neither
    supports_features = True

    @property
    def vis(self) -> Visibility:
        return Visibility(self.q_offset, self.mask, self.window, self.edit, self.row_starts,
                          self.key_start, self.indices)

    def sink_logits(self, b: int, q_rows: torch.Tensor) -> torch.Tensor | None:
        """Float32 [H, Q] learned sink logit of each head for query rows q_rows of batch row b."""
        if self.sinks is None:
            return None
        s = self.sinks[b if self.sinks.shape[0] > 1 else 0].float()  # [H, T|1]
        s = s[:, q_rows] if s.shape[-1] > 1 else s.expand(-1, len(q_rows))
        return s.expand(self.n_heads, -1)

    def sink_probs(self, b: int, q_rows: torch.Tensor) -> torch.Tensor | None:
        """Float32 [H, Q] probability the learned sink takes from query rows q_rows: exp(sink - lse)."""
        s = self.sink_logits(b, q_rows)
        return None if s is None else torch.exp(s - self.lse[b][:, q_rows])

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
        if self.bias is not None:
            bias = self.bias[b if self.bias.shape[0] > 1 else 0][:, q_rows]  # [H|1, Q, S]
            s = s + bias[..., keys].float()
        return s

    def log_probs(self, b: int, q_rows: torch.Tensor, keys: slice) -> torch.Tensor:
        """Float32 [H, Q, K] score - lse (log P before masking), needs `lse`.

        Without soft-capping or a score bias, "- lse" is folded into the score matmul as
        [q*scale, -lse].[k, 1]: one pass over the [H, Q, K] block fewer than scores() followed
        by a subtraction.
        """
        if self.softcap or self.bias is not None:
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
        With a learned sink, E sums over real keys with the model's probabilities (the sink's
        share carries no feature) and the LSE includes the sink.
        """
        q = self.query[b:b + 1, :, q_rows].float()
        k = self.key[b:b + 1].float()
        f = features.float()[None, None].expand(1, self.n_kv_heads, -1, -1)
        width = max(64, k.shape[-1])
        parts = ([k] if with_keys else []) + [f[..., i:i + width].contiguous()
                                              for i in range(0, f.shape[-1], width)]
        forced = _SETTINGS["kernel"]
        kernel = ("reference" if forced == "reference" or not kernels.flex_available()
                  or self.indices is not None else "flex")
        vis = self.vis.for_batch_row(b)
        sinks = None if self.sinks is None else self.sinks[b:b + 1] if self.sinks.shape[0] > 1 else self.sinks
        outs, lse, ran = [], None, kernel
        for v in parts:
            out, row_lse, ran = kernels.run(kernel, q, k, v, self.scale, vis, q_rows, self.softcap,
                                            True, rows_key=rows_key,
                                            precision=_SETTINGS["feature_precision"], sinks=sinks)
            outs.append(out[0])
            lse = row_lse[0] if lse is None else lse
        return torch.cat(outs, dim=-1), lse, ran


class Observer(Protocol):
    """Receives a LayerAttention for each wanted layer during a forward pass."""

    needs_lse: bool

    def wants(self, layer: int) -> bool: ...

    def observe(self, attn: LayerAttention) -> None: ...

    # optional: skip(layer, reason) hears of a wanted call attnscope does not measure
    # (a non-causal cross-attention), computed exactly but not observed


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


def layer_window(module, window: int | None = None) -> int | None:
    """The window a layer applies: its kernel kwarg (`window`), a declared override, or
    config.layer_types."""
    if getattr(module, "_attnscope_windows_off", False):
        return None  # inside windows_disabled(): only the model's own mask limits attention
    if window is None:
        window = getattr(module, "_attnscope_window", None)
    if window is None:
        config = getattr(module, "config", None)
        idx = getattr(module, "layer_idx", None)
        try:  # a ragged config raises on a global read of a per-layer attribute
            types = getattr(config, "layer_types", None)
            if types and idx is not None and idx < len(types) and types[idx] == "sliding_attention":
                window = getattr(config, "sliding_window", None)
        except Exception:  # noqa: BLE001 - then only the kernel's own argument says
            pass
    return int(window) if window else None


# Keyword arguments of transformers' attention call sites that change nothing attnscope computes
# (bookkeeping for the model's forward, caches, outputs, kernels attnscope does not use).
HARMLESS_KWARGS = frozenset({
    "position_ids", "cache_position", "output_attentions", "output_hidden_states",
    "output_router_logits", "use_cache", "return_dict", "num_items_in_batch", "deterministic",
    "past_key_values", "past_key_value", "layer_idx", "target_dtype", "logits_to_keep",
})
# Keyword arguments attnscope applies exactly (see `read_kwargs`).
UNDERSTOOD_KWARGS = frozenset({
    "sliding_window", "softcap", "s_aux", "sinks", "position_bias", "indices", "is_causal",
})
# Packed-sequence kwargs (flash-attention varlen): only their absence is understood.
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def family_name(module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None) or type(module).__name__


def _refuse(module, feature: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{family_name(module)}: {feature}; attnscope cannot compute this family's attention "
        "exactly, so it refuses rather than report a wrong number (docs/families.md)")


@dataclass
class CallTerms:
    """What one attention call adds to plain scaled dot-product attention, read off its kwargs."""

    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # [B|1, H, T|1] float32
    bias: torch.Tensor | None = None  # [B|1, H|1, T, S] float32
    indices: torch.Tensor | None = None  # [B, T, k]


def read_kwargs(module, query, key, dropout, kwargs) -> CallTerms:
    """The contract: every keyword argument is understood, known to be harmless, or refused.

    A kwarg passed as None carries nothing and is ignored. Anything else that is not in
    UNDERSTOOD_KWARGS or HARMLESS_KWARGS is refused, so that a feature a future transformers
    release adds to the attention call fails loudly instead of being dropped.
    """
    terms = CallTerms()
    B, H, T, _ = query.shape
    S = key.shape[2]
    if dropout and getattr(module, "training", False):
        raise _refuse(module, f"attention dropout {dropout} in training mode (call model.eval())")
    for name, value in kwargs.items():
        if value is None or name in HARMLESS_KWARGS:
            continue
        if name in _PACKING_KWARGS:
            raise _refuse(module, f"packed sequences ({name}=)")
        if name not in UNDERSTOOD_KWARGS:
            raise _refuse(module, f"the attention call passes {name}=, which attnscope does not "
                                  "know how to apply")
        if name == "is_causal":
            if not value:
                raise _refuse(module, "bidirectional attention (is_causal=False)")
        elif name == "sliding_window":
            if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 0:
                raise _refuse(module, f"a sliding window given as {value!r}")
            terms.window = int(value) or None
        elif name == "softcap":
            terms.softcap = float(value) or None
        elif name in ("s_aux", "sinks"):
            terms.sinks = _sink_logits(module, value, B, H, T)
        elif name == "position_bias":
            if not torch.is_tensor(value) or value.dim() != 4 or value.shape[-2:] != (T, S):
                raise _refuse(module, f"a position_bias of shape {tuple(getattr(value, 'shape', ()))}")
            terms.bias = value.float()
        elif name == "indices":
            if not torch.is_tensor(value) or value.dim() != 3 or value.shape[:2] != (B, T):
                raise _refuse(module, f"sparse selection indices of shape "
                                      f"{tuple(getattr(value, 'shape', ()))}")
            terms.indices = value
    return terms


def _sink_logits(module, value, B: int, H: int, T: int) -> torch.Tensor:
    """Learned sink logits as [B|1, H, T|1]: one per head (gpt-oss `s_aux`, [H]) or one per head
    and query (inkling2, [B, H, T, 1])."""
    if not torch.is_tensor(value):
        raise _refuse(module, f"learned sinks given as {type(value).__name__}")
    v = value.float()
    if v.dim() == 1 and v.shape[0] == H:
        return v.view(1, H, 1)
    if v.dim() == 4 and v.shape[-1] == 1:
        v = v[..., 0]
    if v.dim() == 3 and v.shape[1] == H and v.shape[0] in (1, B) and v.shape[2] in (1, T):
        return v
    raise _refuse(module, f"learned sinks of shape {tuple(value.shape)}")


def split_mask(attention_mask: torch.Tensor | None, n_heads: int):
    """The model's mask as (bool visibility [B, 1, T, S] or None, additive bias or None).

    A boolean mask, or a float one holding only 0 and very negative values, shared by every
    head, is pure visibility. A float mask with other values, or one that differs between heads
    (a per-head dynamic mask, as Doge's), is also a score term: its very negative entries become
    -1e30 (so exp gives 0 and p log p stays 0) and visibility keeps the keys any head can see.
    """
    if attention_mask is None:
        return None, None
    m = attention_mask if attention_mask.dim() == 4 else attention_mask[None, None]
    if m.dtype == torch.bool:
        if m.shape[1] == 1 or bool((m == m[:, :1]).all()):
            return m[:, :1], None
        return m.any(dim=1, keepdim=True), torch.where(m, 0.0, -1e30)
    hidden = m <= torch.finfo(m.dtype).min / 2
    if bool(((m == 0) | hidden).all()) and (m.shape[1] == 1 or bool((m == m[:, :1]).all())):
        return ~hidden[:, :1], None
    bias = torch.where(hidden, torch.full((), -1e30, device=m.device), m.float())
    return (~hidden).any(dim=1, keepdim=True), bias


def attnscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        **kwargs):
    """The registered attention function (signature fixed by transformers' AttentionInterface)."""
    terms = read_kwargs(module, query, key, dropout, kwargs)
    layer, decoder_layer, call = _call_label(module)
    if not getattr(module, "is_causal", True) and kwargs.get("is_causal") is not True:
        # a non-causal module (cross-attention, as BLT's patch <-> byte layers): computed exactly
        # as transformers' sdpa does, from the module's own mask; statistics are for causal
        # self-attention, so observers are told it was skipped instead of measuring it
        for o in _OBSERVERS:
            if o.wants(layer) and hasattr(o, "skip"):
                o.skip(layer, f"non-causal attention ({type(module).__name__})")
        return _sdpa(module, query, key, value, attention_mask, scaling, kwargs)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    window = layer_window(module, terms.window)
    edit = getattr(module, "_attnscope_edit", None)
    if edit is not None and (not edit.applies(layer) or edit.hides_nothing(key.shape[2])):
        edit = None
    softcap = terms.softcap
    observers = [o for o in _OBSERVERS if o.wants(layer)]
    need_lse = any(o.needs_lse for o in observers)
    T, S = query.shape[2], key.shape[2]
    if _Calls.tokens == T and S != T:
        # no cache, so the keys should be the input's tokens: extra keys (compressed summaries,
        # memory slots) have no token position for the causal rule and the metrics
        raise _refuse(module, f"{S} keys for {T} tokens in a forward without a cache (keys "
                              "that are not tokens of the input)")
    q_offset = S - T
    key_start = _key_start(kwargs.get("position_ids"), window, q_offset, S)
    if window is not None and window >= S:
        window = None  # a window longer than the input changes nothing
    mask, mask_bias = split_mask(attention_mask, query.shape[1])
    bias = terms.bias if mask_bias is None else (
        mask_bias if terms.bias is None else terms.bias + mask_bias)
    plain = (window is None and edit is None and softcap is None and bias is None
             and terms.sinks is None and terms.indices is None)
    kernel = kernels.choose(query.device, T, observed=bool(observers), plain=plain,
                            softcap=softcap, forced=_SETTINGS["kernel"],
                            selected=terms.indices is not None)
    if kernel == "sdpa":
        return _sdpa(module, query, key, value, attention_mask, scale, kwargs)
    vis = Visibility(q_offset, mask, window, edit, row_starts(mask, query.shape[0], query.device),
                     key_start, terms.indices)
    out, lse, kernel = kernels.run(kernel, query, key, value, scale, vis, None, softcap, need_lse,
                                   bias=bias, sinks=terms.sinks)
    if observers and _Calls.tokens not in (None, T):
        # causal self-attention over another sequence than the input's tokens (BLT's global
        # transformer over byte patches): computed exactly, but positions are not tokens
        for o in observers:
            if hasattr(o, "skip"):
                o.skip(layer, f"attention over {T} positions that are not the input's "
                              f"{_Calls.tokens} tokens ({type(module).__name__})")
    elif observers:
        attn = LayerAttention(layer, query, key, scale, q_offset, lse, mask, window, edit,
                              softcap, vis.row_starts, kernel, key_start, bias=bias,
                              sinks=terms.sinks, indices=terms.indices,
                              decoder_layer=decoder_layer, call=call)
        for obs in observers:
            obs.observe(attn)
    return out.transpose(1, 2).contiguous(), None


def _sdpa(module, query, key, value, attention_mask, scaling, kwargs):
    """Exactly what the model would have run with attn_implementation="sdpa"."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                  scaling=scaling, **{k: v for k, v in kwargs.items()
                                                      if k in ("is_causal",)})


def _key_start(position_ids, window, q_offset: int, n_keys: int) -> int:
    """Token position of key 0. A sliding-window cache keeps only the last keys, so while
    decoding past the window key 0 is not token 0; the queries' positions say where it is.
    (In a left-padded batch the longest row has no padding: its position is the token index.)"""
    if window is None or q_offset == 0 or position_ids is None:
        return 0
    return max(0, int(position_ids[:, -1].max()) + 1 - n_keys)


class _Calls:
    """Which decoder layer is running, and how many attention calls each layer made in this
    forward: kept by hooks that `capture` installs (none outside a capture)."""

    position: int | None = None
    n_positions: int = 0
    counts: dict[int, int] = {}
    tokens: int | None = None  # input length of a forward without a cache (keys must be tokens)


def _call_label(module) -> tuple[int, int | None, int]:
    """(label, decoder layer, call) of an attention call.

    The label is the decoder layer the call runs in (the module's layer_idx outside a capture,
    or where the decoder layers cannot be found) for the first call a layer makes in a forward;
    a layer's later calls in the same forward (a module run in several cycles, a block shared
    between layers) get label + n_layers * call, so no call is merged with or hides another.
    """
    position = _Calls.position
    idx = _layer_index(module) if position is None else position
    if not _Calls.n_positions:
        return idx, position, 0
    call = _Calls.counts.get(idx, 0)
    _Calls.counts[idx] = call + 1
    return idx + _Calls.n_positions * call, position, call


@contextlib.contextmanager
def labelled_calls(model) -> Iterator[None]:
    """Label attention calls by decoder layer and call count (see `_call_label`) while inside."""
    from attnscope.models.introspect import decoder_layers

    layers = decoder_layers(model)
    if layers is None or _Calls.n_positions:  # unknown layout, or already labelling (nested)
        yield
        return

    def reset(_module, args, kwargs):
        _Calls.counts = {}
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cached = kwargs.get("past_key_values") is not None
        _Calls.tokens = None if cached or not torch.is_tensor(ids) or ids.dim() < 2 else ids.shape[1]

    def enter(i):
        def hook(*_):
            _Calls.position = i
        return hook

    def leave(*_):
        _Calls.position = None

    # a forward starts at the model or at its base model (analyze skips the LM head)
    entries = {id(m): m for m in (model, getattr(model, "base_model", model))}.values()
    handles = [m.register_forward_pre_hook(reset, with_kwargs=True) for m in entries]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i)))
        handles.append(layer.register_forward_hook(leave))
    _Calls.n_positions, _Calls.counts = len(layers), {}
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        _Calls.n_positions, _Calls.position, _Calls.counts, _Calls.tokens = 0, None, {}, None


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
    from attnscope.models.introspect import check_supported

    check_supported(model)  # a family whose attention attnscope cannot see: refused, not run
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
    with using_attnscope(model), labelled_calls(model):
        _OBSERVERS.append(observer)
        try:
            yield observer
        finally:
            _OBSERVERS.remove(observer)
