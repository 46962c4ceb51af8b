"""Terminal tables (rich) for the catalogs and for one Estimate."""

from __future__ import annotations

import os

from rich.console import Console

from shardwise import units
from shardwise.report.layout import Column, print_segments, print_wrapped, table
from shardwise.spec.breakdown import Estimate
from shardwise.spec.presets import hf_ids


def make_console() -> Console:
    """A terminal gets its own width; a pipe or file gets 140 columns instead of rich's 80, so
    tables written to logs are not squeezed, unless COLUMNS says otherwise (`COLUMNS=80 shardwise
    plan ... | less`)."""
    c = Console()
    return c if c.is_terminal or os.environ.get("COLUMNS", "").isdigit() else Console(width=140)


MEMORY_ROWS = (
    ("params", "parameters", "the weights this rank holds (its shard / stage / TP slice)"),
    ("grads", "gradients", "gradient storage kept until the optimizer step"),
    ("optimizer", "optimizer states", "e.g. AdamW's two moments (+ fp32 master copy where separate)"),
    ("activations", "activations", "tensors saved for backward, all micro-batches in flight, + logits/loss"),
    ("buffers", "comm buffers", "gathered ZeRO-3 params, reduce buckets, pipeline send/recv buffers"),
    ("overhead", "runtime overhead", "CUDA context, allocator reserve, kernels' workspace"),
)
# Columns of the estimate's tables, by what a reader needs first (priority 0 is dropped last).
MEMORY_COLUMNS = [
    Column("item", 0, "left"),
    Column("bytes", 0),
    Column("what it is", 1, "left", wrap=True, style="dim"),
]
COMM_COLUMNS = [
    Column("collective", 0, "left"),
    Column("group", 1, "left"),
    Column("ranks", 6),
    Column("link", 9, "left"),
    Column("message", 7),
    Column("count", 8),
    Column("sent/rank", 2),
    Column("time", 3),
    Column("hidden?", 4, "left"),
    Column("what", 5, "left", wrap=True, min_width=26),
]

TIME_COLUMNS = [Column("item", 0, "left"), Column("value", 0)]


def batch_line(gbs: int, seq: int, gbs_default: bool | None) -> str:
    """'global batch 2,048 x 2,048 tokens = 4,194,304 tokens (default: ...)', shared by plan and estimate."""
    note = {True: " (default: about 4M tokens, pin with --gbs)", False: " (pinned)", None: ""}[gbs_default]
    return f"global batch {gbs:,} x {seq:,} tokens = {gbs * seq:,} tokens{note}"


def print_checkpoint(cost, console: Console | None = None, what: str = "checkpoint") -> None:
    """One line: what a checkpoint of this plan writes and how long it takes (estimate/checkpoint.py)."""
    print_wrapped(console or make_console(), cost.line(what), style="dim")


def print_estimate(
    est: Estimate, console: Console | None = None, *, gbs_default: bool | None = None, notes: list[str] = ()
) -> None:
    """The estimate's three tables. gbs_default: True when the batch is the default (said so),
    False when the user pinned it, None to say neither; notes: the command line's, after the
    estimate's own."""
    c = console or make_console()
    m, cl, p = est.model, est.cluster, est.plan
    print_segments(
        c,
        [
            f"[bold]{m.name}[/]",
            f"{m.params:,} parameters ({units.count(m.params)})"
            + (f", {units.count(m.active_params)} active per token" if m.is_moe else ""),
            cl.describe(),
        ],
    )
    print_segments(
        c,
        [
            f"plan [bold]{p.short()}[/]",
            batch_line(p.gbs, p.seq, gbs_default),
            p.precision,
            p.optimizer,
            f"profile {est.profile}",
        ],
    )
    for n in list(est.notes) + list(notes):
        print_wrapped(c, n, "note: ", style="yellow")

    mem = est.memory
    rows = [[label, units.gib(getattr(mem, key)), what] for key, label, what in MEMORY_ROWS]
    verdict = (
        f"[green]fits[/], {units.gib(mem.free)} free"
        if mem.fits
        else f"[red]does not fit[/]: {units.gib(-mem.free)} over"
    )
    rows.append(["[bold]total[/]", f"[bold]{units.gib(mem.total)}[/]", f"of {units.gib(mem.capacity)}: {verdict}"])
    c.print(table(c, MEMORY_COLUMNS, rows, title="Memory per GPU (worst rank)", title_justify="left"))
    print_wrapped(
        c,
        f"lecture rule of thumb, 18 bytes/param for the whole model on one GPU: "
        f"{est.rule_of_thumb_bytes / 1e9:,.0f} GB (shown for comparison only; it ignores sharding, "
        "sequence length and batch)",
        style="dim",
    )

    rows = [
        [
            k.kind,
            k.group,
            str(k.ranks),
            k.link,
            units.binary_bytes(k.bytes),
            f"{k.count:,}",
            units.binary_bytes(k.wire_bytes),
            units.seconds(k.seconds),
            "overlaps" if k.overlapped else "exposed",
            k.what,
        ]
        for k in est.comm
    ]
    if not est.comm:
        rows = [["none", "", "", "", "", "", "", "", "", "a single GPU communicates nothing"]]
    c.print(table(c, COMM_COLUMNS, rows, title="Communication per step (one rank)", title_justify="left"))

    tm = est.time
    rows = [
        ["compute", units.seconds(tm.compute_s)],
        ["exposed communication", units.seconds(tm.comm_exposed_s)],
        ["pipeline bubble", units.seconds(tm.bubble_s)],
        ["[bold]step[/]", f"[bold]{units.seconds(tm.step_s)}[/]"],
        ["tokens/s (whole cluster)", f"{tm.tokens_per_s:,.0f}"],
        ["MFU", f"{tm.mfu:.1%}"],
    ]
    if tm.train_tokens:
        rows += [
            [f"time to train {units.count(tm.train_tokens)} tokens", f"{tm.train_days:,.1f} days"],
            ["GPU-hours", f"{tm.gpu_hours:,.0f}"],
            ["cost", f"${tm.cost_usd:,.0f}"],
        ]
    c.print(table(c, TIME_COLUMNS, rows, title="Time per step", title_justify="left"))


MODEL_COLUMNS = [
    Column("name", 0, "left"),
    Column("params", 1),
    Column("layers", 3),
    Column("hidden", 4),
    Column("heads", 5),
    Column("kv", 6),
    Column("ffn", 7),
    Column("vocab", 8),
    Column("kind", 2, "left"),
    Column("published", 9, "left"),
]


def print_models(models: dict, console: Console | None = None, ids: dict | None = None) -> None:
    """The presets, then the Hugging Face ids each answers to (ids: preset -> ids; default: the
    catalog's)."""
    c = console or make_console()
    rows = []
    for name, m in models.items():
        kind = (f"MoE {m.experts}x top-{m.top_k} " if m.is_moe else "") + m.ffn_kind
        pub = (
            "estimate"
            if m.estimated
            else (
                "exact"
                if m.published_params == m.params
                else (f"{m.published_params:,}" if m.published_params else "-")
            )
        )
        rows.append(
            [
                name,
                f"{m.params:,}",
                str(m.layers),
                str(m.hidden),
                str(m.heads),
                str(m.kv_heads),
                str(m.ffn_hidden),
                str(m.vocab),
                kind,
                pub,
            ]
        )
    title = "Model catalog (parameter counts derived from the dimensions)"
    c.print(table(c, MODEL_COLUMNS, rows, title=title, title_justify="left"))
    ids = hf_ids() if ids is None else ids
    rows = [[name, ", ".join(ids[name])] for name in models if ids.get(name)]
    if rows:
        cols = [Column("preset", 0, "left"), Column("Hugging Face ids", 1, "left", wrap=True, min_width=30)]
        title = "Names that resolve to a preset (any case; the repository name without its organisation too)"
        c.print(table(c, cols, rows, title=title, title_justify="left"))


GPU_COLUMNS = [
    Column("name", 0, "left"),
    Column("memory", 1),
    Column("bf16", 2),
    Column("fp16", 7),
    Column("fp8", 5),
    Column("tf32", 8),
    Column("fp32", 9),
    Column("HBM GB/s", 6),
    Column("intra-node link", 10, "left", wrap=True, min_width=16),
    Column("GB/s/dir", 3),
    Column("per node", 4),
    Column("$/h", 11),
]
NETWORK_COLUMNS = [
    Column("name", 0, "left"),
    Column("Gbit/s", 1),
    Column("GB/s", 2),
    Column("latency", 3),
    Column("efficiency", 4),
]


def print_hardware(gpus: dict, networks: dict, console: Console | None = None) -> None:
    """The GPU and network catalogs; a narrow console loses the least used columns (fp32, tf32,
    fp16, the link's name, the price) before the memory, bf16 rate and link bandwidth."""
    c = console or make_console()
    f = lambda g, k: f"{g.tflops[k]:,.0f}" if k in g.tflops else "-"
    rows = [
        [
            name,
            f"{g.memory_gib:g} GiB",
            f(g, "bf16"),
            f(g, "fp16"),
            f(g, "fp8"),
            f(g, "tf32"),
            f(g, "fp32"),
            f"{g.hbm_gbps:,.0f}",
            g.link,
            f"{g.link_gbps:,.0f}",
            str(g.gpus_per_node),
            f"{g.price_per_hour:.2f}" if g.price_per_hour else "-",
        ]
        for name, g in gpus.items()
    ]
    c.print(table(c, GPU_COLUMNS, rows, title="GPUs (dense TFLOP/s, no sparsity)", title_justify="left"))
    rows = [
        [name, f"{n.gbits:g}", f"{n.gbytes_per_s:g}", f"{n.latency_us:g} µs", f"{n.efficiency:.0%}"]
        for name, n in networks.items()
    ]
    title = "Networks between nodes (per GPU, per direction)"
    c.print(table(c, NETWORK_COLUMNS, rows, title=title, title_justify="left"))
    c.print("[dim]sources: shardwise/spec/catalog/gpus.toml and networks.toml (each entry's `source`)[/]")
