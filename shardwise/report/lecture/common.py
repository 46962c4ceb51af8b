"""Helpers the five parts share: the default plan, units, and the plans named after strategies."""

from __future__ import annotations

from shardwise import units
from shardwise.spec.hardware import Cluster
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan, divisors
from shardwise.units import GB, GIB

# Each part that compares strategies gives them the same global batch, so their tokens/s, bytes
# and bubbles are comparable: one micro-batch per GPU, so DDP and ZeRO make one pass (the ZeRO
# paper's per-iteration volumes) and a pipeline over all N GPUs gets N micro-batches.
SEQS_PER_GPU = 1


def to_gib(b: float) -> float:
    return b / GIB


def fmt_gib(b: float) -> str:
    return units.number(b / GIB)


def fmt_gb(b: float) -> str:
    return units.number(b / GB)


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:,.0f}" if ms >= 100 else (f"{ms:,.1f}" if ms >= 1 else f"{ms:,.3f}")


def ratio(a: float, b: float) -> str:
    return f"{a / b:,.1f}x" if b else "-"


def seq_for(model: ModelSpec, seq: int) -> int:
    """The default plan's sequence length, capped at the model's context (GPT-2's learned position
    table: 1024)."""
    return min(seq, model.max_seq)


def base_plan(model: ModelSpec, lec, **kw) -> Plan:
    """The lecture's default plan: the user's seq and micro-batch, bf16 mixed precision, AdamW,
    no recompute, no offload (Plan's defaults), plus the fields given."""
    return Plan(seq=seq_for(model, lec.settings.seq), mbs=lec.settings.mbs, **kw)


def plan_words(models, lec) -> str:
    """The default plan in words, for one model or several (naming those whose context caps seq)."""
    models = models if isinstance(models, (list, tuple)) else [models]
    p = Plan(seq=lec.settings.seq, mbs=lec.settings.mbs)
    capped = [f"{m.name}: {seq_for(m, p.seq)}" for m in models if seq_for(m, p.seq) < p.seq]
    seq = f"sequence {p.seq}" + (f" ({', '.join(capped)}, its context)" if capped else "")
    return (
        f"{seq}, micro-batch {p.mbs}, {p.precision} precision, {p.optimizer}, recompute {p.recompute}, "
        f"offload {p.offload}"
    )


def largest_tp(model: ModelSpec, cluster: Cluster) -> int:
    """The widest tensor-parallel group that stays inside one node and divides heads, KV heads
    and the FFN (the Plan's rules) and the GPU count."""
    n = cluster.node_size
    ok = [
        t
        for t in divisors(n)
        if model.heads % t == 0 and model.kv_heads % t == 0 and model.ffn_hidden % t == 0 and cluster.gpus % t == 0
    ]
    return max(ok)


def largest_pp(model: ModelSpec, cluster: Cluster) -> int:
    """The deepest pipeline over the GPUs whose stages get equal layer counts."""
    return max(p for p in divisors(cluster.gpus) if model.layers % p == 0)


def strategy_plans(model: ModelSpec, cluster: Cluster, lec) -> dict[str, Plan]:
    """The textbook strategies as Plans over all the GPUs, sharing one global batch.

    DDP and ZeRO-1/2/3 spread the GPUs over data parallelism; TP takes the widest group inside a
    node and PP the deepest legal pipeline, data parallelism (DDP) over what is left."""
    n = cluster.gpus
    gbs = SEQS_PER_GPU * n * lec.settings.mbs
    out = {
        name: base_plan(model, lec, dp=n, zero=z, gbs=gbs)
        for name, z in (("DDP", 0), ("ZeRO-1", 1), ("ZeRO-2", 2), ("ZeRO-3", 3))
    }
    tp = largest_tp(model, cluster)
    if tp > 1:
        out["TP"] = base_plan(model, lec, tp=tp, gbs=gbs)
        if base_plan(model, lec).seq % tp == 0:
            out["TP + SP"] = base_plan(model, lec, tp=tp, sp=True, gbs=gbs)
    pp = largest_pp(model, cluster)
    if pp > 1:
        out["PP"] = base_plan(model, lec, pp=pp, gbs=gbs, schedule="1f1b")
    return out
