"""The whole token study in one call: losses, categories, statistics, figures, files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from attnscope.errors import AttnscopeError
from attnscope.store.files import atomic_output, check_output_dir
from attnscope.tokens.ablate import parse_ablation
from attnscope.tokens.analysis import MIN_REPEAT, category_means, filtered_losses, gap_by_repeat, indicators, regress
from attnscope.tokens.categories import annotate
from attnscope.tokens.figures import plot_category_gaps, plot_gap_vs_repeat
from attnscope.tokens.losses import compare, normalize_documents

__all__ = ["run_study", "write_table", "check_documents", "check_scorable"]

MAIN_CATEGORIES = (
    "all", "content", "function", "pos_NOUN", "pos_VERB", "pos_ADJ", "pos_ADV", "pos_PROPN", "pos_PRON",
    "pos_DET", "pos_ADP", "pos_AUX", "pos_CCONJ", "pos_SCONJ", "pos_PART", "pos_EX",
    "open_bracket", "close_bracket", "open_round", "close_round", "open_square", "close_square",
    "open_curly", "close_curly", "tag_open", "tag_close", "repeated", "content_not_repeated",
)


MIN_DOCUMENTS = 2  # CIs resample documents and the regression clusters errors by document


def write_table(df: pd.DataFrame, stem: Path) -> Path:
    """Parquet when pyarrow/fastparquet is installed, else gzipped CSV (written atomically)."""
    try:
        path = stem.with_suffix(".parquet")
        with atomic_output(path, overwrite=True) as tmp:
            df.to_parquet(tmp, index=False)
        return path
    except ImportError:
        path = stem.with_suffix(".csv.gz")
        with atomic_output(path, overwrite=True) as tmp:
            df.to_csv(tmp, index=False, compression="gzip")
        return path


def _write(path: Path, text: str) -> None:
    with atomic_output(path, overwrite=True) as tmp:  # the study's folder was checked up front
        tmp.write_text(text, encoding="utf-8")


def check_documents(docs, source="the corpus") -> None:
    """At least MIN_DOCUMENTS documents: with one, the bootstrap CIs collapse and the clustered
    regression is undefined."""
    n = len(docs)
    if n < MIN_DOCUMENTS:
        raise AttnscopeError(f"{source} holds {n} document(s); the token study needs at least {MIN_DOCUMENTS} "
                             "(its CIs resample documents, its regression clusters errors by document): "
                             "split the text into several files, or give a folder or a .jsonl")


def check_scorable(docs, tokenizer, source="the corpus") -> None:
    """Every document has a token to score under `tokenizer` (without a BOS a document's first
    token has no context, so a one-token document has none). Needs only the tokenizer: the CLI
    runs it before any model loads."""
    from attnscope.tokens.losses import tokenize_document

    empty = []
    for doc_id, text in normalize_documents(docs):
        d = tokenize_document(tokenizer, doc_id, text)
        if len(d.ids) - (d.bos_id is None) < 1:
            empty.append(f"{doc_id} ({len(d.ids)} token)")
    if empty:
        raise AttnscopeError(f"{source}: {len(empty)} document(s) have no token to score ({', '.join(empty[:5])}"
                             f"{' ...' if len(empty) > 5 else ''}): a token's loss needs a token before it; remove "
                             "these documents from the corpus or lengthen them")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if np.isnan(o) else float(o)
    return str(o)


def _unwrap(model, tok):
    """A LoadedModel (attnscope.load) stands for its HF model and tokenizer."""
    if model is not None and hasattr(model, "model") and hasattr(model, "tokenizer") and hasattr(model, "revision"):
        return model.model, (tok if tok is not None else model.tokenizer)
    return model, tok


def run_study(
    model_a, model_b, tok_a, tok_b, documents, out, *,
    ablate_b=None,
    far: int | None = None,
    kinds: dict[str, str] | None = None,
    label_a: str = "A", label_b: str = "B",
    window: int = 2048, min_context: int = 512, batch_size: int = 4,
    tagger: str = "auto", min_repeat: int = MIN_REPEAT, n_boot: int = 1000, seed: int = 0,
    progress: bool | None = None, overwrite: bool = False,
) -> dict[str, Path]:
    """Compare two models token by token on ``documents`` and write everything to ``out``.

    ``model_a``/``model_b``: HF causal LMs (or ``attnscope.load`` results, whose
    tokenizer is used when ``tok_a``/``tok_b`` is None); ``model_b=None`` means
    model A. ``ablate_b``: an attention edit for model B (``"window:64"``,
    ``"window:64,sinks:4"``, ``"nosink:4"`` or an :class:`attnscope.AttentionEdit`);
    with model B = model A it is set on the same model after A's pass (no weight
    copy) and removed afterwards. ``far``: split repeated tokens at this
    repeat distance into ``repeated_near``/``repeated_far`` (default: the
    ablation's window, if it has one).

    Files: tokens.(parquet|csv.gz) (per-token table), category_means.csv,
    category_means_by_kind.csv (when documents have more than one kind),
    filtered_losses.csv, gap_by_repeat.csv, regression.md, regression.json,
    figures gap_by_category.{png,pdf,html} and gap_vs_repeat.{png,pdf,html}. ``out`` must
    be a new or empty folder unless ``overwrite``; at least two documents are needed.
    """
    model_a, tok_a = _unwrap(model_a, tok_a)
    model_b, tok_b = _unwrap(model_b, tok_b)
    if tok_a is None:
        raise AttnscopeError("run_study needs model A's tokenizer: pass tok_a or an attnscope.load result")
    if tok_b is tok_a:
        tok_b = None
    edit = parse_ablation(ablate_b) if ablate_b is not None else None
    if far is None and edit is not None and edit.window is not None:
        far = edit.window
    if edit is not None and f"[{edit.describe()}]" not in label_b:
        label_b = f"{label_b} [{edit.describe()}]"
    out = check_output_dir(out, overwrite=overwrite)
    docs = normalize_documents(documents)
    check_documents(docs)
    check_scorable(docs, tok_a)
    out.mkdir(parents=True, exist_ok=True)
    table = compare(model_a, model_b, tok_a, tok_b, docs, ablate_b=edit, window=window, min_context=min_context,
                    batch_size=batch_size, progress=progress)
    table = annotate(table, docs, tok_a, tagger=tagger)
    if kinds:
        table["doc_kind"] = table["doc_id"].map(kinds).fillna("")
    paths: dict[str, Path] = {"tokens": write_table(table, out / "tokens")}

    ind = indicators(table, min_repeat=min_repeat, far=far)
    main = MAIN_CATEGORIES + (("repeated_near", "repeated_far") if far is not None else ())
    cats = [c for c in main if c == "all" or (c in ind and ind[c].any())]
    means = category_means(table, cats, n_boot=n_boot, seed=seed, min_repeat=min_repeat, far=far)
    _write(out / "category_means.csv", means.to_csv(index=False))
    paths["category_means"] = out / "category_means.csv"
    if kinds and table["doc_kind"].nunique() > 1:
        # prose, code and markup differ in what their categories mean: also per kind
        per_kind = []
        for kind, sub in table.groupby("doc_kind"):
            sub_ind = indicators(sub, min_repeat=min_repeat, far=far)
            k_cats = [c for c in cats if c == "all" or (c in sub_ind and sub_ind[c].any())]
            m = category_means(sub, k_cats, n_boot=n_boot, seed=seed, min_repeat=min_repeat, far=far)
            m.insert(0, "doc_kind", kind)
            per_kind.append(m)
        _write(out / "category_means_by_kind.csv", pd.concat(per_kind).to_csv(index=False))
        paths["category_means_by_kind"] = out / "category_means_by_kind.csv"
    filt = filtered_losses(table, n_boot=n_boot, seed=seed, min_repeat=min_repeat, far=far)
    _write(out / "filtered_losses.csv", filt.to_csv(index=False))
    paths["filtered_losses"] = out / "filtered_losses.csv"
    rep = gap_by_repeat(table, n_boot=n_boot, seed=seed, far=far)
    _write(out / "gap_by_repeat.csv", rep.to_csv(index=False))
    paths["gap_by_repeat"] = out / "gap_by_repeat.csv"

    # regress on the categories that vary in this corpus
    wanted = ("content", "function", "open_bracket", "close_bracket")
    wanted += ("repeated_near", "repeated_far") if far is not None else ("repeated",)
    reg_cats = [c for c in wanted if c in ind and ind[c].nunique() > 1]
    # controls that do not vary on a short corpus (no repeats, one token length) are left out and
    # listed in regression.md/json, as the categories above are, instead of failing after the compute
    reg = regress(table, reg_cats, min_repeat=min_repeat, far=far, drop_constant=True)
    summary = {
        "model_a": label_a, "model_b": label_b, "gap": "loss_a - loss_b (nats; > 0: model B better)",
        "ablate_b": edit.describe() if edit is not None else None, "far": far,
        "n_tokens": int(len(table)), "n_docs": int(table["doc_id"].nunique()),
        "window": window, "min_context": min_context, "min_repeat": min_repeat, "n_boot": n_boot, "seed": seed,
        "regression": reg.to_dict(),
        "category_means": means.to_dict(orient="records"),
        "filtered_losses": filt.to_dict(orient="records"),
    }
    _write(out / "regression.json", json.dumps(summary, indent=2, default=_json_default))
    md = [
        f"# Token study: A = {label_a}, B = {label_b}",
        "",
        f"gap = loss_A − loss_B in nats (positive: B predicts the token better); "
        f"{len(table)} tokens in {table['doc_id'].nunique()} documents.",
        "",
        *([f"repeated = repeat_len ≥ {min_repeat}; repeated_near / repeated_far: its most recent earlier "
           f"occurrence ends ≤ {far} / > {far} tokens back (repeat_distance).", ""] if far is not None else []),
        "## Regression",
        "",
        reg.to_markdown(),
        "## Mean gap by category (document bootstrap, 95% CI)",
        "",
        _md_table(means),
        "",
        "## Filtered losses",
        "",
        _md_table(filt),
        "",
    ]
    _write(out / "regression.md", "\n".join(md))
    paths["regression_md"] = out / "regression.md"
    paths["regression_json"] = out / "regression.json"
    for p in plot_category_gaps(means, out / "gap_by_category", label_a=label_a, label_b=label_b):
        paths[p.name] = p
    for p in plot_gap_vs_repeat(rep, out / "gap_vs_repeat", label_a=label_a, label_b=label_b, far=far):
        paths[p.name] = p
    return paths


def _md_table(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
