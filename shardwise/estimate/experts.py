"""Expert parallelism in the estimate: the all-to-all's bytes and calls, and what the EP x DP layout
(spec/experts.py) takes off each rank's model states. comm.py makes the collectives from these,
memory/__init__.py applies the model-state difference. Array-safe (the search's plans).

Dispatch and combine (torchtitan's ExpertParallel: all_to_all_single of the routed token rows,
sizes exchanged first): each of a rank's T = mbs * seq tokens goes to top_k experts, so the rank
sends T * top_k rows of `hidden` activations per dispatch and receives as many back per combine.
With balanced routing (what the estimate assumes: the router's load-balancing loss and DeepSeek's
bias update aim at it) a share 1/ep of those rows stays on the rank and (ep-1)/ep cross the link.
A capacity factor c > 0 pads each expert's buffer to c times its balanced share (GShard, Lepikhin
et al. 2020 §2.2; Megatron's --moe-expert-capacity-factor with padding), so the messages are c
times larger; 0 is dropless (torchtitan): the balanced size, and a real step sends more to the
rank whose experts are popular, up to ep times the balanced rows in the worst case (all tokens
to one rank), which the estimate does not model (Estimate notes say so).

Calls per MoE block per micro-batch: forward dispatch + combine, and the backward's two
all-to-alls of their gradients (the adjoint of an all-to-all is the reverse all-to-all); full
recompute (and each checkpointed block of selective-layer) reruns the forward's two.
"""

from __future__ import annotations

from shardwise.estimate._num import ceil_div, where
from shardwise.spec.plan import recompute_every, recompute_kind


def capacity(plan):
    """The multiple of the balanced share the buffers carry (1 when dropless)."""
    return where(plan.capacity > 0, plan.capacity, 1.0)


def moe_blocks(model, blocks):
    """MoE blocks among `blocks` of a stage: the busiest stage's share, rounded up (DeepSeek-V3's
    3 dense of 61 blocks sit on the first stage; Maverick's alternate)."""
    if not model.is_moe:
        return 0 * blocks
    return ceil_div(blocks * model.moe_layers, model.layers)


def all_to_all_message(model, plan, act_bytes):
    """Bytes of one dispatch (or combine) call's send buffer on one rank: T * top_k rows of hidden,
    times the capacity factor (held to 1/1000: integer bytes for one plan or many)."""
    per_mille = round(float(capacity(plan)) * 1000)
    return plan.mbs * plan.seq * model.top_k * model.hidden * act_bytes * per_mille // 1000


def all_to_all_calls(model, plan, blocks):
    """Calls per step on one rank: 4 per MoE block per micro-batch, + 2 per recomputed MoE block."""
    moe = moe_blocks(model, blocks)
    kind = recompute_kind(plan.recompute)
    if kind == "full":
        again = moe
    elif kind == "selective-layer":
        again = moe // recompute_every(plan.recompute)
    else:
        again = 0 * moe
    return (4 * moe + 2 * again) * plan.grad_accum


def routed_expert_numel(model, tp):
    """Elements of one routed expert's MLP in one MoE block on one tp rank (its FFN dimension is
    sharded by tp like the dense FFN's)."""
    mats = 3 if model.ffn_kind == "swiglu" else 2
    bias = (model.expert_ffn_hidden // tp * (mats - 1) + model.hidden) if model.mlp_bias else 0
    return mats * model.hidden * model.expert_ffn_hidden // tp + bias


def expert_share(model, plan, blocks):
    """Elements of routed experts a rank holds without EP (every expert of its blocks): what the
    engines' sums count, since the estimate's block is a MoE block."""
    return blocks * model.experts * routed_expert_numel(model, plan.tp)


def replicated_states(zero):
    """Which model states a ZeRO stage keeps whole on every data-parallel rank: (params, grads,
    optimizer) as 1/0. The sharded ones are the same per rank with and without EP: an expert's
    states split over dp / ep ranks, each holding experts / ep of them, is experts / dp per rank,
    as without EP. The whole ones shrink from every expert to experts / ep."""
    return (1 + 0 * zero, where(zero <= 1, 1, 0), where(zero == 0, 1, 0))


PPM = 1_000_000  # fractions are integers per million: int64 arithmetic for one plan or many


def scale(v, ppm):
    """v * ppm / PPM, floored, without the int64 overflow of v * ppm (v up to ~1e13 bytes)."""
    return v // PPM * ppm + (v % PPM) * ppm // PPM


def notes(model, plan) -> list[str]:
    """What the estimate of a MoE model assumes, one line each."""
    if not model.is_moe:
        return []
    out = []
    if model.moe_layers < model.layers:
        out.append(
            f"{model.layers - model.moe_layers} of {model.name}'s {model.layers} blocks are dense; memory counts every "
            "block of a stage as a MoE block (an overestimate), the all-to-alls the stage's MoE blocks."
        )
    if plan.ep > 1:
        cf = f"capacity factor {plan.capacity:g}" if plan.capacity else "dropless"
        out.append(
            f"ep={plan.ep}, {cf}: all-to-all bytes assume balanced routing; an unbalanced step sends more to the ranks "
            f"of popular experts (up to {plan.ep}x the balanced rows on one rank when dropless)."
        )
    return out
