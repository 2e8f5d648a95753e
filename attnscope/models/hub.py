"""Is the Hugging Face Hub reachable? Decided once per process, in seconds, not per file.

Without a network, huggingface_hub retries every file request with backoff (~25 s per load, six
connection attempts), and a batch of 52 checkpoints spends ~40 minutes finding out. Here one
request with a short timeout decides for the whole process; a checkpoint that is in the local
cache then loads from it (`local_files_only=True`), and one that is not fails at once with one
line saying what to do. `HF_HUB_OFFLINE=1` skips the request altogether.
"""

from __future__ import annotations

import os
import threading

from attnscope.errors import HubUnreachableError

REACH_TIMEOUT_S = 3.0  # the Hub answers a HEAD in well under a second when it is reachable
_reachable: dict[str, bool] = {}  # endpoint -> answer, for this process
_lock = threading.Lock()


def offline_env() -> bool:
    """HF_HUB_OFFLINE as the environment says now."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def offline_mode() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or offline_env()


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _ask(url: str, timeout: float) -> bool:
    """One HEAD request in a daemon thread (a stalled DNS lookup cannot hang the caller); any
    HTTP answer, even an error status, means the Hub is reachable."""
    from huggingface_hub.utils import get_session

    box: dict[str, bool] = {}

    def call() -> None:
        try:
            get_session().head(url, timeout=timeout, follow_redirects=False)
            box["ok"] = True
        except Exception:  # connection refused, reset, DNS failure, timeout: not reachable
            box["ok"] = False

    t = threading.Thread(target=call, name="attnscope-hub-check", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return box.get("ok", False)


def hub_reachable(timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether the Hub endpoint answers; asked once per process and endpoint (False offline)."""
    if offline_mode():
        return False
    url = endpoint()
    with _lock:
        if url not in _reachable:
            _reachable[url] = _ask(url, timeout)
        return _reachable[url]


def forget() -> None:
    """Ask again next time (after the network came back, and in tests)."""
    with _lock:
        _reachable.clear()


def checkpoint_cached(repo_id: str, revision: str | None = None) -> bool:
    """Whether `repo_id`@`revision` has its config.json in the local Hub cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
    return isinstance(found, str)


def unreachable_error(repo_id: str, revision: str | None, *, n_more: int = 0) -> HubUnreachableError:
    from huggingface_hub import constants

    rev = f"@{revision}" if revision else ""
    why = ("offline mode is on (HF_HUB_OFFLINE)" if offline_mode()
           else f"the Hugging Face Hub ({endpoint()}) cannot be reached")
    more = f" (and {n_more} more checkpoint(s))" if n_more else ""
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    todo = f"pre-download it on a machine with network access (`{download}`)"
    if not offline_mode():
        todo += ", or set HF_HUB_OFFLINE=1 to work from the cache only"
    return HubUnreachableError(f"{why} and {repo_id}{rev}{more} is not in the Hub cache "
                               f"{constants.HF_HUB_CACHE}: {todo}")


def hub_access(repo_id: str, revision: str | None = None) -> dict:
    """Keyword arguments for transformers' from_pretrained of a Hub checkpoint.

    Reachable Hub: {} (normal download/validation). Unreachable or offline: the cached copy
    ({"local_files_only": True}), or HubUnreachableError at once when there is none.
    """
    if not offline_mode() and hub_reachable():
        return {}
    if checkpoint_cached(repo_id, revision):
        return {"local_files_only": True}
    raise unreachable_error(repo_id, revision)
