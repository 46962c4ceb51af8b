"""What the torch profile's moments are built from, whichever engine holds the rank: the
backwards at which a peak can fall (peak_backwards), moment A as the loss's and the first block's
backward (loss_and_block), the gradients that exist by a backward (grads_present), and Blend, a
moment of array plans that run on different engines (DDP or FSDP2, with or without a pipeline).
"""

from __future__ import annotations

from typing import NamedTuple

from shardwise.estimate import activations as acts
from shardwise.estimate._num import _is_array, maximum, where


def one_stage(pp) -> bool:
    """pp = 1 for every plan: the first pipeline stage's rank is the last's."""
    if _is_array(pp):
        return bool((pp == 1).all())
    return pp == 1


def peak_backwards(plan, last):
    """The backwards at which the rank's peak can fall (activations.backwards): one without a
    pipeline, where they are the same; a scalar plan's distinct ones (array plans keep all four,
    so that every plan has the same moments)."""
    flights = acts.backwards(plan, last)
    if one_stage(plan.pp):
        return flights[:1]
    if _is_array(plan.dp, plan.pp, plan.mbs, plan.gbs, plan.vpp, last):
        return flights
    return tuple(dict.fromkeys(flights))


class Blend(NamedTuple):
    """A moment of array plans taking a's items where `fsdp` holds and b's elsewhere: plans that mix
    dp > 1 (FSDP2's items) and dp = 1 (the local engines'), or FSDP2's with and without a pipeline
    (a moment of one, empty for the other). a and b are dicts or Blends."""

    fsdp: object  # bool array
    a: object
    b: object


def split_items(items: dict) -> tuple[dict, dict]:
    """(activations, persistent pipeline buffers) of rank_activations' items."""
    activations, buffers = {}, {}
    for k, v in items.items():
        if k.startswith("act."):
            activations[k] = v
        elif k.startswith("buffers."):
            buffers[k] = v
    return activations, buffers


def grads_present(flight, v, layers_per_chunk: int, block, embed, head):
    """Elements (or bytes) of the gradients that exist at a backward: the virtual stages'
    (top down) whose first backward is done; the head's with its own (the last rank's top
    virtual stage), the embeddings' with the bottom one's (the first rank's virtual stage 0)."""
    g = flight.grad_chunks
    return g * layers_per_chunk * block + where(g >= v, embed, 0) + where(g >= 1, head, 0)


def loss_and_block(a: dict, f, sizes, head_copy=0) -> list[dict]:
    """Moment A as two: the loss's backward (its temporaries) and the first block's (its own
    transient, activations.block_backward_bytes, next to the gradient the head handed it), once
    the loss's temporaries and one micro-batch's saved head tensors (and its autocast copy of the
    output weight) are freed (the caller, or the pipeline, still holds that micro-batch's
    logits). A backward without the loss (a pipeline stage's other than the last global one) is
    the block's moment only, its output's gradient in a receive buffer."""
    # nothing is recomputed before the first block's backward (torch.utils.checkpoint reruns a
    # block's forward inside that block's backward): the recomputed block is the block moment's
    a_loss = {**a, "act.block_backward": 0, "act.recompute": 0}
    a_block = {
        **a,
        "act.loss_backward": 0,
        "act.block_backward": sizes.block_backward,
        "act.block_output_grad": f.loss * sizes.top_grad,
    }
    head_mbs = maximum(f.head, 1)
    for k in ("act.final_norm", "act.head_input", "act.loss_fp32", "act.targets"):
        a_block[k] = a[k] - f.loss * (a[k] // head_mbs)
    if "params.autocast_copy" in a:
        a_block["params.autocast_copy"] = a["params.autocast_copy"] - f.loss * head_copy
    return [a_loss, a_block, core_backward(a_block, sizes)]


def core_backward(block: dict, sizes, **more) -> dict:
    """The first block's backward at its attention core (math kernel, selective recompute:
    activations.core_backward_bytes), its feed-forward half's saved tensors freed; `more`: the
    engine's items there. A moment below `block` where the kernel's backward holds nothing."""
    return {
        **block,
        **more,
        "act.block_backward": sizes.core_backward,
        "act.layers": block["act.layers"] - where(sizes.core_backward > 0, sizes.ffn_saved, 0),
    }
