"""Checkpoints (Hub revisions) of a model, online with an offline manifest cache.

OlmPool models have 38 checkpoints each, as Hub branches: ``stepN`` during pretraining
(``step34000`` = end of the 140B-token pretraining) and ``longcontext-stepN`` during context
extension (``longcontext-step2385`` = end of the 10B-token extension to 64K), plus ``main``.

Each successful online listing is saved as a JSON manifest under
``$ATTNSCOPE_CACHE/revisions/`` (default ``~/.cache/attnscope/revisions/``); offline
(``HF_HUB_OFFLINE=1``, ``offline=True``, or a network call that fails or times out) the
manifest is read instead.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attnscope.errors import ModelNotFoundError, OfflineError
from attnscope.files import write_json_atomic

__all__ = [
    "Revision",
    "parse_revision",
    "list_revisions",
    "FINAL_PRETRAIN_STEP",
    "FINAL_LONGCONTEXT_STEP",
    "NETWORK_TIMEOUT_S",
]

FINAL_PRETRAIN_STEP = 34000  # end of the 140B-token pretraining
FINAL_LONGCONTEXT_STEP = 2385  # end of the 10B-token extension to 64K
NETWORK_TIMEOUT_S = 10.0  # listing refs is one small request; longer means no usable network
MANIFEST_VERSION = 1

_STAGE_ORDER = {"pretrain": 0, "longcontext": 1, "main": 2, "other": 3}
# OLMo names: "step34000", sometimes with a token count "step34000-tokens140B".
_PRETRAIN_RE = re.compile(r"^step(\d+)(?:-tokens\d+[BMT]?)?$")
_LONG_RE = re.compile(r"^(?:longcontext|long-context|long_context|lc)[-_]step(\d+)(?:-tokens\d+[BMT]?)?$")


@dataclass(frozen=True)
class Revision:
    """One checkpoint: a Hub branch or tag name, read as stage + step."""

    name: str
    stage: str  # 'pretrain' | 'longcontext' | 'main' | 'other'
    step: int | None
    is_final_pretrain: bool = False
    is_final: bool = False
    commit: str | None = None
    kind: str = "branch"  # 'branch' | 'tag'

    @property
    def sort_key(self) -> tuple:
        return (_STAGE_ORDER[self.stage], self.step if self.step is not None else -1, self.name)


def parse_revision(name: str, commit: str | None = None, kind: str = "branch") -> Revision:
    """Read a revision name: ``stepN`` -> pretrain, ``longcontext-stepN`` -> longcontext,
    ``main`` -> main, anything else -> other (step None)."""
    text = str(name).strip()
    m = _PRETRAIN_RE.match(text)
    if m:
        step = int(m.group(1))
        return Revision(text, "pretrain", step, is_final_pretrain=step == FINAL_PRETRAIN_STEP,
                        commit=commit, kind=kind)
    m = _LONG_RE.match(text)
    if m:
        step = int(m.group(1))
        return Revision(text, "longcontext", step, is_final=step == FINAL_LONGCONTEXT_STEP,
                        commit=commit, kind=kind)
    if text == "main":
        return Revision(text, "main", None, commit=commit, kind=kind)
    return Revision(text, "other", None, commit=commit, kind=kind)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ATTNSCOPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "attnscope"


def manifest_path(hf_name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the offline manifest of ``hf_name`` lives."""
    safe = hf_name.strip("/").replace("/", "--")
    return _cache_root(cache_dir) / "revisions" / f"{safe}.json"


def _read_manifest(path: Path, hf_name: str | None) -> list[Revision]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        refs = data["refs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OfflineError(f"revision manifest {path} is unreadable ({e}); delete it and list the "
                           "revisions once online.") from e
    if not isinstance(data, dict) or not isinstance(refs, list) or not all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and r["name"].strip()
            and isinstance(r.get("commit"), (str, type(None))) and r.get("kind", "branch") in ("branch", "tag")
            for r in refs):
        raise OfflineError(f"revision manifest {path} is malformed: expected {{\"refs\": [{{\"name\": str, "
                           "\"commit\": str|null, \"kind\": \"branch\"|\"tag\"}, ...]}; fix or delete it and list "
                           "the revisions once online.")
    if hf_name is not None and data.get("repo_id") not in (None, hf_name):
        raise OfflineError(f"revision manifest {path} is for {data.get('repo_id')!r}, not {hf_name!r}.")
    return _sorted([parse_revision(r["name"], r.get("commit"), r.get("kind", "branch")) for r in refs])


def _sorted(revs: list[Revision]) -> list[Revision]:
    return sorted(revs, key=lambda r: r.sort_key)


def _fetch_refs(hf_name: str, timeout: float) -> list[dict]:
    """One list_repo_refs call in a daemon thread, so a stalled connection cannot hang us."""
    from huggingface_hub import HfApi

    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["refs"] = HfApi().list_repo_refs(hf_name)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=call, name=f"attnscope-refs-{hf_name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"listing the revisions of {hf_name} took longer than {timeout:g} s")
    if "error" in box:
        raise box["error"]
    refs = box["refs"]
    out = [{"name": b.name, "commit": b.target_commit, "kind": "branch"} for b in refs.branches]
    out += [{"name": t.name, "commit": t.target_commit, "kind": "tag"} for t in refs.tags]
    return out


def _is_missing_repo(e: BaseException) -> bool:
    try:
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:  # pragma: no cover - very old huggingface_hub
        from huggingface_hub.utils import RepositoryNotFoundError
    return isinstance(e, RepositoryNotFoundError)


def list_revisions(
    hf_name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    manifest: str | os.PathLike | None = None,
    timeout: float = NETWORK_TIMEOUT_S,
) -> list[Revision]:
    """The checkpoints of ``hf_name`` (branches and tags), ordered by stage then step.

    ``offline=None`` follows ``HF_HUB_OFFLINE`` and, without it, whether the Hub answers (asked
    once per process, attnscope.models.hub); ``offline=False`` always asks the Hub. Online, the
    listing is cached as a manifest; offline, or when the Hub cannot be reached within
    ``timeout`` seconds, the cached manifest is used. ``manifest=`` reads a given manifest file and never touches the network.
    OlmPool short names (``J_pre_16kv_8k_14k``) are expanded to ``allenai/...``.
    """
    hf_name = _hub_id(hf_name)
    if manifest is not None:
        return _read_manifest(Path(manifest), hf_name)
    path = manifest_path(hf_name, cache_dir)
    network_error: BaseException | None = None
    if offline is None:  # automatic: HF_HUB_OFFLINE, else one reachability check per process
        from attnscope.models.hub import endpoint, hub_reachable, offline_env

        offline = offline_env()
        if not offline and not hub_reachable():
            offline = True
            network_error = ConnectionError(f"{endpoint()} cannot be reached")
    if not offline:
        try:
            refs = _fetch_refs(hf_name, timeout)
        except Exception as e:
            if _is_missing_repo(e):
                raise ModelNotFoundError(f"{hf_name!r} does not exist on the Hugging Face Hub (or is "
                                         "private: log in with `hf auth login`).") from e
            network_error = e
        else:
            write_json_atomic(path, {
                "version": MANIFEST_VERSION,
                "repo_id": hf_name,
                "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": "huggingface_hub.HfApi.list_repo_refs",
                "refs": refs,
            }, indent=1)
            return _sorted([parse_revision(r["name"], r["commit"], r["kind"]) for r in refs])
    if path.exists():
        return _read_manifest(path, hf_name)
    why = (f"the Hub could not be reached ({type(network_error).__name__}: {network_error})"
           if network_error is not None else "offline mode is on (HF_HUB_OFFLINE or offline=True)")
    raise OfflineError(
        f"cannot list the revisions of {hf_name}: {why}, and no manifest is cached at {path}. "
        "Run `attnscope revisions MODEL` (or list_revisions) once online to cache the list, or pass "
        "a manifest file with manifest=PATH (`--manifest PATH`)."
    ) from network_error


def _hub_id(name: str) -> str:
    """The Hub id behind a model name (OlmPool short names and prefixes expand to allenai/...)."""
    from attnscope.models.names import resolve_name

    resolved = resolve_name(name)
    if resolved.kind != "hub":
        raise ModelNotFoundError(f"{name!r} is a local {'GGUF file' if resolved.kind == 'gguf' else 'folder'}: "
                                 "only Hub models have revisions")
    return resolved.target


def revisions_to_dicts(revs: list[Revision]) -> list[dict]:
    return [asdict(r) for r in revs]
