"""Scale benchmark: attnscope on the real OlmPool shapes (7B, randomly initialised).

A model built from a registry row's configuration with random weights costs the same FLOPs and
memory as the trained checkpoint, and needs no download. For each (model, configuration) a child
process builds the model and measures, per length: the median wall time of `--repeats` calls
after a warm-up call at the same length (on GPU the warm-up compiles FlexAttention for that
shape; its time is reported separately), and the peak memory (GPU: torch.cuda.max_memory_allocated
per length; CPU: peak RSS, one process per length and repeat, since RSS never goes down).

Configurations (all on the same model and tokens):
  forward    the plain forward (sdpa: flash on GPU), no statistics - the baseline
  sink_span  attnscope sink_mass + token0_mass + span_mass
  all        attnscope default metrics (sink, token0, entropy, mean_distance, position_profile) + span
  probe      run_probe on one NIAH prompt (niah_single, depth 0.5): one prefill + greedy decoding

Usage:
  GPU (bf16, full depth):   PYTHONPATH=. python3 benchmarks/scale.py --device cuda --out docs/benchmarks.md
  CPU (fp32, 4 layers):     python benchmarks/scale.py --device cpu --out docs/benchmarks.md
  smoke test:               python benchmarks/scale.py --device cpu --layers 1 --lengths 256 --repeats 1
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

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "forward": "plain forward (sdpa), no statistics",
    "sink_span": "attnscope sink_mass + token0_mass + span_mass",
    "all": "attnscope default metrics + span_mass",
    "probe": "run_probe, one NIAH prompt (prefill + decoding)",
}
MODELS = ("I_pre_32kv_8k_12k", "C_post_LQK_8kv_8k_13k_SWA")
DEFAULTS = {  # device -> (lengths, layers, dtype)
    "cuda": ("8192,16384,32768,65536", None, "bfloat16"),
    "cpu": ("4096,8192,16384", 4, "float32"),
}


def _build(model_name: str, layers: int | None, dtype: str, device: str):
    import torch

    import attnscope
    from attnscope.models.loading import LoadedModel
    from attnscope.models.shapes import random_model
    from attnscope.testing import make_tiny_tokenizer

    torch_dtype = getattr(torch, dtype)
    model = random_model(model_name, n_layers=layers, dtype=torch_dtype, device=device)
    model.set_attn_implementation("sdpa")
    tok = make_tiny_tokenizer()  # byte-level BPE; any ids below the vocabulary do for random weights
    tok.model_max_length = model.config.max_position_embeddings
    lm = LoadedModel(model, tok, f"random {model_name}", None, "random", "", torch_dtype,
                     torch.device(device))
    return attnscope, lm


def _tokens(tok, n: int) -> list[int]:
    from attnscope.probing.texts import prose

    ids: list[int] = []
    text = prose()
    while len(ids) < n:
        ids += tok(text, add_special_tokens=False)["input_ids"]
    return ids[:n]


def child(model_name: str, config: str, lengths: list[int], repeats: int, layers: int | None,
          dtype: str, device: str) -> list[dict]:
    import resource

    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    cuda = device == "cuda"
    attnscope, lm = _build(model_name, layers, dtype, device)
    spec = "niah_single"  # shipped with the package

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def call(n: int, ids: list[int]):
        if config == "forward":
            with torch.no_grad():
                lm.model.base_model(input_ids=torch.tensor([ids[:n]], device=device), use_cache=False)
        elif config == "sink_span":
            attnscope.analyze(lm, token_ids=ids[:n], metrics=("sink_mass", "token0_mass"),
                              spans={"needle": (n // 2, n // 2 + 16)})
        elif config == "all":
            attnscope.analyze(lm, token_ids=ids[:n], spans={"needle": (n // 2, n // 2 + 16)})
        else:
            attnscope.run_probe(lm, spec, lengths=[n], depths=[0.5])

    out = []
    model_bytes = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for n in lengths:
        ids = _tokens(lm.tokenizer, n)
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            # GPU: compiles for this shape; CPU: first-call setup only (a probe needs ~300 tokens)
            call(n if cuda else min(n, 64 if config != "probe" else 512), ids)
            sync()
            first = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                call(n, ids)
                sync()
                times.append(time.perf_counter() - t0)
            peak = (torch.cuda.max_memory_allocated() if cuda
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            out.append({"length": n, "seconds": statistics.median(times), "times": times,
                        "first_call": first, "peak_bytes": peak, "model_bytes": model_bytes})
        except torch.OutOfMemoryError:
            out.append({"length": n, "failed": "out of memory"})
            break  # longer lengths will not fit either
    return out


def _run_child(args_list: list[str]) -> list[dict]:
    proc = subprocess.run([sys.executable, __file__, "--child", *args_list], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return [{"failed": tail[:160]}]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(model: str, config: str, lengths: list[int], repeats: int, layers, dtype: str,
            device: str) -> dict[int, dict]:
    base = [model, config, "", "", str(layers or 0), dtype, device]
    if device == "cuda":  # one process, every length: peak memory is reset per length
        base[2], base[3] = ",".join(map(str, lengths)), str(repeats)
        rows = _run_child(base)
        return {r.get("length", lengths[0]): r for r in rows}
    results = {}
    for n in lengths:  # RSS only grows: one process per length and repeat
        runs = []
        for _ in range(repeats):
            base[2], base[3] = str(n), "1"
            r = _run_child(base)[0]
            if "failed" in r:
                runs = [r]
                break
            runs.append(r)
        if "failed" in runs[0]:
            results[n] = runs[0]
        else:
            results[n] = {"length": n, "seconds": statistics.median(r["seconds"] for r in runs),
                          "times": [r["seconds"] for r in runs],
                          "peak_bytes": statistics.median(r["peak_bytes"] for r in runs),
                          "model_bytes": statistics.median(r["model_bytes"] for r in runs),
                          "first_call": statistics.median(r["first_call"] for r in runs)}
        print(model, config, n, results[n], file=sys.stderr, flush=True)
    return results


def table(results: dict, models, configs, lengths, device: str) -> str:
    mem = "peak GPU memory (GiB)" if device == "cuda" else "peak RSS (GiB)"
    lines = [f"| model | tokens | configuration | median time (s) | x forward time | {mem} | "
             "above the model (GiB) | x forward memory | first call (s) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in models:
        for n in lengths:
            base = results.get((m, "forward"), {}).get(n, {})
            for c in configs:
                r = results.get((m, c), {}).get(n)
                if r is None:
                    continue
                if "failed" in r:
                    lines.append(f"| {m} | {n} | {CONFIGS[c]} | {r['failed']} | | | | | |")
                    continue
                ok = "seconds" in base
                extra = (r["peak_bytes"] - r["model_bytes"]) / 2**30
                lines.append(
                    f"| {m} | {n} | {CONFIGS[c]} | {r['seconds']:.2f} | "
                    f"{(r['seconds'] / base['seconds']) if ok else float('nan'):.2f} | "
                    f"{r['peak_bytes'] / 2**30:.2f} | {extra:.2f} | "
                    f"{(r['peak_bytes'] / base['peak_bytes']) if ok else float('nan'):.2f} | "
                    f"{r['first_call']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=7)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--layers", type=int, default=None, help="layers per model (default: all on GPU, 4 on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the table into this markdown file's section")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    if args.child:
        model, config, lengths, repeats, layers, dtype, device = args.child
        rows = child(model, config, [int(x) for x in lengths.split(",")], int(repeats),
                     int(layers) or None, dtype, device)
        print(json.dumps(rows))
        return
    lengths_default, layers_default, dtype = DEFAULTS[args.device]
    lengths = [int(x) for x in (args.lengths or lengths_default).split(",")]
    layers = args.layers if args.layers is not None else layers_default
    models, configs = args.models.split(","), args.configs.split(",")
    started = time.time()
    results = {(m, c): measure(m, c, lengths, args.repeats, layers, dtype, args.device)
               for m in models for c in configs}
    md = table(results, models, configs, lengths, args.device)
    header = _header(args, layers, dtype, lengths, time.time() - started)
    print(header + "\n\n" + md)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{m}|{c}": v for (m, c), v in results.items()}, indent=1))
    if args.out:
        heading = "## Scale: OlmPool 7B shapes on " + ("GPU" if args.device == "cuda" else "CPU")
        write_section(Path(args.out), heading, f"{header}\n\n{md}", command_line("scale.py", sys.argv[1:]))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _header(args, layers, dtype, lengths, seconds: float) -> str:
    import torch
    import transformers

    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{platform.machine()}, {os.cpu_count()} CPUs")
    depth = f"{layers} layer{'s' * (layers != 1)}" if layers else "all layers"
    return (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {where}; torch "
            f"{torch.__version__}, transformers {transformers.__version__}; randomly initialised "
            f"models of the registry rows' shapes ({depth}, {dtype}); {args.repeats} timed runs per "
            "cell after a warm-up call (median reported); "
            + ("one process per model and configuration, peak memory reset per length"
               if args.device == "cuda" else "one process per run; peak RSS of the whole process")
            + f". The whole run took {seconds / 60:.1f} min.")


if __name__ == "__main__":
    main()
