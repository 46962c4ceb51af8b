"""Context parallelism in the estimate: the K/V exchange's bytes per ring step, the buffers in
flight, the activations split over cp, attention's keys, what hides, the rules, and long
sequences that fit (estimate/context.py)."""

from __future__ import annotations

import json

import pytest

import shardwise as sw
from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.estimate import context
from shardwise.estimate.memory import saved_activations
from shardwise.estimate.time import layer_gemms
from shardwise.spec.plan import Plan

MiB = 1 << 20
L8 = sw.preset("llama-3.1-8b")  # 32 layers, q_dim 4096, 8 KV heads x 128 = kv_dim 1024


def _est(plan, gpus, model=L8, **kw):
    return sw.estimate(model, sw.make_cluster("h100-80gb", gpus), plan, **kw)


def _cp(e):
    return {c.what: c for c in e.comm if c.group == "cp"}


def test_ring_bytes_per_step_hand_worked():
    # Llama 3.1 8B, seq 131,072 over cp 16 (8,192 tokens a rank), tp 8, bf16: K and V of a rank are
    # 8,192 x 1,024/8 x 2 bytes = 2 MiB each, so E = K|V = 4 MiB; the all-gather's whole buffer is
    # 16 x 4 = 64 MiB and a rank sends 15 x 4 = 60 MiB of it; dK|dV in fp32: 8 MiB a pass
    e = _est(Plan(tp=8, cp=16, seq=131072, gbs=2, zero=3), 256)  # dp 2, one micro-batch each
    assert e.plan.dp == 2 and e.plan.grad_accum == 1
    cp = _cp(e)
    fwd = cp["K/V to every cp rank, forward (allgather rotate)"]
    assert (fwd.bytes, fwd.count, fwd.ranks) == (64 * MiB, 32, 16)  # one a layer
    assert fwd.wire_bytes == 32 * 60 * MiB
    assert fwd.link == "network"  # cp x tp = 128 ranks span 16 nodes
    grad = cp["dK/dV (fp32) ring pass to the next cp rank, backward"]
    assert (grad.kind, grad.bytes, grad.count) == ("all-to-all", 8 * MiB, 16 * 32)  # cp passes a layer (permute_tensor)
    assert grad.wire_bytes == 16 * 32 * 8 * MiB
    # alltoall: cp-1 passes of E a layer, forward and backward
    e = _est(Plan(tp=8, cp=16, seq=131072, gbs=2, zero=3, cp_rotate="alltoall"), 256)
    ring = _cp(e)["K/V ring pass to the next cp rank, forward"]
    assert (ring.kind, ring.bytes, ring.count, ring.wire_bytes) == ("all-to-all", 4 * MiB, 15 * 32, 15 * 32 * 4 * MiB)
    assert "cp16/a2a" in e.plan.short()


def test_recompute_reruns_the_exchange():
    base = dict(tp=8, cp=16, seq=131072, gbs=2, zero=3)
    fwd = "K/V to every cp rank, forward (allgather rotate)"
    assert _cp(_est(Plan(**base, recompute="full"), 256))[fwd].count == 64
    assert _cp(_est(Plan(**base, recompute="selective-op"), 256))[fwd].count == 32  # keeps the kernel's output
    assert _cp(_est(Plan(**base, recompute="selective-layer:4"), 256))[fwd].count == 32 + 8


def test_buffers_in_flight_hand_worked():
    # the same rank: the gathered K|V of the whole sequence, 16 x 4 MiB = 64 MiB; fp32 dQ (8,192 x
    # 4,096/8 x 4 = 16 MiB), dK|dV (8 MiB) and the dK|dV pass sent and received (2 x 8 MiB): 40 MiB
    p = Plan(tp=8, cp=16, seq=131072, gbs=2, zero=3).resolve(L8, 256)
    assert context.ring_buffers(L8, p, 2) == (64 * MiB, 40 * MiB)
    assert context.ring_buffers(L8, p.replace(cp_rotate="alltoall"), 2) == (8 * MiB, 40 * MiB)  # this step's + next
    d = _est(p, 256).memory.detail
    assert d["buffers.cp_kv_in_flight"] == 64 * MiB and d["buffers.cp_grad_kv"] == 40 * MiB


def test_activations_split_over_cp():
    # every tensor a block saves with fused attention is per token (or per position): cp ranks of
    # seq/cp tokens each keep exactly 1/cp of them (FSDP on both sides, so the same dtypes)
    one = saved_activations(L8, Plan(tp=8, dp=2, zero=3, seq=131072, gbs=2).resolve(L8, 16))
    split = saved_activations(L8, Plan(tp=8, dp=2, cp=16, zero=3, seq=131072, gbs=2).resolve(L8, 256))
    assert one == 16 * split


def test_attention_meets_every_key():
    # a cp rank's queries (seq/cp) against all seq keys: cp times its local plan's core
    p = Plan(tp=8, cp=16, seq=131072, gbs=2, zero=3).resolve(L8, 256)
    local = context.local_plan(p)
    assert (local.seq, local.dp, local.gbs, local.cp, local.world) == (8192, 32, 32, 1, 256)
    core = layer_gemms(L8, local, keys=131072)["attention_core"][0]
    assert core == 2 * 8192 * 131072 * 4096 / 8 == 16 * layer_gemms(L8, local)["attention_core"][0]
    # the model FLOPs of a step are the sequence's, whichever way it is split
    flat = _est(Plan(tp=8, seq=131072, gbs=32, zero=3), 256)
    assert _est(p, 256).time.flops_per_step * 16 == flat.time.flops_per_step  # 2 sequences, and 32


def test_exchange_hides_behind_attention():
    e = _est(Plan(tp=8, cp=16, seq=131072, gbs=2, zero=3), 256)
    t = e.time.detail
    assert t["cp_comm_s"] == pytest.approx(sum(c.seconds for c in _cp(e).values()))
    assert 0 < t["cp_exposed_s"] < t["cp_comm_s"]  # partly hidden on the network
    # inside a node (cp x tp = 8), NVLink: the all-gather (1/cp of the attention to hide behind)
    # and the passes all hide
    inside = _est(Plan(tp=1, cp=8, seq=131072, gbs=1, zero=3), 8).time.detail
    assert inside["cp_exposed_s"] == 0 < inside["cp_comm_s"]


@pytest.mark.parametrize(
    "plan, gpus, words",
    [
        (Plan(cp=3, seq=131072), 3, "2*cp = 6 load-balanced chunks: seq=131072 is not a multiple of 6"),
        (Plan(cp=4, tp=8), 16, "tp*pp*cp = 32 does not divide 16 GPUs"),
        (Plan(cp=2, dp=4), 16, "dp*tp*pp*cp = 4*1*1*2 = 8 but there are 16 GPUs"),
        (Plan(cp=2, attention="math"), 2, "use --attention flash"),
        (Plan(cp=2, tp=8, sp=True, seq=8200), 16, "make seq a multiple of cp*tp = 16"),
        (Plan(cp_rotate="ring"), 1, "unknown cp_rotate 'ring'"),
    ],
)
def test_bad_plans(plan, gpus, words):
    with pytest.raises(ShardwiseError, match=words.replace("*", r"\*")):
        plan.resolve(L8, gpus)


def test_cli_bad_cp_one_line(capsys):
    rc = main(["estimate", "llama-3.1-8b", "--gpus", "6", "--cp", "3", "--seq", "131072"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "use --seq 131076" in err


@pytest.mark.parametrize(
    "name, gpus, plan",
    [
        ("llama-3.1-8b", 8, Plan(cp=8, zero=3, recompute="selective-layer")),
        ("llama-3.1-70b", 64, Plan(tp=8, cp=8, zero=3, sp=True, recompute="full")),
        ("llama-3.1-405b", 512, Plan(tp=4, cp=8, zero=3, sp=True, recompute="full")),
    ],
)
def test_long_context_fits(name, gpus, plan):
    # the plans `shardwise plan NAME --gpus N --seq 131072` recommends (test_search_offers_cp)
    e = _est(plan.replace(seq=131072, gbs=32), gpus, sw.preset(name))
    assert e.memory.fits and e.memory.total < 0.9 * e.memory.capacity
    # and without cp the same plan does not
    flat = _est(plan.replace(seq=131072, gbs=0, cp=1), gpus, sw.preset(name))  # one sequence per dp rank
    assert not flat.memory.fits


def test_search_offers_cp():
    one = dict(zero=3, tp=1, pp=1, recompute="selective-layer", offload="none", dp_shard=0, mbs=1)
    ranked = sw.search(L8, sw.make_cluster("h100-80gb", 8), seq=131072, top=3, **one)
    assert ranked and ranked[0].plan.cp == 8 and ranked[0].memory.fits
    # short sequences: cp is not searched (MIN_CP_CHUNK) unless pinned
    assert {e.plan.cp for e in sw.search(L8, sw.make_cluster("h100-80gb", 8), seq=4096, top=None, **one)} == {1, 2}
    assert {e.plan.cp for e in sw.search(L8, sw.make_cluster("h100-80gb", 8), seq=4096, cp=4, top=None, **one)} == {4}


@pytest.mark.parametrize("name, gpus", [("llama-3.1-8b", 8), ("llama-3.1-70b", 64), ("llama-3.1-405b", 512)])
def test_plan_long_context(capsys, name, gpus):
    # ZeRO-3 without a pipeline pinned, to keep the search to a few seconds
    rc = main(["plan", name, "--gpus", str(gpus), "--seq", "131072", "--zero", "3", "--pp", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    best = out["ranked"][0] if "ranked" in out else out["plans"][0]
    assert best["memory"]["fits"] and best["plan"]["cp"] > 1


def test_exports_map_cp(tmp_path):
    from _export import job

    from shardwise.export import READERS, export, read_file

    # Llama 3's long-context layout at a size a test can resolve: TP 8 x CP 16 x PP 16 on 2,048 GPUs
    j = job("llama-3.1-405b", gpus=2048, tp=8, cp=16, pp=16, zero=3, sp=True, seq=131072, gbs=16)
    text = export("torchtitan", j).text
    assert "context_parallel_degree = 16" in text and 'context_parallel_rotate_method = "allgather"' in text
    path = tmp_path / "torchtitan.toml"
    path.write_text(text)
    assert (read_file(str(path)).plan["cp"], read_file(str(path)).plan["zero"]) == (16, 3)
    # torchtitan shards over dp_shard*cp whenever cp > 1: a ZeRO-0/1 plan with cp has no config
    assert "use --zero 3" in READERS["torchtitan"].refuse(job(gpus=16, cp=2, zero=0))
    j = job(gpus=16, cp=4, tp=2, zero=1, cp_rotate="alltoall", seq=8192, gbs=4)
    flags = export("megatron", j).text
    assert "--context-parallel-size 4" in flags and "--cp-comm-type p2p" in flags
    for fmt in ("deepspeed", "accelerate"):
        assert "--cp 1" in READERS[fmt].refuse(job(gpus=16, cp=2, zero=3))
