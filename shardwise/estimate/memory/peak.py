"""The peak of a rank's moments: the moment with the largest total, its items summed into the
Memory's fields by their prefix (FIELDS); for array plans element by element, as one int64 table.
"""

from __future__ import annotations

from functools import lru_cache

from shardwise.estimate.memory.moments import Blend
from shardwise.spec.breakdown import Memory

FIELDS = {
    "params": "params",
    "grads": "grads",
    "optimizer": "optimizer",
    "act": "activations",
    "buffers": "buffers",
    "overhead": "overhead",
}


def peak(moments: list[dict]) -> dict:
    """The moment with the largest total (the first of equal totals)."""
    keys = sorted({k for m in moments for k in m})
    best = max(moments, key=lambda m: sum(m.values()))
    return {k: best.get(k, 0) for k in keys}


def peak_memory(moments: list[dict], mem: Memory) -> Memory:
    """`mem` filled from a scalar plan's peak moment: each field the sum of its items."""
    detail = peak(moments)
    fields, starts = field_runs(tuple(detail))
    values = list(detail.values())
    for f, a, b in zip(fields, starts, starts[1:] + (len(values),)):
        setattr(mem, f, int(sum(values[a:b])))
    mem.detail = {k: int(v) for k, v in detail.items() if v}
    return mem


def _fill(rows, index: dict, items) -> None:
    """Write a moment's items into its rows (zeros): a dict, or a Blend of two, element by element."""
    if isinstance(items, Blend):
        import numpy as np

        if not items.b:  # a moment of some plans only
            _fill(rows, index, items.a)
            rows[:, ~items.fsdp] = 0
        elif not items.a:
            _fill(rows, index, items.b)
            rows[:, items.fsdp] = 0
        else:
            _fill(rows, index, items.a)
            other = np.zeros_like(rows)
            _fill(other, index, items.b)
            np.copyto(rows, other, where=~items.fsdp)
        return
    for k, v in items.items():
        if type(v) is not int or v:  # rows start at 0
            rows[index[k]] = v


def item_names(m) -> set:
    """The item names of a moment (a dict, or a Blend of two)."""
    return item_names(m.a) | item_names(m.b) if isinstance(m, Blend) else set(m)


def peak_arrays(moments: list[dict], plan, mem: Memory, stages: int = 1) -> Memory:
    """peak() element by element for array plans, as one int64 table [moment, item, plan]: every
    field and item of `mem` becomes an int64 array of the plans' shape. stages=2: the moments are
    of _both_stages(plan) (a leading axis of 2), taken as the first stage's, then the last's."""
    import numpy as np

    shape = np.broadcast(*(np.asarray(getattr(plan, f)) for f in ("dp", "tp", "pp", "mbs", "gbs", "vpp", "seq"))).shape
    keys = sorted(set().union(*(item_names(m) for m in moments)))
    index = {k: j for j, k in enumerate(keys)}
    table = np.zeros((len(moments), len(keys)) + ((2,) if stages == 2 else ()) + shape, dtype=np.int64)
    for i, m in enumerate(moments):
        _fill(table[i], index, m)
    flat = table.reshape(len(moments), len(keys), stages, -1)  # [moment, item, stage, plan]
    totals = flat.sum(axis=1).transpose(1, 0, 2).reshape(stages * len(moments), -1)  # the first stage's first
    pick = totals.argmax(axis=0)  # argmax: the first of equal totals
    n = np.arange(totals.shape[1])
    best = flat[pick % len(moments), :, pick // len(moments), n].T.reshape((len(keys),) + shape)
    fields, starts = field_runs(tuple(keys))
    sums = np.add.reduceat(best, starts, axis=0) if keys else ()
    for f in FIELDS.values():
        setattr(mem, f, sums[fields.index(f)] if f in fields else np.zeros(shape, dtype=np.int64))
    mem.detail = dict(zip(keys, best))
    return mem


@lru_cache(maxsize=256)
def field_runs(keys: tuple) -> tuple[tuple, tuple]:
    """(field, index of its first item) of each run of sorted item names: a field's items, named
    "<prefix>.<item>", sort next to each other."""
    fields, starts = [], []
    for j, k in enumerate(keys):
        f = FIELDS[k.split(".", 1)[0]]
        if not fields or fields[-1] != f:
            fields.append(f)
            starts.append(j)
    return tuple(fields), tuple(starts)
