"""The training loss without the full logits: the output projection and cross-entropy, chunk by chunk.

F.cross_entropy(output(h).float(), y) over a whole micro-batch keeps the logits [T, V] (in the
compute dtype) and log_softmax's fp32 output [T, V] for the backward, and the backward adds two
more fp32 [T, V] tensors: 15.7 GiB of saved logits alone for Llama-3.1-8B at 2 x 8192 tokens
(V = 128,256). Here one autograd function takes h [T, H] and the projection's weight [V, H] and
runs the T tokens in chunks: the forward keeps h (which the projection saves anyway), the weight
and the targets; the backward recomputes one chunk's logits at a time, turns them into the
loss's gradient in place (softmax - one-hot) and accumulates the weight's gradient into one
[V, H] tensor.

Chunk sizes and where the loss is chunked: spec/loss.py. The recompute costs one more
output-projection forward per micro-batch (2*T*H*V FLOPs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardwise.spec.loss import loss_chunk_rows


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed token cross-entropy of h @ w.T against y, chunk by chunk. h [T, H] in the compute
    dtype; w [V, H] the parameter as stored (fp32 under autocast: cast to h's dtype inside, so no
    low-precision copy of it is kept); each chunk's logits are taken to fp32, as
    F.cross_entropy(logits.float()) does, and the weight's gradient is summed over chunks in fp32."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, rows: int) -> torch.Tensor:
        wc = w.to(h.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for hc, yc in zip(h.split(rows), y.split(rows)):
            total += F.cross_entropy(torch.mm(hc, wc.t()).float(), yc, reduction="sum")
        ctx.save_for_backward(h, w, y)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w, y = ctx.saved_tensors
        wc = w.to(h.dtype)
        dh = torch.empty_like(h)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for i, (hc, yc) in enumerate(zip(h.split(ctx.rows), y.split(ctx.rows))):
            # d(sum of -log softmax[y]) / d logits = softmax - one-hot
            p = torch.softmax(torch.mm(hc, wc.t()).float(), dim=-1)
            p[torch.arange(p.shape[0], device=p.device), yc] -= 1.0
            g = p.mul_(grad).to(h.dtype)
            del p
            torch.mm(g, wc, out=dh[i * ctx.rows : i * ctx.rows + hc.shape[0]])
            if g.dtype == torch.float32:
                dw.addmm_(g.t(), hc)
            else:  # each chunk's product in the compute dtype, their sum in fp32
                dw.add_(torch.mm(g.t(), hc))
            del g  # before the next chunk's logits
        return dh, dw.to(w.dtype), None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of h @ weight.T against targets. h: [b, s, H]; targets: [b, s].
    Under autocast h is cast to autocast's dtype, as F.linear's input would be."""
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
    flat = h.flatten(0, 1)
    t, (v, hidden) = flat.shape[0], weight.shape
    # one copy of the (strided) targets, which every chunk reads
    loss = _ChunkedCrossEntropy.apply(flat, weight, targets.flatten(), loss_chunk_rows(t, v, hidden))
    return loss / t
