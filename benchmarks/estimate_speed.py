"""How many single-plan estimates per second (the plain, one-plan-at-a-time path).

Run: python benchmarks/estimate_speed.py [--seconds 3]
Target (issue 2): one plan well under a millisecond, i.e. well over 1,000 estimates/s.
"""
from __future__ import annotations

import argparse
import time

from shardwise import Plan, estimate, make_cluster, preset

CASES = [  # (model, gpu, gpus, plan)
    ("llama-2-70b", "h100-80gb", 64, Plan(tp=8, pp=2, zero=1, mbs=1, gbs=512, seq=4096)),
    ("llama-3.1-8b", "a100-80gb", 8, Plan(zero=3, mbs=2, gbs=64, seq=8192, recompute="full")),
    ("gpt-3-175b", "a100-80gb", 1024, Plan(tp=8, pp=16, mbs=1, gbs=1536, seq=2048, schedule="interleaved",
                                           vpp=2, sp=True, recompute="selective")),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    cases = [(preset(m), make_cluster(g, n), p) for m, g, n, p in CASES]
    for m, c, p in cases:  # warm caches (catalog, per-model inventories) outside the timing
        estimate(m, c, p)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        for m, c, p in cases:
            estimate(m, c, p)
        n += len(cases)
    dt = time.perf_counter() - t0
    print(f"{n / dt:,.0f} estimates/s  ({dt / n * 1e6:,.1f} µs per plan, {n} plans in {dt:.2f} s)")


if __name__ == "__main__":
    main()
