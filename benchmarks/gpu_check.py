"""What one CUDA GPU can check of the estimate: predicted vs measured, printed.

Run: bash benchmarks/gpu_check.sh            (both parts, under 8 minutes on one GPU)
     python benchmarks/gpu_check.py matmul [--gpu h200] [--device cuda]
     python benchmarks/gpu_check.py config --out run.toml [--tiny]

matmul: the matmuls of three plans at the shapes the time model gives one GPU (time.layer_gemms:
        mbs*seq rows against each weight's tp-local slice, the attention core batched over the
        rank's heads), each timed in bf16 with CUDA events (median of REPS calls after WARMUP), next
        to the model's time for it (gemm_seconds at MATMUL_EFFICIENCY of the catalog GPU's peak
        plus GEMM_FIXED_S) and both as a fraction of peak.
config: writes the run config of the one-process training step gpu_check.sh hands to
        `shardwise check` (a ~1B Llama, bf16 autocast): peak allocator memory and step time
        against the estimate, without and with `shardwise calibrate`'s hardware file.

--device cpu --tiny runs the same code at shapes 16x smaller (a test of the script, not of a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from shardwise import Plan, make_cluster, preset
from shardwise.estimate import time as tm

WARMUP, REPS = 5, 20
# (preset, plan): a 1B model on one GPU, a 7B split over tp 4, a 70B over tp 8 (small per-GPU matmuls)
PLANS = (
    ("llama-3.2-1b", Plan(mbs=2, seq=2048)),
    ("llama-2-7b", Plan(tp=4, mbs=1, seq=4096)),
    ("llama-2-70b", Plan(tp=8, mbs=1, seq=4096)),
)
STEP_MODEL = "llama-3.2-1b"
GPU_NAMES = {"H200": "h200", "H100": "h100-80gb", "A100": "a100-80gb", "B200": "b200", "L4": "l4", "T4": "t4"}


def gemm_shapes(model, plan, shrink: int = 1) -> dict:
    """name -> (batch, M, K, N, calls): the matmuls of time.layer_gemms as tensor shapes, so the
    time model's FLOPs are exactly what is timed (2 * batch * M * K * N per call)."""
    h, t, M = model.hidden, plan.tp, plan.mbs * plan.seq
    heads = plan.mbs * model.heads // t
    out = {
        "qkv": (1, M, h, (model.q_dim + 2 * model.kv_dim) // t, 1),
        "attention_core": (heads, plan.seq, model.head_dim, plan.seq, 2),
        "attention_out": (1, M, model.q_dim // t, h, 1),
        "mlp": (1, M, h, model.ffn_hidden // t, 3 if model.ffn_kind == "swiglu" else 2),
    }
    want = tm.layer_gemms(model, plan)
    for k, (b, m, kk, n, calls) in out.items():
        assert (2 * b * m * kk * n, calls) == want[k], (k, want[k])  # the same matmuls as the estimate's
    if shrink > 1:
        out = {
            k: (max(b // shrink, 1), m // shrink, kk // shrink, n // shrink, c) for k, (b, m, kk, n, c) in out.items()
        }
    return out


def time_matmul(b: int, m: int, k: int, n: int, device: str) -> float:
    """Median seconds of one (b x) m x k @ k x n matmul in bf16 (fp32 on a CPU)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(b, m, k, device=device, dtype=dtype)
    w = torch.randn(b, k, n, device=device, dtype=dtype)
    mm = (lambda: torch.bmm(x, w)) if b > 1 else (lambda: x[0] @ w[0])
    for _ in range(WARMUP):
        mm()
    times = []
    for _ in range(REPS):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            mm()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            mm()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def detect_gpu() -> str:
    import torch

    name = torch.cuda.get_device_name(0)
    for key, preset_name in GPU_NAMES.items():
        if key in name:
            return preset_name
    sys.exit(f"gpu_check: no catalog GPU for {name!r}; pass --gpu NAME (see `shardwise gpus`)")


def cmd_matmul(a) -> None:
    gpu = make_cluster(a.gpu or (detect_gpu() if a.device == "cuda" else "h100-80gb"), 1).gpu
    peak = gpu.peak_flops("bf16")
    rate = peak * tm.MATMUL_EFFICIENCY
    shrink = 16 if a.tiny else 1
    print(f"matmuls at the plans' shapes on {gpu.name} (bf16 peak {peak / 1e12:.0f} TFLOP/s), one call each")
    print(f"{'plan':<32} {'matmul':<15} {'b x M x K x N':<26} {'predicted':>10} {'measured':>10} {'error':>7}  of peak")
    errors = []
    for name, plan in PLANS:
        model = preset(name)
        for k, (b, m, kk, n, _) in gemm_shapes(model, plan, shrink).items():
            flops = 2 * b * m * kk * n
            want = tm.gemm_seconds(flops, 1, rate, tm.GEMM_FIXED_S)
            got = time_matmul(b, m, kk, n, a.device)
            err = (want - got) / got * 100
            errors.append(abs(err))
            label = f"{name} tp{plan.tp} mbs{plan.mbs} s{plan.seq}"
            print(
                f"{label:<32} {k:<15} {f'{b}x{m}x{kk}x{n}':<26} {want * 1e3:>8.3f}ms {got * 1e3:>8.3f}ms "
                f"{err:>+6.1f}%  {flops / want / peak:.0%} vs {flops / got / peak:.0%}"
            )
    print(f"matmul time: mean |error| {statistics.mean(errors):.1f}%, max {max(errors):.1f}%")


def cmd_config(a) -> None:
    """The one-process training step's run config (`shardwise check` reads it)."""
    if a.tiny:  # the script's own test on a CPU: a Llama of the same architecture, 2 layers of 64
        model, plan, device = (
            f'preset = "{STEP_MODEL}"\nlayers = 2\nhidden = 64\nheads = 4\nkv_heads = 4\nvocab = 256',
            ('seq = 32\nmbs = 2\ngbs = 2\nprecision = "fp32"'),
            "cpu",
        )
    else:  # ~1.2B parameters, bf16 autocast, 2 x 2048 tokens per step: well inside one GPU's memory
        model, plan, device = (
            f'preset = "{STEP_MODEL}"',
            'seq = 2048\nmbs = 2\ngbs = 2\nprecision = "bf16-mixed"',
            "cuda",
        )
    text = (
        f"# written by benchmarks/gpu_check.py: one process, {STEP_MODEL}\n[model]\n{model}\n\n[plan]\n{plan}\n"
        'optimizer = "adamw"\n\n[data]\nsource = "synthetic"\nseed = 0\n\n'
        f'[train]\nsteps = 10\nseed = 0\nlog_every = 5\ndevice = "{device}"\n'
    )
    Path(a.out).write_text(text)
    print(a.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    m = sub.add_parser("matmul", help="the three plans' matmuls, predicted vs measured")
    m.add_argument("--gpu", default=None, help="catalog GPU (default: detected from the device's name)")
    m.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    m.add_argument("--tiny", action="store_true", help="shapes 16x smaller (to test the script on a CPU)")
    m.set_defaults(func=cmd_matmul)
    c = sub.add_parser("config", help="write the one-process training step's run config")
    c.add_argument("--out", required=True)
    c.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU (to test the script)")
    c.set_defaults(func=cmd_config)
    a = ap.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
