"""Plan: how one training step is split over the GPUs. It validates itself against a model and
a GPU count, each failure one line naming the rule and a fix.

The numeric fields (dp, tp, pp, mbs, gbs, vpp, seq) are read by the estimate formulas with plain
arithmetic only, so a Plan whose numeric fields are numpy arrays (built by the search, never
validated field by field) flows through the same formulas: one path for one plan or a million.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from shardwise.errors import ShardwiseError, closest
from shardwise.spec import experts, limits

# torch.distributed.pipelining's schedules: ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B,
# ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, ScheduleDualPipeV
SCHEDULES = ("gpipe", "1f1b", "interleaved", "interleaved-zb", "zbv", "dualpipev")
LOOPED = ("interleaved", "interleaved-zb")  # rank r holds the virtual stages r, r+p, r+2p, ...
V_SHAPE = ("zbv", "dualpipev")  # rank r holds stages r and 2p-1-r: exactly two, the first and last on rank 0
MULTI_STAGE = LOOPED + V_SHAPE
SPLIT_BACKWARD = ("interleaved-zb", "zbv", "dualpipev")  # backward for inputs (B) apart from weights (W)
# by the matmul work they run again (the search's order): selective-op, the per-op policy, keeps
# every matmul's and attention's output; selective, Megatron's, reruns the attention core;
# selective-layer[:k], torchtitan's per-layer policy, reruns every k-th block's forward
RECOMPUTE = ("none", "selective-op", "selective", "selective-layer", "full")
# selective-layer's default k: every second block (torchtitan's selective_ac_option default "2"):
# about half of no recompute's activations for half of full recompute's extra forward
LAYER_EVERY = 2
# fp8-*: bf16-mixed with the transformer blocks' linear layers in FP8 (torchao float8 training,
# shardwise/spec/fp8.py); one precision field, so FP8 over fp16 or fp32 cannot be asked for
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp8-tensorwise", "fp8-rowwise")
OPTIMIZERS = ("adamw", "sgd", "adafactor", "adam8bit")
ATTENTION = ("flash", "math")  # SDPA's fused kernels (no s x s scores saved) or materialized scores
OFFLOAD = ("none", "optimizer", "params")  # "params" = parameters + gradients + optimizer (FSDP2 CPUOffloadPolicy)
ZERO_STAGES = (0, 1, 2, 3)
# how context parallelism moves K/V: torch's set_rotate_method names. allgather (torch 2.13's default,
# _ContextParallelOptions.rotate_method; Llama 3's choice) gathers the whole K/V once per layer;
# alltoall passes each rank's K/V around the ring, one neighbour per step
CP_ROTATE = ("allgather", "alltoall")


@dataclass(frozen=True)
class Plan:
    dp: int = 0  # 0 -> derived: GPUs / (tp * pp)
    tp: int = 1
    pp: int = 1
    zero: int = 0
    mbs: int = 1  # micro-batch size, sequences per rank per forward
    gbs: int = 0  # global batch in sequences; 0 -> dp * mbs (no accumulation)
    seq: int = 2048
    schedule: str = "1f1b"
    vpp: int = 1  # virtual pipeline stages per rank (interleaved, interleaved-zb; 2 for zbv and dualpipev)
    recompute: str = "none"
    sp: bool = False  # sequence parallel (with tp)
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    offload: str = "none"
    # "math" for runs that materialize the attention scores (Megatron 2022, any unfused attention):
    # the s x s scores are then saved for backward and selective recompute has something to drop
    attention: str = "flash"
    # HSDP: ZeRO-2/3 states sharded over groups of dp_shard ranks, replicated over dp / dp_shard
    # such groups (FSDP2 fully_shard on a 2-D (replicate, shard) mesh); 0 -> shard over all of dp
    dp_shard: int = 0
    # blocks the last pipeline stage holds fewer than the others (its final norm, output layer and
    # loss take their place; Megatron's --decoder-last-pipeline-num-layers, torchtitan's
    # last_stage_less_layers); 0 -> none when pp*vpp divides the layers, else the remainder
    last_less: int = 0
    # torch.compile of each transformer block (inductor), as torchtitan's [compile] does: fused
    # pointwise kernels save fewer tensors (estimate/activations.py) and make fewer memory passes
    compile: bool = False
    # context parallel: the sequence split over cp ranks (between dp and tp on the mesh, as
    # torchtitan's pp, dp_replicate, dp_shard, cp, tp), attention's K/V exchanged (cp_rotate)
    cp: int = 1
    cp_rotate: str = "allgather"
    # expert parallelism (spec/experts.py): the routed experts split over ep of the data-parallel
    # ranks; capacity: each expert's all-to-all buffer as a multiple of its balanced share (0: dropless)
    ep: int = 1
    capacity: float = 0.0

    # ---- derived (array-safe arithmetic) ----------------------------------------------
    @property
    def world(self):
        return self.dp * self.tp * self.pp * self.cp

    @property
    def grad_accum(self):
        """Micro-batches per rank per step (= pipeline micro-batches m when pp > 1)."""
        return self.gbs // (self.dp * self.mbs)

    @property
    def shard(self):
        """Ranks one ZeRO-2/3 shard group spans: dp_shard (HSDP), else all of dp (array-safe)."""
        return self.dp_shard + (self.dp_shard == 0) * self.dp

    @property
    def replicate(self):
        """HSDP replicas: dp / shard (1 without HSDP)."""
        return self.dp // self.shard

    @property
    def tokens_per_step(self):
        return self.gbs * self.seq

    def replace(self, **kw) -> Plan:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"grad_accum": int(self.grad_accum), "world": int(self.world)}

    def short(self) -> str:
        """Compact one-line name: dp8 tp8 pp2 zero1 mbs1 ga64 1f1b ..."""
        parts = [
            f"dp{self.dp}",
            f"tp{self.tp}",
            f"pp{self.pp}",
            f"zero{self.zero}",
            f"mbs{self.mbs}",
            f"ga{self.grad_accum}",
        ]
        if self.pp > 1:
            parts.append(self.schedule + (f"/v{self.vpp}" if self.vpp > 1 else ""))
        if self.cp > 1:
            parts.insert(3, f"cp{self.cp}" + ("/a2a" if self.cp_rotate == "alltoall" else ""))
        if 0 < self.dp_shard < self.dp:
            parts.append(f"hsdp{self.dp_shard}")
        if self.last_less:
            parts.append(f"last-{self.last_less}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.sp:
            parts.append("sp")
        if self.recompute != "none":
            parts.append(f"rc-{self.recompute}")
        if self.offload != "none":
            parts.append(f"offload-{self.offload}")
        if self.attention != "flash":
            parts.append(f"attn-{self.attention}")
        return " ".join(parts)

    # ---- validation -------------------------------------------------------------------
    def resolve(self, model, gpus: int) -> Plan:
        """Fill dp and gbs, then check every rule. Returns the complete plan or raises."""
        _check_choices(self)
        experts.check_capacity(self.capacity)
        for f in ("tp", "pp", "mbs", "seq", "vpp", "cp", "ep"):
            _positive_int(f, getattr(self, f))
        for f in ("dp", "gbs", "dp_shard", "last_less"):
            _positive_int(f, getattr(self, f), allow_zero=True)
        _positive_int("gpus", gpus)
        limits.check_count("gpus", gpus, limits.GPUS)
        for f, bound in limits.PLAN.items():
            limits.check_count(f, getattr(self, f), bound)
        p = self
        if p.dp == 0:
            split = p.tp * p.pp * p.cp
            if gpus % split:
                names = "tp*pp*cp" if p.cp > 1 else "tp*pp"
                raise ShardwiseError(
                    f"{names} = {split} does not divide {gpus} GPUs; "
                    f"choose {names.replace('*', ', ')} whose product divides the GPU count"
                )
            p = p.replace(dp=gpus // split)
        if p.gbs == 0:
            p = p.replace(gbs=p.dp * p.mbs)
        if p.schedule in V_SHAPE and p.vpp == 1:
            p = p.replace(vpp=2)  # the V holds two stages per rank, always
        p.validate(model, gpus)
        return p

    def validate(self, model, gpus: int) -> None:
        v = violation(self, model, gpus)
        if v:
            raise ShardwiseError(v)


def violation(p: Plan, model, gpus: int) -> str | None:
    """The first rule a complete (dp and gbs filled) scalar plan breaks, or None."""
    for rule in RULES:
        if rule.broken(p, model, gpus):
            return rule.message(p, model, gpus)
    return None


class Rule(NamedTuple):
    """One legality rule, written once for one plan and for many.

    `broken(p, model, gpus)` uses only array-safe operators (`|`, `&`, comparisons; no `and`,
    `or`, `if`), so it returns a bool for a scalar Plan and a boolean mask for a Plan whose
    numeric fields are numpy arrays (the search). `message` is for a scalar plan only.
    `reason` groups rules for the search's rejection counts.
    """

    reason: str  # gpus | divisibility | stages | batch | schedule | sequence | offload | hsdp | experts
    broken: Callable
    message: Callable


_MULTI = lambda p: (p.schedule == "interleaved") | (p.schedule == "interleaved-zb") | _VEE(p)
_LOOPED = lambda p: (p.schedule == "interleaved") | (p.schedule == "interleaved-zb")
_VEE = lambda p: (p.schedule == "zbv") | (p.schedule == "dualpipev")
_ZB = lambda p: (p.schedule == "interleaved-zb") | _VEE(p)
RULES: tuple[Rule, ...] = (
    Rule(
        "gpus",
        lambda p, m, g: p.world != g,
        lambda p, m, g: (
            f"dp*tp*pp{'*cp' if p.cp > 1 else ''} = {p.dp}*{p.tp}*{p.pp}{f'*{p.cp}' if p.cp > 1 else ''} = "
            f"{p.world} but there are {g} GPUs; leave --dp out to derive it, or make the product {g}"
        ),
    ),
    Rule(
        "divisibility",
        lambda p, m, g: (m.heads % p.tp != 0) | (m.kv_heads % p.tp != 0),
        lambda p, m, g: (
            f"tp={p.tp} must divide the attention heads ({m.heads}) and KV heads "
            f"({m.kv_heads}) of {m.name}; try tp in {divisors(m.kv_heads)}"
        ),
    ),
    Rule(
        "divisibility",
        lambda p, m, g: m.is_moe & (m.expert_ffn_hidden % p.tp != 0),
        lambda p, m, g: f"tp={p.tp} must divide the expert FFN size {m.expert_ffn_hidden}; pick a divisor",
    ),
    Rule(
        "divisibility",
        lambda p, m, g: m.ffn_hidden % p.tp != 0,
        lambda p, m, g: f"tp={p.tp} must divide the FFN size {m.ffn_hidden}; pick a divisor",
    ),
    Rule(
        "divisibility",
        lambda p, m, g: p.pp > m.layers,
        lambda p, m, g: f"pp={p.pp} is more stages than {m.name}'s {m.layers} layers; use pp <= {m.layers}",
    ),
    Rule(
        "stages",
        lambda p, m, g: (p.last_less > 0) & (p.pp == 1),
        lambda p, m, g: f"--last-less {p.last_less} needs pp > 1 (one stage holds every layer); leave it out",
    ),
    Rule(
        "stages",
        lambda p, m, g: (m.layers + last_cut(p, m.layers)) % (p.pp * p.vpp) != 0,
        lambda p, m, g: (
            f"--last-less {p.last_less}: {m.layers} + {p.last_less} is not a multiple of the {p.pp * p.vpp} "
            f"stages, so the others cannot hold the same number of layers; use --last-less "
            f"{(-m.layers) % (p.pp * p.vpp) or p.pp * p.vpp} (or that plus a multiple of {p.pp * p.vpp}), or leave it out"
        ),
    ),
    Rule(
        "stages",
        lambda p, m, g: stage_blocks(p, m.layers)[1] < 0,
        lambda p, m, g: (
            f"{m.layers} layers over {p.pp * p.vpp} stages, {stage_blocks(p, m.layers)[0]} on each of the others, "
            f"leaves the last stage {stage_blocks(p, m.layers)[1]} layers; "
            + ("use a smaller --last-less" if p.last_less else f"use fewer stages: pp in {divisors(m.layers)}")
        ),
    ),
    Rule(
        "stages",
        lambda p, m, g: _MULTI(p) & (last_cut(p, m.layers) > 0),
        lambda p, m, g: (
            f"pp*vpp = {p.pp * p.vpp} does not divide the {m.layers} layers, and uneven stages are modeled for "
            f"gpipe and 1f1b only; use --schedule 1f1b, or pp*vpp dividing {m.layers} "
            f"(pp*vpp in {divisors(m.layers)})"
        ),
    ),
    Rule(
        "batch",
        lambda p, m, g: p.gbs % (p.dp * p.mbs) != 0,
        lambda p, m, g: (
            f"global batch {p.gbs} is not a multiple of dp*mbs = {p.dp}*{p.mbs} = "
            f"{p.dp * p.mbs}; use a gbs that is a multiple of {p.dp * p.mbs}"
        ),
    ),
    Rule(
        "schedule",
        lambda p, m, g: (p.vpp > 1) & (not _MULTI(p)),
        lambda p, m, g: f"vpp={p.vpp} needs --schedule interleaved or interleaved-zb (virtual stages only exist there)",
    ),
    Rule(
        "schedule",
        lambda p, m, g: _VEE(p) & (p.vpp != 2),
        lambda p, m, g: f"--schedule {p.schedule} holds exactly 2 stages per rank (a V); leave --vpp out or use 2",
    ),
    Rule(
        "schedule",
        lambda p, m, g: _MULTI(p) & (p.pp == 1),
        lambda p, m, g: f"the {p.schedule} schedule needs pp > 1",
    ),
    Rule(
        "batch",
        lambda p, m, g: _LOOPED(p) & (p.grad_accum % p.pp != 0),
        lambda p, m, g: (
            f"{p.schedule} needs the micro-batch count ({p.grad_accum}) to be a multiple "
            f"of pp={p.pp}; raise gbs or lower mbs"
        ),
    ),
    # torch's ScheduleDualPipeV: "requires at least as many microbatches as stages"
    Rule(
        "batch",
        lambda p, m, g: (p.schedule == "dualpipev") & (p.grad_accum < 2 * p.pp),
        lambda p, m, g: (
            f"dualpipev needs at least as many micro-batches as stages: {p.grad_accum} < 2*pp = {2 * p.pp}; "
            "raise gbs or lower mbs"
        ),
    ),
    Rule(
        "hsdp",
        lambda p, m, g: p.dp % p.shard != 0,
        lambda p, m, g: (
            f"--dp-shard {p.dp_shard} must divide dp={p.dp} (the shard groups tile the data-parallel "
            f"ranks); try --dp-shard in {divisors(p.dp)}"
        ),
    ),
    Rule(
        "hsdp",
        lambda p, m, g: (p.shard < p.dp) & (p.zero < 2),
        lambda p, m, g: (
            f"--dp-shard {p.dp_shard} shards ZeRO-2/3 states (HSDP); with --zero {p.zero} nothing is sharded "
            "that way: add --zero 3 (or 2), or leave --dp-shard out"
        ),
    ),
    # torch's load balancer (head-tail) cuts the sequence into 2*cp chunks, two per rank
    # (_context_parallel/_load_balancer.py, _HeadTailLoadBalancer)
    Rule(
        "sequence",
        lambda p, m, g: (p.cp > 1) & (p.seq % (2 * p.cp) != 0),
        lambda p, m, g: (
            f"context parallel cuts the sequence into 2*cp = {2 * p.cp} load-balanced chunks: seq={p.seq} is not a "
            f"multiple of {2 * p.cp}; use --seq {(p.seq // (2 * p.cp) + 1) * 2 * p.cp} or a cp whose double divides it"
        ),
    ),
    Rule(
        "sequence",
        lambda p, m, g: (p.cp > 1) & (p.sp & ((p.seq // p.cp) % p.tp != 0)),
        lambda p, m, g: (
            f"sequence parallel splits each cp rank's {p.seq // p.cp} tokens over tp={p.tp}: make seq a multiple of "
            f"cp*tp = {p.cp * p.tp}"
        ),
    ),
    Rule(
        "sequence",
        lambda p, m, g: (p.cp > 1) & (p.attention == "math"),
        lambda p, m, g: (
            "context parallel runs SDPA's fused kernels ring by ring (torch's context_parallel takes flash, "
            "memory-efficient and cuDNN attention only); use --attention flash"
        ),
    ),
    *(Rule(*r) for r in experts.RULES),
    Rule("sequence", lambda p, m, g: p.sp & (p.tp == 1), lambda p, m, g: "sequence parallel (--sp) needs tp > 1"),
    Rule(
        "sequence",
        lambda p, m, g: p.sp & (p.seq % p.tp != 0),
        lambda p, m, g: f"sequence parallel splits the sequence over tp: seq={p.seq} must be a multiple of tp={p.tp}",
    ),
    Rule(
        "sequence",
        lambda p, m, g: (m.positions == "learned") & (p.seq > m.max_seq),
        lambda p, m, g: (
            f"seq={p.seq} exceeds {m.name}'s learned position table ({m.max_seq}); use --seq <= {m.max_seq}"
        ),
    ),
    Rule(
        "sequence",
        lambda p, m, g: (m.positions != "learned") & (p.seq > m.max_seq),
        lambda p, m, g: (
            f"seq={p.seq:,} exceeds {m.name}'s context ({m.max_seq:,} tokens); use --seq <= {m.max_seq}, "
            "or raise --max-seq to train past it (RoPE scaling)"
        ),
    ),
    Rule(
        "offload",
        lambda p, m, g: (p.offload == "optimizer") & (p.zero == 0),
        lambda p, m, g: "optimizer offload needs ZeRO >= 1 (the optimizer states must be sharded to offload them)",
    ),
    Rule(
        "offload",
        lambda p, m, g: (p.offload == "params") & (p.zero != 3),
        lambda p, m, g: "parameter offload needs ZeRO-3 (FSDP2's CPUOffloadPolicy shards and offloads parameters)",
    ),
)


# What PyTorch's own engines (and so `shardwise run`) cannot do, whatever the device: the search
# never recommends such a plan under the `torch` profile, `estimate` notes it, and the run tier
# refuses it with the same words. Model-level limits (MoE) stay estimate-only notes elsewhere.
ENGINE_RULES: tuple[Rule, ...] = (
    Rule(
        "engine",
        lambda p, m, g: p.offload == "optimizer",
        lambda p, m, g: (
            "optimizer-only offload has no PyTorch engine; use --offload params with --zero 3 "
            "(FSDP2 CPUOffloadPolicy) or leave offload out"
        ),
    ),
    Rule(
        "engine",
        lambda p, m, g: (p.offload == "params") & (p.dp == 1),
        lambda p, m, g: "--offload params runs through FSDP2, which shards over dp; it needs dp > 1",
    ),
    Rule(
        "engine",
        lambda p, m, g: p.optimizer == "adam8bit",
        lambda p, m, g: (
            "optimizer adam8bit needs bitsandbytes, which `shardwise run` does not use; use adamw "
            "(estimate and search still model adam8bit with --profile deepspeed or megatron)"
        ),
    ),
    # its factored statistics span whole rows and columns: on DTensor shards (FSDP2, TP) PyTorch's
    # Adafactor fails, and DDP + TP hands it local shards
    Rule(
        "engine",
        lambda p, m, g: (p.optimizer == "adafactor") & ((p.tp > 1) | ((p.zero >= 2) & (p.dp > 1))),
        lambda p, m, g: (
            "adafactor needs whole parameters: use it with dp (ZeRO 0/1) and pp, not with tp > 1 "
            "or ZeRO-2/3; or use adamw"
        ),
    ),
    # torch's zero-bubble schedules split each backward into an input pass and a weight pass (two
    # autograd.grad calls). Over dp (or cp) ranks only FSDP2 without resharding after forward
    # (ZeRO-2, HSDP too) trains as one process does. DDP's reducer never sees the weight pass:
    # PipelineStage.backward_maybe_with_nosync (pipelining/stage.py) arms it for the last chunk
    # only. Measured on tiny-llama, dp2 pp2, step-1 gradient norm against one process's 1.202:
    # zbv DDP 1.466, ZeRO-1 1.466, ZeRO-3 0.873, interleaved-zb ZeRO-3 0.880; ZeRO-2 1.202.
    Rule(
        "engine",
        lambda p, m, g: _ZB(p) & (p.pp > 1) & (p.zero != 2) & (p.dp * p.cp > 1),
        lambda p, m, g: (
            f"--schedule {p.schedule} splits the backward into input and weight passes, which PyTorch's "
            f"{'DDP' if p.zero <= 1 else 'FSDP2 resharding after forward'} (ZeRO {p.zero}) does not reduce "
            "correctly over dp; use --zero 2, or --schedule 1f1b/interleaved"
        ),
    ),
    # a V (zbv, dualpipev) puts both copies of a tied embedding on rank 0, where the embedding
    # group that sums the two copies' gradients (run/engine.py) would be a group of one rank
    Rule(
        "engine",
        lambda p, m, g: m.tied_embeddings & ((p.schedule == "zbv") | (p.schedule == "dualpipev")) & (p.pp > 1),
        lambda p, m, g: (
            f"{m.name} ties its embeddings, and --schedule {p.schedule} puts the first and the last stage on one "
            "rank, which `shardwise run` does not train; use --schedule interleaved-zb or interleaved"
        ),
    ),
    # DDP's DDP+TP path swaps each DTensor parameter for its local shard once per parameter name;
    # a tied output projection's alias of the embedding stays a DTensor
    Rule(
        "engine",
        lambda p, m, g: m.tied_embeddings & (p.tp > 1) & (p.dp > 1) & (p.zero <= 1) & (p.pp == 1),
        lambda p, m, g: (
            f"{m.name} ties its embeddings, which PyTorch's DDP + TP path cannot hold (dp > 1, "
            "tp > 1, ZeRO 0/1); use --zero 2 or 3 (FSDP2 handles it)"
        ),
    ),
)


def first_broken(rules, p: Plan, model) -> str | None:
    """The message of the first of `rules` a complete scalar plan breaks, or None."""
    for rule in rules:
        if rule.broken(p, model, p.world):
            return rule.message(p, model, p.world)
    return None


def engine_violation(p: Plan, model) -> str | None:
    """The first PyTorch-engine limit a complete scalar plan hits, or None."""
    return first_broken(ENGINE_RULES, p, model)


def cp_local(plan: Plan) -> Plan:
    """The plan as every rank of a context-parallel group runs all but attention: dp*cp
    data-parallel ranks (HSDP: dp_shard*cp shard groups), seq/cp tokens, gbs*cp sequences of them,
    cp = 1 (torchtitan's dp_shard_cp mesh: FSDP shards and gradients reduce over dp*cp). The
    identity for cp = 1. Array-safe (the search's plans)."""
    cp = plan.cp
    return plan.replace(
        dp=plan.dp * cp, dp_shard=plan.dp_shard * cp, seq=plan.seq // cp, gbs=plan.gbs * cp, cp=1 + 0 * cp
    )


def last_cut(p: Plan, layers):
    """Blocks the last pipeline stage holds fewer than the others: last_less, or (0) the remainder
    that lets the other stages hold the same number (126 layers over 16 stages: 2, so 15 x 8 + 6).
    Array-safe."""
    return p.last_less + (p.last_less == 0) * ((-layers) % (p.pp * p.vpp))


def stage_blocks(p: Plan, layers):
    """(blocks of every virtual stage but the last, blocks of the last). Array-safe; the first
    stage also holds the embeddings, the last the final norm, the output layer and the loss."""
    cut = last_cut(p, layers)
    n = (layers + cut) // (p.pp * p.vpp)
    return n, n - cut


def divisors(n: int) -> list[int]:
    """Every divisor of n, ascending, by trial division up to sqrt(n): the search asks for the
    divisors of batches of millions of sequences, which a scan up to n took seconds over."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _positive_int(name, v, allow_zero=False):
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        raise ShardwiseError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")


def recompute_kind(value: str) -> str:
    """The policy's name: "selective-layer:3" -> "selective-layer"."""
    return value.partition(":")[0] if isinstance(value, str) else value


def recompute_every(value: str) -> int:
    """k of "selective-layer:k" (LAYER_EVERY without one): the block of each model chunk at
    position j (from 0) is checkpointed when (j + 1) % k == 0. 1 for full (every block), 0 for
    the policies that checkpoint no whole block."""
    kind, _, k = value.partition(":")
    if kind == "full":
        return 1
    if kind != "selective-layer":
        return 0
    return int(k) if k else LAYER_EVERY


def check_recompute(value) -> None:
    kind, colon, k = value.partition(":") if isinstance(value, str) else (value, "", "")
    if kind not in RECOMPUTE:
        raise ShardwiseError(
            f"unknown recompute {value!r}; {closest(str(value), RECOMPUTE)} (one of {', '.join(RECOMPUTE)}, "
            "selective-layer:k)"
        )
    if colon and kind != "selective-layer":
        raise ShardwiseError(f"recompute {value!r}: only selective-layer takes :k (every k-th block); use {kind}")
    if colon and (not k.isdigit() or int(k) < 2 or len(k) > 6):
        raise ShardwiseError(
            f"recompute {value!r}: k must be an integer of at least 2 (selective-layer:2 checkpoints every "
            "second block; every block is --recompute full)"
        )


def _check_choices(p: Plan) -> None:
    check_recompute(p.recompute)
    for name, val, allowed in (
        ("schedule", p.schedule, SCHEDULES),
        ("precision", p.precision, PRECISIONS),
        ("optimizer", p.optimizer, OPTIMIZERS),
        ("offload", p.offload, OFFLOAD),
        ("attention", p.attention, ATTENTION),
        ("cp_rotate", p.cp_rotate, CP_ROTATE),
    ):
        if val not in allowed:
            raise ShardwiseError(f"unknown {name} {val!r}; {closest(str(val), allowed)} (one of {', '.join(allowed)})")
    if p.zero not in ZERO_STAGES:
        raise ShardwiseError(f"ZeRO stage must be 0, 1, 2 or 3, got {p.zero!r}")
    for name in ("sp", "compile"):
        if not isinstance(getattr(p, name), bool):
            raise ShardwiseError(f"{name} must be true or false, got {getattr(p, name)!r}")
