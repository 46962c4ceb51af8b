"""Part 2, parallelism strategies: what each one splits, and what it costs for the chosen model,
with the numbers filled from the estimate; the diagrams; the pipeline schedules.
"""

from __future__ import annotations

from shardwise.estimate import estimate
from shardwise.estimate import pipeline as pl
from shardwise.report import figures
from shardwise.report.lecture.common import SEQS_PER_GPU, fmt_gb, fmt_gib, fmt_ms, plan_words, strategy_plans
from shardwise.report.lecture.section import FigureSpec, Note, Section, Table

# what each strategy splits and when to reach for it: the textbook facts the numbers illustrate
WHAT = {
    "DDP": (
        "nothing: every GPU holds the whole model; the batch is split",
        "a model whose states and activations fit on one GPU: the least communication per token",
    ),
    "ZeRO-1": (
        "optimizer states over the data-parallel GPUs",
        "DDP that is short of memory: frees most of the optimizer's bytes; in the ZeRO paper at no extra traffic",
    ),
    "ZeRO-2": (
        "optimizer states and gradients",
        "when ZeRO-1 is not enough; gradients are sharded as they are reduced",
    ),
    "ZeRO-3": (
        "optimizer states, gradients and parameters (= FSDP)",
        "models whose states do not fit even sharded 2 ways; parameters gathered layer by layer",
    ),
    "TP": (
        "every layer's weight matrices (attention heads, FFN columns/rows)",
        "large layers; cuts parameters and most activations per GPU; its per-layer collectives need the "
        "fast intra-node link",
    ),
    "TP + SP": (
        "as TP, plus the norms' and residuals' activations along the sequence",
        "TP whose replicated activations dominate memory",
    ),
    "PP": (
        "consecutive layers into stages (model parallelism); micro-batches flow through",
        "deep models across nodes: little traffic, but an idle bubble unless micro-batches are many",
    ),
    "CP": (
        "the sequence, in every layer (context parallelism); keys and values passed around a ring in attention",
        "very long sequences whose activations do not fit; not modelled by shardwise's Plan yet",
    ),
}


def build(lec) -> Section:
    model, cluster = lec.model, lec.cluster
    plans = strategy_plans(model, cluster, lec)
    rows, marks, data = [], {}, {}
    for name, plan in plans.items():
        e = estimate(model, cluster, plan, "torch")
        wire = e.comm_wire_bytes
        data[name] = {
            "plan": e.plan.short(),
            "memory_total": e.memory.total,
            "fits": e.memory.fits,
            "wire_bytes": wire,
            "step_s": e.time.step_s,
            "tokens_per_s": e.time.tokens_per_s,
            "bubble_s": e.time.bubble_s,
        }
        rows.append(
            [
                name,
                e.plan.short(),
                fmt_gib(e.memory.total),
                "yes" if e.memory.fits else "no",
                fmt_gb(wire),
                collectives_words(e),
                fmt_ms(e.time.step_s),
                f"{e.time.tokens_per_s:,.0f}",
            ]
        )
        if not e.memory.fits:
            marks[len(rows) - 1] = "bad"
    n = cluster.gpus
    table = Table(
        f"The strategies for {model.name} on {cluster.describe()}",
        [
            "strategy",
            "plan",
            "memory/GPU (GiB)",
            f"fits {cluster.gpu.name}",
            "sent/GPU/step (GB)",
            "collectives (bytes sent per GPU per step)",
            "step (ms)",
            "tokens/s",
        ],
        rows,
        right={2, 4, 6, 7},
        marks=marks,
        caption=f"Every row trains the same global batch ({SEQS_PER_GPU * n * lec.settings.mbs} sequences) with "
        f"{plan_words(model, lec)}, torch profile (PyTorch's engines). 'sent': bytes GPU 0 puts on the "
        "wire in one step, ring algorithm. Red: does not fit.",
    )
    words = Table(
        "What each strategy splits, and when to use it",
        ["strategy", "what is split", "best for"],
        [[k, *WHAT[k]] for k in [*plans, "CP"]],
        marks={len(plans): "dim"},
    )

    sched_rows, panels, sched_data = _schedules()
    sched = Table(
        f"Pipeline schedules ({PP_DEMO} stages, {M_DEMO} micro-batches; interleaved: {V_DEMO} virtual stages per GPU)",
        ["schedule", "bubble (share of the step idle)", "micro-batches in flight on GPU 0", "makespan (forward units)"],
        sched_rows,
        right={1, 2, 3},
        caption="Bubble (p-1)/(v*m+p-1): GPipe and 1F1B idle alike; 1F1B holds p micro-batches of "
        "activations instead of m; interleaving divides the bubble by about v. "
        "From shardwise.estimate.pipeline, the schedule model the time and memory estimates use.",
    )
    data["schedules"] = sched_data
    notes = _notes(data)
    figs = [
        FigureSpec(
            "2-parallelism-diagrams",
            "How each strategy splits the work",
            f"Data parallel, fully sharded, pipeline and tensor parallel, drawn for 4 GPUs ({model.name}'s "
            f"{model.layers} layers in the pipeline panel).",
            lambda: _draw_diagrams(model),
        ),
        FigureSpec(
            "2-pipeline-schedules",
            "Pipeline schedules",
            f"GPipe, 1F1B and interleaved 1F1B on {PP_DEMO} stages with {M_DEMO} micro-batches, from the "
            "schedule model (shardwise.estimate.pipeline.timeline); hatched = idle.",
            lambda: _draw_schedules(panels),
        ),
    ]
    return Section(
        "strategies",
        2,
        "Parallelism strategies",
        "What each way of splitting a training step divides among the GPUs, and what it costs in memory "
        "and communication for this model and cluster. The lecture lists DDP, model (pipeline) and "
        "tensor parallelism; ZeRO/FSDP, sequence and context parallelism complete the picture.",
        [table, words, sched],
        notes,
        figs,
        data,
    )


PP_DEMO, M_DEMO, V_DEMO = 4, 8, 2  # the schedule chart: small enough to read every box


def collectives_words(e, top: int = 3) -> str:
    """The step's collectives by kind and group, largest first: 'all-reduce dp 47.2 GB, ...'."""
    acc: dict = {}
    for c in e.comm:
        acc[(c.kind, c.group)] = acc.get((c.kind, c.group), 0) + c.wire_bytes
    total = sum(acc.values())
    items = sorted(((b, k) for k, b in acc.items() if b > total / 1000), reverse=True)  # not the 8-byte loss
    parts = [f"{kind} {group} {fmt_gb(b)}" for b, (kind, group) in items[:top]]
    return ", ".join(parts) + (", ..." if len(items) > top else "") if parts else "none"


def _schedules():
    rows, panels, data = [], [], {}
    for label, schedule, v in (
        ("GPipe", "gpipe", 1),
        ("1F1B", "1f1b", 1),
        ("interleaved 1F1B", "interleaved", V_DEMO),
        ("ZB-H1 (zero bubble, torch's interleaved-zb at v = 1)", "interleaved-zb", 1),
        ("ZB-V (two stages per GPU in a V)", "zbv", 2),
        ("DualPipeV", "dualpipev", 2),
    ):
        slots = pl.timeline(PP_DEMO, M_DEMO, v, schedule)
        bubble = pl.bubble_fraction(PP_DEMO, M_DEMO, v, schedule)
        inflight = pl.inflight_microbatches(PP_DEMO, M_DEMO, v, schedule)
        unit = 1 / pl.chunks_per_rank(v, schedule)  # a chunk is 1/v of a GPU's layers: one clock for all
        span = max(s.end for s in slots) * unit
        data[schedule] = {"bubble": bubble, "inflight": inflight, "makespan": span, "idle": pl.idle_fraction(slots)}
        rows.append([label, f"{bubble:.1%}", f"{inflight:g}", f"{span:g}"])
        panels.append(
            {
                "title": f"{label}: bubble {bubble:.1%} of the step, {inflight:g} micro-batches of "
                f"activations in flight on GPU 0",
                "pp": PP_DEMO,
                "slots": [tuple(s) for s in slots],
                "unit": unit,
                "span": 0,
            }
        )
    span = max(d["makespan"] for d in data.values())
    for p in panels:
        p["span"] = span
    return rows, panels, data


def _draw_diagrams(model):

    return figures.parallelism_diagrams(
        4,
        model.layers,
        model.name,
        "Colours: parameters, gradients, optimizer states (as in every figure). "
        "Arrows into a GPU: the data it trains on; rings: the collective each "
        "strategy needs.",
    )


def _draw_schedules(panels):
    return figures.pipeline_schedules(
        panels,
        f"Pipeline schedules: {PP_DEMO} stages, {M_DEMO} micro-batches",
        "shardwise.estimate.pipeline.timeline: torch.distributed.pipelining's orders, each op as early as its "
        "inputs allow; forward = 1 unit, backward = 2.",
    )


def _notes(data) -> list[Note]:
    notes = []
    fit = {k: v for k, v in data.items() if k != "schedules" and v["fits"]}
    if len(fit) == 1:
        (only,) = fit
        notes.append(Note("takeaway", f"Only {only} fits ({fit[only]['tokens_per_s']:,.0f} tokens/s)."))
    elif fit:
        best = max(fit, key=lambda k: fit[k]["tokens_per_s"])
        least = min(fit, key=lambda k: fit[k]["wire_bytes"])
        notes.append(
            Note(
                "takeaway",
                f"Of the strategies that fit, {best} trains fastest "
                f"({fit[best]['tokens_per_s']:,.0f} tokens/s); {least} sends the least "
                f"({fmt_gb(fit[least]['wire_bytes'])} GB per GPU per step).",
            )
        )
    over = [k for k, v in data.items() if k != "schedules" and not v["fits"]]
    if over:
        notes.append(Note("takeaway", f"Do not fit: {', '.join(over)}. Memory, not speed, decides first."))
    s = data["schedules"]
    notes.append(
        Note(
            "info",
            f"1F1B idles as much as GPipe ({s['1f1b']['bubble']:.1%}) but holds "
            f"{s['1f1b']['inflight']:g} micro-batches of activations instead of "
            f"{s['gpipe']['inflight']:g}; interleaving cuts the bubble to "
            f"{s['interleaved']['bubble']:.1%} for more point-to-point traffic.",
        )
    )
    notes.append(
        Note(
            "correction",
            "The lecture lists 'model parallelism' and 'pipeline parallelism' as two "
            "strategies. Splitting layers over GPUs without micro-batches leaves all but one "
            "GPU idle; the pipeline is that split done usefully, so it is one row here.",
            "Huang et al. 2019, 'GPipe', sec. 2; Narayanan et al. 2021, sec. 2.2",
        )
    )
    return notes
