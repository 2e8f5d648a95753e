"""`analyze()`: tokens in, a labelled xarray Dataset of per-layer, per-head statistics out."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr

from attnscope.capture.interface import kernel_settings, layer_window
from attnscope.capture.queries import DEFAULT_MIN_POSITION, QuerySelection, query_bins as _query_bins
from attnscope.errors import AttnscopeError, InputTooLongError, MemoryGuardError
from attnscope.metrics.flow import FLOW_METRICS
from attnscope.models.introspect import config_value, decoder_layers, text_config
from attnscope.metrics.reductions import (
    ALL_METRICS,
    DEFAULT_METRICS,
    ROW_PASSES,
    RowPlan,
    StatsRecorder,
)
from attnscope.progress import bar as progress_bar
from attnscope.validate import check_count, check_metrics, check_sink_tokens, is_out_of_memory, out_of_memory_error

# Full maps beyond this many bytes are refused (override with pattern_limit_bytes=).
PATTERN_LIMIT_BYTES = 2 << 30

DIMS = {
    "sink_mass": ("layer", "head"),
    "token0_mass": ("layer", "head"),
    "token0_importance": ("layer", "head"),
    "learned_sink_mass": ("layer", "head"),
    "span_mass": ("span", "layer", "head"),
    "entropy": ("layer", "head"),
    "mean_distance": ("layer", "head"),
    "position_profile": ("layer", "head", "bin"),
    "distance_profile": ("layer", "head", "distance_bin"),
    "pattern": ("layer", "head", "query", "key"),
}


def _resolve(model, tokenizer, backend):
    """Which model and which backend: a LoadedModel, a transformers model, a TransformerLens
    bridge or an nnsight model (see attnscope/backends; peers are imported only when used)."""
    from attnscope.backends import resolve

    return resolve(model, tokenizer, backend)


# Tokens beyond what is kept: a text read only in part is tokenised until its first N tokens no
# longer change as more is read (a word cut at the end of a prefix changes only the last tokens).
_TOKEN_MARGIN = 16


def read_tokens(tokenizer, prefixes, limit: int | None) -> tuple[list[int], bool]:
    """(token ids, whole text) of ever longer prefixes of a text (`string_prefixes`, or
    validate.text_prefixes for a file), tokenised only until the first `limit` tokens are known:
    two prefixes, the second twice as long, both with more than `limit` + a margin tokens and
    agreeing on the first `limit`. With no limit, or a text that ends first, the whole text."""
    earlier = None
    for text, complete in prefixes:
        ids = tokenizer(text)["input_ids"]
        if complete:
            return ids, True
        if limit is not None and len(ids) > limit + _TOKEN_MARGIN:
            if earlier is not None and earlier[:limit] == ids[:limit]:
                return ids, False
            earlier = ids
    raise AssertionError("the prefixes end with the whole text")


def string_prefixes(text: str, first: int):
    """(prefix, complete) of `text`: `first` characters, then twice as many, ..., then all of it."""
    size = first
    while size < len(text):
        yield text[:size], False
        size *= 2
    yield text, True


def _tokenize(tokenizer, text, token_ids, max_tokens) -> list[list[int]]:
    if (text is None) == (token_ids is None):
        raise AttnscopeError("pass exactly one of text= or token_ids=")
    if text is not None:
        if tokenizer is None:
            raise AttnscopeError("text needs a tokenizer: pass tokenizer= or a LoadedModel")
        texts = [text] if isinstance(text, str) else list(text)
        # with max_tokens, a long text is tokenised only as far as its first max_tokens need
        # (a 40 MB string and max_tokens=64 costs a few KB of tokenising, not 6 GB)
        first = None if max_tokens is None else max(4096, 16 * max_tokens)
        seqs = [tokenizer(t, add_special_tokens=True)["input_ids"] if first is None or len(t) <= first
                else read_tokens(tokenizer, string_prefixes(t, first), max_tokens)[0] for t in texts]
    else:
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
        seqs = [list(ids)] if ids and isinstance(ids[0], (int, np.integer)) else [list(s) for s in ids]
    if max_tokens is not None:
        seqs = [s[:max_tokens] for s in seqs]
    if any(len(s) == 0 for s in seqs):
        raise AttnscopeError("an input has no tokens")
    return seqs


def model_depth(hf_model) -> int:
    """Decoder layers: the text config's count, else the decoder layers found in the model
    (BLT's config has per-part counts only)."""
    n = config_value(text_config(hf_model), "num_hidden_layers")
    if n is None:
        n = len(decoder_layers(hf_model) or ())
    return int(n)


def model_heads(hf_model) -> int:
    """The most query heads any attention layer has (0 where the config does not say)."""
    return int(config_value(text_config(hf_model), "num_attention_heads") or 0)


def _layer_types(config) -> list[str] | None:
    types = config_value(config, "layer_types")
    return list(types) if types else None


def analyze(
    model,
    text: str | Sequence[str] | None = None,
    *,
    token_ids=None,
    tokenizer=None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    queries: str | QuerySelection | Sequence[int] = "all",
    min_query_position: int = DEFAULT_MIN_POSITION,
    sink_tokens: int = 4,
    spans: dict[str, tuple[int, int]] | None = None,
    bins: int = 32,
    layers: Sequence[int] | None = None,
    max_tokens: int | None = None,
    pattern_limit_bytes: int = PATTERN_LIMIT_BYTES,
    backend: str | None = None,
    query_bins: int | None = None,
    kernel: str = "auto",
    row_pass: str = "auto",
    progress: bool | None = None,
    query_spans: dict[str, tuple[int, int]] | None = None,
    received_top_k: int = 16,
    received_pass: str = "auto",
    policies=None,
    budgets: Sequence[int] | None = None,
) -> xr.Dataset:
    """Exact attention statistics per layer and query head of `model` on `text`.

    One string gives dims (layer, head, ...); a list of strings is run as one left-padded batch
    and gains a leading `sequence` dim. Spans are token ranges [start, end) within the text.
    See docs/metrics.md for each metric's formula and defaults.

    `model` may also be a TransformerLens `TransformerBridge` or an nnsight model; `backend`
    ("native", "transformer_lens", "nnsight"; default: the model's own kind, native for a
    LoadedModel or transformers model) says where attention is read from (docs/backends.md).

    query_bins=N also reports every metric per bin of query position: variables
    `<metric>_by_query` with a trailing `query_bin` dim (N equal-width bins over the selected
    queries; coordinate = bin start) from the same pass. kernel= forces an attention kernel
    ("auto", "flex", "cpu_flash", "grouped", "reference"); row_pass= chooses how row metrics are
    computed ("auto": the feature pass on GPU, chunked on CPU; "features"; "chunked").
    `progress`: a per-layer bar (None: in a terminal or notebook only; see attnscope.progress).

    Where attention goes (docs/received.md): metrics "received" (attention received by every key,
    dims layer, head, key), "received_top" (the `received_top_k` keys that receive most, and
    key-position bins: compact), "kept_mass" (the mass each selected query keeps under cache
    `policies` x `budgets`, e.g. policies=("streaming", "window", "static_topk"),
    budgets=(64, 256); added when policies are given) and "span_to_span" (queries in each of
    `query_spans` -> keys in each of `spans`; added when query_spans are given).
    `received_pass`: "auto", "chunked" or "swapped" (how the column sums are computed).
    """
    from attnscope.metrics.flow import Flow

    source = _resolve(model, tokenizer, backend)
    hf_model, tokenizer, name, revision = source.hf_model, source.tokenizer, source.name, source.revision
    metrics = tuple(metrics)
    flow_options, metrics = _flow_options(metrics, query_spans, spans, received_top_k, received_pass,
                                          policies, budgets, sink_tokens)
    if spans and "span_mass" not in metrics:
        metrics = metrics + ("span_mass",)
    if "span_mass" in metrics and not spans:
        raise AttnscopeError("span_mass needs spans={'name': (start, end)} (token indices, end exclusive)")
    check_metrics(metrics, ALL_METRICS)
    check_count("max_tokens", max_tokens)
    if row_pass not in ROW_PASSES:
        raise AttnscopeError(f"row_pass must be one of {', '.join(ROW_PASSES)}, not {row_pass!r}")
    seqs = _tokenize(tokenizer, text, token_ids, max_tokens)
    check_sink_tokens(sink_tokens, min(len(s) for s in seqs))
    config = text_config(hf_model)
    max_pos = config_value(config, "max_position_embeddings")
    longest = max(len(s) for s in seqs)
    if max_pos and longest > max_pos:
        raise InputTooLongError(
            f"the input has {longest} tokens but {name} has a context of {max_pos}; "
            f"pass max_tokens={max_pos} (CLI --max-tokens) to analyse its first {max_pos} tokens")
    selection = QuerySelection.parse(queries, min_position=min_query_position)
    spans = dict(spans or {})
    plans = []
    for s in seqs:
        for span_name, (s0, s1) in spans.items():
            if not 0 <= s0 < s1 <= len(s):
                raise AttnscopeError(
                    f"span {span_name!r} = [{s0}, {s1}) is not inside the {len(s)}-token input")
        _check_flow_input(flow_options, query_spans, len(s))
        plan = RowPlan(len(s), selection.resolve(len(s)), spans, query_spans=dict(query_spans or {}))
        if query_bins is not None:
            plan.groups, plan.group_starts = _query_bins(plan.queries, query_bins)
            plan.n_groups = int(query_bins)
        plans.append(plan)

    n_layers = model_depth(hf_model)
    if "pattern" in metrics:
        heads = max(model_heads(hf_model), 1)
        size = sum(4 * heads * n_layers * len(s) ** 2 for s in seqs)
        if size > pattern_limit_bytes:
            raise MemoryGuardError(
                f"full attention maps for {longest} tokens x {n_layers} layers x {heads} heads need "
                f"{size / 2**30:.1f} GiB (limit {pattern_limit_bytes / 2**30:.1f} GiB); use the "
                "streaming metrics, fewer layers (layers=...) or a shorter input")

    device = next(hf_model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for b, s in enumerate(seqs):  # left padding: every row ends at the last column
        input_ids[b, longest - len(s):] = torch.tensor(s)
        attention_mask[b, longest - len(s):] = 1
    flow = Flow(metrics, flow_options, bins, n_layers) if flow_options is not None else None
    recorder = StatsRecorder(metrics, plans, sink_tokens=sink_tokens, bins=bins, layers=layers,
                             max_length=longest, row_pass=row_pass, flow=flow,
                             learned_sinks_auto=metrics == tuple(DEFAULT_METRICS))
    wanted = sum(recorder.wants(i) for i in range(n_layers))
    try:
        with kernel_settings(kernel), progress_bar(wanted, f"{name}: {longest} tokens", unit="layer",
                                                   progress=progress) as bar:
            source.run(bar.watch(recorder), input_ids.to(device),
                       attention_mask.to(device) if len(seqs) > 1 else None)
    except Exception as exc:
        if is_out_of_memory(exc):  # one line naming the length and what to lower (docs/refusals.md)
            raise out_of_memory_error(longest, device) from exc
        raise
    if not recorder.results:
        raise AttnscopeError(
            f"{type(hf_model).__name__} produced no attention through attnscope's attention "
            "function; it may not use transformers' AttentionInterface")
    metrics = recorder.metrics  # learned_sink_mass may have joined (a model with learned sinks)
    ds = _to_dataset(recorder, metrics, seqs, selection, spans, name, revision, hf_model,
                     sink_tokens, bins, n_layers)
    ds.attrs["backend"] = source.backend
    ds.attrs["kernel_requested"] = kernel
    ds.attrs["attention_kernels"] = json.dumps({str(k): v for k, v in sorted(recorder.kernels.items())})
    ds.attrs["row_pass"] = json.dumps({str(k): v for k, v in sorted(recorder.row_passes.items())})
    return ds


def _layer_value(recorder, layer, b: int, name: str) -> np.ndarray:
    """One layer's result, on the model's widest head axis: a layer with fewer query heads
    (models whose head count varies by layer) is NaN on the heads it lacks. learned_sink_mass
    of a layer without a learned sink is 0."""
    values = recorder.results[layer][b]
    n_heads = recorder.n_heads[layer]
    if name not in values and name.startswith("learned_sink_mass"):
        value = np.zeros((n_heads,) if name == "learned_sink_mass"
                         else (n_heads, recorder.plans[b].n_groups))
    else:
        value = values[name]
    missing = max(recorder.n_heads.values()) - n_heads
    if missing:
        axis = 1 if name.startswith("span_mass") else 0
        widths = [(0, 0)] * value.ndim
        widths[axis] = (0, missing)
        value = np.pad(value.astype(np.float64), widths, constant_values=np.nan)
    return value


def _to_dataset(recorder, metrics, seqs, selection, spans, name, revision, hf_model, sink_tokens,
                bins, n_layers) -> xr.Dataset:
    config = text_config(hf_model)
    layer_ids = list(recorder.results)  # in call order: decoder order, a layer's calls in turn
    single = len(seqs) == 1
    data_vars = {}
    for m in metrics:
        if recorder.flow is not None and m in FLOW_METRICS:
            continue  # their variables: Flow.dataset_parts, below
        per_seq = [np.stack([_layer_value(recorder, L, b, m) for L in layer_ids]) for b in range(len(seqs))]
        dims = DIMS[m]
        if m == "span_mass":  # recorded as [layer][span, head] -> (span, layer, head)
            per_seq = [a.transpose(1, 0, 2) for a in per_seq]
        if m == "pattern" and not single:
            raise AttnscopeError("full patterns are computed for one text at a time")
        arr = per_seq[0] if single else np.stack(per_seq)
        data_vars[m] = (dims if single else ("sequence",) + dims, arr.astype(np.float32))
        if recorder.plans[0].groups is not None and m not in ("pattern", "token0_importance"):
            binned = [np.stack([_layer_value(recorder, L, b, m + "@groups") for L in layer_ids])
                      for b in range(len(seqs))]
            if m == "span_mass":
                binned = [a.transpose(1, 0, 2, 3) for a in binned]
            arr = binned[0] if single else np.stack(binned)
            data_vars[m + "_by_query"] = ((dims if single else ("sequence",) + dims) + ("query_bin",),
                                          arr.astype(np.float32))
    coords: dict[str, Any] = {"layer": layer_ids, "head": np.arange(max(recorder.n_heads.values()))}
    if len(set(recorder.n_heads.values())) > 1:  # head count varies by layer: say which exist
        coords["n_heads"] = ("layer", [recorder.n_heads[L] for L in layer_ids])
    if any(recorder.calls.get(L, (None, 0))[1] for L in layer_ids):
        # a layer attended more than once per forward (cycles, shared blocks): which call is which
        coords["decoder_layer"] = ("layer", [-1 if recorder.calls[L][0] is None else recorder.calls[L][0]
                                             for L in layer_ids])
        coords["call"] = ("layer", [recorder.calls[L][1] for L in layer_ids])
    flow_attrs = {}
    if recorder.flow is not None:
        flow_vars, flow_coords, flow_attrs = recorder.flow.dataset_parts(recorder, seqs, single)
        data_vars.update(flow_vars)
        coords.update(flow_coords)
    if "position_profile" in metrics:
        coords["bin"] = np.arange(bins) / bins
    if "distance_profile" in metrics:
        coords["distance_bin"] = recorder.dist_edges
    if "span_mass" in metrics:
        coords["span"] = list(spans)
    if "pattern" in metrics:
        coords["query"] = np.arange(len(seqs[0]))
        coords["key"] = np.arange(len(seqs[0]))
    plans = recorder.plans
    if plans[0].groups is not None:
        counts = [np.bincount(p.groups, minlength=p.n_groups) for p in plans]
        if single:  # coordinate = first position of each bin
            coords["query_bin"] = plans[0].group_starts
            data_vars["query_count"] = (("query_bin",), counts[0])
        else:  # each row has its own bins: index coordinate, per-row starts as a variable
            coords["query_bin"] = np.arange(plans[0].n_groups)
            data_vars["query_bin_start"] = (("sequence", "query_bin"), np.stack([p.group_starts for p in plans]))
            data_vars["query_count"] = (("sequence", "query_bin"), np.stack(counts))
    types = _layer_types(config)
    skipped = [i for i in range(n_layers) if i not in recorder.results]
    if recorder.layers is not None:
        skipped = [i for i in skipped if i in recorder.layers]
    reasons = {i: (types[i] if types and i < len(types) else "no attention call") for i in skipped}
    reasons.update({i: why for i, why in recorder.skipped.items() if i not in recorder.results})
    windows = {}
    for mod in hf_model.modules():
        idx = getattr(mod, "layer_idx", None)
        if idx is not None and idx in recorder.results and type(mod).__name__.endswith("Attention"):
            windows[int(idx)] = layer_window(mod, getattr(mod, "sliding_window", None))
    import transformers

    import attnscope

    attrs = {
        "model": name,
        "revision": revision or "",
        "model_class": type(hf_model).__name__,
        "dtype": str(next(hf_model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(hf_model.parameters()).device),
        "n_tokens": json.dumps([len(s) for s in seqs]) if not single else len(seqs[0]),
        "queries": selection.describe(),
        "query_positions": json.dumps([p.queries.tolist() for p in recorder.plans] if not single
                                      else recorder.plans[0].queries.tolist()),
        "sink_tokens": sink_tokens,
        "spans": json.dumps({k: list(v) for k, v in spans.items()}),
        "attention_layers": json.dumps(layer_ids),
        "skipped_layers": json.dumps({str(i): why for i, why in sorted(reasons.items())}),
        "windows": json.dumps({str(k): v for k, v in windows.items()}),
        "windows_assumed": bool(getattr(hf_model, "_attnscope_windows_assumed", False)),
        # repairs and assumptions attnscope.load() made (flat rope theta, assumed window layout)
        "load_fixes": json.dumps(list(getattr(hf_model, "_attnscope_load_fixes", []))),
        "attnscope_version": attnscope.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    edit = next((getattr(m, "_attnscope_edit", None) for m in hf_model.modules()
                 if getattr(m, "_attnscope_edit", None) is not None), None)
    attrs["attention_edit"] = edit.describe() if edit is not None else "none"
    attrs.update(flow_attrs)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _flow_options(metrics, query_spans, spans, received_top_k, received_pass, policies, budgets,
                  sink_tokens):
    """(FlowOptions or None, metrics with span_to_span / kept_mass added where their inputs are
    given), every argument checked (attnscope/metrics/flow.py)."""
    from attnscope.metrics.flow import FLOW_METRICS, FlowOptions
    from attnscope.metrics.kept import PolicyGrid
    from attnscope.metrics.received import check_received_pass, check_top_k

    check_top_k(received_top_k)
    check_received_pass(received_pass)
    if query_spans and "span_to_span" not in metrics:
        metrics = metrics + ("span_to_span",)
    if "span_to_span" in metrics and not (query_spans and spans):
        raise AttnscopeError("span_to_span needs query_spans={'name': (start, end)} and spans={'name': "
                             "(start, end)} (token indices, end exclusive)")
    if policies is not None and "kept_mass" not in metrics:
        metrics = metrics + ("kept_mass",)
    grid = None
    if "kept_mass" in metrics:
        if policies is None or budgets is None:
            raise AttnscopeError("kept_mass needs policies= (streaming[:S], window, static_topk) and "
                                 "budgets= (cache sizes in tokens)")
        grid = PolicyGrid.make(policies, budgets, default_sinks=sink_tokens)
    if not any(m in FLOW_METRICS for m in metrics):
        return None, metrics
    return FlowOptions(received_top_k=int(received_top_k), received_pass=received_pass, policies=grid), metrics


def _check_flow_input(options, query_spans, n_tokens: int) -> None:
    """Query spans and cache budgets against one input's length."""
    from attnscope.metrics.span_to_span import check_spans

    if query_spans:
        check_spans(query_spans, n_tokens, "query span")
    if options is not None and options.policies is not None:
        options.policies.check(n_tokens)
