"""Where `analyze()` gets its attention from: attnscope's own function, TransformerLens, nnsight.

Every backend ends in the same place: it hands `LayerAttention` objects (post-RoPE query, key,
row log-sum-exp, visibility rule) to the observer `analyze()` built (a `StatsRecorder`), so every
metric comes from the one implementation in `attnscope.metrics.reductions` and every backend
returns the same `xarray.Dataset`.

- native (default for a `LoadedModel` or a transformers model): attnscope's registered attention
  function, streaming, O(T) extra memory per layer.
- transformer_lens (default for a `TransformerBridge`): forward hooks on the bridge's
  `hook_rot_q`/`hook_rot_k` (or `hook_pattern` where a bridge has no rotary hooks).
- nnsight (default for an nnsight `TransformersModel`/`LanguageModel`): a trace that reads the
  inputs of the attention-interface call inside each attention module's forward.

The peers are optional (`pip install attnscope[tl]`, `attnscope[nnsight]`); nothing here imports
them until a backend that needs them is asked for. See docs/backends.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from attnscope.errors import BackendError

BACKENDS = ("native", "transformer_lens", "nnsight")
_ALIASES = {"tl": "transformer_lens", "transformerlens": "transformer_lens", "hf": "native"}
EXTRAS = {"transformer_lens": ("transformer_lens", "tl", "TransformerLens"),
          "nnsight": ("nnsight", "nnsight", "nnsight")}


@dataclass
class ModelSource:
    """A model ready for `analyze()`: the transformers model behind it and how to run it.

    run(observer, input_ids [B, T], attention_mask [B, T] or None) performs one forward in which
    `observer.observe(LayerAttention)` is called for every attention layer it `wants`.
    """

    hf_model: Any
    tokenizer: Any
    name: str
    revision: str | None
    backend: str
    run: Callable[[Any, torch.Tensor, torch.Tensor | None], None]


def require(backend: str):
    """Import the peer library behind `backend`, or say which extra installs it."""
    module, extra, label = EXTRAS[backend]
    try:
        return __import__(module)
    except ImportError as exc:
        raise BackendError(
            f"backend {backend!r} needs {label}, which is not installed ({exc}); "
            f"install it with: pip install 'attnscope[{extra}]'") from None


def kind_of(model) -> str:
    """'transformer_lens', 'nnsight', 'loaded' or 'transformers', from the object's classes.

    Decided from class names and modules, so that recognising a model never imports a peer.
    """
    from attnscope.models.loading import LoadedModel

    if isinstance(model, LoadedModel):
        return "loaded"
    for cls in type(model).__mro__:
        mod = cls.__module__ or ""
        if mod.startswith("transformer_lens") and cls.__name__ in ("TransformerBridge", "BridgeCore"):
            return "transformer_lens"
        if mod.startswith("nnsight") and cls.__name__ == "Envoy":
            return "nnsight"
    return "transformers"


def rewritten_by_bridge(hf_model) -> bool:
    """True when `TransformerBridge.boot_transformers` rewrote this transformers model in place
    (its attention modules are TransformerLens components)."""
    return any((type(m).__module__ or "").startswith("transformer_lens") for m in hf_model.modules())


def _check_not_bridged(hf_model) -> None:
    if rewritten_by_bridge(hf_model):
        raise BackendError(
            "this transformers model was rewritten in place by TransformerBridge.boot_transformers: "
            "its attention modules are TransformerLens's and no longer call transformers' attention "
            "function. Analyse the bridge itself, or boot the bridge on a copy "
            "(hf_model=copy.deepcopy(lm.model)) and keep the original for the native and nnsight backends")


def _normalise(backend: str | None, kind: str) -> str:
    if backend is None:
        return kind if kind in ("transformer_lens", "nnsight") else "native"
    name = _ALIASES.get(str(backend).lower(), str(backend).lower())
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return name


def resolve(model, tokenizer=None, backend: str | None = None) -> ModelSource:
    """Pick the backend for `model` (a LoadedModel, transformers model, TransformerBridge or
    nnsight model) and return a `ModelSource` that `analyze()` runs.

    backend=None uses the object's own kind: native for LoadedModel / transformers models,
    transformer_lens for a bridge, nnsight for an nnsight model.
    """
    if isinstance(model, ModelSource):
        return model
    kind = kind_of(model)
    name = _normalise(backend, kind)
    if kind == "transformer_lens":
        if name != "transformer_lens":
            raise BackendError(
                f"a TransformerBridge runs only through backend='transformer_lens' (asked: {name!r}): "
                "the bridge replaced the model's attention modules with its own, which no longer "
                "call transformers' attention function; pass the transformers model from before "
                "booting the bridge to use another backend")
        from attnscope.backends.transformer_lens import bridge_source

        return bridge_source(model, tokenizer)
    if kind == "nnsight":
        if name == "transformer_lens":
            raise BackendError(
                "an nnsight model cannot run through backend='transformer_lens'; pass a "
                "TransformerBridge, or use backend='nnsight' or 'native'")
        hf_model = model._module  # the wrapped transformers model
        _check_not_bridged(hf_model)
        tok = tokenizer or getattr(model, "tokenizer", None)
        label = getattr(getattr(hf_model, "config", None), "_name_or_path", type(hf_model).__name__)
        if name == "native":  # an nnsight wrapper is inert outside a trace
            return native_source(hf_model, tok, label, None)
        from attnscope.backends.nnsight import nnsight_source

        return nnsight_source(model, tok, label, None)
    # a LoadedModel or a plain transformers model
    if kind == "loaded":
        hf_model, tok, label, revision = model.model, tokenizer or model.tokenizer, model.name, model.revision
    else:
        hf_model, tok, revision = model, tokenizer, None
        label = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
    _check_not_bridged(hf_model)
    if name == "native":
        return native_source(hf_model, tok, label, revision)
    require(name)
    if name == "transformer_lens":
        from attnscope.backends.transformer_lens import boot_bridge, bridge_source

        def run(observer, input_ids, attention_mask):
            # a bridge on a copy, only for the run: booting one rewrites the model it wraps
            bridge_source(boot_bridge(hf_model, tok, label), tok).run(observer, input_ids, attention_mask)

        src = ModelSource(hf_model, tok, label, revision, "transformer_lens", run)
    else:
        from attnscope.backends.nnsight import nnsight_source, wrap

        def run(observer, input_ids, attention_mask):
            # wrap only for the run, so nothing stays on the user's model if analyze() fails early
            wrapped, undo = wrap(hf_model, tok)
            try:
                nnsight_source(wrapped, tok, label, revision).run(observer, input_ids, attention_mask)
            finally:
                undo()

        src = ModelSource(hf_model, tok, label, revision, "nnsight", run)
    return src


def native_source(hf_model, tokenizer, name, revision) -> ModelSource:
    """attnscope's registered attention function: the streaming path."""
    from attnscope.models.introspect import check_supported

    check_supported(hf_model, name)  # before any forward

    def run(observer, input_ids, attention_mask):
        from attnscope.capture.interface import capture

        decoder = getattr(hf_model, "base_model", hf_model)  # skip the LM head: no T x vocab logits
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            # a left-padded row gets the RoPE positions it would have alone: 0 at its first token
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), capture(hf_model, observer):
            decoder(**kwargs)

    return ModelSource(hf_model, tokenizer, name, revision, "native", run)


def key_padding_mask(attention_mask: torch.Tensor | None, n_queries: int) -> torch.Tensor | None:
    """Bool [B, 1, T, S] 'key is a real token' mask (causality is applied separately)."""
    if attention_mask is None:
        return None
    m = attention_mask.bool()[:, None, None, :]
    return m.expand(-1, 1, n_queries, -1)


def row_lse(attn, chunk_elements: int = 1 << 23) -> torch.Tensor:
    """[B, H, T] float32 log-sum-exp of every query row of `attn` under its visibility rule
    (a learned sink included).

    Peers do not return the LSE of their softmax, so it is recomputed from q and k, in query
    chunks so that memory stays O(chunk x S) rather than O(T x S).
    """
    B, H, T, _ = attn.query.shape
    S = attn.key.shape[2]
    out = torch.empty(B, H, T, dtype=torch.float32, device=attn.query.device)
    chunk = max(1, chunk_elements // max(1, H * S))
    for b in range(B):
        for i0 in range(0, T, chunk):
            rows = torch.arange(i0, min(T, i0 + chunk), device=attn.query.device)
            k_hi = int(rows.max()) + attn.q_offset + 1
            s = attn.scores(b, rows, slice(0, k_hi))
            vis = attn.visible(rows, 0, k_hi)[b]
            lse = torch.logsumexp(s.masked_fill(~vis[None], float("-inf")), -1)
            sink = attn.sink_logits(b, rows)
            out[b, :, i0:i0 + len(rows)] = lse if sink is None else torch.logaddexp(lse, sink)
    return out
