"""How long one plain `estimate()` takes (memory + every collective + step time of one plan).

Run: python benchmarks/estimate_speed.py [--rounds 15] [--per-round 0.2]
Target (issue 2): one plan well under a millisecond.

Figures are CPU seconds of this process (time.process_time: what one core spends on it, whatever
else the machine runs), the median over rounds, each round estimating every case as often as fits
in --per-round seconds. "warm": the model's parameter sums, inventories and partitions are cached
(every estimate after the first of a model, as in a sweep of plans or clusters); "cold": the
first estimate of a model, its caches emptied and the ModelSpec built afresh.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _caches import clear_estimate_caches, machine

from shardwise import Plan, estimate, make_cluster, preset

CASES = [  # (model, gpu, gpus, plan)
    ("llama-2-70b", "h100-80gb", 64, Plan(tp=8, pp=2, zero=1, mbs=1, gbs=512, seq=4096)),
    ("llama-3.1-8b", "a100-80gb", 8, Plan(zero=3, mbs=2, gbs=64, seq=8192, recompute="full")),
    (
        "gpt-3-175b",
        "a100-80gb",
        1024,
        Plan(tp=8, pp=16, mbs=1, gbs=1536, seq=2048, schedule="interleaved", vpp=2, sp=True, recompute="selective"),
    ),
    ("llama-3.1-405b", "h100-80gb", 16384, Plan(tp=8, pp=2, zero=1, mbs=1, gbs=2048, seq=8192)),
    ("mixtral-8x7b", "h100-80gb", 64, Plan(tp=4, zero=2, mbs=1, gbs=256, seq=4096, recompute="selective")),
    ("gpt2-124m", "rtx-4090", 4, Plan(zero=0, mbs=8, gbs=64, seq=1024, precision="fp32", optimizer="sgd")),
]


def warm(model, cluster, plan, seconds: float) -> float:
    """CPU seconds per estimate over about `seconds` of repeated calls."""
    estimate(model, cluster, plan)
    n, t0 = 0, time.process_time()
    while True:
        for _ in range(20):
            estimate(model, cluster, plan)
        n += 20
        dt = time.process_time() - t0
        if dt >= seconds:
            return dt / n


def cold(name, cluster, plan) -> float:
    clear_estimate_caches()
    model = preset(name)  # a fresh ModelSpec: its cached parameter counts start empty too
    t0 = time.process_time()
    estimate(model, cluster, plan)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=float, default=0.2, help="CPU seconds per case per round")
    a = ap.parse_args()
    cases = [(name, preset(name), make_cluster(g, n), p) for name, g, n, p in CASES]
    print(f"estimate(): CPU time per plan, median of {a.rounds} rounds ({machine()})")
    medians = []
    for name, model, cluster, plan in cases:
        w = statistics.median(warm(model, cluster, plan, a.per_round) for _ in range(a.rounds))
        c = statistics.median(cold(name, cluster, plan) for _ in range(a.rounds))
        medians.append(w)
        print(
            f"  {name:15s} {plan.resolve(model, cluster.gpus).short():52s} warm {w * 1e6:6.1f} µs"
            f"   cold {c * 1e3:6.2f} ms"
        )
    mean = sum(medians) / len(medians)
    print(f"mean over the cases, warm: {mean * 1e6:.1f} µs per plan = {1 / mean:,.0f} estimates/s on one core")


if __name__ == "__main__":
    main()
