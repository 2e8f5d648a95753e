"""Probe specs: TOML files describing a family of synthetic prompts (RULER-style).

One file describes one probe family: the task (`niah` needle-in-a-haystack or
`natural_text`), the haystack, the needles, the prompt templates and the grid of
lengths x depths x seeds. `load_spec` validates every field and raises one
`SpecError` per bad field naming the file, the field, the value and what is allowed.
The full format is documented in docs/probes.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from attnscope.errors import SpecError

SCHEMA_VERSION = 1
TASKS = ("niah", "natural_text")
HAYSTACK_TYPES = ("noise", "prose", "needles")
ITEM_TYPES = ("words", "numbers", "uuids")

# RULER's noise haystack (Hsieh et al. 2024, after Mohtashami & Jaggi 2023)
DEFAULT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEFAULT_NEEDLE = "One of the special magic {value_kind} for {key} is: {value}."
DEFAULT_PREFIX = ("Some special magic {value_kind} are hidden within the following text. "
                  "Make sure to memorize it. I will quiz you about the {value_kind} afterwards.")
DEFAULT_QUESTION = "What are all the special magic {value_kind} for {query} mentioned in the provided text?"
DEFAULT_ANSWER_PREFIX = "The special magic {value_kind} for {query} mentioned in the provided text are"


@dataclass(frozen=True)
class GridSpec:
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    depth_tolerance: float = 0.05


@dataclass(frozen=True)
class HaystackSpec:
    type: str = "noise"
    text: str = "loc_workshop"
    noise: str = DEFAULT_NOISE


@dataclass(frozen=True)
class NeedleSpec:
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    number_digits: int = 7
    value_kind: str = ""  # "" -> the value_type itself ("numbers", "words", "uuids")
    template: str = DEFAULT_NEEDLE


@dataclass(frozen=True)
class PromptSpec:
    prefix: str = DEFAULT_PREFIX
    question: str = DEFAULT_QUESTION
    answer_prefix: str = DEFAULT_ANSWER_PREFIX
    separator: str = "\n"


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    task: str
    grid: GridSpec
    description: str = ""
    seeds: tuple[int, ...] = (0,)
    haystack: HaystackSpec = field(default_factory=HaystackSpec)
    needle: NeedleSpec = field(default_factory=NeedleSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    source: str = ""  # the file it was loaded from; not part of the hash

    @property
    def value_kind(self) -> str:
        return self.needle.value_kind or self.needle.value_type

    def canonical(self) -> dict[str, Any]:
        """The spec as plain data with every default filled in (what the hash covers)."""
        d = dataclasses.asdict(self)
        d.pop("source")
        d["schema_version"] = SCHEMA_VERSION
        return d

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON form: equal for specs that build the same prompts,
        whatever their file name, key order, comments or spelled-out defaults."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- validation

class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, fld: str, value: Any, allowed: str) -> SpecError:
        return SpecError(f"{self.source}: field '{fld}' = {value!r} is invalid: {allowed}")

    def table(self, data: dict, fld: str, allowed_keys: set[str]) -> dict:
        value = data.get(fld, {})
        if not isinstance(value, dict):
            raise self.fail(fld, value, "expected a table ([" + fld + "])")
        for k in value:
            if k not in allowed_keys:
                raise self.fail(f"{fld}.{k}", value[k],
                                f"unknown field; allowed in [{fld}]: {sorted(allowed_keys)}")
        return value

    def string(self, data: dict, key: str, fld: str, default: str | None = None,
               choices: tuple[str, ...] | None = None, nonempty: bool = False) -> str:
        if key not in data:
            if default is None:
                raise self.fail(fld, None, "required field is missing")
            return default
        v = data[key]
        if not isinstance(v, str):
            raise self.fail(fld, v, "expected a string")
        if choices is not None and v not in choices:
            raise self.fail(fld, v, f"expected one of {list(choices)}")
        if nonempty and not v.strip():
            raise self.fail(fld, v, "expected a non-empty string")
        return v

    def integer(self, data: dict, key: str, fld: str, default: int, lo: int, hi: int | None = None) -> int:
        v = data.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(fld, v, "expected an integer")
        if v < lo or (hi is not None and v > hi):
            raise self.fail(fld, v, f"expected an integer in [{lo}, {hi if hi is not None else 'inf'}]")
        return v

    def template(self, data: dict, key: str, fld: str, default: str, allowed: set[str],
                 required: set[str] = frozenset()) -> str:
        v = self.string(data, key, fld, default)
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise self.fail(fld, v, f"not a valid format template ({exc}); write literal braces as {{{{ }}}}")
        bad = names - allowed
        if bad:
            raise self.fail(fld, v, f"unknown placeholder(s) {sorted(bad)}; allowed: {sorted(allowed)}")
        missing = set(required) - names
        if missing:
            raise self.fail(fld, v, f"must contain the placeholder(s) {sorted('{' + m + '}' for m in missing)}")
        return v


def parse_spec(data: dict, source: str = "<spec>") -> ProbeSpec:
    """Validate a spec given as a dict (the parsed TOML); raise SpecError on the first bad field."""
    c = _Checker(source)
    top = {"name", "task", "description", "seeds", "grid", "haystack", "needle", "prompt"}
    for k in data:
        if k not in top:
            raise c.fail(k, data[k], f"unknown top-level field; allowed: {sorted(top)}")
    name = c.string(data, "name", "name", nonempty=True)
    task = c.string(data, "task", "task", choices=TASKS)
    description = c.string(data, "description", "description", default="")

    seeds = data.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise c.fail("seeds", seeds, "expected a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise c.fail("seeds", seeds, "seeds must be distinct")

    g = c.table(data, "grid", {"lengths", "depths", "depth_tolerance"})
    if "grid" not in data:
        raise c.fail("grid", None, "required table [grid] with lengths and depths is missing")
    lengths = g.get("lengths")
    if (not isinstance(lengths, list) or not lengths
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 16 for x in lengths)):
        raise c.fail("grid.lengths", lengths, "expected a non-empty list of integers >= 16 (model tokens)")
    depths = g.get("depths")
    if (not isinstance(depths, list) or not depths
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0
                   for x in depths)):
        raise c.fail("grid.depths", depths, "expected a non-empty list of numbers in [0, 1] "
                     "(fraction of the haystack before the needle)")
    for fld, values in (("grid.lengths", lengths), ("grid.depths", depths)):
        if len(set(values)) != len(values):  # a repeat would measure one grid point twice
            raise c.fail(fld, values, "values must be distinct")
    tol = g.get("depth_tolerance", 0.05)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < tol <= 0.5:
        raise c.fail("grid.depth_tolerance", tol, "expected a number in (0, 0.5]")
    grid = GridSpec(tuple(lengths), tuple(float(x) for x in depths), float(tol))

    h = c.table(data, "haystack", {"type", "text", "noise"})
    htype = c.string(h, "type", "haystack.type", default="prose" if task == "natural_text" else "noise",
                     choices=HAYSTACK_TYPES)
    if task == "natural_text" and htype != "prose":
        raise c.fail("haystack.type", htype, "task 'natural_text' needs haystack.type = 'prose'")
    text = c.string(h, "text", "haystack.text", default="loc_workshop", nonempty=True)
    if htype == "prose":  # checked here, before any model loads, not once per task after it
        from attnscope.probing.texts import available_texts

        shipped = available_texts()
        if text not in shipped and not Path(text).expanduser().is_file():
            raise c.fail("haystack.text", text, f"neither a shipped text ({', '.join(shipped)}) nor an existing "
                         "file (a path is read from the current folder)")
    noise = c.string(h, "noise", "haystack.noise", default=DEFAULT_NOISE, nonempty=True)
    haystack = HaystackSpec(htype, text, noise)

    n = c.table(data, "needle", {"key_type", "value_type", "num_keys", "num_values", "num_queries",
                                 "number_digits", "value_kind", "template"})
    key_type = c.string(n, "key_type", "needle.key_type", default="words", choices=ITEM_TYPES)
    value_type = c.string(n, "value_type", "needle.value_type", default="numbers", choices=ITEM_TYPES)
    num_keys = c.integer(n, "num_keys", "needle.num_keys", 1, 1, 64)
    num_values = c.integer(n, "num_values", "needle.num_values", 1, 1, 64)
    num_queries = c.integer(n, "num_queries", "needle.num_queries", 1, 1, 64)
    if num_queries > num_keys:
        raise c.fail("needle.num_queries", num_queries,
                     f"cannot query more keys than are inserted (needle.num_keys = {num_keys})")
    digits = c.integer(n, "number_digits", "needle.number_digits", 7, 2, 18)
    value_kind = c.string(n, "value_kind", "needle.value_kind", default="")
    ntemplate = c.template(n, "template", "needle.template", DEFAULT_NEEDLE,
                           {"key", "value", "value_kind"}, required={"key", "value"})
    if ntemplate.index("{key}") > ntemplate.index("{value}"):
        raise c.fail("needle.template", ntemplate, "{key} must come before {value}")
    needle = NeedleSpec(key_type, value_type, num_keys, num_values, num_queries, digits, value_kind,
                        ntemplate)

    p = c.table(data, "prompt", {"prefix", "question", "answer_prefix", "separator"})
    prefix = c.template(p, "prefix", "prompt.prefix", DEFAULT_PREFIX if task == "niah" else "",
                        {"value_kind"})
    q_req = {"query"} if task == "niah" else set()
    question = c.template(p, "question", "prompt.question", DEFAULT_QUESTION if task == "niah" else "",
                          {"value_kind", "query"}, required=q_req)
    answer_prefix = c.template(p, "answer_prefix", "prompt.answer_prefix",
                               DEFAULT_ANSWER_PREFIX if task == "niah" else "", {"value_kind", "query"})
    separator = c.string(p, "separator", "prompt.separator", default="\n")
    if separator.strip() or not separator:
        raise c.fail("prompt.separator", separator, "expected non-empty whitespace, e.g. '\\n' or ' '")
    prompt = PromptSpec(prefix, question, answer_prefix, separator)
    return ProbeSpec(name=name, task=task, grid=grid, description=description, seeds=tuple(seeds),
                     haystack=haystack, needle=needle, prompt=prompt, source=source)


def load_spec(path: str | Path) -> ProbeSpec:
    """Read and validate a probe spec: a TOML file, or the name of a shipped spec
    (`niah_single`; `attnscope probes` lists them, see attnscope.probing.catalog)."""
    from attnscope.probing.catalog import find_spec_file

    path = find_spec_file(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from exc
    return parse_spec(data, source=str(path))
