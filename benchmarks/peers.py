"""attnscope streaming vs TransformerLens and nnsight: time and peak memory for sink + span mass.

On SmolLM2-135M-Instruct (`attnscope.load("smollm2")`) and the shipped prose
(`attnscope.probing.texts.prose()`, its first T tokens), each configuration computes sink mass
(first 4 keys) and the mass on one 64-token span in the middle of the text, per layer and head,
averaged over queries >= 16:

  sdpa              plain forward of the decoder with sdpa attention, no statistics (baseline)
  attnscope         attnscope.analyze(..., metrics=("sink_mass", "span_mass")): streaming
  transformer_lens  TransformerBridge.run_with_cache(names_filter=hook_pattern), then reductions
                    of the cached [B, H, T, T] patterns
  nnsight           a trace that saves every layer's attention weights (self_attn.output[1],
                    eager attention), then the same reductions

Every (configuration, length) runs in its own subprocess whose address space is capped
(RLIMIT_AS, default 20 GiB of the 24 GiB machine), so running out of memory is an error in that
child, not a machine-wide OOM. The child times `repeats` runs after loading the model (load and
setup are not timed) and reports the median, the peak RSS of the whole process
(getrusage ru_maxrss, which includes the loaded model), and its statistics, which the parent
compares with attnscope's. Once a peer fails at a length it is not run at longer ones.

    python benchmarks/peers.py                       # 1K/2K/4K/8K, writes docs/benchmarks.md
    python benchmarks/peers.py --lengths 1024 --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from markdown_section import write_section

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("attnscope", "sdpa", "transformer_lens", "nnsight")
PEERS = ("transformer_lens", "nnsight")
SINK_TOKENS = 4
MIN_QUERY = 16
SPAN_LEN = 64
SECTION = "## Against TransformerLens and nnsight"


# ----------------------------------------------------------------------------- child


def _span(T: int) -> tuple[int, int]:
    return T // 2, T // 2 + SPAN_LEN


def _from_patterns(patterns, T):
    """sink and span mass [layer, head] from a list of [1, H, T, T] patterns."""
    import numpy as np

    s0, s1 = _span(T)
    sink, span = [], []
    for P in patterns:
        P = P[0, :, MIN_QUERY:, :].float()
        sink.append(P[..., :SINK_TOKENS].sum(-1).mean(-1).numpy())
        span.append(P[..., s0:s1].sum(-1).mean(-1).numpy())
    return np.stack(sink), np.stack(span)


def child(config: str, T: int, repeats: int, limit_gb: float) -> dict:
    import resource

    if limit_gb > 0:
        cap = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import warnings

    warnings.filterwarnings("ignore")
    import gc

    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    import attnscope
    from attnscope.probing.texts import prose

    lm = attnscope.load("smollm2")
    ids_list = lm.tokenizer(prose())["input_ids"][:T]
    ids = torch.tensor([ids_list])
    s0, s1 = _span(T)
    n_layers = lm.model.config.num_hidden_layers

    if config == "sdpa":
        lm.model.set_attn_implementation("sdpa")

        def run():
            with torch.no_grad():
                lm.model.model(input_ids=ids, use_cache=False)
            return None
    elif config == "attnscope":
        def run():
            ds = attnscope.analyze(lm, token_ids=ids_list, metrics=("sink_mass", "span_mass"),
                                   spans={"needle": (s0, s1)}, min_query_position=MIN_QUERY,
                                   sink_tokens=SINK_TOKENS)
            return ds.sink_mass.values, ds.span_mass.sel(span="needle").values
    elif config == "transformer_lens":
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers("smollm2", hf_model=lm.model,
                                                     tokenizer=lm.tokenizer)

        def run():
            with torch.no_grad():
                _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"),
                                                 return_type=None)
            pats = [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layers)]
            return _from_patterns(pats, T)
    elif config == "nnsight":
        import nnsight
        from nnsight.modeling.transformers import TransformersModel

        lm.model.set_attn_implementation("eager")  # sdpa returns no weights
        nm = TransformersModel(lm.model, tokenizer=lm.tokenizer)

        def run():
            with torch.no_grad(), nm.trace(ids):
                pats = nnsight.save([nm.model.layers[i].self_attn.output[1] for i in range(n_layers)])
            return _from_patterns(pats, T)
    else:
        raise SystemExit(f"unknown config {config}")

    # one untimed forward first: the first touches the memory-mapped weights and warms kernels
    with torch.no_grad():
        lm.model.model(input_ids=ids[:, :64], use_cache=False)
    times, result, status, error = [], None, "ok", ""
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        try:
            result = run()
        except (RuntimeError, MemoryError) as exc:  # RLIMIT_AS makes allocations fail here
            msg = str(exc)
            oom = isinstance(exc, MemoryError) or re.search(r"alloc|memory|DefaultCPUAllocator", msg, re.I)
            status, error = ("oom" if oom else "error"), msg.splitlines()[0][:200] if msg else type(exc).__name__
            break
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    out = {"config": config, "T": T, "status": status, "error": error, "times": times,
           "peak_rss_gib": peak}
    if result is not None:
        out["sink"] = result[0].tolist()
        out["span"] = result[1].tolist()
    return out


# ----------------------------------------------------------------------------- parent


def run_child(config, T, repeats, limit_gb, timeout):
    cmd = [sys.executable, __file__, "--child", config, str(T), str(repeats), str(limit_gb)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"config": config, "T": T, "status": "timeout", "error": f"> {timeout} s",
                "times": [], "peak_rss_gib": None, "wall": time.time() - t0}
    line = next((ln for ln in p.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if line is None:
        # killed by a signal (e.g. the kernel OOM killer) or crashed before reporting
        status = "killed" if p.returncode < 0 else "error"
        return {"config": config, "T": T, "status": status,
                "error": f"exit {p.returncode}: " + (p.stderr.strip().splitlines() or [""])[-1][:200],
                "times": [], "peak_rss_gib": None, "wall": time.time() - t0}
    res = json.loads(line[len("RESULT "):])
    res["wall"] = time.time() - t0
    return res


def _extrapolate(results, cfg, T):
    """(predicted peak GiB, T1, T2) from the two longest successful runs, peak = a + b*T^2."""
    ok = sorted((r["T"], r["peak_rss_gib"]) for r in results
                if r["config"] == cfg and r["status"] == "ok" and r["T"] < T)
    if len(ok) < 2:
        return None
    (t1, m1), (t2, m2) = ok[-2:]
    b = (m2 - m1) / (t2 ** 2 - t1 ** 2)
    return m1 + b * (T ** 2 - t1 ** 2), t1, t2


def fmt_table(results, lengths):
    import numpy as np

    ref = {r["T"]: r for r in results if r["config"] == "attnscope" and r["status"] == "ok"}
    rows = ["| T | configuration | median time (s) | runs | peak RSS (GiB) | time / attnscope | "
            "RSS / attnscope | max abs diff vs attnscope | status |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for T in lengths:
        for cfg in CONFIGS:
            r = next((x for x in results if x["T"] == T and x["config"] == cfg), None)
            if r is None:
                continue
            med = statistics.median(r["times"]) if r["times"] else None
            base = ref.get(T)
            bmed = statistics.median(base["times"]) if base and base["times"] else None
            t_ratio = f"{med / bmed:.2f}x" if med and bmed else "-"
            m_ratio = (f"{r['peak_rss_gib'] / base['peak_rss_gib']:.2f}x"
                       if r.get("peak_rss_gib") and base and r["status"] == "ok" else "-")
            diff = "-"
            if "sink" in r and base and "sink" in base and cfg != "attnscope":
                diff = "{:.1e}".format(max(float(np.abs(np.array(r[k]) - np.array(base[k])).max())
                                           for k in ("sink", "span")))
            status = r["status"] + (f" ({r['error']})" if r.get("error") else "")
            rows.append(f"| {T} | {cfg} | {med:.1f} | {len(r['times'])} | "
                        if med is not None else f"| {T} | {cfg} | - | 0 | ")
            rows[-1] += (f"{r['peak_rss_gib']:.2f} | " if r.get("peak_rss_gib") and r["status"] == "ok"
                         else "- | ") + f"{t_ratio} | {m_ratio} | {diff} | {status} |"
    return "\n".join(rows)


def largest(results):
    out = {}
    for cfg in CONFIGS:
        ok = [r["T"] for r in results if r["config"] == cfg and r["status"] == "ok"]
        fail = [r for r in results if r["config"] == cfg and r["status"] != "ok"
                and (r["status"] != "not run" or "extrapolated" in r.get("error", ""))]
        out[cfg] = (max(ok) if ok else None, min(fail, key=lambda r: r["T"]) if fail else None)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("CONFIG", "T", "REPEATS", "LIMIT_GB"), help=argparse.SUPPRESS)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--repeats", type=int, default=3, help="runs per child up to --short (median)")
    ap.add_argument("--long-repeats", type=int, default=1, help="runs per child above --short")
    ap.add_argument("--short", type=int, default=2048)
    ap.add_argument("--limit-gb", type=float, default=20.0, help="RLIMIT_AS of each child")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per child")
    ap.add_argument("--budget", type=int, default=25 * 60, help="stop starting children after this")
    ap.add_argument("--skip-factor", type=float, default=0.9,
                    help="skip a peer at T when its peak RSS, extrapolated as a + b*T^2 from its two "
                         "longest successful runs, exceeds this fraction of --limit-gb")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "peers.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        cfg, T, rep, lim = args.child
        print("RESULT " + json.dumps(child(cfg, int(T), int(rep), float(lim))), flush=True)
        return

    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for mod in ("transformer_lens", "nnsight"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            versions[mod] = "not installed"
    started = time.time()
    load_before = os.getloadavg()
    results, failed = [], {}
    for T in args.lengths:
        for cfg in args.configs:
            repeats = args.repeats if T <= args.short else args.long_repeats
            if cfg in failed:
                r = {"config": cfg, "T": T, "status": "not run", "error": f"{failed[cfg]} at a shorter length",
                     "times": [], "peak_rss_gib": None}
            elif cfg in PEERS and (pred := _extrapolate(results, cfg, T)) is not None \
                    and pred[0] > args.skip_factor * args.limit_gb:
                r = {"config": cfg, "T": T, "status": "not run",
                     "error": f"extrapolated peak {pred[0]:.0f} GiB > {args.skip_factor:.0%} of the "
                              f"{args.limit_gb:.0f} GiB cap (from T={pred[1]} and {pred[2]})",
                     "times": [], "peak_rss_gib": None, "predicted_gib": pred[0]}
                failed[cfg] = "predicted out of memory"
            elif time.time() - started > args.budget:
                r = {"config": cfg, "T": T, "status": "not run", "error": "time budget spent",
                     "times": [], "peak_rss_gib": None}
            else:
                r = run_child(cfg, T, repeats, args.limit_gb, args.timeout)
                if r["status"] != "ok":
                    failed[cfg] = r["status"]
            results.append(r)
            med = statistics.median(r["times"]) if r["times"] else float("nan")
            print(f"T={T:5d} {cfg:17s} {r['status']:8s} median {med:7.1f} s  "
                  f"peak {r.get('peak_rss_gib') or float('nan'):6.2f} GiB  {r.get('error', '')}", flush=True)
    total = time.time() - started
    meta = {"versions": versions, "cpus": os.cpu_count(), "load_before": load_before,
            "load_after": os.getloadavg(), "total_s": total, "limit_gb": args.limit_gb,
            "machine": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = fmt_table(results, args.lengths)
    print(table)
    if not args.no_write:
        write_section(args.doc, SECTION, render(results, meta, table, args))


def render(results, meta, table, args) -> str:
    reach = largest(results)
    lines = []
    for cfg in CONFIGS:
        ok, fail = reach[cfg]
        where = (f"; at {fail['T']}: {fail['status']} ({fail.get('error', '')})" if fail else "")
        lines.append(f"- {cfg}: largest length measured {ok if ok else 'none'}{where}")
    v = meta["versions"]
    return f"""Measured {meta['date']} by `python benchmarks/peers.py` (raw numbers in `benchmarks/peers.json`).
SmolLM2-135M-Instruct (fp32, CPU) on the first T tokens of the shipped prose; every configuration
computes sink mass (first {SINK_TOKENS} keys) and the mass on a {SPAN_LEN}-token span at T/2 per layer
and head, averaged over queries >= {MIN_QUERY}; `sdpa` is the plain forward with no statistics.
Each (configuration, T) ran in its own subprocess capped at {meta['limit_gb']:.0f} GiB of address
space (RLIMIT_AS); time is the median of {args.repeats} runs up to T = {args.short} and a single run
above it (to keep the whole benchmark under ~25 min on the shared machine; one run at
8K takes minutes); load, setup and one short warm-up forward are not timed. Peak RSS is
the whole child process (model included). "max abs diff" compares each peer's numbers with
attnscope's.

**Machine and noise.** {meta['cpus']} CPUs shared with other workers (load average
{meta['load_before'][0]:.1f} when the run started, {meta['load_after'][0]:.1f} when it ended), 24 GiB RAM,
torch {v['torch']}, transformers {v['transformers']}, transformer-lens {v['transformer_lens']},
nnsight {v['nnsight']}. All configurations were measured in the same run on the same loaded
machine, interleaved by length, so ratios within a length are more trustworthy than absolute
seconds. The whole run took {meta['total_s'] / 60:.1f} min.

{table}

Largest length each reaches within {meta['limit_gb']:.0f} GiB:

{chr(10).join(lines)}

Why: both peers hold every layer's T x T pattern at once (TransformerLens in its cache, nnsight in
the saved values): 30 layers x 9 heads x T^2 x 4 bytes = 1.1 GiB at 1K, 4.2 GiB at 2K, 16.9 GiB
at 4K, 67.5 GiB at 8K, on top of the eager attention that computes them. attnscope never builds
a pattern: each layer hands over q, k and the row log-sum-exp from the fused kernel, and sink
and span mass read only the keys they need (O(T x |keys|) per head). See docs/backends.md for
running attnscope *through* TransformerLens or nnsight instead.
"""


if __name__ == "__main__":
    main()
