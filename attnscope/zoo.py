"""Tiny random models of every causal-LM family of the installed transformers (the model zoo).

`tiny_model(model_type)` builds the family's default config shrunk to a few layers of width 64
(every distinct layer kind kept), in fp32 with eager attention, its attention made non-uniform
and its learned sinks, score biases and sparse selection switched on so that they change the
result at 32 tokens. `FamilySkip` says why a model type is not a text decoder. The conformance
harness (attnscope/conformance.py) compares attnscope with eager attention on each of them.

Everything is built from configs: no network, no checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

N_TOKENS = 32  # the input length: longer than every window (8) and top-k (8) set below
TARGET_SCORE_STD = 2.0  # std of a row's attention scores after calibration (non-uniform, not one-hot)
PROBE_IMPLEMENTATION = "attnscope_zoo_probe"
MAX_PARAMS = 20_000_000  # a tiny model has well under 5M; more means a size key was not shrunk

# --- feature names (docs/families.md lists what each family exercised) -----------------------
LEARNED_SINKS = "learned_sinks"
MLA = "mla"  # value head dim != query/key head dim
SLIDING_WINDOW = "sliding_window"
CHUNKED_ATTENTION = "chunked_attention"
SOFTCAP = "softcap"
SPARSE_TOPK = "sparse_topk"
SCORE_BIAS = "score_bias"  # position_bias / alibi / a per-head or non-binary float mask
HYBRID = "hybrid"  # recurrent (or convolution) layers beside attention layers
RECURRENT_ONLY = "recurrent_only"  # no attention layer at all
SHARED_ATTENTION = "shared_attention"  # one attention module run more than once per forward
SHARED_KV = "shared_kv"  # layers that reuse another layer's keys and values
CROSS_ATTENTION = "cross_attention"  # more queries than keys or keys from elsewhere
PER_LAYER_HEADS = "per_layer_heads"  # head count differs between attention calls
GQA = "gqa"
MOE = "moe"
BYPASSES_INTERFACE = "bypasses_interface"  # attention maps exist, but no AttentionInterface call
FEATURES = (LEARNED_SINKS, MLA, SLIDING_WINDOW, CHUNKED_ATTENTION, SOFTCAP, SPARSE_TOPK, SCORE_BIAS,
            HYBRID, RECURRENT_ONLY, SHARED_ATTENTION, SHARED_KV, CROSS_ATTENTION, PER_LAYER_HEADS,
            GQA, MOE, BYPASSES_INTERFACE)


class FamilySkip(Exception):
    """This model type is not a text decoder; the message says why."""

    @property
    def reason(self) -> str:
        return str(self)


def causal_lm_types() -> list[str]:
    """Every model_type with an AutoModelForCausalLM class in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# --- skips ----------------------------------------------------------------------------------
# ForCausalLM classes that are the decoder half of an encoder-decoder model: their layers
# cross-attend to encoder states the text alone does not give. Detected from the config where
# it says so (is_encoder_decoder); trocr's config does not (it is used inside
# VisionEncoderDecoderModel), nor do the audio generators below.
_NOT_TEXT_DECODERS = {
    "trocr": "decoder half of a vision encoder-decoder (VisionEncoderDecoderModel): generates text "
             "from image features through cross-attention",
    "musicgen": "audio generator: the decoder predicts EnCodec audio codes (num_codebooks streams), "
                "conditioned on a text encoder; not a text decoder",
    "musicgen_melody": "audio generator: the decoder predicts EnCodec audio codes (num_codebooks "
                       "streams), conditioned on text and chroma; not a text decoder",
    "gemma4_assistant": "draft head for speculative decoding: runs on a Gemma 4 backbone's hidden "
                        "states, not on token ids alone (its default config does not even build: "
                        "hidden_size_per_layer_input must be 0)",
    "gemma4_unified_assistant": "draft head for speculative decoding: runs on a Gemma 4 backbone's "
                                "hidden states, not on token ids alone",
}


# --- shrinking ------------------------------------------------------------------------------
# Generic rules: config key -> small value, applied wherever the key holds an int in the
# default config (top level and every sub-config). Keys absent from a family are ignored.
_WIDTH = 64
_HEADS = 4
_HEAD_DIM = 16
_RULES: dict[str, Any] = {
    # width
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "emb_dim", "embedding_dim", "dim",
                     "hidden_size_global", "lru_width", "embed_dim",
                     "word_embed_proj_dim", "input_embedding_size", "output_embedding_size",
                     "embedding_size", "backbone_hidden_size", "out_hidden_size",
                     "adapter_in_dim", "adapter_out_dim", "adapter_input_size"), _WIDTH),
    # heads
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads",
                     "decoder_attention_heads", "encoder_attention_heads", "swa_num_attention_heads",
                     "conf_num_attention_heads", "linear_num_value_heads", "linear_num_heads"), _HEADS),
    **dict.fromkeys(("head_dim", "attention_head_dim", "d_head", "dim_head", "kv_channels",
                     "attention_head_size", "swa_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_head_dim", "d_kv"), _HEAD_DIM),
    # feed-forward
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "dff", "ffn_hidden_size",
                     "dim_ff", "decoder_ffn_dim", "encoder_ffn_dim", "intermediate_size_mlp",
                     "feed_forward_size", "d_inner", "dense_intermediate_size", "mlp_dim"), 128),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size",
                     "expert_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                     "shared_intermediate_size", "shared_experts_intermediate_size"), 64),
    # positions
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                     "max_target_positions", "context_length", "model_max_length",
                     "original_max_position_embeddings"), 128),
    # mixture of experts: 4 experts, top-2, one group
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k",
                     "num_experts_per_token"), 2),
    **dict.fromkeys(("n_group", "num_expert_group", "topk_group"), 1),
    # multi-head latent attention: q/k head dim 16 + 8 = 24, value head dim 16
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
    "v_head_dim": 16, "o_lora_rank": 16,
    # windows and sparse selection shorter than the input, so that they matter
    **dict.fromkeys(("sliding_window", "attention_window_size", "sliding_window_size",
                     "attention_chunk_size", "local_attention_window_len", "window_size"), 8),
    "index_topk": 8, "index_n_heads": 2, "index_head_dim": 16,
    "index_block_size": 4, "index_topk_blocks": 2, "index_local_blocks": 1,
    "keep_window_size": 8,  # doge's dynamic mask keeps the top keys beyond this many
    # state-space / recurrent parts
    **dict.fromkeys(("state_size", "mamba_d_state", "ssm_state_size", "d_state"), 8),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim", "mamba_headdim"), 16),
    **dict.fromkeys(("mamba_n_groups", "n_groups", "mamba_ngroups"), 1),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 8),
    **dict.fromkeys(("chunk_size", "mamba_chunk_size"), 16),
    "linear_num_key_heads": 2,
    # embeddings of other vocabularies (per-layer inputs, n-grams, audio codes)
    "hidden_size_per_layer_input": 16, "ple_embed_dim": 16,
}
_VOCAB = 512
# heads of key/value: 2 where the family uses GQA, 1 where it uses MQA, = heads otherwise
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "kv_n_heads", "multi_query_group_num",
                 "num_query_groups", "n_kv_heads", "swa_num_key_value_heads")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
               "num_decoder_layers")
# multimodal towers: one layer is enough (they never run on a text-only input)
_TOWER_LAYER_KEYS = _LAYER_KEYS + ("depth", "encoder_layers", "num_encoder_layers",
                                   "conf_num_hidden_layers", "num_global_layers")
_TOWER_CONFIGS = ("vision_config", "audio_config", "vq_config", "audio_encoder_config",
                  "patcher_config", "audio_encoder", "text_encoder", "vision_tower_config")

_DROP = object()  # an override value that removes the key (the class then derives it)

# Per-family overrides, only where a family's own constraints need them (each says why). They
# apply to the family's text config (the top level, or its text sub-config); dict values merge.
_LLAMA_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_OVERRIDES: dict[str, dict[str, Any]] = {
    # the default configs leave sizes None that every checkpoint sets
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
              "first_k_dense_replace": 1},
    "cohere_compass_text": {"rope_parameters": {"full_attention": _LLAMA_ROPE}},
    "cohere_compass": {"rope_parameters": {"full_attention": _LLAMA_ROPE}},
    # DbrxAttention reads attn_config.rope_theta (not a field) and clamps with clip_qkv (None fails)
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # QSA indexer sizes are None by default but its layers are "indexed_attention": budget 8 of
    # 32 tokens in blocks of 2, so that the selection matters
    **dict.fromkeys(("qwen4_exp", "qwen4_exp_text"), {
        "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
        "indexer_compress_ratio": 2}),
    # default layer_types None (LFM2 checkpoints mix short-conv and attention layers)
    "lfm2_moe": {"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # full_attn_idxs None means every layer attends; released LFM2 models mix conv and attention
    "lfm2": {"full_attn_idxs": [1], "layer_types": ["conv", "full_attention"]},
    # the last num_kv_shared_layers reuse the KV of the last earlier layer of their type: keep a
    # sliding and a full layer on each side
    **dict.fromkeys(("gemma3n", "gemma3n_text"), {"num_kv_shared_layers": 2}),
    # attention every `attn_layer_period` layers from `attn_layer_offset`, experts likewise:
    # period 2 keeps a mamba and an attention layer, a dense and a MoE layer in 2 layers
    # (default: attention at 4 mod 8, always with a dense MLP; MoE at odd layers): period 3 offset
    # 2 keeps mamba+dense, mamba+MoE and attention+dense in 3 layers
    "jamba": {"attn_layer_period": 3, "attn_layer_offset": 2, "expert_layer_period": 2,
              "expert_layer_offset": 1},
    # the default configs have no attention layer at all; every released checkpoint mixes
    # mamba and attention layers
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # the shared transformer block is tied across hybrid layers: tying needs two of them (and a
    # block that runs twice per forward is what to exercise)
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    "zamba2": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    # the default config has no sparse layer (released checkpoints set sparse_attention_freq):
    # one full and one block-sparse ("minimax_m3_sparse") layer
    "minimax_m3_vl_text": {"layer_types": ["full_attention", "minimax_m3_sparse"]},
    # layer 0 has no attention-residual input: the layer type it has must come again later
    "inkling2_text": {"num_hidden_layers": 3, "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding"]},
    # GPT-Neo lists its layers as [[kinds], repeats]: one global and one local layer
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # dots3's sliding layers are MLA with their own sizes (64 heads where the others have 128,
    # head_dim = nope + rope): given as the checkpoint's swa_* keys, from which the config
    # builds per_layer_config; half the heads of the other layers, as in the release
    **dict.fromkeys(("dots3_note", "dots3_note_text"), {
        "per_layer_config": _DROP, "swa_num_attention_heads": 2, "swa_num_key_value_heads": 2,
        "swa_q_lora_rank": 32, "swa_kv_lora_rank": 32, "swa_head_dim": 24,
        "swa_qk_nope_head_dim": 16, "swa_v_head_dim": 16}),
    # ReformerModelWithLMHead asserts is_decoder=True (the causal LM setting); its axial position
    # embedding must factor the (shrunk) positions and sum to the width; chunks < 32 tokens
    # LSH attention draws random rotations at every forward unless hash_seed is set: eager and
    # attnscope must see the same buckets
    "reformer": {"is_decoder": True, "axial_pos_shape": [8, 16], "axial_pos_embds_dim": [32, 32],
                 "local_attn_chunk_length": 8, "lsh_attn_chunk_length": 8, "hash_seed": 0},
}


# After building: what a family needs before its first forward.
_AFTER_BUILD = {
    # X-MOD routes every layer through a per-language adapter: no forward without a language
    "xmod": lambda model: model.set_default_language(model.config.languages[0]),
}


@dataclass
class AttentionCall:
    """One call of the attention function, as a recording function saw it."""

    module: str  # class name of the attention module
    module_id: int
    layer_idx: int | None
    query: tuple
    key: tuple
    value: tuple
    mask: str  # "none" | "bool" | "float[B,H,T,S]" ...
    kwargs: dict[str, str]  # name -> short description of the value


@dataclass
class TinyModel:
    """A tiny random model of one family, ready to compare with eager attention."""

    model_type: str
    model: Any  # the fp32 eval model, attn_implementation="eager"
    config: Any
    input_ids: torch.Tensor  # [1, N_TOKENS]
    features: tuple[str, ...]
    calls: list[AttentionCall] = field(default_factory=list)  # one forward, through the interface
    n_eager_maps: int = 0  # attention maps returned by output_attentions=True
    score_std: float | None = None  # mean std of a row's attention scores (eager)
    n_params: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def attention_kwargs(self) -> dict[str, str]:
        """Every keyword argument the family passes to the attention function: name -> the
        distinct values it took over one forward ("None | 8"; tensors as shape and dtype)."""
        return attention_kwargs(self.calls)


def attention_kwargs(calls) -> dict[str, str]:
    seen: dict[str, list[str]] = {}
    for c in calls:
        for k, v in c.kwargs.items():
            if v not in seen.setdefault(k, []):
                seen[k].append(v)
    return {k: " | ".join(v) for k, v in sorted(seen.items())}


def _config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def _field_defaults(cls) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# keys a model needs that some default configs leave None (real checkpoints set them)
_REQUIRED_WHEN_NONE = ("head_dim", "moe_intermediate_size", "num_experts_per_tok")
# lists of layer indices (not one entry per layer)
_INDEX_LIST_KEYS = ("moe_layers", "full_attn_idxs", "mlp_only_layers", "cross_attention_layers",
                    "hybrid_layer_ids", "ple_layer_ids", "swa_layers", "global_layers")
# (heads, head dim, expansion) of the state-space part: heads * head dim = expansion * width
_SSM_HEADS = (("mamba_n_heads", "mamba_d_head", "mamba_expand"),
              ("n_mamba_heads", "mamba_headdim", "mamba_expand"),
              ("mamba_num_heads", "mamba_head_dim", "expand"),
              ("num_heads", "head_dim", "expand"))


def _rule(key: str, value):
    if value == 0:  # a size of 0 switches a part off (granitemoeshared's shared MLP): keep it off
        return None
    if key in _RULES:
        return min(value, _RULES[key]) if key in ("num_experts_per_tok", "topk_group") else _RULES[key]
    if "vocab" in key and value > _VOCAB:  # other vocabularies: n-grams, per-layer inputs, bytes
        return _VOCAB
    return None


def _old_head_dim(d: dict):
    heads = d.get("num_attention_heads", d.get("n_head", d.get("n_heads")))
    width = d.get("hidden_size", d.get("d_model", d.get("n_embd")))
    if _is_int(d.get("head_dim")):
        return d["head_dim"]
    return width // heads if _is_int(width) and _is_int(heads) and heads else None


def _shrink_values(d: dict, fields: dict, *, tower: bool) -> dict:
    """The generic rules applied to one config's dict (not its sub-configs): the changed keys.
    `fields` are the class's field defaults: a field whose default is None and whose value is an
    int was derived in __post_init__ from other fields, so it is left to be derived again."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        derived = key in fields and fields[key] is None
        if _is_int(value) and not derived:
            new = _rule(key, value)
            if new is None and tower and key in _TOWER_LAYER_KEYS:
                new = 1
            if new is not None:
                out[key] = new
        elif value is None and key in _REQUIRED_WHEN_NONE:
            out[key] = _RULES[key]
    heads = d.get("num_attention_heads", d.get("n_head", d.get("n_heads")))
    for key in _KV_HEAD_KEYS:
        kv = d.get(key)
        if _is_int(kv) and _is_int(heads):
            out[key] = 1 if kv == 1 else (_HEADS if kv >= heads else 2)
        elif kv is None and key == "num_key_value_heads" and key in d and _is_int(heads):
            out[key] = _HEADS  # left None by a config whose model needs it: plain multi-head
    for key in ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"):
        if _is_int(d.get(key)) and d[key] > 0:
            out[key] = 1
    if "qk_rope_head_dim" in d:
        # MLA: q/k head dim = nope + rope (24), value head dim 16; `head_dim` keeps the relation
        # the family gives it (the rope part in the DeepSeek line, the q/k dim elsewhere)
        qk = _RULES["qk_nope_head_dim"] + _RULES["qk_rope_head_dim"]
        if _is_int(d.get("qk_head_dim")):
            out["qk_head_dim"] = qk
        if _is_int(d.get("head_dim")):
            old = d["head_dim"]
            out["head_dim"] = (_RULES["qk_rope_head_dim"] if old == d.get("qk_rope_head_dim")
                               else qk if old == d.get("qk_head_dim") else _RULES["v_head_dim"]
                               if old == d.get("v_head_dim") else _HEAD_DIM)
    if _is_int(d.get("rotary_dim")):  # partial rotary: the same fraction of the smaller head
        old_hd = _old_head_dim(d)
        frac = d["rotary_dim"] / old_hd if old_hd else 0.25
        out["rotary_dim"] = max(2, 2 * round(frac * _HEAD_DIM / 2))
    width = out.get("hidden_size", d.get("hidden_size"))
    if _is_int(d.get("mamba_d_ssm")) and _is_int(d.get("mamba_expand")) and _is_int(width):
        out["mamba_d_ssm"] = d["mamba_expand"] * width  # falcon_h1: the SSM width, when given
    for n_key, d_key, e_key in _SSM_HEADS:
        if all(_is_int(d.get(k)) for k in (n_key, d_key, e_key)) and _is_int(width):
            out[d_key] = _HEAD_DIM
            out[n_key] = max(1, d[e_key] * width // _HEAD_DIM)
    if _is_int(d.get("first_k_dense_replace")) and d["first_k_dense_replace"] > 0:
        out["first_k_dense_replace"] = 1  # layer 0 dense, layer 1 MoE
    if d.get("attn_logit_softcapping"):
        out["attn_logit_softcapping"] = 4.0  # scores of std ~2 reach it: the cap changes the result
    return out


def _special_ids(d: dict, vocab: int) -> dict:
    """Token ids outside the shrunk vocabulary moved inside it (pad 0, bos 1, eos 2, others next)."""
    out: dict[str, Any] = {}
    base = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    nxt = 3
    for key, value in d.items():
        if not (key.endswith("_token_id") or key.endswith("_token_index")):
            continue
        if _is_int(value) and value >= vocab:
            if key in base:
                out[key] = base[key]
            else:
                out[key], nxt = nxt, nxt + 1
        elif isinstance(value, list) and any(_is_int(v) and v >= vocab for v in value):
            out[key] = [base.get(key, 2)]
    return out


def _scaled(key: str, old, d: dict, new_values: dict):
    """A per-layer value scaled like the config-wide value it varies (heads 64 of 128 -> 2 of 4)."""
    if not _is_int(old):
        return old
    base_key = next((k for k in sorted(new_values, key=len, reverse=True)
                     if key.startswith(k) and _is_int(d.get(k)) and _is_int(new_values[k])), None)
    if base_key is None:
        return _RULES.get(key, old)  # a per-layer list of a size (gemma3n's intermediate_size)
    base_old, base_new = d[base_key], new_values[base_key]
    return max(1, round(base_new * old / base_old)) if base_old else base_new


def _layer_plan(d: dict, new_values: dict, fields: dict, *, tower: bool = False) -> tuple[int | None, dict]:
    """Fewest layers that keep every distinct layer kind: the first layer of each distinct
    combination of the per-layer lists (lists as long as the layer count), of index lists
    (is the layer in it) and of `per_layer_config` (the family's per-layer overrides).
    Returns (n_layers, {key: the value for the kept layers}); (None, {}) without a layer count."""
    n_key = next((k for k in _LAYER_KEYS if _is_int(d.get(k))), None)
    if n_key is None:
        return None, {}
    n = d[n_key]
    # only fields: other lists in to_dict() were derived from them and are derived again
    d = {k: v for k, v in d.items() if not fields or k in fields or k == "per_layer_config"}
    per_layer = {k: v for k, v in d.items() if isinstance(v, (list, tuple)) and len(v) == n and n > 1
                 and k not in _INDEX_LIST_KEYS and k != "eos_token_id"}
    index_lists = {k: set(v) for k, v in d.items() if k in _INDEX_LIST_KEYS and isinstance(v, (list, tuple))}
    overrides = d.get("per_layer_config") if isinstance(d.get("per_layer_config"), dict) else {}
    by_layer = {int(k): v for k, v in overrides.items()}

    def kind(i):
        return (tuple(_hashable(v[i]) for v in per_layer.values())
                + tuple(i in s for s in index_lists.values())
                + (tuple(sorted(by_layer.get(i, {}).items())),))

    seen, keep = set(), []
    for i in range(n):
        if kind(i) not in seen:
            seen.add(kind(i))
            keep.append(i)
    if len(keep) == 1 and n > 1:
        keep.append(1)
    if tower:  # a multimodal tower never runs on text: its first layer only
        keep = [0]
    plan: dict[str, Any] = {k: [_scaled(k, v[i], d, new_values) for i in keep] for k, v in per_layer.items()}
    for k, s in index_lists.items():
        plan[k] = [j for j, i in enumerate(keep) if i in s]
    if overrides:
        width = max(len(k) for k in overrides)
        plan["per_layer_config"] = {
            str(j).zfill(width): {k: _scaled(k, v, d, new_values) for k, v in by_layer[i].items()}
            for j, i in enumerate(keep) if i in by_layer}
    return len(keep), plan


def _hashable(v):
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def _sub_config_names(config) -> list[str]:
    return [n for n in (getattr(config, "sub_configs", None) or {}) if getattr(config, n, None) is not None]


def _shrunk_kwargs(config, *, tower: bool = False) -> dict:
    """Keyword arguments that rebuild `config`'s class small (recursing into sub-configs)."""
    d = config.to_dict()
    fields = _field_defaults(type(config))
    out = _shrink_values(d, fields, tower=tower)
    n, lists = _layer_plan(d, out, fields, tower=tower)
    if n is not None:
        for k in _LAYER_KEYS:
            if _is_int(d.get(k)):
                out[k] = n
        out.update(lists)
    vocab = out.get("vocab_size", d.get("vocab_size"))
    if _is_int(vocab):
        out.update(_special_ids(d, vocab))
    for name in _sub_config_names(config):
        sub = getattr(config, name)
        if not hasattr(sub, "to_dict"):
            continue
        sub_tower = tower or name in _TOWER_CONFIGS
        derived = {k for k, v in _field_defaults(type(sub)).items() if v is None}
        full = {k: v for k, v in sub.to_dict().items()
                if not (k in derived and k not in out) and k not in ("transformers_version",)}
        full.update(_shrunk_kwargs(sub, tower=sub_tower))
        full["model_type"] = sub.model_type
        out[name] = full
    return out


def tiny_config(model_type: str):
    """The family's default config, shrunk (see the module docstring and _RULES)."""
    if model_type in _NOT_TEXT_DECODERS:
        raise FamilySkip(f"{model_type}: {_NOT_TEXT_DECODERS[model_type]}")
    cls = _config_class(model_type)
    default = cls()
    if getattr(default, "is_encoder_decoder", False):
        raise FamilySkip(f"{model_type}: decoder half of an encoder-decoder model "
                         "(is_encoder_decoder=True): its layers cross-attend to encoder states")
    kwargs = _shrunk_kwargs(default)
    text_name = next((n for n in _sub_config_names(default)
                      if getattr(default, n) is default.get_text_config(decoder=True)), None)
    target = kwargs[text_name] if text_name else kwargs
    for key, value in _OVERRIDES.get(model_type, {}).items():
        if value is _DROP:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key] = {**target[key], **value}
        else:
            target[key] = value
    config = cls(**kwargs)
    return _grow_to_every_kind(cls, kwargs, config, default, target)


def _layer_kinds(config) -> set:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or getattr(text, "layers_block_type", None) or ()
    return set(map(str, types))


def _grow_to_every_kind(cls, kwargs, config, default, target):
    """Where the layer kinds follow from a pattern (recurrent_gemma's cycle of block types)
    rather than a per-layer list, add layers until every kind of the default config is there."""
    want = _layer_kinds(default)
    n_key = next((k for k in _LAYER_KEYS if _is_int(target.get(k))), None)
    if not want or n_key is None or any(
            isinstance(v, list) and len(v) == target[n_key] for v in target.values()):
        return config
    full = getattr(default.get_text_config(decoder=True), n_key, None) or target[n_key]
    while _layer_kinds(config) != want and target[n_key] < min(full, 8):
        target[n_key] += 1
        config = cls(**kwargs)
    return config


def _decoder_layer_kinds(model) -> set[tuple[str, ...]]:
    """The kinds of decoder layer of a model: for each layer of the text decoder's layer lists,
    the class names of its parts (attention or mixer, MLP or MoE, norms)."""
    import torch.nn as nn

    root = model.get_decoder() if hasattr(model, "get_decoder") else model
    kinds = set()
    for m in root.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(
                any(True for _ in x.children()) and not isinstance(x, nn.ModuleList) for x in m):
            for layer in m:
                kinds.add(tuple(sorted({type(c).__name__ for c in layer.children()})))
    return kinds


def missing_layer_kinds(model_type: str) -> list[tuple[str, ...]] | None:
    """Kinds of decoder layer the default config builds that the tiny one lacks (both built on
    the meta device, so no weights are allocated): what the layer plan failed to keep. None
    where the default config itself does not build (a size it leaves None: see _OVERRIDES)."""
    from transformers import AutoModelForCausalLM

    tiny = tiny_config(model_type)
    with torch.device("meta"):
        try:
            default = AutoModelForCausalLM.from_config(_config_class(model_type)())
        except Exception:  # noqa: BLE001 - an unbuildable default has nothing to compare with
            return None
        want = _decoder_layer_kinds(default)
        have = _decoder_layer_kinds(AutoModelForCausalLM.from_config(tiny))
    return sorted(want - have)


# --- recording the attention calls ----------------------------------------------------------

def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"Tensor{list(v.shape)}:{str(v.dtype).replace('torch.', '')}"
    if isinstance(v, (int, float, bool, str)) or v is None:
        return repr(v)
    return type(v).__name__


def _mask_kind(mask) -> str:
    if mask is None:
        return "none"
    if not isinstance(mask, torch.Tensor):
        return type(mask).__name__
    if mask.dtype == torch.bool:
        return f"bool{list(mask.shape)}"
    return f"float{list(mask.shape)}"


class _Recorder:
    def __init__(self):
        self.calls: list[AttentionCall] = []
        self.bias_std: list[float] = []  # std of each `position_bias` over the visible pairs
        self.weights: list = []  # the probabilities each call's eager attention returned
        self.logits: torch.Tensor | None = None


_ACTIVE: list[_Recorder] = []


def _probe_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Records the call, then runs the family's own eager attention (so the forward is exact)."""
    if _ACTIVE:
        _ACTIVE[-1].calls.append(AttentionCall(
            type(module).__name__, id(module), getattr(module, "layer_idx", None),
            tuple(query.shape), tuple(key.shape), tuple(value.shape), _mask_kind(attention_mask),
            {k: _describe(v) for k, v in kwargs.items()}))
        bias = kwargs.get("position_bias")
        if isinstance(bias, torch.Tensor):
            _ACTIVE[-1].bias_std.append(float(bias.float()[bias != 0].std()) if bias.any() else 0.0)
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as own
    out = own(module, query, key, value, attention_mask, *args, **kwargs)
    if _ACTIVE:
        weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if isinstance(weights, torch.Tensor):
            weights = _with_sink_share(weights.detach().clone(), out[0], query, key, value,
                                       attention_mask, kwargs)
        _ACTIVE[-1].weights.append(weights if isinstance(weights, torch.Tensor) else None)
    return out


def _with_sink_share(weights, output, query, key, value, attention_mask, kwargs):
    """The probabilities the call's output is computed from. Some families with a learned sink
    (granite_swa) return the softmax over real keys and scale the output by
    sigmoid(lse - sink) afterwards, which equals a sink logit in the softmax denominator: their
    maps then get the sink's share taken out, P = w * sigmoid(lse - sink), and are kept only if
    P @ V reproduces the call's own output (so the reference never assumes what it checks)."""
    sink = kwargs.get("s_aux", kwargs.get("sinks"))
    if not isinstance(sink, torch.Tensor) or sink.dim() != 1 or weights.dim() != 4:
        return weights
    if float((weights.float().sum(-1) - 1).abs().max()) > 1e-4:
        return weights  # rows already short of 1: the sink's share is out of the map
    rep = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(rep, 1)
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    s = query.float() @ k.transpose(-1, -2) * scale
    if attention_mask is not None:
        s = s + attention_mask.float()
    keep = torch.sigmoid(torch.logsumexp(s, -1) - sink.float().view(1, -1, 1))
    P = weights.float() * keep[..., None]
    v = value.float().repeat_interleave(rep, 1)
    mine = (P @ v).transpose(1, 2)
    if mine.shape == output.shape and float((mine - output.float()).abs().max()) <= 1e-5:
        return P
    return weights


_PROBE_REGISTERED = False


def _register_probe() -> None:
    global _PROBE_REGISTERED
    if _PROBE_REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(PROBE_IMPLEMENTATION, _probe_attention)
    AttentionMaskInterface.register(PROBE_IMPLEMENTATION, eager_mask)
    _PROBE_REGISTERED = True


@contextlib.contextmanager
def _implementation(model, name: str):
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def record_attention_calls(model, input_ids) -> list[AttentionCall]:
    """Every call one forward makes to the attention function registered with transformers'
    AttentionInterface (run with the family's own eager attention, so outputs are unchanged).
    Empty for families whose attention does not go through the interface."""
    return _probe_forward(model, input_ids).calls


def _probe_forward(model, input_ids) -> _Recorder:
    _register_probe()
    rec = _Recorder()
    _ACTIVE.append(rec)
    try:
        with _implementation(model, PROBE_IMPLEMENTATION), torch.no_grad():
            rec.logits = model(input_ids=input_ids, use_cache=False).logits
    except (ValueError, KeyError, TypeError) as exc:  # the class refuses a registered function
        if rec.calls:
            raise
        del exc
    finally:
        _ACTIVE.remove(rec)
    return rec


def attention_call_maps(model, input_ids):
    """(logits, calls, maps) of one forward through the recording attention function: the
    probabilities the family's own eager attention returned at each call of the attention
    function, in call order (None where it returned none). Every call is there, also those of
    a module that runs twice per forward, which `output_attentions` reports once."""
    rec = _probe_forward(model, input_ids)
    return rec.logits, rec.calls, rec.weights


def is_probability_map(a, n_queries: int) -> bool:
    """A [B, H, T, S] map of attention probabilities (rows >= 0, summing to <= 1; < 1 where a
    learned sink takes a share). Some families return other tensors as `attentions` (a
    linear-attention layer's state in MiniMax, RWKV's): those are not attention maps."""
    if not isinstance(a, torch.Tensor) or a.dim() != 4 or a.shape[2] != n_queries:
        return False
    a = a.float()
    return bool(torch.isfinite(a).all() and a.min() >= 0 and a.sum(-1).max() <= 1 + 1e-4)


def eager_attentions(model, input_ids):
    """(logits, [attention maps in call order], n_other) of one eager forward with
    output_attentions: the probability maps, and how many other tensors were returned as
    `attentions` (see is_probability_map)."""
    with _implementation(model, "eager"), torch.no_grad():
        out = model(input_ids=input_ids, use_cache=False, output_attentions=True)
    returned = [a for a in (getattr(out, "attentions", None) or ()) if isinstance(a, torch.Tensor)]
    maps = [a for a in returned if is_probability_map(a, input_ids.shape[1])]
    return out.logits, maps, len(returned) - len(maps)


# --- making attention non-uniform -----------------------------------------------------------
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out", "proj_out",
                       "output", "attn_out", "o_layer", "linear_o", "o_b_proj", "o_a_proj",
                       "out_lin", "proj", "dense_out")
_SINK_NAMES = ("sinks", "s_aux", "sink", "attention_sink", "sink_logits")


def _attention_modules(model, calls: list[AttentionCall]):
    """The softmax attention modules: those that called the attention function; for a family
    that bypasses the interface, the modules named like attention (not layers, norms, rotary)."""
    callers = {c.module_id for c in calls}
    out = []
    for n, m in model.named_modules():
        cls = type(m).__name__
        if callers:
            hit = id(m) in callers
        else:
            hit = any(w in cls for w in ("Attention", "Attn", "MLA")) and not any(
                w in cls for w in ("Layer", "Block", "Norm", "Rotary", "Embedding"))
        if hit and any(True for _ in m.parameters()):
            out.append((n, m))
    return out


def _output_scaler(mod):
    """A function f -> None that multiplies the leaf module's output by f through its parameters:
    weight and bias of a projection; the gain of a norm, whether it is `w` or `1 + w` (Gemma)."""
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, torch.nn.Parameter):
        params = [p for p in mod.parameters(recurse=False) if p.is_floating_point()]
        if not params:
            return None

        def scale_all(f):  # a module of its own gains (zaya's per-head key scale `temp`)
            for p in params:
                p.mul_(f)
        return scale_all
    bias = getattr(mod, "bias", None)
    if "Norm" not in type(mod).__name__:
        def scale(f):
            weight.mul_(f)
            if isinstance(bias, torch.nn.Parameter):
                bias.mul_(f)
        return scale
    # a norm: with a zero weight a `w` gain gives 0, a `1 + w` gain gives the normalised input
    x = torch.randn(2, weight.shape[-1], generator=torch.Generator().manual_seed(0))
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.zero_()
            offset = bool(mod(x).abs().max() > 1e-3)
    except Exception:  # a norm with another call signature: treat its gain as `w`
        offset = False
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    if offset:
        return lambda f: weight.copy_(f * (1 + weight) - 1)
    return lambda f: weight.mul_(f)


def _qk_scalers(model, calls: list[AttentionCall]) -> list:
    """Scalers of every leaf module on the query/key side of the attention modules: everything
    in them but the output projection (and the sinks, which are parameters of the module itself).
    Scaling them scales the scores (and the values, which does not matter here)."""
    out, seen = [], set()
    for _, attn in _attention_modules(model, calls):
        for name, mod in attn.named_modules():
            if not name or any(True for _ in mod.children()) or id(mod) in seen:
                continue
            if any(part in _OUTPUT_PROJECTIONS for part in name.split(".")):
                continue
            seen.add(id(mod))
            scaler = _output_scaler(mod)
            if scaler is not None:
                out.append(scaler)
    return out


def score_std(maps: list[torch.Tensor]) -> float | None:
    """Mean over rows (with >= 4 visible keys) of the std of log P over the visible keys: the
    std of the row's scores, whatever the softmax's shift."""
    stds = []
    for P in maps:
        P = P.float()
        logp = torch.where(P > 0, P.clamp_min(1e-30).log(), torch.nan)
        n = (P > 0).sum(-1)
        ok = n >= 4
        if ok.any():
            m = torch.nanmean(logp, dim=-1, keepdim=True)
            var = torch.nanmean((logp - m) ** 2, dim=-1)
            stds.append(var[ok].sqrt().mean())
    return float(torch.stack(stds).mean()) if stds else None


def _calibrate(model, input_ids, scalers, notes) -> float | None:
    """Scale the query/key-side modules until a row's scores have std ~TARGET_SCORE_STD.
    The score is not always quadratic in the scale (a norm undoes a scale before it, MLA chains
    two scaled modules), so the exponent is measured at each step; a step that overflows is
    undone and retried smaller."""
    s = score_std(eager_attentions(model, input_ids)[1])
    if s is None or not scalers:
        return s
    exponent = 2.0
    for _ in range(10):
        if abs(math.log(max(s, 1e-12) / TARGET_SCORE_STD)) < math.log(1.25):
            break
        factor = min(max((TARGET_SCORE_STD / max(s, 1e-12)) ** (1.0 / exponent), 0.25), 4.0)
        with torch.no_grad():
            for scale in scalers:
                scale(factor)
        s_new = score_std(eager_attentions(model, input_ids)[1])
        if s_new is None or not math.isfinite(s_new):
            with torch.no_grad():
                for scale in scalers:
                    scale(1.0 / factor)
            exponent *= 2
            continue
        measured = math.log(max(s_new, 1e-12) / max(s, 1e-12)) / math.log(factor)
        if measured < 0.05:  # the scores do not follow the scale (weightless QK norm): stop
            s = s_new
            notes.append(f"score std stays at {s_new:.2f}: the query/key scale does not reach the scores")
            break
        exponent, s = measured, s_new
    return s


def _amplify_position_bias(model, input_ids, calls, notes) -> None:
    """A learned relative-position bias (inkling's `position_bias`) starts near 0 (std ~0.01)
    and would change nothing: scale the modules that make it (the attention modules' children
    named `rel*`; the bias is linear in their parameters) to a std of ~1 over the biased pairs."""
    if not any("position_bias" in c.kwargs for c in calls):
        return
    makers = [m for _, attn in _attention_modules(model, calls) for n, m in attn.named_children()
              if n.startswith("rel") or "Relative" in type(m).__name__]
    params = [p for m in makers for p in m.parameters() if p.is_floating_point()]
    for _ in range(2):
        stds = [x for x in _probe_forward(model, input_ids).bias_std if x > 0]
        if not stds or not params:
            break
        factor = 1.0 / (sum(stds) / len(stds))
        with torch.no_grad():
            for p in params:
                p.mul_(factor)
    stds = _probe_forward(model, input_ids).bias_std
    notes.append(f"position_bias scaled to std {sum(stds) / max(len(stds), 1):.2f}")


def _switch_on(model, generator, calls: list[AttentionCall] = ()) -> list[str]:
    """Learned sinks (zero at init in some families) get logits in [0, 2]; gains on the
    query/key side that start at zero (a key scale of 0 makes every score 0) start at 1.
    Returns what was done."""
    done, gains = [], []
    for _, attn in _attention_modules(model, list(calls)):
        for name, p in attn.named_parameters():
            leaf = name.split(".")[-1]
            if leaf not in _SINK_NAMES and leaf != "bias" and "weight" not in leaf and p.dim() <= 1 \
                    and p.is_floating_point() and not p.any():
                with torch.no_grad():
                    p.fill_(1.0)
                gains.append(name)
    for name, p in model.named_parameters():
        if name.split(".")[-1] in _SINK_NAMES:
            with torch.no_grad():
                p.copy_(torch.rand(p.shape, generator=generator) * 2.0)
            done.append(name)
    notes = [f"sink logits ~U(0, 2): {len(done)} tensors"] if done else []
    if gains:
        notes.append(f"zero-initialised gains set to 1: {sorted(set(gains))}")
    return notes


# --- input ids ------------------------------------------------------------------------------

def _all_special_ids(config) -> set[int]:
    ids: set[int] = set()

    def walk(c):
        d = c.to_dict() if hasattr(c, "to_dict") else {}
        for k, v in d.items():
            if k.endswith(("_token_id", "_token_index", "_token_ids", "_index", "_id")):
                for x in (v if isinstance(v, list) else [v]):
                    if _is_int(x):
                        ids.add(x)
        for n in _sub_config_names(c):
            walk(getattr(c, n))

    walk(config)
    return ids


def _input_ids(config, seed: int) -> torch.Tensor:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size")
    allowed = torch.tensor(sorted(set(range(vocab)) - _all_special_ids(config)))
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (1, N_TOKENS), generator=g)]


# --- features -------------------------------------------------------------------------------
_RECURRENT_CLASS_WORDS = ("Mamba", "Mixer", "GatedDeltaNet", "DeltaNet", "LinearAttention", "Recurrent",
                          "ShortConv", "Rwkv", "RWKV", "xLSTM", "Lstm", "LSTM", "SSM", "Ssm", "Rglru", "Delta",
                          "KimiDelta", "Lightning", "Conv1d")
_WINDOW_KINDS = ("sliding", "swa", "local")


def _decoder_stacks(model, callers: set[int]) -> tuple[str, ...]:
    """Name prefixes of the layer lists that hold the attention-calling modules
    ("model.layers."), so that a vision or audio tower's convolutions are not a hybrid decoder."""
    out = set()
    for name, m in model.named_modules():
        if id(m) in callers:
            parts = name.split(".")
            idx = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
            if idx is not None:
                out.add(".".join(parts[:idx]) + ".")
    return tuple(sorted(out))


def _uses_alibi(model, text) -> bool:
    """ALiBi adds a per-head linear bias to the scores: a config flag (mpt, falcon) or, for
    families that always use it (bloom), the attention module's own code."""
    import inspect

    for holder in (text, getattr(text, "attn_config", None)):
        if holder is not None and hasattr(holder, "alibi"):  # a switch: trust it
            return bool(holder.alibi)
    for _, m in _attention_modules(model, []):
        try:
            if "alibi" in inspect.getsource(type(m).forward):
                return True
        except (OSError, TypeError):
            pass
    return False


def _features(model, config, calls: list[AttentionCall], n_maps: int) -> list[str]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    feats = set()
    names = [n for n, _ in model.named_parameters()]
    if any(n.split(".")[-1] in _SINK_NAMES for n in names) or any(
            k in ("s_aux", "sinks") for c in calls for k in c.kwargs):
        feats.add(LEARNED_SINKS)
    v_dim, qk_dim = getattr(text, "v_head_dim", None), getattr(text, "qk_head_dim", None)
    if any(c.value[-1] != c.query[-1] for c in calls) or (v_dim and qk_dim and v_dim != qk_dim):
        feats.add(MLA)
    types = [str(t) for t in (getattr(text, "layer_types", None) or [])]
    if any(any(w in t for w in _WINDOW_KINDS) for t in types) or any(
            c.kwargs.get("sliding_window", "None") != "None" for c in calls):
        feats.add(SLIDING_WINDOW)
    if any("chunk" in t for t in types):
        feats.add(CHUNKED_ATTENTION)
    if getattr(text, "attn_logit_softcapping", None) or any(
            c.kwargs.get("softcap", "None") != "None" for c in calls):
        feats.add(SOFTCAP)
    # selection in use: keys chosen per query passed to the attention function, layers typed as
    # indexed/sparse, or doge's dynamic mask keeping fewer keys than the input has
    if any(c.kwargs.get(k, "None") != "None" for c in calls for k in ("indices", "block_indices")) or any(
            "indexed" in t or "sparse" in t for t in types) or (
            _is_int(getattr(text, "keep_window_size", None)) and text.keep_window_size < N_TOKENS):
        feats.add(SPARSE_TOPK)
    if _uses_alibi(model, text) or any(
            k in c.kwargs for c in calls for k in ("position_bias", "alibi", "bias", "score_bias")) or any(
            c.mask.startswith("float") and c.mask.split(",")[1].strip() not in ("1",) for c in calls):
        feats.add(SCORE_BIAS)
    callers = {c.module_id for c in calls}
    stacks = _decoder_stacks(model, callers)  # recurrent mixers count inside the decoder only
    recurrent = any(any(w in type(m).__name__ for w in _RECURRENT_CLASS_WORDS) and id(m) not in callers
                    and (not stacks or n.startswith(stacks)) for n, m in model.named_modules())
    if recurrent and (calls or n_maps):
        feats.add(HYBRID)
    # softmax attention that does not call the interface: attention-named modules that are not
    # recurrent mixers (reformer's LSH attention returns no [B, H, T, S] maps, yet attends)
    own_attention = any(
        any(w in type(m).__name__ for w in ("Attention", "Attn")) and not any(
            w in type(m).__name__ for w in _RECURRENT_CLASS_WORDS + ("Layer", "Block", "Norm"))
        for m in model.modules())
    if not calls and not n_maps and not own_attention:
        feats.add(RECURRENT_ONLY)
    per_module: dict[int, int] = {}
    for c in calls:
        per_module[c.module_id] = per_module.get(c.module_id, 0) + 1
    idx = [c.layer_idx for c in calls if c.layer_idx is not None]
    if any(v > 1 for v in per_module.values()) or len(idx) != len(set(idx)):
        feats.add(SHARED_ATTENTION)
    if _is_int(getattr(text, "num_kv_shared_layers", None)) and text.num_kv_shared_layers > 0:
        feats.add(SHARED_KV)
    if any(c.key[2] < c.query[2] for c in calls) or any(
            "cross" in type(m).__name__.lower() and "Attention" in type(m).__name__ for m in model.modules()):
        feats.add(CROSS_ATTENTION)
    if len({c.query[1] for c in calls}) > 1:
        feats.add(PER_LAYER_HEADS)
    if any(c.key[1] < c.query[1] for c in calls):
        feats.add(GQA)
    if any("expert" in n.lower() for n in names):
        feats.add(MOE)
    if not calls and (n_maps or own_attention):
        feats.add(BYPASSES_INTERFACE)
    return [f for f in FEATURES if f in feats]


# --- building -------------------------------------------------------------------------------

def _is_causal(model, input_ids) -> bool:
    """Does position 0 ignore the last token? (Encoders used as LM heads do not.)"""
    other = input_ids.clone()
    other[0, -1] = next(int(t) for t in input_ids[0] if t != input_ids[0, -1])  # another real token
    with torch.no_grad():
        a = model(input_ids=input_ids, use_cache=False).logits[0, 0]
        b = model(input_ids=other, use_cache=False).logits[0, 0]
    return bool(torch.allclose(a, b, atol=1e-6, rtol=0))


def tiny_model(model_type: str, *, seed: int = 0) -> TinyModel:
    """A tiny random fp32 eval model of `model_type` (eager attention) with its 32-token input.
    Raises FamilySkip for a model type that is not a text decoder."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    config = tiny_config(model_type)
    with torch.device("meta"):  # count first: a config the rules missed would build a full-size model
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.float32).parameters())
    if size > MAX_PARAMS:
        raise RuntimeError(f"{model_type}: the shrunk config still has {size / 1e6:.0f}M parameters")
    with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    if model_type in _AFTER_BUILD:
        _AFTER_BUILD[model_type](model)
    input_ids = _input_ids(config, seed)
    if not _is_causal(model, input_ids):
        raise FamilySkip(f"{model_type}: not a causal LM as built from its default config "
                         f"({type(model).__name__}): position 0's logits change when the last token "
                         "changes (bidirectional attention)")
    calls = record_attention_calls(model, input_ids)
    notes = _switch_on(model, torch.Generator().manual_seed(seed + 1), calls)
    std = _calibrate(model, input_ids, _qk_scalers(model, calls), notes)
    _amplify_position_bias(model, input_ids, calls, notes)
    logits, maps, n_other = eager_attentions(model, input_ids)
    if not torch.equal(logits, eager_attentions(model, input_ids)[0]):  # the harness needs it
        raise RuntimeError(f"{model_type}: two eager forwards on the same ids differ (a random draw "
                           "inside the forward): no reference to compare with")
    if n_other:
        notes.append(f"output_attentions also returned {n_other} tensors that are not attention maps")
    feats = _features(model, config, calls, len(maps))
    return TinyModel(model_type, model, model.config, input_ids, tuple(feats), calls, len(maps), std,
                     sum(p.numel() for p in model.parameters()), time.perf_counter() - start, notes)
