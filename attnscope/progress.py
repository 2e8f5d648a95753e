"""Progress for calls that take minutes: `analyze` (per layer), `run_probe` (per prompt), token
losses (per window).

`progress=None` (the default everywhere) means automatic: a rich bar on stderr when stderr is a
terminal, a tqdm bar in a Jupyter notebook (a widget when ipywidgets is installed, else text),
nothing otherwise (pipes, files, CI logs, test runs). `progress=True`/`False` forces it;
`set_default(False)` (the CLI's `--quiet`) silences every automatic bar in the process. While a
bar is open, calls inside it (the per-layer `analyze` of each `run_probe` prompt, the tasks of
`extract`) stay silent, so bars never nest.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_default: bool | None = None  # None: automatic
_open = threading.local()  # .depth: bars (or silenced regions) open in this thread


def set_default(enabled: bool | None) -> None:
    """Process-wide default for progress=None: True, False (quiet) or None (automatic)."""
    global _default
    _default = enabled


def in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def _depth() -> int:
    return getattr(_open, "depth", 0)


def resolve(progress: bool | None) -> str | None:
    """Which bar to show: 'rich', 'notebook' or None."""
    if progress is False or (progress is None and (_depth() or _default is False)):
        return None
    if in_notebook():
        return "notebook"
    if progress or _default or sys.stderr.isatty():
        return "rich"
    return None


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Inside, automatic bars stay off (a caller shows its own progress)."""
    _open.depth = _depth() + 1
    try:
        yield
    finally:
        _open.depth = _depth() - 1


class Bar:
    """One progress bar: advance(n) as work is done; a no-op when progress is off."""

    def __init__(self, kind: str | None, total: int | None, description: str, unit: str):
        self.kind = kind
        self._bar = None
        if kind == "rich":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(unit + "s"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task(description, total=total)
            self._bar.start()
        elif kind == "notebook":
            try:
                import ipywidgets  # noqa: F401
                from tqdm.notebook import tqdm
            except ImportError:  # no widgets: tqdm's text bar, shown under the cell
                from tqdm import tqdm
            self._bar = tqdm(total=total, desc=description, unit=unit, leave=False, file=sys.stderr)

    def advance(self, n: int = 1) -> None:
        if self.kind == "rich":
            self._bar.advance(self._task, n)
        elif self.kind == "notebook":
            self._bar.update(n)

    def close(self) -> None:
        if self.kind == "rich":
            self._bar.stop()
        elif self.kind == "notebook":
            self._bar.close()
        self.kind = None

    def watch(self, observer):
        """`observer` (an attention observer) that also advances this bar once per layer it sees."""
        return observer if self.kind is None else _Ticking(observer, self)


class _Ticking:
    """An attention observer that forwards everything to `inner` and advances a bar per layer."""

    def __init__(self, inner, bar: Bar):
        self._inner, self._bar = inner, bar

    def observe(self, attn) -> None:
        self._inner.observe(attn)
        self._bar.advance()

    def __getattr__(self, name):  # needs_lse, wants, results, ...: the inner observer's
        return getattr(self._inner, name)


@contextlib.contextmanager
def bar(total: int | None, description: str, *, unit: str = "item",
        progress: bool | None = None) -> Iterator[Bar]:
    """A progress bar for the block (see the module docstring for `progress`)."""
    b = Bar(resolve(progress), total, description, unit)
    _open.depth = _depth() + 1
    try:
        yield b
    finally:
        _open.depth = _depth() - 1
        b.close()


def track(items: Iterable[T], description: str, *, total: int | None = None, unit: str = "item",
          progress: bool | None = None) -> Iterator[T]:
    """Iterate over `items` with a progress bar (opened at the first item, closed at the end)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total, description, unit=unit, progress=progress) as b:
        for item in items:
            yield item
            b.advance()
