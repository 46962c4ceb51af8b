"""Every bad number is caught up front, in one line with exit 2, before any work: a typo with
extra zeros must not hang the tool or eat the machine (spec/limits.py holds the bounds). A fuzz
test drives estimate and plan with random flags and values: exit 0, 1 or 2, never a traceback."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise.cli import main
from shardwise.spec.plan import divisors


def cli(capsys, argv):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "argv, words",
    [
        ("estimate llama-2-7b --layers 1000000", "layers=1,000,000 is past the sanity bound"),
        ("estimate llama-3.1-8b --hidden 100000000", "hidden=100,000,000 is past"),
        ("estimate llama-3.1-8b --vocab 1000000000000", "vocab=1,000,000,000,000 is past"),
        ("plan llama-3.1-8b --gpus 1000000000", "gpus=1,000,000,000 is past"),
        ("lecture --gpus 1000000000 --no-figures", "gpus=1,000,000,000 is past"),
        ("estimate llama-3.1-8b --mbs 100000000", "mbs=100,000,000 is past"),
        ("estimate llama-3.1-8b --gbs 100000000000", "gbs=100,000,000,000 is past"),
        ("plan llama-3.1-8b --gpus 0", "--gpus must be a positive integer, got 0"),
        ("estimate llama-3.1-8b --gpus-per-node 0", "gpus_per_node=0"),
        ("estimate llama-3.1-8b --price inf", "price per GPU-hour must be a finite number"),
        ("estimate llama-3.1-8b --tokens 1e400", "token budget must be a finite number"),
        ("estimate llama-2-7b --max-seq 1024 --seq 4096", "exceeds llama-2-7b's context (1,024 tokens)"),
        ("estimate llama-3.1-8b --seq 100000000", "exceeds llama-3.1-8b's context (131,072 tokens)"),
        ("plan llama-3.1-70b --min-gpus --gpus 2", "no plan fits llama-3.1-70b on up to 2"),
        ("lecture --html /proc/x.html --no-figures", "--html: cannot write /proc/x.html"),
        ("gpus --hardware /proc", "hardware file '/proc' cannot be read (Is a directory)"),
    ],
)
def test_each_bad_number_is_one_line_and_exit_2(argv, words, capsys):
    rc, out, err = cli(capsys, argv.split())
    assert rc == 2 and out == "" and words in err and err.count("\n") == 1, err


def test_divisors_by_trial_division_hand_worked():
    assert divisors(1) == [1] and divisors(12) == [1, 2, 3, 4, 6, 12] and divisors(49) == [1, 7, 49]
    assert divisors(10_000_000)[-3:] == [2_500_000, 5_000_000, 10_000_000] and len(divisors(10_000_000)) == 64


NUMBERS = st.one_of(
    st.sampled_from(["0", "-1", "1", "2", "3", "7", "8", "64", "4096", "1e400", "inf", "nan", "abc", "1000000000"]),
    st.integers(-(10**12), 10**12).map(str),
)
INT_FLAGS = ["--gpus", "--tp", "--pp", "--dp", "--mbs", "--gbs", "--seq", "--vpp", "--layers", "--hidden", "--heads"]
INT_FLAGS += ["--kv-heads", "--vocab", "--max-seq", "--gpus-per-node", "--zero"]
CHOICE_FLAGS = {
    "--schedule": ["gpipe", "1f1b", "interleaved", "zb"],
    "--recompute": ["none", "selective", "full", "some"],
    "--precision": ["fp32", "bf16-mixed", "fp16-mixed", "fp8"],
    "--offload": ["none", "optimizer", "params"],
    "--attention": ["flash", "math", "xformers"],
    "--profile": ["torch", "zero-paper", "megatron", "deepspeed", "fsdp"],
    "--gpu": ["h100-80gb", "a100-80gb", "rtx-4090", "tpu"],
}
FLOAT_FLAGS = ["--tokens", "--price", "--efficiency"]


@st.composite
def argvs(draw, command):
    argv = [command, draw(st.sampled_from(["llama-2-7b", "gpt2", "tiny-llama", "mixtral-8x7b", "nosuchmodel"]))]
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["int", "choice", "float", "flag"]))
        if kind == "int":
            argv += [draw(st.sampled_from(INT_FLAGS)), draw(NUMBERS)]
        elif kind == "choice":
            flag = draw(st.sampled_from(sorted(CHOICE_FLAGS)))
            argv += [flag, draw(st.sampled_from(CHOICE_FLAGS[flag]))]
        elif kind == "float":
            argv += [draw(st.sampled_from(FLOAT_FLAGS)), draw(NUMBERS)]
        else:
            argv.append(draw(st.sampled_from(["--sp", "--json", "--tied"])))
    return argv


def _outcome(capsys, argv):
    rc, out, err = cli(capsys, argv)
    assert rc in (0, 1, 2), (argv, rc)
    if rc == 2:
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=argvs("estimate"))
def test_estimate_fuzz_exits_0_1_or_2_in_one_line(argv, capsys):
    _outcome(capsys, argv)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=argvs("plan"))
def test_plan_fuzz_exits_0_1_or_2_in_one_line(argv, capsys):
    _outcome(capsys, argv + ["--top", "1"])


@pytest.mark.parametrize("value", ["-2T", "-300B", "-1.5e12", "-7"])
def test_a_negative_count_is_called_negative(value, capsys):
    """Not "expected one argument": argparse must hand -2T to --tokens, whose check says what is wrong."""
    rc, out, err = cli(capsys, ["estimate", "llama-3.1-8b", "--tokens", value])
    assert rc == 2 and f"must not be negative: {value!r}" in err and err.count("\n") == 1, err
