"""attnscope command line (typer + rich)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from attnscope.errors import AttnscopeError

app = typer.Typer(help="Attention-pattern statistics for Hugging Face causal LMs.", no_args_is_help=True)
_out = Console(width=None if Console().is_terminal else 160)
_err = Console(stderr=True)

# (column, header): short headers keep the table readable in 120 columns
_MODEL_COLUMNS = [("name", "name"), ("norm", "norm"), ("qk_norm", "qk norm"), ("kv_heads", "kv"),
                  ("pretrain_ctx", "ctx"), ("swa", "swa"), ("fp8", "fp8"), ("harmful_count", "harm"),
                  ("helmet_64k", "HELMET 64k"), ("ruler_64k", "RULER 64k"), ("longppl", "LongPPL"),
                  ("hf_class", "class"), ("remote_code", "remote")]


def _fail(e: AttnscopeError) -> None:
    _err.print(f"[red]error:[/red] {e}")
    raise typer.Exit(code=2)


def _cell(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


@app.command("models")
def models_cmd(
    filter: Optional[str] = typer.Option(None, "--filter", "-f",
                                         help="conditions like 'qk_norm=none,swa=1,kv_heads<32'"),
    as_json: bool = typer.Option(False, "--json", help="print JSON records (all columns)"),
    as_csv: bool = typer.Option(False, "--csv", help="print CSV (all columns)"),
) -> None:
    """List the OlmPool models (architecture, harmful-choice count, long-context scores)."""
    from attnscope.models import olmpool

    try:
        df = olmpool.find(filter) if filter else olmpool.registry()
    except AttnscopeError as e:
        _fail(e)
    if as_json and as_csv:
        _err.print("[red]error:[/red] choose one of --json and --csv")
        raise typer.Exit(code=2)
    if as_json:
        records = json.loads(df.assign(quirks=df["quirks"].map(list)).to_json(orient="records"))
        typer.echo(json.dumps({"provenance": olmpool.PROVENANCE, "models": records}, indent=1))
        return
    if as_csv:
        typer.echo(df.drop(columns=["quirks"]).to_csv(index=False), nl=False)
        return
    table = Table(title=f"OlmPool models ({len(df)}); harm = QK norm + GQA + SWA + 4K pretraining")
    for col, header in _MODEL_COLUMNS:
        table.add_column(header, justify="right" if df[col].dtype.kind in "if" else "left",
                         no_wrap=col in ("name", "hf_class"))
    for _, row in df.iterrows():
        table.add_row(*[_cell(row[c]) for c, _ in _MODEL_COLUMNS])
    _out.print(table)
    _out.print(f"[dim]Source: {olmpool.PROVENANCE}[/dim]")


@app.command("revisions")
def revisions_cmd(
    model: str = typer.Argument(..., help="Hub id or OlmPool short name"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    offline: Optional[bool] = typer.Option(None, "--offline/--online",
                                           help="force the cached manifest / the Hub (default: HF_HUB_OFFLINE)"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="read revisions from this manifest file"),
) -> None:
    """List a model's checkpoints (Hub branches and tags), ordered by stage then step."""
    from attnscope.models.revisions import list_revisions, revisions_to_dicts

    try:
        revs = list_revisions(model, offline=offline, manifest=manifest)
    except AttnscopeError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(revisions_to_dicts(revs), indent=1))
        return
    table = Table(title=f"{model}: {len(revs)} revisions")
    for col in ("name", "stage", "step", "marker", "commit"):
        table.add_column(col)
    for r in revs:
        marker = "end of pretraining" if r.is_final_pretrain else ("end of extension" if r.is_final else "")
        table.add_row(r.name, r.stage, "" if r.step is None else str(r.step), marker, (r.commit or "")[:10])
    _out.print(table)


def main() -> None:
    app()
