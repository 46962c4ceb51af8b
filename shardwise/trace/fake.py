"""The fake world: one process plays one rank of any world size, on tensors without storage.

    process group   PyTorch's fake backend (torch.testing._internal.distributed.fake_pg): every
                    collective is issued through the dispatcher, as on a real backend, and returns
                    at once; so the run tier's engines build and step exactly as they would
    tensors         FakeTensorMode: shapes, dtypes and strides, no bytes; the model is built on
                    the meta device as in a real run (run/model.build), materialized as fakes

What the engines do that needs real values is taken out here, and only that (each with its reason):
    DDP             its constructor checks parameter shapes across ranks and broadcasts rank 0's
                    weights (values: nothing to check or send); its reducer's C++ all-reduce hook
                    expects a backend's future, which the fake backend does not give, so the
                    bucket is all-reduced by a Python comm hook (the same c10d call, same bytes);
                    its bucket rebuild after the first step syncs bucket indices through a
                    tensor filled element by element in C++ (impossible on a fake tensor): the
                    trace rebuilds the reducer itself, in the order the first backward made the
                    gradients ready, as Reducer::rebuild_buckets does (trace/ddp.py)
    initial weights the run tier draws each parameter's full tensor from a seeded generator and keeps
                    its shard's slice (run/model.init_weights): values, which a fake has none of,
                    and most of building a stage; left out (nothing the meter reads changes)
    pipelining      its schedules' first step has the stages vote, by send/recv of a flag, on whether
                    every stage was given its input and output shapes; each stage here votes from
                    its own metadata, as every real stage would, and takes its own vote as the result
                    (on real tensors: the schedule reads the result with .item())
    DeviceMesh      meshes are rank arithmetic on small integer tensors (nonzero, item): always
                    computed on real tensors
    the allocator   MemTracker rounds every storage up to the CUDA caching allocator's 512-byte
                    block (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize), as it does for
                    CUDA tensors: the fakes live on "cpu" (FSDP2 on a fake "cuda" device asserts
                    that torch was built with CUDA), the accounting is a GPU's
    torchao FP8     its weight wrapper lists its precomputed scale as an inner tensor `if` the scale
                    tensor is truthy (torchao/float8/fsdp_utils.py, __tensor_flatten__): a value, which
                    a fake scalar does not have; asked `is not None` instead (fp8_weights())
    DTensor         its sharding propagation runs each new op once on fake tensors of the op's
                    global shapes, to learn the output's (ShardingPropagator.
                    _propagate_tensor_meta_non_cached); it takes the fake mode already active, ours,
                    so MemTracker would count those global-shape tensors (a [V, H] table's gradient
                    whole, twice) as this rank's memory: nothing is tracked while it runs
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.tensor._sharding_prop import ShardingPropagator

from shardwise.run.model import Transformer

CUDA_BLOCK = 512  # c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize, every allocation rounded up to it


def _real(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with unset_fake_temporarily():
            return fn(*a, **k)

    return wrapper


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def world(world_size: int, rank: int):
    """The fake process group (this process = `rank` of `world_size`) and the patches above, undone
    on exit. No real tensor is allocated for the model inside: build, parallelize and step under
    `fake_tensors()`."""
    import torch.nn.parallel.distributed as ddp
    from torch.distributed._tools import mem_tracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)

    def rounded(self) -> int:
        return math.ceil(self.size * self.element_size / CUDA_BLOCK) * CUDA_BLOCK

    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(ddp, "_verify_param_shape_across_processes", lambda *a, **k: None))
            stack.enter_context(_patched(ddp, "_sync_module_states", lambda *a, **k: None))
            for name in ("__init__", "_concatenate", "__getitem__", "_flatten"):
                if name in vars(DeviceMesh):
                    raw = vars(DeviceMesh)[name]
                    wrapped = staticmethod(_real(raw.__func__)) if isinstance(raw, staticmethod) else _real(raw)
                    stack.enter_context(_patched(DeviceMesh, name, wrapped))
            stack.enter_context(_patched(_PipelineSchedule, "_warmup_p2p", _real(_PipelineSchedule._warmup_p2p)))
            stack.enter_context(_patched(PipelineStage, "_warmup_forward_vote", _own_vote))
            stack.enter_context(_patched(Transformer, "init_weights", lambda self, seed: None))
            stack.enter_context(_patched(PipelineStage, "_warmup_backward_result", _vote_result))
            stack.enter_context(_patched(mem_tracker._WeakRefInfo, "_calculate_mem_consumed", rounded))
            track = mem_tracker.MemTracker._track
            stack.enter_context(_patched(mem_tracker.MemTracker, "_track", _unless_propagating(track)))
            propagate = ShardingPropagator._propagate_tensor_meta_non_cached
            stack.enter_context(
                _patched(ShardingPropagator, "_propagate_tensor_meta_non_cached", _propagating(propagate))
            )
            yield
    finally:
        dist.destroy_process_group()


_PROPAGATING = [0]  # > 0 while DTensor's sharding propagation runs its op on global-shape fakes


def _propagating(propagate):
    @functools.wraps(propagate)
    def wrapper(*a, **k):
        _PROPAGATING[0] += 1
        try:
            return propagate(*a, **k)
        finally:
            _PROPAGATING[0] -= 1

    return wrapper


def _unless_propagating(track):
    @functools.wraps(track)
    def wrapper(self, reftype, t):
        if not _PROPAGATING[0]:
            track(self, reftype, t)

    return wrapper


def _own_vote(self, has_backward: bool, received_acc=None):
    from torch.distributed.pipelining.stage import InferenceMode

    with unset_fake_temporarily():
        self._shardwise_vote = torch.tensor([0 if InferenceMode.needs_dynamic(self._user_meta, has_backward) else 1])
    return self._shardwise_vote


def _vote_result(self, received_result=None):
    return self._shardwise_vote


@contextlib.contextmanager
def fp8_weights():
    """torchao's FP8 weight wrapper, flattened without reading its scale's value (module docstring)."""
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor as Weight

    def flatten(self):
        tensors = ["_tensor"] + (["_precomputed_scale"] if self._precomputed_scale is not None else [])
        return tensors, {"mm_config": self._linear_mm_config, "dtype": self._dtype}

    with _patched(Weight, "__tensor_flatten__", flatten):
        yield


def fake_tensors() -> FakeTensorMode:
    """Tensors with shapes and no storage; real tensors (the meta model, mesh arithmetic) may flow in."""
    return FakeTensorMode(allow_non_fake_inputs=True)
