"""TransformerLens 4.x backend: statistics from a `TransformerBridge`'s hook points.

The bridge reimplements attention (eager, one [B, H, T, S] pattern per layer at a time) and fires
`hook_rot_q` / `hook_rot_k` on the post-RoPE query and the un-expanded key. Temporary forward
hooks there hand attnscope the same q and k its own attention function sees; the row
log-sum-exp is recomputed from them in query chunks, and `StatsRecorder` does the rest. Bridges
without rotary hooks (absolute-position families, or QK norm applied after RoPE) use
`hook_pattern` instead: the statistics are then reductions of TransformerLens's own pattern.

The hooks are added with `run_with_hooks`, which removes exactly the hooks it added: hooks the
user attached beforehand (temporary or permanent) stay, fire during the run, and see their
edits reflected in the statistics.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from dataclasses import dataclass

import torch

from attnscope.backends import ModelSource, key_padding_mask, require, row_lse
from attnscope.capture.interface import LayerAttention, layer_window, _row_starts
from attnscope.errors import BackendError, UnsupportedModelError

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class PatternAttention(LayerAttention):
    """A LayerAttention backed by a full probability map instead of q and k.

    scores() returns log P, and lse is 0, so exp(score - lse) = P everywhere the recorder looks.
    Zero probabilities (underflow in the peer's softmax) are clamped to the smallest normal
    float so that log stays finite; their contribution to any metric is < 1e-36.
    """

    probs: torch.Tensor | None = None  # [B, H, T, S]
    supports_features = False  # no q and k: row metrics take the chunked pass over the map

    def scores(self, b, q_rows, keys):
        p = self.probs[b][:, q_rows][:, :, keys].float()
        return torch.log(p.clamp_min(_TINY))

    def log_probs(self, b, q_rows, keys):
        return self.scores(b, q_rows, keys)  # lse is 0: the scores already are log P


def boot_bridge(hf_model, tokenizer, name: str):
    """A TransformerBridge over a *copy* of `hf_model`.

    Booting a bridge replaces the model's attention modules in place and switches it to eager
    attention, so the user's own model is copied first and left as it was (at the cost of a
    second copy of the weights while the bridge lives).
    """
    require("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(name, hf_model=copy.deepcopy(hf_model),
                                               tokenizer=tokenizer)


_NATIVE_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # bridge -> tokenizer


def native_tokenizer(bridge):
    """The tokenizer the model ships with, for `bridge`.

    TransformerLens reloads the tokenizer it is given with `add_bos_token=True`
    (`transformer_lens.utilities.tokenize_utils.get_tokenizer_with_bos`), so `bridge.tokenizer`
    prepends a BOS token that the model's own tokenizer may not add (SmolLM2: 513 instead of 512
    tokens, sink mass off by up to 0.04). attnscope tokenises text for a bridge exactly as the
    native path does: the same tokenizer files, loaded without that override. If they cannot be
    loaded, the bridge's tokenizer is used with a warning (pass tokenizer= or token_ids=).
    """
    tok = getattr(bridge, "tokenizer", None)
    if tok is None:
        return None
    if bridge in _NATIVE_TOKENIZERS:
        return _NATIVE_TOKENIZERS[bridge]
    from transformers import AutoTokenizer

    kwargs = dict(getattr(tok, "init_kwargs", {}) or {})
    source = kwargs.pop("name_or_path", None) or getattr(tok, "name_or_path", None)
    kwargs.pop("add_bos_token", None)
    try:
        native = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # no files to reload from: keep TransformerLens's, and say so
        warnings.warn(f"could not reload the model's own tokenizer from {source!r} ({exc}); text is "
                      "tokenised with the bridge's (TransformerLens adds a BOS token): pass tokenizer= "
                      "or token_ids= for the native token ids", stacklevel=3)
        native = tok
    _NATIVE_TOKENIZERS[bridge] = native
    return native


def _hf_attention(component):
    return getattr(component, "original_component", None)


def bridge_source(bridge, tokenizer=None, hooks: str = "auto") -> ModelSource:
    """A ModelSource that runs `bridge` with temporary hooks and feeds the observer.

    hooks: "rotary" (hook_rot_q/hook_rot_k, streaming statistics), "pattern" (hook_pattern, the
    bridge's own probabilities) or "auto" (rotary where every block has the hooks).
    """
    hf_model = bridge.original_model
    config = hf_model.config
    tok = tokenizer or native_tokenizer(bridge)
    name = getattr(config, "_name_or_path", type(hf_model).__name__)
    points = set(bridge.hook_dict)
    n_layers = len(bridge.blocks)
    has_rot = all(f"blocks.{i}.attn.hook_rot_q" in points and f"blocks.{i}.attn.hook_rot_k" in points
                  for i in range(n_layers))
    # QK norm after RoPE (HunYuan) would make the rotary hooks the wrong q and k.
    use_rot = has_rot and not getattr(bridge.cfg, "qk_norm_after_rope", False)
    if hooks not in ("auto", "rotary", "pattern"):
        raise BackendError(f"hooks must be 'auto', 'rotary' or 'pattern', not {hooks!r}")
    if hooks == "rotary" and not use_rot:
        raise UnsupportedModelError("this bridge has no usable hook_rot_q/hook_rot_k on every block")
    use_rot = use_rot and hooks != "pattern"
    if not use_rot and not all(f"blocks.{i}.attn.hook_pattern" in points for i in range(n_layers)):
        raise UnsupportedModelError(
            f"this TransformerBridge ({type(hf_model).__name__}) exposes neither hook_rot_q/hook_rot_k "
            "nor hook_pattern on every block; use backend='native' on the transformers model")

    def run(observer, input_ids, attention_mask):
        if input_ids.shape[0] != 1:
            raise BackendError("backend 'transformer_lens' runs one sequence at a time; pass a single "
                               "text, or use backend='native' for a padded batch")
        wanted = [i for i in range(n_layers) if observer.wants(i)]
        if not wanted:
            return
        T = input_ids.shape[1]
        pending: dict[int, torch.Tensor] = {}

        def heads_first(x):  # TransformerLens hooks are [batch, pos, head, d_head]
            if x.shape[2] == T and x.shape[1] != T:
                return x.detach()  # already [batch, head, pos, d_head]
            return x.detach().transpose(1, 2)

        def layer_of(hook) -> int:
            return int(hook.name.split(".")[1])

        def attention(layer, query, key):
            hf_attn = _hf_attention(bridge.blocks[layer].attn)
            if isinstance(getattr(hf_attn, "sinks", None), torch.Tensor):
                # the hooks give q and k only: a learned sink's share would be silently dropped
                raise BackendError("backend 'transformer_lens' cannot see learned attention sinks "
                                   "(this model's `sinks`); use backend='native'")
            scale = float(getattr(hf_attn, "scaling", query.shape[-1] ** -0.5))
            softcap = getattr(hf_attn, "attn_logit_softcapping", None)
            mask = key_padding_mask(attention_mask, query.shape[2])
            window = layer_window(hf_attn, getattr(hf_attn, "sliding_window", None))
            if window is not None and window >= key.shape[2]:
                window = None
            return LayerAttention(layer, query, key, scale, key.shape[2] - query.shape[2], None, mask,
                                  window, None, softcap, _row_starts(mask, query.shape[0], query.device))

        def on_q(x, hook):
            pending[layer_of(hook)] = heads_first(x)

        def on_k(x, hook):
            layer = layer_of(hook)
            attn = attention(layer, pending.pop(layer), heads_first(x))
            if observer.needs_lse:
                attn.lse = row_lse(attn)
            observer.observe(attn)

        def on_pattern(p, hook):
            layer = layer_of(hook)
            B, Hp, Tq, S = p.shape
            mask = key_padding_mask(attention_mask, Tq)
            empty_q = p.new_zeros(B, Hp, Tq, 0)
            attn = PatternAttention(layer, empty_q, p.new_zeros(B, Hp, S, 0), 1.0, S - Tq,
                                    p.new_zeros(B, Hp, Tq, dtype=torch.float32), mask, None, None,
                                    None, _row_starts(mask, B, p.device), probs=p.detach())
            observer.observe(attn)

        if use_rot:
            fwd = [(f"blocks.{i}.attn.hook_rot_q", on_q) for i in wanted]
            fwd += [(f"blocks.{i}.attn.hook_rot_k", on_k) for i in wanted]
        else:
            fwd = [(f"blocks.{i}.attn.hook_pattern", on_pattern) for i in wanted]
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with torch.no_grad():
            # stop after the last wanted block: no later layers, no T x vocab logits
            bridge.run_with_hooks(input_ids, fwd_hooks=fwd, return_type=None,
                                  stop_at_layer=max(wanted) + 1, **kwargs)

    src = ModelSource(hf_model, tok, name, None, "transformer_lens", run)
    src.hook_source = "rotary" if use_rot else "pattern"
    return src
