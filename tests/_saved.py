"""MemTracker measurements of transformer blocks on the CPU: what they keep for backward and
what their backward adds on top (tests/test_recompute*.py)."""

from __future__ import annotations

import torch

from shardwise.run.measure import _peak_tracker


def alive(mt, kind):
    return sum(d.get("Total", 0) for d in mt.get_tracker_snapshot(kind).values())


def measure_blocks(blocks, hidden, autocast, b=2, s=32):
    """(bytes the chained blocks keep besides the first one's input, their backward's peak over
    what is alive when it begins), the parameters and the input external."""
    x0 = torch.randn(b, s, hidden, requires_grad=True)
    mt = _peak_tracker()
    mt.track_external(x0, *(p for blk in blocks for p in blk.parameters()))
    with mt:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x = x0 * 1
            before = alive(mt, "current")
            for blk in blocks:
                x = blk(x)
        kept = alive(mt, "current") - before - x.numel() * x.element_size()
        start = alive(mt, "current")
        x.backward(torch.randn_like(x))
        peak = alive(mt, "peak")
    return kept, peak - start
