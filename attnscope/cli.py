"""The `attnscope` command line (typer + rich)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from attnscope.errors import AttnscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Exact attention statistics for Hugging Face causal LMs, at long context.")
console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _parse_span(span: Optional[str]) -> dict[str, tuple[int, int]]:
    if not span:
        return {}
    try:
        start, end = (int(x) for x in span.split(":"))
    except ValueError:
        raise AttnscopeError(f"bad --span {span!r}: use START:END token indices, END exclusive") from None
    return {"span": (start, end)}


def _dataset_json(ds, token_ids: list[int]) -> dict:
    metrics = {name: ds[name].values.tolist() for name in ds.data_vars}
    return {
        "model": ds.attrs["model"],
        "revision": ds.attrs.get("revision") or None,
        "token_ids": token_ids,
        "layers": [int(v) for v in ds.layer.values],
        "queries": json.loads(ds.attrs["query_positions"]),
        "metrics": metrics,
        "dims": {name: list(ds[name].dims) for name in ds.data_vars},
        "skipped_layers": json.loads(ds.attrs["skipped_layers"]),
    }


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@app.command()
def analyze(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2'"),
    text_file: Path = typer.Option(..., "--text-file", "-f", help="UTF-8 text to analyse"),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)"),
    max_tokens: Optional[int] = typer.Option(None, help="Analyse only the first N tokens"),
    sink_tokens: int = typer.Option(4, help="Tokens counted as the sink (sink_mass)"),
    span: Optional[str] = typer.Option(None, help="START:END token span for span_mass (END exclusive)"),
    queries: str = typer.Option("all", help="all | last:N | strided:N | i,j,k"),
    metrics: str = typer.Option("sink_mass,token0_mass,entropy,mean_distance,position_profile,distance_profile",
                                help="Comma-separated metrics"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow the model's own code to run"),
    out: Optional[Path] = typer.Option(None, help="Write the result to this HDF5 file"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout"),
):
    """Per-layer, per-head attention statistics of MODEL on a text."""
    import attnscope
    from attnscope.store.hdf5 import save_result

    _quiet_transformers()
    try:
        if not text_file.is_file():
            raise AttnscopeError(f"no such text file: {text_file}")
        lm = attnscope.load(model, revision, dtype=dtype, device=device,
                            trust_remote_code=trust_remote_code)
        if lm.tokenizer is None:
            raise AttnscopeError(f"{model} has no tokenizer; save one next to the weights")
        ids = lm.tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"]
        if max_tokens:
            ids = ids[:max_tokens]
        names = tuple(m.strip() for m in metrics.split(",") if m.strip())
        ds = attnscope.analyze(lm, token_ids=ids, metrics=names, queries=queries,
                               sink_tokens=sink_tokens, spans=_parse_span(span) or None)
        if out:
            save_result(ds, out)
    except AttnscopeError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(_dataset_json(ds, ids)) + "\n")
    else:
        _print_summary(ds)
        if out:
            console.print(f"wrote {out}")


def _print_summary(ds, top: int = 10) -> None:
    out = Console()
    table = Table(title=f"{ds.attrs['model']} — {ds.attrs['n_tokens']} tokens, queries {ds.attrs['queries']}")
    table.add_column("layer", justify="right")
    cols = [m for m in ("sink_mass", "token0_mass", "entropy", "mean_distance") if m in ds]
    for m in cols:
        table.add_column(f"mean {m}", justify="right")
    if "sink_mass" in ds:
        table.add_column("strongest sink head", justify="right")
    for layer in ds.layer.values:
        row = [str(int(layer))] + [f"{float(ds[m].sel(layer=layer).mean()):.3f}" for m in cols]
        if "sink_mass" in ds:
            s = ds.sink_mass.sel(layer=layer)
            h = int(s.values.argmax())
            row.append(f"h{h} {float(s[h]):.3f}")
        table.add_row(*row)
    out.print(table)
    if "sink_mass" in ds:
        flat = ds.sink_mass.stack(lh=("layer", "head")).sortby(lambda x: -x)
        strongest = ", ".join(f"L{int(l)}.H{int(h)}={float(v):.3f}"
                              for (l, h), v in zip(flat.lh.values[:top], flat.values[:top]))
        out.print(f"[bold]strongest sink heads[/] (mass on first {ds.attrs['sink_tokens']} tokens): {strongest}")


@app.command()
def demo(
    out: Path = typer.Option(Path("attnscope-demo"), help="Folder for the demo's outputs"),
    tokens: int = typer.Option(2048, help="Tokens of real English prose to analyse"),
):
    """The main job on the embedded model: sinks of SmolLM2 on real English prose."""
    import attnscope
    from attnscope.probing.texts import prose
    from attnscope.report.heatmap import metric_heatmap
    from attnscope.store.hdf5 import save_result

    _quiet_transformers()
    try:
        console.print("loading SmolLM2-135M-Instruct (first run converts the GGUF once, ~40 s)…")
        lm = attnscope.load("smollm2")
        ids = lm.tokenizer(prose())["input_ids"][:tokens]
        console.print(f"analysing {len(ids)} tokens of 'loc_workshop' prose, all 30 layers x 9 heads…")
        ds = attnscope.analyze(lm, token_ids=ids)
        out.mkdir(parents=True, exist_ok=True)
        result = save_result(ds, out / "smollm2_prose.h5")
        command = f"attnscope demo --out {out} --tokens {tokens}"
        png = metric_heatmap(ds, "sink_mass", out / "sink_mass_heatmap.png",
                             title=f"SmolLM2-135M-Instruct: attention on the first 4 tokens "
                                   f"({len(ids)} tokens of prose)",
                             source=f"store: {result}; made by: {command}")
    except AttnscopeError as exc:
        _fail(exc)
    _print_summary(ds)
    Console().print(f"wrote {result} and {png}")


_out = Console(width=None if Console().is_terminal else 160)
_err = console

# (column, header): short headers keep the table readable in 120 columns
_MODEL_COLUMNS = [("name", "name"), ("norm", "norm"), ("qk_norm", "qk norm"), ("kv_heads", "kv"),
                  ("pretrain_ctx", "ctx"), ("swa", "swa"), ("fp8", "fp8"), ("harmful_count", "harm"),
                  ("helmet_64k", "HELMET 64k"), ("ruler_64k", "RULER 64k"), ("longppl", "LongPPL"),
                  ("hf_class", "class"), ("remote_code", "remote")]


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


@app.command("extract")
def extract_cmd(
    models: list[str] = typer.Option(..., "--models", "-m",
                                     help="OlmPool names, a filter like 'qk_norm=none,swa=1', 'all', Hub ids, "
                                          "local folders, .gguf files or 'smollm2' (repeatable, comma-separated)"),
    revisions: list[str] = typer.Option(["final"], "--revisions", "-r",
                                        help="final | pre | post | all | names (comma-separated); "
                                             "'pre,post' = step34000,longcontext-step2385"),
    probes: list[Path] = typer.Option(..., "--probes", "-p", help="probe spec files (repeatable)"),
    out: Path = typer.Option(..., "--out", "-o", help="the HDF5 store (created, or resumed)"),
    executor: str = typer.Option("local", help="local | ray"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (default: local Ray)"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    retries: int = typer.Option(1, help="retries of a failing task (and of a failing load)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, what is done, a cost estimate"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow the models' own code to run"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Measure probes on models x revisions into one resumable HDF5 store (docs/batch.md).

    Exit code 0: every task has a result; 1: some tasks failed (listed); 2: bad input."""
    from attnscope.batch.extract import describe_plan, extract

    _quiet_transformers()
    try:
        report = extract(models, revisions, [str(p) for p in probes], out, executor=executor,
                         ray_address=ray_address, dtype=dtype, device=device, retries=retries,
                         dry_run=dry_run, trust_remote_code=trust_remote_code, progress=progress)
    except AttnscopeError as exc:
        _fail(exc)
    if dry_run:
        for line in describe_plan(report):
            _out.print(line, highlight=False)
        return
    _out.print(f"{report.succeeded} task(s) measured, {report.already_done} already in the store, "
               f"{len(report.failures)} failed; store {report.store} ({report.elapsed_s:.0f} s)", highlight=False)
    if report.failures:
        table = Table(title=f"{len(report.failures)} failed task(s) (tracebacks: attnscope.open_store(...).failure(key))")
        for col in ("task", "key", "attempts", "error"):
            table.add_column(col)
        for f in report.failures:
            table.add_row(f.label, f.key, str(f.attempts), f.error[:300])
        _out.print(table)
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
