"""OlmPool model shapes without their weights: a randomly initialised model built from a registry
row costs the same FLOPs and memory as the trained checkpoint, so it can be benchmarked (and its
memory planned) where the checkpoints cannot be downloaded.

Dimensions common to the suite (OLMo-7B-like, docs/olmpool.md): hidden 4096, 32 query heads of
dim 128, vocabulary 100,278, RoPE theta 8,000,000 after context extension, 65,536 positions. The
row gives the rest: KV heads, MLP width, layer count, QK norm, and a 4096-token window on 3 of
every 4 layers (the last of each four global) in SWA models.
"""

from __future__ import annotations

from typing import Any

from attnscope.errors import FeatureUnavailableError
from attnscope.models import olmpool

HIDDEN, HEADS, VOCAB, ROPE_THETA, MAX_POSITIONS, WINDOW = 4096, 32, 100_278, 8_000_000.0, 65_536, 4096
# native transformers classes that express each row's architecture
_MODEL_TYPE = {"none": "llama", "layerwise": "olmo3", "headwise": "qwen3"}


def shape_config(name: str, *, n_layers: int | None = None, **overrides: Any):
    """A transformers config with the architecture of OlmPool model `name` (short name, Hub id
    or unique prefix). `n_layers` builds a shallower model of the same attention shape.

    QK norm none -> llama (pre-norm; the post-norm rows differ only in where the RMSNorms sit,
    which costs the same), layerwise -> olmo3, headwise -> qwen3; SWA -> `layer_types` 3 sliding
    (window 4096) : 1 full.
    """
    from transformers import AutoConfig

    row = olmpool.get(name)
    model_type = _MODEL_TYPE.get(row.qk_norm)
    if model_type is None:
        raise FeatureUnavailableError(f"no native class for QK norm {row.qk_norm!r} of {row.name}")
    layers = int(n_layers or row.n_layers)
    rope = {"rope_type": "default", "rope_theta": ROPE_THETA}
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=int(row.d_ff),
        num_attention_heads=HEADS, num_key_value_heads=int(row.kv_heads), head_dim=HIDDEN // HEADS,
        num_hidden_layers=layers, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False)
    if row.swa:
        kwargs["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                                 for i in range(layers)]
        kwargs["sliding_window"] = WINDOW
        if model_type == "llama":
            raise FeatureUnavailableError(f"{row.name}: SWA without QK norm has no native class here")
    if model_type == "olmo3":  # per-layer-type rope parameters (transformers 5)
        kwargs["rope_parameters"] = {"full_attention": dict(rope), "sliding_attention": dict(rope)}
    else:
        kwargs["rope_parameters"] = dict(rope)
        if model_type == "qwen3" and row.swa:
            kwargs["use_sliding_window"] = True
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def random_model(name: str, *, n_layers: int | None = None, dtype=None, device=None, seed: int = 0):
    """A randomly initialised model of OlmPool model `name`'s shape (see `shape_config`),
    created directly on `device` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = shape_config(name, n_layers=n_layers)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()
