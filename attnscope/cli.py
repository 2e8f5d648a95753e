"""The `attnscope` command line (typer + rich)."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attnscope.errors import AttnscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Exact attention statistics for Hugging Face causal LMs, at long context.")
console = Console(stderr=True)


def _stderr_line(kind: str, style: str, message) -> None:
    """One line on stderr: plain text when stderr is not a terminal (rich would wrap it at 80
    columns), coloured on a terminal (soft-wrapped: still one line)."""
    from attnscope.validate import one_line

    text = one_line(message)
    if sys.stderr.isatty():
        console.print(f"[{style}]{kind}:[/] {escape(text)}", soft_wrap=True, highlight=False)
    else:
        sys.stderr.write(f"{kind}: {text}\n")
        sys.stderr.flush()


def _error_line(message) -> None:
    _stderr_line("error", "bold red", message)


# Off a terminal (a pipe, `> file`) nothing is wrapped or cut: rich would otherwise lay tables and
# text out for 80 columns, breaking markdown rows and truncating column names.
_UNLIMITED_WIDTH = 1_000_000


def _stdout() -> Console:
    """A console for stdout: the terminal's width on a terminal, unlimited width elsewhere."""
    out = Console()
    return out if out.is_terminal else Console(width=_UNLIMITED_WIDTH)


def _warning_line(message) -> None:
    """For something the user should know on a run that goes on (exit 0)."""
    _stderr_line("warning", "bold yellow", message)


def _version(value: bool) -> None:
    if value:
        import attnscope

        typer.echo(f"attnscope {attnscope.__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit")) -> None:
    """Exact attention statistics for Hugging Face causal LMs, at long context."""


def _quiet(quiet: bool) -> None:
    """--quiet: no progress bars (automatic bars appear only on a terminal or in a notebook)."""
    from attnscope import progress

    progress.set_default(False if quiet else None)


_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or status lines")
_MODEL_HELP = "'smollm2', an OlmPool name or unique prefix, a Hub id, a local folder or a .gguf file"


def _fail(exc: Exception) -> None:
    _error_line(exc)
    raise typer.Exit(2)


def _parse_span(span: Optional[str]) -> dict[str, tuple[int, int]]:
    if not span:
        return {}
    if "=" in span or "," in span:  # named spans: NAME=START:END[,NAME=START:END...]
        from attnscope.metrics.span_to_span import parse_spans

        return parse_spans(span, "--span")
    try:
        start, end = (int(x) for x in span.split(":"))
    except ValueError:
        raise AttnscopeError(f"bad --span {span!r}: use START:END token indices, END exclusive") from None
    if not 0 <= start < end:
        raise AttnscopeError(f"bad --span {span!r}: need 0 <= START < END (token indices, END exclusive)")
    return {"span": (start, end)}


def _json_values(values: np.ndarray):
    """Nested lists, NaN (an empty query bin) as null: strict JSON has no NaN."""
    if values.dtype.kind == "f":
        return np.where(np.isnan(values), None, values.astype(object)).tolist()
    return values.tolist()


def _dataset_json(ds, token_ids: list[int]) -> dict:
    metrics = {name: _json_values(ds[name].values) for name in ds.data_vars}
    extra = {"query_bins": ds.query_bin.values.tolist()} if "query_bin" in ds.coords else {}
    return {**extra,
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
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    text_file: Path = typer.Option(..., "--text-file", "-f", help="UTF-8 text to analyse"),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)"),
    max_tokens: Optional[int] = typer.Option(None, help="Analyse only the first N tokens"),
    sink_tokens: int = typer.Option(4, help="Tokens counted as the sink (sink_mass)"),
    span: Optional[str] = typer.Option(None, help="START:END token span for span_mass (END exclusive), or "
                                       "named spans NAME=START:END[,NAME=START:END]"),
    queries: str = typer.Option("all", help="all | last:N | strided:N | i,j,k"),
    metrics: str = typer.Option("sink_mass,token0_mass,entropy,mean_distance,position_profile",
                                help="Comma-separated metrics"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow the model's own code to run"),
    ablate: Optional[str] = typer.Option(None, "--ablate",
                                         help="attention edit: window:W[,sinks:K], nosink:K, [,layers:0-3+9]"),
    # a string, not a Path: `--out newdir/` must keep its slash to be refused as a folder
    out: Optional[str] = typer.Option(None, help="Write the result to this HDF5 file (.h5)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file (never a batch store)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout"),
    query_bins: Optional[int] = typer.Option(None, "--query-bins",
                                             help="Also report every metric per N bins of query position"),
    kernel: str = typer.Option("auto", help="auto | flex | cpu_flash | grouped | reference"),
    row_pass: str = typer.Option("auto", "--row-pass", help="auto | features | chunked"),
    received: bool = typer.Option(False, "--received", help="attention received by every key (layer, head, key)"),
    received_top: Optional[int] = typer.Option(None, "--received-top",
                                               help="the K keys per head that receive most + key-position bins"),
    received_pass: str = typer.Option("auto", "--received-pass", help="auto | chunked | swapped"),
    query_span: Optional[str] = typer.Option(None, "--query-span",
                                             help="NAME=START:END[,...] query spans: span_to_span to each --span"),
    quiet: bool = _QUIET,
):
    """Per-layer, per-head attention statistics of MODEL on a text."""
    import attnscope
    from attnscope.metrics.flow import check_cli_inputs, check_cli_options
    from attnscope.store.hdf5 import write_result
    from attnscope.validate import has_utf8_bom, text_prefixes

    _quiet_transformers()
    _quiet(quiet)
    try:  # every input is checked before the model loads (docs/refusals.md)
        names, edit, spans = _check_analysis_options(metrics, queries, span, ablate, max_tokens, sink_tokens,
                                                     dtype, device, query_bins, kernel, row_pass)
        names, flow_kwargs = check_cli_options(names, received, received_top, received_pass, query_span, spans)
        real_out = _check_out_file(out, overwrite)
        prefixes = text_prefixes(text_file)
        first = next(prefixes)  # the file's own problems (missing, binary, not UTF-8) come first
        ids = _preflight_tokens(model, revision, trust_remote_code, itertools.chain([first], prefixes), max_tokens,
                                sink_tokens, spans, edit, queries, query_bins, names)
        prefixes.close()  # what is left of the file is never read
        check_cli_inputs(flow_kwargs, len(ids))
        lm = attnscope.load(model, revision, dtype=dtype, device=device,
                            trust_remote_code=trust_remote_code)
        _apply_edit(lm.model, edit)  # recorded in the result as attrs["attention_edit"]
        ds = attnscope.analyze(lm, token_ids=ids, metrics=names, queries=queries,
                               sink_tokens=sink_tokens, spans=spans or None,
                               query_bins=query_bins, kernel=kernel, row_pass=row_pass, **flow_kwargs)
        # a byte order mark is not text: it was stripped before tokenising (else tokens 0-2, the sink)
        ds.attrs["text_bom_stripped"] = has_utf8_bom(text_file)
        if real_out:  # checked before the compute; a file that appeared meanwhile keeps us from it
            write_result(ds, real_out, overwrite=overwrite)
    except AttnscopeError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(_dataset_json(ds, ids)) + "\n")
    else:
        _print_summary(ds)
        if out:
            console.print(f"wrote {out}", highlight=False)


# -- checks run before any model loads (attnscope.validate has the rules; docs/refusals.md) ---------
def _check_analysis_options(metrics, queries, span, ablate, max_tokens, sink_tokens, dtype, device,
                            query_bins=None, kernel="auto", row_pass="auto"):
    """(metric names, attention edit, spans) from the analyze options, each checked."""
    from attnscope.capture.kernels import FORCEABLE
    from attnscope.capture.queries import QuerySelection
    from attnscope.metrics.reductions import ALL_METRICS, ROW_PASSES
    from attnscope.models.loading import _parse_dtype
    from attnscope.tokens.ablate import parse_ablation
    from attnscope.validate import check_count, check_device, check_metrics

    names = check_metrics((m.strip() for m in metrics.split(",") if m.strip()), ALL_METRICS)
    if "span_mass" in names and not span:
        raise AttnscopeError("--metrics span_mass needs --span START:END (token indices, END exclusive)")
    check_count("--max-tokens", max_tokens)
    check_count("--sink-tokens", sink_tokens, none_ok=False)
    check_count("--query-bins", query_bins)
    if kernel != "auto" and kernel not in FORCEABLE:
        raise AttnscopeError(f"unknown --kernel {kernel!r}; choose auto or one of {', '.join(FORCEABLE)}")
    if row_pass not in ROW_PASSES:
        raise AttnscopeError(f"--row-pass must be one of {', '.join(ROW_PASSES)}, not {row_pass!r}")
    QuerySelection.parse(queries)
    _parse_dtype(dtype)
    check_device(device)
    return names, parse_ablation(ablate) if ablate else None, _parse_span(span)


def _check_out_file(out, overwrite: bool, **kind) -> Optional[Path]:
    """--out checked before anything loads; `kind`: suffixes= and kind= of a non-HDF5 output."""
    from attnscope.store.files import check_output_file

    return None if out is None else check_output_file(out, overwrite=overwrite, **kind)


def _check_out_dir(out: Path, overwrite: bool) -> Path:
    from attnscope.store.files import check_output_dir

    return check_output_dir(out, overwrite=overwrite)


def _read_text(path: Path) -> str:
    from attnscope.validate import read_text_file

    return read_text_file(path, "text file")


def _limits(model: str, revision, trust_remote_code: bool) -> dict:
    """The model's layers and context from its config (no weights loaded)."""
    from attnscope.models.loading import model_limits

    return model_limits(model, revision, trust_remote_code=trust_remote_code)


def _preflight_tokens(model, revision, trust_remote_code, prefixes, max_tokens, sink_tokens, spans, edit,
                      queries="all", query_bins=None, metrics=()) -> list[int]:
    """Tokenize with the model's tokenizer alone (reading the text only as far as --max-tokens or
    the context needs) and check everything that depends on the model's shape or the input's
    length, before the weights load. Messages name the command's flags."""
    from attnscope.capture.queries import QuerySelection
    from attnscope.errors import InputTooLongError, MemoryGuardError
    from attnscope.metrics.analyze import PATTERN_LIMIT_BYTES, read_tokens
    from attnscope.models.loading import load_tokenizer
    from attnscope.validate import check_edit_layers, check_sink_tokens

    limits = _limits(model, revision, trust_remote_code)
    if edit is not None and limits.get("n_layers"):
        check_edit_layers(edit.layers, int(limits["n_layers"]), "--ablate")
    try:
        tokenizer = load_tokenizer(model, revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise AttnscopeError(f"{model} has no usable tokenizer ({type(exc).__name__}); save one next to "
                             "the weights") from None
    ctx = limits.get("max_positions")
    ids, whole = read_tokens(tokenizer, prefixes, max_tokens if max_tokens is not None else ctx)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    elif ctx and len(ids) > ctx:
        many = f"{len(ids)} tokens" if whole else f"more than {ctx} tokens (read as far as that)"
        raise InputTooLongError(f"the input has {many} but {model} has a context of {ctx}; pass "
                                f"--max-tokens {ctx} to analyse its first {ctx} tokens")
    check_sink_tokens(sink_tokens, len(ids), flag="--sink-tokens")
    if ctx and len(ids) > ctx:
        raise InputTooLongError(f"--max-tokens {max_tokens} is more than {model}'s context of {ctx} tokens; "
                                f"pass --max-tokens {ctx} or fewer")
    for name, (s0, s1) in spans.items():
        if s1 > len(ids):
            raise AttnscopeError(f"--span {s0}:{s1} is not inside the {len(ids)}-token input")
    selection = QuerySelection.parse(queries)
    if selection.mode in ("all", "strided") and selection.min_position >= len(ids):
        raise AttnscopeError(f"the input has {len(ids)} tokens but --queries {queries} starts at position "
                             f"{selection.min_position} (earlier queries see too few keys to average); use a "
                             "longer text, --queries last:N or explicit positions (--queries 3,5,8)")
    selected = selection.resolve(len(ids))
    if query_bins is not None and query_bins > int(selected[-1]) + 1 - int(selected[0]):
        raise AttnscopeError(f"--query-bins {query_bins} is more than the {int(selected[-1]) + 1 - int(selected[0])} "
                             f"query positions [{int(selected[0])}, {int(selected[-1]) + 1}); use fewer bins or a "
                             "longer text")
    heads, layers = limits.get("n_heads"), limits.get("n_layers")
    if "pattern" in metrics and heads and layers:
        size = 4 * int(heads) * int(layers) * len(ids) ** 2
        if size > PATTERN_LIMIT_BYTES:
            raise MemoryGuardError(
                f"--metrics pattern keeps full attention maps: {len(ids)} tokens x {layers} layers x {heads} "
                f"heads need {size / 2**30:.1f} GiB (limit {PATTERN_LIMIT_BYTES / 2**30:.1f} GiB); drop pattern "
                "from --metrics (the others stream) or use a shorter input (--max-tokens)")
    return ids


def _apply_edit(model, edit) -> None:
    from attnscope.tokens.ablate import apply_ablation

    apply_ablation(model, edit)


def _print_summary(ds, top: int = 10) -> None:
    out = _stdout()
    table = Table(title=f"{ds.attrs['model']} — {ds.attrs['n_tokens']} tokens, queries {ds.attrs['queries']}")
    table.add_column("layer", justify="right")
    cols = [m for m in ("sink_mass", "token0_mass", "learned_sink_mass", "span_mass", "entropy", "mean_distance") if m in ds]
    for m in cols:
        table.add_column(f"mean {m}", justify="right")
    if "sink_mass" in ds:
        table.add_column("strongest sink head", justify="right")
    for layer in ds.layer.values:  # span_mass: the mean over heads and over the spans (CLI: one --span)
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


def _check_demo_tokens(tokens: int, context: Optional[int]) -> None:
    if context and tokens > context:
        raise AttnscopeError(f"--tokens {tokens} is more than SmolLM2's context of {context} tokens; use --tokens "
                             f"{context} or fewer")


@app.command()
def demo(
    out: Path = typer.Option(Path("attnscope-demo"), help="Folder for the demo's outputs"),
    tokens: int = typer.Option(2048, help="Tokens of real English prose to analyse"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into an --out folder that has files "
                                   "(the demo's two files are replaced)"),
    quiet: bool = _QUIET,
):
    """The main job on the embedded model: sinks of SmolLM2 on real English prose."""
    import attnscope
    from attnscope.extras import missing
    from attnscope.probing.texts import prose
    from attnscope.store.files import check_output_file
    from attnscope.store.hdf5 import write_result
    from attnscope.validate import check_count

    _quiet_transformers()
    _quiet(quiet)
    say = (lambda *a: None) if quiet else console.print
    png = None
    try:
        check_count("--tokens", tokens, minimum=32, none_ok=False)
        _check_demo_tokens(tokens, _limits("smollm2", None, False).get("max_positions"))  # known once converted
        _check_out_dir(out, overwrite)
        result = check_output_file(out / "smollm2_prose.h5", overwrite=overwrite, option="the demo's result")
        say("loading SmolLM2-135M-Instruct (first run converts the GGUF once, ~40 s)…")
        lm = attnscope.load("smollm2")
        _check_demo_tokens(tokens, lm.max_positions)
        ids = lm.tokenizer(prose())["input_ids"][:tokens]
        say(f"analysing {len(ids)} tokens of 'loc_workshop' prose, all 30 layers x 9 heads…")
        ds = attnscope.analyze(lm, token_ids=ids)
        out.mkdir(parents=True, exist_ok=True)
        write_result(ds, result, overwrite=overwrite)
        result = out / "smollm2_prose.h5"
        command = f"attnscope demo --out {out} --tokens {tokens}"
        if not missing("plot"):
            from attnscope.report.heatmap import metric_heatmap

            png = metric_heatmap(ds, "sink_mass", out / "sink_mass_heatmap.png",
                                 title=f"SmolLM2-135M-Instruct\nmass on the first 4 tokens\n"
                                       f"({len(ids)} tokens of prose)",
                                 source=f"store: {result}; made by: {command}", overwrite=overwrite)
    except AttnscopeError as exc:
        _fail(exc)
    _print_summary(ds)
    _stdout().print(f"wrote {result}" + (f" and {png}" if png else ""))
    if png is None:
        console.print(escape("no heatmap: matplotlib is not installed (pip install 'attnscope[plot]')"))


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
        _fail(AttnscopeError("choose one of --json and --csv"))
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
    _stdout().print(table)
    _stdout().print(f"[dim]Source: {olmpool.PROVENANCE}[/dim]")


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
    _stdout().print(table)


_STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def _short(value) -> str:
    """A measured/expected value in one table cell."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


@app.command("doctor")
def doctor_cmd(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow the model's own code to run"),
    as_name: Optional[str] = typer.Option(None, "--as",
                                          help="compare with this OlmPool registry row (for local copies)"),
    text_file: Optional[Path] = typer.Option(None, "--text-file", "-f",
                                             help="UTF-8 text for the loss check (default: shipped prose)"),
    max_loss: float = typer.Option(8.0, help="loss (nats/token) above which the load counts as broken"),
    reference_loss: Optional[float] = typer.Option(
        None, help="a working model's loss on the same text; then the limit is it + --loss-margin"),
    loss_margin: float = typer.Option(1.0, help="allowed excess over --reference-loss, in nats"),
    loss_tokens: int = typer.Option(512, help="tokens of text to score"),
    fix_rope: bool = typer.Option(True, "--fix-rope/--no-fix-rope",
                                  help="repair a flat rope_theta lost on some layer types at load"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu"),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object"),
) -> None:
    """Check that MODEL runs the architecture its checkpoint declares (exit 1 if a check fails)."""
    import logging

    from attnscope.models.doctor import doctor

    _quiet_transformers()
    logging.getLogger("attnscope").setLevel(logging.ERROR)  # load fixes are in the report itself
    try:
        text = None if text_file is None else _read_text(text_file)
        _limits(model, revision, trust_remote_code)  # name, revision and remote code, before the load
        report = doctor(model, revision, trust_remote_code=trust_remote_code, text=text,
                        as_name=as_name, fix_rope=fix_rope, max_loss=max_loss,
                        reference_loss=reference_loss, loss_margin=loss_margin,
                        loss_tokens=loss_tokens, dtype=dtype, device=device)
    except AttnscopeError as exc:
        _fail(exc)
    if as_json:
        typer.echo(report.to_json())
    else:
        rev = f"@{report.revision}" if report.revision else ""
        reg = f", registry row {report.registry_name}" if report.registry_name else ""
        table = Table(title=f"attnscope doctor: {report.model}{rev} ({report.model_class}{reg})")
        for col in ("check", "scope", "status", "measured", "expected", "explanation"):
            table.add_column(col, overflow="fold")
        for c in report.checks:
            style = _STATUS_STYLE[c.status]
            table.add_row(c.name, c.scope, f"[{style}]{c.status}[/]", _short(c.measured),
                          _short(c.expected), c.explanation)
        _stdout().print(table)
        n = report.counts()
        _stdout().print(f"{n['pass']} passed, {n['warn']} warnings, {n['fail']} failed, {n['skip']} skipped")
        for fix in report.info.get("fixes", []):
            _stdout().print(f"[yellow]load fix:[/] {fix}")
    if not report.ok:
        raise typer.Exit(1)


def _grid_values(s: Optional[str], option: str, kind, what: str) -> Optional[list]:
    """A comma-separated grid option: None (the spec's values) or a non-empty list without repeats."""
    if s is None:
        return None
    try:
        values = [kind(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise AttnscopeError(f"{option} {s!r}: expected comma-separated {what}") from None
    if not values:
        raise AttnscopeError(f"{option} {s!r} names no values; give comma-separated {what}, or leave "
                             f"{option} out for the spec's grid")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise AttnscopeError(f"{option} {s!r} repeats {', '.join(f'{v:g}' for v in repeated)}: each grid point "
                             "would be measured twice; give each value once")
    return values


def _floats(s: Optional[str], option: str = "--depths") -> Optional[list[float]]:
    return _grid_values(s, option, float, "numbers")


def _ints(s: Optional[str], option: str = "--lengths") -> Optional[list[int]]:
    return _grid_values(s, option, int, "integers")


def _check_grid(ps, lengths, depths, seeds, max_context) -> None:
    """A probe grid's values, checked before any model loads."""
    from attnscope.probing.builder import check_grid

    check_grid(ps, lengths, depths, seeds, max_context)


@app.command("probe")
def probe_cmd(
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    spec: str = typer.Option(..., "--spec", help="a shipped probe's name (`attnscope probes`) or a spec TOML file"),
    out: str = typer.Option(..., "--out", "-o", help="HDF5 file for the result (.h5)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file (never a batch store)"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    lengths: Optional[str] = typer.Option(None, help="comma-separated lengths in tokens (default: the spec's grid)"),
    depths: Optional[str] = typer.Option(None, help="comma-separated depths in [0, 1] (default: the spec's grid)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default: the spec's)"),
    no_decode: bool = typer.Option(False, "--no-decode", help="skip greedy decoding (no retrieval scores, no correctness)"),
    answer_mode: str = typer.Option("greedy", help="'answer' query set: greedy (the model's own continuation) or teacher_forced"),
    retrieval_count: str = typer.Option("steps", help="retrieval score: steps (Wu et al.'s code) or positions (distinct copied positions)"),
    retrieval_span: str = typer.Option("needle_value", help="retrieval score's span: needle_value or needle (the whole sentence)"),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    quiet: bool = _QUIET,
) -> None:
    """Run a probe's length x depth grid: needle share per layer and head, retrieval heads, answers."""
    import attnscope
    from attnscope.models.loading import _parse_dtype
    from attnscope.probing.needle import ANSWER_MODES, RETRIEVAL_COUNTS, RETRIEVAL_SPANS, run_probe
    from attnscope.probing.spec import load_spec
    from attnscope.store.hdf5 import write_result
    from attnscope.validate import check_device

    _quiet_transformers()
    _quiet(quiet)
    try:  # every input is checked before the model loads (docs/refusals.md)
        for name, value, allowed in (("--answer-mode", answer_mode, ANSWER_MODES),
                                     ("--retrieval-count", retrieval_count, RETRIEVAL_COUNTS),
                                     ("--retrieval-span", retrieval_span, RETRIEVAL_SPANS)):
            if value not in allowed:
                raise AttnscopeError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        ps = load_spec(spec)
        grid = _ints(lengths), _floats(depths), _ints(seeds, "--seeds")
        _parse_dtype(dtype)
        check_device(device)
        real_out = _check_out_file(out, overwrite)
        _check_grid(ps, *grid, _limits(model, revision, trust_remote_code).get("max_positions"))
        lm = attnscope.load(model, revision, dtype=dtype, device=device,
                            trust_remote_code=trust_remote_code)
        ds = run_probe(lm, ps, lengths=grid[0], depths=grid[1], seeds=grid[2], decode=not no_decode,
                       answer_mode=answer_mode, retrieval_count=retrieval_count,
                       retrieval_span=retrieval_span)
        write_result(ds, real_out, overwrite=overwrite)  # a file that appeared meanwhile keeps us from it
    except AttnscopeError as exc:
        _fail(exc)
    table = Table(title=f"{ds.attrs['probe']} on {ds.attrs['model']}")
    for col in ("length", "depth", "seed", "answer ok", "top needle head (final query)", "share / uniform"):
        table.add_column(col)
    if "needle_share" in ds:
        share = ds.needle_share.sel(query_set="final", span="needle_value")
        uniform = ds.uniform_share.sel(query_set="final", span="needle_value")
        for L in ds.length.values:
            for d in ds.depth.values:
                for s in ds.seed.values:
                    cell = share.sel(length=L, depth=d, seed=s)
                    flat = int(np.nanargmax(cell.values))
                    li, hi = np.unravel_index(flat, cell.shape)
                    ok = bool(ds.correct.sel(length=L, depth=d, seed=s)) if "correct" in ds else None
                    table.add_row(str(L), f"{d:g}", str(s), "-" if ok is None else ("yes" if ok else "no"),
                                  f"L{int(cell.layer[li])}.H{hi} {float(cell.values[li, hi]):.3f}",
                                  f"{float(cell.values[li, hi]) / float(uniform.sel(length=L, depth=d, seed=s)):.1f}x")
    _stdout().print(table)
    _stdout().print(f"wrote {out}")


@app.command("probe-build")
def probe_build(
    spec: str = typer.Option(..., "--spec", help="a shipped probe's name (`attnscope probes`) or a spec TOML file"),
    tokenizer: str = typer.Option(..., "--tokenizer", "--model-tokenizer",
                                  help="a model name (as for --model) or a tokenizer.json"),
    lengths: Optional[str] = typer.Option(None, help="comma-separated lengths in tokens (default: the spec's grid)"),
    depths: Optional[str] = typer.Option(None, help="comma-separated depths in [0, 1] (default: the spec's grid)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default: the spec's)"),
    max_context: Optional[int] = typer.Option(None, help="refuse lengths above this (default: the tokenizer's model_max_length)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (one object per prompt) instead of a table"),
    with_text: bool = typer.Option(False, "--text", help="include the prompt text in the JSON"),
) -> None:
    """Build a probe's prompts and print their metadata (lengths, depths, spans, answers)."""
    from attnscope.models.loading import load_tokenizer
    from attnscope.probing.builder import build_prompts
    from attnscope.probing.spec import load_spec

    try:
        ps = load_spec(spec)
        grid = _ints(lengths), _floats(depths), _ints(seeds, "--seeds")
        tk = load_tokenizer(tokenizer)
        if max_context is None and not tokenizer.endswith(".json"):
            # a model's tokenizer often declares no length: the model's config does
            max_context = _limits(tokenizer, None, False).get("max_positions")
        _check_grid(ps, *grid, max_context)
        prompts = build_prompts(ps, tk, lengths=grid[0], depths=grid[1], seeds=grid[2], max_context=max_context)
    except (AttnscopeError, ValueError) as exc:
        _fail(exc)
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
    _stdout().print(table)


@app.command("probes")
def probes_cmd(
    as_json: bool = typer.Option(False, "--json", help="print JSON records"),
) -> None:
    """List the probe specs shipped with attnscope (use a name wherever a spec is accepted)."""
    from attnscope.probing.catalog import list_probes

    try:
        infos = list_probes()
    except AttnscopeError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps([{"name": p.name, "task": p.task, "lengths": list(p.lengths),
                                "depths": list(p.depths), "seeds": list(p.seeds),
                                "description": p.description, "path": p.path} for p in infos], indent=1))
        return
    table = Table(title=f"{len(infos)} shipped probes (attnscope probe --spec NAME; extract --probes NAME)")
    for col in ("name", "task", "grid", "description"):
        table.add_column(col, overflow="fold", no_wrap=col == "name")
    for p in infos:
        table.add_row(p.name, p.task, p.grid, p.description)
    _stdout().print(table)


def _tokenizer_only(name: str):
    """A model's tokenizer, without its weights (for checks before the load)."""
    from attnscope.models.loading import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError, TypeError) as exc:
        raise AttnscopeError(f"{name} has no usable tokenizer ({type(exc).__name__}); save one next to "
                             "the weights") from None


def _load_model(name: str):
    """(model, tokenizer) through attnscope.load."""
    import attnscope

    lm = attnscope.load(name)
    return lm.model, lm.tokenizer


@app.command()
def tokens(
    model_a: str = typer.Option(..., "--model-a", help="model A (the reference): " + _MODEL_HELP),
    model_b: Optional[str] = typer.Option(None, "--model-b", help="model B; default: model A (use with --ablate-b)"),
    corpus: Path = typer.Option(..., "--corpus", help=".jsonl (text[, id, kind]), a text file, or a folder of files"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    ablate_b: Optional[str] = typer.Option(None, "--ablate-b",
                                           help="attention edit for B: window:W[,sinks:K] or nosink:K [,layers:0-3+9]"),
    far: Optional[int] = typer.Option(None, help="split repeats at this distance (default: the --ablate-b window)"),
    window: int = typer.Option(2048, help="tokens per scoring window"),
    min_context: int = typer.Option(512, help="left context every token after the first window gets"),
    batch_size: int = typer.Option(4, help="windows per forward pass"),
    tagger: str = typer.Option("auto", help="POS tagger: auto, perceptron or lexicon"),
    min_repeat: int = typer.Option(4, help="repeat length (tokens) from which a token counts as repeated"),
    n_boot: int = typer.Option(1000, help="bootstrap replicates"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    max_docs: Optional[int] = typer.Option(None, help="use only the first N documents"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into an --out folder that has files "
                                   "(files of the same names are replaced)"),
    quiet: bool = _QUIET,
):
    """Compare two models token by token: gap = loss_A - loss_B (> 0: B better), by token category."""
    from attnscope.extras import require
    from attnscope.tokens import parse_ablation, read_corpus, run_study
    from attnscope.tokens.study import check_documents, check_scorable
    from attnscope.validate import check_count, check_edit_layers

    _quiet(quiet)
    try:  # every input is checked before a model loads (docs/refusals.md)
        require("attnscope tokens (regressions and figures)", "stats", "plot")
        spec = parse_ablation(ablate_b) if ablate_b else None
        for name, value in (("--window", window), ("--min-context", min_context), ("--batch-size", batch_size),
                            ("--min-repeat", min_repeat), ("--n-boot", n_boot), ("--far", far),
                            ("--max-docs", max_docs)):
            check_count(name, value, none_ok=name in ("--far", "--max-docs"))
        _quiet_transformers()
        out = _check_out_dir(out, overwrite)
        docs, kinds = read_corpus(corpus)
        if max_docs is not None:
            docs = dict(list(docs.items())[:max_docs])
        source = f"--corpus {corpus}" + (f" (first {max_docs})" if max_docs is not None else "")
        check_documents(docs, source)
        check_scorable(docs, _tokenizer_only(model_a), source)  # the tokenizer alone, before any model loads
        for m in (model_a, model_b or model_a):
            n_layers = _limits(m, None, False).get("n_layers")
            if spec is not None and n_layers:
                check_edit_layers(spec.layers, int(n_layers), f"--ablate-b (model {m})")
        if not quiet:
            console.print(f"[bold]corpus[/] {corpus}: {len(docs)} documents")
        ma, ta = _load_model(model_a)
        if model_b is None or model_b == model_a:
            # B = A: run_study scores A, then sets the edit on the same model (no weight copy)
            mb, tb = ma, ta
            if spec is None:
                _warning_line("model B is model A with no edit: every gap will be 0")
        else:
            mb, tb = _load_model(model_b)
        label_a = Path(model_a).name if Path(model_a).exists() else model_a
        label_b = (label_a if model_b is None else (Path(model_b).name if Path(model_b).exists() else model_b))
        paths = run_study(ma, mb, ta, tb if tb is not ta else None, docs, out, kinds=kinds, ablate_b=spec,
                          far=far, label_a=label_a, label_b=label_b, window=window, min_context=min_context,
                          batch_size=batch_size, tagger=tagger, min_repeat=min_repeat, n_boot=n_boot, seed=seed,
                          overwrite=overwrite)
    except AttnscopeError as e:
        _fail(e)
    for name, p in paths.items():
        _stdout().print(f"  {name}: {p}")


def _command_line(name: str, **options) -> str:
    """The command that rebuilds an output, from the options in effect (for figure metadata and
    report headers); options at None/False are left out, True ones become bare flags."""
    import shlex

    parts = ["attnscope", name]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


@app.command("report")
def report_cmd(
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="batch store (.h5) to report on"),
    out: Path = typer.Option(Path("attnscope-report"), "--out", help="output folder"),
    score: str = typer.Option("helmet_32k", help="score to explain: helmet_8k..64k, ruler_4k..64k, longppl"),
    registry_only: bool = typer.Option(False, "--registry-only", help="architecture-only analyses from the "
                                       "OlmPool registry; no store needed"),
    revision: str = typer.Option("final", help="revision per model to correlate: 'final' (longcontext-step2385, "
                                 "else the latest) or a revision name"),
    probe: Optional[str] = typer.Option(None, help="use only this probe's tasks (default: mean over probes)"),
    as_json: bool = typer.Option(False, "--json", help="print the statistics as JSON on stdout"),
    no_html: bool = typer.Option(False, "--no-html", help="skip the HTML page"),
    n_resamples: int = typer.Option(9999, help="bootstrap resamples for correlation CIs"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into an --out folder that has files "
                                   "(the report's files are replaced)"),
):
    """Statistics (OLS, LOO R², correlations with bootstrap CIs) as markdown, CSV, JSON and one HTML page."""
    from attnscope.report.html import write_report

    if store is None and not registry_only:
        _fail(AttnscopeError("give --store PATH, or --registry-only for the architecture-only analyses"))
    try:
        from attnscope.extras import require

        from attnscope.validate import check_count

        check_count("--n-resamples", n_resamples, none_ok=False)
        check_count("--seed", seed, minimum=0, none_ok=False)
        require("attnscope report", "stats", "plot")
        _check_out_dir(out, overwrite)
        command = _command_line("report", store=None if registry_only else store, out=out, score=score,
                                registry_only=registry_only, revision=None if revision == "final" else revision,
                                probe=probe, n_resamples=None if n_resamples == 9999 else n_resamples,
                                seed=seed or None)
        paths = write_report(None if registry_only else store, out, score=score, revision=revision, probe=probe,
                             command=command, n_resamples=n_resamples, seed=seed, html_page=not no_html,
                             overwrite=overwrite)
    except AttnscopeError as e:
        _fail(e)
    if as_json:
        typer.echo(paths["json"].read_text(encoding="utf-8"))
    else:
        # plain text: markdown stays markdown (rich would wrap its table rows at the console's width)
        typer.echo(paths["markdown"].read_text(encoding="utf-8").split("## Models")[0])
        for name, p in paths.items():
            console.print(f"  {name}: {p}")


@app.command("figures")
def figures_cmd(
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="batch store (.h5)"),
    out: Path = typer.Option(Path("attnscope-figures"), "--out", help="output folder"),
    score: str = typer.Option("helmet_32k", help="score on the y axis of the score figures"),
    registry_only: bool = typer.Option(False, "--registry-only", help="only the figures the registry alone allows"),
    only: Optional[str] = typer.Option(None, help="comma-separated figure names (default: all)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into an --out folder that has files "
                                   "(figures of the same names are replaced)"),
):
    """Every paper figure as PDF + PNG with a JSON sidecar (store and command in the metadata)."""
    if store is None and not registry_only:
        _fail(AttnscopeError("give --store PATH, or --registry-only for the registry-only figures"))
    names = [n.strip() for n in only.split(",")] if only else None
    try:
        from attnscope.extras import require

        require("attnscope figures", "plot", "stats")
        from attnscope.report.figures import FIGURES, make_all

        if names:
            unknown = [n for n in names if n not in FIGURES]
            if unknown:
                raise AttnscopeError(f"unknown figure(s) {unknown}; figures: {', '.join(FIGURES)}")
        results = make_all(None if registry_only else store, out, score=score,
                           command=_command_line("figures", store=None if registry_only else store, out=out,
                                                     score=score, registry_only=registry_only, only=only),
                           names=names, overwrite=overwrite)
    except AttnscopeError as e:
        _fail(e)
    for name, r in results.items():
        if isinstance(r, str):
            console.print(f"  [yellow]{name}[/]: {r}")
        else:
            console.print(f"  [green]{name}[/]: " + ", ".join(p.name for p in r if p.suffix == ".png"))


@app.command("extract")
def extract_cmd(
    models: list[str] = typer.Option(..., "--models", "-m",
                                     help="OlmPool names, a filter like 'qk_norm=none,swa=1', 'all', Hub ids, "
                                          "local folders, .gguf files or 'smollm2' (repeatable, comma-separated)"),
    revisions: list[str] = typer.Option(["final"], "--revisions", "-r",
                                        help="final | pre | post | all | names (comma-separated); "
                                             "'pre,post' = step34000,longcontext-step2385"),
    probes: list[str] = typer.Option(..., "--probes", "-p",
                                     help="shipped probe names (`attnscope probes`) or spec files (repeatable)"),
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
    query_bins: Optional[int] = typer.Option(None, "--query-bins", help="natural-text tasks also record "
                                             "every metric per bin of query position (N bins)"),
    received_top: Optional[int] = typer.Option(None, "--received-top", help="natural-text tasks also record the "
                                               "K keys per head that receive most attention + key-position bins"),
) -> None:
    """Measure probes on models x revisions into one resumable HDF5 store (docs/batch.md).

    Exit code 0: every task has a result; 1: some tasks failed (listed); 2: bad input."""
    from attnscope.batch.extract import ExtractInterrupted, describe_plan, extract, group_failures, interrupted_message

    _quiet_transformers()
    try:
        report = extract(models, revisions, list(probes), out, executor=executor,
                         ray_address=ray_address, dtype=dtype, device=device, retries=retries,
                         dry_run=dry_run, trust_remote_code=trust_remote_code, progress=progress,
                         query_bins=query_bins, received_top=received_top)
    except AttnscopeError as exc:
        _fail(exc)
    except ExtractInterrupted as stop:  # Ctrl-C: say what is safe and how to resume
        _error_line(interrupted_message(stop.report))
        raise typer.Exit(130) from None
    if dry_run:
        for line in describe_plan(report):
            _stdout().print(line, highlight=False, soft_wrap=True)
        return
    if report.corrupt:  # the run went on: a warning, not an error
        _warning_line(f"{len(report.corrupt)} stored task(s) failed their checksums and were moved aside (nothing "
                    f"deleted: /quarantine in the store, *.corrupt in {report.store.name}.d/) and measured again: "
                    + ", ".join(report.corrupt))
    for note in report.plan.notes:
        _stdout().print(f"note: {note}", highlight=False, soft_wrap=True)
    _stdout().print(f"{report.succeeded} task(s) measured, {report.already_done} already in the store, "
               f"{len(report.failures)} failed; store {report.store} ({report.elapsed_s:.0f} s)", highlight=False)
    if report.failures:
        groups = group_failures(report.failures)
        table = Table(title=f"{len(report.failures)} failed task(s), {len(groups)} distinct cause(s) "
                            "(tracebacks: attnscope.open_store(...).failure(key))")
        for col in ("cause", "tasks", "checkpoints", "first task (key)"):
            table.add_column(col, overflow="fold")
        for g in groups:
            cps = g.checkpoints
            shown = ", ".join(cps[:3]) + (f" +{len(cps) - 3} more" if len(cps) > 3 else "")
            table.add_row(g.cause[:300], str(len(g.tasks)), shown, f"{g.tasks[0].label} ({g.tasks[0].key})")
        _stdout().print(table)
        raise typer.Exit(1)


store_app = typer.Typer(no_args_is_help=True, help="Check and upgrade batch stores (docs/store.md).")
app.add_typer(store_app, name="store")


@store_app.command("verify")
def store_verify(path: Path = typer.Argument(..., help="the batch store (.h5)")) -> None:
    """Read every task back and check its checksums; name each damaged one (exit 1 if any)."""
    from attnscope.store.store import Store

    try:
        report = Store(path).verify()
    except AttnscopeError as exc:
        _fail(exc)
    for line in report.lines():  # one line each: the summary, then every damaged entry
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)


@store_app.command("upgrade")
def store_upgrade(src: Path = typer.Argument(..., help="the store to read (any schema; left unchanged)"),
                  dst: Path = typer.Argument(..., help="the new, checksummed store to write (must not exist)")) -> None:
    """Write a checksummed (schema 2) copy of a store; the original is only read."""
    from attnscope.store.store import upgrade_store

    try:
        n = upgrade_store(src, dst)
    except AttnscopeError as exc:
        _fail(exc)
    _stdout().print(f"wrote {dst}: {n} entries, each read back from {src} and written with checksums", highlight=False)


from attnscope import cli_drill  # noqa: E402,F401  (registers `drill` and `decompose`)


@app.command("policies")
def policies_cmd(
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    text_file: Path = typer.Option(..., "--text-file", "-f", help="UTF-8 text to measure on"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (result .h5 + figure .pdf/.png/.json)"),
    policies: str = typer.Option("streaming,window,static_topk", help="comma-separated: streaming[:S], window, "
                                 "static_topk"),
    budgets: Optional[str] = typer.Option(None, help="cache budgets in tokens, comma-separated (default: powers "
                                          "of two from 16 to half the input)"),
    sink_tokens: int = typer.Option(4, help="sink tokens of `streaming` (StreamingLLM keeps 4)"),
    max_tokens: Optional[int] = typer.Option(None, help="use only the first N tokens"),
    queries: str = typer.Option("all", help="queries the kept mass is averaged over: all | last:N | strided:N"),
    loss: bool = typer.Option(True, "--loss/--no-loss", help="also the loss under each cache (one forward each)"),
    probe: Optional[str] = typer.Option(None, help="a NIAH probe (name or spec file): needle retrieval under each cache"),
    probe_lengths: Optional[str] = typer.Option(None, help="the probe's lengths (default: the spec's grid)"),
    probe_depths: Optional[str] = typer.Option(None, help="the probe's depths (default: the spec's grid)"),
    probe_seeds: Optional[str] = typer.Option(None, help="the probe's seeds (default: the spec's)"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into an --out folder that has files "
                                   "(files of the same names are replaced)"),
    quiet: bool = _QUIET,
) -> None:
    """KV-cache what-ifs: attention mass kept, loss and needle retrieval vs cache budget, per policy (a figure)."""
    import attnscope
    from attnscope.capture.queries import QuerySelection
    from attnscope.metrics.kept import PolicyGrid
    from attnscope.models.loading import _parse_dtype
    from attnscope.policies import default_budgets, policy_figure, run_policies
    from attnscope.store.hdf5 import save_result
    from attnscope.validate import check_count, check_device, text_prefixes

    _quiet_transformers()
    _quiet(quiet)
    try:  # every input is checked before the model loads (docs/refusals.md)
        check_count("--max-tokens", max_tokens)
        check_count("--sink-tokens", sink_tokens, none_ok=False)
        grid_budgets = _ints(budgets, "--budgets")
        PolicyGrid.make(policies, grid_budgets or (sink_tokens + 1,), default_sinks=sink_tokens)  # names
        _parse_dtype(dtype)
        check_device(device)
        QuerySelection.parse(queries)
        probe_grid = _ints(probe_lengths), _floats(probe_depths), _ints(probe_seeds, "--probe-seeds")
        spec = None
        if probe is not None:
            from attnscope.probing.spec import load_spec

            spec = load_spec(probe)
            if spec.task == "natural_text":
                raise AttnscopeError(f"--probe {probe}: a natural-text probe has no needle; use a niah probe")
        out = _check_out_dir(out, overwrite)
        ids = _preflight_tokens(model, revision, trust_remote_code, text_prefixes(text_file), max_tokens,
                                sink_tokens, {}, None, queries)
        grid = PolicyGrid.make(policies, grid_budgets or default_budgets(len(ids)), default_sinks=sink_tokens)
        grid.check(len(ids))
        if spec is not None:
            _check_grid(spec, *probe_grid, _limits(model, revision, trust_remote_code).get("max_positions"))
            grid.check(min(probe_grid[0] or spec.grid.lengths), "the shortest probe prompt")
        lm = attnscope.load(model, revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        ds = run_policies(lm, ids, [p.label for p in grid.policies], grid.budgets, sink_tokens=sink_tokens,
                          queries=queries, loss=loss, probe=spec, probe_lengths=probe_grid[0],
                          probe_depths=probe_grid[1], probe_seeds=probe_grid[2])
        name = Path(model).name if Path(model).exists() else model.replace("/", "_")
        result = save_result(ds, out / f"policies_{name}.h5", overwrite=overwrite)
        command = _command_line("policies", model=model, text_file=text_file, out=out, policies=policies,
                                budgets=budgets, sink_tokens=None if sink_tokens == 4 else sink_tokens,
                                max_tokens=max_tokens, queries=None if queries == "all" else queries,
                                no_loss=not loss, probe=probe, probe_lengths=probe_lengths,
                                probe_depths=probe_depths, probe_seeds=probe_seeds, revision=revision)
        paths = policy_figure(ds, out, stem=f"policies_{name}", command=command, store=str(result))
    except AttnscopeError as exc:
        _fail(exc)
    table = Table(title=f"{ds.attrs['model']}: attention mass kept (mean over layers, heads, queries)"
                        + (", Δ loss (nats)" if "delta_loss" in ds else ""))
    table.add_column("budget", justify="right")
    for p in ds.policy.values:
        table.add_column(str(p), justify="right")
    for b in ds.budget.values:
        cells = []
        for p in ds.policy.values:
            cell = f"{float(ds.kept_mass.sel(policy=p, budget=b).mean()):.3f}"
            if "delta_loss" in ds and np.isfinite(float(ds.delta_loss.sel(policy=p, budget=b))):
                cell += f" / {float(ds.delta_loss.sel(policy=p, budget=b)):+.3f}"
            cells.append(cell)
        table.add_row(str(int(b)), *cells)
    Console().print(table)
    console.print(f"wrote {result} and " + ", ".join(p.name for p in paths))


def main() -> None:
    """The `attnscope` entry point: usage errors (a bad option value, a missing option) are one
    line on stderr with exit 2, like every other refusal."""
    try:  # typer >= 0.20 carries its own copy of click
        from typer._click import exceptions as click_exceptions
    except ImportError:
        from click import exceptions as click_exceptions

    try:
        code = app(standalone_mode=False)
    except click_exceptions.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `attnscope`: the help, as usual
            exc.show()
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _error_line(f"{exc.format_message()}{where}")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
