"""Every subcommand, driven with random flags and values: every outcome is exit 0, 1 or 2, and a 2
is one line on stderr, never a traceback.

The flags are read from the parser itself (every option of every registered subcommand, its type
and choices), so a flag added later is fuzzed without a change here. Values mix good ones, bad
numbers (0, negatives, 1e400, inf, nan, past every sanity bound), wrong words and unwritable paths.

What each example runs: everything up to the work, for real (argument parsing, config loading, every
check of sizes, paths, devices and memory). The work itself is stubbed where it would cost seconds
to minutes per example or never end: `run` does not spawn its ranks, `check` does not train,
`calibrate` does not time the machine, `export-hf` does not convert, `serve` does not listen,
`trace` does not trace. A stub raises Reached, which counts as success (the input passed every
check); the work is tested on its own elsewhere. estimate, plan, models, gpus and the cheap parts of
lecture (strategies, zero, comm; no figures) run whole.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # every registered subcommand


class Reached(Exception):
    """The input passed every check and the command reached its work."""


def _reached(*args, **kwargs):
    raise Reached


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "bad.toml").write_text("[plan\nmbs = ")
    (d / "unknown.toml").write_text("[nosuch]\nx = 1\n")
    (d / "dir").mkdir()
    (d / "hw.toml").write_text("[gpu.x]\nmemory_gib = -1\n")
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 0}')
    done = d / "ck" / "step-000002"  # a checkpoint as far as its layout goes: export-hf and --resume get past it
    done.mkdir(parents=True)
    (done / ".metadata").write_bytes(b"")
    (done / "trainer.json").write_text('{"format": 1, "step": 2, "param_shapes": {}, "optimizer": "adamw"}')
    return d


@pytest.fixture(autouse=True)
def in_scratch(scratch, monkeypatch):
    """A relative output path a fuzzed flag names (lecture --html gpt2) lands in the scratch directory."""
    monkeypatch.chdir(scratch)


@pytest.fixture
def stubbed(monkeypatch):
    import uvicorn

    from shardwise.check import calibrate, compare
    from shardwise.run import export_hf, launch
    from shardwise.trace import tracer

    monkeypatch.setattr(launch, "launch", _reached)
    monkeypatch.setattr(launch, "worker", _reached)
    monkeypatch.setattr(compare, "check", _reached)
    monkeypatch.setattr(calibrate, "calibrate", _reached)
    monkeypatch.setattr(export_hf, "export", _reached)
    monkeypatch.setattr(uvicorn, "run", _reached)  # serve would listen until stopped
    monkeypatch.setattr(tracer, "trace", _reached)
    for k in ("LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "RANK"):
        monkeypatch.delenv(k, raising=False)


# half the values are good, so examples also get past the first check to the later ones
GOOD_NUMBERS = st.sampled_from(["1", "2", "4", "8", "16", "0.5"])
BAD_NUMBERS = st.one_of(
    st.sampled_from(["0", "-1", "64", "4096", "1e400", "inf", "nan", "-inf", "abc", "", "1000000000"]),
    st.sampled_from(["2T", "-2T", "300B", "1.5e12", "1e-9", "99999999999999999999"]),
    st.integers(-(10**12), 10**12).map(str),
)
NUMBERS = st.one_of(GOOD_NUMBERS, BAD_NUMBERS)
WORDS = ["", "x", "llama-2-7b", "gpt2", "tiny-llama", "h100-80gb", "a100-80gb", "ib-ndr", "nosuch", "1", "-"]
SETS = ["plan.tp=2", "model.hidden=abc", "nosuch.x=1", "train.steps=0", "x", "=", "data.source=text"]
SETS += ["train.timeout_s=-1", "model.layers=1000000000", "plan.seq=100000000", "checkpoint.keep=0"]


def paths(d: Path) -> list[str]:
    return [str(d / "out.jsonl"), str(d / "dir"), "/proc/x", str(d / "no" / "such" / "f.toml"), "", str(d / "o.toml")]


def configs(d: Path) -> list[str]:
    return [str(ROOT / "examples/tiny-llama.toml"), str(ROOT / "examples/tiny-gpt2.toml"), str(d / "bad.toml")]


def positional(action: argparse.Action, d: Path) -> list[str]:
    if action.dest == "config":
        good = configs(d)[:2]
        return good * 3 + configs(d) + [str(d / "unknown.toml"), str(d / "nothing.toml"), str(d / "dir")]
    if action.dest == "checkpoint":
        return [str(d / "ck"), str(d / "ck"), str(d / "dir"), str(d / "nothing"), "/proc", str(d / "bad.toml")]
    good = ["llama-2-7b", "gpt2", "tiny-llama", "mixtral-8x7b"]
    return good * 2 + ["nosuchmodel", str(d / "config.json"), str(d / "dir")]


def good(action: argparse.Action, d: Path) -> list[str]:
    """Values a careful user would give this flag."""
    if action.choices is not None:
        return [str(c) for c in action.choices]
    if action.type is int:
        return ["1", "2", "4", "8"]
    if action.type is float or getattr(action.type, "__name__", "") in ("parse_count", "_fraction"):
        return ["1", "0.5", "2", "300B"]
    by_dest = {
        "checkpoint_dir": [str(d / "ck")],
        "config": configs(d)[:2],
        "dim_ffn_kind": ["swiglu", "gelu"],
        "dim_norm": ["rmsnorm", "layernorm"],
        "dim_positions": ["rotary", "learned"],
        "figure": [str(d / "f.png")],
        "formats": ["png", "svg"],
        "gpu": ["h100-80gb", "a100-80gb"],
        "hardware": [str(d / "hw.toml")],
        "html": [str(d / "l.html")],
        "metrics": [str(d / "m.jsonl")],
        "model": ["llama-2-7b", "gpt2"],
        "name": ["mybox"],
        "network": ["ib-ndr"],
        "out": [str(d / "o.toml"), str(d / "outdir")],
        "part": ["zero", "comm"],
        "rdzv_endpoint": ["127.0.0.1:29500"],
        "resume": [str(d / "ck")],
        "set": ["plan.tp=2", "train.steps=3", "data.branch=3"],
    }
    return by_dest.get(action.dest, ["1"])


def value(draw, action: argparse.Action, d: Path, hostile: bool):
    if not hostile:
        return draw(st.sampled_from(good(action, d)))
    if action.choices is not None:
        return draw(st.sampled_from([*map(str, action.choices)] * 3 + ["bogus"]))
    if action.type in (int, float) or getattr(action.type, "__name__", "") in ("parse_count", "_fraction"):
        return draw(NUMBERS)
    if action.dest == "set":
        return draw(st.sampled_from(SETS))
    if action.dest in ("config",):
        return draw(st.sampled_from(configs(d)))
    return draw(st.sampled_from(WORDS + paths(d)))


@st.composite
def argvs(draw, command: str, d: Path):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    argv = [command]
    for a in actions:
        if not a.option_strings:
            argv.append(draw(st.sampled_from(positional(a, d))))
    options = [a for a in actions if a.option_strings]
    hostile = draw(st.booleans())  # one example in two has only good values: it gets past the early checks
    chosen = [a for a in options if a.required] + [
        draw(st.sampled_from(options)) for _ in range(draw(st.integers(0, 6)))
    ]
    for a in chosen:
        flag = draw(st.sampled_from(a.option_strings))
        if a.nargs == 0 or (a.nargs == "?" and draw(st.booleans())):  # a switch, or --resume alone
            argv.append(flag)
        else:
            argv += [flag, value(draw, a, d, hostile)]
    return argv


def cli(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    except Reached:
        rc = 0
    _, err = capsys.readouterr()
    return rc, err


def outcome(capsys, argv: list[str]) -> None:
    rc, err = cli(capsys, argv)
    assert rc in (0, 1, 2), (argv, rc, err)
    if rc == 2:
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)


FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
CHEAP_PARTS = ["strategies", "zero", "comm"]


def test_every_subcommand_is_fuzzed():
    assert {"models", "gpus", "estimate", "plan", "run", "lecture", "check", "calibrate", "export-hf"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in ("lecture", "plan")])
def test_fuzz_exits_0_1_or_2_in_one_line(command, scratch, stubbed, capsys):
    @FUZZ
    @given(data=st.data())
    def one(data):
        outcome(capsys, data.draw(argvs(command, scratch)))

    one()


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_plan_fuzz_small(data, scratch, capsys):
    """plan searches every legal plan: few examples, one shown."""
    outcome(capsys, data.draw(argvs("plan", scratch)) + ["--top", "1"])


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_lecture_fuzz_on_its_cheap_parts(data, scratch, capsys):
    argv = data.draw(argvs("lecture", scratch))
    outcome(capsys, argv + ["--part", data.draw(st.sampled_from(CHEAP_PARTS)), "--no-figures"])
