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
            stack.enter_context(_patched(PipelineStage, "_warmup_backward_result", _vote_result))
            stack.enter_context(_patched(mem_tracker._WeakRefInfo, "_calculate_mem_consumed", rounded))
            yield
    finally:
        dist.destroy_process_group()


def _own_vote(self, has_backward: bool, received_acc=None):
    from torch.distributed.pipelining.stage import InferenceMode

    with unset_fake_temporarily():
        self._shardwise_vote = torch.tensor([0 if InferenceMode.needs_dynamic(self._user_meta, has_backward) else 1])
    return self._shardwise_vote


def _vote_result(self, received_result=None):
    return self._shardwise_vote


def fake_tensors() -> FakeTensorMode:
    """Tensors with shapes and no storage; real tensors (the meta model, mesh arithmetic) may flow in."""
    return FakeTensorMode(allow_non_fake_inputs=True)
