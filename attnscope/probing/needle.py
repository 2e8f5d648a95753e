"""Needle-in-a-haystack measurements: needle share of attention, retrieval heads, the grid runner.

Definitions, defaults and references: docs/probes.md. In short:
- needle share of head h for query set Q and span S: mean over q in Q of sum_{j in S} P_h(q, j),
  from the exact streaming key-set path (O(T * |S|) per head), so it works at 8K-64K tokens;
  the uniform baseline is mean over q of |S ∩ visible(q)| / |visible(q)|.
- query sets: `question` (the question's tokens), `final` (the last prompt position, which
  predicts the first answer token) and `answer`: the positions that predict the tokens of the
  first expected answer, on the model's own greedy continuation (answer_mode="greedy", default)
  or with that answer appended to the prompt (answer_mode="teacher_forced").
- retrieval score of head h (Wu et al. 2024, "Retrieval Head Mechanistically Explains
  Long-Context Factuality", arXiv 2404.15574): during greedy decoding, at each step the head
  copies if its most-attended key lies in the needle span and holds the token being generated.
  count="steps" (their released code, default): score = copying steps / |span|;
  count="positions": distinct copied positions / |span|. span="needle_value" (default: the
  answer the model must copy, which their code locates as `real_needle`) or "needle" (the whole
  needle sentence).

One prefill per prompt (answer_mode="greedy"): the question and final shares, the sink mass, the
first retrieval step and the first answer step all come from the forward over the prompt, whose
KV cache the greedy decoding then extends one token at a time; each decoding step contributes
its single query row to the answer set and to the retrieval score.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr

from attnscope.capture.interface import LayerAttention, capture
from attnscope.errors import AttnscopeError
from attnscope.metrics.reductions import RowPlan, StatsRecorder, keyset_probs
from attnscope.metrics.span_to_span import SpanToSpanRecorder
from attnscope.probing.builder import Prompt, build_prompts
from attnscope.probing.spec import ProbeSpec, load_spec
from attnscope.progress import track

QUERY_SETS = ("question", "final", "answer")
NEEDLE_SPANS = ("needle_value", "needle_key")
ANSWER_MODES = ("greedy", "teacher_forced")
RETRIEVAL_COUNTS = ("steps", "positions")
RETRIEVAL_SPANS = ("needle_value", "needle")
# span_to_span (docs/received.md): queries of these prompt spans -> keys of these spans
QUERY_SPANS = ("question", "haystack", "needle", "final")
KEY_SPANS = ("sink", "needle", "needle_value", "question")
RETRIEVAL_THRESHOLD = 0.1  # Wu et al. call a head a retrieval head when its score exceeds 0.1
EXTRA_DECODE_STEPS = 4  # decoding runs for the answer's tokens plus this many


class NeedleRecorder:
    """Observer: exact attention mass on key spans, per group of query positions and for the last
    query row of every forward (one unpadded row; positions are token positions).

    A group is measured in the forward that holds all of its positions (the prefill);
    `last[layer]` is overwritten by every forward, so a decoding loop reads it after each step.
    The uniform baseline has no layer dim: it is taken from full-attention layers (from a
    windowed one only in a model that has no other), i.e. |S ∩ [0, i]| / (i + 1) for causal rows.
    """

    needs_lse = True

    def __init__(self, groups: dict[str, np.ndarray], spans: dict[str, tuple[int, int]],
                 layers=None):
        self.groups = groups
        self.spans = spans
        self.layers = None if layers is None else set(layers)
        self.share: dict[int, np.ndarray] = {}  # layer -> [group, span, head]
        self.uniform = np.full((len(groups), len(spans)), np.nan)
        self.last: dict[int, np.ndarray] = {}  # layer -> [span, head] of the last query row
        self.last_uniform = np.full(len(spans), np.nan)
        self._uniform_from_full = False  # has a full-attention layer set the uniform baseline?

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def observe(self, attn: LayerAttention) -> None:
        T = attn.query.shape[2]
        first = attn.key_start + attn.q_offset  # token position of query row 0
        dev = attn.query.device
        full = attn.window is None
        set_uniform = full or not self._uniform_from_full
        self._uniform_from_full |= full
        for g, positions in enumerate(self.groups.values()):
            if positions.min() >= first and positions.max() < first + T:
                rows = torch.as_tensor(positions - first, device=dev)
                share = self.share.setdefault(attn.layer, np.zeros((len(self.groups), len(self.spans),
                                                                    attn.n_heads)))
                share[g], uniform = _span_shares(attn, rows, self.spans.values())
                if set_uniform:
                    self.uniform[g] = uniform
        self.last[attn.layer], uniform = _span_shares(attn, torch.tensor([T - 1], device=dev),
                                                      self.spans.values())
        if set_uniform:
            self.last_uniform = uniform


def _span_shares(attn: LayerAttention, rows: torch.Tensor, spans) -> tuple[np.ndarray, np.ndarray]:
    """([span, head] mean over rows of the mass on each span (token positions), [span] the
    uniform baseline). A sliding-window cache may have dropped part of a span: those keys are
    invisible, so they add nothing to either."""
    share = np.stack([keyset_probs(attn, 0, rows, s0, s1).sum(-1).mean(-1).cpu().numpy()
                      for s0, s1 in spans])
    n_vis = attn.visible(rows, 0, int(rows.max()) + attn.q_offset + 1)[0].sum(-1).double()
    S = attn.key.shape[2]
    in_span = [attn.visible(rows, min(max(s0 - attn.key_start, 0), S),
                            min(max(s1 - attn.key_start, 0), S))[0].sum(-1).double()
               for s0, s1 in spans]  # key indices
    return share, np.array([float((n / n_vis).mean()) for n in in_span])


class RetrievalRecorder:
    """Observer: each head's most-attended visible key (token position) for the last query row
    of each forward."""

    needs_lse = False

    def __init__(self, layers=None):
        self.layers = None if layers is None else set(layers)
        self.top: dict[int, torch.Tensor] = {}  # layer -> [H] key positions, for the current step

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def observe(self, attn: LayerAttention) -> None:
        row = torch.tensor([attn.query.shape[2] - 1], device=attn.query.device)
        k_hi = attn.q_offset + int(row) + 1
        s = attn.scores(0, row, slice(0, k_hi))[:, 0]  # [H, K]: O(T) per head and step
        vis = attn.visible(row, 0, k_hi)[0, 0]
        self.top[attn.layer] = s.masked_fill(~vis[None], float("-inf")).argmax(-1).cpu() + attn.key_start


def _answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"]


def _measured_spans(prompt: Prompt) -> dict[str, tuple[int, int]]:
    spans = {name: prompt.spans[name] for name in NEEDLE_SPANS if name in prompt.spans}
    if not spans:
        raise AttnscopeError(f"prompt of probe {prompt.spec_name!r} has no needle spans")
    return spans


def _stack(per_layer: dict[int, np.ndarray], layer_ids: list[int]) -> np.ndarray:
    return np.stack([per_layer[k] for k in layer_ids])


def _answer_steps(tokenizer, generated: list[int], answer: str) -> list[int]:
    """Decoding steps whose token overlaps the first occurrence of `answer` in the decoded
    continuation (the same overlap rule as the builder's spans); [] when it does not occur."""
    text = tokenizer.decode(generated, skip_special_tokens=True)
    at = text.find(answer)
    if at < 0 or not answer:
        return []
    ends = [len(tokenizer.decode(generated[:k + 1], skip_special_tokens=True))
            for k in range(len(generated))]
    starts = [0] + ends[:-1]
    return [k for k, (s, e) in enumerate(zip(starts, ends)) if e > s and s < at + len(answer) and e > at]


@dataclass
class NiahMeasurement:
    """Everything measured on one NIAH prompt (see measure_niah); `to_dataset` gives run_probe's
    per-prompt result."""

    prompt: Prompt
    answer_mode: str
    layers: list[int]
    spans: list[str]  # needle_share's span coordinate
    query_sets: list[str]
    share: np.ndarray  # [query_set, span, layer, head]
    uniform: np.ndarray  # [query_set, span]
    answer_queries: int  # positions in the answer query set (0: NaN shares)
    sink_mass: np.ndarray  # [layer, head], final prompt position
    sink_tokens: int
    prompt_passes: int  # forwards over the whole prompt
    # greedy decoding (None without decode)
    generated: list[int] | None = None
    text: str | None = None
    correct: bool | None = None
    top_keys: np.ndarray | None = None  # [step, layer, head] absolute position of the top-1 key
    step_share: np.ndarray | None = None  # [step, span, layer, head] (greedy answer mode)
    step_uniform: np.ndarray | None = None  # [step, span]
    answer_steps: list[int] | None = None  # decoding steps in the greedy answer set
    kernels: dict[int, str] | None = None  # layer -> attention kernel of the prompt's forward
    span_to_span: np.ndarray | None = None  # [query span, key span, layer, head] of the prompt
    span_names: tuple[list[str], list[str]] | None = None  # (query spans, key spans)

    def retrieval_score(self, count: str = "steps", span: str = "needle_value") -> np.ndarray:
        """[layer, head] retrieval score of this trial (docs/probes.md, "Retrieval heads")."""
        _check_choice("retrieval_count", count, RETRIEVAL_COUNTS)
        _check_choice("retrieval_span", span, RETRIEVAL_SPANS)
        if self.top_keys is None:
            raise AttnscopeError("retrieval scores need greedy decoding (decode=True)")
        s0, s1 = self.prompt.spans[span]
        ids = np.asarray(self.prompt.token_ids)
        top = self.top_keys  # [step, layer, head]
        token = np.asarray(self.generated)[:, None, None]
        in_span = (top >= s0) & (top < s1)
        copies = in_span & (ids[np.where(in_span, top, 0)] == token)
        if count == "steps":
            return copies.sum(0) / (s1 - s0)
        out = np.zeros(top.shape[1:])
        for layer, head in zip(*np.nonzero(copies.any(0))):
            out[layer, head] = len(set(top[copies[:, layer, head], layer, head].tolist())) / (s1 - s0)
        return out

    def to_dataset(self, *, retrieval_count: str = "steps", retrieval_span: str = "needle_value",
                   threshold: float = RETRIEVAL_THRESHOLD) -> xr.Dataset:
        p = self.prompt
        ds = xr.Dataset(
            {"needle_share": (("query_set", "span", "layer", "head"), self.share.astype(np.float32)),
             "uniform_share": (("query_set", "span"), self.uniform.astype(np.float32)),
             "sink_mass": (("layer", "head"), self.sink_mass.astype(np.float32))},
            coords={"query_set": self.query_sets, "span": self.spans, "layer": self.layers,
                    "head": np.arange(self.share.shape[-1])})
        if "answer" in self.query_sets:
            ds["answer_queries"] = ((), self.answer_queries)
        if self.generated is not None:
            scores = self.retrieval_score(retrieval_count, retrieval_span)
            ds["retrieval_score"] = (("layer", "head"), scores.astype(np.float32))
            ds["retrieval_heads"] = ((), int((scores > threshold).sum()))
            ds["correct"] = ((), self.correct)
            ds["generated"] = ((), self.text)
        if self.span_to_span is not None:
            ds["span_to_span"] = (("query_span", "key_span", "layer", "head"), self.span_to_span.astype(np.float32))
            ds = ds.assign_coords(query_span=self.span_names[0], key_span=self.span_names[1])
        ds["depth_actual"] = ((), p.depth_actual)
        return ds


def _check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise AttnscopeError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def measure_niah(lm, prompt: Prompt, *, layers: Sequence[int] | None = None, sink_tokens: int = 4,
                 decode: bool = True, answer_mode: str = "greedy",
                 max_new_tokens: int | None = None) -> NiahMeasurement:
    """Measure one NIAH prompt: needle shares, sink mass, and (decode=True) the greedy answer
    with the top-1 key of every head at every step.

    answer_mode="greedy": ONE forward over the prompt (with a KV cache) gives the question and
    final shares and the sink mass; greedy decoding reuses the cache, and the `answer` set is
    measured at its steps. Without decode there is no greedy path and no `answer` set.
    answer_mode="teacher_forced": one forward over prompt + first expected answer gives all three
    query sets and the sink mass; decoding (for retrieval and correctness) then needs a second
    forward over the prompt.
    """
    _check_choice("answer_mode", answer_mode, ANSWER_MODES)
    hf_model, tokenizer = lm.model, lm.tokenizer
    L = prompt.length
    spans = _measured_spans(prompt)
    q0, q1 = prompt.spans["question"]
    groups = {"question": np.arange(q0, q1), "final": np.array([L - 1])}
    answer = _answer_ids(tokenizer, prompt.answer[0]) if prompt.answer else []
    if answer_mode == "teacher_forced":  # the positions that predict each answer token
        groups["answer"] = np.arange(L - 1, L - 1 + max(1, len(answer)))
    needle = NeedleRecorder(groups, spans, layers)
    sink = StatsRecorder(("sink_mass",), [RowPlan(L, np.array([L - 1]))], sink_tokens=sink_tokens,
                         layers=layers)
    flow = SpanToSpanRecorder(*_flow_spans(prompt, sink_tokens), layers)
    n_new = max_new_tokens or (len(_answer_ids(tokenizer, " ".join(prompt.answer))) + EXTRA_DECODE_STEPS)
    greedy: dict = {}
    if answer_mode == "greedy" and decode:
        greedy = _decode(lm, list(prompt.token_ids), n_new, needle=needle, prefill_only=[sink, flow],
                         layers=layers)
        passes = 1
    else:
        ids = list(prompt.token_ids) + (answer if answer_mode == "teacher_forced" else [])
        device = next(hf_model.parameters()).device
        decoder = getattr(hf_model, "base_model", hf_model)  # no logits needed
        with torch.no_grad(), capture(hf_model, needle), capture(hf_model, sink), capture(hf_model, flow):
            decoder(input_ids=torch.tensor([ids], device=device), use_cache=False)
        passes = 1
        if decode:
            greedy = _decode(lm, list(prompt.token_ids), n_new, layers=layers)
            passes = 2
    layer_ids = sorted(needle.share)
    share = np.stack([needle.share[k] for k in layer_ids], axis=2)  # [group, span, layer, head]
    uniform = needle.uniform
    m = NiahMeasurement(prompt=prompt, answer_mode=answer_mode, layers=layer_ids, spans=list(spans),
                        query_sets=list(groups), share=share, uniform=uniform,
                        answer_queries=len(groups.get("answer", ())),
                        sink_mass=_stack({k: v[0]["sink_mass"] for k, v in sink.results.items()},
                                         layer_ids),
                        sink_tokens=sink_tokens, prompt_passes=passes, kernels=dict(sink.kernels),
                        span_to_span=np.stack([flow.results[k] for k in layer_ids], axis=2),
                        span_names=(list(flow.query_spans), list(flow.key_spans)))
    if greedy:
        m.generated = greedy["generated"]
        m.text = tokenizer.decode(m.generated, skip_special_tokens=True)
        m.correct = all(a in m.text for a in prompt.answer)
        m.top_keys = np.stack([_stack(step, layer_ids) for step in greedy["top"]]).astype(np.int64)
    if answer_mode == "greedy" and decode:
        m.step_share = np.stack([np.stack([step[k] for k in layer_ids], axis=1)
                                 for step in greedy["share"]])  # [step, span, layer, head]
        m.step_uniform = np.stack(greedy["uniform"])
        steps = _answer_steps(tokenizer, m.generated, prompt.answer[0]) if prompt.answer else []
        m.answer_steps = steps
        m.answer_queries = len(steps)
        # no answer in the continuation: NaN, not 0
        ans = m.step_share[steps].mean(0) if steps else np.full(share.shape[1:], np.nan)
        ans_u = m.step_uniform[steps].mean(0) if steps else np.full(uniform.shape[1:], np.nan)
        m.query_sets = list(QUERY_SETS)
        m.share = np.concatenate([share, ans[None]])
        m.uniform = np.concatenate([uniform, ans_u[None]])
    return m


def _flow_spans(prompt: Prompt, sink_tokens: int) -> tuple[dict, dict]:
    """(query spans, key spans) of span_to_span for a NIAH prompt: question, haystack (which holds
    the needle), needle and the final prompt position -> the sink tokens, the needle, its value
    and the question."""
    L = prompt.length
    named = dict(prompt.spans, final=(L - 1, L), sink=(0, sink_tokens))
    return ({k: tuple(named[k]) for k in QUERY_SPANS if k in named},
            {k: tuple(named[k]) for k in KEY_SPANS if k in named})


def _decode(lm, ids: list[int], n_new: int, *, needle: NeedleRecorder | None = None,
            prefill_only=(), layers=None) -> dict:
    """Greedy decoding with a KV cache: one prefill over `ids`, then one single-token forward per
    new token. Records, per step (the query that predicts the step's token): every head's top-1
    key and, with `needle`, the step's span shares. `prefill_only` observers see the prefill."""
    hf_model, tokenizer = lm.model, lm.tokenizer
    device = next(hf_model.parameters()).device
    retrieval = RetrievalRecorder(layers)
    recorders = [r for r in (needle, retrieval) if r is not None]
    out = {"generated": [], "top": [], "share": [], "uniform": []}
    past = None
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for r in recorders:
            stack.enter_context(capture(hf_model, r))
        step_input = torch.tensor([ids], device=device)
        while True:
            with contextlib.ExitStack() as first:
                if past is None:
                    for obs in prefill_only:
                        first.enter_context(capture(hf_model, obs))
                result = hf_model(input_ids=step_input, past_key_values=past, use_cache=True,
                                  logits_to_keep=1)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out["top"].append({k: v.numpy().copy() for k, v in retrieval.top.items()})
            if needle is not None:
                out["share"].append({k: v.copy() for k, v in needle.last.items()})
                out["uniform"].append(needle.last_uniform.copy())
            out["generated"].append(token)
            if len(out["generated"]) >= n_new or token == tokenizer.eos_token_id:
                break
            step_input = torch.tensor([[token]], device=device)
    return out


def needle_share(lm, prompt: Prompt, *, layers: Sequence[int] | None = None) -> xr.Dataset:
    """Teacher-forced needle share per (query_set, span, layer, head) for one prompt, with the
    uniform baseline: one forward over the prompt + its first expected answer (no decoding)."""
    m = measure_niah(lm, prompt, layers=layers, decode=False, answer_mode="teacher_forced")
    return m.to_dataset()[["needle_share", "uniform_share"]]


def retrieval_heads(grid: xr.Dataset, threshold: float | None = None) -> pd.DataFrame:
    """Heads whose retrieval score, averaged over the correct trials of a run_probe result,
    exceeds `threshold` (default: the result's `retrieval_threshold` attr, 0.1), strongest first.

    Columns: layer, head, score, trials (correct trials averaged)."""
    if "retrieval_score" not in grid:
        raise AttnscopeError("this result has no retrieval scores (run_probe with decode=True)")
    threshold = float(grid.attrs.get("retrieval_threshold", RETRIEVAL_THRESHOLD) if threshold is None
                      else threshold)
    trial_dims = [d for d in grid.retrieval_score.dims if d not in ("layer", "head")]
    scores = grid.retrieval_score.where(grid.correct).mean(trial_dims)
    df = scores.to_dataframe(name="score").reset_index()[["layer", "head", "score"]]
    df["trials"] = int(grid.correct.sum())
    df = df[df.score > threshold].sort_values("score", ascending=False, kind="stable")
    return df.reset_index(drop=True)


def run_probe(lm, spec: ProbeSpec | str, *, lengths: Sequence[int] | None = None,
              depths: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
              decode: bool = True, layers: Sequence[int] | None = None,
              sink_tokens: int = 4, answer_mode: str = "greedy", retrieval_count: str = "steps",
              retrieval_span: str = "needle_value", max_new_tokens: int | None = None,
              query_bins: int | None = None, progress: bool | None = None) -> xr.Dataset:
    """Run a probe's grid on a loaded model; dims (length, depth, seed, ...) + per-prompt results.

    NIAH probes give `needle_share` (length, depth, seed, query_set, span, layer, head),
    `uniform_share`, `sink_mass`, `answer_queries` and, with decode=True, `retrieval_score`,
    `retrieval_heads`, `correct` and `generated`, from one forward over each prompt with
    answer_mode="greedy" (see measure_niah; definitions and defaults in docs/probes.md).
    Natural-text probes give the core streaming metrics per (length, depth, seed); with
    query_bins=N also per bin of query position (`<metric>_by_query`; `query_bin` is then the bin
    index, since lengths differ, and `query_bin_start` holds each prompt's bin starts).
    `spec` is a ProbeSpec, a spec file or a shipped probe's name ("niah_single"); `progress`: a
    per-prompt bar (None: in a terminal or notebook only; see attnscope.progress).
    """
    import attnscope

    _check_choice("answer_mode", answer_mode, ANSWER_MODES)
    _check_choice("retrieval_count", retrieval_count, RETRIEVAL_COUNTS)
    _check_choice("retrieval_span", retrieval_span, RETRIEVAL_SPANS)
    if not isinstance(spec, ProbeSpec):
        spec = load_spec(spec)
    if lm.tokenizer is None:
        raise AttnscopeError(f"{lm.name} has no tokenizer; probes are built in the model's own tokens")
    prompts = build_prompts(spec, lm.tokenizer, lengths=lengths, depths=depths, seeds=seeds,
                            max_context=lm.max_positions)
    if spec.task != "natural_text":
        measured = [measure_niah(lm, p, layers=layers, sink_tokens=sink_tokens, decode=decode,
                                 answer_mode=answer_mode, max_new_tokens=max_new_tokens)
                    for p in track(prompts, f"{spec.name} on {lm.name}", unit="prompt", progress=progress)]
        return niah_grid(lm, spec, measured, retrieval_count=retrieval_count,
                         retrieval_span=retrieval_span, max_new_tokens=max_new_tokens)
    parts = [attnscope.analyze(lm, token_ids=p.token_ids, layers=layers, sink_tokens=sink_tokens,
                               query_bins=query_bins, progress=False)
             for p in track(prompts, f"{spec.name} on {lm.name}", unit="prompt", progress=progress)]
    kernels = json.loads(parts[0].attrs["attention_kernels"])
    parts = [ds.drop_vars([v for v in ds.data_vars if v == "distance_profile"]) for ds in parts]
    if query_bins is not None:  # bin starts differ with the length: index them, keep the starts
        parts = [ds.assign(query_bin_start=("query_bin", ds.query_bin.values))
                 .assign_coords(query_bin=np.arange(query_bins)) for ds in parts]
    out = _grid(lm, spec, prompts, parts, sink_tokens=sink_tokens)
    out.attrs["attention_kernels"] = json.dumps(kernels)
    return out


def niah_grid(lm, spec: ProbeSpec, measured: Sequence[NiahMeasurement], *,
              retrieval_count: str = "steps", retrieval_span: str = "needle_value",
              max_new_tokens: int | None = None) -> xr.Dataset:
    """run_probe's result from measure_niah's measurements of a probe's prompts (so one set of
    measurements gives every retrieval count and span without running the model again)."""
    _check_choice("retrieval_count", retrieval_count, RETRIEVAL_COUNTS)
    _check_choice("retrieval_span", retrieval_span, RETRIEVAL_SPANS)
    parts = [m.to_dataset(retrieval_count=retrieval_count, retrieval_span=retrieval_span)
             for m in measured]
    out = _grid(lm, spec, [m.prompt for m in measured], parts, sink_tokens=measured[0].sink_tokens)
    out.attrs.update({
        "answer_mode": measured[0].answer_mode,
        "retrieval_count": retrieval_count, "retrieval_span": retrieval_span,
        "retrieval_threshold": RETRIEVAL_THRESHOLD,
        "max_new_tokens": max_new_tokens or f"answer tokens + {EXTRA_DECODE_STEPS}",
        "prompt_passes": max(m.prompt_passes for m in measured),  # forwards over each prompt
        "attention_kernels": json.dumps({str(k): v for k, v in sorted((measured[0].kernels or {}).items())}),
    })
    return out


def _grid(lm, spec: ProbeSpec, prompts: Sequence[Prompt], parts: list[xr.Dataset], *,
          sink_tokens: int) -> xr.Dataset:
    """Per-prompt datasets -> one dataset with dims (length, depth, seed, ...) and provenance."""
    parts = [(ds.drop_attrs() if hasattr(ds, "drop_attrs") else ds.assign_attrs({}))
             .expand_dims(prompt=[i]).assign_coords(length=("prompt", [p.length]),
                                                     depth=("prompt", [p.depth_requested]),
                                                     seed=("prompt", [p.seed]))
             for i, (p, ds) in enumerate(zip(prompts, parts))]
    out = xr.concat(parts, dim="prompt").set_index(prompt=["length", "depth", "seed"]).unstack("prompt")
    from attnscope.tokens.ablate import current_edit

    edit = current_edit(lm.model)
    out.attrs.update({
        "model": lm.name, "revision": lm.revision or "", "probe": spec.name,
        "probe_hash": spec.content_hash, "task": spec.task, "sink_tokens": sink_tokens,
        # as analyze records it: an edited grid is told from an unedited one
        "attention_edit": edit.describe() if edit is not None else "none",
        "answers": json.dumps({f"{p.length}/{p.depth_requested}/{p.seed}": p.answer for p in prompts}),
    })
    return out
