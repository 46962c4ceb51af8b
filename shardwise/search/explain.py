"""Words for a search's answer, derived from its numbers: why each top plan ranks where it does,
what was rejected and why, and what a nothing-fits answer would take.

Every sentence compares two estimates (a plan and its best alternative) and names the breakdown
item that makes the difference; nothing here is a canned opinion.
"""

from __future__ import annotations

from shardwise import units
from shardwise.search.equivalent import BAND_WHY, EQUIVALENT_BAND, RANK_WORDS, per_token
from shardwise.search.space import OFFLOAD_ORDER, RECOMPUTE_ORDER, SEARCHED
from shardwise.spec.plan import recompute_kind

MEMORY_LABELS = {
    "params": "parameters",
    "grads": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations",
    "buffers": "communication buffers",
}
REJECT_LABELS = {
    "memory": "do not fit in GPU memory",
    "host memory": "fit on the GPU but offload more than the CPU memory (--host-memory)",
    "divisibility": "tp/pp do not divide heads, FFN or layers",
    "batch": "the global batch does not split into dp x mbs (x pp for interleaved)",
    "sequence": "sequence length rules",
    "schedule": "schedule rules",
    "gpus": "dp*tp*pp is not the GPU count",
    "offload": "offload rules",
    "hsdp": "--dp-shard does not divide dp, or ZeRO < 2",
    "stages": "the layers do not split over the pipeline stages",
    "engine": "{engine} cannot train them (other --profile values allow them)",
}


# ---- comparing two estimates ---------------------------------------------------------------
def _per_token(e, x: float) -> float:
    return x / e.plan.tokens_per_step


def link_name(e, c) -> str:
    """The hardware a collective runs on, by name."""
    return e.cluster.gpu.link if c.link == "intra-node" else e.cluster.network.name


def why_slower(fast, slow) -> str:
    """What makes `slow` slower than `fast`: the time item (per token) that grew the most."""
    items = {
        k: _per_token(slow, getattr(slow.time, k)) - _per_token(fast, getattr(fast.time, k))
        for k in ("compute_s", "comm_exposed_s", "bubble_s")
    }
    k = max(items, key=items.get)
    if items[k] <= 0:
        return "about the same time per token"
    per_step = lambda x: units.seconds(x * slow.plan.tokens_per_step)
    if k == "bubble_s":
        p = slow.plan
        return (
            f"its pipeline bubble takes {units.percent(slow.time.bubble_s / slow.time.step_s)} of the step "
            f"(pp={p.pp}, {p.grad_accum} micro-batches{f', v={p.vpp}' if p.vpp > 1 else ''})"
        )
    if k == "comm_exposed_s":
        off = _per_token(slow, slow.time.detail.get("offload_s", 0)) - _per_token(
            fast, fast.time.detail.get("offload_s", 0)
        )
        if off > items[k] / 2:
            return (
                f"its CPU offload waits {per_step(off)} per step on PCIe "
                f"({units.percent(slow.time.detail['offload_s'] / slow.time.step_s)} of the step)"
            )
        c = _grown_collective(fast, slow)
        head = f"it waits {per_step(items[k])} more per step on communication"
        if c is not None:
            return (
                f"{head}, most of all the {c.kind} of {c.what}: {units.decimal_bytes(c.wire_bytes)} per GPU per step "
                f"over {link_name(slow, c)}"
            )
        return head + " that compute no longer hides"
    grown = _per_token(slow, slow.time.compute_s) / _per_token(fast, fast.time.compute_s) - 1
    d = {
        x: _per_token(slow, slow.time.detail.get(x, 0)) - _per_token(fast, fast.time.detail.get(x, 0))
        for x in ("forward_s", "backward_s", "recompute_s", "optimizer_s")
    }
    top = max(d, key=d.get)
    if top == "recompute_s":
        need = (
            "needs"
            if RECOMPUTE_ORDER.index(recompute_kind(slow.plan.recompute))
            > RECOMPUTE_ORDER.index(recompute_kind(fast.plan.recompute))
            else "uses"
        )
        return f"it {need} {slow.plan.recompute} recompute, which re-runs part of the forward: {units.percent(grown)} more compute"
    if top == "optimizer_s":
        return f"its optimizer step (bound by memory bandwidth) updates a larger shard: {units.percent(grown)} more compute"
    if slow.plan.pp > fast.plan.pp:
        return (
            f"its busiest pipeline stage (the last, which also runs the output layer) sets the pace: "
            f"{units.percent(grown)} more compute per token"
        )
    if slow.cluster.gpus < fast.cluster.gpus:
        return f"{slow.cluster.gpus} GPUs instead of {fast.cluster.gpus}: {units.percent(grown)} more compute per token"
    return f"{units.percent(grown)} more compute per token"


def _grown_collective(fast, slow):
    """The collective of `slow` whose time grew most against the same one in `fast`."""
    before = {(c.group, c.kind, c.what): c.seconds for c in fast.comm}
    best, grow = None, 0.0
    for c in slow.comm:
        g = _per_token(slow, c.seconds) - _per_token(fast, before.get((c.group, c.kind, c.what), 0.0))
        if g > grow:
            best, grow = c, g
    return best


def memory_saving(small, big) -> str:
    """The memory item `small` saves most against `big` (per GPU)."""
    d = {k: getattr(big.memory, k) - getattr(small.memory, k) for k in MEMORY_LABELS}
    k = max(d, key=d.get)
    return f"saves {units.gib(d[k], 1)} of {MEMORY_LABELS[k]} per GPU" if d[k] > 0 else "saves no memory"


def _show(f: str, v) -> str:
    return {
        "zero": f"ZeRO-{v}",
        "sp": "sp" if v else "no sp",
        "recompute": "no recompute" if v == "none" else f"{v} recompute",
        "offload": "no offload" if v == "none" else f"{v} offload",
        "schedule": str(v),
    }.get(f, f"{f}={v}")


def plan_diff(a, b) -> str:
    """Fields where plan `a` differs from `b`, as 'tp=4 (vs tp=8), ZeRO-1 (vs ZeRO-3)'."""
    out = [f"{a.world} GPUs (vs {b.world})"] if a.world != b.world else []
    for f in SEARCHED:
        va, vb = getattr(a, f), getattr(b, f)
        if va != vb:
            out.append(f"{_show(f, va)} (vs {_show(f, vb)})")
    return ", ".join(out) or "the same plan"


# ---- why each top plan ranks where it does ------------------------------------------------------
def _dims(res, w):
    """(label, rows that do *less* of what the winner does, those rows in words) for each choice
    the winner made (a field the user pinned is not the search's choice, so it is not explained)."""
    c, node = res.table.cols, res.cluster.gpus_per_node
    p = w.plan
    out = []
    if p.tp > 1:
        out.append(
            (
                "tp",
                f"tp={p.tp} {'inside the node' if p.tp <= node else 'across nodes'}",
                c["tp"] < p.tp,
                "less tensor parallelism",
            )
        )
    if p.pp > 1:
        out.append(("pp", f"pp={p.pp}", c["pp"] < p.pp, "fewer pipeline stages"))
    if p.zero > 0:
        out.append(("zero", f"ZeRO-{p.zero}", c["zero"] < p.zero, f"ZeRO below {p.zero}"))
    if p.recompute != "none":
        out.append(
            (
                "recompute",
                f"{p.recompute} recompute",
                c["recompute"] < RECOMPUTE_ORDER.index(recompute_kind(p.recompute)),
                "less recompute",
            )
        )
    if p.offload != "none":
        out.append(("offload", f"{p.offload} offload", c["offload"] < OFFLOAD_ORDER.index(p.offload), "less offload"))
    if p.sp:
        out.append(("sp", "sequence parallel", (c["sp"] == 0) & (c["tp"] > 1), "no sequence parallel"))
    if 0 < p.dp_shard < p.dp:
        out.append(("dp_shard", f"HSDP shard groups of {p.dp_shard}", c["dp_shard"] == 0, "sharding over all of dp"))
    if p.pp > 1 and p.vpp > 1:
        out.append(("vpp", f"interleaving (v={p.vpp})", (c["vpp"] == 1) & (c["pp"] > 1), "no interleaving"))
    if p.tp == 1 and p.pp == 1:  # pure data parallel: why not split the model?
        out.append(("tp", "no model parallelism", (c["tp"] > 1) | (c["pp"] > 1), "tp or pp"))
    out.append(("mbs", f"mbs={p.mbs}", c["mbs"] != p.mbs, "another micro-batch"))
    return [d[1:] for d in out if d[0] not in res.fixed]


def why_winner(res, w) -> str:
    """One line: the choices of the best plan that matter most, each against the best plan that
    does less of it: those without which nothing fits, then the largest slowdowns (>= 1%, two at
    most); if every alternative ties, what the winner saves instead."""
    must, slower, ties = [], [], []
    usable = units.gib((1 - res.headroom) * w.memory.capacity, 1)
    for label, mask, what in _dims(res, w):
        row = res.table.best(mask)
        if row is None:
            if what not in ("tp or pp", "another micro-batch"):
                must.append(f"{label}: no plan with {what} fits in {usable}")
            continue
        alt = res.estimate_row(row)
        x = w.time.tokens_per_s / alt.time.tokens_per_s - 1
        if x >= 0.01:
            slower.append(
                (
                    x,
                    f"{label}: the best plan with {what} ({alt.plan.short()}) is {units.percent(x)} slower; {why_slower(w, alt)}",
                )
            )
        elif x < 5e-4 and alt.memory.total > w.memory.total:
            ties.append(f"{label}: as fast as {alt.plan.short()} and {memory_saving(w, alt)}")
    slower.sort(key=lambda r: -r[0])
    parts = must + [r[1] for r in slower[: max(0, 2 - len(must))]]
    if not parts:
        parts = ties[:1] or [f"fits with {units.gib(w.memory.free, 1)} free; every other plan is within 1% of it"]
    return "; ".join(parts)


def why_behind(best, e, rank: int) -> str:
    """One line for plan #rank: how far behind #1 and the item that costs it."""
    behind = 1 - e.time.tokens_per_s / best.time.tokens_per_s
    if behind < 5e-4:
        head = f"ties #1 ({plan_diff(e.plan, best.plan)})"
        return head + (f", {memory_saving(e, best)}" if e.memory.total < best.memory.total else "")
    line = f"{units.percent(behind)} below #1 with {plan_diff(e.plan, best.plan)}: {why_slower(best, e)}"
    if e.memory.total < best.memory.total:
        line += f"; {memory_saving(e, best)}"
    return line


def why_lines(res) -> list[str]:
    if not res.ranked:
        return []
    best = res.ranked[0]
    return [why_winner(res, best)] + [why_behind(best, e, i + 2) for i, e in enumerate(res.ranked[1:])]


# ---- why the recommended plan -----------------------------------------------------------------
def why_recommended(res, eq) -> str:
    """One line: why the recommended plan (search.equivalent) is the one to train, against #1."""
    n, band = len(eq), units.percent(EQUIVALENT_BAND)
    if eq.position == 1:
        if n == 1:
            return f"no other plan is within {band} of it ({BAND_WHY})"
        return f"#1, and the simplest of the {n} plans within {band} of it"
    best, rec = res.ranked[0], eq.recommended
    behind = 1 - per_token(best.time.tokens_per_s, best.cluster.gpus, res.rank) / per_token(
        rec.time.tokens_per_s, rec.cluster.gpus, res.rank
    )
    return (
        f"#{eq.position}, simpler than #1 ({plan_diff(rec.plan, best.plan)}); predicted "
        f"{units.percent(behind)} behind it by {RANK_WORDS[res.rank]}, inside the {band} the estimate "
        "cannot resolve"
    )


# ---- what was rejected -------------------------------------------------------------------------
def rejection_lines(res) -> list[str]:
    t = res.tally
    lines = []
    for reason, n in t.rejected.most_common():
        if not n:
            continue
        label = REJECT_LABELS.get(reason, reason).format(engine=res.opts.profile.engine)
        ex = t.examples.get(reason)
        if reason == "memory" and res.closest is not None:
            ex = f"closest: {res.closest.plan.short()} needs {units.gib(res.closest.memory.total, 1)}"
        lines.append(f"{n:,} {label}" + (f" (e.g. {ex})" if ex else ""))
    if t.dominated:
        lines.append(
            f"{t.dominated:,} not estimated: a lighter recompute/offload variant of the same plan fits, "
            "and more recompute or offload is never faster"
        )
    if t.skipped_groups:
        lines.append(f"{t.skipped_groups:,} option combinations cannot go together (e.g. {t.examples['options']})")
    return lines
