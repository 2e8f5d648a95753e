"""`attnscope.extract`: plan, skip what the store has, run (local or Ray), commit each result."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from attnscope.batch.plan import Plan, estimate_seconds, format_seconds, make_plan, uncached_checkpoints
from attnscope.batch.progress import BatchProgress
from attnscope.batch.runner import RunOptions, run_local, run_ray
from attnscope.errors import AttnscopeError
from attnscope.models.hub import unreachable_error
from attnscope.progress import silenced


@dataclass
class Failure:
    key: str
    label: str
    error: str
    attempts: int
    checkpoint: str = ""  # "model@revision"
    cause: str = ""  # the error with the checkpoint's name taken out: equal causes group


@dataclass
class FailureGroup:
    """Failed tasks that share one cause (see group_failures)."""

    cause: str
    tasks: list[Failure]

    @property
    def checkpoints(self) -> list[str]:
        return list(dict.fromkeys(f.checkpoint for f in self.tasks))


def _cause(error: str, task) -> str:
    """The error without what names the checkpoint, so one cause on many checkpoints reads once."""
    rev = f"@{task.revision}" if task.revision else ""
    out = error
    for text, repl in ((f"{task.model.name}{rev}", "<checkpoint>"), (f"{task.model.load_id}{rev}", "<checkpoint>"),
                       (task.model.load_id, "<model>"), (task.model.name, "<model>")):
        if text:
            out = out.replace(text, repl)
    if task.revision:
        out = out.replace(repr(task.revision), "<revision>")
    return out


def group_failures(failures: Sequence[Failure]) -> list[FailureGroup]:
    """Failures grouped by cause, largest group first (the CLI prints one row per group)."""
    groups: dict[str, FailureGroup] = {}
    for f in failures:
        groups.setdefault(f.cause or f.error, FailureGroup(f.cause or f.error, [])).tasks.append(f)
    return sorted(groups.values(), key=lambda g: -len(g.tasks))


@dataclass
class ExtractReport:
    """What an extract run did (or, with dry_run, would do)."""

    store: Path
    plan: Plan
    already_done: int
    previously_failed: int
    to_run: int
    succeeded: int = 0
    failures: list[Failure] = field(default_factory=list)
    estimate_s: float | None = None
    dry_run: bool = False
    elapsed_s: float = 0.0
    corrupt: list[str] = field(default_factory=list)  # keys found damaged: moved aside, measured again
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """True when every planned task has a result in the store."""
        return not self.failures and (self.dry_run or self.already_done + self.succeeded == len(self.plan.tasks))


class ExtractInterrupted(KeyboardInterrupt):
    """Ctrl-C during `extract`: `.report` says what was saved before it (see `interrupted_message`)."""

    def __init__(self, report: ExtractReport):
        super().__init__("interrupted")
        self.report = report


def interrupted_message(report: ExtractReport) -> str:
    """One line for an interrupted run: what is safe and how to resume."""
    return (f"interrupted: the {report.succeeded} task(s) finished in this run and the {report.already_done} "
            f"there before are saved in {report.store} (results not yet folded into the file wait in "
            f"{report.store.name}.d/, readers see them); the task being measured was not saved. Resume with "
            "the same command: finished tasks are skipped")


def _store_state(out: Path, keys: set[str]) -> tuple[set[str], set[str], set[str]]:
    """(done, failed, corrupt) keys of the plan in an existing store, every entry read back."""
    from attnscope.store.store import Store, _pending_files, sidecar_dir

    if not out.exists() and not _pending_files(sidecar_dir(out)):
        return set(), set(), set()
    check = Store(out).verify()
    return check.done & keys, check.failed & keys, {c.key for c in check.corrupt} & keys


def extract(
    models: str | Sequence[str],
    revisions: str | Sequence[str] | None = "final",
    probes: Sequence[str | Path] = (),
    out: str | Path = "attnscope-store.h5",
    *,
    executor: str = "local",
    ray_address: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    retries: int = 1,
    dry_run: bool = False,
    progress: bool = True,
    consolidate_ratio: float = 0.25,
    ray_options: dict[str, Any] | None = None,
    on_event: Callable[[dict], None] | None = None,
    query_bins: int | None = None,
    received_top: int | None = None,
) -> ExtractReport:
    """Measure every probe on every model x revision into one HDF5 store, resumably.

    models: OlmPool names/prefixes, an OlmPool filter ('qk_norm=none,swa=1'), 'all', Hub ids,
    local folders, .gguf files or 'smollm2'. revisions: 'final', 'pre', 'post', 'all' or names
    (a list or comma-separated). Re-running the same call resumes: tasks with a result are
    skipped, failed ones are tried again. A failing task is recorded (error, traceback) and the
    batch goes on; `report.ok` says whether all succeeded. `on_event` receives dicts
    {"event": stage|"done"|"failed", "task": key, "label": ...} (for monitoring and tests).

    Checked before anything loads: the executor, retries, the device (once for the batch), the
    models and probes (make_plan), a Ray address (reachable within ATTNSCOPE_RAY_CONNECT_TIMEOUT
    seconds, default 10) and the store. Entries of the store that fail their checksums are
    moved aside and measured again (`report.corrupt`). Ctrl-C raises ExtractInterrupted (a
    KeyboardInterrupt) whose `.report` says what was saved.

    query_bins=N: natural-text tasks also record every metric per bin of query position
    (`<metric>_by_query`; a task parameter, so part of the task key; docs/batch.md).
    received_top=K: natural-text tasks also record attention received per key, compactly: the K
    keys per head that receive most and key-position bins (`received_top*`, `received_bins`;
    a task parameter too; docs/received.md).
    """
    from attnscope.batch.runner import check_ray_address
    from attnscope.store.files import check_store_path
    from attnscope.store.store import StoreWriter
    from attnscope.validate import check_count, check_device

    t_start = time.time()
    if executor not in ("local", "ray"):
        raise AttnscopeError(f"unknown executor {executor!r}: use 'local' or 'ray'")
    check_count("retries", retries, minimum=0, none_ok=False)
    # once here, not once per task; Ray workers may have devices this driver lacks
    check_device(device, here=executor == "local" or ray_address is None)
    if executor == "ray" and not dry_run:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise AttnscopeError("the ray executor needs Ray: pip install 'ray[default]' "
                                 "(or use --executor local)") from None
    check_store_path(out)  # an HDF5 name that fits the filesystem, with its .d/, .lock and temporary names
    out = Path(out).expanduser().absolute()
    plan = make_plan(models, revisions, probes, dtype, query_bins=query_bins, received_top=received_top)
    keys = set(plan.keys)
    emit_event = on_event or (lambda event: None)
    missing = uncached_checkpoints([ckpt for ckpt, _ in plan.groups()])
    if missing and not dry_run:  # fail once, before the batch, not once per task
        (model, rev), rest = missing[0], len(missing) - 1
        raise unreachable_error(model.load_id, rev, n_more=rest)
    if missing:
        plan.notes.append(str(unreachable_error(missing[0][0].load_id, missing[0][1], n_more=len(missing) - 1)))

    if dry_run:
        done, failed, corrupt = _store_state(out, keys)
        todo = len(keys - done)
        return ExtractReport(out, plan, len(done), len(failed), todo,
                             estimate_s=estimate_seconds(plan, device, dtype, done), dry_run=True,
                             elapsed_s=time.time() - t_start, corrupt=sorted(corrupt))
    if executor == "ray":
        check_ray_address(ray_address)

    writer = StoreWriter(out, consolidate_ratio=consolidate_ratio)
    done = writer.done & keys
    failed_before = writer.failed & keys
    groups = [(g, [t for t in tasks if t.key not in done]) for g, tasks in plan.groups()]
    groups = [(g, tasks) for g, tasks in groups if tasks]
    todo = sum(len(t) for _, t in groups)
    report = ExtractReport(out, plan, len(done), len(failed_before), todo,
                           estimate_s=estimate_seconds(plan, device, dtype, done),
                           corrupt=sorted({c.key for c in writer.quarantined}))
    by_key = {t.key: t for t in plan.tasks}
    options = RunOptions(dtype=dtype, device=device, trust_remote_code=trust_remote_code, retries=retries)
    bar = BatchProgress(todo, enabled=progress)

    def emit(stage: str, task, label: str) -> None:
        bar.stage(stage, label)
        emit_event({"event": stage, "task": task.key if task is not None else None, "label": label})

    try:
        with bar, silenced():  # the batch's own bar; no per-layer or per-prompt bars inside it
            if executor == "local":
                outcomes = run_local(groups, options, emit)
            else:
                outcomes = run_ray(groups, options, emit, address=ray_address, ray_options=ray_options)
            for outcome in outcomes:
                task = by_key[outcome.key]
                if outcome.ok:
                    emit("write", task, task.label())
                    writer.put(outcome.key, outcome.dataset)
                    report.succeeded += 1
                    emit_event({"event": "done", "task": outcome.key, "label": task.label()})
                else:
                    writer.put_failure(outcome.key, {
                        **task.identity(), "error": outcome.error, "traceback": outcome.traceback or "",
                        "attempts": outcome.attempts, "device": device,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                    error = outcome.error or ""
                    report.failures.append(Failure(
                        outcome.key, task.label(), error, outcome.attempts,
                        checkpoint=f"{task.model.name}{'@' + task.revision if task.revision else ''}",
                        cause=_cause(error, task)))
                    emit_event({"event": "failed", "task": outcome.key, "label": task.label()})
                bar.advance(outcome.ok)
            emit("consolidate", None, str(out))
        writer.close()
    except KeyboardInterrupt:
        writer.__exit__(KeyboardInterrupt, None, None)  # release the lock; committed task files stay
        report.succeeded = len(writer.done & keys) - len(done)  # what is durably written, exactly
        report.interrupted, report.elapsed_s = True, time.time() - t_start
        raise ExtractInterrupted(report) from None
    except BaseException:
        writer.__exit__(True, None, None)  # release the lock; committed task files stay
        raise
    report.elapsed_s = time.time() - t_start
    return report


def describe_plan(report: ExtractReport) -> list[str]:
    """Plain-text lines for --dry-run: counts, what is done, the cost estimate."""
    plan = report.plan
    models = {t.model.name for t in plan.tasks}
    checkpoints = plan.groups()
    probes = {t.probe for t in plan.tasks}
    lines = [f"store: {report.store}",
             f"{len(models)} model(s), {len(checkpoints)} checkpoint(s) (one load each); "
             f"{len(probes)} probe(s) ({', '.join(sorted(probes))}); {len(plan.tasks)} task(s)",
             f"already in the store: {report.already_done} done, {report.previously_failed} failed before "
             "(will be retried)" + (f", {len(report.corrupt)} corrupt (will be moved aside and measured again)"
                                    if report.corrupt else ""),
             f"to run: {report.to_run} task(s); rough cost {format_seconds(report.estimate_s)}"]
    lines += [f"note: {n}" for n in plan.notes]
    return lines
