"""Figure: what a KV cache keeps - attention mass kept, loss increase and needle retrieval vs cache
budget, one line per policy (StreamingLLM sinks + recent window, a plain window, static top-k).

Rebuild (the committed figure): python figures/fig_policies.py --model smollm2 --tokens 2048 --probe niah_single --probe-lengths 1024 --probe-depths 0.25,0.75 --out docs/figures/policies
Same data and drawing as `attnscope policies -m MODEL -f TEXT --out DIR` (attnscope.policies), on the
first N tokens of the shipped prose.
"""

import argparse
import shlex
import sys
from pathlib import Path

# use the attnscope of the checkout this script belongs to
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=2048, help="first N tokens of the shipped prose")
    ap.add_argument("--policies", default="streaming,window,static_topk")
    ap.add_argument("--budgets", default=None, help="comma-separated (default: powers of two to half the input)")
    ap.add_argument("--probe", default=None, help="a NIAH probe for needle retrieval under each cache")
    ap.add_argument("--probe-lengths", default=None)
    ap.add_argument("--probe-depths", default=None)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--result", type=Path, default=None, help="also save the Dataset (HDF5) here")
    args = ap.parse_args(argv)

    import attnscope
    from attnscope.policies import policy_figure, run_policies
    from attnscope.probing.texts import prose

    lm = attnscope.load(args.model)
    ids = lm.tokenizer(prose())["input_ids"][:args.tokens]
    ints = (lambda s: None if s is None else [int(x) for x in s.split(",")])
    ds = run_policies(lm, ids, args.policies.split(","), ints(args.budgets), probe=args.probe,
                      probe_lengths=ints(args.probe_lengths),
                      probe_depths=None if args.probe_depths is None else [float(x) for x in args.probe_depths.split(",")])
    command = shlex.join(["python", "figures/fig_policies.py", *(argv if argv is not None else sys.argv[1:])])
    store = "(computed by the command; the plotted values are in this sidecar's data)"
    if args.result is not None:
        from attnscope.store.hdf5 import save_result

        store = str(save_result(ds, args.result, overwrite=True))
    paths = policy_figure(ds, args.out, command=command, store=store,
                          title=f"{args.model}: what a KV cache keeps ({len(ids)} tokens of prose)")
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
