"""search(): every legal plan of a model on a cluster, those that fit, ranked; and the answers
around it (the fewest GPUs, what a nothing-fits answer would take)."""

from __future__ import annotations

import time as _time
from dataclasses import dataclass, field

import numpy as np

from shardwise import units
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate, profiles
from shardwise.estimate.profiles import Profile, optimizer_bytes
from shardwise.search.space import OFFLOAD_ORDER, RECOMPUTE_ORDER, SCHEDULES, SEARCHED, Space, Spaces, check_fixed
from shardwise.search.vectorized import Nearest, Tally, evaluate, offloaded_bytes
from shardwise.spec import fp8
from shardwise.spec.hardware import Cluster, gpus
from shardwise.spec.plan import RULES, Plan
from shardwise.spec.presets import load_model

# GPU memory a plan must leave free, as a share of capacity. The estimate already counts the CUDA
# context and every buffer the engines allocate; this margin is for what a closed-form estimate
# cannot see: the caching allocator's fragmentation (PyTorch reserves more than it allocates),
# NCCL's communicator buffers, cuBLAS/cuDNN workspaces, a longer-than-average batch. 10% of an
# 80 GiB GPU is 8 GiB.
DEFAULT_HEADROOM = 0.10
# CPU memory per GPU for offloaded states, when --host-memory is not given: a DGX A100 has 1 TB of
# system memory for 8 GPUs (NVIDIA DGX A100 User Guide, "Hardware Overview"); DGX H100 and H200
# have 2 TB. Workstations usually have less: pass --host-memory.
DEFAULT_HOST_GIB_PER_GPU = 128
RANKS = ("throughput", "time", "cost")
# pinned fields a nothing-fits answer may suggest changing; seq, precision and optimizer are what
# the user trains, so a model that fits with none of the rest is an impossible request
UNPINNABLE = SEARCHED + ("gbs",)
MAX_GPUS = 1 << 17  # --min-gpus gives up past 131,072 GPUs (larger than any cluster built so far)
EXHAUSTIVE_NODES = 64  # --min-gpus tries every whole number of nodes up to this, then doubles


@dataclass(frozen=True)
class Options:
    """How plans are judged (everything but the model, the cluster and the pinned fields).
    `profile` may be given by name; it is held as the profile object (profiles.profile)."""

    profile: str | Profile = "torch"
    headroom: float = DEFAULT_HEADROOM
    host_memory_gib: float | None = None  # CPU memory per node for offload; None: the default above
    cross_node_tp: bool = False
    efficiency: float | None = None
    tokens: float = 0.0
    price: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "profile", profiles.profile(self.profile))

    def host_bytes(self, cluster: Cluster) -> float:
        """CPU bytes per node that offloaded states may use, less the headroom."""
        gib = self.host_memory_gib
        if gib is None:
            gib = DEFAULT_HOST_GIB_PER_GPU * cluster.gpus_per_node
        return gib * units.GIB * (1 - self.headroom)

    def evaluate(self, space: Space, cluster: Cluster, **kw):
        return evaluate(
            space,
            cluster,
            self.profile,
            1 - self.headroom,
            efficiency=self.efficiency,
            tokens=self.tokens,
            price=self.price,
            host_bytes=self.host_bytes(cluster),
            **kw,
        )


@dataclass
class Table:
    """Every fitting, non-dominated plan of a search as aligned arrays (one row per plan)."""

    cols: dict  # dp tp pp vpp mbs zero sp schedule recompute offload gpus tokens_per_s step_s mem_total
    refs: list  # per row: (space, cats, grid, i) to rebuild the Plan

    def __len__(self) -> int:
        return len(self.cols["tokens_per_s"])

    def best(self, mask=None) -> int | None:
        """Row of the highest tokens/s among `mask` (None: all), or None when empty."""
        tps = self.cols["tokens_per_s"] if mask is None else np.where(mask, self.cols["tokens_per_s"], -np.inf)
        if len(tps) == 0 or not np.isfinite(tps.max()):
            return None
        return int(np.argmax(tps))


@dataclass
class SearchResult:
    model: object
    cluster: Cluster
    gbs: int
    seq: int
    fixed: dict  # what the user pinned
    opts: Options
    rank: str
    ranked: list  # list[Estimate], best first (the top N)
    table: Table
    order: np.ndarray  # rows of `table`, best first
    tally: Tally
    closest: object = None  # Estimate of the plan nearest to fitting, when nothing fits
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return bool(self.ranked)

    @property
    def headroom(self) -> float:
        return self.opts.headroom

    def estimate_row(self, row: int):
        """The plain one-plan estimate of a table row."""
        space, cats, grid, i = self.table.refs[row]
        return _estimate(self.model, resized(self.cluster, space.gpus), space.scalar(grid, cats, i), self.opts)


def search(model, cluster: Cluster, *, top: int | None = 10, **kw) -> list:
    """Every legal plan that fits, ranked by predicted tokens/s (best first), as Estimates.

    Keyword arguments: any Plan field pins that field (tp=8, zero=1, gbs=512, seq=8192, ...);
    profile, headroom (share of GPU memory kept free, default 0.10), host_memory_gib (CPU memory
    per node for offload), rank ("throughput"; "time"/"cost" with tokens=, which also compare GPU
    counts up to the cluster's), efficiency, tokens, price, cross_node_tp. top=None: every plan.
    Returns [] when nothing fits under the pinned fields (run_search says what would); raises
    ShardwiseError when the request is impossible whatever the search chooses.
    """
    return run_search(model, cluster, top=top, **kw).ranked


def run_search(
    model,
    cluster: Cluster,
    *,
    profile: str = "torch",
    headroom: float = DEFAULT_HEADROOM,
    host_memory_gib: float | None = None,
    top: int | None = 10,
    rank: str = "throughput",
    efficiency: float | None = None,
    tokens: float = 0.0,
    price: float | None = None,
    cross_node_tp: bool = False,
    **fixed,
) -> SearchResult:
    t0 = _time.perf_counter()
    model = load_model(model)
    opts = Options(profile, headroom, host_memory_gib, cross_node_tp, efficiency, tokens, price)
    _check_options(opts, rank, cluster, top)
    check_fixed(fixed)
    fp8.check_gpu(fixed.get("precision", ""), cluster.gpu)  # an FP8 plan is searched on FP8 GPUs only
    counts = sweep_counts(cluster) if rank != "throughput" else [cluster.gpus]
    tally, nearest, parts = Tally(), (Nearest(), None), []
    for g in counts:
        cl = resized(cluster, g)
        space = fitting_space(model, cl, fixed, opts)[0]
        scored, t, near = opts.evaluate(space, cl)
        tally.add(t)
        parts.append((space, scored))
        if near.ratio < nearest[0].ratio:
            nearest = (near, space)
    main = parts[-1][0]
    if tally.legal == 0:  # every candidate broke a rule: the request itself is impossible
        raise ShardwiseError(_no_legal_plan(model, cluster, fixed, tally))
    table = _table(parts)
    res = SearchResult(
        model, cluster, main.gbs, main.base.seq, fixed, opts, rank, [], table, _order(table, rank), tally
    )
    n = len(res.order) if top is None else min(top, len(res.order))
    res.ranked = [res.estimate_row(int(r)) for r in res.order[:n]]
    if not res.ranked and nearest[1] is not None:
        near, space = nearest
        res.closest = _estimate(model, resized(cluster, space.gpus), space.scalar(near.grid, near.cats, near.i), opts)
        held = {k: v for k, v in fixed.items() if k not in UNPINNABLE}
        if held == fixed:
            raise ShardwiseError(_impossible(res, held, res.tally.min_total))
        _, fits, least = fitting_space(model, cluster, held, opts)
        if not fits:
            raise ShardwiseError(_impossible(res, held, least))
    res.seconds = _time.perf_counter() - t0
    return res


# ---- the global batch, and "does anything fit?" ----------------------------------------------
def fitting_space(model, cluster: Cluster, fixed: dict, opts: Options) -> tuple[Space, bool, float]:
    """The Space to search, whether any plan fits in it, and the least GPU memory any of its plans
    needs (when none fits: a larger GPU needs at least that much). An unpinned gbs is the default
    (about 4M tokens, reachable by every dp of the cluster up to that many sequences) unless no
    plan fits with it, then the nearest batch to it that some plan fits (space.gbs_candidates)."""
    space = Space(model, cluster.gpus, cluster.node_size, fixed, opts.cross_node_tp)
    least = float("inf")
    for gbs in space.gbs_candidates:
        s = space if gbs == space.gbs else space.with_gbs(gbs)
        tally = opts.evaluate(s, cluster, time=False, stop_at_first_fit=True)[1]
        if tally.fit:
            return s, True, tally.min_total
        least = min(least, tally.min_total)
    return space, False, least


def capacity_bound(model, cluster: Cluster, fixed: dict, opts: Options) -> int:
    """Fewer GPUs than this cannot hold one copy of the parameters and optimizer states, whatever
    the plan: every plan keeps each parameter's stored copy and its optimizer state at least once,
    on some GPU or (offloaded) in its node's CPU memory. From the profile's own bytes per
    parameter (shardwise.estimate.profiles), e.g. 4 + 8 = 12 for AdamW under `torch` bf16-mixed."""

    base = Plan(**{k: v for k, v in fixed.items() if k in ("precision", "optimizer")})
    sb = opts.profile.state_bytes(base.precision)
    need = sum(
        sb.param * _numel(shape) + optimizer_bytes(base.optimizer, shape, sb) for _, shape in model.param_shapes()
    )
    per_gpu = (1 - opts.headroom) * cluster.gpu.memory_bytes + opts.host_bytes(cluster) / cluster.gpus_per_node
    return max(1, -(-int(need) // int(per_gpu)))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def gpu_counts(gpus_per_node: int, start: int = 1, limit: int = MAX_GPUS) -> list[int]:
    """The counts --min-gpus tries, ascending: 1, 2, 4, ... below a node; every whole number of
    nodes up to EXHAUSTIVE_NODES; then doubling numbers of nodes."""
    node = gpus_per_node
    out = [c for c in (1 << i for i in range(node.bit_length())) if c < node]
    out += [k * node for k in range(1, EXHAUSTIVE_NODES + 1)]
    k = 2 * EXHAUSTIVE_NODES
    while k * node <= limit:
        out.append(k * node)
        k *= 2
    return [c for c in out if start <= c <= limit]


def fewest_gpus(
    model, cluster: Cluster, fixed: dict, opts: Options, *, start: int = 1, limit: int = MAX_GPUS
) -> int | None:
    """The smallest count of gpu_counts() (of `cluster`'s GPU, node size and network) on which some
    plan fits (with an unpinned gbs: any of each count's candidate batches), or None up to `limit`.
    Counts are checked one at a time, ascending, each in one memory-only pass that stops at its first
    fitting plan (most frugal families first): a count's grid holds tens of thousands of plans per
    family, so passing many counts at once costs their sum, and the answer is usually an early count."""
    model = load_model(model)
    start = max(start, capacity_bound(model, cluster, fixed, opts))
    for g in gpu_counts(cluster.gpus_per_node, start, limit):
        s = Space(model, g, min(g, cluster.gpus_per_node), fixed, opts.cross_node_tp)
        spaces = [s if b == s.gbs else s.with_gbs(b) for b in s.gbs_candidates if s.tp_pp]
        if spaces and opts.evaluate(Spaces(spaces), cluster, time=False, stop_at_first_fit=True)[1].fit_gpus:
            return g
    return None


def resized(cluster: Cluster, gpus: int) -> Cluster:
    return cluster if gpus == cluster.gpus else Cluster(cluster.gpu, gpus, cluster.gpus_per_node, cluster.network)


def sweep_counts(cluster: Cluster) -> list[int]:
    """GPU counts compared when ranking by time or cost: powers of two below a node, then
    power-of-two numbers of nodes, then the whole cluster (ascending, the whole cluster last)."""
    node, total = cluster.gpus_per_node, cluster.gpus
    out = [c for c in (1 << i for i in range(node.bit_length())) if c < min(node, total)]
    k = node
    while k < total:
        out.append(k)
        k *= 2
    return out + [total]


# ---- ranking ------------------------------------------------------------------------------
def _table(parts) -> Table:
    cols: dict[str, list] = {
        k: []
        for k in (
            "dp",
            "tp",
            "pp",
            "vpp",
            "mbs",
            "dp_shard",
            "last_less",
            "cp",
            "ep",
            "zero",
            "sp",
            "schedule",
            "recompute",
            "offload",
            "gpus",
            "tokens_per_s",
            "step_s",
            "mem_total",
        )
    }
    refs = []
    for space, scored in parts:
        for s in scored:
            n = len(s.idx)
            for k in ("dp", "tp", "pp", "vpp", "mbs", "dp_shard", "last_less", "cp", "ep"):
                cols[k].append(s.grid[k][s.idx])
            codes = {
                "zero": s.cats["zero"],
                "sp": int(s.cats["sp"]),
                "schedule": SCHEDULES.index(s.cats["schedule"]),
                "recompute": RECOMPUTE_ORDER.index(s.cats["recompute"]),
                "offload": OFFLOAD_ORDER.index(s.cats["offload"]),
                "gpus": space.gpus,
            }
            for k, v in codes.items():
                cols[k].append(np.full(n, v, dtype=np.int64))
            cols["tokens_per_s"].append(s.tokens_per_s)
            cols["step_s"].append(s.step_s)
            cols["mem_total"].append(s.mem_total)
            refs.extend((space, s.cats, s.grid, int(i)) for i in s.idx)
    floats = ("tokens_per_s", "step_s")
    arrays = {
        k: (np.concatenate(v) if v else np.zeros(0, dtype=np.float64 if k in floats else np.int64))
        for k, v in cols.items()
    }
    return Table(arrays, refs)


def rank_key(tokens_per_s, gpus, rank: str):
    """Smaller is better. time to train a fixed budget ~ 1/tokens_per_s; its cost ~ GPUs/tokens_per_s
    (the price per GPU-hour is the same for every plan); at one GPU count all three agree.
    Rounded to 12 significant digits: plans the model prices the same (e.g. ZeRO-2 and ZeRO-3 with
    all communication hidden) tie exactly, whatever the last bit of float arithmetic says."""
    key = {"throughput": -tokens_per_s, "time": 1 / tokens_per_s}.get(rank, gpus / tokens_per_s)
    key = np.asarray(key, dtype=np.float64)
    scale = 10.0 ** (11 - np.floor(np.log10(np.abs(key))))
    return np.round(key * scale) / scale


def _order(table: Table, rank: str) -> np.ndarray:
    """Rows best first: by the ranking, then less memory, then the order plans were generated in."""
    c = table.cols
    return np.lexsort((np.arange(len(table)), c["mem_total"], rank_key(c["tokens_per_s"], c["gpus"], rank)))


def _estimate(model, cluster, plan, opts: Options):
    return estimate(
        model, cluster, plan, opts.profile, efficiency=opts.efficiency, tokens=opts.tokens, price=opts.price
    )


# ---- errors and nothing-fits ------------------------------------------------------------------
def _check_options(opts: Options, rank, cluster, top) -> None:
    if not isinstance(opts.headroom, (int, float)) or not 0 <= opts.headroom < 1:
        raise ShardwiseError(f"headroom must be a fraction in [0, 1), e.g. 0.1 for 10%, got {opts.headroom!r}")
    if opts.host_memory_gib is not None and not opts.host_memory_gib >= 0:
        raise ShardwiseError(f"host memory must be >= 0 GiB per node, got {opts.host_memory_gib!r}")
    if rank not in RANKS:
        raise ShardwiseError(f"unknown ranking {rank!r}; rank by one of {', '.join(RANKS)}")
    if rank != "throughput" and not opts.tokens:
        raise ShardwiseError(f"ranking by {rank} needs a token budget: pass --tokens (e.g. 2T)")
    if rank == "cost" and not (opts.price if opts.price is not None else cluster.gpu.price_per_hour):
        raise ShardwiseError(f"the catalog has no price for {cluster.gpu.name}; pass --price (USD per GPU-hour)")
    if opts.efficiency is not None and not 0 < opts.efficiency <= 1:
        raise ShardwiseError(f"efficiency must be in (0, 1], got {opts.efficiency}")
    if top is not None and (not isinstance(top, int) or top < 1):
        raise ShardwiseError(f"top must be a positive integer, got {top!r}")


def _no_legal_plan(model, cluster, fixed: dict, tally: Tally) -> str:
    """One line: the rule that refused the most candidates (a pinned field, usually)."""
    counts = +tally.rejected  # (drops zero counts)
    counts.pop("memory", None)
    counts.pop("host memory", None)
    if counts:
        return f"no legal plan: {tally.examples[counts.most_common(1)[0][0]]}"
    if "options" in tally.examples:  # every group's options contradict each other
        return f"no legal plan: {tally.examples['options']}"

    # nothing was generated: the pinned dp/tp/pp cannot multiply into the GPU count. Name a rule
    # the pinned values break on their own (tp vs heads, ...) before the GPU count itself.
    tp, pp = fixed.get("tp", 1), fixed.get("pp", 1)
    probe = Plan(**fixed).replace(dp=fixed.get("dp", max(1, cluster.gpus // (tp * pp))))
    probe = probe.replace(gbs=fixed.get("gbs", probe.dp * probe.mbs * probe.pp))
    broken = [r for r in RULES if r.broken(probe, model, cluster.gpus)]
    broken.sort(key=lambda r: {"divisibility": 0, "gpus": 1}.get(r.reason, 2))
    return "no legal plan: " + (
        broken[0].message(probe, model, cluster.gpus) if broken else "no candidate for these pinned fields"
    )


def _impossible(res: SearchResult, held: dict, least: float) -> str:
    """One line for a model that no plan fits on this cluster, whatever the search may choose:
    the closest plan, a sound lower bound on the GPUs it needs, and a larger GPU that fits."""

    m, cl, c = res.model, res.cluster, res.closest
    usable = (1 - res.headroom) * c.memory.capacity
    bound = capacity_bound(m, cl, held, res.opts)
    need = [f"its parameters and optimizer states alone need {bound} such GPUs"] if bound > cl.gpus else []
    bigger = larger_gpu(m, cl, held, res.opts, least)
    if bigger:
        need.append(f"{cl.gpus}x {bigger.name} ({bigger.memory_gib:g} GiB) would fit it")
    if c.memory.total <= usable:  # it fits the GPU: the offloaded states overflow the host memory
        host = offloaded_bytes(m, cl, c.plan, res.opts.profile) * min(cl.gpus, cl.gpus_per_node)
        why = (
            f"fits in GPU memory ({units.gib(c.memory.total, 1)} of {units.gib(usable, 1)}) but offloads {units.gib(host, 1)} per node, "
            f"more than the {units.gib(res.opts.host_bytes(cl), 1)} of host memory it may use (--host-memory)"
        )
    else:
        why = f"needs {units.gib(c.memory.total, 1)} per GPU of {units.gib(usable, 1)} usable"
    return (
        f"{m.name} does not fit on {cl.gpus}x {cl.gpu.name} with any plan the "
        f"{res.opts.profile.name} profile allows (its ZeRO stages, tp, pp, recompute and offload all tried): the closest, {c.plan.short()}, {why}; {'; '.join(need + [''])}"
        "`--min-gpus` finds how many GPUs it needs"
    )


def larger_gpu(model, cluster: Cluster, fixed: dict, opts: Options, least: float = 0.0):
    """The catalog GPU with the least memory above this one's on which some plan fits (same GPU
    count, node size and network), or None. A plan's needs do not depend on the GPU's memory, so
    what fits on one GPU fits on any with more (a property test holds this): bisect the catalog by
    memory, skipping GPUs below `least` (the least memory any plan needs)."""

    budget = lambda g: (1 - opts.headroom) * g.memory_bytes
    cands = sorted(
        (g for g in gpus().values() if g.memory_gib > cluster.gpu.memory_gib and budget(g) >= least),
        key=lambda g: (g.memory_gib, g.name),
    )
    fits = lambda g: fitting_space(
        model,
        Cluster(
            g,
            cluster.gpus,
            cluster.gpus_per_node,
            cluster.network,
        ),
        fixed,
        opts,
    )[1]
    if not cands or not fits(cands[-1]):
        return None
    lo, hi = 0, len(cands) - 1  # cands[hi] fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(cands[mid]) else (mid + 1, hi)
    return cands[hi]


def what_it_would_take(res: SearchResult) -> list[str]:
    """For a nothing-fits answer: each change that would make a plan fit, with the best such plan."""

    o, m, cl, c = res.opts, res.model, res.cluster, res.closest
    kw = dict(
        profile=o.profile,
        headroom=o.headroom,
        host_memory_gib=o.host_memory_gib,
        efficiency=o.efficiency,
        tokens=o.tokens,
        price=o.price,
        cross_node_tp=o.cross_node_tp,
        top=1,
    )
    best = lambda r: (
        f"{r.ranked[0].plan.short()} ({units.gib(r.ranked[0].memory.total, 1)}/GPU, "
        f"{r.ranked[0].time.tokens_per_s:,.0f} tokens/s)"
    )
    out = []
    if c is not None and o.headroom > 0 and c.memory.total <= c.memory.capacity:
        out.append(
            f"less headroom: {c.plan.short()} uses {c.memory.total / c.memory.capacity:.1%} of the GPU, "
            f"over the {1 - o.headroom:.0%} allowed by --headroom {o.headroom:g}"
        )
    for f in [k for k in res.fixed if k in UNPINNABLE]:
        rest = {k: v for k, v in res.fixed.items() if k != f}
        try:
            r = run_search(m, cl, **kw, **rest)
        except ShardwiseError:
            continue
        if r.ranked:
            out.append(f"unpin --{f} {res.fixed[f]}: {best(r)}")
    n = fewest_gpus(m, cl, res.fixed, o, start=cl.gpus + 1, limit=max(8 * cl.gpus, 64 * cl.gpus_per_node))
    if n:
        out.append(f"more GPUs: {n} {cl.gpu.name} fit {best(run_search(m, resized(cl, n), **kw, **res.fixed))}")
    g = larger_gpu(m, cl, res.fixed, o, res.tally.min_total)
    if g:
        other = Cluster(g, cl.gpus, cl.gpus_per_node, cl.network)
        out.append(
            f"a larger GPU: {cl.gpus}x {g.name} ({g.memory_gib:g} GiB) fit "
            f"{best(run_search(m, other, **kw, **res.fixed))}"
        )
    return out
