"""Step time: FLOPs, compute at an efficiency, communication left exposed, pipeline bubble.

FLOPs (a multiply-add is 2 FLOPs; attention counted over the full s x s, as Narayanan et al. 2021
and PaLM do). Per token, forward:
    2 * (matmul weights used per token: q/k/v/o, the MLP or top_k experts + router, the output
         projection; not the embedding lookup, norms or biases)
  + 4 * seq * q_dim * layers (scores Q.K^T and attention over V, 2*s*q_dim each)
Backward = 2x forward. Model FLOPs per step = 3 x forward x gbs x seq (no recompute): for GPT-3
this is Narayanan et al.'s 72*B*s*l*h^2*(1 + s/(6h) + V/(12*l*h)). Full recompute re-runs every
block's forward (not the output layer), giving their eq. (3), 96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h));
selective recompute re-runs the attention core, 4*seq*q_dim per token per layer.

Compute: the busiest pipeline stage (the last: layers/pp blocks plus the output projection), per
micro-batch on one GPU, each cost counted once:
- every matmul at the shape the plan gives it (layer_gemms: mbs*seq rows against the tp-local
  slice of each weight; the attention core batched over the rank's heads), at MATMUL_EFFICIENCY of
  peak(dtype of the precision) plus GEMM_FIXED_S per call (gemm_seconds): small per-GPU matmuls
  (a high tp, a short micro-batch) run well below the large ones' rate;
- the memory-bound work (norms, dropouts, residual adds, the MLP activation, with materialized
  attention the scores' softmax and dropout) at HBM bandwidth (layer_elementwise_bytes);
- backward = 2x forward; full recompute re-runs the blocks' forward, selective their attention core.
No end-to-end utilization is used as a rate: the exposed communication and the bubble are added
below, once. With efficiency= (`--efficiency`, `shardwise check`'s calibrated figure) every FLOP
runs at peak * efficiency instead, the memory-bound work folded into that measured rate.

The optimizer step is memory-bound: it reads and writes the parameters and states and reads the
gradients of the rank's shard once, at HBM bandwidth (AdamW fp32: 4+4+4 + 2*(4+4) = 28 bytes per
parameter).

Exposed communication (what the step waits for):
- tensor parallel: every TP collective sits between two matmuls that need it: all exposed; but
  Megatron's sequence-parallel re-gather of a block's input for the weight gradients, launched
  beside the input-gradient matmuls, hides behind that half of the backward.
- pipeline: torch's schedules wait for each batched send/recv before computing: all exposed.
- data parallel: an overlapped collective hides behind the compute it runs alongside, up to that
  compute's length, times GPU.overlap (1 in the catalog; measured by `shardwise calibrate`: on a
  CPU, gloo's threads take cycles from the math they run beside): gradient all-reduce /
  reduce-scatter once per step behind the last micro-batch's backward; per-micro-batch gathers
  behind the forwards (ZeRO-2); ZeRO-3's gathers and reduce-scatters behind the whole forward +
  backward. Not overlapped (ZeroRedundancyOptimizer's bucket broadcasts, the paper's post-step
  all-gather, the engine's loss all-reduce): all exposed.
- offload: PCIe traffic of the shard (gradients down, parameters up) at PCIE_GBPS, exposed; the
  CPU's own optimizer arithmetic is taken to run alongside the transfers.
Bubble: (p-1)/(v*m) x (the rank's pipelined work: compute, TP and p2p of all micro-batches), i.e.
the idle fraction bubble_fraction(p, m, v) of the step's pipelined part (pipeline.py); on a CPU
with more ranks than cores, what of it the idle stages' cores cannot fill (exposed_bubble).
Host overhead: the engines' time beyond FLOPs and collectives, per block and micro-batch (pipelined)
and per step (GPU.host_us, measured by `shardwise calibrate`, combined in host.py: on a CPU, Python,
the dispatcher and DTensor dominate tiny models; 0 for catalog GPUs).
step = compute (forward + backward + recompute + overhead + optimizer) + exposed communication + bubble.
"""

from __future__ import annotations

from shardwise.errors import ShardwiseError
from shardwise.estimate import context
from shardwise.estimate._num import maximum, minimum, where
from shardwise.estimate.comm import rank0_param_numel
from shardwise.estimate.host import host_seconds
from shardwise.estimate.pipeline import bubble_fraction, bubble_over_ideal, rank_blocks, vee
from shardwise.estimate.profiles import TORCH
from shardwise.spec import limits
from shardwise.spec.breakdown import Time
from shardwise.spec.fp8 import FP8_PRECISIONS, is_fp8
from shardwise.spec.moe import attention_shapes
from shardwise.spec.plan import recompute_every, recompute_kind

# The matmul model (layer_gemms, gemm_seconds). MATMUL_EFFICIENCY is fitted by
# benchmarks/fit_time_model.py on Korthikanti et al. 2022's Table 5 (8 measured iteration times,
# Megatron-LM on A100-80GB) and held against Narayanan et al. 2021's Table 1 (10 runs), which it
# was not fitted on (`shardwise validate`). GEMM_FIXED_S is taken, not fitted: a kernel launch and
# its ramp, the order of the ~10 us a small CUDA kernel costs end to end.
MATMUL_EFFICIENCY = 0.73  # of dense peak, what a large matmul reaches
GEMM_FIXED_S = 10e-6  # per matmul call
# Passes over the elements of each memory-bound op in a forward (read + write = 2): layernorm and
# RMSNorm read and write; dropout also writes its 1-byte mask (half an element of 2 bytes); a
# residual add reads two and writes one; softmax (fused scale, mask, softmax) reads and writes;
# GELU reads and writes; SwiGLU's silu reads and writes, then the product reads two and writes one.
ELEMENTWISE_PASSES = {"norm": 2, "dropout": 2.5, "residual_add": 3, "softmax": 2, "gelu": 2, "swiglu": 5}
# Under torch.compile (Plan.compile) inductor fuses each chain of pointwise ops into one kernel
# that reads its inputs and writes its outputs once. Per block: the first norm reads x and writes
# its output (2); the residual add and the second norm run as one kernel, reading x and the
# attention's output and writing h and the norm's output (4, eager 3 + 2); the last residual add
# stays 3 (the next block's norm is another graph). Dropout fuses into the add after it and only
# writes its 1-byte mask (0.5, eager 2.5); SwiGLU's silu and product are one kernel, reading w1's
# and w3's outputs and writing the product (3, eager 5); GELU and softmax are one kernel already.
# The backward keeps its 2x of the forward (the module docstring), so it gains in proportion.
COMPILED_RESIDUAL_PASSES = 2 + 4 + 3  # eager: 2 * norm + 2 * residual_add = 10
COMPILED_PASSES = ELEMENTWISE_PASSES | {"dropout": 0.5, "swiglu": 3}
# fp8-*: the rate of everything but the blocks' linear matmuls, which run at the GPU's fp8 peak
# (linear_peak; the attention core and the output layer stay bf16, spec/fp8.py)
PEAK_DTYPE = {"fp32": "fp32", "bf16-mixed": "bf16", "bf16": "bf16", "fp16-mixed": "fp16"}
PEAK_DTYPE.update(dict.fromkeys(FP8_PRECISIONS, "bf16"))
PCIE_GBPS = 31.5  # PCIe 4.0 x16 per direction (16 GT/s x 16 lanes x 128/130 / 8), the host link offload uses
STATES = {"adamw": 2, "sgd": 1, "adafactor": 0, "adam8bit": 2}  # full-size optimizer states per parameter
SECONDS_PER_DAY = 86400.0


# ---- FLOPs ------------------------------------------------------------------------------------
def matmul_weights(model) -> dict:
    """Matmul weights one token passes through: per layer (attention, MLP incl. router) and the
    output projection. MoE: top_k routed experts + shared experts."""
    h = model.hidden
    attn = h * model.q_dim + 2 * h * model.kv_dim + model.q_dim * h
    if model.is_mla:  # latent attention: its own down- and up-projections (spec/moe.attention_shapes)
        attn = sum(a * b for _, (a, b) in ((n, s) for n, s in attention_shapes(model) if len(s) == 2))
    mats = 3 if model.ffn_kind == "swiglu" else 2
    if model.is_moe:
        mlp = (
            model.top_k * mats * h * model.expert_ffn_hidden
            + model.shared_experts * mats * h * model.shared_ffn_hidden
            + h * model.experts
        )
    else:
        mlp = mats * h * model.ffn_hidden
    return {"attention": attn, "mlp": mlp, "layer": attn + mlp, "head": model.vocab * h}


def attention_core_flops_per_token(model, seq):
    """Q.K^T and attention over V, one layer, one token: 2*seq*q_dim each."""
    return 4 * seq * model.q_dim


def layer_forward_flops_per_token(model, seq):
    return 2 * matmul_weights(model)["layer"] + attention_core_flops_per_token(model, seq)


def forward_flops_per_token(model, seq):
    return model.layers * layer_forward_flops_per_token(model, seq) + 2 * matmul_weights(model)["head"]


def model_flops_per_token(model, seq):
    """Forward + backward, no recompute: the FLOPs MFU counts."""
    return 3 * forward_flops_per_token(model, seq)


def layer_recompute_flops_per_token(model, seq, recompute: str, attention: str = "flash"):
    """Full: the block's whole forward again. Selective: its attention core again. Selective-op
    (run/recompute.py) keeps every matmul's and the flash kernel's outputs: only the math
    kernel's batched matmuls (its attention core) run again; pointwise work is not counted."""
    if recompute == "full":
        return layer_forward_flops_per_token(model, seq)
    if recompute_kind(recompute) == "selective-layer":
        # every k-th block's whole forward: per block on average (exact where k divides a stage's blocks)
        return layer_forward_flops_per_token(model, seq) / recompute_every(recompute)
    if recompute == "selective" or (recompute == "selective-op" and attention == "math"):
        return attention_core_flops_per_token(model, seq)
    return 0 * seq


# ---- compute at the shapes the plan gives each GPU --------------------------------------------
def layer_gemms(model, plan, keys=None) -> dict:
    """The matmuls of one block's forward for one micro-batch on one GPU, by what they compute:
    name -> (FLOPs of one call, calls). A token batch of M = mbs * seq rows meets each weight's
    tp-local slice (Megatron's column- and row-parallel split: qkv and the MLP's first matrices
    by output columns, the output projections by input rows); the attention core is one batched
    matmul over the rank's heads (2 * mbs * heads/tp * seq^2 * head_dim each for Q.K^T and for
    attention over V). MoE: each active expert's matmuls see top_k/experts of the tokens (times ep:
    under expert parallelism its rank gathers them from the ep ranks of its group)."""
    h, t = model.hidden, plan.tp
    M = plan.mbs * plan.seq
    mats = 3 if model.ffn_kind == "swiglu" else 2
    # keys each query meets: the sequence; under context parallel (a local plan of seq/cp tokens)
    # all cp ranks' keys, seq/cp * cp
    keys = plan.seq if keys is None else keys
    core = 2 * plan.mbs * plan.seq * keys * model.q_dim / t
    out = {
        "qkv": (2 * M * h * (model.q_dim + 2 * model.kv_dim) / t, 1),
        "attention_core": (core, 2),
        "attention_out": (2 * M * model.q_dim * h / t, 1),
    }
    if model.is_moe:
        # with ep > 1 a rank runs experts / ep experts, each on the rows of ep ranks' tokens
        routed = M * model.top_k * plan.ep / model.experts
        out["experts"] = (2 * routed * h * model.expert_ffn_hidden / t, mats * model.experts // plan.ep)
        if model.shared_experts:
            out["shared_experts"] = (2 * M * h * model.shared_ffn_hidden / t, mats * model.shared_experts)
        out["router"] = (2 * M * h * model.experts, 1)
    else:
        out["mlp"] = (2 * M * h * model.ffn_hidden / t, mats)
    return out


def gemm_seconds(flops, calls, rate, fixed_s):
    """calls matmuls of `flops` each: at `rate` FLOP/s plus a fixed time per call (the kernel's
    launch and its last, partly filled wave of tiles), so a small matmul runs well below the rate:
    its efficiency is flops / (flops + rate * fixed_s) of the rate's."""
    return calls * (flops / rate + fixed_s)


def layer_elementwise_bytes(model, plan, attention: str, b16: int) -> dict:
    """HBM bytes the memory-bound work of one block's forward moves for one micro-batch on one GPU
    (each element read and written once per pass, ELEMENTWISE_PASSES): the residual stream's norms,
    dropouts and residual adds (on seq/tp of the tokens under sequence parallel, all of them
    otherwise), the MLP activation, and with materialized attention the scores' softmax and
    dropout; fused (flash) attention keeps the scores on chip. Compiled blocks: COMPILED_PASSES."""
    R = plan.mbs * plan.seq * model.hidden
    R = R / plan.tp if plan.sp else R
    drop = model.dropout > 0
    compiled = bool(getattr(plan, "compile", False))
    p = COMPILED_PASSES if compiled else ELEMENTWISE_PASSES
    stream = COMPILED_RESIDUAL_PASSES if compiled else 2 * p["norm"] + 2 * p["residual_add"]
    resid = stream + (2 * p["dropout"] if drop else 0)
    ffn = model.expert_ffn_hidden * model.top_k if model.is_moe else model.ffn_hidden
    mlp = p["swiglu" if model.ffn_kind == "swiglu" else "gelu"] * plan.mbs * plan.seq * ffn / plan.tp
    scores = plan.mbs * model.heads / plan.tp * plan.seq * plan.seq
    core = (p["softmax"] + (p["dropout"] if drop else 0)) * scores if attention == "math" else 0 * scores
    return {"block": b16 * (resid * R + mlp), "attention_core": b16 * core}


def optimizer_bytes_per_param(precision: str, optimizer: str) -> int:
    """HBM traffic of one optimizer step per parameter: read param and grad, write param, read and
    write each full-size state. Pure bf16 keeps everything in 2 bytes; 8-bit Adam its states in 1."""
    p = 2 if precision == "bf16" else 4
    state = 1 if optimizer == "adam8bit" else p
    return 3 * p + 2 * STATES[optimizer] * state


# ---- the step -----------------------------------------------------------------------------------
def step_time(model, cluster, plan, comm, *, efficiency=None, tokens: float = 0.0, price=None) -> Time:
    eff = 1.0 if efficiency is None else efficiency
    if not (isinstance(eff, (int, float)) and 0 < eff <= 1):
        raise ShardwiseError(f"efficiency must be a fraction of peak in (0, 1], got {efficiency!r}")
    if not tokens >= 0:
        raise ShardwiseError(f"the token budget must be >= 0, got {tokens!r}")
    limits.check_amount("the token budget", tokens, limits.TOKENS)
    if price is not None and not price >= 0:
        raise ShardwiseError(f"price must be >= 0 USD per GPU-hour, got {price!r}")
    if price is not None:
        limits.check_amount("the price per GPU-hour", price, limits.PRICE)
    gpu = cluster.gpu
    peak = gpu.peak_flops(PEAK_DTYPE[plan.precision])
    rate = peak * eff
    # context parallel: each cp rank runs its local plan's seq/cp tokens; attention meets all the keys
    full, keys, plan = plan, plan.seq, context.local_plan(plan)
    m, seq = plan.grad_accum, plan.seq
    mb_tokens = plan.mbs * seq

    # busiest stage, per GPU, per micro-batch
    w = matmul_weights(model)
    # the busiest stage: the first (the most blocks; its embedding lookup is no matmul) or the last
    # (its blocks + the output projection), at the plan's split
    first, last = rank_blocks(model, plan, False), rank_blocks(model, plan, True)
    if efficiency is None:  # each matmul at its shape, the memory-bound work at HBM bandwidth
        layer_s, rc_s, head_s, core_s = _shaped_block(model, gpu, plan, peak, keys)
        eff = None
    else:  # one rate for every FLOP (a measured efficiency: `shardwise check`, --efficiency)
        lf = layer_forward_flops_per_token(model, keys)
        lr = layer_recompute_flops_per_token(model, keys, plan.recompute, plan.attention)
        layer_s, rc_s = lf * mb_tokens / plan.tp / rate, lr * mb_tokens / plan.tp / rate
        core_s = attention_core_flops_per_token(model, keys) * mb_tokens / plan.tp / rate
        if is_fp8(plan.precision):  # the linears' FLOPs at the fp8 rate, the core's at bf16
            core = attention_core_flops_per_token(model, keys) * mb_tokens / plan.tp
            linear_s = (lf * mb_tokens / plan.tp - core) / (linear_peak(gpu, plan.precision) * eff)
            layer_s = linear_s + core / rate
            rc_s = layer_s if plan.recompute == "full" else rc_s
        head_s = 2 * w["head"] * mb_tokens / plan.tp / rate
    # a V (zbv, dualpipev) puts the output layer on rank 0, beside the first stage
    head_first = 1 if vee(plan) else 0
    first_s = first * (layer_s + rc_s) + head_first * head_s
    first_busier = where(first_s > last * (layer_s + rc_s) + (1 - head_first) * head_s, 1, 0)
    blocks = where(first_busier, first, last)
    t_f = blocks * layer_s + where(first_busier, head_first, 1 - head_first) * head_s
    t_r = blocks * rc_s
    t_b = 2 * t_f
    forward_s, backward_s, recompute_s = m * t_f, m * t_b, m * t_r
    # the engines' host time (0 on catalog GPUs): blocks and micro-batches are pipelined work
    overhead_s, host_step_s = host_seconds(gpu, plan, blocks)

    shard = rank0_param_numel(model, plan)
    if plan.zero >= 1:
        shard = shard / where(plan.zero >= 2, plan.shard, plan.dp)
    opt_bytes = shard * optimizer_bytes_per_param(plan.precision, plan.optimizer)
    offload_s = 0.0 * m
    if plan.offload == "none":
        optimizer_s = opt_bytes / (gpu.hbm_gbps * 1e9)
    else:
        optimizer_s = 0.0 * m
        offload_s = _offload_bytes(plan, comm, shard) / (PCIE_GBPS * 1e9)

    # one pass over the step's collectives, by where their time goes
    t = {"tp": 0.0, "tp_hidden": 0.0, "pp": 0.0, "other": 0.0, "dp": 0.0, "dp_exposed": 0.0, "dp_gather": 0.0}
    t["dp_reduce"] = 0.0
    # the cp exchange hides behind the attention it runs beside (context.hiding): the forward's, the
    # backward's (2x), recompute's where it reruns attention, of every block of all micro-batches
    t["cp"], t["cp_exposed"] = 0.0, 0.0
    attention_s = {"forward": m * blocks * core_s, "backward": 2 * m * blocks * core_s}
    for c in comm:
        if c.group == "cp":
            beside = attention_s["forward" if "forward" in c.what else "backward"] * context.hiding(full, c)
            t["cp"] = t["cp"] + c.seconds
            t["cp_exposed"] = t["cp_exposed"] + _excess(c.seconds, beside, gpu.overlap)
            continue
        if c.kind in ("send", "recv"):
            key = "pp"
        elif c.group == "tp" and c.overlapped:
            key = "tp_hidden"  # beside the backward's input-gradient matmuls
        elif c.group in ("tp", "dp"):
            key = c.group
        elif c.group in ("dp_shard", "dp_replicate"):  # HSDP's two data-parallel groups
            key = "dp"
        else:
            key = "other"  # the engine's world and tied-embedding all-reduces, after the pipeline
        t[key] = t[key] + c.seconds
        if key == "dp":
            sub = "dp_exposed" if not c.overlapped else "dp_gather" if c.kind == "all-gather" else "dp_reduce"
            t[sub] = t[sub] + c.seconds
    f = gpu.overlap
    # an overlapped tp collective hides behind the input-gradient half of the backward
    tp_s = t["tp"] + _excess(t["tp_hidden"], backward_s / 2, f)
    pp_s, other_s, dp_s = t["pp"], t["other"], t["dp"]
    if plan.zero == 3:
        dp_exposed = t["dp_exposed"] + _excess(t["dp_gather"] + t["dp_reduce"], forward_s + backward_s + recompute_s, f)
    else:
        gathers_behind = where(plan.pp > 1, t_f, forward_s)  # ZeRO-2 under a pipeline gathers once
        dp_exposed = (
            t["dp_exposed"] + _excess(t["dp_gather"], gathers_behind, f) + _excess(t["dp_reduce"], t_b + t_r, f)
        )

    compute_s = forward_s + backward_s + recompute_s + overhead_s + host_step_s + optimizer_s
    pipelined = forward_s + backward_s + recompute_s + overhead_s + tp_s + pp_s + t["cp_exposed"]
    bubble_s = exposed_bubble(gpu, bubble_over_ideal(plan.pp, m, plan.vpp, plan.schedule)) * pipelined
    comm_exposed_s = tp_s + pp_s + dp_exposed + other_s + offload_s + t["cp_exposed"]
    step_s = compute_s + comm_exposed_s + bubble_s

    tokens_step = plan.gbs * seq
    flops = model_flops_per_token(model, keys) * tokens_step
    hw_flops = (
        flops
        + model.layers * layer_recompute_flops_per_token(model, keys, plan.recompute, plan.attention) * tokens_step
    )
    if eff is None:  # what the matmuls and the memory-bound work reached together, of peak
        eff = hw_flops / plan.world / (forward_s + backward_s + recompute_s) / peak
    out = Time(
        compute_s=compute_s,
        comm_exposed_s=comm_exposed_s,
        bubble_s=bubble_s,
        step_s=step_s,
        tokens_per_s=tokens_step / step_s,
        # FP8: against the fp8 peak the linears (nearly all the FLOPs) run at, so MFU stays a fraction
        # of what the GPU can do (torchtitan divides by the bf16 peak and so can pass 100%)
        mfu=flops / (step_s * plan.world * linear_peak(gpu, plan.precision)),
        flops_per_step=flops,
        detail={
            "forward_s": forward_s,
            "backward_s": backward_s,
            "recompute_s": recompute_s,
            "overhead_s": overhead_s + host_step_s,
            "optimizer_s": optimizer_s,
            "offload_s": offload_s,
            "tp_comm_s": tp_s,
            "pp_comm_s": pp_s,
            "dp_comm_s": dp_s,
            "dp_exposed_s": dp_exposed,
            "other_comm_s": other_s,
            "cp_comm_s": t["cp"],
            "cp_exposed_s": t["cp_exposed"],
            "bubble_fraction": bubble_fraction(plan.pp, m, plan.vpp, plan.schedule),
            "efficiency": eff,
            "peak_tflops": peak / 1e12,
            "hardware_flops_per_step": hw_flops,
        },
    )
    if tokens > 0:
        train_s = tokens / tokens_step * step_s
        out.train_tokens = tokens
        out.train_days = train_s / SECONDS_PER_DAY
        out.gpu_hours = train_s / 3600 * plan.world
        out.cost_usd = out.gpu_hours * (gpu.price_per_hour if price is None else price)
    return out


def linear_peak(gpu, precision: str) -> float:
    """Peak FLOP/s of the blocks' linear matmuls: the fp8 tensor cores' under FP8 training
    (torchao's Float8Linear runs torch._scaled_mm), else the precision's."""
    return gpu.peak_flops("fp8" if is_fp8(precision) else PEAK_DTYPE[precision])


def _shaped_block(model, gpu, plan, peak, keys=None):
    """Seconds of one block's forward, of its recompute and of the output projection, per
    micro-batch, on one GPU: every matmul at its shape (gemm_seconds at MATMUL_EFFICIENCY of peak plus GEMM_FIXED_S), the
    memory-bound work at HBM bandwidth; the backward is twice the forward (time.py's module
    docstring)."""
    rate = peak * MATMUL_EFFICIENCY
    g = layer_gemms(model, plan, keys)
    linear_rate = linear_peak(gpu, plan.precision) * MATMUL_EFFICIENCY
    gemm = {
        k: gemm_seconds(f, n, rate if k == "attention_core" else linear_rate, GEMM_FIXED_S) for k, (f, n) in g.items()
    }
    b16 = 4 if plan.precision == "fp32" else 2
    moved = layer_elementwise_bytes(model, plan, plan.attention, b16)
    hbm = gpu.hbm_gbps * 1e9
    core_s = gemm["attention_core"] + moved["attention_core"] / hbm
    layer_s = sum(gemm.values()) + (moved["block"] + moved["attention_core"]) / hbm
    head_f = 2 * plan.mbs * plan.seq * model.hidden * model.vocab / plan.tp
    head_s = gemm_seconds(head_f, 1, rate, GEMM_FIXED_S)
    # what is rerun, as layer_recompute_flops_per_token counts it: selective-op reruns only the
    # math kernel's attention core (it keeps every matmul's and the flash kernel's outputs)
    core_again = plan.recompute == "selective" or (plan.recompute == "selective-op" and plan.attention == "math")
    rc = layer_s if plan.recompute == "full" else (core_s if core_again else 0.0)
    if recompute_kind(plan.recompute) == "selective-layer":
        rc = layer_s / recompute_every(plan.recompute)
    return layer_s, rc, head_s, core_s


def exposed_bubble(gpu, over_ideal):
    """The bubble, as a fraction of the pipelined work, that lengthens the step: all of it
    (over_ideal) with a device per rank. On a CPU with s = ranks per core > 1 the pipelined work
    was timed with every rank busy, each on 1/s of a core; an idle stage's cores go to the busy
    ranks, so the step is the longer of the cores' total work (1, the pipelined work itself) and
    the schedule's critical path with a whole core per rank, s times faster: (1 + over_ideal) / s.
    max(1, (1 + over_ideal) / s) - 1: 4 ranks on 2 cores, pp 2 with 2 micro-batches (over_ideal
    1/2): 0, the bubble is filled (charged at a speed-up instead, 4-rank pipelines on 2 cores
    came out 10-27% over measured)."""
    s = maximum(gpu.oversubscription, 1.0)
    return maximum((1 + over_ideal) / s, 1.0) - 1.0


def _excess(comm_s, budget, overlap=1.0):
    """What of an overlapped collective's time is exposed: all but the `overlap` fraction of the part
    that runs alongside compute (min(comm, budget)); overlap 1: what sticks out past the compute."""
    return comm_s - overlap * minimum(comm_s, budget)


def _offload_bytes(plan, comm, shard):
    """PCIe bytes per step. optimizer: the fp32 gradient shard down, the updated parameter shard
    up. params (FSDP2 CPUOffloadPolicy): the parameter shard up before every all-gather (in its
    stored dtype) and each reduced gradient shard down. In the torch profile's dtypes whatever
    the profile (step_time is not given one)."""
    dt = TORCH.dtypes(plan)
    if plan.offload == "optimizer":
        return shard * (4 + dt["P"])
    up = down = 0.0 * plan.dp
    for c in comm:
        if c.group not in ("dp", "dp_shard"):
            continue
        if c.kind == "all-gather":
            up = up + c.count * c.bytes / c.ranks / dt["gather"] * dt["P"]
        elif c.kind == "reduce-scatter":
            down = down + c.count * c.bytes / c.ranks
    return up + down
