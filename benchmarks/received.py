"""Cost of `received`, span-to-span and kept mass against a plain forward and today's span mass.

SmolLM2 on the shipped prose; each (configuration, length, repeat) runs in its own process; we
report the median wall time of the measured call and the median peak RSS of the process, with
ratios against the plain sdpa forward and against today's key-set metrics (sink + span mass),
both measured in the same run. Usage:

    python benchmarks/received.py [--lengths 4096] [--repeats 3] [--out docs/benchmarks.md]
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
    "span_mass": "today's key-set metrics: sink_mass + token0_mass + span_mass (one 16-token span)",
    "span_mass_256": "the same with one 256-token span (as many keys per query as the largest budget below)",
    "received": "received for all keys (auto: the chunked column pass on CPU)",
    "received_swapped": "received for all keys, the swapped pass (aten flash op, -lse bias)",
    "span_to_span": "sink_mass + token0_mass + span_to_span (2 query spans x 2 key spans of 16-64 tokens)",
    "kept_window": "sink_mass + token0_mass + kept_mass: streaming:4 + window at budgets 16, 64, 256",
    "kept_all": "the same + static_topk (needs received: one more column pass)",
    "default": "default metrics (sink, token0, entropy, mean_distance, position_profile)",
    "default_received": "default metrics + received (sharing the chunked row pass)",
}
MEMORY_CAP = 20 << 30
BUDGETS = (16, 64, 256)


def child(config: str, length: int, threads: int | None) -> dict:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    import torch
    from transformers.utils import logging

    import attnscope
    from attnscope.metrics.reductions import DEFAULT_METRICS
    from attnscope.probing.texts import prose

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    lm = attnscope.load("smollm2")
    ids = lm.tokenizer(prose())["input_ids"][:length]
    assert len(ids) == length, f"shipped prose has only {len(ids)} tokens"
    model = lm.model

    def run(n: int):
        x = ids[:n]
        keyset = ("sink_mass", "token0_mass")
        needle = {"needle": (n // 2, n // 2 + 16)}
        if config == "sdpa":
            model.set_attn_implementation("sdpa")
            with torch.no_grad():
                model.base_model(input_ids=torch.tensor([x]), use_cache=False)
        elif config == "span_mass":
            attnscope.analyze(lm, token_ids=x, metrics=keyset, spans=needle)
        elif config == "span_mass_256":
            attnscope.analyze(lm, token_ids=x, metrics=keyset, spans={"wide": (max(0, n // 2 - 256), n // 2)})
        elif config == "received":
            attnscope.analyze(lm, token_ids=x, metrics=("received",))
        elif config == "received_swapped":
            attnscope.analyze(lm, token_ids=x, metrics=("received",), received_pass="swapped")
        elif config == "span_to_span":
            attnscope.analyze(lm, token_ids=x, metrics=keyset, spans={**needle, "sink": (0, 4)},
                              query_spans={"question": (n - 64, n), "after": (n // 2 + 16, n // 2 + 80)})
        elif config in ("kept_window", "kept_all"):
            pol = ("streaming", "window") + (("static_topk",) if config == "kept_all" else ())
            attnscope.analyze(lm, token_ids=x, metrics=keyset, policies=pol,
                              budgets=[b for b in BUDGETS if b <= n])
        elif config == "default":
            attnscope.analyze(lm, token_ids=x)
        elif config == "default_received":
            attnscope.analyze(lm, token_ids=x, metrics=DEFAULT_METRICS + ("received",))
        else:
            raise ValueError(config)

    run(300)  # warm-up: first-call initialisation is not what we measure
    t0, c0 = time.perf_counter(), time.process_time()
    run(length)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": peak}


def measure(config: str, length: int, threads: int | None) -> dict:
    """One run in its own process."""
    proc = subprocess.run([sys.executable, __file__, "--child", config, str(length), str(threads or 0)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {"failed": tail[:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    failed = [r for r in runs if "failed" in r]
    if failed:
        return failed[0]
    med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "cpu_seconds", "peak_rss")}
    return {**med, "all_seconds": [round(r["seconds"], 2) for r in runs],
            "all_rss": [round(r["peak_rss"] / 2**30, 2) for r in runs], "runs": len(runs)}


def table(results: dict, lengths: list[int], configs: list[str]) -> str:
    lines = ["| tokens | configuration | median wall (s) | runs, wall (s) | median CPU (s) | × sdpa CPU | "
             "× span_mass CPU | median peak RSS (GiB) | runs, RSS (GiB) | × sdpa RSS |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for n in lengths:
        base, span = results.get(("sdpa", n)), results.get(("span_mass", n))
        for config in configs:
            r = results.get((config, n))
            if r is None:
                continue
            if "failed" in r:
                lines.append(f"| {n} | {CONFIGS[config]} | failed: {r['failed']} | | | | | | | |")
                continue
            ratio = (lambda ref, key: f"{r[key] / ref[key]:.2f}" if ref and "failed" not in ref else "-")
            lines.append(f"| {n} | {CONFIGS[config]} | {r['seconds']:.2f} | {', '.join(map(str, r['all_seconds']))} | "
                         f"{r['cpu_seconds']:.2f} | {ratio(base, 'cpu_seconds')} | {ratio(span, 'cpu_seconds')} | "
                         f"{r['peak_rss'] / 2**30:.2f} | {', '.join(map(str, r['all_rss']))} | {ratio(base, 'peak_rss')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--out", default=None, help="write the markdown table into this file's section")
    ap.add_argument("--heading", default="## received, span-to-span and kept mass vs a plain forward",
                    help="the section of --out to write")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]) or None)))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    results = {}
    load_start = os.getloadavg()[0]
    t_start = time.time()
    # interleaved: every configuration's k-th run before any (k+1)-th, so all see the same load
    for n in lengths:
        per = {c: [] for c in configs}
        for _ in range(args.repeats):
            for config in configs:
                r = measure(config, n, args.threads)
                per[config].append(r)
                print(n, config, r, file=sys.stderr, flush=True)
        for config, rs in per.items():
            results[(config, n)] = summarise(rs)
    md = table(results, lengths, configs)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs shared with other jobs (load average {load_start:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end; {(time.time() - t_start) / 60:.0f} min in all), torch threads "
              f"default, SmolLM2-135M-Instruct fp32; {args.repeats} runs per cell, each in its own process, the "
              "configurations interleaved run by run; wall and CPU time (user + system, all threads) of the "
              "measured call only (after load and a 300-token warm-up): on a shared machine the wall time of "
              "one run varies with the other jobs, its CPU time much less, so the ratios use CPU time; "
              "peak RSS = the whole process, model included.")
    print(header + "\n\n" + md)
    if args.out:
        write_section(Path(args.out), args.heading, header + "\n\n" + md, command_line("received.py", sys.argv[1:]))


if __name__ == "__main__":
    main()
