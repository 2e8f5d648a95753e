"""Expand models x revisions x probes into tasks with stable keys, grouped by checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from attnscope.batch.tasks import load_probe, method_of, task_params
from attnscope.errors import AttnscopeError, ModelNotFoundError

PRE = "step34000"  # end of OlmPool pretraining
POST = "longcontext-step2385"  # end of OlmPool's long-context extension
_OPS = ("=", "<", ">")


@dataclass(frozen=True)
class ModelRef:
    """A model as the batch sees it: `name` goes into the store, `load_id` into attnscope.load."""

    name: str
    load_id: str
    kind: str  # "olmpool" | "hub" | "local" | "gguf"
    params_b: float | None = None
    n_layers: int | None = None
    hidden: int | None = None
    max_positions: int | None = None  # the config's context, where it can be read without a download


@dataclass(eq=False)
class Task:
    """One unit of work and of resume: one probe grid point on one checkpoint."""

    model: ModelRef
    revision: str | None
    probe: str  # the spec's name
    probe_path: str
    probe_hash: str
    params: dict[str, Any]
    dtype: str
    spec: Any = field(repr=False, default=None)

    @property
    def method(self) -> str:
        return method_of(self.spec)

    @property
    def key(self) -> str:
        return task_key(self.model.load_id, self.revision, self.probe_hash, self.params, self.dtype,
                        self.method)

    def label(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        ps = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.model.name}{rev} {self.probe} {ps}"

    def identity(self) -> dict[str, Any]:
        """The attrs that name this task in the store."""
        return {"task_key": self.key, "task_model": self.model.name, "task_revision": self.revision or "",
                "task_probe": self.probe, "task_probe_hash": self.probe_hash, "task_probe_file": self.probe_path,
                "task_params": json.dumps(self.params, sort_keys=True), "task_dtype": self.dtype,
                "task_method": self.method}


def task_key(load_id: str, revision: str | None, probe_hash: str, params: dict, dtype: str,
             method: str) -> str:
    """sha256 over (model, revision, probe content hash, params, dtype, measuring method), 20 hex
    digits. The method names the code that measures the probe kind, so a changed measurement is
    re-run instead of silently mixed with old results."""
    blob = json.dumps({"model": load_id, "revision": revision, "probe": probe_hash, "params": params,
                       "dtype": dtype, "method": method}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class Plan:
    tasks: list[Task]
    notes: list[str] = field(default_factory=list)

    def groups(self) -> list[tuple[tuple[ModelRef, str | None], list[Task]]]:
        """Tasks grouped by checkpoint, in plan order: each checkpoint is loaded once."""
        out: dict[tuple[ModelRef, str | None], list[Task]] = {}
        for t in self.tasks:
            out.setdefault((t.model, t.revision), []).append(t)
        return list(out.items())

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.tasks]


# ------------------------------------------------------------------------------- models
def _local_shape(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    cfg = cfg.get("text_config", cfg)
    L, h, V = cfg.get("num_hidden_layers"), cfg.get("hidden_size"), cfg.get("vocab_size")
    ff = cfg.get("intermediate_size") or 4 * (h or 0)
    ctx = cfg.get("max_position_embeddings")
    ctx = {"max_positions": int(ctx)} if isinstance(ctx, int) else {}
    if not (L and h and V):
        return ctx
    params = L * (4 * h * h + 3 * h * ff) + 2 * V * h
    return {"params_b": params / 1e9, "n_layers": int(L), "hidden": int(h), **ctx}


def _cached_context(model: ModelRef, revision: str | None) -> int | None:
    """The context a checkpoint's config declares, from local files only (no download)."""
    if model.max_positions is not None or model.kind not in ("hub", "olmpool"):
        return model.max_positions
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model.load_id, "config.json", revision=revision)
        if not isinstance(path, str):
            return None
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception:  # no cache, a damaged file: the load will say what is wrong
        return None
    ctx = cfg.get("text_config", cfg).get("max_position_embeddings")
    return ctx if isinstance(ctx, int) else None


def _olmpool_ref(m) -> ModelRef:
    return ModelRef(m.name, m.hf_name, "olmpool", float(m.params_b), int(m.n_layers), 4096)


def _one_model(name: str) -> ModelRef:
    from attnscope.models import olmpool
    from attnscope.models.names import resolve_name

    resolved = resolve_name(name)  # OlmPool names and prefixes, aliases, paths, Hub ids
    if resolved.olmpool is not None:
        return _olmpool_ref(olmpool.get(resolved.olmpool))
    if resolved.kind == "local":
        p = Path(resolved.target).resolve()
        return ModelRef(str(p), str(p), "local", **_local_shape(p))
    if resolved.kind == "gguf":
        return ModelRef(resolved.display, resolved.display, "gguf")
    return ModelRef(resolved.target, resolved.target, "hub")


def uncached_checkpoints(checkpoints) -> list[tuple[ModelRef, str | None]]:
    """Hub checkpoints that cannot load here: offline (HF_HUB_OFFLINE) or with the Hub unreachable
    (asked once per process), those not in the local cache. Empty when the Hub answers."""
    from attnscope.models.hub import checkpoint_cached, hub_reachable, offline_mode

    hub = [(m, r) for m, r in checkpoints if m.kind in ("hub", "olmpool")]
    if not hub or (not offline_mode() and hub_reachable()):
        return []
    return [(m, r) for m, r in hub if not checkpoint_cached(m.load_id, r)]


def resolve_models(models: str | Sequence[str]) -> list[ModelRef]:
    """`all`, an OlmPool filter ('qk_norm=none,swa=1'), or model names (comma-separated or a list):
    OlmPool short names/prefixes, Hub ids, local folders, .gguf files, 'smollm2'."""
    from attnscope.models import olmpool

    items = [models] if isinstance(models, str) else list(models)
    out: list[ModelRef] = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        if item.lower() == "all":
            out += [_olmpool_ref(olmpool.get(n)) for n in olmpool.registry()["name"]]
        elif any(op in item for op in _OPS) and not Path(item).exists():
            df = olmpool.find(item)
            if df.empty:
                raise ModelNotFoundError(f"the filter {item!r} matches no OlmPool model; "
                                         "see `attnscope models`")
            out += [_olmpool_ref(olmpool.get(n)) for n in df["name"]]
        else:
            out += [_one_model(n) for n in item.split(",") if n.strip()]
    if not out:
        raise AttnscopeError("no models given: pass --models NAMES|FILTER|all")
    seen, unique = set(), []
    for m in out:
        if m.load_id not in seen:
            seen.add(m.load_id)
            unique.append(m)
    return unique


# ------------------------------------------------------------------------------- revisions
def _tokens(revisions: str | Sequence[str] | None) -> list[str]:
    if revisions is None:
        return ["final"]
    items = [revisions] if isinstance(revisions, str) else list(revisions)
    return [t.strip() for item in items for t in str(item).split(",") if t.strip()] or ["final"]


def resolve_revisions(model: ModelRef, revisions, notes: list[str]) -> list[str | None]:
    """`final` (OlmPool: longcontext-step2385; others: the default branch), `pre` / `post`
    (step34000 / longcontext-step2385), `all` (every listed revision), or explicit names."""
    tokens = _tokens(revisions)
    if model.kind in ("local", "gguf"):
        if any(t not in ("final", "all") for t in tokens):
            notes.append(f"{model.name}: a local model has one checkpoint; revisions {tokens} ignored")
        return [None]
    out: list[str | None] = []
    for t in tokens:
        if t == "final":
            out.append(POST if model.kind == "olmpool" else None)
        elif t == "post":
            out.append(POST)
        elif t == "pre":
            out.append(PRE)
        elif t == "all":
            from attnscope.models.revisions import list_revisions

            out += [r.name for r in list_revisions(model.load_id) if r.name != "main"]
        else:
            out.append(t)
    return list(dict.fromkeys(out))  # drop repeats, keep order


# ------------------------------------------------------------------------------- the plan
def make_plan(models, revisions, probes: Iterable[str | Path], dtype: str = "float32",
              query_bins: int | None = None, received_top: int | None = None) -> Plan:
    """Expand the request into tasks; validates every model name and probe file first.
    `query_bins`: natural-text tasks also record every metric per bin of query position."""
    from attnscope.models.loading import _parse_dtype

    _parse_dtype(dtype)
    probes = list(probes)
    if not probes:
        raise AttnscopeError("no probes given: pass --probes NAME (a shipped probe: `attnscope probes`) "
                             "or a spec file")
    specs = []
    for p in probes:
        spec = load_probe(p)
        specs.append((str(Path(p)), spec))
    query_notes = _check_query_bins(query_bins, [s for _, s in specs])
    if received_top is not None:  # attention received per key, compactly (docs/received.md)
        from attnscope.metrics.received import check_top_k

        check_top_k(received_top, "received_top")
        others = sorted({s.name for _, s in specs if s.task != "natural_text"})
        if others:
            query_notes.append(f"received_top is recorded by natural-text probes only; {', '.join(others)} "
                               "run without it")
    refs = resolve_models(models)
    notes: list[str] = []
    checkpoints = [(ref, rev) for ref in refs for rev in resolve_revisions(ref, revisions, notes)]
    tasks = []
    for ref, rev in checkpoints:
        ctx = _cached_context(ref, rev)
        for path, spec in specs:
            too_long = sorted({L for L in spec.grid.lengths if ctx is not None and L > ctx})
            if too_long:
                notes.append(f"{ref.name}{'@' + rev if rev else ''} has a context of {ctx} tokens: the "
                             f"{spec.name} tasks of length {', '.join(map(str, too_long))} will fail "
                             "(InputTooLongError)")
            for params in task_params(spec, query_bins, received_top):
                tasks.append(Task(ref, rev, spec.name, path, spec.content_hash, params, dtype, spec))
    _refuse_repeated_tasks(tasks)
    return Plan(tasks, query_notes + notes)


def _refuse_repeated_tasks(tasks: list[Task]) -> None:
    """Two tasks with one key would be counted twice and measured once: a probe given twice (or two
    files with the same content)."""
    seen: dict[str, Task] = {}
    for t in tasks:
        if t.key in seen:
            other = seen[t.key]
            what = (f"probe {t.probe_path} is given twice" if other.probe_path == t.probe_path else
                    f"probes {other.probe_path} and {t.probe_path} are the same probe ({t.probe}, content "
                    f"{t.probe_hash[:12]})")
            raise AttnscopeError(f"{what}: each of its tasks would be planned twice and measured once; give it once")
        seen[t.key] = t


def _check_query_bins(query_bins: int | None, specs) -> list[str]:
    """Refuse a bin count no natural-text task can have (before any model loads); say which
    probes get no bins."""
    from attnscope.capture.queries import DEFAULT_MIN_POSITION

    if query_bins is None:
        return []
    if isinstance(query_bins, bool) or not isinstance(query_bins, int) or query_bins < 1:
        raise AttnscopeError(f"query_bins must be a positive integer, not {query_bins!r}")
    natural = [s for s in specs if s.task == "natural_text"]
    for s in natural:
        shortest = min(s.grid.lengths)
        if query_bins > shortest - DEFAULT_MIN_POSITION:
            raise AttnscopeError(
                f"query_bins={query_bins} is more than the {shortest - DEFAULT_MIN_POSITION} query positions "
                f"of probe {s.name!r} at length {shortest} (queries from position {DEFAULT_MIN_POSITION}); "
                "use fewer bins")
    others = sorted({s.name for s in specs if s.task != "natural_text"})
    return [f"query bins are recorded by natural-text probes only; {', '.join(others)} run without them"] \
        if others else []


# ------------------------------------------------------------------------------- cost
# Crude sustained rates: a forward pass plus attnscope's two extra passes over Q.K^T.
_FLOPS_PER_S = {"cpu": 5e10, "cuda": 1.5e14, "mps": 5e12}
_LOAD_BYTES_PER_S = 1e9


def estimate_seconds(plan: Plan, device: str = "cpu", dtype: str = "float32", done: set[str] = frozenset()) -> float | None:
    """Rough wall time of the tasks not yet done (None if a model's size is unknown)."""
    rate = _FLOPS_PER_S.get(device.split(":")[0], _FLOPS_PER_S["cpu"])
    width = 4 if dtype in ("float32", "fp32") else 2
    total = 0.0
    for (model, _), tasks in plan.groups():
        todo = [t for t in tasks if t.key not in done]
        if not todo:
            continue
        if model.params_b is None:
            return None
        P = model.params_b * 1e9
        total += P * width / _LOAD_BYTES_PER_S
        for t in todo:
            T = t.params["length"]
            seeds = len(getattr(t.spec, "seeds", (0,))) if t.spec.task == "natural_text" else 1
            flops = 2 * P * T + 3 * 2 * (model.n_layers or 32) * (model.hidden or 4096) * T * T
            total += seeds * flops / rate
    return total


def format_seconds(s: float | None) -> str:
    if s is None:
        return "unknown (a model's size is unknown)"
    if not math.isfinite(s):
        return "unknown"
    if s < 120:
        return f"~{s:.0f} s"
    if s < 7200:
        return f"~{s / 60:.0f} min"
    return f"~{s / 3600:.1f} h"
