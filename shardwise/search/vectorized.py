"""The fast path: every plan of a group through the Plan rules, memory, collectives and step time
in one call each, with numpy arrays in the Plan's numeric fields.

The formulas are the estimate tier's own (shardwise.estimate.memory/comm/time): nothing is
re-derived here, so a plan scores exactly what `estimate` gives it one at a time (a test holds
the two against each other). Work is cut in two ways that cannot change the answer:
- memory first: collectives and time are computed only for plans that fit;
- a heavier recompute/offload variant is skipped where a lighter variant of the same plan already
  fits: it only adds work (a test checks that the estimate agrees: never faster).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from shardwise.spec.plan import RULES

CATEGORICAL = ("zero", "sp", "schedule", "recompute", "offload")


@dataclass
class Tally:
    """What happened to every candidate: counts per fate and per rejection reason."""

    enumerated: int = 0  # plans generated (in groups whose options go together)
    legal: int = 0  # passed every Plan rule: their memory was estimated
    fit: int = 0  # fit in the memory budget
    dominated: int = 0  # fit, but a lighter recompute/offload variant of the same plan fits too
    timed: int = 0  # collectives + step time estimated (= fit - dominated)
    rejected: Counter = field(default_factory=Counter)  # reason -> plans ("memory" included)
    examples: dict = field(default_factory=dict)  # reason -> one rule message, for the user
    skipped_groups: int = 0  # option combinations that cannot go together (e.g. offload without ZeRO)

    def add(self, other: "Tally") -> None:
        for k in ("enumerated", "legal", "fit", "dominated", "timed", "skipped_groups"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.rejected.update(other.rejected)
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


def evaluate(space, cluster, profile: str, budget_fraction: float, *, efficiency=None, tokens: float = 0.0,
             price=None, time: bool = True, stop_at_first_fit: bool = False):
    """Score every plan of `space`. Returns (list[Scored], Tally, Nearest).

    budget_fraction: the share of GPU memory a plan may use (1 - headroom).
    time=False: memory only (the --min-gpus scan asks "does anything fit?");
    stop_at_first_fit: return as soon as one plan fits (with time=False).
    """
    from shardwise.estimate.comm import collectives
    from shardwise.estimate.memory import memory
    from shardwise.estimate.time import step_time

    model, gpus = space.model, space.gpus
    tally, nearest, out = Tally(), Nearest(), []
    for fam in space.families():
        grid = space.grid(fam["sp"], fam["schedule"])
        n = len(grid["dp"])
        if n == 0:
            continue
        fitted: dict[tuple, np.ndarray] = {}  # (recompute, offload) -> fits, over the grid
        for var in space.variants():
            cats = fam | var
            plan = space.plan(grid, cats)
            alive = np.ones(n, dtype=bool)
            for rule in RULES:
                broken = rule.broken(plan, model, gpus)
                if np.ndim(broken) == 0:  # depends on categorical fields only: the whole group
                    if broken:
                        tally.skipped_groups += 1
                        tally.examples.setdefault("options", rule.message(space.scalar(grid, cats, 0), model, gpus))
                        break
                    continue
                hit = broken & alive
                c = int(np.count_nonzero(hit))
                if c:
                    tally.rejected[rule.reason] += c
                    if rule.reason not in tally.examples:
                        i = int(np.argmax(hit))
                        tally.examples[rule.reason] = rule.message(space.scalar(grid, cats, i), model, gpus)
                    alive &= ~broken
            else:
                tally.enumerated += n
                legal = np.flatnonzero(alive)
                tally.legal += len(legal)
                fits = np.zeros(n, dtype=bool)
                fitted[(var["recompute"], var["offload"])] = fits
                if len(legal) == 0:
                    continue
                mem = memory(model, cluster, space.plan(grid, cats, legal), profile)
                total = _arr(mem.total, len(legal), np.int64)
                ok = total <= budget_fraction * mem.capacity
                fits[legal] = ok
                nf = int(np.count_nonzero(ok))
                tally.fit += nf
                tally.rejected["memory"] += len(legal) - nf
                if nf < len(legal):
                    ratio = total / mem.capacity
                    j = int(np.argmin(np.where(ok, np.inf, ratio)))
                    if ratio[j] < nearest.ratio:
                        nearest = Nearest(float(ratio[j]), cats, grid, int(legal[j]))
                if nf and stop_at_first_fit:
                    return out, tally, nearest
                keep = fits & ~_lighter_fits(fitted, var, n)
                tally.dominated += nf - int(np.count_nonzero(keep))
                if not time or not keep.any():
                    continue
                idx = np.flatnonzero(keep)
                sub = space.plan(grid, cats, idx)
                comm = collectives(model, cluster, sub, profile)
                t = step_time(model, cluster, sub, comm, efficiency=efficiency, tokens=tokens, price=price)
                tally.timed += len(idx)
                out.append(Scored(cats, grid, idx, _arr(t.tokens_per_s, len(idx), np.float64),
                                  _arr(t.step_s, len(idx), np.float64), total[keep[legal]]))
    return out, tally, nearest


def _lighter_fits(fitted: dict, var: dict, n: int) -> np.ndarray:
    """Where a strictly lighter (recompute, offload) variant of the same plan fits."""
    from shardwise.search.space import OFFLOAD_ORDER, RECOMPUTE_ORDER

    r, o = RECOMPUTE_ORDER.index(var["recompute"]), OFFLOAD_ORDER.index(var["offload"])
    acc = np.zeros(n, dtype=bool)
    for (rc, off), fits in fitted.items():
        r2, o2 = RECOMPUTE_ORDER.index(rc), OFFLOAD_ORDER.index(off)
        if r2 <= r and o2 <= o and (r2, o2) != (r, o):
            acc = acc | fits
    return acc
