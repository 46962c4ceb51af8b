"""Shared by the speed benchmarks: empty the estimate tier's caches (to time a first, cold call)
and say how busy the machine is (CPU seconds on a shared machine still move with its load)."""

from __future__ import annotations

import importlib
import os
import pkgutil


def clear_estimate_caches() -> None:
    """Every functools.lru_cache and memo table in shardwise.estimate.* (sub-packages too: memory/):
    a fresh ModelSpec then starts from nothing, as the first estimate of a new model does."""
    package = importlib.import_module("shardwise.estimate")  # (shardwise.estimate is also the function)
    for info in pkgutil.walk_packages(package.__path__, "shardwise.estimate."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"
