"""The cost of shardwise's training loop over a bare PyTorch loop doing the same work.

    python benchmarks/run_overhead.py                      # examples/tiny-llama.toml, 5 repeats
    python benchmarks/run_overhead.py --set model.hidden=256 --steps 40 --repeats 7

Both loops: one process, the same model (shardwise.run.model.build, same seed), the same data
(the config's source, batch by batch), AdamW with the same hyper-parameters, gradient
accumulation over the same micro-batches, global-norm clipping, the same lr schedule, loss.item()
every step. shardwise's loop adds the Engine (parameter registry, its own clipping arithmetic)
and its bookkeeping (metrics JSON line, progress line, peak memory). Throughput is measured
between the end of step `--skip` and the end of the last step (setup and warm-up excluded), by
the wall clock and by the process's CPU time. The runs alternate (A B B A ...) so drift in the
machine's load hits both alike; the medians are compared. Exit code 1 if the overhead >= 3%
by the chosen clock (--clock).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from shardwise.run.config import RunConfig, load, parse_set  # noqa: E402
from shardwise.run.data import open_source  # noqa: E402
from shardwise.run.model import build  # noqa: E402

LIMIT = 0.03


def shardwise_loop(cfg: RunConfig, skip: int) -> dict:
    """tokens/s of shardwise's loop (run/train.py + Engine), with its metrics file and progress.
    The step ends are stamped by a thin wrapper around Engine.train_step, so the time between
    two stamps holds one whole iteration of the loop: its bookkeeping and the next step."""
    from rich.console import Console

    from shardwise.run import engine as eng
    from shardwise.run.train import train

    stamps = []
    inner = eng.Engine.train_step

    def stamped(self, tokens):
        out = inner(self, tokens)
        stamps.append((time.perf_counter(), time.process_time()))
        return out

    eng.Engine.train_step = stamped
    try:
        with tempfile.TemporaryDirectory() as d, open(os.devnull, "w") as null:
            train_cfg = dataclasses.replace(cfg.train, metrics=str(Path(d) / "m.jsonl"))
            train(dataclasses.replace(cfg, train=train_cfg), torch.device("cpu"), console=Console(file=null))
    finally:
        eng.Engine.train_step = inner
    return rates(cfg, stamps, skip)


def bare_loop(cfg: RunConfig, skip: int) -> dict:
    """tokens/s of a minimal hand-written loop doing the same work."""
    spec, plan, o, steps = cfg.model, cfg.plan, cfg.optim, cfg.train.steps
    torch.manual_seed(cfg.train.seed)
    model = build(spec, "cpu", cfg.train.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    source = open_source(cfg.data, spec, plan)
    ga, mbs = plan.grad_accum, plan.mbs
    stamps = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = o.lr_at(step, steps)
        tokens = torch.from_numpy(source.batch(step))
        x, y = tokens[:, :-1], tokens[:, 1:]
        total = 0.0
        for i in range(ga):
            logits = model(x[i * mbs : (i + 1) * mbs])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y[i * mbs : (i + 1) * mbs].flatten()) / ga
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total.item()
        stamps.append((time.perf_counter(), time.process_time()))
    return rates(cfg, stamps, skip)


def rates(cfg: RunConfig, stamps: list[tuple[float, float]], skip: int) -> dict:
    """Tokens per second from the end of step `skip` to the end of the last step, by the wall
    clock and by this process's CPU time (which other jobs on a shared machine barely move)."""
    tokens = cfg.plan.gbs * cfg.plan.seq * (len(stamps) - 1 - skip)
    return {clock: tokens / (stamps[-1][i] - stamps[skip][i]) for i, clock in enumerate(("wall", "cpu"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "examples/tiny-llama.toml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="which clock decides pass/fail: wall (a quiet machine), cpu (a shared one; use --threads 1)",
    )
    ap.add_argument("--set", action="append", default=[], metavar="TABLE.FIELD=VALUE")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ov = {}
    for item in a.set + [f"train.steps={a.steps}", "train.device=cpu", "train.nproc=1"]:
        key, value = parse_set(item)
        ov[key] = (value, f"--set {item}")
    cfg = load(a.config, ov)
    print(
        f"{cfg.model.name}: {cfg.model.params:,} params, {cfg.plan.short()}, gbs {cfg.plan.gbs} x seq "
        f"{cfg.plan.seq}, {a.steps} steps ({a.skip} warm-up), {a.repeats} repeats, {torch.get_num_threads()} "
        "threads, CPU"
    )
    sw, bare = [], []
    for r in range(a.repeats):
        order = (shardwise_loop, bare_loop) if r % 2 == 0 else (bare_loop, shardwise_loop)
        for fn in order:
            (sw if fn is shardwise_loop else bare).append(fn(cfg, a.skip))
        print(
            f"  repeat {r + 1}: "
            + "   ".join(
                f"{c}: shardwise {sw[-1][c]:,.0f} tok/s, bare {bare[-1][c]:,.0f} tok/s, "
                f"ratio {sw[-1][c] / bare[-1][c]:.4f}"
                for c in ("wall", "cpu")
            )
        )
    verdict = {}
    for c in ("wall", "cpu"):
        ms, mb = statistics.median(x[c] for x in sw), statistics.median(x[c] for x in bare)
        verdict[c] = 1 - ms / mb
        print(
            f"median ({c} clock): shardwise {ms:,.0f} tok/s, bare {mb:,.0f} tok/s; throughput ratio {ms / mb:.4f}, "
            f"overhead {verdict[c] * 100:+.2f}%"
        )
    ok = verdict[a.clock] < LIMIT
    print(
        f"overhead by the {a.clock} clock {verdict[a.clock] * 100:+.2f}% (limit {LIMIT * 100:.0f}%): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
