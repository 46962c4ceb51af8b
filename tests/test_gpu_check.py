"""benchmarks/gpu_check.sh and its Python part, run on a CPU at tiny shapes: the script's own
test (its figures need a CUDA GPU). The matmuls it times are exactly the time model's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardwise import preset
from shardwise.estimate.time import layer_gemms
from shardwise.run.config import load

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

ENV = os.environ | {"PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("name,plan", gpu_check.PLANS)
def test_the_timed_shapes_are_the_estimates_matmuls(name, plan):
    model = preset(name)
    shapes = gpu_check.gemm_shapes(model, plan)
    got = {k: (2 * b * m * kk * n, calls) for k, (b, m, kk, n, calls) in shapes.items()}
    assert got == layer_gemms(model, plan)


def test_matmul_part_runs_on_a_cpu():
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "matmul", "--device", "cpu", "--tiny"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(" ms " in ln or "ms " in ln for ln in lines[2:-1]) == 12  # 3 plans x 4 kinds of matmul
    assert lines[-1].startswith("matmul time: mean |error|")


def test_the_step_config_is_a_run_config(tmp_path):
    for tiny in (True, False):
        path = tmp_path / f"step-{tiny}.toml"
        argv = [sys.executable, "benchmarks/gpu_check.py", "config", "--out", str(path)] + (["--tiny"] if tiny else [])
        subprocess.run(argv, cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=120)
        cfg = load(str(path))
        assert cfg.plan.precision == ("fp32" if tiny else "bf16-mixed")
        assert cfg.train.device == ("cpu" if tiny else "cuda")
    assert preset("llama-3.2-1b").params > 1e9  # the step's model: ~1B


def test_the_shell_script_dry_run_names_every_part():
    out = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env=ENV | {"PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "gpu_check.py matmul" in out and "shardwise calibrate" in out
    assert out.count("shardwise check") == 2 and "--hardware" in out and "--device cuda" in out
