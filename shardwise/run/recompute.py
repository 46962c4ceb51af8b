"""Activation recompute by policy, through torch.utils.checkpoint's selective-checkpoint API.

"selective-op" (torchtitan's per-op selective activation checkpointing, "op" mode, built on
create_selective_checkpoint_contexts): each block runs under checkpoint, and of the ops inside
it the outputs of the matmuls and of SDPA are saved (the FLOP-heavy ones); everything else
(norms, rotary, SiLU/GELU, products, residual adds, autocast's casts; with the math attention
kernel the scores, which are batched matmuls) is recomputed in the backward from them and the
block's input. The collectives DTensor runs inside a block are saved
too, so the recompute communicates nothing. torchtitan additionally recomputes every second
matmul (torchtitan/models/llama3/infra/parallelize.py, _custom_policy); here every matmul is
saved, what the estimate's inventory lists (estimate/activations.py, selective-op).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
_SAVED_NAMES = (
    "mm",
    "addmm",
    "_scaled_mm",  # FP8 linears (torchao), as torchtitan's op-level save list has it
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
SAVED_OPS = frozenset(getattr(_aten, n).default for n in _SAVED_NAMES if hasattr(_aten, n))


def _policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if func in SAVED_OPS or getattr(func, "namespace", "") == "_c10d_functional":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def op_checkpoint(fn, *args):
    """fn(*args) keeping the matmul and attention outputs, recomputing the rest in the backward."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, _policy))
