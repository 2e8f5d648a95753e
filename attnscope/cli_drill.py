"""`attnscope drill` (the drill-down page) and `attnscope decompose` (the score-decomposition
figure), registered on the main CLI app (docs/drilldown.md). Every input is checked before any
model loads: positions against the tokenized input (tokenizer only), layers and heads against the
model's config (no weights), output paths against the --overwrite rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from attnscope.cli import (_MODEL_HELP, _QUIET, _check_out_file, _command_line, _fail, _quiet,
                           _quiet_transformers, _read_text, app)
from attnscope.errors import AttnscopeError
from attnscope.models.loading import model_limits


def _tokens(model, revision, trust_remote_code, text, max_tokens, shape) -> list[int]:
    """The input's token ids from the model's tokenizer alone, checked against its context."""
    from attnscope.errors import InputTooLongError
    from attnscope.models.loading import load_tokenizer

    try:
        tokenizer = load_tokenizer(model, revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise AttnscopeError(f"{model} has no usable tokenizer ({type(exc).__name__}); save one next to "
                             "the weights") from None
    ids = tokenizer(text)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:
        raise AttnscopeError("the text has no tokens")
    ctx = shape.get("max_positions")
    if ctx and len(ids) > ctx:
        raise InputTooLongError(f"the input has {len(ids)} tokens but {model} has a context of {ctx}; pass "
                                f"--max-tokens {ctx} to use its first {ctx} tokens")
    return ids


def _common_checks(dtype: str, device: str, kernel: str, max_tokens) -> None:
    from attnscope.capture.kernels import FORCEABLE
    from attnscope.models.loading import _parse_dtype
    from attnscope.validate import check_count, check_device

    check_count("--max-tokens", max_tokens)
    if kernel != "auto" and kernel not in FORCEABLE:
        raise AttnscopeError(f"unknown --kernel {kernel!r}; choose auto or one of {', '.join(FORCEABLE)}")
    _parse_dtype(dtype)
    check_device(device)


@app.command("drill")
def drill_cmd(
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    text_file: Path = typer.Option(..., "--text-file", "-f", help="UTF-8 text to read"),
    out: Path = typer.Option(..., "--out", "-o", help="the HTML page to write"),
    queries: str = typer.Option("last", help="query positions: 100,200 | 0-3 | last (the last token)"),
    k: int = typer.Option(10, "--k", "-k", help="keys per query, layer and head"),
    layers: Optional[str] = typer.Option(None, help="layers, e.g. 0-3,29 (default: all)"),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)"),
    max_tokens: Optional[int] = typer.Option(None, help="Use only the first N tokens"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu"),
    kernel: str = typer.Option("auto", help="auto | flex | cpu_flash | grouped | reference"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code to run"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file"),
    quiet: bool = _QUIET,
):
    """The exact top-k keys of chosen queries, per layer and head, as one offline HTML page."""
    import attnscope
    from attnscope.metrics.drilldown import check_layer_head, check_positions, check_topk, parse_positions, topk_keys
    from attnscope.report.drilldown import write_drilldown

    _quiet_transformers()
    _quiet(quiet)
    try:  # every input is checked before the model loads (docs/refusals.md)
        check_topk(k, "--k")
        parse_positions(queries, "--queries", n_tokens=1)  # the syntax; the range once tokenized
        layer_list = None if layers is None else parse_positions(layers, "--layers")
        _common_checks(dtype, device, kernel, max_tokens)
        out = _check_out_file(out, overwrite, suffixes=(".html", ".htm"), kind="an HTML page")
        text = _read_text(text_file)
        shape = model_limits(model, revision, trust_remote_code=trust_remote_code)
        check_layer_head(layer_list, None, shape.get("n_layers"), None)
        ids = _tokens(model, revision, trust_remote_code, text, max_tokens, shape)
        qpos = check_positions(parse_positions(queries, "--queries", n_tokens=len(ids)), len(ids))
        lm = attnscope.load(model, revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        ds = topk_keys(lm, token_ids=ids, queries=qpos, k=k, layers=layer_list, kernel=kernel)
        command = _command_line("drill", model=model, text_file=text_file, out=out, queries=queries, k=k,
                                layers=layers, revision=revision, max_tokens=max_tokens,
                                dtype=None if dtype == "float32" else dtype, device=None if device == "cpu" else device)
        path = write_drilldown(ds, out, command=command, overwrite=overwrite)
    except AttnscopeError as exc:
        _fail(exc)
    if not quiet:
        size = Path(path).stat().st_size
        Console(soft_wrap=True).print(f"wrote {path} ({size / 1e6:.2f} MB): top-{k} keys of {len(qpos)} quer"
                        f"{'y' if len(qpos) == 1 else 'ies'} x {ds.sizes['layer']} layers x {ds.sizes['head']} heads "
                        f"over {len(ids)} tokens", highlight=False)


@app.command("decompose")
def decompose_cmd(
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    text_file: Path = typer.Option(..., "--text-file", "-f", help="UTF-8 text to read"),
    layer: int = typer.Option(..., "--layer", help="layer (from 0)"),
    head: int = typer.Option(..., "--head", help="query head (from 0)"),
    out: Path = typer.Option(..., "--out", "-o", help="the figure (.png, .pdf or .svg); a .json sidecar goes beside it"),
    query: Optional[int] = typer.Option(None, "--query", help="query position (default: the last token)"),
    key: int = typer.Option(0, "--key", help="key position (default 0, the usual sink)"),
    rope: str = typer.Option("auto", "--rope", help="auto (read the rotary layout from the layer) | none"),
    share: float = typer.Option(0.8, "--share", help="carriers: the fewest terms holding this share of sum |c|"),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)"),
    max_tokens: Optional[int] = typer.Option(None, help="Use only the first N tokens"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu"),
    kernel: str = typer.Option("auto", help="auto | flex | cpu_flash | grouped | reference"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code to run"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing --out files (figure and sidecar)"),
    as_json: bool = typer.Option(False, "--json", help="print the decomposition as one JSON object"),
    quiet: bool = _QUIET,
):
    """One attention score as an exact sum over head dimensions and rotary pairs, as a figure."""
    import attnscope
    from attnscope.metrics.decompose import ROPE_MODES, decompose_score
    from attnscope.metrics.drilldown import check_layer_head, check_positions
    from attnscope.report.decomposition import sidecar_path, write_decomposition

    _quiet_transformers()
    _quiet(quiet)
    try:  # every input is checked before the model loads (docs/refusals.md)
        from attnscope.extras import require

        require("attnscope decompose (the figure)", "plot")
        if rope not in ROPE_MODES:
            raise AttnscopeError(f"--rope must be one of {', '.join(ROPE_MODES)}, not {rope!r}")
        if not 0 < share <= 1:
            raise AttnscopeError(f"--share must be in (0, 1], got {share}")
        check_layer_head([layer], [head], None, None)
        _common_checks(dtype, device, kernel, max_tokens)
        out = _check_out_file(out, overwrite, suffixes=(".png", ".pdf", ".svg"), kind="a figure")
        _check_out_file(sidecar_path(out), overwrite, suffixes=(".json",), kind="the figure's numbers")
        text = _read_text(text_file)
        shape = model_limits(model, revision, trust_remote_code=trust_remote_code)
        check_layer_head([layer], [head], shape.get("n_layers"), shape.get("n_heads"))
        ids = _tokens(model, revision, trust_remote_code, text, max_tokens, shape)
        q = len(ids) - 1 if query is None else query
        check_positions([q], len(ids), "--query")
        check_positions([key], len(ids), "--key")
        if key > q:
            raise AttnscopeError(f"--key {key} is after --query {q}: a causal model's query never sees later keys")
        lm = attnscope.load(model, revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        dec = decompose_score(lm, token_ids=ids, layer=layer, head=head, query=q, key=key, rope=rope, share=share,
                              kernel=kernel)
        command = _command_line("decompose", model=model, text_file=text_file, layer=layer, head=head, query=query,
                                key=key or None, rope=None if rope == "auto" else rope,
                                share=None if share == 0.8 else share, max_tokens=max_tokens, out=out,
                                dtype=None if dtype == "float32" else dtype)
        paths = write_decomposition(dec, out, command=command, overwrite=overwrite)
    except AttnscopeError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(dec.to_dict()) + "\n")
    if not quiet:
        say = Console(stderr=as_json, soft_wrap=True)
        say.print(f"layer {layer}, head {head}: query {q} {dec.query_token!r} -> key {key} {dec.key_token!r}: "
                  f"score {dec.raw_score:.6g} = sum over {len(dec.per_dim)} dims; P = {dec.prob:.6g}", highlight=False)
        say.print(f"carriers ({dec.share:.0%} of sum |c_d|): dims {dec.carriers.tolist()}", highlight=False)
        if dec.rope is not None and len(dec.rope.pairs):
            pairs = dec.rope.pairs[dec.pair_carriers]
            waves = dec.rope.wavelength[dec.pair_carriers]
            say.print("carrier rotary pairs: " + ", ".join(f"({a},{b}) wavelength {w:.3g} tokens"
                                                           for (a, b), w in zip(pairs, waves)), highlight=False)
        say.print(f"wrote {paths[0]} and {paths[1]}", highlight=False)
