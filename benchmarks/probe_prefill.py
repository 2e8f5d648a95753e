"""run_probe on SmolLM2: time per NIAH prompt and forwards over the full prompt, before/after.

Runs `attnscope.run_probe` on niah_single prompts (each length x depth, one seed), one prompt
per call, after loading the model and a 64-token warm-up forward. A counting observer, attached
for the whole call, counts the forwards at the first attention layer: those with more than one
query row are passes over the prompt (prefills or teacher-forced passes), the others are
decoding steps. The numbers that run_probe returns are saved too, so two runs of different code
can be compared value by value (`--report`).

    # today's code vs an older commit (its tree unpacked elsewhere, put first on PYTHONPATH),
    # alternating, so that both see the same load on a shared machine:
    git archive f0248b7 | tar -x -C /tmp/attnscope-before
    rm -f benchmarks/probe_prefill_before.json benchmarks/probe_prefill_after.json
    for round in 1 2 3; do
      PYTHONPATH=/tmp/attnscope-before python benchmarks/probe_prefill.py --label before --out benchmarks/probe_prefill_before.json
      python benchmarks/probe_prefill.py --label after --out benchmarks/probe_prefill_after.json
    done
    python benchmarks/probe_prefill.py --report benchmarks/probe_prefill_before.json benchmarks/probe_prefill_after.json

Each invocation measures every prompt once (`--repeats`) and appends its times to `--out`. The
script works with both versions: it passes `retrieval_count="positions"` and
`retrieval_span="needle_value"` (the only retrieval score the old code had) when run_probe
accepts them, so the compared retrieval scores share one definition. Torch runs on `--threads`
threads (default 1: on a shared CPU, one thread per process gives the steadiest CPU times);
the table gives the median wall time and the median CPU time (process time) per prompt.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time


class ForwardCounter:
    """Observer: counts calls of the first attention layer, split by number of query rows."""

    needs_lse = False

    def __init__(self) -> None:
        self.first_layer: int | None = None
        self.prompt_passes = 0  # forwards with more than one query row
        self.steps = 0  # forwards with one query row (decoding)

    def wants(self, layer: int) -> bool:
        if self.first_layer is None:
            self.first_layer = layer
        return layer == self.first_layer

    def observe(self, attn) -> None:
        if attn.query.shape[2] > 1:
            self.prompt_passes += 1
        else:
            self.steps += 1


def _values(ds) -> dict:
    """The numbers whose definition did not change, as nested lists (one prompt per dataset)."""
    one = ds.isel(length=0, depth=0, seed=0)
    out = {
        "needle_share": {qs: {sp: one.needle_share.sel(query_set=qs, span=sp).values.tolist()
                              for sp in ("needle_value", "needle_key")}
                         for qs in ("question", "final")},
        "sink_mass": one.sink_mass.values.tolist(),
        "retrieval_score": one.retrieval_score.values.tolist(),
        "generated": str(one.generated.values),
        "correct": bool(one.correct.values),
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--depths", default="0.25,0.75")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="run")
    ap.add_argument("--out", help="JSON file for the timings and values (appended to when it exists)")
    ap.add_argument("--report", nargs=2, metavar=("BEFORE", "AFTER"),
                    help="print the markdown table of two such files and exit")
    args = ap.parse_args(argv)
    if args.report:
        compare(*(json.load(open(f)) for f in args.report))
        return 0
    if not args.out:
        ap.error("--out is required")

    import torch
    from transformers.utils import logging

    import attnscope
    from attnscope.capture.interface import capture

    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    lm = attnscope.load("smollm2")
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([lm.tokenizer("Warm up. " * 16)["input_ids"][:64]]))
    params = inspect.signature(attnscope.run_probe).parameters
    kw = {k: v for k, v in (("retrieval_count", "positions"), ("retrieval_span", "needle_value"))
          if k in params}
    old = json.load(open(args.out)) if os.path.exists(args.out) else {"rows": []}
    index = {(r["length"], r["depth"], r["seed"]): r for r in old["rows"]}
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for depth in [float(x) for x in args.depths.split(",")]:
            prev = index.get((length, depth, args.seed), {})
            times, cpu = list(prev.get("times_s", [])), list(prev.get("cpu_s", []))
            counter, ds = None, None
            for _ in range(args.repeats):
                counter = ForwardCounter()
                t0, c0 = time.perf_counter(), time.process_time()
                with capture(lm.model, counter):
                    ds = attnscope.run_probe(lm, "probes/niah_single.toml", lengths=[length],
                                             depths=[depth], seeds=[args.seed], **kw)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            values = _values(ds)
            if prev and prev["values"] != values:
                print(f"warning: length {length} depth {depth}: values differ from {args.out}'s",
                      file=sys.stderr)
            rows.append({"length": length, "depth": depth, "seed": args.seed, "times_s": times,
                         "cpu_s": cpu, "median_s": statistics.median(times),
                         "median_cpu_s": statistics.median(cpu),
                         "prompt_passes": counter.prompt_passes, "decode_steps": counter.steps,
                         "values": values})
            print(f"{args.label}: length {length} depth {depth}: {times[-1]:.2f} s wall, "
                  f"{cpu[-1]:.2f} s CPU, {counter.prompt_passes} passes over the prompt, "
                  f"{counter.steps} decoding steps", flush=True)
    meta = {"label": args.label, "attnscope_file": attnscope.__file__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "run_probe_kwargs": kw,
            "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    meta["runs"] = old.get("meta", {}).get("runs", []) + [meta["created"]]
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


def _maxdiff(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))))


def compare(before: dict, after: dict) -> None:
    """Print a markdown table: time and passes before/after, and the largest value differences."""
    b_label, a_label = before["meta"]["label"], after["meta"]["label"]
    print(f"| tokens | depth | forwards over the prompt ({b_label} → {a_label}) | decoding steps | "
          f"wall s / prompt ({b_label} → {a_label}) | CPU s / prompt ({b_label} → {a_label}) | "
          "CPU ratio | max abs diff: question/final shares, sink mass | retrieval scores | "
          "generated text |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    index = {(r["length"], r["depth"], r["seed"]): r for r in before["rows"]}
    for r in after["rows"]:
        b = index.get((r["length"], r["depth"], r["seed"]))
        if b is None:
            continue
        bv, av = b["values"], r["values"]
        diffs = [_maxdiff(bv["needle_share"][qs][sp], av["needle_share"][qs][sp])
                 for qs in ("question", "final") for sp in ("needle_value", "needle_key")]
        diffs.append(_maxdiff(bv["sink_mass"], av["sink_mass"]))
        print(f"| {r['length']} | {r['depth']:g} | {b['prompt_passes']} → {r['prompt_passes']} | "
              f"{b['decode_steps']} → {r['decode_steps']} | {b['median_s']:.1f} → {r['median_s']:.1f} | "
              f"{b['median_cpu_s']:.1f} → {r['median_cpu_s']:.1f} | "
              f"{r['median_cpu_s'] / b['median_cpu_s']:.2f} | {max(diffs):.1e} | "
              f"{'equal' if bv['retrieval_score'] == av['retrieval_score'] else 'differ'} | "
              f"{'same' if bv['generated'] == av['generated'] else 'differs'} |")
    spread = {kind: max(max(r[kind]) / min(r[kind]) for d in (before, after) for r in d["rows"])
              for kind in ("times_s", "cpu_s")}
    print(f"\nLargest max/min ratio over the runs of one prompt: wall time {spread['times_s']:.1f}x, "
          f"CPU time {spread['cpu_s']:.2f}x.")
    runs = len(after["rows"][0]["times_s"]) if after["rows"] else 0
    print(f"{runs} runs per prompt and version; threads {after['meta']['threads']}; "
          f"load average at the last runs {before['meta']['load_average'][0]:.1f} / "
          f"{after['meta']['load_average'][0]:.1f} on {after['meta']['cpus']} CPUs; "
          f"{before['meta']['runs'][0]} to {after['meta']['runs'][-1]}.")


if __name__ == "__main__":
    sys.exit(main())
