"""Optional features and the extra that installs each (`pip install 'attnscope[EXTRA]'`).

The core install covers loading (Hub, folders, GGUF incl. `smollm2`), `analyze`, probes, the
batch store and `extract`. The extras bring: plot (matplotlib, plotly: figures, heatmaps, the
`.attnscope` plot accessor), stats (scipy, statsmodels: `report`, `tokens` regressions),
notebook (running the example notebooks: Jupyter kernel + plot + stats + ipywidgets progress
bars), tl / nnsight (the backends), ray (the Ray executor), pos (the English POS tagger of
`tokens`), all (every one of them). docs/install.md lists them with what each command needs.
"""

from __future__ import annotations

import importlib

from attnscope.errors import FeatureUnavailableError

# extra -> the modules it provides (import names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "plot": ("matplotlib", "plotly"),
    "stats": ("scipy", "statsmodels"),
    "notebook": ("nbformat", "nbclient", "ipykernel", "ipywidgets"),
    "tl": ("transformer_lens",),
    "nnsight": ("nnsight",),
    "ray": ("ray",),
    "pos": ("denckring_en_pos",),
}


def missing(*extras: str) -> list[str]:
    """Modules of `extras` that cannot be imported here."""
    out = []
    for extra in extras:
        for module in EXTRAS[extra]:
            try:
                importlib.import_module(module)
            except ImportError:
                out.append(module)
    return out


def require(feature: str, *extras: str) -> None:
    """Raise FeatureUnavailableError (one line: what to install) unless `extras` are installed."""
    absent = missing(*extras)
    if absent:
        spec = ",".join(extras)
        raise FeatureUnavailableError(
            f"{feature} needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} not installed: "
            f"pip install 'attnscope[{spec}]'")
