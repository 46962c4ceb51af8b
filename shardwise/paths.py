"""Output paths, checked before the work starts: a run, a calibration or a check that ends by
failing to write its file has wasted the minutes before it. A path passes when its directory
exists (or can be made) and a file can really be created in it: a probe file is made and removed
at once, since permission bits alone say nothing for root or for /proc-like file systems."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from shardwise.errors import ShardwiseError


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def _can_create_in(directory: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".shardwise-probe-"):
            return True
    except OSError:
        return False


def check_output_file(path: str, where: str) -> None:
    """`path` can be written as a file: not a directory, and its directory exists or can be made."""
    p = Path(path)
    if p.is_dir():
        raise ShardwiseError(f"{where}: {path} is a directory; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise ShardwiseError(f"{where}: {path} is not writable; give a file you can write")
    base = _nearest_existing(p.parent)
    if not base.is_dir() or not _can_create_in(base):
        raise ShardwiseError(f"{where}: cannot write {path} ({base} does not take new files); give another path")


def check_output_dir(path: str, where: str) -> None:
    """`path` is a directory files can be written in, or can be made one."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ShardwiseError(f"{where}: {path} is a file, not a directory; give a directory")
    base = _nearest_existing(p)
    if not base.is_dir() or not _can_create_in(base):
        raise ShardwiseError(f"{where}: cannot write in {path} ({base} does not take new files); give another path")
