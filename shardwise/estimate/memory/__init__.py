"""Memory per GPU: model states by accounting profile, activations from the saved-tensor
inventory (activations.py), communication buffers and runtime overhead.

`memory(model, cluster, plan, profile)` returns the Memory of the worst rank at its peak. Two
ranks are candidates, the first pipeline stage (embeddings, the most micro-batches in flight)
and the last (the output head, the logits and the fp32 loss); with pp = 1 they are one. For the
`torch` profile each rank is examined at the moments its peak can fall on, and the breakdown is
that of the largest:
  A. a backward begins: every saved activation of the micro-batches in flight is alive, as two
     moments, the loss's backward (its temporaries) and the first block's (its transient).
     Without a pipeline, the last micro-batch's; with one, each backward of pipeline.backwards
     (the rank's last 1F1B one, and where a virtual stage's gradients first appear), with the
     gradients made by then and the outputs and input gradients the schedule still holds for
     its sends. FSDP2 without a pipeline has its own moments (fsdp2._fsdp_alone): the forward's
     all-gathers, the loss's backward, the first and second blocks' backwards at their start
     and end, the root's gradients, each with the buffers FSDP2 holds right then;
  B. (FSDP) the end of the backward: the root's (embeddings, output) gradient reduce-scatter,
     or with a pipeline, every group's deferred one;
  C. the optimizer step: activations freed, the step's scratch memory allocated.
Gradients are counted where they exist: the run tier sets .grad = None after each step, so a
plain model's gradients appear during the backward (a pipeline stage's with its first), DDP's
buckets are allocated for good, and FSDP's sharded gradients exist once reduce-scattered. The
other profiles are accounting models (their papers' tables) and count every model state at once,
at moment A.

Numeric plan fields may be numpy arrays; then every field of the Memory is an array too.

Where each engine's memory is (a file per engine; the profile objects, profiles.py, say which
applies):
  engines.py   the torch profile: which engine holds a plan's rank, DDP / ZeRO-1 or FSDP2
  ddp.py       DDP and ZeRO-1 (ZeroRedundancyOptimizer over DDP), and dp = 1, under torch
  zero1.py     ZeroRedundancyOptimizer's greedy partition of the parameters over the dp ranks
  fsdp2.py     ZeRO-2 and ZeRO-3 under torch: FSDP2, moment by moment
  paper.py     the zero-paper, megatron and deepspeed profiles: the papers' static sum
  moments.py   what the torch engines' moments are built from (backwards, gradients present)
  peak.py      the largest moment, summed into the Memory's fields (scalar and array plans)
  shapes.py    the parameters as the engines split them (tp-local shapes, pipeline stages)
  experts.py   expert parallelism: the routed experts other EP ranks hold, off the peak's states
"""

from __future__ import annotations

from shardwise.errors import ShardwiseError
from shardwise.estimate import activations as acts
from shardwise.estimate import context, profiles
from shardwise.estimate._num import _is_array
from shardwise.estimate.memory.engines import torch_moments
from shardwise.estimate.memory.experts import apply_ep
from shardwise.estimate.memory.moments import one_stage
from shardwise.estimate.memory.paper import paper_moment
from shardwise.estimate.memory.peak import peak_arrays, peak_memory
from shardwise.estimate.memory.shapes import stage_param_shapes as stage_param_shapes
from shardwise.estimate.memory.zero1 import zero1_bucket_numels as zero1_bucket_numels
from shardwise.estimate.profiles import Profile
from shardwise.spec.breakdown import Memory

STAGES = {"worst": (False, True), "first": (False,), "last": (True,)}  # which stages' ranks to examine


def memory(
    model,
    cluster,
    plan,
    profile: str | Profile = "torch",
    *,
    attention: str | None = None,
    stage: str = "worst",
    at: str = "peak",
    device: str = "cuda",
) -> Memory:
    """Bytes on the worst rank at its peak, by field, with named sub-items in `detail`.

    attention: "flash" (SDPA's flash / memory-efficient kernels, CUDA's default: no s*s scores
    saved) or "math" (scores materialized, as SDPA's math kernel and unfused attention do);
    default: the plan's own (Plan.attention).
    stage: "worst" (the larger of the two below), "first" or "last" pipeline stage's rank
    (`shardwise check` holds each stage's ranks against its own estimate).
    at: "peak" (the largest moment) or "step" (moment C, the optimizer step: the model states a
    rank holds when it steps, which `shardwise check` measures; torch profile only).
    device: where the torch profile's kernels run, "cuda" or "cpu" (`shardwise check` on a CPU):
    CPU's rms_norm is a composite that saves more (activations.block_inventory).
    """
    prof = profiles.profile(profile)
    attention = plan.attention if attention is None else attention
    acts._check("torch", attention, device)
    if not prof.offloads_params and plan.offload == "params":
        raise ShardwiseError(
            f"the {prof.name} profile has no parameter offload; use --profile torch or deepspeed, or --offload optimizer"
        )
    vec = _is_array(plan.dp, plan.tp, plan.pp, plan.mbs, plan.gbs, plan.vpp, plan.seq, plan.cp)
    if stage not in STAGES:
        raise ShardwiseError(f"unknown pipeline stage {stage!r}; use one of {', '.join(STAGES)}")
    if at not in ("peak", "step"):
        raise ShardwiseError(f"unknown moment {at!r}; use peak or step")
    lasts = STAGES[stage]
    if len(lasts) == 2 and one_stage(plan.pp):  # pp = 1: the first stage's rank is the last's
        lasts = lasts[:1]
    mem = Memory(capacity=cluster.gpu.memory_bytes)
    if vec and len(lasts) == 2:  # array plans: both ranks in one pass, the plans twice over
        both, last = _both_stages(plan)
        mem = peak_arrays(_moments(model, both, last, prof, attention, at, device), plan, mem, stages=2)
        return apply_ep(mem, model, plan, prof)
    moments = []
    for last in lasts:
        moments += _moments(model, plan, last, prof, attention, at, device)
    mem = peak_arrays(moments, plan, mem) if vec else peak_memory(moments, mem)
    return apply_ep(mem, model, plan, prof)


def _moments(model, plan, last, prof: Profile, attention: str, at: str, device: str = "cuda") -> list:
    # context parallel: each cp rank's moments are those of its local plan, plus the K/V in flight
    local = context.local_plan(plan)
    if not prof.moment_by_moment:
        return context.add_ring_buffers(
            [paper_moment(model, local, last, prof, attention), {}], model, plan, prof.dtypes(local)["mm"]
        )[:1]
    ms = context.add_ring_buffers(
        torch_moments(model, local, last, attention, device), model, plan, prof.dtypes(local)["mm"]
    )
    return ms[-1:] if at == "step" else ms  # the optimizer step is each list's last moment


def _both_stages(plan):
    """An array plan's numeric fields twice over along a new first axis, and `last` along it:
    False (the first stage's rank), then True (the last stage's)."""
    import numpy as np

    fields = ("dp", "tp", "pp", "mbs", "gbs", "vpp", "seq", "cp")
    values = [np.asarray(getattr(plan, f)) for f in fields]
    shape = (2,) + np.broadcast(*values).shape
    twice = {}
    for f, v in zip(fields, values):
        twice[f] = np.empty(shape, dtype=v.dtype)
        twice[f][...] = v
    last = np.zeros(shape, dtype=bool)
    last[1] = True
    return plan.replace(**twice), last


def saved_activations(model, plan, profile: str | Profile = "torch", *, attention: str | None = None) -> int:
    """Activation bytes on the worst rank at its moment A with the most (every saved tensor
    alive), whether or not that moment is the rank's overall peak: on one GPU the optimizer step
    often is, and then memory().activations is 0. For a resolved scalar plan. (The lecture's
    '~2 bytes/param'.)"""
    prof = profiles.profile(profile)
    attention = plan.attention if attention is None else attention
    acts._check("torch", attention)
    worst = 0
    for last in (False, True):
        local = context.local_plan(plan)
        ms = (
            torch_moments(model, local, last, attention)
            if prof.moment_by_moment
            else [paper_moment(model, local, last, prof, attention)]
        )
        for a in ms:
            worst = max(worst, sum(v for k, v in a.items() if k.startswith("act.")))
    return int(worst)
