"""The engines' host time (estimate/host.py): how a plan's terms stack from the calibrated
engines, worked by hand, and the same formula over the search's arrays."""
import dataclasses

import numpy as np
import pytest

from shardwise.errors import ShardwiseError
from shardwise.estimate.host import host_seconds, host_terms
from shardwise.spec.hardware import GPU, _build
from shardwise.spec.plan import Plan

HOST = {"dp": {"block": 1000.0, "microbatch": 200.0, "block_step": 300.0, "step": 3000.0},
        "tp": {"block": 4000.0, "microbatch": 500.0, "block_step": 300.0, "step": 3500.0},
        "zero3": {"block": 2500.0, "microbatch": 200.0, "block_step": 300.0, "step": 2000.0},
        "zero1": {"block": 1000.0, "microbatch": 200.0, "block_step": 1300.0, "step": 9000.0},
        "pp": {"block": 1500.0, "microbatch": 900.0, "block_step": 300.0, "step": 3000.0}}
G = GPU(name="cpu", memory_gib=8, tflops={"fp32": 0.03}, hbm_gbps=8, link="gloo", link_gbps=1, host_us=HOST)


def test_terms_stack_per_engine_hand_worked():
    assert host_terms(G, Plan(dp=4)) == HOST["dp"]
    # tp 2 + ZeRO-3: dp's, plus tp's and zero3's differences from dp
    #   block 1000 + (4000 - 1000) + (2500 - 1000) = 5500; microbatch 200 + 300 + 0 = 500;
    #   block_step 300 + 0 + 0 = 300; step 3000 + 500 - 1000 = 2500
    assert host_terms(G, Plan(dp=2, tp=2, zero=3)) == {"block": 5500.0, "microbatch": 500.0, "block_step": 300.0,
                                                       "step": 2500.0}
    # sequence parallel not calibrated apart: taken as tp
    assert host_terms(G, Plan(dp=2, tp=2, sp=True)) == host_terms(G, Plan(dp=2, tp=2))
    # ZeRO-1: DDP's blocks, ZeroRedundancyOptimizer's own step terms
    assert host_terms(G, Plan(dp=4, zero=1)) == HOST["zero1"]
    # ZeRO-2 not calibrated: no difference from dp
    assert host_terms(G, Plan(dp=4, zero=2)) == HOST["dp"]


def test_interleaving_repeats_the_schedules_micro_batch_work():
    # pp 2, vpp 2: block 1000 + 500 = 1500; microbatch 200 + 2 * (900 - 200) = 1600; block_step 300;
    # step 3000. 4 layers, 4 micro-batches: pipelined 4 * (4 // 2) * 1500 + 4 * 1600 = 18,400 us;
    # step (4 // 2) * 300 + 3000 = 3,600 us
    plan = Plan(dp=1, pp=2, vpp=2, schedule="interleaved", mbs=1, gbs=4)
    assert host_terms(G, plan) == {"block": 1500.0, "microbatch": 1600.0, "block_step": 300.0, "step": 3000.0}
    assert host_seconds(G, plan, 4) == pytest.approx((18_400e-6, 3_600e-6))


def test_terms_never_go_negative():
    # an engine measured faster than dp makes a difference below 0; the sum is floored at 0
    g = dataclasses.replace(G, host_us={"dp": {"block": 100.0, "microbatch": 0.0, "step": 0.0},
                                        "tp": {"block": 0.0, "microbatch": 0.0, "step": 0.0},
                                        "pp": {"block": 0.0, "microbatch": 0.0, "step": 0.0}})
    assert host_terms(g, Plan(dp=1, tp=2, pp=2)) == {"block": 0.0, "microbatch": 0.0, "block_step": 0.0, "step": 0.0}


def test_the_blocks_share_of_the_step_is_paid_once_per_step():
    # dp: block 1000, microbatch 200, block_step 500, step 3000 us; zero1 adds 2000 us a block
    # per step (ZeroRedundancyOptimizer broadcasts each parameter once per step, not per micro-batch)
    host = {"dp": {"block": 1000.0, "microbatch": 200.0, "block_step": 500.0, "step": 3000.0},
            "zero1": {"block": 1000.0, "microbatch": 200.0, "block_step": 2500.0, "step": 3000.0}}
    g = dataclasses.replace(G, host_us=host)
    # 8 layers, 4 micro-batches, no pipeline: pipelined 4 * 8 * 1000 + 4 * 200 = 32,800 us;
    # step 8 * 500 + 3000 = 7,000 us
    assert host_seconds(g, Plan(dp=2, mbs=1, gbs=8), 8) == pytest.approx((32_800e-6, 7_000e-6))
    # ZeRO-1: step 8 * 2500 + 3000 = 23,000 us, the same with 1 or 4 micro-batches
    assert host_seconds(g, Plan(dp=2, zero=1, mbs=1, gbs=8), 8)[1] == pytest.approx(23_000e-6)
    assert host_seconds(g, Plan(dp=2, zero=1, mbs=4, gbs=8), 8)[1] == pytest.approx(23_000e-6)
    # pp 2: the busiest stage's 4 blocks: step 4 * 500 + 3000 = 5,000 us
    assert host_seconds(g, Plan(dp=1, pp=2, mbs=1, gbs=4), 8)[1] == pytest.approx(5_000e-6)


def test_catalog_gpus_have_no_host_time():
    plain = dataclasses.replace(G, host_us={})
    assert host_seconds(plain, Plan(dp=1, gbs=8, mbs=1), 32) == (0.0, 0.0)


def test_arrays_give_each_plan_its_scalar_terms():
    # the search evaluates many plans at once: numeric fields are arrays
    tp, pp = np.array([1, 2, 1, 2]), np.array([1, 1, 2, 2])
    arr = host_terms(G, Plan(dp=1, tp=tp, pp=pp))
    for i in range(4):
        one = host_terms(G, Plan(dp=1, tp=int(tp[i]), pp=int(pp[i])))
        assert all(arr[t][i] == pytest.approx(one[t]) for t in one)


@pytest.mark.parametrize("host, message", [
    ({"ddp": {"block": 1}}, "unknown engine 'ddp'"),
    ({"dp": {"blocks": 1}}, "unknown term 'blocks'"),
    ({"dp": {"block": -1}}, "must be a number of microseconds >= 0"),
    ({"dp": 5}, "host_us.dp must be"),
    ([1], "host_us must be a table"),
])
def test_bad_host_tables_are_one_line(host, message):
    d = {"memory_gib": 8, "tflops": {"fp32": 0.03}, "hbm_gbps": 8, "link": "gloo", "link_gbps": 1, "host_us": host}
    with pytest.raises(ShardwiseError, match=message) as e:
        _build(GPU, "cpu", d, "box.toml [gpu.cpu]")
    assert "\n" not in str(e.value)
