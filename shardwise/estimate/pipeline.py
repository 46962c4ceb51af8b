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

from functools import lru_cache
from typing import NamedTuple

from shardwise.errors import ShardwiseError
from shardwise.estimate._num import _is_array, ceil_div, maximum, memo, minimum, where
from shardwise.spec.plan import stage_blocks

SCHEDULES = ("gpipe", "1f1b", "interleaved")
F_SLOTS, B_SLOTS = 1, 2


def _check(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ShardwiseError(f"unknown pipeline schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def chunks_per_rank(vpp, schedule: str):
    """Virtual stages per rank: vpp for interleaved, 1 otherwise (vpp is ignored there)."""
    return vpp if schedule == "interleaved" else 1


def chunk_blocks(model, plan, last):
    """Transformer blocks of one virtual stage of the first (last=False) or last pipeline rank,
    the plan's split (spec.plan.stage_blocks: the last stage may hold fewer; uneven splits are
    gpipe's and 1f1b's, one virtual stage per rank). Array-safe, `last` too."""
    n, n_last = stage_blocks(plan, model.layers)
    return where(last, n_last, n)


def rank_blocks(model, plan, last):
    """Transformer blocks the first (last=False) or last pipeline rank holds."""
    return chunk_blocks(model, plan, last) * chunks_per_rank(plan.vpp, plan.schedule)


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


class Backward(NamedTuple):
    """What one rank holds when one of its backwards begins (counts; the memory estimate prices
    them). All forwards of the step are done at every moment backwards() returns."""

    index: object  # which of the rank's backwards (0-based, in its own order)
    chunks: object  # chunks (micro-batches through one virtual stage) whose activations are saved
    first: object  # of them, micro-batches through global stage 0 (the embedding's)
    head: object  # micro-batches through the last global stage (logits, loss) still saved
    outputs: object  # stage outputs alive: in flight, or sent and still held by the schedule
    grads_sent: object  # input gradients sent back and still held by the schedule
    grad_chunks: object  # virtual stages whose parameters have gradients by now (top down)
    loss: object  # 1 where this backward is the last global stage's (the loss's backward runs in it)


def backwards(pp, m, vpp=1, schedule: str = "1f1b", last=False) -> tuple[Backward, ...]:
    """The backwards of the first (last=False) or last pipeline rank that can hold its peak, in
    torch.distributed.pipelining's orders (rank_order) and with what its schedules keep alive.

    Every chunk's forward is done by then; backward k (0-based, the rank's own order) finds
    min(c, v*m - k) chunks in flight, c = inflight's peak chunks (c in flight from the first
    backward through the last 1F1B one, k = K = v*m - c; one fewer per backward after that).
    Backwards run in rounds of p per virtual stage, top down (v-1, v-2, ..., 0, v-1, ...).
    What a schedule keeps of what it sent (measured on gloo; NCCL keeps a send's tensor until
    its work is waited too):
      gpipe (ScheduleGPipe): every send's work until the step ends: all outputs, all input grads;
      1f1b (Schedule1F1B): the input gradient of the previous backward (its send ops), and while
        backwards alternate with forwards, the output of micro-batch c-2 (the warm-up's last
        fired send, waited but kept);
      interleaved (ScheduleInterleaved1F1B): every send's work until the step ends.
    Memory grows through the 1F1B phase (same chunks, more gradients and held sends) and falls
    by a chunk per backward after it, except where a virtual stage's gradients first appear (at
    backward j*p + 1, j = 0..v-1, its first backward done): at those points it is linear in j but
    for the last one on the first rank (the embedding's gradients appear with it, and virtual
    stage 0 sends nothing back). So the peak is at k = K, or at the first such point after K, the
    last but one or the last: the four moments returned (one moment more than once where they
    coincide). Without a pipeline (pp = 1): one micro-batch, with the gradients of the earlier
    ones when m > 1, four times."""
    if _is_array(pp, m, vpp, last):  # a search's plans share a few (pp, m, vpp): a table of them
        t = _table(pp, m, vpp, schedule, last)
        return tuple(Backward(*(t[f"{i}.{f}"] for f in Backward._fields)) for i in range(4))
    return _cached(int(pp), int(m), int(vpp), schedule, bool(last))


@memo
def _table(pp, m, vpp, schedule, last):
    return {
        f"{i}.{f}": int(getattr(b, f))
        for i, b in enumerate(_cached(pp, m, vpp, schedule, bool(last)))
        for f in Backward._fields
    }


def _backwards(pp, m, vpp, schedule, last):
    """backwards() of scalars."""
    _check(schedule)
    v = chunks_per_rank(vpp, schedule)
    p = pp
    r = where(last, p - 1, 0 * p)
    holds_first, holds_last = where(r == 0, 1, 0), where(r == p - 1, 1, 0)
    total = v * m
    if schedule == "gpipe":
        c = m + 0 * p
    elif schedule == "1f1b":
        c = minimum(p - r, m)
    else:
        c = minimum((v - 1) * p + 2 * (p - 1 - r) + 1, total)
    big_k = total - c
    nxt = ceil_div(big_k, p)  # the first point j*p + 1 after K
    ks = (
        big_k,
        where(nxt <= v - 1, nxt * p + 1, big_k),
        maximum((v - 2) * p + 1, big_k),
        maximum((v - 1) * p + 1, big_k),
    )
    piped = p > 1
    out = []
    for k in ks:
        k = minimum(k, total - 1)
        chunks = minimum(c, total - k)
        cycle, pos = k // (v * p), k % (v * p)
        done_top = cycle * p + minimum(pos, p)  # backwards finished on virtual stage v-1
        done_bottom = cycle * p + maximum(pos - (v - 1) * p, 0)  # ... and on virtual stage 0
        first = holds_first * (m - done_bottom)
        head = holds_last * (m - done_top)
        if schedule == "1f1b":
            # rank r's warm-up fires the sends of micro-batches 0 .. c-2 one at a time and keeps
            # the last fired one's work through the 1B1F loop (backwards 0 .. K)
            kept = where((c >= 2) & (k >= c - 1) & (k <= big_k), 1, 0)
            outputs = (1 - holds_last) * (chunks + kept)
            grads_sent = (1 - holds_first) * minimum(k, 1)
        else:
            outputs = (v - holds_last) * m
            grads_sent = k - holds_first * done_bottom
        grad_chunks = minimum(v, ceil_div(k, p))
        loss = holds_last * where((k // p) % v == 0, 1, 0)
        one = (m - 1, 1, holds_first, holds_last, 0, 0, where(m > 1, 1, 0), holds_last)
        out.append(
            Backward(
                *(
                    where(piped, a, b)
                    for a, b in zip((k, chunks, first, head, outputs, grads_sent, grad_chunks, loss), one)
                )
            )
        )
    return tuple(out)


_cached = lru_cache(maxsize=4096)(_backwards)


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
    fwd_chunk = lambda step: (step // per_round) % v
    bwd_chunk = lambda step: v - 1 - ((step - warm) // per_round) % v
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
