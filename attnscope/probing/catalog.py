"""The probe specs shipped inside the package, addressable by name.

The specs live in `attnscope/data/probes/*.toml` (package data: every install has them). Wherever
a spec is accepted (`load_spec`, `run_probe`, `extract`, CLI `--spec` / `--probes`) it may be
given as a path to a TOML file or as the name of a shipped spec (`niah_single`, also
`niah_single.toml`). An existing file wins over a shipped name of the same spelling.
`attnscope probes` (or `list_probes()`) lists the shipped ones.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from attnscope.errors import SpecError


def shipped_dir() -> Path:
    """The folder of the shipped probe specs."""
    return Path(str(resources.files("attnscope.data").joinpath("probes")))


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.toml"))


def find_spec_file(ref: str | Path) -> Path:
    """The spec file `ref` names: an existing file, else a shipped spec of that name.

    Raises SpecError naming the shipped specs (and the closest one) when neither exists.
    """
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    names = shipped_names()
    text = str(ref)
    stem = path.name[:-5] if path.name.endswith(".toml") else path.name
    bare = len(path.parts) == 1  # a name, not a path into some folder
    if bare and stem in names:
        return shipped_dir() / f"{stem}.toml"
    if path.is_dir():
        raise SpecError(f"probe spec {text!r} is a folder; give a .toml file or a shipped probe name")
    if stem in names:
        hint = f" To use the shipped probe of that name, give its name {stem!r} (no path)."
    else:
        close = difflib.get_close_matches(stem, names, n=2, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise SpecError(f"probe spec {text!r} does not exist: it is neither a file nor a shipped probe "
                    f"({', '.join(names)}).{hint} `attnscope probes` lists them.")


@dataclass(frozen=True)
class ProbeInfo:
    """One shipped probe, as `attnscope probes` lists it."""

    name: str
    task: str
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    seeds: tuple[int, ...]
    description: str
    path: str

    @property
    def grid(self) -> str:
        """'lengths x depths x seeds' in words, e.g. '1024-8192 (4) x 5 depths x 3 seeds'."""
        L = self.lengths
        lengths = f"{L[0]}" if len(L) == 1 else f"{min(L)}-{max(L)} ({len(L)})"
        return (f"{lengths} tokens x {len(self.depths)} depth(s) x {len(self.seeds)} seed(s) "
                f"= {len(L) * len(self.depths) * len(self.seeds)} prompts")


def list_probes() -> list[ProbeInfo]:
    """Every shipped probe spec, validated, by name."""
    from attnscope.probing.spec import load_spec

    out = []
    for name in shipped_names():
        spec = load_spec(shipped_dir() / f"{name}.toml")
        out.append(ProbeInfo(spec.name, spec.task, spec.grid.lengths, spec.grid.depths, spec.seeds,
                             spec.description, spec.source))
    return out
