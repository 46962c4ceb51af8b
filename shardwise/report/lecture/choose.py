"""Part 5, choosing a strategy: the lecture's three scenarios answered by the search, beside the
lecture's own three if-statements; then the key takeaways, generated from parts 1, 3 and 4 and
the scenarios' numbers.
"""

from __future__ import annotations

import math

from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.report import figures
from shardwise.report.lecture.common import GB, base_plan, fmt_gb, fmt_gib, seq_for, to_gib
from shardwise.report.lecture.section import FigureSpec, Note, Section, Table
from shardwise.search.core import DEFAULT_HEADROOM, Options, fewest_gpus, run_search
from shardwise.search.explain import why_winner
from shardwise.spec.hardware import make_cluster
from shardwise.spec.presets import load_model

SCENARIOS = (("gpt2-1.5b", "rtx-4090", 4), ("llama-7b", "a100-80gb", 8), ("llama-2-70b", "a100-80gb", 8))
STAGES = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")


def lecture_recommendation(rule_bytes: float, gpu_gb: float, n: int) -> tuple[str, tuple[int, ...]]:
    """The lecture's `strategy_recommendation`, quoted to be compared: 18 bytes/param in GB
    against the GPU's nominal GB. Returns (its words, the ZeRO stages it points to)."""
    need = rule_bytes / GB
    if need <= gpu_gb:
        return "fits in a single GPU: DDP", (0,)
    if need <= gpu_gb * 1.5:
        return "barely fits: ZeRO-1 or ZeRO-2", (1, 2)
    if need <= n * gpu_gb:
        return "needs memory sharding: ZeRO-3", (3,)
    return f"too large even with ZeRO-3: at least {math.ceil(need / gpu_gb)} GPUs or model parallelism", ()


def build(lec) -> Section:
    scen = [(load_model(m), make_cluster(g, n, None, lec.cluster.network)) for m, g, n in SCENARIOS]
    if lec.settings.customized and all(
        (m.name, c.gpu.name, c.gpus) != (lec.model.name, lec.cluster.gpu.name, lec.cluster.gpus) for m, c in scen
    ):
        scen.append((lec.model, lec.cluster))

    rows, marks, data, panels = [], {}, [], []
    for model, cluster in scen:
        d = _scenario(model, cluster, lec)
        data.append(d)
        rows.append([d["title"], d["lecture_says"], d["answer"], d["tokens_per_s"], d["memory"]])
        marks[len(rows) - 1] = "pick" if d["fits"] else "bad"
        panels.append(d["panel"])
    table = Table(
        "The lecture's scenarios, answered by the search",
        ["scenario", "the lecture's rule says", "the search picks", "tokens/s", "memory/GPU (GiB)"],
        rows,
        right={3, 4},
        marks=marks,
        caption="The search: every legal dp x tp x pp x ZeRO x micro-batch x schedule x recompute x sp x "
        "offload plan, 10% memory headroom, ranked by predicted tokens/s (shardwise plan). "
        "The lecture's rule: 18 bytes/param against the GPU's memory (its three if-statements).",
    )

    notes = [Note("info", f"{d['title']}, why: {d['why']}.") for d in data]
    notes.append(Note("correction", _rule_note(data), "the lecture's strategy_recommendation; shardwise plan"))
    notes += [Note("takeaway", t) for t in takeaways(lec, data)]
    fig = FigureSpec(
        "5-scenarios",
        "The lecture's scenarios",
        "Per scenario: memory per GPU of plain DDP and ZeRO-1/2/3 over all GPUs beside the search's "
        "pick (outlined), against the GPU's memory; above each bar, its tokens/s or how far it is over.",
        lambda: _draw(panels),
    )
    for d in data:
        d.pop("panel")
    return Section(
        "choose",
        5,
        "Choosing a strategy",
        "The lecture picks a strategy with three if-statements on 18 bytes/param. shardwise searches "
        "every legal plan, keeps those that fit, ranks them by predicted throughput and says why the "
        "winner wins.",
        [table],
        notes,
        [fig],
        {"scenarios": data},
    )


def _scenario(model, cluster, lec) -> dict:

    seq = seq_for(model, lec.settings.seq)
    title = f"{model.name} on {cluster.gpus}x {cluster.gpu.name}"
    rule = estimate(model, cluster, base_plan(model, lec, zero=3)).rule_of_thumb_bytes
    says, stages = lecture_recommendation(rule, cluster.gpu.memory_gib, cluster.gpus)
    usable = (1 - DEFAULT_HEADROOM) * cluster.gpu.memory_bytes
    d = {
        "title": title,
        "model": model.name,
        "gpu": cluster.gpu.name,
        "gpus": cluster.gpus,
        "lecture_says": says,
        "lecture_stages": list(stages),
        "rule_bytes": rule,
    }
    try:
        res = run_search(model, cluster, seq=seq, top=1)
        err = None
    except ShardwiseError as e:  # nothing fits whatever the search chooses: that is the answer
        res, err = None, str(e)
    if res is not None and res.fits:
        best = res.ranked[0]
        d |= {"fits": True, "plan": best.plan.short(), "why": why_winner(res, best), "gbs": res.gbs}
        d["lecture_best"] = _best_with_stages(res, stages)
    else:
        n = fewest_gpus(model, cluster, {"seq": seq}, Options(), start=cluster.gpus + 1)
        d |= {"fits": False, "fewest_gpus": n}
        if n:
            more = make_cluster(cluster.gpu, n, cluster.gpus_per_node, cluster.network)
            r2 = run_search(model, more, seq=seq, top=1)
            best = r2.ranked[0]
            d |= {
                "plan": None,
                "plan_at_fewest": best.plan.short(),
                "gbs": r2.gbs,
                "why": f"no plan fits in {fmt_gib(usable)} GiB usable per GPU on {cluster.gpus}; the fewest "
                f"{cluster.gpu.name} on which one fits: {n}, best there {best.plan.short()}",
            }
        else:
            best = None
            d |= {"plan": None, "why": err or "no plan fits on any number of these GPUs", "gbs": None}
    d["answer"] = d.get("plan") or (
        f"nothing fits; {d['fewest_gpus']} GPUs: {d['plan_at_fewest']}" if d.get("fewest_gpus") else "nothing fits"
    )
    d["tokens_per_s"] = f"{best.time.tokens_per_s:,.0f}" if best is not None else "-"
    d["memory"] = fmt_gib(best.memory.total) if best is not None else "-"
    d["tokens_per_s_value"] = best.time.tokens_per_s if best is not None else 0.0
    d["memory_bytes"] = best.memory.total if best is not None else 0
    d["panel"] = _panel(model, cluster, lec, d, best if d["fits"] else None, usable)
    return d


def _best_with_stages(res, stages) -> dict | None:
    """The search's best plan among the ZeRO stages the lecture recommends, with tp = pp = 1 (what
    the lecture means by DDP / ZeRO), for the takeaway that compares them."""
    if not stages:
        return None
    c = res.table.cols
    import numpy as np

    mask = np.isin(c["zero"], stages) & (c["tp"] == 1) & (c["pp"] == 1)
    row = res.table.best(mask)
    if row is None:
        return {"plan": None, "tokens_per_s": 0.0}
    e = res.estimate_row(row)
    return {"plan": e.plan.short(), "tokens_per_s": e.time.tokens_per_s}


def _panel(model, cluster, lec, d, best, usable) -> dict:
    """Plain DDP and ZeRO-1/2/3 over all the GPUs (the lecture's menu) and the search's pick."""
    gbs = d["gbs"] if d.get("gbs") and d["gbs"] % (cluster.gpus * lec.settings.mbs) == 0 else 0
    plans = []
    for z, name in enumerate(STAGES):
        e = estimate(model, cluster, base_plan(model, lec, zero=z, gbs=gbs))
        plans.append(_bar(name, e, usable, pick=False))
    if best is not None:
        plans.append(_bar("search:\n" + _short(best.plan), best, usable, pick=True))
    return {"title": d["title"], "capacity_gib": cluster.gpu.memory_gib, "plans": plans}


def _short(plan) -> str:
    """The plan's name without its defaults, wrapped for an axis label."""
    parts = [p for p in plan.short().split() if p not in ("tp1", "pp1", "zero0") and not p.startswith("ga")]
    return "\n".join(" ".join(parts[i : i + 3]) for i in range(0, len(parts), 3))


def _bar(label, e, usable, pick) -> dict:
    m = e.memory
    fits = m.total <= usable
    note = f"{e.time.tokens_per_s / 1e3:,.1f}k tok/s" if fits else f"{fmt_gib(m.total)} GiB"
    return {
        "label": label,
        "params": to_gib(m.params),
        "grads": to_gib(m.grads),
        "optimizer": to_gib(m.optimizer),
        "activations": to_gib(m.activations),
        "other": to_gib(m.buffers + m.overhead),
        "note": note,
        "fits": fits,
        "pick": pick,
    }


def _draw(panels):
    return figures.scenario_memory(
        panels,
        "The lecture's scenarios: what fits, and what the search picks",
        "torch profile; bars: plain DDP / ZeRO-1/2/3 with dp = all GPUs, and the search's pick (outlined). "
        "Green: fits with 10% headroom (its tokens/s); red: its total, over.",
    )


def _rule_note(data) -> str:
    parts = []
    for d in data:
        pick = d.get("plan") or (
            "nothing on these GPUs" + (f", fewest {d['fewest_gpus']}" if d.get("fewest_gpus") else "")
        )
        parts.append(f"{d['title']}: the rule says '{d['lecture_says']}', the search {pick}")
    return (
        "18 bytes/param against one GPU decides nothing about sharding, sequence length or throughput. "
        + "; ".join(parts)
        + "."
    )


def takeaways(lec, data) -> list[str]:
    """Key takeaways, each sentence built from numbers the other parts computed."""
    out = []
    why = lec.section("why").data
    ms = why["models"]
    gpu = why["gpu"]
    cap = lec.cluster.gpu.memory_bytes
    over = [k for k, v in ms.items() if v["total"] > cap]
    big = max(ms, key=lambda k: ms[k]["params"])
    fewest = ms[big]["fewest_gpus"]
    need = (
        f"needs {fewest:,} of them"
        if fewest
        else f"needs more than {why['search_limit']:,} of them (at least {ms[big]['lower_bound']:,} for its model "
        f"states alone)"
    )
    out.append(
        f"Large models need many GPUs: {len(over)} of the {len(ms)} models in part 1 do not fit on one "
        f"{gpu}; {big} {need}, where the lecture counts {ms[big]['lecture_gpus']:,}."
    )
    z = lec.section("zero").data["torch"]
    n = lec.cluster.gpus
    out.append(
        f"ZeRO-3 cut model states per GPU from {fmt_gib(z['DDP']['states'])} to "
        f"{fmt_gib(z['ZeRO-3']['states'])} "
        f"GiB on {n} GPUs, {z['DDP']['states'] / z['ZeRO-3']['states']:.1f}x, but the whole per-GPU total "
        f"only {z['DDP']['total'] / z['ZeRO-3']['total']:.1f}x: activations are not sharded."
    )
    c = lec.section("comm").data
    out.append(
        f"More partitioning is not always more communication: per GPU per step ZeRO-1 and ZeRO-2 send "
        f"{fmt_gb(c['ZeRO-1']['paper_bytes'])} and {fmt_gb(c['ZeRO-2']['paper_bytes'])} GB, as DDP "
        f"({fmt_gb(c['DDP']['paper_bytes'])} GB); ZeRO-3 sends {fmt_gb(c['ZeRO-3']['paper_bytes'])} GB "
        f"({c['ZeRO-3']['paper_bytes'] / c['DDP']['paper_bytes']:.2f}x), ZeRO paper accounting."
    )
    for d in data:
        lb = d.get("lecture_best")
        if d["fits"] and lb and lb["plan"] and lb["plan"] != d["plan"]:
            out.append(
                f"{d['title']}: the search's {d['plan']} trains "
                f"{d['tokens_per_s_value'] / lb['tokens_per_s']:.2f}x as fast as the best plan of the "
                f"lecture's choice ({lb['plan']})."
            )
        elif d["fits"] and lb and lb["plan"] == d["plan"]:
            out.append(f"{d['title']}: the lecture's choice is also the search's ({d['plan']}).")
        elif d["fits"] and lb and not lb["plan"]:
            out.append(f"{d['title']}: no plan of the lecture's choice fits; the search's {d['plan']} does.")
        elif d["fits"] and not d["lecture_stages"]:
            out.append(
                f"{d['title']}: the lecture gives up ('{d['lecture_says']}'); the search fits "
                f"{d['plan']} at {d['tokens_per_s']} tokens/s."
            )
        elif not d["fits"]:
            out.append(
                f"{d['title']}: nothing fits on {d['gpus']} GPUs"
                + (
                    f"; the fewest that do: {d['fewest_gpus']} ({d['plan_at_fewest']})."
                    if d.get("fewest_gpus")
                    else "."
                )
            )
    return out
