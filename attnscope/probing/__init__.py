"""Probe specs (TOML), exact-length prompt builders and the shipped offline texts."""
from attnscope.probing.builder import Prompt, build_prompts
from attnscope.probing.catalog import list_probes
from attnscope.probing.spec import ProbeSpec, load_spec
from attnscope.probing.texts import available_texts, load_text, prose

__all__ = ["Prompt", "ProbeSpec", "available_texts", "build_prompts", "list_probes", "load_spec", "load_text",
           "prose"]
