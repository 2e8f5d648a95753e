"""The seam between the batch layer and probing: load a probe spec, list its task parameters,
measure one task on one loaded model.

Everything the batch layer knows about probes is in this file:
  load_probe(path)          -> spec with .name, .task, .grid.lengths, .grid.depths, .content_hash
  task_params(spec)         -> the parameter dicts of its tasks (one per length x depth)
  run_task(lm, task, cache) -> xarray.Dataset with dims (length, depth, [seed,] layer, head, ...)

`natural_text` probes are measured here with `attnscope.analyze` on a shipped text. `niah` probes
go to `attnscope.probing.run_probe(lm, spec, lengths=, depths=)` (see NIAH DISPATCH below).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr

from attnscope.errors import ProbeBuildError, SpecError

# Metrics a natural-text task records (every streaming metric that needs no spans).
NATURAL_TEXT_METRICS = ("sink_mass", "token0_mass", "entropy", "mean_distance", "position_profile",
                        "distance_profile")


# ------------------------------------------------------------------------------- probe specs
@dataclass(frozen=True)
class _Grid:
    lengths: tuple[int, ...]
    depths: tuple[float, ...]


@dataclass(frozen=True)
class _Haystack:
    text: str = "loc_workshop"


@dataclass(frozen=True)
class _FallbackSpec:
    """Read while attnscope.probing.spec is not installed: only what the batch layer uses."""

    name: str
    task: str
    grid: _Grid
    seeds: tuple[int, ...]
    haystack: _Haystack
    content_hash: str
    source: str = field(default="", compare=False)


def _load_fallback(path: Path) -> _FallbackSpec:
    # Compatibility reader until attnscope.probing.spec (probes branch) is on main; it checks
    # only the fields the batch layer needs, and its hash is of the file's parsed TOML.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from exc
    try:
        grid = data["grid"]
        spec = _FallbackSpec(
            name=str(data["name"]), task=str(data["task"]),
            grid=_Grid(tuple(int(x) for x in grid["lengths"]), tuple(float(x) for x in grid["depths"])),
            seeds=tuple(int(s) for s in data.get("seeds", [0])),
            haystack=_Haystack(str(data.get("haystack", {}).get("text", "loc_workshop"))),
            content_hash=hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest(),
            source=str(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{path}: missing or invalid field {exc}; a probe spec needs name, task and "
                        "[grid] lengths and depths (see probes/*.toml)") from exc
    if spec.task not in ("niah", "natural_text"):
        raise SpecError(f"{path}: field 'task' = {spec.task!r} is invalid: expected 'niah' or 'natural_text'")
    return spec


def load_probe(path: str | Path):
    """Read and validate a probe spec file (attnscope.probing.spec.load_spec when available)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"probe spec {str(path)!r} does not exist (see probes/*.toml for examples)")
    try:
        from attnscope.probing.spec import load_spec
    except ImportError:
        return _load_fallback(path)
    return load_spec(path)


def task_params(spec) -> list[dict[str, Any]]:
    """One task per (length, depth) of the probe's grid: the unit of resume and of failure."""
    return [{"length": int(L), "depth": float(d)} for L in spec.grid.lengths for d in spec.grid.depths]


NATURAL_TEXT_METHOD = "analyze-window/1"  # bump when _natural_text measures differently


def method_of(spec) -> str:
    """Which code measures this probe kind (part of the task key)."""
    return NATURAL_TEXT_METHOD if spec.task == "natural_text" else "run_probe"


def check_runnable(spec) -> None:
    """Fail before a batch starts when a probe kind cannot be measured by this install."""
    if spec.task == "natural_text":
        return
    if _run_probe() is None:
        raise SpecError(f"probe {spec.name!r} ({spec.source}) is a {spec.task!r} probe, measured by "
                        "attnscope.probing.run_probe, which this attnscope does not have yet; "
                        "run natural_text probes only, or update attnscope")


def _run_probe():
    try:
        from attnscope.probing import run_probe
    except ImportError:
        return None
    return run_probe


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


def _natural_text(lm, spec, length: int, depth: float, cache: TaskCache) -> xr.Dataset:
    """Exact-length excerpts of a shipped text: start = depth x (room left), seed s moves the
    start on by s x length/4 tokens; the tokenizer's own special prefix (BOS) is kept."""
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
    parts = []
    for seed in spec.seeds:
        start = min(room, round(depth * room) + seed * (length // 4))
        ids = prefix + tokens[start:start + body]
        ds = analyze(lm, token_ids=ids, metrics=NATURAL_TEXT_METRICS)
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
        return _natural_text(lm, spec, length, depth, cache)
    # ---- NIAH DISPATCH: the probing layer measures needle probes ---------------------------
    run_probe = _run_probe()
    if run_probe is None:
        raise SpecError(f"probe {spec.name!r} is a {spec.task!r} probe, which needs "
                        "attnscope.probing.run_probe (not in this attnscope yet)")
    return run_probe(lm, spec, lengths=[length], depths=[depth])
