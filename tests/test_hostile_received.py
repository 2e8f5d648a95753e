"""Bad input to received / span-to-span / cache policies: one line on stderr, exit 2, before any
model loads, every existing file byte-identical (the rules and helpers of test_hostile.py)."""

from __future__ import annotations

import pytest

from test_hostile import no_load, refused, tiny, work  # noqa: F401  (fixtures)


@pytest.mark.parametrize("extra, words", [
    (["--received-top", "0"], ["--received-top", ">= 1", "0"]),
    (["--received-top", "-3"], ["--received-top", "-3"]),
    (["--received-pass", "fast"], ["--received-pass", "'fast'"]),
    (["--span", "a=0:4", "--query-span", "q=30:9999"], ["--query-span 'q'", "not inside"]),
    (["--span", "a=5:9999"], ["--span 5:9999", "not inside"]),
    (["--span", "a=0:4", "--query-span", "q=9:3"], ["bad --query-span", "START < END"]),
    (["--span", "a=0:4,a=1:2"], ["'a' is given twice"]),
    (["--query-span", "q=3:9"], ["--query-span needs key spans"]),
    (["--span", "a=0:4", "--query-span", "q=x:9"], ["bad --query-span", "NAME=START:END"]),
])
def test_analyze_refuses_bad_flow_options(work, tiny, no_load, monkeypatch, extra, words):
    monkeypatch.chdir(work)
    refused(["analyze", "-m", tiny, "-f", "text.txt", *extra], work, *words)


@pytest.mark.parametrize("extra, words", [
    (["--policies", "lru"], ["unknown policy 'lru'", "streaming[:S], window, static_topk"]),
    (["--policies", "window:3"], ["only streaming takes an argument"]),
    (["--policies", "streaming:0"], ["at least 1 sink"]),
    (["--policies", "window,window"], ["given twice"]),
    (["--budgets", "8,100000"], ["[100000]", "larger than the input"]),
    (["--budgets", "0"], ["budgets must be integers >= 1", "0"]),
    (["--budgets", "-4"], ["budgets must be integers >= 1"]),
    (["--budgets", "4,8"], ["streaming:4", "no recent window"]),
    (["--budgets", "x"], ["--budgets", "integers"]),
    (["--sink-tokens", "0"], ["--sink-tokens"]),
    (["--max-tokens", "-1"], ["--max-tokens"]),
    (["--queries", "bogus"], ["bogus"]),
    (["--probe", "no_such_probe"], ["no_such_probe"]),
    (["--probe", "probe.toml"], ["natural-text probe"]),
    (["--probe", "niah_single", "--probe-lengths", "1024", "--budgets", "8"], ["context"]),
    (["--out", "notes.txt"], ["notes.txt"]),
    (["--out", "."], ["already has files", "--overwrite"]),
])
def test_policies_refuses_before_any_model_loads(work, tiny, no_load, monkeypatch, extra, words):
    monkeypatch.chdir(work)
    out = [] if "--out" in extra else ["--out", "fig"]
    refused(["policies", "-m", tiny, "-f", "text.txt", *out, *extra], work, *words)
    assert not (work / "fig").exists()


def test_policies_budget_beyond_a_probe_prompt(work, tiny, no_load, monkeypatch):
    """A budget longer than the shortest probe prompt would hide nothing there: refused."""
    monkeypatch.chdir(work)
    (work / "niah.toml").write_text('name = "n"\ntask = "niah"\nseeds = [0]\n[grid]\nlengths = [40]\n'
                                    'depths = [0.5]\n[needle]\ntemplate = "{key} is {value}."\n')
    refused(["policies", "-m", tiny, "-f", "text.txt", "--out", "fig", "--budgets", "8,48",
             "--probe", "niah.toml"], work, "[48]", "the shortest probe prompt (40 tokens)")


def test_extract_refuses_a_bad_received_top(work, tiny, no_load):
    refused(["extract", "-m", tiny, "-p", work / "probe.toml", "-o", work / "s.h5", "--received-top", "0"],
            work, "received_top", ">= 1")
    assert not (work / "s.h5").exists()
