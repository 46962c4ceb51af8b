"""The communication estimate: ring volumes, link choice, latency-bandwidth time, and every
collective of a step for named models and plans, worked by hand."""

import time

import numpy as np
import pytest

from shardwise.errors import ShardwiseError
from shardwise.estimate.comm import (
    DDP_BUCKET,
    DDP_FIRST_BUCKET,
    PROFILES,
    bucket_sizes,
    collectives,
    ddp_ready_sizes,
    lecture_comm_bytes,
    lecture_comm_ms,
    link,
    make,
    seconds,
    wire_bytes,
)
from shardwise.estimate.pipeline import rank_order
from shardwise.spec.hardware import GPU, Cluster, Network
from shardwise.spec.plan import Plan
from shardwise.spec.presets import preset

# Round numbers, so the arithmetic below can be done by hand: 450 GB/s NVLink at 80%, 3 us a
# ring step; 400 Gbit/s = 50 GB/s per GPU at 80%, 10 us a step; 8 GPUs a node.
GPU_T = GPU(
    name="test-gpu",
    memory_gib=80,
    tflops={"bf16": 1000.0, "fp16": 1000.0, "fp32": 50.0},
    hbm_gbps=4000,
    link="NVLink",
    link_gbps=450,
    link_latency_us=3.0,
    link_efficiency=0.8,
    gpus_per_node=8,
    price_per_hour=2.0,
)
NET_T = Network(name="test-net", gbits=400, latency_us=10.0, efficiency=0.8)
LLAMA = preset("llama-2-7b")  # 6,738,415,616 params; a block is 202,383,360; vocab 32000, hidden 4096, ffn 11008


def cluster(gpus=8):
    return Cluster(gpu=GPU_T, gpus=gpus, gpus_per_node=8, network=NET_T)


def comm(model, gpus, profile="torch", **kw):
    plan = Plan(**kw).resolve(model, gpus)
    return {f"{c.kind} {c.what}": c for c in collectives(model, cluster(gpus), plan, profile)}


def find(cs, *words):
    hits = [c for w, c in cs.items() if all(x in w for x in words)]
    assert len(hits) == 1, (words, list(cs))
    return hits[0]


# ---- the cost model --------------------------------------------------------------------------
def test_ring_volumes():
    # 8 ranks, 800 bytes: all-reduce sends 2*7/8*800 = 1400; all-gather / reduce-scatter 7/8*800 = 700;
    # a chain broadcast 700 on average; a send all 800; a receive nothing
    assert wire_bytes("all-reduce", 8, 800) == 1400
    assert wire_bytes("all-gather", 8, 800) == 700
    assert wire_bytes("reduce-scatter", 8, 800) == 700
    assert wire_bytes("broadcast", 8, 800) == 700
    assert wire_bytes("send", 2, 800) == 800
    assert wire_bytes("recv", 2, 800) == 0


def test_link_selection():
    c = cluster(64)
    # tp = 8, stride 1: 8 <= 8 GPUs per node -> NVLink
    assert link(c, 8, 1)[0]
    # dp = 4 with tp = 2 (stride 2): 4*2 = 8 -> one node
    assert link(c, 4, 2)[0]
    # dp = 2 with tp = 8 (stride 8): 16 > 8 -> the network, at 50 GB/s * 0.8 and 10 us a step
    intra, bw, lat = link(c, 2, 8)
    assert not intra and bw == pytest.approx(40e9) and lat == pytest.approx(10e-6)
    # pp = 2 with dp*tp = 32: 64 -> network
    assert not link(c, 2, 32)[0]
    # inside a node: 450 GB/s * 0.8 = 360 GB/s, 3 us
    assert link(c, 8, 1)[1:] == (pytest.approx(360e9), pytest.approx(3e-6))


def test_latency_bandwidth_time():
    c = cluster(64)
    # all-reduce of 1e9 bytes on 8 GPUs of one node:
    #   2*(8-1) = 14 steps * 3 us = 42 us, + 2*7/8*1e9 = 1.75e9 bytes / 360e9 B/s = 4.861 ms
    _, bw, lat = link(c, 8, 1)
    assert seconds("all-reduce", 8, 1, 10**9, bw, lat) == pytest.approx(42e-6 + 1.75e9 / 360e9)
    # the same over the network: 14 * 10 us + 1.75e9 / 40e9 = 0.14 ms + 43.75 ms
    _, bw, lat = link(c, 8, 8)
    assert seconds("all-reduce", 8, 1, 10**9, bw, lat) == pytest.approx(140e-6 + 43.75e-3)
    # all-gather of 1e9 in 10 calls inside a node: 10 * 7 * 3 us + 7/8 * 1e9 / 360e9
    _, bw, lat = link(c, 8, 1)
    assert seconds("all-gather", 8, 10, 10**9, bw, lat) == pytest.approx(210e-6 + 0.875e9 / 360e9)
    # chain broadcast: (N-1) steps, and the whole message crosses the slowest hop: 7 * 3 us + 1e9 / 360e9
    assert seconds("broadcast", 8, 1, 10**9, bw, lat) == pytest.approx(21e-6 + 1e9 / 360e9)
    # send: one step + S / B
    assert seconds("send", 2, 1, 10**9, bw, lat) == pytest.approx(3e-6 + 1e9 / 360e9)


def test_a_kind_with_its_own_figures():
    # a calibrated machine: all-gather 40 us a step at 12.5 GB/s inside the node, send 3 us at
    # 200 Gbit/s = 25 GB/s over the network; every other kind keeps the link's figures
    import dataclasses

    g = dataclasses.replace(GPU_T, link_kinds={"all-gather": {"latency_us": 40.0, "gbps": 12.5}})
    n = dataclasses.replace(NET_T, kinds={"send": {"latency_us": 3.0, "gbits": 200.0}})
    c = Cluster(gpu=g, gpus=16, gpus_per_node=8, network=n)
    # all-gather of 8 MB among 8 in a node, 2 calls: 2 * 7 steps * 40 us + 7/8 * 8e6 / (12.5e9 * 0.8)
    # = 560 us + 7e6 / 10e9 s = 560 + 700 = 1,260 us
    assert make(c, "all-gather", "dp", 8, 1, 2, "x", total=8 * 10**6).seconds == pytest.approx(1260e-6)
    # a reduce-scatter of the same keeps NVLink's 3 us and 360 GB/s: 2 * 7 * 3 us + 7e6 / 360e9
    assert make(c, "reduce-scatter", "dp", 8, 1, 2, "x", total=8 * 10**6).seconds == pytest.approx(42e-6 + 7e6 / 360e9)
    # pipeline hops across nodes (stride 8): a send and a recv of 1 MB each take 3 us + 1e6 / (25e9 * 0.8)
    # = 3 + 50 = 53 us (a recv is timed as the send it waits for)
    for kind in ("send", "recv"):
        assert make(c, kind, "pp", 2, 8, 1, "x", per_call=10**6).seconds == pytest.approx(53e-6)
    # the same send inside the node: the GPU has no send figure, NVLink's: 3 us + 1e6 / 360e9
    assert make(c, "send", "pp", 2, 1, 1, "x", per_call=10**6).seconds == pytest.approx(3e-6 + 1e6 / 360e9)


def test_make_sizes_and_size_one_groups():
    c = cluster(8)
    e = make(c, "all-reduce", "dp", 8, 1, 4, "x", per_call=1000)
    assert (e.bytes, e.count, e.wire_bytes, e.link) == (1000, 4, 2 * 7 * 4000 // 8, "intra-node")
    # unequal calls (DDP buckets): bytes is the mean, the volume is exact
    e = make(c, "all-reduce", "dp", 8, 1, 3, "x", total=1001)
    assert (e.bytes, e.wire_bytes) == (333, 2 * 7 * 1001 // 8)
    # a one-rank group moves nothing
    e = make(c, "all-reduce", "dp", 1, 1, 4, "x", per_call=1000)
    assert (e.count, e.wire_bytes, e.seconds) == (0, 0, 0)


# ---- DDP ----------------------------------------------------------------------------------------
def test_ddp_llama_7b_hand_worked():
    cs = comm(LLAMA, 8, dp=8, zero=0, seq=4096)
    ar = find(cs, "DDP")
    # bf16-mixed under DDP: fp32 parameters, so fp32 gradients: 6,738,415,616 * 4 = 26,953,662,464 bytes
    total = 6_738_415_616 * 4
    assert ar.wire_bytes == 2 * 7 * total // 8 == 47_168_909_312
    # Buckets, in gradient-ready order (the reverse of the forward's use), 1 MiB first then 25 MiB,
    # a bucket closing as soon as it reaches its limit:
    #   output (32000*4096*4 = 524 MB >= 1 MiB) alone;
    #   then per layer, last to first, every matrix (>= 64 MiB) closes a bucket and the 16 KiB
    #   norms ride along with the next matrix: {norm/attention_norm, w2}, {w3}, {w1}, {ffn_norm, wo},
    #   {wv}, {wk}, {wq} = 7 buckets a layer; layer 0's attention_norm joins tok_embeddings.
    #   1 + 32*7 + 1 = 226
    assert ar.count == 226 and ar.bytes == total // 226
    assert (ar.kind, ar.group, ar.ranks, ar.link, ar.overlapped) == ("all-reduce", "dp", 8, "intra-node", True)
    # and the engine's one fp32 all-reduce of [loss, grad norm] over the world; nothing else
    loss = find(cs, "loss")
    assert (loss.group, loss.bytes, loss.count) == ("world", 8, 1)
    assert len(cs) == 2


def test_ddp_bucket_rule():
    mib = 1024 * 1024
    # first bucket closes at 1 MiB, the rest at 25 MiB; the remainder is a last bucket
    assert bucket_sizes([mib // 2, mib // 2, 10 * mib, 20 * mib, 3]) == [mib, 30 * mib, 3]
    assert bucket_sizes([DDP_FIRST_BUCKET - 1]) == [DDP_FIRST_BUCKET - 1]
    assert bucket_sizes([DDP_BUCKET] * 3) == [DDP_BUCKET] * 3


def test_ddp_buckets_match_torchs_assignment():
    """Our bucket rule against the function DDP's Reducer calls (c10d, in C++)."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    for model, tp in [
        (preset("tiny-llama").scaled(hidden=512, heads=8, kv_heads=2, vocab=3000), 1),
        (preset("gpt2-124m").scaled(layers=3), 1),
        (preset("llama-3.2-1b").scaled(layers=2), 2),
    ]:
        sizes = ddp_ready_sizes(model, tp, model.layers, True, True, 4)
        tensors = [torch.empty(s // 4, dtype=torch.float32, device="meta") for s in sizes]
        idx, _ = dist._compute_bucket_assignment_by_size(
            tensors, [DDP_FIRST_BUCKET, DDP_BUCKET], [False] * len(tensors), list(range(len(tensors)))
        )
        theirs = [sum(sizes[i] for i in b) for b in idx]
        assert bucket_sizes(sizes) == theirs


def test_zero1_torch_broadcasts():
    cs = comm(LLAMA, 2, dp=2, zero=1, seq=4096)
    b = find(cs, "ZeroRedundancyOptimizer")
    # parameters_as_bucket_view: each owner broadcasts its partition as one bucket, 2 calls.
    # The greedy partition, matrices first, largest first, each to the lighter rank (ties: rank 0):
    #   tok_embeddings -> r0, output -> r1 (131,072,000 each); 96 FFN matrices (45,088,768) and
    #   128 attention matrices (16,777,216) alternate, 48 + 64 each: both at
    #   131,072,000 + 48 * 45,088,768 + 64 * 16,777,216 = 3,369,074,688;
    #   then the 65 norm vectors (4,096) alternate from r0: r0 33, r1 32
    #   r0 = 3,369,074,688 + 33 * 4,096 = 3,369,209,856;  r1 = 3,369,074,688 + 32 * 4,096 = 3,369,205,760
    # (together 6,738,415,616, Llama-2-7B), fp32 master parameters: x 4 bytes
    assert b.count == 2 and b.kind == "broadcast" and not b.overlapped
    assert b.sizes == {3_369_209_856 * 4: 1, 3_369_205_760 * 4: 1}
    assert b.wire_bytes == 6_738_415_616 * 4 // 2  # a broadcast moves (n-1)/n of what it carries on average
    assert find(comm(LLAMA, 8, dp=8, zero=1, seq=4096), "ZeroRedundancyOptimizer").count == 8
    assert find(cs, "DDP").count == 226  # plus DDP's all-reduce, unchanged


# ---- FSDP2 (ZeRO-2/3) ---------------------------------------------------------------------------------
def test_fsdp_llama_7b_hand_worked():
    # dp = 8, gbs 32 -> 4 micro-batches per rank; every dim divides by 8, so no padding
    block, root = 202_383_360, 32000 * 4096 + 4096 + 32000 * 4096  # root: embedding, final norm, output
    z2 = comm(LLAMA, 8, dp=8, zero=2, gbs=32, seq=4096)
    g = find(z2, "all-gather", "transformer block")
    # bf16-mixed: gathered in bf16 (2 bytes), once per micro-batch forward: 32 blocks * 4
    assert (g.bytes, g.count) == (block * 2, 128)
    assert g.wire_bytes == 7 * block * 2 * 128 // 8
    assert (find(z2, "all-gather", "root").bytes, find(z2, "all-gather", "root").count) == (root * 2, 4)
    # reduced in fp32 once per step (set_requires_gradient_sync(False) before the last micro-batch)
    rs = find(z2, "reduce-scatter", "transformer block")
    assert (rs.bytes, rs.count) == (block * 4, 32)
    assert (find(z2, "reduce-scatter", "root").bytes, find(z2, "reduce-scatter", "root").count) == (root * 4, 1)

    z3 = comm(LLAMA, 8, dp=8, zero=3, gbs=32, seq=4096)
    # forward and backward gathers every micro-batch (the root too: reshard_after_forward=True is
    # passed to it explicitly), a reduce-scatter every micro-batch
    assert find(z3, "all-gather", "transformer block").count == 32 * 2 * 4
    assert find(z3, "all-gather", "root").count == 2 * 4
    assert find(z3, "reduce-scatter", "transformer block").count == 32 * 4
    assert find(z3, "reduce-scatter", "root").count == 4


def test_fsdp_padding_hand_worked():
    # dp = 3: FSDP2 pads dim 0 of each tp-local tensor to a multiple of 3
    #   norms 4096 -> 4098 (x2); wq/wk/wv/wo 4096 rows -> 4098 x 4096 (x4);
    #   w1/w3 11008 rows -> 11010 x 4096 (x2); w2 4096 rows -> 4098 x 11008
    #   2*4098 + 4*4098*4096 + 2*11010*4096 + 4098*11008 = 202,454,532 (71,172 more than unpadded)
    cs = comm(LLAMA, 3, dp=3, zero=3, seq=4096)
    assert find(cs, "all-gather", "transformer block").bytes == 202_454_532 * 2


def test_zero3_under_a_pipeline_gathers_1_plus_m():
    """torch.distributed.pipelining keeps FSDP2 parameters unsharded after each backward
    (reshard_after_backward=False): a group gathers before its first op and before every
    backward that follows a forward. Counted on the schedule's own order: 1 + m."""
    for sched, v in [("1f1b", 1), ("gpipe", 1), ("interleaved", 2)]:
        cs = comm(LLAMA, 8, dp=2, pp=4, zero=3, gbs=16, seq=4096, schedule=sched, vpp=v)
        m = 8
        order = rank_order(4, m, v, sched, 0)
        for chunk in range(v):
            ops = [k for k, _, c in order if c == chunk]
            gathers = sum(1 for i, k in enumerate(ops) if i == 0 or ops[i - 1] == "F")
            assert gathers == 1 + m
        assert find(cs, "all-gather", "transformer block").count == 8 * (1 + m)  # 32 layers / pp 4
        assert find(cs, "reduce-scatter", "transformer block").count == 8  # once, at the step's end
        # ZeRO-2 under a pipeline: gathered once, kept to the end
        z2 = comm(LLAMA, 8, dp=2, pp=4, zero=2, gbs=16, seq=4096, schedule=sched, vpp=v)
        assert find(z2, "all-gather", "transformer block").count == 8


# ---- tensor parallel -----------------------------------------------------------------------------------
def test_tp_torch_hand_worked():
    # tp = 8, one micro-batch of 4096 tokens; bf16-mixed under autocast: matmul outputs bf16, the
    # residual stream (and the gradients of the column-parallel inputs) fp32
    cs = comm(LLAMA, 8, tp=8, seq=4096)
    act = 4096 * 4096
    fwd = find(cs, "block outputs")
    assert (fwd.kind, fwd.bytes, fwd.count) == ("all-reduce", act * 2, 2 * 32)
    assert fwd.wire_bytes == 2 * 7 * act * 2 * 64 // 8
    # backward: one all-reduce per attention and one per FFN (q/k/v, w1/w3 share one DTensor
    # input, so their input gradients are summed before the reduction): 2 * 32 = 64 calls of
    # 4096 * 4096 * 4 = 67,108,864 B; a rank sends 2 * 7/8 of each: 64 * 117,440,512 B
    bwd = find(cs, "block input gradients")
    assert (bwd.kind, bwd.bytes, bwd.count) == ("all-reduce", act * 4, 2 * 32)
    assert bwd.wire_bytes == 64 * 117_440_512
    assert find(cs, "embedding").bytes == act * 4
    logits = find(cs, "logits")
    assert (logits.kind, logits.bytes) == ("all-gather", 4096 * 32000 * 2)
    assert find(cs, "output projection").bytes == act * 4
    assert all(c.link == "intra-node" and not c.overlapped for c in cs.values() if c.group == "tp")


def test_tp_torch_is_megatron_per_layer():
    """DESIGN.md (Megatron-LM, Shoeybi et al. 2019, fig. 3): two all-reduces of s*b*h per layer
    forward and two backward, SwiGLU or GELU; the torch profile's blocks issue exactly that."""
    for model in (LLAMA, preset("gpt2-124m")):
        layers = model.layers
        torch_, mg = comm(model, 4, tp=4, seq=1024), comm(model, 4, "megatron", tp=4, seq=1024)
        for what in ("block outputs", "block input gradients"):
            assert find(torch_, what).count == find(mg, what).count == 2 * layers
    # full recompute replays wo's forward all-reduce, never a backward one
    rc = comm(LLAMA, 8, tp=8, seq=4096, recompute="full")
    assert find(rc, "block input gradients").count == 2 * 32


def test_tp_sequence_parallel_hand_worked():
    cs = comm(LLAMA, 8, tp=8, sp=True, seq=4096)
    act = 4096 * 4096
    assert (find(cs, "sequence shards to block inputs").bytes, find(cs, "sequence shards to block inputs").count) == (
        act * 4,
        64,
    )
    assert find(cs, "block outputs (wo, w2) to sequence").count == 64
    assert find(cs, "block input gradients to sequence").count == 64
    assert find(cs, "block output gradients").count == 64
    # the norms see sequence shards: 2*32 + 1 weight gradients are Partial over tp, all-reduced once
    norms = find(cs, "norm gradients")
    assert (norms.count, norms.bytes) == (65, 4096 * 4)


def test_full_recompute_replays_forward_collectives():
    # non-reentrant checkpoint stops once every saved tensor is recomputed: w2's output reduction
    # is not replayed, wo's is -> 3 forward all-reduces a layer instead of 2
    cs = comm(LLAMA, 8, tp=8, seq=4096, recompute="full")
    assert find(cs, "block outputs").count == 3 * 32
    sp = comm(LLAMA, 8, tp=8, seq=4096, recompute="full", sp=True)
    assert find(sp, "sequence shards to block inputs").count == 4 * 32
    assert find(sp, "block outputs (wo, w2) to sequence").count == 3 * 32
    # Megatron's recompute replays the whole layer
    mg = comm(LLAMA, 8, "megatron", tp=8, seq=4096, recompute="full")
    assert find(mg, "block outputs").count == 4 * 32


def test_tp_fsdp_computes_in_bf16():
    # ZeRO-2/3 with dp > 1 run FSDP2's bf16 parameters: every activation collective is 2 bytes
    cs = comm(LLAMA, 8, tp=2, dp=4, zero=2, seq=4096)
    assert find(cs, "block input gradients").bytes == 4096 * 4096 * 2
    assert find(cs, "block outputs").bytes == 4096 * 4096 * 2


def test_megatron_sp_moves_what_the_all_reduce_moves():
    # AG + RS of S move 2 * (N-1)/N * S, the same as one all-reduce of S (Korthikanti et al. 2022, sec. 4.2.2)
    plain = comm(LLAMA, 8, "megatron", tp=8, seq=4096)
    sp = comm(LLAMA, 8, "megatron", tp=8, seq=4096, sp=True)
    block = lambda cs: sum(c.wire_bytes for w, c in cs.items() if "block" in w and "again" not in w)
    assert block(plain) == block(sp)
    assert find(plain, "cross-entropy").count == 3
    # ... except that Megatron saves the gathered input as its shard and gathers it again for the
    # weight gradients (sec. 4.2.2): 2 more all-gathers of [1, 4096, 4096] bf16 per layer, beside the
    # input-gradient matmul (overlapped)
    again = find(sp, "again for the weight gradients")
    assert (again.kind, again.bytes, again.count, again.overlapped) == ("all-gather", 4096 * 4096 * 2, 64, True)


def test_megatron_pipeline_scatter_gather():
    # pp 2, tp 4, m = 4 micro-batches of [1, 4096, 4096] bf16: without sp each tp rank sends its quarter
    # (Narayanan et al. 2021, sec. 4.1) and the receiver all-gathers the whole over tp, once per recv
    cs = comm(LLAMA, 8, "megatron", tp=4, pp=2, gbs=4, seq=4096)
    send = find(cs, "activations to the next")
    assert (send.bytes, send.count) == (4096 * 4096 * 2 // 4, 4)
    gather = find(cs, "scatter-gather")
    assert (gather.kind, gather.group, gather.bytes, gather.count) == ("all-gather", "tp", 4096 * 4096 * 2, 4)
    # with sp the activation is sequence-sharded already: the same quarter, nothing to gather; the
    # torch profile (torch.distributed.pipelining) sends the whole activation
    sp = comm(LLAMA, 8, "megatron", tp=4, pp=2, gbs=4, seq=4096, sp=True)
    assert find(sp, "activations to the next").bytes == send.bytes and not any("scatter-gather" in w for w in sp)
    torch = comm(LLAMA, 8, "torch", tp=4, pp=2, gbs=4, seq=4096)
    assert not any("scatter-gather" in w for w in torch)


# ---- pipeline ------------------------------------------------------------------------------------------
def test_pp_hand_worked():
    # pp = 4, dp = 2, gbs 16 -> m = 8; one [1, 4096, 4096] activation; fp32 under autocast (zero 0)
    cs = comm(LLAMA, 8, pp=4, dp=2, gbs=16, seq=4096)
    send, recv = find(cs, "activations to the next"), find(cs, "gradients from the next")
    assert (send.bytes, send.count, send.wire_bytes) == (4096 * 4096 * 4, 8, 8 * 4096 * 4096 * 4)
    assert (recv.count, recv.wire_bytes) == (8, 0)
    assert send.link == "intra-node"  # pp 4 * stride dp*tp 2 = 8
    # interleaved, v = 2: rank 0 holds stages 0 and 4: sends from both (16), receives into stage 4 (8)
    il = comm(LLAMA, 8, pp=4, dp=2, gbs=16, seq=4096, schedule="interleaved", vpp=2)
    assert find(il, "activations to the next").count == 16
    assert find(il, "activations from the previous").count == 8
    assert find(il, "gradients to the previous").count == 8
    assert find(il, "gradients from the next").count == 16
    # sequence parallel: the stage output is a [1, 4096/2, 4096] shard
    sp = comm(LLAMA, 8, pp=2, tp=2, dp=2, sp=True, gbs=16, seq=4096)
    assert find(sp, "activations to the next").bytes == 4096 * 4096 * 4 // 2


def test_tied_embeddings_under_a_pipeline():
    # GPT-2 124M, pp = 2: the last stage keeps a copy of the tied embedding; the engine all-reduces
    # the two gradients: 50257 * 768 * 4 bytes, once a step, between 2 ranks
    gpt2 = preset("gpt2-124m")
    cs = comm(gpt2, 8, pp=2, dp=4, gbs=8, seq=1024)
    t = find(cs, "tied embedding")
    assert (t.ranks, t.count, t.bytes) == (2, 1, 50257 * 768 * 4)
    assert "tied embedding" not in " ".join(comm(gpt2, 8, dp=8, seq=1024))


# ---- profiles -------------------------------------------------------------------------------------------
def test_design_same_volume_and_zero3_one_and_a_half():
    """DESIGN.md: DDP and ZeRO-1/2 move the same volume; ZeRO-3 moves 1.5x (zero-paper profile)."""
    vol = {
        z: sum(c.wire_bytes for c in comm(LLAMA, 8, "zero-paper", dp=8, zero=z, seq=4096).values() if c.group == "dp")
        for z in range(4)
    }
    # DDP: all-reduce of 2*Psi bytes = 2 * 7/8 * 13,476,831,232 = 23,584,454,656 per rank
    assert vol[0] == 23_584_454_656
    assert vol[0] == vol[1] == vol[2]
    assert vol[3] * 2 == vol[0] * 3


def test_deepspeed_and_megatron_tables():
    psi = 6_738_415_616
    ds = comm(LLAMA, 8, "deepspeed", dp=8, zero=2, seq=4096)
    # 500M-element buckets: ceil(6.74e9 / 5e8) = 14 calls each way, 16-bit
    assert find(ds, "reduce_bucket_size").count == 14
    assert find(ds, "allgather_bucket_size").wire_bytes == 7 * psi * 2 // 8
    mg = comm(LLAMA, 8, "megatron", dp=8, zero=1, seq=4096)
    # distributed optimizer: fp32 main gradients reduce-scattered, bf16 parameters gathered;
    # buckets max(40M, 1M * 8) elements: ceil(6.74e9 / 4e7) = 169
    rs, ag = find(mg, "main gradients"), find(mg, "16-bit parameters")
    assert (rs.count, rs.wire_bytes) == (169, 7 * psi * 4 // 8)
    assert ag.wire_bytes == 7 * psi * 2 // 8 and not ag.overlapped
    assert find(comm(LLAMA, 8, "megatron", dp=8, zero=0, seq=4096), "main gradients").kind == "all-reduce"


def test_lecture_numbers_next_to_ours():
    """Lecture 14's communication table (7B params, 8 GPUs, 400 Gbps), pinned, and where we differ."""
    p = 7e9
    assert [lecture_comm_bytes(p, s) / 1e9 for s in range(4)] == [28.0, 28.0, 14.0, 42.0]
    assert [round(lecture_comm_ms(p, s), 6) for s in range(4)] == [560.0, 560.0, 280.0, 840.0]
    # ours (zero-paper, bytes a rank sends, ring): DDP 2*(7/8)*14 GB = 24.5 GB; ZeRO-2 reduce-scatter +
    # all-gather = also 24.5 GB (the lecture's 14 GB is half the paper's 2*Psi); ZeRO-3 36.75 GB
    ours = {
        0: wire_bytes("all-reduce", 8, 14e9),
        2: 2 * wire_bytes("reduce-scatter", 8, 14e9),
        3: 3 * wire_bytes("all-gather", 8, 14e9),
    }
    assert ours == {0: 24.5e9, 2: 24.5e9, 3: 36.75e9}
    assert ours[0] / lecture_comm_bytes(p, 0) == pytest.approx(7 / 8)  # its missing (N-1)/N
    assert ours[2] / lecture_comm_bytes(p, 2) == pytest.approx(7 / 4)  # and its halved ZeRO-2
    with pytest.raises(ShardwiseError, match="ZeRO stage"):
        lecture_comm_bytes(p, 4)


# ---- one path for one plan or many -------------------------------------------------------------------
ARRAY_CASES = [
    dict(zero=z, sp=sp, schedule=s, recompute=r, precision=pr)
    for z in (0, 1, 2, 3)
    for sp in (False, True)
    for s in ("1f1b", "interleaved")
    for r, pr in (("none", "bf16-mixed"), ("full", "fp32"))
]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("cats", ARRAY_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_array_plan_matches_scalar_plans(profile, cats):
    model, gpus = preset("tiny-llama"), 16  # 4 layers, 8 heads / 4 KV heads, 256 vocab
    rows = [
        (dp, tp, pp, mbs, v)
        for tp in (1, 2, 4)
        for pp in (1, 2, 4)
        for mbs in (1, 2)
        for v in (1, 2)
        for dp in [gpus // (tp * pp)]
        if (cats["schedule"] == "interleaved") == (v > 1)
        and pp * v <= 4
        and (pp > 1 or v == 1)
        and (tp > 1 or not cats["sp"])
    ]
    cl = Cluster(gpu=GPU_T, gpus=gpus, gpus_per_node=4, network=NET_T)  # 4-GPU nodes: some groups span
    gbs = 64
    arr = np.array(rows, dtype=np.int64).T
    plan = Plan(dp=arr[0], tp=arr[1], pp=arr[2], mbs=arr[3], vpp=arr[4], gbs=gbs, seq=32, **cats)
    got = collectives(model, cl, plan, profile)
    for i, (dp, tp, pp, mbs, v) in enumerate(rows):
        one = Plan(dp=dp, tp=tp, pp=pp, mbs=mbs, vpp=v, gbs=gbs, seq=32, **cats)
        want = collectives(model, cl, one, profile)
        live = [c for c in got if c.count[i] > 0]
        assert [(c.kind, c.group, c.what) for c in live] == [(c.kind, c.group, c.what) for c in want]
        for a, b in zip(live, want):
            assert (
                int(a.ranks[i] if np.ndim(a.ranks) else a.ranks),
                int(a.bytes[i]),
                int(a.count[i]),
                int(a.wire_bytes[i]),
            ) == (b.ranks, b.bytes, b.count, b.wire_bytes)
            assert float(a.seconds[i]) == pytest.approx(b.seconds, rel=1e-12)
            assert str(np.asarray(a.link)[i] if np.ndim(a.link) else a.link) == b.link


def test_bad_profile():
    with pytest.raises(ShardwiseError, match="unknown accounting profile 'torhc'.*torch"):
        collectives(LLAMA, cluster(8), Plan().resolve(LLAMA, 8), "torhc")


def test_fast_enough_for_the_search():
    from shardwise.estimate.time import step_time

    cl = cluster(64)
    plan = Plan(tp=8, pp=2, zero=1, gbs=512, seq=4096).resolve(preset("llama-2-70b"), 64)
    model = preset("llama-2-70b")
    step_time(model, cl, plan, collectives(model, cl, plan))  # warm the per-model caches
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        step_time(model, cl, plan, collectives(model, cl, plan))
    assert (time.perf_counter() - t0) / n < 1e-3
