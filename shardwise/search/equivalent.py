"""Plans the estimate cannot tell apart, and the one to recommend among them.

A search ranks every fitting plan by its predicted tokens/s (or time, or cost), but two plans
predicted a few percent apart are not known to be a few percent apart: the prediction itself is
off by about ten percent. So the answer groups the plans within that band as equivalent, and
recommends among them the plan a careful engineer would pick among equals: the simplest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shardwise.spec.plan import SCHEDULES

# Plans whose predicted time per token (or cost, with --rank cost) is within 10% of the best are
# shown as equivalent. Why 10%: the time model misses single published GPU runs by up to ~12%
# (`shardwise validate`: Korthikanti 2022 Table 5, 22B selective + SP, -11.6%; means 4.5% and 3.5%)
# and measured CPU steps by ~11% on average (docs/accuracy.md), so a plan predicted 10% slower than
# another may measure faster.
EQUIVALENT_BAND = 0.10
BAND_WHY = "the time model misses single published runs by up to ~12% and measured CPU steps by ~11% on average"
# A plan using more than this share of the GPU's memory is "tight": one longer batch or one
# fragmentation spike from the (1 - headroom) the search allows. Below it, more free memory buys
# nothing, so it does not outweigh speed.
TIGHT_MEMORY = 0.80
# the table's schedule column holds SCHEDULES indices; these two add no split backward nor virtual stages
PLAIN_SCHEDULES = [SCHEDULES.index(s) for s in ("gpipe", "1f1b")]
# How the recommended plan is chosen inside the band, most important first (keys in simplicity()).
SIMPLEST = (
    f"no offload, fewest of tp/pp, least recompute, no interleaving, memory under {TIGHT_MEMORY:.0%} "
    "of the GPU, then the ranking"
)
RANK_WORDS = {"throughput": "tokens/s", "time": "time to train", "cost": "cost to train"}


def per_token(tokens_per_s, gpus, rank: str):
    """What the ranking minimises, per token: seconds (throughput, time) or GPU-seconds (cost;
    the price per GPU-hour is the same for every plan)."""
    tps = np.asarray(tokens_per_s, dtype=np.float64)
    return (np.asarray(gpus, dtype=np.float64) if rank == "cost" else 1.0) / tps


def band_rows(res) -> np.ndarray:
    """Rows of res.table within EQUIVALENT_BAND of the best, best first (a prefix of res.order:
    the band is on the quantity the ranking sorts by)."""
    if len(res.order) == 0:
        return res.order
    c = res.table.cols
    x = per_token(c["tokens_per_s"][res.order], c["gpus"][res.order], res.rank)
    # a relative tolerance, so two plans the model prices the same are never split by rounding
    inside = x <= x[0] * (1 + EQUIVALENT_BAND) * (1 + 1e-12)
    return res.order[inside]


def simplicity(res, rows: np.ndarray) -> np.ndarray:
    """`rows` reordered simplest first; the first is the recommendation. Keys, most important first:

    1. no offload: it leans on PCIe and host memory, the part of the step the estimate sees least;
    2. fewer model-parallel dimensions (tp > 1, pp > 1, cp > 1, ep > 1): each adds a process group, a
       failure mode and a communication pattern to tune; plain data parallelism (with ZeRO) is the simplest;
    3. less activation recompute (none < selective-op < selective < selective-layer < full): it re-runs work the estimate prices
       from FLOPs alone;
    4. no interleaved or zero-bubble pipeline (virtual stages add sends, split backwards add schedule
       complexity: gpipe and 1f1b are the plain ones);
    5. memory at most TIGHT_MEMORY of the GPU: free memory absorbs what the estimate cannot see
       (allocator fragmentation, a longer batch), but only near the limit does it matter;
    6. with --rank time, fewer GPUs (the same time for less money); with --rank cost, more GPUs
       (the same money for less time);
    7. then the ranking itself.
    """
    if len(rows) == 0:
        return rows
    c = res.table.cols
    cap = res.cluster.gpu.memory_bytes
    gpus = c["gpus"][rows]
    gpu_key = {"time": gpus, "cost": -gpus}.get(res.rank, np.zeros_like(gpus))
    keys = (
        np.arange(len(rows)),  # 7: rank position (rows come best first)
        gpu_key,  # 6
        (c["mem_total"][rows] > TIGHT_MEMORY * cap).astype(np.int64),  # 5
        ((c["vpp"][rows] > 1) | ~np.isin(c["schedule"][rows], PLAIN_SCHEDULES)).astype(np.int64),  # 4
        c["recompute"][rows],  # 3 (RECOMPUTE_ORDER index)
        (c["tp"][rows] > 1).astype(np.int64) + (c["pp"][rows] > 1) + (c["cp"][rows] > 1) + (c["ep"][rows] > 1),  # 2
        c["offload"][rows],  # 1 (OFFLOAD_ORDER index)
    )
    return rows[np.lexsort(keys)]


@dataclass
class Equivalent:
    """The band of a search: its rows (recommended first, then best first), where the
    recommended plan ranks, and its Estimate."""

    rows: np.ndarray  # table rows: recommended first, then the others in rank order
    position: int  # the recommended plan's place in the ranking (1 = best)
    recommended: object  # Estimate

    def __len__(self) -> int:
        return len(self.rows)


def equivalent(res) -> Equivalent | None:
    """The equivalent group of a search, or None when nothing fits."""
    band = band_rows(res)
    if len(band) == 0:
        return None
    pick = int(simplicity(res, band)[0])
    rows = np.concatenate(([pick], band[band != pick]))
    position = int(np.flatnonzero(res.order == pick)[0]) + 1
    return Equivalent(rows, position, res.estimate_row(pick))


def row_plan(res, row: int):
    """The Plan of a table row (no estimate: cheap)."""
    space, cats, grid, i = res.table.refs[row]
    return space.scalar(grid, cats, i)


def shapes(res, rows: np.ndarray, limit: int) -> list[int]:
    """Up to `limit` rows of `rows`, one per GPU count x dp x tp x pp shape (the first of each, in
    the order given): what differs in kind inside the band, not its micro-batch and ZeRO variants."""
    c = res.table.cols
    seen, out = set(), []
    for r in rows:
        key = tuple(int(c[k][r]) for k in ("gpus", "dp", "tp", "pp"))
        if key not in seen:
            seen.add(key)
            out.append(int(r))
            if len(out) == limit:
                break
    return out
