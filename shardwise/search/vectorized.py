"""The fast path: every plan of a group through the Plan rules, memory, collectives and step time
in one call each, with numpy arrays in the Plan's numeric fields.

The formulas are the estimate tier's own (shardwise.estimate.memory/comm/time): nothing is
re-derived here, so a plan scores exactly what `estimate` gives it one at a time (a test holds
the two against each other). Work is cut in two ways that cannot change the ranking's head:
- memory first: collectives and time are computed only for plans that fit;
- a heavier recompute/offload variant of a plan is not estimated at all where a lighter variant
  of the same plan fits: it only adds work, so it is never faster (a test checks that the time
  estimate agrees), and it would only rank right below the lighter one.
Memory is NOT monotone in recompute/offload (full recompute's working set can exceed selective's
on one-layer stages; FSDP2's CPU offload keeps more on the GPU than ZeRO-1's), so no variant's
memory is inferred from another's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from shardwise.estimate import profiles
from shardwise.estimate.comm import collectives
from shardwise.estimate.memory import memory
from shardwise.estimate.profiles import Profile
from shardwise.estimate.time import step_time
from shardwise.search.space import OFFLOAD_ORDER, RECOMPUTE_ORDER
from shardwise.spec.plan import RULES

CATEGORICAL = ("zero", "sp", "schedule", "recompute", "offload")


@dataclass
class Tally:
    """What happened to every candidate: counts per fate and per rejection reason."""

    enumerated: int = 0  # plans generated (in groups whose options go together)
    legal: int = 0  # passed every Plan rule
    dominated: int = 0  # legal, but a lighter recompute/offload variant of the same plan fits: skipped
    estimated: int = 0  # memory estimated (= legal - dominated)
    fit: int = 0  # fit in GPU (and, with offload, host) memory
    timed: int = 0  # collectives and step time estimated (= fit)
    rejected: Counter = field(default_factory=Counter)  # reason -> plans ("memory" included)
    examples: dict = field(default_factory=dict)  # reason -> one rule message, for the user
    skipped_groups: int = 0  # option combinations that cannot go together (e.g. offload without ZeRO)
    fit_gpus: set = field(default_factory=set)  # GPU counts with a plan that fits (a Spaces pass)
    min_total: float = float("inf")  # the least GPU memory any estimated plan needs (host aside)

    def add(self, other: Tally) -> None:
        for k in ("enumerated", "legal", "dominated", "estimated", "fit", "timed", "skipped_groups"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.rejected.update(other.rejected)
        self.fit_gpus |= other.fit_gpus
        self.min_total = min(self.min_total, other.min_total)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)


@dataclass
class Scored:
    """The fitting, non-dominated plans of one group and their numbers (aligned arrays)."""

    cats: dict  # categorical fields of the group
    grid: dict  # the family's numeric grid
    idx: np.ndarray  # which grid elements
    tokens_per_s: np.ndarray
    step_s: np.ndarray
    mem_total: np.ndarray


@dataclass
class Nearest:
    """The legal plan closest to fitting (smallest total / capacity), kept when it does not fit."""

    ratio: float = np.inf
    cats: dict | None = None
    grid: dict | None = None
    i: int = -1


def _arr(x, n: int, dtype) -> np.ndarray:
    """A formula result as an n-vector (a field that depends on no numeric field is a scalar)."""
    return np.broadcast_to(np.asarray(x, dtype=dtype), (n,))


def evaluate(
    space,
    cluster,
    profile: str | Profile,
    budget_fraction: float,
    *,
    efficiency=None,
    tokens: float = 0.0,
    price=None,
    host_bytes: float = float("inf"),
    time: bool = True,
    stop_at_first_fit: bool = False,
):
    """Score every plan of `space`. Returns (list[Scored], Tally, Nearest).

    budget_fraction: the share of GPU memory a plan may use (1 - headroom).
    host_bytes: CPU memory per node that offloaded states may use (already less the headroom).
    time=False: memory only (the --min-gpus scan asks "does anything fit?");
    stop_at_first_fit: return as soon as one plan fits (with time=False).
    """

    model, prof = space.model, profiles.profile(profile)
    tally, nearest, out = Tally(), Nearest(), []
    families, variants = space.families(), space.variants()
    if stop_at_first_fit:  # most frugal first: the answer is usually the first group
        families = sorted(families, key=lambda f: (-f["zero"], -f["sp"]))
        variants = variants[::-1]
    for fam in families:
        grid = space.grid(fam["sp"], fam["schedule"], fam["zero"] >= 2)
        n = len(grid["dp"])
        if n == 0:
            continue
        fitted: dict[tuple, np.ndarray] = {}  # (recompute, offload) -> fits, over the grid
        kept: dict[str, np.ndarray] = {}  # recompute -> GPU model-state bytes without offload (-1: not estimated)
        for var in variants:
            cats = fam | var
            alive = _legal(space, grid, cats, tally, RULES + prof.rules)
            if alive is None:
                continue
            tally.enumerated += n
            tally.legal += int(np.count_nonzero(alive))
            fits = np.zeros(n, dtype=bool)
            fitted[(var["recompute"], var["offload"])] = fits
            dominated = alive & _lighter_fits(fitted, var, n) if not stop_at_first_fit else np.zeros(n, bool)
            tally.dominated += int(np.count_nonzero(dominated))
            todo = np.flatnonzero(alive & ~dominated)
            if len(todo) == 0:
                continue
            tally.estimated += len(todo)
            total, capacity, mem = _memory(space, cluster, grid, cats, todo, prof)
            ok_gpu = total <= budget_fraction * capacity
            ok = ok_gpu.copy()
            tally.min_total = min(tally.min_total, float(total.min()))
            if cats["offload"] == "none":
                kept.setdefault(var["recompute"], np.full(n, -1, dtype=np.int64))[todo] = _arr(
                    _states(mem), len(todo), np.int64
                )
            elif ok_gpu.any():  # the offloaded states must fit in CPU memory
                sel = np.flatnonzero(ok_gpu)
                before = kept.get(var["recompute"], np.full(n, -1, dtype=np.int64))[todo[sel]]
                if (before >= 0).all():  # the same plans without offload were just estimated: reuse
                    host = np.maximum(before - _arr(_states(_subset(mem, sel)), len(sel), np.int64), 0)
                else:
                    host = offloaded_bytes(
                        model, cluster, space.plan(grid, cats, todo[sel]), prof, len(sel), _subset(mem, sel)
                    )
                ok[sel] = host * grid["node"][todo[sel]] <= host_bytes
            fits[todo] = ok
            nf = int(np.count_nonzero(ok))
            if nf:
                tally.fit_gpus.update(np.unique(grid["gpus"][todo[ok]]).tolist())
            tally.fit += nf
            tally.rejected["memory"] += len(todo) - int(np.count_nonzero(ok_gpu))
            tally.rejected["host memory"] += int(np.count_nonzero(ok_gpu & ~ok))
            if nf < len(todo):
                ratio = np.where(ok, np.inf, total / capacity)
                j = int(np.argmin(ratio))
                if ratio[j] < nearest.ratio:
                    nearest = Nearest(float(ratio[j]), cats, grid, int(todo[j]))
            if nf and stop_at_first_fit:
                return out, tally, nearest
            if not time or nf == 0:
                continue
            idx = todo[ok]
            sub = space.plan(grid, cats, idx)
            comm = collectives(model, cluster, sub, prof)
            t = step_time(model, cluster, sub, comm, efficiency=efficiency, tokens=tokens, price=price)
            tally.timed += len(idx)
            out.append(
                Scored(
                    cats,
                    grid,
                    idx,
                    _arr(t.tokens_per_s, len(idx), np.float64),
                    _arr(t.step_s, len(idx), np.float64),
                    total[ok],
                )
            )
    return out, tally, nearest


def _legal(space, grid, cats, tally, rules=RULES) -> np.ndarray | None:
    """Which grid elements pass every rule (counting the rest per reason), or None when a rule on
    the categorical fields alone refuses the whole group. Under the `torch` profile (run_engines)
    the rules include PyTorch's engine limits: the search recommends only what `shardwise run`
    can train."""
    model, gpus = space.model, grid["gpus"]
    plan = space.plan(grid, cats)
    results = [(rule, rule.broken(plan, model, gpus)) for rule in rules]
    msg = lambda rule, i: rule.message(space.scalar(grid, cats, i), model, int(gpus[i]))
    for rule, broken in results:
        if np.ndim(broken) == 0 and broken:  # depends on categorical fields only: the whole group
            tally.skipped_groups += 1
            tally.examples.setdefault("options", msg(rule, 0))
            return None
    alive = np.ones(len(grid["dp"]), dtype=bool)
    for rule, broken in results:
        if np.ndim(broken) == 0:
            continue
        hit = broken & alive
        c = int(np.count_nonzero(hit))
        if c:
            tally.rejected[rule.reason] += c
            if rule.reason not in tally.examples:
                tally.examples[rule.reason] = msg(rule, int(np.argmax(hit)))
            alive &= ~broken
    return alive


def _memory(space, cluster, grid, cats, idx, profile: Profile):
    """(total bytes per GPU, capacity, the Memory) of the elements idx."""

    mem = memory(space.model, cluster, space.plan(grid, cats, idx), profile)
    return _arr(mem.total, len(idx), np.int64), mem.capacity, mem


def _subset(mem, sel):
    """The model-state fields of an array Memory at elements `sel` (scalars stay)."""
    pick = lambda x: x[sel] if np.ndim(x) else x
    return type(mem)(params=pick(mem.params), grads=pick(mem.grads), optimizer=pick(mem.optimizer))


def _states(mem):
    return mem.params + mem.grads + mem.optimizer


def offloaded_bytes(model, cluster, plan, profile: str | Profile, n: int | None = None, mem=None):
    """Model-state bytes per GPU that offload moves to the CPU: what the same plan without offload
    keeps on the GPU in parameters, gradients and optimizer states, less what it still keeps.
    Derived from the memory estimate itself. n: the array length (None for a scalar plan)."""

    if plan.offload == "none":
        return 0 if n is None else np.zeros(n, dtype=np.int64)
    mem = mem if mem is not None else memory(model, cluster, plan, profile)
    moved = _states(memory(model, cluster, plan.replace(offload="none"), profile)) - _states(mem)
    if n is None:
        return max(0, int(moved))
    return np.maximum(_arr(moved, n, np.int64), 0)


def _lighter_fits(fitted: dict, var: dict, n: int) -> np.ndarray:
    """Where a strictly lighter (recompute, offload) variant of the same plan fits."""

    r, o = RECOMPUTE_ORDER.index(var["recompute"]), OFFLOAD_ORDER.index(var["offload"])
    acc = np.zeros(n, dtype=bool)
    for (rc, off), fits in fitted.items():
        r2, o2 = RECOMPUTE_ORDER.index(rc), OFFLOAD_ORDER.index(off)
        if r2 <= r and o2 <= o and (r2, o2) != (r, o):
            acc = acc | fits
    return acc
