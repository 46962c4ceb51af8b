"""Run a function on N ranks (CPU/gloo, or one GPU each with NCCL), as torchrun would, and
collect what each rank returns.

The ranks are spawned processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT on a free port), so the code under test joins its process group the
way it does in production (shardwise.run.dist.init_distributed). A rank that raises fails the
call with its traceback; a job that runs past `timeout` is killed and fails it too, so a hang
never blocks CI.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, args, rank, world, port, queue, device_kind):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks on a few cores: no oversubscription
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        from shardwise.run.dist import init_distributed, local_device

        init_distributed(local_device(device_kind), timeout_s=60)
        # pickled here, not by the queue: torch's queue would pass tensors through shared memory,
        # which dies with this process before the parent reads it
        queue.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailed(AssertionError):
    pass


def run_ranks(fn: Callable[..., Any], world: int, *args, timeout: float = 150.0, device: str = "cpu") -> list[Any]:
    """fn(*args) on `world` ranks (device "cpu": gloo; "cuda": NCCL, one GPU per rank);
    returns [result of rank 0, rank 1, ...]. fn must be importable (a module-level function)
    and its result picklable."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, args, r, world, port, queue, device), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailed(f"{world}-rank job timed out after {timeout:.0f}s (ranks done: {sorted(results)})")
            try:
                rank, status, payload = queue.get(timeout=min(left, 1.0))
            except Exception:  # queue.Empty: check for ranks that died without reporting
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead and queue.empty():
                    time.sleep(0.5)  # a rank may have put its result just before exiting
                    if queue.empty():
                        raise RankFailed(
                            f"rank(s) {dead} died without a result (exit codes {[procs[r].exitcode for r in dead]})"
                        ) from None
                continue
            if status == "error":
                raise RankFailed(f"rank {rank} raised:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
