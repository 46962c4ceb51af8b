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
    loss, block, _ = loss_and_block(a, f, SimpleNamespace(block_backward=5, top_grad=1, core_backward=0, ffn_saved=0))
    assert loss["act.recompute"] == 0 and sum(loss.values()) == 54
    assert block["act.recompute"] == 7 and sum(block.values()) == 29


def test_the_math_kernels_backward_under_selective_recompute_holds_three_fp32_score_tensors():
    """core_backward_bytes = 12*(S + Q) + Q*act, S = b*(a/tp)*s*s and Q = b*s*(q_dim/tp) elements.
    Hand-worked: b 1, a 4, s 256, head_dim 16 (q_dim 64): S = 4*256*256 = 262,144, Q = 256*64 =
    16,384; bf16: 12*278,528 + 32,768 = 3,375,104 (MemTracker: 3,342,336 over q, k, v, the output
    and its gradient, plus the gradient's 32,768); fp32: 3,342,336 + 65,536 = 3,407,872. At tp 2
    every term halves; flash and no recompute: 0."""
    from shardwise.estimate.activations import core_backward_bytes

    model = SimpleNamespace(heads=4, q_dim=64)
    plan = SimpleNamespace(mbs=1, seq=256, tp=1, recompute="selective")
    assert core_backward_bytes(model, plan, attention="math", act=2) == 3_375_104
    assert core_backward_bytes(model, plan, attention="math", act=4) == 3_407_872
    assert core_backward_bytes(model, SimpleNamespace(**{**vars(plan), "tp": 2}), attention="math", act=2) == 1_687_552
    assert core_backward_bytes(model, plan, attention="flash", act=2) == 0
    assert (
        core_backward_bytes(model, SimpleNamespace(**{**vars(plan), "recompute": "none"}), attention="math", act=2) == 0
    )


def test_the_core_moment_frees_the_blocks_feed_forward_half():
    """At the attention core's backward the block's feed-forward saved tensors are gone: a block
    moment with layers 100 (of which the feed-forward half 30) and the core's 50: 70 + 50."""
    from shardwise.estimate.memory.moments import core_backward

    block = {"act.layers": 100, "act.block_backward": 9, "params.local": 5}
    core = core_backward(block, SimpleNamespace(core_backward=50, ffn_saved=30))
    assert core == {"act.layers": 70, "act.block_backward": 50, "params.local": 5}
    assert core_backward(block, SimpleNamespace(core_backward=0, ffn_saved=30))["act.layers"] == 100
