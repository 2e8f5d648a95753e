"""Run the tasks of one checkpoint (load once, every probe and length, free), locally or on Ray."""

from __future__ import annotations

import gc
import os
import platform
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from attnscope.batch.plan import ModelRef, Task
from attnscope.batch.tasks import TaskCache, run_task
from attnscope.errors import AttnscopeError, MemoryGuardError
from attnscope.validate import is_out_of_memory, out_of_memory_error

Emit = Callable[[str, Task | None, str], None]  # (stage, task, label)


@dataclass
class Outcome:
    """What a worker hands back to the single writer for one task."""

    key: str
    ok: bool
    dataset: Any = None  # xarray.Dataset when ok
    error: str | None = None
    traceback: str | None = None
    attempts: int = 1
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunOptions:
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    retries: int = 1


def versions() -> dict[str, str]:
    import h5py
    import torch
    import transformers

    from attnscope import __version__

    return {"attnscope": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "h5py": h5py.__version__, "python": platform.python_version()}


def doctor_verdict(lm) -> dict:
    """The model doctor's verdict on a loaded checkpoint (attnscope.doctor, docs/olmpool.md), stored
    with each of its tasks as the JSON attr `doctor`: {"status": pass|warn|fail, "counts",
    "problems": [every check that warned or failed, with measured/expected/explanation]}."""
    from attnscope.models.doctor import doctor

    report = doctor(lm)
    return {"status": report.status, "counts": report.counts(),
            "problems": [c.to_dict() for c in report.checks if c.status in ("warn", "fail")]}


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing is best effort
        pass


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_group(model: ModelRef, revision: str | None, tasks: list[Task], options: RunOptions,
              emit: Emit | None = None, cache: TaskCache | None = None) -> Iterator[Outcome]:
    """Load one checkpoint once, run each of its tasks (retrying failures), then free it."""
    import json

    from attnscope.models.loading import load

    emit = emit or (lambda stage, task, label: None)
    cache = cache or TaskCache()
    attempts = 1 + max(0, options.retries)
    label = f"{model.name}{'@' + revision if revision else ''}"
    lm, load_error, t_load = None, None, 0.0
    for attempt in range(attempts):
        emit("load", None, label)
        t0 = time.perf_counter()
        try:
            lm = load(model.load_id, revision, dtype=options.dtype, device=options.device,
                      trust_remote_code=options.trust_remote_code)
            t_load = time.perf_counter() - t0
            break
        except Exception as exc:
            load_error = (f"loading {label} failed: {_describe(exc)}", traceback.format_exc())
            free_memory()
            if isinstance(exc, AttnscopeError):
                break  # a clear cause (unknown name, offline, remote code, ...): retrying cannot help
    if lm is None:
        for t in tasks:
            yield Outcome(t.key, False, error=load_error[0], traceback=load_error[1], attempts=attempt + 1)
        return
    t0 = time.perf_counter()
    try:
        verdict = doctor_verdict(lm)
    except Exception as exc:  # a doctor crash is recorded, it does not lose the checkpoint
        verdict = {"status": "error", "error": _describe(exc)}
    verdict["seconds"] = round(time.perf_counter() - t0, 3)
    common = {"device": options.device, "host": socket.gethostname(), "pid": os.getpid(),
              "versions": json.dumps(versions()), "doctor": json.dumps(verdict),
              "timing_load_s": round(t_load, 3)}
    for t in tasks:
        error = None
        for attempt in range(1, attempts + 1):
            emit("forward", t, t.label())
            t0 = time.perf_counter()
            try:
                ds = run_task(lm, t, cache)
            except Exception as exc:  # this task fails; the checkpoint's other tasks still run
                if is_out_of_memory(exc) and not isinstance(exc, MemoryGuardError):
                    exc = out_of_memory_error(t.params.get("length", "?"), options.device)
                error = (_describe(exc), traceback.format_exc())
                ds = exc = None
                free_memory()
                continue
            ds = ds.assign_attrs({**t.identity(), **common, "attempts": attempt,
                                  "timing_forward_s": round(time.perf_counter() - t0, 3)})
            yield Outcome(t.key, True, ds, attempts=attempt, timings={"forward": time.perf_counter() - t0})
            break
        else:
            yield Outcome(t.key, False, error=error[0], traceback=error[1], attempts=attempts)
    del lm
    free_memory()


# ------------------------------------------------------------------------------- executors
def run_local(groups, options: RunOptions, emit: Emit, cache: TaskCache | None = None) -> Iterator[Outcome]:
    cache = cache or TaskCache()  # tokenised texts, keyed by tokenizer: shared by all checkpoints
    for (model, revision), tasks in groups:
        yield from run_group(model, revision, tasks, options, emit, cache)


def _ray_group(model, revision, tasks, options):
    # the Ray task body: one checkpoint, streamed back task by task
    for outcome in run_group(model, revision, tasks, options):
        yield outcome


def _local_runtime_env() -> dict:
    """A local Ray instance must import this attnscope and see the same caches as the driver."""
    import attnscope

    root = os.path.dirname(os.path.dirname(os.path.abspath(attnscope.__file__)))
    env = {"PYTHONPATH": os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ATTNSCOPE_CACHE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return {"env_vars": env}


def ray_resources(model: ModelRef, options: RunOptions, overrides: dict | None = None) -> dict:
    """Resources one checkpoint's Ray task asks for: a GPU on CUDA, memory for the weights."""
    res: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if options.device.startswith("cuda") else 0}
    if model.params_b and not options.device.startswith("cuda"):
        width = 4 if options.dtype in ("float32", "fp32") else 2
        res["memory"] = int(model.params_b * 1e9 * width * 1.5)
    res.update(overrides or {})
    return res


RAY_CONNECT_TIMEOUT_S = 10.0  # override with ATTNSCOPE_RAY_CONNECT_TIMEOUT (seconds)


def check_ray_address(address: str | None, timeout: float | None = None) -> None:
    """Fail within `timeout` seconds when nothing answers at a Ray address: `ray.init` itself
    retries an unreachable address for minutes. `None` (start a local Ray) needs no check;
    `auto` is looked up the way Ray does; host:port and ray://host:port must accept a TCP
    connection."""
    import socket

    from attnscope.errors import AttnscopeError
    from attnscope.validate import env_seconds

    if address is None:
        return
    if timeout is None:
        timeout = env_seconds("ATTNSCOPE_RAY_CONNECT_TIMEOUT", RAY_CONNECT_TIMEOUT_S)
    target = address.strip()
    if target == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address("auto")
        except Exception as exc:  # Ray's own lookup: no running cluster recorded on this machine
            raise AttnscopeError(f"--ray-address auto: no running Ray cluster found on this machine "
                                 f"({type(exc).__name__}); start one with `ray start --head` or give "
                                 "its address") from None
        if not target:
            raise AttnscopeError("--ray-address auto: no running Ray cluster found on this machine; start one "
                                 "with `ray start --head` or give its address")
    host, sep, port = target.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise AttnscopeError(f"--ray-address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise AttnscopeError(f"no Ray cluster reachable at {address} ({why} within {timeout:g} s); start it "
                             "(`ray start --head`) or fix --ray-address (timeout: ATTNSCOPE_RAY_CONNECT_TIMEOUT)") from None


def run_ray(groups, options: RunOptions, emit: Emit, *, address: str | None = None,
            num_cpus: int | None = None, ray_options: dict | None = None) -> Iterator[Outcome]:
    """Each checkpoint is one Ray task (a fresh worker process: max_calls=1 frees the model);
    outcomes stream back to this process, the single writer."""
    try:
        import ray
    except ImportError:
        from attnscope.errors import AttnscopeError

        raise AttnscopeError("the ray executor needs Ray: pip install 'ray[default]' "
                             "(or use --executor local)") from None
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or min(2, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False, runtime_env=_local_runtime_env())
        started = True
    try:
        # max_calls=1: the worker process exits after its checkpoint, so the model is freed
        remote = ray.remote(num_returns="streaming", max_calls=1, max_retries=options.retries,
                            retry_exceptions=False)(_ray_group)
        live = {}
        for (model, revision), tasks in groups:
            gen = remote.options(**ray_resources(model, options, ray_options)).remote(
                model, revision, tasks, options)
            live[gen] = ({t.key for t in tasks}, f"{model.name}{'@' + revision if revision else ''}")
            emit("submit", None, live[gen][1])
        while live:
            ready, _ = ray.wait(list(live), num_returns=1, timeout=None)
            gen = ready[0]
            keys, label = live[gen]
            try:
                ref = next(gen)
                outcome = ray.get(ref)
            except StopIteration:
                del live[gen]
                continue
            except Exception as exc:  # the worker died (OOM kill, node lost): fail what is left
                tb = traceback.format_exc()
                for key in sorted(keys):
                    yield Outcome(key, False, error=f"Ray task for {label} failed: {_describe(exc)}",
                                  traceback=tb, attempts=1 + options.retries)
                del live[gen]
                continue
            keys.discard(outcome.key)
            emit("forward", None, label)
            yield outcome
    finally:
        if started:
            ray.shutdown()

