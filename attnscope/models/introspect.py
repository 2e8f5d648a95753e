"""Read a loaded model's attention layout and RoPE base off its modules and config.

What the config declares and what the instantiated modules do can differ (OlmPool's flat
``rope_theta`` on ``olmo3``; SWA configs without ``layer_types``); these functions report
both sides so that a check can compare them.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from collections.abc import Mapping
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnscope.errors import UnsupportedModelError

__all__ = ["LayerInfo", "attention_layout", "effective_rope_theta", "declared_rope_theta", "olmpool_window_pattern"]

_ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
_RECURRENT_NAMES = ("linear_attn", "mamba", "mixer", "ssm", "recurrent", "conv", "rwkv")
_RECURRENT_TYPES = ("linear_attention", "mamba", "conv", "recurrent", "rwkv", "ssm")


@dataclass(frozen=True)
class LayerInfo:
    """One decoder layer as attnscope sees it.

    ``sliding_window`` is the declared window (None = full attention, or a window the model's
    own attention call passes at run time); ``window_assumed`` is True when an OlmPool
    checkpoint's config gives a window but no ``layer_types``, so the OlmPool pattern
    (layer i full iff (i+1) % 4 == 0) was assumed (the known checkpoint defect: docs/olmpool.md). ``qk_norm`` is read off the modules:
    a q_norm weight of num_heads*head_dim elements is layerwise, of head_dim headwise.
    """

    index: int
    kind: str  # 'attention' | 'recurrent' | 'other'
    layer_type: str | None  # config.layer_types[index], if the config has it
    sliding_window: int | None
    window_assumed: bool
    qk_norm: str | None  # 'none' | 'layerwise' | 'headwise' | 'unknown'; None off attention layers
    n_heads: int | None
    n_kv_heads: int | None
    head_dim: int | None
    module: str  # dotted path of the layer in the model


def olmpool_window_pattern(n_layers: int) -> list[bool]:
    """OlmPool SWA pattern: 3 sliding layers then 1 full; True where layer i slides."""
    return [(i + 1) % 4 != 0 for i in range(n_layers)]


def text_config(model):
    """The config of the model's text decoder (a multimodal model's `text_config`)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .config; pass a transformers model.")
    return getattr(cfg, "get_text_config", lambda: cfg)() or cfg


_config = text_config  # the name the rest of this module and doctor use


def _decoder_layers(model) -> tuple[str, list]:
    import torch.nn as nn

    cfg = _config(model)
    n = config_value(cfg, "num_hidden_layers")
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name.split(".")[-1] in ("layers", "h", "blocks", "layer"):
            if n is None or len(mod) == n:
                return name, list(mod)
            best = best or (name, list(mod))
    if best:
        return best
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__} (no ModuleList named layers/h/blocks)."
    )


def decoder_layers(model) -> list | None:
    """The text decoder's layer modules in order, or None where they cannot be found."""
    try:
        return _decoder_layers(model)[1]
    except UnsupportedModelError:
        return None


def _child(layer, names):
    for n in names:
        mod = getattr(layer, n, None)
        if mod is not None:
            return n, mod
    return None, None


def _qk_kind(attn, n_heads, head_dim) -> str:
    norm = None
    for n in ("q_norm", "query_norm", "q_layernorm", "q_ln"):
        norm = getattr(attn, n, None)
        if norm is not None:
            break
    if norm is None:
        return "none"
    w = getattr(norm, "weight", None)
    if w is None:
        return "unknown"
    size = w.numel()
    if head_dim and n_heads and size == n_heads * head_dim and n_heads > 1:
        return "layerwise"
    if head_dim and size == head_dim:
        return "headwise"
    return "unknown"


def config_value(cfg, name: str, default=None):
    """A config attribute, or `default` where it is absent or per-layer (transformers' ragged
    configs, dots3, raise on a global read of an attribute that varies by layer)."""
    try:
        return getattr(cfg, name, default)
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError and kin
        return default


def _heads(attn, cfg) -> tuple[int | None, int | None, int | None]:
    head_dim = getattr(attn, "head_dim", None) or config_value(cfg, "head_dim")
    if head_dim is None and config_value(cfg, "num_attention_heads") and config_value(cfg, "hidden_size"):
        head_dim = cfg.hidden_size // cfg.num_attention_heads
    n_heads = n_kv = None
    q, k = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
    if head_dim and q is not None and hasattr(q, "out_features"):
        n_heads = q.out_features // head_dim
    if head_dim and k is not None and hasattr(k, "out_features"):
        n_kv = k.out_features // head_dim
    n_heads = n_heads or getattr(attn, "num_heads", None) or config_value(cfg, "num_attention_heads")
    if n_kv is None:
        groups = getattr(attn, "num_key_value_groups", None)
        n_kv = (n_heads // groups) if (groups and n_heads) else config_value(cfg, "num_key_value_heads", n_heads)
    return n_heads, n_kv, head_dim


def attention_layout(model) -> list[LayerInfo]:
    """Describe every decoder layer of a loaded model: kind, declared window, QK norm, heads."""
    cfg = _config(model)
    prefix, layers = _decoder_layers(model)
    layer_types = config_value(cfg, "layer_types")
    window = config_value(cfg, "sliding_window")
    if config_value(cfg, "use_sliding_window", True) is False:  # qwen2/3 carry a window they do not use
        window = None
    # Which layers of a config with a window but no layer_types slide is known only for OlmPool's
    # own classes (3 local : 1 global); any other family applies its window through its mask
    # and the `sliding_window=` argument of its attention call, read at run time.
    from attnscope.models.olmpool import custom_model_types

    assumed = bool(window) and not layer_types and getattr(cfg, "model_type", None) in custom_model_types()
    pattern = olmpool_window_pattern(len(layers)) if assumed else None
    out = []
    for i, layer in enumerate(layers):
        ltype = layer_types[i] if layer_types and i < len(layer_types) else None
        _, attn = _child(layer, _ATTN_NAMES)
        rec_name, rec = _child(layer, _RECURRENT_NAMES)
        if (ltype in _RECURRENT_TYPES) or (attn is None and rec is not None):
            kind = "recurrent"
        elif attn is not None:
            kind = "attention"
        else:
            kind = "other"
        sw = None
        if kind == "attention" and window:
            if layer_types:
                sw = int(window) if ltype == "sliding_attention" else None
            elif assumed:
                sw = int(window) if pattern[i] else None
        if kind == "attention":
            n_heads, n_kv, head_dim = _heads(attn, cfg)
            qk = _qk_kind(attn, n_heads, head_dim)
        else:
            n_heads = n_kv = head_dim = None
            qk = None
        out.append(LayerInfo(index=i, kind=kind, layer_type=ltype, sliding_window=sw,
                             window_assumed=assumed and kind == "attention", qk_norm=qk,
                             n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, module=f"{prefix}.{i}"))
    return out


@lru_cache(maxsize=None)
def _calls_interface(cls) -> bool:
    """Does this module class's forward look its attention up in transformers' AttentionInterface
    (`ALL_ATTENTION_FUNCTIONS`), the one route through which attnscope sees attention?"""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src


@lru_cache(maxsize=None)
def _attention_class_table(module_name: str) -> str | None:
    """The name of a fixed table of attention classes keyed by implementation name in a
    modelling file (`FALCON_ATTENTION_CLASSES = {"eager": ..., "sdpa": ...}`), or None: such a
    family builds its attention from the table and cannot run a registered function."""
    try:
        src = inspect.getsource(sys.modules[module_name])
    except (OSError, TypeError, KeyError):
        return None
    found = re.search(r"^([A-Z0-9_]+_ATTENTION_CLASSES)\s*=\s*\{", src, re.M)
    return found.group(1) if found else None


def attention_route_problem(model) -> str | None:
    """Why attnscope cannot see this model's attention, or None when every attention layer of
    its decoder goes through transformers' AttentionInterface.

    Read off the module classes (a model built on the meta device is enough: no weights), so
    `attnscope.load` refuses before loading weights. Reasons: a fixed table of attention classes
    (falcon, gpt_neo, gptj, git); no decoder layer calling the interface: no softmax attention
    at all (mamba, rwkv, xlstm) or attention computed by the model itself (bloom, codegen, xglm,
    mpt, openai-gpt...).
    """
    types = config_value(_config(model), "layer_types") or ()
    compressed = sorted({t for t in types if "compress" in str(t)})
    if compressed:  # DeepSeek-V4: summary slots appended to the keys, which are not tokens
        return (f"its {', '.join(compressed)} layers attend to compressed KV entries that are not "
                "tokens of the input")
    for name in sorted({type(m).__module__ for m in model.modules()}):
        table = _attention_class_table(name)
        if table:
            return f"it builds attention from a fixed table of classes ({table}), not AttentionInterface"
    try:  # the text decoder's layers (a vision or audio tower may use the interface on its own)
        modules = [m for layer in _decoder_layers(model)[1] for m in layer.modules()]
    except UnsupportedModelError:
        modules = list(model.modules())
    if not any(_calls_interface(type(m)) for m in modules):
        return ("no decoder layer calls transformers' AttentionInterface (it has no softmax "
                "attention, or computes attention itself)")
    return None


def check_supported(model, name: str | None = None) -> None:
    """Refuse (UnsupportedModelError, one line naming the family and the reason) a model whose
    attention attnscope cannot see; see `attention_route_problem`. Runs before any forward."""
    problem = attention_route_problem(model)
    if problem:
        family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise UnsupportedModelError(
            f"{name or family} ({family}): {problem}; attnscope measures attention only through "
            "that interface and refuses rather than report wrong numbers (docs/families.md)")


def effective_rope_theta(model) -> float | dict[str, float]:
    """The RoPE base the instantiated model really uses, read off its inverse frequencies.

    inv_freq[k] = theta^(-2k/dim) with dim = 2*len(inv_freq), so theta = inv_freq[1]^(-dim/2).
    Returns a float when the model has one set of frequencies, else a dict keyed by layer type
    (``olmo3``: ``full_attention``/``sliding_attention``) or by buffer path.
    """
    found: dict[str, float] = {}
    for name, buf in model.named_buffers():
        leaf = name.split(".")[-1]
        if not leaf.endswith("inv_freq") or "original" in leaf or buf.numel() < 2 or buf.is_meta:
            continue
        f1 = float(buf.detach().double().flatten()[1])
        if f1 <= 0:
            continue
        theta = f1 ** (-float(buf.numel()))
        key = leaf[: -len("_inv_freq")] if leaf != "inv_freq" else name
        found[key] = theta
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary inverse-frequency buffer (inv_freq): it does not use RoPE "
            "or computes it on the fly, so its effective theta cannot be read."
        )
    if len(found) == 1:
        return next(iter(found.values()))
    # per-layer copies of one rotary module: collapse when they agree
    vals = list(found.values())
    if all(abs(v - vals[0]) <= 1e-6 * abs(vals[0]) for v in vals) and not any(
        k.endswith("_attention") for k in found
    ):
        return vals[0]
    return found


def _theta_from_params(params: Any) -> float | dict[str, float] | None:
    if not isinstance(params, Mapping):
        return None
    if "rope_theta" in params:
        return float(params["rope_theta"])
    per_type = {k: float(v["rope_theta"]) for k, v in params.items() if isinstance(v, Mapping) and "rope_theta" in v}
    return per_type or None


def declared_rope_theta(config) -> float | dict[str, float] | None:
    """The RoPE base a configuration declares.

    ``config`` may be a transformers config (what transformers resolved when loading: its
    ``rope_parameters``, or a ``rope_theta`` attribute on older/remote configs), or the raw
    config.json as a dict, a path to it, or a checkpoint folder (what the file says: a flat
    ``rope_theta`` gives a float). Per-layer-type parameters give a dict. None if no theta.
    """
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        if p.is_dir():
            p = p / "config.json"
        config = json.loads(p.read_text(encoding="utf-8"))
    if isinstance(config, Mapping):
        got = _theta_from_params(config.get("rope_parameters"))
        if got is None and "rope_theta" in config:
            got = float(config["rope_theta"])
        return got
    got = _theta_from_params(getattr(config, "rope_parameters", None))
    if got is None and getattr(config, "rope_theta", None) is not None:
        got = float(config.rope_theta)
    return got
