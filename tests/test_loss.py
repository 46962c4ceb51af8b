"""The run tier's chunked loss (run/loss.py): the plain loss's value and gradients, without the
full logits, and the memory its backward holds (activations.chunked_loss_backward_bytes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.estimate.activations import chunked_loss_backward_bytes
from shardwise.run.loss import chunked_cross_entropy
from shardwise.run.measure import _peak_tracker
from shardwise.spec.loss import chunked_loss, loss_chunk_rows
from shardwise.spec.plan import Plan

CASES = [  # b, s, H, V, parameter dtype, autocast
    (2, 64, 128, 512, torch.float32, False),  # 4 chunks of 32
    (2, 64, 128, 512, torch.bfloat16, False),  # pure bf16 (and FSDP2's bf16 unsharded weight)
    (2, 64, 128, 512, torch.float32, True),  # fp32 weight under bf16 autocast
    (4, 64, 128, 256, torch.float32, False),  # the examples' shapes: 2 chunks of 128
    (1, 100, 64, 1000, torch.float32, False),  # 16 chunks of 7, the last one of 2 rows
    (1, 100, 64, 1000, torch.float32, True),
]


def test_chunk_rows_by_hand():
    # ceil(V / H) chunks: Llama-3.1-8B (V 128,256, H 4096): 32 chunks; 2 x 8192 tokens -> 512 rows
    assert loss_chunk_rows(2 * 8192, 128_256, 4096) == 512
    assert loss_chunk_rows(100, 1000, 64) == 7  # 16 chunks: 15 of 7 rows and one of 2
    assert loss_chunk_rows(3, 1000, 64) == 1  # fewer tokens than chunks: one row each
    assert loss_chunk_rows(256, 8, 8) == 256  # V <= H: one chunk
    assert chunked_loss(Plan(dp=2)) and not chunked_loss(Plan(tp=2)) and not chunked_loss(Plan(pp=2))


def _plain_and_chunked(b, s, h, v, dtype, autocast):
    out = []
    for chunked in (False, True):
        torch.manual_seed(0)
        head = nn.Linear(h, v, bias=False).to(dtype)
        x = torch.randn(b, s, h, dtype=dtype, requires_grad=True)
        y = torch.randint(0, v, (b, s + 1))[:, 1:]  # strided, as the engine's targets are
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chunked:
                loss = chunked_cross_entropy(x, head.weight, y)
            else:
                loss = F.cross_entropy(head(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        out.append((loss.detach(), x.grad, head.weight.grad))
    return out


@pytest.mark.parametrize("b, s, h, v", [(c[0], c[1], c[2], c[3]) for c in CASES if c[4] == torch.float32])
def test_chunked_loss_equals_the_plain_loss_fp32(b, s, h, v):
    (l0, dx0, dw0), (l1, dx1, dw1) = _plain_and_chunked(b, s, h, v, torch.float32, False)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw1, dw0, rtol=1e-6, atol=1e-6)


def test_chunked_loss_in_bf16_is_within_rounding():
    """bf16: each chunk's weight-gradient product is rounded to bf16 and summed in fp32, where the
    plain loss's one product is rounded once: the two differ by bf16 rounding (2^-8 relative)."""
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        (l0, dx0, dw0), (l1, dx1, dw1) = _plain_and_chunked(2, 64, 128, 512, dtype, autocast)
        assert float(l1) == pytest.approx(float(l0), rel=1e-6)
        for a, b in ((dx1, dx0), (dw1, dw0)):
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 2**-8


@pytest.mark.parametrize("b, s, h, v, dtype, autocast", CASES)
def test_chunked_loss_backward_memory_equals_measured(b, s, h, v, dtype, autocast):
    """MemTracker's peak during the loss's backward over what is alive when it begins (.grad not
    yet made, as at a step's first micro-batch): the formula's bytes plus one 8-byte scalar; what
    the forward keeps is the flattened int64 targets (a copy of the strided [b, s] slice; at b = 1
    a view of it), h's bf16 cast under autocast, and the 4-byte loss."""

    def alive(mt, kind):
        return sum(d.get("Total", 0) for d in mt.get_tracker_snapshot(kind).values())

    torch.manual_seed(0)
    head = nn.Linear(h, v, bias=False).to(dtype)
    x0 = torch.randn(b, s, h, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (b, s + 1))[:, 1:]
    mt = _peak_tracker()
    mt.track_external(x0, y, *head.parameters())
    with mt:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x = x0 * 1  # the final norm's output, held by the graph
            before = alive(mt, "current")
            loss = chunked_cross_entropy(x, head.weight, y)
            kept = alive(mt, "current") - before
        begins = alive(mt, "current")
        loss.backward()
        peak = alive(mt, "peak")
    act = 2 if autocast or dtype == torch.bfloat16 else 4
    tokens = b * s
    assert kept == (tokens * 8 if b > 1 else 0) + (tokens * h * act if autocast else 0) + 4
    weight = 4 if dtype == torch.float32 else 2
    assert peak - begins == chunked_loss_backward_bytes(tokens, v, h, act, weight) + 8
