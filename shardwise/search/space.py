"""The candidate space: which values each Plan field may take, and the numeric grid per group.

A search holds the training choices fixed (seq, precision, optimizer, gbs: they change what is
learned, not how it is split) and opens the parallelization choices: dp x tp x pp, ZeRO stage,
micro-batch, pipeline schedule and virtual stages, recompute, sequence parallel, offload, HSDP
shard groups (ZeRO-2/3). Any
field the user pins takes only that value.

Plans are grouped by their categorical fields (zero, schedule, recompute, sp, offload); inside a
group the numeric fields (dp, tp, pp, vpp, mbs, dp_shard) form one grid of numpy arrays, so the estimate
formulas run once per group. Each strategy is generated once: no schedule variants when pp = 1,
no sequence parallel when tp = 1, no vpp outside the interleaved schedule, unless pinned. Whatever
is generated still goes through every Plan rule (shardwise.spec.plan.RULES).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from shardwise.errors import ShardwiseError, closest
from shardwise.spec.plan import (
    LOOPED,
    MULTI_STAGE,
    OFFLOAD,
    RECOMPUTE,
    RULES,
    SCHEDULES,
    V_SHAPE,
    ZERO_STAGES,
    Plan,
    _check_choices,
    _positive_int,
    divisors,
)

# dualpipev only when pinned: on one rank's compute it has zbv's bubble and one chunk more in flight
# (pipeline.bubble_slots, inflight_microbatches); what DualPipe adds is overlap of expert-parallel
# all-to-alls with compute, which dense models do not have
SEARCHED_SCHEDULES = tuple(s for s in SCHEDULES if s != "dualpipev")
SEARCHED = (
    "dp",
    "tp",
    "pp",
    "zero",
    "mbs",
    "schedule",
    "vpp",
    "recompute",
    "sp",
    "offload",
    "dp_shard",
    "last_less",
    "cp",
    "ep",
)
HELD = (
    "gbs",
    "seq",
    "precision",
    "optimizer",
    "attention",
    "compile",
    "cp_rotate",
    "capacity",
)  # training choices: pinned or defaulted, never searched
NUMERIC = ("dp", "tp", "pp", "vpp", "mbs", "dp_shard", "last_less", "cp", "ep")
# context parallel is searched (unpinned) while each of its 2*cp load-balanced chunks keeps at least
# this many tokens: shorter chunks split attention into ring steps too short to hide their K/V
# passes, and sequences this short fit without it
MIN_CP_CHUNK = 1024
PLAN_ARRAYS = NUMERIC + ("gbs",)  # the grid columns that are Plan fields (seq is held: one value)
# Default global batch: about 4M tokens, the batch of LLaMA 1/2 at every size (Touvron et al. 2023,
# Table 2 / Sec. 2.2) and of GPT-3 175B (3.2M, Brown et al. 2020, Table 2.1).
TARGET_TOKENS = 4 * 1024 * 1024
GBS_FALLBACKS = 2  # batches tried after the default when no plan fits with it (nearest the target first)
# "Lighter" variants first: the search drops a heavier recompute/offload variant of a plan when a
# lighter one already fits (it only adds work: recompute adds a forward, offload adds PCIe traffic).
RECOMPUTE_ORDER = RECOMPUTE  # none < selective-op < selective < selective-layer < full
OFFLOAD_ORDER = OFFLOAD  # none < optimizer < params


def default_gbs(seq: int, widths) -> int:
    """The default global batch in sequences, the one rule `plan` and `estimate` share: about
    TARGET_TOKENS, rounded to the nearest multiple of the lcm of every data-parallel width
    (dp * mbs) at or below the target, so each of those plans can reach it; above the target
    only the smallest width is served. `estimate` passes its one plan's width. (The Python API's
    Plan() keeps gbs = 0, i.e. dp * mbs: the tests and the lecture rely on it.)

    default_gbs(2048, [8]) == 2048 (x 2048 = 4,194,304 tokens); default_gbs(1024, [8, 6]) == 4104:
    the target 4096 sequences, in steps of lcm(8, 6) = 24, 4096 / 24 = 170.7 -> 171 steps."""
    target = max(1, round(TARGET_TOKENS / seq))
    widths = sorted(set(widths))
    if not widths:
        return target
    small = [d for d in widths if d <= target] or widths[:1]
    step = math.lcm(*small)
    return max(step, round(target / step) * step)


def check_fixed(fixed: dict) -> dict:
    """Validate the user's pinned fields (names, types, choices); return them unchanged."""
    names = [f.name for f in dataclasses.fields(Plan)]
    for k in fixed:
        if k not in names:
            raise ShardwiseError(f"unknown plan field {k!r} to pin; {closest(k, names)}")
    numeric = ("dp", "tp", "pp", "mbs", "gbs", "seq", "vpp", "dp_shard", "last_less", "cp", "ep")
    for k in numeric:
        if k in fixed:
            _positive_int(k, fixed[k], allow_zero=k in ("dp_shard", "last_less"))
    _check_choices(Plan(**{k: v for k, v in fixed.items() if k not in numeric}))
    return fixed


def last_stage_cuts(layers: int, stages: int, schedule: str) -> list[int]:
    """Plan.last_less values of a pipeline of `stages` virtual stages: the remainder r (so the
    others hold the same number; 0 when they divide the layers), then each r + j * stages (one more block on every other stage)
    that leaves the last stage a block or none (its head alone). Uneven splits are gpipe's and
    1f1b's. 32 layers over 4 stages: 0 (8 each), 4 (9, 9, 9, 5), 8 (10, 10, 10, 2)."""
    if stages == 1 or schedule in MULTI_STAGE:
        return [0]
    r = (-layers) % stages  # written out (not 0) so the plan's name shows the split
    return [r] + [k for k in range(r + stages, layers // (stages - 1) + 1, stages)]


@dataclass(frozen=True)
class Space:
    """Every candidate plan of one model on one cluster under the user's pinned fields."""

    model: object  # ModelSpec
    gpus: int
    node_size: int  # GPUs sharing the fast link: tp groups stay inside one unless cross_node_tp
    fixed: dict
    cross_node_tp: bool = False

    # ---- held fields --------------------------------------------------------------------
    @cached_property
    def base(self) -> Plan:
        """The held fields (seq, precision, optimizer) as pinned, the rest at Plan's defaults."""
        held = {k: v for k, v in self.fixed.items() if k in HELD and k != "gbs"}
        return Plan(**held)

    @cached_property
    def tp_pp(self) -> list[tuple[int, int]]:
        """(tp, pp) pairs whose product divides the GPUs (dp = the rest), under pins."""
        g, f = self.gpus, self.fixed
        if "tp" in f:
            tps = [f["tp"]]
        elif self.cross_node_tp:
            tps = divisors(g)
        else:  # tp innermost on the mesh (consecutive ranks): inside a node iff it divides the node
            tps = [t for t in divisors(self.node_size) if g % t == 0]
        out = []
        for tp in tps:
            if g % tp:
                continue
            pps = [f["pp"]] if "pp" in f else divisors(g // tp)
            for pp in pps:
                if g % (tp * pp):
                    continue
                if "dp" in f and (g % (f["dp"] * tp * pp) or self.cps(tp, pp) == []):
                    continue
                out.append((tp, pp))
        return out

    @cached_property
    def gbs(self) -> int:
        """The pinned global batch, or default_gbs over every dp*mbs a legal tp x pp leaves (with a
        pinned mbs; else mbs = 1)."""
        if "gbs" in self.fixed:
            return self.fixed["gbs"]
        unit = self.fixed.get("mbs", 1)
        return default_gbs(
            self.base.seq, [unit * self.gpus // (tp * pp) for tp, pp in self.tp_pp if self._shape_legal(tp, pp)]
        )

    @cached_property
    def gbs_candidates(self) -> list[int]:
        """Global batches a search may fall back to when no plan fits with `gbs` (unpinned only):
        `gbs` first, then for each dp it cannot serve, that dp's multiple nearest the target,
        nearest first (GBS_FALLBACKS of them). Only large clusters have such dps (dp above ~4M
        tokens of sequences)."""
        if "gbs" in self.fixed:
            return [self.fixed["gbs"]]
        target = max(1, round(TARGET_TOKENS / self.base.seq))
        unit = self.fixed.get("mbs", 1)
        dps = {unit * self.gpus // (tp * pp) for tp, pp in self.tp_pp if self._shape_legal(tp, pp)}
        more = {max(d, round(target / d) * d) for d in dps if self.gbs % d}
        return [self.gbs] + sorted(more - {self.gbs}, key=lambda g: (abs(math.log(g / target)), g))[:GBS_FALLBACKS]

    def with_gbs(self, gbs: int) -> Space:
        return dataclasses.replace(self, fixed=self.fixed | {"gbs": gbs})

    def _shape_legal(self, tp: int, pp: int) -> bool:
        """tp and pp pass the divisibility rules (heads, FFN, layers) on their own."""
        probe = self.base.replace(dp=self.gpus // (tp * pp), tp=tp, pp=pp, gbs=self.gpus // (tp * pp))
        return not any(r.broken(probe, self.model, self.gpus) for r in RULES if r.reason == "divisibility")

    # ---- categorical groups -------------------------------------------------------------
    def choices(self, field: str) -> tuple:
        if field in self.fixed:
            return (self.fixed[field],)
        return {
            "zero": ZERO_STAGES,
            "recompute": RECOMPUTE_ORDER,
            "offload": OFFLOAD_ORDER,
            "sp": (False, True),
            "schedule": SEARCHED_SCHEDULES,
        }[field]

    def families(self) -> list[dict]:
        """(zero, sp, schedule) combinations: plans in one family share one numeric grid, and
        differ only in recompute and offload (searched lightest first)."""
        return [
            {"zero": z, "sp": sp, "schedule": s}
            for z in self.choices("zero")
            for sp in self.choices("sp")
            for s in self.choices("schedule")
        ]

    def variants(self) -> list[dict]:
        """(recompute, offload) in an order where every lighter variant comes before a heavier one."""
        return [{"recompute": r, "offload": o} for r in self.choices("recompute") for o in self.choices("offload")]

    # ---- numeric grid -------------------------------------------------------------------
    def grid(self, sp: bool, schedule: str, sharded: bool = False) -> dict[str, np.ndarray]:
        """The numeric grid of a family; `sharded` (ZeRO-2/3) adds the HSDP shard groups."""
        key = (sp, schedule, sharded)
        if key not in self._grids:
            self._grids[key] = self._build_grid(sp, schedule, sharded)
        return self._grids[key]

    @cached_property
    def _grids(self) -> dict:
        return {}

    def _build_grid(self, sp: bool, schedule: str, sharded: bool = False) -> dict[str, np.ndarray]:
        """Columns dp tp pp vpp mbs dp_shard gbs (the Plan's numeric fields) and gpus, node (the GPU
        count and node size the element is for: one value here, several in a Spaces). dp_shard:
        0 (shard over all of dp) and, for ZeRO-2/3 families, every HSDP shard group: each divisor
        S of dp with 1 < S < dp."""
        f = self.fixed
        cols: dict[str, list[int]] = {k: [] for k in NUMERIC}
        for tp, pp in self.tp_pp:
            if sp and tp == 1 and "sp" not in f:
                continue  # sequence parallel is a no-op without tp: generated once, as sp=False
            if pp == 1 and "schedule" not in f and schedule != "1f1b":
                continue  # one pipeline stage: the schedule does not exist; generated once, as 1f1b
            for cp in self.cps(tp, pp):
                self._add_rows(cols, tp, pp, cp, sp, schedule, sharded)
        out = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}
        n = len(out["dp"])
        out |= {
            "gbs": np.full(n, self.gbs, dtype=np.int64),
            "gpus": np.full(n, self.gpus, dtype=np.int64),
            "node": np.full(n, self.node_size, dtype=np.int64),
        }
        return out

    def cps(self, tp: int, pp: int) -> list[int]:
        """Context-parallel sizes beside tp x pp: the pinned one, or every divisor of the remaining
        ranks (dp * cp) whose 2*cp chunks of the sequence keep MIN_CP_CHUNK tokens each (pinned dp:
        the one that completes it)."""
        f, rest, seq = self.fixed, self.gpus // (tp * pp), self.base.seq
        if "cp" in f:
            return [f["cp"]] if rest % f["cp"] == 0 and f.get("dp", rest // f["cp"]) * f["cp"] == rest else []
        chunked = lambda c: c == 1 or seq % (2 * c) == 0 and seq // (2 * c) >= MIN_CP_CHUNK
        if "dp" in f:
            c = rest // f["dp"]  # the cp a pinned dp leaves: searched only as an unpinned one would be
            return [c] if rest % f["dp"] == 0 and chunked(c) else []
        return [c for c in divisors(rest) if chunked(c)]

    def _add_rows(self, cols, tp, pp, cp, sp, schedule, sharded) -> None:
        """The grid rows of one tp x pp x cp shape: every vpp, mbs, HSDP group, last-stage cut and ep."""
        f, m = self.fixed, self.model
        dp = self.gpus // (tp * pp * cp)
        if "vpp" in f:
            vpps = [f["vpp"]]
        elif schedule == "interleaved-zb":
            vpps = [1]  # Qi et al.'s ZB-H1; more virtual stages when pinned (--vpp), as the search's cost allows
        elif schedule in LOOPED:
            per = m.layers // pp if m.layers % pp == 0 else 0
            vpps = [v for v in divisors(per) if v > 1] if per else [2]
            if not vpps:
                return  # one layer per stage: nothing to interleave
        elif schedule in V_SHAPE:
            vpps = [2]
            if m.layers % (2 * pp):
                return  # uneven stages are gpipe's and 1f1b's; the V needs 2pp equal stages
        else:
            vpps = [1]
        if "mbs" in f:
            mbss = [f["mbs"]]
        elif self.gbs % dp == 0:
            mbss = divisors(self.gbs // dp)
        else:  # gbs cannot be split over dp: powers of two, all refused by the batch rule
            mbss = [1 << i for i in range(max(1, self.gbs // dp).bit_length())]
        if "dp_shard" in f:
            shards = [f["dp_shard"]]
        else:
            shards = [0] + ([s for s in divisors(dp) if 1 < s < dp] if sharded else [])
        # expert parallelism: every ep dividing both dp and the routed experts (1 for a dense model)
        eps = [f["ep"]] if "ep" in f else [e for e in divisors(dp) if m.experts % e == 0] if m.is_moe else [1]
        for v in vpps:
            cuts = [f["last_less"]] if "last_less" in f else last_stage_cuts(m.layers, pp * v, schedule)
            for b in mbss:
                for s in shards:
                    for c in cuts:
                        for e in eps:
                            for k, x in zip(NUMERIC, (dp, tp, pp, v, b, s, c, cp, e)):
                                cols[k].append(x)

    def plan(self, grid: dict[str, np.ndarray], cats: dict, idx=None) -> Plan:
        """The array Plan of a group (optionally only the elements `idx`)."""
        num = {k: (grid[k] if idx is None else grid[k][idx]) for k in PLAN_ARRAYS}
        return dataclasses.replace(self.base, **num, **cats, seq=np.full(len(num["dp"]), self.base.seq, dtype=np.int64))

    def scalar(self, grid: dict[str, np.ndarray], cats: dict, i: int) -> Plan:
        """One element of a group as a plain Plan (Python ints, ready for `estimate`)."""
        return self.base.replace(**{k: int(grid[k][i]) for k in PLAN_ARRAYS}, **cats)


class Spaces:
    """Several Spaces of one model (other GPU counts, other global batches) searched as one: their
    grids are concatenated, so each formula still runs once per group. Each element carries its
    GPU count, node size and global batch. Memory-only passes use it (--min-gpus): the memory
    estimate depends on the GPU only through its capacity."""

    def __init__(self, spaces: list[Space]):
        self.spaces = spaces
        first = spaces[0]
        self.model, self.base = first.model, first.base
        self.families, self.variants, self.plan, self.scalar = (
            first.families,
            first.variants,
            first.plan,
            first.scalar,
        )
        self._grids: dict = {}

    def grid(self, sp: bool, schedule: str, sharded: bool = False) -> dict[str, np.ndarray]:
        key = (sp, schedule, sharded)
        if key not in self._grids:
            parts = [s.grid(*key) for s in self.spaces]
            self._grids[key] = {k: np.concatenate([g[k] for g in parts]) for k in parts[0]}
        return self._grids[key]
