"""The engines' host overhead (GPU.host_us, estimate/host.py), measured by `shardwise calibrate`.

Each engine (dp, zero1, zero2, zero3, tp, tp-sp, pp) trains a few steps of the model at a probe size
(PROBE_SEQ tokens per micro-batch: FLOPs and message bytes next to nothing) with the run tier's
own Engine, at three points: (1 block per stage, m0 micro-batches), (1 + EXTRA blocks, m0),
(1 block, 3 * m0), m0 = pp (a pipeline needs a micro-batch per stage). What the estimate already
predicts for each point (FLOPs, every collective at the fitted link, the bubble; no host time)
is taken out; the rest is solved for the three terms of estimate/host.py (ZeRO-1, DDP's
blocks with ZeroRedundancyOptimizer, for its step term alone, timed step by step beside DDP):

    rest = (1 + bubble) * (m * blocks * block + m * microbatch) + blocks * block_step + step

with block_step = 0, so the estimate with these terms reproduces the probe points, and at a
plan's real size it adds FLOPs and message bytes by its own formulas. Where a term comes out
negative, the non-negative terms that fit the points best are taken (solve_terms). The probe
plans use every rank (probe_plans).

Three points cannot tell a block's work per micro-batch from its share of the once-per-step work
(the optimizer's and the clipping's loops over its parameters): the block term holds both, and a
plan with more micro-batches than the probe is charged the second once per micro-batch. On one
rank a fourth point, (1 + EXTRA blocks, 3 * m0), separates them (block_step); on several ranks the
three points stay, their per-micro-batch charge covering a real cost of several ranks that an
8-token probe cannot see (docs/calibration.md, "Why the models are as they are").
"""

from __future__ import annotations

import dataclasses

from shardwise.check import timing
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.estimate.pipeline import bubble_over_ideal
from shardwise.estimate.time import exposed_bubble
from shardwise.run.engine import Engine
from shardwise.spec.hardware import HOST_TERMS
from shardwise.spec.plan import Plan

PROBE_SEQ = 8
EXTRA = {"pp": 4}  # blocks per stage added at the second point (default 8: a pipeline doubles each)
EXTRA_DEFAULT = 8
# 16 timed steps of each point, in four passes over the engines: a slow spell of a shared machine
# that lands on one pass holds a quarter of an engine's samples and barely moves their median
# (with two passes of 8 it held half of them)
STEPS, WARMUP, PASSES = 4, 3, 4


def probe_plans(n: int, spec) -> dict[str, list[dict]]:
    """engine -> the Plan fields its probe may use on n ranks, in order of preference (tp 2
    beside dp first, as plans mostly use it; tp = n alone if the run tier refuses that for the
    model); engines n ranks cannot show at all are left out."""
    out = {"dp": [{"dp": n}]}
    if n > 1:
        out |= {f"zero{z}": [{"dp": n, "zero": z}] for z in (1, 2, 3)}
    tps = [t for t in dict.fromkeys((2, n)) if t > 1 and n % t == 0 and spec.heads % t == 0 and spec.kv_heads % t == 0]
    if tps:
        out["tp"] = [{"dp": n // t, "tp": t} for t in tps]
        out["tp-sp"] = [{"dp": n // t, "tp": t, "sp": True} for t in tps]
    if n % 2 == 0:
        out["pp"] = [{"dp": n // 2, "pp": 2}]
    return out


def probe_points(fields: dict, one_rank: bool = False) -> list[tuple[int, int]]:
    """(blocks per stage, micro-batches) of the probe points: three, and on one rank the fourth
    corner (module docstring)."""
    m0 = fields.get("pp", 1)
    extra = EXTRA_DEFAULT if m0 == 1 else EXTRA["pp"]
    return [(1, m0), (1 + extra, m0), (1, 3 * m0)] + ([(1 + extra, 3 * m0)] if one_rank else [])


def solve_terms(points: list[tuple[int, int, float, float]]) -> dict[str, float]:
    """points: (blocks per stage, micro-batches, bubble over ideal, rest seconds) x 3 or 4 ->
    {block, microbatch, step} in microseconds, and block_step from four points: the system solved
    exactly where every term comes out >= 0, else the non-negative terms that fit the points best
    (least squares). Zeroing a negative term and keeping the others as solved beside it would
    miss every point by it: a micro-batch term of -4 ms (ZeRO-2 here: its blocks' once-per-step
    work makes the block term larger than a micro-batch's share) set to 0 added 4 ms per
    micro-batch to every plan's prediction."""
    import itertools

    import numpy as np

    # one column per HOST_TERMS entry, in its order; three points leave block_step's out
    full = np.array([((1 + b) * m * k, (1 + b) * m, k, 1.0) for k, m, b, _ in points])
    cols = [i for i, t in enumerate(HOST_TERMS) if len(points) == 4 or t != "block_step"]
    names, a = [HOST_TERMS[i] for i in cols], full[:, cols]
    y = np.array([r for *_, r in points])
    best = (float(y @ y), np.zeros(len(names)))  # every term 0
    for keep in itertools.product((True, False), repeat=len(names)):  # each set of terms left free
        free = [i for i, f in enumerate(keep) if f]
        if not free:
            continue
        x = np.zeros(len(names))
        x[free] = np.linalg.lstsq(a[:, free], y, rcond=None)[0]
        miss = float((a @ x - y) @ (a @ x - y))
        if x.min() >= 0 and miss < best[0] - 1e-18:
            best = (miss, x)
    return {t: float(v) * 1e6 for t, v in zip(names, best[1])}


def solve_step(points: list[tuple[int, int, float, float]], known: dict[str, float]) -> dict[str, float]:
    """The step term alone, with block and microbatch known (us): the mean over the points of
    rest - (1 + bubble) * (m * blocks * block + m * microbatch), >= 0."""
    b, mb = known["block"] * 1e-6, known["microbatch"] * 1e-6
    step = sum(r - (1 + bub) * (m * k * b + m * mb) for k, m, bub, r in points) / len(points)
    return {"block": known["block"], "microbatch": known["microbatch"], "step": max(0.0, step) * 1e6}


def _step_fns(cases: list, device) -> list:
    """A training step of the run tier's Engine of each (ModelSpec, Plan), as callables (raises
    ShardwiseError where the run tier refuses the plan: every rank alike, before any collective)."""
    import torch

    fns = []
    for spec, plan in cases:
        eng = Engine(spec, plan, device=device, seed=0, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, spec.vocab, (plan.gbs // eng.plan.dp, plan.seq + 1), generator=g).to(device)
        fns.append(lambda eng=eng, tokens=tokens: eng.train_step(tokens))
    return fns


def measure(
    spec,
    precision: str,
    cluster,
    efficiency: float,
    device,
    n: int,
    engines: tuple[str, ...] | None = None,
    steps: int = STEPS,
    warmup: int = WARMUP,
    passes: int = PASSES,
) -> tuple[dict, list[str]]:
    """({engine: {term: us}}, notes) on this rank's group of n ranks (every rank calls it);
    `engines`: only these (default all that n ranks can show). Every engine's points are timed
    `steps` steps in each of `passes` passes over the engines (after `warmup` steps in the
    first), the median of all: a burst of other work on a shared machine lands in one pass of
    one engine, not in all of an engine's figures."""

    plans = probe_plans(n, spec)
    wanted = [e for e in plans if engines is None or e in engines]
    groups, notes = [], []  # ([(engine, fields, cases)] timed together, points, fns, samples per fn)
    for engine in wanted:
        if engine == "zero1" and "dp" in wanted:
            continue  # timed beside DDP's steps (below)
        refused = ""
        for fields in plans[engine]:
            points = probe_points(fields, one_rank=n == 1)
            try:
                cases = _cases(spec, fields, points, precision, n)
                members = [(engine, fields, cases)]
                if engine == "dp" and "zero1" in wanted:
                    # ZeRO-1's step term is a difference from DDP's steps: timed step by step beside
                    # them, the machine's drift between two engines' turns does not enter it
                    z1 = plans["zero1"][0]
                    members.append(("zero1", z1, _cases(spec, z1, points, precision, n)))
                fns = [f for _, _, c in members for f in _step_fns(c, device)]
            except ShardwiseError as e:  # the run tier refuses this probe for this model: the next one
                refused = str(e)
                continue
            groups.append((members, points, fns, [[] for _ in fns]))
            break
        else:
            notes.append(f"{engine}: not measured ({refused})")
    for k in range(passes):
        for _, _, fns, times in groups:
            for t, x in zip(times, timing.samples_together(fns, device, steps, warmup if k == 0 else 1)):
                t += x
    out = {}
    for members, points, _, times in groups:
        seen = timing.slowest_median(times, device)
        for i, (engine, fields, cases) in enumerate(members):
            pp, pts = fields.get("pp", 1), []
            for (blocks, m), (local, plan), t in zip(points, cases, seen[i * len(points) :]):
                predicted = estimate(local, cluster, plan, "torch", efficiency=efficiency).time.step_s
                bub = exposed_bubble(cluster.gpu, bubble_over_ideal(pp, m, 1, plan.schedule)) if pp > 1 else 0.0
                pts.append((blocks, m, bub, t - predicted))
            # ZeRO-1 is DDP's blocks with another optimizer: only its step term is its own
            out[engine] = solve_step(pts, out["dp"]) if engine == "zero1" and "dp" in out else solve_terms(pts)
    return out, notes


def _cases(spec, fields: dict, points, precision: str, n: int) -> list:
    """(ModelSpec, Plan) of each probe point of one engine's probe plan `fields`."""

    pp = fields.get("pp", 1)
    # DDP + TP cannot hold tied embeddings; tying moves no block's host time: untie them
    untie = spec.tied_embeddings and fields.get("tp", 1) > 1 and fields["dp"] > 1
    cases = []
    for blocks, m in points:
        local = dataclasses.replace(
            spec, layers=blocks * pp, published_params=0, tied_embeddings=spec.tied_embeddings and not untie
        )
        cases.append(
            (local, Plan(**fields, mbs=1, seq=PROBE_SEQ, gbs=fields["dp"] * m, precision=precision).resolve(local, n))
        )
    return cases
