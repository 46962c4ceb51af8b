"""Uneven pipeline stages: the last stage may hold fewer transformer blocks than the others
(Plan.last_less; left at 0, the remainder when pp*vpp does not divide the layers).

Llama 3.1 405B (126 layers) on 16,384 GPUs as TP 8 x PP 16 (the Llama 3 paper, §3.3): 15
stages of 8 blocks and a last one of 6 with the output layer and loss. The estimate's memory
takes each stage's own blocks, its time the busiest stage's; `shardwise run` builds the same
stages, trains like one process, and measures what the estimate predicts.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _dist import run_ranks

from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.estimate.comm import collectives
from shardwise.estimate.memory import memory
from shardwise.estimate.pipeline import chunk_blocks, rank_blocks
from shardwise.estimate.time import layer_forward_flops_per_token, matmul_weights
from shardwise.spec.hardware import make_cluster
from shardwise.spec.plan import Plan, stage_blocks
from shardwise.spec.presets import load_model

L405 = load_model("llama-3.1-405b")
CLUSTER = make_cluster("h100-80gb", 16384)


def test_split_of_126_layers_over_16_stages():
    p = Plan(tp=8, pp=16, gbs=2048).resolve(L405, 16384)
    assert stage_blocks(p, 126) == (8, 6)  # 15 x 8 + 6 = 126
    assert (rank_blocks(L405, p, False), rank_blocks(L405, p, True)) == (8, 6)
    # given explicitly: Llama 3.1 8B's 32 layers over 4 stages as 9, 9, 9 and 5
    l8 = load_model("llama-3.1-8b")
    q = Plan(pp=4, gbs=64, last_less=4).resolve(l8, 4)
    assert stage_blocks(q, 32) == (9, 5) and "last-4" in q.short()
    # an even split stays even, and arrays split element by element
    assert stage_blocks(Plan(pp=4, last_less=0), 32) == (8, 8)
    assert stage_blocks(Plan(pp=4, last_less=4), 32) == (9, 5)
    n, last = stage_blocks(Plan(pp=np.array([2, 4, 16]), last_less=np.array([0, 0, 0])), 126)
    assert n.tolist() == [63, 32, 8] and last.tolist() == [63, 30, 6]


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(tp=8, pp=16, last_less=3), "--last-less 3: 126 + 3 is not a multiple of the 16 stages"),
        (dict(tp=8, pp=16, last_less=3), "use --last-less 2"),
        (dict(tp=8, pp=16, last_less=18), "leaves the last stage -9 layers"),
        (dict(tp=8, pp=16, schedule="interleaved", vpp=2), "uneven stages are modeled for gpipe and 1f1b only"),
        (dict(tp=8, pp=1, dp=2048, last_less=2), "--last-less 2 needs pp > 1"),
        (dict(tp=8, pp=16, last_less=-1), "last_less must be a non-negative integer"),
    ],
)
def test_bad_splits_are_one_line(fields, words):
    with pytest.raises(ShardwiseError, match=re.escape(words)):
        Plan(gbs=2048, **fields).resolve(L405, 16384)


def test_bad_split_on_the_command_line(capsys):
    argv = ["estimate", "llama-3.1-405b", "--gpus", "16384", "--tp", "8", "--pp", "16", "--last-less", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "use --last-less 2" in err


def test_time_takes_the_busiest_stage():
    """Per token, a 405B block's forward is 2 x 3,187,671,040 matmul weights + the attention core,
    the output layer 2 x 16384 x 128256 = 4,202,692,608 FLOPs, about 0.6 of a block at seq 2048.
    So the first stage's 8 blocks outweigh the last's 6 + the head, and its forward is 8 blocks';
    an even split of 128 layers (a 405B with two more) has the head on its busiest, last, stage.
    At a flat matmul efficiency (--efficiency) forward time is FLOPs; the default per-GEMM model
    adds each call's fixed cost and memory-bound work, and must still pick the first stage."""
    lf = layer_forward_flops_per_token(L405, 2048)
    head = 2 * matmul_weights(L405)["head"]
    assert head == 2 * 16384 * 128256 == 4_202_692_608
    assert 8 * lf > 6 * lf + head
    e = estimate(L405, CLUSTER, Plan(tp=8, pp=16, gbs=2048), efficiency=0.5)
    e128 = estimate(L405.scaled(layers=128), CLUSTER, Plan(tp=8, pp=16, gbs=2048), efficiency=0.5)
    ratio = e.time.detail["forward_s"] / e128.time.detail["forward_s"]
    assert ratio == pytest.approx(8 * lf / (8 * lf + head), rel=1e-12)
    shaped = estimate(L405, CLUSTER, Plan(tp=8, pp=16, gbs=2048)).time.detail["forward_s"]
    shaped128 = estimate(L405.scaled(layers=128), CLUSTER, Plan(tp=8, pp=16, gbs=2048)).time.detail["forward_s"]
    assert shaped < shaped128  # the 126-layer split's busiest stage is lighter than the 128-layer one's last


def test_memory_takes_each_stage_at_its_own_blocks():
    """The first stage of the 126-layer split is that of an even 128-layer one (8 blocks, the same
    micro-batches in flight); the last stage holds 2 blocks fewer than the even one's: per block,
    the matrices (2 x 16384^2 + 2 x 16384 x 1024 + 3 x 16384 x 53248 = 3,187,671,040) split over
    tp 8 and the two norms (2 x 16384) whole, 4 bytes each (bf16-mixed keeps fp32 parameters)."""
    p = Plan(tp=8, pp=16, gbs=2048, zero=1).resolve(L405, 16384)
    m128 = L405.scaled(layers=128)
    even = Plan(tp=8, pp=16, gbs=2048, zero=1).resolve(m128, 16384)
    assert memory(L405, CLUSTER, p, stage="first").total == memory(m128, CLUSTER, even, stage="first").total
    assert L405.layer_params == 3_187_671_040 + 32_768
    local_block = 3_187_671_040 // 8 + 32_768
    last = memory(L405, CLUSTER, p, stage="last").detail["params.local"]
    assert memory(m128, CLUSTER, even, stage="last").detail["params.local"] - last == 2 * local_block * 4


def test_collectives_count_the_first_stage_blocks():
    p = Plan(tp=8, pp=16, gbs=2048).resolve(L405, 16384)
    tp_fwd = next(c for c in collectives(L405, CLUSTER, p) if c.group == "tp" and "block outputs" in c.what)
    assert tp_fwd.count == 2 * 8 * p.grad_accum  # attention and FFN of each of rank 0's 8 blocks


def test_array_plans_agree_with_scalar_ones():
    plans = [Plan(tp=8, pp=pp, gbs=2048).resolve(L405, 16384) for pp in (16, 8, 2)]
    arr = plans[0].replace(
        pp=np.array([p.pp for p in plans]),
        dp=np.array([p.dp for p in plans]),
        last_less=np.array([p.last_less for p in plans]),
    )
    mem = memory(L405, CLUSTER, arr)
    for i, p in enumerate(plans):
        assert mem.total[i] == memory(L405, CLUSTER, p).total
    assert chunk_blocks(L405, arr, True).tolist() == [6, 14, 63]


# ---- the run tier ---------------------------------------------------------------------------------
UNEVEN = {
    2: [dict(pp=2, last_less=2), dict(pp=2, last_less=2, schedule="gpipe")],
    3: [dict(pp=3)],  # 4 layers over 3 stages: 2, 2 and a last stage of the head alone
    4: [dict(dp=2, pp=2, zero=3, last_less=2), dict(dp=2, pp=2, zero=1, last_less=2)],
}


def test_run_builds_the_plan_stages():
    from _models import TINY_LLAMA

    from shardwise.run.model import build
    from shardwise.run.parallelize import split_pipeline

    plan = Plan(pp=3, mbs=1, gbs=3, seq=32).resolve(TINY_LLAMA, 3)
    full = build(TINY_LLAMA)
    stages = [split_pipeline(full, plan, r)[0][1] for r in range(3)]
    assert [sorted(int(k) for k in s.layers) for s in stages] == [[0, 1], [2, 3], []]
    assert stages[0].tok_embeddings is not None and stages[2].output is not None and stages[1].output is None


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(UNEVEN))
def test_uneven_stages_train_like_one_process(world):
    from _models import TINY_GPT2, TINY_LLAMA
    from test_equivalence import BASE, assert_same_training, train_all

    specs = [TINY_LLAMA] if world != 2 else [TINY_LLAMA, TINY_GPT2]
    items = [(s, BASE.replace(**f).resolve(s, world)) for s in specs for f in UNEVEN[world]]
    ranks = run_ranks(train_all, world, items, timeout=420)
    for i, (spec, plan) in enumerate(items):
        assert_same_training(spec, plan, ranks[0][i])


@pytest.mark.slow
def test_uneven_stages_match_measured_runs():
    from test_check import GPT2, LLAMA, _cfg, _hold

    _hold([_cfg(LLAMA, 2, pp=2, last_less=2), _cfg(GPT2, 2, pp=2, last_less=2)], 2)
    # (FSDP2 under a pipeline is left out: its peak is over-predicted by ~1 MB on these tiny stages
    # with an even split too, +4% / +7%, which is +7% / +13% of the smaller uneven stages)
    _hold([_cfg(LLAMA, 4, dp=2, pp=2, zero=1, last_less=2)], 4)
