"""A Slurm batch script that runs the plan under torchrun, one launcher per node
(https://slurm.schedmd.com/sbatch.html for the #SBATCH options; torchrun's c10d rendezvous on the
first node of the allocation). It trains with `shardwise run` and the run TOML exported beside it."""

from __future__ import annotations

import shlex

from shardwise.export import runconfig
from shardwise.export.job import Export, Job, refused

FMT = "slurm"


def refuse(job: Job) -> str | None:
    return runconfig.refuse(job)


def render(job: Job) -> Export:
    if why := refuse(job):
        raise refused(FMT, why)
    cl, p = job.cluster, job.plan
    lines = [
        "#!/bin/bash",
        f"# Slurm batch script, written by shardwise: {job.model.name} {p.short()}",
        "# beside it: shardwise.toml (`shardwise plan ... --export shardwise --out shardwise.toml`)",
        "#SBATCH --job-name=shardwise",
        f"#SBATCH --nodes={cl.nodes}",
        "#SBATCH --ntasks-per-node=1",  # one torchrun per node; it spawns the ranks
        f"#SBATCH --gpus-per-node={cl.node_size}",
        "#SBATCH --exclusive",
        "set -euo pipefail",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "srun torchrun \\",
        f"    --nnodes {cl.nodes} --nproc-per-node {cl.node_size} \\",
        '    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" \\',
        "    -m shardwise run shardwise.toml "
        + shlex.join(
            ["--dp", str(p.dp), "--tp", str(p.tp), "--pp", str(p.pp)] + (["--cp", str(p.cp)] if p.cp > 1 else [])
        ),
    ]
    return Export("\n".join(lines) + "\n", "shardwise.sbatch", "sbatch shardwise.sbatch")
