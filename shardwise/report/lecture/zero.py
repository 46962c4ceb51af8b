"""Part 3, ZeRO: memory per GPU for each stage, in the lecture's accounting (the ZeRO paper's
2 + 2 + 12 bytes/param, profile zero-paper) and in what PyTorch's engines keep (profile torch),
activations shown apart because no ZeRO stage shards them.
"""

from __future__ import annotations

from shardwise.estimate import estimate
from shardwise.report import figures
from shardwise.report.lecture.common import base_plan, fmt_gib, plan_words, to_gib
from shardwise.report.lecture.section import FigureSpec, Note, Section, Table

STAGES = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")
PROFILES = ("zero-paper", "torch")
ITEMS = ("params", "grads", "optimizer")


def build(lec) -> Section:
    model, cluster = lec.model, lec.cluster
    n = cluster.gpus
    data: dict = {p: {} for p in PROFILES}
    tables = []
    for prof in PROFILES:
        rows, marks = [], {}
        for z, stage in enumerate(STAGES):
            m = estimate(model, cluster, base_plan(model, lec, zero=z), prof).memory
            states = m.params + m.grads + m.optimizer
            data[prof][stage] = {
                "params": m.params,
                "grads": m.grads,
                "optimizer": m.optimizer,
                "states": states,
                "activations": m.activations,
                "other": m.buffers + m.overhead,
                "total": m.total,
                "fits": m.fits,
            }
        ddp = data[prof]["DDP"]["states"]
        for i, stage in enumerate(STAGES):
            d = data[prof][stage]
            rows.append(
                [
                    stage,
                    fmt_gib(d["params"]),
                    fmt_gib(d["grads"]),
                    fmt_gib(d["optimizer"]),
                    fmt_gib(d["states"]),
                    f"{d['states'] / model.params:,.2f}",
                    "-" if i == 0 else f"{ddp / d['states']:,.1f}x",
                    fmt_gib(d["activations"]),
                    fmt_gib(d["other"]),
                    fmt_gib(d["total"]),
                    "yes" if d["fits"] else "no",
                ]
            )
            if not d["fits"]:
                marks[i] = "bad"
        what = (
            "The ZeRO paper's accounting, as the lecture: 16-bit parameters and gradients, 12 bytes/param of "
            "fp32 Adam (master copy, two moments)"
            if prof == "zero-paper"
            else "What DDP / ZeroRedundancyOptimizer / FSDP2 keep at the step's peak: with FSDP2 mixed precision the "
            "sharded fp32 parameter is the master copy; 16-bit copies are gathered per layer (buffers)"
        )
        tables.append(
            Table(
                f"Memory per GPU, {model.name} on {n} GPUs, profile {prof}",
                [
                    "stage",
                    "parameters",
                    "gradients",
                    "optimizer",
                    "model states",
                    "states bytes/param",
                    "vs DDP",
                    "activations",
                    "buffers + overhead",
                    "total",
                    f"fits {cluster.gpu.name}",
                ],
                rows,
                right=set(range(1, 10)),
                marks=marks,
                caption=f"GiB per GPU. {what}. Activations: {plan_words(model, lec)}.",
            )
        )

    notes = _notes(model, n, data)
    fig = FigureSpec(
        "3-zero-memory",
        "Memory per GPU for each ZeRO stage",
        f"{model.name} on {n} GPUs: the zero-paper accounting (hatched) beside the torch profile, "
        "per item; activations are not sharded by any stage.",
        lambda: _draw(model, cluster, data, lec),
    )
    return Section(
        "zero",
        3,
        "ZeRO",
        f"ZeRO shards what data parallelism replicates: stage 1 the optimizer states, stage 2 also the "
        f"gradients, stage 3 also the parameters (= FSDP). Here for {model.name} "
        f"({model.params:,} parameters) on {n} GPUs.",
        tables,
        notes,
        [fig],
        data,
    )


def _draw(model, cluster, data, lec):
    def panel(prof):
        return {s: {k: to_gib(data[prof][s][k]) for k in ITEMS + ("activations",)} for s in STAGES}

    return figures.zero_breakdown(
        STAGES,
        panel("zero-paper"),
        panel("torch"),
        cluster.gpu.memory_gib,
        cluster.gpu.name,
        f"Memory per GPU: {model.name} on {cluster.gpus} GPUs",
        f"Panel titles: model states per GPU, zero-paper / torch (GiB). Activations: {plan_words(model, lec)}. "
        f"Dashed: one {cluster.gpu.name}.",
    )


def _notes(model, n, data) -> list[Note]:
    notes = []
    for prof in PROFILES:
        d, z = data[prof]["DDP"], data[prof]["ZeRO-3"]
        notes.append(
            Note(
                "takeaway",
                f"ZeRO-3 cut model states per GPU from {fmt_gib(d['states'])} to "
                f"{fmt_gib(z['states'])} GiB on {n} GPUs, {d['states'] / z['states']:.1f}x "
                f"({prof} profile).",
            )
        )
    t = data["torch"]
    d3, d0 = t["ZeRO-3"], t["DDP"]
    notes.append(
        Note(
            "correction",
            f"The lecture: 'ZeRO-3 enables training models 8x larger than GPU memory' (its 8 GPUs). ZeRO-3 divides "
            f"the model states by N, nothing else: activations ({fmt_gib(d3['activations'])} GiB here) are not "
            f"sharded by any stage, and buffers and runtime stay. On {n} GPUs the whole per-GPU total falls "
            f"{d0['total'] / d3['total']:.1f}x, not {n}x ({fmt_gib(d0['total'])} -> {fmt_gib(d3['total'])} GiB).",
            "Rajbhandari et al. 2020, 'ZeRO', sec. 5 (model states) and sec. 6 (residual states)",
        )
    )
    per = {p: {k: data[p]["DDP"][k] / model.params for k in ITEMS} for p in PROFILES}
    notes.append(
        Note(
            "info",
            "Bytes per parameter under DDP, zero-paper vs torch: "
            + ", ".join(f"{k} {per['zero-paper'][k]:.2f} vs {per['torch'][k]:.2f}" for k in ITEMS)
            + ". The lecture's 2 + 2 + 12 is the paper's mixed-precision layout; PyTorch's DDP under autocast keeps "
            "fp32 parameters and gradients, and FSDP2's fp32 shard doubles as the master copy.",
        )
    )
    return notes
