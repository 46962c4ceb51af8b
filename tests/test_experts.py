"""Expert parallelism in the estimate, worked by hand on a tiny MoE model: the all-to-all's bytes and
calls, the EP x DP layout's model states, the expert gradients' own group, and the rules.

TINY: 2 blocks, hidden 64, 4 heads, vocab 128, 4 routed experts (top-2) of SwiGLU width 32.
  one routed expert 3 * 64 * 32 = 6,144 elements; a block: attention 4 * 64^2 = 16,384, norms 128,
  router 4 * 64 = 256, experts 4 * 6,144 = 24,576 -> 41,344; the model 2 * 41,344 + embedding 8,192
  + final norm 64 + output 8,192 = 99,136 elements.
"""

import pytest

from shardwise import estimate, make_cluster
from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.estimate import experts
from shardwise.estimate.memory.experts import PPM, block_keep, rank_keep
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan

TINY = ModelSpec(name="tiny-moe", layers=2, hidden=64, heads=4, vocab=128, experts=4, top_k=2, expert_ffn_hidden=32)


def _est(gpus=4, **plan):
    return estimate(TINY, make_cluster("h100-80gb", gpus), Plan(seq=16, **plan))


def test_tiny_counts():
    assert TINY.params == 99_136 and experts.routed_expert_numel(TINY, 1) == 6_144


def test_all_to_all_bytes_and_calls_by_hand():
    # torch profile, bf16-mixed: the block input is the fp32 residual stream under autocast (4 bytes)
    # one dispatch = mbs * seq * top_k rows of hidden = 1 * 16 * 2 * 64 * 4 = 8,192 bytes
    # calls: 4 per MoE block per micro-batch (dispatch, combine, their backward) * 2 blocks * ga 2 = 16
    # sent per rank: (ep - 1) / ep of every call = 1/2 * 16 * 8,192 = 65,536
    e = _est(ep=2, gbs=8)
    (a2a,) = [c for c in e.comm if c.kind == "all-to-all"]
    assert (a2a.group, a2a.ranks, a2a.bytes, a2a.count, a2a.wire_bytes) == ("ep", 2, 8_192, 16, 65_536)
    assert a2a.link == "intra-node" and not a2a.overlapped
    # capacity factor 1.25 pads each buffer: 10,240 bytes; full recompute reruns the two forward ones
    e = _est(ep=2, gbs=8, capacity=1.25, recompute="full")
    (a2a,) = [c for c in e.comm if c.kind == "all-to-all"]
    assert (a2a.bytes, a2a.count) == (10_240, (4 * 2 + 2 * 2) * 2)
    # ep = 4 over 8 GPUs of 4 per node: the group spans 4 * tp = 4 ranks, one node
    e = estimate(TINY, make_cluster("h100-80gb", 8, gpus_per_node=2), Plan(seq=16, ep=4))
    (a2a,) = [c for c in e.comm if c.kind == "all-to-all"]
    assert a2a.link == "network" and a2a.wire_bytes == 3 * 8 * 8_192 // 4


def test_model_states_on_the_ep_dp_layout_by_hand():
    # ep = 2: a rank holds 2 of the 4 routed experts of each block: 2 blocks * 2 * 6,144 = 24,576 of
    # its 99,136 elements are elsewhere, 247,901 per million (floor), so it keeps 752,099 per million
    assert rank_keep(TINY, Plan(dp=4, ep=2)) == PPM - 24_576 * PPM // 99_136 == 752_099
    # a MoE block gathered by FSDP2 keeps 41,344 - 12,288 of 41,344 elements
    assert block_keep(TINY, Plan(dp=4, ep=2)) == PPM - 12_288 * PPM // 41_344
    # ZeRO-0 (DDP): fp32 parameters, gradients and both Adam moments of the held experts only
    base, ep = _est(zero=0).memory, _est(zero=0, ep=2).memory
    assert base.params == 99_136 * 4 == 396_544
    assert ep.params == 396_544 * 752_099 // PPM == 298_240
    assert ep.grads == base.grads * 752_099 // PPM and ep.optimizer == base.optimizer * 752_099 // PPM
    # ZeRO-1: the sharded optimizer states are the same per rank (experts/ep over dp/ep = experts/dp)
    base, ep = _est(zero=1).memory, _est(zero=1, ep=2).memory
    assert ep.optimizer == base.optimizer and ep.params < base.params
    # ZeRO-3: the sharded states are the same; the gathered block shrinks
    base, ep = _est(zero=3).memory, _est(zero=3, ep=2).memory
    assert ep.detail["params.sharded"] == base.detail["params.sharded"]
    assert ep.optimizer == base.optimizer and ep.params < base.params


def test_expert_gradients_reduce_over_dp_over_ep():
    # DDP: the routed experts' share of rank 0's 99,136 elements (24,576 * 2 = 49,152 held without EP)
    # leaves the dp all-reduce; 1/ep of it (the held experts) goes over the edp group of dp/ep = 2
    # ranks, ep * tp = 2 apart
    base = {c.group: c for c in _est(zero=0).comm}
    ep = {c.group: c for c in _est(zero=0, ep=2).comm}
    # (as an integer share per million, 49,152 / 99,136 -> 495,803, so one formula serves the search's arrays)
    total = base["dp"].bytes * base["dp"].count
    assert 49_152 * 10**6 // 99_136 == 495_803
    moved = total * 495_803 // 10**6
    assert ep["dp"].bytes * ep["dp"].count == total - moved
    assert ep["edp"].ranks == 2 and ep["edp"].bytes * ep["edp"].count == moved // 2
    assert ep["edp"].wire_bytes == 2 * (2 - 1) * (moved // 2) // 2


@pytest.mark.parametrize(
    "plan, gpus, words",
    [
        (Plan(ep=3), 6, "--ep 3 must divide the 4 routed experts of tiny-moe"),
        (Plan(ep=8), 8, "--ep 8 must divide the 4 routed experts"),
        (Plan(ep=4), 2, "--ep 4 must divide dp=2"),
        (Plan(ep=2, capacity=-1.0), 4, "capacity factor must be from 0"),
        (Plan(ep=0), 4, "ep must be a positive integer"),
    ],
)
def test_bad_ep_is_one_line(plan, gpus, words):
    with pytest.raises(ShardwiseError, match=words):
        plan.resolve(TINY, gpus)


@pytest.mark.parametrize(
    "argv, words",
    [
        ("estimate llama-3.1-8b --gpus 8 --ep 2", "--ep 2 splits routed experts, and llama-3.1-8b is dense"),
        ("estimate mixtral-8x7b --gpus 16 --ep 16", "--ep 16 must divide the 8 routed experts"),
        ("estimate mixtral-8x7b --gpus 8 --tp 2 --ep 8", "--ep 8 must divide dp=4"),
        ("estimate mixtral-8x7b --gpus 8 --ep 2 --capacity-factor nan", "capacity factor must be a number"),
        ("estimate mixtral-8x7b --gpus 8 --top-k 9", "top_k must be between 1 and experts=8, got 9"),
    ],
)
def test_cli_bad_ep_exits_2_in_one_line(capsys, argv, words):
    try:
        rc = main(argv.split())
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and words in err and "\n" not in err and "Traceback" not in err


def test_notes_state_imbalance_and_dense_blocks():
    m = ModelSpec(name="t", layers=4, hidden=64, heads=4, vocab=128, experts=4, top_k=2, first_dense=1)
    text = " ".join(estimate(m, make_cluster("h100-80gb", 4), Plan(seq=16, ep=4)).notes)
    assert "balanced routing" in text and "up to 4x" in text and "1 of t's 4 blocks are dense" in text


def test_array_plans_give_the_scalar_estimate():
    """The search's numpy plans go through the same EP formulas: one element equals its scalar plan."""
    import numpy as np

    from shardwise.estimate.comm import collectives
    from shardwise.estimate.memory import memory

    cl = make_cluster("h100-80gb", 8, gpus_per_node=4)
    for zero, shard, ep in ((0, 0, 2), (1, 0, 4), (3, 4, 2)):
        p = Plan(dp=8, zero=zero, dp_shard=shard, ep=ep, seq=16, gbs=16).resolve(TINY, 8)
        a = p.replace(**{f: np.array([getattr(p, f)]) for f in ("dp", "tp", "pp", "mbs", "gbs", "seq", "vpp")})
        a = a.replace(dp_shard=np.array([shard]), last_less=np.array([0]), ep=np.array([ep]))
        assert int(memory(TINY, cl, a).total[0]) == memory(TINY, cl, p).total
        scalar = sorted((c.group, c.kind, c.wire_bytes) for c in collectives(TINY, cl, p))
        arrays = sorted((c.group, c.kind, int(c.wire_bytes[0])) for c in collectives(TINY, cl, a) if c.count[0])
        groups = {"dp_shard": "dp"}  # the array path names the shard group dp either way
        assert sorted((groups.get(g, g), k, w) for g, k, w in scalar) == sorted(arrays)
