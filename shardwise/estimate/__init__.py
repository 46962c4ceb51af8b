"""The estimate tier: closed-form memory, communication and time for one Plan.

Pure Python (numpy only inside the vectorized search); never imports torch.
"""

from __future__ import annotations

from shardwise import units
from shardwise.errors import ShardwiseError
from shardwise.estimate import profiles
from shardwise.estimate.comm import collectives
from shardwise.estimate.experts import notes as experts_notes
from shardwise.estimate.memory import memory
from shardwise.estimate.profiles import PROFILES as PROFILES
from shardwise.estimate.profiles import Profile
from shardwise.estimate.time import step_time
from shardwise.spec import fp8
from shardwise.spec.breakdown import Estimate
from shardwise.spec.hardware import Cluster
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan, first_broken, stage_blocks
from shardwise.spec.presets import load_model

RULE_OF_THUMB_BYTES_PER_PARAM = 18  # the lecture: 2 + 2 + 12 model states + "~2" activations


def estimate(
    model: ModelSpec | str,
    cluster: Cluster,
    plan: Plan | None = None,
    profile: str | Profile = "torch",
    *,
    efficiency: float | None = None,
    tokens: float = 0.0,
    price: float | None = None,
) -> Estimate:
    """Memory, every collective, and time of one training step, per rank.

    `plan` may leave dp (derived from the GPU count) and gbs (= dp * mbs) out.
    `efficiency` is the fraction of peak FLOP/s the matmuls reach (default: see time.py).
    `tokens` (a training budget) and `price` ($/GPU-hour) add days, GPU-hours and cost.
    `profile`: an accounting profile's name (PROFILES) or the object itself.
    """

    prof = profiles.profile(profile)
    model = load_model(model)
    plan = (plan or Plan()).resolve(model, cluster.gpus)
    fp8.check_gpu(plan.precision, cluster.gpu)
    refused = first_broken(prof.rules, plan, model)
    if refused and prof.strict:
        raise ShardwiseError(f"{refused} (--profile {prof.name})")
    mem = memory(model, cluster, plan, prof)
    comm = collectives(model, cluster, plan, prof)
    t = step_time(model, cluster, plan, comm, efficiency=efficiency, tokens=tokens, price=price)
    return Estimate(
        memory=mem,
        comm=comm,
        time=t,
        model=model,
        cluster=cluster,
        plan=plan,
        profile=prof.name,
        rule_of_thumb_bytes=RULE_OF_THUMB_BYTES_PER_PARAM * model.params,
        notes=_notes(model, cluster, plan, prof, refused)
        + _compile_note(model, cluster, plan, prof, mem, t, comm, efficiency),
    )


def _compile_note(model, cluster, plan, prof: Profile, mem, t, comm, efficiency) -> list[str]:
    """What --compile changes against the same plan eager, and why (activations.block_inventory's
    `compiled`, time.COMPILED_PASSES)."""
    if not plan.compile:
        return []
    eager = plan.replace(compile=False)
    saved = memory(model, cluster, eager, prof).activations - mem.activations
    # with a measured --efficiency the memory-bound work is folded into that rate: no change
    faster = step_time(model, cluster, eager, comm, efficiency=efficiency).step_s - t.step_s
    return [
        f"--compile: activations {units.gib(saved)} lower per GPU than eager (the pointwise intermediates inductor "
        f"recomputes in its fused backward: rotary cos/sin, silu, norm internals, autocast's copies) and the step "
        f"{units.seconds(faster)} shorter (fused pointwise kernels make fewer passes over memory)."
    ]


def _notes(model, cluster, plan, prof: Profile, refused: str | None) -> list[str]:
    notes = []
    if model.estimated:
        notes.append(f"{model.name}'s dimensions are a public estimate, not a published architecture.")
    if refused:  # a rule of a profile that is not strict: estimated, and said
        notes.append(f"{prof.engine} cannot train this plan: {refused}.")
    if prof.run_engines and model.is_moe:
        notes.append("`shardwise run` does not build MoE models; this estimate is not checked by a run.")
    notes += experts_notes(model, plan)
    n, last = stage_blocks(plan, model.layers)
    if plan.pp > 1 and last != n:
        notes.append(
            f"uneven pipeline stages: {plan.pp * plan.vpp - 1} of {n} layers and a last one of {last} "
            "(with the output layer and loss); memory is the worst stage's, time the busiest's."
        )
    if plan.tp > cluster.node_size:
        notes.append(
            f"tp={plan.tp} spans nodes ({cluster.node_size} GPUs each): its all-reduces run on "
            f"{cluster.network.name}, not {cluster.gpu.link}."
        )
    return notes
