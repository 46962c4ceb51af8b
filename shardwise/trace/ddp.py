"""DDP under the fake backend: its all-reduce hook, and its bucket rebuild done in Python.

A real DDP builds its buckets at construction in reverse registration order, then, before the
second forward, rebuilds them once in the order the first backward made the gradients ready
(c10d Reducer::rebuild_buckets, which runs compute_bucket_assignment_by_size over the ready order
with the same 1 MiB-first, 25 MiB-after limits). The rebuild syncs the bucket indices from rank 0
through a tensor written element by element in C++, which a fake tensor cannot be. So here the
first step records the ready order (a post-accumulate-grad hook per parameter), and the reducer
is built again from it, the way DistributedDataParallel.__setstate__ builds one; the C++ rebuild
is then turned off. Steady-state buckets, as the estimate models them and a run measures them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def comm_hook(group, bucket):
    """DDP's default all-reduce of a gradient bucket, issued as the c10d call it is, with a future
    the reducer can take (the fake backend's Work has no result to give). The average's division
    changes no byte and no shape: left out."""
    buf = bucket.buffer()
    dist.all_reduce(buf, group=group)
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


class _NoRebuild:
    """DDP's reducer with its one-time C++ bucket rebuild turned off."""

    def __init__(self, reducer):
        self._reducer = reducer

    def __getattr__(self, name):
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> bool:
        return False


def _fit(module: DDP) -> None:
    module.register_comm_hook(module.process_group, comm_hook)
    module.reducer = _NoRebuild(module.reducer)


class ReadyOrder:
    """Records, for each DDP module, the order in which its parameters' gradients become ready."""

    def __init__(self, modules):
        self.ddps = [m for m in modules if isinstance(m, DDP)]
        self.order: dict[int, list[int]] = {}
        # the reducer's own list, kept: under DDP + TP the module's parameters are swapped for their
        # local shards at the first forward, and the module no longer lists them afterwards
        self.params: dict[int, tuple[list, list, dict]] = {}
        self.handles = []
        for m in self.ddps:
            _fit(m)
            params, sparse = m._build_params_for_reducer()
            self.params[id(m)] = (params, sparse, m._build_debug_param_to_name_mapping(params))
            seen = self.order.setdefault(id(m), [])
            for i, p in enumerate(params):
                self.handles.append(p.register_post_accumulate_grad_hook(lambda _p, i=i, s=seen: s.append(i)))

    def rebuild(self) -> None:
        """Build each DDP's reducer again over the recorded order (call after the first step)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        for m in self.ddps:
            ready = list(dict.fromkeys(self.order[id(m)]))
            params, sparse, names = self.params[id(m)]
            ready += [i for i in range(len(params)) if i not in set(ready)]  # unused: last, as c10d does
            original = dist._compute_bucket_assignment_by_size

            # the limits of the rebuild, not of construction (which puts everything in one bucket
            # until the order is known): DDP's for rebuilding, or the C++ reducer's default pair
            cfg = m._bucket_config
            rebuild = cfg.compute_bucket_size_limits(m.static_graph, m.find_unused_parameters)[1]
            limits = rebuild or [cfg.first_bucket_bytes_cap, cfg.bucket_bytes_cap]

            def in_ready_order(tensors, _limits, expect_sparse, _orig=original, _ready=ready, _rebuild=limits):
                # as the C++ rebuild calls it: the tensors in ready order, each labelled with its index
                idx, sizes = _orig([tensors[i] for i in _ready], _rebuild, [expect_sparse[i] for i in _ready], _ready)
                # DDP reverses the list it is given (construction order approximates the reverse of
                # readiness); given the ready order, hand it over reversed so it comes out as is
                return list(reversed(idx)), list(reversed(sizes))

            with _swap(dist, "_compute_bucket_assignment_by_size", in_ready_order):
                m._ddp_init_helper(params, sparse, names, m.static_graph)
            _fit(m)


@contextlib.contextmanager
def _swap(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)
