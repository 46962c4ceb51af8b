"""Failure behaviour of `shardwise run`: a rank that raises ends the job in seconds, Ctrl-C ends
every rank, and config mistakes (a world-size mismatch, a bad TOML field) are one line and
exit code 2 before anything is spawned."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LLAMA = str(ROOT / "examples/tiny-llama.toml")


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SHARDWISE_FAIL", "TORCHELASTIC"))}
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e | extra


def shardwise(*argv):
    return [sys.executable, "-m", "shardwise", "run", *argv]


def alive_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains marker. The workers' command
    line carries the whole config, so a unique metrics path finds them."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state not in ("Z", "X"):
            out.append(int(d.name))
    return out


def wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {n} metric lines within {timeout} s")


# ---- before anything starts ----------------------------------------------------------------------
def test_world_size_mismatch_exits_2_before_spawning(tmp_path):
    m = tmp_path / "m.jsonl"
    r = subprocess.run(
        shardwise(LLAMA, "--nproc", "2", "--dp", "4", "--metrics", str(m)),
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("shardwise: error: ")
    assert "dp*tp*pp = 4*1*1 = 4" in r.stderr and "2 processes" in r.stderr
    assert r.stdout == "" and not m.exists()  # no header, no rank, no file: nothing ran


def test_bad_toml_field_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(Path(LLAMA).read_text().replace("mbs = 4", "mbs = 4\nmicro_batch = 2"))
    r = subprocess.run(shardwise(str(cfg), "--nproc", "2"), env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert str(cfg) in r.stderr and "[plan]" in r.stderr and "'micro_batch'" in r.stderr


# ---- while running ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_rank_that_raises_ends_the_job_within_seconds(tmp_path):
    """Rank 1 raises at the start of step 2 while rank 0 waits for it in a collective. The
    collective timeout is set to 10 minutes, so the job ending within seconds of the failure can
    only come from the launcher watching its workers, not from a timeout."""
    m = tmp_path / "fail.jsonl"
    r = subprocess.run(
        shardwise(
            LLAMA,
            "--nproc",
            "2",
            "--steps",
            "1000",
            "--device",
            "cpu",
            "--metrics",
            str(m),
            "--set",
            "train.timeout_s=600",
        ),
        env=env(SHARDWISE_FAIL_RANK="1", SHARDWISE_FAIL_STEP="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    ended = time.time()
    assert r.returncode == 1, r.stderr
    # the last line names the rank that failed and its error; above it, its traceback and no other:
    # rank 0's lost connection is not a second traceback (at most a clause of that line)
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("shardwise: error: rank 1 failed: RuntimeError: injected failure on rank 1 at step 2")
    ), r.stderr
    assert r.stderr.count("Traceback (most recent call last)") == 1, r.stderr
    lines = m.read_text().splitlines()
    assert len(lines) == 2  # steps 0 and 1 only: rank 0 did not train on alone
    # from the last step written to the job's end: the teardown, well under the 600 s timeout
    since_last = ended - m.stat().st_mtime
    assert since_last < 30, f"{since_last:.1f} s from the failure to the end of the job"
    assert alive_with(str(m)) == []


@pytest.mark.slow
def test_ctrl_c_on_the_launcher_stops_every_rank(tmp_path):
    m = tmp_path / "sigint.jsonl"
    p = subprocess.Popen(
        shardwise(LLAMA, "--nproc", "2", "--steps", "100000", "--device", "cpu", "--metrics", str(m)),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_lines(m, 2, p, timeout=240)
        workers = [pid for pid in alive_with(str(m)) if pid != p.pid]
        assert len(workers) == 2, workers  # the two ranks, besides the launcher
        p.send_signal(signal.SIGINT)  # to the launcher only, as a terminal's Ctrl-C would reach it
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 130
    assert "interrupted (SIGINT); every rank was stopped" in p.stderr.read()
    assert alive_with(str(m)) == []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launcher_killed_outright_takes_its_ranks_with_it(tmp_path):
    """SIGKILL reaches no handler, so the agent cannot stop its workers: they watch the launcher
    themselves (launch.die_with_launcher) and end within seconds, instead of training on alone."""
    m = tmp_path / "sigkill.jsonl"
    p = subprocess.Popen(
        shardwise(LLAMA, "--nproc", "2", "--steps", "100000", "--device", "cpu", "--metrics", str(m)),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_lines(m, 2, p, timeout=240)
        workers = [pid for pid in alive_with(str(m)) if pid != p.pid]
        assert len(workers) == 2, workers
        p.kill()
        p.wait(timeout=30)
        end = time.monotonic() + 30
        while alive_with(str(m)) and time.monotonic() < end:
            time.sleep(0.2)
        assert alive_with(str(m)) == []
        lines = len(m.read_text().splitlines())
        time.sleep(2)
        assert len(m.read_text().splitlines()) == lines  # nobody writes metrics any more
    finally:
        if p.poll() is None:
            p.kill()
        for pid in alive_with(str(m)):
            os.kill(pid, signal.SIGKILL)
