"""The seam between the batch layer and probing: load a probe spec, list its task parameters,
measure one task on one loaded model.

Everything the batch layer knows about probes is in this file:
  load_probe(path)          -> spec with .name, .task, .grid.lengths, .grid.depths, .content_hash
  task_params(spec, query_bins=None) -> the parameter dicts of its tasks (one per length x depth)
  run_task(lm, task, cache) -> xarray.Dataset with dims (length, depth, [seed,] layer, head, ...)

`natural_text` probes are measured here with `attnscope.analyze` on a shipped text. `niah` probes
go to `attnscope.probing.run_probe(lm, spec, lengths=, depths=)` (see NIAH DISPATCH below).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import xarray as xr

from attnscope.errors import ProbeBuildError
from attnscope.probing.needle import run_probe
from attnscope.probing.spec import load_spec

# Metrics a natural-text task records (every streaming metric that needs no spans, and alpha_0
# of Gu et al. for the sink rate: O(T) per head).
NATURAL_TEXT_METRICS = ("sink_mass", "token0_mass", "token0_importance", "entropy", "mean_distance",
                        "position_profile", "distance_profile")


def load_probe(path: str | Path):
    """Read and validate a probe spec: a file or a shipped probe's name."""
    return load_spec(path)


def task_params(spec, query_bins: int | None = None, received_top: int | None = None) -> list[dict[str, Any]]:
    """One task per (length, depth) of the probe's grid: the unit of resume and of failure.
    `query_bins` and `received_top` (natural-text probes) are parameters too, so a task with
    query-resolved or received variables never shares a key with one without them."""
    extra = {"query_bins": int(query_bins)} if query_bins is not None and spec.task == "natural_text" else {}
    if received_top is not None and spec.task == "natural_text":
        extra["received_top"] = int(received_top)
    return [{"length": int(L), "depth": float(d), **extra} for L in spec.grid.lengths for d in spec.grid.depths]


# bump when _natural_text measures differently (docs/batch.md, "Method versions").
# /2: records token0_importance (alpha_0 of Gu et al.) too
NATURAL_TEXT_METHOD = "analyze-window/2"
# bump when run_probe measures differently. /2: one forward per prompt, the `answer` query set on
# the greedy path, retrieval scores counted per step on the value span (docs/probes.md)
NIAH_METHOD = "run_probe/2"


def method_of(spec) -> str:
    """Which code measures this probe kind (part of the task key)."""
    return NATURAL_TEXT_METHOD if spec.task == "natural_text" else NIAH_METHOD


# ------------------------------------------------------------------------------- measuring
class TaskCache:
    """What tasks of the same model share across its checkpoints: tokenised texts, keyed by a
    fingerprint of the tokenizer (checkpoints normally share one tokenizer)."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[str, str], list[int]] = {}
        self._current: tuple[Any, str] | None = None  # (tokenizer object, its fingerprint)
        self.hits = 0

    def fingerprint(self, tokenizer) -> str:
        if self._current is None or self._current[0] is not tokenizer:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
            # holding the object (not its id) so a new tokenizer at a reused address is re-hashed
            self._current = (tokenizer, hashlib.sha1(blob.encode()).hexdigest())
        return self._current[1]

    def text_tokens(self, tokenizer, text_name: str) -> list[int]:
        from attnscope.probing.texts import load_text

        key = (self.fingerprint(tokenizer), text_name)
        if key in self.tokens:
            self.hits += 1
        else:
            self.tokens[key] = list(tokenizer(load_text(text_name), add_special_tokens=False,
                                              verbose=False)["input_ids"])
        return self.tokens[key]


def _natural_text(lm, spec, length: int, depth: float, cache: TaskCache,
                  query_bins: int | None = None, received_top: int | None = None) -> xr.Dataset:
    """Exact-length excerpts of a shipped text: start = depth x (room left), seed s moves the
    start on by s x length/4 tokens; the tokenizer's own special prefix (BOS) is kept.
    `query_bins` adds the `<metric>_by_query` variables (analyze's query_bins)."""
    from attnscope.metrics.analyze import analyze

    tok = lm.tokenizer
    if tok is None:
        raise ProbeBuildError(f"{lm.name} has no tokenizer; a natural-text probe needs one "
                              "(save it next to the weights)")
    prefix = list(tok("", add_special_tokens=True)["input_ids"])
    body = length - len(prefix)
    tokens = cache.text_tokens(tok, spec.haystack.text)
    room = len(tokens) - body
    if body < 16 or room < 0:
        raise ProbeBuildError(f"text {spec.haystack.text!r} has {len(tokens)} tokens under {lm.name}'s "
                              f"tokenizer, too few for a {length}-token excerpt")
    metrics, extra = NATURAL_TEXT_METRICS, {}
    if received_top is not None:  # attention received per key, compactly (docs/received.md)
        metrics, extra = metrics + ("received_top",), {"received_top_k": received_top}
    parts = []
    for seed in spec.seeds:
        start = min(room, round(depth * room) + seed * (length // 4))
        ids = prefix + tokens[start:start + body]
        ds = analyze(lm, token_ids=ids, metrics=metrics, query_bins=query_bins, **extra)
        parts.append(ds.expand_dims(seed=[int(seed)]).assign_coords(start=("seed", [start])))
    out = xr.concat(parts, dim="seed", combine_attrs="override") if len(parts) > 1 else parts[0]
    out = out.expand_dims(length=[length], depth=[depth])
    out.attrs.update(probe_task="natural_text", text=spec.haystack.text)
    return out


def run_task(lm, task, cache: TaskCache | None = None) -> xr.Dataset:
    """Measure one task (see attnscope.batch.plan.Task) on a loaded model."""
    cache = cache or TaskCache()
    spec, length, depth = task.spec, task.params["length"], task.params["depth"]
    if spec.task == "natural_text":
        return _natural_text(lm, spec, length, depth, cache, task.params.get("query_bins"),
                             task.params.get("received_top"))
    # needle probes: the probing layer builds the prompts and measures them
    return run_probe(lm, spec, lengths=[length], depths=[depth])
