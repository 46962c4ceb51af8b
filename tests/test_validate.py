"""`shardwise validate`: the estimate against published measurements, held to the bars the
project promises (mean absolute error per metric over each set, through the CLI)."""

from __future__ import annotations

import json

import pytest

from shardwise import validate as v
from shardwise.cli import main
from shardwise.units import GIB

# (set, metric) -> the largest mean absolute error, %, the estimate may have
BARS = {
    ("korthikanti2022", "layer_states_gib"): 2.0,
    ("korthikanti2022", "layer_activations_gib"): 2.0,
    ("korthikanti2022", "relative_activations_pct"): 5.0,
    ("korthikanti2022", "step_s"): 5.0,
    ("narayanan2021", "tflops_per_gpu"): 10.0,
    ("deepspeed_estimators", "model_states_gb"): 1.0,
    ("zero2020", "model_states_gb"): 1.0,
}


def test_every_set_is_held_to_its_bar(capsys):
    assert main(["validate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = {(s["set"], s["metric"]): s for s in out["summary"]}
    assert set(summary) == set(BARS)
    for key, bar in BARS.items():
        assert summary[key]["mean_abs_pct"] <= bar, (key, summary[key])
    # every row carries its source and the flags that reproduce it
    for r in out["rows"]:
        assert r["published"] > 0 and r["where"] and "--tp" in r["argv"] and "--profile" in r["argv"]


def test_the_table_names_each_set_and_its_errors(capsys):
    assert main(["validate", "--set", "deepspeed_estimators"]) == 0
    text = capsys.readouterr().out
    assert "DeepSpeed's estimators" in text and "model_states_gb (GB): mean |error|" in text
    assert "korthikanti" not in text


def test_an_unknown_set_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["validate", "--set", "nope"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_published_values_are_the_sources_arithmetic():
    """The shipped values, worked by hand from their sources' formulas."""
    k = v.load_set("korthikanti2022")
    # Figure 1: 18 bytes for each of 12*L*h^2/(t*p) parameters: 22B, 18 * 12 * 48 * 6144^2 / 8 bytes
    assert k["item"][0]["published"]["22b"] == 18 * 12 * 48 * 6144**2 / 8 / GIB == 45.5625
    # Figure 1: 22B's activations, sbh(10 + 24/t + 5as/(ht)) per layer, b = 4, 48 layers, t = 8
    s, b, h, a, t = 2048, 4, 6144, 64, 8
    assert k["item"][1]["published"]["22b"] == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) * 48 / GIB)
    d = v.load_set("deepspeed_estimators")
    psi, largest = 6_738_415_616, 32_000 * 4096  # Llama-2 7B, its embedding
    # stage_1_and_2.py: 2 * total_params + int(18 * total_params / total_gpus)
    assert d["item"][0]["published"]["7b-8"] == (2 * psi + int(18 * psi / 8)) / 1e9
    # stage3.py: 4 * largest_layer_params + int(18 * total_params / total_gpus)
    assert d["item"][1]["published"]["7b-64"] == (4 * largest + int(18 * psi / 64)) / 1e9


def test_error_is_signed_and_relative():
    r = v.run(["zero2020"])[0]
    assert r.error_pct == pytest.approx((r.predicted - r.published) / r.published * 100)
    s = v.summarize([r])[0]
    assert s.items == 1 and s.mean_abs_pct == s.max_abs_pct == abs(r.error_pct)


def test_another_profile_on_the_same_runs(capsys):
    """--profile estimates a set under another engine's accounting: the ZeRO paper's baseline under
    DeepSpeed's layout keeps its fp32 gradient partition too, 20 bytes per parameter instead of 16."""
    assert main(["validate", "--set", "zero2020", "--profile", "deepspeed", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    base = next(r for r in rows if r["mode"] == "baseline")
    assert base["profile"] == "deepspeed" and "deepspeed" in base["argv"]
    paper = next(r for r in v.run(["zero2020"]) if r.mode == "baseline")
    assert base["predicted"] == pytest.approx(paper.predicted * 20 / 16)
