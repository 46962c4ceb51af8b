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

Compute: the busiest pipeline stage (the last: layers/pp blocks plus the output projection), its
FLOPs split over tp, at peak(dtype of the precision) * efficiency. DEFAULT_EFFICIENCY = 0.5: the
fraction of dense peak that large training matmuls sustain end to end, Narayanan et al.'s GPT-3
175B run reached 163 of 312 TFLOP/s per A100 (52%, their Table 1) including its own bubble and
communication; override with efficiency=.

The optimizer step is memory-bound: it reads and writes the parameters and states and reads the
gradients of the rank's shard once, at HBM bandwidth (AdamW fp32: 4+4+4 + 2*(4+4) = 28 bytes per
parameter).

Exposed communication (what the step waits for):
- tensor parallel: every TP collective sits between two matmuls that need it: all exposed.
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
from shardwise.estimate._num import maximum, minimum, where
from shardwise.estimate.comm import rank0_param_numel
from shardwise.estimate.host import host_seconds
from shardwise.estimate.pipeline import bubble_fraction, bubble_over_ideal, rank_blocks
from shardwise.estimate.profiles import TORCH
from shardwise.spec import limits
from shardwise.spec.breakdown import Time

DEFAULT_EFFICIENCY = 0.5
PEAK_DTYPE = {"fp32": "fp32", "bf16-mixed": "bf16", "bf16": "bf16", "fp16-mixed": "fp16"}
PCIE_GBPS = 31.5  # PCIe 4.0 x16 per direction (16 GT/s x 16 lanes x 128/130 / 8), the host link offload uses
STATES = {"adamw": 2, "sgd": 1, "adafactor": 0, "adam8bit": 2}  # full-size optimizer states per parameter
SECONDS_PER_DAY = 86400.0


# ---- FLOPs ------------------------------------------------------------------------------------
def matmul_weights(model) -> dict:
    """Matmul weights one token passes through: per layer (attention, MLP incl. router) and the
    output projection. MoE: top_k routed experts + shared experts."""
    h = model.hidden
    attn = h * model.q_dim + 2 * h * model.kv_dim + model.q_dim * h
    mats = 3 if model.ffn_kind == "swiglu" else 2
    if model.is_moe:
        mlp = (
            model.top_k * mats * h * model.expert_ffn_hidden
            + model.shared_experts * mats * h * model.ffn_hidden
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


def layer_recompute_flops_per_token(model, seq, recompute: str):
    """Full: the block's whole forward again. Selective: its attention core again."""
    if recompute == "full":
        return layer_forward_flops_per_token(model, seq)
    if recompute == "selective":
        return attention_core_flops_per_token(model, seq)
    return 0 * seq


def optimizer_bytes_per_param(precision: str, optimizer: str) -> int:
    """HBM traffic of one optimizer step per parameter: read param and grad, write param, read and
    write each full-size state. Pure bf16 keeps everything in 2 bytes; 8-bit Adam its states in 1."""
    p = 2 if precision == "bf16" else 4
    state = 1 if optimizer == "adam8bit" else p
    return 3 * p + 2 * STATES[optimizer] * state


# ---- the step -----------------------------------------------------------------------------------
def step_time(model, cluster, plan, comm, *, efficiency=None, tokens: float = 0.0, price=None) -> Time:
    eff = DEFAULT_EFFICIENCY if efficiency is None else efficiency
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
    m, seq = plan.grad_accum, plan.seq
    mb_tokens = plan.mbs * seq

    # busiest stage, per GPU, per micro-batch
    w = matmul_weights(model)
    # the busiest stage: the first (the most blocks; its embedding lookup is no matmul) or the last
    # (its blocks + the output projection), at the plan's split
    first, last = rank_blocks(model, plan, False), rank_blocks(model, plan, True)
    lf, lr = layer_forward_flops_per_token(model, seq), layer_recompute_flops_per_token(model, seq, plan.recompute)
    first_busier = where(first * (lf + lr) > last * (lf + lr) + 2 * w["head"], 1, 0)
    blocks = where(first_busier, first, last)
    stage_fwd = (blocks * lf + (1 - first_busier) * 2 * w["head"]) * mb_tokens
    stage_rc = blocks * lr * mb_tokens
    t_f = stage_fwd / plan.tp / rate
    t_r = stage_rc / plan.tp / rate
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
    t = {"tp": 0.0, "pp": 0.0, "other": 0.0, "dp": 0.0, "dp_exposed": 0.0, "dp_gather": 0.0, "dp_reduce": 0.0}
    for c in comm:
        if c.kind in ("send", "recv"):
            key = "pp"
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
    tp_s, pp_s, other_s, dp_s = t["tp"], t["pp"], t["other"], t["dp"]
    f = gpu.overlap
    if plan.zero == 3:
        dp_exposed = t["dp_exposed"] + _excess(t["dp_gather"] + t["dp_reduce"], forward_s + backward_s + recompute_s, f)
    else:
        gathers_behind = where(plan.pp > 1, t_f, forward_s)  # ZeRO-2 under a pipeline gathers once
        dp_exposed = (
            t["dp_exposed"] + _excess(t["dp_gather"], gathers_behind, f) + _excess(t["dp_reduce"], t_b + t_r, f)
        )

    compute_s = forward_s + backward_s + recompute_s + overhead_s + host_step_s + optimizer_s
    pipelined = forward_s + backward_s + recompute_s + overhead_s + tp_s + pp_s
    bubble_s = exposed_bubble(gpu, bubble_over_ideal(plan.pp, m, plan.vpp, plan.schedule)) * pipelined
    comm_exposed_s = tp_s + pp_s + dp_exposed + other_s + offload_s
    step_s = compute_s + comm_exposed_s + bubble_s

    tokens_step = plan.gbs * seq
    flops = model_flops_per_token(model, seq) * tokens_step
    hw_flops = flops + model.layers * layer_recompute_flops_per_token(model, seq, plan.recompute) * tokens_step
    out = Time(
        compute_s=compute_s,
        comm_exposed_s=comm_exposed_s,
        bubble_s=bubble_s,
        step_s=step_s,
        tokens_per_s=tokens_step / step_s,
        mfu=flops / (step_s * plan.world * peak),
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
