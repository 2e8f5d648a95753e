"""nnsight 0.8 backend: statistics from a trace of the attention-interface call.

Every transformers attention module calls its attention implementation as
`attention_interface(self, query, key, value, attention_mask, scaling=..., ...)`, whatever the
implementation (sdpa, eager, attnscope). Inside `model.trace(...)`, that call's `.inputs` give the
post-RoPE query and un-expanded key the kernel receives; attnscope reduces them (row
log-sum-exp recomputed in query chunks) while the trace runs, one layer at a time, and stops
the model after the last wanted layer.

nnsight names a call by its position (`attention_interface_1` today: `_0` is the lookup), which
changes across versions and families, so the call is found by what it is: in the module's
forward source, the call whose first argument is the module itself (`self`) followed by at
least query, key and value, with the attention keywords (`scaling`/`dropout`) or a callee bound
from `ALL_ATTENTION_FUNCTIONS`/`eager_attention_forward`. At run time its inputs are checked
to be (module, 4-D query, 4-D key, ...); anything else raises UnsupportedModelError.

Reading `.source` makes nnsight instrument the module's forward (inert outside a trace);
attnscope undoes that after its trace on modules that were not instrumented before, and when
it wrapped a transformers model itself it removes nnsight's controllers again.
"""

from __future__ import annotations

import ast

import torch

from attnscope.backends import ModelSource, require, row_lse
from attnscope.capture.interface import (LayerAttention, _row_starts, layer_window, read_kwargs,
                                        split_mask)
from attnscope.errors import BackendError, UnsupportedModelError

_INTERFACE_SOURCES = ("ALL_ATTENTION_FUNCTIONS", "get_interface", "eager_attention_forward",
                      "AttentionInterface")
_ATTENTION_KEYWORDS = {"scaling", "dropout"}


_MISSING = object()


def wrap(hf_model, tokenizer):
    """(nnsight TransformersModel around `hf_model`, undo) for backend='nnsight' on a plain model.

    Wrapping installs nnsight's controller as each module's instance `forward`; undo() puts back
    exactly what each module had before.
    """
    require("nnsight")
    from nnsight.intervention.source import STATE
    from nnsight.modeling.transformers import TransformersModel

    saved = [(m, m.__dict__.get("forward", _MISSING), m.__dict__.get(STATE, _MISSING))
             for m in hf_model.modules()]

    def undo():
        for m, forward, state in saved:
            for key, value in (("forward", forward), (STATE, state)):
                if value is _MISSING:
                    m.__dict__.pop(key, None)
                else:
                    m.__dict__[key] = value

    return TransformersModel(hf_model, tokenizer=tokenizer), undo


def _dotted(expr) -> list[str]:
    parts = []
    while True:
        if isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        elif isinstance(expr, ast.Subscript):
            expr = expr.value
        elif isinstance(expr, ast.Name):
            parts.append(expr.id)
            return parts[::-1]
        else:
            return parts[::-1]


def _interface_bound_names(tree) -> set[str]:
    """Local names assigned from an expression that mentions the attention-function registry."""
    names = set()
    for node in ast.walk(tree):
        value = getattr(node, "value", None)
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if value is None or not targets:
            continue
        text = ast.dump(value)
        if any(s in text for s in _INTERFACE_SOURCES):
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def find_attention_call(source) -> str:
    """The nnsight op label of the attention-interface call in a module's `.source`.

    Raises UnsupportedModelError (saying what was looked for) if there is none or more than one.
    """
    compiled = source.compiled
    try:
        tree = ast.parse(compiled.source)
    except SyntaxError as exc:  # pragma: no cover - nnsight hands back parseable source
        raise UnsupportedModelError(f"cannot parse the attention module's forward: {exc}") from None
    bound = _interface_bound_names(tree)
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or len(node.args) < 4:
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Name) and first.id == "self"):
            continue
        callee = _dotted(node.func)
        keywords = {k.arg for k in node.keywords if k.arg}
        if keywords & _ATTENTION_KEYWORDS or (len(callee) == 1 and callee[0] in bound):
            calls.append((node, "_".join(callee) or "call"))
    labels = []
    for node, base in calls:
        found = [n for n in compiled.names
                 if compiled.lines.get(n) == node.lineno and n.rsplit("_", 1)[0] == base]
        if found:
            labels.append(found[0])  # a call is numbered before an assignment on its line
    if len(labels) != 1:
        what = "no" if not labels else f"{len(labels)} ({', '.join(labels)})"
        raise UnsupportedModelError(
            f"found {what} attention-interface calls (f(self, query, key, value, mask, scaling=...)) "
            f"in {source.prefix}; this module does not call transformers' attention interface in a "
            "way attnscope recognises. Use backend='native' (attnscope's attention function) "
            f"instead. Operations nnsight sees: {', '.join(compiled.names)}")
    return labels[0]


def _attention_envoys(nn_model):
    def is_attention(envoy):
        m = envoy._module
        return getattr(m, "layer_idx", None) is not None and type(m).__name__.endswith("Attention")

    envoys = nn_model.modules(include_fn=is_attention)
    return sorted(envoys, key=lambda e: int(e._module.layer_idx))


def _source_state(module):
    from nnsight.intervention.source import STATE

    return module.__dict__.get(STATE)


def nnsight_source(nn_model, tokenizer, name, revision) -> ModelSource:
    """A ModelSource that traces `nn_model` and feeds the observer from inside the trace."""
    hf_model = nn_model._module
    envoys = _attention_envoys(nn_model)
    if not envoys:
        raise UnsupportedModelError(
            f"{type(hf_model).__name__} has no attention modules with a layer_idx for nnsight to trace")

    def run(observer, input_ids, attention_mask):
        if input_ids.shape[0] != 1:
            raise BackendError("backend 'nnsight' runs one sequence at a time; pass a single text, "
                               "or use backend='native' for a padded batch")
        wanted = [e for e in envoys if observer.wants(int(e._module.layer_idx))]
        if not wanted:
            return
        before = {id(e._module): _snapshot(e._module) for e in wanted}
        try:
            labels = {}  # one forward per attention class: one label per class
            for e in wanted:
                cls = type(e._module)
                if cls not in labels:
                    labels[cls] = find_attention_call(e.source)
            try:
                _trace(nn_model, wanted, labels, observer, input_ids)
            except Exception as exc:
                if type(exc).__name__ != "OutOfOrderError":
                    raise
                # the forward never reached the attention call the trace waits for
                raise UnsupportedModelError(
                    f"nnsight: the model ran without calling the attention interface found in "
                    f"{type(wanted[0]._module).__name__}.forward ({exc}); use backend='native'") from None
        finally:
            for e in wanted:
                _restore(e._module, before[id(e._module)])

    return ModelSource(hf_model, tokenizer, name, revision, "nnsight", run)


def _trace(nn_model, wanted, labels, observer, input_ids):
    errors = []
    with torch.no_grad(), nn_model.trace(input_ids) as tracer:
        with torch.no_grad():  # the trace body runs in nnsight's worker thread: grad mode is per thread
            for e in wanted:
                args, kwargs = getattr(e.source, labels[type(e._module)]).inputs
                module = e._module
                ok = (len(args) >= 3 and args[0] is module and all(
                    isinstance(t, torch.Tensor) and t.dim() == 4 for t in args[1:3]))
                if not ok:
                    errors.append(UnsupportedModelError(
                        f"{e.path}: the call found as the attention interface did not receive "
                        "(module, query [B,H,T,d], key [B,KVH,S,d], ...); use backend='native'"))
                    break
                query, key = args[1].detach(), args[2].detach()
                call_kwargs = {k: v for k, v in kwargs.items()
                               if k not in ("attention_mask", "scaling", "dropout")}
                terms = read_kwargs(module, query, key, kwargs.get("dropout", 0.0), call_kwargs)
                mask, mask_bias = split_mask(args[4] if len(args) > 4 else kwargs.get("attention_mask"),
                                             query.shape[1])
                bias = terms.bias if mask_bias is None else (
                    mask_bias if terms.bias is None else terms.bias + mask_bias)
                scale = kwargs.get("scaling")
                scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
                window = layer_window(module, terms.window)
                if window is not None and window >= key.shape[2]:
                    window = None
                attn = LayerAttention(int(module.layer_idx), query, key, scale,
                                      key.shape[2] - query.shape[2], None, mask, window, None,
                                      terms.softcap, _row_starts(mask, query.shape[0], query.device),
                                      bias=bias, sinks=terms.sinks, indices=terms.indices)
                if observer.needs_lse:
                    attn.lse = row_lse(attn)
                observer.observe(attn)
            tracer.stop()  # nothing after the last wanted layer: no later layers, no logits
    if errors:
        raise errors[0]


def _snapshot(module):
    state = _source_state(module)
    return None if state is None else (state.body, state.sourced, state.compiled)


def _restore(module, snap) -> None:
    """Undo the source instrumentation `.source` installed, if the module had none before."""
    state = _source_state(module)
    if state is None or snap is None:
        return
    state.body, state.sourced, state.compiled = snap
