"""The ``--ablate-b`` spec: which attention edit turns model A into model B.

Grammar (comma-separated, order free):

* ``window:W`` — each query attends only to the last W keys (itself included);
* ``window:W,sinks:K`` — the same, plus the first K tokens of the sequence (sink tokens) always visible;
* ``nosink:K`` — the first K tokens are masked out for every query after them.

The edit itself is applied by the core attention function; this module only
parses and hands the spec over.
"""
from __future__ import annotations

from dataclasses import dataclass

from attnscope.errors import AttnscopeError, FeatureUnavailableError, SpecError

__all__ = ["AblationSpec", "parse_ablation", "apply_ablation"]


@dataclass(frozen=True)
class AblationSpec:
    """Fields mirror the core's AttentionEdit: ``window`` (keys visible, None = all),
    ``sinks`` (first tokens kept visible under a window), ``nosink`` (first tokens masked)."""

    window: int | None = None
    sinks: int = 0
    nosink: int = 0

    def __str__(self) -> str:
        parts = []
        if self.window is not None:
            parts.append(f"window:{self.window}")
        if self.sinks:
            parts.append(f"sinks:{self.sinks}")
        if self.nosink:
            parts.append(f"nosink:{self.nosink}")
        return ",".join(parts)


def parse_ablation(text: str) -> AblationSpec:
    """Parse ``window:W[,sinks:K]`` or ``nosink:K`` into an :class:`AblationSpec`."""
    fields: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        key, sep, val = part.partition(":")
        key = key.strip().lower()
        if not sep or key not in ("window", "sinks", "nosink"):
            raise SpecError(f"ablation {text!r}: cannot read {part!r}; use window:W[,sinks:K] or nosink:K")
        if key in fields:
            raise SpecError(f"ablation {text!r}: {key} given twice")
        try:
            n = int(val)
        except ValueError:
            raise SpecError(f"ablation {text!r}: {key} needs an integer, got {val!r}") from None
        if n < (1 if key != "sinks" else 0):
            raise SpecError(f"ablation {text!r}: {key}:{n} must be positive")
        fields[key] = n
    if "sinks" in fields and "window" not in fields:
        raise SpecError(f"ablation {text!r}: sinks:K only makes sense with window:W")
    if "nosink" in fields and len(fields) > 1:
        raise SpecError(f"ablation {text!r}: nosink:K cannot be combined with window/sinks")
    return AblationSpec(window=fields.get("window"), sinks=fields.get("sinks", 0), nosink=fields.get("nosink", 0))


def apply_ablation(model, spec: AblationSpec):
    """Return ``model`` with the attention edit applied, through the core's AttentionEdit.

    Raises FeatureUnavailableError while the core does not provide it.
    """
    try:
        from attnscope.capture import AttentionEdit, edit_attention  # provided by the core
    except ImportError:
        raise FeatureUnavailableError(
            f"--ablate-b {spec}: attention ablations are not available in this attnscope build "
            "(attnscope.capture.AttentionEdit / edit_attention missing); update attnscope, "
            "or pass an already-ablated model as model B through the Python API (attnscope.tokens.compare)"
        ) from None
    except Exception as e:  # pragma: no cover - a broken core import should say so
        raise AttnscopeError(f"loading the core attention edit failed: {e}") from e
    return edit_attention(model, AttentionEdit(window=spec.window, sinks=spec.sinks, nosink=spec.nosink))
