"""The training loop of `shardwise run`: schedule, data, the Engine's step, metrics, progress.

Everything parallel lives in the Engine (shardwise/run/engine.py); this loop is the same for
every plan and is kept thin on purpose (benchmarks/run_overhead.py holds it to < 3% over a bare
PyTorch loop). It runs on every rank of an initialized process group; the Engine's logging
rank (the one that holds the loss) prints and writes the metrics file.

Checkpoints (run/checkpoint.py) are saved after a step when [checkpoint] says so, and a resumed run
continues the loop at the checkpoint's step: the data and the LR schedule are functions of the step,
the rest is in the checkpoint. A resumed run appends to its metrics file; its first record carries
"resumed_from": K (the checkpoint's step), which says that earlier records of steps >= K belong to
the attempt that was cut short and are superseded by the ones that follow.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from shardwise.run import checkpoint, checkpoint_dir
from shardwise.run import dist as rdist
from shardwise.run.config import RunConfig
from shardwise.run.data import open_source
from shardwise.run.engine import Engine
from shardwise.run.measure import Meter

# hidden test hook: make one rank fail at the start of one step (tests/test_run_failures.py): it raises,
# or with FAIL_SIGNAL it kills itself with that signal (a real death, as a lost machine's); only in the
# first attempt of a job that torchrun's agent restarts (TORCHELASTIC_RESTART_COUNT), so the restart lives
FAIL_RANK, FAIL_STEP, FAIL_SIGNAL = "SHARDWISE_FAIL_RANK", "SHARDWISE_FAIL_STEP", "SHARDWISE_FAIL_SIGNAL"


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured). CUDA: the caching allocator's peak of allocated tensor bytes.
    CPU: the process's peak resident set size, an approximation that also counts the Python
    runtime and libraries, until issue 6 brings a tensor-level tracker."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


def _fail_step() -> int | None:
    """The step at which this rank must raise, when the test hook names it."""
    rank, at = os.environ.get(FAIL_RANK), os.environ.get(FAIL_STEP)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    return int(at) if rank is not None and at is not None and int(rank) == rdist.rank() else None


def _fail(step: int) -> None:
    if os.environ.get(FAIL_SIGNAL):
        os.kill(os.getpid(), int(os.environ[FAIL_SIGNAL]))
    raise RuntimeError(f"injected failure on rank {rdist.rank()} at step {step} ({FAIL_RANK}/{FAIL_STEP})")


def train(cfg: RunConfig, device: torch.device, console=None) -> dict:
    """Train up to step cfg.train.steps, from 0 or from the checkpoint resumed; return the summary
    (on every rank; the logging rank's is the one with the losses). Several ranks: the default
    process group is initialized."""

    spec, plan, o, t = cfg.model, cfg.plan, cfg.optim, cfg.train
    torch.manual_seed(t.seed)
    source = open_source(cfg.data, spec, plan)
    engine = Engine(
        spec,
        plan,
        device=device,
        seed=t.seed,
        optimizer=plan.optimizer,
        lr=o.lr_at(0, t.steps),
        weight_decay=o.weight_decay,
        betas=o.betas,
        grad_clip=o.grad_clip if o.grad_clip > 0 else None,
    )
    log = engine.is_logging_rank
    c = cfg.checkpoint
    first = 0
    progress = _Progress(t.steps, t.log_every, console) if log else None
    if log:
        progress.header(cfg, source, device, rdist.world_size())
    if c.resume:
        # config.load resolved "latest" already; a RunConfig built in Python may still say it
        path = str(checkpoint_dir.resolve(c.resume, c.dir, "[checkpoint] resume"))
        saved = checkpoint.load(engine, path)
        first = saved["step"]
        if log:
            progress.resumed(path, saved, plan)
    saver = checkpoint.Checkpointer(engine, c, model=spec, steps=t.steps, timeout_s=t.timeout_s) if c.dir else None
    tokens_per_step = plan.gbs * plan.seq
    out = _open_metrics(t.metrics, append=bool(c.resume), say=progress.say if log else None) if log else None
    records = []
    # `shardwise check`: measure every step, in detail (collectives, memory) the last one
    meter = None
    if t.measure:
        meter = Meter(engine)
    fail_at = _fail_step()
    start = time.perf_counter()
    try:
        for step in range(first, t.steps):
            if step == fail_at:
                _fail(step)
            t0 = time.perf_counter()
            lr = o.lr_at(step, t.steps)
            engine.set_lr(lr)
            batch = torch.from_numpy(source.batch(step, engine.dp_rank, engine.dp_size)).to(device, non_blocking=True)
            if meter is not None:
                with meter.step(step, detail=step == t.steps - 1):
                    stats = engine.train_step(batch)
            else:
                stats = engine.train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            end = time.perf_counter()
            dt = end - t0
            if saver is not None:  # outside the step's timing: a checkpoint is not training throughput
                saver.after_step(step + 1)
            if not log:
                continue
            mem, mem_kind = peak_memory(device)
            rec = {
                "step": step,
                "loss": float(stats.loss),
                "grad_norm": float(stats.grad_norm),
                "lr": lr,
                "tokens_per_s": tokens_per_step / dt,
                "step_s": dt,
                "elapsed_s": end - start,
                "peak_mem_bytes": mem,
                "peak_mem_kind": mem_kind,
            }
            if c.resume and step == first:
                rec["resumed_from"] = first
            records.append(rec)
            if out:
                out.write(json.dumps(rec) + "\n")
                out.flush()
            progress.update(rec)
        if saver is not None:
            saver.finish(t.steps)
    except BaseException:
        if saver is not None:
            saver.abandon()
        raise
    finally:
        if out:
            out.close()
        if progress:
            progress.close()
    if meter is not None:
        meter.write(t.measure, tokens_per_step)
        meter.close()
    summary = _summary(records, getattr(source, "floor", None), _peak_over_ranks(device), t.metrics)
    if log:
        progress.footer(summary)
    return summary


def _open_metrics(path: str, append: bool = False, say=None):
    """Resumed: append (the records of the steps before the checkpoint stay). Otherwise a fresh
    file; an existing one is overwritten, and the user is told so, since a run meant to be resumed
    without --resume would otherwise erase its history without a word."""
    if not path:
        return None
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not append and p.exists() and p.stat().st_size and say is not None:
        say(f"metrics {path} exists: overwritten (--resume appends to it)")
    return open(p, "a" if append else "w")


def _peak_over_ranks(device: torch.device) -> int:
    """The worst rank's peak memory (one all-reduce, after the last step)."""
    mem = torch.tensor([peak_memory(device)[0]], dtype=torch.int64, device=device)
    if rdist.world_size() > 1:
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    return int(mem.item())


def _summary(records: list[dict], floor: float | None, peak_all: int, metrics: str) -> dict:
    if not records:
        return {"peak_mem_bytes_max_rank": peak_all}
    # the first step pays one-time costs (allocator warm-up, lazy init, compilation): left out
    timed = records[1:] or records
    return {
        "steps": len(records),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "min_loss": min(r["loss"] for r in records),
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
        "mean_step_s": sum(r["step_s"] for r in timed) / len(timed),
        "peak_mem_bytes_max_rank": peak_all,
        "peak_mem_kind": records[-1]["peak_mem_kind"],
        "loss_floor": floor,
        "metrics": metrics,
    }


class _Progress:
    """A rich progress bar (loss, tokens/s) when the console is a terminal, and a plain line
    every log_every steps either way, so logs of non-interactive jobs show the run too."""

    def __init__(self, steps: int, every: int, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console or Console(soft_wrap=True)
        self.every, self.steps = every, steps
        self.bar = None
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.bar.add_task("train", total=steps, loss="-", tps="-")
            self.bar.start()

    def header(self, cfg: RunConfig, source, device: torch.device, world: int) -> None:
        m, p = cfg.model, cfg.plan
        self.console.print(
            f"model  {m.name}: {m.params:,} parameters ({m.layers} layers, hidden {m.hidden}, "
            f"{m.heads} heads, vocab {m.vocab})",
            highlight=False,
        )
        self.console.print(
            f"plan   {p.short()}, seq {p.seq}, gbs {p.gbs}, {p.precision}, {p.optimizer}; "
            f"{world} process(es) on {device.type}",
            highlight=False,
        )
        self.console.print(f"data   {source.describe()}", highlight=False)

    def say(self, line: str) -> None:
        self.console.print(line, highlight=False)

    def resumed(self, path: str, saved: dict, plan) -> None:
        k = saved["step"]
        was = saved["plan_short"]
        how = f"saved under the same plan ({was})" if was == plan.short() else f"resharded from {was} to {plan.short()}"
        self.say(f"resume {path}: {k} steps done, {how}")
        if self.bar:
            self.bar.update(self.task, completed=k)

    def update(self, r: dict) -> None:
        if self.bar:
            self.bar.update(self.task, advance=1, loss=f"{r['loss']:.4f}", tps=f"{r['tokens_per_s']:,.0f}")
        s = r["step"]
        if s % self.every == 0 or s == self.steps - 1:
            self.console.print(
                f"step {s + 1:>{len(str(self.steps))}}/{self.steps}  loss {r['loss']:.4f}  "
                f"lr {r['lr']:.2e}  grad {r['grad_norm']:.3f}  {r['tokens_per_s']:,.0f} tok/s  "
                f"{r['step_s'] * 1e3:.1f} ms/step",
                highlight=False,
            )

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None

    def footer(self, s: dict) -> None:
        if "steps" not in s:
            return
        floor = f" (floor {s['loss_floor']:.4f})" if s["loss_floor"] is not None else ""
        mem = s["peak_mem_bytes_max_rank"] / 2**20
        kind = "CUDA allocated" if s["peak_mem_kind"] == "cuda_max_allocated" else "process RSS, approximate"
        self.console.print(
            f"done   {s['steps']} steps: loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}{floor}, "
            f"{s['mean_tokens_per_s']:,.0f} tok/s mean after step 1, peak memory "
            f"{mem:,.1f} MiB on the worst rank ({kind})" + (f"; metrics in {s['metrics']}" if s["metrics"] else ""),
            highlight=False,
        )
