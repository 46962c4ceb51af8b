"""One rank role of a plan, traced: the run tier's Engine and step on fake tensors and a fake group.

A role is a rank whose memory, collectives and FLOPs stand for every rank like it: each pipeline
stage (the first, the last, one middle one), at dp rank 0 and tp rank 0 (every dp and tp rank of a
stage builds and steps the same module; dp rank 0 holds the largest FSDP2 shard, as the estimate
assumes). Each role is traced in the same process, one after the other, on its own fake group.

Per role the trace brings the rank to its steady state (the optimizer's states, which a first
step creates; under DDP a whole first step, whose backward orders the rebuilt buckets: trace/ddp.py)
and measures the next step with the run tier's own Meter (run/measure.py): model states, peak memory (MemTracker,
at the CUDA caching allocator's granularity: trace/fake.py), every collective; plus the peak's
breakdown by MemTracker's categories, memory at the step's moments and FLOPs by module
(FlopCounterMode).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils.flop_counter import FlopCounterMode

from shardwise import units
from shardwise.errors import ShardwiseError
from shardwise.run import context as rcontext
from shardwise.run import dist as rdist
from shardwise.run import fp8
from shardwise.run.engine import Engine
from shardwise.run.measure import Meter, measurement_to_dict
from shardwise.run.model import check_runnable
from shardwise.run.parallelize import check_supported
from shardwise.spec.fp8 import check_gpu, is_fp8
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan
from shardwise.trace import ddp, fake

CATEGORIES = ("Parameter", "Gradient", "Optstate", "Activation", "Temp", "Buffer", "Other")


class TracedEngine(Engine):
    """The run tier's Engine. The step's reduced loss and norm, values a fake tensor does not hold,
    are read as 0 (no clipping then: clipping scales the gradients in place, no byte moves); the
    tied-embedding group is found from the mesh's real rank table."""

    def _values(self, packed: torch.Tensor) -> list[float]:
        return [0.0] * packed.numel()

    def _supported_on(self):
        return None  # the plan's GPU (check_traceable), not the CPU the fakes live on

    def _tied_embedding_group(self):
        with unset_fake_temporarily():  # rank arithmetic on the mesh's (real) rank tensor
            return super()._tied_embedding_group()


@dataclass(frozen=True)
class Role:
    name: str  # "stage 0 (first)", ...
    rank: int
    coords: dict  # {"pp", "dp", "tp"}


def roles(plan: Plan) -> list[Role]:
    """The distinct rank roles of a resolved plan (see the module's docstring)."""
    last = plan.pp - 1
    stages = sorted({0, min(1, last), last}) if plan.pp > 2 else list(range(plan.pp))
    out = []
    for pp in stages:
        what = "only" if plan.pp == 1 else "first" if pp == 0 else "last" if pp == last else "middle"
        out.append(Role(f"stage {pp} ({what})", pp * plan.dp * plan.tp, {"pp": pp, "dp": 0, "tp": 0}))
    return out


@dataclass
class RoleTrace:
    role: Role
    measurement: dict  # run/measure.measurement_to_dict: the same JSON as a run's rank
    categories: dict[str, int]  # the peak's bytes by MemTracker category
    moments: dict[str, int]  # bytes at the step's moments
    flops: dict[str, int]  # FLOPs of the measured step by module (depth 2), "total" included
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "role": self.role.name,
            "rank": self.role.rank,
            "coords": dict(self.role.coords),
            "measurement": self.measurement,
            "peak_by_category": dict(self.categories),
            "moments": dict(self.moments),
            "flops": dict(self.flops),
            "seconds": self.seconds,
        }


class _Moments:
    """Bytes live (MemTracker's current total) at the moments of the step: the end of the largest
    forward, the optimizer step, and the end of the step."""

    def __init__(self, meter: Meter):
        self.meter = meter
        self.values: dict[str, int] = {}
        self.handles = []
        for m in meter.modules:
            self.handles.append(m.register_forward_hook(lambda *_: self._at("after forward")))
        self.handles.append(meter.engine.optimizer.register_step_pre_hook(lambda *_: self._at("optimizer step")))

    def _at(self, name: str) -> None:
        tracker = getattr(self.meter, "tracker", None)
        if tracker is None:
            return
        now = _total(tracker.get_tracker_snapshot("current"))
        self.values[name] = max(self.values.get(name, 0), now)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _total(snapshot: dict) -> int:
    return int(sum(d.get("Total", 0) for dev, d in snapshot.items() if torch.device(dev).type == "cpu"))


def _by_category(snapshot: dict) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    for dev, d in snapshot.items():
        if torch.device(dev).type == "cpu":
            for k, v in d.items():
                if k != "Total":
                    out[str(getattr(k, "value", k))] = out.get(str(getattr(k, "value", k)), 0) + int(v)
    return out


def _flops(counter: FlopCounterMode) -> dict[str, int]:
    out = {}
    for name, ops in counter.get_flop_counts().items():
        if name.count(".") <= 2:
            out["total" if name == "Global" else name] = int(sum(ops.values()))
    return out


def _first_step_states(engine: Engine) -> None:
    """What a first step leaves behind besides the weights' values: the optimizer's states (Adam's
    moments, created at its first step) and what train_step does after it (FP8 all-gather: the
    weights' scales, precomputed for the next step's all-gathers). Stepped once on zero gradients,
    then the gradients dropped, as train_step does: the steady state, without a whole forward and
    backward to get there."""
    for r in engine.params:
        r.param.grad = torch.zeros_like(r.param)
    engine.optimizer.step()
    for _, _, wrapped in engine.stages:
        fp8.after_step(wrapped, engine.plan)
    for r in engine.params:
        r.param.grad = None


def _mesh(plan: Plan):
    """The run tier's own mesh (HSDP's dp split in two included), on the fake group."""
    if plan.cp > 1:  # (pp, dp, cp, tp), dp x cp flattened: the run tier's own
        return rcontext.build_mesh(plan, torch.device("cpu"))
    return rdist.build_mesh(plan, torch.device("cpu"))


def trace_role(spec: ModelSpec, plan: Plan, role: Role, *, seed: int = 0, flops: bool = True) -> RoleTrace:
    """Build this role's rank of the plan and trace its steady-state step (plan resolved, dp set)."""
    t0 = time.perf_counter()
    with fake.world(plan.world, role.rank), fake.fp8_weights() if is_fp8(plan.precision) else contextlib.nullcontext():
        mesh = _mesh(plan)
        with fake.fake_tensors():
            engine = TracedEngine(spec, plan, device="cpu", seed=seed, mesh=mesh)
            modules = [w for _, _, w in engine.stages]
            order = ddp.ReadyOrder(modules)
            tokens = torch.zeros(plan.gbs // plan.dp, plan.seq + 1, dtype=torch.long)
            if order.ddps:  # a whole first step: DDP's gradient-ready order, then its buckets rebuilt
                engine.train_step(tokens)
                order.rebuild()
            else:
                _first_step_states(engine)
            meter = Meter(engine)
            moments = _Moments(meter)
            try:
                if order.ddps:  # a step on the new buckets, so the meter holds them from the start
                    with meter.step(1):
                        engine.train_step(tokens)
                counter = FlopCounterMode(display=False, depth=3) if flops else contextlib.nullcontext()
                with counter, meter.step(2, detail=True):
                    engine.train_step(tokens)
            finally:
                moments.close()
                meter.close()
            m = meter.measurement(plan.gbs * plan.seq)
            snapshot = getattr(meter, "peak_snapshot", {})
            moments.values["peak"] = m.memory.detail.get("peak", 0)
            return RoleTrace(
                role=role,
                measurement=measurement_to_dict(m),
                categories=_by_category(snapshot),
                moments=dict(moments.values),
                flops=_flops(counter) if flops else {},
                seconds=time.perf_counter() - t0,
            )


def check_traceable(spec: ModelSpec, plan: Plan, gpu=None) -> None:
    """The run tier's refusals, one line each, before anything is built; and what it can build
    only on CUDA, which the trace (fake tensors on the CPU device) cannot follow. FP8 is traced
    for `gpu` (the cluster's, spec/hardware.GPU; None: checked by the caller) where it has FP8."""
    check_runnable(spec)
    if gpu is not None:
        check_gpu(plan.precision, gpu)
    if plan.offload == "params":
        raise ShardwiseError(
            "--offload params moves FSDP2's shards to host memory on a CUDA device; the trace runs the engines "
            "on fake CPU tensors and cannot follow it: trace without it, or run it with `shardwise run` on GPUs"
        )
    if plan.precision == "fp16-mixed":
        raise ShardwiseError(
            "fp16-mixed needs CUDA's gradient scaler, which the trace (fake CPU tensors) cannot run; "
            "trace bf16-mixed: its memory and collectives are the same bytes"
        )
    if plan.compile:  # inductor compiles real kernels; the fake world has no data to run them on
        raise ShardwiseError(
            "--compile needs real tensors (inductor's kernels), which the trace's fake tensors are not; trace "
            "without it, or hold a compiled plan to a short `shardwise run` with `shardwise check`"
        )
    check_supported(spec, plan, None)


def trace(spec: ModelSpec, plan: Plan, *, seed: int = 0, flops: bool = True, jobs: int = 0) -> list[dict]:
    """Every role of a resolved plan (Plan.resolve(spec, gpus) first), each in a child process of
    its own (forked: torch is imported once): DTensor and DeviceMesh cache what they computed for a
    mesh by its layout, so a second fake world in the same process would reuse the first's groups.
    `jobs` children at a time (default: one per CPU), each capped at its share of the memory
    available. Returns RoleTrace.to_dict() per role, in role order."""
    rs = roles(plan)
    jobs = jobs or max(1, min(len(rs), os.cpu_count() or 1))
    out = []
    for i in range(0, len(rs), jobs):
        running = [_start(spec, plan, r, seed, flops, jobs) for r in rs[i : i + jobs]]
        out += [_finish(*child) for child in running]
    return out


def _available() -> int:
    """Bytes of memory available to new allocations now (Linux MemAvailable), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_memory(share: int = 1) -> None:
    """Cap this child's address space at what it holds now plus its share of the memory available:
    a trace that outgrows the machine fails with MemoryError (one line), never swaps it to death."""
    import resource

    avail = _available() // share
    if not avail:
        return
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    limit = pages * resource.getpagesize() + avail
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _out_of_memory(role: Role) -> str:
    return (
        f"tracing {role.name} (rank {role.rank}) ran out of this machine's memory ({units.gib(_available())} "
        "available now). Fake tensors hold no data, so what grows is the bookkeeping: Python objects per "
        "operation and per parameter; trace fewer micro-batches (--gbs) or layers (--layers), or on a larger machine"
    )


def _start(spec: ModelSpec, plan: Plan, role: Role, seed: int, flops: bool, share: int):
    import multiprocessing as mp
    import traceback

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child():
        try:
            _limit_memory(share)
            send.send(("ok", trace_role(spec, plan, role, seed=seed, flops=flops).to_dict()))
        except ShardwiseError as e:
            send.send(("user", str(e)))
        except MemoryError:
            send.send(("user", _out_of_memory(role)))
        except BaseException as e:  # reported by the parent, with its traceback
            send.send(("bug", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))

    p = ctx.Process(target=child, daemon=True)
    p.start()
    send.close()
    return role, p, recv


def _finish(role: Role, p, recv) -> dict:
    try:
        kind, value = recv.recv()
    except EOFError:
        p.join()
        raise ShardwiseError(
            f"tracing {role.name} (rank {role.rank}) died (exit code {p.exitcode}) without a word; "
            "run it again to see whether it is this machine's memory"
        ) from None
    p.join()
    if kind == "user":
        raise ShardwiseError(value)
    if kind == "bug":
        raise RuntimeError(f"tracing {role.name} (rank {role.rank}) failed: {value}")
    return value
