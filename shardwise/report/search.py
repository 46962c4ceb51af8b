"""The terminal answer of `shardwise plan`: the ranked table, why each plan ranks there, what
was rejected, and for nothing-fits the closest plan and what would make one fit."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from shardwise import units
from shardwise.report.tables import make_console
from shardwise.search.explain import rejection_lines, why_lines


def print_search(res, advice: list[str], min_gpus: int | None = None, console: Console | None = None) -> None:
    c = console or make_console()
    m, cl, t = res.model, res.cluster, res.tally
    c.print(f"[bold]{m.name}[/]  {m.params:,} parameters  ·  {cl.describe()}")
    if min_gpus is not None:
        c.print(
            f"[bold]fewest GPUs: {min_gpus}[/] {cl.gpu.name} ({cl.nodes} node(s)); fewer cannot hold any "
            f"plan with {res.headroom:.0%} of memory kept free"
        )
    gbs_note = "pinned" if "gbs" in res.fixed else "default: about 4M tokens, pin with --gbs"
    c.print(
        f"global batch {res.gbs:,} x {res.seq:,} tokens = {res.gbs * res.seq:,} tokens ({gbs_note})  ·  "
        f"{(res.ranked or [res.closest])[0].plan.precision}  ·  {(res.ranked or [res.closest])[0].plan.optimizer}"
        f"  ·  profile {res.opts.profile}  ·  {res.headroom:.0%} of memory kept free"
    )
    c.print(
        f"[dim]searched {t.enumerated:,} plans in {res.seconds:.2f} s: {t.legal:,} legal, {t.estimated:,} "
        f"estimated, {t.fit:,} fit; ranked by {res.rank}[/]"
    )
    if res.ranked:
        _table(c, res)
        c.print("[bold]why[/]")
        for i, line in enumerate(why_lines(res)):
            c.print(f" {i + 1:>2}. {line}")
    else:
        e = res.closest
        usable = (1 - res.headroom) * e.memory.capacity
        c.print(
            f"[red bold]nothing fits.[/] closest: [bold]{e.plan.short()}[/] needs {units.gib(e.memory.total, 1)} per GPU "
            f"of {units.gib(usable, 1)} usable ({units.gib(e.memory.total - usable, 1)} over): "
            + ", ".join(
                f"{k} {units.gib(getattr(e.memory, k), 1)}"
                for k in ("params", "grads", "optimizer", "activations", "buffers", "overhead")
            )
        )
        if advice:
            c.print("[bold]what would make it fit[/]")
            for line in advice:
                c.print(f"  - {line}")
    lines = rejection_lines(res)
    if lines:
        c.print("[bold]rejected[/]")
        for line in lines:
            c.print(f"  - {line}")


def _table(c: Console, res) -> None:
    tk = res.opts.tokens
    t = Table(
        title=f"Top {len(res.ranked)} of {len(res.table):,} plans that fit",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
    )
    cols = ["#", "plan", "memory/GPU", "sent/GPU", "exposed comm", "bubble", "step", "tokens/s", "MFU"]
    if tk:
        cols += ["days", "cost"]
    for name in cols:
        t.add_column(name, justify="left" if name == "plan" else "right", no_wrap=name != "plan", overflow="fold")
    for i, e in enumerate(res.ranked):
        mem, tm = e.memory, e.time
        gpus = f" ({e.cluster.gpus} GPUs)" if e.cluster.gpus != res.cluster.gpus or res.rank != "throughput" else ""
        row = [
            str(i + 1),
            e.plan.short() + gpus,
            f"{units.gib(mem.total, 1)} {mem.total / mem.capacity:.0%}",
            units.decimal_bytes(e.comm_wire_bytes),
            units.seconds(tm.comm_exposed_s),
            units.seconds(tm.bubble_s),
            units.seconds(tm.step_s),
            f"{tm.tokens_per_s:,.0f}",
            f"{tm.mfu:.1%}",
        ]
        if tk:
            row += [f"{tm.train_days:,.1f}", f"${tm.cost_usd:,.0f}"]
        t.add_row(*row)
    c.print(t)
