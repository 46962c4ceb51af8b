"""The torch profile's memory: which of PyTorch's engines holds a plan's rank, DDP / ZeRO-1 (the
local engines, ddp.py) or FSDP2 (ZeRO-2/3 over dp > 1, fsdp2.py), and, for array plans that span
both, their moments side by side (Blend), aligned so that the peak is taken moment by moment.
"""

from __future__ import annotations

from shardwise.estimate._num import _is_array, where
from shardwise.estimate.memory.ddp import local_moments
from shardwise.estimate.memory.fsdp2 import fsdp_moments
from shardwise.estimate.memory.moments import Blend, one_stage
from shardwise.estimate.memory.peak import item_names


def torch_moments(model, plan, last: bool, attention: str, device: str = "cuda") -> list[dict]:
    """Moments A, B, C (memory's docstring) of one rank, A once per backward of peak_backwards;
    FSDP2 only with zero >= 2 and dp > 1 (run/parallelize.uses_fsdp: at dp = 1 there is nothing to
    shard). Array plans that mix dp > 1 and dp = 1 get both engines' moments, blended."""
    if plan.zero < 2:
        return local_moments(model, plan, last, attention, device)
    fsdp = where(plan.dp > 1, 1, 0)
    if not _is_array(fsdp):
        engine = fsdp_moments if fsdp else local_moments
        return engine(model, plan, last, attention, device)
    mask = plan.dp > 1
    if mask.all() or not mask.any():  # one engine for every plan: the other's items are all 0
        if mask.all():
            a = fsdp_moments(model, plan, last, attention, device)
            b = _align(_moment_names(local_moments, model, plan, last, attention, device), len(a))
        else:
            b = _moment_names(fsdp_moments, model, plan, last, attention, device)
            a = _align(local_moments(model, plan, last, attention, device), len(b))
        return [_with_names(x, names) for x, names in zip(a, b)]
    a, b = fsdp_moments(model, plan, last, attention, device), local_moments(model, plan, last, attention, device)
    return [Blend(mask, x, y) for x, y in zip(a, _align(b, len(a)))]


def _with_names(m, names):
    """A moment with every name in `names` among its items (0 where it has none)."""
    if isinstance(m, Blend):
        return Blend(m.fsdp, _with_names(m.a, names), m.b)
    return {**dict.fromkeys(names, 0), **m}


def _align(local: list, n: int) -> list:
    """The local engines' moments (A's two per backward, then C) as many as FSDP2's (n): empty
    ones where the local engines have none (FSDP2's forward and end-of-backward moments), C last."""
    return local[:-1] + [{}] * (n - len(local)) + [local[-1]]


_NAMES: dict = {}


def _moment_names(engine, model, plan, last: bool, attention: str, device: str = "cuda") -> list[tuple]:
    """The item names of each moment `engine` (fsdp_moments, local_moments) gives an array plan.
    Formulas never branch on numeric fields (_num), so the names depend on the categorical ones
    only, and on whether any plan is pipelined (the number of backwards, peak_backwards): found once,
    from a one-plan array of one of its elements (a pipelined one if there is one)."""
    import numpy as np

    last = np.ravel(last)[:1]  # (both stages at once: the stage changes values, not names)
    key = (
        engine,
        model,
        plan.zero,
        plan.schedule,
        plan.recompute,
        plan.sp,
        plan.precision,
        plan.optimizer,
        plan.offload,
        bool(last[0]),
        attention,
        device,
        one_stage(plan.pp),
    )
    names = _NAMES.get(key)
    if names is None:
        fields = ("dp", "tp", "pp", "mbs", "gbs", "vpp", "seq")
        values = [np.ravel(v) for v in np.broadcast_arrays(*(np.asarray(getattr(plan, f)) for f in fields))]
        i = 0 if key[-1] else int(np.argmax(values[2] > 1))
        one = plan.replace(**{f: v[i : i + 1] for f, v in zip(fields, values)})
        if len(_NAMES) >= 1024:
            _NAMES.clear()
        names = _NAMES[key] = [tuple(sorted(item_names(m))) for m in engine(model, one, last, attention, device)]
    return names


_moment_names.cache_clear = _NAMES.clear
