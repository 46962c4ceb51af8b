"""ZeRO-2 and ZeRO-3 memory under the torch profile: FSDP2 (fully_shard over dp > 1;
reshard_after_forward=False for ZeRO-2), moment by moment: with a pipeline (_fsdp_pipelined),
without one (_fsdp_alone: the forward's all-gathers, the loss's and the first blocks' backwards,
the root's gradients, each with the buffers FSDP2 holds right then), then the end of the backward
(B) and the optimizer step (C). At dp = 1 FSDP2 is not used: ddp.py.
"""

from __future__ import annotations

from itertools import zip_longest

from shardwise.estimate import activations as acts
from shardwise.estimate._num import _is_array, ceil_div, maximum, memo, minimum, where
from shardwise.estimate.memory.moments import (
    Blend,
    core_backward,
    grads_present,
    loss_and_block,
    peak_backwards,
    split_items,
)
from shardwise.estimate.memory.shapes import block_sum, elements, groups, local_shape, stage_of
from shardwise.estimate.pipeline import chunk_blocks, chunks_per_rank, rank_blocks, vee
from shardwise.estimate.profiles import TORCH, compute_bytes, is_mixed, optimizer_bytes, step_temp_bytes
from shardwise.spec.fp8 import FP8_BYTES, fp8_all_gather
from shardwise.spec.loss import chunked_loss


def _fsdp_shard(shape, dp) -> tuple:
    """FSDP2's dim-0 shard on rank 0: ceil(dim0 / dp) rows, the padded size every rank allocates."""
    return (ceil_div(shape[0], dp),) + shape[1:]


@memo
def _fsdp_sizes(model, precision, optimizer, tp, dp, pp, last, blocks, vee=False):
    """Parameter sums under FSDP2: shard elements (padded) of the stage and of one block, unsharded
    (padded) elements of the stage, one block, the root, the head and the tied output, optimizer
    bytes and step scratch on rank 0."""
    g, sb = groups(model), TORCH.state_bytes(precision)
    st = stage_of(model, pp, last, blocks, vee)
    shard = lambda p: _fsdp_shard(local_shape(p, tp), dp)
    padded = lambda p: dp * elements(shard(p))
    s = st.sum(g, lambda p: elements(shard(p)))
    u_all = st.sum(g, padded)
    u_block = block_sum(g, padded)
    # the output's (tied: the embedding's) gradient is made first in the backward; the root's
    # reduce-scatter waits for the embedding's, at the end
    out = g["tied"][0] if model.tied_embeddings else [p for p in g["head"] if p.linear][0]
    u_head = st.head * (padded(out) + sum(padded(p) for p in g["head"] if not p.linear))
    states = st.sum(g, lambda p: optimizer_bytes(optimizer, shard(p), sb))
    if optimizer == "adamw":  # DTensors on one mesh: foreach
        matrices = st.sum(g, lambda p: elements(shard(p)), only=lambda p: len(p.shape) >= 2)
        temp = step_temp_bytes("adamw", maximum(matrices, s - matrices), sb, foreach=True)
    else:
        temp = step_temp_bytes(optimizer, st.max(g, lambda p: elements(shard(p))), sb, foreach=False)
    u_embed = st.embed * sum(p.count * padded(p) for p in g["embed"])
    # the embeddings' unsharded gradient: under vocab-parallel TP, DTensor's embedding backward
    # (torch/distributed/tensor/_ops/_embedding_ops.py: embedding_dense_backward_strategy, its
    # gradient output of every input Replicate) makes each whole table on every tp rank, which
    # FSDP2 keeps (and casts to fp32, to_accumulated_grad_if_needed) until its reduce-scatter
    # slices out the tp shard (FSDPParam._get_grad_inner_tensor): V*H rows, no FSDP padding
    e_grad = st.embed * sum(p.count * (elements(p.shape) if tp > 1 else padded(p)) for p in g["embed"])
    return {
        "s": s,
        "s_block": block_sum(g, lambda p: elements(shard(p))),
        "u_all": u_all,
        "u_block": u_block,
        "u_linear": block_sum(g, padded, only=lambda p: p.linear),
        "u_root": u_all - st.layers * u_block,
        "u_head": u_head,
        "u_tied": st.head * padded(out) if model.tied_embeddings else 0,
        "u_embed": u_embed,
        "e_grad": e_grad,
        "states": states,
        "temp": temp,
    }


def fsdp_moments(model, plan, last: bool, attention: str, device: str = "cuda") -> list[dict]:
    """FSDP2 (zero 2/3 over dp > 1). Each parameter is a dim-0 shard padded to ceil(dim0/dp) rows;
    with mixed precision the fp32 shard is the master, all-gathered in bf16 (param_dtype) and
    reduce-scattered in fp32 (reduce_dtype). With a pipeline two moments A per backward of
    peak_backwards (_fsdp_pipelined); without, the step's moments of _fsdp_alone; then B, C. Array
    plans that mix both get both, each zero where the other applies."""
    sb = TORCH.state_bytes(plan.precision)
    mixed = is_mixed(plan.precision)
    c = compute_bytes(plan.precision)
    pb = 2 if mixed else sb.param  # unsharded (all-gathered) parameters and their gradients
    rb = 4 if mixed else sb.grad  # reduce-scatter dtype = the sharded gradients' dtype
    # HSDP: the states are sharded over the shard group only (plan.shard = dp without HSDP)
    blocks = rank_blocks(model, plan, last)
    z = _fsdp_sizes(model, plan.precision, plan.optimizer, plan.tp, plan.shard, plan.pp, last, blocks, vee(plan))
    pipelined = where(plan.pp > 1, 1, 0)
    vec = _is_array(pipelined)
    accumulated = where(plan.grad_accum > 1, 1, 0)
    offload = plan.offload == "params"  # CPUOffloadPolicy: shards, gradients and the step on the CPU
    cpu_step = plan.offload != "none"  # the optimizer states (and so its step) on the CPU
    sharded_grads = 0 if offload else rb * z["s"]
    sizes = acts.rank_sizes(
        model,
        plan,
        last=last,
        layout=TORCH.activation_layout,
        attention=attention,
        autocast=False,
        act=c,
        res=c,
        vocab=model.vocab,
        device=device,
    )
    piped, alone = [], []
    for i, f in enumerate(peak_backwards(plan, last)):
        activations, buffers = split_items(acts.priced(sizes, f))
        persistent = {
            "params.sharded": 0 if offload else sb.param * z["s"],
            "optimizer.states": 0 if cpu_step else z["states"],
            **TORCH.overhead,
            **buffers,
        }
        a = {**persistent, **activations}
        if vec or pipelined:
            piped += _fsdp_pipelined(model, plan, last, a, f, sizes, z, pb, rb, accumulated)
        if (vec or not pipelined) and i == 0:  # without a pipeline every backward is this one
            alone = _fsdp_alone(model, plan, a, f, sizes, z, pb, rb, accumulated, 0 if offload else rb)
    if vec:  # array plans: each moment of a pipelined plan shares its place with one of a plan without
        moments = [Blend(pipelined == 1, x, y) for x, y in zip_longest(piped, alone, fillvalue={})]
    else:
        moments = piped + alone

    # B and C: every receive buffer waits for the next step, none holding an input
    persistent.update({"buffers.pp_act_recv": sizes.act_recv, "buffers.pp_grad_recv": sizes.grad_recv})

    # B. The end of the backward: the root's reduce-scatter (its reshard, then its gradients
    # copied into the reduce-scatter input, the block's input before it freed); with a pipeline
    # each group's in turn
    z2_accumulated = accumulated if plan.zero == 2 else 0  # the root's gradients are the accumulated ones
    b = {
        **persistent,
        "grads.sharded": sharded_grads,
        "grads.unsharded_accumulated": pipelined * rb * z["u_all"]
        + (1 - pipelined) * z2_accumulated * rb * z["u_root"],
        "grads.root_unsharded": (1 - pipelined) * (1 - z2_accumulated) * pb * z["u_root"],
        "buffers.root_reduce_scatter": (1 - pipelined) * rb * z["u_root"],
        "buffers.reduce_scatter": pipelined * rb * maximum(z["u_root"], z["u_block"]),
    }

    # C. The optimizer step on the shards
    cc = {**persistent, "grads.sharded": sharded_grads, "buffers.optimizer_step": 0 if cpu_step else z["temp"]}
    return moments + [b, cc]


def _fsdp_pipelined(model, plan, last, a: dict, f, sizes, z: dict, pb, rb, accumulated) -> list[dict]:
    """Moment A as two (loss_and_block) under torch.distributed.pipelining, which keeps FSDP from
    resharding after backward and from reduce-scattering before the last micro-batch
    (backward_maybe_with_nosync): every block ends up unsharded and every gradient accumulates
    unsharded in fp32 (FSDPParam.to_accumulated_grad_if_needed), each part's from its first
    backward on."""
    v = chunks_per_rank(plan.vpp, plan.schedule)
    a = dict(a)
    a["params.unsharded"] = pb * z["u_all"]
    head = z["u_root"] - z["u_embed"]  # the final norm and output (the last rank's root)
    per_chunk = chunk_blocks(model, plan, last)
    a["grads.unsharded_accumulated"] = (
        accumulated * rb * grads_present(f, v, per_chunk, z["u_block"], z["e_grad"], head)
    )
    a["grads.head_unsharded"] = pb * z["u_head"]
    a["buffers.reduce_scatter"] = pb * z["u_block"]  # one block's gradients, cast into the fp32 accumulator
    a_loss, a_block, a_core = loss_and_block(a, f, sizes)
    a_loss["buffers.reduce_scatter"] = 0  # the loss's backward: no block reduced yet
    a_loss["grads.head_unsharded"] = 0  # nor the head's gradient made
    if plan.zero == 3 and plan.schedule == "1f1b":
        # 1F1B's last rank runs a forward before each backward, which reshards after it: the
        # loss's backward runs before the stage's pre-backward gathers it again
        a_loss["params.unsharded"] = 0
    # the first rank (1F1B, GPipe): backward f ends with the embeddings' gradient made in the
    # parameters' dtype, before it is cast to (first micro-batch) or added into (later ones) the
    # fp32 accumulated one: f's micro-batch's saved tensors and output freed, every gradient of the
    # stage present (the trace's peak on Llama-3.1-70B tp8 pp4's first stage, where the embedding's
    # gradient is the whole [V, H] table: the e_grad of _fsdp_sizes)
    done = f._replace(grad_chunks=minimum(f.grad_chunks + 1, v))  # every (v = 1) virtual stage
    end = {
        **a_block,
        "act.layers": a["act.layers"] - sizes.chunk,
        "act.embedding": a["act.embedding"] - sizes.embedding,
        "act.stage_output": a["act.stage_output"] - sizes.x,
        "act.block_backward": 0,
        "act.block_output_grad": 0,
        "buffers.reduce_scatter": 0,
        "grads.unsharded_accumulated": accumulated
        * rb
        * grads_present(done, v, per_chunk, z["u_block"], z["e_grad"], 0),
        "grads.embedding_made": accumulated * pb * z["e_grad"],
    }
    # elsewhere (the last rank, interleaved chunks) the block's moment again: array plans mix them
    on = where(last, 0, 1) * where(v > 1, 0, 1)
    end = {k: where(on, end.get(k, 0), a_block.get(k, 0)) for k in {**a_block, **end}}
    return [a_loss, a_block, a_core, end]


def _fsdp_alone(model, plan, a: dict, f, sizes, z: dict, pb, rb, accumulated, sharded_rb) -> list[dict]:
    """FSDP2 without a pipeline: the moments of the step's last micro-batch (it holds what the
    earlier ones leave: the sharded gradients of ZeRO-3, the accumulated unsharded ones of ZeRO-2),
    from PyTorch 2.13's _fully_shard, measured item by item with MemTracker (tests/test_check.py).

    The run tier's fully_shard(reshard_after_forward=zero == 3) on each block and on the root
    (embeddings, final norm, output; reshard_after_forward set explicitly, so the root reshards
    after forward too), reshard_after_backward left on: every group frees its unsharded
    parameters after its backward, and ZeRO-2 gathers every block again in the next forward.
    FSDP2 holds three kinds of buffer, P = one block's unsharded parameters (param dtype):
      all-gather outputs: the flat buffer a group is gathered into, copied out into its unsharded
        parameters. In the forward the last one is kept until the next group's copy-out returns
        (FSDPParamGroup.wait_for_unshard: `prev_all_gather_state` is dropped on return), so at a
        copy-out the previous group's, the group's own and its unsharded parameters are alive,
        and the last block's until the root's forward ends (FSDPState._post_forward). In the
        backward a group's pre-backward prefetches the group before it (ZeRO-3): its output
        waits there through the whole block's backward.
      unsharded gradients: the group's, made by its backward, kept until its reduce-scatter
        (ZeRO-2 accumulating in fp32: added into the accumulated ones in place, nothing new).
      reduce-scatter inputs (reduce dtype, padded): each is kept until the next group's
        post-backward (reduce_scatter_max_input_buffers = 1), so from the second block on the
        block above's is alive through a block's backward.
    None of this depends on the device: FSDP2 keeps these references itself rather than by
    record_stream, so a CUDA caching allocator (max_memory_allocated) and MemTracker on the CPU
    see the same lifetimes; only the all-gather and reduce-scatter run on other streams.

    The moments, L = the rank's layers:
      forward: block 0's copy-out (the root's buffer and unsharded parameters, block 0's two),
        block L-1's (three buffers), the forward's end (the logits made, block L-1's buffer;
        run/engine._accumulate drops the previous micro-batch's logits before this forward);
      the loss's backward (ZeRO-3: the root is resharded; where the loss is chunked inside the
        model, spec/loss.py, the root's output is the loss and its pre-backward comes first: the
        root gathered again, the last block's all-gather prefetched);
      ZeRO-3: the root gathered again (its pre-backward, on the logits' gradient or the loss);
      the first block's backward begins (its transient, weight gradients kept, next to the
        gradient the head handed it) and ends (its saved tensors freed, its gradients all made,
        its input's gradient in place of its output's); the second block's, with the first's
        reduce-scatter input; later blocks hold less: fewer saved tensors, the same buffers;
      the root's gradients made, before its post-backward (block 0's reduce-scatter input).
    """
    z3 = plan.zero == 3
    layers = model.layers
    # the loss inside the model (spec/loss.py): the root's output is the loss, so its pre-backward
    # (which gathers it again and prefetches the last block) runs before the loss's backward
    chunked = where(chunked_loss(plan), 1, 0)
    P, R, Pr = pb * z["u_block"], rb * z["u_block"], pb * z["u_root"]
    if fp8_all_gather(plan):  # the block's linear weights gathered and held as 1-byte FP8 (spec/fp8.py)
        P = P - (pb - FP8_BYTES) * z["u_linear"]
    # ZeRO-2 accumulating at the parameters' dtype: the micro-batch's gradients are added into
    # the accumulated .grad in place (AccumulateGrad) and freed; otherwise they stay as made
    inplace = accumulated if not z3 and pb == rb else 0
    fresh = 1 - inplace
    transient = fresh * sizes.block_backward_kept + inplace * sizes.block_backward

    def grads(k):
        """Gradients once k groups are reduce-scattered in this micro-batch."""
        sharded = sharded_rb * (z["s"] * accumulated + k * z["s_block"] * (1 - accumulated) if z3 else k * z["s_block"])
        return {
            "grads.sharded": sharded,
            "grads.unsharded_accumulated": 0 if z3 else accumulated * rb * (z["u_all"] - k * z["u_block"]),
        }

    base = {
        **{k: v for k, v in a.items() if not k.startswith("act.")},
        **dict.fromkeys((k for k in a if k.startswith("act.")), 0),
    }
    logits = a["act.logits"]
    fwd = {**base, **grads(0), "act.embedding": a["act.embedding"]}
    blocks_kept = 0 if z3 else layers * P  # ZeRO-2 keeps every block gathered until its backward
    out = [
        {**fwd, "params.unsharded": Pr + P, "buffers.all_gather": Pr + P},  # block 0's copy-out
        {
            **fwd,
            "act.layers": acts.first_blocks(sizes, layers - 1),
            "params.unsharded": Pr + (P if z3 else blocks_kept),
            "buffers.all_gather": (2 if layers > 1 else 1) * P + (0 if layers > 1 else Pr),
        },  # block L-1's
        {
            **fwd,
            **{k: a[k] for k in ("act.layers", "act.final_norm", "act.head_input", "act.logits")},
            "params.unsharded": Pr + blocks_kept,
            "buffers.all_gather": P,
        },  # the forward's end
        {
            **a,
            **grads(0),
            "act.block_backward": 0,
            "act.recompute": 0,  # no block recomputed yet
            "params.unsharded": chunked * Pr if z3 else Pr + blocks_kept,
            "buffers.all_gather": chunked * P if z3 and layers >= 1 else 0,  # the last block, prefetched
        },  # the loss's
    ]
    if z3:  # the root gathered again (its copy-out): after the loss's backward (its gradient, the
        # logits', in the compute dtype, made; the loss's freed), or before it where the loss is chunked
        out.append(
            {
                **a,
                **grads(0),
                "act.loss_fp32": chunked * a["act.loss_fp32"],
                "act.targets": chunked * a["act.targets"],
                "act.loss_backward": 0,
                "act.block_backward": 0,
                "act.recompute": 0,
                "act.logits_grad": (1 - chunked) * f.loss * logits,
                "params.unsharded": Pr,
                "buffers.all_gather": Pr,
            }
        )
    second_rebuilt = where((layers - 1) % sizes.every == 0, sizes.layer - sizes.layer_checkpointed, 0)
    head_grads = pb * (fresh * z["u_head"] + inplace * z["u_tied"])  # a tied one waits in AccumulateGrad
    for k in range(min(layers, 2)):  # the first and second block of the backward
        start = {
            **loss_and_block(a, f, sizes)[1],
            **grads(k),
            "act.block_backward": transient,
            "act.layers": acts.first_blocks(sizes, layers - k),
            # selective-layer: the second block rebuilds its tensors where it is a checkpointed one
            **({} if k == 0 or sizes.every == 1 else {"act.recompute": second_rebuilt}),
            "grads.head_unsharded": head_grads,
            "params.unsharded": Pr + (P if z3 else (layers - k) * P),
            "buffers.all_gather": P if z3 and layers - 1 - k >= 1 else 0,  # the block below, prefetched
            "buffers.reduce_scatter": R if k else 0,
        }  # the block above's
        end = {
            **start,
            "act.layers": acts.first_blocks(sizes, layers - k - 1),
            "act.block_backward": 0,
            "act.recompute": 0,
            "grads.block_unsharded": fresh * P,
        }
        # at its attention core the block's feed-forward weight gradients are made (kept until its reduce-scatter)
        out += [
            start,
            core_backward(start, sizes, **{"grads.block_unsharded": where(sizes.core_backward > 0, fresh * P, 0)}),
            end,
        ]
    out.append(
        {
            **base,
            **grads(layers),
            "act.logits": logits,
            "params.unsharded": Pr,
            "buffers.reduce_scatter": R,
            "grads.root_unsharded": fresh * Pr,
        }
    )  # the root's gradients made
    return out
