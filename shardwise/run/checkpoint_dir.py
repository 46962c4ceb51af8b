"""The checkpoint directory of `shardwise run`, without torch: names, "latest", pruning, the trainer state.

    DIR/step-000150/          a complete checkpoint after 150 finished steps: a PyTorch Distributed
                              Checkpoint (DCP) directory (.metadata + one .distcp file per writing rank)
                              plus trainer.json (the step, RNG states, the plan it was saved under, ...)
    DIR/.tmp-step-000150/     the same while it is being written; renamed by rank 0 once every rank
                              has finished, so a half-written checkpoint is never taken for the latest

config.py checks a resume target with these functions before any process starts (it loads no torch);
run/checkpoint.py writes and reads the tensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from shardwise.errors import ShardwiseError

TMP_PREFIX = ".tmp-"
TRAINER = "trainer.json"
DCP_METADATA = ".metadata"  # written by DCP's coordinator last: its presence means the tensors are all there
FORMAT = 1  # trainer.json's layout; a later change bumps it and reads the old one explicitly
_STEP = re.compile(r"step-(\d+)")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def tmp_path(root: str | Path, step: int) -> Path:
    return Path(root) / (TMP_PREFIX + step_name(step))


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / TRAINER).is_file() and (path / DCP_METADATA).is_file()


def complete(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under root, oldest first. Leftover .tmp-* are not
    matched (the pattern anchors at "step-"), nor is a step-* that lacks its metadata or trainer state."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP.fullmatch(p.name)
        if m and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(root: str | Path) -> Path | None:
    found = complete(root)
    return found[-1][1] if found else None


def commit(tmp: Path, final: Path) -> None:
    """Make a fully written checkpoint visible under its final name (rank 0, after a barrier).
    The same step saved again (a resume from an older checkpoint) replaces the old one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; return what was deleted."""
    old = [p for _, p in complete(root)][:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p)
    return old


def write_trainer(path: Path, state: dict) -> None:
    tmp = path / (TRAINER + ".part")
    tmp.write_text(json.dumps({"format": FORMAT, **state}, indent=1))
    os.replace(tmp, path / TRAINER)


def read_trainer(path: str | Path) -> dict:
    f = Path(path) / TRAINER
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ShardwiseError(
            f"{f}: cannot read the checkpoint's trainer state ({e}); resume from another checkpoint"
        ) from None
    if state.get("format") != FORMAT:
        raise ShardwiseError(f"{f}: checkpoint format {state.get('format')!r}, this shardwise reads {FORMAT}")
    return state


def resolve(resume: str, root: str, where: str) -> Path:
    """The checkpoint a resume names: "latest" (the newest complete one under root) or a path,
    which must be a complete checkpoint (or a checkpoint directory, meaning its latest)."""
    if resume == "latest":
        if not root:
            raise ShardwiseError(
                f"{where}: latest means the newest checkpoint in the checkpoint directory: set --checkpoint-dir"
            )
        found = latest(root)
        if found is None:
            raise ShardwiseError(
                f"{where}: no complete checkpoint in {root}; drop --resume to start from step 0, or give its path"
            )
        return found
    p = Path(resume)
    if is_complete(p):
        return p
    if p.is_dir() and latest(p) is not None:
        return latest(p)
    why = "does not exist" if not p.exists() else "is not a complete checkpoint (no .metadata or trainer.json)"
    raise ShardwiseError(f"{where}: {resume} {why}; give a {step_name(150)}-style directory or its parent")
