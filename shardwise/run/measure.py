"""Measurement inside the run tier: what one rank holds, moves and spends in a training step.

    model states  the parameters, gradients and optimizer states this rank holds, walked at the
                  optimizer step (gradients exist then): local shards of DTensors, each storage
                  counted once, so FSDP2's dim-0 padding and DDP's gradient buckets are included
    peak memory   CUDA: the caching allocator's max_memory_allocated. CPU: PyTorch's MemTracker
                  (torch.distributed._tools.mem_tracker), a dispatch mode that follows every
                  storage the step creates, frees or resizes (FSDP2 resizes its unsharded params)
    collectives   CollectiveRecorder: a TorchDispatchMode on the c10d and functional-collective
                  ops. Every collective passes the dispatcher, so one recorder sees DDP's bucketed
                  all-reduce (issued from C++ by the reducer), ZeroRedundancyOptimizer's
                  broadcasts, FSDP2's all-gather / reduce-scatter, DTensor's functional
                  collectives and pipelining's send/recv, at the API level (what the engine asked
                  for, whatever the backend runs it as: gloo runs a reduce-scatter as an all-reduce).
                  CommDebugMode sees the same ops but keeps neither sizes nor groups of c10d ops.
    time          forward (hooks on the stage modules), optimizer (step hooks), waiting on
                  communication (Python-visible waits: Work.wait and, while recording, wait_tensor),
                  backward = the rest of the step (it also holds the loss, the clipping and DDP's
                  end-of-backward wait, which the reducer does in C++)

`Meter` puts them together around Engine.train_step. Hooks and the clock are always on (a few
perf_counter calls per step); the recorder and MemTracker run on `detail` steps only.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from shardwise.spec.breakdown import Collective, Measurement, Memory, Time

# op name (namespace::name, overload dropped) -> our kind
KINDS = {
    "c10d::allreduce_": "all-reduce",
    "c10d::allreduce_coalesced_": "all-reduce",
    "_c10d_functional::all_reduce": "all-reduce",
    "_c10d_functional::all_reduce_": "all-reduce",
    "_c10d_functional::all_reduce_coalesced": "all-reduce",
    "_c10d_functional::all_reduce_coalesced_": "all-reduce",
    "c10d::_allgather_base_": "all-gather",
    "c10d::allgather_": "all-gather",
    "c10d::allgather_coalesced_": "all-gather",
    "c10d::allgather_into_tensor_coalesced_": "all-gather",
    "_c10d_functional::all_gather_into_tensor": "all-gather",
    "_c10d_functional::all_gather_into_tensor_out": "all-gather",
    "_c10d_functional::all_gather_into_tensor_coalesced": "all-gather",
    "_c10d_functional_autograd::all_gather_into_tensor": "all-gather",
    "c10d::_reduce_scatter_base_": "reduce-scatter",
    "c10d::reduce_scatter_": "reduce-scatter",
    "c10d::reduce_scatter_tensor_coalesced_": "reduce-scatter",
    "_c10d_functional::reduce_scatter_tensor": "reduce-scatter",
    "_c10d_functional::reduce_scatter_tensor_out": "reduce-scatter",
    "_c10d_functional::reduce_scatter_tensor_coalesced": "reduce-scatter",
    "_c10d_functional_autograd::reduce_scatter_tensor": "reduce-scatter",
    "c10d::broadcast_": "broadcast",
    "_c10d_functional::broadcast": "broadcast",
    "_c10d_functional::broadcast_": "broadcast",
    "c10d::alltoall_": "all-to-all",
    "c10d::alltoall_base_": "all-to-all",
    "_c10d_functional::all_to_all_single": "all-to-all",
    "_c10d_functional_autograd::all_to_all_single": "all-to-all",
    "c10d::send": "send",
    "_c10d_functional::isend": "send",
    "c10d::recv_": "recv",
    "c10d::recv_any_source_": "recv",
    "_c10d_functional::irecv": "recv",
    "c10d::reduce_": "reduce",
    "c10d::gather_": "gather",
    "c10d::scatter_": "scatter",
    "c10d::barrier": "barrier",
    "c10d::monitored_barrier_": "barrier",
}
WAIT_OPS = ("_c10d_functional::wait_tensor",)


def _tensors(x) -> list[torch.Tensor]:
    """Every tensor in an argument: a tensor, a list of them, or a list of lists."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    return []


def _nbytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


def _dtype(x) -> str:
    ts = _tensors(x)
    return str(ts[0].dtype).removeprefix("torch.") if ts else ""


@dataclass(frozen=True)
class Call:
    """One collective call as this rank issued it."""

    kind: str
    group: str  # mesh dim (dp | tp | pp), "world", or "ranks a,b,..." for any other group
    ranks: int  # group size
    bytes: int  # message size: the full (unsharded) buffer for all-gather and reduce-scatter
    dtype: str


class GroupNames:
    """Process group -> (name, size). A group is named for the mesh dim whose ranks it holds;
    the whole world is "world" unless a mesh dim spans it; anything else by its ranks."""

    def __init__(self, mesh=None):
        self.by_ranks: dict[tuple[int, ...], str] = {}
        if mesh is not None:
            dims = list(mesh.mesh_dim_names)
            if "dp_data" in dims:  # context parallel: the engines' dp is dp_data x cp, flattened (run/context.py)
                dims.append("dp")
            for d in dims:
                if mesh[d].size() > 1:
                    g = mesh.get_group(d)
                    self.by_ranks.setdefault(tuple(dist.get_process_group_ranks(g)), d)
        self._cache: dict[str, tuple[str, int]] = {}

    def __call__(self, pg) -> tuple[str, int]:
        if isinstance(pg, str):  # functional collectives name their group
            key, resolve = pg, lambda: torch._C._distributed_c10d._resolve_process_group(pg)
        else:  # a c10d op's ScriptObject
            resolved = torch._C._distributed_c10d.ProcessGroup.unbox(pg)
            key, resolve = resolved.group_name, lambda: resolved
        if key not in self._cache:
            g = resolve()
            ranks = tuple(sorted(dist.get_process_group_ranks(g)))
            name = self.by_ranks.get(ranks)
            if name is None:
                name = "world" if len(ranks) == dist.get_world_size() else "ranks " + ",".join(map(str, ranks))
            self._cache[key] = (name, len(ranks))
        return self._cache[key]


def _message(kind: str, op: str, args, kwargs, schema) -> tuple[int, str]:
    """(bytes, dtype) of one call's message, read from the op's own arguments."""
    a = {arg.name: v for arg, v in zip(schema.arguments, args)} | dict(kwargs)
    if op.startswith("c10d::"):
        if kind == "all-gather":  # the gathered (full) output
            out = a.get("output_tensor", a.get("output_tensors", a.get("output_lists", a.get("outputs"))))
            return _nbytes(out), _dtype(out)
        if kind in ("reduce-scatter", "all-to-all"):  # the full input
            inp = a.get("input_tensor", a.get("input_tensors", a.get("inputs")))
            return _nbytes(inp), _dtype(inp)
        t = a.get("tensors", a.get("input_tensors", a.get("tensor")))
        return _nbytes(t), _dtype(t)
    # functional collectives take the local input; an all-gather's message is group_size of them
    t = a.get("input", a.get("inputs", a.get("tensor")))
    n = _nbytes(t)
    if kind == "all-gather":
        n *= a["group_size"]
    return n, _dtype(t)


class CollectiveRecorder(TorchDispatchMode):
    """Records every collective issued while active, and the time spent in wait_tensor.
    DTensor arguments are handed back (NotImplemented) so DTensor turns them into the local
    ops and collectives it really runs, which then come through here (as in CommDebugMode)."""

    def __init__(self, names: GroupNames, on_wait=None):
        super().__init__()
        self.names = names
        self.calls: list[Call] = []
        self.on_wait = on_wait  # called with the seconds of each wait_tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        kwargs = kwargs or {}
        if any(t is DTensor or issubclass(t, DTensor) for t in types):
            return NotImplemented
        op = getattr(func, "_schema", None)
        name = op.name if op is not None else ""
        kind = KINDS.get(name)
        if kind is not None and kind != "barrier":
            pg = (
                args[[a.name for a in op.arguments].index("process_group")]
                if name.startswith("c10d::")
                else {a.name: v for a, v in zip(op.arguments, args)}.get("group_name", kwargs.get("group_name"))
            )
            group, size = self.names(pg)
            nbytes, dtype = _message(kind, name, args, kwargs, op)
            self.calls.append(Call(kind, group, size, nbytes, dtype))
        if name in WAIT_OPS:
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            if self.on_wait is not None:
                self.on_wait(time.perf_counter() - t0)
            return out
        return func(*args, **kwargs)


def summarize(calls: list[Call]) -> list[Collective]:
    """Calls -> one Collective per (kind, group, message size), with its count, in first-seen order.
    wire_bytes is the ring algorithm's figure for the recorded messages (bytes are recorded;
    what the backend puts on the wire is not metered); seconds are not measured per collective."""
    counts = Counter((c.kind, c.group, c.ranks, c.bytes, c.dtype) for c in calls)
    out = []
    for (kind, group, ranks, nbytes, dtype), n in counts.items():
        out.append(
            Collective(
                kind=kind,
                group=group,
                ranks=ranks,
                bytes=nbytes,
                count=n,
                wire_bytes=n * ring_bytes(kind, nbytes, ranks),
                seconds=0.0,
                what=dtype,
            )
        )
    return out


def ring_bytes(kind: str, nbytes: int, ranks: int) -> int:
    """Bytes one rank sends for one call of a message of `nbytes` over `ranks` ranks (ring)."""
    if ranks <= 1:
        return 0
    if kind == "all-reduce":
        return 2 * (ranks - 1) * nbytes // ranks
    if kind in ("all-gather", "reduce-scatter", "all-to-all"):
        return (ranks - 1) * nbytes // ranks
    if kind in ("send", "broadcast"):
        return nbytes
    return 0


# ---- model states ----------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _inner(tensors):
    """The plain tensors holding the data: DTensors' local shards, and a wrapper subclass's inner
    tensors (torchao's FP8 training weight wraps the parameter; the wrapper has no storage of its own)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for t in tensors:
        if t is None:
            continue
        t = _local(t)
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            yield from _inner(getattr(t, n) for n in names)
        else:
            yield t


def _storage_bytes(tensors, device_type: str) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in _inner(tensors):
        if t.device.type != device_type:
            continue  # e.g. AdamW's `step` counters live on the CPU when the parameters are on CUDA
        st = t.untyped_storage()
        if st.nbytes():
            # the storage's identity (its StorageImpl), not its address: fake tensors (the trace
            # tier) have no address, and two real storages never share an impl
            seen[st._cdata] = max(seen.get(st._cdata, 0), st.nbytes())
    return sum(seen.values())


def local_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's states (ZeroRedundancyOptimizer keeps its partition's)."""
    return getattr(opt, "optim", opt)


def optimizer_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters this rank steps, each once: its local shards, replicas or DTensors. The
    optimizer, not the modules, is asked: DDP's DTensor path (TP under DDP) keeps the parameters
    as plain attributes after the first forward, so module.parameters() no longer lists them.
    ZeroRedundancyOptimizer's param_groups hold every parameter, not only its partition."""
    seen, out = set(), []
    for g in opt.param_groups:
        for p in g["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def model_state_bytes(optimizer, device_type: str) -> dict[str, int]:
    """Parameters, gradients and optimizer states this rank holds right now, in bytes."""
    params = optimizer_params(optimizer)
    states = [v for s in local_optimizer(optimizer).state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "params": _storage_bytes(params, device_type),
        "grads": _storage_bytes([p.grad for p in params], device_type),
        "optimizer": _storage_bytes(states, device_type),
    }


# ---- peak memory -------------------------------------------------------------------------------
def _peak_tracker():
    """PyTorch's MemTracker without its per-module statistics. We read only the device-wide peak,
    which its dispatch mode keeps for every storage created, resized or freed; the module
    statistics (kept by hooks around each module's forward and backward) refuse a second forward
    of a root module in one tracked region and lose track of interleaved pipeline stages, and
    gradient accumulation and pipeline schedules do both."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            pass

        def _post_fw_hook(self, module, inputs, outputs):
            pass

        def _pre_bw_hook(self, module, args):
            pass

        def _post_bw_hook(self, module, args):
            pass

    return PeakTracker()


class PeakMemory:
    """Peak tensor bytes of this process on `device` while the context is active."""

    def __init__(self, device: torch.device, optimizer=None, held=()):
        self.device = device
        self.optimizer = optimizer
        self.held = list(held)  # other tensors that exist before the step (DDP's gradient buckets)
        self.peak = 0
        self.source = "cuda max_memory_allocated" if device.type == "cuda" else "MemTracker (CPU tensors)"
        self.tracker = None  # the MemTracker while tracking (CPU)
        self.snapshot: dict = {}  # its peak snapshot by device and category (CPU)

    @contextlib.contextmanager
    def track(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        mt = _peak_tracker()
        # what exists before the step: the model (local shards), the optimizer's states
        # what exists before the step: the parameters and the optimizer's states, and `held`
        opt = [*optimizer_params(self.optimizer), local_optimizer(self.optimizer)] if self.optimizer else []
        mt.track_external(*opt, *self.held)
        self.tracker = mt  # read while active by whoever wants the moments (the trace tier)
        with mt:
            yield self
        snap = self.snapshot = mt.get_tracker_snapshot("peak")
        self.peak = int(sum(d.get("Total", 0) for dev, d in snap.items() if torch.device(dev).type == "cpu"))


# ---- time --------------------------------------------------------------------------------------
class Clock:
    """Forward, optimizer and communication-wait seconds of the current step, from hooks.
    A wait inside the forward or the optimizer step counts as waiting, not as that phase."""

    def __init__(self, modules, optimizer):
        self.handles = []
        self.reset()
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._fwd_start))
            self.handles.append(m.register_forward_hook(self._fwd_end))
        if optimizer is not None:
            self.handles.append(optimizer.register_step_pre_hook(self._opt_start))
            self.handles.append(optimizer.register_step_post_hook(self._opt_end))
        self.on_optimizer_start = None  # a callback (the model-state walk on detail steps)

    def reset(self) -> None:
        self.forward_s = self.optimizer_s = self.wait_s = 0.0
        self._fwd_depth = 0
        self._in_opt = False
        self._t_fwd = self._t_opt = 0.0

    def add_wait(self, seconds: float) -> None:
        self.wait_s += seconds
        if self._fwd_depth:
            self.forward_s -= seconds
        elif self._in_opt:
            self.optimizer_s -= seconds

    def _fwd_start(self, *_):
        if self._fwd_depth == 0:
            self._t_fwd = time.perf_counter()
        self._fwd_depth += 1

    def _fwd_end(self, *_):
        self._fwd_depth -= 1
        if self._fwd_depth == 0:
            self.forward_s += time.perf_counter() - self._t_fwd

    def _opt_start(self, *_):
        if self.on_optimizer_start is not None:
            self.on_optimizer_start()
        self._in_opt = True
        self._t_opt = time.perf_counter()

    def _opt_end(self, *_):
        self._in_opt = False
        self.optimizer_s += time.perf_counter() - self._t_opt

    @contextlib.contextmanager
    def timing_waits(self):
        """Time Python-visible waits on collectives (Work.wait) while active."""
        work = torch._C._distributed_c10d.Work
        orig = work.wait
        clock = self

        def wait(self_, *a, **k):
            t0 = time.perf_counter()
            try:
                return orig(self_, *a, **k)
            finally:
                clock.add_wait(time.perf_counter() - t0)

        work.wait = wait
        try:
            yield
        finally:
            work.wait = orig

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def quartiles(xs: list[float]) -> tuple[float, float]:
    """(first, third) quartile of the timed steps (statistics.quantiles, exclusive method): the
    middle half of the steps lies between them, a shared machine's spread beside the median."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (0.0, 0.0)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


@dataclass
class StepRecord:
    step: int
    step_s: float
    forward_s: float
    optimizer_s: float
    comm_wait_s: float
    detail: bool


@dataclass
class Meter:
    """Measures an Engine's training steps (wrap each `engine.train_step` in `meter.step(...)`).

    A detail step also records every collective, the model states and the peak memory; the
    Measurement takes those from the last detail step and the step time from the other steps."""

    engine: object
    records: list[StepRecord] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    states: dict = field(default_factory=dict)
    peak: int = 0
    peak_source: str = ""
    peak_snapshot: dict = field(default_factory=dict)  # the peak by device and category (CPU)
    tracker: object = None  # the MemTracker while a detail step runs (CPU)

    def __post_init__(self):
        e = self.engine
        self.device = e.device
        self.modules = [m for _, _, m in e.stages]  # the wrapped stage modules this rank runs
        self.names = GroupNames(e.mesh)
        tied = getattr(e, "_tied_pairs", None)  # pp > 1 with tied embeddings: first and last stage
        if tied is not None:
            self.names.by_ranks.setdefault(tuple(sorted(dist.get_process_group_ranks(tied[0]))), "pp")
        self.clock = Clock(self.modules, e.optimizer)
        # DDP's gradient buckets live for the whole run (the reducer owns them), but between steps
        # no tensor points at them (the engine sets .grad = None) and MemTracker would only see
        # them when the synchronizing backward writes them: keep a view of each, taken at the
        # optimizer step, where the gradients are views of the buckets (gradient_as_bucket_view)
        self._buckets: list[torch.Tensor] = []
        self._bucket_hook = (
            e.optimizer.register_step_pre_hook(self._keep_buckets)
            if any(isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in self.modules)
            else None
        )
        self.params = optimizer_params(e.optimizer)

    def _keep_buckets(self, *_):
        seen, keep = set(), []
        for p in self.params:
            g = p.grad
            if g is not None and g.untyped_storage()._cdata not in seen:
                seen.add(g.untyped_storage()._cdata)
                keep.append(g)
        self._buckets = keep

    @contextlib.contextmanager
    def step(self, step: int, detail: bool = False):
        clock = self.clock
        clock.reset()
        cuda = self.device.type == "cuda"
        stack = contextlib.ExitStack()
        recorder = None
        if detail:

            def walk():
                self.states = model_state_bytes(self.engine.optimizer, self.device.type)

            clock.on_optimizer_start = walk
            peak = PeakMemory(self.device, self.engine.optimizer, self._buckets)
            stack.enter_context(peak.track())
            self.tracker = peak.tracker
            recorder = stack.enter_context(CollectiveRecorder(self.names, on_wait=clock.add_wait))
        stack.enter_context(clock.timing_waits())
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with stack:
            yield
            if cuda:
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
        clock.on_optimizer_start = None
        self.records.append(StepRecord(step, dt, clock.forward_s, clock.optimizer_s, clock.wait_s, detail))
        if detail:
            self.calls = list(recorder.calls)
            self.peak, self.peak_source = peak.peak, peak.source
            self.peak_snapshot, self.tracker = peak.snapshot, None

    def measurement(self, tokens_per_step: int = 0, skip: int = 1) -> Measurement:
        """This rank's Measurement: the last detail step's memory and collectives; the time of the
        plain steps after the first `skip` (warm-up), or of every step if there are no others:
        each figure the median over those steps (a shared machine's spikes do not decide it)."""
        timed = (
            [r for r in self.records if not r.detail and r.step >= skip]
            or [r for r in self.records if r.step >= skip]
            or self.records
        )
        med = lambda f: statistics.median(getattr(r, f) for r in timed)
        step_s, fwd, opt, wait = med("step_s"), med("forward_s"), med("optimizer_s"), med("comm_wait_s")
        q1, q3 = quartiles([r.step_s for r in timed])
        s = self.states
        states = s.get("params", 0) + s.get("grads", 0) + s.get("optimizer", 0)
        mem = Memory(
            params=s.get("params", 0),
            grads=s.get("grads", 0),
            optimizer=s.get("optimizer", 0),
            activations=max(0, self.peak - states),
            detail={"peak": self.peak},
        )
        t = Time(
            compute_s=max(0.0, step_s - wait),
            comm_exposed_s=wait,
            step_s=step_s,
            tokens_per_s=tokens_per_step / step_s if step_s > 0 else 0.0,
            detail={
                "forward_s": fwd,
                "backward_s": max(0.0, step_s - fwd - opt - wait),
                "optimizer_s": opt,
                "comm_wait_s": wait,
                "steps_timed": len(timed),
                "step_s_q1": q1,
                "step_s_q3": q3,
            },
        )
        return Measurement(
            memory=mem,
            comm=summarize(self.calls),
            time=t,
            source="run",
            rank=dist.get_rank() if dist.is_initialized() else 0,
        )

    def close(self) -> None:
        self.clock.close()
        if self._bucket_hook is not None:
            self._bucket_hook.remove()
        self._buckets = []

    def gather(self, tokens_per_step: int) -> list[dict]:
        """Every rank's Measurement as a plain dict, on every rank: [{"rank", "coords": {pp, dp,
        tp}, "peak_source", "measurement"}, ...] in rank order. Collective: every rank calls it."""
        e = self.engine
        m = self.measurement(tokens_per_step)
        mine = {
            "rank": m.rank,
            "coords": {"pp": e.pp_rank, "dp": e.dp_rank, "tp": e.tp_rank},
            "peak_source": self.peak_source,
            "measurement": measurement_to_dict(m),
        }
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return [mine]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone

    def write(self, path: str, tokens_per_step: int) -> None:
        """gather(), written by rank 0 as one JSON file {"ranks": [...]}. Collective."""
        import json
        from pathlib import Path

        everyone = self.gather(tokens_per_step)
        if not dist.is_initialized() or dist.get_rank() == 0:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"ranks": everyone}, indent=1))


def measurement_to_dict(m: Measurement) -> dict:
    return {
        "source": m.source,
        "rank": m.rank,
        "memory": m.memory.to_dict(),
        "comm": [c.to_dict() for c in m.comm],
        "time": m.time.to_dict(),
    }


def measurement_from_dict(d: dict) -> Measurement:
    mem = d["memory"]
    memory = Memory(
        **{k: mem[k] for k in ("params", "grads", "optimizer", "activations", "buffers", "overhead", "capacity")},
        detail=dict(mem.get("detail", {})),
    )
    comm = [Collective(**c) for c in d["comm"]]
    t = dict(d["time"])
    time_ = Time(**{k: v for k, v in t.items() if k != "detail"}, detail=dict(t.get("detail", {})))
    return Measurement(memory=memory, comm=comm, time=time_, source=d.get("source", "run"), rank=d.get("rank", 0))
