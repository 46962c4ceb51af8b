"""search(): every legal plan of a model on a cluster, those that fit, ranked; and the answers
around it (fewest GPUs, what nothing-fits would take)."""
from __future__ import annotations

import time as _time
from dataclasses import dataclass, field

import numpy as np

from shardwise.errors import ShardwiseError
from shardwise.search.space import OFFLOAD_ORDER, RECOMPUTE_ORDER, SCHEDULES, SEARCHED, Space, check_fixed
from shardwise.search.vectorized import Nearest, Tally, evaluate
from shardwise.spec.hardware import Cluster
from shardwise.spec.model import load_model

# Memory a plan must leave free, as a share of the GPU's memory. The estimate already counts the
# CUDA context, the allocator's reserve and the kernels' workspace (Memory.overhead); this is the
# margin for what a closed-form estimate cannot see (fragmentation spikes, NCCL's lazily grown
# buffers, a longer-than-average batch) so a plan ranked "fits" does not OOM at step 1000.
DEFAULT_HEADROOM = 0.10
RANKS = ("throughput", "time", "cost")
MAX_GPUS = 1 << 20  # --min-gpus gives up past a million GPUs: then no count will do


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
    fixed: dict
    headroom: float
    rank: str
    ranked: list  # list[Estimate], best first (the top N)
    table: Table
    order: np.ndarray  # rows of `table`, best first
    tally: Tally
    closest: object = None  # Estimate of the plan nearest to fitting, when nothing fits
    seconds: float = 0.0
    options: dict = field(default_factory=dict)  # profile, efficiency, tokens, price

    @property
    def fits(self) -> bool:
        return bool(self.ranked)

    def estimate_row(self, row: int):
        """The plain one-plan estimate of a table row."""
        from shardwise.estimate import estimate

        space, cats, grid, i = self.table.refs[row]
        cl = self.cluster if space.gpus == self.cluster.gpus else _resized(self.cluster, space.gpus)
        o = self.options
        return estimate(self.model, cl, space.scalar(grid, cats, i), o["profile"], efficiency=o["efficiency"],
                        tokens=o["tokens"], price=o["price"])


def search(model, cluster: Cluster, *, top: int | None = 10, **kw) -> list:
    """Every legal plan that fits, ranked by predicted tokens/s (best first), as Estimates.

    Keyword arguments: any Plan field pins that field (tp=8, zero=1, gbs=512, seq=8192, ...);
    profile, headroom (share of GPU memory kept free, default 0.10), rank ("throughput", or
    "time"/"cost" with tokens=: then GPU counts up to the cluster's are compared too),
    efficiency, tokens, price, cross_node_tp. top=None returns every fitting plan.
    Returns [] when nothing fits; see run_search for the why.
    """
    return run_search(model, cluster, top=top, **kw).ranked


def run_search(model, cluster: Cluster, *, profile: str = "torch", headroom: float = DEFAULT_HEADROOM,
               top: int | None = 10, rank: str = "throughput", efficiency: float | None = None,
               tokens: float = 0.0, price: float | None = None, cross_node_tp: bool = False,
               **fixed) -> SearchResult:
    t0 = _time.perf_counter()
    model = load_model(model)
    _check_options(headroom, rank, tokens, price, cluster, efficiency, top)
    check_fixed(fixed)
    counts = sweep_counts(cluster) if rank != "throughput" else [cluster.gpus]
    opts = {"profile": profile, "efficiency": efficiency, "tokens": tokens, "price": price}
    tally, nearest, parts = Tally(), (Nearest(), None), []
    for g in counts:
        space = Space(model, g, min(g, cluster.gpus_per_node), fixed, cross_node_tp)
        scored, t, near = evaluate(space, _resized(cluster, g), profile, 1 - headroom, efficiency=efficiency,
                                   tokens=tokens, price=price)
        tally.add(t)
        parts.append((space, scored))
        if near.ratio < nearest[0].ratio:
            nearest = (near, space)
    main_space = parts[-1][0]
    if tally.legal == 0:  # every candidate broke a rule: the request itself is impossible
        raise ShardwiseError(_no_legal_plan(tally))
    table = _table(parts)
    order = _order(table, rank, cluster, price)
    res = SearchResult(model, cluster, main_space.gbs, main_space.base.seq, fixed, headroom, rank, [], table,
                       order, tally, options=opts)
    n = len(order) if top is None else min(top, len(order))
    res.ranked = [res.estimate_row(int(r)) for r in order[:n]]
    if not res.ranked and nearest[1] is not None:
        near, space = nearest
        res.closest = _estimate_plan(model, _resized(cluster, space.gpus), space.scalar(near.grid, near.cats, near.i),
                                     opts)
        held = {k: v for k, v in fixed.items() if k not in SEARCHED}
        if held == fixed or not _anything_fits(model, cluster, held, profile, headroom, cross_node_tp):
            raise ShardwiseError(_impossible(res, held, profile, cross_node_tp))
    res.seconds = _time.perf_counter() - t0
    return res


# ---- helpers ---------------------------------------------------------------------------
def _check_options(headroom, rank, tokens, price, cluster, efficiency, top) -> None:
    if not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise ShardwiseError(f"headroom must be a fraction in [0, 1), e.g. 0.1 for 10%, got {headroom!r}")
    if rank not in RANKS:
        raise ShardwiseError(f"unknown ranking {rank!r}; rank by one of {', '.join(RANKS)}")
    if rank != "throughput" and not tokens:
        raise ShardwiseError(f"ranking by {rank} needs a token budget: pass --tokens (e.g. 2T)")
    if rank == "cost" and not (price if price is not None else cluster.gpu.price_per_hour):
        raise ShardwiseError(f"the catalog has no price for {cluster.gpu.name}; pass --price (USD per GPU-hour)")
    if efficiency is not None and not 0 < efficiency <= 1:
        raise ShardwiseError(f"efficiency must be in (0, 1], got {efficiency}")
    if top is not None and (not isinstance(top, int) or top < 1):
        raise ShardwiseError(f"top must be a positive integer, got {top!r}")


def _resized(cluster: Cluster, gpus: int) -> Cluster:
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


def _table(parts) -> Table:
    cols: dict[str, list] = {k: [] for k in ("dp", "tp", "pp", "vpp", "mbs", "zero", "sp", "schedule", "recompute",
                                             "offload", "gpus", "tokens_per_s", "step_s", "mem_total")}
    refs = []
    for space, scored in parts:
        for s in scored:
            n = len(s.idx)
            for k in ("dp", "tp", "pp", "vpp", "mbs"):
                cols[k].append(s.grid[k][s.idx])
            codes = {"zero": s.cats["zero"], "sp": int(s.cats["sp"]), "schedule": SCHEDULES.index(s.cats["schedule"]),
                     "recompute": RECOMPUTE_ORDER.index(s.cats["recompute"]),
                     "offload": OFFLOAD_ORDER.index(s.cats["offload"]), "gpus": space.gpus}
            for k, v in codes.items():
                cols[k].append(np.full(n, v, dtype=np.int64))
            cols["tokens_per_s"].append(s.tokens_per_s)
            cols["step_s"].append(s.step_s)
            cols["mem_total"].append(s.mem_total)
            refs.extend((space, s.cats, s.grid, int(i)) for i in s.idx)
    arrays = {k: (np.concatenate(v) if v else np.zeros(0, dtype=np.float64 if k in ("tokens_per_s", "step_s")
                                                        else np.int64)) for k, v in cols.items()}
    return Table(arrays, refs)


def _order(table: Table, rank: str, cluster: Cluster, price) -> np.ndarray:
    """Rows best first: by the ranking metric, then less memory, then generation order."""
    c = table.cols
    if rank == "throughput":
        key = -c["tokens_per_s"]
    elif rank == "time":
        key = 1 / c["tokens_per_s"]  # time to train a fixed budget
    else:  # cost: GPU-hours for a fixed budget (times a price that is the same for every plan)
        key = c["gpus"] / c["tokens_per_s"]
    gen = np.arange(len(table))
    return np.lexsort((gen, c["mem_total"], key))


def _estimate_plan(model, cluster, plan, opts):
    from shardwise.estimate import estimate

    return estimate(model, cluster, plan, opts["profile"], efficiency=opts["efficiency"], tokens=opts["tokens"],
                    price=opts["price"])


def _no_legal_plan(tally: Tally) -> str:
    """One line: the rule that refused the most candidates (a pinned field, usually)."""
    counts = tally.rejected.copy()
    counts.pop("memory", None)
    if counts:
        reason = counts.most_common(1)[0][0]
        return f"no legal plan: {tally.examples[reason]}"
    if "options" in tally.examples:
        return f"no legal plan: {tally.examples['options']}"
    return "no candidate plan for this model and GPU count; check the pinned fields"


# ---- fewest GPUs, and what a nothing-fits answer would take -----------------------------------
def _anything_fits(model, cluster: Cluster, fixed: dict, profile: str, headroom: float, cross_node_tp: bool) -> bool:
    space = Space(model, cluster.gpus, cluster.node_size, fixed, cross_node_tp)
    scored, tally, _ = evaluate(space, cluster, profile, 1 - headroom, time=False, stop_at_first_fit=True)
    return tally.fit > 0


def gpu_counts(gpus_per_node: int, start: int = 1):
    """Counts --min-gpus tries, ascending: powers of two below a node, then whole nodes."""
    for c in (1 << i for i in range(gpus_per_node.bit_length())):
        if start <= c < gpus_per_node:
            yield c
    k = max(1, -(-start // gpus_per_node))
    while k * gpus_per_node <= MAX_GPUS:
        yield k * gpus_per_node
        k += 1


def fewest_gpus(model, cluster: Cluster, fixed: dict, *, profile: str = "torch",
                headroom: float = DEFAULT_HEADROOM, cross_node_tp: bool = False, start: int = 1,
                limit: int = MAX_GPUS) -> int | None:
    """The smallest GPU count (of `cluster`'s GPU, node size and network) on which some plan fits,
    or None up to `limit`. Whole nodes are probed at doubling sizes first, so a model that fits
    nowhere costs ~20 probes, then every count below the first fit is tried in order."""
    model = load_model(model)
    fits = lambda g: _anything_fits(model, _resized(cluster, g), fixed, profile, headroom,  # noqa: E731
                                    cross_node_tp)
    node = cluster.gpus_per_node
    for g in gpu_counts(node, start):
        if g >= node:
            break
        if g <= limit and fits(g):
            return g
    k0 = max(1, -(-start // node))  # first whole number of nodes to try
    k = k0
    while k * node <= limit and not fits(k * node):
        k *= 2
    if k * node > limit:
        hi = limit // node
        if hi < k0 or not fits(hi * node):
            return None
        k = hi
    for j in range(k0, k):  # the doubling skipped most of these
        if fits(j * node):
            return j * node
    return k * node


def _impossible(res: SearchResult, held: dict, profile: str, cross_node_tp: bool) -> str:
    """One line for a model that no plan fits on this cluster, whatever the search may choose."""
    from shardwise.search.explain import gib

    m, cl, c = res.model, res.cluster, res.closest
    usable = (1 - res.headroom) * c.memory.capacity
    n = fewest_gpus(m, cl, held, profile=profile, headroom=res.headroom, cross_node_tp=cross_node_tp,
                    start=cl.gpus + 1)
    bigger = larger_gpu(m, cl, held, profile, res.headroom, cross_node_tp)
    need = (f"it needs at least {n} {cl.gpu.name} GPUs" if n else
            f"no number of {cl.gpu.name} GPUs is enough")
    if bigger:
        need += f", or a larger GPU ({bigger.name}, {bigger.memory_gib:g} GiB)"
    return (f"{m.name} does not fit on {cl.gpus}x {cl.gpu.name} with any plan (ZeRO 0-3, tp, pp, recompute and "
            f"offload all tried): the closest, {c.plan.short()}, needs {gib(c.memory.total)} per GPU of "
            f"{gib(usable)} usable; {need}")


def larger_gpu(model, cluster: Cluster, fixed: dict, profile: str, headroom: float, cross_node_tp: bool):
    """The catalog GPU with the least memory above this one's on which some plan fits (same GPU
    count, node size and network), or None."""
    from shardwise.spec.hardware import gpus

    for g in sorted(gpus().values(), key=lambda g: (g.memory_gib, g.name)):
        if g.memory_gib <= cluster.gpu.memory_gib:
            continue
        other = Cluster(g, cluster.gpus, cluster.gpus_per_node, cluster.network)
        if _anything_fits(model, other, fixed, profile, headroom, cross_node_tp):
            return g
    return None


def what_it_would_take(res: SearchResult, cross_node_tp: bool = False) -> list[str]:
    """For a nothing-fits answer: each change that would make a plan fit, with that plan."""
    from shardwise.search.explain import gib

    o, m, cl, c = res.options, res.model, res.cluster, res.closest
    out = []
    kw = dict(profile=o["profile"], headroom=res.headroom, efficiency=o["efficiency"], tokens=o["tokens"],
              price=o["price"], cross_node_tp=cross_node_tp, top=1)
    if c is not None and res.headroom > 0 and c.memory.total <= c.memory.capacity:
        out.append(f"less headroom: {c.plan.short()} uses {c.memory.total / c.memory.capacity:.1%} of the GPU, "
                   f"over the {1 - res.headroom:.0%} allowed (--headroom {res.headroom:g})")
    for f in [k for k in res.fixed if k in SEARCHED]:
        rest = {k: v for k, v in res.fixed.items() if k != f}
        try:
            r = run_search(m, cl, **kw, **rest)
        except ShardwiseError:
            continue
        if r.ranked:
            e = r.ranked[0]
            out.append(f"unpin --{f.replace('_', '-')} {res.fixed[f]}: {e.plan.short()} fits "
                       f"({gib(e.memory.total)}, {e.time.tokens_per_s:,.0f} tokens/s)")
    n = fewest_gpus(m, cl, res.fixed, profile=o["profile"], headroom=res.headroom, cross_node_tp=cross_node_tp,
                    start=cl.gpus + 1)
    if n:
        e = run_search(m, _resized(cl, n), **kw, **res.fixed).ranked[0]
        out.append(f"more GPUs: {n} {cl.gpu.name} ({max(1, n // cl.gpus_per_node)} node(s)) fit {e.plan.short()} "
                   f"({e.time.tokens_per_s:,.0f} tokens/s)")
    g = larger_gpu(m, cl, res.fixed, o["profile"], res.headroom, cross_node_tp)
    if g:
        other = Cluster(g, cl.gpus, cl.gpus_per_node, cl.network)
        e = run_search(m, other, **kw, **res.fixed).ranked[0]
        out.append(f"a larger GPU: {cl.gpus}x {g.name} ({g.memory_gib:g} GiB) fit {e.plan.short()} "
                   f"({e.time.tokens_per_s:,.0f} tokens/s)")
    return out
