"""DDP and ZeRO-1 memory under the torch profile: the engines that keep every parameter local
to the rank (a tp-local shard at most): DDP (zero 0), DDP + ZeroRedundancyOptimizer (zero 1, its
partition in zero1.py), or no data-parallel wrapper at all (dp = 1, any zero), each with TP and/or
PP; FSDP2 (zero 2/3 over dp > 1) is fsdp2.py. Mixed precision: fp32 parameters under autocast.
"""

from __future__ import annotations

from shardwise.estimate import activations as acts
from shardwise.estimate._num import maximum, memo, where
from shardwise.estimate.memory.moments import grads_present, loss_and_block, peak_backwards, split_items
from shardwise.estimate.memory.shapes import block_sum, elements, groups, local_shape, stage_of
from shardwise.estimate.memory.zero1 import zero1_worst
from shardwise.estimate.pipeline import chunk_blocks, chunks_per_rank, rank_blocks, vee
from shardwise.estimate.profiles import TORCH, compute_bytes, is_mixed, optimizer_bytes, step_temp_bytes
from shardwise.spec.fp8 import is_fp8
from shardwise.spec.loss import chunked_loss
from shardwise.spec.plan import recompute_every, recompute_kind


@memo
def _local_sizes(model, precision, optimizer, zero, sp, tp, dp, pp, last, blocks, vee=False):
    """Parameter sums for the local engines: elements, optimizer bytes and step scratch of the
    worst dp rank, the Linear elements autocast copies, and the elements whose gradients appear
    with each part's first backward: one block's, the embeddings', the head's."""
    g, sb = groups(model), TORCH.state_bytes(precision)
    st = stage_of(model, pp, last, blocks, vee)
    numel = lambda p: elements(local_shape(p, tp))
    n = st.sum(g, numel)
    states = st.sum(g, lambda p: optimizer_bytes(optimizer, local_shape(p, tp), sb))
    # the step's scratch: foreach unless the parameters mix DTensors and plain tensors (run/engine.py
    # turns foreach off then: TP without DDP and without sequence parallel leaves the norms
    # plain); Adafactor defaults to its single-tensor loop
    largest = st.max(g, numel)
    if optimizer == "adamw":
        matrices = st.sum(g, numel, only=lambda p: len(p.shape) >= 2)
        foreach = step_temp_bytes("adamw", maximum(matrices, n - matrices), sb, foreach=True)
        mixed_kinds = 0 if sp else where((tp > 1) & (dp == 1), 1, 0)
        temp = mixed_kinds * step_temp_bytes("adamw", largest, sb, foreach=False) + (1 - mixed_kinds) * foreach
    else:
        temp = step_temp_bytes(optimizer, largest, sb, foreach=False)
    if zero == 1:  # ZeroRedundancyOptimizer under DDP; at dp = 1 the plain optimizer
        z_states, z_temp = zero1_worst(model, int(dp), int(tp), int(pp), last, optimizer, sb, int(blocks), vee)
        ddp = where(dp > 1, 1, 0)
        states, temp = where(ddp, z_states, states), where(ddp, z_temp, temp)
    block_linear = block_sum(g, numel, only=lambda p: p.linear)
    out = g["tied"][0] if model.tied_embeddings else [p for p in g["head"] if p.linear][0]
    embed = st.embed * sum(p.count * numel(p) for p in g["embed"])
    # DTensor's embedding backward under vocab-parallel TP gives the whole table's gradient,
    # Replicate, on every tp rank (run/engine._align_grads slices it at the step); DDP's path
    # hands back the local shard's. A tied table's gradient takes the output's Shard layout.
    # So without DDP each untied table (the token one on a pipeline's first stage too, where
    # the output is on the last) holds its full rows during the backward.
    untied = lambda p: p.vocab is False or not model.tied_embeddings or pp > 1
    replicated = sum(p.count * (elements(p.shape) - numel(p)) for p in g["embed"] if untied(p))
    embed_grad = embed + st.embed * where((dp == 1) & (tp > 1), replicated, 0)
    return {
        "n": n,
        "states": states,
        "temp": temp,
        "block_linear": block_linear,
        "out_linear": numel(out),
        "head": st.head,
        "block": block_sum(g, numel),
        "embed_grad": embed_grad,
        "head_grad": st.head * sum(p.count * numel(p) for p in g["head"]) + st.tied * numel(out),
    }


def local_moments(model, plan, last: bool, attention: str, device: str = "cuda") -> list[dict]:
    """DDP (zero 0), DDP + ZeroRedundancyOptimizer (zero 1), or no data-parallel wrapper (dp = 1),
    each with TP and/or PP. Mixed precision: fp32 parameters under torch.autocast.
    Two moments A per backward of peak_backwards (loss_and_block), then C."""
    sb = TORCH.state_bytes(plan.precision)
    mixed = is_mixed(plan.precision)
    c = compute_bytes(plan.precision)
    blocks = rank_blocks(model, plan, last)
    z = _local_sizes(
        model, plan.precision, plan.optimizer, plan.zero, plan.sp, plan.tp, plan.dp, plan.pp, last, blocks, vee(plan)
    )
    n, states, temp = z["n"], z["states"], z["temp"]
    if plan.offload == "optimizer":  # on the CPU, and stepped there
        states, temp = 0, 0
    ddp = where(plan.dp > 1, 1, 0)
    v = chunks_per_rank(plan.vpp, plan.schedule)
    per_chunk = chunk_blocks(model, plan, last)
    sizes = acts.rank_sizes(
        model,
        plan,
        last=last,
        layout=TORCH.activation_layout,
        attention=attention,
        autocast=mixed,
        act=c,
        res=4 if mixed else c,
        vocab=model.vocab,
        device=device,
    )
    head_copy = where(chunked_loss(plan), 0, z["head"] * z["out_linear"])  # the output weight's autocast cast
    moments = []
    for f in peak_backwards(plan, last):
        activations, buffers = split_items(acts.priced(sizes, f))
        persistent = {
            "params.local": sb.param * n,
            "optimizer.states": states,
            "grads.ddp_buckets": ddp * sb.grad * n,
            **TORCH.overhead,
            **buffers,
        }
        a = {**persistent, **activations}
        # fresh .grad tensors of the parts whose backward has run: without DDP (the run tier sets
        # .grad = None each step), and under DDP with a pipeline (DDP copies them into its buckets
        # in the synchronizing backward); without a pipeline DDP's gradients stay views of its
        # buckets, zeroed in place, and every micro-batch accumulates into them (run/engine.py)
        fresh = 1 - ddp * where(plan.pp == 1, 1, 0)
        present = grads_present(f, v, per_chunk, z["block"], z["embed_grad"], z["head_grad"])
        a["grads.accumulated"] = fresh * sb.grad * present
        if mixed:
            # autocast's low-precision weight copies (every Linear's weight). Without a pipeline
            # run/model.py enters autocast per forward call: the micro-batch's graph holds the
            # casts it saved, and with full recompute the blocks' casts are remade one block at a
            # time; the chunked loss (spec/loss.py) casts the output weight inside, keeping none.
            # With a pipeline run/engine.py enters autocast once around the schedule's step: its
            # cache holds one cast of every weight of the rank (all its chunks have run forward
            # at every backward, pipeline.backwards) until the step ends, whatever is in flight.
            once = where(plan.pp > 1, 1, 0)
            # (selective-op recomputes the casts too: one block's at a time)
            blocks = 1 if plan.recompute in ("full", "selective-op") else f.chunks * per_chunk
            if recompute_kind(plan.recompute) == "selective-layer":
                # the unchecked blocks' casts stay saved; a checkpointed top block remakes its own
                k = recompute_every(plan.recompute)
                blocks = f.chunks * (per_chunk - per_chunk // k) + where(per_chunk % k == 0, 1, 0)
            blocks = once * v * per_chunk + (1 - once) * blocks
            heads = once * where(f.head > 0, 1, 0) + (1 - once) * f.head
            # FP8: Float8Linear calls no autocast op on its weight (spec/fp8.py): no block casts kept
            block_casts = 0 if is_fp8(plan.precision) else blocks * z["block_linear"]
            a["params.autocast_copy"] = 2 * (block_casts + heads * head_copy)
            # the head's cast outlives the loss's backward where the step's cache holds it
            freed = 2 * (1 - once) * head_copy
        moments += loss_and_block(a, f, sizes, head_copy=freed if mixed else 0)
    # C: every receive buffer waits for the next step, none holding an input
    persistent.update({"buffers.pp_act_recv": sizes.act_recv, "buffers.pp_grad_recv": sizes.grad_recv})
    c_ = {**persistent, "grads.local": (1 - ddp) * sb.grad * n, "buffers.optimizer_step": temp}
    return moments + [c_]
