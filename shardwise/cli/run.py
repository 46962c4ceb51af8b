"""`shardwise run CONFIG.toml [flags]`: train with a plan on PyTorch's engines.

Registered by shardwise/cli.py. Imports no torch until the command runs, so `shardwise estimate`
works where torch is not installed.
"""

from __future__ import annotations

import argparse
import os

from shardwise import units
from shardwise.cli import args as ca
from shardwise.errors import ShardwiseError
from shardwise.estimate.memory import memory
from shardwise.run import config, launch
from shardwise.run.config import parse_set
from shardwise.spec.hardware import make_cluster

# command-line flag -> (table, field); every other field is reachable with --set TABLE.FIELD=VALUE
TRAIN_FLAGS = {
    "nproc": int,
    "steps": int,
    "seed": int,
    "log_every": int,
    "device": str,
    "metrics": str,
    "nnodes": int,
    "rdzv_endpoint": str,
    "max_restarts": int,
}
OPTIM_FLAGS = {"lr": float}
# flag -> [checkpoint] field
CHECKPOINT_FLAGS = {
    "checkpoint_dir": "dir",
    "checkpoint_every": "every",
    "keep": "keep",
    "async_save": "async_save",
    "resume": "resume",
}


def register(sub) -> None:

    s = sub.add_parser(
        "run",
        help="train with a plan on PyTorch's distributed engines (spawns the ranks with "
        "torchrun, or runs as one rank under torchrun)",
        description="Train a model from a TOML run config with the plan's parallelism on "
        "PyTorch's own engines (DDP, ZeroRedundancyOptimizer, FSDP2, DTensor, "
        "pipelining). Flags override the file; --set reaches every field.",
    )
    s.add_argument(
        "config", help="run config (TOML with [model] [plan] [data] [optim] [train]); see examples/tiny-llama.toml"
    )
    g = s.add_argument_group("processes and training")
    g.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes to start on this machine (default: dp*tp*pp; ignored under torchrun)",
    )
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--seed", type=int, default=None, help="model initialization seed")
    g.add_argument("--log-every", type=int, default=None, metavar="N", help="a progress line every N steps")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    g.add_argument("--metrics", default=None, metavar="FILE", help="write one JSON line per step here")
    g.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        metavar="N",
        help="when a rank dies, restart every rank from the latest checkpoint, up to N times (needs --checkpoint-dir)",
    )
    g.add_argument(
        "--nnodes",
        type=int,
        default=None,
        metavar="N",
        help="machines in the job: run the same command on each (--nproc is then per machine)",
    )
    g.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="with --nnodes: where the nodes meet (one node's address and a free port), the same on every node",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="start even when the estimate's peak memory exceeds what this machine has (checked before starting)",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.FIELD=VALUE",
        help="override any field, e.g. --set plan.tp=2 --set model.hidden=256 --set data.source=text (repeatable)",
    )
    c = s.add_argument_group("checkpoints (PyTorch Distributed Checkpoint; resumable under another plan)")
    c.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="save checkpoints in DIR/step-NNNNNN/")
    c.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="a checkpoint every N steps (default: only after the last step)",
    )
    c.add_argument("--keep", type=int, default=None, metavar="K", help="keep the newest K checkpoints (default 2)")
    c.add_argument(
        "--async",
        dest="async_save",
        action="store_true",
        default=None,
        help="write checkpoints in the background (DCP async_save) while training goes on",
    )
    c.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="continue from the newest checkpoint in --checkpoint-dir, or from PATH; "
        "the plan may differ from the one it was saved under",
    )
    ca.add_plan_args(s, defaults=False)  # the same plan flags as `shardwise estimate`, None = "keep the file's"
    m = s.add_argument_group("model dimensions (override the config's [model])")
    ca.add_dim_args(m)
    s.set_defaults(func=cmd_run)


def overrides_from_args(a: argparse.Namespace) -> dict:
    """(table, field) -> (value, where): --set first, then the dedicated flags (more specific)."""

    out = {}
    for item in a.set:
        key, value = parse_set(item)
        out[key] = (value, f"--set {key[0]}.{key[1]}")

    def flag(table: str, field: str, value, name: str | None = None) -> None:
        if value is not None:
            out[(table, field)] = (value, "--" + (name or field).replace("_", "-"))

    for f in ca.PLAN_FLAGS:
        flag("plan", f, getattr(a, f, None))
    for f in TRAIN_FLAGS:
        flag("train", f, getattr(a, f))
    for f in OPTIM_FLAGS:
        flag("optim", f, getattr(a, f))
    for f, field in CHECKPOINT_FLAGS.items():
        flag("checkpoint", field, getattr(a, f), "async" if f == "async_save" else f)
    for f in ca.DIM_FLAGS:
        flag("model", f, getattr(a, "dim_" + f))
    return out


def cmd_run(a: argparse.Namespace) -> int:
    # the config first: its mistakes are reported in a blink, before torch is even imported
    cfg = config.load(a.config, overrides_from_args(a), world=launch.torchrun_world())
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ShardwiseError("`shardwise run` needs PyTorch: pip install -e '.[run]'") from None
    device = launch.resolve_device(cfg)
    if not a.force:
        check_memory(cfg, device)
    if launch.in_torchrun():
        return launch.worker(cfg, device)
    return launch.launch(cfg, device)


def check_memory(cfg, device: str) -> None:
    """Refuse, before anything starts, a run whose estimated peak does not fit: on CUDA each rank
    against its device's memory, on CPU the local ranks together against the memory available now
    (they share it). A typo such as --mbs 40960 then costs a line, not a machine swapping to death.
    The estimate counts tensors only (not the ~0.5 GB of each process's runtime), so a refused run
    would certainly not have fit."""
    import torch

    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.train.nproc)) if launch.in_torchrun() else cfg.train.nproc
    cluster = make_cluster("h100-80gb", cfg.plan.world)  # the capacity is not used: only the bytes
    need = memory(cfg.model, cluster, cfg.plan, "torch", device=device).total
    if device == "cuda":
        have = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        total, where = need, f"and its GPU has {units.gib(have)}"
    else:
        have, total = available_ram(), need * ranks
        where = f"{units.gib(total)} for its {ranks} rank(s) here, and this machine has {units.gib(have)} available"
    if have and total > have:
        raise ShardwiseError(
            f"this run needs about {units.gib(need)} per rank at its peak (the estimate, torch profile), {where}; "
            "lower --mbs, --seq or the model, or pass --force to start anyway"
        )


def available_ram() -> int:
    """Bytes of memory available to new allocations now (Linux: MemAvailable), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
