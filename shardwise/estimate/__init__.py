"""The estimate tier: closed-form memory, communication and time for one Plan.

Pure Python (numpy only inside the vectorized search); never imports torch.
"""

from __future__ import annotations

from shardwise.errors import ShardwiseError, closest
from shardwise.estimate.comm import collectives
from shardwise.estimate.memory import memory
from shardwise.estimate.time import step_time
from shardwise.spec.breakdown import Estimate
from shardwise.spec.hardware import Cluster
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan, engine_violation
from shardwise.spec.presets import load_model

PROFILES = ("torch", "zero-paper", "megatron", "deepspeed")
RULE_OF_THUMB_BYTES_PER_PARAM = 18  # the lecture: 2 + 2 + 12 model states + "~2" activations


def estimate(
    model: ModelSpec | str,
    cluster: Cluster,
    plan: Plan | None = None,
    profile: str = "torch",
    *,
    efficiency: float | None = None,
    tokens: float = 0.0,
    price: float | None = None,
) -> Estimate:
    """Memory, every collective, and time of one training step, per rank.

    `plan` may leave dp (derived from the GPU count) and gbs (= dp * mbs) out.
    `efficiency` is the fraction of peak FLOP/s the matmuls reach (default: see time.py).
    `tokens` (a training budget) and `price` ($/GPU-hour) add days, GPU-hours and cost.
    """

    if profile not in PROFILES:
        raise ShardwiseError(f"unknown accounting profile {profile!r}; {closest(profile, PROFILES)}")
    model = load_model(model)
    plan = (plan or Plan()).resolve(model, cluster.gpus)
    mem = memory(model, cluster, plan, profile)
    comm = collectives(model, cluster, plan, profile)
    t = step_time(model, cluster, plan, comm, efficiency=efficiency, tokens=tokens, price=price)
    return Estimate(
        memory=mem,
        comm=comm,
        time=t,
        model=model,
        cluster=cluster,
        plan=plan,
        profile=profile,
        rule_of_thumb_bytes=RULE_OF_THUMB_BYTES_PER_PARAM * model.params,
        notes=_notes(model, cluster, plan, profile),
    )


def _notes(model, cluster, plan, profile) -> list[str]:
    notes = []
    if model.estimated:
        notes.append(f"{model.name}'s dimensions are a public estimate, not a published architecture.")
    if profile == "torch":
        why = engine_violation(plan, model)
        if why:
            notes.append(f"`shardwise run` cannot train this plan on PyTorch's engines: {why}.")
        if model.is_moe:
            notes.append("`shardwise run` does not build MoE models; this estimate is not checked by a run.")
    if plan.tp > cluster.node_size:
        notes.append(
            f"tp={plan.tp} spans nodes ({cluster.node_size} GPUs each): its all-reduces run on "
            f"{cluster.network.name}, not {cluster.gpu.link}."
        )
    return notes
