"""The terminal answer of `shardwise plan`, answer first: the recommended plan in one line, the
command that trains it, the plans the estimate cannot tell apart from it, then the ranked table.
Why each plan ranks where it does (--explain) and what the search rejected (-v) follow on request.
For nothing-fits: the closest plan and what would make one fit."""

from __future__ import annotations

from rich.console import Console

from shardwise import units
from shardwise.report.layout import Column, command_lines, print_segments, print_wrapped, table
from shardwise.report.tables import batch_line, make_console
from shardwise.search.equivalent import (
    BAND_WHY,
    EQUIVALENT_BAND,
    RANK_WORDS,
    SIMPLEST,
    Equivalent,
    equivalent,
    per_token,
    row_plan,
    shapes,
)
from shardwise.search.explain import rejection_lines, why_lines, why_recommended

GROUP_SHOWN = 5  # lines of the equivalent group on the first screen (one per dp x tp x pp shape)


def print_search(
    res,
    advice: list[str],
    min_gpus: int | None = None,
    console: Console | None = None,
    *,
    eq: Equivalent | None = None,
    command: list[str] | None = None,
    command_note: str = "",
    notes: list[str] = (),
    explain: bool = False,
    verbose: bool = False,
) -> None:
    """eq: the equivalent group (computed here when None and plans fit); command: the argv that
    trains the recommended plan, command_note: a line on what it expects; notes: the command line's
    (a clamped sequence); explain: the why-lines; verbose: the search's statistics and rejections."""
    c = console or make_console()
    m, cl = res.model, res.cluster
    print_segments(c, [f"[bold]{m.name}[/]", f"{m.params:,} parameters ({units.count(m.params)})", cl.describe()])
    if min_gpus is not None:
        print_wrapped(
            c,
            f"fewest GPUs: {min_gpus} {cl.gpu.name} ({cl.nodes} node(s)); fewer cannot hold any plan with "
            f"{res.headroom:.0%} of memory kept free",
            style="bold",
        )
    plan0 = (res.ranked or [res.closest])[0].plan
    print_segments(
        c,
        [
            batch_line(res.gbs, res.seq, "gbs" not in res.fixed),
            plan0.precision,
            plan0.optimizer,
            f"profile {res.opts.profile}",
            f"{res.headroom:.0%} of memory kept free",
        ],
    )
    for n in notes:
        print_wrapped(c, n, "note: ", style="yellow")
    if res.ranked:
        eq = eq or equivalent(res)
        c.print()
        _answer(c, res, eq, command, command_note)
        c.print()
        if len(eq) > 1:
            _group(c, res, eq)
            c.print()
        _table(c, res, eq)
        if explain:
            c.print("[bold]why[/]")
            for i, line in enumerate(why_lines(res)):
                print_wrapped(c, line, f" {i + 1:>2}. ")
    else:
        _nothing_fits(c, res, advice)
    if verbose:
        t = res.tally
        print_wrapped(
            c,
            f"searched {t.enumerated:,} plans in {res.seconds:.2f} s: {t.legal:,} legal, {t.estimated:,} "
            f"estimated, {t.fit:,} fit; ranked by {res.rank}",
            style="dim",
        )
        lines = rejection_lines(res)
        if lines:
            c.print("[bold]rejected[/]")
            for line in lines:
                print_wrapped(c, line, "  - ")
    more = [
        x
        for x, shown in (
            ("--explain: why each plan ranks where it does", explain or not res.ranked),
            ("-v: what the search tried and rejected", verbose),
            ("--json: all of it", False),
        )
        if not shown
    ]
    print_wrapped(c, "  ·  ".join(more), style="dim")


def _answer(c: Console, res, eq: Equivalent, command: list[str] | None, command_note: str) -> None:
    e = eq.recommended
    mem, tm = e.memory, e.time
    facts = [
        f"[bold green]recommended[/]  [bold]{e.plan.short()}[/]",
        f"{units.gib(mem.total, 1)}/GPU ({mem.total / mem.capacity:.0%})",
        f"{tm.tokens_per_s:,.0f} tokens/s",
        f"MFU {tm.mfu:.1%}",
    ]
    if e.cluster.gpus != res.cluster.gpus or res.rank != "throughput":
        facts.insert(1, f"{e.cluster.gpus} GPUs")
    if res.opts.tokens:
        facts += [f"{tm.train_days:,.1f} days for {units.count(res.opts.tokens)} tokens", f"${tm.cost_usd:,.0f}"]
    print_segments(c, facts)
    print_wrapped(c, why_recommended(res, eq), "  ", style="dim")
    if command:
        c.print("[bold]train it[/]")
        for line in command_lines(command, c.width - 2):
            c.print("  " + line, markup=False, highlight=False, soft_wrap=True)
        if command_note:
            print_wrapped(c, command_note, "  ", style="dim")


def _group(c: Console, res, eq: Equivalent) -> None:
    """The band, why that width, how the recommended plan was picked, and one line per shape in it
    (shown when it holds more than the recommended plan; else the answer's why-line says so)."""
    n, band = len(eq), units.percent(EQUIVALENT_BAND)
    words = RANK_WORDS[res.rank]
    print_wrapped(
        c,
        f"Equivalent within the estimate's error: {n} plans within {band} of the best {words} "
        f"({BAND_WHY}); the recommended one is the simplest: {SIMPLEST}.",
    )
    rows = shapes(res, eq.rows, GROUP_SHOWN)  # the recommended first: its shape is shown by it
    col = res.table.cols
    best = per_token(col["tokens_per_s"][res.order[0]], col["gpus"][res.order[0]], res.rank)
    cells = []
    for r in rows:
        pos = int((res.order == r).nonzero()[0][0]) + 1
        behind = 1 - best / per_token(col["tokens_per_s"][r], col["gpus"][r], res.rank)
        cells.append(
            [
                str(pos),
                row_plan(res, r).short(),
                str(int(col["gpus"][r])),
                units.gib(col["mem_total"][r], 1),
                f"{col['tokens_per_s'][r]:,.0f}",
                "best" if behind < 5e-4 else f"-{units.percent(behind)}",
            ]
        )
    cols = [
        Column("#", 0),
        Column("plan", 0, "left"),
        Column("GPUs", 1),
        Column("memory/GPU", 3),
        Column("tokens/s", 1),
        Column("vs #1", 2),
    ]
    if res.rank == "throughput":
        cols, cells = cols[:2] + cols[3:], [r[:2] + r[3:] for r in cells]
    c.print(table(c, cols, cells))
    if n > len(rows):
        extra = len(shapes(res, eq.rows, n)) - len(rows)
        what = f"{extra} more shapes among them" if extra else "other micro-batches, ZeRO stages and options"
        print_wrapped(c, f"and {n - len(rows)} more ({what}): --top {n} lists them all", "  ", style="dim")


def _table(c: Console, res, eq: Equivalent) -> None:
    tk = res.opts.tokens
    k = _in_band(res, eq)
    title = f"Top {len(res.ranked)} of {len(res.table):,} plans that fit, by {RANK_WORDS[res.rank]}"
    title += f"; #1-#{k} are equivalent" if k > 1 else ""
    cols = [
        Column("#", 0),
        Column("plan", 0, "left"),
        Column("GPUs", 1),
        Column("memory/GPU", 2),
        Column("sent/GPU", 10),
        Column("exposed comm", 8),
        Column("bubble", 9),
        Column("step", 7),
        Column("tokens/s", 1),
        Column("MFU", 3),
        Column("days", 4),
        Column("cost", 5),
    ]
    rows = []
    for i, e in enumerate(res.ranked):
        mem, tm = e.memory, e.time
        rows.append(
            [
                str(i + 1),
                e.plan.short(),
                str(e.cluster.gpus),
                f"{units.gib(mem.total, 1)} {mem.total / mem.capacity:.0%}",
                units.decimal_bytes(e.comm_wire_bytes),
                units.seconds(tm.comm_exposed_s),
                units.seconds(tm.bubble_s),
                units.seconds(tm.step_s),
                f"{tm.tokens_per_s:,.0f}",
                f"{tm.mfu:.1%}",
                f"{tm.train_days:,.1f}",
                f"${tm.cost_usd:,.0f}",
            ]
        )
    drop = {"GPUs"} if res.rank == "throughput" else set()  # one GPU count: the header's
    if not tk:
        drop |= {"days", "cost"}
    keep = [j for j, col in enumerate(cols) if col.name not in drop]
    c.print(
        table(
            c,
            [cols[j] for j in keep],
            [[r[j] for j in keep] for r in rows],
            title=title,
            title_justify="left",
        )
    )


def _in_band(res, eq: Equivalent) -> int:
    """How many of the ranked (top N) plans are in the band (they are its first ones)."""
    members = set(int(r) for r in eq.rows)
    return sum(1 for r in res.order[: len(res.ranked)] if int(r) in members)


def _nothing_fits(c: Console, res, advice: list[str]) -> None:
    e = res.closest
    usable = (1 - res.headroom) * e.memory.capacity
    c.print("[red bold]nothing fits.[/]")
    print_wrapped(
        c,
        f"closest: {e.plan.short()} needs {units.gib(e.memory.total, 1)} per GPU of {units.gib(usable, 1)} "
        f"usable ({units.gib(e.memory.total - usable, 1)} over): "
        + ", ".join(
            f"{k} {units.gib(getattr(e.memory, k), 1)}"
            for k in ("params", "grads", "optimizer", "activations", "buffers", "overhead")
        ),
    )
    if advice:
        c.print("[bold]what would make it fit[/]")
        for line in advice:
            print_wrapped(c, line, "  - ")
