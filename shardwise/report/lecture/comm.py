"""Part 4, communication: bytes and time per step for DDP, ZeRO-1/2/3, TP and PP, with ring
volumes on the link each group spans; the lecture's numbers beside them, and why they differ.
"""

from __future__ import annotations

from shardwise.estimate import comm as cm
from shardwise.estimate import estimate
from shardwise.report import figures
from shardwise.report.lecture.common import GB, fmt_gb, fmt_ms, plan_words, strategy_plans
from shardwise.report.lecture.section import FigureSpec, Note, Section, Table
from shardwise.spec.hardware import Cluster

ZERO = {"DDP": 0, "ZeRO-1": 1, "ZeRO-2": 2, "ZeRO-3": 3}
ZERO_PAPER = "Rajbhandari et al. 2020, 'ZeRO: Memory Optimizations Toward Training Trillion Parameter Models', sec. 7"


def build(lec) -> Section:
    model, cluster = lec.model, lec.cluster
    n, net = cluster.gpus, cluster.network
    # the lecture's setting: every GPU talks over the network (its 400 Gbit/s), none over NVLink
    spread = Cluster(cluster.gpu, n, 1, net)
    plans = strategy_plans(model, cluster, lec)

    data: dict = {}
    vol_rows = []
    for name, z in ZERO.items():
        plan = plans[name]
        paper = estimate(model, cluster, plan, "zero-paper")
        paper_net = estimate(model, spread, plan, "zero-paper")
        torch = estimate(model, cluster, plan, "torch")
        d = data[name] = {
            "lecture_bytes": cm.lecture_comm_bytes(model.params, z),
            "lecture_s": cm.lecture_comm_ms(model.params, z, net.gbits) / 1e3,
            "paper_bytes": _dp_bytes(paper),
            "paper_network_s": _dp_seconds(paper_net),
            "torch_bytes": _dp_bytes(torch),
            "torch_s": _dp_seconds(torch),
            "link": _links(torch, cluster, "dp"),
        }
        vol_rows.append(
            [
                name,
                fmt_gb(d["lecture_bytes"]),
                fmt_gb(d["paper_bytes"]),
                fmt_gb(d["torch_bytes"]),
                fmt_ms(d["lecture_s"]),
                fmt_ms(d["paper_network_s"]),
                fmt_ms(d["torch_s"]),
                d["link"],
            ]
        )
    vol = Table(
        f"Data-parallel traffic per GPU per step: {model.name}, {n} GPUs",
        [
            "strategy",
            "lecture (GB)",
            "ZeRO paper, ring (GB)",
            "torch engines (GB)",
            f"lecture (ms, {net.gbits:g} Gbit/s)",
            f"paper, over {net.name} (ms)",
            "torch, this cluster (ms)",
            "link",
        ],
        vol_rows,
        right=set(range(1, 7)),
        caption=f"GB = 10^9 bytes a GPU sends per step. 'over {net.name}': every GPU its own node, as the lecture's "
        f"{net.gbits:g} Gbit/s assumes; 'this cluster': {cluster.describe()}. Times are latency + "
        f"bandwidth at the link's achieved efficiency, before any overlap with compute.",
    )

    all_rows = []
    for name, plan in plans.items():
        e = estimate(model, cluster, plan, "torch")
        groups = sorted({c.group for c in e.comm if c.group != "world"})
        d = data.setdefault(name, {})
        d |= {
            "plan": e.plan.short(),
            "wire_bytes": e.comm_wire_bytes,
            "comm_s": sum(c.seconds for c in e.comm),
            "exposed_s": e.time.comm_exposed_s,
            "step_s": e.time.step_s,
        }
        main = max(e.comm, key=lambda c: c.wire_bytes) if e.comm else None
        all_rows.append(
            [
                name,
                e.plan.short(),
                f"{main.kind} ({main.group})" if main else "-",
                ", ".join(f"{g}: {_links(e, cluster, g)}" for g in groups) or "-",
                fmt_gb(e.comm_wire_bytes),
                fmt_ms(d["comm_s"]),
                fmt_ms(e.time.comm_exposed_s),
                fmt_ms(e.time.step_s),
            ]
        )
    every = Table(
        f"Every strategy on {cluster.describe()} (torch profile)",
        [
            "strategy",
            "plan",
            "largest collective",
            "links",
            "sent/GPU (GB)",
            "all comm (ms)",
            "exposed (ms)",
            "step (ms)",
        ],
        all_rows,
        right={4, 5, 6, 7},
        caption=f"One step, the same global batch for every row, {plan_words(model, lec)}. 'exposed': communication "
        "the step waits for (not hidden behind compute).",
    )

    notes = _notes(model, cluster, plans, data)
    fig = FigureSpec(
        "4-communication",
        "Communication per step",
        f"Bytes each GPU sends per step and the time they take, {model.name} on {n} GPUs: the "
        "lecture's formula beside the ZeRO paper's ring volumes and PyTorch's engines.",
        lambda: _draw(model, cluster, plans, data),
    )
    return Section(
        "comm",
        4,
        "Communication",
        "What each strategy puts on the wire per training step, which link carries it, and how long it "
        "takes. The lecture's numbers are shown beside the library's; where they differ, the reason "
        "is given with its source.",
        [vol, every],
        notes,
        [fig],
        data,
    )


def _dp_bytes(e) -> int:
    return sum(c.wire_bytes for c in e.comm if c.group == "dp")


def _dp_seconds(e) -> float:
    return sum(c.seconds for c in e.comm if c.group == "dp")


def _links(e, cluster, group: str) -> str:
    kinds = {c.link for c in e.comm if c.group == group}
    return " + ".join(sorted(cluster.gpu.link if k == "intra-node" else cluster.network.name for k in kinds)) or "-"


def _degrees(plan) -> str:
    """The parallel sizes above 1 (and sp): 'dp8', 'tp8 sp', 'pp8'."""
    parts = [f"{k}{getattr(plan, k)}" for k in ("dp", "tp", "pp") if getattr(plan, k) not in (0, 1)]
    return " ".join(parts + (["sp"] if plan.sp else [])) or "1 GPU"


def _draw(model, cluster, plans, data):
    names = list(plans)
    lec_gb = [data[n]["lecture_bytes"] / GB if n in ZERO else None for n in names]
    paper_gb = [data[n]["paper_bytes"] / GB if n in ZERO else None for n in names]
    torch_gb = [data[n]["wire_bytes"] / GB for n in names]
    lec_ms = [data[n]["lecture_s"] * 1e3 if n in ZERO else None for n in names]
    net_ms = [data[n]["paper_network_s"] * 1e3 if n in ZERO else None for n in names]
    torch_ms = [data[n]["comm_s"] * 1e3 for n in names]
    net = cluster.network
    return figures.comm_bars(
        names,
        [_degrees(plans[n].resolve(model, cluster.gpus)) for n in names],
        [
            (f"lecture's formula (time: {net.gbits:g} Gbit/s)", lec_gb, "lecture"),
            (f"ZeRO paper, ring volumes (time: every GPU over {net.name})", paper_gb, "paper"),
            ("PyTorch's engines (time: this cluster's links)", torch_gb, "torch"),
        ],
        [("lecture", lec_ms, "lecture"), ("paper", net_ms, "paper"), ("torch", torch_ms, "torch")],
        f"Communication per step: {model.name} on {cluster.gpus}x {cluster.gpu.name}",
        f"GB = 10^9 bytes sent by one GPU in one step; ms before overlap with compute. TP/PP: the lecture gives no "
        f"number. Cluster: {cluster.describe()}.",
    )


def _notes(model, cluster, plans, data) -> list[Note]:
    n, gpu, net = cluster.gpus, cluster.gpu, cluster.network
    d0, d2 = data["DDP"], data["ZeRO-2"]
    notes = [
        Note(
            "correction",
            f"ZeRO-2: the lecture counts one reduce-scatter of the gradients, {fmt_gb(d2['lecture_bytes'])} GB, "
            f"half its DDP figure. The updated parameters must also be all-gathered, so the ZeRO paper gives 2Psi, "
            f"the same as DDP: {fmt_gb(d2['paper_bytes'])} GB vs {fmt_gb(d0['paper_bytes'])} GB per GPU in the paper's "
            f"ring accounting. ZeRO-1 and ZeRO-2 cost no extra traffic; ZeRO-3 costs 1.5x "
            f"({fmt_gb(data['ZeRO-3']['paper_bytes'])} GB).",
            ZERO_PAPER + ".2",
        )
    ]
    if n > 1:
        notes.append(
            Note(
                "correction",
                f"The lecture sends 2 x the gradient bytes per all-reduce; a ring all-reduce sends 2(N-1)/N of them "
                f"per GPU, {2 * (n - 1) / n:.3f} x for N = {n}: the lecture's DDP {fmt_gb(d0['lecture_bytes'])} GB "
                f"against {fmt_gb(d0['paper_bytes'])} GB.",
                "Patarasuk & Yuan 2009, 'Bandwidth optimal all-reduce algorithms for clusters of workstations'",
            )
        )
    head = (
        f"The lecture times everything at {net.gbits:g} Gbit/s = {net.gbytes_per_s:g} GB/s, a network card's "
        f"speed (Gbit/s / 8 = GB/s), with no latency and no link efficiency. "
    )
    if n <= cluster.node_size:
        body = (
            f"These {n} GPUs share one server and talk over {gpu.link} at {gpu.link_gbps:g} GB/s "
            f"(= {gpu.link_gbps * 8:,.0f} Gbit/s) per direction: the DDP all-reduce takes "
            f"{fmt_ms(d0['torch_s'])} ms here vs {fmt_ms(d0['paper_network_s'])} ms with every GPU behind its "
            f"own {net.name} NIC, and {fmt_ms(d0['lecture_s'])} ms by the lecture's formula."
        )
    else:
        body = (
            f"Here the data-parallel group spans {cluster.nodes} nodes, so its ring runs at the network's "
            f"speed: the DDP all-reduce takes {fmt_ms(d0['torch_s'])} ms with PyTorch's engines (their dtype "
            f"and buckets, each paying the ring's latency), {fmt_ms(d0['paper_network_s'])} ms for the paper's "
            f"volume in one call, {fmt_ms(d0['lecture_s'])} ms by the lecture's formula."
        )
    notes.append(
        Note(
            "correction",
            head + body,
            f"{gpu.name} and {net.name} entries of shardwise's catalog (gpus.toml, networks.toml, with sources)",
        )
    )
    dt = cm.dtypes("torch", plans["DDP"])
    dt3 = cm.dtypes("torch", plans["ZeRO-3"])
    notes.append(
        Note(
            "info",
            f"PyTorch's engines move other dtypes than the paper's 16-bit: DDP all-reduces gradients of "
            f"{dt['grad']} bytes/element under {plans['DDP'].precision} (the parameter dtype), FSDP2 gathers "
            f"{dt3['gather']}-byte parameters and reduce-scatters {dt3['reduce']}-byte gradients: DDP sends "
            f"{fmt_gb(d0['torch_bytes'])} GB here vs the paper's {fmt_gb(d0['paper_bytes'])} GB.",
        )
    )
    if "TP" in data and "PP" in data:
        notes.append(
            Note(
                "takeaway",
                f"Tensor parallelism sends {fmt_gb(data['TP']['wire_bytes'])} GB per GPU per step (activations in "
                f"every layer), pipeline parallelism {fmt_gb(data['PP']['wire_bytes'])} GB (one activation per "
                f"micro-batch per boundary), DDP {fmt_gb(d0['torch_bytes'])} GB: keep TP on the fastest link, let PP "
                "and data parallelism cross nodes.",
            )
        )
    return notes
