"""Batch extraction: plan, resumable store, SIGKILL at random points, failures, Ray == local.

Stand-ins for models x revisions: two tiny random checkpoints families laid out as an offline
Hugging Face hub cache (`models--toy--tiny-a` with branches step1 and step2, `models--toy--tiny-b`
with step1), revisions listed from offline manifests, measured with a natural-text probe on the
shipped prose. Every run uses one torch thread so that results are bit-identical across processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import attnscope
from attnscope.batch.plan import POST, PRE, make_plan
from attnscope.errors import ModelNotFoundError, SpecError, StoreError
from attnscope.store.store import StoreWriter, sidecar_dir

ROOT = Path(__file__).resolve().parent.parent
PROBE = """name = "prose_sinks"
task = "natural_text"
seeds = [0]

[grid]
lengths = [32, 48]
depths = [0.0, 0.5]

[haystack]
type = "prose"
text = "alice"
"""


def _snapshot(repo: Path, branch: str, commit: str, make) -> Path:
    snap = repo / "snapshots" / commit
    make(snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snap


def _perturbed_copy(src: Path, dst: Path, factor: float) -> None:
    """A later 'checkpoint': the same model with its query projections scaled."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    state = load_file(str(f))
    save_file({k: v * factor if "q_proj" in k else v for k, v in state.items()}, str(f),
              metadata={"format": "pt"})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An offline hub cache with toy/tiny-a@{step1,step2} and toy/tiny-b@step1, manifests for
    `--revisions all`, a probe file; the environment points at them for this module."""
    from attnscope.testing import make_tiny_model

    base = tmp_path_factory.mktemp("batch")
    hub, cache = base / "hub", base / "cache"
    a = hub / "models--toy--tiny-a"
    s1 = _snapshot(a, "step1", "a" * 40, lambda p: make_tiny_model("llama", p))
    _snapshot(a, "step2", "b" * 40, lambda p: _perturbed_copy(s1, p, 2.0))
    _snapshot(hub / "models--toy--tiny-b", "step1", "c" * 40, lambda p: make_tiny_model("olmo3", p))
    for name, refs in (("toy/tiny-a", ["step1", "step2", "main"]), ("toy/tiny-b", ["step1"])):
        m = cache / "revisions" / f"{name.replace('/', '--')}.json"
        m.parent.mkdir(parents=True, exist_ok=True)
        m.write_text(json.dumps({"version": 1, "repo_id": name,
                                 "refs": [{"name": r, "commit": None, "kind": "branch"} for r in refs]}))
    probe = base / "prose_sinks.toml"
    probe.write_text(PROBE)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "ATTNSCOPE_CACHE": str(cache),
           "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    import huggingface_hub.constants as hc  # read at import time: patch the live values too

    mp.setattr(hc, "HF_HUB_CACHE", str(hub))
    mp.setattr(hc, "HF_HUB_OFFLINE", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"base": base, "probe": probe, "env": env, "models": ["toy/tiny-a", "toy/tiny-b"],
           "snapshot": s1}
    torch.set_num_threads(threads)
    mp.undo()


def _run(world, out, **kw):
    kw.setdefault("progress", False)
    return attnscope.extract(world["models"], "all", [world["probe"]], out, **kw)


def _contents(path) -> dict:
    """(model, revision, probe, length, depth) -> {variable: array}: what a store holds."""
    store = attnscope.open_store(path)
    df = store.tasks()
    assert df["key"].is_unique
    out = {}
    for _, row in df[df["status"] == "done"].iterrows():
        ds = store.get(row["model"], row["revision"], row["probe"], length=row["length"], depth=row["depth"])
        out[(row["model"], row["revision"], row["probe"], row["length"], row["depth"])] = {
            name: ds[name].values for name in ds.data_vars}
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert sorted(a[k]) == sorted(b[k])
        for name in a[k]:
            np.testing.assert_array_equal(a[k][name], b[k][name], err_msg=f"{k} {name}")


@pytest.fixture(scope="module")
def reference(world):
    """An uninterrupted local run: the standard the other runs are compared with."""
    out = world["base"] / "reference.h5"
    events = []
    report = _run(world, out, consolidate_ratio=0, on_event=events.append)
    report.events = events
    return out, report


# ------------------------------------------------------------------------------- plan
def test_plan_expands_selectors_with_stable_keys(world):
    from attnscope.models import olmpool

    name = olmpool.registry()["name"].iloc[0]
    plan = make_plan([name], "pre,post", [world["probe"]])
    assert [t.revision for t in plan.tasks[::4]] == [PRE, POST]
    assert len(plan.tasks) == 2 * 4 and len(plan.groups()) == 2
    assert make_plan([name], "final", [world["probe"]]).tasks[0].revision == POST
    assert plan.keys == make_plan([name], ["pre", "post"], [world["probe"]]).keys
    assert len(set(plan.keys)) == len(plan.keys)
    swa = make_plan(["swa=1"], "final", [world["probe"]])
    assert {t.model.name for t in swa.tasks} == set(olmpool.find("swa=1")["name"])
    everything = make_plan(world["models"], "all", [world["probe"]])
    assert [(m.name, r) for (m, r), _ in everything.groups()] == [
        ("toy/tiny-a", "step1"), ("toy/tiny-a", "step2"), ("toy/tiny-b", "step1")]
    changed = world["base"] / "changed.toml"
    changed.write_text(PROBE.replace("alice", "loc_workshop"))
    assert set(make_plan([name], "pre,post", [changed]).keys).isdisjoint(plan.keys)


# ------------------------------------------------------------------------------- full run
def test_full_run_store_readers_and_resume(world, reference):
    out, report = reference
    assert report.ok and report.succeeded == 12 and not report.failures
    # one load per checkpoint, each followed by all of its tasks
    stages = [e for e in report.events if e["event"] in ("load", "done")]
    assert [e["label"] for e in stages if e["event"] == "load"] == [
        "toy/tiny-a@step1", "toy/tiny-a@step2", "toy/tiny-b@step1"]
    assert [e["event"] for e in stages] == (["load"] + ["done"] * 4) * 3
    store = attnscope.open_store(out)
    df = store.tasks()
    assert len(df) == 12 and set(df["status"]) == {"done"} and not df["pending"].any()
    assert sorted(df.groupby(["model", "revision"]).size().items()) == [
        (("toy/tiny-a", "step1"), 4), (("toy/tiny-a", "step2"), 4), (("toy/tiny-b", "step1"), 4)]
    with h5py.File(out) as f:  # consolidated: everything in the one file, nothing pending
        assert f.attrs["attnscope_kind"] == "store" and len(f["tasks"]) == 12
    assert not list(sidecar_dir(out).iterdir())
    ds = store.get("toy/tiny-a", "step2", "prose_sinks", length=48, depth=0.5)
    assert ds.sink_mass.dims == ("length", "depth", "seed", "layer", "head")
    assert ds.attrs["task_revision"] == "step2" and ds.attrs["n_tokens"] == 48
    assert json.loads(ds.attrs["versions"])["attnscope"] == attnscope.__version__
    assert ds.attrs["task_probe_hash"] == make_plan(["toy/tiny-a"], "step2", [world["probe"]]).tasks[0].probe_hash
    # the two checkpoints really differ (the store did not mix them up)
    other = store.get("toy/tiny-a", "step1", "prose_sinks", length=48, depth=0.5)
    assert not np.allclose(ds.sink_mass.values, other.sink_mass.values)
    sel = store.select(model="toy/tiny-a", length=32)
    assert sel.sizes["task"] == 4 and set(sel["revision"].values) == {"step1", "step2"}
    one = store.get("toy/tiny-a", "step2", "prose_sinks", length=32, depth=0.5)
    i = list(sel["key"].values).index(one.attrs["task_key"])
    assert sel.sink_mass.dims == ("task", "seed", "layer", "head")
    np.testing.assert_array_equal(sel.sink_mass.isel(task=i).values,
                                  one.sink_mass.squeeze(["length", "depth"]).values)
    summary = store.summary()
    assert len(summary) == 12 * 4  # task x layer
    row = summary[(summary.key == ds.attrs["task_key"]) & (summary.layer == 2)].iloc[0]
    assert row.sink_mass == pytest.approx(float(ds.sink_mass.sel(layer=2).mean()))
    # the same command again: nothing to do, nothing duplicated
    again = _run(world, out)
    assert again.ok and again.succeeded == 0 and again.already_done == 12
    assert len(attnscope.open_store(out).tasks()) == 12
    dry = _run(world, out, dry_run=True)
    assert (dry.already_done, dry.to_run) == (12, 0)


def test_cli_dry_run_counts(world, reference):
    from attnscope.cli import app

    out, _ = reference
    res = CliRunner().invoke(app, ["extract", "--models", "toy/tiny-a,toy/tiny-b", "--revisions", "all",
                                   "--probes", str(world["probe"]), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "3 checkpoint(s)" in res.output and "12 task(s)" in res.output
    assert "12 done" in res.output and "to run: 0 task(s)" in res.output


def test_checkpoints_share_the_tokenised_text(world):
    from attnscope.batch.runner import RunOptions, run_local
    from attnscope.batch.tasks import TaskCache

    plan = make_plan(["toy/tiny-a"], "all", [world["probe"]])
    cache = TaskCache()
    outcomes = list(run_local(plan.groups(), RunOptions(), lambda *a: None, cache=cache))
    assert len(outcomes) == 8 and all(o.ok for o in outcomes)
    assert len(cache.tokens) == 1 and cache.hits == 7  # tokenised once for both checkpoints


# ------------------------------------------------------------------------------- SIGKILL
_WORKER = """
import json, sys, attnscope
attnscope.extract(["toy/tiny-a", "toy/tiny-b"], "all", [sys.argv[1]], sys.argv[2], progress=False,
                  consolidate_ratio=0, on_event=lambda e: print(json.dumps(e), flush=True))
print(json.dumps({"event": "finished"}), flush=True)
"""


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(world, reference, tmp_path):
    out = tmp_path / "killed.h5"
    env = {**os.environ, **world["env"], "PYTHONPATH": str(ROOT)}
    rng = random.Random(20261122)
    kills, finished, killed_after = 0, False, []
    while not finished:
        proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(world["probe"]), str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT, text=True)
        # kill after a random event (load / forward / write / done / consolidate) plus a random
        # few milliseconds, so that kills land inside writes and consolidations too
        kill_after = rng.randint(1, 10) if kills < 3 else None
        seen = 0
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "finished":
                finished = True
            seen += 1
            if kill_after is not None and seen >= kill_after:
                time.sleep(rng.uniform(0, 0.02))
                proc.send_signal(signal.SIGKILL)
                kills += 1
                killed_after.append(event["event"])
                break
        proc.wait(timeout=120)
        if not finished:
            assert proc.returncode == -signal.SIGKILL
            if out.exists() or sidecar_dir(out).exists():
                attnscope.open_store(out).tasks()  # opens cleanly after every kill
    assert kills == 3 and proc.returncode == 0
    # event order is deterministic, so the seed fixes where the kills land: one a few ms after a
    # task's write began (inside the task-file commit or the consolidation that follows it)
    assert "write" in killed_after, killed_after
    _assert_same(_contents(out), _contents(reference[0]))
    with h5py.File(out) as f:
        assert sorted(f["tasks"]) == sorted(attnscope.open_store(reference[0]).tasks()["key"])
    assert not [p for p in sidecar_dir(out).iterdir() if not p.name.endswith(".lock")]


def test_recovery_from_every_crash_state(world, reference, tmp_path):
    """The on-disk states a crash can leave, built directly: temporary files of an unfinished
    task write and of an unfinished consolidation, and a task file already consolidated (crash
    between the store's rename and the file's removal). Opening the writer repairs them all."""
    src, _ = reference
    out = tmp_path / "s.h5"
    shutil.copy(src, out)
    side = sidecar_dir(out)
    side.mkdir()
    key = attnscope.open_store(src).tasks()["key"].iloc[0]
    with h5py.File(src) as f, h5py.File(side / f"{key}.h5", "w") as g:  # already in the store
        for name, v in f[f"tasks/{key}"].attrs.items():
            g.attrs[name] = v
        for name in f[f"tasks/{key}"]:
            f.copy(f[f"tasks/{key}/{name}"], g, name=name)
    (side / "deadbeef.1234.tmp").write_bytes(b"\x89HDF half a file")
    (tmp_path / "s.h5.tmp-xyz").write_bytes(b"\x89HDF half a store")
    before = _contents(out)
    with StoreWriter(out, consolidate_ratio=0) as w:
        assert key in w.done and len(w.done) == 12
    _assert_same(_contents(out), before)
    assert not list(side.iterdir()) and not (tmp_path / "s.h5.tmp-xyz").exists()
    with h5py.File(out) as f:
        assert len(f["tasks"]) == 12


def test_readers_see_pending_results_and_a_success_replaces_a_failure(reference, tmp_path):
    src = attnscope.open_store(reference[0])
    row = src.tasks().iloc[0]
    ds = src.get(row["model"], row["revision"], row["probe"], length=row["length"], depth=row["depth"])
    out = tmp_path / "p.h5"
    writer = StoreWriter(out, consolidate_ratio=1e9)  # consolidate only when asked
    with pytest.raises(StoreError, match="another attnscope process"):
        StoreWriter(out)  # one writer per store
    ident = {k: v for k, v in ds.attrs.items() if k.startswith("task_")}
    writer.put_failure(row["key"], {**ident, "error": "OutOfMemoryError: boom", "traceback": "tb", "attempts": 2})
    writer.consolidate()
    failed = attnscope.open_store(out).tasks()
    assert list(failed["status"]) == ["failed"] and failed["error"].iloc[0] == "OutOfMemoryError: boom"
    writer.put(row["key"], ds)  # a later success, not yet consolidated
    pending = attnscope.open_store(out).tasks()
    assert list(pending["status"]) == ["done"] and bool(pending["pending"].iloc[0])
    writer.close()
    final = attnscope.open_store(out)
    assert list(final.tasks()["status"]) == ["done"] and not final.tasks()["pending"].any()
    with h5py.File(out) as f:
        assert list(f["failures"]) == [] and list(f["tasks"]) == [row["key"]]
    np.testing.assert_array_equal(final.get(row["model"], row["revision"], row["probe"]).sink_mass, ds.sink_mass)


# ------------------------------------------------------------------------------- failures
def test_failing_tasks_are_isolated_recorded_and_retried(world, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(world["snapshot"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    probe = tmp_path / "too_long.toml"
    probe.write_text(PROBE.replace("[32, 48]", "[32, 300]").replace("[0.0, 0.5]", "[0.0]"))
    out = tmp_path / "f.h5"
    report = attnscope.extract(["toy/tiny-a", str(broken)], "step1", [probe], out, retries=1, progress=False)
    assert not report.ok and report.succeeded == 1
    errors = {f.label: f for f in report.failures}
    assert len(errors) == 3 and all(f.attempts == 2 for f in report.failures)
    long = next(f for label, f in errors.items() if "length=300" in label and "tiny-a" in label)
    assert "InputTooLongError" in long.error and "256" in long.error
    assert sum("loading" in f.error for f in report.failures) == 2
    store = attnscope.open_store(out)
    df = store.tasks()
    assert sorted(df["status"]) == ["done", "failed", "failed", "failed"]
    assert "Traceback" in store.failure(long.key)["traceback"]
    ok = store.get("toy/tiny-a", "step1", "prose_sinks", length=32, depth=0.0)
    assert ok.sink_mass.shape == (1, 1, 1, 4, 4)
    # re-running retries only the failures
    again = attnscope.extract(["toy/tiny-a", str(broken)], "step1", [probe], out, retries=0, progress=False)
    assert again.already_done == 1 and again.previously_failed == 3 and len(again.failures) == 3
    assert len(attnscope.open_store(out).tasks()) == 4
    # the CLI lists them and exits 1
    from attnscope.cli import app

    res = CliRunner().invoke(app, ["extract", "-m", f"toy/tiny-a,{broken}", "-r", "step1", "-p", str(probe),
                                   "-o", str(out), "--retries", "0", "--no-progress"])
    assert res.exit_code == 1 and "3 failed" in res.output


# ------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_get_one_clear_error(world, tmp_path):
    p = world["probe"]
    with pytest.raises(ModelNotFoundError, match="no_such_model"):
        attnscope.extract(["no_such_model"], "final", [p], tmp_path / "a.h5")
    with pytest.raises(ModelNotFoundError, match="not in the Hub cache"):
        attnscope.extract(["toy/absent"], "step1", [p], tmp_path / "a.h5")
    with pytest.raises(SpecError, match="does not exist"):
        attnscope.extract(["toy/tiny-a"], "step1", [tmp_path / "missing.toml"], tmp_path / "a.h5")
    assert not (tmp_path / "a.h5").exists() and not sidecar_dir(tmp_path / "a.h5").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="a-file is a file, not a folder"):  # before the plan
        attnscope.extract(["toy/tiny-a"], "step1", [p], blocker / "store.h5")
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"this is not HDF5 at all" * 10)
    with pytest.raises(StoreError, match="corrupt"):
        attnscope.extract(["toy/tiny-a"], "step1", [p], corrupt, progress=False)
    assert corrupt.read_bytes() == b"this is not HDF5 at all" * 10
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(StoreError, match="not an attnscope batch store"):
        attnscope.extract(["toy/tiny-a"], "step1", [p], foreign, progress=False)
    with h5py.File(foreign) as f:
        assert list(f) == ["data"]
    from attnscope.cli import app

    res = CliRunner().invoke(app, ["extract", "-m", "toy/tiny-a", "-r", "step1", "-p", str(p), "-o", str(corrupt)])
    assert res.exit_code == 2 and "corrupt" in res.output


# ------------------------------------------------------------------------------- Ray
def test_ray_executor_gives_the_same_store(world, reference, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[default]')")
    out = tmp_path / "ray.h5"
    # one model's two checkpoints keep it short: each checkpoint starts a fresh worker process
    report = attnscope.extract(["toy/tiny-a"], "all", [world["probe"]], out, executor="ray", progress=False)
    assert report.ok and report.succeeded == 8
    expected = {k: v for k, v in _contents(reference[0]).items() if k[0] == "toy/tiny-a"}
    _assert_same(_contents(out), expected)
    pids = {attnscope.open_store(out).get("toy/tiny-a", r, "prose_sinks", length=32, depth=0.0).attrs["pid"]
            for r in ("step1", "step2")}
    assert os.getpid() not in pids and len(pids) == 2  # one worker process per checkpoint


# ------------------------------------------------------------------------------- query bins, alpha_0
def _excerpt(world, ds) -> list[int]:
    """The token ids a natural-text task measured (its `start` coordinate), rebuilt independently."""
    from attnscope.batch.tasks import TaskCache

    tok = attnscope.load(str(world["snapshot"])).tokenizer
    prefix = list(tok("", add_special_tokens=True)["input_ids"])
    tokens = TaskCache().text_tokens(tok, "alice")
    length, start = int(ds["length"].values[0]), int(ds["start"].values[0])
    return prefix + tokens[start:start + length - len(prefix)]


def test_query_bins_and_alpha0_in_natural_text_tasks(world, tmp_path):
    from reference import eager_maps, reference_metrics

    from attnscope.batch.tasks import NATURAL_TEXT_METHOD

    plain = make_plan(["toy/tiny-a"], "step1", [world["probe"]])
    binned = make_plan(["toy/tiny-a"], "step1", [world["probe"]], query_bins=4)
    assert [t.params for t in binned.tasks][0] == {"length": 32, "depth": 0.0, "query_bins": 4}
    assert set(binned.keys).isdisjoint(plain.keys)  # with and without bins: never one key
    out = tmp_path / "bins.h5"
    report = attnscope.extract(["toy/tiny-a"], "step1", [world["probe"]], out, query_bins=4, progress=False)
    assert report.ok and report.succeeded == 4
    store = attnscope.open_store(out)
    tasks = store.tasks()
    assert set(tasks["query_bins"]) == {4} and set(tasks["method"]) == {NATURAL_TEXT_METHOD}
    ds = store.get("toy/tiny-a", "step1", "prose_sinks", length=48, depth=0.5, query_bins=4)
    assert ds.sink_mass_by_query.dims == ("length", "depth", "seed", "layer", "head", "query_bin")
    assert ds.token0_importance.dims == ("length", "depth", "seed", "layer", "head")
    assert list(ds.query_bin.values) == [16 + b * 32 // 4 for b in range(4)]  # queries 16..47
    # every binned metric and alpha_0 against eager attention on the same excerpt
    ids = _excerpt(world, ds)
    lm = attnscope.load(str(world["snapshot"]))
    maps = eager_maps(lm.model, torch.tensor([ids]))
    one = ds.isel(length=0, depth=0, seed=0)
    edges = list(one.query_bin.values) + [48]
    for layer, P in maps.items():
        alpha0 = P[0, :, :, 0].sum(-1) / 48  # key 0 is seen by all 48 queries
        np.testing.assert_allclose(one.token0_importance.sel(layer=layer).values, alpha0, atol=1e-6)
        for b in range(4):
            want = reference_metrics(P[0], np.arange(edges[b], edges[b + 1]))
            for name in ("sink_mass", "token0_mass", "entropy", "mean_distance", "position_profile"):
                got = one[name + "_by_query"].sel(layer=layer).isel(query_bin=b).values
                scale = max(1.0, float(np.abs(want[name]).max())) if name == "mean_distance" else 1.0
                assert np.abs(got - want[name]).max() / scale < 2e-5, (layer, b, name)
    # the bins, weighted by their query counts, give back the unbinned metric
    w = one.query_count.values
    np.testing.assert_allclose((one.entropy_by_query.values * w).sum(-1) / w.sum(), one.entropy.values, atol=1e-5)
    # the same point without bins is another task (another key), not a resumed one
    again = attnscope.extract(["toy/tiny-a"], "step1", [world["probe"]], out, progress=False)
    assert again.succeeded == 4 and again.already_done == 0
    assert len(attnscope.open_store(out).tasks()) == 8


def test_method_bump_remeasures_old_tasks_and_the_report_reads_the_new(world, tmp_path):
    """A store written before natural-text tasks recorded alpha_0 (method analyze-window/1):
    extract measures its points again under the new key, keeps the old results, and the
    report reads only the new measurement of each point."""
    from attnscope.batch.plan import task_key
    from attnscope.report import figures as F
    from attnscope.report import tables as T

    fresh = tmp_path / "fresh.h5"
    attnscope.extract(["toy/tiny-a"], "step1", [world["probe"]], fresh, progress=False)
    new = attnscope.open_store(fresh)
    old_path = tmp_path / "old.h5"
    plan = make_plan(["toy/tiny-a"], "step1", [world["probe"]])
    with StoreWriter(old_path, consolidate_ratio=0) as w:
        for t in plan.tasks:
            ds = new.get("toy/tiny-a", "step1", "prose_sinks", **t.params).drop_vars("token0_importance")
            key = task_key(t.model.load_id, t.revision, t.probe_hash, t.params, t.dtype, "analyze-window/1")
            # the old method's numbers differ (here: scaled), so a mix would show
            w.put(key, ds.assign(sink_mass=ds.sink_mass * 0.5).assign_attrs(
                task_key=key, task_method="analyze-window/1"))
    old_keys = set(attnscope.open_store(old_path).tasks()["key"])
    assert "sink_rate" not in T.model_table(old_path)  # no task has alpha_0
    with pytest.raises(StoreError, match="token0_importance"):
        F.figure_data("score_vs_sinks", old_path)
    report = attnscope.extract(["toy/tiny-a"], "step1", [world["probe"]], old_path, progress=False)
    assert report.succeeded == 4 and report.already_done == 0  # every point measured again
    store = attnscope.open_store(old_path)
    tasks = store.tasks()
    assert len(tasks) == 8 and old_keys <= set(tasks["key"])  # nothing deleted
    current = T.current_tasks(old_path)
    assert set(current.attrs["superseded"]) == old_keys and not set(current["key"]) & old_keys
    expect = np.mean([new.get("toy/tiny-a", "step1", "prose_sinks", **t.params).sink_mass.values
                      for t in plan.tasks])
    row = T.model_table(old_path).iloc[0]
    assert row["sink_mass"] == pytest.approx(expect, rel=1e-6)  # the old, halved values are not read
    assert np.isfinite(row["sink_rate"])
    for key in old_keys:  # each task stays readable by its key
        assert "token0_importance" not in store.task(key)


def test_query_bins_bad_values_stop_before_any_model_loads(world, tmp_path):
    from attnscope.cli import app
    from attnscope.errors import AttnscopeError

    with pytest.raises(AttnscopeError, match="more than the 16 query positions"):
        make_plan(["toy/tiny-a"], "step1", [world["probe"]], query_bins=17)
    with pytest.raises(AttnscopeError, match="positive integer"):
        make_plan(["toy/tiny-a"], "step1", [world["probe"]], query_bins=0)
    res = CliRunner().invoke(app, ["extract", "-m", "toy/tiny-a", "-r", "step1", "-p", str(world["probe"]),
                                   "-o", str(tmp_path / "x.h5"), "--query-bins", "40"])
    assert res.exit_code == 2 and "query_bins=40" in res.output
    assert not (tmp_path / "x.h5").exists()
    res = CliRunner().invoke(app, ["extract", "-m", "toy/tiny-a", "-r", "step1", "-p", str(world["probe"]),
                                   "-o", str(tmp_path / "x.h5"), "--query-bins", "4", "--dry-run"])
    assert res.exit_code == 0 and "4 task(s)" in res.output
