"""The pipeline schedule model: bubble fractions, micro-batches in flight, and the unit-time
timeline that must reproduce both, in torch.distributed.pipelining's own order."""
from fractions import Fraction

import numpy as np
import pytest

from shardwise.errors import ShardwiseError
from shardwise.estimate.pipeline import (bubble_fraction, bubble_over_ideal, idle_fraction, inflight_microbatches,
                                         rank_order, timeline)

CASES = [("gpipe", p, m, 1) for p in (1, 2, 4) for m in (1, 3, 8)] + \
        [("1f1b", p, m, 1) for p in (1, 2, 3, 4, 8) for m in (1, 2, 5, 8, 16)] + \
        [("interleaved", p, m, v) for p in (2, 4) for m in (p, 2 * p, 4 * p) for v in (2, 3, 4)]


def test_bubble_fraction_hand_worked():
    # p = 4 stages, m = 8 micro-batches: fill + drain = 3 of 8 + 3 = 11 chunk-times -> 3/11
    assert bubble_fraction(4, 8, 1, "1f1b") == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, 1, "gpipe") == pytest.approx(3 / 11)
    # interleaved, v = 2: each rank has 2*8 = 16 chunk-times of work, the bubble stays 3 -> 3/19
    assert bubble_fraction(4, 8, 2, "interleaved") == pytest.approx(3 / 19)
    # Narayanan et al. 2021 (sec. 2.2): bubble / ideal = (p-1)/m = 3/8, divided by v for interleaved
    assert bubble_over_ideal(4, 8, 1, "1f1b") == pytest.approx(3 / 8)
    assert bubble_over_ideal(4, 8, 2, "interleaved") == pytest.approx(3 / 16)
    # vpp means nothing outside interleaved
    assert bubble_fraction(4, 8, 2, "1f1b") == bubble_fraction(4, 8, 1, "1f1b")
    # no pipeline, no bubble
    assert bubble_fraction(1, 8, 1, "1f1b") == 0


def test_fraction_and_ratio_agree():
    # f = B/(B+I) and B/I = f/(1-f): the two conventions describe the same schedule
    for p, m, v in [(4, 8, 1), (8, 32, 3), (2, 2, 1)]:
        f = bubble_fraction(p, m, v, "interleaved" if v > 1 else "1f1b")
        r = bubble_over_ideal(p, m, v, "interleaved" if v > 1 else "1f1b")
        assert f / (1 - f) == pytest.approx(r)


@pytest.mark.parametrize("schedule,p,m,v", CASES)
def test_timeline_idle_fraction_is_the_formula(schedule, p, m, v):
    slots = timeline(p, m, v, schedule)
    assert idle_fraction(slots) == pytest.approx(bubble_fraction(p, m, v, schedule), abs=1e-12)
    # exactly: F = 1 and B = 2 slots per chunk, so the makespan is 3 * (v*m + p - 1)
    assert max(s.end for s in slots) == 3 * (v * m + p - 1)
    # every rank idles the same share
    span = max(s.end for s in slots)
    for r in range(p):
        busy = sum(s.end - s.start for s in slots if s.rank == r)
        assert Fraction(span - busy, span) == Fraction(p - 1, v * m + p - 1)


@pytest.mark.parametrize("schedule,p,m,v", CASES)
def test_timeline_respects_data_dependencies(schedule, p, m, v):
    slots = timeline(p, m, v, schedule)
    end = {(s.kind, s.microbatch, s.chunk * p + s.rank): s.end for s in slots}
    start = {(s.kind, s.microbatch, s.chunk * p + s.rank): s.start for s in slots}
    last = p * v - 1
    assert len(slots) == 2 * p * v * m  # one F and one B per micro-batch per stage
    for (kind, mb, st), t0 in start.items():
        if kind == "F" and st > 0:
            assert t0 >= end[("F", mb, st - 1)]
        if kind == "B":
            assert t0 >= end[("F", mb, st)]
            if st < last:
                assert t0 >= end[("B", mb, st + 1)]
    for r in range(p):  # a rank runs one thing at a time
        mine = sorted((s.start, s.end) for s in slots if s.rank == r)
        assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:]))


def test_inflight_hand_worked():
    # GPipe: all m forwards before any backward
    assert inflight_microbatches(4, 8, 1, "gpipe") == 8
    # 1F1B (torch's Schedule1F1B): rank r runs min(m, p - r) forwards first
    assert inflight_microbatches(4, 8, 1, "1f1b", stage=0) == 4
    assert inflight_microbatches(4, 8, 1, "1f1b", stage=3) == 1
    assert inflight_microbatches(4, 2, 1, "1f1b", stage=0) == 2
    # interleaved p = 4, v = 2, rank 0: warm-up (2-1)*4 + 2*(4-1) = 10 chunk forwards, +1 before the
    # first backward = 11 chunks of half the rank's layers = 5.5 micro-batches = p + (p-1)/v,
    # Korthikanti et al. 2022's p * (1 + (p-1)/(p*v)) = 4 * (1 + 3/8) = 5.5
    assert inflight_microbatches(4, 8, 2, "interleaved", stage=0) == pytest.approx(5.5)
    assert inflight_microbatches(4, 8, 2, "interleaved", stage=0) == pytest.approx(4 * (1 + 3 / 8))


@pytest.mark.parametrize("schedule,p,m,v", CASES)
def test_inflight_matches_the_timeline(schedule, p, m, v):
    """Peak (forwards started - backwards finished) per rank, in the rank's own order."""
    for r in range(p):
        held = peak = 0
        for kind, _, _ in rank_order(p, m, v, schedule, r):
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        assert peak / (v if schedule == "interleaved" else 1) == pytest.approx(
            inflight_microbatches(p, m, v, schedule, stage=r))


def test_rank_order_is_torchs():
    """Our orders are torch.distributed.pipelining's (the schedules `shardwise run` uses)."""
    torch = pytest.importorskip("torch")
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType

    for p, m, v in [(2, 4, 2), (4, 8, 2), (4, 8, 3), (3, 6, 2), (4, 4, 4)]:
        sched = ScheduleInterleaved1F1B.__new__(ScheduleInterleaved1F1B)  # no stages needed for the order
        sched.pp_group_size, sched.n_local_stages, sched._n_microbatches = p, v, m
        sched.number_of_rounds = max(1, m // p)
        sched.microbatches_per_round = m // sched.number_of_rounds
        for r in range(p):
            theirs = [("F" if a.computation_type == _ComputationType.FORWARD else "B", a.microbatch_index,
                       a.stage_index // p) for a in sched._calculate_single_rank_operations(r) if a is not None]
            assert rank_order(p, m, v, "interleaved", r) == theirs
    del torch


def test_1f1b_order_hand_worked():
    # torch's Schedule1F1B on stage 0 of 4 with 6 micro-batches: 4 warm-up forwards, then 1B1F, then drain
    assert [f"{k}{i}" for k, i, _ in rank_order(4, 6, 1, "1f1b", 0)] == \
        ["F0", "F1", "F2", "F3", "B0", "F4", "B1", "F5", "B2", "B3", "B4", "B5"]
    assert [f"{k}{i}" for k, i, _ in rank_order(4, 6, 1, "1f1b", 3)] == \
        ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3", "F4", "B4", "F5", "B5"]


def test_arrays_match_scalars():
    p = np.array([1, 2, 4, 8, 4])
    m = np.array([4, 8, 8, 16, 12])
    v = np.array([1, 2, 1, 3, 2])
    got = bubble_fraction(p, m, v, "interleaved")
    want = [bubble_fraction(int(a), int(b), int(c), "interleaved") for a, b, c in zip(p, m, v)]
    assert np.allclose(got, want)
    got = inflight_microbatches(p, m, v, "interleaved", 0)
    want = [inflight_microbatches(int(a), int(b), int(c), "interleaved", 0) for a, b, c in zip(p, m, v)]
    assert np.allclose(got, want)
    assert np.array_equal(inflight_microbatches(p, m, 1, "1f1b"), np.minimum(p, m))


def test_bad_input():
    with pytest.raises(ShardwiseError, match="unknown pipeline schedule 'zb'"):
        bubble_fraction(4, 8, 1, "zb")
    with pytest.raises(ShardwiseError, match="multiple of pp=4"):
        timeline(4, 6, 2, "interleaved")
