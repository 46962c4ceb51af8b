"""How long `shardwise trace` takes, and how much memory, for whole models at full world size.

    .venv/bin/python benchmarks/trace_speed.py                 # Llama-3.1-70B, 512 ranks: tp8 pp4 dp16 ZeRO-3
    .venv/bin/python benchmarks/trace_speed.py --case 405b     # Llama-3.1-405B, 16,384 ranks: tp8 pp16 dp128 ZeRO-3

Prints per role the seconds its child took, the whole trace's wall and CPU seconds, and the peak
resident memory of the parent and of the largest child (ru_maxrss). The micro-batch count is a
flag: the trace runs every micro-batch of the step, so its cost grows with it (and with the layers
per stage); the default is 2 per pipeline stage (m = 2 * pp), enough for 1F1B's steady state.
Targets (issue 19): 70B on 512 ranks under 60 s and 8 GB; 405B on 16,384 ranks under 3 minutes.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from shardwise.spec.plan import Plan
from shardwise.spec.presets import load_model
from shardwise.trace import tracer

CASES = {
    "70b": ("llama-3.1-70b", 512, dict(tp=8, pp=4, dp=16, zero=3, sp=True)),
    "405b": ("llama-3.1-405b", 16384, dict(tp=8, pp=16, dp=128, zero=3, sp=True)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=tuple(CASES), default="70b")
    ap.add_argument("--per-stage", type=int, default=2, help="micro-batches per pipeline stage (m = this * pp)")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=0, help="fewer layers (0: the whole model)")
    a = ap.parse_args()
    name, gpus, kw = CASES[a.case]
    spec = load_model(name)
    if a.layers:
        spec = spec.scaled(layers=a.layers)
    plan = Plan(seq=a.seq, mbs=1, gbs=kw["dp"] * kw["pp"] * a.per_stage, **kw).resolve(spec, gpus)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"case: {spec.name} ({spec.params:,} parameters, {spec.layers} layers), {plan.short()}, seq {plan.seq}")
    wall, cpu = time.perf_counter(), time.process_time()
    traces = tracer.trace(spec, plan, flops=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    for t in traces:
        peak = t["measurement"]["memory"]["detail"]["peak"]
        print(f"  {t['role']:<18} rank {t['rank']:>6}: {t['seconds']:7.1f} s, traced peak {peak / 2**30:7.2f} GiB")
    print(
        f"total: {wall:.1f} s wall ({cpu + child.ru_utime + child.ru_stime:.1f} s CPU with the children), "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB parent, "
        f"{child.ru_maxrss / 2**20:.2f} GiB largest child"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
