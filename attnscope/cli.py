"""attnscope command line (typer + rich)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from attnscope.errors import AttnscopeError

app = typer.Typer(help="attnscope: attention-pattern interpretability for Hugging Face causal LMs.", no_args_is_help=True)
console = Console()


def _load_model(name: str):
    """(model, tokenizer) through attnscope.load when the core has it, else a local folder or GGUF file."""
    try:
        from attnscope import load  # the core loader (aliases, Hub ids, GGUF cache)
    except ImportError:
        load = None
    if load is not None:
        got = load(name)
        if isinstance(got, tuple):
            return got[0], got[1]
        return got.model, got.tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(name)
    if p.is_file() and p.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name)
    elif p.is_dir():
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True)
    else:
        from attnscope.errors import ModelNotFoundError

        raise ModelNotFoundError(f"{name!r} is neither a local model folder nor a .gguf file (this build has no attnscope.load)")
    model.eval()
    return model, tok


@app.command()
def tokens(
    model_a: str = typer.Option(..., "--model-a", help="model A (the reference): name, folder or .gguf file"),
    model_b: Optional[str] = typer.Option(None, "--model-b", help="model B; default: model A (use with --ablate-b)"),
    corpus: Path = typer.Option(..., "--corpus", help=".jsonl (text[, id, kind]), a text file, or a folder of files"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    ablate_b: Optional[str] = typer.Option(None, "--ablate-b", help="attention edit for B: window:W[,sinks:K] or nosink:K"),
    window: int = typer.Option(2048, help="tokens per scoring window"),
    min_context: int = typer.Option(512, help="left context every token after the first window gets"),
    batch_size: int = typer.Option(4, help="windows per forward pass"),
    tagger: str = typer.Option("auto", help="POS tagger: auto, perceptron or lexicon"),
    min_repeat: int = typer.Option(4, help="repeat length (tokens) from which a token counts as repeated"),
    n_boot: int = typer.Option(1000, help="bootstrap replicates"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    max_docs: Optional[int] = typer.Option(None, help="use only the first N documents"),
):
    """Compare two models token by token: gap = loss_A - loss_B (> 0: B better), by token category."""
    from attnscope.tokens import apply_ablation, parse_ablation, read_corpus, run_study

    try:
        spec = parse_ablation(ablate_b) if ablate_b else None
        docs, kinds = read_corpus(corpus)
        if max_docs is not None:
            docs = dict(list(docs.items())[:max_docs])
        console.print(f"[bold]corpus[/] {corpus}: {len(docs)} documents")
        ma, ta = _load_model(model_a)
        if model_b is None or model_b == model_a:
            mb, tb = ma, ta
            if spec is None:
                console.print("[yellow]model B is model A with no edit: every gap will be 0[/]")
        else:
            mb, tb = _load_model(model_b)
        if spec is not None:
            if mb is ma:
                import copy

                mb = copy.deepcopy(ma)  # the edit must not change model A
            mb = apply_ablation(mb, spec)
        label_a = Path(model_a).name if Path(model_a).exists() else model_a
        label_b = (label_a if model_b is None else (Path(model_b).name if Path(model_b).exists() else model_b))
        label_b += f" [{spec}]" if spec else ""
        paths = run_study(ma, mb, ta, tb if tb is not ta else None, docs, out, kinds=kinds,
                          label_a=label_a, label_b=label_b, window=window, min_context=min_context,
                          batch_size=batch_size, tagger=tagger, min_repeat=min_repeat, n_boot=n_boot, seed=seed)
    except AttnscopeError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1)
    for name, p in paths.items():
        console.print(f"  {name}: {p}")


@app.callback()
def _root():
    """attnscope command line."""


def main():
    app()


if __name__ == "__main__":
    main()
