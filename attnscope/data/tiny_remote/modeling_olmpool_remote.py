"""Tiny stand-ins for OlmPool's remote-code model classes, written by attnscope.testing.

This file is copied into a saved checkpoint folder; its config.json maps to these classes
through ``auto_map``, so loading needs ``trust_remote_code=True``. It mimics three classes the
OlmPool checkpoints load as:

- ``Olmo3PreorderForCausalLM`` (``olmo3_preorder``): pre-norm blocks, layerwise QK norm.
- ``Olmo3PreorderNoQKForCausalLM`` (``olmo3_preorder_no_qk``): pre-norm blocks, no QK norm.
- ``Olmo2HeadwiseQKNormForCausalLM`` (``olmo2_headwise_qknorm``): Olmo 2 post-norm blocks,
  headwise QK norm.

It reproduces the reported sliding-window defect on purpose: the configs carry
``sliding_window`` but no ``layer_types``; the attention layers hard-code the 3 sliding : 1 full
pattern and pass ``sliding_window=`` to the attention kernel, while the model builds ONE plain
causal mask for all layers. The sdpa and eager kernels ignore ``sliding_window``, so every layer
runs full attention.
"""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.olmo2.configuration_olmo2 import Olmo2Config
from transformers.models.olmo2.modeling_olmo2 import (
    Olmo2MLP,
    Olmo2RMSNorm,
    Olmo2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


@strict
class Olmo3PreorderConfig(Olmo2Config):
    model_type = "olmo3_preorder"
    sliding_window: int | None = 4096


@strict
class Olmo3PreorderNoQKConfig(Olmo2Config):
    model_type = "olmo3_preorder_no_qk"
    sliding_window: int | None = 4096


@strict
class Olmo2HeadwiseQKNormConfig(Olmo2Config):
    model_type = "olmo2_headwise_qknorm"
    sliding_window: int | None = None


class RemoteAttention(nn.Module):
    def __init__(self, config, layer_idx, qk_norm):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.qk_norm = qk_norm
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if qk_norm == "layerwise":
            self.q_norm = Olmo2RMSNorm(self.num_heads * self.head_dim, config.rms_norm_eps)
            self.k_norm = Olmo2RMSNorm(self.num_key_value_heads * self.head_dim, config.rms_norm_eps)
        elif qk_norm == "headwise":
            self.q_norm = Olmo2RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = Olmo2RMSNorm(self.head_dim, config.rms_norm_eps)
        window = getattr(config, "sliding_window", None)
        # Hard-coded OlmPool pattern (no layer_types in the config): layer i is full iff (i+1) % 4 == 0.
        self.sliding_window = window if (window and (layer_idx + 1) % 4 != 0) else None

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states)
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        if self.qk_norm == "layerwise":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
        if self.qk_norm == "headwise":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,  # the defect: the mask below never applies it
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class RemoteDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx, qk_norm, norm_order):
        super().__init__()
        self.norm_order = norm_order
        self.self_attn = RemoteAttention(config, layer_idx, qk_norm)
        self.mlp = Olmo2MLP(config)
        if norm_order == "pre":  # Llama order: normalise the block input
            self.input_layernorm = Olmo2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.post_attention_layernorm = Olmo2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:  # Olmo 2 order: normalise the block output
            self.post_attention_layernorm = Olmo2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.post_feedforward_layernorm = Olmo2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None, **kwargs):
        if self.norm_order == "pre":
            attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                                     past_key_values, **kwargs)
            hidden_states = hidden_states + attn
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        attn, _ = self.self_attn(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        hidden_states = hidden_states + self.post_attention_layernorm(attn)
        return hidden_states + self.post_feedforward_layernorm(self.mlp(hidden_states))


class RemotePreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    _no_split_modules = ["RemoteDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    qk_norm = "layerwise"
    norm_order = "pre"


class _RemoteModel(RemotePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [RemoteDecoderLayer(config, i, self.qk_norm, self.norm_order) for i in range(config.num_hidden_layers)]
        )
        self.norm = Olmo2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Olmo2RotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        # The defect: one plain causal mask for every layer, sliding or not.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                                  past_key_values=past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class _RemoteForCausalLM(RemotePreTrainedModel, GenerationMixin):
    model_class = _RemoteModel

    def __init__(self, config):
        super().__init__(config)
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


class Olmo3PreorderModel(_RemoteModel):
    config_class = Olmo3PreorderConfig
    qk_norm, norm_order = "layerwise", "pre"


class Olmo3PreorderForCausalLM(_RemoteForCausalLM):
    config_class = Olmo3PreorderConfig
    model_class = Olmo3PreorderModel
    qk_norm, norm_order = "layerwise", "pre"


class Olmo3PreorderNoQKModel(_RemoteModel):
    config_class = Olmo3PreorderNoQKConfig
    qk_norm, norm_order = "none", "pre"


class Olmo3PreorderNoQKForCausalLM(_RemoteForCausalLM):
    config_class = Olmo3PreorderNoQKConfig
    model_class = Olmo3PreorderNoQKModel
    qk_norm, norm_order = "none", "pre"


class Olmo2HeadwiseQKNormModel(_RemoteModel):
    config_class = Olmo2HeadwiseQKNormConfig
    qk_norm, norm_order = "headwise", "post"


class Olmo2HeadwiseQKNormForCausalLM(_RemoteForCausalLM):
    config_class = Olmo2HeadwiseQKNormConfig
    model_class = Olmo2HeadwiseQKNormModel
    qk_norm, norm_order = "headwise", "post"
