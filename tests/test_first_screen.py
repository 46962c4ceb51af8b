"""The first screen of `shardwise plan` and `estimate`: the answer first, the command that trains it
(parsed back by `shardwise run`'s own parser and config loader into the very same Plan), every table
readable at 80 columns with plan names whole, the same default batch in both commands, a default
sequence clamped to a learned position table, and the JSON contract versioned."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from rich.console import Console

from shardwise.cli import build_parser, main
from shardwise.cli.plan import plan_argv, train_command
from shardwise.cli.run import overrides_from_args
from shardwise.estimate import estimate
from shardwise.report.layout import PLAN_NAME, command_lines
from shardwise.report.search import print_search
from shardwise.report.tables import print_estimate
from shardwise.run import config
from shardwise.search.core import run_search
from shardwise.search.equivalent import equivalent
from shardwise.spec.hardware import make_cluster
from shardwise.spec.plan import SCHEDULES, Plan
from shardwise.spec.presets import preset


def cli(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def big():
    """A search whose names are long (sp, pipelines, cp, zero-bubble schedules) and whose
    recommendation is not #1 (at a flat matmul rate, where many shapes tie within the band)."""
    res = run_search(
        preset("llama-3.1-70b"), make_cluster("h100-80gb", 256), gbs=1024, seq=8192, top=10, efficiency=0.5
    )
    return res, equivalent(res)


def _screen(res, eq, width: int, **kw) -> str:
    c = Console(width=width, record=True)
    cmd = train_command(eq.recommended, ["--set", "model.preset=llama-3.1-70b"])
    print_search(res, [], None, c, eq=eq, command=cmd, explain=True, verbose=True, **kw)
    return c.export_text()


# ---- the answer first ------------------------------------------------------------------------------
def test_first_screen_order(capsys):
    rc, out, err = cli(capsys, "plan", "llama-3.1-8b", "--gpus", "8")
    assert rc == 0 and err == ""
    marks = ["recommended", "train it", "Equivalent within the estimate's error", "Top 10 of"]
    at = [out.index(m) for m in marks]
    assert at == sorted(at), at
    # the recommended line carries memory, tokens/s and MFU; the command is right under it
    line = next(x for x in out.splitlines() if x.startswith("recommended"))
    assert "GiB/GPU" in line and "tokens/s" in line and "MFU" in line
    assert "shardwise run CONFIG.toml --nproc 8 --set model.preset=llama-3.1-8b --dp " in out
    assert "10% of the best tokens/s" in out and "~11%" in out


def test_tokens_add_days_and_cost(capsys):
    rc, out, _ = cli(capsys, "plan", "llama-3.1-8b", "--gpus", "16", "--rank", "time", "--tokens", "2T")
    line = out[out.index("recommended") : out.index("train it")]
    assert rc == 0 and re.search(r"[\d.]+ days for 2.00T tokens", line) and "$" in line


def test_recommended_is_in_the_band_and_the_simplest(big):
    res, eq = big
    c = res.table.cols
    band = set(int(r) for r in eq.rows)
    rec = int(eq.rows[0])
    assert rec in band and eq.recommended.plan == _plan(res, rec)

    plain = [SCHEDULES.index("gpipe"), SCHEDULES.index("1f1b")]

    def structure(r):  # keys 1-4 of simplicity(): offload, model-parallel dimensions, recompute, schedule
        return (
            int(c["offload"][r]),
            int(c["tp"][r] > 1) + int(c["pp"][r] > 1) + int(c["cp"][r] > 1) + int(c["ep"][r] > 1),
            int(c["recompute"][r]),
            int(c["vpp"][r] > 1 or c["schedule"][r] not in plain),
        )

    assert all(structure(rec) <= structure(r) for r in band)
    # here #1 is not the recommendation: something simpler (fewer dimensions, less recompute or a
    # plain schedule) sits inside the band, further down the ranking
    first = int(res.order[0])
    assert eq.position > 1 and structure(rec) < structure(first)


def _plan(res, row):
    space, cats, grid, i = res.table.refs[row]
    return space.scalar(grid, cats, i)


# ---- 80 columns -------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [80, 100])
def test_plan_screen_fits_and_never_breaks_a_plan_name(big, width):
    res, eq = big
    text = _screen(res, eq, width)
    lines = text.splitlines()
    assert max(len(x) for x in lines) <= width
    names = {e.plan.short() for e in res.ranked} | {eq.recommended.plan.short()}
    for name in names:
        assert any(name in x for x in lines), name
    # every plan name in the output is whole: the start of one never ends a line
    for x in lines:
        assert not re.search(r"\bdp\d+( tp\d+)?( pp\d+)?\s*$", x), x
    assert "tokens/s" in text and "#1-#" in text


def test_columns_env_narrows_piped_output(capsys, monkeypatch):
    """COLUMNS=80 is honoured when the output is not a terminal (a pipe, a test's capture), and the
    longest header segments (a PCIe GPU's link, the default-batch sentence) wrap within it."""
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, _ = cli(capsys, "plan", "gpt2", "--gpu", "rtx-4090", "--gpus", "2", "--top", "3", "--explain", "-v")
    lines = out.splitlines()
    assert rc == 0 and max(len(x) for x in lines) <= 80 and re.search(r"\bdp2 tp1 pp1 zero\d mbs\d+ ga\d+\b", out)
    rc, out, _ = cli(capsys, "estimate", "gpt2", "--gpu", "rtx-4090", "--gpus", "2")
    assert max(len(x) for x in out.splitlines()) <= 80
    monkeypatch.delenv("COLUMNS")
    rc, out, _ = cli(capsys, "estimate", "gpt2", "--gpu", "rtx-4090", "--gpus", "2")
    assert max(len(x) for x in out.splitlines()) > 80  # a pipe without COLUMNS gets 140 columns


def test_catalog_tables_fit_80_columns_and_keep_every_column_when_wide(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for cmd in ("gpus", "models"):
        rc, out, _ = cli(capsys, cmd)
        assert rc == 0 and max(len(x) for x in out.splitlines()) <= 80, cmd
    rc, out, _ = cli(capsys, "gpus")
    assert "h100-80gb" in out and "bf16" in out and "fp32" not in out  # the least used columns go first
    monkeypatch.setenv("COLUMNS", "200")
    rc, out, _ = cli(capsys, "gpus")
    header = next(x for x in out.splitlines() if x.startswith("name"))
    assert all(c in header for c in ("fp16", "fp8", "tf32", "fp32", "intra-node link", "$/h"))


def test_plan_table_keeps_every_column_when_wide():
    """Every column at the table's natural width (its longest plan name decides it) and wider; a
    narrower terminal drops the least important first."""
    res = run_search(preset("llama-3.1-8b"), make_cluster("h100-80gb", 8), top=5)
    eq = equivalent(res)

    def table(width: int) -> str:
        c = Console(width=width, record=True)
        print_search(res, [], None, c, eq=eq)
        return c.export_text()

    cols = ("memory/GPU", "sent/GPU", "exposed comm", "bubble", "step", "tokens/s", "MFU")
    rows = [x for x in table(400).splitlines() if x.lstrip().startswith("#  plan")]
    natural = max(len(x.rstrip()) for x in rows)
    for width in (natural, natural + 80):
        text = table(width)
        assert all(col in text for col in cols), width
        assert max(len(x) for x in text.splitlines()) <= width
    assert not all(col in table(natural - 1) for col in cols)


def test_estimate_tables_at_80_and_wide():
    e = estimate(
        preset("llama-3.1-70b"),
        make_cluster("h100-80gb", 64),
        Plan(tp=8, pp=2, zero=1, gbs=512, seq=4096, sp=True, recompute="selective"),
    )
    c = Console(width=80, record=True)
    print_estimate(e, c, gbs_default=False)
    lines = c.export_text().splitlines()
    assert max(len(x) for x in lines) <= 80
    assert any(e.plan.short() in x for x in lines)
    assert not any("…" in x for x in lines)  # no column cut to an ellipsis ("coll…", "intr…")
    for width in (120, 200):
        c = Console(width=width, record=True)
        print_estimate(e, c)
        text = c.export_text()
        for col in ("collective", "group", "ranks", "link", "message", "count", "sent/rank", "time", "hidden?", "what"):
            assert col in text, (width, col)
        assert "what it is" in text and max(len(x) for x in text.splitlines()) <= width


# ---- the command that trains it ----------------------------------------------------------------------
def _run_config(argv: list[str], tmp_path):
    """The RunConfig `shardwise run` builds from a printed command (CONFIG.toml: an empty file)."""
    world = None
    if argv[0] == "torchrun":
        nnodes = int(argv[argv.index("--nnodes") + 1])
        world = nnodes * int(argv[argv.index("--nproc-per-node") + 1])
        argv = argv[argv.index("-m") + 2 :]  # what torchrun hands `python -m shardwise`
    else:
        assert argv[0] == "shardwise"
        argv = argv[1:]
    cfg = tmp_path / "CONFIG.toml"
    cfg.write_text("")
    argv = [str(cfg) if w == "CONFIG.toml" else w for w in argv]
    a = build_parser().parse_args(argv)
    assert a.command == "run"
    return config.load(a.config, overrides_from_args(a), world=world)


@pytest.mark.parametrize(
    "argv",
    [
        ["llama-3.1-8b", "--gpus", "8"],
        ["llama-3.1-70b", "--gpus", "256", "--gbs", "1024", "--seq", "8192"],
        ["gpt2", "--gpus", "4", "--gpu", "rtx-4090", "--precision", "fp32"],
        ["meta-llama/Llama-2-7b-hf", "--gpus", "16", "--pp", "2", "--schedule", "interleaved", "--layers", "8"],
        ["llama-2-7b", "--gpus", "8", "--attention", "math", "--optimizer", "sgd"],
    ],
)
def test_printed_command_gives_the_recommended_plan(argv, capsys, tmp_path):
    rc, out, _ = cli(capsys, "plan", *argv, "--json")
    d = json.loads(out)
    rec = d["recommended"]
    cfg = _run_config(rec["command"], tmp_path)
    assert cfg.plan == Plan(**{k: v for k, v in rec["plan"].items() if k not in ("grad_accum", "world")})
    assert _architecture(cfg.model.summary()) == _architecture(d["model"])
    assert shlex.split(rec["command_line"]) == rec["command"]


def _architecture(summary: dict) -> dict:
    """A model's fields without its bookkeeping (`run` names a changed preset NAME-scaled)."""
    return {k: v for k, v in summary.items() if k not in ("name", "source", "published_params")}


def test_command_names_a_model_file_by_its_path(capsys, tmp_path):
    from pathlib import Path

    f = str(Path(__file__).parent / "data" / "hf" / "gpt2.json")
    rc, out, _ = cli(capsys, "plan", f, "--gpus", "2", "--gpu", "rtx-4090", "--json", "--top", "1")
    rec = json.loads(out)["recommended"]
    assert f"model.path={f}" in rec["command"]
    cfg = _run_config(rec["command"], tmp_path)
    assert cfg.model.params == 124_439_808 and cfg.plan.seq == 1024  # clamped to the file's n_positions


def test_command_that_spans_nodes_and_the_plan_flags(tmp_path):
    m = preset("llama-3.1-8b")
    e = estimate(m, make_cluster("h100-80gb", 32), Plan(tp=2, pp=2, zero=1, gbs=64, vpp=2, schedule="interleaved"))
    argv = train_command(e, ["--set", "model.preset=llama-3.1-8b"])
    assert argv[:5] == ["torchrun", "--nnodes", "4", "--nproc-per-node", "8"]
    cfg = _run_config(argv, tmp_path)
    assert cfg.plan == e.plan and cfg.train.nproc == 32
    flags = ["--dp", "2", "--tp", "1", "--pp", "1", "--zero", "0", "--mbs", "1", "--gbs", "2", "--seq", "2048"]
    assert plan_argv(Plan(dp=2, gbs=2).resolve(m, 2)) == flags
    assert plan_argv(Plan(dp=2, gbs=2, sp=False, recompute="full", precision="fp32").resolve(m, 2)) == flags + [
        "--recompute",
        "full",
        "--precision",
        "fp32",
    ]


def test_command_lines_wrap_with_continuations():
    argv = ["torchrun", "--nnodes", "32", "-m", "shardwise", "run", "my config.toml"] + [f"--x{i}" for i in range(30)]
    lines = command_lines(argv, 60)
    assert all(len(x) <= 60 for x in lines)
    assert all(x.endswith(" \\") for x in lines[:-1]) and not lines[-1].endswith("\\")
    assert shlex.split(" ".join(x.removesuffix(" \\") for x in lines)) == argv  # quoted where needed
    assert any("-m shardwise" in x for x in lines)  # a flag stays with its value


# ---- names, batches and sequences the user did not give -------------------------------------------------
def test_estimate_and_plan_use_the_same_default_batch(capsys):
    rc, out, _ = cli(capsys, "plan", "llama-3.1-8b", "--gpus", "8", "--json", "--top", "1")
    held = json.loads(out)["held"]
    rc, out, _ = cli(capsys, "estimate", "llama-3.1-8b", "--gpus", "8", "--zero", "3", "--json")
    d = json.loads(out)
    # 4,194,304 tokens / 2048 = 2048 sequences, a multiple of dp*mbs = 8: both answer for 2048
    assert held == {"gbs": 2048, "gbs_pinned": False, "seq": 2048}
    assert d["plan"]["gbs"] == 2048 and d["held"] == {"gbs": 2048, "gbs_default": True, "seq": 2048}
    rc, out, _ = cli(capsys, "estimate", "llama-3.1-8b", "--gpus", "8", "--zero", "3")
    assert "global batch 2,048 x 2,048 tokens = 4,194,304 tokens (default: about 4M tokens, pin with --gbs)" in out
    # tp=2 leaves dp=4, mbs=2: the batch is a multiple of 8 nearest 2048
    rc, out, _ = cli(capsys, "estimate", "llama-3.1-8b", "--gpus", "8", "--tp", "2", "--mbs", "3", "--json")
    assert json.loads(out)["plan"]["gbs"] == 2052  # 12 x 171: 2048 / 12 = 170.7 -> 171
    rc, out, _ = cli(capsys, "estimate", "llama-3.1-8b", "--gpus", "8", "--gbs", "64", "--json")
    assert json.loads(out)["held"]["gbs_default"] is False


def test_huggingface_names_and_clamped_sequence(capsys):
    rc, out, err = cli(capsys, "estimate", "gpt2", "--gpus", "8")
    assert rc == 0 and err == "" and "gpt2-124m" in out
    assert "note: seq 1024: gpt2-124m's learned position table holds 1024 positions" in out
    assert "global batch 4,096 x 1,024 tokens" in out
    rc, out, _ = cli(capsys, "estimate", "openai-community/gpt2", "--gpus", "8", "--json")
    d = json.loads(out)
    assert rc == 0 and d["plan"]["seq"] == 1024 and any("position table" in n for n in d["notes"])
    rc, out, _ = cli(capsys, "plan", "gpt2", "--gpus", "8", "--json", "--top", "1")
    d = json.loads(out)
    assert rc == 0 and d["held"]["seq"] == 1024 and d["pinned"] == {} and len(d["notes"]) == 1
    # a --seq the user gave stays theirs: too long is the plan rule's one-line error
    rc, out, err = cli(capsys, "estimate", "gpt2", "--gpus", "8", "--seq", "2048")
    assert rc == 2 and "exceeds gpt2-124m's learned position table (1024)" in err and err.count("\n") == 1
    # a rotary model's context bounds the default too (tiny-llama: 64 tokens)
    rc, out, _ = cli(capsys, "estimate", "tiny-llama", "--gpus", "1", "--json")
    d = json.loads(out)
    assert d["plan"]["seq"] == 64 and any("tiny-llama's context is 64 positions" in n for n in d["notes"])


def test_json_contract_is_versioned_and_keeps_its_keys(capsys):
    rc, out, _ = cli(capsys, "plan", "llama-3.1-8b", "--gpus", "8", "--json", "--top", "3")
    d = json.loads(out)
    old = {
        "model",
        "cluster",
        "min_gpus",
        "held",
        "pinned",
        "headroom",
        "host_memory_bytes_per_node",
        "rank_by",
        "searched",
        "rejected",
        "rejected_examples",
        "ranked",
        "closest",
        "what_it_would_take",
    }
    assert d["schema"] == 2 and set(d) == old | {"schema", "recommended", "equivalent", "notes"}
    eq, rec = d["equivalent"], d["recommended"]
    assert eq["band"] == 0.1 and "~11%" in eq["basis"] and eq["count"] >= len(eq["plans"]) >= 1
    assert eq["plans"][0]["plan"] == rec["plan"] and eq["plans"][0]["rank"] == rec["rank"]
    best = d["ranked"][0]["time"]["tokens_per_s"]
    assert all(p["tokens_per_s"] >= best / 1.1 for p in eq["plans"])
    assert rec["command"][:2] == ["shardwise", "run"] and rec["why"]
    rc, out, _ = cli(capsys, "estimate", "llama-3.1-8b", "--gpus", "8", "--zero", "3", "--json")
    d = json.loads(out)
    assert d["schema"] == 2 and {"model", "cluster", "plan", "memory", "comm", "time", "notes"} <= set(d)


def test_nothing_fits_json_has_no_recommendation(capsys):
    argv = ["plan", "llama-2-7b", "--gpu", "a100-80gb", "--gpus", "8", "--zero", "0", "--tp", "1", "--pp", "1"]
    rc, out, _ = cli(capsys, *argv, "--gbs", "64", "--json")
    d = json.loads(out)
    assert rc == 1 and d["recommended"] is None and d["equivalent"] is None and d["schema"] == 2
    rc, out, _ = cli(capsys, *argv, "--gbs", "64")
    assert rc == 1 and "nothing fits" in out and "train it" not in out and "recommended" not in out


def test_plan_name_pattern_matches_every_short_name(big):
    res, _ = big
    for e in res.ranked:
        assert PLAN_NAME.fullmatch(e.plan.short()), e.plan.short()
    p = Plan(dp=2, tp=2, pp=2, vpp=2, schedule="interleaved", sp=True, recompute="full", offload="optimizer", zero=1)
    assert PLAN_NAME.fullmatch(p.replace(gbs=16).short())
