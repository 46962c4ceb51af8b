"""Memory per GPU: model states by accounting profile, activations from the saved-tensor
inventory (activations.py), communication buffers and runtime overhead.

`memory(model, cluster, plan, profile)` returns the Memory of the worst rank at its peak. Two
ranks are candidates, the first pipeline stage (embeddings, the most micro-batches in flight)
and the last (the output head, the logits and the fp32 loss); with pp = 1 they are one. For the
`torch` profile each rank is examined at the moments its peak can fall on, and the breakdown is
that of the largest:
  A. a backward begins: every saved activation of the micro-batches in flight is alive, as two
     moments, the loss's backward (its temporaries) and the first block's (its transient).
     Without a pipeline, the last micro-batch's; with one, each backward of pipeline.backwards
     (the rank's last 1F1B one, and where a virtual stage's gradients first appear), with the
     gradients made by then and the outputs and input gradients the schedule still holds for
     its sends. FSDP2 without a pipeline has its own moments (_fsdp_alone): the forward's
     all-gathers, the loss's backward, the first and second blocks' backwards at their start
     and end, the root's gradients, each with the buffers FSDP2 holds right then;
  B. (FSDP) the end of the backward: the root's (embeddings, output) gradient reduce-scatter,
     or with a pipeline, every group's deferred one;
  C. the optimizer step: activations freed, the step's scratch memory allocated.
Gradients are counted where they exist: the run tier sets .grad = None after each step, so a
plain model's gradients appear during the backward (a pipeline stage's with its first), DDP's
buckets are allocated for good, and FSDP's sharded gradients exist once reduce-scattered. The
other profiles are accounting models (their papers' tables) and count every model state at once,
at moment A.

Numeric plan fields may be numpy arrays; then every field of the Memory is an array too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from heapq import heapify, heapreplace
from itertools import zip_longest
from typing import NamedTuple

from shardwise.errors import ShardwiseError
from shardwise.estimate import activations as acts
from shardwise.estimate._num import _is_array, ceil_div, maximum, memo, minimum, where
from shardwise.estimate.profiles import (
    CUDA_CONTEXT_BYTES,
    DS_ALLGATHER_BUCKET,
    DS_MAX_LIVE_PARAMETERS,
    DS_PERSISTENCE_THRESHOLD,
    DS_PREFETCH_BUCKET,
    DS_REDUCE_BUCKET,
    MEGATRON_VOCAB_MULTIPLE,
    check_profile,
    compute_bytes,
    is_mixed,
    optimizer_bytes,
    shard_states,
    state_bytes,
    step_temp_bytes,
)
from shardwise.spec.breakdown import Memory

STAGES = {"worst": (False, True), "first": (False,), "last": (True,)}  # which stages' ranks to examine
FIELDS = {
    "params": "params",
    "grads": "grads",
    "optimizer": "optimizer",
    "act": "activations",
    "buffers": "buffers",
    "overhead": "overhead",
}


def memory(
    model,
    cluster,
    plan,
    profile: str = "torch",
    *,
    attention: str = "flash",
    stage: str = "worst",
    at: str = "peak",
    device: str = "cuda",
) -> Memory:
    """Bytes on the worst rank at its peak, by field, with named sub-items in `detail`.

    attention: "flash" (SDPA's flash / memory-efficient kernels, CUDA's default: no s*s scores
    saved) or "math" (scores materialized, as SDPA's math kernel and unfused attention do).
    stage: "worst" (the larger of the two below), "first" or "last" pipeline stage's rank
    (`shardwise check` holds each stage's ranks against its own estimate).
    at: "peak" (the largest moment) or "step" (moment C, the optimizer step: the model states a
    rank holds when it steps, which `shardwise check` measures; torch profile only).
    device: where the torch profile's kernels run, "cuda" or "cpu" (`shardwise check` on a CPU):
    CPU's rms_norm is a composite that saves more (activations.block_inventory).
    """
    check_profile(profile)
    acts._check("torch", attention, device)
    if profile == "megatron" and plan.offload == "params":
        raise ShardwiseError(
            "the megatron profile has no parameter offload; use --profile torch or deepspeed, or --offload optimizer"
        )
    vec = _is_array(plan.dp, plan.tp, plan.pp, plan.mbs, plan.gbs, plan.vpp, plan.seq)
    if stage not in STAGES:
        raise ShardwiseError(f"unknown pipeline stage {stage!r}; use one of {', '.join(STAGES)}")
    if at not in ("peak", "step"):
        raise ShardwiseError(f"unknown moment {at!r}; use peak or step")
    lasts = STAGES[stage]
    if len(lasts) == 2 and _one_stage(plan.pp):  # pp = 1: the first stage's rank is the last's
        lasts = lasts[:1]
    mem = Memory(capacity=cluster.gpu.memory_bytes)
    if vec and len(lasts) == 2:  # array plans: both ranks in one pass, the plans twice over
        both, last = _both_stages(plan)
        return _peak_arrays(_moments(model, both, last, profile, attention, at, device), plan, mem, stages=2)
    moments = []
    for last in lasts:
        moments += _moments(model, plan, last, profile, attention, at, device)
    if vec:
        return _peak_arrays(moments, plan, mem)
    detail = _peak(moments)
    fields, starts = _field_runs(tuple(detail))
    values = list(detail.values())
    for f, a, b in zip(fields, starts, starts[1:] + (len(values),)):
        setattr(mem, f, int(sum(values[a:b])))
    mem.detail = {k: int(v) for k, v in detail.items() if v}
    return mem


def _moments(model, plan, last, profile: str, attention: str, at: str, device: str = "cuda") -> list:
    if profile != "torch":
        return [_paper(model, plan, last, profile, attention)]
    ms = _torch(model, plan, last, attention, device)
    return ms[-1:] if at == "step" else ms  # the optimizer step is each list's last moment


def _both_stages(plan):
    """An array plan's numeric fields twice over along a new first axis, and `last` along it:
    False (the first stage's rank), then True (the last stage's)."""
    import numpy as np

    fields = ("dp", "tp", "pp", "mbs", "gbs", "vpp", "seq")
    values = [np.asarray(getattr(plan, f)) for f in fields]
    shape = (2,) + np.broadcast(*values).shape
    twice = {}
    for f, v in zip(fields, values):
        twice[f] = np.empty(shape, dtype=v.dtype)
        twice[f][...] = v
    last = np.zeros(shape, dtype=bool)
    last[1] = True
    return plan.replace(**twice), last


def _one_stage(pp) -> bool:
    if _is_array(pp):
        return bool((pp == 1).all())
    return pp == 1


def _peak(moments: list[dict]) -> dict:
    """The moment with the largest total (the first of equal totals)."""
    keys = sorted({k for m in moments for k in m})
    best = max(moments, key=lambda m: sum(m.values()))
    return {k: best.get(k, 0) for k in keys}


def _fill(rows, index: dict, items) -> None:
    """Write a moment's items into its rows (zeros): a dict, or a _Blend of two, element by element."""
    if isinstance(items, _Blend):
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


def _names(m) -> set:
    """The item names of a moment (a dict, or a _Blend of two)."""
    return _names(m.a) | _names(m.b) if isinstance(m, _Blend) else set(m)


def _peak_arrays(moments: list[dict], plan, mem: Memory, stages: int = 1) -> Memory:
    """_peak element by element for array plans, as one int64 table [moment, item, plan]: every
    field and item of `mem` becomes an int64 array of the plans' shape. stages=2: the moments are
    of _both_stages(plan) (a leading axis of 2), taken as the first stage's, then the last's."""
    import numpy as np

    shape = np.broadcast(*(np.asarray(getattr(plan, f)) for f in ("dp", "tp", "pp", "mbs", "gbs", "vpp", "seq"))).shape
    keys = sorted(set().union(*(_names(m) for m in moments)))
    index = {k: j for j, k in enumerate(keys)}
    table = np.zeros((len(moments), len(keys)) + ((2,) if stages == 2 else ()) + shape, dtype=np.int64)
    for i, m in enumerate(moments):
        _fill(table[i], index, m)
    flat = table.reshape(len(moments), len(keys), stages, -1)  # [moment, item, stage, plan]
    totals = flat.sum(axis=1).transpose(1, 0, 2).reshape(stages * len(moments), -1)  # the first stage's first
    pick = totals.argmax(axis=0)  # argmax: the first of equal totals
    n = np.arange(totals.shape[1])
    best = flat[pick % len(moments), :, pick // len(moments), n].T.reshape((len(keys),) + shape)
    fields, starts = _field_runs(tuple(keys))
    sums = np.add.reduceat(best, starts, axis=0) if keys else ()
    for f in FIELDS.values():
        setattr(mem, f, sums[fields.index(f)] if f in fields else np.zeros(shape, dtype=np.int64))
    mem.detail = dict(zip(keys, best))
    return mem


@lru_cache(maxsize=256)
def _field_runs(keys: tuple) -> tuple[tuple, tuple]:
    """(field, index of its first item) of each run of sorted item names: a field's items, named
    "<prefix>.<item>", sort next to each other."""
    fields, starts = [], []
    for j, k in enumerate(keys):
        f = FIELDS[k.split(".", 1)[0]]
        if not fields or fields[-1] != f:
            fields.append(f)
            starts.append(j)
    return tuple(fields), tuple(starts)


# ---- the reference model's parameters, as the engines split them --------------------------
@dataclass(frozen=True)
class _Param:
    shape: tuple[int, ...]
    tp_dim: int | None  # the dim tensor parallelism splits (engine contract item 7); None: replicated
    uneven: bool  # split like torch.chunk (ceil) rather than evenly: embedding rows
    vocab: bool  # rows are the vocabulary (Megatron pads them)
    linear: bool  # a matmul weight: autocast keeps a low-precision copy of it
    count: int = 1


_COLWISE = {"wq", "wk", "wv", "w1", "w3"}
_ROWWISE = {"wo", "w2"}
_MATMUL = _COLWISE | _ROWWISE | {"router", "output"}


def _param(name: str, shape: tuple[int, ...]) -> _Param:
    module, kind = name.split(".")[-2:]
    if module in _COLWISE:
        tp_dim = 0
    elif module in _ROWWISE:
        tp_dim = 1 if kind == "weight" else None  # a row-parallel bias is replicated
    elif module in ("tok_embeddings", "pos_embeddings", "output"):
        tp_dim = 0  # vocab-parallel embedding, column-parallel output, position rows
    else:
        tp_dim = None  # norms, the MoE router
    embedding = module in ("tok_embeddings", "pos_embeddings", "output")
    # autocast's cast of a weight is saved by the matmul; a bias's cast is not (addmm's backward
    # does not read the bias)
    return _Param(
        shape, tp_dim, embedding, module in ("tok_embeddings", "output"), module in _MATMUL and kind == "weight"
    )


def _grouped(named) -> tuple[_Param, ...]:
    """Identical parameters counted once with a multiplicity (MoE experts)."""
    counts: dict[_Param, int] = {}
    for name, shape in named:
        p = _param(name, shape)
        counts[p] = counts.get(p, 0) + 1
    return tuple(_Param(p.shape, p.tp_dim, p.uneven, p.vocab, p.linear, n) for p, n in counts.items())


@lru_cache(maxsize=64)
def _groups(model) -> dict[str, tuple[_Param, ...]]:
    """embed (first stage), block (every layer), head (last stage), tied (the last stage's own copy
    of a tied embedding when pipelined: run/parallelize.split_pipeline keeps output.weight)."""
    named = model.param_shapes()
    block = model.layer_param_shapes()
    h = model.hidden
    embed = [(n, s) for n, s in named if n.split(".")[0] in ("tok_embeddings", "pos_embeddings")]
    head = [(n, s) for n, s in named if n.split(".")[0] in ("norm", "output")]
    return {
        "embed": _grouped(embed),
        "block": _grouped(block),
        "head": _grouped(head),
        "tied": _grouped([("output.weight", (model.vocab, h))]) if model.tied_embeddings else (),
    }


def _local(p: _Param, tp, vocab_multiple: int = 1) -> tuple:
    """The shape one tp rank holds (rank 0, the largest where the split is uneven)."""
    if p.tp_dim is None:
        return p.shape
    d = p.shape[p.tp_dim]
    if p.vocab and vocab_multiple > 1:
        d = ceil_div(d, vocab_multiple * tp) * vocab_multiple
    else:
        d = ceil_div(d, tp) if p.uneven else d // tp
    return p.shape[: p.tp_dim] + (d,) + p.shape[p.tp_dim + 1 :]


def _numel(shape):
    n = 1
    for d in shape:
        n = n * d
    return n


def _fsdp_shard(shape, dp) -> tuple:
    """FSDP2's dim-0 shard on rank 0: ceil(dim0 / dp) rows, the padded size every rank allocates."""
    return (ceil_div(shape[0], dp),) + shape[1:]


@dataclass
class _Stage:
    """Which parameter groups a pipeline rank holds, with multiplicities (array-safe)."""

    embed: object
    layers: object
    head: object
    tied: object

    def parts(self):
        return (("embed", self.embed), ("block", self.layers), ("head", self.head), ("tied", self.tied))

    def sum(self, groups, f, only=None):
        total = 0
        for name, weight in self.parts():
            if isinstance(weight, int) and weight == 0:
                continue
            for p in groups[name]:
                if only is None or only(p):
                    total = total + weight * p.count * f(p)
        return total

    def max(self, groups, f):
        best = 0
        for name, weight in self.parts():
            if isinstance(weight, int) and weight == 0:
                continue
            for p in groups[name]:
                best = maximum(best, where(weight > 0, f(p), 0))
        return best


def _stage_of(model, pp, last: bool) -> _Stage:
    pipelined = where(pp > 1, 1, 0)
    embed = 1 - pipelined if last else 1
    head = 1 if last else 1 - pipelined
    tied = head * pipelined if model.tied_embeddings else 0
    return _Stage(embed, model.layers // pp, head, tied)


# ---- torch: what the run tier's engines keep ---------------------------------------------
OVERHEAD = {"overhead.cuda_context": CUDA_CONTEXT_BYTES}


def _block_sum(g, f, only=None):
    """f summed over one transformer block's parameters."""
    return sum(p.count * f(p) for p in g["block"] if only is None or only(p))


def _torch(model, plan, last: bool, attention: str, device: str = "cuda") -> list[dict]:
    """Moments A, B, C (module docstring) of one rank, A once per backward of _flights; FSDP2 only
    with zero >= 2 and dp > 1 (run/parallelize.uses_fsdp: at dp = 1 there is nothing to shard)."""
    if plan.zero < 2:
        return _torch_local(model, plan, last, attention, device)
    fsdp = where(plan.dp > 1, 1, 0)
    if not _is_array(fsdp):
        engine = _torch_fsdp if fsdp else _torch_local
        return engine(model, plan, last, attention, device)
    mask = plan.dp > 1
    if mask.all() or not mask.any():  # one engine for every plan: the other's items are all 0
        if mask.all():
            a = _torch_fsdp(model, plan, last, attention, device)
            b = _align(_moment_names(_torch_local, model, plan, last, attention, device), len(a))
        else:
            b = _moment_names(_torch_fsdp, model, plan, last, attention, device)
            a = _align(_torch_local(model, plan, last, attention, device), len(b))
        return [_with_names(x, names) for x, names in zip(a, b)]
    a, b = _torch_fsdp(model, plan, last, attention, device), _torch_local(model, plan, last, attention, device)
    return [_Blend(mask, x, y) for x, y in zip(a, _align(b, len(a)))]


def _with_names(m, names):
    """A moment with every name in `names` among its items (0 where it has none)."""
    if isinstance(m, _Blend):
        return _Blend(m.fsdp, _with_names(m.a, names), m.b)
    return {**dict.fromkeys(names, 0), **m}


def _align(local: list, n: int) -> list:
    """The local engines' moments (A's two per backward, then C) as many as FSDP2's (n): empty
    ones where the local engines have none (FSDP2's forward and end-of-backward moments), C last."""
    return local[:-1] + [{}] * (n - len(local)) + [local[-1]]


def _flights(plan, last):
    """The backwards at which the rank's peak can fall (activations.backwards): one without a
    pipeline, where they are the same; a scalar plan's distinct ones (array plans keep all four,
    so that every plan has the same moments)."""
    flights = acts.backwards(plan, last)
    if _one_stage(plan.pp):
        return flights[:1]
    if _is_array(plan.dp, plan.pp, plan.mbs, plan.gbs, plan.vpp, last):
        return flights
    return tuple(dict.fromkeys(flights))


_NAMES: dict = {}


def _moment_names(engine, model, plan, last: bool, attention: str, device: str = "cuda") -> list[tuple]:
    """The item names of each moment `engine` (_torch_fsdp, _torch_local) gives an array plan.
    Formulas never branch on numeric fields (_num), so the names depend on the categorical ones
    only, and on whether any plan is pipelined (the number of backwards, _flights): found once,
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
        _one_stage(plan.pp),
    )
    names = _NAMES.get(key)
    if names is None:
        fields = ("dp", "tp", "pp", "mbs", "gbs", "vpp", "seq")
        values = [np.ravel(v) for v in np.broadcast_arrays(*(np.asarray(getattr(plan, f)) for f in fields))]
        i = 0 if key[-1] else int(np.argmax(values[2] > 1))
        one = plan.replace(**{f: v[i : i + 1] for f, v in zip(fields, values)})
        if len(_NAMES) >= 1024:
            _NAMES.clear()
        names = _NAMES[key] = [tuple(sorted(_names(m))) for m in engine(model, one, last, attention, device)]
    return names


_moment_names.cache_clear = _NAMES.clear


class _Blend(NamedTuple):
    """A moment of array plans taking a's items where `fsdp` holds and b's elsewhere: plans that mix
    dp > 1 (FSDP2's items) and dp = 1 (the local engines'), or FSDP2's with and without a pipeline
    (a moment of one, empty for the other). a and b are dicts or _Blends."""

    fsdp: object  # bool array
    a: object
    b: object


def _split(items: dict) -> tuple[dict, dict]:
    """(activations, persistent pipeline buffers) of rank_activations' items."""
    activations, buffers = {}, {}
    for k, v in items.items():
        if k.startswith("act."):
            activations[k] = v
        elif k.startswith("buffers."):
            buffers[k] = v
    return activations, buffers


@memo
def _local_sizes(model, precision, optimizer, zero, sp, tp, dp, pp, last):
    """Parameter sums for the local engines: elements, optimizer bytes and step scratch of the
    worst dp rank, the Linear elements autocast copies, and the elements whose gradients appear
    with each part's first backward: one block's, the embeddings', the head's."""
    g, sb = _groups(model), state_bytes("torch", precision)
    st = _stage_of(model, pp, last)
    numel = lambda p: _numel(_local(p, tp))
    n = st.sum(g, numel)
    states = st.sum(g, lambda p: optimizer_bytes(optimizer, _local(p, tp), sb))
    # the step's scratch: foreach unless the parameters mix DTensors and plain tensors (run/engine.py
    # turns foreach off then: TP without DDP and without sequence parallel leaves the norms
    # plain); Adafactor defaults to its single-tensor loop
    largest = st.max(g, numel)
    if optimizer == "adamw":
        matrices = st.sum(g, numel, only=lambda p: len(p.shape) >= 2)
        foreach = step_temp_bytes("adamw", maximum(matrices, n - matrices), sb, foreach=True)
        mixed_kinds = 0 if sp else where((tp > 1) & (dp == 1), 1, 0)
        temp = mixed_kinds * step_temp_bytes("adamw", largest, sb, foreach=False) + (1 - mixed_kinds) * foreach
    else:
        temp = step_temp_bytes(optimizer, largest, sb, foreach=False)
    if zero == 1:  # ZeroRedundancyOptimizer under DDP; at dp = 1 the plain optimizer
        z_states, z_temp = _zero1_worst(model, int(dp), int(tp), int(pp), last, optimizer, sb)
        ddp = where(dp > 1, 1, 0)
        states, temp = where(ddp, z_states, states), where(ddp, z_temp, temp)
    block_linear = _block_sum(g, numel, only=lambda p: p.linear)
    out = g["tied"][0] if model.tied_embeddings else [p for p in g["head"] if p.linear][0]
    embed = st.embed * sum(p.count * numel(p) for p in g["embed"])
    # DTensor's embedding backward under vocab-parallel TP gives the whole table's gradient,
    # Replicate, on every tp rank (run/engine._align_grads slices it at the step); DDP's path
    # hands back the local shard's. A tied table's gradient takes the output's Shard layout.
    # So without DDP each untied table (the token one on a pipeline's first stage too, where
    # the output is on the last) holds its full rows during the backward.
    untied = lambda p: p.vocab is False or not model.tied_embeddings or pp > 1
    replicated = sum(p.count * (_numel(p.shape) - numel(p)) for p in g["embed"] if untied(p))
    embed_grad = embed + st.embed * where((dp == 1) & (tp > 1), replicated, 0)
    return {
        "n": n,
        "states": states,
        "temp": temp,
        "block_linear": block_linear,
        "out_linear": numel(out),
        "head": st.head,
        "block": _block_sum(g, numel),
        "embed_grad": embed_grad,
        "head_grad": st.head * sum(p.count * numel(p) for p in g["head"]) + st.tied * numel(out),
    }


def _grads_present(flight, v, layers_per_chunk: int, block, embed, head):
    """Elements (or bytes) of the gradients that exist at a backward: the virtual stages'
    (top down) whose first backward is done; the head's with its own (the last rank's top
    virtual stage), the embeddings' with the bottom one's (the first rank's virtual stage 0)."""
    g = flight.grad_chunks
    return g * layers_per_chunk * block + where(g >= v, embed, 0) + where(g >= 1, head, 0)


def _loss_and_block(a: dict, f, sizes, head_copy=0) -> list[dict]:
    """Moment A as two: the loss's backward (its temporaries) and the first block's (its own
    transient, activations.block_backward_bytes, next to the gradient the head handed it), once
    the loss's temporaries and one micro-batch's saved head tensors (and its autocast copy of the
    output weight) are freed (the caller, or the pipeline, still holds that micro-batch's
    logits). A backward without the loss (a pipeline stage's other than the last global one) is
    the block's moment only, its output's gradient in a receive buffer."""
    a_loss = {**a, "act.block_backward": 0}
    a_block = {
        **a,
        "act.loss_backward": 0,
        "act.block_backward": sizes.block_backward,
        "act.block_output_grad": f.loss * sizes.top_grad,
    }
    head_mbs = maximum(f.head, 1)
    for k in ("act.final_norm", "act.head_input", "act.loss_fp32", "act.targets"):
        a_block[k] = a[k] - f.loss * (a[k] // head_mbs)
    if "params.autocast_copy" in a:
        a_block["params.autocast_copy"] = a["params.autocast_copy"] - f.loss * head_copy
    return [a_loss, a_block]


def _torch_local(model, plan, last: bool, attention: str, device: str = "cuda") -> list[dict]:
    """DDP (zero 0), DDP + ZeroRedundancyOptimizer (zero 1), or no data-parallel wrapper (dp = 1),
    each with TP and/or PP. Mixed precision: fp32 parameters under torch.autocast.
    Two moments A per backward of _flights (_loss_and_block), then C."""
    sb = state_bytes("torch", plan.precision)
    mixed = is_mixed(plan.precision)
    c = compute_bytes(plan.precision)
    z = _local_sizes(model, plan.precision, plan.optimizer, plan.zero, plan.sp, plan.tp, plan.dp, plan.pp, last)
    n, states, temp = z["n"], z["states"], z["temp"]
    if plan.offload == "optimizer":  # on the CPU, and stepped there
        states, temp = 0, 0
    ddp = where(plan.dp > 1, 1, 0)
    v = plan.vpp if plan.schedule == "interleaved" else 1
    per_chunk = model.layers // (plan.pp * v)
    sizes = acts.rank_sizes(
        model,
        plan,
        last=last,
        layout="torch",
        attention=attention,
        autocast=mixed,
        act=c,
        res=4 if mixed else c,
        vocab=model.vocab,
        device=device,
    )
    moments = []
    for f in _flights(plan, last):
        activations, buffers = _split(acts.priced(sizes, f))
        persistent = {
            "params.local": sb.param * n,
            "optimizer.states": states,
            "grads.ddp_buckets": ddp * sb.grad * n,
            **OVERHEAD,
            **buffers,
        }
        a = {**persistent, **activations}
        # fresh .grad tensors of the earlier micro-batches, of the parts whose backward has run
        # (the run tier sets .grad = None each step, so DDP copies them into its buckets only in
        # the synchronizing backward)
        a["grads.accumulated"] = sb.grad * _grads_present(f, v, per_chunk, z["block"], z["embed_grad"], z["head_grad"])
        if mixed:
            # autocast's low-precision weight copies: run/model.py enters autocast per forward call,
            # so each micro-batch in flight holds the casts its graph saved (every Linear's weight);
            # with full recompute the blocks' casts are remade one block at a time
            blocks = 1 if plan.recompute == "full" else f.chunks * per_chunk
            a["params.autocast_copy"] = 2 * (blocks * z["block_linear"] + f.head * z["head"] * z["out_linear"])
        moments += _loss_and_block(a, f, sizes, head_copy=2 * z["head"] * z["out_linear"] if mixed else 0)
    # C: every receive buffer waits for the next step, none holding an input
    persistent.update({"buffers.pp_act_recv": sizes.act_recv, "buffers.pp_grad_recv": sizes.grad_recv})
    c_ = {**persistent, "grads.local": (1 - ddp) * sb.grad * n, "buffers.optimizer_step": temp}
    return moments + [c_]


@memo
def _fsdp_sizes(model, precision, optimizer, tp, dp, pp, last):
    """Parameter sums under FSDP2: shard elements (padded) of the stage and of one block, unsharded
    (padded) elements of the stage, one block, the root, the head and the tied output, optimizer
    bytes and step scratch on rank 0."""
    g, sb = _groups(model), state_bytes("torch", precision)
    st = _stage_of(model, pp, last)
    shard = lambda p: _fsdp_shard(_local(p, tp), dp)
    padded = lambda p: dp * _numel(shard(p))
    s = st.sum(g, lambda p: _numel(shard(p)))
    u_all = st.sum(g, padded)
    u_block = _block_sum(g, padded)
    # the output's (tied: the embedding's) gradient is made first in the backward; the root's
    # reduce-scatter waits for the embedding's, at the end
    out = g["tied"][0] if model.tied_embeddings else [p for p in g["head"] if p.linear][0]
    u_head = st.head * (padded(out) + sum(padded(p) for p in g["head"] if not p.linear))
    states = st.sum(g, lambda p: optimizer_bytes(optimizer, shard(p), sb))
    if optimizer == "adamw":  # DTensors on one mesh: foreach
        matrices = st.sum(g, lambda p: _numel(shard(p)), only=lambda p: len(p.shape) >= 2)
        temp = step_temp_bytes("adamw", maximum(matrices, s - matrices), sb, foreach=True)
    else:
        temp = step_temp_bytes(optimizer, st.max(g, lambda p: _numel(shard(p))), sb, foreach=False)
    u_embed = st.embed * sum(p.count * padded(p) for p in g["embed"])
    return {
        "s": s,
        "s_block": _block_sum(g, lambda p: _numel(shard(p))),
        "u_all": u_all,
        "u_block": u_block,
        "u_root": u_all - st.layers * u_block,
        "u_head": u_head,
        "u_tied": st.head * padded(out) if model.tied_embeddings else 0,
        "u_embed": u_embed,
        "states": states,
        "temp": temp,
    }


def _torch_fsdp(model, plan, last: bool, attention: str, device: str = "cuda") -> list[dict]:
    """FSDP2 (zero 2/3 over dp > 1). Each parameter is a dim-0 shard padded to ceil(dim0/dp) rows;
    with mixed precision the fp32 shard is the master, all-gathered in bf16 (param_dtype) and
    reduce-scattered in fp32 (reduce_dtype). With a pipeline two moments A per backward of
    _flights (_fsdp_pipelined); without, the step's moments of _fsdp_alone; then B, C. Array
    plans that mix both get both, each zero where the other applies."""
    sb = state_bytes("torch", plan.precision)
    mixed = is_mixed(plan.precision)
    c = compute_bytes(plan.precision)
    pb = 2 if mixed else sb.param  # unsharded (all-gathered) parameters and their gradients
    rb = 4 if mixed else sb.grad  # reduce-scatter dtype = the sharded gradients' dtype
    z = _fsdp_sizes(model, plan.precision, plan.optimizer, plan.tp, plan.dp, plan.pp, last)
    pipelined = where(plan.pp > 1, 1, 0)
    vec = _is_array(pipelined)
    accumulated = where(plan.grad_accum > 1, 1, 0)
    offload = plan.offload == "params"  # CPUOffloadPolicy: shards, gradients and the step on the CPU
    cpu_step = plan.offload != "none"  # the optimizer states (and so its step) on the CPU
    sharded_grads = 0 if offload else rb * z["s"]
    sizes = acts.rank_sizes(
        model,
        plan,
        last=last,
        layout="torch",
        attention=attention,
        autocast=False,
        act=c,
        res=c,
        vocab=model.vocab,
        device=device,
    )
    piped, alone = [], []
    for i, f in enumerate(_flights(plan, last)):
        activations, buffers = _split(acts.priced(sizes, f))
        persistent = {
            "params.sharded": 0 if offload else sb.param * z["s"],
            "optimizer.states": 0 if cpu_step else z["states"],
            **OVERHEAD,
            **buffers,
        }
        a = {**persistent, **activations}
        if vec or pipelined:
            piped += _fsdp_pipelined(model, plan, a, f, sizes, z, pb, rb, accumulated)
        if (vec or not pipelined) and i == 0:  # without a pipeline every backward is this one
            alone = _fsdp_alone(model, plan, a, f, sizes, z, pb, rb, accumulated, 0 if offload else rb)
    if vec:  # array plans: each moment of a pipelined plan shares its place with one of a plan without
        moments = [_Blend(pipelined == 1, x, y) for x, y in zip_longest(piped, alone, fillvalue={})]
    else:
        moments = piped + alone

    # B and C: every receive buffer waits for the next step, none holding an input
    persistent.update({"buffers.pp_act_recv": sizes.act_recv, "buffers.pp_grad_recv": sizes.grad_recv})

    # B. The end of the backward: the root's reduce-scatter (its reshard, then its gradients
    # copied into the reduce-scatter input, the block's input before it freed); with a pipeline
    # each group's in turn
    z2_accumulated = accumulated if plan.zero == 2 else 0  # the root's gradients are the accumulated ones
    b = {
        **persistent,
        "grads.sharded": sharded_grads,
        "grads.unsharded_accumulated": pipelined * rb * z["u_all"]
        + (1 - pipelined) * z2_accumulated * rb * z["u_root"],
        "grads.root_unsharded": (1 - pipelined) * (1 - z2_accumulated) * pb * z["u_root"],
        "buffers.root_reduce_scatter": (1 - pipelined) * rb * z["u_root"],
        "buffers.reduce_scatter": pipelined * rb * maximum(z["u_root"], z["u_block"]),
    }

    # C. The optimizer step on the shards
    cc = {**persistent, "grads.sharded": sharded_grads, "buffers.optimizer_step": 0 if cpu_step else z["temp"]}
    return moments + [b, cc]


def _fsdp_pipelined(model, plan, a: dict, f, sizes, z: dict, pb, rb, accumulated) -> list[dict]:
    """Moment A as two (_loss_and_block) under torch.distributed.pipelining, which keeps FSDP from
    resharding after backward and from reduce-scattering before the last micro-batch
    (backward_maybe_with_nosync): every block ends up unsharded and every gradient accumulates
    unsharded in fp32 (FSDPParam.to_accumulated_grad_if_needed), each part's from its first
    backward on."""
    v = plan.vpp if plan.schedule == "interleaved" else 1
    a = dict(a)
    a["params.unsharded"] = pb * z["u_all"]
    head = z["u_root"] - z["u_embed"]  # the final norm and output (the last rank's root)
    a["grads.unsharded_accumulated"] = (
        accumulated * rb * _grads_present(f, v, model.layers // (plan.pp * v), z["u_block"], z["u_embed"], head)
    )
    a["grads.head_unsharded"] = pb * z["u_head"]
    a["buffers.reduce_scatter"] = pb * z["u_block"]  # one block's gradients, cast into the fp32 accumulator
    a_loss, a_block = _loss_and_block(a, f, sizes)
    a_loss["buffers.reduce_scatter"] = 0  # the loss's backward: no block reduced yet
    return [a_loss, a_block]


def _fsdp_alone(model, plan, a: dict, f, sizes, z: dict, pb, rb, accumulated, sharded_rb) -> list[dict]:
    """FSDP2 without a pipeline: the moments of the step's last micro-batch (it holds what the
    earlier ones leave: the sharded gradients of ZeRO-3, the accumulated unsharded ones of ZeRO-2),
    from PyTorch 2.13's _fully_shard, measured item by item with MemTracker (tests/test_check.py).

    The run tier's fully_shard(reshard_after_forward=zero == 3) on each block and on the root
    (embeddings, final norm, output; reshard_after_forward set explicitly, so the root reshards
    after forward too), reshard_after_backward left on: every group frees its unsharded
    parameters after its backward, and ZeRO-2 gathers every block again in the next forward.
    FSDP2 holds three kinds of buffer, P = one block's unsharded parameters (param dtype):
      all-gather outputs: the flat buffer a group is gathered into, copied out into its unsharded
        parameters. In the forward the last one is kept until the next group's copy-out returns
        (FSDPParamGroup.wait_for_unshard: `prev_all_gather_state` is dropped on return), so at a
        copy-out the previous group's, the group's own and its unsharded parameters are alive,
        and the last block's until the root's forward ends (FSDPState._post_forward). In the
        backward a group's pre-backward prefetches the group before it (ZeRO-3): its output
        waits there through the whole block's backward.
      unsharded gradients: the group's, made by its backward, kept until its reduce-scatter
        (ZeRO-2 accumulating in fp32: added into the accumulated ones in place, nothing new).
      reduce-scatter inputs (reduce dtype, padded): each is kept until the next group's
        post-backward (reduce_scatter_max_input_buffers = 1), so from the second block on the
        block above's is alive through a block's backward.
    None of this depends on the device: FSDP2 keeps these references itself rather than by
    record_stream, so a CUDA caching allocator (max_memory_allocated) and MemTracker on the CPU
    see the same lifetimes; only the all-gather and reduce-scatter run on other streams.

    The moments, L = the rank's layers, X = one layer's saved tensors:
      forward: block 0's copy-out (the root's buffer and unsharded parameters, block 0's two),
        block L-1's (three buffers), the forward's end (the logits made, block L-1's buffer;
        run/engine._accumulate drops the previous micro-batch's logits before this forward);
      the loss's backward (ZeRO-3: the root is resharded);
      ZeRO-3: the root gathered again (its pre-backward, on the logits' gradient);
      the first block's backward begins (its transient, weight gradients kept, next to the
        gradient the head handed it) and ends (its saved tensors freed, its gradients all made,
        its input's gradient in place of its output's); the second block's, with the first's
        reduce-scatter input; later blocks hold less: fewer saved tensors, the same buffers;
      the root's gradients made, before its post-backward (block 0's reduce-scatter input).
    """
    z3 = plan.zero == 3
    layers = model.layers
    P, R, Pr = pb * z["u_block"], rb * z["u_block"], pb * z["u_root"]
    # ZeRO-2 accumulating at the parameters' dtype: the micro-batch's gradients are added into
    # the accumulated .grad in place (AccumulateGrad) and freed; otherwise they stay as made
    inplace = accumulated if not z3 and pb == rb else 0
    fresh = 1 - inplace
    transient = fresh * sizes.block_backward_kept + inplace * sizes.block_backward
    X = sizes.layer

    def grads(k):
        """Gradients once k groups are reduce-scattered in this micro-batch."""
        sharded = sharded_rb * (z["s"] * accumulated + k * z["s_block"] * (1 - accumulated) if z3 else k * z["s_block"])
        return {
            "grads.sharded": sharded,
            "grads.unsharded_accumulated": 0 if z3 else accumulated * rb * (z["u_all"] - k * z["u_block"]),
        }

    base = {
        **{k: v for k, v in a.items() if not k.startswith("act.")},
        **dict.fromkeys((k for k in a if k.startswith("act.")), 0),
    }
    logits = a["act.logits"]
    fwd = {**base, **grads(0), "act.embedding": a["act.embedding"]}
    blocks_kept = 0 if z3 else layers * P  # ZeRO-2 keeps every block gathered until its backward
    out = [
        {**fwd, "params.unsharded": Pr + P, "buffers.all_gather": Pr + P},  # block 0's copy-out
        {
            **fwd,
            "act.layers": (layers - 1) * X,
            "params.unsharded": Pr + (P if z3 else blocks_kept),
            "buffers.all_gather": (2 if layers > 1 else 1) * P + (0 if layers > 1 else Pr),
        },  # block L-1's
        {
            **fwd,
            **{k: a[k] for k in ("act.layers", "act.final_norm", "act.head_input", "act.logits")},
            "params.unsharded": Pr + blocks_kept,
            "buffers.all_gather": P,
        },  # the forward's end
        {**a, **grads(0), "act.block_backward": 0, "params.unsharded": 0 if z3 else Pr + blocks_kept},  # the loss's
    ]
    if z3:  # the root gathered again: the logits' gradient (compute dtype) made, the loss's freed
        out.append(
            {
                **a,
                **grads(0),
                "act.loss_fp32": 0,
                "act.targets": 0,
                "act.loss_backward": 0,
                "act.block_backward": 0,
                "act.logits_grad": f.loss * logits,
                "params.unsharded": Pr,
                "buffers.all_gather": Pr,
            }
        )
    head_grads = pb * (fresh * z["u_head"] + inplace * z["u_tied"])  # a tied one waits in AccumulateGrad
    for k in range(min(layers, 2)):  # the first and second block of the backward
        start = {
            **_loss_and_block(a, f, sizes)[1],
            **grads(k),
            "act.block_backward": transient,
            "act.layers": a["act.layers"] - k * X,
            "grads.head_unsharded": head_grads,
            "params.unsharded": Pr + (P if z3 else (layers - k) * P),
            "buffers.all_gather": P if z3 and layers - 1 - k >= 1 else 0,  # the block below, prefetched
            "buffers.reduce_scatter": R if k else 0,
        }  # the block above's
        end = {
            **start,
            "act.layers": start["act.layers"] - X,
            "act.block_backward": 0,
            "act.recompute": 0,
            "grads.block_unsharded": fresh * P,
        }
        out += [start, end]
    out.append(
        {
            **base,
            **grads(layers),
            "act.logits": logits,
            "params.unsharded": Pr,
            "buffers.reduce_scatter": R,
            "grads.root_unsharded": fresh * Pr,
        }
    )  # the root's gradients made
    return out


# ---- ZeroRedundancyOptimizer's partition -------------------------------------------------------
def stage_param_shapes(model, tp: int, pp: int, last: bool) -> list[tuple[int, ...]]:
    """The local shapes of one pipeline rank's parameters in registration order (scalars only)."""
    return [_local(p, tp) for p in _stage_params(model, pp, bool(last))]


@lru_cache(maxsize=64)
def _named_params(model) -> tuple:
    """(top-level module, layer index or -1, _Param) of every parameter, in registration order."""
    out = []
    for name, shape in model.param_shapes():
        parts = name.split(".")
        out.append((parts[0], int(parts[1]) if parts[0] == "layers" else -1, _param(name, shape)))
    return tuple(out)


@lru_cache(maxsize=1024)
def _stage_params(model, pp: int, last: bool) -> tuple[_Param, ...]:
    named = _named_params(model)
    if pp == 1:
        return tuple(p for _, _, p in named)
    keep_embed, keep_head = not last, last
    lo, hi = (model.layers - model.layers // pp, model.layers) if last else (0, model.layers // pp)
    out = []
    for top, layer, p in named:
        if top in ("tok_embeddings", "pos_embeddings") and not keep_embed:
            continue
        if top in ("norm", "output") and not keep_head:
            continue
        if top == "layers" and not lo <= layer < hi:
            continue
        out.append(p)
    if last and model.tied_embeddings:
        out.append(_param("output.weight", (model.vocab, model.hidden)))
    return tuple(out)


@lru_cache(maxsize=1024)
def _zero1_items(model, tp: int, pp: int, last: bool, optimizer: str, sb) -> tuple:
    """(numel, optimizer bytes) of the rank's parameters, per ZeroRedundancyOptimizer group
    (matrices, then vectors), each sorted by numel, largest first (a stable sort)."""
    shapes = stage_param_shapes(model, tp, pp, last)
    return tuple(
        tuple(
            (_numel(s), optimizer_bytes(optimizer, s, sb))
            for s in sorted((s for s in shapes if (len(s) >= 2) == matrices), key=_numel, reverse=True)
        )
        for matrices in (True, False)
    )


@lru_cache(maxsize=4096)
def _zero1_assign(model, dp: int, tp: int, pp: int, last: bool, optimizer: str, sb) -> tuple:
    """ZeroRedundancyOptimizer's partition (_partition_parameters): for each parameter group in
    order (run/engine.py: matrices with weight decay, then vectors), parameters sorted by numel,
    largest first (a stable sort), each to the rank with the smallest total so far (the first
    such rank). Under DDP the parameters are local TP shards. Returns, per dp rank, (optimizer
    bytes, [numel per group], its largest parameter's numel)."""
    heap = [(0, r) for r in range(dp)]
    heapify(heap)
    states, numel_by_group, largest = [0] * dp, [[0, 0] for _ in range(dp)], [0] * dp
    for group, items in enumerate(_zero1_items(model, tp, pp, last, optimizer, sb)):
        for n, nbytes in items:
            size, r = heap[0]  # (totals differ by rank index: the order of pops is the heap's order)
            heapreplace(heap, (size + n, r))
            states[r] += nbytes
            numel_by_group[r][group] += n
            if n > largest[r]:
                largest[r] = n
    return tuple((states[r], tuple(numel_by_group[r]), largest[r]) for r in range(dp))


def zero1_bucket_numels(model, dp: int, tp: int, pp: int, last: bool) -> tuple[int, ...]:
    """Elements of each dp rank's ZeroRedundancyOptimizer bucket (parameters_as_bucket_view: one
    flat tensor per rank holding the parameters it steps, broadcast from it after the step). The
    partition weighs numel alone: any optimizer gives the same."""
    return tuple(sum(g) for _, g, _ in _zero1_assign(model, dp, tp, pp, last, "sgd", state_bytes("torch", "fp32")))


@lru_cache(maxsize=4096)
def _zero1_worst(model, dp: int, tp: int, pp: int, last: bool, optimizer: str, sb) -> tuple[int, int]:
    """(optimizer bytes, step scratch bytes) of the dp rank ZeroRedundancyOptimizer loads most
    (_zero1_assign); its local optimizer steps only its own parameters."""
    ranks = _zero1_assign(model, dp, tp, pp, last, optimizer, sb)
    worst = max(range(dp), key=lambda r: (ranks[r][0], -r))
    states, numel_by_group, largest = ranks[worst]
    if optimizer == "adamw":  # DDP's local shards are plain tensors: foreach
        temp = step_temp_bytes("adamw", max(numel_by_group), sb, foreach=True)
    else:
        temp = step_temp_bytes(optimizer, largest, sb, foreach=False)
    return int(states), int(temp)


# ---- the accounting profiles: zero-paper, deepspeed, megatron ------------------------------------
@memo
def _paper_sizes(model, profile, optimizer, precision, tp, pp, last):
    """Elements, optimizer bytes, elements in tensors DeepSpeed keeps whole, one block's elements."""
    g, sb = _groups(model), state_bytes(profile, precision)
    st = _stage_of(model, pp, last)
    mult = MEGATRON_VOCAB_MULTIPLE if profile == "megatron" else 1
    numel = lambda p: _numel(_local(p, tp, mult))
    return {
        "n": st.sum(g, numel),
        "opt": st.sum(g, lambda p: optimizer_bytes(optimizer, _local(p, tp, mult), sb)),
        "small": st.sum(g, lambda p: where(numel(p) <= DS_PERSISTENCE_THRESHOLD, numel(p), 0)),
        "block": _block_sum(g, numel),
    }


def _paper(model, plan, last: bool, profile: str, attention: str) -> dict:
    """Model states from the profile's bytes-per-parameter table, sharded as its engine does, the
    papers' activation layout (Megatron's) and DeepSpeed's default buffers."""
    sb = state_bytes(profile, plan.precision)
    tp, dp, zero = plan.tp, plan.dp, plan.zero
    z = _paper_sizes(model, profile, plan.optimizer, plan.precision, tp, plan.pp, last)
    n, opt = z["n"], z["opt"]
    if profile == "megatron":  # zero >= 1: the distributed optimizer shards the optimizer part only
        p, gr, o = sb.param * n, sb.grad * n, ceil_div(opt, dp) if zero >= 1 else opt
    else:
        p, gr, o = shard_states(sb.param * n, sb.grad * n, opt, dp, zero)
        if profile == "deepspeed" and zero == 3:  # tensors up to the persistence threshold stay whole
            p = sb.param * (z["small"] + ceil_div(n - z["small"], dp))
    if plan.offload != "none":
        o = 0
    if plan.offload == "params":
        p, gr = 0, 0
    out = {"params.model": p, "grads.model": gr, "optimizer.states": o, **OVERHEAD}
    if profile == "deepspeed":
        out["buffers.ds_reduce_bucket"] = sb.grad * minimum(DS_REDUCE_BUCKET, n)
        if zero in (1, 2):
            out["buffers.ds_allgather_bucket"] = sb.param * minimum(DS_ALLGATHER_BUCKET, n)
        if zero == 3:  # the block in use and what is prefetched, capped by max_live_parameters
            out["buffers.ds_live_params"] = sb.param * minimum(
                DS_MAX_LIVE_PARAMETERS, minimum(n, z["block"] + DS_PREFETCH_BUCKET)
            )
    c = compute_bytes(plan.precision)
    mult = MEGATRON_VOCAB_MULTIPLE if profile == "megatron" else 1
    out.update(
        acts.rank_activations(
            model,
            plan,
            last=last,
            layout="megatron",
            attention=attention,
            autocast=False,
            act=c,
            res=c,
            vocab=ceil_div(model.vocab, mult * tp) * mult,
        )
    )
    return out


def saved_activations(model, plan, profile: str = "torch", *, attention: str = "flash") -> int:
    """Activation bytes on the worst rank at its moment A with the most (every saved tensor
    alive), whether or not that moment is the rank's overall peak: on one GPU the optimizer step
    often is, and then memory().activations is 0. For a resolved scalar plan. (The lecture's
    '~2 bytes/param'.)"""
    check_profile(profile)
    acts._check("torch", attention)
    worst = 0
    for last in (False, True):
        ms = (
            _torch(model, plan, last, attention)
            if profile == "torch"
            else [_paper(model, plan, last, profile, attention)]
        )
        for a in ms:
            worst = max(worst, sum(v for k, v in a.items() if k.startswith("act.")))
    return int(worst)
