"""Loading errors, result round-trips, the CLI, and the guards that protect memory."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import attnscope
from attnscope.errors import (
    AttnscopeError,
    InputTooLongError,
    MemoryGuardError,
    ModelNotFoundError,
    RemoteCodeError,
    RevisionNotFoundError,
    StoreError,
)
from attnscope.store.hdf5 import read_result, save_result


def test_unknown_model_names_say_what_to_do(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'gpt-nonexistent'"):
        attnscope.load("gpt-nonexistent")
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        attnscope.load(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        attnscope.load("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        attnscope.load(str(tmp_path / "empty"))


def test_gguf_has_no_revisions():
    with pytest.raises(RevisionNotFoundError, match="no revisions"):
        attnscope.load("smollm2", revision="step1000")


def test_hub_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((ModelNotFoundError, RevisionNotFoundError), match="allenai/G_pre_8kv_8k_14k"):
        attnscope.load("allenai/G_pre_8kv_8k_14k", revision="step34000")


def test_remote_code_needs_opt_in(tiny_dir):
    from conftest import save_tiny

    path = save_tiny("llama", tiny_dir / "remote")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        attnscope.load(str(path))


def test_text_longer_than_context_is_refused(tiny):
    lm = tiny("llama")  # max_position_embeddings = 512
    with pytest.raises(InputTooLongError, match="513 tokens .* context of 512.*max_tokens=512"):
        attnscope.analyze(lm, token_ids=[5] * 513)
    ds = attnscope.analyze(lm, token_ids=[5] * 513, max_tokens=512, queries="last:4")
    assert ds.attrs["n_tokens"] == 512


def test_full_pattern_guard(tiny):
    lm = tiny("llama")
    with pytest.raises(MemoryGuardError, match="GiB"):
        attnscope.analyze(lm, token_ids=[5] * 500, metrics=("pattern",), pattern_limit_bytes=1 << 20)


@pytest.mark.parametrize("kwargs,message", [
    ({"queries": "last:0"}, "last:N needs N >= 1"),
    ({"queries": "every"}, "bad query selection"),
    ({"queries": "5,900"}, "outside the 48-token input"),
    ({"spans": {"n": (40, 60)}}, "not inside the 48-token input"),
    ({"metrics": ("sink_mass", "nope")}, "unknown metric"),
    ({"metrics": ("span_mass",)}, "span_mass needs spans"),
    ({"min_query_position": 100}, "queries start at position 100"),
])
def test_bad_arguments(tiny, kwargs, message):
    with pytest.raises(AttnscopeError, match=message):
        attnscope.analyze(tiny("llama"), token_ids=list(range(3, 51)), **kwargs)


def test_result_round_trips_through_hdf5(tiny, tmp_path):
    ds = attnscope.analyze(tiny("olmo3"), token_ids=list(range(3, 51)), spans={"a": (2, 5), "b": (10, 12)},
                           metrics=("sink_mass", "entropy", "position_profile", "pattern"))
    path = save_result(ds, tmp_path / "r.h5")
    back = read_result(path)
    assert set(back.data_vars) == set(ds.data_vars)
    for name in ds.data_vars:
        assert back[name].dims == ds[name].dims
        np.testing.assert_array_equal(back[name].values, ds[name].values)
    assert list(back.span.values) == ["a", "b"]
    assert back.attrs == ds.attrs
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        read_result(bad)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not an attnscope result"):
        read_result(foreign)
    with pytest.raises(StoreError, match="no such file"):
        read_result(tmp_path / "missing.h5")


def test_attention_edit_window_wider_than_input_changes_nothing(tiny):
    lm = tiny("llama")
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        base = lm.model(ids).logits
        attnscope.set_edit(lm.model, attnscope.AttentionEdit(window=40))
        try:
            edited = lm.model(ids).logits
            attnscope.set_edit(lm.model, attnscope.AttentionEdit(window=4))
            local = lm.model(ids).logits
        finally:
            attnscope.set_edit(lm.model, None)
    assert torch.equal(base, edited)
    assert not torch.allclose(base, local)


def test_cli_analyze_json(tmp_path, smollm2, prose):
    text = tmp_path / "t.txt"
    text.write_text(prose[:3000])
    out = tmp_path / "r.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "attnscope", "analyze", "--model", "smollm2", "--text-file", str(text),
         "--max-tokens", "128", "--span", "10:20", "--queries", "last:8",
         "--metrics", "sink_mass,span_mass,entropy", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["model"] == "smollm2" and len(data["token_ids"]) == 128
    assert data["layers"] == list(range(30)) and data["queries"] == list(range(120, 128))
    assert np.array(data["metrics"]["sink_mass"]).shape == (30, 9)
    assert np.array(data["metrics"]["span_mass"]).shape == (1, 30, 9)
    ds = read_result(out)
    np.testing.assert_allclose(ds.sink_mass.values, data["metrics"]["sink_mass"], rtol=1e-6)


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "attnscope", "analyze", "--model", "nope-model",
                           "--text-file", str(tmp_path / "missing.txt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "no such text file" in proc.stderr


def test_text_variables_round_trip(tmp_path):
    import xarray as xr

    ds = xr.Dataset({"generated": (("length", "depth"), np.array([[": 5541669", "a"], ["b", "ü"]])),
                     "one": ((), "abc"), "correct": (("length",), np.array([True, False]))},
                    coords={"length": [1024, 2048], "depth": [0.25, 0.75]})
    back = read_result(save_result(ds, tmp_path / "t.h5"))
    assert back.generated.values.tolist() == ds.generated.values.tolist()
    assert str(back.one.values) == "abc" and back.correct.values.tolist() == [True, False]
