"""When ranks die: each worker records its own error, and the launcher names the rank that failed first.

A rank that dies takes the collectives of every other rank with it: they fail too, a moment later,
with a connection error ("Connection closed by peer") that says nothing about the cause. So each
worker writes its failure to torchrun's error file (TORCHELASTIC_ERROR_FILE, the format of
torch.distributed.elastic.multiprocessing.errors.ErrorHandler.record_exception, which the agent
reads into ProcessFailure.error_file_data) with two additions: whether it is such a lost
connection, and the time to the microsecond (torchrun's own timestamp has whole seconds, too coarse
to order ranks that fail within one). The launcher then reports the rank that failed for a reason
of its own (or was killed), with its message, and the lost connections in one line.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback

# the errors a rank gets when a peer is gone: gloo's and NCCL's broken connections and timeouts, the
# store's; torch raises them as DistBackendError / DistNetworkError / DistStoreError or a RuntimeError
LOST_PEER = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "socket closed",
    "timed out",
    "timeout",
    "nccl communicator was aborted",
    "ncclremoteerror",
    "the client socket has failed",
)
PEER_ERRORS = ("DistBackendError", "DistNetworkError", "DistStoreError")


def lost_peer(e: BaseException) -> bool:
    """The error says a peer is gone (not why): a collective's connection or the store failed."""
    text = f"{type(e).__name__}: {e}".lower()
    return type(e).__name__ in PEER_ERRORS or any(s in text for s in LOST_PEER)


def first_line(text: str, width: int = 160) -> str:
    line = " ".join(str(text).split("\n")[0].split())
    return line if len(line) <= width else line[: width - 3] + "..."


def record(e: BaseException, rank: int) -> bool:
    """Write this rank's failure where torchrun's agent reads it; True when written (under an agent)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    data = {
        "message": {
            "message": f"{type(e).__name__}: {e}",
            "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))},
        },
        "shardwise": {"rank": rank, "lost_peer": lost_peer(e), "time": time.time()},
    }
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        return False
    return True


def _message(failure) -> str:
    m = failure.message
    return m.get("message", "") if isinstance(m, dict) else str(m)


def _ours(failure) -> dict:
    data = failure.error_file_data
    return data.get("shardwise", {}) if isinstance(data, dict) else {}


def _how(failure) -> str:
    code = failure.exitcode
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-code} ({name})"
    msg = _message(failure) if _ours(failure) else ""
    return f"failed: {first_line(msg)}" if msg else f"exited with code {code}"


def report(failures: dict, restarts: int = 0) -> tuple[str, int]:
    """(one message, exit code) for torchrun's failures {global rank: ProcessFailure}: the rank that
    failed first for a reason of its own, then the ranks that only lost their connection to it."""
    lost = {r for r, f in failures.items() if _ours(f).get("lost_peer") and f.exitcode > 0}
    # SIGTERM without an error of its own: the agent stopping a rank once another had failed
    stopped = {r for r, f in failures.items() if f.exitcode == -signal.SIGTERM and not _ours(f)}
    causes = (
        {r: f for r, f in failures.items() if r not in lost | stopped}
        or {r: f for r, f in failures.items() if r not in lost}
        or failures
    )

    def when(item) -> tuple[bool, float]:
        """A rank killed by a signal first (it leaves no error file, and torchrun's timestamp for it,
        in whole seconds, is when the agent noticed), then by the time of its error."""
        r, f = item
        return bool(_ours(f)), _ours(f).get("time", float(f.timestamp))

    rank, first = min(causes.items(), key=when)
    msg = f"rank {rank} {_how(first)}"
    if _ours(first) and not _ours(first).get("lost_peer") and first.exitcode == 1:
        msg += " (its traceback is above)"
    if rank in lost:  # every failure here is a lost connection: the rank that died is on another node
        msg += "; it lost its connection to a rank on another node, whose own error is in that node's log"
    others = sorted(lost - {rank})
    if others:
        errs = {first_line(_message(failures[r]), 100) for r in others}
        what = next(iter(errs)) if len(errs) == 1 else f"{len(errs)} kinds of connection error"
        msg += f"; rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} lost the connection ({what})"
    msg += "; every rank was stopped"
    if restarts:
        msg += f" (after {restarts} restart{'s' if restarts > 1 else ''}: --max-restarts is spent)"
    code = first.exitcode
    return msg, code if code > 0 else 1
