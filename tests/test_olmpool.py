"""The OlmPool registry: table content, harmful counts, name parser, lookups, CLI."""

import csv
import json
import math
from importlib import resources
from io import StringIO

import pandas as pd
import pytest
from typer.testing import CliRunner

from attnscope.cli import app
from attnscope.errors import AttnscopeError, FilterError, ModelNotFoundError
from attnscope.models import olmpool


def _raw_rows():
    text = resources.files("attnscope.data").joinpath("olmpool_models.csv").read_text(encoding="utf-8")
    return list(csv.DictReader(StringIO(text)))


RAW = _raw_rows()


def test_all_26_models_present_with_required_columns():
    df = olmpool.registry()
    assert len(df) == 26 == len(RAW)
    assert df["name"].is_unique and df["hf_name"].is_unique
    assert set(df["hf_name"]) == {r["hf_name"] for r in RAW}
    required = ["name", "hf_name", "init", "norm", "qk_norm", "kv_heads", "n_heads", "pretrain_ctx", "swa", "fp8",
                "d_ff", "params_b", "helmet_8k", "helmet_16k", "helmet_32k", "helmet_64k", "ruler_4k", "ruler_8k",
                "ruler_16k", "ruler_32k", "ruler_64k", "longppl", "hf_class", "model_type", "n_layers",
                "config_sliding_window", "remote_code", "has_qk_norm", "has_gqa", "has_swa", "has_short_ctx",
                "harmful_count"]
    assert not set(required) - set(df.columns)
    assert (df["n_heads"] == 32).all()
    assert set(df["norm"]) <= {"pre", "post"}
    assert set(df["qk_norm"]) <= {"none", "layerwise", "headwise"}
    for col in ("swa", "fp8", "remote_code", "has_qk_norm", "has_gqa", "has_swa", "has_short_ctx"):
        assert df[col].dtype == bool, col
    assert (df["name"] == df["hf_name"].str.removeprefix("allenai/")).all()


def test_harmful_count_matches_raw_csv():
    df = olmpool.registry().set_index("hf_name")
    for r in RAW:
        expected = (
            (r["qk_norm"] != "none") + (int(r["kv_heads"]) < 32) + (r["swa"] == "1") + (r["pretrain_ctx"] == "4096")
        )
        assert df.loc[r["hf_name"], "harmful_count"] == expected, r["hf_name"]
    assert df["harmful_count"].between(0, 4).all()
    assert df.loc["allenai/I_pre_32kv_8k_12k", "harmful_count"] == 0
    assert df.loc["allenai/H_post_LQK_8kv_4k_11k_SWA", "harmful_count"] == 4


def test_values_and_missing_cells_follow_the_csv():
    df = olmpool.registry().set_index("hf_name")
    for r in RAW:
        row = df.loc[r["hf_name"]]
        for col in ("helmet_8k", "helmet_64k", "longppl", "ruler_4k", "ruler_64k", "config_sliding_window"):
            if r[col] == "":
                assert math.isnan(row[col]), (r["hf_name"], col)
            else:
                assert row[col] == pytest.approx(float(r[col])), (r["hf_name"], col)
        assert row["kv_heads"] == int(r["kv_heads"]) and row["d_ff"] == int(r["d_ff"])
        assert row["hf_class"] == r["hf_class"] and row["n_layers"] == int(r["n_layers"])
    # known blanks in the transcription stay NaN, not 0
    assert math.isnan(df.loc["allenai/G_pre_8kv_4k_14k", "longppl"])
    assert math.isnan(df.loc["allenai/H_post_LQK_32kv_4k_11k", "ruler_64k"])


def test_provenance_is_attached():
    for df in (olmpool.registry(), olmpool.find(swa=True)):
        prov = df.attrs["provenance"]
        assert "olmpool.com" in prov and "2608.10296" in prov and "third-party" in prov
    assert "Cracks in the Foundation" in olmpool.PAPER


def test_derived_loading_columns():
    df = olmpool.registry().set_index("name")
    # Llama class with swa=1 but no window in its config: runs full attention as published
    assert df.loc["F_pre_8kv_8k_14k_SWA", "swa_window_missing"]
    assert not df.loc["C_post_LQK_8kv_8k_13k_SWA", "swa_window_missing"]
    assert df.loc["J_pre_16kv_8k_14k", "native_class"]
    assert not df.loc["G_pre_8kv_8k_14k_SWA", "native_class"]  # Olmo3PreorderNoQK is remote code


def test_parser_round_trips_every_hub_name():
    for r in RAW:
        name = r["hf_name"].removeprefix("allenai/")
        fields = olmpool.parse_name(r["hf_name"])
        assert olmpool.format_name(fields) == name
        assert fields["init"] == r["init"]
        assert fields["kv_heads"] == int(r["kv_heads"])
        assert fields["swa"] == (r["swa"] == "1") and fields["fp8"] == (r["fp8"] == "1")
        assert fields["qk_norm"] == {"none": "none", "lw": "layerwise", "hw": "headwise"}[r["qk_norm"]]
        quirk_fields = set().union(*(q.name_says for q in fields["quirks"])) if fields["quirks"] else set()
        for key, actual in (("norm", r["norm"]), ("pretrain_ctx", int(r["pretrain_ctx"])), ("d_ff", int(r["d_ff"]))):
            if key in quirk_fields:
                continue
            assert fields[key] == actual, (name, key)


def test_known_quirks_are_explicit():
    k = olmpool.parse_name("K_post_HQK_8kv_12k")
    assert k["norm"] == "post" and k["pretrain_ctx"] is None
    (quirk,) = k["quirks"]
    assert quirk.actual["norm"] == "pre" and quirk.actual["pretrain_ctx"] == 8192
    assert olmpool.get("K_post_HQK_8kv_12k").norm == "pre"  # the registry gives the actual architecture
    assert olmpool.get("K_post_HQK_8kv_12k").model_type == "qwen3"
    g = olmpool.get("G_post_LQK_8kv_4k_14k_SWA")
    assert g.quirks and "pre-norm class" in g.quirks[0]
    h = olmpool.parse_name("H_post_LQK_8kv_4k_11k_SWA")
    assert h["d_ff"] == 11008 and h["quirks"][0].actual["d_ff"] == olmpool.get(h["quirks"][0].name).d_ff == 13312
    assert olmpool.parse_name("J_pre_16kv_8k_14k")["quirks"] == ()
    assert set(olmpool.NAME_QUIRKS) <= set(olmpool.registry()["name"])


def test_parse_name_examples_and_errors():
    g = olmpool.parse_name("G_post_LQK_8kv_4k_14k_SWA")
    assert (g["norm"], g["qk_norm"], g["kv_heads"], g["pretrain_ctx"], g["d_ff_k"], g["swa"], g["fp8"]) == (
        "post", "layerwise", 8, 4096, 14, True, False)
    j = olmpool.parse_name("J_pre_16kv_8k_14k")
    assert (j["qk_norm"], j["kv_heads"], j["pretrain_ctx"], j["swa"]) == ("none", 16, 8192, False)
    assert olmpool.format_name({"init": "Z", "norm": "pre", "qk_norm": "headwise", "kv_heads": 4,
                                "pretrain_ctx": 8192, "d_ff": 12288, "fp8": True}) == "Z_pre_HQK_4kv_8k_12k_fp8"
    with pytest.raises(ModelNotFoundError, match="naming scheme"):
        olmpool.parse_name("Llama-3-8B")
    with pytest.raises(AttnscopeError):
        olmpool.format_name({"init": "A"})


def test_get_by_name_hub_id_prefix_and_case():
    m = olmpool.get("J_pre_16kv_8k_14k")
    assert isinstance(m, olmpool.OlmPoolModel)
    assert m.hf_name == "allenai/J_pre_16kv_8k_14k" and m.kv_heads == 16 and m.harmful_count == 1
    assert olmpool.get("allenai/J_pre_16kv_8k_14k").name == m.name
    assert olmpool.get("j_PRE_16kv").name == m.name
    assert olmpool.get("I_pre").name == "I_pre_32kv_8k_12k"
    # exact name wins even though it prefixes another model
    assert olmpool.get("D_post_LQK_8kv_8k_13k_SWA").fp8 is False
    assert math.isnan(olmpool.get("G_pre_8kv_4k_14k").longppl)
    with pytest.raises(Exception):
        m.kv_heads = 3  # frozen


def test_get_errors_list_close_matches():
    with pytest.raises(ModelNotFoundError) as e:
        olmpool.get("J_pre_16kv_8k_15k")
    assert "J_pre_16kv_8k_14k" in str(e.value)
    with pytest.raises(ModelNotFoundError, match="ambiguous"):
        olmpool.get("G_pre")
    with pytest.raises(ModelNotFoundError, match="not an OlmPool model"):
        olmpool.get("gpt2")


def test_find_by_features_matches_manual_filter():
    df = olmpool.registry()
    got = olmpool.find(qk_norm="none", swa=True)
    assert set(got["name"]) == set(df[(df.qk_norm == "none") & df.swa]["name"])
    assert len(got) == 3
    assert set(olmpool.find(harmful_count=0)["name"]) == {"I_pre_32kv_8k_12k"}
    assert set(olmpool.find(kv_heads=[4, 16])["name"]) == {"G_pre_4kv_8k_14k", "J_pre_16kv_8k_14k"}
    expr = olmpool.find("qk_norm=none,swa=1")
    assert list(expr["name"]) == list(got["name"])
    lt = olmpool.find("kv_heads<32, pretrain_ctx=4k")
    assert set(lt["name"]) == set(df[(df.kv_heads < 32) & (df.pretrain_ctx == 4096)]["name"])
    assert set(olmpool.find("qk_norm=lw")["name"]) == set(df[df.qk_norm == "layerwise"]["name"])
    assert len(olmpool.find("harmful_count>=3")) == int((df.harmful_count >= 3).sum())


def test_find_errors():
    with pytest.raises(FilterError, match="unknown registry column"):
        olmpool.find(qknorm="none")
    with pytest.raises(FilterError, match="true/false"):
        olmpool.find("swa=maybe")
    with pytest.raises(FilterError, match="numeric"):
        olmpool.find("kv_heads=eight")
    with pytest.raises(FilterError, match="COLUMN OP VALUE"):
        olmpool.find("swa")


runner = CliRunner()


def test_cli_models_json_csv_table():
    res = runner.invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert len(data["models"]) == 26 and "olmpool.com" in data["provenance"]
    res = runner.invoke(app, ["models", "--filter", "qk_norm=none,swa=1", "--csv"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(StringIO(res.stdout))
    assert set(df["name"]) == set(olmpool.find(qk_norm="none", swa=True)["name"])
    res = runner.invoke(app, ["models", "-f", "harmful_count=4"])
    assert res.exit_code == 0 and "H_post_LQK_8kv_4k_11k_SWA" in res.stdout and "olmpool.com" in res.stdout
    res = runner.invoke(app, ["models", "-f", "bogus=1"])
    assert res.exit_code == 2
