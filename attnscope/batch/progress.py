"""Rich progress for a batch: overall tasks with ETA, and the current checkpoint/probe/stage."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_STAGES = {"load": "loading", "forward": "measuring", "write": "writing", "consolidate": "consolidating",
           "submit": "submitted"}


class BatchProgress:
    """Two lines: `tasks [bar] done/total, failed, elapsed, ETA` and `stage: model@rev probe params`."""

    def __init__(self, total: int, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.failed = 0
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console or Console(stderr=True), transient=False,
            disable=not enabled)
        self._overall = self._progress.add_task("tasks", total=total, failed="")
        self._current = self._progress.add_task("", total=None, failed="", visible=enabled)

    def __enter__(self) -> BatchProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.update(self._current, visible=False)
        self._progress.stop()

    def stage(self, stage: str, label: str) -> None:
        self._progress.update(self._current, description=f"[cyan]{_STAGES.get(stage, stage)}[/] {label}")

    def advance(self, ok: bool) -> None:
        if not ok:
            self.failed += 1
        self._progress.update(self._overall, advance=1,
                              failed=f"[red]{self.failed} failed[/]" if self.failed else "")
