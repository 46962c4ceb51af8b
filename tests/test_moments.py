"""The torch profile's moments around the loss: what each holds (estimate/memory/moments.py)."""

from __future__ import annotations

from types import SimpleNamespace

from shardwise.estimate.memory.moments import loss_and_block
from shardwise.estimate.pipeline import Backward


def test_the_recomputed_block_is_held_at_the_first_blocks_backward_not_the_losss():
    """Full recompute reruns a block's forward inside that block's backward (torch.utils.checkpoint),
    after the loss's temporaries are freed. Hand-worked, in bytes: saved layers 10, one recomputed
    block 7, the loss's backward 20, head tensors 4 + 4 + 8 + 2, logits 6; the block's transient 5,
    the gradient the head hands it 1.
      the loss's moment:  10 + 0 + 20 + (4 + 4 + 8 + 2) + 6 = 54 (no block recomputed yet)
      the block's moment: 10 + 7 + 5 + 1 + 6 = 29 (the head's saved tensors and the loss's freed)"""
    a = {
        "act.layers": 10,
        "act.recompute": 7,
        "act.loss_backward": 20,
        "act.block_backward": 0,
        "act.final_norm": 4,
        "act.head_input": 4,
        "act.loss_fp32": 8,
        "act.targets": 2,
        "act.logits": 6,
    }
    f = Backward(index=0, chunks=1, first=1, head=1, outputs=0, grads_sent=0, grad_chunks=0, loss=1)
    loss, block = loss_and_block(a, f, SimpleNamespace(block_backward=5, top_grad=1))
    assert loss["act.recompute"] == 0 and sum(loss.values()) == 54
    assert block["act.recompute"] == 7 and sum(block.values()) == 29
