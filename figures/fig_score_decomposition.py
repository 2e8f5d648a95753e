"""Figure: why a SmolLM2 head attends to its sink — the score of (last query -> token 0) split
over head dimensions and rotary pairs, for the head that puts the most attention on token 0.

Rebuild: python figures/fig_score_decomposition.py --out docs/figures/drilldown
One (layer, head, query, key) from the command line instead: attnscope decompose (docs/drilldown.md)

The head is chosen by the measurement itself: the layer and head with the largest P(query ->
token 0) among layers >= --min-layer, read from `attnscope.topk_keys` (rank of key 0 in each
head's exact top-k); ties go to the lower layer, then the lower head.
"""

import argparse
import shlex
import sys
from pathlib import Path

# use the attnscope of the checkout this script belongs to
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import attnscope  # noqa: E402
from attnscope.errors import AttnscopeError  # noqa: E402
from attnscope.probing.texts import prose  # noqa: E402
from attnscope.report.decomposition import write_decomposition  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="figures/fig_score_decomposition.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the shipped prose (default 2048)")
    p.add_argument("--min-layer", type=int, default=2, help="choose the sink head among layers >= this (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace the figure and its sidecar")
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in
                                   ["figures/fig_score_decomposition.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        lm = attnscope.load("smollm2")
        ids = lm.tokenizer(prose())["input_ids"][:args.tokens]
        q = len(ids) - 1
        layers = list(range(args.min_layer, lm.n_layers))
        top = attnscope.topk_keys(lm, token_ids=ids, queries=[q], k=1, layers=layers)
        p0 = np.where(top["key"].values[:, :, 0, 0] == 0, top["prob"].values[:, :, 0, 0], 0.0)  # [layer, head]
        li, head = np.unravel_index(np.argmax(p0), p0.shape)
        layer = int(top["layer"].values[li])
        dec = attnscope.decompose_score(lm, token_ids=ids, layer=layer, head=int(head), query=q, key=0)
        out = Path(args.out) / f"score_decomposition_smollm2_L{layer}H{int(head)}.png"
        paths = write_decomposition(dec, out, command=command, overwrite=args.overwrite)
    except AttnscopeError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"layer {layer}, head {int(head)}: P(query {q} -> token 0) = {dec.prob:.4f}; score {dec.raw_score:.4f}; "
          f"carrier dims {dec.carriers.tolist()}; carrier pairs "
          f"{[tuple(map(int, dec.rope.pairs[i])) for i in dec.pair_carriers]}")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
