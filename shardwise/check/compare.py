"""`shardwise check`: predict a plan with the estimate's `torch` profile, run it with measurement
on, and hold every prediction against what was measured, rank by rank.

What is compared, and the tolerance each verdict uses (the README states the same numbers):
    collectives    kind, group, message bytes and calls per step: EXACT, on every rank the
                   estimate describes (the first pipeline stage; the estimate's comm is rank 0's)
    model states   parameters, gradients, optimizer states: within 1% on the stage's worst rank
                   (the estimate describes the worst rank: the largest shard, the fullest
                   ZeroRedundancyOptimizer partition); every rank's error is shown
    peak memory    within 10% on the stage's worst rank: tensor bytes (the estimate's CUDA context
                   is left out: the allocator does not count it, and a CPU has none); SDPA's CPU
                   kernel is a flash kernel, as on CUDA, so no s*s scores are kept either way
    step time      the median timed step within 25% when the hardware is a file `shardwise
                   calibrate` wrote for as many local ranks (it has the engines' host time);
                   otherwise shown, not judged
The first and the last pipeline stage are compared with the estimate of that stage; middle
stages (pp > 2) and the last stage's collectives are shown, not judged (the estimate does not
model them).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shardwise import units
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.estimate.memory import memory
from shardwise.run import launch

TOL = {"comm": 0.0, "states": 0.01, "peak": 0.10, "time": 0.25}
# against the trace tier (shardwise/trace/): the same items, peak within 5% (tensor bytes at the CUDA
# caching allocator's block granularity, no allocator or runtime noise), no time (a trace has none)
TRACE_TOL = TOL | {"peak": 0.05}
MIN_STEPS = 3  # a warm-up step, the step in which DDP rebuilds its buckets, and a measured one


@dataclass
class Row:
    """One compared quantity on one rank (or a group of ranks that measured the same)."""

    section: str  # memory | comm | time
    ranks: str  # "0" or "0,1" (ranks with identical measurements)
    item: str
    predicted: float | None
    measured: float | None
    unit: str  # B | calls | s
    tolerance: float | None  # relative; 0 = exact; None = shown, not judged
    note: str = ""

    @property
    def error(self) -> float | None:
        if self.predicted is None or self.measured is None:
            return None
        if self.measured == 0:
            return 0.0 if self.predicted == 0 else float("inf")
        return (self.predicted - self.measured) / self.measured

    @property
    def ok(self) -> bool | None:
        if self.tolerance is None:
            return None
        if self.predicted is None or self.measured is None:
            return False
        if self.tolerance == 0:
            return self.predicted == self.measured
        return abs(self.error) <= self.tolerance

    def to_dict(self) -> dict:
        e = self.error
        return {
            "section": self.section,
            "ranks": self.ranks,
            "item": self.item,
            "predicted": self.predicted,
            "measured": self.measured,
            "unit": self.unit,
            "error": None if e is None or e == float("inf") else e,
            "tolerance": self.tolerance,
            "ok": self.ok,
            "note": self.note,
        }


@dataclass
class Report:
    config: str
    plan: object  # Plan
    model: object  # ModelSpec
    device: str
    hardware: str  # the GPU the prediction used
    calibrated: bool
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)  # the run's per-rank measurements
    tolerances: dict = field(default_factory=lambda: dict(TOL))  # TRACE_TOL against a trace

    @property
    def judged(self) -> list[Row]:
        return [r for r in self.rows if r.ok is not None]

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.judged)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "model": self.model.name,
            "plan": self.plan.to_dict(),
            "device": self.device,
            "hardware": self.hardware,
            "calibrated": self.calibrated,
            "tolerances": dict(self.tolerances),
            "passed": self.passed,
            "rows": [r.to_dict() for r in self.rows],
            "notes": list(self.notes),
            "ranks": self.ranks,
        }


# ---- predictions -------------------------------------------------------------------------------
def canonical_group(group: str, plan) -> str:
    """One name per set of ranks: a group that spans the whole world is named for the mesh dim
    that spans it, if one does (dp = world makes the loss all-reduce's "world" the dp group)."""
    if group == "dp" and plan.cp > 1 and plan.dp == 1:  # the dp x cp ranks are the cp ranks (run/context.py)
        return "cp"
    if group == "world":
        for d in ("dp", "tp", "pp", "cp"):
            if getattr(plan, d) == plan.world and plan.world > 1:
                return d
        if plan.dp * plan.cp == plan.world > 1:  # context parallel's flattened dp x cp
            return "dp"
    return group


def call_counts(comm, plan) -> Counter:
    """Collectives -> {(kind, group, message bytes): calls}. An entry whose calls differ in size
    carries the exact sizes (`sizes`); otherwise every call is `bytes`."""
    out: Counter = Counter()
    for c in comm:
        if not c.count:
            continue
        g = canonical_group(c.group, plan)
        sizes = getattr(c, "sizes", None) or {}
        if sizes:
            for b, n in sizes.items():
                out[(c.kind, g, int(b))] += int(n)
        else:
            out[(c.kind, g, int(c.bytes))] += int(c.count)
    return out


def predict(model, plan, cluster, device: str, efficiency: float | None = None):
    """(estimate, {stage: (Memory at the optimizer step, Memory at the peak)}) for the run's own
    plan, first and (pipelined) last stage. The model states are compared at the optimizer step,
    where the run measures them; the peak is the peak."""

    est = estimate(model, cluster, plan, "torch", efficiency=efficiency)
    stages = {}
    for st in ("first", "last") if plan.pp > 1 else ("first",):
        stages[st] = tuple(
            memory(model, cluster, est.plan, "torch", stage=st, at=at, device=device) for at in ("step", "peak")
        )
        # what is measured is tensor memory (MemTracker on CPU, the caching allocator's
        # max_memory_allocated on CUDA): the CUDA context is outside both (and absent on a CPU)
        for mem in stages[st]:
            mem.overhead -= mem.detail.pop("overhead.cuda_context", 0)
    return est, stages


# ---- the comparison ------------------------------------------------------------------------------
def _stage_of(coords: dict, plan) -> str:
    pp = coords["pp"]
    if pp == 0:
        return "first"
    if pp == plan.pp - 1:
        return "last"
    return "middle"


def compare(
    est, stages: dict, ranks: list[dict], plan, *, calibrated: bool, tol: dict = TOL
) -> tuple[list[Row], list[str]]:
    """Rows for every rank (memory, collectives) and the step (time), and notes. `tol`: TOL against
    a run, TRACE_TOL against a trace."""
    from shardwise.run.measure import measurement_from_dict

    rows: list[Row] = []
    notes: list[str] = []
    meas = {r["rank"]: measurement_from_dict(r["measurement"]) for r in ranks}
    stage = {r["rank"]: _stage_of(r["coords"], plan) for r in ranks}

    # memory: every rank's error against its stage's estimate; the verdict on the stage's worst rank
    items = (
        ("params", "parameters", tol["states"]),
        ("grads", "gradients", tol["states"]),
        ("optimizer", "optimizer states", tol["states"]),
    )
    for st in ("first", "middle", "last"):
        members = sorted(r for r, s in stage.items() if s == st)
        if not members:
            continue
        pred = stages.get(st)
        for key, label, judge in items + (("peak", "peak memory", tol["peak"]),):
            value = (
                (lambda m: m.memory.detail.get("peak", m.memory.total))
                if key == "peak"
                else (lambda m, k=key: getattr(m.memory, k))
            )
            worst = max(members, key=lambda r: (value(meas[r]), -r))
            p = None if pred is None else (pred[1].total if key == "peak" else getattr(pred[0], key))
            for r in members:
                judged = pred is not None and r == worst
                note = f"{st} stage" + ("" if pred is not None else ": not modeled by the estimate")
                rows.append(Row("memory", str(r), label, p, value(meas[r]), "B", judge if judged else None, note))

    # collectives: ranks that measured the same list share one block of rows
    groups: dict[tuple, list[int]] = {}
    for r in sorted(meas):
        key = (stage[r] == "first", tuple(sorted(call_counts(meas[r].comm, plan).items())))
        groups.setdefault(key, []).append(r)
    predicted = call_counts(est.comm, plan)
    for (modeled, key), members in sorted(groups.items(), key=lambda kv: kv[1][0]):
        measured = dict(key)
        exact = tol["comm"] if modeled else None
        note = "" if modeled else "not the first pipeline stage: the estimate's collectives are rank 0's"
        names = ",".join(map(str, members))
        if modeled and not measured and not predicted:  # one rank, or nothing to share: none either side
            rows.append(Row("comm", names, "none", 0, 0, "calls", exact, "no collectives"))
        for k in sorted(set(measured) | (set(predicted) if modeled else set()), key=lambda k: (k[1], k[0], -k[2])):
            kind, group, nbytes = k
            rows.append(
                Row(
                    "comm",
                    names,
                    f"{kind} {group} {nbytes:,} B",
                    predicted.get(k, 0) if modeled else None,
                    measured.get(k, 0),
                    "calls",
                    exact,
                    note,
                )
            )

    # time: the slowest rank (every rank waits for it)
    slow = max(meas, key=lambda r: meas[r].time.step_s)
    m = meas[slow].time
    t = est.time
    spread = (
        f"the middle half of the timed steps took {m.detail['step_s_q1'] * 1e3:,.1f}-"
        f"{m.detail['step_s_q3'] * 1e3:,.1f} ms"
        if "step_s_q1" in m.detail
        else ""
    )
    rows.append(
        Row(
            "time",
            str(slow),
            "step time",
            t.step_s,
            m.step_s,
            "s",
            tol["time"] if calibrated else None,
            "; ".join(
                x
                for x in (
                    spread,
                    "" if calibrated else "not judged: give a calibrated --hardware file (shardwise calibrate)",
                )
                if x
            ),
        )
    )
    for k, label in (("forward_s", "forward"), ("backward_s", "backward"), ("optimizer_s", "optimizer")):
        rows.append(
            Row(
                "time",
                str(slow),
                label,
                t.detail.get(k),
                m.detail.get(k),
                "s",
                None,
                "predicted: FLOPs (or bytes) only; the engines' host time is its own row",
            )
        )
    if t.detail.get("overhead_s"):
        rows.append(
            Row(
                "time",
                str(slow),
                "host (engines)",
                t.detail["overhead_s"],
                None,
                "s",
                None,
                "calibrated host_us; measured inside forward, backward and optimizer",
            )
        )
    rows.append(
        Row(
            "time",
            str(slow),
            "comm wait",
            t.comm_exposed_s,
            m.comm_exposed_s,
            "s",
            None,
            "measured as the Python-visible waits; DDP's end-of-backward wait is inside backward",
        )
    )
    if plan.pp > 1:
        rows.append(
            Row("time", str(slow), "pipeline bubble", t.bubble_s, None, "s", None, "inside the measured phases")
        )
    return rows, notes


# ---- running ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def stdout_to_stderr():
    """The run's progress goes to stderr (so `--json` keeps stdout for the report); the ranks
    inherit the file descriptors, so it holds for them too."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_measured(cfg, device: str) -> list[dict]:
    """Train cfg with measurement on; every rank's measurement (run/measure.Meter.write)."""
    import dataclasses

    with tempfile.TemporaryDirectory(prefix="shardwise-check-") as tmp:
        path = str(Path(tmp) / "measure.json")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, measure=path, metrics=""))
        with stdout_to_stderr():
            code = launch.launch(cfg, device)
        if code != 0:
            raise ShardwiseError(f"the measured run failed (exit code {code}); its error is above")
        if not Path(path).is_file():
            raise ShardwiseError(
                "the measured run wrote no measurements; run `shardwise run` with the same arguments to see why"
            )
        return json.loads(Path(path).read_text())["ranks"]


def check(cfg, device: str, cluster, *, calibrated: bool, efficiency: float | None = None) -> Report:
    """Predict, run, measure, compare. `cfg` is a loaded run config (its plan resolved)."""
    if cfg.train.steps < MIN_STEPS:
        raise ShardwiseError(
            f"check needs at least {MIN_STEPS} steps (a warm-up, the step in which DDP rebuilds "
            f"its buckets, and a measured one), got {cfg.train.steps}; pass --steps {MIN_STEPS} "
            "or more"
        )
    est, stages = predict(cfg.model, cfg.plan, cluster, device, efficiency)
    load = _load()
    ranks = run_measured(cfg, device)
    rows, notes = compare(est, stages, ranks, cfg.plan, calibrated=calibrated)
    if load is not None:  # step time is this machine's only when nothing else ran on it
        notes.append(
            f"load average {load:.1f} on {os.cpu_count()} cores before the run"
            + (
                ": the machine was busy, the measured time is not the run's alone"
                if device == "cpu" and load > 0.5 * (os.cpu_count() or 1)
                else ""
            )
        )
    if any(r.section == "comm" and r.item != "none" for r in rows):
        notes.append(
            "message bytes are the API-level sizes (the full buffer for all-gather / reduce-scatter)"
            + ("; gloo runs a reduce-scatter as an all-reduce of the full buffer" if device == "cpu" else "")
        )
    return Report(
        config=cfg.path,
        plan=cfg.plan,
        model=cfg.model,
        device=device,
        hardware=cluster.gpu.name,
        calibrated=calibrated,
        rows=rows,
        notes=notes,
        ranks=ranks,
    )


def check_trace(model, plan, cluster, *, seed: int = 0) -> Report:
    """Predict the plan (torch profile, CPU kernels: the trace runs them) and hold it against the
    trace tier's roles: collectives exact, model states within 1%, peak within 5%. `plan` resolved."""
    from shardwise.trace.tracer import trace

    est, stages = predict(model, plan, cluster, "cpu")
    ranks = trace(model, plan, seed=seed, flops=False)
    rows, notes = compare(est, stages, ranks, plan, calibrated=False, tol=TRACE_TOL)
    rows = [r for r in rows if r.section != "time"]  # a trace has no time
    notes.append(
        "traced: the run tier's step on fake tensors and a fake process group, one rank per role "
        "(" + ", ".join(f"{r['role']} = rank {r['rank']}" for r in ranks) + "); peak = tensor bytes in "
        "512-byte CUDA allocator blocks"
    )
    return Report(
        config="",
        plan=plan,
        model=model,
        device="trace",
        hardware=cluster.gpu.name,
        calibrated=False,
        rows=rows,
        notes=notes,
        ranks=ranks,
        tolerances=dict(TRACE_TOL),
    )


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on this platform
        return None


# ---- output ------------------------------------------------------------------------------------------
def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "B":
        return units.binary_bytes(v, 3)  # MiB to the KiB: the states are judged to 1%
    if unit == "s":
        return units.seconds(v)
    return f"{int(v):,}"


def _verdict(r: Row) -> str:
    if r.ok is None:
        return "[dim]-[/dim]"
    return "[green]ok[/green]" if r.ok else "[bold red]FAIL[/bold red]"


def _err(r: Row) -> str:
    e = r.error
    if e is None:
        return "-"
    if r.unit == "calls":
        return "exact" if e == 0 else f"{int(r.predicted - r.measured):+d} calls"
    return "inf" if e == float("inf") else f"{100 * e:+.2f}%"


def print_report(rep: Report, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    c = console or Console(soft_wrap=True)
    p = rep.plan
    c.print(
        f"check  {rep.model.name} ({rep.model.params:,} parameters), {p.short()}, seq {p.seq}, {p.precision}, "
        f"{p.optimizer}; {p.world} rank(s) on {rep.device}; predicted on {rep.hardware}"
        + ("" if rep.calibrated else " (not calibrated)"),
        highlight=False,
    )

    def table(title, cols):
        t = Table(title=title, title_justify="left")
        for col in cols:
            t.add_column(col, justify="right" if col in ("predicted", "measured", "error", "message") else "left")
        return t

    rows = [r for r in rep.rows if r.section == "memory"]
    if rows:
        t = table(
            f"memory (model states at the optimizer step; tolerance 1%, peak {rep.tolerances['peak']:.0%}; "
            "judged on each stage's worst rank)",
            ("rank", "stage", "item", "predicted", "measured", "error", "verdict"),
        )
        for r in rows:
            t.add_row(
                r.ranks,
                r.note.split(",")[0].split(":")[0].replace(" stage", ""),
                r.item,
                _fmt(r.predicted, r.unit),
                _fmt(r.measured, r.unit),
                _err(r),
                _verdict(r),
            )
        c.print(t)
    rows = [r for r in rep.rows if r.section == "comm"]
    if rows:
        t = table(
            "collectives per step: calls of each message (tolerance: exact)",
            ("ranks", "kind", "group", "message", "predicted", "measured", "verdict"),
        )
        for r in rows:
            kind, group, nbytes = (r.item.split(" ") + ["-", "-"])[:3]
            t.add_row(
                r.ranks,
                kind,
                group,
                f"{nbytes} B" if nbytes != "-" else "-",
                _fmt(r.predicted, r.unit),
                _fmt(r.measured, r.unit),
                _verdict(r),
            )
        c.print(t)
        if any(r.ok is None for r in rows):
            c.print(
                "       (shown, not judged: the estimate gives the first pipeline stage's collectives)", highlight=False
            )
    rows = [r for r in rep.rows if r.section == "time"]
    if rows:
        t = table(
            "step time (tolerance 25% with a calibrated hardware file)",
            ("rank", "item", "predicted", "measured", "error", "verdict"),
        )
        for r in rows:
            t.add_row(r.ranks, r.item, _fmt(r.predicted, r.unit), _fmt(r.measured, r.unit), _err(r), _verdict(r))
        c.print(t)
        for r in rows:
            if r.note:
                c.print(f"       {r.item}: {r.note}", highlight=False)
    for n in rep.notes:
        c.print(f"note   {n}", highlight=False)
    bad = [r for r in rep.judged if not r.ok]
    if bad:
        c.print(
            f"[bold red]FAILED[/bold red]: {len(bad)} of {len(rep.judged)} judged values are outside their tolerance"
        )
    else:
        c.print(f"[green]PASSED[/green]: all {len(rep.judged)} judged values within tolerance")


def figure(rep: Report, path: str) -> None:
    """Predicted vs measured bars: model states and peak (worst rank of the first stage),
    bytes per collective kind and group (rank 0), and step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = [r for r in rep.rows if r.section == "memory" and r.ok is not None and r.note.startswith("first")]
    comm: dict[str, list[float]] = {}
    for r in rep.rows:
        if r.section == "comm" and r.ok is not None and "0" in r.ranks.split(",") and r.item != "none":
            kind, group, nbytes = (
                r.item.split(" ")[0],
                r.item.split(" ")[1],
                float(r.item.split(" ")[2].replace(",", "")),
            )
            k = f"{kind}\n{group}"
            a = comm.setdefault(k, [0.0, 0.0])
            a[0] += (r.predicted or 0) * nbytes
            a[1] += (r.measured or 0) * nbytes
    step = [r for r in rep.rows if r.section == "time" and r.item == "step time"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [4, max(2, len(comm)), 1]})

    def bars(ax, labels, pred, meas, unit, scale):
        import numpy as np

        x = np.arange(len(labels))
        ax.bar(x - 0.2, [v / scale for v in pred], 0.4, label="predicted", color="#4c72b0")
        ax.bar(x + 0.2, [v / scale for v in meas], 0.4, label="measured", color="#dd8452")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel(unit)

    bars(axes[0], [r.item for r in mem], [r.predicted or 0 for r in mem], [r.measured or 0 for r in mem], "MiB", 2**20)
    axes[0].set_title("memory, first stage's worst rank")
    axes[0].legend(fontsize=8)
    bars(axes[1], list(comm), [v[0] for v in comm.values()], [v[1] for v in comm.values()], "MiB per step", 2**20)
    axes[1].set_title("collective bytes, rank 0")
    if step:  # a trace has no time
        bars(axes[2], ["step"], [step[0].predicted or 0], [step[0].measured or 0], "ms", 1e-3)
    axes[2].set_title("step time" if step else "step time: none (traced)")
    p = rep.plan
    fig.suptitle(f"shardwise check: {rep.model.name}, {p.short()}, {rep.device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
