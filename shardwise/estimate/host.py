"""Host overhead: the time PyTorch's engines spend beyond the FLOPs and the collectives.

On a GPU the host queues kernels ahead of the device and the FLOPs keep it busy: 0 for every
catalog GPU. On a CPU (and for tiny models anywhere) Python, the dispatcher, autograd, DTensor's
sharding propagation, FSDP2's hooks and the pipeline schedule's bookkeeping are most of a step.
`shardwise calibrate` measures it per engine as three or four terms (GPU.host_us, microseconds):
    block       each transformer block's forward + backward, per micro-batch
    microbatch  each micro-batch's fixed work (embedding, output layer, loss; a schedule's actions)
    block_step  each block's share of the once-per-step work (the optimizer's and the clipping's
                loops over its parameters); measured on one rank only, 0 otherwise (calibrate_host.py)
    step        the rest of the once-per-step work (gradient norm, the step's bookkeeping)
for the engines (HOST_ENGINES): "dp" (one process, or DDP), "zero1" (DDP with
ZeroRedundancyOptimizer), "zero2"/"zero3" (FSDP2), "tp" and "tp-sp" (DTensor), "pp" (torch.distributed.pipelining).
A plan's terms are dp's plus, for each other engine the plan uses, (that engine's - dp's): the
engines stack as `parallelize` applies them. Under a pipeline the block and micro-batch terms
are pipelined work (the bubble stretches them); the step terms are not.
"""

from __future__ import annotations

from shardwise.estimate._num import maximum, where
from shardwise.spec.hardware import HOST_TERMS


def host_terms(gpu, plan) -> dict:
    """{term: microseconds} for this plan on this GPU (each term >= 0)."""
    h = gpu.host_us
    base = h.get("dp", {})
    out = {}
    for t in HOST_TERMS:
        b = base.get(t, 0.0)
        v = b
        if plan.zero >= 1 and f"zero{plan.zero}" in h:
            v = v + h[f"zero{plan.zero}"].get(t, 0.0) - b
        tp_kind = "tp-sp" if plan.sp and "tp-sp" in h else "tp"  # sequence parallel measured apart, or as tp
        if tp_kind in h:
            v = v + where(plan.tp > 1, h[tp_kind].get(t, 0.0) - b, 0.0)
        if "pp" in h:
            # interleaving runs vpp chunks per micro-batch: the schedule's per-chunk actions repeat
            scale = plan.vpp if t == "microbatch" else 1
            v = v + where(plan.pp > 1, scale * (h["pp"].get(t, 0.0) - b), 0.0)
        out[t] = maximum(v, 0.0)
    return out


def host_seconds(gpu, plan, blocks) -> tuple:
    """(pipelined seconds: blocks and micro-batches of the busiest stage, which holds `blocks`
    transformer blocks; step seconds: its blocks' share and the rest)."""
    if not gpu.host_us:
        return 0.0 * plan.grad_accum, 0.0
    t = host_terms(gpu, plan)
    m = plan.grad_accum
    pipelined = m * blocks * t["block"] + m * t["microbatch"]
    return pipelined * 1e-6, (blocks * t["block_step"] + t["step"]) * 1e-6
