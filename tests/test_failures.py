"""The launcher's message after ranks die (run/failures.py), from torchrun's own ProcessFailure
records and error files as the workers write them: the rank that failed first for a reason of its
own is named, with its error; ranks that only lost their connection to it are one clause."""

from __future__ import annotations

import json
import os

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from shardwise.run import failures


def failure(tmp_path, rank: int, exitcode: int, error: BaseException | None = None, at: float = 0.0):
    path = tmp_path / f"error-{rank}.json"
    if error is not None:
        try:
            raise error
        except BaseException as e:  # recorded as a worker does, from inside its except clause
            os.environ["TORCHELASTIC_ERROR_FILE"] = str(path)
            try:
                assert failures.record(e, rank)
            finally:
                del os.environ["TORCHELASTIC_ERROR_FILE"]
        data = json.loads(path.read_text())
        data["shardwise"]["time"] = at
        path.write_text(json.dumps(data))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))


def test_a_killed_rank_is_named_and_the_lost_connections_are_one_clause(tmp_path):
    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    f = {
        0: failure(tmp_path, 0, 1, lost, at=5.0),  # noticed first...
        1: failure(tmp_path, 1, -9),  # ...but rank 1 is the one that died
        2: failure(tmp_path, 2, 1, lost, at=5.1),
    }
    msg, code = failures.report(f)
    assert msg.startswith("rank 1 was killed by signal 9 (SIGKILL); ranks 0, 2 lost the connection (RuntimeError: ")
    assert "Connection closed by peer" in msg and msg.endswith("every rank was stopped")
    assert code == 1


def test_the_first_own_error_wins_over_a_later_one_and_over_lost_connections(tmp_path):
    f = {
        0: failure(tmp_path, 0, 1, ValueError("second"), at=2.0),
        3: failure(tmp_path, 3, 1, ValueError("first"), at=1.0),
        1: failure(tmp_path, 1, 1, RuntimeError("Connection reset by peer"), at=0.5),
    }
    msg, _ = failures.report(f, restarts=2)
    assert msg.startswith("rank 3 failed: ValueError: first (its traceback is above); rank 1 lost the connection")
    assert msg.endswith("(after 2 restarts: --max-restarts is spent)")


def test_only_lost_connections_point_to_another_node(tmp_path):
    lost = RuntimeError("Connection closed by peer")
    msg, code = failures.report({4: failure(tmp_path, 4, 1, lost, at=1.0), 5: failure(tmp_path, 5, 1, lost, at=2.0)})
    assert msg.startswith("rank 4 failed: RuntimeError: Connection closed by peer; it lost its connection to a rank")
    assert "rank 5 lost the connection" in msg and code == 1


def test_an_exit_code_without_an_error_file_is_passed_on(tmp_path):
    msg, code = failures.report({2: failure(tmp_path, 2, 3)})
    assert msg == "rank 2 exited with code 3; every rank was stopped" and code == 3


def test_connection_errors_are_told_from_the_rest():
    assert failures.lost_peer(RuntimeError("Gloo connectFullMesh failed ... Connection refused"))
    assert not failures.lost_peer(RuntimeError("injected failure on rank 1 at step 2"))
    assert not failures.lost_peer(ValueError("shapes do not match"))


def test_ranks_the_agent_stopped_are_not_the_cause(tmp_path):
    """torchrun's record of a rank it stopped (SIGTERM, no error file) carries a whole-second
    timestamp that can sort before the failing rank's own error: it must not be named."""
    f = {0: failure(tmp_path, 0, -15), 1: failure(tmp_path, 1, 1, RuntimeError("injected"), at=9e12)}
    msg, code = failures.report(f)
    assert msg.startswith("rank 1 failed: RuntimeError: injected (its traceback is above)") and code == 1
