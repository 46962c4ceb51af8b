"""Where and how the run tier's loss is chunked (run/loss.py), in one place for the run and the estimate.

The output projection and cross-entropy run chunk by chunk, without the full logits, where the
projection is whole on the rank and the loss is computed where the model runs: tp = 1 (a
column-parallel head would all-gather each chunk's logits, and again in the recompute) and no
pipeline (torch.distributed.pipelining's loss function takes the last stage's logits).

The chunk count follows Liger-Kernel's fused linear cross entropy
(liger_kernel/ops/fused_linear_cross_entropy.py: inc_factor = cdiv(V, H), chunk_size =
cdiv(BT, inc_factor)): ceil(V / H) chunks, so one chunk's logits are about as large as the hidden
states. Plan fields may be numpy arrays (the estimate's vectorized search).
"""

from __future__ import annotations


def chunked_loss(plan):
    """Whether the plan's loss runs chunked (a bool, or a bool array for array plans)."""
    return (plan.tp == 1) & (plan.pp == 1)


def loss_chunk_rows(tokens, vocab: int, hidden: int):
    """Tokens per chunk, the last chunk taking the rest: ceil(T / ceil(V / H)) (>= 1)."""
    return -(-tokens // -(-vocab // hidden))
