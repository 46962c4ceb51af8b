"""Starting the ranks: in this process (one rank), under torchrun's elastic agent (several), or
as a worker that torchrun (or that agent) started.

    shardwise run cfg.toml --nproc 4        # not under torchrun: the elastic agent spawns 4 workers
    shardwise run cfg.toml --nproc 8 --nnodes 2 --rdzv-endpoint HOST:29500   # the same on each node
    torchrun --nproc-per-node 8 ... -m shardwise run cfg.toml   # under torchrun: this process is a rank

With --max-restarts N (and a checkpoint directory) the agent restarts every rank after one dies, and
each continues from the newest complete checkpoint (`restarted`); after the last failure the launcher
names the rank that failed first and its error (run/failures.py).

The config is resolved and checked completely in the parent before anything is spawned, and
handed to the workers whole (as JSON), so every rank trains exactly the same plan. gloo on CPU,
NCCL on CUDA. A failure never hangs: the agent watches its workers every 0.1 s and stops the
others when one exits non-zero; every collective times out after [train] timeout_s; Ctrl-C on
the launcher reaches every worker, and a launcher killed outright takes its workers with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import traceback
import uuid

from shardwise.errors import ShardwiseError
from shardwise.run import checkpoint_dir, failures
from shardwise.run.config import RunConfig

TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")
SHUTDOWN_S = 5  # after Ctrl-C or a failed rank: SIGTERM/SIGINT to the others, SIGKILL this much later


def in_torchrun() -> bool:
    e = os.environ
    return "TORCHELASTIC_RUN_ID" in e or ("LOCAL_RANK" in e and "WORLD_SIZE" in e)


def torchrun_world() -> int | None:
    return int(os.environ["WORLD_SIZE"]) if in_torchrun() else None


def resolve_device(cfg: RunConfig) -> str:
    """auto -> cuda when available; then refuse, before anything starts, what this device and
    the run tier cannot do with this model and plan."""
    import torch

    from shardwise.run.model import check_runnable
    from shardwise.run.parallelize import check_supported

    dev = cfg.train.device
    has_cuda = torch.cuda.is_available()
    if dev == "auto":
        dev = "cuda" if has_cuda else "cpu"
    if dev == "cuda" and not has_cuda:
        raise ShardwiseError(
            f"{cfg.path} [train] device: cuda was asked for but this PyTorch sees no CUDA "
            'device; use device = "cpu" (or "auto")'
        )
    if dev == "cuda" and not in_torchrun() and cfg.train.nproc > torch.cuda.device_count():
        raise ShardwiseError(
            f"{cfg.train.nproc} processes but {torch.cuda.device_count()} CUDA devices on this "
            "machine; one process per GPU: lower --nproc, or use torchrun across nodes"
        )
    check_runnable(cfg.model)
    check_supported(cfg.model, cfg.plan, torch.device(dev))
    return dev


# ---- the parent -------------------------------------------------------------------------------
def launch(cfg: RunConfig, device: str) -> int:
    """Run the resolved config on cfg.train.nproc processes of this machine (and as many on each of
    the other nodes, with --nnodes); return the exit code."""
    if cfg.train.nproc == 1 and cfg.train.nnodes == 1 and cfg.train.max_restarts == 0:
        return _single(cfg, device)
    return _elastic(cfg, device)


def _single(cfg: RunConfig, device: str) -> int:
    """One rank, in this process: no process group, no spawn (the Engine needs none for one)."""
    from shardwise.run import dist as rdist
    from shardwise.run.train import train

    dev = rdist.local_device(device)
    if dev.type == "cuda":
        import torch

        torch.cuda.set_device(dev)
    train(cfg, dev)
    return 0


def _elastic(cfg: RunConfig, device: str) -> int:
    import logging

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    t = cfg.train
    # the agent's own warnings (restarts, shutdown notices) repeat what we say in one line below
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    lc = LaunchConfig(
        min_nodes=t.nnodes,
        max_nodes=t.nnodes,
        nproc_per_node=t.nproc,
        run_id=run_id(cfg),
        rdzv_backend="c10d",
        rdzv_endpoint=t.rdzv_endpoint if t.nnodes > 1 else "localhost:0",  # one node: torchrun --standalone
        rdzv_configs={"timeout": max(1, int(t.timeout_s))},
        max_restarts=t.max_restarts,
        monitor_interval=0.1,
        shutdown_timeout=SHUTDOWN_S,
    )
    payload = json.dumps({"config": cfg.to_dict(), "device": device, "launcher": os.getpid()})
    # A restart needs a store without the last attempt's keys. By default the agent shares one TCP
    # store across every rendezvous round (dynamic_rendezvous.next_rendezvous) and the workers use it
    # unprefixed (rendezvous._create_c10d_store: "a new TCPStore for every retry" holds only without
    # sharing), so a restarted rank could read a dead peer's address, left by the attempt before, and
    # fail to connect. Without sharing, each round's rank 0 hosts a fresh store.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        elastic_launch(lc, entrypoint=sys.executable)("-m", "shardwise.run.launch", payload)
    except ChildFailedError as e:
        msg, code = failures.report(e.failures, t.max_restarts)
        sys.stderr.write(f"shardwise: error: {msg}\n")
        return code
    except SignalException as e:
        sys.stderr.write(f"shardwise: interrupted ({e.sigval.name}); every rank was stopped\n")
        return 130
    return 0


def run_id(cfg: RunConfig) -> str:
    """The rendezvous' job id. One node: a fresh one. Several: the same on every node without a flag
    (they run the same command, though local paths such as the metrics file may differ): a digest of
    the model and the plan, so nodes started with different ones do not join one job."""
    if cfg.train.nnodes == 1:
        return str(uuid.uuid4())
    what = json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.plan)], sort_keys=True)
    return "shardwise-" + hashlib.sha256(what.encode()).hexdigest()[:16]


# ---- a worker -----------------------------------------------------------------------------------
def worker(cfg: RunConfig, device: str, teardown: bool = True) -> int:
    """One rank under torchrun (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR/PORT are set).
    teardown=False: leave the process group to the process's exit after a finished run (the
    worker processes `shardwise run` starts end with os._exit, see __main__)."""
    import torch
    import torch.distributed as dist

    from shardwise.run import dist as rdist
    from shardwise.run.train import train

    # Ctrl-C (forwarded by the agent as SIGINT) must end a rank even while it waits inside a
    # C++ collective, where Python's KeyboardInterrupt would not be raised until it returns
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    dev = rdist.local_device(device)
    if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # do not oversubscribe (torchrun sets 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    rdist.init_distributed(dev, cfg.train.timeout_s)
    cfg = restarted(cfg)
    finished = False
    try:
        train(cfg, dev)
        # every rank is done before any tears its connections down: a gloo peer whose
        # connection closes under it can abort ("terminate called without an active exception")
        dist.barrier()
        finished = True
    finally:
        if dist.is_initialized() and (teardown or not finished):
            dist.destroy_process_group()
    return 0


def restarted(cfg: RunConfig) -> RunConfig:
    """In a restart by torchrun's agent (--max-restarts): continue from the newest complete checkpoint
    (every rank sees the same directory: rank 0 commits a checkpoint only after all wrote theirs), or
    from the start when the job died before its first one."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    c = cfg.checkpoint
    if attempt == 0 or not c.dir:
        return cfg
    found = checkpoint_dir.latest(c.dir)
    if int(os.environ.get("RANK", "0")) == 0:
        where = f"from {found}" if found is not None else "from step 0 (no checkpoint was complete)"
        print(f"restart {attempt} of at most {cfg.train.max_restarts}: a rank died; every rank starts again {where}")
    resume = str(found) if found is not None else ""
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(c, resume=resume or c.resume))


def die_with_launcher(launcher: int) -> None:
    """A worker whose launcher is killed, even by SIGKILL (which no handler sees, so the agent
    cannot stop its workers), must not train on alone: Linux sends it SIGTERM when the launcher
    dies (prctl PR_SET_PDEATHSIG). The launcher may have died before the call: then end now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != launcher:
        os._exit(1)


def _worker_main(payload: str) -> int:
    d = json.loads(payload)
    if "launcher" in d:
        die_with_launcher(d["launcher"])

    rank = int(os.environ.get("RANK", "0"))
    try:
        return worker(RunConfig.from_dict(d["config"]), d["device"], teardown=False)
    except ShardwiseError as e:
        if not failures.record(e, rank):  # recorded: the launcher prints it, once, naming the rank
            sys.stderr.write(f"shardwise: error: {e}\n")
        return 2
    except Exception as e:
        failures.record(e, rank)
        if not failures.lost_peer(e):  # its own error, in full; a lost connection is the launcher's one line
            traceback.print_exc()
        return 1


if __name__ == "__main__":
    code = _worker_main(sys.argv[1])
    # a finished run's files are written and closed. Exit without C++ teardown: gloo's process
    # group (FSDP2's streams of work) has aborted a finished rank now and then on its way out
    # ("terminate called without an active exception", SIGABRT), failing a run that succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
