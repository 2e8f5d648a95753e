"""Per-token losses of a causal LM, and token-by-token comparison of two models.

Definitions (see docs/tokens.md):

* The loss of token t is ``-log p(x_t | x_<t)`` in nats, read off the model's
  logits at position t-1 of the window that scores t.
* A document is scored in windows of ``window`` tokens that advance by
  ``window - min_context``: the first window scores every token it can (1 ..
  window-1), each later window scores only its tokens that have at least
  ``min_context`` tokens of left context inside the window. Every token is
  scored exactly once, and every scored token except those in the first window
  sees at least ``min_context`` tokens of context.
* Token spans are the tokenizer's character offsets made into a partition of
  the text: whitespace that a tokenizer trims off its offsets belongs to the
  following token, so the spans of one document tile it without gaps.
* Across different tokenizers, losses are compared on segments between
  character positions that are token boundaries in both tokenizations. A row of
  model A is kept when its token is alone in its segment; model B's loss for it
  is the sum of B's token losses over the segment (chain rule: that sum is B's
  ``-log p`` of the same string given the same preceding text).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from attnscope.errors import AttnscopeError
from attnscope.progress import bar as progress_bar

__all__ = ["token_losses", "compare", "align_losses", "tokenize_document", "normalize_documents"]

COLUMNS = ["doc_id", "token_index", "char_start", "char_end", "token", "token_id", "loss", "context_len"]


@dataclass(frozen=True)
class TokenizedDocument:
    """One document's tokens: ids, partition spans, and whether a BOS id is prepended."""

    doc_id: str
    text: str
    ids: list[int]
    starts: np.ndarray  # char start of each token (partition of the text)
    ends: np.ndarray
    bos_id: int | None  # prepended to the model input (not a row), or None


def normalize_documents(documents: Any) -> list[tuple[str, str]]:
    """Accept a str, a sequence of str, a mapping id -> text, or (id, text) pairs."""
    if isinstance(documents, str):
        return [("0", documents)]
    if isinstance(documents, Mapping):
        items = [(str(k), v) for k, v in documents.items()]
    else:
        items = []
        for i, d in enumerate(documents):
            if isinstance(d, str):
                items.append((str(i), d))
            elif isinstance(d, tuple) and len(d) == 2:
                items.append((str(d[0]), d[1]))
            else:
                raise AttnscopeError(
                    f"document {i} is a {type(d).__name__}; pass str, (doc_id, text) pairs or a mapping doc_id -> text"
                )
    ids = [k for k, _ in items]
    if len(set(ids)) != len(ids):
        raise AttnscopeError("document ids are not unique; give each document its own id")
    for k, v in items:
        if not isinstance(v, str):
            raise AttnscopeError(f"document {k!r} is a {type(v).__name__}, expected str")
    return items


def _default_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself adds one by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # tokenizers without special-token handling
        return None
    return bos if with_special and with_special[0] == bos else None


def tokenize_document(tokenizer, doc_id: str, text: str, *, prepend_bos: bool | None = None) -> TokenizedDocument:
    """Tokenize one document into ids and a partition of its characters.

    ``prepend_bos``: None follows the tokenizer (a BOS is prepended when the
    tokenizer adds one itself); with a BOS the document's first token is scored.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise AttnscopeError(
            f"{type(tokenizer).__name__} gives no character offsets; load a fast tokenizer (use_fast=True)"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    n = len(ids)
    starts = np.zeros(n, dtype=np.int64)
    ends = np.zeros(n, dtype=np.int64)
    # boundary before token i = furthest end seen so far: monotone even when a
    # character is split over several byte tokens (they share one offset pair)
    b = 0
    for i in range(n):
        starts[i] = b
        b = max(b, int(offsets[i][1]))
        ends[i] = b
    if prepend_bos is None:
        bos = _default_bos(tokenizer)
    elif prepend_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise AttnscopeError("prepend_bos=True but the tokenizer has no bos_token_id")
    else:
        bos = None
    return TokenizedDocument(doc_id, text, ids, starts, ends, bos)


def _windows(n_input: int, window: int, min_context: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored input position) for input length n_input.

    Targets are input positions 1..n_input-1; window k covers [k*s, k*s+window)
    with s = window - min_context and scores targets from max(1, k*s+min_context).
    """
    stride = window - min_context
    out = []
    start = 0
    while True:
        end = min(start + window, n_input)
        first = 1 if start == 0 else start + min_context
        if first < end:
            out.append((start, end, first))
        if end >= n_input:
            break
        start += stride
    return out


def _device_of(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return None


def _logits(model, input_ids, attention_mask):
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits


def token_losses(
    model,
    tokenizer,
    documents,
    *,
    window: int = 2048,
    min_context: int = 512,
    batch_size: int = 4,
    prepend_bos: bool | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """One row per scored token of each document, with its loss in nats.

    ``model`` is any callable ``model(input_ids=..., attention_mask=...)``
    returning logits or an object with ``.logits`` (an HF causal LM, an ablated
    one, a wrapper). Columns: doc_id, token_index (0-based index into the
    document's text tokens, BOS excluded), char_start, char_end, token (the
    span's text), token_id, loss, context_len (tokens of left context the token
    was scored with, BOS included). Without a BOS the first token of each
    document has no context and is not scored (no row).
    """
    import torch

    if window < 2:
        raise AttnscopeError(f"window={window}: need at least 2 tokens per window")
    if not 0 <= min_context < window:
        raise AttnscopeError(f"min_context={min_context} must be in [0, window={window})")
    if batch_size < 1:
        raise AttnscopeError(f"batch_size={batch_size} must be >= 1")
    docs = [tokenize_document(tokenizer, k, v, prepend_bos=prepend_bos) for k, v in normalize_documents(documents)]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = 0  # padded positions are masked out and never scored

    # all windows of all documents, scheduled longest first so batches pad little
    jobs = []
    for d_i, d in enumerate(docs):
        inp = ([d.bos_id] if d.bos_id is not None else []) + d.ids
        for start, end, first in _windows(len(inp), window, min_context):
            jobs.append((d_i, start, end, first))
    jobs.sort(key=lambda j: -(j[2] - j[1]))

    losses: list[np.ndarray] = [np.full(len(d.ids), np.nan) for d in docs]
    ctx: list[np.ndarray] = [np.full(len(d.ids), -1, dtype=np.int64) for d in docs]
    device = _device_of(model)

    with progress_bar(len(jobs), "token losses", unit="window", progress=progress) as prog:
        for b0 in range(0, len(jobs), batch_size):
            batch = jobs[b0 : b0 + batch_size]
            L = max(e - s for _, s, e, _ in batch)
            ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for r, (d_i, s, e, _) in enumerate(batch):
                d = docs[d_i]
                inp = ([d.bos_id] if d.bos_id is not None else []) + d.ids
                ids[r, : e - s] = torch.tensor(inp[s:e])
                mask[r, : e - s] = 1  # right padding: earlier positions never see pads
            if device is not None:
                ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad():
                logits = _logits(model, ids, mask)
                for r, (d_i, s, e, first) in enumerate(batch):
                    pos = torch.arange(first - s, e - s, device=logits.device)  # target positions in window
                    lp = torch.log_softmax(logits[r, pos - 1].float(), dim=-1)
                    tgt = ids[r, pos].to(lp.device)
                    nll = -lp.gather(1, tgt[:, None])[:, 0]
                    off = 1 if docs[d_i].bos_id is not None else 0
                    tok_idx = np.arange(first, e) - off  # input position -> text token index
                    losses[d_i][tok_idx] = nll.double().cpu().numpy()
                    ctx[d_i][tok_idx] = np.arange(first, e) - s
            prog.advance(len(batch))

    frames = []
    for d_i, d in enumerate(docs):
        keep = ~np.isnan(losses[d_i])
        idx = np.nonzero(keep)[0]
        frames.append(
            pd.DataFrame(
                {
                    "doc_id": d.doc_id,
                    "token_index": idx,
                    "char_start": d.starts[idx],
                    "char_end": d.ends[idx],
                    "token": [d.text[d.starts[i] : d.ends[i]] for i in idx],
                    "token_id": np.asarray(d.ids, dtype=np.int64)[idx] if d.ids else np.zeros(0, np.int64),
                    "loss": losses[d_i][idx],
                    "context_len": ctx[d_i][idx],
                }
            )
        )
    if not frames:
        return pd.DataFrame({c: [] for c in COLUMNS})
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def _same_tokenizer(tok_a, tok_b) -> bool:
    if tok_b is None or tok_a is tok_b:
        return True
    try:
        return tok_a.get_vocab() == tok_b.get_vocab() and type(tok_a) is type(tok_b)
    except Exception:
        return False


def _segment(common: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    right = np.searchsorted(common, starts, side="right") - 1
    left = np.searchsorted(common, starts, side="left") - 1
    return np.where(ends > starts, right, left)


def align_losses(table_a: pd.DataFrame, table_b: pd.DataFrame) -> pd.DataFrame:
    """Map model B's token losses onto model A's tokens by character offsets.

    Per document, the boundaries common to both tokenizations (token start
    positions, plus the end of the last token) cut the text into segments. A
    token of A that is alone in its segment gets ``loss_b`` = sum of B's losses
    of the tokens inside the segment and ``n_tokens_b`` = their number. Tokens of
    A that share a segment with other A tokens, or whose segment holds a B token
    that B did not score, are dropped: their losses are not comparable one to one.
    Both tables must hold every token of their documents except possibly the
    unscored first one (as :func:`token_losses` returns them).
    """
    out = []
    for doc_id, a in table_a.groupby("doc_id", sort=False):
        b = table_b[table_b["doc_id"] == doc_id]
        if b.empty:
            continue
        a = a.sort_values("token_index")
        b = b.sort_values("token_index")
        a_s, a_e = a["char_start"].to_numpy(), a["char_end"].to_numpy()
        b_s, b_e = b["char_start"].to_numpy(), b["char_end"].to_numpy()
        bounds_a = set(a_s[a_e > a_s].tolist()) | {int(a_e.max())}
        bounds_b = set(b_s[b_e > b_s].tolist()) | {int(b_e.max())}
        common = np.array(sorted(bounds_a & bounds_b))
        if len(common) < 2:
            continue
        # segment of a token: the one its span lies in; an empty span (a byte token
        # continuing the previous token's character) belongs to the segment ending there
        seg_a = _segment(common, a_s, a_e)
        seg_b = _segment(common, b_s, b_e)
        # spans never cross a common boundary; boundaries come from present (scored) tokens only,
        # so text covered by an unscored B token lies before the first segment and is never compared
        n_a = np.bincount(seg_a[seg_a >= 0], minlength=len(common))
        loss_b = np.bincount(seg_b[seg_b >= 0], weights=b["loss"].to_numpy()[seg_b >= 0], minlength=len(common))
        n_b = np.bincount(seg_b[seg_b >= 0], minlength=len(common))
        ok = (seg_a >= 0) & (seg_a < len(common) - 1)
        ok &= n_a[np.clip(seg_a, 0, None)] == 1
        ok &= n_b[np.clip(seg_a, 0, None)] >= 1
        sel = a[ok].copy()
        sel["loss_b"] = loss_b[seg_a[ok]]
        sel["n_tokens_b"] = n_b[seg_a[ok]]
        out.append(sel)
    if not out:
        cols = list(table_a.columns) + ["loss_b", "n_tokens_b"]
        return pd.DataFrame({c: [] for c in cols})
    return pd.concat(out, ignore_index=True)


def compare(
    model_a,
    model_b,
    tok_a,
    tok_b=None,
    documents: Iterable[str] | Mapping[str, str] | Sequence[tuple[str, str]] = (),
    *,
    ablate_b=None,
    **kwargs,
) -> pd.DataFrame:
    """Token-by-token losses of two models on the same documents.

    Returns model A's token rows with ``loss_a``, ``loss_b`` and
    ``gap = loss_a - loss_b`` (positive: model B predicts the token better),
    ``context_len_a``/``context_len_b`` and ``n_tokens_b`` (B tokens summed into
    the row: 1 when the tokenizers are the same). ``model_b=None`` means model A,
    ``tok_b=None`` means B uses ``tok_a``. ``ablate_b`` (a spec such as
    ``"window:64"`` or an :class:`attnscope.AttentionEdit`) makes model B run
    with that attention edit; when B is A itself no weights are copied: A's
    losses are computed first, then the edit is set on the same model for B's
    pass and removed afterwards. Keyword arguments go to :func:`token_losses`
    for both models.
    """
    from attnscope.tokens.ablate import ablated

    docs = normalize_documents(documents)
    if model_b is None:
        model_b = model_a
    la = token_losses(model_a, tok_a, docs, **kwargs)
    tb = tok_a if tok_b is None else tok_b
    if ablate_b is not None:
        with ablated(model_b, ablate_b):
            lb = token_losses(model_b, tb, docs, **kwargs)
    elif model_b is model_a and tb is tok_a:
        lb = la  # the same model with the same tokenizer scores the same: skip the second pass
    else:
        lb = token_losses(model_b, tb, docs, **kwargs)
    if _same_tokenizer(tok_a, tok_b):
        m = la.merge(
            lb[["doc_id", "token_index", "token_id", "loss", "context_len"]],
            on=["doc_id", "token_index"],
            suffixes=("_a", "_b"),
            validate="one_to_one",
        )
        if not (m["token_id_a"] == m["token_id_b"]).all():
            raise AttnscopeError("the two tokenizers disagree on token ids; pass both tokenizers as tok_a and tok_b")
        m = m.drop(columns=["token_id_b"]).rename(columns={"token_id_a": "token_id"})
        m["n_tokens_b"] = 1
    else:
        m = align_losses(
            la.rename(columns={"loss": "loss_a", "context_len": "context_len_a"}),
            lb.rename(columns={"context_len": "context_len_b"}),
        )
        # B's context for the segment: that of its first token
        first_ctx = lb.set_index(["doc_id", "char_start"])["context_len"]
        first_ctx = first_ctx[~first_ctx.index.duplicated()]
        key = pd.MultiIndex.from_arrays([m["doc_id"], m["char_start"]])
        m["context_len_b"] = first_ctx.reindex(key).to_numpy()
    m["gap"] = m["loss_a"] - m["loss_b"]
    cols = ["doc_id", "token_index", "char_start", "char_end", "token", "token_id", "loss_a", "loss_b", "gap",
            "context_len_a", "context_len_b", "n_tokens_b"]
    return m[cols].reset_index(drop=True)
