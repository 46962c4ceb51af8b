"""The search's candidate space: what is enumerated, once each, under pinned fields; the default
global batch; pinned-field checks. (No estimate numbers here: see test_search.py.)"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_search import generated as _plans  # every candidate as a scalar Plan, in generation order

from shardwise import Plan, ShardwiseError, preset
from shardwise.search.space import SEARCHED_SCHEDULES, Space, check_fixed
from shardwise.spec.plan import violation


def _key(p: Plan) -> tuple:
    return tuple(
        getattr(p, f)
        for f in (
            "dp",
            "tp",
            "pp",
            "zero",
            "mbs",
            "gbs",
            "seq",
            "schedule",
            "vpp",
            "recompute",
            "sp",
            "precision",
            "optimizer",
            "offload",
            "dp_shard",
            "last_less",
        )
    )


def test_tp_stays_inside_the_node_unless_allowed():
    m = preset("llama-2-7b")  # 32 heads: any power of two up to 32 divides them
    inside = Space(m, 32, 8, {"gbs": 64})
    assert sorted({tp for tp, _ in inside.tp_pp}) == [1, 2, 4, 8]  # the divisors of the 8-GPU node
    across = Space(m, 32, 8, {"gbs": 64}, cross_node_tp=True)
    assert sorted({tp for tp, _ in across.tp_pp}) == [1, 2, 4, 8, 16, 32]
    # a partial node (4 of 8 GPUs): the node is those 4
    assert sorted({tp for tp, _ in Space(m, 4, 4, {"gbs": 8}).tp_pp}) == [1, 2, 4]


def test_every_tp_pp_pair_multiplies_into_the_gpu_count():
    s = Space(preset("llama-2-7b"), 48, 8, {"gbs": 96})
    for tp, pp in s.tp_pp:
        assert 48 % (tp * pp) == 0
    # 48 = 2^4 * 3; tp in {1, 2, 4, 8}; pp any divisor of 48 / tp: 10 + 8 + 6 + 4 pairs
    assert len(s.tp_pp) == 10 + 8 + 6 + 4


def test_each_strategy_generated_once_and_none_missing():
    """No duplicate encodings (schedule with pp=1, sp with tp=1, vpp outside interleaved), and every
    legal scalar plan of a brute-force product over the same field values is there."""
    m = preset("tiny-llama")
    s = Space(m, 4, 4, {"gbs": 8, "seq": 64})
    got = _plans(s)
    keys = [_key(p) for p in got]
    assert len(keys) == len(set(keys))
    legal = {k for k, p in zip(keys, got) if violation(p, m, 4) is None}
    brute = set()
    for tp, pp, zero, mbs, sched, vpp, rc, sp, off, shard, cut in itertools.product(
        [1, 2, 4],
        [1, 2, 4],
        range(4),
        [1, 2, 4, 8],
        SEARCHED_SCHEDULES,
        range(1, m.layers + 1),
        ("none", "selective-op", "selective", "selective-layer", "full"),
        (False, True),
        ("none", "optimizer", "params"),
        (0, 1, 2, 4),  # HSDP shard groups
        range(0, m.layers + 1),  # blocks fewer on the last stage
    ):
        if 4 % (tp * pp):
            continue
        p = Plan(
            dp=4 // (tp * pp),
            tp=tp,
            pp=pp,
            zero=zero,
            mbs=mbs,
            gbs=8,
            seq=64,
            schedule=sched,
            vpp=vpp,
            recompute=rc,
            sp=sp,
            offload=off,
            dp_shard=shard,
            last_less=cut,
        )
        if (
            violation(p, m, 4) is None
            and not (pp == 1 and sched != "1f1b")
            and not (sched == "interleaved" and vpp == 1)
            and not (sched == "interleaved-zb" and vpp > 1)  # searched at v = 1 (ZB-H1) only
            and not (shard == 1 or shard >= p.dp)  # FSDP2 replicating only, or shard = dp written out
        ):
            brute.add(_key(p))
    assert legal == brute


def test_pinned_fields_are_the_only_values():
    m = preset("llama-2-7b")
    pins = {
        "tp": 2,
        "zero": 1,
        "mbs": 2,
        "recompute": "selective",
        "schedule": "interleaved",
        "vpp": 2,
        "sp": True,
        "offload": "none",
        "seq": 4096,
        "gbs": 64,
    }
    for p in _plans(Space(m, 16, 8, pins)):
        for k, v in pins.items():
            assert getattr(p, k) == v, k


def test_pinned_dp_leaves_only_matching_tp_pp():
    s = Space(preset("llama-2-7b"), 64, 8, {"dp": 8, "gbs": 64})
    assert all(8 * tp * pp == 64 for tp, pp in s.tp_pp) and len(s.tp_pp) == 4  # tp*pp = 8: (1,8) (2,4) (4,2) (8,1)


def test_default_gbs_is_about_4m_tokens_and_reachable():
    m = preset("llama-2-7b")
    # 8 GPUs, seq 2048: target 4,194,304 / 2048 = 2048 sequences; every dp (1, 2, 4, 8) divides it
    assert Space(m, 8, 8, {}).gbs == 2048
    # 24 GPUs: dp in {1, 2, 3, 4, 6, 8, 12, 24}, lcm 24; 2048 / 24 = 85.3 -> 85 * 24 = 2040
    s = Space(m, 24, 8, {})
    assert s.gbs == 2040
    assert all(s.gbs % (24 // (tp * pp)) == 0 for tp, pp in s.tp_pp if s._shape_legal(tp, pp))
    # Llama-3.1-405B (126 layers) on 16,384 GPUs at seq 8192: target 512 sequences; with uneven
    # stages every power-of-two pp is open, so dps 1..512 serve it (lcm 512): 512 x 8192 = 4.2M tokens
    assert Space(preset("llama-3.1-405b"), 16384, 8, {"seq": 8192}).gbs == 512
    # a pinned mbs counts: 8 GPUs, mbs 3 -> multiples of lcm(3, 6, 12, 24) = 24: round(2048/24)*24 = 2040
    assert Space(m, 8, 8, {"mbs": 3}).gbs == 2040
    assert Space(m, 8, 8, {"gbs": 100}).gbs == 100


def test_mbs_candidates_divide_the_per_rank_batch():
    s = Space(preset("llama-2-7b"), 8, 8, {"gbs": 48, "tp": 1, "pp": 1})
    g = s.grid(False, "1f1b")
    assert sorted(g["mbs"].tolist()) == [1, 2, 3, 6]  # per-rank batch 48 / 8 = 6
    assert (g["dp"] == 8).all()


def test_grid_arrays_are_int64_and_the_array_plan_matches_scalars():
    s = Space(preset("llama-2-7b"), 16, 8, {"gbs": 64})
    g = s.grid(True, "interleaved")
    assert all(v.dtype == np.int64 for v in g.values())
    cats = {"zero": 1, "sp": True, "schedule": "interleaved", "recompute": "none", "offload": "none"}
    arr = s.plan(g, cats)
    for i in (0, len(g["dp"]) // 2, len(g["dp"]) - 1):
        one = s.scalar(g, cats, i)
        assert (int(arr.tp[i]), int(arr.grad_accum[i]), int(arr.gbs[i])) == (one.tp, one.grad_accum, one.gbs)
        assert type(one.dp) is int and one.sp is True


@pytest.mark.parametrize(
    "fixed, match",
    [
        ({"tpp": 2}, "unknown plan field 'tpp'"),
        ({"tp": 0}, "tp must be a positive integer"),
        ({"gbs": -4}, "gbs must be a positive integer"),
        ({"recompute": "sometimes"}, "unknown recompute 'sometimes'"),
        ({"zero": 4}, "ZeRO stage must be 0, 1, 2 or 3"),
    ],
)
def test_bad_pins_are_one_line_errors(fixed, match):
    with pytest.raises(ShardwiseError, match=match) as e:
        check_fixed(fixed)
    assert "\n" not in str(e.value)
