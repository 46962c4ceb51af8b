"""Apply a Plan to the reference model with PyTorch's own engines (torchtitan's order).

    split_pipeline  (pp > 1)   torch.distributed.pipelining: each rank keeps its stages' modules
    apply_tp        (tp > 1)   DTensor parallelize_module, Megatron layout, + sequence parallel
    apply_recompute            torch.utils.checkpoint, whole block or the attention core
    apply_compile   (compile)  torch.compile of each block (run/inductor.py)
    apply_fsdp      (zero 2/3) FSDP2 fully_shard per block, then the root
    materialize                to_empty + per-parameter seeded init (same weights under any plan)
    apply_ddp       (zero 0/1) DistributedDataParallel over the dp group

All but DDP run on the meta device, so a 70B model is split before a byte is allocated.
This file follows the engine contract that the estimate tier's `torch` profile models; the
deviations PyTorch forces are written where they happen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh

from shardwise.errors import ShardwiseError
from shardwise.run import fp8, inductor
from shardwise.run.dist import fsdp_mesh
from shardwise.run.model import Transformer
from shardwise.spec.fp8 import is_fp8
from shardwise.spec.plan import V_SHAPE, Plan, engine_violation, recompute_every, recompute_kind, stage_blocks


@dataclass(frozen=True)
class Precision:
    """What a Plan's precision means for the engines (contract item 6)."""

    param_dtype: torch.dtype  # the stored parameters (and optimizer states)
    autocast_dtype: torch.dtype | None  # DDP / ZeRO-1 / TP / PP-only mixed precision
    fsdp_param_dtype: torch.dtype | None  # FSDP2 MixedPrecisionPolicy(param_dtype=...)
    grad_scaler: bool  # fp16: loss scaling


def uses_fsdp(plan: Plan) -> bool:
    """ZeRO-2/3 need someone to shard with; at dp = 1 every stage is plain training."""
    return plan.zero >= 2 and plan.dp > 1


def precision(plan: Plan) -> Precision:
    fsdp = uses_fsdp(plan)
    if plan.precision == "fp32":
        return Precision(torch.float32, None, None, False)
    if plan.precision == "bf16":
        return Precision(torch.bfloat16, None, None, False)
    low = torch.float16 if plan.precision == "fp16-mixed" else torch.bfloat16  # fp8-*: over bf16-mixed
    # FSDP2: the fp32 shard is the master copy, all-gathered in low precision; others: autocast
    return Precision(torch.float32, None if fsdp else low, low if fsdp else None, plan.precision == "fp16-mixed")


def check_supported(spec, plan: Plan, device: torch.device | None) -> None:
    """What the plan asks that the run tier cannot do here, one line each. device None: the plan's
    GPU, checked by the caller (the trace tier; run/fp8.check_fp8)."""
    why = engine_violation(plan, spec)  # the limits every device shares: one list, in spec/plan.py
    if why:
        raise ShardwiseError(why)
    if plan.offload == "params" and device is not None and device.type != "cuda":
        raise ShardwiseError("--offload params moves parameters from the GPU to the CPU; it needs a CUDA device")
    if plan.precision == "fp16-mixed" and device is not None and device.type != "cuda":
        raise ShardwiseError("fp16-mixed needs a CUDA device (gradient scaling); on CPU use fp32 or bf16-mixed")
    fp8.check_fp8(spec, plan, device)
    inductor.check_compile(plan, device)


# ---- pipeline split -----------------------------------------------------------------------
def stage_ids(plan: Plan, pp_rank: int) -> list[int]:
    """Stages this pipeline rank runs: r (GPipe, 1F1B), r, r+pp, r+2pp, ... (the looped
    schedules), or r and 2pp-1-r (the V: torch's generate_stage_to_rank_mapping(style="v"))."""
    if plan.schedule in V_SHAPE:
        return [pp_rank, 2 * plan.pp - 1 - pp_rank]
    return [pp_rank + k * plan.pp for k in range(plan.vpp)]


def split_pipeline(model: Transformer, plan: Plan, pp_rank: int) -> list[tuple[int, Transformer]]:
    """This rank's stage modules (deep copies of the meta model with the rest removed).
    Layers are split in order over pp*vpp stages as the plan says (stage_blocks: the same number
    on each, the last stage maybe fewer); the first stage also holds the embeddings, the last the
    final norm and the output projection. Names stay global."""
    n_stages = plan.pp * plan.vpp
    per, _ = stage_blocks(plan, model.spec.layers)
    out = []
    for s in stage_ids(plan, pp_rank):
        with unset_fake_temporarily():  # a meta copy, even under the trace tier's fake tensors (run/model.build)
            m = copy.deepcopy(model)
        for name in list(m.layers.keys()):
            if not s * per <= int(name) < (s + 1) * per:
                del m.layers[name]
        if s != 0:
            m.tok_embeddings = m.pos_embeddings = None
        if s != n_stages - 1:
            m.norm = m.output = None
        # tied embeddings: the last stage keeps output.weight as its own copy of the embedding;
        # Engine all-reduces the two copies' gradients (Megatron's embedding group)
        out.append((s, m))
    return out


# ---- tensor parallel --------------------------------------------------------------------------
def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sp: bool) -> None:
    """Megatron's layout on DTensor (contract item 7): q/k/v/w1/w3 column-parallel, wo/w2
    row-parallel, so each block needs one all-reduce forward and one backward per sub-layer.
    The token embedding is vocab-parallel, the output projection column-parallel with the full
    logits gathered on every tp rank. With sp, norms and the residual stream are sharded on the
    sequence dim (torchtitan's llama layout) and the all-reduces become all-gather + reduce-scatter.

    The attention and the FFN each take their input as ONE DTensor (PrepareModuleInput, as in
    torchtitan): the Partial input gradients of q/k/v (w1/w3) are summed as DTensors and reduced
    once, Megatron's g operator. Left to ColwiseParallel, each projection would wrap the plain
    input itself and all-reduce its own gradient: 3 + 2 reductions a SwiGLU block, not 2."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    seq = Shard(1)
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq if sp else Replicate())
    if model.pos_embeddings is not None:
        # positions [s] -> [s, h]: sharded on its dim 0 (the sequence) to add to the sharded tokens
        top["pos_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(0) if sp else Replicate()
        )
    if model.norm is not None and sp:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(
            input_layouts=seq if sp else Replicate(), output_layouts=Replicate(), use_local_output=True
        )
    if top:
        parallelize_module(model, tp_mesh, top)
    model.tie_weights()  # output.weight = the (now vocab-sharded) embedding; both are Shard(0)

    for block in model.layers.values():
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq if sp else Replicate()),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq if sp else Replicate()),
        }
        if block.feed_forward.swiglu:
            plan["feed_forward.w3"] = ColwiseParallel()
        # the sub-layer's input (the norm's output): sequence shards under sp, else the replicated
        # activation; gathered (sp) into one Replicate DTensor that every projection shares
        inp = PrepareModuleInput(
            input_layouts=(seq if sp else Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False
        )
        plan |= {"attention": inp, "feed_forward": inp}
        if sp:
            plan |= {"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()}
        parallelize_module(block, tp_mesh, plan)


# ---- activation recompute ---------------------------------------------------------------------
def apply_recompute(model: Transformer, mode: str) -> None:
    """full: checkpoint each block (keeps its input only). selective: checkpoint the attention
    core (Korthikanti et al. 2022: the s*s scores, softmax, dropout and attention over V).
    selective-op: each block under a per-op policy (run/recompute.py: matmul and attention
    outputs kept, the rest recomputed). selective-layer[:k]: checkpoint every k-th block of the
    chunk, at positions k-1, 2k-1, ... (torchtitan's per-layer AC, _apply_ac_to_transformer_block,
    counts blocks the same way); the others keep everything."""
    kind, every = recompute_kind(mode), recompute_every(mode)
    for j, block in enumerate(model.layers.values()):
        if kind == "selective-layer":
            block.recompute = "full" if (j + 1) % every == 0 else "none"
        else:
            block.recompute = mode if mode in ("full", "selective-op") else "none"
        block.attention.recompute_core = mode == "selective"


# ---- data parallel ----------------------------------------------------------------------------
def apply_attention(model: Transformer, kernel: str) -> None:
    """Every block's SDPA kernel: "flash" leaves SDPA its own choice (fused where the device has
    one), "math" forces the kernel that materializes the scores."""
    for block in model.layers.values():
        block.attention.kernel = kernel


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, plan: Plan, prec: Precision) -> None:
    """ZeRO-2 = fully_shard(reshard_after_forward=False), ZeRO-3 = fully_shard: per block, then
    the root (embeddings, final norm, output). Shards are dim-0, padded to a multiple of dp (of
    dp_shard under HSDP, where dp_mesh is 2-D and FSDP2 all-reduces across its replicate dim)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=prec.fsdp_param_dtype, reduce_dtype=torch.float32)
        if prec.fsdp_param_dtype is not None
        else MixedPrecisionPolicy()
    )
    kw = dict(
        mesh=dp_mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if plan.offload == "params" else OffloadPolicy()
    )
    reshard = plan.zero == 3
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=reshard, **kw)
    fully_shard(model, reshard_after_forward=reshard, **kw)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, tp: int) -> nn.Module:
    """DistributedDataParallel over the dp group, default 25 MiB buckets, gradients as bucket views.
    With tp > 1 DDP is given the dp sub-mesh instead of its group: that is PyTorch's DDP + TP
    path (it swaps DTensor parameters for their local shards, so DDP all-reduces plain tensors).
    The module's parameters are then those local shards, each carrying its DTensor spec."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if tp > 1:
        return DDP(model, device_mesh=dp_mesh, gradient_as_bucket_view=True)
    return DDP(model, process_group=dp_mesh.get_group(), gradient_as_bucket_view=True)


# ---- the whole thing --------------------------------------------------------------------------
def materialize(model: Transformer, device: torch.device, seed: int) -> None:
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)


def parallelize(
    model: Transformer, plan: Plan, mesh: DeviceMesh | None, *, device: torch.device, seed: int
) -> nn.Module:
    """A meta-device model (or pipeline stage) in, the trainable module for this rank out:
    TP, recompute, FSDP on meta; then materialized and initialized; then DDP."""
    prec = precision(plan)
    if prec.param_dtype != torch.float32:
        model.to(prec.param_dtype)
    model.autocast_dtype = prec.autocast_dtype
    if is_fp8(plan.precision):
        fp8.convert(model, plan)
    if plan.tp > 1:
        apply_tp(model, mesh["tp"], plan.sp)
    apply_recompute(model, plan.recompute)
    apply_attention(model, plan.attention)
    if plan.compile:
        inductor.apply_compile(model)
    if uses_fsdp(plan):
        apply_fsdp(model, fsdp_mesh(mesh, plan), plan, prec)
    materialize(model, device, seed)
    if plan.dp > 1 and plan.zero <= 1:
        return apply_ddp(model, mesh["dp"], plan.tp)
    return model
