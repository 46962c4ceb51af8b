"""The pipeline schedule model: bubble, micro-batches in flight, and a unit-time timeline.

One model serves the time estimate (bubble), the memory estimate (activations in flight) and the
lecture's schedule chart (timeline). The orders are those of torch.distributed.pipelining, which
`shardwise run` uses:
- gpipe: every forward, then every backward (ScheduleGPipe).
- 1f1b: stage r runs min(m, p - r) warm-up forwards, then alternates one backward and one
  forward, then drains the backwards (Schedule1F1B).
- interleaved: rank r holds the v virtual stages r, r+p, r+2p, ...; warm-up (v-1)*p + 2*(p-1-r)
  chunk forwards, then 1F1B over chunks, depth first (ScheduleInterleaved1F1B, which follows
  Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters", §2.2).

Time unit of the timeline: one chunk's forward takes F = 1 slot and its backward B = 2 (a
backward is two matmuls per forward matmul); a chunk is 1/v of a rank's layers. Communication
takes no time here (time.py adds it).

Numeric arguments (pp, m, vpp) may be numpy arrays in bubble_fraction and inflight_microbatches;
the schedule is a scalar string. timeline() is for one scalar plan (it draws a chart).
"""
from __future__ import annotations

from typing import NamedTuple

from shardwise.errors import ShardwiseError
from shardwise.estimate._num import minimum

SCHEDULES = ("gpipe", "1f1b", "interleaved")
F_SLOTS, B_SLOTS = 1, 2


def _check(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ShardwiseError(f"unknown pipeline schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def chunks_per_rank(vpp, schedule: str):
    """Virtual stages per rank: vpp for interleaved, 1 otherwise (vpp is ignored there)."""
    return vpp if schedule == "interleaved" else 1


def bubble_fraction(pp, m, vpp=1, schedule: str = "1f1b"):
    """Fraction of a step each rank sits idle: (p-1) / (v*m + p-1).

    The fill and drain cost (p-1) chunk-times of forward and of backward on every rank, against
    v*m chunk-times of work. With v = 1 (GPipe, 1F1B) this is (p-1)/(m+p-1); as bubble time over
    ideal time it is (p-1)/(v*m), Narayanan et al.'s "(p-1)/m, divided by v for interleaved".
    """
    _check(schedule)
    v = chunks_per_rank(vpp, schedule)
    return (pp - 1) / (v * m + pp - 1)


def bubble_over_ideal(pp, m, vpp=1, schedule: str = "1f1b"):
    """Bubble time / ideal (bubble-free) time = (p-1)/(v*m) (Narayanan et al. 2021, §2.2)."""
    _check(schedule)
    return (pp - 1) / (chunks_per_rank(vpp, schedule) * m)


def inflight_microbatches(pp, m, vpp=1, schedule: str = "1f1b", stage=0):
    """Peak number of micro-batches whose activations rank `stage` holds at once, in units of
    one micro-batch through all of that rank's layers.

    gpipe: all m forwards run before the first backward.
    1f1b: torch's Schedule1F1B runs min(m, p - r) forwards before rank r's first backward, and
      from then on each forward is preceded by a backward: peak min(m, p - r).
    interleaved: ScheduleInterleaved1F1B (as Megatron-LM) warms up with
      w = (v-1)*p + 2*(p-1-r) chunk forwards, then runs F before B: peak min(w+1, v*m) chunks of
      1/v of the layers each. On rank 0 that is p + (p-1)/v micro-batches, Korthikanti et al.
      2022's interleaved factor p*(1 + (p-1)/(p*v)).
    """
    _check(schedule)
    if schedule == "gpipe":
        return m + 0 * pp
    if schedule == "1f1b":
        return minimum(pp - stage, m)
    warmup = (vpp - 1) * pp + 2 * (pp - 1 - stage)
    return minimum(warmup + 1, vpp * m) / vpp


class Slot(NamedTuple):
    rank: int
    start: int
    end: int
    kind: str  # "F" | "B"
    microbatch: int
    chunk: int  # virtual stage index on this rank (0 unless interleaved); global stage = chunk*p + rank


def rank_order(pp: int, m: int, vpp: int = 1, schedule: str = "1f1b", rank: int = 0) -> list[tuple[str, int, int]]:
    """The (kind, microbatch, chunk) sequence one rank executes, in torch's order."""
    _check(schedule)
    if schedule == "gpipe":
        return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
    if schedule == "1f1b":
        warm = min(m, pp - rank)
        ops = [("F", i, 0) for i in range(warm)]
        for i in range(m):
            ops.append(("B", i, 0))
            if warm + i < m:
                ops.append(("F", warm + i, 0))
        return ops
    # interleaved: ScheduleInterleaved1F1B._calculate_single_rank_operations, without its padding
    v = vpp
    per_round = m // max(1, m // pp)
    total = v * m
    warm = min((v - 1) * per_round + 2 * (pp - 1 - rank), total)
    fwd_chunk = lambda step: (step // per_round) % v  # noqa: E731
    bwd_chunk = lambda step: v - 1 - ((step - warm) // per_round) % v  # noqa: E731
    nf, nb = [0] * v, [0] * v
    ops: list[tuple[str, int, int]] = []

    def fwd(step):
        c = fwd_chunk(step)
        ops.append(("F", nf[c], c))
        nf[c] += 1

    def bwd(step):
        c = bwd_chunk(step)
        ops.append(("B", nb[c], c))
        nb[c] += 1

    for step in range(warm):
        fwd(step)
    for step in range(warm, total):
        fwd(step)
        bwd(step)
    for step in range(total, total + warm):
        bwd(step)
    return ops


def timeline(pp: int, m: int, vpp: int = 1, schedule: str = "1f1b") -> list[Slot]:
    """Every forward and backward of one step on every rank, placed as early as its data allows
    (F of stage s after F of stage s-1; B of stage s after B of stage s+1 and its own F), in each
    rank's torch order. Idle time per rank / makespan = bubble_fraction(pp, m, vpp, schedule)."""
    v = chunks_per_rank(vpp, schedule)
    if schedule == "interleaved" and m % pp:
        raise ShardwiseError(f"interleaved 1F1B needs the micro-batch count ({m}) to be a multiple of pp={pp}")
    orders = [rank_order(pp, m, v, schedule, r) for r in range(pp)]
    last = pp * v - 1
    done: dict[tuple[str, int, int], int] = {}  # (kind, microbatch, global stage) -> end slot
    free = [0] * pp
    nxt = [0] * pp
    out: list[Slot] = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(pp):
            if nxt[r] == len(orders[r]):
                continue
            kind, mb, c = orders[r][nxt[r]]
            s = c * pp + r
            if kind == "F":
                deps = [("F", mb, s - 1)] if s > 0 else []
            else:
                deps = [("F", mb, s)] + ([("B", mb, s + 1)] if s < last else [])
            if any(d not in done for d in deps):
                continue
            start = max([free[r]] + [done[d] for d in deps])
            end = start + (F_SLOTS if kind == "F" else B_SLOTS)
            done[(kind, mb, s)] = end
            free[r] = end
            out.append(Slot(r, start, end, kind, mb, c))
            nxt[r] += 1
            remaining -= 1
            progressed = True
        if not progressed:  # an order that waits on itself: a bug in rank_order, not a user error
            raise RuntimeError(f"pipeline order deadlocks for pp={pp} m={m} v={v} {schedule}")
    return sorted(out, key=lambda t: (t.rank, t.start))


def idle_fraction(slots: list[Slot]) -> float:
    """Idle slots / (ranks * makespan) of a timeline."""
    span = max(t.end for t in slots)
    ranks = len({t.rank for t in slots})
    busy = sum(t.end - t.start for t in slots)
    return 1 - busy / (ranks * span)
