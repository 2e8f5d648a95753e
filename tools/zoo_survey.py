"""Survey every causal-LM family of the installed transformers: is attnscope EXACT, REFUSED,
WRONG or CRASH on a tiny random model of it (or is the family SKIPped: not a text decoder)?

    PYTHONPATH=. python tools/zoo_survey.py                  # all families, table + JSON
    PYTHONPATH=. python tools/zoo_survey.py llama gpt_oss    # some families
    PYTHONPATH=. python tools/zoo_survey.py --json out.json --no-load --kernel flex

Each family runs in its own try (a zoo that cannot build a family reports BUILD_ERROR); the
JSON holds, per family: status, features, the max error per path and quantity, the reason,
when a refusal came, the keyword arguments the family passes to the attention function, and
the seconds it took. `attention_kwargs` at the top lists every keyword and the families that
pass it (the engine's accepted-kwarg contract is defined from it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path


def _quiet() -> None:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("attnscope").setLevel(logging.ERROR)
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    del transformers


def survey(types: list[str], *, through_load: bool = True, kernel: str = "auto") -> list[dict]:
    from attnscope import conformance as C

    rows = []
    for mt in types:
        start = time.perf_counter()
        try:
            row = C.check_family(mt, through_load=through_load, kernel=kernel).to_json()
        except Exception as exc:  # noqa: BLE001 - the zoo could not build this family
            row = {"name": mt, "status": C.BUILD_ERROR, "reason": f"{type(exc).__name__}: "
                   f"{(str(exc).strip().splitlines() or [''])[-1][:300]}", "features": [], "errors": {},
                   "attention_kwargs": {}, "paths": []}
        row["model_type"] = row.pop("name")
        row["seconds"] = round(time.perf_counter() - start, 3)
        rows.append(row)
        print(f"{mt:26s} {row['status']:11s} {row['seconds']:6.2f}s  "
              f"{','.join(row['features'])[:60]:60s} {row['reason'][:150]}", flush=True)
    return rows


def known_broken_reason(row: dict) -> str:
    """One line for tests/test_families.py: status, the first failing path, the features."""
    reason = row["reason"].split(";")[0].replace(" (tolerance 0.0001)", "").replace(" (tolerance 1e-05)", "")
    feats = [f for f in row["features"] if f not in ("gqa", "moe")]
    return f"{row['status']} {reason[:110]}" + (f" [{','.join(feats)}]" if feats else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: every causal-LM type)")
    parser.add_argument("--json", default="zoo_survey.json", help="where to write the results")
    parser.add_argument("--no-load", action="store_true", help="skip the attnscope.load paths")
    parser.add_argument("--kernel", default="auto",
                        help="force attnscope's attention kernel (auto, flex, cpu_flash, grouped, reference)")
    parser.add_argument("--known-broken", action="store_true",
                        help="also print the KNOWN_BROKEN table of tests/test_families.py for these results")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from attnscope import zoo

    torch.set_num_threads(1)  # tiny models: more threads only spin on a shared CPU
    _quiet()
    types = args.types or zoo.causal_lm_types()
    start = time.perf_counter()
    rows = survey(types, through_load=not args.no_load, kernel=args.kernel)
    total = time.perf_counter() - start

    counts = Counter(r["status"] for r in rows)
    kwargs: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        for k in r.get("attention_kwargs", {}):
            kwargs[k].append(r["model_type"])
    print("\n" + ", ".join(f"{s} {n}" for s, n in sorted(counts.items())) + f"  ({len(rows)} types, "
          f"{total:.1f} s; slowest {max(rows, key=lambda r: r['seconds'])['model_type']})")
    print("attention-function kwargs:")
    for k, fams in sorted(kwargs.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        print(f"  {k:28s} {len(fams):3d}  {' '.join(fams) if len(fams) <= 12 else ''}")
    out = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
           "kernel": args.kernel,
           "total_seconds": round(total, 1), "counts": dict(sorted(counts.items())),
           "attention_kwargs": {k: sorted(v) for k, v in sorted(kwargs.items())}, "families": rows}
    if args.known_broken:
        print("KNOWN_BROKEN = {")
        for r in rows:
            if r["status"] in ("WRONG", "CRASH"):
                print(f"    {json.dumps(r['model_type'])}: {json.dumps(known_broken_reason(r))},")
        print("}")
    Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
