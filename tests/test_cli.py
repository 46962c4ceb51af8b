"""The `shardwise` command line: every subcommand's help, the estimate JSON contract, and bad
input as one line on stderr with exit code 2 (no traceback)."""

import json
import subprocess
import sys

import pytest

from shardwise.cli import main


def run(*args):
    """The CLI in a fresh process, as a user runs it."""
    p = subprocess.run([sys.executable, "-m", "shardwise", *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("cmd", ["models", "gpus", "estimate", "plan", "run", "check", "calibrate", "lecture", "trace"])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: shardwise " + cmd in capsys.readouterr().out


def test_estimate_json_contract(capsys):
    code = main(
        [
            "estimate",
            "llama-2-70b",
            "--gpu",
            "h100-80gb",
            "--gpus",
            "64",
            "--tp",
            "8",
            "--pp",
            "2",
            "--zero",
            "1",
            "--mbs",
            "1",
            "--gbs",
            "512",
            "--seq",
            "4096",
            "--sp",
            "--recompute",
            "selective",
            "--tokens",
            "2T",
            "--price",
            "2.5",
            "--json",
        ]
    )
    d = json.loads(capsys.readouterr().out)
    mem = d["memory"]
    for k in ("params", "grads", "optimizer", "activations", "buffers", "overhead", "total", "capacity"):
        assert isinstance(mem[k], int) and mem[k] >= 0, k
    assert mem["total"] == sum(mem[k] for k in ("params", "grads", "optimizer", "activations", "buffers", "overhead"))
    assert mem["capacity"] == 80 * 2**30
    assert mem["fits"] == (mem["total"] <= mem["capacity"])
    assert code == (0 if mem["fits"] else 1)
    assert d["comm"], "a 64-GPU plan communicates"
    for c in d["comm"]:
        assert set(c) >= {"kind", "group", "ranks", "bytes", "count", "wire_bytes", "seconds"}
        assert c["group"] in ("dp", "tp", "pp", "world")
    assert {c["group"] for c in d["comm"]} >= {"dp", "tp", "pp"}
    t = d["time"]
    for k in ("compute_s", "comm_exposed_s", "bubble_s", "step_s", "tokens_per_s", "mfu"):
        assert t[k] >= 0, k
    # step = compute + exposed comm + bubble (+ the optimizer step, which time.py adds and details)
    assert t["step_s"] >= t["compute_s"] + t["comm_exposed_s"] + t["bubble_s"] - 1e-9
    # tokens/s is the step's tokens over its time: 512 sequences x 4096 tokens
    assert t["tokens_per_s"] == pytest.approx(512 * 4096 / t["step_s"])
    # 2T tokens at that rate on 64 GPUs at $2.5/GPU-hour
    assert t["train_days"] == pytest.approx(2e12 / t["tokens_per_s"] / 86400)
    assert t["gpu_hours"] == pytest.approx(2e12 / t["tokens_per_s"] / 3600 * 64)
    assert t["cost_usd"] == pytest.approx(t["gpu_hours"] * 2.5)
    assert d["model"]["params"] == 68_976_648_192
    assert d["plan"] | {} and d["plan"]["dp"] == 4 and d["plan"]["grad_accum"] == 128
    assert d["rule_of_thumb_bytes"] == 18 * 68_976_648_192


def test_estimate_tables_and_derived_dp(capsys):
    main(["estimate", "llama-3.1-8b", "--gpu", "a100-80gb", "--gpus", "8", "--zero", "3", "--gbs", "64"])
    out = capsys.readouterr().out
    assert "dp8 tp1 pp1 zero3 mbs1 ga8" in out
    for words in ("Memory per GPU", "Communication per step", "Time per step", "lecture rule of thumb"):
        assert words in out


def test_custom_dimensions_and_preset_overrides(capsys):
    main(
        [
            "estimate",
            "custom",
            "--layers",
            "2",
            "--hidden",
            "64",
            "--heads",
            "4",
            "--vocab",
            "100",
            "--gpus",
            "1",
            "--json",
        ]
    )
    d = json.loads(capsys.readouterr().out)
    # swiglu default ffn for h=64: 256*ceil(int(8*64/3)/256) = 256*ceil(170/256) = 256
    # per layer 4*64*64 (attn) + 3*64*256 (mlp) + 2*64 (norms) = 16384 + 49152 + 128 = 65664
    # embeddings 100*64 twice (untied) + final norm 64: 2*65664 + 12800 + 64 = 144192
    assert d["model"]["params"] == 144_192
    main(["estimate", "llama-2-7b", "--layers", "2", "--gpus", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["model"]["layers"] == 2


@pytest.mark.parametrize(
    "args, words",
    [
        (["estimate", "llama-2-7c"], "unknown model 'llama-2-7c'; did you mean"),
        (["estimate", "llama-2-7b", "--gpu", "h100"], "unknown GPU 'h100'; did you mean"),
        (["estimate", "llama-2-7b", "--network", "infiniband"], "unknown network 'infiniband'"),
        (["estimate", "llama-2-7b", "--gpus", "0"], "--gpus must be a positive integer"),
        (["estimate", "llama-2-7b", "--gpus", "-8"], "--gpus must be a positive integer"),
        (["estimate", "llama-2-7b", "--gpus", "24", "--tp", "3"], "tp=3 must divide the attention heads"),
        (["estimate", "llama-2-7b", "--tp", "3"], "tp*pp = 3 does not divide 8 GPUs"),
        (["estimate", "llama-2-7b", "--mbs", "0"], "mbs must be a positive integer"),
        (["estimate", "llama-2-7b", "--seq", "-1"], "seq must be a positive integer"),
        (["estimate", "llama-2-7b", "--tokens", "lots"], "not a count"),
        (["estimate", "llama-2-7b", "--efficiency", "1.5"], "--efficiency must be in (0, 1]"),
        (["estimate", "llama-2-7b", "--price", "-1"], "--price must not be negative"),
        (["estimate", "llama-2-7b", "--gpus", "12", "--gpus-per-node", "8"], "not a whole number of 8-GPU nodes"),
        (["estimate", "custom", "--layers", "2"], "a custom model needs --hidden"),
        (["estimate", "llama-2-7b", "--hidden", "100"], "hidden 100 is not divisible by heads 32"),
        (["estimate", "missing.json"], "model file 'missing.json' does not exist"),
        (["estimate", "llama-2-7b", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, words, capsys):
    code = None
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_malformed_config_json_names_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "hidden_size": 4096,')
    code, out, err = run("estimate", str(bad))
    assert code == 2 and out == ""
    assert str(bad) in err and err.count("\n") == 1 and "Traceback" not in err
    bad.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": -4096,
                "num_hidden_layers": 2,
                "num_attention_heads": 32,
                "vocab_size": 100,
                "intermediate_size": 64,
            }
        )
    )
    code, out, err = run("estimate", str(bad))
    assert code == 2 and "hidden_size" in err and err.count("\n") == 1


def test_bad_toml_model_file(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text("[model]\nlayers = 2\nhidden = 64\nheads = 4\nvocab = 100\nffn = 3\n")
    code, out, err = run("estimate", str(f))
    assert code == 2 and "unknown model field 'ffn'" in err and err.count("\n") == 1


def test_models_and_gpus_json():
    code, out, _ = run("models", "--json")
    d = json.loads(out)
    assert code == 0 and d["llama-3.1-8b"]["params"] == 8_030_261_248
    assert "meta-llama/Llama-3.1-8B" in d["llama-3.1-8b"]["hf_ids"] and d["gpt-4-est"]["hf_ids"] == []
    code, out, _ = run("models")
    assert code == 0 and "mistralai/Mixtral-8x7B-v0.1" in out and "openai-community/gpt2" in out
    code, out, _ = run("gpus", "--json")
    d = json.loads(out)
    assert code == 0 and d["gpus"]["h100-80gb"]["memory_gib"] == 80 and "ib-ndr" in d["networks"]
