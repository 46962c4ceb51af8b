"""Every collective of one training step, as rank 0 sees it (first pipeline stage, tp and dp rank 0).

Cost model (the ring algorithms NCCL uses for large messages), for one call moving a buffer of
S bytes among N ranks over a link of bandwidth B (GB/s per GPU per direction, times the link's
efficiency) and per-step latency a:
    all-reduce       sends 2(N-1)/N * S    time 2(N-1)*a + 2(N-1)/N * S/B
    all-gather       sends (N-1)/N * S     time  (N-1)*a +  (N-1)/N * S/B   (S = the gathered buffer)
    reduce-scatter   sends (N-1)/N * S     time  (N-1)*a +  (N-1)/N * S/B   (S = the unreduced buffer)
    broadcast        pipelined chain (NCCL's ring broadcast): every rank but the chain's last
                     forwards all S, so a rank sends (N-1)/N * S on average; time (N-1)*a + S/B
    send / recv      S over one hop: time a + S/B (a recv sends nothing: wire_bytes 0)
Tiny messages at large N pay 2(N-1)*a here, where NCCL would switch to a tree: an overestimate
of latency only, and only for the loss/grad-norm all-reduce. A hardware file from `shardwise
calibrate` gives each kind its own a and B (GPU.link_kinds, Network.kinds), fitted to that
collective's timings on the real backend; the catalog gives one a and B for all.

The link is the one the group spans (contract item 1, mesh (pp, dp, tp), tp innermost): a group
of size s and stride t lies inside one node iff s*t <= GPUs per node; tp has stride 1, dp stride
tp, pp stride dp*tp, the whole world stride 1.

Profiles: what each engine sends is said once, by its object in profiles.py: the dtypes it
carries (Profile.dtypes), its tensor-parallel layout (DTensor's, _tp, or Megatron's f/g operators,
_megatron_tp), its data-parallel collectives per ZeRO stage (a table of profiles.Send, _sent; the
torch profile's are its engines' own, bucket by bucket and group by group, _torch_dp), and whether
the run tier's per-step all-reduces are sent (_engine).

MoE: experts are TP-sharded like the dense FFN (the FFN is one TP region per layer, torchtitan's
MoE plan); with ep > 1 the routed experts are split over the EP group, tokens reach them by
all-to-all, and their gradients go over dp / ep ranks (_ep, estimate/experts.py).

Numeric plan fields may be numpy arrays (the search): then every entry of the profile's fixed
list is returned with array fields, count 0 where the group has one rank. With scalars, entries
of size-1 groups (and other zero counts) are dropped.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import NamedTuple

from shardwise.errors import ShardwiseError
from shardwise.estimate import _num, context, experts, profiles
from shardwise.estimate._num import ceil_div, memo, where
from shardwise.estimate.memory import zero1_bucket_numels
from shardwise.estimate.pipeline import chunk_blocks, chunks_per_rank, rank_blocks, vee
from shardwise.estimate.profiles import DDP_BUCKET, DDP_FIRST_BUCKET, Profile
from shardwise.estimate.profiles import PROFILES as PROFILES
from shardwise.spec.breakdown import Collective
from shardwise.spec.fp8 import FP8_BYTES, fp8_all_gather
from shardwise.spec.plan import recompute_every, recompute_kind

LOSS_REDUCE_BYTES = 8  # the engine's one all-reduce of [loss, squared grad norm] in fp32
CE_REDUCES = 3  # Megatron's vocab-parallel cross-entropy: max, sum of exp, target logit


# ---- the parameters rank 0 holds -------------------------------------------------------------
def tp_style(name: str) -> str:
    """How the contract's TP layout cuts a parameter (run/parallelize.apply_tp): "col" shards
    dim 0 (q/k/v/w1/w3 and their biases, the vocab-parallel embeddings, the output), "row" dim 1
    (wo/w2 weights), "rep" keeps it whole (norms, router, wo/w2 biases)."""
    module, kind = name.split(".")[-2:]
    if module in ("wq", "wk", "wv", "w1", "w3", "tok_embeddings", "pos_embeddings", "output"):
        return "col"
    if module in ("wo", "w2"):
        return "row" if kind == "weight" else "rep"
    return "rep"


def local_numel(style: str, shape: tuple, tp):
    """Elements of tp rank 0's piece (torch.chunk: rank 0 holds ceil(d/tp) of an uneven dim)."""
    if style == "col":
        rest = 1
        for d in shape[1:]:
            rest *= d
        return ceil_div(shape[0], tp) * rest
    if style == "row":
        return shape[0] * ceil_div(shape[1], tp)
    n = 1
    for d in shape:
        n *= d
    return n


def fsdp_numel(style: str, shape: tuple, tp, dp):
    """Elements of the tp-local tensor padded to a multiple of dp on dim 0 (FSDP2's shards)."""
    if len(shape) == 1:
        return ceil_div(local_numel(style, shape, tp), dp) * dp
    d0 = ceil_div(shape[0], tp) if style == "col" else shape[0]
    return ceil_div(d0, dp) * dp * (local_numel(style, shape, tp) // d0)


@cache
def _block_params(model) -> tuple:
    """One block's (name, shape) in the order the forward uses them: registration order, except
    that each SwiGLU MLP runs w1, w3, then w2 (w2(silu(w1 x) * w3 x))."""
    ps = model.layer_param_shapes()
    order = {"w1": 0, "w3": 1, "w2": 2}
    first: dict[str, int] = {}
    keys = []
    for i, (name, _) in enumerate(ps):
        parts = name.split(".")
        prefix, module = ".".join(parts[:-2]), parts[-2]
        if prefix.startswith("feed_forward") and module in order:
            keys.append((first.setdefault(prefix, i), order[module], i))
        else:
            keys.append((i, 0, i))
    return tuple(ps[k[2]] for k in sorted(keys))


@cache
def _root_params(model) -> tuple[tuple, tuple]:
    """(first-stage extras, last-stage extras) in forward-use order: the embeddings; the final
    norm and the output projection (absent when tied: the embedding is reused)."""
    first = [("tok_embeddings.weight", (model.vocab, model.hidden))]
    if model.positions == "learned":
        first.append(("pos_embeddings.weight", (model.max_seq, model.hidden)))
    last = [("norm.weight", (model.hidden,))]
    if model.norm == "layernorm":
        last.append(("norm.bias", (model.hidden,)))
    if not model.tied_embeddings:
        last.append(("output.weight", (model.vocab, model.hidden)))
    return tuple(first), tuple(last)


def _groups(params) -> tuple:
    """(style, shape, count) with equal entries merged: MoE experts are one line, not hundreds."""
    acc: dict = {}
    for name, shape in params:
        k = (tp_style(name), shape)
        acc[k] = acc.get(k, 0) + 1
    return tuple((s, sh, c) for (s, sh), c in acc.items())


@cache
def _inventory(model) -> dict:
    first, last = _root_params(model)
    return {"block": _groups(_block_params(model)), "first": _groups(first), "last": _groups(last)}


def _sum(groups, fn, *args):
    total = 0
    for style, shape, count in groups:
        total = total + count * fn(style, shape, *args)
    return total


def _layers_on_rank0(model, plan):
    return rank_blocks(model, plan, False)


def _has_head(plan):
    """Rank 0 also holds the final norm and output without pipelining, or in a V (zbv, dualpipev)."""
    return 1 if vee(plan) else where(plan.pp == 1, 1, 0)


def rank0_param_numel(model, plan):
    """Elements of the parameters rank 0 holds before any ZeRO sharding (tp-local pieces); a V
    (zbv, dualpipev) puts the last stage's on rank 0 too."""
    return _rank0_numel(model, plan.tp, plan.pp, _layers_on_rank0(model, plan), vee(plan))["numel"]


@memo
def _rank0_numel(model, tp, pp, blocks, vee=False):
    inv = _inventory(model)
    return {
        "numel": (
            blocks * _sum(inv["block"], local_numel, tp)
            + _sum(inv["first"], local_numel, tp)
            + (1 if pp == 1 or vee else 0) * _sum(inv["last"], local_numel, tp)
        )
    }


@memo
def _fsdp_numels(model, tp, dp, pp):
    """Padded elements of one block's and of the root group's FSDP2 all-gather on rank 0."""
    inv = _inventory(model)
    root = _sum(inv["first"], fsdp_numel, tp, dp) + (1 if pp == 1 else 0) * _sum(inv["last"], fsdp_numel, tp, dp)
    linear = [g for g in inv["block"] if len(g[1]) == 2]  # the matmul weights FP8 training converts
    return {
        "block": _sum(inv["block"], fsdp_numel, tp, dp),
        "root": root,
        "linear": _sum(linear, fsdp_numel, tp, dp),
        "linear_tensors": sum(count for _, _, count in linear),
    }


# ---- DDP buckets -------------------------------------------------------------------------------
def bucket_sizes(sizes: list[int], first: int = DDP_FIRST_BUCKET, cap: int = DDP_BUCKET) -> list[int]:
    """DDP's bucket assignment (c10d compute_bucket_assignment_by_size, one dtype): tensors in
    gradient-ready order fill a bucket until it reaches its limit (1 MiB for the first, 25 MiB
    after), then the next starts; whatever is left is the last bucket."""
    out, fill, limit = [], 0, first
    for s in sizes:
        fill += s
        if fill >= limit:
            out.append(fill)
            fill, limit = 0, cap
    if fill:
        out.append(fill)
    return out


_TP_MODULES = {"wq", "wk", "wv", "wo", "w1", "w2", "w3", "tok_embeddings", "pos_embeddings", "output"}


def _is_dtensor(name: str, sp: bool) -> bool:
    """Does the contract's TP plan (run/parallelize.apply_tp) make this parameter a DTensor? Every
    parameter of a parallelized module (a row-parallel bias too, as a Replicate DTensor), and
    with sequence parallel the norms (SequenceParallel)."""
    module = name.split(".")[-2]
    return module in _TP_MODULES or (sp and module.endswith("norm"))


def ddp_ready_sizes(
    model, tp: int, layers: int, embeddings: bool, head: bool, nbytes: int, sp: bool = False
) -> list[int]:
    """Gradient bytes of one DDP module's parameters in the order their gradients become ready,
    the order DDP rebuilds its buckets in after the first step (Reducer::rebuild_buckets).
    Without TP: the reverse of the order the forward uses them (autograd runs the latest node
    first). With TP, DDP takes PyTorch's DTensor path (tensor/parallel/ddp.py): the DTensor
    parameters are rebuilt from their local shards at the start of every forward, all at once in
    registration order, so autograd reaches those conversions after every other node: the plain
    parameters' gradients come first (reverse use order), then the DTensors' in reverse
    registration order (measured: DDP's rebuilt_per_bucket_param_indices, tp = 2)."""
    first, last = _root_params(model)
    use = (list(first) if embeddings else []) + list(_block_params(model)) * layers + (list(last) if head else [])
    size = lambda n, s: local_numel(tp_style(n), s, tp) * nbytes
    if tp == 1:
        return [size(n, s) for n, s in reversed(use)]
    registered = (
        (list(first) if embeddings else []) + list(model.layer_param_shapes()) * layers + (list(last) if head else [])
    )
    return [size(n, s) for n, s in reversed(use) if not _is_dtensor(n, sp)] + [
        size(n, s) for n, s in reversed(registered) if _is_dtensor(n, sp)
    ]


@lru_cache(maxsize=4096)
def _ddp_sizes(model, tp: int, pp: int, chunks: int, nbytes: int, sp: bool, per: int) -> tuple[tuple[int, int], ...]:
    """(bucket bytes, calls) per step on rank 0: one DDP module per pipeline chunk it holds, of
    `per` blocks each."""
    acc: dict[int, int] = {}
    for ch in range(chunks):
        for b in bucket_sizes(ddp_ready_sizes(model, tp, per, ch == 0, pp == 1, nbytes, sp)):
            acc[b] = acc.get(b, 0) + 1
    return tuple(acc.items())


def ddp_bucket_sizes(model, plan, nbytes: int) -> dict[int, int]:
    """Scalar plans: bytes -> how many of rank 0's steady-state DDP buckets have that size."""
    chunks = chunks_per_rank(plan.vpp, plan.schedule)
    per = int(chunk_blocks(model, plan, False))
    return dict(_ddp_sizes(model, int(plan.tp), int(plan.pp), int(chunks), nbytes, bool(plan.sp), per))


def ddp_buckets(model, plan, nbytes: int):
    """Steady-state DDP all-reduce calls per step on rank 0 (the first step, before the rebuild,
    reduces everything in one bucket). Array plans: computed once per distinct (tp, pp, chunks)."""
    chunks = chunks_per_rank(plan.vpp, plan.schedule)
    per = chunk_blocks(model, plan, False)
    if not _num._is_array(plan.tp, plan.pp, chunks, per):
        return sum(ddp_bucket_sizes(model, plan, nbytes).values())
    return _ddp_calls(model, plan.tp, plan.pp, chunks, nbytes, bool(plan.sp), per)["calls"]


@memo
def _ddp_calls(model, tp, pp, chunks, nbytes, sp, per):
    return {"calls": sum(n for _, n in _ddp_sizes(model, int(tp), int(pp), int(chunks), nbytes, sp, int(per)))}


def zero1_bucket_sizes(model, plan, nbytes: int) -> dict[int, int]:
    """Scalar plans: bytes -> how many of the dp ranks' ZeroRedundancyOptimizer buckets have that
    size (memory.zero1_bucket_numels; a rank given no parameter broadcasts a one-element fp32 bucket)."""

    acc: dict[int, int] = {}
    blocks = int(_layers_on_rank0(model, plan))
    for numel in zero1_bucket_numels(model, int(plan.dp), int(plan.tp), int(plan.pp), plan.pp == 1, blocks, vee(plan)):
        b = numel * nbytes if numel else 4
        acc[b] = acc.get(b, 0) + 1
    return acc


# ---- dtypes ------------------------------------------------------------------------------------
def dtypes(profile: str | Profile, plan) -> dict:
    """Bytes per element of what each collective carries, by profile and precision
    (Profile.dtypes)."""
    return profiles.profile(profile).dtypes(plan)


# ---- one entry -----------------------------------------------------------------------------------
_LAT_STEPS = {
    "all-reduce": lambda n: 2 * (n - 1),
    "all-gather": lambda n: n - 1,
    "reduce-scatter": lambda n: n - 1,
    "broadcast": lambda n: n - 1,
    "send": lambda n: 1 + 0 * n,
    "recv": lambda n: 1 + 0 * n,
    "all-to-all": lambda n: n - 1,
}


def wire_bytes(kind: str, n, total):
    """Bytes one rank sends for `total` bytes of calls among n ranks (see the module docstring)."""
    if kind == "all-reduce":
        return 2 * (n - 1) * total // n
    if kind in ("all-gather", "reduce-scatter", "broadcast", "all-to-all"):
        return (n - 1) * total // n
    if kind == "send":
        return total
    if kind == "recv":
        return 0 * total
    raise ValueError(f"unknown collective kind {kind!r}")


def link(cluster, size, stride, arr: bool | None = None, kind: str | None = None):
    """(inside one node?, bytes/s achieved, latency s per step) for a group of `size` ranks `stride`
    apart; with `kind`, that collective's own figures where the hardware has them (GPU.link_kinds,
    Network.kinds: `shardwise calibrate` fits each; a recv is timed as a send)."""
    g, net = cluster.gpu, cluster.network
    k = "send" if kind == "recv" else kind
    gk, nk = g.link_kinds.get(k, {}), net.kinds.get(k, {})
    fast = (gk.get("gbps", g.link_gbps) * 1e9 * g.link_efficiency, gk.get("latency_us", g.link_latency_us) * 1e-6)
    slow = (nk.get("gbits", net.gbits) / 8 * 1e9 * net.efficiency, nk.get("latency_us", net.latency_us) * 1e-6)
    intra = size * stride <= cluster.node_size
    if not (_num._is_array(intra) if arr is None else arr):  # one plan: plain Python (runs ~20 times per estimate)
        return (intra,) + (fast if intra else slow)
    return intra, where(intra, fast[0], slow[0]), where(intra, fast[1], slow[1])


def seconds(kind: str, n, count, total, bw, lat):
    """Time of `count` calls of `total` bytes together, latency-bandwidth."""
    moved = total if kind in ("broadcast", "send", "recv") else wire_bytes(kind, n, total)
    return count * _LAT_STEPS[kind](n) * lat + moved / bw


class _Net(NamedTuple):
    """A group of n ranks `stride` apart as make() needs it, worked out once per group."""

    n: object
    multi: object  # n > 1: a group of one rank makes no calls
    intra: object
    bw: dict  # kind -> bytes/s achieved (link(): the kind's own figure where the hardware has one)
    lat: dict  # kind -> latency s per step
    name: object  # "intra-node" | "network"
    steps: dict  # kind -> latency steps of one call (_LAT_STEPS) = its wire factor (n-1 or 2(n-1))


def group_net(cluster, n, stride, arr: bool) -> _Net:
    intra, bw, lat = link(cluster, n, stride, arr)
    name = where(intra, "intra-node", "network") if arr else ("intra-node" if intra else "network")
    one, ring = 1 + 0 * n, n - 1
    steps = {
        "all-reduce": 2 * ring,
        "all-gather": ring,
        "reduce-scatter": ring,
        "broadcast": ring,
        "send": one,
        "recv": one,
        "all-to-all": ring,  # pairwise exchange: n - 1 sends, (n-1)/n of the buffer leaves the rank
    }
    if cluster.gpu.link_kinds or cluster.network.kinds:
        figs = {k: link(cluster, n, stride, arr, k)[1:] for k in steps}
        bws, lats = {k: f[0] for k, f in figs.items()}, {k: f[1] for k, f in figs.items()}
    else:  # one latency and bandwidth for every kind (the catalog)
        bws, lats = dict.fromkeys(steps, bw), dict.fromkeys(steps, lat)
    return _Net(n, n > 1, intra, bws, lats, name, steps)


def make(
    cluster,
    kind: str,
    group: str,
    n,
    stride,
    count,
    what: str,
    *,
    per_call=None,
    total=None,
    overlapped: bool = False,
    sizes: dict | None = None,
    arr: bool | None = None,
    net: _Net | None = None,
) -> Collective:
    """One Collective: `count` calls of `per_call` bytes, or of `total` bytes together when the
    calls differ in size (then `bytes` is their mean, total // count, and `sizes`, for scalar
    plans, the exact message bytes -> calls). `arr`: whether any argument is an array (None:
    look). `net`: group_net(cluster, n, stride, arr), when the caller makes several of the group."""
    if arr is None:
        arr = _num._is_array(n, stride, count, per_call, total)
    if net is None:
        net = group_net(cluster, n, stride, arr)
    if arr:
        count = where(net.multi, count, 0)
        total = per_call * count if total is None else where(count > 0, total, 0)
        sizes, calls = {}, _num.maximum(count, 1)
    else:
        count = count if net.multi else 0
        total = per_call * count if total is None else (total if count > 0 else 0)
        sizes, calls = (dict(sizes) if sizes and count else {}), max(count, 1)
    steps = net.steps[kind]
    # wire_bytes(): all-reduce 2(n-1)/n, all-gather, reduce-scatter and broadcast (n-1)/n of the total
    wire = total if kind == "send" else 0 * total if kind == "recv" else steps * total // n
    moved = total if kind in ("broadcast", "send", "recv") else wire
    return Collective(
        kind=kind,
        group=group,
        ranks=n,
        bytes=total // calls,
        count=count,
        wire_bytes=wire,
        seconds=count * steps * net.lat[kind] + moved / net.bw[kind],
        what=what,
        link=net.name,
        overlapped=overlapped,
        sizes=sizes,
    )


# ---- the step ----------------------------------------------------------------------------------
def collectives(model, cluster, plan, profile: str | Profile = "torch") -> list[Collective]:
    """Every collective of one training step on rank 0."""
    prof = profiles.profile(profile)
    arr = _num._is_array(plan.dp, plan.tp, plan.pp, plan.mbs, plan.gbs, plan.vpp, plan.seq, plan.cp)
    full, plan = plan, context.local_plan(plan)  # context parallel: what each cp rank runs, beside attention
    dt = prof.dtypes(plan)
    # (one plan: a group of one rank makes no calls, and its entries would be dropped below)
    out = (
        (_tp(model, cluster, plan, prof, dt, arr) if arr or plan.tp > 1 else [])
        + (_pp(model, cluster, plan, prof, dt, arr) if arr or plan.pp > 1 else [])
        + (_dp(model, cluster, plan, prof, dt, arr) if arr or plan.dp > 1 else [])
    )
    if prof.run_engines:
        out += _engine(model, cluster, plan, dt, arr)
    if arr or full.cp > 1:
        net = group_net(cluster, full.cp, full.tp, arr)  # cp sits next to tp on the mesh: ranks tp apart

        def c(kind, what, per_call, count):
            return make(
                cluster, kind, "cp", full.cp, full.tp, count, what, per_call=per_call, arr=arr, net=net, overlapped=True
            )

        out += context.ring_collectives(model, full, dt["mm"], c)
    if model.is_moe and (arr or plan.ep > 1):
        out = _ep(model, cluster, plan, dt, arr, out)
    return out if arr else [c for c in out if c.count > 0]


def _ep(model, cluster, plan, dt, arr, out: list[Collective]) -> list[Collective]:
    """Expert parallelism (estimate/experts.py): dispatch and combine as all-to-alls inside the EP
    group (ep ranks, tp apart), and the routed experts' share of each data-parallel collective
    moved to their own group (dp / ep ranks, ep * tp apart), 1/ep of it: the experts a rank holds,
    replicated dp / ep times. The share is the experts' fraction of rank 0's elements; a bucketed
    collective keeps its calls in the same proportion (its per-bucket sizes are then not given)."""
    blocks = _layers_on_rank0(model, plan)
    msg = experts.all_to_all_message(model, plan, dt["resid"])  # block inputs: the residual dtype
    calls = experts.all_to_all_calls(model, plan, blocks)
    net = group_net(cluster, plan.ep, plan.tp, arr)
    a2a = [
        make(
            cluster,
            "all-to-all",
            "ep",
            plan.ep,
            plan.tp,
            calls,
            "token dispatch and combine (MoE blocks)",
            per_call=msg,
            arr=arr,
            net=net,
        )
    ]
    share = experts.expert_share(model, plan, blocks)
    psi = rank0_param_numel(model, plan)
    edp, stride = plan.dp // plan.ep, plan.ep * plan.tp
    enet = group_net(cluster, edp, stride, arr)
    kept = []
    for c in out:
        if c.group not in ("dp", "dp_shard") or "root group" in c.what:  # FSDP2's root: no experts
            kept.append(c)
            continue
        total = c.bytes * c.count
        split = where(plan.ep > 1, 1, 0)  # a search's ep = 1 plans keep their collectives as they are
        moved = split * experts.scale(total, share * experts.PPM // psi)
        e_calls = split * where(c.count > 0, _num.maximum(c.count * share // psi, 1), 0)
        rest = c.count - where(e_calls < c.count, e_calls, 0)
        kept.append(
            make(
                cluster,
                c.kind,
                c.group,
                c.ranks,
                plan.tp,
                rest,
                c.what,
                total=total - moved,
                overlapped=c.overlapped,
                arr=arr,
            )
        )
        kept.append(
            make(
                cluster,
                c.kind,
                "edp",
                edp,
                stride,
                e_calls,
                c.what + ", routed experts",
                total=moved // plan.ep,
                overlapped=c.overlapped,
                arr=arr,
                net=enet,
            )
        )
    return kept + a2a


def _tp(model, cluster, plan, prof: Profile, dt, arr) -> list[Collective]:
    """Tensor-parallel collectives of all micro-batches, per layer and at the model's ends."""
    t, m, sp = plan.tp, plan.grad_accum, plan.sp
    act = plan.mbs * plan.seq * model.hidden  # one [mbs, seq, hidden] activation (full, unsharded)
    layers = _layers_on_rank0(model, plan) * m
    rc = plan.recompute == "full"
    head = _has_head(plan) * m
    R, M = dt["resid"], dt["mm"]

    net = group_net(cluster, t, 1, arr)

    def c(kind, what, per_call, count, overlapped=False):
        return make(cluster, kind, "tp", t, 1, count, what, per_call=per_call, arr=arr, net=net, overlapped=overlapped)

    if not prof.dtensor_tp:
        return _megatron_tp(c, model, plan, act, R, M, layers, rc, m, head)
    # torch.utils.checkpoint (non-reentrant) stops recomputing once every saved tensor is back:
    # the block's last collective (reducing w2's output) is not replayed, the others are
    replayed = layers if rc else 0 * layers  # blocks whose forward runs again, all micro-batches
    if recompute_kind(plan.recompute) == "selective-layer":  # the checkpointed blocks only
        every = recompute_every(plan.recompute)
        replayed = chunk_blocks(model, plan, False) // every * chunks_per_rank(plan.vpp, plan.schedule) * m
    out = []
    if not sp:
        # the attention and the FFN each take their input as one DTensor (PrepareModuleInput), so
        # q/k/v's (w1/w3's) input gradients are summed and all-reduced once: 2 a layer, Megatron's g
        out += [
            c(
                "all-reduce",
                "block outputs (wo, w2), forward" + (" (+ wo on recompute)" if rc else ""),
                act * M,
                2 * layers + replayed,
            ),
            c("all-reduce", "block input gradients (attention, FFN), backward", act * R, 2 * layers),
            c("all-reduce", "vocab-parallel embedding output, forward", act * R, m),
        ]
        if model.positions == "learned":
            out.append(c("all-reduce", "position embedding output, forward", plan.seq * model.hidden * R, m))
        out += [
            c(
                "all-gather",
                "logits to every tp rank (replicated output), forward",
                plan.mbs * plan.seq * model.vocab * M,
                head,
            ),
            c("all-reduce", "output projection input gradient, backward", act * R, head),
        ]
        return out
    out += [
        c(
            "all-gather",
            "sequence shards to block inputs (attention, FFN), forward",
            act * R,
            2 * layers + 2 * replayed,
        ),
        c("reduce-scatter", "block outputs (wo, w2) to sequence shards, forward", act * M, 2 * layers + replayed),
        c("reduce-scatter", "block input gradients to sequence shards, backward", act * R, 2 * layers),
        c("all-gather", "block output gradients, backward", act * M, 2 * layers),
        c("reduce-scatter", "vocab-parallel embedding output to sequence shards, forward", act * R, m),
        c("all-gather", "embedding output gradient, backward", act * R, m),
    ]
    if model.positions == "learned":
        pos = plan.seq * model.hidden * R
        out += [
            c("reduce-scatter", "position embedding output, forward", pos, m),
            c("all-gather", "position embedding output gradient, backward", pos, m),
        ]
    out += [
        c("all-gather", "final norm output to the output projection, forward", act * R, head),
        c(
            "all-gather",
            "logits to every tp rank (replicated output), forward",
            plan.mbs * plan.seq * model.vocab * M,
            head,
        ),
        c("reduce-scatter", "output projection input gradient, backward", act * R, head),
    ]
    # sequence-parallel norms see a sequence shard: their weight (and bias) gradients are
    # Partial over tp and are all-reduced when reduced (FSDP2: with each reduce-scatter; else once)
    per_norm = 2 if model.norm == "layernorm" else 1
    norms = (2 * _layers_on_rank0(model, plan) + _has_head(plan)) * per_norm
    out.append(
        c(
            "all-reduce",
            "sequence-parallel norm gradients (Partial over tp)",
            model.hidden * _norm_grad_bytes(plan, dt, m),
            norms * _fsdp_reduces(plan, m),
        )
    )
    return out


def _norm_grad_bytes(plan, dt, m):
    """Bytes per element of the norm gradients when they are all-reduced: the stored gradient
    dtype, except under FSDP2 mixed precision, where a gradient reduced straight from one backward
    is still in the 16-bit compute dtype and only an accumulated one (ZeRO-2 or a pipeline, m > 1)
    was upcast to the fp32 reduce dtype."""
    if plan.zero < 2 or plan.precision not in ("bf16-mixed", "fp16-mixed"):
        return dt["grad"]
    accumulated = (m > 1) if plan.zero == 2 else (plan.pp > 1) & (m > 1)
    return where(plan.dp > 1, where(accumulated, dt["reduce"], dt["gather"]), dt["grad"])


def _fsdp_reduces(plan, m):
    """Gradient reductions per step per FSDP2 group: ZeRO-3 every micro-batch (except under a
    pipeline, which reduces once at the end); ZeRO-2 once. DDP (zero <= 1, dp > 1) with TP swaps
    the DTensor parameters for local shards and back around each forward, so every micro-batch's
    backward redistributes the Partial norm gradients (measured: 2 x 9 per step at m = 2). Without
    a data-parallel wrapper (dp = 1) the engine aligns gradients once per step."""
    if plan.zero == 3:
        return where((plan.pp > 1) | (plan.dp == 1), 1, m)
    if plan.zero == 2:
        return 1 + 0 * m
    return where(plan.dp > 1, m, 1)


def _megatron_tp(c, model, plan, act, R, M, layers, rc, m, head) -> list[Collective]:
    """Megatron-LM: f/g operators, vocab-parallel embedding and cross-entropy (no logits gather);
    its recompute replays the whole layer forward, collectives included."""
    fwd = layers * (2 if rc else 1)
    ce = c(
        "all-reduce",
        "vocab-parallel cross-entropy (max, sum of exp, target logit), forward",
        plan.mbs * plan.seq * 4,
        CE_REDUCES * head,
    )
    if not plan.sp:
        return [
            c("all-reduce", "block outputs (attention, MLP), forward", act * M, 2 * fwd),
            c("all-reduce", "block input gradients (attention, MLP), backward", act * R, 2 * layers),
            c("all-reduce", "vocab-parallel embedding output, forward", act * R, m),
            c("all-reduce", "output projection input gradient, backward", act * R, head),
            ce,
        ]
    return [
        c("all-gather", "sequence shards to block inputs (attention, MLP), forward", act * R, 2 * fwd),
        c("reduce-scatter", "block outputs to sequence shards, forward", act * M, 2 * fwd),
        c("reduce-scatter", "block input gradients to sequence shards, backward", act * R, 2 * layers),
        c("all-gather", "block output gradients, backward", act * M, 2 * layers),
        # the gathered input is saved as its shard and gathered again for the weight gradients,
        # launched asynchronously beside the input-gradient matmul (Korthikanti et al. 2022, sec.
        # 4.2.2; megatron/core/tensor_parallel/layers.py, LinearWithGradAccumulationAndAsyncCommunication)
        c("all-gather", "block inputs again for the weight gradients, backward", act * R, 2 * layers, True),
        c("reduce-scatter", "vocab-parallel embedding output to sequence shards, forward", act * R, m),
        c("all-gather", "embedding output gradient, backward", act * R, m),
        c("all-gather", "final norm output to the output projection, forward", act * R, head),
        c("reduce-scatter", "output projection input gradient, backward", act * R, head),
        ce,
    ]


def _pp(model, cluster, plan, prof: Profile, dt, arr) -> list[Collective]:
    """Point-to-point between adjacent stages: rank 0 sends each micro-batch's activation on from
    each chunk it holds (the last stage's chunk sends nothing) and receives into each but the first;
    gradients go the other way. Interleaved: v chunks per rank, so 2v-1 hops each way.
    Scatter-gather (Profile.pp_scatter_gather, Megatron-LM; Narayanan et al. 2021, sec. 4.1):
    without sequence parallel the tp ranks hold the same activation, so each sends its 1/tp slice
    and the receiving stage all-gathers the whole over its tp group (intra-node)."""
    v = chunks_per_rank(plan.vpp, plan.schedule)
    m = plan.grad_accum
    whole = plan.mbs * plan.seq * model.hidden * dt["resid"]
    msg = whole
    if plan.sp:
        msg = msg // plan.tp  # block outputs are sequence-sharded under sp: [mbs, seq/tp, hidden]
    scatter = prof.pp_scatter_gather and not plan.sp
    if scatter:
        msg = where(plan.tp > 1, whole // plan.tp, whole)
    n, stride = plan.pp, plan.dp * plan.tp

    net = group_net(cluster, n, stride, arr)

    def c(kind, what, count):
        return make(cluster, kind, "pp", n, stride, count, what, per_call=msg, arr=arr, net=net)

    out = [
        c("send", "activations to the next stage, forward", v * m),
        c("recv", "activation gradients from the next stage, backward", v * m),
        c("recv", "activations from the previous stage (interleaved chunks), forward", (v - 1) * m),
        c("send", "activation gradients to the previous stage (interleaved chunks), backward", (v - 1) * m),
    ]
    if scatter:
        what = "received pipeline slices to whole activations (scatter-gather)"
        gathers = where(plan.pp > 1, (2 * v - 1) * m, 0)
        out.append(make(cluster, "all-gather", "tp", plan.tp, 1, gathers, what, per_call=whole, arr=arr))
    return out


def _dp(model, cluster, plan, prof: Profile, dt, arr) -> list[Collective]:
    n, stride, m = plan.dp, plan.tp, plan.grad_accum
    net = group_net(cluster, n, stride, arr)

    def c(kind, what, count, overlapped, **kw):
        return make(cluster, kind, "dp", n, stride, count, what, overlapped=overlapped, arr=arr, net=net, **kw)

    psi = rank0_param_numel(model, plan)  # elements rank 0 holds (tp-local, one pipeline stage)
    if prof.sends is None:
        return _torch_dp(c, model, plan, dt, arr, psi, _hsdp_groups(cluster, plan, arr))
    return _sent(c, prof.sends[plan.zero], psi, dt, m, n)


def _sent(c, sends, psi, dt, m, n) -> list[Collective]:
    """A profile's data-parallel collectives from its table (profiles.Send) for psi elements over
    n ranks: one call of everything, or the calls of its buckets, once per step or once per
    micro-batch."""
    out = []
    for s in sends:
        payload = psi * dt[s.payload]
        size = s.bucket_elements(n)
        if size is None:
            out.append(c(s.kind, s.what, m if s.per_micro_batch else 1 + 0 * m, s.overlapped, per_call=payload))
            continue
        calls = ceil_div(psi, size)
        if s.per_micro_batch:
            calls, payload = calls * m, payload * m
        out.append(c(s.kind, s.what, calls, s.overlapped, total=payload))
    return out


def _hsdp_groups(cluster, plan, arr):
    """make() for FSDP2's two groups: the shard group (dp_shard ranks, tp apart; all of dp, named
    "dp", without HSDP) and the replicate group (dp / dp_shard ranks, dp_shard * tp apart: a group of
    one, which makes no calls, without HSDP). Each is timed on its own link (inside a node or not)."""
    s, r, tp = plan.shard, plan.replicate, plan.tp
    name = "dp" if arr or s == plan.dp else "dp_shard"
    nets = (group_net(cluster, s, tp, arr), group_net(cluster, r, s * tp, arr))

    def shard(kind, what, count, overlapped, **kw):
        return make(cluster, kind, name, s, tp, count, what, overlapped=overlapped, arr=arr, net=nets[0], **kw)

    def replicate(kind, what, count, overlapped, **kw):
        return make(
            cluster, kind, "dp_replicate", r, s * tp, count, what, overlapped=overlapped, arr=arr, net=nets[1], **kw
        )

    return shard, replicate


def _torch_dp(c, model, plan, dt, arr, psi, hsdp) -> list[Collective]:
    """The torch profile's data-parallel collectives: its engines' own. DDP (zero 0) all-reduces
    gradients in its buckets, ZeroRedundancyOptimizer (zero 1) adds a broadcast per owner after
    the step, FSDP2 (zero 2/3) gathers and reduce-scatters each fully_shard group, over the shard
    group; with HSDP it then all-reduces each reduce-scatter's output (the group's gradient shard)
    across the replicas, in the reduce dtype (torch fsdp/_fully_shard/_fsdp_collectives.py,
    foreach_reduce: reduce_scatter on the shard group, then all_reduce on the replicate group)."""
    n, m = plan.dp, plan.grad_accum
    if plan.zero <= 1:
        buckets = ddp_buckets(model, plan, dt["grad"])
        out = [
            c(
                "all-reduce",
                "gradients (DDP buckets: 1 MiB first, then 25 MiB)",
                buckets,
                True,
                total=psi * dt["grad"],
                sizes=None if arr else ddp_bucket_sizes(model, plan, dt["grad"]),
            )
        ]
        if plan.zero == 1:
            # parameters_as_bucket_view (run/engine.py): one flat bucket per owner, not one call per parameter
            sizes = None if arr else zero1_bucket_sizes(model, plan, dt["P"])
            out.append(
                c(
                    "broadcast",
                    "updated parameters from their ZeroRedundancyOptimizer owners, one bucket per owner",
                    n,
                    False,
                    total=psi * dt["P"] if arr else sum(b * k for b, k in sizes.items()),
                    sizes=sizes,
                )
            )
        return out
    # FSDP2: one all-gather and one reduce-scatter per fully_shard group (each block; the root
    # holds the embeddings, and without pipelining also the final norm and output)
    c, replicate = hsdp
    s = plan.shard
    blocks = _layers_on_rank0(model, plan)
    sums = _fsdp_numels(model, plan.tp, s, plan.pp)
    block, root = sums["block"], sums["root"]
    # FP8 all-gather (spec/fp8.py): the blocks' linear weights travel as 1-byte FP8, the rest in bf16
    gathered = block * dt["gather"] - (sums["linear"] * (dt["gather"] - FP8_BYTES) if fp8_all_gather(plan) else 0)
    piped = plan.pp > 1
    if plan.zero == 2:
        # reshard_after_forward=False: gathered in each forward, kept through backward, resharded
        # after it; under torch.distributed.pipelining the stage keeps them until the step's end
        gathers = where(piped, 1, m)
        reduces = 1 + 0 * m
    else:
        # reshard_after_forward=True (the root too: it is passed explicitly): gathered for the
        # forward and again for the backward of each micro-batch; the pipeline stage keeps
        # them after a backward (reshard_after_backward=False), so only a backward that follows
        # a forward, plus the first op, gathers: 1 + m per step
        gathers = where(piped, 1 + m, 2 * m)
        reduces = where(piped, 1, m)
    what_g = "parameters (16-bit)" if dt["gather"] == 2 else "parameters"
    what_b = "parameters (linear weights FP8, the rest 16-bit)" if fp8_all_gather(plan) else what_g
    out = [
        c(
            "all-gather",
            f"{what_b} of each transformer block (FSDP2)",
            blocks * gathers,
            True,
            per_call=gathered,
        ),
        c(
            "all-gather",
            f"{what_g} of the root group (embeddings, norm, output) (FSDP2)",
            gathers,
            True,
            per_call=root * dt["gather"],
        ),
        c(
            "reduce-scatter",
            "gradients of each transformer block (FSDP2)",
            blocks * reduces,
            True,
            per_call=block * dt["reduce"],
        ),
        c("reduce-scatter", "gradients of the root group (FSDP2)", reduces, True, per_call=root * dt["reduce"]),
        replicate(
            "all-reduce",
            "gradient shards of each transformer block across the HSDP replicas (FSDP2)",
            blocks * reduces,
            True,
            per_call=block // s * dt["reduce"],
        ),
        replicate(
            "all-reduce",
            "gradient shards of the root group across the HSDP replicas (FSDP2)",
            reduces,
            True,
            per_call=root // s * dt["reduce"],
        ),
    ]
    if fp8_all_gather(plan):
        # torchao precompute_float8_dynamic_scale_for_fsdp, after the optimizer step: one
        # all-reduce (max) of every converted weight's fp32 amax, for the next step's FP8 casts
        out.append(
            c(
                "all-reduce",
                "FP8 weight amaxes, one fp32 per linear weight (torchao, after the step)",
                1 + 0 * m,
                False,
                per_call=blocks * sums["linear_tensors"] * 4,
            )
        )
    return out


def _engine(model, cluster, plan, dt, arr) -> list[Collective]:
    """What run/engine.py adds per step: one world all-reduce of [loss, squared grad norm], and
    with pipelining and tied embeddings the first and last stages' embedding-gradient all-reduce."""
    out = [
        make(
            cluster,
            "all-reduce",
            "world",
            plan.world,
            1,
            1 + 0 * plan.world,
            "loss and squared gradient norm (fp32)",
            per_call=LOSS_REDUCE_BYTES,
            arr=arr,
        )
    ]
    if model.tied_embeddings:
        first, _ = _root_params(model)
        rows = ceil_div(model.vocab, plan.tp)
        if plan.zero >= 2:  # FSDP2 holds the shard of it (rank 0's piece, dp > 1; whole at dp = 1)
            rows = ceil_div(rows, plan.shard)
        grad = rows * model.hidden * dt["P"]
        tied = where(plan.pp > 1, 1, 0)
        out.append(
            make(
                cluster,
                "all-reduce",
                "pp",
                where(plan.pp > 1, 2, 1),
                plan.dp * plan.tp,
                tied,
                "tied embedding gradient, first and last stage",
                per_call=grad,
                arr=arr,
            )
        )
    return out


# ---- the lecture's numbers, kept only to be shown next to ours ---------------------------------------
def lecture_comm_bytes(params: float, stage: int) -> float:
    """Lecture 14's `communication_analysis` (16-bit values): DDP and ZeRO-1 2*2*P, ZeRO-2 2*P,
    ZeRO-3 2*P + 2*2*P. Its ZeRO-2 is half the paper's (reduce-scatter + all-gather = 2*P values,
    the same as DDP) and it has no (N-1)/N factor. Not used by any estimate."""
    factors = {0: 2, 1: 2, 2: 1, 3: 3}
    if stage not in factors:
        raise ShardwiseError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    return factors[stage] * params * 2


def lecture_comm_ms(params: float, stage: int, gbits: float = 400) -> float:
    """The lecture's time column: bytes * 8 / Gbit/s, no latency, no efficiency, no ring factor."""
    return lecture_comm_bytes(params, stage) * 8 / gbits / 1e9 * 1000
