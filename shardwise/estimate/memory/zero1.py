"""ZeRO-1 under the torch profile: ZeroRedundancyOptimizer's greedy partition of one pipeline
rank's parameters over the dp ranks (run/engine.py builds it over DDP), the optimizer states and
step scratch of the rank it loads most (ddp.py counts them), and each rank's broadcast bucket
(comm.py sends them).
"""

from __future__ import annotations

from functools import lru_cache
from heapq import heapify, heapreplace

from shardwise.estimate.memory.shapes import elements, stage_param_shapes
from shardwise.estimate.profiles import TORCH, optimizer_bytes, step_temp_bytes


@lru_cache(maxsize=1024)
def _zero1_items(
    model, tp: int, pp: int, last: bool, optimizer: str, sb, blocks: int | None = None, vee=False
) -> tuple:
    """(numel, optimizer bytes) of the rank's parameters, per ZeroRedundancyOptimizer group
    (matrices, then vectors), each sorted by numel, largest first (a stable sort)."""
    shapes = stage_param_shapes(model, tp, pp, last, blocks, vee)
    return tuple(
        tuple(
            (elements(s), optimizer_bytes(optimizer, s, sb))
            for s in sorted((s for s in shapes if (len(s) >= 2) == matrices), key=elements, reverse=True)
        )
        for matrices in (True, False)
    )


@lru_cache(maxsize=4096)
def _zero1_assign(
    model, dp: int, tp: int, pp: int, last: bool, optimizer: str, sb, blocks: int | None = None, vee=False
) -> tuple:
    """ZeroRedundancyOptimizer's partition (_partition_parameters): for each parameter group in
    order (run/engine.py: matrices with weight decay, then vectors), parameters sorted by numel,
    largest first (a stable sort), each to the rank with the smallest total so far (the first
    such rank). Under DDP the parameters are local TP shards. Returns, per dp rank, (optimizer
    bytes, [numel per group], its largest parameter's numel)."""
    heap = [(0, r) for r in range(dp)]
    heapify(heap)
    states, numel_by_group, largest = [0] * dp, [[0, 0] for _ in range(dp)], [0] * dp
    for group, items in enumerate(_zero1_items(model, tp, pp, last, optimizer, sb, blocks, vee)):
        for n, nbytes in items:
            size, r = heap[0]  # (totals differ by rank index: the order of pops is the heap's order)
            heapreplace(heap, (size + n, r))
            states[r] += nbytes
            numel_by_group[r][group] += n
            if n > largest[r]:
                largest[r] = n
    return tuple((states[r], tuple(numel_by_group[r]), largest[r]) for r in range(dp))


def zero1_bucket_numels(
    model, dp: int, tp: int, pp: int, last: bool, blocks: int | None = None, vee: bool = False
) -> tuple[int, ...]:
    """Elements of each dp rank's ZeroRedundancyOptimizer bucket (parameters_as_bucket_view: one
    flat tensor per rank holding the parameters it steps, broadcast from it after the step). The
    partition weighs numel alone: any optimizer gives the same."""
    return tuple(
        sum(g) for _, g, _ in _zero1_assign(model, dp, tp, pp, last, "sgd", TORCH.state_bytes("fp32"), blocks, vee)
    )


@lru_cache(maxsize=4096)
def zero1_worst(
    model, dp: int, tp: int, pp: int, last: bool, optimizer: str, sb, blocks=None, vee=False
) -> tuple[int, int]:
    """(optimizer bytes, step scratch bytes) of the dp rank ZeroRedundancyOptimizer loads most
    (_zero1_assign); its local optimizer steps only its own parameters."""
    ranks = _zero1_assign(model, dp, tp, pp, last, optimizer, sb, blocks, vee)
    worst = max(range(dp), key=lambda r: (ranks[r][0], -r))
    states, numel_by_group, largest = ranks[worst]
    if optimizer == "adamw":  # DDP's local shards are plain tensors: foreach
        temp = step_temp_bytes("adamw", max(numel_by_group), sb, foreach=True)
    else:
        temp = step_temp_bytes(optimizer, largest, sb, foreach=False)
    return int(states), int(temp)
