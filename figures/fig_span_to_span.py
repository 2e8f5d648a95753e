"""Figure: span-to-span attention mass on needle-in-a-haystack prompts (question / haystack / needle
/ final position -> needle / needle value / sink), per layer.

Rebuild (the committed figure): python figures/fig_span_to_span.py --model smollm2 --probe niah_single --lengths 2048 --depths 0.25,0.75 --out docs/figures/span_to_span
Data: attnscope.run_probe(..., decode=False) (its `span_to_span` variable); drawing:
attnscope.report.flow_figures.draw_span_to_span.
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
    ap.add_argument("--probe", default="niah_single")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--depths", default="0.25,0.75")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    args = ap.parse_args(argv)

    import attnscope
    from attnscope.report.figures import save_figure
    from attnscope.report.flow_figures import draw_span_to_span, span_records

    lm = attnscope.load(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    ds = attnscope.run_probe(lm, args.probe, lengths=lengths, depths=depths, seeds=seeds, decode=False)
    command = shlex.join(["python", "figures/fig_span_to_span.py", *(argv if argv is not None else sys.argv[1:])])
    n = len(lengths) * len(depths) * len(seeds)
    fig = draw_span_to_span(ds, title=f"{args.model}, {args.probe}: {n} prompts of {args.lengths} tokens "
                                      f"(depths {args.depths})")
    paths = save_figure(fig, args.out, f"span_to_span_{Path(args.model).name}_{args.probe}",
                        store="(computed by the command)", command=command, data=span_records(ds))
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
