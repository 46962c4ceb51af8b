"""`shardwise check` and `shardwise calibrate` (registered by shardwise/cli.py).

    shardwise check examples/tiny-llama.toml --nproc 4 --dp 2 --tp 2 [--steps N] [--hardware F] [--json] [--figure P]
    shardwise calibrate --out mymachine.toml [--nproc N] [--config run.toml]

Exit codes: check 0 when every judged value is within its tolerance, 1 otherwise, 2 for a user
error. No torch is imported until a command runs.
"""

from __future__ import annotations

import argparse
import json

from shardwise import paths
from shardwise.check import compare as ck
from shardwise.cli import args as ca
from shardwise.cli.run import CHECKPOINT_FLAGS, OPTIM_FLAGS, TRAIN_FLAGS, overrides_from_args
from shardwise.errors import ShardwiseError
from shardwise.run import config, launch
from shardwise.spec import hardware as hw

DEFAULT_STEPS = 20  # warm-up, DDP's bucket rebuild, 18 timed steps (their median), the measured last one:
# the median of 8 moved by 15% from run to run on a shared CPU


def register(sub) -> None:

    s = sub.add_parser(
        "check",
        help="predict a plan, run it with measurement, and compare item by item",
        description="Estimate the plan (torch profile) for the run's own model and devices, train a "
        "few steps with measurement on, and print predicted vs measured per rank: "
        "model states, peak memory, every collective, step time. Exit 0 when all "
        "verdicts pass, 1 otherwise.",
    )
    s.add_argument("config", help="run config (TOML), as for `shardwise run`")
    g = s.add_argument_group("the run")
    g.add_argument("--nproc", type=int, default=None, help="processes (default: dp*tp*pp)")
    g.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"steps to run (default {DEFAULT_STEPS}; the last is measured in detail, the first is "
        "left out of the time)",
    )
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--trace",
        action="store_true",
        help="hold the estimate against a trace (shardwise trace: the run's step on fake tensors, "
        "one rank per role) instead of a run: any size and world size, no processes started; peak within 5%%",
    )
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    g.add_argument(
        "--set", action="append", default=[], metavar="TABLE.FIELD=VALUE", help="override any config field (repeatable)"
    )
    ca.add_plan_args(s, defaults=False)
    m = s.add_argument_group("model dimensions (override the config's [model])")
    ca.add_dim_args(m)
    h = s.add_argument_group("the prediction")
    h.add_argument(
        "--hardware",
        default=None,
        metavar="FILE",
        help="a hardware file (from `shardwise calibrate`): step time is judged only with one",
    )
    h.add_argument(
        "--gpu",
        default=None,
        help="the GPU entry to predict with (default: the hardware file's only one, else h100-80gb)",
    )
    h.add_argument("--network", default=None, help="the network entry (default: the GPU's name in the file)")
    h.add_argument(
        "--efficiency",
        type=float,
        default=None,
        help="fraction of the GPU's tflops a training step reaches (default: the hardware file's "
        "[calibration] efficiency, or 1.0; without a file the estimate's default)",
    )
    o = s.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the report as JSON")
    o.add_argument("--figure", default=None, metavar="PNG", help="write predicted vs measured bars here")
    # flags of `shardwise run` that check does not take, for its override reader
    s.set_defaults(
        func=cmd_check,
        **{f: None for f in TRAIN_FLAGS if f not in ("nproc", "steps", "seed", "device")},
        **dict.fromkeys(OPTIM_FLAGS),
        **dict.fromkeys(CHECKPOINT_FLAGS),  # check runs no checkpoints
    )

    c = sub.add_parser(
        "calibrate",
        help="measure this machine's matmul and collective speed into a hardware file",
        description="Benchmark matmul throughput, memory bandwidth and every collective's latency "
        "and bandwidth on N local ranks (gloo on CPU, NCCL on CUDA) and write them as a "
        "hardware file for --hardware.",
    )
    c.add_argument("--out", required=True, metavar="FILE", help="the hardware file to write (TOML)")
    c.add_argument("--nproc", type=int, default=None, help="local ranks (default: 2 on CPU, every GPU on CUDA)")
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    c.add_argument("--name", default=None, help="the [gpu.NAME] / [network.NAME] entry (default this-cpu / this-cuda)")
    c.add_argument(
        "--config",
        default=None,
        metavar="TOML",
        help="a run config: benchmark matmuls at its model's shapes (default: a standard set)",
    )
    c.add_argument("--quick", action="store_true", help="fewer sizes, shorter timings (noisier)")
    c.set_defaults(func=cmd_calibrate)


def _cluster(a, nproc: int, device: str):

    gpu, network = a.gpu, a.network
    if a.hardware:
        entries = hw._file_entries(a.hardware, "gpu", hw.GPU)
        if gpu is None:
            if len(entries) != 1:
                raise ShardwiseError(
                    f"{a.hardware} has {len(entries)} [gpu.*] tables; pick one with --gpu "
                    f"({', '.join(sorted(entries)) or 'none'})"
                )
            gpu = next(iter(entries))
        if network is None and gpu.lower() in hw._file_entries(a.hardware, "network", hw.Network):
            network = gpu
    return hw.make_cluster(gpu or "h100-80gb", nproc, None, network, a.hardware), gpu


def _calibrated_efficiency(path: str, gpu: str) -> float:
    """A calibrated file's [calibration.NAME] efficiency (what a training step of the model reached
    over the matmul rate); 1.0 without one: the file's tflops are then taken as achieved."""
    import tomllib

    with open(path, "rb") as f:
        table = tomllib.load(f).get("calibration", {})
    entry = {k.lower(): v for k, v in table.items()}.get(gpu.lower(), {})
    e = entry.get("efficiency", 1.0)
    if not isinstance(e, (int, float)) or not 0 < e <= 1:
        raise ShardwiseError(f"{path} [calibration.{gpu}] efficiency must be in (0, 1], got {e!r}")
    return float(e)


def _judges_time(hardware: str | None, gpu, nproc: int, device: str) -> tuple[bool, str]:
    """Step time is judged against a file `shardwise calibrate` wrote (it has the engines' host
    time) for as many local ranks as this run has: CPU ranks share the cores, so a rank's matmul
    rate and host time depend on how many run at once."""
    if not hardware:
        return False, ""
    if not gpu.host_us:
        return False, (
            f"step time not judged: {hardware} [gpu.{gpu.name}] has no host_us (the engines' host time); "
            "write it with `shardwise calibrate`"
        )
    if device == "cpu" and gpu.gpus_per_node != nproc:
        return False, (
            f"step time not judged: {hardware} was calibrated on {gpu.gpus_per_node} rank(s), this run has "
            f"{nproc} sharing the same cores; run `shardwise calibrate --nproc {nproc}`"
        )
    return True, ""


def cmd_check(a: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ShardwiseError("`shardwise check` needs PyTorch: pip install -e '.[run]'") from None
    if launch.in_torchrun():
        raise ShardwiseError("run `shardwise check` on its own, not under torchrun: it starts the ranks itself")
    if a.efficiency is not None and not 0 < a.efficiency <= 1:
        raise ShardwiseError(f"--efficiency must be in (0, 1], got {a.efficiency}")
    if a.figure:  # before the run: a figure that cannot be written must not cost the run
        paths.check_output_file(a.figure, "--figure")
    cfg = config.load(a.config, overrides_from_args(a))
    if a.trace:
        return _check_trace(a, cfg)
    if cfg.plan.compile:  # the measured step runs under MemTracker, a dispatch mode dynamo refuses to compile
        raise ShardwiseError(
            "check measures memory with PyTorch's MemTracker, under which torch.compile cannot run; check the plan "
            "without --compile (the compiled block's saved tensors are held to the estimate by the test suite)"
        )
    device = launch.resolve_device(cfg)
    cluster, gpu = _cluster(a, cfg.train.nproc, device)
    efficiency = a.efficiency
    if efficiency is None and a.hardware:
        efficiency = _calibrated_efficiency(a.hardware, gpu)
    calibrated, why = _judges_time(a.hardware, cluster.gpu, cfg.train.nproc, device)
    rep = ck.check(cfg, device, cluster, calibrated=calibrated, efficiency=efficiency)
    if why:
        rep.notes.append(why)
    if a.figure:
        ck.figure(rep, a.figure)
    if a.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        ck.print_report(rep)
        if a.figure:
            print(f"figure: {a.figure}")
    return 0 if rep.passed else 1


def _check_trace(a: argparse.Namespace, cfg) -> int:
    from shardwise.trace.tracer import check_traceable

    check_traceable(cfg.model, cfg.plan)
    cluster, _ = _cluster(a, cfg.plan.world, "cpu")
    rep = ck.check_trace(cfg.model, cfg.plan, cluster, seed=cfg.train.seed)
    if a.figure:
        ck.figure(rep, a.figure)
    if a.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        ck.print_report(rep)
    return 0 if rep.passed else 1


def cmd_calibrate(a: argparse.Namespace) -> int:
    from pathlib import Path

    from shardwise.check import calibrate as cal

    try:
        import torch
    except ImportError:
        raise ShardwiseError("`shardwise calibrate` needs PyTorch: pip install -e '.[run]'") from None
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    nproc = a.nproc if a.nproc is not None else (torch.cuda.device_count() if device == "cuda" else 2)
    out = Path(a.out)
    if out.suffix.lower() != ".toml":
        raise ShardwiseError(f"--out {a.out!r}: write the hardware file as .toml")
    if not out.parent.exists():
        raise ShardwiseError(f"--out {a.out!r}: the directory {str(out.parent)!r} does not exist")
    paths.check_output_file(a.out, "--out")  # before the minutes of calibration
    shapes, text, model = cal.from_config(a.config) if a.config else (None, "", None)
    name = a.name
    if name is not None and not name.replace("-", "").replace("_", "").isalnum():
        raise ShardwiseError(f"--name {name!r}: use letters, digits, - and _ (it becomes a TOML table name)")
    res = cal.calibrate(nproc, device, name=name, shapes=shapes, shapes_text=text, quick=a.quick, model=model)
    out.write_text(res.toml())
    cal.print_result(res, str(out))
    return 0
