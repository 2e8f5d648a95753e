"""Every Python snippet and every `attnscope ...` line of README.md runs as written.

They run in order, Python snippets in one namespace (as a reader pastes them into one session),
in a scratch folder holding the files a reader brings: `book.txt` (shipped prose) and `texts/`
(two short documents). A snippet or line that needs the network or a large checkpoint says so in
a comment in the README ("needs the Hub", "needs a local checkpoint"); it is skipped with that
comment as the reason, and so are the set-up lines (make, pip), which CI runs itself (`make test`,
tools/check_wheel.sh).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
NEEDS = re.compile(r"#[^\n]*?\b(needs (?:the Hugging Face Hub|the Hub|a local checkpoint)[^\n;]*)")


def _blocks() -> list[tuple[str, int, str]]:
    """(language, first line number, code) of every fenced block of README.md."""
    out, lang, start, lines = [], None, 0, []
    for i, line in enumerate((ROOT / "README.md").read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, lines = line[3:].strip() or "text", i + 1, []
            else:
                out.append((lang, start, "\n".join(lines)))
                lang = None
        elif lang is not None:
            lines.append(line)
    return out


def _snippets():
    """pytest params in README order: ('python', line, code) and ('cli', line, command line)."""
    params = []
    for lang, start, code in _blocks():
        if lang == "python":
            params.append(pytest.param("python", start, code, id=f"python@{start}"))
        elif lang == "bash":
            for k, line in enumerate(code.splitlines()):
                if line.strip():
                    params.append(pytest.param("cli", start + k, line, id=f"cli@{start + k}"))
    return params


SNIPPETS = _snippets()


def test_the_readme_has_snippets_of_each_kind():
    kinds = [p.values[0] for p in SNIPPETS]
    assert kinds.count("python") >= 5 and kinds.count("cli") >= 7
    assert any(p.values[2].startswith("make demo") for p in SNIPPETS)  # the quick start stays


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """The scratch folder (book.txt, texts/) as the working directory, and the shared namespace."""
    from attnscope.probing.texts import load_text, prose

    folder = tmp_path_factory.mktemp("reader")
    (folder / "book.txt").write_text(prose(), encoding="utf-8")
    (folder / "texts").mkdir()
    (folder / "texts" / "alice.txt").write_text(load_text("alice")[20000:20500], encoding="utf-8")
    (folder / "texts" / "paradise.txt").write_text(load_text("paradise_lost")[30000:30500], encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(folder)
    yield {"folder": folder, "ns": {"__name__": "__readme__"}}
    os.chdir(cwd)


def _check_backends(ns) -> None:
    """The README promises: same ids as the native path, the same numbers to 1e-5."""
    import attnscope

    ref = attnscope.analyze(ns["lm"], ns["text"])
    for key in ("ds_tl", "ds_nn"):
        ds = ns[key]
        assert ds.attrs["n_tokens"] == ref.attrs["n_tokens"], key
        for name in ref.data_vars:
            scale = max(1.0, float(np.abs(ref[name].values).max())) if name == "mean_distance" else 1.0
            err = float(np.abs(ds[name].values - ref[name].values).max())
            assert err <= 1e-5 * scale, f"{key} {name}: {err:.2e}"


@pytest.mark.parametrize("kind,line,code", SNIPPETS)
def test_readme_snippet(kind, line, code, reader, smollm2):
    need = NEEDS.search(code)
    if need:
        pytest.skip(f"README.md:{line}: {need.group(1).rstrip(')')}")
    if kind == "cli" and not code.startswith("attnscope "):
        pytest.skip(f"README.md:{line}: set-up line ({code.split()[0]}); CI runs `make test` and "
                    "tools/check_wheel.sh itself")
    if kind == "python":
        exec(compile(code, f"README.md:{line}", "exec"), reader["ns"])
        if "TransformerBridge" in code:
            _check_backends(reader["ns"])
        return
    from attnscope.cli import app

    args = shlex.split(code, comments=True)
    res = CliRunner().invoke(app, args[1:])
    assert res.exit_code == 0, f"README.md:{line}: {code}\n{res.output}"
    if "--json" in args:
        json.loads(res.stdout)
