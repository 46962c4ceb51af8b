"""Plans to the frameworks people train with, and their configs back to plans: torchtitan,
Megatron-LM, DeepSpeed, accelerate (FSDP2), Slurm and shardwise's own run TOML out; the same plus
axolotl in. Torch-free, like report: it imports spec only."""

from __future__ import annotations

import tomllib
from pathlib import Path

from shardwise.errors import ShardwiseError, closest
from shardwise.export import accelerate, deepspeed, megatron, runconfig, slurm, torchtitan
from shardwise.export.job import Export, Imported, Job, bad_file
from shardwise.spec import limits

FORMATS = {m.FMT: m for m in (torchtitan, megatron, deepspeed, accelerate, slurm, runconfig)}
READERS = {m.FMT: m for m in (torchtitan, megatron, deepspeed, accelerate, runconfig)}
MAX_BYTES = 1 << 20  # a config file is a few KiB; anything past 1 MiB is not one

__all__ = ["FORMATS", "Export", "Imported", "Job", "export", "read_file", "which"]


def export(fmt: str, job: Job) -> Export:
    if fmt not in FORMATS:
        raise ShardwiseError(f"unknown export format {fmt!r}; {closest(fmt, FORMATS)} (one of {', '.join(FORMATS)})")
    return FORMATS[fmt].render(job)


def which(path: str, text: str) -> str:
    """The format of a config file, by its extension and the keys only that framework uses."""
    suffix = Path(path).suffix.lower()
    if suffix == ".toml":
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise bad_file(path, f"not valid TOML ({e})") from None
        if "parallelism" in d or "training" in d or "job" in d:
            return torchtitan.FMT
        if "plan" in d or "model" in d:
            return runconfig.FMT
        raise bad_file(
            path, "neither a torchtitan job config ([parallelism], [training]) nor a shardwise run config ([plan])"
        )
    if suffix == ".json":
        return deepspeed.FMT
    if suffix in (".yaml", ".yml"):
        return accelerate.FMT  # accelerate or axolotl: accelerate.read tells them apart
    if "--tensor-model-parallel-size" in text or "--num-layers" in text:
        return megatron.FMT
    raise bad_file(
        path,
        "unknown config kind: give a torchtitan or shardwise .toml, a DeepSpeed .json, an accelerate or axolotl .yaml, or a file of Megatron-LM flags",
    )


def read_file(path: str) -> Imported:
    p = Path(path)
    if not p.is_file():
        raise ShardwiseError(
            f"--from {path}: no such file; give a torchtitan/shardwise TOML, DeepSpeed JSON, accelerate/axolotl YAML or Megatron flags file"
        )
    if p.stat().st_size > MAX_BYTES:
        raise bad_file(path, f"{p.stat().st_size} bytes is too large for a config file (at most {MAX_BYTES})")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise bad_file(path, "not a text file") from None
    imp = READERS[which(path, text)].read(path, text)
    for f, v in imp.plan.items():
        if f in limits.PLAN and isinstance(v, int) and not isinstance(v, bool):
            limits.check_count(f"{path}: {f}", v, limits.PLAN[f])
    return imp
