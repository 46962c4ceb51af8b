"""The time estimate: FLOPs against Narayanan et al. 2021, compute at an efficiency, exposed
communication, bubble, MFU, and the days / GPU-hours / cost of a token budget, worked by hand."""

from fractions import Fraction

import numpy as np
import pytest

from shardwise.errors import ShardwiseError
from shardwise.estimate.comm import collectives
from shardwise.estimate.time import (
    GEMM_FIXED_S,
    MATMUL_EFFICIENCY,
    PCIE_GBPS,
    forward_flops_per_token,
    layer_elementwise_bytes,
    layer_forward_flops_per_token,
    layer_gemms,
    matmul_weights,
    model_flops_per_token,
    optimizer_bytes_per_param,
    step_time,
)
from shardwise.spec.breakdown import Collective
from shardwise.spec.hardware import GPU, Cluster, Network
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan
from shardwise.spec.presets import preset

GPU_T = GPU(
    name="test-gpu",
    memory_gib=80,
    tflops={"bf16": 100.0, "fp16": 100.0, "fp32": 10.0},
    hbm_gbps=1000,
    link="NVLink",
    link_gbps=450,
    link_latency_us=3.0,
    link_efficiency=0.8,
    gpus_per_node=8,
    price_per_hour=2.0,
)
NET_T = Network(name="test-net", gbits=400, latency_us=10.0, efficiency=0.8)
# 2 layers, h = 1024, GELU 4h, vocab 1000, untied: 27,218,944 parameters
TOY = ModelSpec(name="toy", layers=2, hidden=1024, heads=8, vocab=1000, ffn_kind="gelu", ffn_hidden=4096)


def cluster(gpus=1, gpu=GPU_T):
    return Cluster(gpu=gpu, gpus=gpus, gpus_per_node=8, network=NET_T)


def run(model, gpus, comm=None, efficiency=None, tokens=0.0, price=None, **kw):
    plan = Plan(**kw).resolve(model, gpus)
    c = collectives(model, cluster(gpus), plan) if comm is None else comm
    return step_time(model, cluster(gpus), plan, c, efficiency=efficiency, tokens=tokens, price=price), plan


# ---- FLOPs ------------------------------------------------------------------------------------
def test_flops_hand_worked():
    # per layer: attention 4*1024^2 = 4,194,304 weights, MLP 2*1024*4096 = 8,388,608; head 1000*1024
    w = matmul_weights(TOY)
    assert (w["attention"], w["mlp"], w["head"]) == (4_194_304, 8_388_608, 1_024_000)
    # seq 512, per token per layer: 2 * 12,582,912 + attention core 4*512*1024 = 27,262,976
    assert layer_forward_flops_per_token(TOY, 512) == 27_262_976
    # whole forward: 2 layers + 2 * 1,024,000 (output) = 56,573,952; with backward, x3 = 169,721,856
    assert forward_flops_per_token(TOY, 512) == 56_573_952
    assert model_flops_per_token(TOY, 512) == 169_721_856


def test_matmul_weights_are_the_params_minus_lookups_and_norms():
    # Llama-2-7B: 6,738,415,616 params - embedding 32000*4096 - norms (2*32 + 1) * 4096 = 6,607,077,376
    m = preset("llama-2-7b")
    w = matmul_weights(m)
    assert m.layers * w["layer"] + w["head"] == 6_738_415_616 - 32000 * 4096 - 65 * 4096 == 6_607_077_376
    # Mixtral-8x7B per token: top-2 of 8 experts + router; the same identity on its active params
    x = preset("mixtral-8x7b")
    w = matmul_weights(x)
    assert x.layers * w["layer"] + w["head"] == x.active_params - x.vocab * x.hidden - (2 * x.layers + 1) * x.hidden


def test_gpt3_flops_are_narayanans():
    """Narayanan et al. 2021, eq. (3): F = 96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)) per iteration with
    full recompute; 72*B*s*l*h^2*(1 + s/(6h) + V/(12*l*h)) without. Their GPT-3: l 96, h 12288,
    s 2048, V 51200. Exact in integers (biases and norms are not matmuls on either side)."""
    gpt3 = preset("gpt-3-175b").scaled(vocab=51200)
    B, s, l, h, V = 1536, 2048, 96, 12288, 51200
    paper_no_rc = 72 * B * s * l * h * h * (1 + Fraction(s, 6 * h) + Fraction(V, 12 * l * h))
    paper_rc = 96 * B * s * l * h * h * (1 + Fraction(s, 6 * h) + Fraction(V, 16 * l * h))
    assert model_flops_per_token(gpt3, s) * B * s == paper_no_rc
    full = (model_flops_per_token(gpt3, s) + l * layer_forward_flops_per_token(gpt3, s)) * B * s
    assert full == paper_rc


def test_gpt3_training_days_against_narayanan():
    """Narayanan et al. 2021, sec. 5.1: GPT-3 (175B), 300B tokens, 1024 A100s at 140 TFLOP/s each:
    8*T*P/(n*X) = 34 days. Their eq. (4) counts 8P FLOPs a token (recompute on) and leaves out the
    attention scores (s/(6h) = 2.8%) and the logits' V/(16*l*h) (0.3%); ours keeps them, so we come
    out above 34 days by about that much, and no more."""
    gpt3 = preset("gpt-3-175b")
    a100 = GPU(
        name="a100",
        memory_gib=80,
        tflops={"bf16": 312.0},
        hbm_gbps=2039,
        link="NVLink 3",
        link_gbps=300,
        gpus_per_node=8,
        price_per_hour=0.0,
    )
    cl = Cluster(gpu=a100, gpus=1024, gpus_per_node=8, network=NET_T)
    # no pipeline (no bubble), no communication: what eq. (4) assumes; ZeRO-1 so the optimizer
    # step is ~0.1% (their runs shard it too)
    plan = Plan(tp=8, zero=1, gbs=1536, seq=2048, recompute="full").resolve(gpt3, 1024)
    t = step_time(gpt3, cl, plan, [], efficiency=140 / 312, tokens=300e9)
    paper = 8 * 300e9 * 175e9 / (1024 * 140e12) / 86400
    assert paper == pytest.approx(33.9, abs=0.05)
    assert paper < t.train_days < paper * (1 + 2048 / (6 * 12288) + 50257 / (16 * 96 * 12288) + 0.002)
    # and exactly: tokens x hardware FLOPs per token / (n * X), plus the optimizer steps
    steps = 300e9 / (1536 * 2048)
    compute_days = t.detail["hardware_flops_per_step"] / (1024 * 140e12) * steps / 86400
    assert t.train_days == pytest.approx(compute_days + steps * t.detail["optimizer_s"] / 86400, rel=1e-9)


# ---- one step -------------------------------------------------------------------------------------
def test_step_hand_worked():
    # one GPU, gbs 4 of mbs 2 -> 2 micro-batches of 2*512 = 1024 tokens; peak 100 TFLOP/s at 0.5
    t, plan = run(TOY, 1, gbs=4, mbs=2, seq=512, efficiency=0.5)
    assert plan.grad_accum == 2
    # forward: 2048 tokens * 56,573,952 / 50e12 = 2.317309e-3 s; backward twice that
    assert t.detail["forward_s"] == pytest.approx(2048 * 56_573_952 / 50e12)
    assert t.detail["backward_s"] == pytest.approx(2 * t.detail["forward_s"])
    # optimizer: AdamW fp32, 28 bytes per parameter at 1000 GB/s: 27,218,944 * 28 / 1e12
    assert t.detail["optimizer_s"] == pytest.approx(27_218_944 * 28 / 1e12)
    assert t.compute_s == pytest.approx(3 * t.detail["forward_s"] + t.detail["optimizer_s"])
    assert (t.comm_exposed_s, t.bubble_s) == (0, 0)  # one GPU: nothing to say to anyone
    assert t.step_s == pytest.approx(t.compute_s)
    # tokens/s and MFU = model FLOPs / (step * GPUs * peak): 2048 * 169,721,856 / (step * 100e12)
    assert t.tokens_per_s == pytest.approx(2048 / t.step_s)
    assert t.flops_per_step == 2048 * 169_721_856
    assert t.mfu == pytest.approx(2048 * 169_721_856 / (t.step_s * 100e12))
    assert t.mfu < 0.5  # the optimizer step is time without model FLOPs


def test_matmul_shapes_hand_worked():
    # TOY, mbs 2 x seq 512 = M 1024 rows, tp 2: qkv 2*1024*1024*3072/2, the core 2*2*(8/2 heads)*512^2*128
    # for each of Q.K^T and attention over V, the output 2*1024*1024*1024/2, the MLP 2*1024*1024*4096/2 twice
    g = layer_gemms(TOY, Plan(tp=2, mbs=2, seq=512))
    assert g == {
        "qkv": (3_221_225_472, 1),
        "attention_core": (536_870_912, 2),
        "attention_out": (1_073_741_824, 1),
        "mlp": (4_294_967_296, 2),
    }
    # their sum is the layer's FLOPs per token times the tokens, over tp
    assert sum(f * n for f, n in g.values()) == 1024 * layer_forward_flops_per_token(TOY, 512) / 2


def test_elementwise_bytes_hand_worked():
    # TOY, mbs 2 x seq 512, no dropout, flash: the residual stream 1024*1024 elements through two norms
    # (2 passes each) and two residual adds (3 each), the GELU over 1024*4096 (2), 2 bytes each
    b = layer_elementwise_bytes(TOY, Plan(mbs=2, seq=512), "flash", 2)
    assert b == {"block": 2 * (10 * 1024 * 1024 + 2 * 1024 * 4096), "attention_core": 0}
    # materialized scores: 2 * 8 heads * 512^2 elements, softmax reads and writes them (2 passes);
    # sequence parallel over tp 2 splits the residual stream, tp the MLP and the heads
    m = layer_elementwise_bytes(TOY, Plan(mbs=2, seq=512, tp=2, sp=True), "math", 2)
    assert m == {"block": 2 * (10 * 1024 * 1024 / 2 + 2 * 1024 * 4096 / 2), "attention_core": 2 * 2 * 2 * 4 * 512**2}


def test_shaped_step_hand_worked():
    """Without an efficiency each matmul runs at MATMUL_EFFICIENCY of peak plus GEMM_FIXED_S per call,
    the memory-bound work at HBM bandwidth: TOY on one GPU, 2 micro-batches of 2 x 512 tokens."""
    t, _ = run(TOY, 1, gbs=4, mbs=2, seq=512)
    rate = 100e12 * MATMUL_EFFICIENCY
    # per block: 27,917,287,424 FLOPs in 6 calls (qkv, 2 core, out, 2 MLP); 37,748,736 bytes at 1000 GB/s
    block = 27_917_287_424 / rate + 6 * GEMM_FIXED_S + 37_748_736 / 1e12
    head = 2 * 1024 * 1024 * 1000 / rate + GEMM_FIXED_S
    assert t.detail["forward_s"] == pytest.approx(2 * (2 * block + head))
    assert t.detail["backward_s"] == pytest.approx(2 * t.detail["forward_s"])
    # what the matmuls and the memory-bound work reached together, of peak: below the matmuls' own
    assert t.detail["efficiency"] == pytest.approx(2048 * 169_721_856 / 3 / t.detail["forward_s"] / 100e12)
    assert t.detail["efficiency"] < MATMUL_EFFICIENCY


def test_small_matmuls_run_below_large_ones():
    """The same work split 8 ways runs each matmul at a smaller shape: its efficiency drops, where a
    flat rate would make tp 8 exactly 8x faster."""
    big = preset("llama-2-7b")
    one, _ = run(big, 1, gbs=1, mbs=1, seq=256)
    eight, _ = run(big, 8, tp=8, gbs=1, mbs=1, seq=256)
    assert eight.detail["forward_s"] > one.detail["forward_s"] / 8 * 1.05
    assert eight.detail["efficiency"] < one.detail["efficiency"]


def test_host_time_hand_worked():
    # a calibrated CPU: 1 ms per block per micro-batch, 2 ms per step (estimate/host.py). pp = 2 of
    # 2 layers, 4 micro-batches: the busiest stage runs 1 block x 4 micro-batches = 4 ms more
    # pipelined work, the bubble (1/4 of the pipelined work) 1 ms more; the step term, 2 ms, is not
    # pipelined: 7 ms in all
    import dataclasses

    slow = dataclasses.replace(GPU_T, host_us={"dp": {"block": 1000.0, "microbatch": 0.0, "step": 2000.0}})
    base, plan = run(TOY, 2, pp=2, gbs=4, mbs=1, seq=512)
    c = collectives(TOY, cluster(2), plan)
    t = step_time(TOY, cluster(2, slow), plan, c)
    assert base.detail["overhead_s"] == 0  # catalog GPUs: none
    assert t.detail["overhead_s"] == pytest.approx(4e-3 + 2e-3)
    assert t.compute_s - base.compute_s == pytest.approx(6e-3)
    assert t.bubble_s - base.bubble_s == pytest.approx(1e-3)
    assert t.step_s - base.step_s == pytest.approx(7e-3)


def test_bubble_on_an_oversubscribed_cpu():
    # 4 ranks on 2 cores (oversubscription s = 2): the pipelined work W was timed with every rank
    # busy on half a core. The step is the longer of the cores' total work (W) and the schedule's
    # critical path with a whole core per rank ((1 + over_ideal) W / s); the bubble is the excess.
    #   pp 2, m 2 (over_ideal 1/2):  max(1, 1.5 / 2) - 1 = 0      (the idle stage's cores are used)
    #   pp 4, m 1 (over_ideal 3):    max(1, 4 / 2) - 1 = 1        (4x the work on the path, 2x faster)
    #   s = 1.5, over_ideal 1:       max(1, 2 / 1.5) - 1 = 1/3
    #   a device per rank (s = 1):   max(1, 1 + b) - 1 = b        (all of it)
    import dataclasses

    from shardwise.estimate.time import exposed_bubble

    cpu = dataclasses.replace(GPU_T, oversubscription=2.0)
    assert (exposed_bubble(cpu, 0.5), exposed_bubble(cpu, 3.0)) == (0.0, 1.0)
    assert exposed_bubble(dataclasses.replace(GPU_T, oversubscription=1.5), 1.0) == pytest.approx(1 / 3)
    assert exposed_bubble(GPU_T, 0.5) == 0.5 and exposed_bubble(GPU_T, 0.0) == 0.0
    # pp 2, gbs 4, mbs 1: m = 4, over_ideal 1/4 -> no bubble on 2 ranks per core, all of it on a GPU
    base, plan = run(TOY, 2, pp=2, gbs=4, mbs=1, seq=512)
    c = collectives(TOY, cluster(2), plan)
    t = step_time(TOY, cluster(2, cpu), plan, c)
    assert base.bubble_s > 0 and t.bubble_s == 0
    assert t.step_s == pytest.approx(base.step_s - base.bubble_s)
    # pp 2, gbs 1: m = 1, over_ideal 1 -> max(1, 2 / 2) - 1 = 0 as well; s = 1.5: a third of W
    one, plan1 = run(TOY, 2, pp=2, gbs=1, mbs=1, seq=512)
    c1 = collectives(TOY, cluster(2), plan1)
    t15 = step_time(TOY, cluster(2, dataclasses.replace(GPU_T, oversubscription=1.5)), plan1, c1)
    assert t15.bubble_s == pytest.approx(one.bubble_s / 3)


def test_recompute_flops():
    base, _ = run(TOY, 1, gbs=4, mbs=2, seq=512, efficiency=0.5)
    full, _ = run(TOY, 1, gbs=4, mbs=2, seq=512, recompute="full", efficiency=0.5)
    sel, _ = run(TOY, 1, gbs=4, mbs=2, seq=512, recompute="selective", efficiency=0.5)
    # full: each block's forward again, 2 * 27,262,976 per token (not the output layer)
    assert full.detail["hardware_flops_per_step"] - base.detail["hardware_flops_per_step"] == 2048 * 2 * 27_262_976
    assert full.detail["recompute_s"] == pytest.approx(2048 * 2 * 27_262_976 / 50e12)
    # selective: the attention core again, 4 * 512 * 1024 per token per layer
    assert sel.detail["recompute_s"] == pytest.approx(2048 * 2 * 4 * 512 * 1024 / 50e12)
    assert full.flops_per_step == base.flops_per_step  # MFU counts model FLOPs only
    assert full.mfu < base.mfu


def test_bubble_and_pipelined_work():
    # pp = 2 of the 2 layers, 4 micro-batches: bubble = (p-1)/m of the pipelined work
    t, plan = run(TOY, 2, pp=2, gbs=4, mbs=1, seq=512, efficiency=0.5)
    pipelined = t.detail["forward_s"] + t.detail["backward_s"] + t.detail["tp_comm_s"] + t.detail["pp_comm_s"]
    assert t.bubble_s == pytest.approx(pipelined * 1 / 4)
    assert t.detail["bubble_fraction"] == pytest.approx(1 / 5)
    # the busiest stage is the last: 1 layer + the output projection
    per_mb = 512 * (27_262_976 + 2 * 1_024_000) / 50e12
    assert t.detail["forward_s"] == pytest.approx(4 * per_mb)
    # p2p on the critical path: 4 sends of a [1, 512, 1024] fp32 activation + 4 gradient receives
    assert t.detail["pp_comm_s"] == pytest.approx(8 * (3e-6 + 512 * 1024 * 4 / 360e9))
    il, _ = run(TOY.scaled(layers=4), 2, pp=2, gbs=4, mbs=1, seq=512, schedule="interleaved", vpp=2)
    assert il.detail["bubble_fraction"] == pytest.approx(1 / 9)  # (p-1)/(v*m + p-1)


def _coll(kind, group, seconds, overlapped):
    return Collective(
        kind=kind, group=group, ranks=8, bytes=1, count=1, wire_bytes=1, seconds=seconds, overlapped=overlapped
    )


def test_overlap_rules():
    plan = Plan(dp=8, gbs=16, mbs=1, seq=512).resolve(TOY, 8)  # 2 micro-batches
    cl = cluster(8)
    bare = step_time(TOY, cl, plan, [])
    t_b = bare.detail["backward_s"] / 2  # the last micro-batch's backward
    # the gradient all-reduce hides behind the last backward; what is longer sticks out
    t = step_time(TOY, cl, plan, [_coll("all-reduce", "dp", t_b + 0.5, True)])
    assert t.detail["dp_exposed_s"] == pytest.approx(0.5)
    t = step_time(TOY, cl, plan, [_coll("all-reduce", "dp", t_b / 2, True)])
    assert t.detail["dp_exposed_s"] == 0
    # not overlapped (a broadcast after the step): all of it
    t = step_time(TOY, cl, plan, [_coll("broadcast", "dp", 0.25, False)])
    assert t.comm_exposed_s == pytest.approx(0.25)
    # TP sits between matmuls: all of it, and it stretches the bubble's unit too
    t = step_time(TOY, cl, plan, [_coll("all-reduce", "tp", 0.125, False)])
    assert t.detail["tp_comm_s"] == pytest.approx(0.125) and t.comm_exposed_s == pytest.approx(0.125)
    # ZeRO-3: gathers and reduce-scatters hide behind the whole forward + backward
    z3 = Plan(dp=8, zero=3, gbs=16, mbs=1, seq=512).resolve(TOY, 8)
    compute = bare.detail["forward_s"] + bare.detail["backward_s"]
    t = step_time(TOY, cl, z3, [_coll("all-gather", "dp", compute, True), _coll("reduce-scatter", "dp", 0.5, True)])
    assert t.detail["dp_exposed_s"] == pytest.approx(0.5)
    # ZeRO-2: per-micro-batch gathers hide behind the forwards
    z2 = Plan(dp=8, zero=2, gbs=16, mbs=1, seq=512).resolve(TOY, 8)
    t = step_time(TOY, cl, z2, [_coll("all-gather", "dp", bare.detail["forward_s"] + 0.5, True)])
    assert t.detail["dp_exposed_s"] == pytest.approx(0.5)


def test_a_measured_overlap_hides_only_its_fraction():
    import dataclasses

    plan = Plan(dp=8, gbs=16, mbs=1, seq=512).resolve(TOY, 8)  # 2 micro-batches
    cl = cluster(8)
    half = dataclasses.replace(cl, gpu=dataclasses.replace(cl.gpu, overlap=0.5))
    t_b = step_time(TOY, cl, plan, []).detail["backward_s"] / 2
    # an all-reduce half as long as the last backward: overlap 1 hides it all; overlap 0.5 hides
    # half of it (0.5 * t_b/2), the other half is exposed: t_b/4
    ar = [_coll("all-reduce", "dp", t_b / 2, True)]
    assert step_time(TOY, cl, plan, ar).detail["dp_exposed_s"] == 0
    assert step_time(TOY, half, plan, ar).detail["dp_exposed_s"] == pytest.approx(t_b / 4)
    # longer than the backward by 0.5 s: the part beside the backward (t_b) hides by half,
    # exposed 0.5 + t_b / 2
    ar = [_coll("all-reduce", "dp", t_b + 0.5, True)]
    assert step_time(TOY, half, plan, ar).detail["dp_exposed_s"] == pytest.approx(0.5 + t_b / 2)
    # overlap 0 (a CPU whose cores the math fills): every overlapped collective is exposed
    none = dataclasses.replace(cl, gpu=dataclasses.replace(cl.gpu, overlap=0.0))
    assert step_time(TOY, none, plan, ar).detail["dp_exposed_s"] == pytest.approx(t_b + 0.5)


def test_optimizer_bytes():
    # read param + grad, write param, read + write each state
    assert optimizer_bytes_per_param("bf16-mixed", "adamw") == 4 + 4 + 4 + 2 * 2 * 4 == 28
    assert optimizer_bytes_per_param("bf16", "adamw") == 14
    assert optimizer_bytes_per_param("fp32", "sgd") == 12 + 8 == 20
    assert optimizer_bytes_per_param("fp32", "adafactor") == 12  # factored: O(rows + cols), left out
    assert optimizer_bytes_per_param("fp32", "adam8bit") == 12 + 2 * 2 * 1 == 16


def test_zero_shards_the_optimizer_step_and_offload_moves_it():
    z0, _ = run(TOY, 8, dp=8, seq=512)
    z1, _ = run(TOY, 8, dp=8, zero=1, seq=512)
    assert z1.detail["optimizer_s"] == pytest.approx(z0.detail["optimizer_s"] / 8)
    off, _ = run(TOY, 8, dp=8, zero=1, seq=512, offload="optimizer")
    # the optimizer runs on the CPU: fp32 gradient shard down + fp32 parameter shard up over PCIe
    assert off.detail["optimizer_s"] == 0
    assert off.detail["offload_s"] == pytest.approx(27_218_944 / 8 * (4 + 4) / (PCIE_GBPS * 1e9))


def test_training_budget_hand_worked():
    t, plan = run(TOY, 8, dp=8, gbs=16, mbs=1, seq=512, tokens=1e9)
    steps = 1e9 / (16 * 512)  # 122,070.3 steps
    assert t.train_tokens == 1e9
    assert t.train_days == pytest.approx(steps * t.step_s / 86400)
    assert t.gpu_hours == pytest.approx(steps * t.step_s / 3600 * 8)
    assert t.cost_usd == pytest.approx(t.gpu_hours * 2.0)  # the GPU's catalog price
    t2, _ = run(TOY, 8, dp=8, gbs=16, mbs=1, seq=512, tokens=1e9, price=3.5)
    assert t2.cost_usd == pytest.approx(t.gpu_hours * 3.5)
    none, _ = run(TOY, 8, dp=8, gbs=16, mbs=1, seq=512)
    assert (none.train_days, none.gpu_hours, none.cost_usd) == (0, 0, 0)


def test_efficiency_is_overridable():
    half, _ = run(TOY, 1, gbs=4, mbs=2, seq=512, efficiency=0.5)
    full, _ = run(TOY, 1, gbs=4, mbs=2, seq=512, efficiency=1.0)
    assert full.detail["forward_s"] == pytest.approx(half.detail["forward_s"] / 2)
    assert full.detail["efficiency"] == 1.0


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(efficiency=0), "efficiency must be"),
        (dict(efficiency=1.5), "efficiency must be"),
        (dict(efficiency="high"), "efficiency must be"),
        (dict(tokens=-1.0), "token budget"),
        (dict(price=-2.0), "price must be"),
    ],
)
def test_bad_input(kw, msg):
    with pytest.raises(ShardwiseError, match=msg):
        run(TOY, 1, seq=512, **kw)


def test_gpu_without_the_dtype():
    v100 = GPU(
        name="v100", memory_gib=32, tflops={"fp32": 15.7, "fp16": 125.0}, hbm_gbps=900, link="NVLink 2", link_gbps=150
    )
    plan = Plan(seq=512).resolve(TOY, 1)
    with pytest.raises(ShardwiseError, match="no bf16 figure"):
        step_time(TOY, cluster(1, v100), plan, [])
    assert step_time(TOY, cluster(1, v100), plan.replace(precision="fp16-mixed"), []).step_s > 0


@pytest.mark.parametrize(
    "cats",
    [
        dict(zero=0),
        dict(zero=1, recompute="full"),
        dict(zero=2, sp=True),
        dict(zero=3, schedule="interleaved"),
        dict(zero=3, offload="params"),
        dict(zero=1, offload="optimizer", precision="fp32"),
    ],
)
def test_array_plan_matches_scalar_plans(cats):
    model, gpus = preset("tiny-llama"), 16
    rows = [
        (gpus // (tp * pp), tp, pp, mbs, v)
        for tp in (1, 2, 4)
        for pp in (1, 2)
        for mbs in (1, 2)
        for v in ((1, 2) if cats.get("schedule") == "interleaved" else (1,))
        if (tp > 1 or not cats.get("sp")) and (pp > 1 or cats.get("schedule") != "interleaved")
    ]
    cl = Cluster(gpu=GPU_T, gpus=gpus, gpus_per_node=4, network=NET_T)
    arr = np.array(rows, dtype=np.int64).T
    plan = Plan(dp=arr[0], tp=arr[1], pp=arr[2], mbs=arr[3], vpp=arr[4], gbs=64, seq=32, **cats)
    got = step_time(model, cl, plan, collectives(model, cl, plan), tokens=1e9)
    for i, (dp, tp, pp, mbs, v) in enumerate(rows):
        one = Plan(dp=dp, tp=tp, pp=pp, mbs=mbs, vpp=v, gbs=64, seq=32, **cats)
        want = step_time(model, cl, one, collectives(model, cl, one), tokens=1e9)
        for f in (
            "compute_s",
            "comm_exposed_s",
            "bubble_s",
            "step_s",
            "tokens_per_s",
            "mfu",
            "train_days",
            "gpu_hours",
            "cost_usd",
        ):
            assert float(np.broadcast_to(getattr(got, f), arr[0].shape)[i]) == pytest.approx(
                getattr(want, f), rel=1e-12
            ), f
        for k, v_ in want.detail.items():
            assert float(np.broadcast_to(got.detail[k], arr[0].shape)[i]) == pytest.approx(v_, rel=1e-12), k
