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
- interleaved-zb, zbv, dualpipev split each backward into the backward for the inputs (I, what the
  previous stage waits for) and the backward for the weights (W, which waits for nobody and fills
  the bubble): Qi et al. 2024, "Zero Bubble (Almost) Pipeline Parallelism" (ICLR 2024).
  interleaved-zb is their ZB-H1 (§2.1) over torch's interleaved order (ScheduleInterleavedZeroBubble);
  zbv their ZB-V (§6: two stages per rank in a V, rank r holding stages r and 2p-1-r;
  ScheduleZBVZeroBubble); dualpipev DeepSeek's DualPipe cut in half onto the same V
  (ScheduleDualPipeV; DeepSeek-V3 technical report §3.2.1, Table 2).

Time unit of the timeline: one chunk's forward takes F = 1 slot and its backward B = 2 (a
backward is two matmuls per forward matmul), split into I = 1 and W = 1; a chunk is 1/v of a
rank's layers. Communication takes no time here (time.py adds it).

Numeric arguments (pp, m, vpp) may be numpy arrays in bubble_fraction and inflight_microbatches;
the schedule is a scalar string. timeline() is for one scalar plan (it draws a chart).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from shardwise.errors import ShardwiseError
from shardwise.estimate._num import _is_array, ceil_div, maximum, memo, minimum, where
from shardwise.spec.plan import LOOPED, SCHEDULES, SPLIT_BACKWARD, V_SHAPE, stage_blocks

F_SLOTS, B_SLOTS = 1, 2
SLOTS = {"F": F_SLOTS, "B": B_SLOTS, "I": B_SLOTS // 2, "W": B_SLOTS // 2}  # I: inputs' backward, W: weights'


def _check(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ShardwiseError(f"unknown pipeline schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def chunks_per_rank(vpp, schedule: str):
    """Virtual stages per rank: vpp for the looped schedules, 2 for the V, 1 otherwise (vpp is
    ignored there)."""
    if schedule in V_SHAPE:
        return 2
    return vpp if schedule in LOOPED else 1


def global_stage(pp: int, rank: int, chunk: int, schedule: str) -> int:
    """The global stage of a rank's chunk: chunk*p + rank (looped), or the V's r and 2p-1-r
    (torch's generate_stage_to_rank_mapping(style="v"))."""
    if schedule in V_SHAPE:
        return rank if chunk == 0 else 2 * pp - 1 - rank
    return chunk * pp + rank


def vee(plan) -> bool:
    """The plan's schedule places its stages in a V (zbv, dualpipev)."""
    return plan.schedule in V_SHAPE


def holds_ends(pp, last, schedule: str):
    """(1 if the rank holds global stage 0, 1 if it holds the last global stage) of the first
    (last=False) or last (last=True) pipeline rank. Looped: rank 0 the first, rank p-1 the last;
    the V puts both on rank 0 and neither on rank p-1. Array-safe."""
    piped = where(pp > 1, 1, 0)
    pick = (lambda a, b: a if last else b) if last is True or last is False else (lambda a, b: where(last, a, b))
    if schedule in V_SHAPE:  # a plain bool keeps scalars scalar (the search's arrays stay small)
        return pick(1 - piped, 1), pick(1 - piped, 1)
    return pick(1 - piped, 1), pick(1, 1 - piped)


def chunk_blocks(model, plan, last):
    """Transformer blocks of one virtual stage of the first (last=False) or last pipeline rank,
    the plan's split (spec.plan.stage_blocks: the last stage may hold fewer; uneven splits are
    gpipe's and 1f1b's, one virtual stage per rank). Array-safe, `last` too."""
    n, n_last = stage_blocks(plan, model.layers)
    return where(last, n_last, n)


def rank_blocks(model, plan, last):
    """Transformer blocks the first (last=False) or last pipeline rank holds."""
    return chunk_blocks(model, plan, last) * chunks_per_rank(plan.vpp, plan.schedule)


def bubble_slots(pp, m, vpp=1, schedule: str = "1f1b"):
    """(idle, busy) slots per rank in chunk-time units, F = 1, I = W = 1 (B = I + W = 2). Each
    rank has v*m chunks of 3 slots (v = 2 for the V); timeline() reproduces every one exactly.
    gpipe, 1f1b, interleaved: the fill and drain cost (p-1) chunk-times of F and of B on every
      rank, (p-1)(F+B) = 3(p-1) (Narayanan et al. 2021, §2.2);
    interleaved-zb: ZB-H1's (p-1)(T_F + T_B - T_W) (Qi et al. 2024, §2.1, T_B their inputs'
      backward) = p-1: the W's fill the rest of 1F1B's bubble, a third of it;
    zbv: ZB-V (§6) is "zero bubble" in its steady state when T_F = T_B = T_W; torch's order still
      waits p-1 forwards for the V to fill (the last rank's first forward), and with fewer than
      2p-1 micro-batches (torch plans max(2p-1, m) and drops the rest) the V never fills:
      max(p-1, 4p-2m-2);
    dualpipev: p-1 as torch's ScheduleDualPipeV runs on one rank's compute (an overlapped forward
      + backward pair takes F + B). DeepSeek's (PP/2-1)(F&B + B - 3W) (DeepSeek-V3 report,
      Table 2; DualPipe's README for DualPipeV, PP = 2p stages, B the whole backward) gives
      2(p-1) at F&B = F + B: it charges the overlapped pair the whole F&B where torch's order has
      its first forwards of the V run ahead of the pair. Array-safe."""
    _check(schedule)
    v = chunks_per_rank(vpp, schedule)
    busy = (F_SLOTS + B_SLOTS) * v * m
    if schedule == "interleaved-zb":
        idle = (pp - 1) * (F_SLOTS + SLOTS["I"] - SLOTS["W"])
    elif schedule == "zbv":
        idle = maximum(pp - 1, 4 * pp - 2 * m - 2) * F_SLOTS
    elif schedule == "dualpipev":
        idle = (pp - 1) * F_SLOTS
    else:
        idle = (pp - 1) * (F_SLOTS + B_SLOTS)
    return idle, busy


def bubble_fraction(pp, m, vpp=1, schedule: str = "1f1b"):
    """Fraction of a step each rank sits idle, idle / (idle + busy) of bubble_slots: for gpipe,
    1f1b, interleaved (p-1) / (v*m + p-1); with v = 1 (p-1)/(m+p-1); as bubble time over ideal
    time (p-1)/(v*m), Narayanan et al.'s "(p-1)/m, divided by v for interleaved"."""
    idle, busy = bubble_slots(pp, m, vpp, schedule)
    return idle / (busy + idle)


def bubble_over_ideal(pp, m, vpp=1, schedule: str = "1f1b"):
    """Bubble time / ideal (bubble-free) time: (p-1)/(v*m) for gpipe, 1f1b, interleaved
    (Narayanan et al. 2021, §2.2); (p-1)/(3*v*m) for interleaved-zb (Qi et al.'s ZB-H1, a third
    of 1F1B's); (p-1)/(6m) for zbv (m >= 2p-1) and dualpipev."""
    idle, busy = bubble_slots(pp, m, vpp, schedule)
    return idle / busy


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
    interleaved-zb, zbv, dualpipev: a chunk's activations live from its F to its W (the weights'
      backward needs the layers' inputs and output gradients), counted along torch's order: zbv
      2p chunks = p micro-batches, 1F1B's (Qi et al. 2024, §6); dualpipev 2p+1 chunks, DeepSeek's
      "PP+1" (DeepSeek-V3 report, Table 2, PP = 2p stages).
    """
    _check(schedule)
    if schedule == "gpipe":
        return m + 0 * pp
    if schedule == "1f1b":
        return minimum(pp - stage, m)
    if schedule in SPLIT_BACKWARD:  # from torch's order (held_chunks); scalars only
        return max(_held_chunks(int(pp), int(m), int(vpp), schedule, int(stage))) / chunks_per_rank(vpp, schedule)
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


@lru_cache(maxsize=4096)
def _held_chunks(pp, m, v, schedule, rank) -> tuple[int, ...]:
    """Chunks alive (forward done, weights' backward not yet) after each op of the rank's order."""
    live, out = 0, []
    for kind, _, _ in rank_order(pp, m, v, schedule, rank):
        live += 1 if kind == "F" else -1 if kind in "BW" else 0
        out.append(live)
    return tuple(out)


def _split_backwards(pp, m, v, schedule, last):
    """backwards() of the schedules with a weights' backward (W), walked along torch's order: a
    chunk stays alive from its F to its W (or whole B); the runtime these schedules share
    (_PipelineScheduleRuntime) keeps every send's work until the step ends. The moments returned:
    the first and the last op at the most chunks alive, the first op after which every chunk of the
    rank has gradients, and the op with the most chunks alive from then on."""
    p = pp
    r = p - 1 if last else 0
    stages = [global_stage(p, r, c, schedule) for c in range(v)]
    top = p * v - 1
    live = [0] * v  # chunks alive per virtual stage
    ends = [c for c in range(v) if stages[c] == 0], [c for c in range(v) if stages[c] == top]
    sent_out = sent_grad = 0
    graded: set = set()
    moments = []
    for kind, _, c in rank_order(p, m, v, schedule, r):
        s = stages[c]
        if kind == "F":
            live[c] += 1
            sent_out += s != top
            continue
        if kind in "BI":
            first, head = (sum(live[d] for d in e) for e in ends)
            moments.append((len(moments), sum(live), first, head, sent_out, sent_grad, len(graded), int(s == top)))
            sent_grad += s != 0
        if kind in "BW":
            live[c] -= 1
            graded.add(c)
    most = max(b[1] for b in moments)
    at_most = [b for b in moments if b[1] == most]
    full = [b for b in moments if b[6] >= v] or moments[-1:]
    picks = (at_most[0], at_most[-1], full[0], max(full, key=lambda b: (b[1], b[0])))
    return tuple(Backward(*b) for b in picks)


STEADY = 4  # rounds of p micro-batches after which the split schedules' orders only repeat


def _backwards(pp, m, vpp, schedule, last):
    """backwards() of scalars."""
    _check(schedule)
    if schedule in SPLIT_BACKWARD and pp > 1:
        v = chunks_per_rank(vpp, schedule)
        big = STEADY * pp
        if m <= big + pp:
            return _split_backwards(pp, m, v, schedule, last)
        # past the steady state one more round of p micro-batches adds the same to every count
        # (test_pipeline holds this against the walk): walk two sizes, extend the difference
        a, b = _split_backwards(pp, big, v, schedule, last), _split_backwards(pp, big + pp, v, schedule, last)
        k, rest = divmod(m - big, pp)
        if rest:  # the last partial round: walk from the size just below m instead
            a = _split_backwards(pp, big + rest, v, schedule, last)
            b = _split_backwards(pp, big + rest + pp, v, schedule, last)
        return tuple(Backward(*(x + (y - x) * k for x, y in zip(ba, bb))) for ba, bb in zip(a, b))
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
    kind: str  # "F" | "B" | "I" | "W"
    microbatch: int
    chunk: int  # virtual stage index on this rank (0 with one); its global stage: global_stage()


def rank_order(pp: int, m: int, vpp: int = 1, schedule: str = "1f1b", rank: int = 0) -> list[tuple[str, int, int]]:
    """The (kind, microbatch, chunk) sequence one rank executes, in torch's order. kind: F, B (the
    whole backward), I (the inputs' backward), W (the weights' backward)."""
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
    if schedule == "zbv":
        return _zbv_order(pp, m, rank)
    if schedule == "dualpipev":
        return _dualpipev_order(pp, m, rank)
    return _looped_order(pp, m, vpp, rank, zero_bubble=schedule == "interleaved-zb")


def _looped_order(pp, m, v, rank, zero_bubble):
    """ScheduleInterleaved1F1B / ScheduleInterleavedZeroBubble._calculate_single_rank_operations
    (torch's _get_warmup_ops and _get_1f1b_rank_ops), without their padding: the zero-bubble one
    warms up one forward per hop (not two), runs I for B, and from its (rank)-th 1F1B step on
    follows each I with the W of its oldest backward not yet weighted; the rest at the end."""
    per_round = m // max(1, m // pp)
    total = v * m
    warm = min((v - 1) * per_round + (1 if zero_bubble else 2) * (pp - 1 - rank), total)
    fwd_chunk = lambda step: (step // per_round) % v
    bwd_chunk = lambda step: v - 1 - ((step - warm) // per_round) % v
    count: dict[tuple[str, int], int] = {}
    ops: list[tuple[str, int, int]] = []
    back = "I" if zero_bubble else "B"
    backs: list[int] = []  # the chunk of each backward so far, for its W
    weighted = [0]  # W's so far

    def op(kind, c):
        i = count.get((kind, c), 0)
        count[(kind, c)] = i + 1
        ops.append((kind, i, c))

    def backward(step):
        c = bwd_chunk(step)
        op(back, c)
        backs.append(c)
        if zero_bubble and step - warm >= rank:
            op("W", backs[weighted[0]])
            weighted[0] += 1

    for step in range(warm):
        op("F", fwd_chunk(step))
    for step in range(warm, total):
        op("F", fwd_chunk(step))
        backward(step)
    for step in range(total, total + warm):
        backward(step)
    while zero_bubble and len(backs) > weighted[0]:
        op("W", backs[weighted[0]])
        weighted[0] += 1
    return ops


def _zbv_order(pp, m, rank):
    """ScheduleZBVZeroBubble._calculate_single_rank_operations: chunk 0 is stage r, chunk 1 stage
    2p-1-r; warm-up 2(p-r)-1 forwards of chunk 0, r pairs F1 F0, p-r triples F1 I1 W1, then
    F0 I0 W0 F1 I1 W1 while forwards remain, then the I's and the W's left; its micro-batches
    beyond m (it plans max(2p-1, m)) are dropped."""
    n = max(2 * pp - 1, m)
    ops: list[tuple[str, int, int]] = []
    cnt = {("F", 0): 0, ("F", 1): 0, ("I", 0): 0, ("I", 1): 0, ("W", 0): 0, ("W", 1): 0}

    def op(kind, c):
        ops.append((kind, cnt[(kind, c)], c))
        cnt[(kind, c)] += 1

    for _ in range(2 * (pp - rank) - 1):
        op("F", 0)
    for _ in range(rank):
        op("F", 1)
        op("F", 0)
    for _ in range(pp - rank):
        op("F", 1)
        op("I", 1)
        op("W", 1)
    while cnt[("F", 1)] < cnt[("F", 0)] or cnt[("F", 0)] < n:
        if cnt[("F", 0)] < n:
            op("F", 0)
        op("I", 0)
        op("W", 0)
        op("F", 1)
        op("I", 1)
        op("W", 1)
    for _ in range(rank):
        op("I", 0)
        op("I", 1)
    for _ in range(pp - rank):
        op("I", 0)
        op("W", 0)
    while cnt[("W", 1)] < cnt[("I", 1)]:
        op("W", 1)
    while cnt[("W", 0)] < cnt[("I", 0)]:
        op("W", 0)
    return [o for o in ops if o[1] < m]


def _dualpipev_order(pp, m, rank):
    """ScheduleDualPipeV._calculate_single_rank_operations, its overlapped forward + backward
    pairs as the forward then the backward (one rank computes them one after the other):
    1: 2(p-r-1) F0; 2: r+1 pairs F0 F1; 3: p-r-1 triples I1 W(queued) F1; 4: m-2p+r+1 rounds
    F0+B1, F1+B0; 5: p-r-1 rounds B1, F1+B0; 6: r+1 pairs B1 B0, from half way on as I's;
    7: p-r-1 pairs W(queued) B0-or-I0; 8: the queued W's."""
    ops: list[tuple[str, int, int]] = []
    cnt: dict[tuple[str, int], int] = {}
    queue: list[tuple[int, int]] = []  # (chunk, micro-batch) of I's waiting for their W

    def op(kind, c):
        key = ("I" if kind == "B" else kind, c)
        i = cnt.get(key, 0)
        cnt[key] = i + 1
        ops.append((kind, i, c))
        if kind == "I":
            queue.append((c, i))

    def weight():
        if queue:
            c, i = queue.pop(0)
            ops.append(("W", i, c))

    for _ in range(2 * (pp - rank - 1)):
        op("F", 0)
    for _ in range(rank + 1):
        op("F", 0)
        op("F", 1)
    for _ in range(pp - rank - 1):
        op("I", 1)
        weight()
        op("F", 1)
    for _ in range(m - 2 * pp + rank + 1):
        op("F", 0)
        op("B", 1)
        op("F", 1)
        op("B", 0)
    for _ in range(pp - rank - 1):
        op("B", 1)
        op("F", 1)
        op("B", 0)
    split = False
    for i in range(rank + 1):
        if i == (rank + 1) // 2 and rank % 2 == 1:
            split = True
        op("I" if split else "B", 1)
        if i == (rank + 1) // 2 and rank % 2 == 0:
            split = True
        op("I" if split else "B", 0)
    for _ in range(pp - rank - 1):
        weight()
        op("I" if split else "B", 0)
    for _ in range(rank + 1):
        weight()
    return ops


def timeline(pp: int, m: int, vpp: int = 1, schedule: str = "1f1b") -> list[Slot]:
    """Every forward and backward of one step on every rank, placed as early as its data allows
    (F of stage s after F of stage s-1; B or I of stage s after B or I of stage s+1 and its own F;
    W after its own I), in each rank's torch order. Idle time per rank / makespan =
    bubble_fraction(pp, m, vpp, schedule)."""
    v = chunks_per_rank(vpp, schedule)
    if schedule in LOOPED and m % pp:
        raise ShardwiseError(f"{schedule} needs the micro-batch count ({m}) to be a multiple of pp={pp}")
    if schedule == "dualpipev" and m < 2 * pp:
        raise ShardwiseError(f"dualpipev needs at least 2*pp = {2 * pp} micro-batches, got {m}")
    orders = [rank_order(pp, m, v, schedule, r) for r in range(pp)]
    last = pp * v - 1
    done: dict[tuple[str, int, int], int] = {}  # (F | G (input gradient) | W, microbatch, stage) -> end
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
            s = global_stage(pp, r, c, schedule)
            if kind == "F":
                deps = [("F", mb, s - 1)] if s > 0 else []
            elif kind == "W":
                deps = [("G", mb, s)]
            else:
                deps = [("F", mb, s)] + ([("G", mb, s + 1)] if s < last else [])
            if any(d not in done for d in deps):
                continue
            start = max([free[r]] + [done[d] for d in deps])
            end = start + SLOTS[kind]
            done[("F" if kind == "F" else "W" if kind == "W" else "G", mb, s)] = end
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
