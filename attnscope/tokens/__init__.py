"""Per-token loss comparison of two causal LMs, token categories and gap statistics.

Typical use::

    from attnscope.tokens import compare, annotate, category_means, regress
    table = annotate(compare(model_a, model_b, tok_a, tok_b, docs), docs, tok_a)
    category_means(table), regress(table).to_markdown()

See docs/tokens.md for the definitions.
"""
from attnscope.tokens.ablate import ablated, apply_ablation, parse_ablation
from attnscope.tokens.analysis import (
    RegressionResult,
    bootstrap_means,
    category_means,
    filtered_losses,
    gap_by_repeat,
    indicators,
    regress,
)
from attnscope.tokens.categories import annotate, annotate_document, repeat_distances, repeat_lengths, tag_words
from attnscope.tokens.corpus import read_corpus, repeat_corpus
from attnscope.tokens.losses import align_losses, compare, token_losses
from attnscope.tokens.study import run_study

__all__ = [
    "token_losses", "compare", "align_losses",
    "annotate", "annotate_document", "repeat_lengths", "repeat_distances", "tag_words",
    "indicators", "bootstrap_means", "category_means", "regress", "RegressionResult",
    "filtered_losses", "gap_by_repeat",
    "parse_ablation", "apply_ablation", "ablated",
    "read_corpus", "repeat_corpus", "run_study",
]
