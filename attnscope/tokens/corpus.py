"""Reading a corpus of documents for the token analysis."""
from __future__ import annotations

import json
from pathlib import Path

from attnscope.errors import AttnscopeError

__all__ = ["read_corpus", "repeat_corpus"]

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
    if not p.is_dir():
        from attnscope.validate import regular_file

        regular_file(p, "corpus")  # /dev/zero or a FIFO would be read forever
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


# (kind, shipped text, first block used): one document per source
_REPEAT_SOURCES = (("prose", "loc_workshop", 20), ("prose", "alice", 30), ("code", "python_stdlib", 40))


def _blocks(text: str, first: int) -> list[str]:
    return [b for b in text.split("\n\n")[first:] if len(b.strip()) >= 40]


def _take(blocks: list[str], k: int, chars: int) -> tuple[str, int]:
    """Whole blocks from index k until at least `chars` characters; (text, next index)."""
    out: list[str] = []
    while sum(map(len, out)) < chars and k < len(blocks):
        out.append(blocks[k])
        k += 1
    return "\n\n".join(out), k


def _head(block: str, chars: int) -> str:
    """The block cut after the last sentence (or line) end before `chars` characters."""
    if len(block) <= chars:
        return block
    cut = max(block.rfind(". ", 0, chars), block.rfind("\n", 0, chars))
    return block[: cut + 1] if cut > chars // 3 else block[:chars]


def repeat_corpus(path=None) -> tuple[dict[str, str], dict[str, str]]:
    """Three real documents (two prose, one code) with passages repeated at known distances.

    Built from the shipped texts ``loc_workshop``, ``alice`` and ``python_stdlib``
    (attnscope.probing.texts), each about 1,000 SmolLM2 tokens, laid out as::

        F1  P  F2  P  F3  Q  Q  F4  H

    F1..F4 are consecutive fresh passages of the source, P a passage of ~500
    characters repeated after F2 (its copy starts ~250 tokens after the
    original: far beyond a 64-token window), Q a passage of ~140 characters
    repeated at once (the copy starts ~35 tokens after the original: inside a
    64-token window), and H the first ~400 characters of F1 again (~900
    tokens back). Natural repeats inside the fresh passages stay as they are.
    Returns (doc_id -> text, doc_id -> kind); with ``path``, also writes each
    document to ``path/<kind>/<source>.txt`` (a corpus folder for ``attnscope tokens``).
    """
    from attnscope.probing.texts import load_text

    docs: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for kind, source, first in _REPEAT_SOURCES:
        blocks = _blocks(load_text(source), first)
        f1, k = _take(blocks, 0, 900)
        p, k = _take(blocks, k, 1)
        p = _head(p, 500)
        f2, k = _take(blocks, k, 700)
        f3, k = _take(blocks, k, 450)
        q, k = _take(blocks, k, 1)
        q = _head(q, 140)
        f4, k = _take(blocks, k, 450)
        h = _head(f1, 400)
        doc_id = f"{kind}/{source}.txt"
        docs[doc_id] = "\n\n".join([f1, p, f2, p, f3, q, q, f4, h]) + "\n"
        kinds[doc_id] = kind
    if path is not None:
        root = Path(path)
        for doc_id, text in docs.items():
            f = root / doc_id
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text, encoding="utf-8")
    return docs, kinds
