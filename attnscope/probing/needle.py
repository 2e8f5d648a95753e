"""Needle-in-a-haystack measurements: needle share of attention, retrieval heads, the grid runner.

Definitions (docs/probes.md):
- needle share of head h for query set Q and span S: mean over q in Q of sum_{j in S} P_h(q, j),
  from the exact streaming key-set path (O(T * |S|) per head), so it works at 8K-64K tokens;
  the uniform baseline is mean over q of |S ∩ visible(q)| / |visible(q)|.
- query sets: `question` (the question's tokens), `final` (the last prompt position, which
  predicts the first answer token) and `answer` (teacher-forced: the positions that predict
  each answer token, i.e. the last prompt position and the answer tokens but the last).
- retrieval score of head h (Wu et al. 2024, "Retrieval Head Mechanistically Explains
  Long-Context Factuality", arXiv 2404.15574): during greedy decoding, at each step the head
  copies if its most-attended key lies in the needle-value span and holds the token being
  generated; score = |needle-value tokens so copied| / |needle-value tokens|, averaged over the
  trials whose answer was correct.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from attnscope.capture.interface import LayerAttention, capture
from attnscope.errors import AttnscopeError
from attnscope.metrics.reductions import keyset_probs
from attnscope.probing.builder import Prompt, build_prompts
from attnscope.probing.spec import ProbeSpec, load_spec
from attnscope.progress import track

QUERY_SETS = ("question", "final", "answer")
NEEDLE_SPANS = ("needle_value", "needle_key")
RETRIEVAL_THRESHOLD = 0.1  # Wu et al. call a head a retrieval head when its score exceeds 0.1


@dataclass
class _Group:
    name: str
    rows: np.ndarray  # query positions


class NeedleRecorder:
    """Observer: attention mass on spans from groups of query positions (one unpadded row)."""

    needs_lse = True

    def __init__(self, groups: list[_Group], spans: dict[str, tuple[int, int]], layers=None):
        self.groups = groups
        self.spans = spans
        self.layers = None if layers is None else set(layers)
        self.share: dict[int, np.ndarray] = {}  # layer -> [group, span, head]
        self.uniform = np.zeros((len(groups), len(spans)))

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def observe(self, attn: LayerAttention) -> None:
        out = np.zeros((len(self.groups), len(self.spans), attn.n_heads))
        for g, group in enumerate(self.groups):
            rows = torch.as_tensor(group.rows - attn.q_offset)
            for s, (s0, s1) in enumerate(self.spans.values()):
                out[g, s] = keyset_probs(attn, 0, rows, s0, s1).sum(-1).mean(-1).cpu().numpy()
                n_vis = attn.visible(rows, 0, int(rows.max()) + attn.q_offset + 1)[0].sum(-1).double()
                in_span = attn.visible(rows, s0, s1)[0].sum(-1).double()
                self.uniform[g, s] = float((in_span / n_vis).mean())
        self.share[attn.layer] = out


class RetrievalRecorder:
    """Observer: each head's most-attended visible key for the last query row of each forward."""

    needs_lse = False

    def __init__(self, layers=None):
        self.layers = None if layers is None else set(layers)
        self.top: dict[int, torch.Tensor] = {}  # layer -> [H] key positions, for the current step

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def observe(self, attn: LayerAttention) -> None:
        row = torch.tensor([attn.query.shape[2] - 1])
        k_hi = attn.q_offset + int(row) + 1
        s = attn.scores(0, row, slice(0, k_hi))[:, 0]  # [H, K]: O(T) per head and step
        vis = attn.visible(row, 0, k_hi)[0, 0]
        self.top[attn.layer] = s.masked_fill(~vis[None], float("-inf")).argmax(-1)


def _answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"]


def needle_share(lm, prompt: Prompt, *, layers: Sequence[int] | None = None) -> xr.Dataset:
    """Needle share per (query_set, span, layer, head) for one prompt, with the uniform baseline."""
    hf_model, tokenizer = lm.model, lm.tokenizer
    answer = _answer_ids(tokenizer, prompt.answer[0]) if prompt.answer else []
    ids = list(prompt.token_ids) + answer  # teacher forcing: the first answer, appended
    L = prompt.length
    q0, q1 = prompt.spans["question"]
    groups = [_Group("question", np.arange(q0, q1)), _Group("final", np.array([L - 1])),
              _Group("answer", np.arange(L - 1, L - 1 + max(1, len(answer))))]
    spans = {name: prompt.spans[name] for name in NEEDLE_SPANS if name in prompt.spans}
    if not spans:
        raise AttnscopeError(f"prompt of probe {prompt.spec_name!r} has no needle spans")
    recorder = NeedleRecorder(groups, spans, layers)
    decoder = getattr(hf_model, "base_model", hf_model)
    device = next(hf_model.parameters()).device
    with torch.no_grad(), capture(hf_model, recorder):
        decoder(input_ids=torch.tensor([ids], device=device), use_cache=False)
    layer_ids = sorted(recorder.share)
    share = np.stack([recorder.share[k] for k in layer_ids], axis=2)  # [group, span, layer, head]
    return xr.Dataset(
        {"needle_share": (("query_set", "span", "layer", "head"), share.astype(np.float32)),
         "uniform_share": (("query_set", "span"), recorder.uniform.astype(np.float32))},
        coords={"query_set": [g.name for g in groups], "span": list(spans), "layer": layer_ids,
                "head": np.arange(share.shape[-1])})


def retrieval_scores(lm, prompt: Prompt, *, max_new_tokens: int | None = None,
                     layers: Sequence[int] | None = None) -> tuple[np.ndarray, list[int], str, bool]:
    """Greedy-decode the answer with a KV cache; return (scores [layer, head], layers, text, correct)."""
    hf_model, tokenizer = lm.model, lm.tokenizer
    device = next(hf_model.parameters()).device
    v0, v1 = prompt.spans["needle_value"]
    ids = list(prompt.token_ids)
    n_new = max_new_tokens or (len(_answer_ids(tokenizer, " ".join(prompt.answer))) + 4)
    recorder = RetrievalRecorder(layers)
    copied: dict[int, list[set[int]]] = {}
    generated: list[int] = []
    past = None
    step_input = torch.tensor([ids], device=device)
    with torch.no_grad(), capture(hf_model, recorder):
        for _ in range(n_new):
            out = hf_model(input_ids=step_input, past_key_values=past, use_cache=True,
                           logits_to_keep=1)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            seq = ids + generated
            for layer, top in recorder.top.items():
                sets = copied.setdefault(layer, [set() for _ in range(top.shape[0])])
                for h, pos in enumerate(top.tolist()):
                    if v0 <= pos < v1 and seq[pos] == token:
                        sets[h].add(pos)
            generated.append(token)
            if token == tokenizer.eos_token_id:
                break
            step_input = torch.tensor([[token]], device=device)
    layer_ids = sorted(copied)
    scores = np.array([[len(s) / (v1 - v0) for s in copied[k]] for k in layer_ids])
    text = tokenizer.decode(generated, skip_special_tokens=True)
    correct = all(a in text for a in prompt.answer)
    return scores, layer_ids, text, correct


def run_probe(lm, spec: ProbeSpec | str, *, lengths: Sequence[int] | None = None,
              depths: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
              decode: bool = True, layers: Sequence[int] | None = None,
              sink_tokens: int = 4, progress: bool | None = None) -> xr.Dataset:
    """Run a probe's grid on a loaded model; dims (length, depth, seed, ...) + per-prompt results.

    NIAH probes give `needle_share` (length, depth, seed, query_set, span, layer, head),
    `uniform_share`, `sink_mass` and, with decode=True, `retrieval_score` and `correct`.
    Natural-text probes give the core streaming metrics per (length, depth, seed).
    `spec` is a ProbeSpec, a spec file or a shipped probe's name ("niah_single"); `progress`: a
    per-prompt bar (None: in a terminal or notebook only; see attnscope.progress).
    """
    import attnscope

    if not isinstance(spec, ProbeSpec):
        spec = load_spec(spec)
    if lm.tokenizer is None:
        raise AttnscopeError(f"{lm.name} has no tokenizer; probes are built in the model's own tokens")
    prompts = build_prompts(spec, lm.tokenizer, lengths=lengths, depths=depths, seeds=seeds,
                            max_context=lm.max_positions)
    parts = []
    for p in track(prompts, f"{spec.name} on {lm.name}", unit="prompt", progress=progress):
        if spec.task == "natural_text":
            ds = attnscope.analyze(lm, token_ids=p.token_ids, layers=layers, sink_tokens=sink_tokens)
            ds = ds.drop_vars([v for v in ds.data_vars if v == "distance_profile"])
        else:
            ds = needle_share(lm, p, layers=layers)
            sinks = attnscope.analyze(lm, token_ids=p.token_ids, metrics=("sink_mass",),
                                      queries=[p.length - 1], layers=layers, sink_tokens=sink_tokens)
            ds["sink_mass"] = sinks["sink_mass"]
            if decode:
                scores, layer_ids, text, correct = retrieval_scores(lm, p, layers=layers)
                ds["retrieval_score"] = (("layer", "head"), scores.astype(np.float32))
                ds["correct"] = ((), correct)
                ds["generated"] = ((), text)
            ds["depth_actual"] = ((), p.depth_actual)
        ds = ds.drop_attrs() if hasattr(ds, "drop_attrs") else ds.assign_attrs({})
        parts.append(ds.expand_dims(prompt=[len(parts)]).assign_coords(
            length=("prompt", [p.length]), depth=("prompt", [p.depth_requested]),
            seed=("prompt", [p.seed])))
    out = xr.concat(parts, dim="prompt").set_index(prompt=["length", "depth", "seed"]).unstack("prompt")
    out.attrs.update({
        "model": lm.name, "revision": lm.revision or "", "probe": spec.name,
        "probe_hash": spec.content_hash, "task": spec.task, "sink_tokens": sink_tokens,
        "answers": json.dumps({f"{p.length}/{p.depth_requested}/{p.seed}": p.answer for p in prompts}),
        "retrieval_threshold": RETRIEVAL_THRESHOLD,
    })
    return out
