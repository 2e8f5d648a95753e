"""Hostile input: every refusal in docs/refusals.md, as a user would meet it.

Each CLI case asserts the exit code, that stderr is exactly one line saying what is wrong, that
every file that existed before is byte-identical after (sha256 of the whole folder before and
after), and, for refusals that must come before any model loads, that no model was loaded
(`from_pretrained` is replaced by a function that fails the test). The Python API follows the
same rules with exceptions. Models are tiny random checkpoints (attnscope.testing); nothing here
needs a download.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
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
from attnscope.cli import app
from attnscope.errors import AttnscopeError, StoreError

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
PROBE = """name = "prose_sinks"
task = "natural_text"
seeds = [0]

[grid]
lengths = [32, 48]
depths = [0.0]

[haystack]
type = "prose"
text = "alice"
"""
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods. " * 2


# ------------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (symlinks as their target's name) -> sha256 of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link->" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def refused(args, folder: Path, *words, code: int = 2) -> str:
    """Run the CLI in-process; assert the exit code, one line naming `words`, nothing changed."""
    before = snapshot(folder)
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exception)
    line = one_line(res.stderr)
    for w in words:
        assert w in line, (w, line)
    assert snapshot(folder) == before, "a file changed, appeared or vanished"
    return line


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if any model's weights are loaded."""
    from transformers import AutoModelForCausalLM

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama (4 layers, context 256) with its tokenizer."""
    from attnscope.testing import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def work(tmp_path, tiny):
    """A folder with a text file, a result file, a foreign HDF5 file and a plain file."""
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "old.h5").write_bytes(b"an earlier result, not to be lost")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["data"] = np.arange(5)
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "probe.toml").write_text(PROBE)
    return tmp_path


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny, single_thread):
    """A batch store with two finished tasks (written through the public extract)."""
    base = tmp_path_factory.mktemp("store")
    (base / "probe.toml").write_text(PROBE)
    report = attnscope.extract([str(tiny)], None, [base / "probe.toml"], base / "store.h5", progress=False)
    assert report.ok and report.succeeded == 2
    return base / "store.h5"


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ 0x5A]))


def corrupt_data(path: Path, key: str, var: str = "sink_mass") -> None:
    """Flip one byte inside the stored array `var` of task `key` (the file header stays intact)."""
    with h5py.File(path, "r") as f:
        d = f[f"tasks/{key}/{var}"]
        offset = d.id.get_chunk_info(0).byte_offset if d.chunks else d.id.get_offset()
    _flip(path, offset + 3)


def corrupt_attr(path: Path, text: bytes, at: int) -> None:
    """Change one character of an attribute value, found by its bytes in the file."""
    data = path.read_bytes()
    i = data.find(text)
    assert i >= 0 and data.find(text, i + 1) < 0, "the attribute text must occur once"
    path.write_bytes(data[:i + at] + b"7" + data[i + at + 1:])


# ------------------------------------------------------------------------------- analyze
@pytest.mark.parametrize("extra, words", [
    (["--max-tokens", "-1000"], ["--max-tokens", ">= 1", "-1000"]),
    (["--max-tokens", "-5"], ["--max-tokens", "-5"]),
    (["--max-tokens", "0"], ["--max-tokens", "0"]),
    (["--sink-tokens", "1000"], ["--sink-tokens 1000", "whole"]),
    (["--metrics", ""], ["no metrics"]),
    (["--metrics", "sink_mass,nonsense"], ["unknown metric", "nonsense"]),
    (["--ablate", "layers:0-99,window:4"], ["layer(s) 4-99", "4 layers"]),
    (["--revision", "X"], ["local folder", "no revisions", "'X'"]),
    (["--span", "5:9999"], ["--span 5:9999", "not inside"]),
    (["--queries", "bogus"], ["bogus"]),
    (["--dtype", "float8"], ["dtype", "float8"]),
    (["--query-bins", "0"], ["--query-bins", ">= 1"]),
    (["--query-bins", "1000"], ["--query-bins 1000", "query positions"]),
    (["--kernel", "nope"], ["--kernel", "nope"]),
    (["--row-pass", "x"], ["--row-pass"]),
    (["--max-tokens", "10"], ["10 tokens", "position 16"]),
    (["--out", "."], ["is a folder"]),
    (["--out", "old.h5"], ["already exists", "--overwrite"]),
    (["--out", "foreign.h5"], ["already exists"]),
    (["--out", "notes.txt/r.h5"], ["is a file, not a folder"]),
])
def test_analyze_refuses_before_any_model_loads(work, tiny, no_load, monkeypatch, extra, words):
    monkeypatch.chdir(work)
    refused(["analyze", "-m", tiny, "-f", "text.txt", *extra], work, *words)


@pytest.mark.parametrize("content, words", [
    (b"", ["is empty"]),
    (b"  \n\t\n", ["is empty", "whitespace"]),
    ("caf\u00e9 cr\u00e8me".encode("latin-1"), ["not UTF-8", "0xe9", "offset 3"]),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["looks binary", "NUL byte at offset 8"]),
])
def test_analyze_refuses_text_that_is_not_text(work, tiny, no_load, content, words):
    (work / "bad.txt").write_bytes(content)
    refused(["analyze", "-m", tiny, "-f", work / "bad.txt"], work, "bad.txt", *words)


def test_analyze_refuses_missing_text_and_folder(work, tiny, no_load):
    refused(["analyze", "-m", tiny, "-f", work / "nope.txt"], work, "no such", "nope.txt")
    refused(["analyze", "-m", tiny, "-f", work], work, "is a folder")


def _devices():
    out = ["garbage", "cuda:99"]  # unknown everywhere; no machine here has 100 GPUs
    if not torch.cuda.is_available():
        out.append("cuda")
    if not torch.backends.mps.is_available():
        out.append("mps")
    return out


@pytest.mark.parametrize("device", _devices())
def test_unusable_device_is_one_line_before_the_load(work, tiny, no_load, device):
    refused(["analyze", "-m", tiny, "-f", work / "text.txt", "--device", device], work, repr(device))
    refused(["probe", "-m", tiny, "--spec", work / "probe.toml", "--out", work / "p.h5", "--device", device],
            work, repr(device))
    refused(["doctor", str(tiny), "--device", device], work, repr(device))


def test_extract_checks_the_device_once_before_any_load(work, tiny, no_load):
    # before: one failure per task, each retried, after the model had loaded
    refused(["extract", "-m", tiny, "-p", work / "probe.toml", "-o", work / "s.h5", "--device", "garbage"],
            work, "unknown device 'garbage'")
    assert not (work / "s.h5").exists() and not (work / "s.h5.d").exists()


def test_usage_errors_are_one_line_too(work, tiny, capsys, monkeypatch):
    """Typer's own errors (a value of the wrong type) go through the same one-line path."""
    from attnscope.cli import main

    monkeypatch.setattr(sys, "argv", ["attnscope", "analyze", "-m", str(tiny), "-f", "x", "--max-tokens", "abc"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert "Invalid value for '--max-tokens'" in line and "attnscope analyze --help" in line


def test_long_messages_are_not_wrapped_at_80_columns(work, tiny, no_load):
    """rich wraps at 80 columns when stderr is not a terminal; errors must stay one line."""
    deep = work / ("a-rather-long-folder-name-" * 4) / "text.txt"
    line = refused(["analyze", "-m", tiny, "-f", deep], work, "no such")
    assert len(line) > 120


def test_analyze_refuses_a_batch_store_even_with_overwrite(work, tiny, store, no_load):
    shutil.copy(store, work / "batch.h5")
    refused(["analyze", "-m", tiny, "-f", work / "text.txt", "--out", work / "batch.h5", "--overwrite"],
            work, "batch store", "not even with --overwrite")


def test_analyze_overwrite_replaces_and_writes_through_a_symlink(work, tiny, monkeypatch):
    monkeypatch.chdir(work)
    res = CliRunner().invoke(app, ["analyze", "-m", str(tiny), "-f", "text.txt", "--out", "old.h5", "--overwrite",
                                   "--max-tokens", "24"])
    assert res.exit_code == 0, res.stderr
    assert attnscope.read_result(work / "old.h5").attrs["n_tokens"] == 24
    os.symlink("old.h5", work / "link.h5")
    res = CliRunner().invoke(app, ["analyze", "-m", str(tiny), "-f", "text.txt", "--out", "link.h5", "--overwrite",
                                   "--max-tokens", "20"])
    assert res.exit_code == 0, res.stderr
    assert (work / "link.h5").is_symlink() and attnscope.read_result(work / "old.h5").attrs["n_tokens"] == 20
    assert not [p for p in work.iterdir() if ".tmp" in p.name]


def test_out_of_memory_is_one_line_naming_the_length(work, tiny, monkeypatch):
    """The GPU's out-of-memory error is raised on CPU from a patched forward: this tests how
    attnscope handles it (message, exit code), not whether a real GPU runs out."""
    from transformers import LlamaModel  # the decoder analyze runs (it skips the LM head)

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(LlamaModel, "forward", oom)
    line = refused(["analyze", "-m", tiny, "-f", work / "text.txt", "--max-tokens", "40"], work,
                   "out of memory", "40 tokens", "--max-tokens")
    assert "Traceback" not in line


# ------------------------------------------------------------------------------- probe / probe-build
def test_probe_checks_its_output_and_grid_before_the_load(work, tiny, no_load):
    spec = work / "probe.toml"
    # before: --out a folder failed after the compute, losing the result
    refused(["probe", "-m", tiny, "--spec", spec, "--out", work], work, "is a folder")
    refused(["probe", "-m", tiny, "--spec", spec, "--out", work / "old.h5"], work, "already exists")
    refused(["probe", "-m", tiny, "--spec", spec, "--out", work / "p.h5", "--seeds", "-1"], work, "seeds", "-1")
    refused(["probe", "-m", tiny, "--spec", spec, "--out", work / "p.h5", "--lengths", "100000"], work,
            "100000", "context of 256")
    refused(["probe", "-m", tiny, "--spec", spec, "--out", work / "p.h5", "--lengths", "6O"], work,
            "--lengths", "integers")


def test_probe_build_checks_seeds_and_the_models_context(work, tiny, tmp_path):
    # a model whose tokenizer declares no length (as SmolLM2's does not): the config's context counts
    model = tmp_path / "no-length"
    shutil.copytree(tiny, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("model_max_length", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    spec = ROOT / "probes" / "niah_single.toml"
    refused(["probe-build", "--spec", spec, "--tokenizer", model, "--lengths", "100000", "--depths", "0.5"], work,
            "100000", "context of 256")
    refused(["probe-build", "--spec", spec, "--tokenizer", model, "--lengths", "200", "--seeds", "-1"], work,
            "seeds", "[-1]")


# ------------------------------------------------------------------------------- report / figures / tokens
def test_folder_outputs_refuse_a_file_and_a_non_empty_folder(work, store, no_load):
    # before: report/tokens failed on an existing file after the work (or replaced files)
    refused(["report", "--store", store, "--out", work / "notes.txt"], work, "is a file")
    refused(["report", "--registry-only", "--out", work], work, "already has files", "--overwrite")
    refused(["figures", "--registry-only", "--out", work / "notes.txt"], work, "is a file")
    refused(["tokens", "--model-a", "m", "--corpus", work / "text.txt", "--out", work / "notes.txt"], work,
            "is a file")


def test_figures_refuse_a_foreign_store(work):
    # before: exit 0 with every figure "skipped"
    refused(["figures", "--store", work / "foreign.h5", "--out", work / "figs"], work, "not an attnscope batch store")
    refused(["report", "--store", work / "foreign.h5", "--out", work / "rep"], work, "not an attnscope batch store")


def test_tokens_refuses_a_one_document_corpus_before_loading(work, tiny, no_load):
    # before: ZeroDivisionError in the clustered regression, after every loss was computed
    refused(["tokens", "--model-a", tiny, "--corpus", work / "text.txt", "--out", work / "gaps"], work,
            "1 document", "at least 2")
    for i in range(2):
        (work / "corpus" / f"doc{i}.txt").parent.mkdir(exist_ok=True)
        (work / "corpus" / f"doc{i}.txt").write_text(TEXT)
    refused(["tokens", "--model-a", tiny, "--corpus", work / "corpus", "--out", work / "gaps",
             "--ablate-b", "window:4,layers:0-99"], work, "4-99", "4 layers")


def test_extract_plan_names_lengths_beyond_a_models_context(work, tiny, no_load):
    """A batch keeps such tasks (they fail one by one, recorded, while the rest run), but the plan
    says so before anything loads."""
    (work / "long.toml").write_text(PROBE.replace("[32, 48]", "[32, 300]"))
    res = CliRunner().invoke(app, ["extract", "-m", str(tiny), "-p", str(work / "long.toml"), "-o",
                                   str(work / "s.h5"), "--dry-run"])
    assert res.exit_code == 0, res.stderr
    assert "has a context of 256 tokens" in res.stdout and "length 300 will fail" in res.stdout


def test_malformed_revision_manifest_is_one_line(work):
    for bad in ('{"refs": 5}', '{"refs": [5]}', '{"refs": [{"commit": null}]}', '[1, 2]', "{"):
        (work / "manifest.json").write_text(bad)
        refused(["revisions", "toy/model", "--manifest", work / "manifest.json"], work, "manifest")


def test_models_with_two_formats_is_one_line(work):
    refused(["models", "--json", "--csv"], work, "one of --json and --csv")


# ------------------------------------------------------------------------------- the Python API
def test_the_api_follows_the_same_rules(tiny, tmp_path, single_thread):
    from attnscope.probing.builder import build_prompts
    from attnscope.probing.spec import load_spec
    from attnscope.tokens import apply_ablation, run_study

    with pytest.raises(AttnscopeError, match="unknown device"):
        attnscope.load(str(tiny), device="garbage")
    with pytest.raises(AttnscopeError, match="no revisions"):
        attnscope.load(str(tiny), revision="X")
    lm = attnscope.load(str(tiny))
    ids = list(range(3, 43))
    for kwargs, match in (({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
                          ({"sink_tokens": 40}, "sink_tokens=40"), ({"metrics": ()}, "no metrics")):
        with pytest.raises(AttnscopeError, match=match):
            attnscope.analyze(lm, token_ids=ids, **kwargs)
    with pytest.raises(AttnscopeError, match="4-99"):
        apply_ablation(lm.model, "window:4,layers:0-99")
    with pytest.raises(AttnscopeError, match="seeds"):
        build_prompts(load_spec(ROOT / "probes" / "niah_single.toml"), lm.tokenizer, lengths=[200], seeds=[-1])
    with pytest.raises(AttnscopeError, match="at least 2"):
        run_study(lm, None, None, None, {"only": TEXT}, tmp_path / "study", ablate_b="window:4")
    assert not (tmp_path / "study").exists()
    ds = attnscope.analyze(lm, token_ids=ids, metrics=("sink_mass",))
    path = attnscope.save_result(ds, tmp_path / "r.h5")
    before = path.read_bytes()
    with pytest.raises(AttnscopeError, match="already exists"):
        attnscope.save_result(ds, path)
    assert path.read_bytes() == before
    from attnscope.report.figures import make_all
    from attnscope.report.html import write_report

    with pytest.raises(AttnscopeError, match="is a file"):
        write_report(None, path)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not an attnscope batch store"):
        make_all(foreign, tmp_path / "figs")


def test_out_of_memory_fails_only_its_task_in_a_batch(tiny, tmp_path, monkeypatch, single_thread):
    """The out-of-memory error is raised on CPU from a patched forward (only for 48-token inputs):
    this tests the batch's handling of it, not a real GPU running out."""
    from transformers import LlamaModel  # the decoder analyze runs (it skips the LM head)

    forward = LlamaModel.forward

    def oom_at_48(self, input_ids=None, *args, **kwargs):
        if input_ids is not None and input_ids.shape[-1] == 48:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", oom_at_48)
    (tmp_path / "probe.toml").write_text(PROBE)
    report = attnscope.extract([str(tiny)], None, [tmp_path / "probe.toml"], tmp_path / "s.h5", retries=0,
                               progress=False)
    assert report.succeeded == 1 and len(report.failures) == 1
    [failure] = report.failures
    assert "length=48" in failure.label and "out of memory" in failure.error and "48 tokens" in failure.error
    assert "lower the length" in failure.error
    store = attnscope.open_store(tmp_path / "s.h5")
    assert store.get(str(tiny), None, "prose_sinks", length=32, depth=0.0).sink_mass.size > 0


# ------------------------------------------------------------------------------- provenance
def test_batch_stores_record_the_doctors_verdict(store, tiny):
    ds = attnscope.open_store(store).get(str(tiny), None, "prose_sinks", length=32, depth=0.0)
    verdict = json.loads(ds.attrs["doctor"])  # before: always null (the runner called a missing function)
    assert verdict["status"] in ("pass", "warn", "fail") and sum(verdict["counts"].values()) >= 4
    assert all(p["status"] in ("warn", "fail") for p in verdict["problems"])


# ------------------------------------------------------------------------------- checksums
def test_every_array_carries_fletcher32_and_every_group_a_digest(store, tmp_path, tiny):
    with h5py.File(store) as f:
        assert f.attrs["attnscope_store_schema"] == 2 and "attnscope_digest" in f.attrs
        for key, g in f["tasks"].items():
            assert "attnscope_digest" in g.attrs
            arrays = []
            g.visititems(lambda n, o: arrays.append(o) if isinstance(o, h5py.Dataset) and o.ndim else None)
            assert arrays and all(d.fletcher32 for d in arrays if d.dtype.kind != "O")


def test_a_flipped_byte_is_named_by_verify_and_by_every_reader(store, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(store, bad)
    keys = sorted(attnscope.open_store(store).tasks()["key"])
    corrupt_data(bad, keys[0])
    s = attnscope.open_store(bad)
    check = s.verify()
    assert not check.ok and [c.key for c in check.corrupt] == [keys[0]]
    assert "Fletcher-32" in check.corrupt[0].error
    row = s.tasks().set_index("key").loc[keys[0]]
    with pytest.raises(StoreError, match=f"task {keys[0]} in {bad}"):
        s.get(row["model"], None, row["probe"], length=row["length"], depth=row["depth"])
    with pytest.raises(StoreError, match=keys[0]):
        s.summary()
    # the CLI: verify names it (exit 1); report and figures stop with one line (before: raw RuntimeError)
    res = CliRunner().invoke(app, ["store", "verify", str(bad)])
    assert res.exit_code == 1 and f"corrupt: task {keys[0]}" in res.stdout
    refused(["report", "--store", bad, "--out", tmp_path / "r"], tmp_path, keys[0], "corrupt")
    refused(["figures", "--store", bad, "--out", tmp_path / "f", "--only", "layer_profiles"], tmp_path,
            keys[0], "corrupt")
    # an attribute changed in place (the data intact): the digest catches what Fletcher-32 cannot
    bad2 = tmp_path / "bad2.h5"
    shutil.copy(store, bad2)
    corrupt_attr(bad2, b'{"depth": 0.0, "length": 48}', len('{"depth": 0.0, "length": 4'))
    with pytest.raises(StoreError, match="checksum mismatch"):
        attnscope.open_store(bad2).tasks()
    assert len(attnscope.open_store(bad2).verify().corrupt) == 1


def test_forged_store_markers_are_a_clear_error(tmp_path, tiny):
    for schema in (1, 2):
        path = tmp_path / f"forged{schema}.h5"
        with h5py.File(path, "w") as f:
            f.attrs["attnscope_kind"] = "store"
            f.attrs["attnscope_store_schema"] = schema
        before = path.read_bytes()
        with pytest.raises(StoreError, match="corrupt|no tasks"):  # before: a raw KeyError
            attnscope.open_store(path).tasks()
        refused(["extract", "-m", tiny, "-p", ROOT / "probes" / "natural_text.toml", "-o", path], tmp_path,
                "never overwrites")
        assert path.read_bytes() == before


def test_extract_moves_corrupt_tasks_aside_and_measures_them_again(store, tmp_path, tiny, single_thread):
    bad = tmp_path / "bad.h5"
    shutil.copy(store, bad)
    by_length = attnscope.open_store(store).tasks().set_index("length")["key"]
    keys = sorted(by_length)
    corrupt_data(bad, by_length[32])  # an array of one task, an attribute of the other
    corrupt_attr(bad, b'{"depth": 0.0, "length": 48}', len('{"depth": 0.0, "length": 4'))
    dry = attnscope.extract([str(tiny)], None, [_probe(tmp_path)], bad, dry_run=True)
    assert dry.already_done == 0 and sorted(dry.corrupt) == keys
    res = CliRunner().invoke(app, ["extract", "-m", str(tiny), "-p", str(_probe(tmp_path)), "-o", str(bad),
                                   "--no-progress"])
    assert res.exit_code == 0, res.stderr
    assert "2 task(s) measured" in res.stdout and "moved aside" in res.stderr
    # the run went on and exits 0: a warning, not "error:" (before: printed as an error)
    assert res.stderr.startswith("warning: ") and "error" not in res.stderr.splitlines()[0].split(":")[0]
    assert keys[0] in res.stderr and keys[1] in res.stderr
    fixed = attnscope.open_store(bad)
    assert fixed.verify().ok and sorted(fixed.tasks()["key"]) == keys
    with h5py.File(bad) as f:  # nothing deleted: both damaged tasks are kept under /quarantine
        assert sorted(f["quarantine/tasks"]) == keys
    ref = attnscope.open_store(store)
    for L in (32, 48):
        a = fixed.get(str(tiny), None, "prose_sinks", length=L, depth=0.0)
        b = ref.get(str(tiny), None, "prose_sinks", length=L, depth=0.0)
        for v in b.data_vars:
            np.testing.assert_array_equal(a[v].values, b[v].values)


def _probe(folder: Path) -> Path:
    p = folder / "probe.toml"
    p.write_text(PROBE)
    return p


# ------------------------------------------------------------------------------- old stores
def test_a_schema_1_store_still_opens_and_upgrades(tmp_path, tiny):
    """tests/data/store_schema1.h5 was written by attnscope before checksums (commit f0248b7:
    extract of a tiny llama with a 2 x 2 natural-text grid, two tasks too long for it)."""
    old = tmp_path / "old.h5"
    shutil.copy(DATA / "store_schema1.h5", old)
    before = snapshot(tmp_path)
    s = attnscope.open_store(old)
    df = s.tasks()
    assert sorted(df["status"]) == ["done", "done", "failed", "failed"]
    ds = s.get(df.iloc[0]["model"], None, "prose_sinks", length=32, depth=0.0)
    assert ds.sink_mass.shape == (1, 1, 1, 4, 4)
    check = s.verify()
    assert check.ok and check.schema == 1 and check.unverified == 4 and check.checked == 0
    # extract refuses to add to it, pointing at the upgrade; nothing changes
    refused(["extract", "-m", tiny, "-p", DATA / "schema1_probe.toml", "-o", old], tmp_path,
            "schema 1", "attnscope store upgrade")
    res = CliRunner().invoke(app, ["store", "upgrade", str(old), str(tmp_path / "new.h5")])
    assert res.exit_code == 0, res.stderr
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
    new = attnscope.open_store(tmp_path / "new.h5")
    assert new.schema == 2 and new.verify().ok and new.verify().checked == 4
    up = new.get(df.iloc[0]["model"], None, "prose_sinks", length=32, depth=0.0)
    for v in ds.data_vars:
        np.testing.assert_array_equal(up[v].values, ds[v].values)
    assert {k: v for k, v in up.attrs.items()} == {k: v for k, v in ds.attrs.items()}
    assert new.failure(df[df.status == "failed"].iloc[0]["key"])["error"].startswith("InputTooLongError")
    refused(["store", "upgrade", old, tmp_path / "new.h5"], tmp_path, "new.h5 is an attnscope batch store")


def test_a_schema_1_result_file_still_reads(tmp_path):
    ds = attnscope.read_result(DATA / "result_schema1.h5")
    assert ds.sink_mass.dims == ("layer", "head") and ds.attrs["model"] == "./tiny-llama"


# ------------------------------------------------------------------------------- locks, links, modes
def test_the_lock_is_on_the_real_path_and_a_symlink_stays_a_symlink(store, tmp_path, tiny, monkeypatch,
                                                                    single_thread):
    from attnscope.store.store import StoreWriter

    real = tmp_path / "real.h5"
    shutil.copy(store, real)
    os.symlink(real, tmp_path / "link.h5")
    monkeypatch.chdir(tmp_path)
    probe = _probe(tmp_path)
    writer = StoreWriter(real)
    try:  # a second writer through the link, or a relative path, is refused
        before = snapshot(tmp_path)
        for alias in ("link.h5", "./real.h5", tmp_path / "sub" / ".." / "real.h5"):
            with pytest.raises(StoreError, match="another attnscope process"):
                attnscope.extract([str(tiny)], None, [probe], alias, progress=False)
        assert snapshot(tmp_path) == before
    finally:
        writer.close()
    more = tmp_path / "more.toml"
    more.write_text(PROBE.replace("[32, 48]", "[32, 40]"))
    report = attnscope.extract([str(tiny)], None, [more], "link.h5", progress=False)
    assert report.succeeded == 2  # another spec: other task keys
    assert (tmp_path / "link.h5").is_symlink() and len(attnscope.open_store(real).tasks()) == 4


def test_files_get_the_users_umask(tmp_path, tiny, single_thread):
    lm = attnscope.load(str(tiny))
    ds = attnscope.analyze(lm, token_ids=list(range(3, 40)), metrics=("sink_mass",))
    old = os.umask(0o027)
    try:
        attnscope.save_result(ds, tmp_path / "r.h5")
        attnscope.extract([str(tiny)], None, [_probe(tmp_path)], tmp_path / "s.h5", progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "r.h5").stat().st_mode & 0o777 == 0o640  # before: 0o600 from mkstemp
    assert (tmp_path / "s.h5").stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------------- Ray and Ctrl-C
def test_an_unreachable_ray_address_fails_fast(work, tiny, no_load):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ATTNSCOPE_RAY_CONNECT_TIMEOUT": "5", "PYTHONPATH": str(ROOT)}
    before = snapshot(work)
    # before: ray.init retried for minutes; the timeout here only guards the test run itself
    r = subprocess.run([sys.executable, "-m", "attnscope", "extract", "-m", str(tiny), "-p", str(work / "probe.toml"),
                        "-o", str(work / "s.h5"), "--executor", "ray", "--ray-address", f"127.0.0.1:{port}",
                        "--device", "cuda"],  # the cluster's workers may have GPUs this driver lacks
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert f"127.0.0.1:{port}" in line and "no Ray cluster" in line
    assert snapshot(work) == before


_SLOW_EXTRACT = """
import signal, sys, time
import attnscope.batch.runner as runner

# A shell's background job (`cmd &`) starts with SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: restore it, so that the test sees what Ctrl-C in a terminal does.
signal.signal(signal.SIGINT, signal.default_int_handler)

measure = runner.run_task
calls = []

def slow(*args, **kwargs):  # the first task is committed; Ctrl-C lands while the second runs
    out = measure(*args, **kwargs)
    calls.append(1)
    if len(calls) > 1:
        # short sleeps: a SIGINT that lands just before a sleep's system call (after Python's last
        # check for signals) would otherwise wait out the whole sleep
        for _ in range(1200):
            time.sleep(0.1)
    return out

runner.run_task = slow
from attnscope.cli import main

sys.argv = ["attnscope"] + sys.argv[1:]
main()
"""


def test_ctrl_c_on_extract_says_what_is_safe_and_how_to_resume(tmp_path, tiny):
    probe = tmp_path / "probe.toml"
    probe.write_text(PROBE.replace("[32, 48]", "[32, 40, 48, 56]"))
    out = tmp_path / "s.h5"
    args = ["extract", "-m", str(tiny), "-p", str(probe), "-o", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EXTRACT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    side = tmp_path / "s.h5.d"
    deadline = time.monotonic() + 300
    while not (side.is_dir() and any(p.suffix == ".h5" for p in side.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    line = one_line(stderr)
    assert "interrupted" in line and "saved" in line and "Resume with the same command" in line
    saved = attnscope.open_store(out).tasks()
    assert 1 <= len(saved) < 4 and set(saved["status"]) == {"done"}
    res = CliRunner().invoke(app, args)  # the same command resumes
    assert res.exit_code == 0, res.stderr
    assert f"{4 - len(saved)} task(s) measured, {len(saved)} already in the store" in res.stdout


# =============================================================================== third pass (issue 19)
def run_cli(args, cwd: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """The installed entry point in a child process (for what could crash or hang the test run)."""
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "attnscope", *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=child_env)


# ------------------------------------------------------------------------------- 1. the output's kind
@pytest.mark.parametrize("out, words", [
    ("x.png", ["x.png", "HDF5", ".h5", "'.png'"]),
    ("x.txt", ["x.txt", ".h5"]),
    ("x.json", ["x.json", ".h5"]),
    ("result", ["result", ".h5", "without one"]),
    ("newdir/", ["newdir/", "names a folder"]),
])
def test_the_output_kind_is_checked_before_the_load(work, tiny, no_load, monkeypatch, out, words):
    # before: exit 0 with HDF5 written under that name; `newdir/` became a file named newdir
    monkeypatch.chdir(work)
    refused(["analyze", "-m", tiny, "-f", "text.txt", "--out", out], work, *words)
    refused(["probe", "-m", tiny, "--spec", "probe.toml", "-o", out], work, *words)
    assert not (work / "newdir").exists()


def test_the_api_and_extract_check_the_output_kind_too(work, tiny, no_load):
    import xarray as xr

    with pytest.raises(AttnscopeError, match="HDF5"):
        attnscope.save_result(xr.Dataset(), work / "r.json")
    refused(["extract", "-m", tiny, "-p", work / "probe.toml", "-o", work / "s.json"], work, "s.json", ".h5")
    assert not (work / "s.json.d").exists()


# ------------------------------------------------------------------------------- 2. a full disk
def _assert_nothing_left(folder: Path, before: dict, allowed=()) -> None:
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that was there changed"
    new = set(after) - set(before) - set(allowed)
    assert not new, f"left behind: {new}"


@pytest.fixture
def full_disk(tmp_path):
    """A 100 KB tmpfs holding a 96 KB file: no room for a result (mounting needs root, as in CI)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        (mnt / "filler").write_bytes(os.urandom(96 * 1024))
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_is_one_line_on_a_real_filesystem(work, tiny, full_disk):
    # before: exit 139 (h5py crashed on the failed write) after ~95 lines of traceback
    before = snapshot(full_disk)
    r = run_cli(["analyze", "-m", tiny, "-f", work / "text.txt", "--max-tokens", "40", "--out",
                 full_disk / "r.h5", "-q"], work)
    assert r.returncode == 2, r.stderr[-2000:]
    line = one_line(r.stderr)
    assert f"no space left on {full_disk}" in line and "bytes needed" in line
    _assert_nothing_left(full_disk, before)
    r = run_cli(["extract", "-m", tiny, "-p", work / "probe.toml", "-o", full_disk / "s.h5", "--no-progress"], work)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no space left on" in one_line(r.stderr)
    _assert_nothing_left(full_disk, before, allowed={"s.h5.lock"})  # the lock file stays, as after any run
    # any other writer (here the report's markdown and CSVs): the same one line
    r = run_cli(["report", "--registry-only", "--no-html", "--n-resamples", "99", "--out", full_disk / "rep"], work)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"no space left on {full_disk / 'rep'}: more than" in one_line(r.stderr)
    written = {k for k in snapshot(full_disk) if k.startswith("rep/")}  # whole files that fitted first
    assert not [k for k in written if ".tmp" in k]
    _assert_nothing_left(full_disk, before, allowed={"s.h5.lock", *written})


def _enospc(calls: list, when=lambda offset: True):
    """posix_fallocate of a full disk (ENOSPC), for the calls `when` picks."""
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        calls.append((offset, length))
        if when(offset):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    return fallocate


def test_a_full_disk_is_one_line_simulated(work, tiny, monkeypatch):
    """Where no tmpfs can be mounted: the disk reports ENOSPC when attnscope reserves the bytes."""
    calls: list = []
    monkeypatch.setattr(os, "posix_fallocate", _enospc(calls))
    line = refused(["analyze", "-m", tiny, "-f", work / "text.txt", "--max-tokens", "40", "--out", work / "r.h5"],
                   work, f"no space left on {work}", "bytes needed")
    assert calls and not (work / "r.h5").exists()
    before = snapshot(work)
    res = CliRunner().invoke(app, ["extract", "-m", str(tiny), "-p", str(work / "probe.toml"), "-o",
                                   str(work / "s.h5"), "--no-progress"])
    assert res.exit_code == 2 and "no space left on" in one_line(res.stderr)
    _assert_nothing_left(work, before, allowed={"s.h5.lock"})
    assert "Traceback" not in line
    monkeypatch.undo()
    write_text = Path.write_text

    def full(self, *args, **kwargs):  # a text writer on a full disk: part written, then ENOSPC
        write_text(self, "partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    refused(["report", "--registry-only", "--no-html", "--n-resamples", "99", "--out", work / "rep"], work,
            f"no space left on {work / 'rep'}", "more than 7 bytes needed")


def test_a_full_disk_during_consolidation_leaves_the_store_and_the_tasks(work, tiny, store, monkeypatch):
    """The store's copy cannot grow: the store is untouched, the finished tasks wait in <store>.d/,
    and the next run (with space) folds them in."""
    shutil.copy(store, work / "s.h5")
    (work / "more.toml").write_text(PROBE.replace("[32, 48]", "[32, 40]"))
    before = snapshot(work)
    calls: list = []
    monkeypatch.setattr(os, "posix_fallocate", _enospc(calls, when=lambda offset: offset > 0))  # appends only
    res = CliRunner().invoke(app, ["extract", "-m", str(tiny), "-p", str(work / "more.toml"), "-o",
                                   str(work / "s.h5"), "--no-progress"])
    assert res.exit_code == 2 and "no space left on" in one_line(res.stderr)
    after = snapshot(work)
    assert after["s.h5"] == before["s.h5"]
    assert len([k for k in after if k.startswith("s.h5.d/")]) == 2  # both new tasks, durable, not yet folded in
    monkeypatch.undo()
    res = CliRunner().invoke(app, ["extract", "-m", str(tiny), "-p", str(work / "more.toml"), "-o",
                                   str(work / "s.h5"), "--no-progress"])
    assert res.exit_code == 0 and "0 task(s) measured, 2 already in the store" in res.stdout, res.stderr
    assert len(attnscope.open_store(work / "s.h5").tasks()) == 4 and attnscope.open_store(work / "s.h5").verify().ok


# ------------------------------------------------------------------------------- 3. huge inputs
def test_only_what_max_tokens_needs_is_read(work, tiny):
    """A 12 MB text with a NUL byte at 11 MB: --max-tokens 64 reads and tokenises only the start,
    and the tokens are those of the whole text cut at 64."""
    from attnscope.models.loading import load_tokenizer

    big = work / "big.txt"
    with open(big, "wb") as fh:
        block = (TEXT * 50).encode()
        while fh.tell() < 11 << 20:
            fh.write(block)
        fh.write(b"\x00 and more text after the NUL byte\n")
    res = CliRunner().invoke(app, ["analyze", "-m", str(tiny), "-f", str(big), "--max-tokens", "64", "--json",
                                   "--metrics", "sink_mass"])
    assert res.exit_code == 0, res.stderr
    ids = json.loads(res.stdout)["token_ids"]
    assert ids == load_tokenizer(str(tiny))((TEXT * 50) * 4)["input_ids"][:64]
    # without --max-tokens: refused for the context, from the start of the file alone
    refused(["analyze", "-m", tiny, "-f", big], work, "more than 256 tokens", "context of 256", "--max-tokens 256")
    (work / "nul.txt").write_bytes(b"a little text\x00")  # a short file is read whole: the NUL is found
    refused(["analyze", "-m", tiny, "-f", work / "nul.txt", "--max-tokens", "5"], work, "NUL byte at offset 13")


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_files_that_never_end_are_refused_before_reading(work, tiny, kind):
    # before: /dev/zero ran into the kernel's OOM killer at 24 GB; a FIFO blocked forever
    path = Path(kind)
    if kind == "fifo":
        path = work / "fifo"
        os.mkfifo(path)
    before = snapshot(work)
    for args in (["analyze", "-m", tiny, "-f", path, "--max-tokens", "64"],
                 ["tokens", "--model-a", tiny, "--corpus", path, "--out", work / "gaps"],
                 ["doctor", tiny, "-f", path]):
        r = run_cli(args, work, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "not a regular file" in one_line(r.stderr)
    assert snapshot(work) == before


# ------------------------------------------------------------------------------- 4. duplicate grids
@pytest.mark.parametrize("flags, words", [
    (["--depths", "0.5,0.5"], ["--depths", "repeats 0.5"]),
    (["--lengths", "32,32"], ["--lengths", "repeats 32"]),
    (["--seeds", "0,0"], ["--seeds", "repeats 0"]),
    (["--lengths", ""], ["--lengths", "names no values"]),
    (["--depths", " , "], ["--depths", "names no values"]),
])
def test_duplicate_or_empty_grid_flags_are_refused_before_the_load(work, tiny, no_load, flags, words):
    # before: computed every prompt, then crashed assembling the grid (or IndexError on "")
    refused(["probe", "-m", tiny, "--spec", work / "probe.toml", "-o", work / "p.h5", *flags], work, *words)


def test_duplicate_grid_values_in_a_spec_and_a_probe_given_twice(work, tiny, no_load):
    (work / "dup.toml").write_text(PROBE.replace("[32, 48]", "[32, 32]"))
    refused(["probe", "-m", tiny, "--spec", work / "dup.toml", "-o", work / "p.h5"], work,
            "grid.lengths", "[32, 32]", "distinct")
    refused(["extract", "-m", tiny, "-p", work / "dup.toml", "-o", work / "s.h5"], work, "grid.lengths", "distinct")
    # before: "4 tasks" planned, 2 measured, silently
    refused(["extract", "-m", tiny, "-p", work / "probe.toml", "-p", work / "probe.toml", "-o", work / "s.h5"],
            work, "probe.toml is given twice", "give it once")
    (work / "copy.toml").write_text(PROBE)  # another file, the same content: the same tasks
    refused(["extract", "-m", tiny, "-p", work / "probe.toml", "-p", work / "copy.toml", "-o", work / "s.h5"],
            work, "are the same probe", "give it once")
    assert not (work / "s.h5.d").exists()


def test_run_probe_refuses_duplicates(tiny):
    lm = attnscope.load(str(tiny))
    with pytest.raises(AttnscopeError, match="repeat 0.5"):
        attnscope.run_probe(lm, "natural_text", lengths=[32], depths=[0.5, 0.5], decode=False)
    with pytest.raises(AttnscopeError, match="no lengths"):
        attnscope.run_probe(lm, "natural_text", lengths=[], depths=[0.5], decode=False)


# ------------------------------------------------------------------------------- 5. a false out-of-memory
_ROW_PASSES_UNDER_A_LIMIT = """
import resource, sys
import numpy as np, torch
import attnscope

torch.set_num_threads(1)
path, window = sys.argv[1], int(sys.argv[2])
lm = attnscope.load(path)
if window:
    attnscope.set_edit(lm.model, attnscope.AttentionEdit(window=window))
with open("/proc/self/status") as fh:
    vm = int(fh.read().split("VmSize:")[1].split()[0]) * 1024
limit = vm + (2 << 30)  # 2 GiB more than the loaded model needs; the bug asked for 17-30 GB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
ids = list(range(3, 99))  # 96 tokens
out = {rp: attnscope.analyze(lm, token_ids=ids, row_pass=rp, progress=False) for rp in ("chunked", "features")}
for rp, ds in out.items():
    assert all(v.startswith(rp) for v in __import__("json").loads(ds.attrs["row_pass"]).values()), ds.attrs["row_pass"]
for m in ("entropy", "mean_distance", "position_profile"):
    np.testing.assert_allclose(out["chunked"][m].values, out["features"][m].values, rtol=2e-4, atol=2e-5)
attnscope.analyze(lm, token_ids=ids, row_pass="chunked", queries="strided:7", progress=False)  # spread out
print("ok", out["chunked"].attrs["attention_edit"])
"""


@pytest.mark.parametrize("kind, window", [("llama", 4), ("olmo3", 0)])
def test_both_row_passes_fit_in_memory_with_small_windows(tmp_path, kind, window):
    """Before: the chunked pass sized its block by the window alone (chunk ~ 1M / (H x window))
    and asked for ~17 GB (olmo3's own window 8) or ~68 GB (window 4): 'out of memory at 96 tokens'."""
    if not hasattr(__import__("resource"), "RLIMIT_AS"):
        pytest.skip("no address-space limit on this platform")
    from attnscope.testing import make_tiny_model

    path = make_tiny_model(kind, tmp_path / kind)
    r = subprocess.run([sys.executable, "-c", _ROW_PASSES_UNDER_A_LIMIT, str(path), str(window)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
    assert r.stdout.split()[1] == (f"window:{window}" if window else "none")


# ------------------------------------------------------------------------------- 6. tracebacks
@pytest.mark.parametrize("n", ["0", "-5"])
def test_report_n_resamples_must_be_positive(work, no_load, n):
    # before: scipy's ValueError as a traceback
    refused(["report", "--registry-only", "--n-resamples", n, "--out", work / "rep"], work, "--n-resamples", ">= 1")
    assert not (work / "rep").exists()


def test_tokens_with_documents_too_short_to_score(work, tiny, no_load):
    # before: "No objects to concatenate" after the compute, partial outputs left behind
    for name in ("a.txt", "b.txt"):
        (work / "short" / name).parent.mkdir(exist_ok=True)
        (work / "short" / name).write_text("a")
    refused(["tokens", "--model-a", tiny, "--corpus", work / "short", "--out", work / "gaps"], work,
            "2 document(s) have no token to score", "a.txt", "remove these documents")
    assert not (work / "gaps").exists()


def test_tokens_on_two_short_documents_runs_and_says_what_it_left_out(work, tiny):
    """Before: refused after computing ("take a single value ...; leave them out", naming regression
    terms the command has no flag for), with partial outputs left behind."""
    for name, text in (("a.txt", "the quick fox"), ("b.txt", "a lazy dog")):
        (work / "three" / name).parent.mkdir(exist_ok=True)
        (work / "three" / name).write_text(text)
    res = CliRunner().invoke(app, ["tokens", "--model-a", str(tiny), "--corpus", str(work / "three"), "--out",
                                   str(work / "gaps"), "--ablate-b", "window:2", "--n-boot", "10", "-q"])
    assert res.exit_code == 0, (res.stderr, res.exception)
    md = (work / "gaps" / "regression.md").read_text()
    assert "left out (a single value on these tokens): " in md and "log_repeat" in md
    assert json.loads((work / "gaps" / "regression.json").read_text())["regression"]["dropped_constant"]


def test_names_too_long_for_the_filesystem_are_refused_before_the_compute(work, tiny, no_load):
    # before: OSError [Errno 36] after the compute; extract left a stray <name>.d/
    long = "r" * 250 + ".h5"  # fits alone, not with the temporary name written beside it
    refused(["analyze", "-m", tiny, "-f", work / "text.txt", "--out", work / long], work, "bytes", "at most")
    refused(["analyze", "-m", tiny, "-f", work / "text.txt", "--out", work / ("r" * 300 + ".h5")], work,
            "is 303 bytes", "bytes per name")
    refused(["extract", "-m", tiny, "-p", work / "probe.toml", "-o", work / long], work, "bytes", "at most")
    refused(["report", "--registry-only", "--out", work / ("d" * 256) / "rep"], work, "folder name", "bytes per name")
    assert not [p for p in work.iterdir() if p.name.startswith("rrrr")]


# ------------------------------------------------------------------------------- 7. a file appears meanwhile
def test_a_result_whose_path_is_taken_meanwhile_is_kept(work, tiny, monkeypatch):
    analyze = attnscope.analyze

    def analyze_while_someone_writes(*args, **kwargs):
        ds = analyze(*args, **kwargs)
        (work / "r.h5").write_bytes(b"written by someone else meanwhile")
        return ds

    monkeypatch.setattr(attnscope, "analyze", analyze_while_someone_writes)
    res = CliRunner().invoke(app, ["analyze", "-m", str(tiny), "-f", str(work / "text.txt"), "--max-tokens", "40",
                                   "--out", str(work / "r.h5")])
    assert res.exit_code == 2, res.stderr
    line = one_line(res.stderr)
    assert "appeared while attnscope was computing" in line and "kept in" in line
    assert (work / "r.h5").read_bytes() == b"written by someone else meanwhile"
    kept = Path(line.split("kept in ")[1].split(" (")[0])
    assert kept.parent == work and attnscope.read_result(kept).attrs["n_tokens"] == 40  # before: thrown away


# ------------------------------------------------------------------------------- 8. modes
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_the_testing_helpers_follow_the_umask(tmp_path, umask, mode):
    from attnscope.testing import make_tiny_model

    old = os.umask(umask)
    try:
        path = make_tiny_model("llama", tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert modes["model.safetensors"] == mode and set(modes.values()) == {mode}, modes  # before: 0600


# ------------------------------------------------------------------------------- 9. off a terminal
def test_off_a_terminal_nothing_is_wrapped_or_cut(work, tiny):
    res = CliRunner().invoke(app, ["analyze", "-m", str(tiny), "-f", str(work / "text.txt"), "--max-tokens", "40",
                                   "--span", "2:9"])
    assert res.exit_code == 0, res.stderr
    header = next(line for line in res.stdout.splitlines() if "layer" in line and "mean" in line)
    for name in ("mean sink_mass", "mean token0_mass", "mean span_mass", "mean entropy", "mean mean_distance",
                 "strongest sink head"):
        assert name in header, header  # before: "mean_distan…"; span_mass missing
    res = CliRunner().invoke(app, ["report", "--registry-only", "--out", str(work / "rep"), "--no-html",
                                   "--n-resamples", "99"])
    assert res.exit_code == 0, res.stderr
    table_lines = [line for line in res.stdout.splitlines() if line.startswith("|")]
    assert table_lines and all(line.rstrip().endswith("|") for line in table_lines)  # before: rows broken at 80
    md = (work / "rep" / "report.md").read_text()
    assert all(line in md for line in table_lines)


# ------------------------------------------------------------------------------- 10. messages that point the right way
def test_a_cache_that_is_a_file_is_named(work, smollm2, no_load, monkeypatch):
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(work / "notes.txt"))
    line = refused(["analyze", "-m", "smollm2", "-f", work / "text.txt"], work, "cache", "ATTNSCOPE_CACHE")
    assert "tokenizer" not in line  # before: "smollm2 has no usable tokenizer (NotADirectoryError)"


def test_a_fake_gguf_is_named(work, no_load):
    (work / "fake.gguf").write_bytes(os.urandom(4000))
    line = refused(["analyze", "-m", work / "fake.gguf", "-f", work / "text.txt"], work, "not a GGUF file")
    assert "tokenizer" not in line


def test_demo_names_its_own_flags(work, smollm2, no_load):
    line = refused(["demo", "--tokens", "99999999", "--out", work / "demo"], work, "--tokens 99999999",
                   "context of 8192")
    assert "--max-tokens" not in line and "max_tokens" not in line


def test_readers_of_a_bad_store_do_not_suggest_another_out(work, tiny, store):
    (work / "junk.h5").write_bytes(b"not HDF5 at all")
    for bad in ("junk.h5", "foreign.h5"):
        for args in (["store", "verify", work / bad], ["report", "--store", work / bad, "--out", work / "rep"]):
            line = refused(args, work, bad)
            assert "--out" not in line and "check the path" in line, line
    refused(["extract", "-m", tiny, "-p", work / "probe.toml", "-o", work / "junk.h5"], work, "pass another --out")


@pytest.mark.parametrize("extra, words, never", [
    (["--metrics", "span_mass"], ["--metrics span_mass", "--span START:END"], "spans="),
    (["--max-tokens", "10"], ["10 tokens", "position 16", "--queries"], "min_query_position"),
    (["--max-tokens", "1", "--sink-tokens", "1"], ["1 token", "longer input"], "fewer sink tokens"),
    (["--max-tokens", "20", "--sink-tokens", "20"], ["--sink-tokens 20", "--sink-tokens 19"], "sink_tokens="),
])
def test_cli_errors_name_cli_flags(work, tiny, no_load, extra, words, never):
    line = refused(["analyze", "-m", tiny, "-f", work / "text.txt", *extra], work, *words)
    assert never not in line


def test_the_pattern_guard_names_cli_flags(work, tiny, no_load, monkeypatch):
    import attnscope.metrics.analyze as analyze_module

    monkeypatch.setattr(analyze_module, "PATTERN_LIMIT_BYTES", 1000)
    line = refused(["analyze", "-m", tiny, "-f", work / "text.txt", "--metrics", "pattern"], work,
                   "--metrics pattern", "--max-tokens")
    assert "layers=" not in line


def test_a_missing_haystack_text_is_refused_before_the_load(work, tiny, no_load):
    # before: every task failed after the load, each persisted as a failure
    (work / "lost.toml").write_text(PROBE.replace('text = "alice"', 'text = "no/such/book.txt"'))
    for args in (["probe", "-m", tiny, "--spec", work / "lost.toml", "-o", work / "p.h5"],
                 ["extract", "-m", tiny, "-p", work / "lost.toml", "-o", work / "s.h5"]):
        refused(args, work, "haystack.text", "no/such/book.txt", "neither a shipped text")
    assert not (work / "s.h5.d").exists()


def test_a_byte_order_mark_is_stripped_and_recorded(work, tiny):
    (work / "bom.txt").write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    outs = {}
    for name in ("bom.txt", "text.txt"):
        res = CliRunner().invoke(app, ["analyze", "-m", str(tiny), "-f", str(work / name), "--max-tokens", "30",
                                       "--metrics", "sink_mass", "--json"])
        assert res.exit_code == 0, res.stderr
        outs[name] = json.loads(res.stdout)
    assert outs["bom.txt"]["token_ids"] == outs["text.txt"]["token_ids"]  # before: 3 tokens of BOM, the sink
    res = CliRunner().invoke(app, ["analyze", "-m", str(tiny), "-f", str(work / "bom.txt"), "--max-tokens", "30",
                                   "--out", str(work / "r.h5")])
    assert res.exit_code == 0, res.stderr
    assert bool(attnscope.read_result(work / "r.h5").attrs["text_bom_stripped"]) is True


# ------------------------------------------------------------------------------- 11. definitions
def test_sink_rate_states_gu_et_als_length_rule(tiny):
    lm = attnscope.load(str(tiny))
    short = "The quick brown fox."  # a few tokens
    with pytest.raises(AttnscopeError, match=r"fewer than max_tokens=64 tokens \(text 1: \d+\).*Gu et al"):
        attnscope.sink_rate(lm, [TEXT, short])
    rate = attnscope.sink_rate(lm, [TEXT, short], max_tokens=None)  # before: "queries start at position 16"
    assert json.loads(rate.attrs["n_tokens"])[1] < 16 and rate.attrs["gu_setting"] is False
    assert attnscope.sink_rate(lm, [TEXT, TEXT]).attrs["gu_setting"] is True


def test_run_probe_records_the_attention_edit(tiny):
    lm = attnscope.load(str(tiny))
    plain = attnscope.run_probe(lm, "natural_text", lengths=[32], depths=[0.0], decode=False)
    attnscope.set_edit(lm.model, attnscope.AttentionEdit(window=4))
    try:
        edited = attnscope.run_probe(lm, "natural_text", lengths=[32], depths=[0.0], decode=False)
    finally:
        attnscope.set_edit(lm.model, None)
    assert plain.attrs["attention_edit"] == "none" and edited.attrs["attention_edit"] == "window:4"


def test_python_analyze_tokenises_only_what_max_tokens_needs(smollm2, prose):
    """analyze(text=<a huge string>, max_tokens=N) gives the tokens of the whole text's first N
    without tokenising all of it (the tokenizer never sees the text's far end)."""
    import attnscope

    seen = []
    tok = smollm2.tokenizer

    class Counting:
        pad_token_id = tok.pad_token_id

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return tok(text, **kwargs)

    text = prose * 40  # ~1.3 MB
    ds = attnscope.analyze(smollm2.model, text, tokenizer=Counting(), max_tokens=64,
                           metrics=("sink_mass",), progress=False)
    assert max(seen) < len(text) // 10
    want = tok(prose[:20000])["input_ids"][:64]
    assert json.loads(ds.attrs["query_positions"])[-1] == 63 and ds.attrs["n_tokens"] == 64
    got = attnscope.analyze(smollm2.model, token_ids=want, metrics=("sink_mass",), progress=False)
    np.testing.assert_array_equal(ds.sink_mass.values, got.sink_mass.values)
