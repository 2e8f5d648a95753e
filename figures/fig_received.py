"""Figure: attention received by every key (rbar_j per layer and key position) and the heavy hitters.

Rebuild (the committed figure): python figures/fig_received.py --model smollm2 --tokens 2048 --out docs/figures/received
Data: attnscope.analyze(..., metrics=("received",)) on the first N tokens of the shipped prose;
drawing: attnscope.report.flow_figures.draw_received.
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
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--top", type=int, default=12, help="heavy hitters shown")
    args = ap.parse_args(argv)

    import attnscope
    from attnscope.probing.texts import prose
    from attnscope.report.figures import save_figure
    from attnscope.report.flow_figures import draw_received, received_records

    lm = attnscope.load(args.model)
    ids = lm.tokenizer(prose())["input_ids"][:args.tokens]
    ds = attnscope.analyze(lm, token_ids=ids, metrics=("received",))
    tokens = [lm.tokenizer.decode([t]) for t in ids]
    command = shlex.join(["python", "figures/fig_received.py", *(argv if argv is not None else sys.argv[1:])])
    fig = draw_received(ds, tokens, title=f"{args.model}: attention received per key ({len(ids)} tokens of prose)",
                        top=args.top)
    paths = save_figure(fig, args.out, f"received_{Path(args.model).name}", store="(computed by the command)",
                        command=command, data=received_records(ds, tokens, args.top),
                        extra={"received_pass": ds.attrs["received_pass_requested"], "n_tokens": len(ids)})
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
