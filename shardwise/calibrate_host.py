"""The engines' host overhead (GPU.host_us, estimate/host.py), measured by `shardwise calibrate`.

Each engine (dp, zero1, zero2, zero3, tp, tp-sp, pp) trains a few steps of the model at a probe size
(PROBE_SEQ tokens per micro-batch: FLOPs and message bytes next to nothing) with the run tier's
own Engine, at three points: (1 block per stage, m0 micro-batches), (1 + EXTRA blocks, m0),
(1 block, 3 * m0), m0 = pp (a pipeline needs a micro-batch per stage). What the estimate already
predicts for each point (FLOPs, every collective at the fitted link, the bubble; no host time)
is taken out; the rest is solved exactly for the three terms of estimate/host.py (ZeRO-1, DDP's
blocks with ZeroRedundancyOptimizer, for its step term alone):

    rest = (1 + bubble) * (m * blocks * block + m * microbatch) + step

so the estimate with these terms reproduces the probe points, and at a plan's real size it
adds FLOPs and message bytes by its own formulas. A term that the noise makes negative is 0.
The probe plans use every rank (probe_plans).
"""
from __future__ import annotations

import dataclasses

from shardwise.spec.hardware import HOST_TERMS

PROBE_SEQ = 8
EXTRA = {"pp": 4}  # blocks per stage added at the second point (default 8: a pipeline doubles each)
EXTRA_DEFAULT = 8
STEPS, WARMUP = 12, 3


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


def probe_points(fields: dict) -> list[tuple[int, int]]:
    """(blocks per stage, micro-batches) of the three probe points."""
    m0 = fields.get("pp", 1)
    extra = EXTRA_DEFAULT if m0 == 1 else EXTRA["pp"]
    return [(1, m0), (1 + extra, m0), (1, 3 * m0)]


def solve_terms(points: list[tuple[int, int, float, float]]) -> dict[str, float]:
    """points: (blocks per stage, micro-batches, bubble over ideal, rest seconds) x 3 ->
    {block, microbatch, step} in microseconds, each >= 0 (the 3x3 system solved exactly)."""
    import numpy as np

    rows = [((1 + b) * m * k, (1 + b) * m, 1.0) for k, m, b, _ in points]
    terms = np.linalg.solve(np.array(rows), np.array([r for *_, r in points]))
    return {t: max(0.0, float(v)) * 1e6 for t, v in zip(HOST_TERMS, terms)}


def solve_step(points: list[tuple[int, int, float, float]], known: dict[str, float]) -> dict[str, float]:
    """The step term alone, with block and microbatch known (us): the mean over the points of
    rest - (1 + bubble) * (m * blocks * block + m * microbatch), >= 0."""
    b, mb = known["block"] * 1e-6, known["microbatch"] * 1e-6
    step = sum(r - (1 + bub) * (m * k * b + m * mb) for k, m, bub, r in points) / len(points)
    return {"block": known["block"], "microbatch": known["microbatch"], "step": max(0.0, step) * 1e6}


def _step_seconds(cases: list, device, steps: int, warmup: int) -> list[float]:
    """Median seconds of a training step of the Engine of each (ModelSpec, Plan), every rank
    together, the slowest rank's; the cases take turns step by step (calibrate._timed_together)."""
    import torch

    from shardwise.calibrate import _timed_together
    from shardwise.run.engine import Engine

    fns = []
    for spec, plan in cases:
        eng = Engine(spec, plan, device=device, seed=0, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, spec.vocab, (plan.gbs // eng.plan.dp, plan.seq + 1), generator=g).to(device)
        fns.append(lambda eng=eng, tokens=tokens: eng.train_step(tokens))
    return _timed_together(fns, device, steps, warmup)


def measure(spec, precision: str, cluster, efficiency: float, device, n: int,
            engines: tuple[str, ...] | None = None, steps: int = STEPS, warmup: int = WARMUP) -> tuple[dict, list[str]]:
    """({engine: {term: us}}, notes) on this rank's group of n ranks (every rank calls it);
    `engines`: only these (default all that n ranks can show); each point timed over `steps`
    steps after `warmup`."""
    from shardwise.errors import ShardwiseError
    from shardwise.estimate import estimate
    from shardwise.estimate.pipeline import bubble_over_ideal
    from shardwise.estimate.time import bubble_speedup
    from shardwise.spec.plan import Plan

    out, notes = {}, []
    for engine, candidates in probe_plans(n, spec).items():
        if engines is not None and engine not in engines:
            continue
        refused = ""
        for fields in candidates:
            pp = fields.get("pp", 1)
            # DDP + TP cannot hold tied embeddings; tying moves no block's host time: untie them
            untie = spec.tied_embeddings and fields.get("tp", 1) > 1 and fields["dp"] > 1
            points, cases = probe_points(fields), []
            try:
                for blocks, m in points:
                    local = dataclasses.replace(spec, layers=blocks * pp, published_params=0,
                                                tied_embeddings=spec.tied_embeddings and not untie)
                    plan = Plan(**fields, mbs=1, seq=PROBE_SEQ, gbs=fields["dp"] * m,
                                precision=precision).resolve(local, n)
                    cases.append((local, plan))
                seen = _step_seconds(cases, device, steps, warmup)  # every rank refuses alike, before any collective
            except ShardwiseError as e:  # the run tier refuses this probe for this model: the next one
                refused = str(e)
                continue
            pts = []
            for (blocks, m), (local, plan), t in zip(points, cases, seen):
                predicted = estimate(local, cluster, plan, "torch", efficiency=efficiency).time.step_s
                bub = bubble_over_ideal(pp, m, 1, plan.schedule) / bubble_speedup(cluster.gpu, pp) if pp > 1 else 0.0
                pts.append((blocks, m, bub, t - predicted))
            # ZeRO-1 is DDP's blocks with another optimizer: only its step term is its own
            out[engine] = solve_step(pts, out["dp"]) if engine == "zero1" and "dp" in out else solve_terms(pts)
            break
        else:
            notes.append(f"{engine}: not measured ({refused})")
    return out, notes
