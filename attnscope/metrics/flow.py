"""Where attention goes: `received`, `received_top`, `kept_mass` and `span_to_span` inside
`analyze()` (formulas in docs/received.md).

`StatsRecorder` holds one `Flow` when any of these metrics is asked for. Per layer and batch row
it calls `Flow.accumulator` (a column-sum accumulator the chunked row pass fills, or None) and
`Flow.measure` (everything else), and `analyze` turns the per-row arrays into variables with
`Flow.dataset_parts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attnscope.metrics import kept, received, span_to_span

FLOW_METRICS = ("received", "received_top", "kept_mass", "span_to_span")
COLUMN_METRICS = ("received", "received_top")


@dataclass
class FlowOptions:
    """What `analyze` asked for beyond the metric names."""

    received_top_k: int = received.DEFAULT_TOP_K
    received_pass: str = "auto"
    policies: kept.PolicyGrid | None = None


class Flow:
    def __init__(self, metrics, options: FlowOptions, bins: int, n_layers: int | None = None):
        self.wanted = {m for m in metrics if m in FLOW_METRICS}
        if "kept_mass" in self.wanted and options.policies is None:
            from attnscope.errors import AttnscopeError

            raise AttnscopeError("kept_mass needs cache policies and budgets (FlowOptions.policies)")
        self.options = options
        self.bins = bins
        self.passes: dict[int, str] = {}  # layer -> the pass that computed the column sums
        self.n_layers = n_layers
        self._full: dict[int, dict[str, np.ndarray]] = {}  # batch row -> [layer, H, L] arrays
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # column sums, reused per layer
        self.columns = bool(self.wanted & set(COLUMN_METRICS)) or (
            "kept_mass" in self.wanted and options.policies is not None and options.policies.needs_received)

    def accumulator(self, attn, b: int, start: int, plan) -> received.ColumnSums | None:
        """The accumulator the chunked row pass fills with its chunks' column sums, when that
        pass is also how this layer's column sums are computed (else None)."""
        if not self.columns or received.resolve_pass(attn, self.options.received_pass) != "chunked":
            return None
        rows = self._all_rows(attn, start, plan)
        return received.ColumnSums(attn.n_heads, start, start + plan.length, attn.query.device,
                                   received.visible_counts(attn, b, rows, start, start + plan.length),
                                   self._reused(attn, b, plan))

    def _reused(self, attn, b: int, plan):
        key = (b, attn.n_heads, plan.length, str(attn.query.device))
        if key not in self._buffers:
            self._buffers[key] = (torch.empty((attn.n_heads, plan.length), dtype=torch.float64, device=attn.query.device),
                                  torch.empty(plan.length, dtype=torch.float64, device=attn.query.device))
        return self._buffers[key]

    @staticmethod
    def _all_rows(attn, start: int, plan) -> torch.Tensor:
        rows = torch.arange(start, start + plan.length, device=attn.query.device) - attn.q_offset
        return rows[rows >= 0]

    def measure(self, attn, b: int, start: int, q_rows: torch.Tensor, groups: torch.Tensor, plan,
                acc: received.ColumnSums | None) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """(group sums for `_finish`, per-row outputs) of one layer and batch row."""
        from attnscope.metrics.reductions import _group_sum

        sums: dict[str, torch.Tensor] = {}
        out: dict[str, np.ndarray] = {}
        col = None
        if self.columns:
            rows = self._all_rows(attn, start, plan)
            if acc is not None:  # the row pass covered q_rows: sum the other rows here
                rest = rows[~torch.isin(rows, q_rows)]
                received.chunked(attn, b, rest, acc)
                col, counts, kind = acc.sums, acc.counts, "chunked:shared"
            else:
                col, counts, kind = received.column_sums(attn, b, rows, start, start + plan.length,
                                                         received_pass=self.options.received_pass,
                                                         buffers=self._reused(attn, b, plan))
            self.passes[attn.layer] = kind
            into = None
            if "received" in self.wanted and self.n_layers is not None and attn.layer < self.n_layers:
                if b not in self._full:  # one array for all layers (received_outputs says why)
                    self._full[b] = {name: np.full((self.n_layers, attn.n_heads, plan.length), np.nan, np.float32)
                                     for name in ("received", "received_mean")}
                into = {name: arr[attn.layer] for name, arr in self._full[b].items()}
            per_row = received.received_outputs(
                col, counts, full="received" in self.wanted,
                top_k=self.options.received_top_k if "received_top" in self.wanted else None,
                bins=self.bins, n_rows=len(rows), into=into)
            if into is not None:  # kept in self._full only: no new object per layer outlives it
                per_row = {k: v for k, v in per_row.items() if k not in into}
            out.update(per_row)
        if "kept_mass" in self.wanted:
            grid = self.options.policies
            total = torch.zeros((plan.n_groups, attn.n_heads, len(grid.policies), len(grid.budgets)),
                                dtype=torch.float64, device=attn.query.device)

            def consume(c0, c1, kept_rows):
                total.add_(_group_sum(kept_rows, groups[c0:c1], plan.n_groups))

            kept.kept_mass_rows(attn, b, start, q_rows, grid, col, consume)
            sums["kept_mass"] = total
        if "span_to_span" in self.wanted:
            out["span_to_span"] = span_to_span.span_to_span(attn, b, start, plan.query_spans, plan.spans)
        return sums, out

    # ------------------------------------------------------------------------- the dataset
    def dataset_parts(self, recorder, seqs, single: bool) -> tuple[dict, dict, dict]:
        """(data_vars, coords, attrs) of the flow metrics, from the recorder's per-row results."""
        layer_ids = sorted(recorder.results)
        plans = recorder.plans
        data_vars: dict[str, Any] = {}
        coords: dict[str, Any] = {}
        attrs: dict[str, Any] = {}
        lead = () if single else ("sequence",)

        def stacked(name, fill=np.nan):
            per_seq = [self._full[b][name][layer_ids] if b in self._full and name in self._full[b] else
                       np.stack([recorder.results[L][b][name] for L in layer_ids]) for b in range(len(seqs))]
            if single:
                return per_seq[0]
            width = max(a.shape[-1] for a in per_seq)  # rows of different lengths: pad the key axis
            return np.stack([np.pad(a.astype(np.float64) if fill is np.nan else a,
                                    [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])],
                                    constant_values=fill) for a in per_seq])

        if "received" in self.wanted:
            for name in ("received", "received_mean"):
                data_vars[name] = (lead + ("layer", "head", "key"), stacked(name).astype(np.float32))
            coords["key"] = np.arange(max(len(s) for s in seqs))
        if "received_top" in self.wanted:
            data_vars["received_top"] = (lead + ("layer", "head", "rank"), stacked("received_top").astype(np.float32))
            data_vars["received_top_key"] = (lead + ("layer", "head", "rank"),
                                             stacked("received_top_key", fill=-1).astype(np.int64))
            data_vars["received_top_mean"] = (lead + ("layer", "head", "rank"),
                                              stacked("received_top_mean").astype(np.float32))
            data_vars["received_bins"] = (lead + ("layer", "head", "bin"), stacked("received_bins").astype(np.float32))
            coords["rank"] = np.arange(self.options.received_top_k)
            coords["bin"] = np.arange(self.bins) / self.bins
            attrs["received_top_k"] = self.options.received_top_k
        if self.columns:
            attrs["received_pass"] = json.dumps({str(k): v for k, v in sorted(self.passes.items())})
            attrs["received_pass_requested"] = self.options.received_pass
        if "kept_mass" in self.wanted:
            grid = self.options.policies
            # recorded as [layer][head, policy, budget] -> (policy, budget, layer, head)
            arr = stacked("kept_mass")
            data_vars["kept_mass"] = (lead + ("policy", "budget", "layer", "head"),
                                      np.moveaxis(arr, (-2, -1), (-4, -3)).astype(np.float32))
            if plans[0].groups is not None:
                arr = np.stack([np.stack([recorder.results[L][b]["kept_mass@groups"] for L in layer_ids])
                                for b in range(len(seqs))])
                arr = arr[0] if single else arr
                data_vars["kept_mass_by_query"] = (lead + ("policy", "budget", "layer", "head", "query_bin"),
                                                   np.moveaxis(arr, (-3, -2), (-5, -4)).astype(np.float32))
            coords["policy"] = [p.label for p in grid.policies]
            coords["budget"] = np.array(grid.budgets)
        if "span_to_span" in self.wanted:
            # recorded as [layer][query span, span, head] -> (query_span, span, layer, head)
            arr = stacked("span_to_span")
            data_vars["span_to_span"] = (lead + ("query_span", "span", "layer", "head"),
                                         np.moveaxis(arr, -4, -2).astype(np.float32))
            coords["query_span"] = list(plans[0].query_spans)
            coords["span"] = list(plans[0].spans)
            attrs["query_spans"] = json.dumps({k: list(v) for k, v in plans[0].query_spans.items()})
        return data_vars, coords, attrs


# ----------------------------------------------------------------------------- the CLI's checks
def check_cli_options(names: tuple[str, ...], received_flag: bool, received_top: int | None, received_pass: str,
                      query_span: str | None, spans: dict) -> tuple[tuple[str, ...], dict]:
    """analyze's --received, --received-top K, --received-pass, --query-span (before any load):
    (metric names, keyword arguments for attnscope.analyze)."""
    from attnscope.errors import AttnscopeError

    kwargs: dict[str, Any] = {"received_pass": received.check_received_pass(received_pass, "--received-pass")}
    if received_flag and "received" not in names:
        names = names + ("received",)
    if received_top is not None:
        kwargs["received_top_k"] = received.check_top_k(received_top, "--received-top")
        if "received_top" not in names:
            names = names + ("received_top",)
    if query_span:
        if not spans:
            raise AttnscopeError("--query-span needs key spans too: --span NAME=START:END[,...]")
        kwargs["query_spans"] = span_to_span.parse_spans(query_span, "--query-span", default_name="query")
    return names, kwargs


def check_cli_inputs(kwargs: dict, n_tokens: int) -> None:
    """Query spans against the input's length (before any load)."""
    if kwargs.get("query_spans"):
        span_to_span.check_spans(kwargs["query_spans"], n_tokens, "--query-span")
