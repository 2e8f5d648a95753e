"""Conformance: is attnscope exact on a model, or does it refuse it? (issue 18)

`check_model(model, input_ids)` compares attnscope with the model's own eager attention on the
same ids, along every path a user takes:

- `analyze`: `attnscope.analyze` on the model in memory: sink mass, entropy, a span mass (and
  `learned_sink_mass` where attnscope offers it), per attention call in call order, against the
  same reductions (`reference_statistics`) of the probabilities eager attention computed at each
  call (`eager_reference`);
- `logits`: the model under `attn_implementation="attnscope"` without a capture, and
  `logits_capture` with a capture active, against eager's logits;
- `load`, `load_logits`, `load_logits_capture`, `load_analyze`: the same through
  `attnscope.load` of the model saved with `save_pretrained`, against a plain eager load of the
  same folder.

Each path ends exact, refused (attnscope raised an `AttnscopeError`; when: at load, or after
how many forwards), wrong (a quantity off by more than the tolerance) or crash (any other
exception). The model's status is the worst of them: WRONG > CRASH > REFUSED > EXACT.
`check_family(model_type)` does this for a tiny model of a transformers family (attnscope.zoo).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

EXACT, REFUSED, SKIP, WRONG, CRASH = "EXACT", "REFUSED", "SKIP", "WRONG", "CRASH"
BUILD_ERROR = "BUILD_ERROR"  # the zoo could not build the family (not attnscope's doing)
STAT_TOL = 1e-5  # fp32 statistics
LOGIT_TOL = 1e-4  # fp32 logits
SINK_TOKENS = 4
SPANS = {"span": (8, 12)}
MIN_QUERY = 16
METRICS = ("sink_mass", "entropy", "span_mass")
SINK_DEFICIT = 1e-4  # a call whose rows sum to less than 1 - this has a learned sink


# --- the reference --------------------------------------------------------------------------

def reference_statistics(P: np.ndarray, queries: np.ndarray, *, sink_tokens: int = SINK_TOKENS,
                         spans: dict[str, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Per-head statistics of one attention call from its eager probabilities P [H, T, S] of one
    unpadded row, averaged over the query rows `queries` (mirrors tests/reference.py).

    A learned sink (gpt-oss's `sinks`, `s_aux`) takes a share of each row that eager drops from
    its map, so a row sums to less than 1; its share is p_sink = 1 - sum_j P_ij. Then
    sink_mass and span_mass sum real keys only; learned_sink_mass = mean p_sink; entropy counts
    the sink as one more outcome: H_i = -sum_j P_ij log P_ij - p_sink log p_sink. A call whose
    rows all sum to 1 (within SINK_DEFICIT) has no sink: p_sink = 0.
    """
    Pq = P[:, queries, :].astype(np.float64)  # [H, Q, S]
    deficit = 1.0 - Pq.sum(-1)  # [H, Q]
    p_sink = np.clip(deficit, 0.0, 1.0) if deficit.max() > SINK_DEFICIT else np.zeros_like(deficit)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(Pq > 0, Pq * np.log(Pq), 0.0).sum(-1)
        sink_term = np.where(p_sink > 0, p_sink * np.log(p_sink), 0.0)
    out = {
        "sink_mass": Pq[:, :, :sink_tokens].sum(-1).mean(-1),
        "entropy": (-plogp - sink_term).mean(-1),
        "learned_sink_mass": p_sink.mean(-1),
    }
    if spans:
        out["span_mass"] = np.stack([Pq[:, :, s0:s1].sum(-1).mean(-1) for s0, s1 in spans.values()])
    return out


def eager_reference(model, input_ids) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
    """(eager logits, the attention probabilities of every attention call in call order, notes).

    The maps are what the family's own eager attention function returned at each call of the
    attention function (attnscope.zoo.attention_call_maps): a module that runs twice per
    forward has two. For a family that does not call the attention function, or whose eager
    function returns no probabilities, they are `output_attentions=True`'s maps (one per module).
    """
    from attnscope import zoo

    logits, maps, n_other = zoo.eager_attentions(model, input_ids)
    notes = [f"output_attentions returned {n_other} tensors that are not attention maps"] if n_other else []
    try:
        probe_logits, calls, weights = zoo.attention_call_maps(model, input_ids)
    except Exception as exc:  # noqa: BLE001 - the recording forward is a convenience, not the reference
        notes.append(f"per-call maps unavailable ({_one_line(exc)}): output_attentions' maps used")
        return logits, maps, notes
    if not calls:
        return logits, maps, notes
    notes.append(f"decoder layers of the attention calls: {decoder_positions(model, calls)}")
    T = input_ids.shape[1]
    # attnscope measures causal self-attention over the input's tokens; other calls (BLT's
    # cross-attention, its transformer over byte patches) it computes but records as skipped
    modules = {id(m): m for m in model.modules()}
    measured = [getattr(modules.get(c.module_id), "is_causal", True) is not False and c.query[2] == T
                for c in calls]
    if not all(measured):
        notes.append(f"{measured.count(False)} calls not over the input's tokens or not causal: "
                     "not compared (attnscope must list them in skipped_layers)")
        calls = [c for c, keep in zip(calls, measured) if keep]
        weights = [w for w, keep in zip(weights, measured) if keep]
    usable = all(w is not None and zoo.is_probability_map(w, w.shape[2]) for w in weights)
    same = probe_logits is not None and float((probe_logits - logits).abs().max()) <= 1e-6
    if usable and same:
        if len(weights) != len(maps):
            notes.append(f"{len(weights)} attention calls, {len(maps)} output_attentions maps: "
                         "compared call by call")
        bad = [i for i, w in enumerate(weights) if w.shape[2] != T]
        if bad:
            notes.append(f"calls {bad} have another number of queries than the {T} tokens")
        return logits, weights, notes
    notes.append("per-call maps unusable (" + ("a call returned no probabilities" if not usable else
                 "the recording forward's logits differ from eager's") + "): output_attentions' maps used")
    return logits, maps, notes


# --- results --------------------------------------------------------------------------------

@dataclass
class PathResult:
    """One path through attnscope (analyze, logits, load, ...)."""

    path: str
    status: str  # EXACT | REFUSED | WRONG | CRASH | "n/a" (the path could not be run; why in detail)
    detail: str = ""
    errors: dict[str, float] = field(default_factory=dict)  # quantity -> max abs error
    forwards: int | None = None  # forwards of the model before a refusal or crash


@dataclass
class ConformanceResult:
    name: str
    status: str
    reason: str = ""  # the first WRONG / CRASH / REFUSED detail, one line
    paths: list[PathResult] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)  # max over paths, per quantity
    refused_when: str | None = None  # "at load" | "analyze: before any forward" | "...after N forwards"
    refused_after_forward: bool = False
    n_eager_maps: int = 0
    notes: list[str] = field(default_factory=list)
    features: tuple[str, ...] = ()
    attention_kwargs: dict[str, str] = field(default_factory=dict)
    attention_calls: list[dict] = field(default_factory=list)  # module, shapes, mask of each call
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason,
                "features": list(self.features), "errors": self.errors,
                "refused_when": self.refused_when, "refused_after_forward": self.refused_after_forward,
                "n_eager_maps": self.n_eager_maps, "attention_kwargs": self.attention_kwargs,
                "attention_calls": self.attention_calls,
                "notes": self.notes, "seconds": round(self.seconds, 3),
                "paths": [vars(p) for p in self.paths]}


_ORDER = {WRONG: 0, CRASH: 1, REFUSED: 2, EXACT: 3}


def _overall(name: str, paths: list[PathResult]) -> ConformanceResult:
    ran = [p for p in paths if p.status in _ORDER]
    status = min((p.status for p in ran), key=_ORDER.__getitem__, default=CRASH)
    first = next((p for p in ran if p.status == status), None)
    result = ConformanceResult(name, status, paths=paths)
    if first is not None and status != EXACT:
        result.reason = f"{first.path}: {first.detail}"
    for p in paths:
        for k, v in p.errors.items():
            key = f"{p.path}.{k}"
            result.errors[key] = max(result.errors.get(key, 0.0), v)
    refusals = [p for p in paths if p.status == REFUSED]
    if refusals:
        p = refusals[0]
        result.refused_when = ("at load" if p.path == "load" else
                               f"{p.path}: before any forward" if not p.forwards else
                               f"{p.path}: after {p.forwards} forward(s)")
        result.refused_after_forward = any(r.forwards for r in refusals)
    return result


# --- running one path -----------------------------------------------------------------------

class _ForwardCounter:
    """Counts forwards of a model (calls of its input embedding, whatever the entry point)."""

    def __init__(self, model):
        self.n = 0
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self._handle = (emb if emb is not None else model).register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def close(self):
        self._handle.remove()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def _run(path: str, counter_model, fn) -> tuple[PathResult | None, Any]:
    """Run fn(); (PathResult for a refusal or a crash, None) or (None, its value)."""
    from attnscope.errors import AttnscopeError

    counter = _ForwardCounter(counter_model) if counter_model is not None else None
    try:
        return None, fn()
    except AttnscopeError as exc:
        return PathResult(path, REFUSED, _one_line(exc), forwards=counter.n if counter else 0), None
    except Exception as exc:  # noqa: BLE001 - any other exception is what the harness reports
        return PathResult(path, CRASH, _one_line(exc), forwards=counter.n if counter else 0), None
    finally:
        if counter is not None:
            counter.close()


def decoder_positions(model, calls) -> list:
    """For each attention call, the index of the decoder layer its module sits in (the first
    number in the module's qualified name: model.layers.4.self_attn -> 4), or its name."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for c in calls:
        name = names.get(c.module_id, "?")
        num = next((int(p) for p in name.split(".") if p.isdigit()), None)
        out.append(num if num is not None else name)
    return out


def _logits_path(path: str, got: torch.Tensor, want: torch.Tensor) -> PathResult:
    if got.shape != want.shape:
        return PathResult(path, WRONG, f"logits shape {tuple(got.shape)} != eager {tuple(want.shape)}")
    err = float((got.float() - want.float()).abs().max())
    if not np.isfinite(err) or err > LOGIT_TOL:
        return PathResult(path, WRONG, f"logits off by {err:.3g} (tolerance {LOGIT_TOL:g})", {"logits": err})
    return PathResult(path, EXACT, errors={"logits": err})


def _stats_path(path: str, ds, maps: list[torch.Tensor], T: int) -> PathResult:
    """Compare analyze's dataset with the reference reductions of eager's maps, call by call
    (CRASH where the dataset is not laid out as documented: a variable or dim missing)."""
    try:
        return _compare_stats(path, ds, maps, T)
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        return PathResult(path, CRASH, f"analyze's dataset cannot be read as documented: {_one_line(exc)}")


def _compare_stats(path: str, ds, maps: list[torch.Tensor], T: int) -> PathResult:
    queries = np.arange(MIN_QUERY, T)
    call_dim = next((d for d in ("call", "layer") if d in ds["sink_mass"].dims), None)
    if call_dim is None:
        return PathResult(path, WRONG, f"sink_mass has dims {ds['sink_mass'].dims}: no call or layer dim")
    n_ds = ds.sizes[call_dim]
    if n_ds != len(maps):
        return PathResult(path, WRONG, f"attnscope reports {n_ds} attention calls ({call_dim} "
                                       f"{[_label(x) for x in ds[call_dim].values]}), eager made {len(maps)}")
    names = ["sink_mass", "entropy", "span_mass"] + (["learned_sink_mass"] if "learned_sink_mass" in ds else [])
    errors: dict[str, float] = {}
    worst = ("", 0.0, None)
    for i, P in enumerate(maps):
        if P.shape[2] != T:  # not a token-level call (blt's patch transformer): no definition
            return PathResult(path, WRONG, f"call {i} has {P.shape[2]} queries for {T} tokens, yet "
                                           "attnscope returned statistics for it")
        ref = reference_statistics(P[0].double().numpy(), queries, spans=SPANS)
        H = P.shape[1]
        for m in names:
            got = ds[m].isel({call_dim: i})
            got = got.sel(span="span") if m == "span_mass" else got
            got = np.asarray(got.values, dtype=np.float64).reshape(-1)
            want = np.asarray(ref[m]).reshape(-1)
            if got.shape[0] < H:
                return PathResult(path, WRONG, f"call {i}: {m} has {got.shape[0]} heads, eager {H}")
            if got.shape[0] > H and not np.isnan(got[H:]).all():
                return PathResult(path, WRONG, f"call {i}: {m} has values for heads {H}.."
                                               f"{got.shape[0] - 1} that eager's call does not have")
            diff = np.abs(got[:H] - want)
            err = float(np.nanmax(diff)) if not np.isnan(got[:H]).any() else float("inf")
            errors[m] = max(errors.get(m, 0.0), err)
            if err > worst[1]:
                worst = (m, err, i)
    bad = {m: e for m, e in errors.items() if not e <= STAT_TOL}
    if bad:
        m, err, i = worst
        return PathResult(path, WRONG, f"{m} off by {err:.3g} at call {i} (tolerance {STAT_TOL:g}); "
                                       + ", ".join(f"{k} {v:.3g}" for k, v in sorted(bad.items())), errors)
    if not maps:
        return PathResult(path, WRONG, "eager made no attention call, yet attnscope returned statistics")
    return PathResult(path, EXACT, f"{call_dim} labels {[_label(x) for x in ds[call_dim].values]}", errors)


def _label(x):
    return x.item() if hasattr(x, "item") else x


def _analyze(model, ids: torch.Tensor, kernel: str = "auto", row_pass: str = "auto"):
    import attnscope
    from attnscope.metrics.reductions import ALL_METRICS

    metrics = METRICS + (("learned_sink_mass",) if "learned_sink_mass" in ALL_METRICS else ())
    return attnscope.analyze(model, token_ids=ids[0].tolist(), metrics=metrics, spans=SPANS,
                             min_query_position=MIN_QUERY, sink_tokens=SINK_TOKENS, progress=False,
                             kernel=kernel, row_pass=row_pass)


def _plain_logits(model, ids):
    """Logits of the model under attn_implementation='attnscope', no capture."""
    from attnscope.capture.interface import using_attnscope

    with using_attnscope(model), torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _captured_logits(model, ids):
    """Logits of the model with a capture active (every layer observed, statistics computed)."""
    from attnscope.capture.interface import capture
    from attnscope.metrics.reductions import RowPlan, StatsRecorder

    T = ids.shape[1]
    plan = RowPlan(T, np.arange(MIN_QUERY, T), dict(SPANS))
    recorder = StatsRecorder(METRICS, [plan], sink_tokens=SINK_TOKENS, max_length=T)
    with capture(model, recorder), torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@contextlib.contextmanager
def _eager(model):
    """Keep the model on eager attention between paths, whatever a failed path left behind."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            model.set_attn_implementation("eager")


def check_model(hf_model, input_ids, *, name: str | None = None, through_load: bool = True,
                kernel: str = "auto", row_pass: str = "auto") -> ConformanceResult:
    """Compare attnscope with eager attention on `hf_model` (a transformers causal LM in fp32,
    in memory) for one unpadded row `input_ids` [1, T]; see the module docstring. `kernel`
    forces attnscope's attention kernel on every path ("flex", "reference", ...; "auto" is what
    a user gets)."""
    from attnscope.capture.interface import kernel_settings

    with kernel_settings(kernel):
        return _check_model(hf_model, input_ids, name=name, through_load=through_load, kernel=kernel,
                            row_pass=row_pass)


def _check_model(hf_model, input_ids, *, name, through_load, kernel, row_pass="auto") -> ConformanceResult:
    start = time.perf_counter()
    name = name or getattr(hf_model.config, "model_type", type(hf_model).__name__)
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    T = ids.shape[1]
    hf_model.eval()
    logits_ref, maps, notes = eager_reference(hf_model, ids)
    paths: list[PathResult] = []

    with _eager(hf_model):
        fail, ds = _run("analyze", hf_model, lambda: _analyze(hf_model, ids, kernel, row_pass))
        paths.append(fail or _stats_path("analyze", ds, maps, T))
    with _eager(hf_model):
        fail, got = _run("logits", hf_model, lambda: _plain_logits(hf_model, ids))
        paths.append(fail or _logits_path("logits", got, logits_ref))
    with _eager(hf_model):
        fail, got = _run("logits_capture", hf_model, lambda: _captured_logits(hf_model, ids))
        paths.append(fail or _logits_path("logits_capture", got, logits_ref))
    if through_load:
        paths.extend(_load_paths(hf_model, ids, logits_ref, notes, kernel, row_pass))
    result = _overall(name, paths)
    result.n_eager_maps = len(maps)
    positions = next((n.split(": ", 1)[1] for n in notes if n.startswith("decoder layers of the")), None)
    labels = next((p.detail.split("labels ", 1)[1] for p in paths
                   if p.path == "analyze" and p.status == EXACT and "labels " in p.detail), None)
    if positions and labels and positions != labels:  # issue 18 item 6: labels by decoder position
        notes.append(f"attnscope labels the calls {labels}; they sit in decoder layers {positions}")
    result.notes = notes
    result.seconds = time.perf_counter() - start
    return result


def _load_paths(hf_model, ids, logits_ref, notes, kernel, row_pass="auto") -> list[PathResult]:
    """The paths through attnscope.load of the model saved with save_pretrained."""
    import attnscope
    from transformers import AutoModelForCausalLM

    T = ids.shape[1]
    with tempfile.TemporaryDirectory(prefix="attnscope-conformance-") as folder:
        try:
            hf_model.save_pretrained(folder)
            reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
            ref_logits, ref_maps, _ = eager_reference(reloaded, ids)
        except Exception as exc:  # noqa: BLE001 - transformers' own round trip, not attnscope
            return [PathResult("load", "n/a", f"save_pretrained / eager reload failed: {_one_line(exc)}")]
        drift = float((ref_logits - logits_ref).abs().max())
        if drift > LOGIT_TOL:
            notes.append(f"a plain eager reload of the saved folder differs from the model in memory by "
                         f"{drift:.3g} in logits: the load paths compare with the reload")
        fail, lm = _run("load", None, lambda: attnscope.load(folder))
        if fail is not None:
            return [fail]
        model = lm.model
        paths = []
        fail, got = _run("load_logits", model, lambda: _loaded_logits(model, ids))
        paths.append(fail or _logits_path("load_logits", got, ref_logits))
        fail, got = _run("load_logits_capture", model, lambda: _captured_logits(model, ids))
        paths.append(fail or _logits_path("load_logits_capture", got, ref_logits))
        fail, ds = _run("load_analyze", model, lambda: _analyze(lm, ids, kernel, row_pass))
        paths.append(fail or _stats_path("load_analyze", ds, ref_maps, T))
        return paths


def _loaded_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# --- families -------------------------------------------------------------------------------

def check_family(model_type: str, *, seed: int = 0, through_load: bool = True,
                 kernel: str = "auto", row_pass: str = "auto") -> ConformanceResult:
    """Build the family's tiny model (attnscope.zoo) and check it; SKIP for a model type that is
    not a text decoder. Exceptions while building propagate (they are the zoo's, not attnscope's)."""
    from attnscope import zoo

    start = time.perf_counter()
    try:
        tiny = zoo.tiny_model(model_type, seed=seed)
    except zoo.FamilySkip as skip:
        return ConformanceResult(model_type, SKIP, reason=skip.reason, seconds=time.perf_counter() - start)
    result = check_model(tiny.model, tiny.input_ids, name=model_type, through_load=through_load,
                         kernel=kernel, row_pass=row_pass)
    result.features = tiny.features
    result.attention_kwargs = tiny.attention_kwargs
    names = {id(m): n for n, m in tiny.model.named_modules()}
    result.attention_calls = [{"module": names.get(c.module_id, c.module), "class": c.module,
                               "layer_idx": c.layer_idx, "query": list(c.query), "key": list(c.key),
                               "value": list(c.value), "mask": c.mask} for c in tiny.calls]
    result.notes = tiny.notes + result.notes
    result.seconds = time.perf_counter() - start
    return result
