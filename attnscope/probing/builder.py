"""Build exact-length probe prompts from a ProbeSpec and a model's tokenizer.

Guarantees (see docs/probes.md):
- `len(prompt.token_ids) == prompt.length == target`, counted with the tokenizer's own
  special tokens (a BOS it adds counts).
- Needles sit at sentence boundaries; the first target needle's actual depth is within
  `spec.grid.depth_tolerance` of the requested depth, or ProbeBuildError is raised.
- Spans are token index ranges [start, end) obtained from character offsets
  (`return_offsets_mapping`): a token that overlaps a span's characters at all is in the span,
  so spans stay correct when the tokenizer merges across a boundary (they may then include a
  neighbouring character, e.g. a leading space).
- The same spec, tokenizer, length, depth and seed give the same prompt.

Method: the haystack is a character window [start, end) over a sentence stream (repeated noise,
prose, or generated distractor needles). Needles are spliced in at sentence starts; the window
end is then searched (word boundaries first, single characters if a word jumps over the target)
until the tokenised prompt has exactly the target length, and the placement is re-checked.
"""
from __future__ import annotations

import bisect
import random
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from attnscope.errors import InputTooLongError, ProbeBuildError
from attnscope.probing.spec import ProbeSpec
from attnscope.probing.texts import load_text
from attnscope.validate import check_seeds

# Key and value words (RULER uses random adjective-noun keys). Plain, common, single-token-ish
# English words that are unlikely to be confused with one another.
_ADJECTIVES = (
    "amber ancient bitter bold brave bright calm clever cold crimson curious dark eager early "
    "faint fancy fierce gentle golden grand green hidden hollow humble icy jolly keen lively "
    "lonely loud lucky mellow misty modest narrow noble odd pale patient plain proud quick quiet "
    "rapid rare rough royal rusty sharp silent silver sleepy slow smooth solid steady stormy "
    "strange sunny swift tall tender tiny vast violet warm wild wise witty young").split()
_NOUNS = (
    "anchor apple arrow badger banjo barrel beacon biscuit blanket bottle bridge candle canyon "
    "castle cedar comet copper cottage crystal desert dolphin dragon falcon feather forest "
    "fountain garden glacier harbor helmet island jacket kettle ladder lantern lemon magnet "
    "meadow mirror mountain needle orchard otter paddle parrot pebble pepper pillow planet "
    "pocket puzzle quarry rabbit ribbon river saddle scarf shovel signal spider spoon statue "
    "teapot thimble tiger tunnel valley violin wagon walnut whistle window").split()

_SENTENCE_START = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)|\n\s*\n\s*(?=\S)")
_WORD_END = re.compile(r"\S(?=\s|$)")


@dataclass
class Prompt:
    """One built prompt with its provenance and token spans (end-exclusive)."""
    text: str
    token_ids: list[int]
    length: int
    depth_requested: float
    depth_actual: float
    seed: int
    spans: dict[str, tuple[int, int]]
    answer: list[str]
    spec_hash: str
    spec_name: str = ""
    task: str = "niah"
    needles: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_text: bool = False, with_ids: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["spans"] = {k: list(v) for k, v in self.spans.items()}
        if not with_text:
            d.pop("text")
        if not with_ids:
            d.pop("token_ids")
        return d


# ---------------------------------------------------------------- tokenizer access

class _Tok:
    """The few tokenizer calls the builder needs, with offsets."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "is_fast", False):
            raise ProbeBuildError(
                f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; the builder needs "
                "character offsets (return_offsets_mapping). Load it with use_fast=True or wrap a "
                "tokenizers.Tokenizer in transformers.PreTrainedTokenizerFast(tokenizer_object=...).")
        self.tk = tokenizer
        self.calls = 0

    def encode(self, text: str, special: bool = True) -> tuple[list[int], list[tuple[int, int]], list[int]]:
        self.calls += 1
        enc = self.tk(text, add_special_tokens=special, return_offsets_mapping=True,
                      return_special_tokens_mask=True, verbose=False)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], list(enc["special_tokens_mask"])

    def length(self, text: str) -> int:
        self.calls += 1
        return len(self.tk(text, add_special_tokens=True, verbose=False)["input_ids"])


def char_span_to_tokens(offsets: Sequence[tuple[int, int]], special: Sequence[int],
                        start: int, end: int) -> tuple[int, int]:
    """Token range [first, last+1) of the tokens whose characters overlap [start, end).

    Special tokens (BOS/EOS, zero-width) never belong to a span."""
    hits = [i for i, (s, e) in enumerate(offsets)
            if not special[i] and e > s and s < end and e > start]
    if not hits:
        raise ProbeBuildError(f"no token covers characters [{start}, {end}); the tokenizer's "
                              "offsets do not map back to the text")
    return hits[0], hits[-1] + 1


def _max_context(tokenizer: Any, max_context: int | None) -> int | None:
    if max_context is not None:
        return max_context
    m = getattr(tokenizer, "model_max_length", None)
    # transformers uses a huge sentinel (1e30) when the length is unknown
    return int(m) if isinstance(m, int) and 0 < m < 10_000_000 else None


# ---------------------------------------------------------------- needle material

def _item(kind: str, rng: random.Random, digits: int) -> str:
    if kind == "numbers":
        return str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return rng.choice(_NOUNS)


def _key(kind: str, rng: random.Random, digits: int) -> str:
    if kind == "words":
        return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    return _item(kind, rng, digits)


def _distinct(make: Callable[[], str], n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    for _ in range(n * 1000):
        if len(out) == n:
            break
        x = make()
        if x not in taken:
            taken.add(x)
            out.append(x)
    if len(out) < n:
        raise ProbeBuildError(f"could not draw {n} distinct needle items; use numbers or uuids, "
                              "or fewer keys/values")
    return out


@dataclass
class _Needle:
    key: str
    value: str
    text: str
    role: str  # "target" (its key is queried) or "distractor"
    frac: float  # requested depth (needle 0) or its seeded random depth


def _needles(spec: ProbeSpec, seed: int, depth: float) -> tuple[list[_Needle], list[str], list[str]]:
    n = spec.needle
    rng = random.Random(f"attnscope-needles:{seed}")
    taken: set[str] = set()
    keys = _distinct(lambda: _key(n.key_type, rng, n.number_digits), n.num_keys, taken)
    values = _distinct(lambda: _item(n.value_type, rng, n.number_digits), n.num_keys * n.num_values, taken)
    needles = []
    for ki, k in enumerate(keys):
        for vi in range(n.num_values):
            v = values[ki * n.num_values + vi]
            text = n.template.format(key=k, value=v, value_kind=spec.value_kind)
            role = "target" if ki < n.num_queries else "distractor"
            needles.append(_Needle(k, v, text, role, rng.random()))
    first, rest = needles[0], needles[1:]
    rng.shuffle(rest)
    first.frac = depth
    queried = keys[: n.num_queries]
    answer = [values[ki * n.num_values + vi] for ki in range(n.num_queries) for vi in range(n.num_values)]
    return [first] + rest, queried, answer


def _join_query(keys: list[str]) -> str:
    if len(keys) == 1:
        return keys[0]
    if len(keys) == 2:
        return f"{keys[0]} and {keys[1]}"
    return ", ".join(keys[:-1]) + f", and {keys[-1]}"


# ---------------------------------------------------------------- haystack streams

def _sentence_starts(text: str, lo: int = 0) -> list[int]:
    starts = [lo] if text[lo:lo + 1].strip() else []
    starts += [m.end() for m in _SENTENCE_START.finditer(text, lo)]
    return sorted(set(starts))


class _Stream:
    """A long haystack string with its sentence starts and word ends."""

    def __init__(self, text: str, start: int = 0):
        self.text = text
        self.start = start
        self.sentence_starts = _sentence_starts(text, start)
        self.word_ends = [m.end() for m in _WORD_END.finditer(text, start)]


def _noise_stream(noise: str, chars: int) -> _Stream:
    unit = noise.strip()
    reps = chars // (len(unit) + 1) + 2
    return _Stream(" ".join([unit] * reps))


def _needles_stream(spec: ProbeSpec, seed: int, chars: int, exclude: set[str]) -> _Stream:
    n = spec.needle
    rng = random.Random(f"attnscope-haystack-needles:{seed}")
    parts: list[str] = []
    size = 0
    taken = set(exclude)
    while size < chars:
        k = _distinct(lambda: _key(n.key_type, rng, n.number_digits), 1, taken)[0]
        v = _item(n.value_type, rng, n.number_digits)
        s = n.template.format(key=k, value=v, value_kind=spec.value_kind)
        parts.append(s)
        size += len(s) + 1
    return _Stream(" ".join(parts))


# ---------------------------------------------------------------- exact-length fitting

_START_SHIFTS = 8  # window starts (sentences) tried when no window end gives the exact length


class _NoExactCut(ProbeBuildError):
    """No window end gives the exact length for this window start."""


def _fit_end(length_of: Callable[[int], int], ends: list[int], target: int, guess: int,
             what: str) -> int:
    """A window end e (a word end, else any character) with length_of(e) == target.

    length_of is monotone up to tokenizer merge effects of a token or two."""
    if not ends:
        raise ProbeBuildError(f"{what}: the haystack has no words")
    i = min(max(bisect.bisect_left(ends, guess), 0), len(ends) - 1)
    # gallop to a bracket ends[lo] -> <= target < ends[hi]
    step = 8
    lo, hi = i, i
    while length_of(ends[lo]) > target:
        if lo == 0:
            raise ProbeBuildError(f"{what}: even an empty haystack makes the prompt longer than "
                                  f"{target} tokens; use a longer length or shorter templates")
        hi, lo = lo, max(0, lo - step)
        step *= 2
    step = 8
    while hi == lo or length_of(ends[hi]) <= target:
        if length_of(ends[hi]) == target:
            return ends[hi]
        if hi == len(ends) - 1:
            raise ProbeBuildError(f"{what}: the haystack text is too short for {target} tokens "
                                  f"(it ends at {length_of(ends[hi])} tokens); use a longer text "
                                  "or a shorter length")
        lo, hi = hi, min(len(ends) - 1, hi + step)
        step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        n = length_of(ends[mid])
        if n == target:
            return ends[mid]
        if n < target:
            lo = mid
        else:
            hi = mid
    if length_of(ends[lo]) == target:
        return ends[lo]
    # a word jumped over the target. Segmentation is not strictly monotone (unigram models
    # re-segment whole words), so look at nearby word ends first, then at every character
    # between them, widening the neighbourhood
    for radius in (4, 32):
        near = range(max(0, lo - radius), min(len(ends), hi + radius + 1))
        for j in near:
            if length_of(ends[j]) == target:
                return ends[j]
        for j in near:
            if j + 1 < len(ends):
                for e in range(ends[j] + 1, ends[j + 1]):
                    if length_of(e) == target:
                        return e
    raise _NoExactCut(f"{what}: no cut of the haystack gives exactly {target} tokens with this "
                          "tokenizer; try a neighbouring length or another seed")


@dataclass
class _Layout:
    text: str
    spans: dict[str, tuple[int, int]]  # character spans
    needle_spans: list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]  # (needle, key, value)


def _render(head: str, stream: _Stream, end: int, placement: dict[int, list[int]],
            needles: list[_Needle], tail_parts: list[tuple[str, str]]) -> _Layout:
    """head + haystack window (with needles spliced in at sentence starts) + tail."""
    out = [head]
    pos = len(head)
    spans: dict[str, tuple[int, int]] = {}
    nspans: list[Any] = [None] * len(needles)
    hay_start = pos
    cur = stream.start
    for b in sorted(placement):
        chunk = stream.text[cur:b]
        if b == end:
            chunk = chunk.rstrip() + (" " if chunk.strip() else "")
        out.append(chunk)
        pos += len(chunk)
        for ni in placement[b]:
            nd = needles[ni]
            s = pos
            out.append(nd.text)
            pos += len(nd.text)
            ks = s + nd.text.index(nd.key)
            vs = s + nd.text.index(nd.value, ks - s + len(nd.key))
            nspans[ni] = ((s, pos), (ks, ks + len(nd.key)), (vs, vs + len(nd.value)))
            sep = " " if (b < end or ni != placement[b][-1]) else ""
            out.append(sep)
            pos += len(sep)
        cur = b
    chunk = stream.text[cur:end]
    out.append(chunk)
    pos += len(chunk)
    spans["haystack"] = (hay_start, pos)
    for name, part in tail_parts:
        if name:
            spans[name] = (pos, pos + len(part))
        out.append(part)
        pos += len(part)
    return _Layout("".join(out), spans, nspans)


def _place(stream: _Stream, end: int, needles: list[_Needle], tok_at: Callable[[int], int],
           needle_tokens: list[int]) -> dict[int, list[int]]:
    """Sentence start for each needle: needle 0 nearest its requested depth in tokens, the
    others at their seeded random depths."""
    cands = [b for b in stream.sentence_starts if stream.start <= b < end] + [end]
    total = tok_at(end) - tok_at(stream.start)
    others = sum(needle_tokens[1:])
    placement: dict[int, list[int]] = {}
    for ni in range(1, len(needles)):  # distractors/extra targets first: they shift needle 0
        want = needles[ni].frac * total
        b = min(cands, key=lambda c: abs(tok_at(c) - tok_at(stream.start) - want))
        placement.setdefault(b, []).append(ni)
    want0 = needles[0].frac * (total + others)

    def before(c: int) -> int:
        return tok_at(c) - tok_at(stream.start) + sum(
            needle_tokens[ni] for b, lst in placement.items() if b < c for ni in lst)

    # needle 0 may also go between needles that share a sentence start
    slots = [(c, k) for c in cands for k in range(len(placement.get(c, [])) + 1)]

    def before_slot(slot: tuple[int, int]) -> int:
        c, k = slot
        return before(c) + sum(needle_tokens[ni] for ni in placement.get(c, [])[:k])

    b0, k0 = min(slots, key=lambda sl: abs(before_slot(sl) - want0))
    placement.setdefault(b0, []).insert(k0, 0)
    return placement


# ---------------------------------------------------------------- public entry point

def check_grid(spec: ProbeSpec, lengths: Sequence[int] | None = None, depths: Sequence[float] | None = None,
               seeds: Sequence[int] | None = None, max_context: int | None = None):
    """The grid (the spec's unless overridden) as (lengths, depths, seeds), each value checked:
    lengths integers >= 16 and within `max_context`, depths in [0, 1], seeds >= 0; none empty,
    none repeated.
    Needs no tokenizer, so callers run it before a model loads."""
    lengths = list(spec.grid.lengths if lengths is None else lengths)
    depths = list(spec.grid.depths if depths is None else depths)
    seeds = check_seeds(spec.seeds if seeds is None else seeds)
    for name, values in (("lengths", lengths), ("depths", depths)):
        if not values:
            raise ProbeBuildError(f"no {name} given: the grid needs at least one")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:  # a repeat would measure one grid point twice (and collide in the result)
            raise ProbeBuildError(f"{name} {values} repeat {', '.join(f'{v:g}' for v in repeated)}; give each once")
    for L in lengths:
        if isinstance(L, bool) or not isinstance(L, int) or L < 16:
            raise ProbeBuildError(f"length {L!r} is not an integer >= 16 (tokens)")
        if max_context is not None and L > max_context:
            raise InputTooLongError(
                f"probe length {L} tokens exceeds the model's context of {max_context} tokens; "
                f"drop it from --lengths / grid.lengths or pass a larger max_context")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ProbeBuildError(f"depth {d!r} is outside [0, 1] (fraction of the haystack)")
    return lengths, depths, seeds


def build_prompts(spec: ProbeSpec, tokenizer: Any, *, lengths: Sequence[int] | None = None,
                  depths: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
                  max_context: int | None = None) -> list[Prompt]:
    """Every prompt of the grid lengths x depths x seeds (the spec's grid unless overridden)."""
    tok = _Tok(tokenizer)
    lengths, depths, seeds = check_grid(spec, lengths, depths, seeds, _max_context(tokenizer, max_context))
    cache: dict[str, Any] = {}
    out = []
    for L in lengths:
        for d in depths:
            for s in seeds:
                if spec.task == "natural_text":
                    out.append(_build_natural(spec, tok, L, d, s, cache))
                else:
                    out.append(_build_niah(spec, tok, L, d, s, cache))
    return out


def _build_niah(spec: ProbeSpec, tok: _Tok, L: int, depth: float, seed: int, cache: dict) -> Prompt:
    what = f"{spec.name} (length {L}, depth {depth}, seed {seed})"
    needles, queried, answer = _needles(spec, seed, depth)
    vk = spec.value_kind
    p = spec.prompt
    sep = p.separator
    prefix = p.prefix.format(value_kind=vk)
    head = prefix + sep if prefix else ""
    query = _join_query(queried)
    question = p.question.format(value_kind=vk, query=query)
    answer_prefix = p.answer_prefix.format(value_kind=vk, query=query)
    tail = [("", sep), ("question", question)]
    if answer_prefix:
        tail += [("", " "), ("answer_prefix", answer_prefix)]

    # the haystack stream, long enough for L tokens (about 4 characters per token in English;
    # grown when a tokenizer needs more, e.g. digits or hex split into single characters)
    htype = spec.haystack.type
    chars = 6 * L + 2000
    while True:
        if htype == "noise":
            stream = _noise_stream(spec.haystack.noise, chars)
        elif htype == "needles":
            stream = _needles_stream(spec, seed, chars, {n.key for n in needles})
        else:
            stream = _prose_stream(spec, tok, L, seed, cache, what)
        if htype == "prose":
            # token ends of the whole text (cached), those after the window start
            all_ends = _prose_tokens(spec, tok, cache)[2]
            tok_ends = all_ends[bisect.bisect_right(all_ends, stream.start):]
            break
        _, offs, _ = tok.encode(stream.text, special=False)
        tok_ends = [e for _, e in offs]
        if len(tok_ends) >= L + 64:
            break
        chars *= 2

    def tok_at(c: int) -> int:  # haystack tokens that end at or before char c
        return bisect.bisect_right(tok_ends, c)

    needle_tokens = [len(tok.encode(" " + n.text, special=False)[0]) for n in needles]
    fixed = tok.length(head + "".join(t for _, t in tail))
    budget = L - fixed - sum(needle_tokens)
    if budget <= 0:
        raise ProbeBuildError(f"{what}: templates and needles alone take {fixed + sum(needle_tokens)} "
                              f"tokens, more than the target {L}; use a longer length")
    if budget >= len(tok_ends):
        raise ProbeBuildError(f"{what}: the haystack holds {len(tok_ends)} tokens, fewer than the "
                              f"{budget} needed; use a longer text or a shorter length")
    # Fit the window end for exact length; a tokenizer can jump over the target at every
    # possible end (e.g. '.\n\nA' adding 3 tokens), so then start the window a sentence later.
    starts = [b for b in stream.sentence_starts if b >= stream.start][:_START_SHIFTS]
    for shift, st in enumerate(starts):
        stream.start = st
        first = tok_at(st)
        if first + budget > len(tok_ends):
            break
        try:
            end, placement = _fit_niah(stream, tok, head, tail, needles, tok_at, needle_tokens,
                                       L, tok_ends[first + budget - 1], what)
            break
        except _NoExactCut:
            if shift == len(starts) - 1:
                raise
    else:  # pragma: no cover - the loop always breaks or raises
        raise _NoExactCut(what)
    lay = _render(head, stream, end, placement, needles, tail)
    ids, offs, special = tok.encode(lay.text)
    if len(ids) != L:  # _fit_end checked this; a mismatch is a bug, not a user error
        raise AssertionError(f"{what}: built {len(ids)} tokens, wanted {L}")
    spans = {name: char_span_to_tokens(offs, special, *cs) for name, cs in lay.spans.items()}
    meta = []
    for i, (nd, (ns, ks, vs)) in enumerate(zip(needles, lay.needle_spans)):
        spans[f"needle.{i}"] = char_span_to_tokens(offs, special, *ns)
        spans[f"needle_key.{i}"] = char_span_to_tokens(offs, special, *ks)
        spans[f"needle_value.{i}"] = char_span_to_tokens(offs, special, *vs)
        meta.append({"key": nd.key, "value": nd.value, "role": nd.role, "text": nd.text})
    spans["needle"] = spans["needle.0"]
    spans["needle_key"] = spans["needle_key.0"]
    spans["needle_value"] = spans["needle_value.0"]
    spans["answer_position"] = (L - 1, L)
    hs, he = spans["haystack"]
    for i, m in enumerate(meta):
        ns, ne = spans[f"needle.{i}"]
        m["depth"] = (ns - hs) / max(1, (he - hs) - (ne - ns))
    depth_actual = meta[0]["depth"]
    tol = spec.grid.depth_tolerance
    if abs(depth_actual - depth) > tol + 1e-12:
        raise ProbeBuildError(
            f"{what}: the nearest sentence boundary puts the needle at depth {depth_actual:.3f}, "
            f"more than grid.depth_tolerance = {tol} from {depth}; raise the tolerance, use a "
            "longer length, or a haystack with shorter sentences")
    return Prompt(text=lay.text, token_ids=ids, length=L, depth_requested=depth,
                  depth_actual=depth_actual, seed=seed, spans=spans, answer=answer,
                  spec_hash=spec.content_hash, spec_name=spec.name, task=spec.task, needles=meta)


def _fit_niah(stream: _Stream, tok: _Tok, head: str, tail: list[tuple[str, str]],
              needles: list[_Needle], tok_at: Callable[[int], int], needle_tokens: list[int],
              L: int, guess: int, what: str) -> tuple[int, dict[int, list[int]]]:
    """(window end, placement) with an exact-length prompt; placement and end are refitted
    together until neither changes (a needle moves to the new nearest boundary)."""
    ends = [e for e in stream.word_ends if e > stream.start]
    end = guess
    placement = _place(stream, end, needles, tok_at, needle_tokens)
    for _ in range(4):
        def length_of(e: int, placement=placement) -> int:
            pl: dict[int, list[int]] = {}
            for b, v in sorted(placement.items()):
                pl.setdefault(min(b, e), []).extend(v)
            return tok.length(_render(head, stream, e, pl, needles, tail).text)
        end = _fit_end(length_of, ends, L, end, what)
        new = _place(stream, end, needles, tok_at, needle_tokens)
        if new == placement:
            return end, placement
        placement = new
    # the placement keeps moving with the end: keep the last one, fit the end to it
    clipped: dict[int, list[int]] = {}
    for b, v in sorted(placement.items()):
        clipped.setdefault(min(b, end), []).extend(v)
    if tok.length(_render(head, stream, end, clipped, needles, tail).text) != L:
        raise _NoExactCut(f"{what}: needle placement and window end do not settle")
    return end, clipped


def _prose_tokens(spec: ProbeSpec, tok: _Tok, cache: dict) -> tuple[str, list[int], list[int]]:
    """The prose text, its sentence starts and its token end offsets (cached per build call)."""
    key = "prose:" + spec.haystack.text
    if key not in cache:
        text = load_text(spec.haystack.text)
        _, offs, _ = tok.encode(text, special=False)
        cache[key] = (text, _sentence_starts(text), [e for _, e in offs])
    return cache[key]


def _prose_stream(spec: ProbeSpec, tok: _Tok, L: int, seed: int, cache: dict, what: str) -> _Stream:
    text, starts, tok_ends = _prose_tokens(spec, tok, cache)
    # sentence starts that leave at least L tokens of text after them (the window never wraps)
    need = L + 16
    ok = [s for s in starts if len(tok_ends) - bisect.bisect_right(tok_ends, s) >= need]
    if not ok:
        raise ProbeBuildError(f"{what}: text {spec.haystack.text!r} has {len(tok_ends)} tokens, too "
                              f"few for a {L}-token haystack; use a longer text or a shorter length")
    start = random.Random(f"attnscope-prose-start:{seed}").choice(ok)
    return _Stream(text, start)


def _build_natural(spec: ProbeSpec, tok: _Tok, L: int, offset: float, seed: int, cache: dict) -> Prompt:
    """A prompt of exactly L tokens cut from prose, starting at the sentence nearest `offset`
    (fraction of the text that can start an L-token window), moved on by `seed` sentences."""
    what = f"{spec.name} (length {L}, offset {offset}, seed {seed})"
    text, starts, tok_ends = _prose_tokens(spec, tok, cache)
    p = spec.prompt
    head = p.prefix + p.separator if p.prefix else ""
    tail = [("", p.separator), ("question", p.question)] if p.question else []
    need = L + 16
    ok = [s for s in starts if len(tok_ends) - bisect.bisect_right(tok_ends, s) >= need]
    if not ok:
        raise ProbeBuildError(f"{what}: text {spec.haystack.text!r} has {len(tok_ends)} tokens, too "
                              f"few for {L}; use a longer text or a shorter length")
    target_char = offset * ok[-1]
    i = min(range(len(ok)), key=lambda j: abs(ok[j] - target_char))
    start = ok[min(i + seed, len(ok) - 1)]
    j = ok.index(start)
    # if no window end gives the exact length, try the next sentences as starts (or earlier
    # ones near the end of the text)
    order = ok[j:j + _START_SHIFTS]
    order += ok[max(0, j - (_START_SHIFTS - len(order))):j][::-1]
    for shift, start in enumerate(order):
        stream = _Stream(text, start)
        first_tok = bisect.bisect_right(tok_ends, start)
        guess = tok_ends[min(first_tok + L - 1, len(tok_ends) - 1)]
        ends = [e for e in stream.word_ends if e > start]

        def length_of(e: int) -> int:
            return tok.length(_render(head, stream, e, {}, [], tail).text)

        try:
            end = _fit_end(length_of, ends, L, guess, what)
            break
        except _NoExactCut:
            if shift == len(order) - 1:
                raise
    lay = _render(head, stream, end, {}, [], tail)
    ids, offs, special = tok.encode(lay.text)
    if len(ids) != L:
        raise AssertionError(f"{what}: built {len(ids)} tokens, wanted {L}")
    spans = {("text" if n == "haystack" else n): char_span_to_tokens(offs, special, *cs)
             for n, cs in lay.spans.items()}
    return Prompt(text=lay.text, token_ids=ids, length=L, depth_requested=offset,
                  depth_actual=start / max(1, ok[-1]), seed=seed, spans=spans, answer=[],
                  spec_hash=spec.content_hash, spec_name=spec.name, task=spec.task,
                  needles=[{"source": spec.haystack.text, "char_start": start, "char_end": end}])
