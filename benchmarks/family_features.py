"""What the family features cost on CPU: one attention call through attnscope's kernels, with and
without a learned sink (gpt-oss), with an MLA value head size (zero-padded for the CPU flash op),
with a score bias (inkling's position_bias), and with a sparse top-k selection (DeepSeek-V3.2).

Each (case, length, repeat) runs in its own process; we report the median wall time of the call
(after a warm-up call) and the median peak RSS, with ratios against the plain call measured in
the same run. SmolLM2's attention shape: 9 query heads, 3 KV heads, head size 64, fp32, causal.
Usage:

    python benchmarks/family_features.py [--lengths 1024,4096] [--repeats 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from markdown_section import command_line, write_section

CASES = {
    "plain": "cpu_flash, causal (baseline)",
    "sinks": "cpu_flash + a learned sink per head (lse' = logaddexp(lse, sink), out rescaled)",
    "mla": "cpu_flash, q/k head size 96, value head size 64 (V zero-padded to 96)",
    "mla_baseline": "cpu_flash, q/k/v head size 96 (what the padded call costs without padding)",
    "bias": "cpu_flash + a [1, 9, T, T] score bias (blocks with a per-head additive mask)",
    "topk": "cpu_flash + a top-64 selection per query (scatter per block of rows)",
}


CALLS = 5  # calls timed per process (their median)


def child(case: str, length: int) -> dict:
    import torch

    from attnscope.capture import kernels
    from attnscope.capture.visibility import Visibility

    torch.manual_seed(0)
    H, KVH = 9, 3
    d = 96 if case.startswith("mla") else 64
    dv = 64 if case == "mla" else d

    def tensors(T):
        q = torch.randn(1, H, T, d)
        k = torch.randn(1, KVH, T, d)
        v = torch.randn(1, KVH, T, dv)
        sinks = torch.randn(1, H, 1) if case == "sinks" else None
        bias = torch.randn(1, H, T, T) if case == "bias" else None
        indices = None
        if case == "topk":
            scores = torch.rand(1, T, T).tril()
            indices = scores.topk(min(64, T), dim=-1).indices.int()
        vis = Visibility(0, None, None, None, torch.zeros(1, dtype=torch.long), 0, indices)
        return q, k, v, sinks, bias, vis

    def call(T):
        q, k, v, sinks, bias, vis = tensors(T)
        t0 = time.perf_counter()
        with torch.no_grad():
            kernels.run("cpu_flash", q, k, v, d ** -0.5, vis, None, None, True, bias=bias, sinks=sinks)
        return time.perf_counter() - t0

    call(128)  # warm-up
    seconds = statistics.median(call(length) for _ in range(CALLS))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_rss": peak}


def measure(case: str, length: int, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, __file__, "--child", case, str(length)],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "peak_rss": statistics.median(r["peak_rss"] for r in runs), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for T in lengths:
        base = measure("plain", T, args.repeats)
        mla_base = measure("mla_baseline", T, args.repeats)
        for case in CASES:
            m = {"plain": base, "mla_baseline": mla_base}.get(case) or measure(case, T, args.repeats)
            ref = mla_base if case == "mla" else base
            rows.append(f"| {T} | `{case}` | {CASES[case]} | {m['seconds'] * 1e3:.0f} ms | "
                        f"{m['seconds'] / ref['seconds']:.2f}x | {m['peak_rss'] / 2**30:.2f} GiB | "
                        f"{m['peak_rss'] / ref['peak_rss']:.2f}x |")
            print(rows[-1], flush=True)
    body = ("One attention call (SmolLM2's shape: 9 query heads over 3 KV heads, fp32, causal) through "
            "`attnscope.capture.kernels.run('cpu_flash', ...)`; per cell the median over "
            f"{args.repeats} processes of each process's median of {CALLS} calls; ratios against `plain` "
            "in the same run (`mla` against `mla_baseline`, the same call at the padded head size). "
            "Peak RSS is the process's, inputs included: the `bias` case holds its own "
            "[1, 9, T, T] fp32 bias (0.6 GiB at 4096), as the model that passes one does.\n\n"
            "| T | case | what | time | vs baseline | peak RSS | vs baseline |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows))
    write_section(Path(args.out), "## Family features on CPU (learned sinks, MLA, biases, top-k)", body,
                  command_line("family_features.py", argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
