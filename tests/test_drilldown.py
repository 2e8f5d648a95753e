"""Drill-down (exact top-k keys of chosen queries) and score decomposition, against eager
attention on held-out text (Paradise Lost: no development run used it); the offline HTML page in
headless Chromium; the CLI's refusals (one line, exit 2, nothing loaded, files untouched)."""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import attnscope
from attnscope.cli import app
from attnscope.errors import AttnscopeError
from attnscope.metrics.decompose import RopeLayoutUnknown, carriers, decompose_score, rope_layout
from attnscope.metrics.drilldown import topk_keys
from attnscope.report.drilldown import render_drilldown, write_drilldown
from reference import eager_maps

TOL = 1e-5


@pytest.fixture(scope="module")
def verse_ids(smollm2):
    """384 tokens of held-out text (Paradise Lost)."""
    from attnscope.probing.texts import load_text

    return smollm2.tokenizer(load_text("paradise_lost")[5000:12000])["input_ids"][:384]


def eager_scores_and_maps(hf_model, input_ids):
    """({layer: [B, H, T, S] pre-softmax scores}, {layer: probabilities}) of one eager forward:
    the scores are the inputs eager attention hands to softmax (mask added: exact where visible)."""
    real = torch.nn.functional.softmax
    seen = []

    def recording(x, *args, **kwargs):
        if x.dim() == 4:
            seen.append(x.detach().float().numpy().copy())
        return real(x, *args, **kwargs)

    torch.nn.functional.softmax = recording
    try:
        maps = eager_maps(hf_model, input_ids)
    finally:
        torch.nn.functional.softmax = real
    assert len(seen) == len(maps)
    return dict(zip(sorted(maps), seen)), maps


def assert_topk_matches(ds, maps, k):
    """Every (layer, head, query) row: the probabilities are eager's k largest, each key's
    probability is eager's at that key, and the keys and order are eager's wherever eager's
    values are separated by more than the tolerance (ties: earlier key first)."""
    checked_order = 0
    for li, layer in enumerate(ds["layer"].values):
        P = maps[int(layer)][0]
        for h in range(ds.sizes["head"]):
            for qi, q in enumerate(ds["query"].values):
                row = P[h, q].astype(np.float64)
                keys = ds["key"].values[li, h, qi]
                prob = ds["prob"].values[li, h, qi].astype(np.float64)
                n_vis = int((row > 0).sum())
                valid = keys >= 0
                assert valid.sum() == min(k, n_vis), (layer, h, q)
                assert (keys[valid] <= q).all() and (prob[~valid] == 0).all()
                ref = np.sort(row)[::-1][:valid.sum()]
                np.testing.assert_allclose(prob[valid], ref, atol=TOL, rtol=0)
                np.testing.assert_allclose(row[keys[valid]], prob[valid], atol=TOL, rtol=0)
                # where eager's ranking is unambiguous, ours is the same
                order = np.lexsort((np.arange(len(row)), -row))[:valid.sum()]
                sep = np.abs(np.diff(np.sort(row)[::-1][:valid.sum() + 1])) > 2 * TOL
                for r in range(valid.sum()):
                    if (r == 0 or sep[r - 1]) and (r >= len(sep) or sep[r]):
                        assert keys[r] == order[r], (layer, h, q, r)
                        checked_order += 1
    assert checked_order > 0


# ------------------------------------------------------------------------------------- top-k
def test_topk_keys_equal_eager_on_held_out_text(smollm2, verse_ids):
    queries = [0, 2, 9, 200, len(verse_ids) - 1]
    ds = topk_keys(smollm2, token_ids=verse_ids, queries=queries, k=8, key_block=32)
    assert ds["key"].dims == ("layer", "head", "query", "rank")
    assert ds["key"].shape == (30, 9, len(queries), 8)
    maps = eager_maps(smollm2.model, torch.tensor([verse_ids]))
    assert_topk_matches(ds, maps, 8)
    # the row mass is the whole row (SmolLM2 has no learned sink)
    np.testing.assert_allclose(ds["row_mass"].values, 1.0, atol=TOL)
    # block size changes nothing: same keys, same bits
    whole = topk_keys(smollm2, token_ids=verse_ids, queries=queries, k=8, layers=[0, 7, 29])
    part = ds.sel(layer=[0, 7, 29])
    assert (whole["key"].values == part["key"].values).all()
    assert (whole["log_prob"].values == part["log_prob"].values).all()
    # token strings are the tokenizer's, one per position
    assert list(ds["token"].values[:3]) == [smollm2.tokenizer.decode([i]) for i in verse_ids[:3]]


def test_topk_keys_sliding_window_tiny_olmo3(tiny, single_thread):
    lm = tiny("olmo3")  # window 8 on layers 0-2, full attention on layer 3
    ids = [int(x) for x in torch.randint(3, 120, (48,), generator=torch.Generator().manual_seed(7))]
    queries = [1, 5, 20, 47]
    ds = topk_keys(lm, token_ids=ids, queries=queries, k=12, key_block=5)
    maps = eager_maps(lm.model, torch.tensor([ids]))
    assert_topk_matches(ds, maps, 12)
    for li, layer in enumerate(ds["layer"].values):
        for qi, q in enumerate(queries):
            keys = ds["key"].values[li, :, qi]
            n = (keys >= 0).sum(-1)
            if layer < 3:  # sliding: only the last 8 keys, never older ones
                assert (n == min(q + 1, 8)).all()
                assert (keys[keys >= 0] > q - 8).all()
            else:
                assert (n == min(q + 1, 12)).all()


@pytest.mark.parametrize("family", ["gpt_oss", "inkling2_text", "deepseek_v32"])
def test_topk_keys_on_families_with_sinks_biases_and_selections(family, single_thread):
    """Learned sinks (row mass < 1), a position bias with per-query sinks, a sparse top-k
    selection: the top keys and probabilities are eager's (eager's maps drop the sink)."""
    from attnscope import zoo

    tiny = zoo.tiny_model(family)
    ids = tiny.input_ids[0].tolist()
    queries = [3, 17, len(ids) - 1]
    ds = topk_keys(tiny.model, token_ids=ids, queries=queries, k=6, key_block=7)
    maps = eager_maps(tiny.model, tiny.input_ids)
    assert_topk_matches(ds, maps, 6)
    for li, layer in enumerate(ds["layer"].values):
        want = maps[int(layer)][0][:, queries].sum(-1)  # [H, Q]: eager's real-key mass
        np.testing.assert_allclose(ds["row_mass"].values[li], want, atol=TOL)
    if family != "deepseek_v32":
        assert float(ds["row_mass"].min()) < 0.999  # the learned sink took its share


def test_topk_ties_are_ordered_by_position(tmp_path, single_thread):
    """With a zero query projection every score is 0: all visible keys tie exactly. The top-k is
    then the earliest k keys, each with probability 1/(i+1), whatever the block size."""
    from conftest import save_tiny

    path = save_tiny("llama", tmp_path / "flat")
    lm = attnscope.load(str(path))
    with torch.no_grad():
        lm.model.model.layers[1].self_attn.q_proj.weight.zero_()
    ids = list(range(3, 43))
    queries = [0, 3, 25, 39]
    maps = eager_maps(lm.model, torch.tensor([ids]))
    for block in (3, 7, 4096):
        ds = topk_keys(lm, token_ids=ids, queries=queries, k=6, layers=[1], key_block=block)
        for qi, q in enumerate(queries):
            n = min(q + 1, 6)
            keys = ds["key"].values[0, :, qi]
            assert (keys[:, :n] == np.arange(n)).all(), (block, q, keys)
            assert (keys[:, n:] == -1).all()
            np.testing.assert_allclose(ds["prob"].values[0, :, qi, :n], 1 / (q + 1), atol=1e-7)
            np.testing.assert_allclose(maps[1][0, :, q, :n], 1 / (q + 1), atol=1e-7)  # eager agrees


def test_topk_refusals(smollm2, verse_ids):
    with pytest.raises(AttnscopeError, match=r"outside the 384-token input"):
        topk_keys(smollm2, token_ids=verse_ids, queries=[384])
    with pytest.raises(AttnscopeError, match=r"outside"):
        topk_keys(smollm2, token_ids=verse_ids, queries=[-1])
    for k in (0, -3, 2.5, True):
        with pytest.raises(AttnscopeError, match=r"k \(top-k keys\) must be an integer >= 1"):
            topk_keys(smollm2, token_ids=verse_ids, queries=[5], k=k)
    with pytest.raises(AttnscopeError, match=r"layer 30 does not exist: the model has 30 layers"):
        topk_keys(smollm2, token_ids=verse_ids, queries=[5], layers=[30])


# ------------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("layer, head, query, key", [
    (0, 0, 383, 0),  # the sink key
    (3, 2, 383, 0),
    (15, 5, 250, 17),  # GQA: query head 5 reads key head 1
    (29, 8, 100, 100),  # the query's own key
])
def test_decomposition_sums_to_eager_score(smollm2, verse_ids, layer, head, query, key):
    scores, maps = _eager(smollm2, verse_ids)
    dec = decompose_score(smollm2, token_ids=verse_ids, layer=layer, head=head, query=query, key=key)
    eager_score = float(scores[layer][0, head, query, key])
    assert dec.kv_head == head // 3
    assert abs(dec.raw_score - eager_score) <= TOL
    assert abs(dec.per_dim.sum() - dec.raw_score) < 1e-12
    # pairs and unrotated dims partition the dimensions: their terms sum to the same score
    r = dec.rope
    assert sorted(np.concatenate([r.pairs.ravel(), r.unrotated]).tolist()) == list(range(64))
    assert abs(dec.per_pair.sum() + dec.per_dim[r.unrotated].sum() - dec.raw_score) < 1e-12
    # the probability: exp(score - lse) with the kernel's lse is eager's probability
    assert abs(dec.prob - float(maps[layer][0, head, query, key])) <= TOL
    assert abs(math.exp(dec.model_score - dec.lse) - dec.prob) <= TOL
    # the contrast is the score minus the mean eager score over the keys the query sees
    visible = scores[layer][0, head, query, :query + 1]
    assert abs(dec.contrast - (eager_score - float(visible.astype(np.float64).mean()))) <= 10 * TOL
    assert dec.n_visible == query + 1
    for terms, chosen in ((dec.per_dim, dec.carriers), (dec.contrast_per_dim, dec.contrast_carriers),
                          (dec.per_pair, dec.pair_carriers)):
        a = np.abs(terms)
        held = np.sort(a[chosen])
        assert held.sum() >= 0.8 * a.sum() - 1e-12  # enough ...
        assert held.sum() - held[0] < 0.8 * a.sum()  # ... and none to spare
        assert held[0] >= np.delete(a, chosen).max(initial=0)  # the largest terms


def _eager(lm, ids, cache={}):
    key = (id(lm), tuple(ids))
    if key not in cache:
        cache[key] = eager_scores_and_maps(lm.model, torch.tensor([ids]))
    return cache[key]


def test_rope_layout_is_read_from_the_layer(smollm2):
    """SmolLM2 (Llama): rotate_half pairs d with d + 32, at frequencies theta^(-2m/64)."""
    layout = rope_layout(smollm2.model, 11)
    assert layout.kind == "half" and len(layout.unrotated) == 0
    assert (layout.pairs == np.stack([np.arange(32), np.arange(32) + 32], 1)).all()
    theta = smollm2.config.rope_parameters["rope_theta"]
    np.testing.assert_allclose(layout.omega, theta ** (-np.arange(0, 64, 2) / 64), rtol=1e-5)
    assert layout.max_residual < 1e-6


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo2", "olmo3", "olmo_hybrid"])
def test_rope_layout_of_each_tiny_family(tiny, family, single_thread):
    """Every family's attention layers (olmo_hybrid: its one attention layer, 3) rotate the
    Llama way, fastest pair first at 1 radian per token."""
    lm = tiny(family)
    for layer in ([3] if family == "olmo_hybrid" else [0, 3]):
        lay = rope_layout(lm.model, layer)
        d = lay.head_dim
        assert lay.kind == "half" and len(lay.unrotated) == 0
        assert (lay.pairs == np.stack([np.arange(d // 2), np.arange(d // 2) + d // 2], 1)).all()
        assert abs(lay.omega[0] - 1) < 1e-6 and (np.diff(lay.omega) < 0).all()
    if family == "olmo_hybrid":
        with pytest.raises(AttnscopeError, match="no attention module|no softmax"):
            rope_layout(lm.model, 0)  # a linear-attention layer


@pytest.fixture
def llama_rope(tiny, monkeypatch, single_thread):
    """The tiny llama and a way to swap the rotary function its attention calls."""
    import transformers.models.llama.modeling_llama as modeling

    def use(fn):
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", fn)

    return tiny("llama"), modeling, use


def test_rope_layouts_interleaved_partial_none_and_unknown(llama_rope):
    lm, modeling, use = llama_rope
    original = modeling.apply_rotary_pos_emb

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J: dims (2m, 2m+1) rotate together
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        half = cos.shape[-1] // 2
        c = cos[..., :half].repeat_interleave(2, -1)
        s = sin[..., :half].repeat_interleave(2, -1)

        def rot(x):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((-x2, x1), -1).flatten(-2)

        return q * c + rot(q) * s, k * c + rot(k) * s

    def partial(q, k, cos, sin, unsqueeze_dim=1):  # rotate_half on the first 8 of 16 dims
        r = 8
        cos = torch.cat([cos[..., :r // 2], cos[..., :r // 2]], -1)
        sin = torch.cat([sin[..., :r // 2], sin[..., :r // 2]], -1)
        qr, kr = original(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim)
        return torch.cat([qr, q[..., r:]], -1), torch.cat([kr, k[..., r:]], -1)

    use(interleaved)
    lay = rope_layout(lm.model, 2)
    assert lay.kind == "interleaved" and (lay.pairs == np.stack([np.arange(0, 16, 2), np.arange(1, 16, 2)], 1)).all()
    use(partial)
    lay = rope_layout(lm.model, 2)
    assert lay.kind == "half" and lay.pairs.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.unrotated.tolist() == list(range(8, 16)) and lay.notes
    dec = decompose_score(lm, token_ids=list(range(3, 30)), layer=2, head=1, query=26, key=0)
    assert abs(dec.per_pair.sum() + dec.per_dim[8:].sum() - dec.raw_score) < 1e-12
    use(lambda q, k, cos, sin, unsqueeze_dim=1: (q, k))  # NoPE
    assert rope_layout(lm.model, 2).kind == "none"
    # a position encoding that is not a rotation: scaled by the position
    use(lambda q, k, cos, sin, unsqueeze_dim=1: (q * (1 + cos.unsqueeze(1)), k))
    with pytest.raises(RopeLayoutUnknown, match="not one linear map|rotate rigidly|scaled"):
        rope_layout(lm.model, 2)
    with pytest.raises(RopeLayoutUnknown):
        decompose_score(lm, token_ids=list(range(3, 30)), layer=2, head=1, query=26, key=0)
    # rope='none' still splits the score over dimensions
    dec = decompose_score(lm, token_ids=list(range(3, 30)), layer=2, head=1, query=26, key=0, rope="none")
    assert dec.rope is None and abs(dec.per_dim.sum() - dec.raw_score) < 1e-12


def test_rope_layout_refuses_half_precision(tmp_path, single_thread):
    from conftest import save_tiny

    lm = attnscope.load(str(save_tiny("llama", tmp_path / "bf16")), dtype="bfloat16")
    with pytest.raises(RopeLayoutUnknown, match="float32 only"):
        rope_layout(lm.model, 0)


def test_decomposition_sliding_window_tiny_olmo3(tiny, single_thread):
    lm = tiny("olmo3")
    ids = [int(x) for x in torch.randint(3, 120, (40,), generator=torch.Generator().manual_seed(3))]
    scores, maps = eager_scores_and_maps(lm.model, torch.tensor([ids]))
    inside = decompose_score(lm, token_ids=ids, layer=0, head=3, query=30, key=25)
    assert inside.visible and inside.n_visible == 8
    assert abs(inside.raw_score - float(scores[0][0, 3, 30, 25])) <= TOL
    assert abs(inside.prob - float(maps[0][0, 3, 30, 25])) <= TOL
    outside = decompose_score(lm, token_ids=ids, layer=0, head=3, query=30, key=0)
    assert not outside.visible and outside.prob == 0 == float(maps[0][0, 3, 30, 0])
    full = decompose_score(lm, token_ids=ids, layer=3, head=0, query=30, key=0)
    assert full.visible and full.n_visible == 31 and abs(full.prob - float(maps[3][0, 0, 30, 0])) <= TOL


def test_carriers_definition():
    assert carriers(np.array([0.1, -5.0, 3.0, 0.0]), 0.8).tolist() == [1, 2]
    assert carriers(np.array([1.0, 1.0, 1.0, 1.0]), 0.5).tolist() == [0, 1]  # ties: lower index
    assert carriers(np.zeros(3)).tolist() == []


def test_decomposition_refusals(smollm2, verse_ids):
    for kwargs, words in (({"layer": 30, "head": 0}, "layer 30 does not exist"),
                          ({"layer": 0, "head": 9}, "head 9 does not exist"),
                          ({"layer": 0, "head": 0, "query": 384}, "outside the 384-token input"),
                          ({"layer": 0, "head": 0, "query": 5, "key": 6}, "after query position 5"),
                          ({"layer": 0, "head": 0, "rope": "half"}, "rope must be one of")):
        kwargs = {"query": 10, **kwargs}
        with pytest.raises(AttnscopeError, match=words):
            decompose_score(smollm2, token_ids=verse_ids, **kwargs)


# ------------------------------------------------------------------------------- the HTML page
def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


_SELFTEST = """<script>
(() => {
const out = {console: []};
const cards = () => [...document.querySelectorAll('#cards .card')].map(c => [+c.dataset.key, +c.dataset.prob]);
const pick = (id, v) => { const s = document.getElementById(id); s.value = String(v); s.dispatchEvent(new Event('change')); };
out.initial = cards();
pick('layer', %(layer_index)d); out.layer = cards();
pick('head', %(head)d); out.head = cards();
pick('query', %(query_index)d); out.query = cards();
const s = document.getElementById('search'); s.value = %(word)s; s.dispatchEvent(new Event('input'));
out.search = document.getElementById('search-results').textContent;
out.matched = [...document.querySelectorAll('#cards .card.match')].map(c => +c.dataset.key);
out.context_hits = document.querySelectorAll('#context .hit').length;
document.querySelector('#row th[data-col=key]').click();
out.sorted = [...document.querySelectorAll('#row tbody tr')].map(r => +r.dataset.key);
document.querySelector('#grid td[data-l="0"][data-h="1"]').click();
out.grid_pick = [document.getElementById('layer').value, document.getElementById('head').value, cards()];
const pre = document.createElement('pre'); pre.id = 'selftest'; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
})();
</script></body>"""


def test_drill_page_in_headless_chromium(smollm2, verse_ids, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    queries = [40, 200, 383]
    ds = topk_keys(smollm2, token_ids=verse_ids, queries=queries, k=7)
    page = write_drilldown(ds, tmp_path / "drill.html", command="attnscope drill (test)")
    text = page.read_text(encoding="utf-8")
    # self-contained: no external script, style sheet, image or frame
    assert not re.findall(r"<(?:script|link|img|iframe)[^>]*(?:src|href)\s*=", text)
    assert "attnscope drill (test)" in text
    with pytest.raises(AttnscopeError, match="already exists"):
        write_drilldown(ds, page)
    tokens = [str(t) for t in ds["token"].values]
    # a word the cards will hold: the first non-blank top-k key of the last view the test opens
    word = next(tokens[j].strip().lower() for j in ds["key"].values[12, 4, 2] if j >= 0 and tokens[j].strip())
    test_page = tmp_path / "drill_test.html"
    test_page.write_text(text.replace("</body>", _SELFTEST % {
        "layer_index": 12, "head": 4, "query_index": 2, "word": json.dumps(word)}), encoding="utf-8")
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--no-first-run", "--disable-extensions", "--enable-logging=stderr", "--v=0",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                        test_page.as_uri()], capture_output=True, text=True, timeout=180)
    errors = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not errors, errors
    m = re.search(r'<pre id="selftest">(.*?)</pre>', r.stdout, re.S)
    assert m, r.stderr[-2000:]
    out = json.loads(html.unescape(m.group(1)))

    def expected(layer_index, head, query_index):
        keys = ds["key"].values[layer_index, head, query_index]
        probs = ds["prob"].values[layer_index, head, query_index]
        return [[int(j), float(p)] for j, p in zip(keys, probs) if j >= 0]

    def same(cards, want):
        assert [c[0] for c in cards] == [w[0] for w in want]
        np.testing.assert_allclose([c[1] for c in cards], [w[1] for w in want], rtol=1e-7)

    same(out["initial"], expected(0, 0, 0))
    same(out["layer"], expected(12, 0, 0))  # the layer picker changed the cards
    same(out["head"], expected(12, 4, 0))
    same(out["query"], expected(12, 4, 2))
    assert out["initial"] != out["layer"] != out["head"] != out["query"]
    # search: every token containing the word (case-insensitive) is counted and marked
    hits = [p for p, t in enumerate(tokens) if word in t.lower()]
    assert out["search"].startswith(f"{len(hits)} token{'s' * (len(hits) != 1)} match \"{word}\" at positions "
                                    f"{', '.join(map(str, hits[:30]))}")
    want = expected(12, 4, 2)
    assert out["matched"] == [j for j, _ in want if word in tokens[j].lower()]
    assert out["matched"] and out["context_hits"] > 0
    assert out["sorted"] == sorted(j for j, _ in want)  # the sortable row, by position
    assert out["grid_pick"][:2] == ["0", "1"]
    same(out["grid_pick"][2], expected(0, 1, 2))


def test_drill_page_size_grows_with_t_not_t_squared(smollm2):
    """The page holds token strings (O(T)) and the chosen queries' top-k: measured on SmolLM2's
    tokens of real prose with SmolLM2's shape (30 layers x 9 heads), 8 queries, k = 10."""
    import importlib.util

    from attnscope.metrics.drilldown import token_strings
    from attnscope.probing.texts import prose

    spec = importlib.util.spec_from_file_location(
        "drill_page_size", Path(__file__).resolve().parents[1] / "benchmarks" / "drill_page_size.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # the measurement docs/drilldown.md shows
    strings = token_strings(smollm2.tokenizer, (smollm2.tokenizer(prose())["input_ids"] * 2)[:65536])
    sizes = {}
    for T in (4096, 16384, 65536):
        ds = bench.page_dataset(strings[:T], layers=30, heads=9, queries=8, k=10)
        sizes[T] = len(render_drilldown(ds).encode("utf-8"))
    per_token = (sizes[65536] - sizes[16384]) / (65536 - 16384)
    assert per_token < 16  # bytes per token: the strings, not a row of T numbers
    assert abs((sizes[16384] - sizes[4096]) / (16384 - 4096) - per_token) < 2  # linear in T
    assert sizes[65536] < 3e6


# ------------------------------------------------------------------------------- the CLI
def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory):
    """A tiny random llama with a tokenizer (4 layers x 4 heads) and a text file."""
    from attnscope.testing import make_tiny_model

    base = tmp_path_factory.mktemp("cli")
    model = make_tiny_model("llama", base / "model")
    (base / "text.txt").write_text("The quick brown fox jumps over the lazy dog, and then it runs far away. " * 2,
                                   encoding="utf-8")
    return model, base / "text.txt"


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if any model's weights are loaded."""
    from transformers import AutoModelForCausalLM

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)


@pytest.mark.parametrize("command, extra, words", [
    ("drill", ["--queries", "9999"], ["query position(s) [9999]", "outside the", "token input"]),
    ("drill", ["--queries", "-1"], ["[-1]", "outside"]),
    ("drill", ["--queries", "5-2"], ["runs backwards"]),
    ("drill", ["-k", "0"], ["--k (top-k keys) must be an integer >= 1, got 0"]),
    ("drill", ["-k", "-4"], ["--k", "-4"]),
    ("drill", ["--layers", "2,4"], ["layer 4 does not exist", "4 layers (0-3)"]),
    ("drill", ["--out", "old.html"], ["already exists", "--overwrite"]),
    ("drill", ["--max-tokens", "0"], ["--max-tokens"]),
    ("decompose", ["--layer", "4", "--head", "0"], ["layer 4 does not exist"]),
    ("decompose", ["--layer", "0", "--head", "4"], ["head 4 does not exist", "4 heads (0-3)"]),
    ("decompose", ["--layer", "0", "--head", "0", "--query", "9999"], ["--query", "[9999]", "outside"]),
    ("decompose", ["--layer", "0", "--head", "0", "--query", "3", "--key", "4"], ["--key 4 is after --query 3"]),
    ("decompose", ["--layer", "0", "--head", "0", "--rope", "bogus"], ["--rope", "bogus"]),
    ("decompose", ["--layer", "0", "--head", "0", "--out", "old.png"], ["already exists"]),
    ("decompose", ["--layer", "0", "--head", "0", "--out", "fig.png"], ["fig.json", "already exists"]),
    ("decompose", ["--layer", "0", "--head", "0", "--out", "fig.txt"], ["writes a figure here", ".png or .pdf or .svg", "'.txt'"]),
    ("decompose", ["--layer", "-1", "--head", "0"], ["layer must be an integer >= 0"]),
])
def test_cli_refuses_before_any_model_loads(tiny_cli, tmp_path, no_load, monkeypatch, command, extra, words):
    model, text = tiny_cli
    (tmp_path / "old.html").write_bytes(b"<p>someone's page</p>")
    (tmp_path / "old.png").write_bytes(b"someone's figure")
    (tmp_path / "fig.json").write_bytes(b"{}")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    out = {"drill": "new.html", "decompose": "new.png"}[command]
    args = [command, "-m", str(model), "-f", str(text), "--out", out, *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert _snapshot(tmp_path) == before


def test_cli_drill_and_decompose_write_their_files(tiny_cli, tmp_path, monkeypatch, single_thread):
    model, text = tiny_cli
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["drill", "-m", str(model), "-f", str(text), "--out", "d.html", "--queries",
                                   "3,last", "-k", "4", "--layers", "0-1"])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    page = (tmp_path / "d.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="drill-data">(.*?)</script>', page, re.S).group(1))
    assert data["meta"]["layers"] == [0, 1] and data["meta"]["k"] == 4
    assert data["meta"]["queries"][0] == 3 and data["meta"]["queries"][-1] == len(data["tokens"]) - 1
    assert data["meta"]["command"].startswith("attnscope drill ")
    first = (tmp_path / "d.html").read_bytes()
    res = CliRunner().invoke(app, ["drill", "-m", str(model), "-f", str(text), "--out", "d.html"])
    assert res.exit_code == 2 and (tmp_path / "d.html").read_bytes() == first  # not replaced ...
    res = CliRunner().invoke(app, ["drill", "-m", str(model), "-f", str(text), "--out", "d.html", "--overwrite"])
    assert res.exit_code == 0 and (tmp_path / "d.html").read_bytes() != first  # ... unless asked
    res = CliRunner().invoke(app, ["decompose", "-m", str(model), "-f", str(text), "--layer", "2", "--head", "3",
                                   "--query", "20", "--key", "0", "--out", "dec.png", "--json", "-q"])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    printed = json.loads(res.stdout)
    side = json.loads((tmp_path / "dec.json").read_text())
    assert side["command"].startswith("attnscope decompose ") and side["raw_score"] == printed["raw_score"]
    assert abs(sum(side["per_dim"]) - side["raw_score"]) < 1e-12
    assert (tmp_path / "dec.png").read_bytes()[:4] == b"\x89PNG"
    assert os.path.getsize(tmp_path / "dec.png") > 10_000
