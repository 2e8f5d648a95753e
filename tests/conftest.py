"""Shared fixtures: the real embedded model, tiny random models of each family, real text."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never use the network: huggingface_hub reads this at import, so set it before anything
# imports it. Tests of the online and unreachable-Hub paths patch it off explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import attnscope

TINY_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=512,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_FAMILIES = {
    "llama": {},  # GQA: 4 query heads over 2 KV heads
    "qwen3": {"head_dim": 16},  # headwise QK norm
    "olmo2": {},  # layerwise QK norm
    "olmo3": {"sliding_window": 8,  # 3 sliding : 1 full, window shorter than the inputs
              "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
    "olmo_hybrid": {"layer_types": ["linear_attention"] * 3 + ["full_attention"]},
}


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    torch.manual_seed(0)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: more torch threads only spin on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, the real pretrained model (converted once into the cache)."""
    return attnscope.load("smollm2")


@pytest.fixture(scope="session")
def prose() -> str:
    """Real English prose shipped with the package."""
    from attnscope.probing.texts import prose as shipped

    return shipped()


def save_tiny(model_type: str, path: Path, **overrides) -> Path:
    """A tiny randomly initialised model of `model_type`, saved so it loads like a checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY_COMMON, **TINY_FAMILIES.get(model_type, {}), **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """Factory: tiny(model_type) -> LoadedModel of a tiny saved checkpoint (no tokenizer)."""
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            path = save_tiny(model_type, tiny_dir / model_type)
            cache[model_type] = attnscope.load(str(path))
        return cache[model_type]

    return get
