"""Terminal tables (rich) for the catalogs and for one Estimate."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from shardwise import units
from shardwise.spec.breakdown import Estimate


def make_console() -> Console:
    """A terminal gets its own width; a pipe or file gets 140 columns instead of rich's 80, so
    tables written to logs are not squeezed."""
    c = Console()
    return c if c.is_terminal else Console(width=140)


MEMORY_ROWS = (
    ("params", "parameters", "the weights this rank holds (its shard / stage / TP slice)"),
    ("grads", "gradients", "gradient storage kept until the optimizer step"),
    ("optimizer", "optimizer states", "e.g. AdamW's two moments (+ fp32 master copy where separate)"),
    ("activations", "activations", "tensors saved for backward, all micro-batches in flight, + logits/loss"),
    ("buffers", "comm buffers", "gathered ZeRO-3 params, reduce buckets, pipeline send/recv buffers"),
    ("overhead", "runtime overhead", "CUDA context, allocator reserve, kernels' workspace"),
)


def print_estimate(est: Estimate, console: Console | None = None) -> None:
    c = console or make_console()
    m, cl, p = est.model, est.cluster, est.plan
    c.print(
        f"[bold]{m.name}[/]  {m.params:,} parameters ({units.count(m.params)})"
        + (f", {units.count(m.active_params)} active per token" if m.is_moe else "")
        + f"  ·  {cl.describe()}"
    )
    c.print(
        f"plan: [bold]{p.short()}[/]  ·  seq {p.seq}  ·  global batch {p.gbs} sequences "
        f"({p.tokens_per_step:,} tokens)  ·  {p.precision}  ·  {p.optimizer}  ·  profile {est.profile}"
    )
    for n in est.notes:
        c.print(f"[yellow]note:[/] {n}")

    mem = est.memory
    t = Table(title="Memory per GPU (worst rank)", title_justify="left", show_edge=False)
    t.add_column("item")
    t.add_column("bytes", justify="right")
    t.add_column("what it is", style="dim")
    for key, label, what in MEMORY_ROWS:
        t.add_row(label, units.gib(getattr(mem, key)), what)
    verdict = (
        f"[green]fits[/], {units.gib(mem.free)} free"
        if mem.fits
        else f"[red]does not fit[/]: {units.gib(-mem.free)} over"
    )
    t.add_row("[bold]total[/]", f"[bold]{units.gib(mem.total)}[/]", f"of {units.gib(mem.capacity)}: {verdict}")
    c.print(t)
    c.print(
        f"[dim]lecture rule of thumb, 18 bytes/param for the whole model on one GPU: "
        f"{est.rule_of_thumb_bytes / 1e9:,.0f} GB (shown for comparison only; it ignores sharding, "
        "sequence length and batch)[/]"
    )

    t = Table(title="Communication per step (one rank)", title_justify="left", show_edge=False)
    for col, just in (
        ("collective", "left"),
        ("group", "left"),
        ("ranks", "right"),
        ("link", "left"),
        ("message", "right"),
        ("count", "right"),
        ("sent/rank", "right"),
        ("time", "right"),
        ("hidden?", "left"),
        ("what", "left"),
    ):
        t.add_column(col, justify=just)
    for k in est.comm:
        t.add_row(
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
        )
    if not est.comm:
        t.add_row("none", "", "", "", "", "", "", "", "", "a single GPU communicates nothing")
    c.print(t)

    tm = est.time
    t = Table(title="Time per step", title_justify="left", show_edge=False)
    t.add_column("item")
    t.add_column("value", justify="right")
    rows = [
        ("compute", units.seconds(tm.compute_s)),
        ("exposed communication", units.seconds(tm.comm_exposed_s)),
        ("pipeline bubble", units.seconds(tm.bubble_s)),
        ("[bold]step[/]", f"[bold]{units.seconds(tm.step_s)}[/]"),
        ("tokens/s (whole cluster)", f"{tm.tokens_per_s:,.0f}"),
        ("MFU", f"{tm.mfu:.1%}"),
    ]
    if tm.train_tokens:
        rows += [
            (f"time to train {units.count(tm.train_tokens)} tokens", f"{tm.train_days:,.1f} days"),
            ("GPU-hours", f"{tm.gpu_hours:,.0f}"),
            ("cost", f"${tm.cost_usd:,.0f}"),
        ]
    for r in rows:
        t.add_row(*r)
    c.print(t)


def print_models(models: dict, console: Console | None = None) -> None:
    c = console or make_console()
    t = Table(title="Model catalog (parameter counts derived from the dimensions)", title_justify="left")
    for col in ("name", "params", "layers", "hidden", "heads", "kv", "ffn", "vocab", "kind", "published"):
        t.add_column(col, justify="left" if col in ("name", "kind", "published") else "right", no_wrap=True)
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
        t.add_row(
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
        )
    c.print(t)


def print_hardware(gpus: dict, networks: dict, console: Console | None = None) -> None:
    c = console or make_console()
    t = Table(title="GPUs (dense TFLOP/s, no sparsity)", title_justify="left")
    for col in (
        "name",
        "memory",
        "bf16",
        "fp16",
        "fp8",
        "tf32",
        "fp32",
        "HBM GB/s",
        "intra-node link",
        "GB/s/dir",
        "per node",
        "$/h",
    ):
        t.add_column(col, justify="left" if col in ("name", "intra-node link") else "right")
    f = lambda g, k: f"{g.tflops[k]:,.0f}" if k in g.tflops else "-"
    for name, g in gpus.items():
        t.add_row(
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
        )
    c.print(t)
    t = Table(title="Networks between nodes (per GPU, per direction)", title_justify="left")
    for col in ("name", "Gbit/s", "GB/s", "latency", "efficiency"):
        t.add_column(col, justify="left" if col == "name" else "right")
    for name, n in networks.items():
        t.add_row(name, f"{n.gbits:g}", f"{n.gbytes_per_s:g}", f"{n.latency_us:g} µs", f"{n.efficiency:.0%}")
    c.print(t)
    c.print("[dim]sources: shardwise/spec/catalog/gpus.toml and networks.toml (each entry's `source`)[/]")
