"""The EP x DP layout's model states (spec/experts.py). The engines' sums count every routed expert
of a rank's blocks, as without expert parallelism; with ep > 1 a rank holds experts / ep of them.

What a ZeRO stage keeps whole on every data-parallel rank (ZeRO-0: parameters, gradients and
optimizer states; ZeRO-1: parameters and gradients, incl. DDP's buckets, accumulated gradients and
autocast's low-precision copy) shrinks by the routed experts held elsewhere, a fraction of the
rank's elements; what it shards is the same per rank (an expert's states split over dp / ep ranks,
each holding experts / ep of them, is experts / dp per rank, as without EP). FSDP2's unsharded
items (ZeRO-2/3: the gathered blocks and their gradients) shrink by the routed experts' share of a
block held elsewhere. The scale is applied to the peak's items, so the fields stay their sums.
"""

from __future__ import annotations

from shardwise.estimate import experts
from shardwise.estimate._num import _is_array, where
from shardwise.estimate.memory.shapes import block_sum, elements, groups, local_shape, stage_of
from shardwise.estimate.pipeline import rank_blocks
from shardwise.estimate.profiles import Profile
from shardwise.spec.breakdown import Memory

PPM = experts.PPM


def _numel(tp):
    return lambda p: elements(local_shape(p, tp))


def rank_keep(model, plan):
    """Per million of a rank's (first stage's) parameter elements it still holds under EP."""
    blocks = rank_blocks(model, plan, False)
    held = stage_of(model, plan.pp, False, blocks).sum(groups(model), _numel(plan.tp))
    gone = blocks * (model.experts - model.experts // plan.ep) * experts.routed_expert_numel(model, plan.tp)
    return PPM - gone * PPM // held


def block_keep(model, plan):
    """Per million of one MoE block's elements a rank gathers under EP (FSDP2's unsharded block)."""
    block = block_sum(groups(model), _numel(plan.tp))
    gone = (model.experts - model.experts // plan.ep) * experts.routed_expert_numel(model, plan.tp)
    return PPM - gone * PPM // block


def _whole(key: str, zero):
    """1 where the item is a whole (replicated) model state under this ZeRO stage (array-safe)."""
    field, _, item = key.partition(".")
    if field == "params" or field == "grads":
        return where(zero <= 1, 1, 0)
    if field == "optimizer":
        return where(zero == 0, 1, 0)
    return 0 * zero


def apply_ep(mem: Memory, model, plan, prof: Profile) -> Memory:
    """`mem` less the routed experts other EP ranks hold. A no-op for dense models and ep = 1."""
    if not model.is_moe or (not _is_array(plan.ep) and plan.ep == 1):
        return mem
    rank, block = rank_keep(model, plan), block_keep(model, plan)
    for key in list(mem.detail):
        field = key.partition(".")[0]
        if field not in ("params", "grads", "optimizer"):
            continue
        # the blocks' unsharded items (params.unsharded also holds the root's, a small share)
        block_item = "unsharded" in key and "head" not in key and "root" not in key
        gathered = where(plan.zero >= 2, 1, 0) if block_item else 0 * plan.zero
        keep = where(_whole(key, plan.zero) == 1, rank, where(gathered == 1, block, PPM))
        v = mem.detail[key]
        cut = v - experts.scale(v, keep)
        mem.detail[key] = v - cut
        setattr(mem, field, getattr(mem, field) - cut)
    return mem
