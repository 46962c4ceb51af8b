"""The pipeline schedule model: bubble fractions, micro-batches in flight, and the unit-time
timeline that must reproduce both, in torch.distributed.pipelining's own order."""

from fractions import Fraction

import numpy as np
import pytest

from shardwise.errors import ShardwiseError
from shardwise.estimate.pipeline import (
    bubble_fraction,
    bubble_over_ideal,
    idle_fraction,
    inflight_microbatches,
    rank_order,
    timeline,
)

CASES = (
    [("gpipe", p, m, 1) for p in (1, 2, 4) for m in (1, 3, 8)]
    + [("1f1b", p, m, 1) for p in (1, 2, 3, 4, 8) for m in (1, 2, 5, 8, 16)]
    + [("interleaved", p, m, v) for p in (2, 4) for m in (p, 2 * p, 4 * p) for v in (2, 3, 4)]
)


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
            inflight_microbatches(p, m, v, schedule, stage=r)
        )


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
            theirs = [
                ("F" if a.computation_type == _ComputationType.FORWARD else "B", a.microbatch_index, a.stage_index // p)
                for a in sched._calculate_single_rank_operations(r)
                if a is not None
            ]
            assert rank_order(p, m, v, "interleaved", r) == theirs
    del torch


def test_1f1b_order_hand_worked():
    # torch's Schedule1F1B on stage 0 of 4 with 6 micro-batches: 4 warm-up forwards, then 1B1F, then drain
    assert [f"{k}{i}" for k, i, _ in rank_order(4, 6, 1, "1f1b", 0)] == [
        "F0",
        "F1",
        "F2",
        "F3",
        "B0",
        "F4",
        "B1",
        "F5",
        "B2",
        "B3",
        "B4",
        "B5",
    ]
    assert [f"{k}{i}" for k, i, _ in rank_order(4, 6, 1, "1f1b", 3)] == [
        "F0",
        "B0",
        "F1",
        "B1",
        "F2",
        "B2",
        "F3",
        "B3",
        "F4",
        "B4",
        "F5",
        "B5",
    ]


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


# ---- what a rank holds at each backward (the memory estimate's moments) ------------------------
def _held_at_each_backward(p, m, v, schedule, rank):
    """Walk the rank's torch order and return, for each of its backwards (in order), what it finds
    alive, as a Backward. What the schedules keep of their sends is written out from their code
    (torch/distributed/pipelining/schedules.py): ScheduleGPipe and ScheduleInterleaved1F1B wait
    on every send at the end of the step and keep the works until then; Schedule1F1B keeps the
    works or ops of a few sends in loop variables, replayed here line by line."""
    from shardwise.estimate.pipeline import Backward

    last_stage = p * v - 1
    stage = lambda c: c * p + rank
    live, backwarded, sent_out, sent_grad, graded, out = set(), set(), set(), set(), set(), []

    def record(mb, c, held_out=(), held_grad=()):
        outputs = {(i, d) for i, d in live if stage(d) != last_stage} | set(held_out)
        out.append(
            Backward(
                len(out),
                len(live),
                sum(1 for _, d in live if stage(d) == 0),
                sum(1 for _, d in live if stage(d) == last_stage),
                len(outputs),
                len(held_grad),
                len(graded),
                int(stage(c) == last_stage),
            )
        )

    def forward(mb, c):
        live.add((mb, c))

    def backward(mb, c):
        live.discard((mb, c))
        backwarded.add((mb, c))
        graded.add(c)

    if schedule != "1f1b":  # every send held until the step ends
        for kind, mb, c in rank_order(p, m, v, schedule, rank):
            if kind == "F":
                forward(mb, c)
                if stage(c) != last_stage:
                    sent_out.add((mb, c))
            else:
                record(mb, c, sent_out, sent_grad)
                backward(mb, c)
                if stage(c) != 0:
                    sent_grad.add((mb, c))
        return out
    # Schedule1F1B._step_microbatches: send_work / fwd_sends / bwd_sends hold what they were
    # given until reassigned; the last stage sends no outputs, the first no gradients
    outs = lambda i: [(i, 0)] if rank != p - 1 else []
    grads = lambda i: [(i, 0)] if rank != 0 else []
    warm = min(m, p - rank)
    send_work, fwd_sends, bwd_sends, f, b = [], [], [], 0, 0
    for _ in range(warm):
        forward(f, 0)
        fwd_sends = outs(f)
        if f != warm - 1:
            send_work = fwd_sends
        f += 1
    while True:
        record(b, 0, send_work + fwd_sends, bwd_sends)
        backward(b, 0)
        bwd_sends = grads(b)
        b += 1
        if f == m:
            break
        forward(f, 0)
        fwd_sends = outs(f)
        f += 1
    send_work = bwd_sends
    while b < m:
        record(b, 0, fwd_sends, send_work + bwd_sends)
        backward(b, 0)
        bwd_sends = send_work = grads(b)
        b += 1
    return out


MOMENT_CASES = [
    ("gpipe", 2, 4, 1),
    ("gpipe", 4, 3, 1),
    ("gpipe", 3, 1, 1),
    ("1f1b", 2, 4, 1),
    ("1f1b", 4, 8, 1),
    ("1f1b", 4, 2, 1),
    ("1f1b", 4, 5, 1),
    ("1f1b", 3, 3, 1),
    ("interleaved", 2, 4, 2),
    ("interleaved", 2, 2, 2),
    ("interleaved", 4, 4, 3),
    ("interleaved", 4, 8, 2),
    ("interleaved", 2, 2, 4),
    ("interleaved", 3, 6, 3),
]


@pytest.mark.parametrize("schedule,p,m,v", MOMENT_CASES)
def test_backwards_are_what_the_rank_holds_there(schedule, p, m, v):
    """Each moment backwards() returns is what the walk of the rank's order finds at that backward
    (the one-backward grad_sent counts of 1F1B aside, compared as sets there: equal)."""
    from shardwise.estimate.pipeline import backwards

    for last in (False, True):
        walk = _held_at_each_backward(p, m, v, schedule, p - 1 if last else 0)
        assert len(walk) == v * m
        for b in backwards(p, m, v, schedule, last):
            assert b == walk[b.index], (last, b, walk[b.index])


@pytest.mark.parametrize("schedule,p,m,v", MOMENT_CASES)
def test_the_peak_is_at_one_of_the_moments(schedule, p, m, v):
    """For any sizes, the largest of the rank's backwards is one of the four moments. The sizes as
    activations.priced prices a moment, x a residual tensor [b, s, h]: a chunk's saved
    tensors at least 2x (a block saves its input and its first norm's output); a receive buffer x,
    one per micro-batch and virtual stage above global stage 0, so each chunk in flight on stage 0
    leaves one more buffer idle: x + its token ids (at most x); held outputs and input gradients x
    each; the head's tensors, gradients and the loss's transient any."""
    from shardwise.estimate.pipeline import backwards

    rng = np.random.default_rng(0)
    for last in (False, True):
        walk = _held_at_each_backward(p, m, v, schedule, p - 1 if last else 0)
        moments = backwards(p, m, v, schedule, last)
        for _ in range(200):
            x = rng.uniform(0, 1)
            chunk, first = 2 * x + rng.uniform(0, 5), x + rng.uniform(0, x)
            head, grads, embed, head_grads, loss = rng.uniform(0, 5, 5)

            def held(b):
                return (
                    (chunk - x) * b.chunks
                    + first * b.first
                    + head * b.head
                    + x * (b.outputs + b.grads_sent)
                    + grads * b.grad_chunks
                    + embed * (b.grad_chunks >= v) * (not last)
                    + head_grads * (b.grad_chunks >= 1) * last
                    + loss * b.loss
                )

            assert max(held(b) for b in moments) == pytest.approx(max(held(b) for b in walk), abs=0, rel=1e-12)


def test_backwards_hand_worked():
    from shardwise.estimate.pipeline import Backward, backwards

    # interleaved, p = 2, v = 2, m = 4 (`shardwise check`'s tiny-llama tp2 pp2 interleaved). Rank 0
    # runs F0 F1 F0' F1' F2 B0' F3 B1' F2' B0 F3' B1 | B2' B3' B2 B3 (' = its virtual stage 1):
    # its last 1F1B backward is B1 (k = 3, K = 8 - 5 chunks): 5 chunks in flight (1, 2, 3 on stage
    # 0, 2', 3'), all 8 outputs alive (in flight or held by their sends), the input gradients of
    # B0' and B1' held, both virtual stages' gradients made.
    assert set(backwards(2, 4, 2, "interleaved", last=False)) == {
        Backward(index=3, chunks=5, first=3, head=0, outputs=8, grads_sent=2, grad_chunks=2, loss=0)
    }
    # rank 1 (stages 1 and 3): F0 F1 F0' B0' F1' B1' F2 B0 F3 B1 F2' B2' F3' B3' | B2 B3: at B3'
    # (k = 5) chunks 2, 3 and 3' in flight, 4 outputs of stage 1, the input gradients of
    # B0' B1' B0 B1 B2' held; B3' is the loss's
    assert set(backwards(2, 4, 2, "interleaved", last=True)) == {
        Backward(index=5, chunks=3, first=0, head=1, outputs=4, grads_sent=5, grad_chunks=2, loss=1)
    }
    # 1F1B, p = 2, m = 4, rank 0: F0 F1 B0 F2 B1 F3 B2 B3. At B2 (k = K = 2): 2 in flight, and the
    # output of micro-batch 0, whose send the warm-up fired last, still held: 3 outputs
    assert set(backwards(2, 4, 1, "1f1b", last=False)) == {
        Backward(index=2, chunks=2, first=2, head=0, outputs=3, grads_sent=0, grad_chunks=1, loss=0)
    }
    # GPipe, p = 2, m = 4, last rank: B0 with all 4 micro-batches' logits and no gradients yet, or
    # B1 with 3, every gradient made and B0's input gradient held
    assert backwards(2, 4, 1, "gpipe", last=True)[:2] == (
        Backward(index=0, chunks=4, first=0, head=4, outputs=0, grads_sent=0, grad_chunks=0, loss=1),
        Backward(index=1, chunks=3, first=0, head=3, outputs=0, grads_sent=1, grad_chunks=1, loss=1),
    )
    # no pipeline: one micro-batch, the earlier ones' gradients
    assert set(backwards(1, 4, 1, "1f1b")) == {Backward(3, 1, 1, 1, 0, 0, 1, 1)}
    assert set(backwards(1, 1, 1, "1f1b")) == {Backward(0, 1, 1, 1, 0, 0, 0, 1)}


def test_backwards_arrays_match_scalars():
    from shardwise.estimate.pipeline import backwards

    p, m, v = np.array([2, 4, 2, 1, 4]), np.array([4, 8, 2, 4, 4]), np.array([2, 2, 2, 1, 3])
    for schedule in ("gpipe", "1f1b", "interleaved"):
        vv = v if schedule == "interleaved" else np.ones_like(v)
        keep = p > 1 if schedule == "interleaved" else p > 0
        for last in (False, True, np.array([False, True, True, False, True])):
            got = backwards(p[keep], m[keep], vv[keep], schedule, last if isinstance(last, bool) else last[keep])
            lasts = [last] * int(keep.sum()) if isinstance(last, bool) else list(last[keep])
            for i, (a, b, c, l) in enumerate(zip(p[keep], m[keep], vv[keep], lasts)):
                want = backwards(int(a), int(b), int(c), schedule, bool(l))
                assert [tuple(int(f[i]) for f in moment) for moment in got] == [tuple(w) for w in want]
