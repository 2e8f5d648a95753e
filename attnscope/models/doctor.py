"""`attnscope.doctor`: does a loaded checkpoint really run the architecture it claims?

Independent users found OlmPool checkpoints that load without an error yet run something else
(a RoPE theta lost on some layers, a sliding window the kernel ignores, weights under the wrong
block class). Each check here measures one of these on the loaded model and compares it with
what the checkpoint declares (and, for OlmPool models, with the registry). Thresholds and what
a failure means: docs/olmpool.md, section "Doctor".
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from attnscope.errors import AttnscopeError, ModelNotFoundError

__all__ = ["Check", "DoctorReport", "doctor", "detect_features",
           "MAX_LOSS", "LOSS_MARGIN", "WINDOW_TOL", "WINDOW_TOL_HALF"]

# A working language model scores ~2-4 nats per token on English prose; a random or broken one
# approaches ln(vocab) (10.8 for a 50k vocabulary, 11.5 for 100k). 8 nats sits between.
MAX_LOSS = 8.0
# With a reference loss (e.g. the same model loaded correctly), allowed excess in nats.
LOSS_MARGIN = 1.0
# Attention mass beyond a window that still counts as "window applied": float32 rounding,
# and the looser bf16/fp16 rounding of the kernel's log-sum-exp.
WINDOW_TOL = 1e-3
WINDOW_TOL_HALF = 2e-2
_THETA_REL = 1e-4  # effective thetas come from float32 frequencies (relative error ~1e-7)
_STATUSES = ("skip", "pass", "warn", "fail")  # in order of severity


@dataclass
class Check:
    """One check: what was measured, what was expected, and what the difference means."""

    name: str  # rope_theta | window_layout | window | window_output | weights | loss | eager_parity | registry | feature:<x>
    scope: str  # "model", a layer type, or "layer <i>"
    status: str  # pass | warn | fail | skip
    measured: Any
    expected: Any
    explanation: str

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class DoctorReport:
    """The doctor's findings for one model (``ok`` is False when any check failed)."""

    model: str
    revision: str | None
    model_class: str
    registry_name: str | None
    checks: list[Check] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # what attnscope.load() recorded (fixes, windows, ...)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warn"]

    @property
    def status(self) -> str:
        """The worst status among the checks."""
        return max((c.status for c in self.checks), key=_STATUSES.index, default="pass")

    def get(self, name: str, scope: str | None = None) -> list[Check]:
        """Checks with this name (and scope, if given)."""
        return [c for c in self.checks if c.name == name and (scope is None or c.scope == scope)]

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in _STATUSES}

    def to_dict(self) -> dict:
        return _jsonable({
            "model": self.model, "revision": self.revision, "model_class": self.model_class,
            "registry_name": self.registry_name, "ok": self.ok, "status": self.status,
            "counts": self.counts(), "checks": [c.to_dict() for c in self.checks],
            "info": self.info,
        })

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    if hasattr(x, "item") and callable(x.item):
        return _jsonable(x.item())
    return x


# ---------------------------------------------------------------------------------------------
# architecture read off the modules


def _norm_placement(hf_model) -> str:
    """'pre' (Llama: input_layernorm normalises the block input), 'post' (Olmo 2/3: norms on the
    block outputs only) or 'unknown', read off the first decoder layer's modules."""
    from attnscope.models.introspect import _decoder_layers

    try:
        _, layers = _decoder_layers(hf_model)
    except AttnscopeError:
        return "unknown"
    names = {n for n, _ in layers[0].named_children()}
    if "input_layernorm" in names:
        return "pre"
    if "post_feedforward_layernorm" in names and "post_attention_layernorm" in names:
        return "post"
    return "unknown"


def detect_features(hf_model, windows: dict[int, int | None] | None = None) -> dict:
    """Architecture features of a loaded model as its modules show them.

    ``windows`` ({layer: window}) is what attnscope applies (``LoadedModel.info["windows"]``);
    without it the declared layout from ``attention_layout`` is used.
    """
    from attnscope.models.introspect import _config, attention_layout

    layout = attention_layout(hf_model)
    attn = [li for li in layout if li.kind == "attention"]
    if windows is None:
        windows = {li.index: li.sliding_window for li in attn}
    qk = sorted({li.qk_norm for li in attn})
    heads = sorted({li.n_heads for li in attn if li.n_heads})
    kv = sorted({li.n_kv_heads for li in attn if li.n_kv_heads})
    slid = sorted(i for i, w in windows.items() if w)
    sizes = sorted({int(w) for w in windows.values() if w})
    return {
        "hf_class": type(hf_model).__name__,
        "n_layers": int(_config(hf_model).num_hidden_layers),
        "attention_layers": [li.index for li in attn],
        "qk_norm": qk[0] if len(qk) == 1 else ("mixed:" + "+".join(map(str, qk)) if qk else "none"),
        "n_heads": heads[0] if len(heads) == 1 else heads,
        "kv_heads": kv[0] if len(kv) == 1 else kv,
        "norm": _norm_placement(hf_model),
        "window_layers": slid,
        "window": sizes[0] if len(sizes) == 1 else (sizes or None),
    }


# ---------------------------------------------------------------------------------------------
# measuring whether windows are applied


class _BeyondWindow:
    """Observer: per windowed layer, the attention mass each head puts beyond the window.

    From the kernel's own row log-sum-exp: the mass on keys within the window is
    sum_{0 <= i-j < W} exp(s_ij - lse_i); what the kernel gave to anything else is 1 minus that.
    This needs no assumption about which keys the kernel saw, so it measures the kernel.
    """

    needs_lse = True

    def __init__(self, windows: dict[int, int]):
        self.windows = windows
        self.beyond: dict[int, torch.Tensor] = {}  # layer -> [H] mean over queries at i >= W

    def wants(self, layer: int) -> bool:
        return layer in self.windows

    def observe(self, a) -> None:
        W = self.windows[a.layer]
        T = a.query.shape[2]
        first = max(0, W - a.q_offset)  # rows whose absolute position is >= W
        if first >= T or a.lse is None:
            return
        per_head = []
        for r0 in range(first, T, 64):
            rows = torch.arange(r0, min(T, r0 + 64), device=a.query.device)
            qa = rows + a.q_offset
            k_lo = int(qa[0]) - W + 1
            k_hi = int(qa[-1]) + 1
            s = a.scores(0, rows, slice(k_lo, k_hi))  # [H, Q, K]
            j = torch.arange(k_lo, k_hi, device=s.device)
            inside = ((qa[:, None] - j[None, :]) >= 0) & ((qa[:, None] - j[None, :]) < W)
            p = torch.exp(s - a.lse[0][:, rows].float()[..., None]).masked_fill(~inside[None], 0.0)
            per_head.append((1.0 - p.sum(-1)).clamp(min=0.0))  # [H, Q]
        self.beyond[a.layer] = torch.cat(per_head, dim=1).mean(dim=1).cpu()


def _input_ids(lm, text: str | None, n_tokens: int, min_tokens: int) -> tuple[torch.Tensor, str]:
    """Up to n_tokens of text (the shipped prose by default), repeated if it is shorter than
    min_tokens (the window check needs an input longer than the window); seeded random ids
    when the model has no tokenizer."""
    if lm.tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, int(lm.config.vocab_size), (1, n_tokens), generator=g), "random ids"
    if text is None:
        from attnscope.probing.texts import prose

        text, source = prose(), "shipped prose (loc_workshop)"
    else:
        source = "the given text"
    chars = 16 * n_tokens  # tokenise a prefix only: the shipped prose is ~250K tokens
    while True:
        ids = lm.tokenizer(text[:chars], verbose=False)["input_ids"]
        if len(ids) >= n_tokens or chars >= len(text):
            break
        chars *= 4
    if not ids:
        raise AttnscopeError("the doctor's text has no tokens")
    if len(ids) < min_tokens:
        source += f" (repeated to {min_tokens} tokens)"
        while len(ids) < min_tokens:
            ids = ids + ids
        n_tokens = min_tokens
    return torch.tensor([ids[:n_tokens]]), source


def _forward(lm, ids, observer):
    from attnscope.capture.interface import capture

    with torch.no_grad(), capture(lm.model, observer):
        logits = lm.model(input_ids=ids.to(lm.device), use_cache=False).logits
    return logits.float().cpu()


def _loss(logits, ids) -> float:
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:].to(logits.device)))


# ---------------------------------------------------------------------------------------------
# the checks


def _theta_checks(info: dict) -> list[Check]:
    rope = info.get("rope")
    if not rope or rope.get("declared") is None or rope.get("effective") is None:
        why = ("the model has no rotary inverse-frequency buffer" if rope and rope.get("effective") is None
               else "the config declares no rope_theta")
        return [Check("rope_theta", "model", "skip", None, None, why)]
    declared, native, effective = rope["declared"], rope["native_effective"], rope["effective"]
    if isinstance(effective, dict):
        keys = sorted(effective)
    else:
        keys = sorted(declared) if isinstance(declared, dict) else ["model"]

    def at(x, k):
        if isinstance(x, dict):
            return x.get(k)
        return x

    out = []
    for k in keys:
        d, n, e = at(declared, k), at(native, k), at(effective, k)
        if d is None:
            out.append(Check("rope_theta", k, "skip", e, None, "no theta declared for this layer type"))
            continue
        if not _close(e, d):
            out.append(Check("rope_theta", k, "fail", e, d,
                             "the rotary frequencies use another theta than the config declares: "
                             "positions are encoded as in a different model"
                             + (" (load with fix_rope=True to repair it)" if k in rope.get("wrong_types", []) else "")))
        elif n is not None and not _close(n, d):
            out.append(Check("rope_theta", k, "warn", {"effective": e, "transformers": n}, d,
                             f"transformers alone would run this layer type at theta {n:g}, not the declared "
                             f"{d:g} (flat rope_theta); attnscope rewrote the rope parameters at load, "
                             "so analyses are sound but other tools are not"))
        else:
            out.append(Check("rope_theta", k, "pass", e, d, "effective theta (from inv_freq) matches the config"))
    return out


def _close(a, b) -> bool:
    return abs(float(a) - float(b)) <= _THETA_REL * max(abs(float(a)), abs(float(b)))


def _weights_check(info: dict) -> Check:
    loading = info.get("loading")
    if loading is None:
        return Check("weights", "model", "skip", None, None,
                     "no loading report (load the model with attnscope.load or pass its name)")
    missing, unexpected, mismatched = (loading.get(k, []) for k in
                                       ("missing_keys", "unexpected_keys", "mismatched_keys"))
    measured = {"missing": len(missing), "unexpected": len(unexpected), "mismatched": len(mismatched)}
    if not (missing or unexpected or mismatched):
        return Check("weights", "model", "pass", measured, {"missing": 0, "unexpected": 0, "mismatched": 0},
                     "every weight of the class came from the checkpoint and every checkpoint tensor was used")
    parts = []
    for label, keys in (("newly initialised (missing)", missing), ("unused (unexpected)", unexpected),
                        ("re-initialised (shape mismatch)", mismatched)):
        if keys:
            parts.append(f"{len(keys)} {label}, e.g. {keys[0]}")
    return Check("weights", "model", "fail", measured, {"missing": 0, "unexpected": 0, "mismatched": 0},
                 "; ".join(parts) + ": the checkpoint does not fit this block class (wrong class or "
                 "conversion), so part of the model is random")


def _registry_row(name: str, as_name: str | None):
    from attnscope.models import olmpool

    if as_name:
        return olmpool.get(as_name)  # ModelNotFoundError names close matches
    df = olmpool.registry()
    short = name.strip().removeprefix(olmpool.HUB_ORG + "/")
    if name in set(df["hf_name"]) or short in set(df["name"]):
        return olmpool.get(short)
    return None


def _feature_checks(features: dict, row) -> list[Check]:
    from attnscope.models.introspect import olmpool_window_pattern

    if row is None:
        return [Check("registry", "model", "skip", None, None,
                      "not an OlmPool model by name; pass as_name= (CLI --as NAME) to compare with a registry row")]
    out = []

    def cmp(name, measured, expected, why, severity="fail"):
        ok = measured == expected
        out.append(Check(f"feature:{name}", "model", "pass" if ok else severity, measured, expected,
                         f"matches the registry ({row.name})" if ok else why))

    cmp("qk_norm", features["qk_norm"], row.qk_norm,
        "the QK norm read off the modules differs from the registry: wrong class, or not this model")
    cmp("n_heads", features["n_heads"], row.n_heads, "query heads differ from the registry")
    cmp("kv_heads", features["kv_heads"], row.kv_heads,
        "key/value heads differ from the registry (GQA is one of the studied choices)")
    cmp("n_layers", features["n_layers"], row.n_layers, "layer count differs from the registry")
    cmp("norm", features["norm"], row.norm,
        "block norm placement differs from the registry: weights trained with one placement run "
        "under the other give a broken model (e.g. post-norm weights under a pre-norm class)")
    # SWA: the registry says trained with 3 sliding : 1 full (window 4096, or the config's value)
    n = features["n_layers"]
    if row.swa:
        pattern = [i for i, s in enumerate(olmpool_window_pattern(n)) if s]
        size = int(row.config_sliding_window) if not math.isnan(row.config_sliding_window) else 4096
        expected = {"window_layers": pattern, "window": size}
        measured = {"window_layers": features["window_layers"], "window": features["window"]}
        if not features["window_layers"]:
            why = ("the model was trained with sliding-window attention but its config declares no "
                   "window: as published it runs full attention on every layer")
        else:
            why = "the window layers or size differ from the OlmPool SWA layout"
        cmp("swa", measured, expected, why)
    else:
        cmp("swa", {"window_layers": features["window_layers"]}, {"window_layers": []},
            "windows declared on a model the registry lists as full attention")
    if features["hf_class"] != row.hf_class:
        out.append(Check("feature:class", "model", "warn", features["hf_class"], row.hf_class,
                         "loaded under another class than the published config names"))
    for note in row.quirks:
        out.append(Check("registry", "model", "warn", row.name, None, f"known issue: {note}"))
    return out


def _window_checks(lm, ids, info, tol) -> tuple[list[Check], torch.Tensor]:
    """Run the model with attnscope's windows and without; return the checks and the logits."""
    from attnscope.capture.interface import windows_disabled

    windows = {int(i): int(w) for i, w in (info.get("windows") or {}).items() if w}
    applied = _BeyondWindow(windows)
    logits = _forward(lm, ids, applied)
    if not windows:
        return [], logits
    out = []
    assumed = bool(info.get("windows_assumed"))
    slid = sorted(windows)
    layout_expected = "config.layer_types"
    if assumed:
        out.append(Check("window_layout", "model", "warn",
                         {"window_layers": slid, "window": sorted(set(windows.values()))}, layout_expected,
                         "the config gives sliding_window but no layer_types: attnscope assumed the OlmPool "
                         "pattern (layer i full iff (i+1) % 4 == 0); results carry windows_assumed=True"))
    else:
        out.append(Check("window_layout", "model", "pass", {"window_layers": slid}, layout_expected,
                         "the window layers come from the config's layer_types"))
    T = ids.shape[1]
    if T <= min(windows.values()):
        out.append(Check("window", "model", "skip", T, f"> {min(windows.values())} tokens",
                         "the model's context is not longer than its window: nothing to measure"))
        return out, logits
    native = _BeyondWindow(windows)
    with windows_disabled(lm.model):
        native_logits = _forward(lm, ids, native)
    for layer in slid:
        W = windows[layer]
        if layer not in applied.beyond:
            why = (f"the input ({T} tokens) is not longer than this layer's window" if T <= W
                   else "the layer made no attention call through attnscope")
            out.append(Check("window", f"layer {layer}", "skip", None, W, why))
            continue
        a = float(applied.beyond[layer].max())
        n = float(native.beyond[layer].max())
        measured = {"attnscope_beyond_mass": a, "native_beyond_mass": n}
        expected = {"window": W, "beyond_mass": 0.0}
        if a > tol:
            status, why = "fail", (f"attnscope's capture put {a:.3g} of a head's attention beyond the "
                                   f"declared window {W}: the window is not applied")
        elif n > tol:
            status, why = "warn", (f"the model's own kernel ignores this window (sdpa/eager run: {n:.3g} of "
                                   f"a head's attention beyond {W} tokens), so other tools see full "
                                   "attention here; attnscope applies the declared window")
        else:
            status, why = "pass", "the window is applied by the model itself and by attnscope"
        if assumed:
            why += " (window layout assumed)"
            status = "warn" if status == "pass" else status
        out.append(Check("window", f"layer {layer}", status, measured, expected, why))
    diff = float((logits - native_logits).abs().max())
    ignored = any(c.name == "window" and isinstance(c.measured, dict) and c.measured["native_beyond_mass"] > tol
                  for c in out)
    out.append(Check("window_output", "model", "warn" if ignored else "pass",
                     {"max_abs_logit_diff": diff, "native_loss": _loss(native_logits, ids)},
                     "0 when the model applies its windows itself",
                     "logits with attnscope's windows vs the model's native kernel (windows left to the "
                     "model): " + ("they differ, so published numbers from sdpa/eager ran full attention"
                                   if ignored else "the native kernel already applies the windows")))
    return out, logits


PARITY_TOKENS = 48  # a short prefix: eager attention's maps are built whole


def _parity_check(lm, ids) -> Check:
    """attnscope against the model's own eager attention on the first tokens
    (attnscope.conformance.check_model: statistics per attention call and logits, with and
    without a capture), with attnscope's declared windows off, so that both compute the model's
    own mask (the window checks above judge the windows). fp32 only: the tolerances are fp32's."""
    from attnscope.capture.interface import ATTN_IMPLEMENTATION, windows_disabled
    from attnscope.conformance import EXACT, LOGIT_TOL, STAT_TOL, check_model

    if lm.dtype != torch.float32:
        return Check("eager_parity", "model", "skip", None, None,
                     f"checked in float32 only (loaded as {str(lm.dtype).replace('torch.', '')})")
    n = min(PARITY_TOKENS, ids.shape[1])
    if n <= 16:
        return Check("eager_parity", "model", "skip", n, "> 16 tokens", "too few tokens to compare")
    try:
        with windows_disabled(lm.model):
            result = check_model(lm.model, ids[:, :n], name=lm.name, through_load=False)
    finally:
        lm.model.set_attn_implementation(ATTN_IMPLEMENTATION)
    expected = {"statistics": STAT_TOL, "logits": LOGIT_TOL}
    status = "pass" if result.status == EXACT else "fail"
    why = (f"attnscope equals eager attention on {n} tokens" if status == "pass"
           else f"{result.status}: {result.reason}")
    return Check("eager_parity", "model", status, _jsonable(result.errors), expected, why)


def _loss_check(logits, ids, *, vocab: int, source: str, max_loss: float,
                reference_loss: float | None, loss_margin: float) -> Check:
    loss = _loss(logits, ids)
    uniform = math.log(vocab)
    if reference_loss is not None:
        threshold, basis = reference_loss + loss_margin, f"reference {reference_loss:.3g} + margin {loss_margin:g}"
    else:
        threshold, basis = max_loss, f"max_loss {max_loss:g}"
    measured = {"loss": loss, "tokens": int(ids.shape[1]), "uniform_loss": uniform}
    expected = f"<= {threshold:.3g} nats ({basis})"
    if not math.isfinite(loss) or loss > threshold:
        return Check("loss", "model", "fail", measured, expected,
                     f"next-token loss on {source} is {loss:.3g} nats (uniform guessing: {uniform:.3g}): "
                     "the model does not work as loaded (wrong block class, norm order or weights)")
    return Check("loss", "model", "pass", measured, expected,
                 f"next-token loss on {source} is {loss:.3g} nats (uniform guessing: {uniform:.3g})")


def doctor(
    model,
    revision: str | None = None,
    *,
    trust_remote_code: bool = False,
    text: str | None = None,
    as_name: str | None = None,
    fix_rope: bool = True,
    max_loss: float = MAX_LOSS,
    reference_loss: float | None = None,
    loss_margin: float = LOSS_MARGIN,
    loss_tokens: int = 512,
    dtype: str = "float32",
    device: str = "cpu",
) -> DoctorReport:
    """Check that ``model`` (a name for :func:`attnscope.load`, or a LoadedModel) runs the
    architecture its checkpoint declares.

    Checks (docs/olmpool.md, "Doctor"): effective vs declared RoPE theta per layer type; the
    window layout; per windowed layer, attention mass beyond the window with attnscope's
    windows and with the model's native kernel; logits with vs without attnscope's windows;
    missing/unexpected/re-initialised weights at load; features read off the modules against the
    OlmPool registry (matched by Hub name, or ``as_name``); next-token loss on ``text`` (default:
    shipped English prose) against ``max_loss`` nats, or ``reference_loss + loss_margin``;
    attnscope's statistics and logits against the model's own eager attention on the first
    48 tokens (``eager_parity``, fp32).
    Returns a :class:`DoctorReport`; ``report.ok`` is False when a check failed.
    """
    from attnscope.models.loading import LoadedModel, load

    if isinstance(model, LoadedModel):
        lm = model
        if revision is not None and revision != lm.revision:
            raise AttnscopeError("pass revision= only with a model name, not with a LoadedModel")
    else:
        lm = load(model, revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                  fix_rope=fix_rope)
    info = dict(lm.info)
    try:
        row = _registry_row(lm.name, as_name)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"--as {as_name!r}: {exc}") from exc
    report = DoctorReport(lm.name, lm.revision, type(lm.model).__name__,
                          row.name if row is not None else None, info=info)
    report.checks += _theta_checks(info)
    report.checks.append(_weights_check(info))

    windows = {int(i): w for i, w in (info.get("windows") or {}).items()}
    features = detect_features(lm.model, windows if "windows" in info else None)
    report.info["features"] = features
    report.checks += _feature_checks(features, row)

    max_pos = lm.max_positions or 1 << 30
    widths = [w for w in windows.values() if w]
    need = max(widths) + max(16, min(max(widths), 256)) if widths else 0
    ids, source = _input_ids(lm, text, min(max_pos, max(loss_tokens, need)), min(max_pos, need))
    tol = WINDOW_TOL if lm.dtype == torch.float32 else WINDOW_TOL_HALF
    window_checks, logits = _window_checks(lm, ids, info, tol)
    report.checks += window_checks
    report.checks.append(_parity_check(lm, ids))
    if lm.tokenizer is None:
        report.checks.append(Check("loss", "model", "skip", None, None,
                                   "the model has no tokenizer: no text to score"))
    else:
        report.checks.append(_loss_check(logits, ids, vocab=int(logits.shape[-1]), source=source,
                                         max_loss=max_loss, reference_loss=reference_loss,
                                         loss_margin=loss_margin))
    return report
