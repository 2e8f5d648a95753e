"""Regenerate the measured example in docs/probes.md: SmolLM2-135M-Instruct (CPU, fp32) on
niah_single, 4 trials at 1024 tokens (depths 0.25 and 0.75, seeds 0 and 1).

    python tools/probe_example.py            # print the block
    python tools/probe_example.py --write    # replace the block in docs/probes.md

Every number of the block is computed here from the same measurements run_probe makes
(`measure_niah` per prompt, `niah_grid` for the result), so one set of measurements gives every
retrieval count and span. tests/test_needle.py runs `measure` and `render` and fails when
docs/probes.md holds a different block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "probes.md"
SPEC = "probes/niah_single.toml"
LENGTHS, DEPTHS, SEEDS = [1024], [0.25, 0.75], [0, 1]
BEGIN = "<!-- begin probe_example (written by tools/probe_example.py --write) -->"
END = "<!-- end probe_example -->"


def measure(lm) -> dict:
    """The grid (default settings, as run_probe returns it), its measurements, and a control:
    trial (1024, 0.25, seed 0) with its needle sentence replaced by haystack text."""
    from attnscope.probing import build_prompts, load_spec
    from attnscope.probing.needle import measure_niah, niah_grid

    spec = load_spec(ROOT / SPEC)
    prompts = build_prompts(spec, lm.tokenizer, lengths=LENGTHS, depths=DEPTHS, seeds=SEEDS)
    measured = [measure_niah(lm, p) for p in prompts]
    p = prompts[0]
    n0, n1 = p.spans["needle"]
    ids = list(p.token_ids)
    width = n1 - n0
    ids[n0:n1] = ids[n0 - 3 * width:n0 - 2 * width]  # noise haystack where the needle was
    control = measure_niah(lm, type(p)(**{**p.__dict__, "token_ids": ids}), decode=False)
    return {"spec": spec, "measured": measured, "grid": niah_grid(lm, spec, measured),
            "control": control}


def _final_value(m) -> tuple[float, float, int, int]:
    """(share, uniform, layer, head) of the strongest head on needle_value from the final query."""
    q, s = m.query_sets.index("final"), m.spans.index("needle_value")
    share = m.share[q, s]
    li, h = np.unravel_index(int(np.argmax(share)), share.shape)
    return float(share[li, h]), float(m.uniform[q, s]), int(m.layers[li]), int(h)


def numbers(result: dict) -> dict:
    from attnscope.probing.needle import RETRIEVAL_COUNTS, RETRIEVAL_SPANS, RETRIEVAL_THRESHOLD

    measured = result["measured"]
    trials = []
    for m in measured:
        share, uniform, layer, head = _final_value(m)
        trials.append(dict(length=m.prompt.length, depth=m.prompt.depth_requested, seed=m.prompt.seed,
                           answer=m.prompt.answer[0], generated=m.text, correct=m.correct,
                           head=f"L{layer}.H{head}", share=share, uniform=uniform, ratio=share / uniform,
                           answer_queries=m.answer_queries))
    c_share, c_uniform, c_layer, c_head = _final_value(result["control"])
    p = measured[0].prompt
    value = p.spans["needle_value"][1] - p.spans["needle_value"][0]
    sentence = p.spans["needle"][1] - p.spans["needle"][0]
    correct = [m for m in measured if m.correct]
    variants = {}
    for count in RETRIEVAL_COUNTS:
        for span in RETRIEVAL_SPANS:
            mean = np.mean([m.retrieval_score(count, span) for m in correct], axis=0)
            order = np.argsort(-mean, axis=None, kind="stable")
            top = [(int(measured[0].layers[i // mean.shape[1]]), int(i % mean.shape[1]),
                    float(mean.flat[i])) for i in order[:5]]
            per_trial = [int((m.retrieval_score(count, span) > RETRIEVAL_THRESHOLD).sum()) for m in measured]
            variants[(count, span)] = dict(passing=int((mean > RETRIEVAL_THRESHOLD).sum()), top=top,
                                           per_trial=per_trial)
    grid = result["grid"]
    return dict(trials=trials, n_correct=len(correct), control=dict(share=c_share, uniform=c_uniform,
                head=f"L{c_layer}.H{c_head}", ratio=c_share / c_uniform),
                value_tokens=value, sentence_tokens=sentence, threshold=RETRIEVAL_THRESHOLD,
                variants=variants, passes=int(grid.attrs["prompt_passes"]),
                n_heads=int(grid.sizes["layer"] * grid.sizes["head"]),
                default=(grid.attrs["retrieval_count"], grid.attrs["retrieval_span"]))


def render(n: dict) -> str:
    t = n["trials"]
    lines = [BEGIN, "",
             f"`python tools/probe_example.py` (SmolLM2-135M-Instruct, CPU, fp32; `{SPEC}` at "
             f"{LENGTHS[0]} tokens, depths {' and '.join(f'{d:g}' for d in DEPTHS)}, seeds "
             f"{' and '.join(map(str, SEEDS))}: the same measurements as `run_probe(lm, \"{SPEC}\", "
             f"lengths={LENGTHS}, depths={DEPTHS}, seeds={SEEDS})`; forwards over each whole prompt: "
             f"{n['passes']}):", "",
             "| depth | seed | answer | greedy continuation | correct | `answer` queries | strongest head, final query, value span | share | uniform share | share / uniform |",
             "| ---: | ---: | --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in t:
        lines.append(f"| {r['depth']:g} | {r['seed']} | `{r['answer']}` | `{r['generated']}` | "
                     f"{'yes' if r['correct'] else 'no'} | {r['answer_queries']} | {r['head']} | "
                     f"{r['share']:.3f} | {r['uniform']:.4f} | {r['ratio']:.0f}x |")
    c = n["control"]
    lines += ["", f"- {n['n_correct']} of {len(t)} trials answered correctly; the `answer` query set "
              "holds the decoding steps that wrote the expected value's tokens.",
              f"- Control (depth {t[0]['depth']:g}, seed {t[0]['seed']}, needle sentence replaced by "
              f"haystack text): the strongest head on the same value span from the final query is "
              f"{c['head']} at {c['share']:.4f} = {c['ratio']:.1f}x uniform, against "
              f"{t[0]['ratio']:.0f}x with the needle.",
              f"- Span sizes: the value is {n['value_tokens']} tokens, so one copied digit scores "
              f"1/{n['value_tokens']} = {1 / n['value_tokens']:.3f} on the value span, above the "
              f"{n['threshold']:g} threshold; the needle sentence is {n['sentence_tokens']} tokens "
              f"(one copy: 1/{n['sentence_tokens']} = {1 / n['sentence_tokens']:.3f}; all "
              f"{n['value_tokens']} digits: {n['value_tokens'] / n['sentence_tokens']:.3f}).", "",
              f"Retrieval heads: mean score over the {n['n_correct']} correct trials, heads above "
              f"{n['threshold']:g} (of {n['n_heads']}), and the five strongest; the default is "
              f"`retrieval_count=\"{n['default'][0]}\"`, `retrieval_span=\"{n['default'][1]}\"`.", "",
              "| count | span | heads > threshold | per trial | strongest (mean score) |",
              "| --- | --- | ---: | --- | --- |"]
    for (count, span), v in n["variants"].items():
        top = ", ".join(f"L{layer}.H{head} {s:.2f}" for layer, head, s in v["top"])
        lines.append(f"| `{count}` | `{span}` | {v['passing']} | {', '.join(map(str, v['per_trial']))} | {top} |")
    lines += ["", END]
    return "\n".join(lines)


def doc_block(text: str) -> str | None:
    """The block currently in docs/probes.md (None if it has none)."""
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN):text.index(END) + len(END)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="replace the block in docs/probes.md")
    args = ap.parse_args(argv)
    import attnscope

    block = render(numbers(measure(attnscope.load("smollm2"))))
    print(block)
    if args.write:
        text = DOC.read_text()
        old = doc_block(text)
        if old is None:
            print(f"{DOC} has no {BEGIN!r} ... {END!r} block to replace", file=sys.stderr)
            return 2
        DOC.write_text(text.replace(old, block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
