"""The one place the benchmark scripts write their results into docs/benchmarks.md.

Each script owns one `## ` section: rerunning it replaces that section and keeps the others, and
the section starts with the exact command that produced it (quoted so it can be pasted back).
"""

from __future__ import annotations

import shlex
from pathlib import Path


def command_line(script: str, argv: list[str]) -> str:
    """The command as a user types it: `python benchmarks/<script> <args>`, shell-quoted."""
    return shlex.join(["python", f"benchmarks/{script}", *argv])


def write_section(path: Path, heading: str, body: str, command: str | None = None) -> None:
    """Replace (or append) the `heading` section of the markdown file at `path`."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{heading}\n\n" + (f"Command: `{command}`\n\n" if command else "") + f"{body.strip()}\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip() + "\n\n" + block
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + block + (text[end + 1:] if end >= 0 else "")
    path.write_text(text.rstrip() + "\n")
