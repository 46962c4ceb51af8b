"""How fast `shardwise plan` searches (issue 3's hot path), on one core.

Run: python benchmarks/search_speed.py [--runs 5]
Targets (issue 3): >= 100,000 plans estimated per second; a full search of Llama-3.1-405B over
16,384 H100s, every dimension open, in under 10 s.

Counts, per case:
  enumerated  plans generated (every legal-or-not combination of the searched fields)
  legal       plans that pass every Plan rule
  estimated   legal plans whose memory is estimated (the rest are dominated: a lighter
              recompute/offload variant of the same plan fits, so they cannot be faster)
  timed       plans that fit: their collectives and step time are estimated
plans/s = enumerated / seconds of the vectorized pass; the whole search adds the global-batch
check, ranking and the plain `estimate` of the top 10 plans. Seconds are CPU seconds of this
process (time.process_time: what one core spends, whatever else the machine runs); wall-clock
is printed beside them.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: numpy's elementwise ops are single-threaded anyway
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from shardwise import make_cluster, preset  # noqa: E402
from shardwise.search.core import Options, fitting_space, run_search  # noqa: E402

CASES = [  # (label, model, gpu, gpus, pinned)
    ("issue 3: llama-3.1-405b, 16,384x h100, seq 8192, all open (gbs: the search's default)", "llama-3.1-405b",
     "h100-80gb", 16384, {"seq": 8192}),
    ("llama-3.1-70b, 1,024x h100, seq 8192, gbs 2048", "llama-3.1-70b", "h100-80gb", 1024,
     {"seq": 8192, "gbs": 2048}),
    ("gpt-3-175b, 1,536x a100, gbs 1536 (pp can be 3, 6, 12, ...)", "gpt-3-175b", "a100-80gb", 1536,
     {"gbs": 1536}),
    ("llama-2-7b, 8x a100, default gbs 2048 (many micro-batch sizes)", "llama-2-7b", "a100-80gb", 8, {}),
]


def bench(model, cluster, fixed, runs: int) -> dict:
    # a fresh Space per run: nothing cached between runs but the model and catalog
    passes, cpu, wall, tally = [], [], [], None
    opts = Options()
    for _ in range(runs):
        space = fitting_space(model, cluster, fixed, opts)[0]  # the global batch the search settles on
        space = space.with_gbs(space.gbs)  # fresh: no grid cached
        t0 = time.process_time()
        _, tally, _ = opts.evaluate(space, cluster)
        passes.append(time.process_time() - t0)
        t0, w0 = time.process_time(), time.perf_counter()
        run_search(model, cluster, **fixed)
        cpu.append(time.process_time() - t0)
        wall.append(time.perf_counter() - w0)
    return {"tally": tally, "pass": passes, "cpu": cpu, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    for label, m, g, n, fixed in CASES:
        model, cluster = preset(m), make_cluster(g, n)
        run_search(model, cluster, **fixed)  # warm imports and catalog
        r = bench(model, cluster, fixed, a.runs)
        t = r["tally"]
        med = statistics.median(r["pass"])
        print(f"{label}\n  {t.enumerated:,} enumerated, {t.legal:,} legal, {t.estimated:,} estimated, "
              f"{t.timed:,} fit and timed; "
              f"vectorized pass median {med * 1e3:,.1f} ms (min {min(r['pass']) * 1e3:,.1f}, "
              f"max {max(r['pass']) * 1e3:,.1f}) = {t.enumerated / med:,.0f} plans/s "
              f"({t.estimated / med:,.0f} estimated plans/s)\n"
              f"  whole search (top 10 estimated one by one): median {statistics.median(r['cpu']):.3f} s CPU, "
              f"max {max(r['cpu']):.3f} s over {a.runs} runs (wall median {statistics.median(r['wall']):.3f} s)")


if __name__ == "__main__":
    main()
