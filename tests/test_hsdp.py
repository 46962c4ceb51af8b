"""HSDP (--dp-shard S): ZeRO-2/3 states sharded over groups of S data-parallel ranks, replicated
across dp / S groups, FSDP2 fully_shard on a 2-D (replicate, shard) mesh.

Estimate: the states of dp = 64, S = 8 are those of plain FSDP over 8; the collectives are
FSDP2's gathers and reduce-scatters inside the shard group plus one all-reduce of each
reduce-scatter's output across the replicas, each on its own link (hand-worked for Llama 3.1 8B).
Run: training under HSDP equals one process (gloo, CPU), and `shardwise check`'s comparison
holds the collectives exactly and the model states within 1% against a measured HSDP run.
"""

from __future__ import annotations

import pytest
from _dist import run_ranks

from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.estimate.comm import collectives
from shardwise.estimate.memory import memory
from shardwise.spec.hardware import make_cluster
from shardwise.spec.plan import Plan
from shardwise.spec.presets import load_model

L8B = load_model("llama-3.1-8b")
H100_64 = make_cluster("h100-80gb", 64)


def test_plan_fields_and_name():
    p = Plan(zero=3, dp_shard=8, gbs=2048).resolve(L8B, 64)
    assert (p.dp, p.shard, p.replicate) == (64, 8, 8)
    assert "hsdp8" in p.short()
    flat = Plan(zero=3, gbs=2048).resolve(L8B, 64)
    assert (flat.shard, flat.replicate) == (64, 1) and "hsdp" not in flat.short()
    # S = dp is plain FSDP: no hsdp in the name
    assert "hsdp" not in Plan(zero=3, dp_shard=64, gbs=2048).resolve(L8B, 64).short()


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(zero=3, dp_shard=7), "--dp-shard 7 must divide dp=64"),
        (dict(zero=3, dp_shard=128), "--dp-shard 128 must divide dp=64"),
        (dict(zero=1, dp_shard=8), "with --zero 1 nothing is sharded that way"),
        (dict(zero=3, dp_shard=-2), "dp_shard must be a non-negative integer"),
    ],
)
def test_bad_shard_groups_are_one_line(fields, words):
    with pytest.raises(ShardwiseError, match=words):
        Plan(gbs=2048, **fields).resolve(L8B, 64)


def test_bad_dp_shard_on_the_command_line(capsys):
    assert main(["estimate", "llama-3.1-8b", "--gpus", "64", "--zero", "3", "--dp-shard", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "try --dp-shard in [1, 2, 4, 8, 16, 32, 64]" in err


def test_states_are_those_of_fsdp_over_the_shard_group():
    # dp 64 sharded in groups of 8 holds what plain FSDP over 8 ranks holds (same micro-batches: ga 32)
    hsdp = memory(L8B, H100_64, Plan(zero=3, dp_shard=8, gbs=2048).resolve(L8B, 64))
    over8 = memory(L8B, make_cluster("h100-80gb", 8), Plan(zero=3, gbs=256).resolve(L8B, 8))
    flat = memory(L8B, H100_64, Plan(zero=3, gbs=2048).resolve(L8B, 64))
    for f in ("params", "grads", "optimizer"):
        assert getattr(hsdp, f) == getattr(over8, f)
    # 8B parameters, every row count divisible by 64: the shards are exactly 8x the flat ones
    assert hsdp.optimizer == 8 * flat.optimizer == 8_030_261_248  # fp32 Adam moments: 8 B x 8.03B / 8
    assert hsdp.detail["params.sharded"] == 8 * flat.detail["params.sharded"] == 4 * 8_030_261_248 // 8


def test_collectives_hand_worked():
    """Llama 3.1 8B, dp 64 in 8 groups of 8 (one node each), ZeRO-3 bf16-mixed, 32 micro-batches.
    A block: 4096*4096*2 (wq, wo) + 4096*1024*2 (wk, wv) + 3*4096*14336 (w1, w2, w3) + 2*4096
    (norms) = 218,112,000 elements. All-gathered in bf16: 436,224,000 B, 2 per micro-batch per
    block: 2 * 32 * 32 = 2,048 calls; reduce-scattered in fp32: 872,448,000 B, 32 * 32 = 1,024;
    each reduce-scatter's output, 218,112,000 / 8 * 4 = 109,056,000 B, all-reduced across the
    8 replicas (ranks 8 apart: across nodes)."""
    plan = Plan(zero=3, dp_shard=8, gbs=2048).resolve(L8B, 64)
    comm = collectives(L8B, H100_64, plan)
    one = lambda kind, group, what: next(c for c in comm if (c.kind, c.group) == (kind, group) and what in c.what)
    ag = one("all-gather", "dp_shard", "of each transformer block")
    assert (ag.ranks, ag.bytes, ag.count, ag.link) == (8, 436_224_000, 2048, "intra-node")
    rs = one("reduce-scatter", "dp_shard", "of each transformer block")
    assert (rs.ranks, rs.bytes, rs.count, rs.link) == (8, 872_448_000, 1024, "intra-node")
    ar = one("all-reduce", "dp_replicate", "of each transformer block")
    assert (ar.ranks, ar.bytes, ar.count, ar.link) == (8, 109_056_000, 1024, "network")
    # ring all-reduce over 8 ranks: 2 * 7 / 8 of the bytes on the wire
    assert ar.wire_bytes == 2 * 7 * 109_056_000 * 1024 // 8
    # without HSDP the whole dp group gathers, across nodes, and nothing is all-reduced
    flat = collectives(L8B, H100_64, Plan(zero=3, gbs=2048).resolve(L8B, 64))
    assert {(c.kind, c.group, c.link) for c in flat if c.group.startswith("dp")} == {
        ("all-gather", "dp", "network"),
        ("reduce-scatter", "dp", "network"),
    }


def test_hsdp_moves_the_gathers_inside_the_node():
    # the same 64 GPUs: gathers over 8 ranks on NVLink instead of 64 over the network
    hsdp = estimate(L8B, H100_64, Plan(zero=3, dp_shard=8, gbs=2048))
    flat = estimate(L8B, H100_64, Plan(zero=3, gbs=2048))
    gathered = lambda e: sum(c.seconds for c in e.comm if c.kind == "all-gather")
    assert gathered(hsdp) < gathered(flat) / 2


def test_array_plans_agree_with_scalar_ones():
    import numpy as np

    plans = [Plan(zero=3, dp_shard=s, gbs=2048).resolve(L8B, 64) for s in (0, 8, 16)]
    arr = plans[0].replace(dp_shard=np.array([0, 8, 16]), dp=np.array([64, 64, 64]))
    mem = memory(L8B, H100_64, arr)
    comm = collectives(L8B, H100_64, arr)
    for i, p in enumerate(plans):
        one = memory(L8B, H100_64, p)
        assert mem.total[i] == one.total
        assert sum(c.wire_bytes[i] for c in comm) == sum(c.wire_bytes for c in collectives(L8B, H100_64, p))


# ---- the run tier, against one process and against the estimate ----------------------------------------
HSDP_PLANS = [dict(dp=4, dp_shard=2, zero=3), dict(dp=4, dp_shard=2, zero=2)]


@pytest.mark.slow
def test_hsdp_trains_like_one_process():
    from _models import TINY_LLAMA
    from test_equivalence import BASE, assert_same_training, train_all

    items = [(TINY_LLAMA, BASE.replace(**f).resolve(TINY_LLAMA, 4)) for f in HSDP_PLANS]
    ranks = run_ranks(train_all, 4, items, timeout=420)
    for i, (spec, plan) in enumerate(items):
        for r in range(1, 4):
            assert ranks[r][i][0] == ranks[0][i][0]
        assert_same_training(spec, plan, ranks[0][i])


@pytest.mark.slow
def test_hsdp_matches_measured_runs_on_4_ranks():
    from test_check import LLAMA, _cfg, _hold

    _hold([_cfg(LLAMA, 4, **f) for f in HSDP_PLANS], 4)


def test_search_scores_hsdp_plans_as_estimate_does():
    """Every HSDP plan a search ranks has the tokens/s `estimate` gives it one at a time."""
    from shardwise.search.core import run_search

    res = run_search(load_model("llama-3.1-70b"), make_cluster("h100-80gb", 256), top=None)
    rows = [i for i in range(len(res.table)) if res.table.cols["dp_shard"][i]][:40]
    assert rows
    for i in rows:
        e = res.estimate_row(i)
        assert 0 < e.plan.dp_shard < e.plan.dp
        assert e.time.tokens_per_s == pytest.approx(res.table.cols["tokens_per_s"][i], rel=1e-9)
