"""Size of the drill-down page (`attnscope drill`) as the input grows: it holds every token's
string (O(T)) and |layers| x |heads| x |queries| x k keys and probabilities, never a T x T map.

Measured without running a model: SmolLM2's tokenizer on the shipped prose (repeated to reach T),
SmolLM2's shape (30 layers x 9 heads), made-up keys and probabilities (random digits take as many
bytes as real ones). Prints one markdown row per T.

    python benchmarks/drill_page_size.py [--queries 8] [--k 10]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from attnscope.metrics.drilldown import token_strings  # noqa: E402
from attnscope.models.loading import load_tokenizer  # noqa: E402
from attnscope.probing.texts import prose  # noqa: E402
from attnscope.report.drilldown import render_drilldown  # noqa: E402


def page_dataset(tokens: list[str], *, layers: int, heads: int, queries: int, k: int, seed: int = 0) -> xr.Dataset:
    """A `topk_keys`-shaped Dataset over `tokens` with random keys and probabilities."""
    rng = np.random.default_rng(seed)
    T = len(tokens)
    qpos = np.linspace(T // 2, T - 1, queries).astype(int)
    keys = rng.integers(0, T // 2, size=(layers, heads, queries, k))
    prob = rng.dirichlet(np.ones(k + 1), size=(layers, heads, queries))[..., :k].astype(np.float32)
    dims = ("layer", "head", "query", "rank")
    return xr.Dataset({"key": (dims, keys), "prob": (dims, prob), "log_prob": (dims, np.log(prob)),
                       "row_mass": (dims[:3], np.ones((layers, heads, queries))),
                       "token": (("position",), np.asarray(tokens, dtype=object))},
                      coords={"layer": np.arange(layers), "head": np.arange(heads), "query": qpos,
                              "rank": np.arange(k), "position": np.arange(T)},
                      attrs={"model": "smollm2", "n_tokens": T})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--lengths", default="8192,16384,32768,65536")
    args = p.parse_args(argv)
    tok = load_tokenizer("smollm2")
    ids = tok(prose())["input_ids"]
    lengths = [int(x) for x in args.lengths.split(",")]
    while len(ids) < max(lengths):
        ids = ids + ids
    strings = token_strings(tok, ids[:max(lengths)])
    print(f"| T | page (MB) | of which token strings (MB) | queries x layers x heads x k |")
    print("| ---: | ---: | ---: | --- |")
    for T in lengths:
        ds = page_dataset(strings[:T], layers=30, heads=9, queries=args.queries, k=args.k)
        total = len(render_drilldown(ds).encode("utf-8"))
        empty = len(render_drilldown(ds.isel(position=slice(0, 0)).assign_attrs(n_tokens=T)).encode("utf-8"))
        print(f"| {T} | {total / 1e6:.2f} | {(total - empty) / 1e6:.2f} | {args.queries} x 30 x 9 x {args.k} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
