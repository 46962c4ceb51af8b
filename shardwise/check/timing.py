"""Timing on every rank at once: a call's seconds as the slowest rank saw them (as in a training
step, the slowest rank counts), robust to the bursts of other work on a shared machine."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

MIN_SECONDS = 0.05  # time each point for at least this long per round (more calls for small ones)
ROUNDS = 5  # the median of 5: a collective on a shared machine is often 2x off in one round


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(device):
    sync(device)
    if dist.is_initialized():
        dist.barrier()


def timed(fn, device, min_s: float = MIN_SECONDS) -> float:
    """Seconds per call of fn(): one warm-up, then ROUNDS rounds of enough calls to fill min_s, the
    median round; every rank starts each round together and the slowest rank's time is the
    answer (as in a step, the slowest rank counts)."""
    fn()
    barrier(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    reps = max(2, min(1000, int(min_s / one)))
    if dist.is_initialized():  # the same number of calls everywhere, or the collectives would deadlock
        r = torch.tensor([reps], dtype=torch.int64, device=device)
        dist.all_reduce(r, op=dist.ReduceOp.MAX)
        reps = int(r.item())
    rounds = []
    for _ in range(ROUNDS):  # the median of a few rounds: a busy machine's spikes do not decide it
        barrier(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        rounds.append((time.perf_counter() - t0) / reps)
    dt = torch.tensor([statistics.median(rounds)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt.item())


def samples_together(fns, device, rounds: int, warmup: int = 1) -> list[list[float]]:
    """This rank's seconds of each call of each fn over `rounds` after `warmup` calls. The fns
    take turns call by call, so a burst of other work on a shared machine lands on all of them
    alike; every call starts on every rank together."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            barrier(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def slowest_median(times: list[list[float]], device) -> list[float]:
    """The median of each fn's samples, the slowest rank's (as in a step, the slowest rank counts)."""
    import torch

    t = torch.tensor([statistics.median(x) for x in times], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
