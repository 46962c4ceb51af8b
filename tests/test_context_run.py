"""Context parallelism in the run tier (run/context.py): torch's context_parallel on 2 gloo ranks,
with the CPU's flash kernel handed to torch's ring attention, trains a tiny Llama (rotary
positions) and a tiny GPT-2 (learned positions) exactly as one process does, under DDP and
FSDP2 over dp x cp and both K/V rotate methods."""

from __future__ import annotations

import pytest
from _dist import run_ranks
from test_equivalence import BASE, LLAMA, assert_same_training, train_all

PLANS = [
    (LLAMA, dict(cp=2, zero=3, cp_rotate="alltoall")),  # FSDP2 over dp x cp, K/V passed around the ring
]


@pytest.mark.slow
def test_context_parallel_trains_as_one_process():
    items = [(spec, BASE.replace(**fields).resolve(spec, 2)) for spec, fields in PLANS]
    ranks = run_ranks(train_all, 2, items, timeout=120)
    failures = []
    for i, (spec, plan) in enumerate(items):
        try:
            assert ranks[1][i][0] == ranks[0][i][0], "rank 1 reports another loss"
            assert_same_training(spec, plan, ranks[0][i])
        except AssertionError as e:
            failures.append(f"{spec.name} {plan.short()}: {e}")
    assert not failures, "\n\n".join(failures)
