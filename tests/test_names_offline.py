"""Model names (one resolver for every command) and an unreachable Hub detected once.

The Hub is simulated: a fake Hub cache on disk (tiny models under OlmPool Hub ids), and for the
unreachable case HF_ENDPOINT pointing at a local socket that accepts connections and closes them
at once, counting them. Nothing goes to the network.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

import attnscope
from attnscope.cli import app
from attnscope.errors import HubUnreachableError, ModelNotFoundError
from attnscope.models import hub
from attnscope.models.names import resolve_name

ROOT = Path(__file__).resolve().parent.parent
J = "allenai/J_pre_16kv_8k_14k"
POST = "longcontext-step2385"


# ------------------------------------------------------------------------------- the resolver
def test_names_prefixes_and_suggestions(tmp_path):
    assert resolve_name("J_pre").target == J and resolve_name("J_pre").olmpool == "J_pre_16kv_8k_14k"
    assert resolve_name("j_pre_16kv_8k_14k").target == J  # case-insensitive
    assert resolve_name("allenai/j_pre_16kv_8k_14k").target == J  # canonical spelling of a Hub id
    assert resolve_name("H_post_LQK_32kv_8k_11k").olmpool == "H_post_LQK_32kv_8k_11k"  # exact beats prefix
    assert resolve_name("SmolLM2").kind == "gguf" and resolve_name("SmolLM2").display == "smollm2"
    assert resolve_name("org/model") == resolve_name(" org/model ")
    assert resolve_name("org/model").kind == "hub" and resolve_name("org/model").olmpool is None
    with pytest.raises(ModelNotFoundError, match=r"ambiguous.*G_pre_4kv_8k_14k"):
        resolve_name("G_pre")
    with pytest.raises(ModelNotFoundError, match=r"did you mean 'smollm2'"):
        resolve_name("smolm2")
    with pytest.raises(ModelNotFoundError, match=r"did you mean 'J_pre_16kv_8k_14k'"):
        resolve_name("J_pre_16kv_8k_41k")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"GGUF file not found.*did you mean .*model\.gguf"):
        resolve_name(str(tmp_path / "modle.gguf"))
    # a local folder wins over an OlmPool name of the same spelling
    from attnscope.testing import make_tiny_model

    folder = make_tiny_model("llama", tmp_path / "J_pre")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert resolve_name("J_pre").kind == "local"
    finally:
        os.chdir(cwd)
    assert resolve_name(str(folder)).kind == "local"


# ------------------------------------------------------------------------------- a fake Hub cache
def _cached(hub_dir: Path, repo: str, branches: list[str], make) -> Path:
    """repo@branch in the Hub cache layout, every branch at one snapshot."""
    repo_dir = hub_dir / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / ("e" * 40)
    make(snap)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for b in branches:
        (repo_dir / "refs" / b).write_text("e" * 40)
    return snap


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    from attnscope.testing import make_tiny_model

    base = tmp_path_factory.mktemp("hub")
    _cached(base, J, ["main", POST], lambda p: make_tiny_model("llama", p, max_position_embeddings=1024))
    return base


@pytest.fixture
def cache_env(hub_dir, monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub_dir))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_dir))
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path / "attnscope-cache"))
    return hub_dir


@pytest.fixture
def dead_hub(monkeypatch):
    """HF_ENDPOINT at a local port that accepts and at once closes every connection (counted);
    offline mode off. Stops when the test ends."""
    import huggingface_hub.constants as hc

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.1)
    count, stop = [0], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            count[0] += 1
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    monkeypatch.setattr(hc, "ENDPOINT", url)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.forget()
    yield {"url": url, "count": count}
    stop.set()
    thread.join(2)
    srv.close()
    hub.forget()


def test_short_names_load_from_the_hub_cache(cache_env, tmp_path):
    """HF_HUB_OFFLINE=1 (conftest): an OlmPool prefix loads the cached checkpoint."""
    lm = attnscope.load("J_pre", revision=POST)
    assert lm.name == J and lm.revision == POST and lm.source == "hub"
    assert attnscope.analyze(lm, token_ids=list(range(3, 40)), metrics=("sink_mass",)).attrs["model"] == J


def test_every_command_takes_short_names(cache_env, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    r = CliRunner()
    res = r.invoke(app, ["analyze", "-m", "J_pre", "--revision", POST, "-f", str(text), "--json",
                         "--metrics", "sink_mass"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"] == J
    res = r.invoke(app, ["doctor", "j_pre_16kv", "--revision", POST, "--json", "--loss-tokens", "32"])
    assert res.exit_code in (0, 1), res.output  # a tiny random model may fail checks; it ran
    report = json.loads(res.stdout)
    assert report["model"] == J and report["registry_name"] == "J_pre_16kv_8k_14k"
    res = r.invoke(app, ["probe-build", "--spec", "niah_single", "--tokenizer", "J_pre", "--lengths", "384",
                         "--depths", "0.5", "--seeds", "0", "--max-context", "1024", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["length"] == 384
    res = r.invoke(app, ["probe", "-m", "J_pre", "--revision", POST, "--spec", "niah_single", "--lengths", "384",
                         "--depths", "0.5", "--seeds", "0", "--no-decode", "-o", str(tmp_path / "p.h5")])
    assert res.exit_code == 0, res.output
    assert attnscope.read_result(tmp_path / "p.h5").attrs["model"] == J
    res = r.invoke(app, ["extract", "-m", "J_pre", "-r", "post", "-p", "natural_text", "-o", str(tmp_path / "s.h5"),
                         "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "1 model(s), 1 checkpoint(s)" in res.output
    res = r.invoke(app, ["analyze", "-m", "J_pre_16kv_8k_41k", "-f", str(text)])
    assert res.exit_code == 2 and "did you mean 'J_pre_16kv_8k_14k'" in res.output


def test_unreachable_hub_fails_once_and_fast(cache_env, dead_hub):
    """Not cached: one connection decides (no retries); cached: loads from the cache, no new one."""
    with pytest.raises(HubUnreachableError, match=r"cannot be reached.*HF_HUB_OFFLINE=1") as e:
        attnscope.load("allenai/G_pre_8kv_8k_14k", revision="step34000")
    assert "\n" not in str(e.value) and "hf download allenai/G_pre_8kv_8k_14k --revision step34000" in str(e.value)
    assert dead_hub["count"][0] == 1  # huggingface_hub alone made 6 attempts over ~25 s
    with pytest.raises(HubUnreachableError):
        attnscope.load("G_pre_4kv", revision="step34000")
    lm = attnscope.load("J_pre", revision=POST)  # in the cache: used without asking the Hub again
    assert lm.name == J
    assert dead_hub["count"][0] == 1
    from attnscope.models.revisions import list_revisions
    from attnscope.errors import OfflineError

    with pytest.raises(OfflineError, match="cannot be reached"):  # no manifest cached: clear error, no wait
        list_revisions("J_pre")
    assert dead_hub["count"][0] == 1


def test_extract_offline_fails_once_before_the_batch(cache_env, dead_hub, tmp_path):
    """The CLI in a fresh process: 2 models x 2 revisions not cached -> one line, exit 2, one
    connection in all, nothing written."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=dead_hub["url"], HF_HUB_CACHE=str(cache_env), PYTHONPATH=str(ROOT),
               ATTNSCOPE_CACHE=str(tmp_path / "c"))
    out = tmp_path / "store.h5"
    r = subprocess.run([sys.executable, "-m", "attnscope", "extract", "-m", "G_pre_8kv_8k_14k,I_pre",
                        "-r", "pre,post", "-p", "natural_text", "-o", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "HF_HUB_OFFLINE=1" in lines[0] and "(and 3 more checkpoint(s))" in lines[0]
    assert dead_hub["count"][0] == 1
    assert not out.exists()


def test_failures_group_by_cause_and_clear_causes_are_not_retried(tmp_path):
    """Two local checkpoints that fail to load for the same reason: one row in the table, and a
    load that failed with a clear cause is not retried."""
    from attnscope.batch.extract import group_failures
    from attnscope.testing import make_tiny_model

    models = []
    for name in ("a", "b"):
        p = make_tiny_model("llama", tmp_path / name)
        cfg = json.loads((p / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "x.Y"}  # remote code, not allowed
        (p / "config.json").write_text(json.dumps(cfg))
        models.append(str(p))
    probe = tmp_path / "p.toml"
    probe.write_text('name = "p"\ntask = "natural_text"\n[grid]\nlengths = [32, 48]\ndepths = [0.0]\n'
                     '[haystack]\ntype = "prose"\ntext = "alice"\n')
    rep = attnscope.extract(models, None, [str(probe)], tmp_path / "s.h5", retries=3, progress=False)
    assert len(rep.failures) == 4 and all(f.attempts == 1 for f in rep.failures)
    groups = group_failures(rep.failures)
    assert len(groups) == 1 and len(groups[0].tasks) == 4 and len(groups[0].checkpoints) == 2
    assert "RemoteCodeError" in groups[0].cause and "<checkpoint>" in groups[0].cause
    res = CliRunner().invoke(app, ["extract", "-m", ",".join(models), "-p", str(probe), "-o",
                                   str(tmp_path / "s.h5"), "--no-progress"])
    assert res.exit_code == 1 and "4 failed task(s), 1 distinct cause(s)" in res.output
