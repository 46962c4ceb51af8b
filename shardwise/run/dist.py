"""Process group and device mesh set-up for the run tier.

One mesh per job, `(pp, dp, tp)` with tp innermost: tensor-parallel ranks are consecutive (they
talk the most, so they share a node), data-parallel ranks are tp apart, pipeline stages dp*tp
apart. The estimate tier's "does this group fit in a node" rule (size * stride <= GPUs per
node) is exactly this layout.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from shardwise.errors import ShardwiseError
from shardwise.spec.plan import Plan

MESH_DIMS = ("pp", "dp", "tp")
DEFAULT_TIMEOUT_S = 300  # a dead peer fails a collective within this, instead of hanging forever


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_device(kind: str = "auto") -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is there (or asked for), else cpu."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ShardwiseError("device cuda was asked for but CUDA is not available; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if kind != "cpu":
        raise ShardwiseError(f"unknown device {kind!r}; use cpu, cuda or auto")
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the job's process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...).
    Idempotent; a single process outside torchrun needs no group."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # device_id binds NCCL to this GPU at once (eager init), so a wrong device fails here
    dist.init_process_group(
        backend_for(device), timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None
    )


def check_world(plan: Plan) -> None:
    """A plan with dp given must fit the job exactly (dp = 0 is derived from the job instead)."""
    world = world_size()
    if plan.dp and plan.world != world:
        raise ShardwiseError(
            f"plan needs dp*tp*pp{'*cp' if plan.cp > 1 else ''} = {plan.dp}*{plan.tp}*{plan.pp}"
            f"{f'*{plan.cp}' if plan.cp > 1 else ''} = {plan.world} processes "
            f"but this job has {world}; launch with --nproc {plan.world} (or change the plan)"
        )


HSDP_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def build_mesh(plan: Plan, device: torch.device) -> DeviceMesh | None:
    """The job's (pp, dp, tp) mesh, or None for a single process. HSDP (plan.dp_shard < dp) splits
    dp into (dp_replicate, dp_shard), shard ranks consecutive (inside a node where they fit, as the
    estimate's link rule assumes), and names the two flattened back "dp" (mesh["dp"]: the batch's
    data-parallel rank; mesh["dp_replicate", "dp_shard"]: FSDP2's 2-D mesh)."""
    check_world(plan)
    if world_size() == 1:
        return None
    if 0 < plan.dp_shard < plan.dp:
        shape = (plan.pp, plan.dp // plan.dp_shard, plan.dp_shard, plan.tp)
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=HSDP_DIMS)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return mesh
    return init_device_mesh(device.type, (plan.pp, plan.dp, plan.tp), mesh_dim_names=MESH_DIMS)


def fsdp_mesh(mesh: DeviceMesh, plan: Plan) -> DeviceMesh:
    """The mesh FSDP2 shards over: the dp dim, or HSDP's 2-D (replicate, shard) one."""
    return mesh["dp_replicate", "dp_shard"] if 0 < plan.dp_shard < plan.dp else mesh["dp"]
