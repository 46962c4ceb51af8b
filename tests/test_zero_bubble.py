"""The zero-bubble schedules torch ships (interleaved-zb, zbv, dualpipev) in the pipeline model:
their orders are torch's, their bubble the formulas' (hand-worked, and reproduced by the timeline),
what they hold alive the papers' counts."""

import dataclasses
from fractions import Fraction

import pytest

from shardwise.errors import ShardwiseError
from shardwise.estimate import pipeline as pl
from shardwise.spec.plan import Plan

SPLIT = [("interleaved-zb", p, m, v) for p in (2, 4) for m in (p, 3 * p) for v in (1, 2, 3)]
SPLIT += [("zbv", p, m, 2) for p in (1, 2, 3, 4) for m in (1, 2, 2 * p - 1, 3 * p + 1)]
SPLIT += [("dualpipev", p, m, 2) for p in (2, 3, 4) for m in (2 * p, 3 * p + 1)]


def test_bubble_hand_worked():
    # p = 4, m = 8, F = I = W = 1 slot per chunk; 1F1B: (p-1)(F+B) = 9 idle of 3*8 = 24 busy
    assert pl.bubble_slots(4, 8, 1, "1f1b") == (9, 24)
    # ZB-H1 (Qi et al. 2024, §2.1): (p-1)(T_F + T_B - T_W) = 3 * (1 + 1 - 1) = 3: a third of 1F1B's
    assert pl.bubble_slots(4, 8, 1, "interleaved-zb") == (3, 24)
    assert pl.bubble_over_ideal(4, 8, 1, "interleaved-zb") == pytest.approx(pl.bubble_over_ideal(4, 8, 1, "1f1b") / 3)
    # interleaved over v = 2 chunks: the same 3 chunk-slots against 2 * 8 * 3 = 48
    assert pl.bubble_slots(4, 8, 2, "interleaved-zb") == (3, 48)
    # ZB-V, m >= 2p - 1: only the V's fill, p - 1 = 3 slots against 2 chunks * 8 * 3 = 48
    assert pl.bubble_slots(4, 8, 2, "zbv") == (3, 48)
    # ... with m = 2 < 2p - 1 the V never fills: 4p - 2m - 2 = 10
    assert pl.bubble_slots(4, 2, 2, "zbv") == (10, 12)
    # DualPipeV as torch runs it: p - 1 = 3 slots; DeepSeek's (PP/2-1)(F&B + B - 3W) at F&B = F + B,
    # PP = 8 stages, B = 2: 3 * (3 + 2 - 3) = 6 charges the overlapped pair in full
    assert pl.bubble_slots(4, 8, 2, "dualpipev") == (3, 48)
    assert pl.bubble_fraction(4, 8, 2, "dualpipev") == pytest.approx(3 / 51)
    assert pl.bubble_fraction(1, 8, 2, "zbv") == 0


@pytest.mark.parametrize("schedule,p,m,v", SPLIT)
def test_timeline_reproduces_the_bubble(schedule, p, m, v):
    slots = pl.timeline(p, m, v, schedule)
    idle, busy = pl.bubble_slots(p, m, v, schedule)
    span = max(s.end for s in slots)
    assert span == idle + busy
    for r in range(p):  # every rank idles the same
        assert sum(s.end - s.start for s in slots if s.rank == r) == busy
    assert pl.idle_fraction(slots) == pytest.approx(float(Fraction(idle, idle + busy)), abs=1e-12)
    # data dependencies: F after the previous stage's F; I/B after the next stage's and own F; W after I
    end = {(s.kind, s.microbatch, pl.global_stage(p, s.rank, s.chunk, schedule)): s for s in slots}
    top = p * pl.chunks_per_rank(v, schedule) - 1
    for (kind, mb, st), s in end.items():
        if kind == "F" and st > 0:
            assert s.start >= end[("F", mb, st - 1)].end
        if kind in "BI":
            assert s.start >= end[("F", mb, st)].end
            if st < top:
                nxt = end.get(("I", mb, st + 1)) or end[("B", mb, st + 1)]
                assert s.start >= nxt.end
        if kind == "W":
            assert s.start >= end[("I", mb, st)].end


def test_rank_orders_are_torchs():
    torch = pytest.importorskip("torch")
    from torch.distributed.pipelining import schedules as ts

    kinds = {
        ts._ComputationType.FORWARD: "F",
        ts._ComputationType.FULL_BACKWARD: "B",
        ts._ComputationType.BACKWARD_INPUT: "I",
        ts._ComputationType.BACKWARD_WEIGHT: "W",
    }
    classes = {
        "interleaved-zb": ts.ScheduleInterleavedZeroBubble,
        "zbv": ts.ScheduleZBVZeroBubble,
        "dualpipev": ts.ScheduleDualPipeV,
    }
    for schedule, p, m, v in SPLIT:
        sched = object.__new__(classes[schedule])  # no stages needed for the order
        sched.pp_group_size, sched._n_microbatches, sched.n_local_stages = p, m, v
        sched._num_stages = sched.num_stages = p * v
        sched.number_of_rounds = max(1, m // p)
        sched.microbatches_per_round = m // sched.number_of_rounds
        for r in range(p):
            theirs = []
            for a in sched._calculate_single_rank_operations(r):
                for b in (a.sub_actions or (a,)) if a is not None else ():  # DualPipeV's overlapped F + B
                    c = next(c for c in range(v) if pl.global_stage(p, r, c, schedule) == b.stage_index)
                    theirs.append((kinds[b.computation_type], b.microbatch_index, c))
            assert pl.rank_order(p, m, v, schedule, r) == theirs, (schedule, p, m, v, r)
    del torch


def test_activations_alive_hand_worked():
    # ZB-V holds 2p chunks of half a rank's layers: p micro-batches, 1F1B's (Qi et al. 2024, §6)
    assert pl.inflight_microbatches(4, 16, 2, "zbv") == 4 == pl.inflight_microbatches(4, 16, 1, "1f1b")
    # DualPipeV: PP + 1 = 2p + 1 chunks (DeepSeek-V3 report, Table 2, PP = 2p stages)
    assert pl.inflight_microbatches(4, 16, 2, "dualpipev") == 4.5
    # the V's rank 0 holds the embedding's stage and the loss's; rank p-1 neither
    b = pl.backwards(4, 16, 2, "zbv", False)[0]
    assert b.first > 0 and b.head > 0
    assert all(x.first == 0 and x.head == 0 for x in pl.backwards(4, 16, 2, "zbv", True))
    assert pl.holds_ends(4, False, "zbv") == (1, 1) and pl.holds_ends(4, True, "zbv") == (0, 0)


def test_long_steps_extend_the_walk_exactly():
    for schedule, v in (("interleaved-zb", 2), ("zbv", 2), ("dualpipev", 2)):
        for m in (24, 28, 36, 52):
            for last in (False, True):
                assert pl._backwards(4, m, v, schedule, last) == pl._split_backwards(4, m, v, schedule, last)


def test_plan_rules():
    from _models import TINY_GPT2, TINY_LLAMA

    p = Plan(pp=2, schedule="zbv", mbs=1, gbs=4, seq=32).resolve(TINY_LLAMA, 2)
    assert p.vpp == 2  # the V holds two stages per rank
    with pytest.raises(ShardwiseError, match="at least as many micro-batches as stages"):
        Plan(pp=2, schedule="dualpipev", mbs=1, gbs=3, seq=32).resolve(TINY_LLAMA, 2)
    with pytest.raises(ShardwiseError, match="exactly 2 stages per rank"):
        Plan(pp=2, schedule="zbv", vpp=4, mbs=1, gbs=4, seq=32).resolve(dataclasses.replace(TINY_LLAMA, layers=16), 2)
    with pytest.raises(ShardwiseError, match="needs pp > 1"):
        Plan(schedule="interleaved-zb", mbs=1, gbs=4, seq=32).resolve(TINY_LLAMA, 1)
    from shardwise.spec.plan import engine_violation

    tied = Plan(pp=2, schedule="zbv", mbs=1, gbs=4, seq=32).resolve(TINY_GPT2, 2)
    assert "ties its embeddings" in engine_violation(tied, TINY_GPT2)
