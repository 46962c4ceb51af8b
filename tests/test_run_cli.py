"""`shardwise run` end to end: flags, the learnability of the synthetic data, one rank in this
process, two ranks through shardwise's own elastic launch and through torchrun directly."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardwise import cli
from shardwise.cli import run as command
from shardwise.run import launch
from shardwise.run.config import OptimConfig, load

ROOT = Path(__file__).resolve().parents[1]
LLAMA = str(ROOT / "examples/tiny-llama.toml")
GPT2 = str(ROOT / "examples/tiny-gpt2.toml")


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SHARDWISE_FAIL", "TORCHELASTIC"))}
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def parse(*argv):
    return cli.build_parser().parse_args(["run", *argv])


# ---- flags ---------------------------------------------------------------------------------
def test_flags_map_to_fields_and_beat_set():
    a = parse(
        LLAMA,
        "--nproc",
        "4",
        "--tp",
        "2",
        "--zero",
        "3",
        "--sp",
        "--layers",
        "8",
        "--kv-heads",
        "2",
        "--lr",
        "1e-3",
        "--steps",
        "7",
        "--device",
        "cpu",
        "--metrics",
        "m.jsonl",
        "--set",
        "plan.tp=4",
        "--set",
        "data.branch=3",
    )
    ov = command.overrides_from_args(a)
    assert ov[("plan", "tp")] == (2, "--tp")  # the flag wins over --set plan.tp=4
    assert ov[("data", "branch")] == (3, "--set data.branch")
    assert ov[("plan", "zero")] == (3, "--zero") and ov[("plan", "sp")] == (True, "--sp")
    assert ov[("model", "layers")] == (8, "--layers") and ov[("model", "kv_heads")] == (2, "--kv-heads")
    assert ov[("train", "nproc")] == (4, "--nproc") and ov[("train", "steps")] == (7, "--steps")
    assert ov[("optim", "lr")] == (1e-3, "--lr") and ov[("train", "metrics")] == ("m.jsonl", "--metrics")
    # flags not given leave the file's values alone
    assert ("plan", "mbs") not in ov and ("plan", "dp") not in ov and ("model", "hidden") not in ov
    cfg = load(LLAMA, ov)
    assert (cfg.plan.dp, cfg.plan.tp, cfg.plan.zero, cfg.model.layers, cfg.model.kv_heads) == (2, 2, 3, 8, 2)


def test_registering_run_imports_no_torch():
    """`shardwise estimate` must work where torch is not installed: parsing `run` needs none."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from shardwise.cli import build_parser\n"
        f"a = build_parser().parse_args(['run', {LLAMA!r}, '--tp', '2'])\n"
        "assert a.func.__module__ == 'shardwise.cli.run' and a.tp == 2\n"
        "import shardwise.run.config, shardwise.run.data\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env(), timeout=120)


def test_a_config_error_is_one_line_and_starts_nothing(tmp_path, monkeypatch, capsys):
    def no(*a, **k):
        raise AssertionError("nothing may start on a config error")

    monkeypatch.setattr(launch, "launch", no)
    monkeypatch.setattr(launch, "worker", no)
    metrics = tmp_path / "m.jsonl"
    for argv in (
        ["--steps", "0"],
        ["--nproc", "2", "--dp", "4"],
        ["--set", "plan.zeroo=1"],
        ["--set", "optim.lr=fast"],
        ["--tp", "3"],
        ["--optimizer", "adam8bit"],
    ):
        assert cli.main(["run", LLAMA, "--metrics", str(metrics), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("shardwise: error: ") and err.count("\n") == 1, err
    assert not metrics.exists()


# ---- training -------------------------------------------------------------------------------
def test_synthetic_data_is_learnable_in_50_steps(tmp_path):
    """One process, the tiny-llama example as shipped: 50 steps of 16 x 64 tokens. The loss starts
    at ln(256) = 5.545 (initial logits are near uniform) and must end below 2.5: more than 3 nats
    learned, most of the way to the chain's entropy floor (1.27 nats for data seed 0)."""
    m = tmp_path / "m.jsonl"
    assert cli.main(["run", LLAMA, "--device", "cpu", "--metrics", str(m)]) == 0
    rec = records(m)
    assert [r["step"] for r in rec] == list(range(50))
    assert abs(rec[0]["loss"] - math.log(256)) < 0.1
    assert rec[-1]["loss"] < 2.5
    assert sum(r["loss"] for r in rec[-5:]) / 5 < 2.6
    cfg = load(LLAMA)
    o = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.1)
    for r in rec:
        assert r["lr"] == pytest.approx(o.lr_at(r["step"], 50))
        # tokens/s is the global batch's tokens over the step's wall time
        assert r["tokens_per_s"] == pytest.approx(cfg.plan.gbs * cfg.plan.seq / r["step_s"])
        assert r["grad_norm"] > 0 and r["peak_mem_bytes"] > 0 and r["peak_mem_kind"] == "cpu_peak_rss"
    # elapsed_s: the step's end since the loop began; consecutive ends are at least a step apart
    assert all(b["elapsed_s"] - a["elapsed_s"] >= b["step_s"] for a, b in zip(rec, rec[1:]))


def single_losses(config, tmp_path, *argv) -> list[float]:
    m = tmp_path / "single.jsonl"
    assert cli.main(["run", config, "--device", "cpu", "--metrics", str(m), *argv]) == 0
    return [r["loss"] for r in records(m)]


@pytest.mark.slow
def test_two_ranks_through_shardwise_launch_match_one(tmp_path):
    """`shardwise run --nproc 2` re-launches itself under the elastic agent; ZeRO-1 over 2 ranks
    sees the same global batches and must give the single process's losses (1e-5 relative)."""
    m = tmp_path / "two.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardwise",
            "run",
            LLAMA,
            "--nproc",
            "2",
            "--zero",
            "1",
            "--steps",
            "4",
            "--device",
            "cpu",
            "--metrics",
            str(m),
        ],
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "dp2 tp1 pp1 zero1" in r.stdout and "done   4 steps" in r.stdout
    two = [x["loss"] for x in records(m)]
    assert two == pytest.approx(single_losses(LLAMA, tmp_path, "--steps", "4"), rel=1e-5)


@pytest.mark.slow
def test_torchrun_runs_it_directly(tmp_path):
    """`torchrun -m shardwise run cfg.toml`: each process is one rank (no second launch); tensor
    parallel with sequence parallel on the GPT-2 example, the same losses as one process."""
    m = tmp_path / "tr.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "shardwise",
            "run",
            GPT2,
            "--tp",
            "2",
            "--sp",
            "--steps",
            "3",
            "--device",
            "cpu",
            "--metrics",
            str(m),
        ],
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "dp1 tp2 pp1 zero0" in r.stdout
    tp = [x["loss"] for x in records(m)]
    assert tp == pytest.approx(single_losses(GPT2, tmp_path, "--steps", "3"), rel=1e-5)


# ---- GPU (skipped without CUDA) ------------------------------------------------------------------
@pytest.mark.gpu
def test_one_gpu_bf16_mixed_learns(tmp_path):
    m = tmp_path / "gpu.jsonl"
    assert (
        cli.main(["run", LLAMA, "--device", "cuda", "--precision", "bf16-mixed", "--steps", "20", "--metrics", str(m)])
        == 0
    )
    rec = records(m)
    assert rec[0]["peak_mem_kind"] == "cuda_max_allocated" and rec[0]["peak_mem_bytes"] > 0
    assert rec[-1]["loss"] < rec[0]["loss"] - 1.0


@pytest.mark.gpu
def test_two_gpus_nccl_fsdp2(tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    m = tmp_path / "nccl.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardwise",
            "run",
            LLAMA,
            "--nproc",
            "2",
            "--zero",
            "3",
            "--precision",
            "bf16-mixed",
            "--device",
            "cuda",
            "--steps",
            "5",
            "--metrics",
            str(m),
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "2 process(es) on cuda" in r.stdout and len(records(m)) == 5


# ---- checkpoints and resume ---------------------------------------------------------------------
def test_checkpoint_flags_map_to_the_checkpoint_table():
    ov = command.overrides_from_args(
        parse(LLAMA, "--checkpoint-dir", "ck", "--checkpoint-every", "5", "--keep", "3", "--async", "--resume")
    )
    assert ov[("checkpoint", "dir")] == ("ck", "--checkpoint-dir")
    assert ov[("checkpoint", "every")] == (5, "--checkpoint-every") and ov[("checkpoint", "keep")] == (3, "--keep")
    assert ov[("checkpoint", "async_save")] == (True, "--async")
    assert ov[("checkpoint", "resume")] == ("latest", "--resume")  # bare: the newest in the directory
    ov = command.overrides_from_args(parse(LLAMA, "--resume", "ck/step-000010", "--steps", "5"))
    assert ov[("checkpoint", "resume")] == ("ck/step-000010", "--resume") and ov[("train", "steps")] == (5, "--steps")
    # not given: the file's values stay
    assert not any(t == "checkpoint" for t, _ in command.overrides_from_args(parse(LLAMA)))


def test_checkpoint_mistakes_are_one_line_and_start_nothing(tmp_path, monkeypatch, capsys):
    def no(*a, **k):
        raise AssertionError("nothing may start on a config error")

    monkeypatch.setattr(launch, "launch", no)
    monkeypatch.setattr(launch, "worker", no)
    (tmp_path / "afile").write_text("x")
    for argv, says in (
        (["--resume"], "--resume: latest means the newest checkpoint"),
        (["--checkpoint-dir", str(tmp_path / "ck"), "--resume"], "no complete checkpoint in"),
        (["--checkpoint-every", "3"], "--checkpoint-every: saves checkpoints, but there is no checkpoint directory"),
        (["--checkpoint-dir", str(tmp_path / "afile")], "is a file, not a directory"),
        (["--checkpoint-dir", "ck", "--keep", "0"], "--keep: must be a positive integer"),
        (["--resume", str(tmp_path / "nope")], "does not exist"),
    ):
        assert cli.main(["run", LLAMA, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("shardwise: error: ") and err.count("\n") == 1 and says in err, err


def test_resume_from_the_command_line_appends_to_the_metrics(tmp_path, capsys):
    """One process: 4 steps with a checkpoint every 2, then the same command run again over the
    same metrics file says it overwrites it; --resume from step 2 appends steps 2 and 3, the first
    marked, with the losses the first run had."""
    m, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    argv = ["run", LLAMA, "--device", "cpu", "--steps", "4", "--metrics", str(m), "--checkpoint-dir", str(ck)]
    assert cli.main([*argv, "--checkpoint-every", "2"]) == 0
    first = records(m)
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002", "step-000004"]
    assert cli.main([*argv, "--resume", str(ck / "step-000002")]) == 0
    out = capsys.readouterr().out
    assert f"resume {ck / 'step-000002'}: 2 steps done, saved under the same plan" in out
    got = records(m)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 2, 3] and got[4]["resumed_from"] == 2
    assert "resumed_from" not in got[5] and not any("resumed_from" in r for r in got[:4])
    assert [r["loss"] for r in got[4:]] == [r["loss"] for r in first[2:]]
    assert cli.main(argv) == 0
    assert f"metrics {m} exists: overwritten (--resume appends to it)" in capsys.readouterr().out
    assert [r["step"] for r in records(m)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_two_rank_zero3_checkpoint_resumes_in_one_process(tmp_path):
    """The user who changes the number of GPUs: saved by 2 ranks under ZeRO-3 (through shardwise's
    own launch), resumed by one process with another plan, which says so and trains on."""
    m, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    common = ["-m", "shardwise", "run", LLAMA, "--device", "cpu", "--metrics", str(m), "--checkpoint-dir", str(ck)]
    r = subprocess.run(
        [sys.executable, *common, "--nproc", "2", "--zero", "3", "--steps", "4", "--checkpoint-every", "2"],
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    two = records(m)
    r = subprocess.run(
        [sys.executable, *common, "--steps", "6", "--resume"],
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "4 steps done, resharded from dp2 tp1 pp1 zero3 mbs4 ga2 to dp1 tp1 pp1 zero0 mbs4 ga4" in r.stdout
    got = records(m)
    assert [x["step"] for x in got] == [0, 1, 2, 3, 4, 5] and got[4]["resumed_from"] == 4
    assert got[:4] == two and got[5]["loss"] < got[0]["loss"]
    assert sorted(p.name for p in ck.iterdir()) == ["step-000004", "step-000006"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["run", LLAMA, "--metrics", "/proc/m.jsonl"], "--metrics: cannot write /proc/m.jsonl"),
        (["run", LLAMA, "--metrics", "/"], "--metrics: / is a directory"),
        (["check", LLAMA, "--figure", "/proc/x.png"], "--figure: cannot write /proc/x.png"),
        (["calibrate", "--out", "/proc/x.toml"], "--out: cannot write /proc/x.toml"),
    ],
)
def test_unwritable_outputs_fail_before_the_work(argv, words, capsys):
    """Checked before any process starts (the run, the check, the calibration): one line, exit 2."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and words in err and err.count("\n") == 1, err


def test_a_run_that_cannot_fit_is_refused_before_it_starts(tmp_path, capsys, monkeypatch):
    """--mbs 4096 at seq 4096: the estimate's peak is hundreds of GiB per rank. Refused in one line
    before any process starts (no metrics file), unless --force; the RAM figure is the machine's."""
    m = tmp_path / "m.jsonl"
    argv = ["run", LLAMA, "--seq", "4096", "--mbs", "4096", "--gbs", "8192", "--nproc", "2", "--metrics", str(m)]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "per rank at its peak" in err and "--force" in err
    assert "for its 2 rank(s) here" in err and not m.exists()
    assert command.available_ram() > 0  # Linux reports MemAvailable
    # what fits passes: the example as it is
    a = cli.build_parser().parse_args(["run", LLAMA])
    cfg = load(a.config, command.overrides_from_args(a))
    command.check_memory(cfg, "cpu")
    # --force skips the check (the run itself is not started here: it would not fit)
    started = []
    monkeypatch.setattr(command.launch, "launch", lambda cfg, device: started.append(cfg.plan.mbs) or 0)
    assert cli.main([*argv, "--force"]) == 0 and started == [4096]
