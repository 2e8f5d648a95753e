"""Checkpoint listing: parsing, ordering, mocked Hub listing, offline manifest, offline errors."""

import json
import os
import random
import threading

import pytest
from huggingface_hub import HfApi
from huggingface_hub.hf_api import GitRefInfo, GitRefs
from typer.testing import CliRunner

from attnscope.cli import app
from attnscope.errors import ModelNotFoundError, OfflineError
from attnscope.models import revisions as rv

REPO = "allenai/J_pre_16kv_8k_14k"
PRETRAIN_STEPS = [0, 1000, 2000, 5000, 10000, 15000, 20000, 25000, 30000, 34000]
LONG_STEPS = [100, 500, 1000, 1500, 2000, 2385]


def _names():
    return (["main"] + [f"step{s}" for s in PRETRAIN_STEPS] + [f"longcontext-step{s}" for s in LONG_STEPS])


def _refs(names, tags=()):
    branches = [GitRefInfo(name=n, ref=f"refs/heads/{n}", target_commit=f"{i:040x}") for i, n in enumerate(names)]
    tag_refs = [GitRefInfo(name=n, ref=f"refs/tags/{n}", target_commit="f" * 40) for n in tags]
    return GitRefs(branches=branches, converts=[], tags=tag_refs)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace only the network call; records the repo ids asked for."""
    calls = []
    names = _names()
    random.Random(0).shuffle(names)  # the Hub returns branches in no useful order

    def list_repo_refs(self, repo_id, **kw):
        calls.append(repo_id)
        return _refs(names, tags=["v1.0"])

    monkeypatch.setattr(HfApi, "list_repo_refs", list_repo_refs)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_parse_revision():
    r = rv.parse_revision("step34000")
    assert (r.stage, r.step, r.is_final_pretrain, r.is_final) == ("pretrain", 34000, True, False)
    r = rv.parse_revision("step1000")
    assert (r.stage, r.step, r.is_final_pretrain) == ("pretrain", 1000, False)
    r = rv.parse_revision("longcontext-step2385")
    assert (r.stage, r.step, r.is_final, r.is_final_pretrain) == ("longcontext", 2385, True, False)
    assert rv.parse_revision("longcontext-step500").is_final is False
    assert rv.parse_revision("step1000-tokens4B").step == 1000
    assert (rv.parse_revision("main").stage, rv.parse_revision("main").step) == ("main", None)
    other = rv.parse_revision("ablation-x")
    assert (other.stage, other.step) == ("other", None)
    assert rv.parse_revision("stepping").stage == "other"


def test_ordering_by_stage_then_step():
    names = ["main", "step10000", "longcontext-step100", "step2000", "zz-other", "longcontext-step2385", "step34000"]
    revs = sorted((rv.parse_revision(n) for n in names), key=lambda r: r.sort_key)
    assert [r.name for r in revs] == ["step2000", "step10000", "step34000", "longcontext-step100",
                                      "longcontext-step2385", "main", "zz-other"]


def test_online_listing_is_ordered_and_cached(fake_hub, tmp_path):
    revs = rv.list_revisions(REPO, cache_dir=tmp_path, offline=False)
    assert fake_hub == [REPO]
    assert len(revs) == 18  # 17 branches + 1 tag
    stages = [r.stage for r in revs]
    assert stages == sorted(stages, key=["pretrain", "longcontext", "main", "other"].index)
    pre = [r.step for r in revs if r.stage == "pretrain"]
    assert pre == PRETRAIN_STEPS
    assert [r.step for r in revs if r.stage == "longcontext"] == LONG_STEPS
    assert [r.name for r in revs if r.is_final_pretrain] == ["step34000"]
    assert [r.name for r in revs if r.is_final] == ["longcontext-step2385"]
    assert all(r.commit and len(r.commit) == 40 for r in revs)
    assert {r.kind for r in revs} == {"branch", "tag"}
    manifest = rv.manifest_path(REPO, tmp_path)
    data = json.loads(manifest.read_text())
    assert data["repo_id"] == REPO and len(data["refs"]) == 18
    assert not [p for p in manifest.parent.iterdir() if p.name.endswith(".tmp")]


def test_short_name_expands_to_hub_id(fake_hub, tmp_path):
    rv.list_revisions("J_pre_16kv", cache_dir=tmp_path, offline=False)
    assert fake_hub == [REPO]


def test_offline_reads_the_manifest(fake_hub, tmp_path, monkeypatch):
    online = rv.list_revisions(REPO, cache_dir=tmp_path, offline=False)
    monkeypatch.setattr(HfApi, "list_repo_refs", lambda *a, **k: pytest.fail("network used while offline"))
    assert rv.list_revisions(REPO, cache_dir=tmp_path, offline=True) == online
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert rv.list_revisions(REPO, cache_dir=tmp_path) == online
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path))
    assert rv.list_revisions(REPO) == online
    # an explicit manifest file, e.g. copied from another machine
    assert rv.list_revisions(REPO, manifest=rv.manifest_path(REPO, tmp_path)) == online


def test_offline_without_manifest_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(HfApi, "list_repo_refs", lambda *a, **k: pytest.fail("network used while offline"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as e:
        rv.list_revisions(REPO, cache_dir=tmp_path)
    msg = str(e.value)
    assert "online" in msg and "manifest" in msg and str(tmp_path) in msg


def test_network_failure_falls_back_to_manifest(fake_hub, tmp_path, monkeypatch):
    online = rv.list_revisions(REPO, cache_dir=tmp_path, offline=False)

    def down(self, repo_id, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "list_repo_refs", down)
    assert rv.list_revisions(REPO, cache_dir=tmp_path, offline=False) == online
    with pytest.raises(OfflineError, match="no route to host"):
        rv.list_revisions("allenai/I_pre_32kv_8k_12k", cache_dir=tmp_path, offline=False)


def test_stalled_network_cannot_hang(tmp_path, monkeypatch):
    release = threading.Event()

    def stall(self, repo_id, **kw):
        release.wait(30)  # a connection that never answers
        raise ConnectionError("released")

    monkeypatch.setattr(HfApi, "list_repo_refs", stall)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        with pytest.raises(OfflineError, match="TimeoutError"):
            rv.list_revisions(REPO, cache_dir=tmp_path, offline=False, timeout=0.2)
    finally:
        release.set()


def test_missing_repo_is_model_not_found(tmp_path, monkeypatch):
    import httpx2 as httpx  # the HTTP client huggingface_hub uses here

    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(self, repo_id, **kw):
        resp = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}/refs"))
        raise RepositoryNotFoundError("404", response=resp)

    monkeypatch.setattr(HfApi, "list_repo_refs", missing)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        rv.list_revisions("allenai/nope", cache_dir=tmp_path, offline=False)


def test_manifest_for_another_repo_is_refused(fake_hub, tmp_path):
    rv.list_revisions(REPO, cache_dir=tmp_path, offline=False)
    with pytest.raises(OfflineError, match="not 'allenai/other'"):
        rv.list_revisions("allenai/other", manifest=rv.manifest_path(REPO, tmp_path))


def test_cli_revisions(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path))
    runner = CliRunner()
    res = runner.invoke(app, ["revisions", REPO, "--json", "--online"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data[0]["name"] == "step0" and [d["name"] for d in data if d["is_final"]] == ["longcontext-step2385"]
    res = runner.invoke(app, ["revisions", REPO, "--offline"])
    assert res.exit_code == 0 and "end of pretraining" in res.stdout
    res = runner.invoke(app, ["revisions", "allenai/I_pre_32kv_8k_12k", "--offline"])
    assert res.exit_code == 2 and "manifest" in res.output


def test_manifest_follows_the_umask(fake_hub, tmp_path):
    """A cached manifest is readable by the group where the umask allows it (mkstemp alone: 0600)."""
    old = os.umask(0o027)
    try:
        rv.list_revisions(REPO, cache_dir=tmp_path, offline=False)
    finally:
        os.umask(old)
    assert rv.manifest_path(REPO, tmp_path).stat().st_mode & 0o777 == 0o640
