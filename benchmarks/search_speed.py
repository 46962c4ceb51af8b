"""How fast `shardwise plan` searches (issue 3's hot path), on one core.

Run: python benchmarks/search_speed.py [--runs 7]
Targets (issue 3): >= 100,000 plans estimated per second; a full search of Llama-3.1-405B over
16,384 H100s, every dimension open, in under 10 s.

Counts, per case:
  enumerated  plans generated (every legal-or-not combination of the searched fields)
  legal       plans that pass every Plan rule
  estimated   legal plans whose memory is estimated (the rest are dominated: a lighter
              recompute/offload variant of the same plan fits, so they cannot be faster)
  timed       plans that fit: their collectives and step time are estimated
The vectorized pass is the search's work on those plans (rules, memory, collectives, step time);
plans/s divides the enumerated plans by its seconds, estimated plans/s the estimated ones. The
whole search adds the global-batch choice, ranking and the plain `estimate` of the top 10 plans.
Seconds are CPU seconds of this process (time.process_time: what one core spends, whatever else
the machine runs), the median over --runs; wall-clock is printed beside the whole search.
"warm": the estimate tier's per-model caches (parameter sums per dp x tp x pp, partitions,
inventories) already hold this model, as in a sweep over clusters; "cold": emptied first and the
ModelSpec built afresh, as for the first search of a model.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: numpy's elementwise ops are single-threaded anyway
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import statistics
import time

from _caches import clear_estimate_caches, machine

from shardwise import make_cluster, preset
from shardwise.search.core import Options, fitting_space, run_search

CASES = [  # (label, model, gpu, gpus, pinned)
    (
        "issue 3: llama-3.1-405b, 16,384x h100, seq 8192, all open (gbs: the search's default)",
        "llama-3.1-405b",
        "h100-80gb",
        16384,
        {"seq": 8192},
    ),
    ("llama-3.1-70b, 1,024x h100, seq 8192, gbs 2048", "llama-3.1-70b", "h100-80gb", 1024, {"seq": 8192, "gbs": 2048}),
    ("gpt-3-175b, 1,536x a100, gbs 1536 (pp can be 3, 6, 12, ...)", "gpt-3-175b", "a100-80gb", 1536, {"gbs": 1536}),
    ("llama-2-7b, 8x a100, default gbs 2048 (many micro-batch sizes)", "llama-2-7b", "a100-80gb", 8, {}),
]


def bench(name, cluster, fixed, runs: int) -> dict:
    opts = Options()
    model = preset(name)
    run_search(model, cluster, **fixed)  # warm imports, catalog and caches
    space0 = fitting_space(model, cluster, fixed, opts)[0]  # the global batch the search settles on
    out = {"warm": [], "cold": [], "cpu": [], "wall": []}
    for _ in range(runs):
        space = space0.with_gbs(space0.gbs)  # fresh: no grid cached
        t0 = time.process_time()
        _, tally, _ = opts.evaluate(space, cluster)
        out["warm"].append(time.process_time() - t0)

        clear_estimate_caches()
        space = dataclasses.replace(space0, model=preset(name)).with_gbs(space0.gbs)
        t0 = time.process_time()
        opts.evaluate(space, cluster)
        out["cold"].append(time.process_time() - t0)

        run_search(model, cluster, **fixed)  # warm again
        t0, w0 = time.process_time(), time.perf_counter()
        run_search(model, cluster, **fixed)
        out["cpu"].append(time.process_time() - t0)
        out["wall"].append(time.perf_counter() - w0)
    out["tally"] = tally
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    print(f"plan search: CPU seconds, median of {a.runs} runs ({machine()})")
    for label, m, g, n, fixed in CASES:
        r = bench(m, make_cluster(g, n), fixed, a.runs)
        t = r["tally"]
        warm, cold = statistics.median(r["warm"]), statistics.median(r["cold"])
        print(
            f"{label}\n"
            f"  {t.enumerated:,} enumerated, {t.legal:,} legal, {t.estimated:,} estimated, "
            f"{t.timed:,} fit and timed\n"
            f"  vectorized pass, warm: {warm * 1e3:6.1f} ms = {t.enumerated / warm:9,.0f} plans/s, "
            f"{t.estimated / warm:9,.0f} estimated plans/s\n"
            f"  vectorized pass, cold: {cold * 1e3:6.1f} ms = {t.enumerated / cold:9,.0f} plans/s, "
            f"{t.estimated / cold:9,.0f} estimated plans/s\n"
            f"  whole search (top 10 estimated one by one): {statistics.median(r['cpu']):.3f} s CPU "
            f"(wall {statistics.median(r['wall']):.3f} s)"
        )


if __name__ == "__main__":
    main()
