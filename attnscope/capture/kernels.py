"""The attention kernels behind attnscope's attention function, and the one place that picks one.

Every kernel computes, for the query rows `rows` of a layer call, the attention output and (when
asked) each row's natural-log log-sum-exp in float32, under the exact `Visibility` rule:

    kernel(query [B, H, Q, d], key [B, KVH, S, d], value [B, KVH, S, dv], scale, vis, rows [Q],
           softcap, need_lse, bias) -> (out [B, H, Q, dv], lse [B, H, Q] float32 or None)

score(i, j) = softcap(scale * q_i . k_j) + bias[i, j]: `bias` ([B|1, H|1, T, S] float, indexed by
the call's rows) is an additive score term the model passes (a relative-position bias, a per-head
float mask). A learned sink (`sinks`, one logit per head or per head and row) is one more entry of
the softmax with no value (gpt-oss): `run` folds it in after any kernel,
lse' = logaddexp(lse, sink), out' = out * exp(lse - lse'), which keeps the fused kernels.
The value head size may differ from the query/key head size (MLA).

| kernel      | where `choose` picks it                                   | what it is                    |
| ----------- | --------------------------------------------------------- | ----------------------------- |
| `sdpa`      | nothing observed, nothing to edit: the model's own path   | transformers' sdpa call       |
| `grouped`   | a few query rows (decoding steps)                         | fp32 scores, no KV expansion  |
| `flex`      | CUDA (no sparse selection)                                | FlexAttention, compiled       |
| `cpu_flash` | CPU                                                       | aten's fused CPU flash op     |
| `reference` | anything else (soft-capping on CPU, sparse selection on   | fp32 softmax in query blocks  |
|             | GPU, FlexAttention missing)                               |                               |

FlexAttention (torch.nn.attention.flex_attention) is the fused kernel on GPU: the visibility rule
becomes its `mask_mod` (block-sparse, so a windowed layer costs its window), soft-capping its
`score_mod`, GQA runs without expanding K/V, and it returns the row LSE. Uncompiled (CPU) it
materialises the scores, so on CPU it runs in query chunks and serves to check the GPU logic.
Decoding steps stay on `grouped`: FlexAttention would recompile for every new cache length.
`reference` is the exact fallback wherever no fused kernel applies.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict

import torch

from attnscope.capture.visibility import Visibility
from attnscope.errors import AttnscopeError

KERNELS = ("sdpa", "grouped", "flex", "cpu_flash", "reference")
FORCEABLE = ("flex", "cpu_flash", "grouped", "reference")
# At most this many query rows (decoding steps) take the grouped path.
SMALL_T = 8
# Elements of one [B, H?, block, K] score or mask block in the blocked kernels.
_BLOCK_ELEMENTS = 1 << 24


class KernelUnavailable(AttnscopeError):
    """A forced kernel cannot compute this case (e.g. cpu_flash on a GPU tensor)."""


# ----------------------------------------------------------------------------- choosing

def choose(device: torch.device, n_queries: int, *, observed: bool, plain: bool,
           softcap: float | None, forced: str | None = None, selected: bool = False) -> str:
    """The kernel for one attention call. `plain`: what transformers' sdpa computes exactly
    (causal or the model's mask; no window, edit, soft-capping, bias, learned sink or
    selection). `selected`: the call has a sparse top-k selection (`Visibility.indices`)."""
    if forced and forced != "auto":
        _check_forced(forced, device, softcap, selected)
        return forced
    if plain and not observed:
        return "sdpa"
    if n_queries <= SMALL_T:
        return "grouped"
    if device.type == "cuda" and flex_available() and not selected:
        # a selection is a scatter per block of rows; as a mask_mod it would cost O(T * S * k)
        return "flex"
    if device.type == "cpu" and softcap is None:
        return "cpu_flash"
    return "reference"


def _check_forced(kernel: str, device: torch.device, softcap: float | None,
                  selected: bool = False) -> None:
    if kernel not in FORCEABLE:
        raise KernelUnavailable(f"unknown kernel {kernel!r}; choose auto or one of {', '.join(FORCEABLE)}")
    if kernel == "flex" and selected:
        raise KernelUnavailable("kernel 'flex' cannot apply a sparse top-k selection (indices=); "
                                "use 'reference' or 'cpu_flash'")
    if kernel == "cpu_flash" and (device.type != "cpu" or softcap is not None):
        raise KernelUnavailable("kernel 'cpu_flash' runs on CPU only and has no soft-capping; "
                                "use 'reference' or 'flex'")
    if kernel == "flex" and not flex_available():
        raise KernelUnavailable("kernel 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")


@functools.lru_cache(maxsize=None)
def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# FlexAttention variants (dtype, head dims) that failed to compile in this process -> reason
_FLEX_BROKEN: dict[tuple, str] = {}


def run(kernel: str, query, key, value, scale: float, vis: Visibility,
        rows: torch.Tensor | None, softcap: float | None, need_lse: bool, *, rows_key=None,
        precision: str | None = None, bias: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Run `kernel` (never 'sdpa'); returns (out, lse, the kernel that actually ran).

    rows: the row (in `vis`) of each query in `query`; None = all of the call's rows in order.
    rows_key: a hashable name for `rows`, so FlexAttention's block mask can be cached.
    bias: additive score term [B|1, H|1, T, S] over the call's rows; sinks: learned sink logits
    [B|1, H, T|1] (the returned lse then includes the sink).
    If FlexAttention fails on a GPU for a variant (dtype, head dims) - no Triton, no compiler,
    a kernel that does not fit - that variant falls back to the reference kernel, with one
    warning, and the returned name says so. Out of memory is never a fallback.
    """
    need_kernel_lse = need_lse or sinks is not None
    variant = (query.dtype, query.shape[-1], value.shape[-1], softcap is not None, bias is not None)
    out = None
    if kernel == "flex" and variant not in _FLEX_BROKEN:
        try:
            out, lse = flex(query, key, value, scale, vis, rows, softcap, need_kernel_lse,
                            rows_key=rows_key, precision=precision, bias=bias)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - on a GPU any failure of this variant: fall back
            if query.device.type == "cpu":
                raise
            _FLEX_BROKEN[variant] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            warnings.warn(f"FlexAttention failed for {variant} ({_FLEX_BROKEN[variant]}); attnscope "
                          "uses its reference kernel for it (exact, slower)", RuntimeWarning)
    if out is None:
        if kernel == "flex":
            kernel = "reference"
        fn = {"grouped": grouped, "cpu_flash": cpu_flash, "reference": reference}[kernel]
        if rows is None:
            rows = torch.arange(query.shape[2], device=query.device)
        out, lse = fn(query, key, value, scale, vis, rows, softcap, need_kernel_lse, bias)
    if sinks is not None:
        out, lse = _with_sinks(out, lse, sinks, rows)
    return out, (lse if need_lse else None), kernel


def _with_sinks(out, lse, sinks, rows):
    """Fold learned sink logits into a kernel's result: the sink is one more softmax entry with
    a zero value, so lse' = logaddexp(lse, sink) and out' = out * exp(lse - lse')."""
    sink = sinks.float()
    if sink.shape[-1] > 1 and rows is not None:
        sink = sink[..., rows]
    total = torch.logaddexp(lse, sink.expand_as(lse))
    # a row that sees no key (a padding query) has lse = -inf: its output stays 0
    keep = torch.exp(lse - total).nan_to_num(0.0)
    return (out.float() * keep[..., None]).to(out.dtype), total


def bias_block(bias: torch.Tensor | None, rows: torch.Tensor, k_lo: int, k_hi: int):
    """The [B|1, H|1, Q, K] slice of an additive score term for query rows `rows`, keys
    k_lo..k_hi-1 (float32), or None."""
    if bias is None:
        return None
    return bias[:, :, rows, k_lo:k_hi].float()


def same_head_size(query, key, value):
    """q, k, v padded with zero columns to one head size (exact: zero columns add nothing to
    q.k, and the output's extra columns are dropped): the fused CPU flash op needs one size,
    while MLA models (DeepSeek-V2/V3 and kin) have a value head size unlike q/k's."""
    d, dv = query.shape[-1], value.shape[-1]
    if d == dv:
        return query, key, value
    pad = torch.nn.functional.pad
    if dv < d:
        return query, key, pad(value, (0, d - dv))
    return pad(query, (0, dv - d)), pad(key, (0, dv - d)), value


# ----------------------------------------------------------------------------- helpers

def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, KVH, S, d] -> [B, KVH * n_rep, S, d], as transformers' repeat_kv (query head h reads
    key/value head h // n_rep)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _key_range(vis: Visibility, rows: torch.Tensor) -> tuple[int, int]:
    """Keys [lo, hi) that rows `rows` can possibly see (causal end, window start)."""
    qa_lo, qa_hi = int(rows.min()) + vis.q_offset, int(rows.max()) + vis.q_offset
    local = vis.local_span
    return (0 if local is None else max(0, qa_lo - local + 1)), qa_hi + 1


def _blocks(rows: torch.Tensor, per_row: int):
    """Consecutive slices of `rows` whose [block, per_row] working set stays bounded."""
    n = len(rows)
    step = max(16, min(n, _BLOCK_ELEMENTS // max(1, per_row)))
    for i0 in range(0, n, step):
        yield slice(i0, min(n, i0 + step))


# ----------------------------------------------------------------------------- kernels

def grouped(query, key, value, scale, vis, rows, softcap, need_lse, bias=None):
    """A few query rows against a long cache: grouped matmuls (no per-head copy of the cache),
    exact softmax in float32."""
    B, H, Q, d = query.shape
    kvh = key.shape[1]
    q = query.float().reshape(B, kvh, (H // kvh) * Q, d)
    s = torch.matmul(q, key.float().transpose(-1, -2)).view(B, H, Q, -1) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias_block(bias, rows, 0, key.shape[2])
    s = s.masked_fill(~vis.grid(rows, 0, key.shape[2])[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.matmul(p.view(B, kvh, (H // kvh) * Q, -1), value.float()).view(B, H, Q, -1)
    return out.to(query.dtype), lse


def cpu_flash(query, key, value, scale, vis, rows, softcap, need_lse, bias=None):
    """aten's fused CPU flash op: one causal call when nothing but causality masks, else query
    blocks with an additive mask (the visibility rule, plus any score bias) over just the keys
    the block can see."""
    B, H, Q, _ = query.shape
    dv = value.shape[-1]
    query, key, value = same_head_size(query, key, value)
    n_rep = H // key.shape[1]
    k_all, v_all = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if (vis.causal_only and bias is None and vis.q_offset == 0 and Q == key.shape[2]
            and int(rows[-1]) == Q - 1):
        # rows are distinct and ascending, so Q of them ending at Q - 1 are all rows in order
        out, lse = op(query, k_all, v_all, 0.0, True, scale=scale)
        return out[..., :dv], (lse.float() if need_lse else None)
    outs, lses = [], []
    heads = 1 if bias is None else bias.shape[1]
    for blk in _blocks(rows, B * heads * key.shape[2]):
        r = rows[blk]
        k_lo, k_hi = _key_range(vis, r)
        add = torch.zeros((B, 1, len(r), k_hi - k_lo), dtype=query.dtype, device=query.device)
        if bias is not None:
            add = add + bias_block(bias, r, k_lo, k_hi).to(query.dtype)
        add.masked_fill_(~vis.grid(r, k_lo, k_hi)[:, None], float("-inf"))
        out, lse = op(query[:, :, blk], k_all[:, :, k_lo:k_hi], v_all[:, :, k_lo:k_hi], 0.0, False,
                      attn_mask=add, scale=scale)
        outs.append(torch.nan_to_num(out[..., :dv], nan=0.0))  # rows with no visible key (padding)
        lses.append(lse.float())
    return torch.cat(outs, dim=2), (torch.cat(lses, dim=2) if need_lse else None)


def reference(query, key, value, scale, vis, rows, softcap, need_lse, bias=None):
    """Exact attention in float32, query block by query block, with an explicit mask: what eager
    attention computes, in O(block x S) memory. Any value width, any device, soft-capping."""
    B, H, Q, _ = query.shape
    n_rep = H // key.shape[1]
    outs, lses = [], []
    for blk in _blocks(rows, B * H * key.shape[2] // 4):
        r = rows[blk]
        k_lo, k_hi = _key_range(vis, r)
        q = query[:, :, blk].float()
        k = repeat_kv(key[:, :, k_lo:k_hi], n_rep).float()
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if bias is not None:
            s = s + bias_block(bias, r, k_lo, k_hi)
        s = s.masked_fill(~vis.grid(r, k_lo, k_hi)[:, None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        v = repeat_kv(value[:, :, k_lo:k_hi], n_rep).float()
        outs.append(torch.matmul(p, v).to(value.dtype if value.dtype.is_floating_point else torch.float32))
        lses.append(lse)
    return torch.cat(outs, dim=2), (torch.cat(lses, dim=2) if need_lse else None)


# ----------------------------------------------------------------------------- FlexAttention

_BLOCK_MASKS: OrderedDict = OrderedDict()  # (visibility, shapes, rows) -> BlockMask, small LRU
_BLOCK_MASK_CACHE = 16


# Devices on which FlexAttention and its block masks run compiled (fused, block-sparse). On CPU,
# compiled FlexAttention refuses the LSE (torch 2.13), so it runs uncompiled there; the tests
# add "cpu" here to check that the masks and score mods trace and compile.
COMPILED_DEVICES = {"cuda"}


@functools.lru_cache(maxsize=None)
def _compiled():
    """(flex_attention, create_block_mask), each compiled once for the process."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # FlexAttention compiles once per shape and layer kind (a window is a constant); a sweep
    # uses a few lengths x layer kinds, more than dynamo's default of 8 per function.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask)


@functools.lru_cache(maxsize=None)
def _softcap_mod(cap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return score_mod


def block_mask(vis: Visibility, batch: int, n_queries: int, n_keys: int, device,
               rows: torch.Tensor | None, rows_key=None):
    """FlexAttention BlockMask for `vis` (rows: query index -> row, None = identity).

    Cached (a small LRU keyed by the rule, the shapes and the rows) so every layer of a forward,
    and every forward of the same length, reuses one mask; on CUDA it is built compiled, which
    never materialises the T x S mask.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = device.type in COMPILED_DEVICES
    if compiled:
        create_block_mask = _compiled()[1]  # never materialises the Q x S mask
    key = (vis.cache_key(), batch, n_queries, n_keys, str(device), rows_key)
    hit = _BLOCK_MASKS.get(key) if compiled and (rows is None or rows_key is not None) else None
    if hit is not None:
        _BLOCK_MASKS.move_to_end(key)
        return hit[0]

    if rows is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return vis(b, q_idx, kv_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return vis(b, rows[q_idx], kv_idx)

    per_batch = vis.mask is not None
    bm = create_block_mask(mask_mod, batch if per_batch else None, None, n_queries, n_keys,
                           device=device)
    if compiled:
        # the entry holds the tensors its key names by id, so no id is reused while cached
        _BLOCK_MASKS[key] = (bm, vis, rows)
        while len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE:
            _BLOCK_MASKS.popitem(last=False)
    return bm


def _bias_mod(bias: torch.Tensor, rows: torch.Tensor | None, softcap: float | None):
    """score_mod adding an additive score term (after soft-capping, as the models do)."""
    b_one, h_one = bias.shape[0] == 1, bias.shape[1] == 1

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap:
            score = torch.tanh(score / softcap) * softcap
        row = q_idx if rows is None else rows[q_idx]
        return score + bias[0 if b_one else b, 0 if h_one else h, row, kv_idx]

    return score_mod


def flex(query, key, value, scale, vis, rows, softcap, need_lse, *, rows_key=None,
         precision: str | None = None, bias: torch.Tensor | None = None):
    """FlexAttention: compiled on CUDA; uncompiled elsewhere, in query chunks (it then
    materialises each chunk's scores). rows None = every row of the call, in order.
    `precision` sets the fp32 matmul mode of the compiled kernel ('ieee' or 'tf32')."""
    from torch.nn.attention.flex_attention import flex_attention

    if vis.indices is not None:
        raise KernelUnavailable("FlexAttention is not given sparse selections (kernels.choose)")
    B, H, Q, _ = query.shape
    S = key.shape[2]
    kwargs = dict(scale=scale, enable_gqa=H != key.shape[1],
                  score_mod=_softcap_mod(float(softcap)) if softcap else None)
    if bias is not None:
        kwargs["score_mod"] = _bias_mod(bias.float(), rows, softcap)
    if query.device.type in COMPILED_DEVICES:
        fn = _compiled()[0]
        if precision == "tf32" and query.dtype == torch.float32:
            # fp32 matmuls default to IEEE (torch's "highest" matmul precision); ask only for TF32
            kwargs["kernel_options"] = {"FLOAT32_PRECISION": "'tf32'"}
        bm = block_mask(vis, B, Q, S, query.device, rows, rows_key)
        return _call_flex(fn, query, key, value, bm, need_lse, kwargs)
    if rows is None:
        rows = torch.arange(Q, device=query.device)
    outs, lses = [], []
    for blk in _blocks(rows, B * H * S // 2):
        r = rows[blk]
        bm = block_mask(vis, B, len(r), S, query.device, r)
        kw = kwargs if bias is None else dict(kwargs, score_mod=_bias_mod(bias.float(), r, softcap))
        with warnings.catch_warnings():  # "called without torch.compile": intended here
            warnings.simplefilter("ignore", UserWarning)
            out, lse = _call_flex(flex_attention, query[:, :, blk], key, value, bm, need_lse, kw)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), (torch.cat(lses, dim=2) if need_lse else None)


def _call_flex(fn, q, k, v, bm, need_lse, kwargs):
    if not need_lse:
        return fn(q, k, v, block_mask=bm, **kwargs), None
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        out, lse = fn(q, k, v, block_mask=bm, return_lse=True, **kwargs)
        return out, lse.float()
    out, aux = fn(q, k, v, block_mask=bm, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse.float()
