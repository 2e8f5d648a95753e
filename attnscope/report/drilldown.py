"""The drill-down page: one self-contained HTML file (no network, no library) showing the exact
top-k keys of chosen queries per layer and head: layer/head/query pickers, the query's tokens in
context, top-k cards, token search, a sortable row and a layer x head overview.

Its size follows what it shows, never T^2: the token strings of the input (O(T)) plus
|layers| x |heads| x |queries| x k keys and probabilities (docs/drilldown.md has measured sizes).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import xarray as xr

from attnscope.store.files import atomic_output, check_output_file

__all__ = ["drilldown_payload", "render_drilldown", "write_drilldown"]

_TEMPLATE = ("templates", "drilldown.html")


def _floats(a: np.ndarray, digits: int = 8) -> list:
    """Floats with `digits` significant digits (float32 needs 9 for a round trip; 8 is within
    6e-8 relative) - so the page stays small. -inf (no key) becomes null."""
    flat = np.asarray(a, dtype=np.float64).ravel()
    return [None if not np.isfinite(v) else float(f"{v:.{digits}g}") for v in flat]


def drilldown_payload(ds: xr.Dataset, *, command: str = "") -> dict:
    """The page's data from a `topk_keys` Dataset: meta, token strings, flat top-k arrays in
    (layer, head, query, rank) order."""
    keys = ds["key"].transpose("layer", "head", "query", "rank").values
    return {
        "meta": {"model": ds.attrs.get("model", ""), "revision": ds.attrs.get("revision", ""),
                 "n_tokens": int(ds.attrs.get("n_tokens", ds.sizes["position"])), "k": int(ds.sizes["rank"]),
                 "layers": [int(v) for v in ds["layer"].values], "n_heads": int(ds.sizes["head"]),
                 "queries": [int(v) for v in ds["query"].values], "tie_order": ds.attrs.get("tie_order", ""),
                 "command": command, "attnscope_version": ds.attrs.get("attnscope_version", ""),
                 "created": ds.attrs.get("created", "")},
        "tokens": [str(t) for t in ds["token"].values],
        "key": keys.ravel().astype(int).tolist(),
        "prob": _floats(ds["prob"].transpose("layer", "head", "query", "rank").values),
        "logp": _floats(ds["log_prob"].transpose("layer", "head", "query", "rank").values),
        "mass": _floats(ds["row_mass"].transpose("layer", "head", "query").values),
    }


def _script_json(data) -> str:
    """JSON safe inside <script>: no '<' (so no '</script>' or '<!--'), compact."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render_drilldown(ds: xr.Dataset, *, command: str = "") -> str:
    """The whole page as a string."""
    import html

    template = resources.files("attnscope.data").joinpath(*_TEMPLATE).read_text(encoding="utf-8")
    title = f"attnscope drill-down: {ds.attrs.get('model', '')}, {ds.attrs.get('n_tokens', '')} tokens"
    return (template.replace("__ATTNSCOPE_TITLE__", html.escape(title))
            .replace("/*__ATTNSCOPE_DATA__*/", _script_json(drilldown_payload(ds, command=command))))


def write_drilldown(ds: xr.Dataset, path: str | Path, *, command: str = "", overwrite: bool = False) -> Path:
    """Write the page to `path` (atomically); an existing file is replaced only with `overwrite`."""
    real = check_output_file(path, overwrite=overwrite, suffixes=(".html", ".htm"), kind="an HTML page")
    page = render_drilldown(ds, command=command)
    with atomic_output(real, overwrite=overwrite) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)
