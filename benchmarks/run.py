"""Core benchmark: attnscope's streaming statistics against a plain sdpa forward on SmolLM2.

Each (configuration, length, repeat) runs in its own process; we report the median wall time of
the measured call and the median peak RSS of the process, and ratios against the sdpa baseline
measured in the same run. Usage:

    python benchmarks/run.py [--lengths 1024,2048,4096,8192] [--repeats 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from markdown_section import command_line, write_section

CONFIGS = {
    "sdpa": "plain sdpa forward (baseline)",
    "sink_span": "attnscope sink_mass + token0_mass + span_mass",
    "all": "attnscope all streaming metrics (+ span_mass)",
    "all_features": "the same, row metrics from the feature pass (row_pass='features')",
    "eager": "eager forward with output_attentions=True",
}
MEMORY_CAP = 20 << 30  # children above this are stopped: the machine has 24 GiB


def child(config: str, length: int) -> dict:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    import torch
    from transformers.utils import logging

    import attnscope
    from attnscope.probing.texts import prose

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    lm = attnscope.load("smollm2")
    ids = lm.tokenizer(prose())["input_ids"][:length]
    assert len(ids) == length, f"shipped prose has only {len(ids)} tokens"
    model = lm.model

    def run(n: int):
        x = torch.tensor([ids[:n]])
        if config == "sdpa":
            model.set_attn_implementation("sdpa")
            with torch.no_grad():
                model.base_model(input_ids=x, use_cache=False)
        elif config == "eager":
            model.set_attn_implementation("eager")
            with torch.no_grad():
                model.base_model(input_ids=x, use_cache=False, output_attentions=True)
        elif config == "sink_span":
            attnscope.analyze(lm, token_ids=ids[:n], metrics=("sink_mass", "token0_mass"),
                              spans={"needle": (n // 2, n // 2 + 16)})
        else:
            attnscope.analyze(lm, token_ids=ids[:n], spans={"needle": (n // 2, n // 2 + 16)},
                              row_pass="features" if config == "all_features" else "auto")

    run(64)  # warm-up: first-call initialisation is not what we measure
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    run(length)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_rss": peak, "rss_before": rss_before}


def measure(config: str, length: int, repeats: int) -> dict:
    runs, failure = [], None
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, __file__, "--child", config, str(length)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
            failure = "out of memory (20 GiB cap)" if ("MemoryError" in proc.stderr or proc.returncode < 0
                                                       or "alloc" in proc.stderr.lower()) else tail[:120]
            break
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if failure:
        return {"failed": failure}
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_rss": statistics.median(r["peak_rss"] for r in runs),
        "runs": len(runs),
    }


def table(results: dict, lengths: list[int]) -> str:
    lines = ["| tokens | configuration | median time (s) | × sdpa time | median peak RSS (GiB) | × sdpa RSS |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for n in lengths:
        base = results[("sdpa", n)]
        for config, label in CONFIGS.items():
            r = results.get((config, n))
            if r is None:
                continue
            if "failed" in r:
                lines.append(f"| {n} | {label} | {r['failed']} | | | |")
                continue
            lines.append(
                f"| {n} | {label} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f} | "
                f"{r['peak_rss'] / 2**30:.2f} | {r['peak_rss'] / base['peak_rss']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--heading", default="## Core: streaming statistics vs a plain forward",
                    help="the section of --out to write")
    ap.add_argument("--eager-max", type=int, default=4096,
                    help="skip eager above this length (its maps alone exceed the memory cap)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    results = {}
    configs = args.configs.split(",")
    for n in lengths:
        for config in configs:
            if config == "eager" and n > args.eager_max:
                gib = 30 * 9 * n * n * 4 / 2**30
                results[(config, n)] = {"failed": f"not run: maps alone need {gib:.0f} GiB"}
                continue
            results[(config, n)] = measure(config, n, args.repeats)
            print(n, config, results[(config, n)], file=sys.stderr, flush=True)
    md = table(results, lengths)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch threads default; {args.repeats} runs per cell, each in its "
              "own process; time = the measured call only (after load and a 64-token warm-up); "
              "peak RSS = the whole process, model included.")
    print(header + "\n\n" + md)
    if args.out:
        write_section(Path(args.out), args.heading, header + "\n\n" + md,
                      command_line("run.py", sys.argv[1:]))


if __name__ == "__main__":
    main()
