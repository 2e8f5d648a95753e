"""Attention ablations as text specs, applied through attnscope's attention function.

Grammar of a spec (fields separated by ``,`` or ``;``, order free):

* ``window:W`` — each query attends only to the last W keys (itself included);
* ``sinks:K`` — with a window, the first K tokens of the sequence stay visible too;
* ``nosink:K`` — the first K tokens are hidden from every query (the softmax
  renormalises over the remaining keys; a query always sees itself);
* ``layers:L`` — apply the edit to these attention layers only: ``0+3+7``,
  ``0-11`` (inclusive range) or a mix ``0-3+9``; default every layer.

``parse_ablation`` turns a spec into the core's :class:`attnscope.AttentionEdit`
(``window``, ``keep_sinks``, ``drop_sinks``, ``layers``); ``edit.describe()``
writes it back in the same grammar. The edit is an exact mask inside the
registered attention function (attnscope/capture/interface.py), so it works on
any model attnscope can load, and an edit that hides nothing for an input
(window >= input length, no dropped sinks) leaves the logits bit-for-bit unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from attnscope.capture.interface import ATTN_IMPLEMENTATION, AttentionEdit, register, set_edit, using_attnscope
from attnscope.errors import SpecError
from attnscope.validate import check_edit_layers

__all__ = ["parse_ablation", "apply_ablation", "ablated", "current_edit"]

_GRAMMAR = "use window:W[,sinks:K][,layers:0-3+9] or nosink:K[,layers:...]"


def _parse_layers(text: str, val: str) -> tuple[int, ...]:
    layers: set[int] = set()
    for piece in val.split("+"):
        lo, dash, hi = piece.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise SpecError(f"ablation {text!r}: layers:{val} should read like 0+3+7 or 0-11") from None
        if a < 0 or b < a:
            raise SpecError(f"ablation {text!r}: layer range {piece!r} is empty or negative")
        layers.update(range(a, b + 1))
    return tuple(sorted(layers))


def parse_ablation(text: str | AttentionEdit) -> AttentionEdit:
    """Parse a spec like ``window:64,sinks:4`` or ``nosink:4`` into an AttentionEdit.

    An AttentionEdit is returned unchanged. Raises SpecError (saying which part is
    wrong) for unknown fields, repeated fields, non-positive sizes, ``sinks``
    without ``window``, and ``sinks`` together with ``nosink``.
    """
    if isinstance(text, AttentionEdit):
        return text
    fields: dict[str, int] = {}
    layers = None
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        key, sep, val = part.partition(":")
        key = key.strip().lower()
        if not sep or key not in ("window", "sinks", "nosink", "layers"):
            raise SpecError(f"ablation {text!r}: cannot read {part!r}; {_GRAMMAR}")
        if key in fields or (key == "layers" and layers is not None):
            raise SpecError(f"ablation {text!r}: {key} given twice")
        if key == "layers":
            layers = _parse_layers(text, val)
            continue
        try:
            n = int(val)
        except ValueError:
            raise SpecError(f"ablation {text!r}: {key} needs an integer, got {val!r}") from None
        if n < 1:
            raise SpecError(f"ablation {text!r}: {key}:{n} must be positive")
        fields[key] = n
    if "sinks" in fields and "window" not in fields:
        raise SpecError(f"ablation {text!r}: sinks:K keeps sinks visible under a window; add window:W")
    if "sinks" in fields and "nosink" in fields:
        raise SpecError(f"ablation {text!r}: sinks:K (keep the first K tokens) contradicts nosink:K (hide them)")
    if not fields:
        raise SpecError(f"ablation {text!r}: layers alone edits nothing; {_GRAMMAR}")
    return AttentionEdit(window=fields.get("window"), keep_sinks=fields.get("sinks", 0),
                         drop_sinks=fields.get("nosink", 0), layers=layers)


def _checked(model, edit) -> AttentionEdit:
    """The edit parsed, with its layers checked against the model's (a layer beyond it is refused)."""
    edit = parse_ablation(edit)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n_layers is not None:
        check_edit_layers(edit.layers, int(n_layers), "the ablation")
    return edit


def current_edit(model) -> AttentionEdit | None:
    """The edit set on ``model``'s attention layers (None when there is none)."""
    return next((e for m in model.modules() if (e := getattr(m, "_attnscope_edit", None)) is not None), None)


def apply_ablation(model, edit: str | AttentionEdit | None):
    """Set (or with None remove) an attention edit on ``model`` in place, and return it.

    Setting an edit also routes the model's attention through attnscope's
    function when it is not already (``attnscope.load`` models already are;
    without an edit that function computes what sdpa computes). :func:`ablated`
    does the same for a block and restores everything afterwards. No weights
    are copied: to compare a model with its ablated self, score it, apply the
    edit, score it again, then remove the edit (``apply_ablation(model, None)``);
    this is what ``compare``/``run_study`` do with ``ablate_b=``.
    """
    if edit is not None:
        edit = _checked(model, edit)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            register()
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
    set_edit(model, edit)
    return model


@contextlib.contextmanager
def ablated(model, edit: str | AttentionEdit | None) -> Iterator:
    """Run ``model`` with an attention edit inside the block; restore its previous state after.

    Routes attention through attnscope for the duration (restoring the previous
    attention implementation afterwards) and puts back whatever edit was set before.
    """
    previous = current_edit(model)
    with using_attnscope(model):
        set_edit(model, None if edit is None else _checked(model, edit))
        try:
            yield model
        finally:
            set_edit(model, previous)
