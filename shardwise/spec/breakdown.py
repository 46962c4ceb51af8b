"""The three breakdowns every tier fills: memory, communication, time.

An Estimate (from formulas) and a Measurement (from a run) use these same classes
and field names, so comparing them is a diff, not a translation. Bytes are integers; the
JSON form (`to_dict`) is the stable contract documented in the README.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MEMORY_FIELDS = ("params", "grads", "optimizer", "activations", "buffers", "overhead")


@dataclass
class Memory:
    """Bytes held on one rank at its peak (the worst rank: first pipeline stage, rank 0)."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    buffers: int = 0  # communication buckets, gathered ZeRO-3 parameters, pipeline p2p buffers
    overhead: int = 0  # CUDA context, allocator fragmentation, workspace
    capacity: int = 0  # the GPU's memory
    detail: dict = field(default_factory=dict)  # named sub-items, for the table and the README

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def free(self) -> int:
        """Bytes left (negative: short by that much)."""
        return self.capacity - self.total

    def to_dict(self) -> dict:
        d = {k: int(getattr(self, k)) for k in MEMORY_FIELDS}
        d |= {
            "total": int(self.total),
            "capacity": int(self.capacity),
            "fits": bool(self.fits),
            "free": int(self.free),
            "detail": {k: int(v) for k, v in self.detail.items()},
        }
        return d


@dataclass
class Collective:
    """One kind of collective in one training step, as seen by one rank."""

    kind: str  # all-reduce | all-gather | reduce-scatter | send | recv | all-to-all | broadcast
    group: str  # dp | tp | pp | ep
    ranks: int  # group size
    bytes: int  # message size of one call (the full, unsharded buffer for all-gather/reduce-scatter)
    count: int  # calls per step
    wire_bytes: int  # bytes this rank sends per step, all calls together (ring algorithm)
    seconds: float  # time of all calls per step on the link the group spans
    what: str = ""  # e.g. "gradient all-reduce", "ZeRO-3 parameter gather (forward)"
    link: str = ""  # "intra-node" | "network"
    overlapped: bool = False  # can hide behind compute (bucketed grads, prefetched gathers)
    # message bytes -> calls when the calls differ in size (DDP buckets, ZeRO-1's per-owner broadcasts);
    # `bytes` is then their mean. Empty: every call is `bytes`.
    sizes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "group": self.group,
            "ranks": int(self.ranks),
            "bytes": int(self.bytes),
            "count": int(self.count),
            "wire_bytes": int(self.wire_bytes),
            "seconds": float(self.seconds),
            "what": self.what,
            "link": self.link,
            "overlapped": bool(self.overlapped),
            "sizes": {str(int(b)): int(n) for b, n in self.sizes.items()},
        }


@dataclass
class Time:
    compute_s: float = 0.0
    comm_exposed_s: float = 0.0
    bubble_s: float = 0.0
    step_s: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    flops_per_step: float = 0.0  # model FLOPs of one step, all GPUs (6*N*T + attention; no recompute)
    detail: dict = field(default_factory=dict)  # forward/backward/recompute/optimizer seconds, ...
    # filled when a token budget is given
    train_tokens: float = 0.0
    train_days: float = 0.0
    gpu_hours: float = 0.0
    cost_usd: float = 0.0

    def to_dict(self) -> dict:
        d = {k: float(v) for k, v in dataclasses.asdict(self).items() if k != "detail"}
        d["detail"] = {k: float(v) for k, v in self.detail.items()}
        return d


@dataclass
class Breakdown:
    """What Estimate and Measurement share: the three breakdowns for one plan."""

    memory: Memory
    comm: list[Collective]
    time: Time

    @property
    def comm_wire_bytes(self) -> int:
        return sum(c.wire_bytes for c in self.comm)


@dataclass
class Estimate(Breakdown):
    model: object = None  # ModelSpec
    cluster: object = None  # Cluster
    plan: object = None  # Plan (resolved)
    profile: str = "torch"
    notes: list[str] = field(default_factory=list)
    rule_of_thumb_bytes: int = 0  # the lecture's 18 bytes/param, shown beside, never instead

    def to_dict(self) -> dict:
        m = self.model
        return {
            "model": m.summary(),
            "cluster": {
                "gpu": self.cluster.gpu.name,
                "gpus": self.cluster.gpus,
                "gpus_per_node": self.cluster.gpus_per_node,
                "nodes": self.cluster.nodes,
                "network": self.cluster.network.name,
            },
            "plan": self.plan.to_dict(),
            "profile": self.profile,
            "memory": self.memory.to_dict(),
            "comm": [c.to_dict() for c in self.comm],
            "time": self.time.to_dict(),
            "rule_of_thumb_bytes": int(self.rule_of_thumb_bytes),
            "notes": list(self.notes),
        }


@dataclass
class Measurement(Breakdown):
    """Filled by a run (run/measure.py); `source` says what filled it."""

    source: str = "run"
    rank: int = 0
