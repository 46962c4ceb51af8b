"""What an export is made from and what an import gives back: the same ModelSpec and Plan every
tier uses, never a second description of either.

Each format module (torchtitan, megatron, deepspeed, accelerate, slurm, runconfig) has
`refuse(job)` (the one line naming what the target cannot express, or None), `render(job)` (an
Export) and, where the format is read back, `read(path, text)` (an Imported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardwise.errors import ShardwiseError
from shardwise.spec.hardware import Cluster
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan


@dataclass(frozen=True)
class Job:
    model: ModelSpec
    plan: Plan  # resolved: dp and gbs filled in
    cluster: Cluster
    model_ref: str | None = None  # the preset name or the file that names the model; None: its dimensions


@dataclass(frozen=True)
class Export:
    text: str  # the file's contents
    filename: str  # the name the framework's documentation uses for it
    launch: str = ""  # the command line that starts training with it ("" when the file is the command)


@dataclass(frozen=True)
class Imported:
    fmt: str
    plan: dict  # Plan fields the file sets; the rest come from the command line's flags
    model: ModelSpec | None = None  # None: the file names no model (DeepSpeed, accelerate)
    model_ref: str | None = None  # the preset or file the model came from, for exports
    gpus: int | None = None  # the world size the file's launcher asks for, when it says
    grad_accum: int | None = None  # when the file gives accumulation steps, not the global batch
    ignored: list[str] = field(default_factory=list)  # settings read but not modelled, to tell the user


def refused(fmt: str, what: str) -> ShardwiseError:
    return ShardwiseError(f"--export {fmt}: {what}")


def bad_file(path: str, what: str) -> ShardwiseError:
    return ShardwiseError(f"{path}: {what}")


def nodes_and_per_node(cluster: Cluster) -> tuple[int, int]:
    """Nodes and processes per node for a launcher: a cluster smaller than one server is one node."""
    per = min(cluster.gpus, cluster.gpus_per_node)
    return math.ceil(cluster.gpus / per), per


def toml_text(tables: dict[str, dict], header: str = "") -> str:
    """TOML for flat tables of strings, numbers, booleans and lists of them (all an export needs)."""
    lines = [header.rstrip()] if header else []
    for name, table in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")
