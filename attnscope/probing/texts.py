"""Offline texts shipped with attnscope (see attnscope/data/texts/SOURCES.md).

Public-domain English prose and verse, plus a small PSF-licensed Python code sample, so
demos, tests, benchmarks and probe haystacks need no network.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from attnscope.errors import TextSourceError

TEXT_DIR = Path(__file__).resolve().parent.parent / "data" / "texts"

# name -> kind; the file is TEXT_DIR / f"{name}.txt.gz"
_KINDS = {
    "loc_workshop": "prose",
    "alice": "prose",
    "paradise_lost": "verse",
    "python_stdlib": "code",
}
DEFAULT_PROSE = "loc_workshop"  # the longest continuous prose text (~57K words)


def available_texts(kind: str | None = None) -> list[str]:
    """Names of the shipped texts, optionally only those of one kind ('prose', 'verse', 'code')."""
    if kind is not None and kind not in set(_KINDS.values()):
        raise TextSourceError(
            f"unknown text kind {kind!r}; choose one of {sorted(set(_KINDS.values()))}")
    return sorted(n for n, k in _KINDS.items()
                  if (kind is None or k == kind) and (TEXT_DIR / f"{n}.txt.gz").is_file())


def text_kind(name: str) -> str:
    """'prose', 'verse' or 'code' for a shipped text name."""
    if name not in _KINDS:
        raise TextSourceError(f"no shipped text named {name!r}; available: {available_texts()}")
    return _KINDS[name]


@lru_cache(maxsize=8)
def _read_shipped(name: str) -> str:
    path = TEXT_DIR / f"{name}.txt.gz"
    if not path.is_file():
        raise TextSourceError(
            f"shipped text {name!r} is missing at {path}; reinstall attnscope "
            "(package data attnscope/data/texts/*.txt.gz)")
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def prose(name: str | None = None) -> str:
    """A shipped English prose text; the default is the longest one (`loc_workshop`)."""
    name = DEFAULT_PROSE if name is None else name
    if text_kind(name) != "prose":
        raise TextSourceError(
            f"text {name!r} is {text_kind(name)}, not prose; prose texts: "
            f"{available_texts('prose')} (use load_text({name!r}) to get it anyway)")
    return _read_shipped(name)


def load_text(path_or_name: str | Path) -> str:
    """A shipped text by name, or a user's UTF-8 text file (``.gz`` is decompressed)."""
    if isinstance(path_or_name, str) and path_or_name in _KINDS:
        return _read_shipped(path_or_name)
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise TextSourceError(
            f"{str(path_or_name)!r} is neither a shipped text ({available_texts()}) nor an "
            "existing file")
    if not path.is_file():
        raise TextSourceError(f"{str(path)!r} is not a regular file")
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise TextSourceError(f"cannot read {str(path)!r}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise TextSourceError(
            f"{str(path)!r} is not UTF-8 text ({exc}); convert it, e.g. with iconv") from exc
    if not text.strip():
        raise TextSourceError(f"{str(path)!r} is empty")
    return text
