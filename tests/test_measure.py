"""The run tier's measurement (shardwise/run/measure.py) on small hand-made torch.distributed
programs whose collectives and memory are worked out by hand below.

One spawned 2-rank gloo group runs every distributed case (spawning costs seconds on CPU);
the memory tracker and the model-state walk are also checked in this process.
"""

from __future__ import annotations

import pytest
import torch
from _dist import run_ranks
from torch import nn

from shardwise.run.measure import Call, Clock, PeakMemory, model_state_bytes, quartiles, ring_bytes, summarize

F32 = 4


def _calls(collectives) -> dict:
    """[Collective] -> {(kind, group, bytes): count}"""
    return {(c.kind, c.group, c.bytes): c.count for c in collectives}


def _ranks_main() -> dict:
    """Rank side: DDP + ZeroRedundancyOptimizer, FSDP2 (ZeRO-3), functional collectives, p2p, TP blocks."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from shardwise.run.measure import CollectiveRecorder, GroupNames

    mesh = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("pp", "dp", "tp"))
    names = GroupNames(mesh)
    rank = dist.get_rank()
    out: dict = {}
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(rank))

    torch.manual_seed(0)
    ddp = DDP(
        nn.Sequential(nn.Linear(100, 300), nn.Linear(300, 7)),
        process_group=mesh["dp"].get_group(),
        gradient_as_bucket_view=True,
    )
    zero = ZeroRedundancyOptimizer(
        ddp.parameters(), optimizer_class=torch.optim.AdamW, process_group=mesh["dp"].get_group()
    )
    for step in range(3):
        with CollectiveRecorder(names) as rec:
            ddp(x).sum().backward()
            states = model_state_bytes(zero, "cpu")
            zero.step()
        out[f"ddp{step}"] = (summarize(rec.calls), states)

    fsdp = nn.Sequential(nn.Linear(100, 301), nn.Linear(301, 7))
    fully_shard(fsdp[0], mesh=mesh["dp"])
    fully_shard(fsdp, mesh=mesh["dp"])
    opt = torch.optim.AdamW(fsdp.parameters())
    for step in range(2):
        with CollectiveRecorder(names) as rec:
            fsdp(x).sum().backward()
            states = model_state_bytes(opt, "cpu")
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[f"fsdp{step}"] = (summarize(rec.calls), states)

    with CollectiveRecorder(names) as rec:
        fc.wait_tensor(fc.all_reduce(torch.ones(6), "sum", dist.group.WORLD))
        fc.wait_tensor(fc.all_gather_tensor(torch.ones(6), 0, dist.group.WORLD))
        fc.wait_tensor(fc.reduce_scatter_tensor(torch.ones(6), "sum", 0, dist.group.WORLD))
        if rank == 0:
            dist.send(torch.ones(3), 1)
        else:
            dist.recv(torch.ones(3), 0)
    out["funcol_p2p"] = summarize(rec.calls)
    out |= _tp_blocks()
    return out


def _tp_blocks() -> dict:
    """Rank side: the run tier's TP layout (parallelize.apply_tp) on 2-layer models, tp = 2;
    the forward's and the backward's collectives recorded apart."""
    from torch.distributed.device_mesh import init_device_mesh

    from shardwise.run.measure import CollectiveRecorder, GroupNames
    from shardwise.run.model import build
    from shardwise.run.parallelize import apply_tp
    from shardwise.spec.model import ModelSpec

    mesh = init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("pp", "dp", "tp"))
    names = GroupNames(mesh)
    llama = ModelSpec(name="l", layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, ffn_hidden=128)
    gpt2 = ModelSpec(
        name="g",
        layers=2,
        hidden=64,
        heads=4,
        vocab=128,
        ffn_kind="gelu",
        norm="layernorm",
        positions="learned",
        max_seq=32,
        tied_embeddings=True,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
    )
    out = {}
    for key, spec, sp in (("tp_llama", llama, False), ("tp_llama_sp", llama, True), ("tp_gpt2", gpt2, False)):
        model = build(spec)
        apply_tp(model, mesh["tp"], sp)
        model.to_empty(device="cpu")
        model.tie_weights()
        model.init_weights(0)
        with CollectiveRecorder(names) as fwd:
            y = model(torch.randint(0, spec.vocab, (2, 16)))
        with CollectiveRecorder(names) as bwd:
            y.square().mean().backward()
        out[key] = (summarize(fwd.calls), summarize(bwd.calls))
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_ranks_main, 2)


def test_ddp_steady_state_is_one_bucket_all_reduce(ranks):
    # Linear(100, 300) + Linear(300, 7): 30000 + 300 + 2100 + 7 = 32,407 fp32 parameters
    # = 129,628 bytes, under DDP's 1 MiB first bucket: one all-reduce of 129,628 B per step.
    # ZeroRedundancyOptimizer broadcasts each parameter from its owner after the step:
    # 300*100*4 = 120,000, 7*300*4 = 8,400, 300*4 = 1,200 and 7*4 = 28 bytes.
    want = {
        ("all-reduce", "dp", 129_628): 1,
        ("broadcast", "dp", 120_000): 1,
        ("broadcast", "dp", 8_400): 1,
        ("broadcast", "dp", 1_200): 1,
        ("broadcast", "dp", 28): 1,
    }
    for r in ranks:
        assert _calls(r["ddp0"][0]) == want
        assert _calls(r["ddp2"][0]) == want


def test_ddp_second_step_rebuilds_buckets(ranks):
    # after the first step DDP rebuilds its buckets in gradient-ready order and rank 0 broadcasts
    # the new assignment (Reducer::sync_bucket_indices): [bucket count] then the 4 parameter
    # indices and 1 bucket size (int32), so step 2 is not a steady-state step (check skips it)
    extra = {k: v for k, v in _calls(ranks[0]["ddp1"][0]).items() if k[0] == "broadcast" and k[2] in (4, 20)}
    assert extra == {("broadcast", "dp", 20): 1, ("broadcast", "dp", 4): 1}


def test_ddp_zero1_model_states(ranks):
    # parameters 129,628 B; gradients: DDP's one bucket, the same 129,628 B (they are views of it)
    # ZeroRedundancyOptimizer's partition (largest first, to the emptiest rank): rank 0 owns the
    # 30,000-element weight, rank 1 the other three (2100 + 300 + 7 = 2,407). AdamW: 2 fp32 states
    # per element + a 4-byte step counter per parameter, from the first step on:
    #   rank 0: 2*30000*4 + 4 = 240,004    rank 1: 2*2407*4 + 3*4 = 19,268
    for r, opt in zip(ranks, (240_004, 19_268)):
        assert r["ddp0"][1] == {"params": 129_628, "grads": 129_628, "optimizer": 0}  # no states before step 1
        assert r["ddp2"][1] == {"params": 129_628, "grads": 129_628, "optimizer": opt}


def test_fsdp2_collectives_are_padded_groups(ranks):
    # fully_shard(Linear(100, 301)): dim 0 padded to a multiple of dp=2: weight 302*100 = 30,200,
    # bias 302: one all-gather group of 30,502 elements = 122,008 B (the gathered buffer).
    # The root, Linear(301, 7): weight 8*301 = 2,408 + bias 8 = 2,416 elements = 9,664 B.
    # ZeRO-3: the block is gathered for the forward and again for the backward; the root stays
    # gathered between them; one reduce-scatter of each group's full gradient buffer.
    want = {
        ("all-gather", "dp", 9_664): 1,
        ("all-gather", "dp", 122_008): 2,
        ("reduce-scatter", "dp", 122_008): 1,
        ("reduce-scatter", "dp", 9_664): 1,
    }
    for r in ranks:
        assert _calls(r["fsdp1"][0]) == want


def test_fsdp2_model_states_include_padding(ranks):
    # each rank's parameter and gradient storage is the padded shard: (30,502 + 2,416) / 2
    # = 16,459 elements = 65,836 B on both ranks. AdamW's states follow the unpadded local
    # shards: rank 0 holds rows 0-150 and 0-3: 151*100 + 151 + 4*301 + 4 = 16,459 elements,
    # rank 1 rows 151-300 and 4-6: 150*100 + 150 + 3*301 + 3 = 16,056 elements; two states each
    # plus four 4-byte step counters: 2*16459*4 + 16 = 131,688 and 2*16056*4 + 16 = 128,464.
    for r, opt in zip(ranks, (131_688, 128_464)):
        assert r["fsdp1"][1] == {"params": 65_836, "grads": 65_836, "optimizer": opt}


def test_functional_collectives_and_p2p(ranks):
    # funcol all_reduce of 6 fp32 = 24 B; all_gather_tensor of 6 per rank: the gathered message is
    # 2*24 = 48 B; reduce_scatter_tensor of the full 6: 24 B. One send / recv of 3 fp32 = 12 B.
    # The default group spans the world, which the (1, 2, 1) mesh's dp dim also spans: "dp".
    common = {("all-reduce", "dp", 24): 1, ("all-gather", "dp", 48): 1, ("reduce-scatter", "dp", 24): 1}
    assert _calls(ranks[0]["funcol_p2p"]) == common | {("send", "dp", 12): 1}
    assert _calls(ranks[1]["funcol_p2p"]) == common | {("recv", "dp", 12): 1}


def test_tp_blocks_communicate_like_megatron(ranks):
    # tp = 2, 2 layers, a [2, 16] batch, hidden 64, vocab 128, fp32: an activation [2, 16, 64] is
    # 2*16*64*4 = 8,192 B, the gathered logits [2, 16, 128] 16,384 B, GPT-2's positions [16, 64] 4,096 B.
    # Megatron (Shoeybi et al. 2019, fig. 3): per layer, forward one all-reduce after the attention
    # (wo) and one after the MLP (w2); backward one for the attention's input gradient (q, k, v
    # summed) and one for the MLP's (w1, w3 summed). At the ends: the vocab-parallel embedding's
    # output (forward), the output projection's input gradient (backward), the logits gather.
    #   forward  2*2 + 1 = 5 all-reduces, 1 all-gather;  backward 2*2 + 1 = 5 all-reduces
    want = ({("all-reduce", "tp", 8_192): 5, ("all-gather", "tp", 16_384): 1}, {("all-reduce", "tp", 8_192): 5})
    for r in ranks:
        assert tuple(_calls(c) for c in r["tp_llama"]) == want
        # GELU MLP, biases, tied embeddings: the same, plus the position embedding's all-reduce
        fwd, bwd = want
        assert tuple(_calls(c) for c in r["tp_gpt2"]) == (fwd | {("all-reduce", "tp", 4_096): 1}, bwd)
        # sequence parallel: each all-reduce becomes an all-gather of the sequence shards into the
        # attention / MLP and a reduce-scatter of its output, mirrored in backward; the final norm's
        # output is gathered for the output projection, and the embedding's output scattered:
        #   forward  2*2 + 1 (final norm) = 5 all-gathers, plus the logits; 2*2 + 1 (embedding) = 5 reduce-scatters
        #   backward 2*2 + 1 (output projection) = 5 reduce-scatters; 2*2 + 1 (embedding) = 5 all-gathers
        assert tuple(_calls(c) for c in r["tp_llama_sp"]) == (
            {("all-gather", "tp", 8_192): 5, ("reduce-scatter", "tp", 8_192): 5, ("all-gather", "tp", 16_384): 1},
            {("all-gather", "tp", 8_192): 5, ("reduce-scatter", "tp", 8_192): 5},
        )


# ---- in this process ------------------------------------------------------------------------------
def test_peak_memory_follows_allocations_and_frees():
    # parameters 256*256*4 = 262,144 B exist before; then a (4,000 B) and b (8,000 B) live
    # together, a is freed, c (2,000 B) comes: the peak is 262,144 + 4,000 + 8,000 = 274,144 B
    lin = nn.Linear(256, 256, bias=False)
    pm = PeakMemory(torch.device("cpu"), torch.optim.SGD(lin.parameters(), lr=0.1))
    with pm.track():
        a = torch.ones(1000)
        b = torch.ones(2000)
        del a
        c = torch.ones(500)
    assert pm.peak == 262_144 + 4_000 + 8_000
    del b, c


def test_peak_memory_survives_repeated_root_forwards():
    # gradient accumulation calls the root module's forward again in one tracked step;
    # MemTracker's per-module statistics refuse that; our tracker keeps only the device peak
    lin = nn.Linear(64, 64)
    pm = PeakMemory(torch.device("cpu"), torch.optim.SGD(lin.parameters(), lr=0.1))
    with pm.track():
        for _ in range(3):
            lin(torch.randn(8, 64)).sum().backward()
    # at least the weights, their gradients and one input/output pair were alive together
    assert pm.peak >= 2 * (64 * 64 + 64) * F32 + 2 * 8 * 64 * F32


def test_model_states_count_shared_storage_once():
    # tied embeddings (a language model's input and output matrix) are one parameter; SGD with
    # momentum keeps one buffer per parameter
    model = nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 32, bias=False))
    model[1].weight = model[0].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.arange(4)).sum().backward()
    opt.step()
    # 32*16*4 = 2,048 B of parameters, 2,048 of gradients, 2,048 of momentum
    assert model_state_bytes(opt, "cpu") == {"params": 2048, "grads": 2048, "optimizer": 2048}


def test_summarize_groups_equal_calls():
    calls = [Call("all-reduce", "dp", 2, 400, "float32")] * 3 + [Call("broadcast", "dp", 2, 8, "float32")]
    out = summarize(calls)
    assert [(c.kind, c.bytes, c.count) for c in out] == [("all-reduce", 400, 3), ("broadcast", 8, 1)]
    # ring all-reduce over 2 ranks sends 2*(2-1)/2 * 400 = 400 B per call: 3 calls 1,200 B
    assert out[0].wire_bytes == 1200


def test_ring_bytes():
    # 4 ranks, 1,000 B: all-reduce 2*3/4*1000 = 1,500; all-gather / reduce-scatter 3/4*1000 = 750
    assert ring_bytes("all-reduce", 1000, 4) == 1500
    assert ring_bytes("all-gather", 1000, 4) == 750
    assert ring_bytes("reduce-scatter", 1000, 4) == 750
    assert ring_bytes("send", 1000, 2) == 1000
    assert ring_bytes("all-reduce", 1000, 1) == 0


def test_clock_splits_forward_and_optimizer():
    import time

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            time.sleep(0.02)
            return x * self.w

    m = Slow()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    clock = Clock([m], opt)
    try:
        m(torch.ones(1)).sum().backward()
        opt.step()
        assert 0.02 <= clock.forward_s < 0.5
        assert 0 < clock.optimizer_s < clock.forward_s
        # a wait inside the forward counts as waiting, not as forward
        clock.reset()
        clock._fwd_start()
        clock.add_wait(0.01)
        clock._fwd_end()
        assert clock.wait_s == 0.01 and clock.forward_s < 0.01
    finally:
        clock.close()


def test_work_wait_is_restored():
    import torch._C._distributed_c10d as c10d

    clock = Clock([], None)
    before = c10d.Work.wait
    with clock.timing_waits():
        assert c10d.Work.wait is not before
    assert c10d.Work.wait is before


def test_quartiles_of_the_timed_steps_hand_worked():
    # exclusive method: the k-th quartile of n sorted steps sits at position (n + 1) * k / 4.
    # 8 steps of 10..80 ms: q1 at 2.25 -> 20 + 0.25 * 10 = 22.5 ms; q3 at 6.75 -> 60 + 0.75 * 10 = 67.5 ms
    steps = [0.07, 0.01, 0.03, 0.08, 0.02, 0.05, 0.04, 0.06]
    assert quartiles(steps) == pytest.approx((0.0225, 0.0675))
    # one slow step of four: the median stays 10 ms, the third quartile shows the spike
    assert quartiles([0.01, 0.01, 0.01, 0.5]) == pytest.approx((0.01, 0.3775))  # q3 at 3.75: 0.01 + 0.75 * 0.49
    assert quartiles([0.02]) == (0.02, 0.02) and quartiles([]) == (0.0, 0.0)
