"""Helpers for the export tests: a resolved Job, and an Imported turned back into a Plan the way
the command line does (the file's fields over the flags')."""

from __future__ import annotations

import dataclasses
import importlib
import os

import pytest

from shardwise.export import Job
from shardwise.spec.hardware import make_cluster
from shardwise.spec.plan import Plan
from shardwise.spec.presets import preset


def job(model="llama-3.1-8b", gpus=16, **plan) -> Job:
    m = preset(model)
    return Job(m, Plan(**plan).resolve(m, gpus), make_cluster("h100-80gb", gpus), model)


def plan_back(imp, original: Plan, flags=()) -> Plan:
    """The Plan an import gives, with only `flags` (fields the file cannot hold) from the original,
    everything else at Plan's defaults unless the file says otherwise."""
    fields = {f: getattr(original, f) for f in flags} | dict(imp.plan)
    world = imp.gpus or original.world
    fields.setdefault("dp", world // (fields.get("tp", 1) * fields.get("pp", 1) * fields.get("cp", 1)))
    if imp.grad_accum is not None and "gbs" not in fields:
        fields["gbs"] = fields.get("mbs", 1) * imp.grad_accum * fields["dp"]
    return Plan(**fields)


def framework(name: str):
    """The framework's own module: skipped where it is not installed, but never in CI (CI=true)."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def dims(model) -> dict:
    """A model's architecture, without the names and sources that say where it came from."""
    d = dataclasses.asdict(model)
    return {k: v for k, v in d.items() if k not in ("name", "source", "published_params", "estimated")}
