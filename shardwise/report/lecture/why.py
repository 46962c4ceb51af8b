"""Part 1, why distributed training: the lecture's models against the lecture's GPUs.

The lecture multiplies the parameter count by 18 bytes. Beside it: the estimate of what one
device would hold to train the whole model alone (the torch profile, the default plan), and the
fewest GPUs on which the search finds any plan that fits.
"""

from __future__ import annotations

import math

from shardwise import units
from shardwise.estimate import estimate
from shardwise.estimate.memory import saved_activations
from shardwise.report import figures
from shardwise.report.lecture.common import GB, GIB, base_plan, fmt_gib, plan_words, seq_for, to_gib
from shardwise.report.lecture.section import FigureSpec, Note, Section, Table
from shardwise.search.core import DEFAULT_HEADROOM, Options, fewest_gpus
from shardwise.spec.hardware import GPU, load_gpu, make_cluster
from shardwise.spec.presets import load_model

LECTURE_MODELS = ("gpt2-1.5b", "gpt-3-175b", "llama-7b", "llama-2-70b", "gpt-4-est")
LECTURE_GPUS = ("rtx-4090", "a100-40gb", "a100-80gb", "h100-80gb")
LECTURE_DIVISOR_GPU = "a100-80gb"  # the lecture divides by 80 "GB" for its "GPUs needed"


# --min-gpus probes every whole number of nodes below the first count that fits; above this many
# GPUs the lecture stops searching and reports the bound (`shardwise plan --min-gpus` goes on)
SEARCH_LIMIT = 512


def build(lec) -> Section:

    gpu = lec.cluster.gpu
    names = list(LECTURE_MODELS)
    if lec.settings.model is not None and lec.model.name not in names:
        names.append(lec.model.name)
    models = [lec.model if n == lec.model.name else load_model(n) for n in names]
    a100 = load_gpu(LECTURE_DIVISOR_GPU)
    usable = (1 - DEFAULT_HEADROOM) * gpu.memory_bytes

    rows, data = [], {}
    for m in models:
        alone = make_cluster(gpu, 1, None, lec.cluster.network)
        e = estimate(m, alone, base_plan(m, lec, dp=1), "torch")
        mem = e.memory
        states = mem.params + mem.grads + mem.optimizer
        saved = saved_activations(m, e.plan)
        lecture_gpus = math.ceil(e.rule_of_thumb_bytes / GB / a100.memory_gib)  # the lecture: ceil(GB / 80)
        # every GPU holds its share of all model states at the optimizer step: no count below this fits
        bound = math.ceil(states / usable)
        fewest = None
        if bound <= SEARCH_LIMIT:  # no CPU offload: GPUs whose memory holds the training, as the lecture means
            fewest = fewest_gpus(
                m,
                make_cluster(gpu, 1, lec.settings.gpus_per_node, lec.cluster.network),
                {"seq": seq_for(m, lec.settings.seq), "offload": "none"},
                Options(),
                start=bound,
                limit=SEARCH_LIMIT,
            )
        data[m.name] = {
            "params": m.params,
            "rule_of_thumb_bytes": e.rule_of_thumb_bytes,
            "states": states,
            "activations": mem.activations,
            "saved_activations": saved,
            "other": mem.buffers + mem.overhead,
            "total": mem.total,
            "lecture_gpus": lecture_gpus,
            "lower_bound": bound,
            "fewest_gpus": fewest,
            "seq": e.plan.seq,
        }
        rows.append(
            [
                m.name + (" (est.)" if m.estimated else ""),
                units.count(m.params),
                fmt_gib(e.rule_of_thumb_bytes),
                fmt_gib(states),
                fmt_gib(saved),
                fmt_gib(mem.total),
                f"{mem.total / m.params:,.1f}",
                str(lecture_gpus),
                f"{bound:,}",
                f"{fewest:,}" if fewest else f"> {SEARCH_LIMIT}",
            ]
        )
    main = Table(
        f"Memory to train each model on one device (GiB), and the fewest {gpu.name} that can train it",
        [
            "model",
            "params",
            "lecture: 18 B/param",
            "model states",
            "activations saved",
            "peak of a step",
            "peak bytes/param",
            "lecture: GPUs needed",
            "at least (states)",
            f"fewest {gpu.name} (search)",
        ],
        rows,
        right=set(range(1, 10)),
        caption=f"GiB. shardwise: torch profile, one device, {plan_words(models, lec)}. The peak of a step on "
        "one device falls at the optimizer step (activations already freed, AdamW's scratch allocated). "
        "'at least': all model states / usable memory per GPU (10% headroom kept). 'fewest': the search over "
        f"every plan (ZeRO, tp, pp, recompute; no CPU offload), up to {SEARCH_LIMIT} GPUs. The lecture's "
        "'GPUs needed' is ceil(18 x params / 1e9 / 80), as in its code.",
    )

    gpus = [load_gpu(g) for g in LECTURE_GPUS]
    cap_rows = []
    for g in gpus:
        fit = [m.name for m in models if data[m.name]["total"] <= g.memory_bytes]
        cap_rows.append([g.name, f"{g.memory_gib:g}", ", ".join(fit) or "none of them"])
    caps = Table(
        "What trains on a single GPU (peaks above)",
        ["GPU", "memory (GiB)", "models that fit on one"],
        cap_rows,
        right={1},
    )

    notes = _notes(models, data, gpu, lec)
    capacities = _capacity_lines(gpus, lec.cluster)
    fig = FigureSpec(
        "1-why-memory-vs-gpus",
        "Training memory vs GPU capacity",
        f"Memory to train each model on one device: the lecture's 18 bytes/param beside shardwise's peak of a "
        f"step (torch profile, {plan_words(models, lec)}); dashed lines are GPU capacities.",
        lambda: _draw(models, data, capacities, lec),
    )
    return Section(
        "why",
        1,
        "Why distributed training",
        "Modern models do not fit on one GPU. How much memory training takes, by the lecture's rule of "
        "thumb and by shardwise's estimate, and how many GPUs it really takes.",
        [main, caps],
        notes,
        [fig],
        {"models": data, "gpu": gpu.name, "search_limit": SEARCH_LIMIT},
    )


def _capacity_lines(gpus: list[GPU], cluster) -> list[tuple[str, float]]:
    """One line per distinct capacity (A100-80GB and H100-80GB share one), plus one full node."""
    by_cap: dict[float, list[str]] = {}
    for g in gpus:
        by_cap.setdefault(g.memory_gib, []).append(g.name)
    lines = [(" / ".join(n) + f" ({c:g} GiB)", c) for c, n in sorted(by_cap.items())]
    node = cluster.gpu.gpus_per_node
    lines.append(
        (f"{node}x {cluster.gpu.name} ({node * cluster.gpu.memory_gib:,.0f} GiB)", node * cluster.gpu.memory_gib)
    )
    return lines


def _draw(models, data, capacities, lec):
    names = [m.name for m in models]
    d = [data[n] for n in names]
    return figures.memory_vs_capacity(
        names,
        [to_gib(x["rule_of_thumb_bytes"]) for x in d],
        [to_gib(x["states"]) for x in d],
        [to_gib(x["activations"]) for x in d],
        [to_gib(x["other"]) for x in d],
        capacities,
        "Training memory vs GPU capacity",
        f"shardwise: the peak of a step on one device, torch profile, {plan_words(models, lec)}; it falls at the "
        "optimizer step (AdamW's scratch in 'buffers'). GiB = 2^30 bytes.",
    )


def _notes(models, data, gpu, lec) -> list[Note]:
    notes = []
    over = [m.name for m in models if data[m.name]["total"] > gpu.memory_bytes]
    notes.append(
        Note(
            "takeaway",
            f"{len(over)} of these {len(models)} models do not fit on one {gpu.name} "
            f"({gpu.memory_gib:g} GiB) to train: {', '.join(over) or 'none'}.",
        )
    )
    # the lecture's flat "~2 bytes/param" for activations, against what this plan saves for backward
    act = {m.name: data[m.name]["saved_activations"] / m.params for m in models}
    lo, hi = min(act, key=act.get), max(act, key=act.get)
    notes.append(
        Note(
            "correction",
            f"The lecture adds ~2 bytes/param for activations. Activations scale with sequence x batch x hidden x "
            f"layers, not with the parameter count: at this plan the tensors saved for backward are "
            f"{act[lo]:.2f} bytes/param for {lo} and {act[hi]:.2f} for {hi}; doubling the sequence or the "
            f"micro-batch doubles them.",
            "Korthikanti et al. 2022, 'Reducing Activation Recomputation in Large Transformer Models', sec. 4",
        )
    )
    diff = [
        (m.name, data[m.name]["lecture_gpus"], data[m.name]["fewest_gpus"] or f"> {SEARCH_LIMIT}")
        for m in models
        if data[m.name]["fewest_gpus"] != data[m.name]["lecture_gpus"]
    ]
    if diff:
        parts = "; ".join(f"{n}: {a} vs {b}" for n, a, b in diff)
        notes.append(
            Note(
                "correction",
                f"'GPUs needed' = memory / 80 GB assumes memory splits perfectly and that each GPU needs nothing of "
                f"its own. Every GPU keeps its own activations, buffers and runtime, and counts come in legal "
                f"shapes (nodes, divisors of heads and layers). The lecture vs the fewest {gpu.name} on which the "
                f"search finds a plan that fits: {parts}.",
                "shardwise plan --min-gpus (the same search)",
            )
        )
    notes.append(
        Note(
            "correction",
            "The lecture divides GB (10^9 bytes) by the A100's 80 'GB', which are 80 GiB (2^30 bytes): "
            f"{(GIB / GB - 1):.1%} apart. shardwise counts memory in GiB throughout.",
            "NVIDIA A100 datasheet: 80 GB HBM2e = 81,920 MiB as reported by nvidia-smi",
        )
    )
    return notes
