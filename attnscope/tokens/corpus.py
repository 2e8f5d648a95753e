"""Reading a corpus of documents for the token analysis."""
from __future__ import annotations

import json
from pathlib import Path

from attnscope.errors import AttnscopeError

__all__ = ["read_corpus"]

_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".html", ".htm", ".xml", ".tex", ".json", ".js", ".c", ".h",
                  ".cpp", ".java", ".rs", ".go", ".css", ".yaml", ".yml", ".toml", ".csv"}


def read_corpus(path) -> tuple[dict[str, str], dict[str, str]]:
    """Documents and their kinds from a path.

    * ``*.jsonl``: one JSON object a line with ``text`` and optional ``id`` and ``kind``;
    * a directory: every text file below it (by suffix) is one document, its id the
      relative path, its kind the first sub-folder's name ("" at the top level);
    * any other file: the whole file is one document.
    Returns (doc_id -> text, doc_id -> kind).
    """
    p = Path(path)
    if not p.exists():
        raise AttnscopeError(f"corpus {p} does not exist")
    docs: dict[str, str] = {}
    kinds: dict[str, str] = {}
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES:
                rel = f.relative_to(p)
                docs[str(rel)] = f.read_text(encoding="utf-8", errors="replace")
                kinds[str(rel)] = rel.parts[0] if len(rel.parts) > 1 else ""
    elif p.suffix == ".jsonl":
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AttnscopeError(f"{p}:{n}: expected a JSON object with a 'text' field") from None
            doc_id = str(obj.get("id", n))
            if doc_id in docs:
                raise AttnscopeError(f"{p}:{n}: document id {doc_id!r} repeats")
            docs[doc_id] = text
            kinds[doc_id] = str(obj.get("kind", ""))
    else:
        docs[p.name] = p.read_text(encoding="utf-8", errors="replace")
        kinds[p.name] = ""
    docs = {k: v for k, v in docs.items() if v.strip()}
    if not docs:
        raise AttnscopeError(f"corpus {p} holds no non-empty document")
    return docs, {k: kinds[k] for k in docs}
