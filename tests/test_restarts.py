"""Restarts and several nodes: a rank killed mid-run (SIGKILL, as a lost machine) is restarted by
torchrun's elastic agent from the latest checkpoint, and the job ends with exactly the parameters and
optimizer states of a run that was never interrupted; the same with two agents on this machine
meeting at a c10d rendezvous on 127.0.0.1, as two nodes would.

The kill is the test hook of run/train.py (SHARDWISE_FAIL_SIGNAL): the rank sends itself the signal
at the start of the step, in the job's first attempt only."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
import torch
from test_run_failures import LLAMA, env, shardwise

STEPS, EVERY, KILL_AT = 8, 3, 4  # killed at the start of step 4: the restart resumes from step 3
COMMON = ("--steps", str(STEPS), "--device", "cpu", "--log-every", "100", "--set", "model.layers=2")
KILL = {"SHARDWISE_FAIL_RANK": "1", "SHARDWISE_FAIL_STEP": str(KILL_AT), "SHARDWISE_FAIL_SIGNAL": "9"}


def final_state(root, tmp) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{root.name}.pt"
    dcp_to_torch_save(str(root / f"step-{STEPS:06d}"), str(out))
    return torch.load(out, weights_only=False)


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    tensors = [k for k in a if isinstance(a[k], torch.Tensor)]
    assert any(k.endswith("exp_avg_sq") for k in tensors)  # optimizer states are compared too
    for k in tensors:
        assert torch.equal(a[k], b[k]), k


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """Two ranks, never interrupted."""
    tmp = tmp_path_factory.mktemp("straight")
    r = subprocess.run(
        shardwise(LLAMA, "--nproc", "2", *COMMON, "--checkpoint-dir", str(tmp / "ck")),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return final_state(tmp / "ck", tmp)


def check_restarted(ck, metrics, tmp, straight: dict) -> None:
    assert_same(final_state(ck, tmp), straight)
    got = records(metrics)
    marked = [r for r in got if "resumed_from" in r]
    assert len(marked) == 1 and marked[0]["resumed_from"] == EVERY and marked[0]["step"] == EVERY
    assert [r["step"] for r in got][-(STEPS - EVERY) :] == list(range(EVERY, STEPS))


@pytest.mark.slow
def test_a_killed_rank_is_restarted_from_the_latest_checkpoint(tmp_path, straight):
    m = tmp_path / "m.jsonl"
    argv = ("--nproc", "2", "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", str(EVERY))
    r = subprocess.run(
        shardwise(LLAMA, *argv, *COMMON, "--metrics", str(m), "--max-restarts", "1"),
        env=env(**KILL),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr
    assert (
        f"restart 1 of at most 1: a rank died; every rank starts again from {tmp_path / 'ck'}/step-000003" in r.stdout
    )
    check_restarted(tmp_path / "ck", m, tmp_path, straight)


@pytest.mark.slow
def test_without_restarts_the_kill_is_named(tmp_path):
    """The same kill with no restart left: the job fails, and its last line names the rank that was
    killed, not the rank that lost its connection to it."""
    r = subprocess.run(
        shardwise(LLAMA, "--nproc", "2", *COMMON, "--set", "train.timeout_s=600"),
        env=env(**KILL),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("shardwise: error: rank 1 was killed by signal 9 (SIGKILL)"), r.stderr
    assert "Traceback" not in r.stderr  # rank 0's lost connection is at most a clause of that line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_restart_after_one_loses_its_rank(tmp_path, straight):
    """Two agents, one rank each (node 1 holds rank 1), the command a Slurm script runs on each node."""
    endpoint = f"127.0.0.1:{free_port()}"
    ck = tmp_path / "ck"
    procs = [
        subprocess.Popen(
            shardwise(LLAMA, "--nnodes", "2", "--nproc", "1", "--rdzv-endpoint", endpoint, "--max-restarts", "1")
            + [*COMMON, "--checkpoint-dir", str(ck), "--checkpoint-every", str(EVERY)]
            + ["--metrics", str(tmp_path / "m.jsonl"), "--set", "train.timeout_s=120"],
            env=env(**KILL),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    # one metrics path, as on a shared file system: only the logging rank writes it, on whichever node
    check_restarted(ck, tmp_path / "m.jsonl", tmp_path, straight)


# ---- before anything starts ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, words",
    [
        ({("train", "max_restarts"): 2}, "a restart resumes from the latest checkpoint: set --checkpoint-dir"),
        ({("train", "max_restarts"): -1}, "must be from 0 to 1000"),
        ({("train", "nnodes"): 2}, "give --rdzv-endpoint HOST:PORT"),
        ({("train", "nnodes"): 2, ("train", "rdzv_endpoint"): "node0"}, "give --rdzv-endpoint HOST:PORT"),
        ({("train", "nnodes"): 0}, "must be from 1 to"),
        ({("train", "nnodes"): 3, ("train", "rdzv_endpoint"): "h:1"}, "do not spread evenly over 3 nodes"),
    ],
)
def test_restart_and_node_mistakes_are_one_line(overrides, words):
    from shardwise.errors import ShardwiseError
    from shardwise.run import config

    with pytest.raises(ShardwiseError, match=words.replace("(", r"\(")):
        config.load(LLAMA, {k: (v, f"--{k[1]}") for k, v in overrides.items()})


def test_nproc_is_per_node_and_the_plan_spans_the_nodes():
    from shardwise.run import config

    two = {("train", "nnodes"): (2, "--nnodes"), ("train", "rdzv_endpoint"): ("10.0.0.1:29500", "--rdzv-endpoint")}
    cfg = config.load(LLAMA, {**two, ("train", "nproc"): (4, "--nproc"), ("plan", "gbs"): (32, "--gbs")})
    assert (cfg.train.nproc, cfg.plan.world, cfg.plan.dp) == (4, 8, 8)
    cfg = config.load(LLAMA, {**two, ("plan", "dp"): (2, "--dp"), ("plan", "tp"): (2, "--tp")})
    assert (cfg.train.nproc, cfg.plan.world) == (2, 4)  # the plan's 4 processes, 2 on each node
