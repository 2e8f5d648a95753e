"""Tiny random checkpoints of every model class in the OlmPool registry, for tests.

``make_tiny_model(kind, path)`` saves a randomly initialised model (hidden 64, 4 layers, 4 query
heads, 2 KV heads, head_dim 16, a ~384-token byte-level BPE vocabulary; fixed torch seed) with a
tokenizer, so that ``AutoModelForCausalLM.from_pretrained(path)`` works offline. Nothing is
downloaded: the tokenizer is trained locally on a few sentences.

Kinds (see :data:`KINDS`): ``llama`` (GQA), ``qwen3`` (headwise QK norm), ``olmo2`` (layerwise QK
norm), ``olmo3`` (sliding window 8, layer types 3 sliding : 1 full), ``olmo_hybrid`` (gated
delta-net recurrent layers + attention), and the remote-code classes ``olmo3_preorder``,
``olmo3_preorder_no_qk``, ``olmo2_headwise_qknorm`` (their modelling file is written into the
folder and mapped through ``auto_map``, so loading needs ``trust_remote_code=True``).

Defect reproductions (docs/olmpool.md): :func:`make_flat_rope_theta_olmo3`,
:func:`make_swa_without_layer_types`, :func:`make_wrong_norm_checkpoint`; the remote-code SWA
kinds reproduce the ignored-window defect as built.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "REMOTE_KINDS",
    "SAMPLE_TEXT",
    "TINY_WINDOW",
    "make_tiny_tokenizer",
    "make_tiny_model",
    "make_flat_rope_theta_olmo3",
    "make_swa_without_layer_types",
    "make_wrong_norm_checkpoint",
    "text_loss",
]

SEED = 0
TINY_WINDOW = 8  # shorter than any test input, so a working window changes the output
REMOTE_FILE = "modeling_olmpool_remote.py"

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A needle is hidden in a haystack of plain "
    "sentences, and the model must find it again after many tokens of distraction. "
    "Attention sinks put most of the weight on the first token of the sequence."
)
_CORPUS = [
    SAMPLE_TEXT,
    "Sliding window attention lets a layer see only the last few thousand tokens.",
    "Grouped query attention shares one key and value head among several query heads.",
    "Rotary position embeddings rotate queries and keys by an angle that grows with position.",
    "0123456789 +-*/=()[]{}<>.,;:!?'\" \n\t",
]

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
             tie_word_embeddings=False)

# kind -> (config class name in transformers or in the remote file, model class, model_type, remote)
_SPECS: dict[str, tuple[str, str, str, bool]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama", False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", False),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "olmo2", False),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", "olmo3", False),
    "olmo_hybrid": ("OlmoHybridConfig", "OlmoHybridForCausalLM", "olmo_hybrid", False),
    "olmo3_preorder": ("Olmo3PreorderConfig", "Olmo3PreorderForCausalLM", "olmo3_preorder", True),
    "olmo3_preorder_no_qk": ("Olmo3PreorderNoQKConfig", "Olmo3PreorderNoQKForCausalLM",
                             "olmo3_preorder_no_qk", True),
    "olmo2_headwise_qknorm": ("Olmo2HeadwiseQKNormConfig", "Olmo2HeadwiseQKNormForCausalLM",
                              "olmo2_headwise_qknorm", True),
}
KINDS: tuple[str, ...] = tuple(_SPECS)
REMOTE_KINDS: tuple[str, ...] = tuple(k for k, s in _SPECS.items() if s[3])
# The registry's model_type for each kind (the tiny kinds cover every class OlmPool loads as).
MODEL_TYPE_TO_KIND = {s[2]: k for k, s in _SPECS.items()}

_KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 16},
    "olmo3": {"sliding_window": TINY_WINDOW},  # layer_types default to 3 sliding : 1 full
    "olmo_hybrid": {"linear_conv_kernel_dim": 4},
    "olmo3_preorder": {"sliding_window": TINY_WINDOW},
    "olmo3_preorder_no_qk": {"sliding_window": TINY_WINDOW},
}


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer (~384 tokens, trained locally) as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=_BASE["max_position_embeddings"],
    )


def _remote_source() -> str:
    return resources.files("attnscope.data").joinpath("tiny_remote", REMOTE_FILE).read_text(encoding="utf-8")


def _remote_module(path: Path):
    """Import the remote modelling file written into ``path`` (as transformers would)."""
    import importlib.util
    import sys

    name = f"_attnscope_tiny_remote_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path / REMOTE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclass machinery resolves the module by name
    spec.loader.exec_module(module)
    return module


def _build(kind: str, path: Path, overrides: dict[str, Any]):
    """Instantiate (not save) a seeded tiny model of ``kind``; remote kinds get their file written."""
    import torch
    import transformers

    if kind not in _SPECS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")
    config_name, model_name, _, remote = _SPECS[kind]
    tok = make_tiny_tokenizer()
    kwargs: dict[str, Any] = dict(_BASE, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    kwargs.update(_KIND_DEFAULTS.get(kind, {}))
    kwargs.update(overrides)
    if remote:
        path.mkdir(parents=True, exist_ok=True)
        (path / REMOTE_FILE).write_text(_remote_source(), encoding="utf-8")
        module = _remote_module(path)
        config_cls, model_cls = getattr(module, config_name), getattr(module, model_name)
    else:
        config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    config = config_cls(**kwargs)
    torch.manual_seed(SEED)
    model = model_cls(config).eval()
    return model, tok


def _save(kind: str, model, tok, path: Path) -> Path:
    from attnscope.files import follow_umask

    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    follow_umask(path)  # save_pretrained writes model.safetensors 0600; every file follows the umask
    config_name, model_name, model_type, remote = _SPECS[kind]
    if remote:
        cfg_file = path / "config.json"
        cfg = json.loads(cfg_file.read_text())
        stem = REMOTE_FILE.removesuffix(".py")
        cfg["model_type"] = model_type
        cfg["architectures"] = [model_name]
        cfg["auto_map"] = {"AutoConfig": f"{stem}.{config_name}", "AutoModelForCausalLM": f"{stem}.{model_name}"}
        _write_json(cfg_file, cfg)
    return path


def _write_json(file: Path, data: dict) -> None:
    tmp = file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, file)


def make_tiny_model(kind: str, path: str | os.PathLike, **overrides: Any) -> Path:
    """Save a tiny random model of ``kind`` with a tokenizer into ``path``; returns ``path``.

    ``overrides`` go into the config (e.g. ``num_hidden_layers=2``, ``sliding_window=None``).
    Remote-code kinds load only with ``trust_remote_code=True``.
    """
    path = Path(path)
    model, tok = _build(kind, path, overrides)
    return _save(kind, model, tok, path)


def make_flat_rope_theta_olmo3(path: str | os.PathLike, theta: float = 8_000_000.0, **overrides: Any) -> Path:
    """The flat-``rope_theta`` defect: an ``olmo3`` checkpoint whose config.json has one flat
    ``rope_theta`` (as the extended OlmPool checkpoints do) instead of per-layer-type
    ``rope_parameters``. transformers 5.x applies it to ``full_attention`` only; the sliding
    layers fall back to the class default theta 500,000."""
    path = make_tiny_model("olmo3", path, **overrides)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("rope_parameters", None)
    cfg.pop("rope_scaling", None)
    cfg["rope_theta"] = float(theta)
    _write_json(cfg_file, cfg)
    return path


def make_swa_without_layer_types(path: str | os.PathLike, kind: str = "olmo3_preorder_no_qk",
                                 window: int = TINY_WINDOW, **overrides: Any) -> Path:
    """An SWA checkpoint whose config.json gives ``sliding_window`` but no ``layer_types`` (as
    several OlmPool SWA configs do): which layers slide must be assumed from the OlmPool pattern."""
    path = make_tiny_model(kind, path, sliding_window=window, **overrides)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("layer_types", None)
    cfg["sliding_window"] = window
    _write_json(cfg_file, cfg)
    return path


def _train(model, tok, text: str, steps: int) -> None:
    import torch

    ids = tok(text, return_tensors="pt").input_ids
    torch.manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Tiny matrices: extra threads only spin, and on a shared CPU they make this 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


# post-norm (Olmo 2/3) parameter names -> the pre-norm slot a careless conversion puts them in
_POST_TO_PRE = {".post_attention_layernorm.": ".input_layernorm.",
                ".post_feedforward_layernorm.": ".post_attention_layernorm."}


def make_wrong_norm_checkpoint(path: str | os.PathLike, *, reference_path: str | os.PathLike | None = None,
                               train_steps: int = 40, rename_keys: bool = True,
                               text: str = SAMPLE_TEXT) -> Path:
    """The wrong-norm-order defect (as in ``G_post_LQK_8kv_4k_14k_SWA``): post-norm weights
    shipped under a pre-norm class.

    A tiny post-norm ``olmo3`` model is trained for ``train_steps`` Adam steps on ``text`` (so it
    has a low loss there), then its weights are saved as the pre-norm remote class
    ``Olmo3PreorderForCausalLM``. With ``rename_keys`` (default) each post-norm weight is put in
    a pre-norm slot so every tensor loads and transformers reports nothing; only the text loss
    shows the damage. Without it the original names are kept (missing/unexpected keys).
    ``reference_path`` also saves the trained model under its correct class.
    """
    import torch

    path = Path(path)
    model, tok = _build("olmo3", path, {})
    _train(model, tok, text, train_steps)
    if reference_path is not None:
        _save("olmo3", model, tok, Path(reference_path))
    state = model.state_dict()
    if rename_keys:
        renamed = {}
        for key, value in state.items():
            for old, new in _POST_TO_PRE.items():
                if old in key:
                    key = key.replace(old, new)
                    break
            renamed[key] = value
        state = renamed
    wrong, _ = _build("olmo3_preorder", path, {"sliding_window": model.config.sliding_window})
    with torch.no_grad():
        missing, unexpected = wrong.load_state_dict(state, strict=False)
    if rename_keys and (missing or unexpected):  # the silent variant must fill every slot
        raise AssertionError(f"wrong-norm mapping incomplete: missing {missing}, unexpected {unexpected}")
    _save("olmo3_preorder", wrong, tok, path)
    if not rename_keys:  # keep the post-norm names in the file, as a naive conversion would
        from safetensors.torch import save_file

        for f in path.glob("*.safetensors"):
            f.unlink()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        from attnscope.files import follow_umask

        follow_umask(path)
    return path


def text_loss(model, tokenizer, text: str = SAMPLE_TEXT) -> float:
    """Mean next-token loss (nats) of ``model`` on ``text``: the plain-text loss check."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)
