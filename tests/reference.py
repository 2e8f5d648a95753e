"""Reference metrics computed the obvious way from eager attention maps (the parity standard)."""

from __future__ import annotations

import numpy as np
import torch

from attnscope.metrics.reductions import distance_bin_edges


def eager_maps(hf_model, input_ids, attention_mask=None):
    """{layer: [B, H, T, T]} probabilities from eager attention with output_attentions=True."""
    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf_model(input_ids=input_ids, attention_mask=attention_mask,
                           output_attentions=True, use_cache=False)
    finally:
        hf_model.set_attn_implementation(previous)
    maps = [a.float().numpy() for a in out.attentions if a is not None]
    n = hf_model.config.num_hidden_layers
    if len(maps) == n:
        return dict(enumerate(maps))
    # hybrids return maps for their attention layers only
    types = hf_model.config.layer_types
    return dict(zip([i for i in range(n) if types[i] != "linear_attention"], maps))


def reference_metrics(P: np.ndarray, queries: np.ndarray, *, sink_tokens=4, spans=None, bins=32,
                      max_length=None) -> dict[str, np.ndarray]:
    """P: [H, L, L] probabilities of one unpadded row (query x key)."""
    H, L, _ = P.shape
    Pq = P[:, queries, :].astype(np.float64)  # [H, Q, L]
    j = np.arange(L)
    d = queries[:, None] - j[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(Pq > 0, Pq * np.log(Pq), 0.0)
    out = {
        "sink_mass": Pq[:, :, :sink_tokens].sum(-1).mean(-1),
        "token0_mass": Pq[:, :, 0].mean(-1),
        "entropy": -plogp.sum(-1).mean(-1),
        "mean_distance": (Pq * np.clip(d, 0, None)[None]).sum(-1).mean(-1),
    }
    bin_of = (j * bins) // L
    out["position_profile"] = np.stack([Pq[:, :, bin_of == b].sum(-1).mean(-1) for b in range(bins)], -1)
    edges = distance_bin_edges(max_length or L)
    dist_bin = np.searchsorted(edges, np.clip(d, 0, None), side="right") - 1
    out["distance_profile"] = np.stack(
        [np.where((dist_bin == k)[None], Pq, 0).sum(-1).mean(-1) for k in range(len(edges))], -1)
    if spans:
        out["span_mass"] = np.stack([Pq[:, :, s0:s1].sum(-1).mean(-1) for s0, s1 in spans.values()])
    return out


class QKRecorder:
    """Observer that keeps each layer's query, key and visibility rule (for fp64 references)."""

    needs_lse = False

    def __init__(self):
        self.layers = {}

    def wants(self, layer):
        return True

    def observe(self, attn):
        self.layers[attn.layer] = attn


def captured_qk(hf_model, input_ids, attention_mask=None):
    """{layer: LayerAttention} of one forward through attnscope's reference kernel."""
    from attnscope.capture.interface import capture, kernel_settings

    rec = QKRecorder()
    kwargs = {} if attention_mask is None else {
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad(), kernel_settings("reference"), capture(hf_model, rec):
        hf_model(input_ids=input_ids, use_cache=False, **kwargs)
    return rec.layers


def fp64_maps(attn, b: int = 0) -> np.ndarray:
    """[H, T, S] probabilities of batch row b in float64 from the captured q and k, computed
    directly: softmax over the visible keys of scale * q . k (soft-capped if the model does)."""
    q = attn.query[b].double()
    k = attn.key[b].double().repeat_interleave(attn.n_rep, dim=0)
    s = q @ k.transpose(-1, -2) * attn.scale
    if attn.softcap:
        s = torch.tanh(s / attn.softcap) * attn.softcap
    T = q.shape[1]
    vis = attn.visible(torch.arange(T), 0, k.shape[1])[b]
    return torch.softmax(s.masked_fill(~vis[None], float("-inf")), dim=-1).nan_to_num(0.0).numpy()
