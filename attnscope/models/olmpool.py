"""The OlmPool model registry: 26 comparable ~7B models that differ only in architecture.

The table ships as package data (``attnscope/data/olmpool_models.csv``). Its numbers are
third-party transcriptions (see :data:`PROVENANCE`): every DataFrame returned here carries the
provenance in ``df.attrs["provenance"]`` so that whatever shows the numbers can show where
they came from.

Reference: A. Bertsch, L. Soldaini, M. R. Gormley, G. Neubig, H. Hajishirzi, K. Lo,
D. Groeneveld (2026), "Cracks in the Foundation: Seemingly Minor Architectural Choices Impact
Long Context Extension", arXiv 2608.10296 (OpenReview MRXATMdzeC), Appendix A, Tables 1-2.

Harmful-choice count (the paper's four choices that hurt long-context extension), per model::

    harmful_count = has_qk_norm + has_gqa + has_swa + has_short_ctx
    has_qk_norm   = qk_norm != "none"       (layerwise or headwise, either counts)
    has_gqa       = kv_heads < n_heads       (n_heads = 32 query heads in every OlmPool model)
    has_swa       = swa                      (3 sliding-window layers per 1 full layer)
    has_short_ctx = pretrain_ctx == 4096     (4K rather than 8K pretraining context)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import pandas as pd

from attnscope.errors import FilterError, ModelNotFoundError

__all__ = [
    "PROVENANCE",
    "PAPER",
    "HUB_ORG",
    "N_QUERY_HEADS",
    "NAME_QUIRKS",
    "OlmPoolModel",
    "registry",
    "get",
    "find",
    "parse_name",
    "format_name",
]

HUB_ORG = "allenai"
N_QUERY_HEADS = 32  # every OlmPool model has 32 query heads; kv_heads == 32 means plain MHA

PAPER = (
    'Bertsch, Soldaini, Gormley, Neubig, Hajishirzi, Lo, Groeneveld (2026). "Cracks in the '
    "Foundation: Seemingly Minor Architectural Choices Impact Long Context Extension\". "
    "arXiv 2608.10296; OpenReview MRXATMdzeC."
)
PROVENANCE = (
    "Architecture and scores: the paper's Appendix A, Tables 1-2 (" + PAPER + "), as transcribed "
    "by the independent site olmpool.com. Columns hf_class, model_type, n_layers, "
    "config_sliding_window, remote_code: read off the published config.json files by an "
    "independent replication. Both are third-party transcriptions, not the authors' own files."
)

_CSV = "olmpool_models.csv"
_QK = {"none": "none", "lw": "layerwise", "hw": "headwise"}
_QK_TAG = {"layerwise": "LQK", "headwise": "HQK"}
_TAG_QK = {v: k for k, v in _QK_TAG.items()}
# Names round d_ff to "k" units; the widths the suite actually uses.
_DFF_BY_K = {11: 11008, 12: 12288, 13: 13312, 14: 14336}


@dataclass(frozen=True)
class NameQuirk:
    """A Hub name whose fields disagree with the model, or a checkpoint known to be broken."""

    name: str
    name_says: dict
    actual: dict
    note: str


# Explicit, not silent: parse_name reports these in its "quirks" entry, and the docs list them.
NAME_QUIRKS: dict[str, NameQuirk] = {
    q.name: q
    for q in [
        NameQuirk(
            name="K_post_HQK_8kv_12k",
            name_says={"norm": "post", "pretrain_ctx": None},
            actual={"norm": "pre", "pretrain_ctx": 8192},
            note="named 'post' but is a pre-norm qwen3 model (Qwen3ForCausalLM); the name has "
            "no context field (the table gives 8K pretraining).",
        ),
        NameQuirk(
            name="G_post_LQK_8kv_4k_14k_SWA",
            name_says={"norm": "post"},
            actual={"norm": "post", "hf_class": "Olmo3PreorderForCausalLM"},
            note="ships post-norm weights under a pre-norm class (Olmo3PreorderForCausalLM): "
            "plain-text loss around 11.5 nats when loaded as published.",
        ),
        NameQuirk(
            name="H_post_LQK_8kv_4k_11k_SWA",
            name_says={"d_ff": 11008},
            actual={"d_ff": 13312},
            note="the name says d_ff 11k but the transcribed table gives d_ff 13312 (and 7.4B "
            "parameters, like the other 8-KV-head 13k models); unresolved which is right, the "
            "registry keeps the table's value.",
        ),
    ]
}

_NAME_RE = re.compile(
    r"^(?P<init>[A-Z])_(?P<norm>pre|post)(?:_(?P<qk>LQK|HQK))?_(?P<kv>\d+)kv"
    r"(?:_(?P<ctx>\d+)k)?_(?P<dff>\d+)k(?P<swa>_SWA)?(?P<fp8>_fp8)?$"
)

_BOOL_COLS = ("swa", "fp8", "remote_code")
_INT_COLS = ("kv_heads", "pretrain_ctx", "d_ff", "n_layers")


@dataclass(frozen=True)
class OlmPoolModel:
    """One OlmPool model; the fields are the columns of :func:`registry` (NaN = not given)."""

    name: str
    hf_name: str
    init: str
    norm: str
    qk_norm: str
    kv_heads: int
    n_heads: int
    pretrain_ctx: int
    swa: bool
    fp8: bool
    d_ff: int
    params_b: float
    helmet_8k: float
    helmet_16k: float
    helmet_32k: float
    helmet_64k: float
    longppl: float
    ruler_4k: float
    ruler_8k: float
    ruler_16k: float
    ruler_32k: float
    ruler_64k: float
    hf_class: str
    model_type: str
    n_layers: int
    config_sliding_window: float
    remote_code: bool
    native_class: bool
    swa_window_missing: bool
    has_qk_norm: bool
    has_gqa: bool
    has_swa: bool
    has_short_ctx: bool
    harmful_count: int
    quirks: tuple = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _native_model_types(model_types) -> set[str]:
    # model_types the installed transformers implements itself (no repository code needed).
    # Each lives in transformers/models/<model_type>/; looking at the folder avoids importing
    # transformers (and torch) just to print a table.
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return set()
    root = Path(list(spec.submodule_search_locations)[0]) / "models"
    return {t for t in model_types if (root / str(t) / f"modeling_{t}.py").is_file()}


@lru_cache(maxsize=1)
def custom_model_types() -> frozenset[str]:
    """model_types only OlmPool checkpoints use (their repository code; no transformers class):
    the configs whose missing `layer_types` attnscope repairs with the OlmPool window pattern."""
    types = set(_table()["model_type"].dropna().astype(str))
    return frozenset(types - _native_model_types(types))


@lru_cache(maxsize=1)
def _table() -> pd.DataFrame:
    with resources.files("attnscope.data").joinpath(_CSV).open("r", encoding="utf-8") as fh:
        raw = pd.read_csv(fh)
    df = pd.DataFrame()
    df["name"] = raw["hf_name"].str.removeprefix(HUB_ORG + "/")
    df["hf_name"] = raw["hf_name"]
    df["init"] = raw["init"]
    df["norm"] = raw["norm"]
    df["qk_norm"] = raw["qk_norm"].map(_QK)
    if df["qk_norm"].isna().any():
        bad = sorted(set(raw["qk_norm"][df["qk_norm"].isna()]))
        raise ValueError(f"olmpool table: unknown qk_norm codes {bad}")
    df["kv_heads"] = raw["kv_heads"].astype(int)
    df["n_heads"] = N_QUERY_HEADS
    df["pretrain_ctx"] = raw["pretrain_ctx"].astype(int)
    df["swa"] = raw["swa"].astype(int).astype(bool)
    df["fp8"] = raw["fp8"].astype(int).astype(bool)
    df["d_ff"] = raw["d_ff"].astype(int)
    df["params_b"] = raw["params_b"].astype(float)
    for col in ["helmet_8k", "helmet_16k", "helmet_32k", "helmet_64k", "longppl",
                "ruler_4k", "ruler_8k", "ruler_16k", "ruler_32k", "ruler_64k"]:
        df[col] = pd.to_numeric(raw[col], errors="coerce").astype(float)
    df["hf_class"] = raw["hf_class"]
    df["model_type"] = raw["model_type"]
    df["n_layers"] = raw["n_layers"].astype(int)
    df["config_sliding_window"] = pd.to_numeric(raw["config_sliding_window"], errors="coerce").astype(float)
    df["remote_code"] = raw["remote_code"].astype(int).astype(bool)
    # Derived loading facts (not in the paper): whether transformers itself has the class, and
    # SWA models whose published config gives no window (they run full attention as loaded).
    df["native_class"] = df["model_type"].isin(_native_model_types(set(df["model_type"])))
    df["swa_window_missing"] = df["swa"] & df["config_sliding_window"].isna()
    df["has_qk_norm"] = df["qk_norm"] != "none"
    df["has_gqa"] = df["kv_heads"] < df["n_heads"]
    df["has_swa"] = df["swa"]
    df["has_short_ctx"] = df["pretrain_ctx"] == 4096
    df["harmful_count"] = df[["has_qk_norm", "has_gqa", "has_swa", "has_short_ctx"]].sum(axis=1).astype(int)
    df["quirks"] = [tuple([NAME_QUIRKS[n].note] if n in NAME_QUIRKS else []) for n in df["name"]]
    if df["name"].duplicated().any():
        raise ValueError(f"olmpool table: duplicate names {list(df['name'][df['name'].duplicated()])}")
    return df


def _with_provenance(df: pd.DataFrame) -> pd.DataFrame:
    df.attrs["provenance"] = PROVENANCE
    df.attrs["paper"] = PAPER
    df.attrs["harmful_count"] = "has_qk_norm + has_gqa (kv_heads < 32) + has_swa + has_short_ctx (4K pretraining)"
    return df


def registry() -> pd.DataFrame:
    """All 26 OlmPool models, one row each (a fresh copy; missing values are NaN).

    ``df.attrs["provenance"]`` says where the numbers come from.
    """
    return _with_provenance(_table().copy())


def _row_to_model(row: pd.Series) -> OlmPoolModel:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(OlmPoolModel):
        v = row[f.name]
        if f.name in _BOOL_COLS or f.name.startswith("has_") or f.name in ("native_class", "swa_window_missing"):
            v = bool(v)
        elif f.name in _INT_COLS or f.name in ("n_heads", "harmful_count"):
            v = int(v)
        elif isinstance(v, float) or hasattr(v, "dtype"):
            v = v.item() if hasattr(v, "item") else v
        values[f.name] = v
    return OlmPoolModel(**values)


def get(name: str) -> OlmPoolModel:
    """Look a model up by short name, Hub id, or a unique prefix of either (case-insensitive).

    Raises :class:`~attnscope.errors.ModelNotFoundError` naming the close matches.
    """
    df = _table()
    key = str(name).strip()
    short = key.removeprefix(HUB_ORG + "/")
    lower = df["name"].str.lower()
    exact = df[lower == short.lower()]
    if len(exact) == 1:
        return _row_to_model(exact.iloc[0])
    pref = df[lower.str.startswith(short.lower())] if short else df.iloc[0:0]
    if len(pref) == 1:
        return _row_to_model(pref.iloc[0])
    if len(pref) > 1:
        raise ModelNotFoundError(
            f"{name!r} is ambiguous: it is a prefix of {len(pref)} OlmPool models "
            f"({', '.join(pref['name'])}). Give more of the name."
        )
    close = difflib.get_close_matches(short, list(df["name"]), n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ModelNotFoundError(
        f"{name!r} is not an OlmPool model.{hint} List them with `attnscope models` "
        f"or attnscope.models.olmpool.registry()."
    )


_OPS = {
    "=": lambda s, v: s == v,
    "==": lambda s, v: s == v,
    "!=": lambda s, v: s != v,
    "<": lambda s, v: s < v,
    "<=": lambda s, v: s <= v,
    ">": lambda s, v: s > v,
    ">=": lambda s, v: s >= v,
}
_EXPR_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(==|!=|<=|>=|=|<|>)\s*(.*?)\s*$")


def _coerce(df: pd.DataFrame, col: str, value: Any) -> Any:
    if col not in df.columns:
        close = difflib.get_close_matches(col, list(df.columns), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FilterError(f"unknown registry column {col!r}.{hint} Columns: {', '.join(df.columns)}.")
    series = df[col]
    if isinstance(value, str):
        text = value.strip()
        if series.dtype == bool:
            low = text.lower()
            if low in ("1", "true", "yes", "y"):
                return True
            if low in ("0", "false", "no", "n"):
                return False
            raise FilterError(f"column {col!r} is true/false; got {value!r}. Use 1/0 or true/false.")
        if pd.api.types.is_numeric_dtype(series):
            m = re.fullmatch(r"(\d+(?:\.\d+)?)[kK]", text)  # "4k" for context columns
            try:
                return float(m.group(1)) * 1024 if m else float(text)
            except ValueError:
                raise FilterError(f"column {col!r} is numeric; got {value!r}.") from None
        if col == "qk_norm" and text in _QK:  # accept the table's own codes lw/hw
            return _QK[text]
        return text
    return value


def find(expr: str | None = None, /, **features: Any) -> pd.DataFrame:
    """Rows of the registry matching every condition.

    Keyword form: ``find(qk_norm="none", swa=True, harmful_count=0)``; a list/tuple/set value
    means "any of". Expression form (used by the CLI): ``find("qk_norm=none,swa=1,kv_heads<32")``
    with ``= != < <= > >=`` joined by commas. Booleans accept 1/0/true/false.
    """
    df = _table()
    mask = pd.Series(True, index=df.index)
    for col, value in features.items():
        if isinstance(value, (list, tuple, set, frozenset)):
            vals = [_coerce(df, col, v) for v in value]
            mask &= df[col].isin(vals)
        else:
            target = _coerce(df, col, value)
            mask &= df[col] == target
    if expr:
        for part in expr.split(","):
            if not part.strip():
                continue
            m = _EXPR_RE.match(part)
            if not m:
                raise FilterError(
                    f"cannot read filter {part!r}: write COLUMN OP VALUE with OP one of "
                    "= != < <= > >=, joined by commas (e.g. 'qk_norm=none,swa=1')."
                )
            col, op, raw = m.groups()
            target = _coerce(df, col, raw)
            mask &= _OPS[op](df[col], target)
    return _with_provenance(df[mask].copy())


def parse_name(name: str) -> dict:
    """Read an OlmPool Hub name ``{init}_{pre|post}[_LQK|_HQK]_{kv}kv[_{ctx}k]_{dff}k[_SWA][_fp8]``.

    Returns what the *name* says (``init, norm, qk_norm, kv_heads, pretrain_ctx, d_ff_k, d_ff,
    swa, fp8``) plus ``quirks``: the entries of :data:`NAME_QUIRKS` where the name is known to
    disagree with the model (e.g. ``K_post_HQK_8kv_12k`` is pre-norm, and has no ctx field, so
    ``pretrain_ctx`` is None). Use :func:`get` for the model's actual architecture.
    """
    short = str(name).strip().removeprefix(HUB_ORG + "/")
    m = _NAME_RE.match(short)
    if not m:
        raise ModelNotFoundError(
            f"{name!r} does not follow the OlmPool naming scheme "
            "{init}_{pre|post}[_LQK|_HQK]_{kv}kv[_{ctx}k]_{dff}k[_SWA][_fp8], "
            "e.g. 'G_post_LQK_8kv_4k_14k_SWA' or 'J_pre_16kv_8k_14k'."
        )
    d_ff_k = int(m["dff"])
    quirk = NAME_QUIRKS.get(short)
    return {
        "init": m["init"],
        "norm": m["norm"],
        "qk_norm": _TAG_QK.get(m["qk"], "none") if m["qk"] else "none",
        "kv_heads": int(m["kv"]),
        "pretrain_ctx": int(m["ctx"]) * 1024 if m["ctx"] else None,
        "d_ff_k": d_ff_k,
        "d_ff": _DFF_BY_K.get(d_ff_k),
        "swa": m["swa"] is not None,
        "fp8": m["fp8"] is not None,
        "quirks": (quirk,) if quirk else (),
    }


def format_name(fields: dict) -> str:
    """Inverse of :func:`parse_name`: build a short name from its fields.

    Needs ``init, norm, qk_norm, kv_heads`` and ``d_ff_k`` (or ``d_ff``); ``pretrain_ctx`` None
    omits the context field (as in ``K_post_HQK_8kv_12k``); ``swa``/``fp8`` default to False.
    """
    try:
        parts = [str(fields["init"]), str(fields["norm"])]
        qk = fields.get("qk_norm", "none")
        qk = _QK.get(qk, qk)
        if qk != "none":
            parts.append(_QK_TAG[qk])
        parts.append(f"{int(fields['kv_heads'])}kv")
        ctx = fields.get("pretrain_ctx")
        if ctx is not None and not (isinstance(ctx, float) and math.isnan(ctx)):
            parts.append(f"{int(ctx) // 1024}k")
        dffk = fields.get("d_ff_k")
        if dffk is None:
            dffk = round(int(fields["d_ff"]) / 1024)
        parts.append(f"{int(dffk)}k")
    except KeyError as e:
        raise FilterError(f"format_name needs field {e.args[0]!r}; got {sorted(fields)}") from None
    if fields.get("swa"):
        parts.append("SWA")
    if fields.get("fp8"):
        parts.append("fp8")
    return "_".join(parts)
