"""Output paths are checked before the work starts (shardwise/paths.py), and the check writes
nothing that stays."""

from __future__ import annotations

import pytest

from shardwise.errors import ShardwiseError
from shardwise.paths import check_output_dir, check_output_file


def test_a_file_in_a_new_directory_passes_and_leaves_nothing(tmp_path):
    check_output_file(str(tmp_path / "a" / "b" / "m.jsonl"), "--metrics")
    check_output_dir(str(tmp_path / "ckpt" / "run1"), "--checkpoint-dir")
    assert list(tmp_path.iterdir()) == []  # the probe file is gone; no directory was made


def test_a_directory_is_not_a_file_and_a_file_is_not_a_directory(tmp_path):
    with pytest.raises(ShardwiseError, match="is a directory; give a file name"):
        check_output_file(str(tmp_path), "--metrics")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ShardwiseError, match="is a file, not a directory"):
        check_output_dir(str(tmp_path / "f"), "--out")
    with pytest.raises(ShardwiseError, match="does not take new files"):
        check_output_file(str(tmp_path / "f" / "m.jsonl"), "--metrics")  # under a file


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs a /proc file system")
def test_a_file_system_that_takes_no_files_fails_for_root_too():
    with pytest.raises(ShardwiseError, match=r"--figure: cannot write /proc/x.png \(/proc does not take new files\)"):
        check_output_file("/proc/x.png", "--figure")
    with pytest.raises(ShardwiseError, match="cannot write in /proc/ck"):
        check_output_dir("/proc/ck", "--checkpoint-dir")
