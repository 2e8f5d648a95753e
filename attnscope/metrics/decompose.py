"""Score decomposition: one attention score as an exact sum over head dimensions and over the
rotary (RoPE) frequency pairs, and the few dimensions that carry it (docs/drilldown.md).

For query position i, key position j, query head h (key head h // n_rep under GQA) of layer l,
with the post-RoPE, post-QK-norm q_i and k_j the layer's kernel received:

    s_ij = scale * q_i . k_j = sum_d c_d,            c_d = scale * q_i[d] * k_j[d]
         = sum_p C_p + sum_{d unrotated} c_d,        C_p = c_a + c_b for the rotary pair p = (a, b)

(a soft-capping model then applies tanh(s / cap) * cap; the sum is over the raw score). The
contrast with the average key the query sees,

    s_ij - mean_{j' visible} s_ij' = sum_d scale * q_i[d] * (k_j[d] - kbar[d]),

says which dimensions make key j stand out (for a sink key: which dimensions carry the sink).

The rotary layout is read from the layer itself, not assumed (`rope_layout`): the layer's own
attention module is run on one fixed input at positions 0, 1, 8, 64, ...; the post-RoPE queries
at position t are a linear map of those at position 0, Q_t = Q_0 M_t, solved by least squares.
M_t's non-zero pattern gives the pairs (Llama's `rotate_half` pairs d with d + D/2, GPT-J's
interleaved layout pairs 2m with 2m + 1; partial rotary leaves some dimensions fixed),
its 2 x 2 blocks give each pair's angle and so its frequency. When M_t is not a set of 2-D
rotations and fixed dimensions, or does not reproduce the keys too, the layout is unknown and
the pair view is refused (`rope="none"` still gives the per-dimension sum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from attnscope.capture.interface import LayerAttention, capture, kernel_settings
from attnscope.errors import AttnscopeError

__all__ = ["RopeLayout", "RopeLayoutUnknown", "ScoreDecomposition", "decompose_score", "rope_layout",
           "carriers", "ROPE_MODES", "DEFAULT_SHARE"]

ROPE_MODES = ("auto", "none")
DEFAULT_SHARE = 0.8  # carriers: the fewest terms that hold this share of sum |c|
_PROBE_POSITIONS = (1, 8, 64, 512, 4096, 32768)
_SUPPORT = 1e-5  # |M_t[a, b]| above this: dims a and b move together (fp32 noise is ~1e-7)


class RopeLayoutUnknown(AttnscopeError):
    """The layer's rotary layout could not be read (or is not a set of 2-D rotations)."""


class _Stop(Exception):
    """Raised by an observer to end a forward once the layer it needs has been seen."""


@dataclass
class RopeLayout:
    """Which head dimensions rotate together, and how fast, in one layer."""

    kind: str  # "half" (rotate_half), "interleaved" (GPT-J), "pairs" (another pairing), "none"
    pairs: np.ndarray  # int [P, 2] (a, b): dims rotated together, a < b, ordered by frequency index
    omega: np.ndarray  # float [P] radians per token of each pair
    unrotated: np.ndarray  # int [U] dims no position rotates
    head_dim: int
    max_residual: float  # worst relative residual of Q_t = Q_0 M_t (queries and keys)
    positions: tuple[int, ...]  # positions the layout was read at
    notes: list[str] = field(default_factory=list)

    @property
    def wavelength(self) -> np.ndarray:
        """Tokens per full turn of each pair: 2 pi / omega."""
        with np.errstate(divide="ignore"):
            return 2 * np.pi / self.omega


# ------------------------------------------------------------------------------ reading the layout
class _QKProbe:
    """Observer: the query and key of one layer, then stop the forward."""

    needs_lse = False

    def __init__(self, layer: int):
        self.layer = layer
        self.q = self.k = None

    def wants(self, layer: int) -> bool:
        return layer == self.layer

    def observe(self, attn: LayerAttention) -> None:
        self.q = attn.query[0].detach().double().cpu()  # [H, n, d]
        self.k = attn.key[0].detach().double().cpu()  # [KVH, n, d]
        raise _Stop


def attention_module(hf_model, layer: int):
    """The attention module of `layer` (the one whose calls reach attnscope's attention function)."""
    from attnscope.capture.interface import index_layers

    index_layers(hf_model)
    for m in hf_model.modules():
        idx = getattr(m, "layer_idx", getattr(m, "_attnscope_layer", None))
        if idx == layer and type(m).__name__.endswith("Attention"):
            return m
    raise AttnscopeError(f"layer {layer} has no attention module that attnscope can read "
                         "(a linear-attention layer of a hybrid model has no softmax scores)")


def _probe(hf_model, layer: int, x: torch.Tensor, position: int):
    """Post-RoPE (q, k) of `layer` when its attention input is `x` [1, n, hidden] at `position`."""
    module = attention_module(hf_model, layer)

    def replace(mod, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": x}
        else:
            args = (x,) + tuple(args[1:])
        return args, kwargs

    n = x.shape[1]
    dev = next(hf_model.parameters()).device
    ids = torch.zeros((1, n), dtype=torch.long, device=dev)
    pos = torch.full((1, n), position, dtype=torch.long, device=dev)
    probe = _QKProbe(layer)
    handle = module.register_forward_pre_hook(replace, with_kwargs=True)
    decoder = getattr(hf_model, "base_model", hf_model)
    try:
        with torch.no_grad(), kernel_settings("reference"), capture(hf_model, probe):
            try:
                decoder(input_ids=ids, position_ids=pos, use_cache=False)
            except _Stop:
                pass
    except Exception as exc:  # any failure of a call we shaped ourselves: layout unknown
        raise RopeLayoutUnknown(f"could not run layer {layer}'s attention on a probe input "
                                f"({type(exc).__name__}: {exc})") from None
    finally:
        handle.remove()
    if probe.q is None:
        raise RopeLayoutUnknown(f"layer {layer} produced no attention call on the probe input")
    return probe.q, probe.k


def _solve(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, float]:
    """M with b = a M (rows: vectors), and the relative residual."""
    M = torch.linalg.lstsq(a, b).solution
    res = float(torch.linalg.norm(a @ M - b) / torch.linalg.norm(b).clamp_min(1e-300))
    return M.numpy(), res


def rope_layout(hf_model, layer: int, *, tol: float = 1e-4) -> RopeLayout:
    """Read the rotary layout of `layer` from the layer's own forward (see the module docstring).
    Raises RopeLayoutUnknown when the position dependence is not 2-D rotations of fixed pairs.
    Positions: 1, 8, 64, ... up to the model's last position (the slowest pair turns by a
    measurable angle there). Needs float32 weights (bf16 rounding hides the slowest pairs)."""
    config = hf_model.config
    dtype = next(hf_model.parameters()).dtype
    if dtype != torch.float32:
        raise RopeLayoutUnknown(f"the rotary layout is read in float32 only (this model is {str(dtype)[6:]}): "
                                "load it with dtype='float32' (CLI --dtype float32), or skip the pair view "
                                "with rope='none' (CLI --rope none)")
    hidden = int(getattr(config, "hidden_size"))
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 32769)
    positions = tuple(sorted({t for t in _PROBE_POSITIONS if t < max_pos} | {max_pos - 1}))
    gen = torch.Generator().manual_seed(0)
    q0, k0 = None, None
    dev = next(hf_model.parameters()).device
    d = None
    maps, worst = {}, 0.0
    for t in (0,) + positions:
        if q0 is None:
            # enough rows that the queries of all heads span the head dimension
            n = 0
            while True:
                n = 2 * n or 96
                x = torch.randn((1, n, hidden), generator=gen).to(dev, dtype)
                q0, k0 = _probe(hf_model, layer, x, 0)
                d = q0.shape[-1]
                A = q0.reshape(-1, d)
                if torch.linalg.matrix_rank(A) == d or n >= 8 * d:
                    break
            if torch.linalg.matrix_rank(q0.reshape(-1, d)) < d:
                raise RopeLayoutUnknown(f"layer {layer}'s queries do not span the {d} head dimensions on "
                                        "random inputs; the layout cannot be read")
            continue
        qt, kt = _probe(hf_model, layer, x, t)
        M, rq = _solve(q0.reshape(-1, d), qt.reshape(-1, d))
        # the keys must rotate by the same map
        rk = float(torch.linalg.norm(k0.reshape(-1, d) @ torch.from_numpy(M) - kt.reshape(-1, d))
                   / torch.linalg.norm(kt).clamp_min(1e-300))
        worst = max(worst, rq, rk)
        if rq > tol or rk > tol:
            raise RopeLayoutUnknown(
                f"layer {layer}: queries/keys at position {t} are not one linear map of those at position 0 "
                f"(relative residual {max(rq, rk):.1e}); the position encoding is not a rotation attnscope can read")
        maps[t] = M
    return _pairs_from_maps(maps, d, worst, positions, layer, tol)


def _pairs_from_maps(maps: dict[int, np.ndarray], d: int, worst: float, positions, layer: int,
                     tol: float) -> RopeLayout:
    support = np.zeros((d, d), dtype=bool)
    for M in maps.values():
        support |= np.abs(M) > _SUPPORT
    np.fill_diagonal(support, False)
    partners = [np.flatnonzero(support[i] | support[:, i]) for i in range(d)]
    pairs, fixed = [], []
    for i in range(d):
        p = partners[i]
        if len(p) == 0:
            fixed.append(i)
        elif len(p) == 1 and list(partners[p[0]]) == [i]:
            if i < p[0]:
                pairs.append((i, int(p[0])))
        else:
            raise RopeLayoutUnknown(f"layer {layer}: dimension {i} mixes with {p.tolist()} under a position "
                                    "shift; rotary pairs must be 2-D")
    for i in fixed:  # an unrotated dimension keeps its value at every position
        for t, M in maps.items():
            if abs(M[i, i] - 1) > tol:
                raise RopeLayoutUnknown(f"layer {layer}: dimension {i} is scaled by {M[i, i]:.4g} at position {t}")
    pairs_arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    omega = np.zeros(len(pairs_arr))
    for n, (a, b) in enumerate(pairs_arr):
        est = None
        for t in sorted(maps):
            block = maps[t][np.ix_([a, b], [a, b])]
            if abs(np.linalg.det(block) - 1) > 10 * tol:
                raise RopeLayoutUnknown(f"layer {layer}: dims ({a}, {b}) do not rotate rigidly at position {t} "
                                        f"(det {np.linalg.det(block):.4g})")
            angle = math.atan2(abs(block[0, 1]), block[0, 0])  # in [0, pi]
            if est is None:
                est = angle / t
            elif est * t < 2.5:  # still within the first half-turn: a longer lever, a finer estimate
                est = angle / t
        omega[n] = est
    rot = 2 * len(pairs_arr)
    kind = "none"
    if len(pairs_arr):
        dims = np.sort(pairs_arr.ravel())
        r0 = int(dims[0])
        if (dims == np.arange(r0, r0 + rot)).all() and (pairs_arr[:, 1] - pairs_arr[:, 0] == rot // 2).all():
            kind = "half"
        elif (pairs_arr[:, 1] - pairs_arr[:, 0] == 1).all() and (pairs_arr[:, 0] % 2 == r0 % 2).all():
            kind = "interleaved"
        else:
            kind = "pairs"
    notes = []
    if kind != "none" and rot < d:
        notes.append(f"partial rotary: {rot} of {d} dims rotate")
    return RopeLayout(kind, pairs_arr, omega, np.asarray(fixed, dtype=np.int64), d, worst,
                      tuple(sorted(maps)), notes)


# ------------------------------------------------------------------------------ the decomposition
def carriers(values: np.ndarray, share: float = DEFAULT_SHARE) -> np.ndarray:
    """Indices of the fewest terms whose |values|, taken largest first, reach `share` of
    sum |values| (ties: lower index first)."""
    a = np.abs(np.asarray(values, dtype=np.float64))
    total = a.sum()
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(len(a)), -a))
    n = int(np.searchsorted(np.cumsum(a[order]), share * total * (1 - 1e-12)) + 1)
    return order[:min(n, len(a))]


@dataclass
class ScoreDecomposition:
    """One attention score split exactly over head dimensions and rotary pairs."""

    model: str
    layer: int
    head: int
    kv_head: int
    query: int  # token position
    key: int  # token position
    query_token: str
    key_token: str
    scale: float
    softcap: float | None
    q: np.ndarray  # [d] float64 of the kernel's fp32 query
    k: np.ndarray  # [d]
    per_dim: np.ndarray  # [d] c_d = scale q_d k_d
    raw_score: float  # sum_d c_d (before soft-capping)
    score: float  # the score the softmax sees (soft-capped if the model soft-caps), float64
    model_score: float  # the same score as attnscope computes it for the kernel (fp32 matmul)
    lse: float  # the row's log-sum-exp from the fused kernel
    visible: bool
    prob: float  # exp(score - lse) (0 if the key is not visible)
    n_visible: int  # keys the query sees
    mean_key: np.ndarray  # [d] mean of the keys the query sees
    contrast_per_dim: np.ndarray  # [d] scale q_d (k_d - mean_key_d)
    share: float
    carriers: np.ndarray  # dims, largest |c_d| first, holding `share` of sum |c_d|
    contrast_carriers: np.ndarray
    rope: RopeLayout | None
    rope_note: str = ""
    kernel: str = ""

    @property
    def contrast(self) -> float:
        """score - mean score over the visible keys (raw, before soft-capping)."""
        return float(self.contrast_per_dim.sum())

    @property
    def per_pair(self) -> np.ndarray | None:
        """[P] C_p = c_a + c_b per rotary pair (ordered as rope.pairs)."""
        if self.rope is None:
            return None
        return self.per_dim[self.rope.pairs].sum(-1)

    @property
    def contrast_per_pair(self) -> np.ndarray | None:
        if self.rope is None:
            return None
        return self.contrast_per_dim[self.rope.pairs].sum(-1)

    @property
    def pair_carriers(self) -> np.ndarray | None:
        return None if self.rope is None else carriers(self.per_pair, self.share)

    @property
    def contrast_pair_carriers(self) -> np.ndarray | None:
        return None if self.rope is None else carriers(self.contrast_per_pair, self.share)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every number behind the figure."""
        out = {
            "model": self.model, "layer": self.layer, "head": self.head, "kv_head": self.kv_head,
            "query": self.query, "key": self.key, "query_token": self.query_token, "key_token": self.key_token,
            "scale": self.scale, "softcap": self.softcap, "raw_score": self.raw_score, "score": self.score,
            "model_score": self.model_score, "lse": self.lse, "prob": self.prob, "visible": self.visible,
            "n_visible": self.n_visible, "contrast": self.contrast, "share": self.share,
            "per_dim": self.per_dim.tolist(), "contrast_per_dim": self.contrast_per_dim.tolist(),
            "carriers": self.carriers.tolist(), "contrast_carriers": self.contrast_carriers.tolist(),
            "q": self.q.tolist(), "k": self.k.tolist(), "kernel": self.kernel, "rope_note": self.rope_note,
        }
        if self.rope is not None:
            r = self.rope
            out["rope"] = {"kind": r.kind, "pairs": r.pairs.tolist(), "omega": r.omega.tolist(),
                           "unrotated": r.unrotated.tolist(), "max_residual": r.max_residual,
                           "positions": list(r.positions), "notes": r.notes,
                           "per_pair": self.per_pair.tolist(), "contrast_per_pair": self.contrast_per_pair.tolist(),
                           "pair_carriers": self.pair_carriers.tolist(),
                           "contrast_pair_carriers": self.contrast_pair_carriers.tolist()}
        return out


class _ScoreCapture:
    """Observer: q_i, k_j, lse_i, the kernel's score and the visible keys' mean of one layer."""

    needs_lse = True

    def __init__(self, layer: int, head: int, query: int, key: int):
        self.layer, self.head, self.query, self.key = layer, head, query, key
        self.got: dict[str, Any] | None = None

    def wants(self, layer: int) -> bool:
        return layer == self.layer

    def observe(self, attn: LayerAttention) -> None:
        b, h = 0, self.head
        start = int(attn.row_starts[b])
        row = self.query + start - attn.q_offset
        j = self.key + start - attn.key_start
        rows = torch.tensor([row], device=attn.query.device)
        S = attn.key.shape[2]
        kvh = h // attn.n_rep
        vis_all = attn.visible(rows, 0, S)[b, 0]  # [S]
        keys = attn.key[b, kvh].double()
        self.got = {
            "q": attn.query[b, h, row].double().cpu().numpy(),
            "k": keys[j].cpu().numpy(),
            "lse": float(attn.lse[b, h, row]),
            "scale": float(attn.scale),
            "softcap": attn.softcap,
            "model_score": float(attn.scores(b, rows, slice(j, j + 1))[h, 0, 0]),
            "visible": bool(vis_all[j]),
            "n_visible": int(vis_all.sum()),
            "mean_key": keys[vis_all].mean(0).cpu().numpy(),
            "kv_head": kvh,
            "kernel": attn.kernel,
            "has_bias": attn.bias is not None,
        }
        raise _Stop


def decompose_score(model, text: str | None = None, *, layer: int, head: int, query: int, key: int = 0,
                    token_ids=None, tokenizer=None, rope: str = "auto", share: float = DEFAULT_SHARE,
                    max_tokens: int | None = None, kernel: str = "auto") -> ScoreDecomposition:
    """Split the score of (layer, head, query position, key position) exactly over head
    dimensions and rotary frequency pairs, with the dimensions that carry it.

    rope: "auto" reads the layer's rotary layout from its own forward and refuses (an error)
    where it cannot; "none" skips the pair view (per-dimension terms only).
    """
    from attnscope.metrics.analyze import _resolve, _tokenize, model_depth, model_heads
    from attnscope.metrics.drilldown import check_layer_head, check_positions, token_strings

    if rope not in ROPE_MODES:
        raise AttnscopeError(f"rope must be one of {', '.join(ROPE_MODES)}, not {rope!r}")
    if not 0 < share <= 1:
        raise AttnscopeError(f"share must be in (0, 1], got {share!r}")
    source = _resolve(model, tokenizer, None)
    hf_model, tokenizer = source.hf_model, source.tokenizer
    seqs = _tokenize(tokenizer, text, token_ids, max_tokens)
    if len(seqs) != 1:
        raise AttnscopeError("decompose_score takes one text (or one sequence of token ids)")
    ids = seqs[0]
    check_layer_head([layer], [head], model_depth(hf_model), model_heads(hf_model))
    check_positions([query], len(ids), "query")
    check_positions([key], len(ids), "key")
    if key > query:
        raise AttnscopeError(f"key position {key} is after query position {query}: a causal model's query "
                             "never sees later keys")
    cap = _ScoreCapture(layer, head, query, key)
    dev = next(hf_model.parameters()).device
    decoder = getattr(hf_model, "base_model", hf_model)
    with torch.no_grad(), kernel_settings(kernel), capture(hf_model, cap):
        try:
            decoder(input_ids=torch.tensor([ids], device=dev), use_cache=False)
        except _Stop:
            pass
    if cap.got is None:
        raise AttnscopeError(f"layer {layer} made no attention call through attnscope (a linear-attention "
                             "layer of a hybrid model has no softmax scores)")
    g = cap.got
    if g["has_bias"]:
        raise AttnscopeError(f"layer {layer} adds a score term to q.k (a position bias or a float mask): "
                             "its score is not a sum over head dimensions, so it is not decomposed")
    layout, note = None, "pairs not computed (rope='none')"
    if rope == "auto":
        layout = rope_layout(hf_model, layer)
        note = (f"layout read from layer {layer}'s forward at positions {list(layout.positions)}: "
                f"{layout.kind}, {len(layout.pairs)} pairs, {len(layout.unrotated)} unrotated dims")
        if layout.kind == "none":
            note += " (this layer applies no rotary position encoding)"
    per_dim = g["scale"] * g["q"] * g["k"]
    raw = float(per_dim.sum())
    score = raw if not g["softcap"] else math.tanh(raw / g["softcap"]) * g["softcap"]
    contrast = g["scale"] * g["q"] * (g["k"] - g["mean_key"])
    tokens = token_strings(tokenizer, [ids[query], ids[key]])
    return ScoreDecomposition(
        model=source.name, layer=layer, head=head, kv_head=g["kv_head"], query=query, key=key,
        query_token=tokens[0], key_token=tokens[1], scale=g["scale"], softcap=g["softcap"], q=g["q"], k=g["k"],
        per_dim=per_dim, raw_score=raw, score=score, model_score=g["model_score"], lse=g["lse"],
        visible=g["visible"], prob=math.exp(score - g["lse"]) if g["visible"] else 0.0,
        n_visible=g["n_visible"], mean_key=g["mean_key"], contrast_per_dim=contrast, share=share,
        carriers=carriers(per_dim, share), contrast_carriers=carriers(contrast, share), rope=layout,
        rope_note=note, kernel=g["kernel"])
