"""The engines' host time (estimate/host.py): how a plan's terms stack from the calibrated
engines, worked by hand, and the same formula over the search's arrays."""

import dataclasses

import numpy as np
import pytest

from shardwise.errors import ShardwiseError
from shardwise.estimate.host import host_seconds, host_terms
from shardwise.spec.hardware import GPU, _build
from shardwise.spec.plan import Plan

HOST = {
    "dp": {"block": 1000.0, "microbatch": 200.0, "step": 3000.0},
    "tp": {"block": 4000.0, "microbatch": 500.0, "step": 3500.0},
    "zero3": {"block": 2500.0, "microbatch": 200.0, "step": 2000.0},
    "zero1": {"block": 1000.0, "microbatch": 200.0, "step": 9000.0},
    "pp": {"block": 1500.0, "microbatch": 900.0, "step": 3000.0},
}
Z = {"block_step": 0.0}  # measured on one rank only (calibrate_host.py): absent here
G = GPU(name="cpu", memory_gib=8, tflops={"fp32": 0.03}, hbm_gbps=8, link="gloo", link_gbps=1, host_us=HOST)


def test_terms_stack_per_engine_hand_worked():
    assert host_terms(G, Plan(dp=4)) == HOST["dp"] | Z
    # tp 2 + ZeRO-3: dp's, plus tp's and zero3's differences from dp
    #   block 1000 + (4000 - 1000) + (2500 - 1000) = 5500; microbatch 200 + 300 + 0 = 500;
    #   step 3000 + 500 - 1000 = 2500
    assert host_terms(G, Plan(dp=2, tp=2, zero=3)) == {"block": 5500.0, "microbatch": 500.0, "step": 2500.0} | Z
    # sequence parallel not calibrated apart: taken as tp
    assert host_terms(G, Plan(dp=2, tp=2, sp=True)) == host_terms(G, Plan(dp=2, tp=2))
    # ZeRO-1: DDP's blocks, ZeroRedundancyOptimizer's own step
    assert host_terms(G, Plan(dp=4, zero=1)) == {"block": 1000.0, "microbatch": 200.0, "step": 9000.0} | Z
    # ZeRO-2 not calibrated: no difference from dp
    assert host_terms(G, Plan(dp=4, zero=2)) == HOST["dp"] | Z


def test_interleaving_repeats_the_schedules_micro_batch_work():
    # pp 2, vpp 2: block 1000 + 500 = 1500; microbatch 200 + 2 * (900 - 200) = 1600; step 3000.
    # 4 layers, 4 micro-batches: pipelined 4 * (4 // 2) * 1500 + 4 * 1600 = 18,400 us; step 3,000 us
    plan = Plan(dp=1, pp=2, vpp=2, schedule="interleaved", mbs=1, gbs=4)
    assert host_terms(G, plan) == {"block": 1500.0, "microbatch": 1600.0, "step": 3000.0} | Z
    assert host_seconds(G, plan, 4 // 2) == pytest.approx((18_400e-6, 3_000e-6))  # the busiest stage's blocks


def test_one_ranks_block_step_is_charged_once_per_step_hand_worked():
    # one process calibrated at four points: block 900 us per micro-batch, block_step 1000 us.
    # 4 layers, 4 micro-batches: pipelined 4 * 4 * 900 + 4 * 200 = 15,200 us; step 4 * 1000 +
    # 3000 = 7,000 us (three points would have charged block 1,900 us: 4 * 4 * 1,900 + 800 =
    # 31,200 us, 12,000 more than 15,200 + 4 * 1000)
    g = dataclasses.replace(
        G, host_us={"dp": {"block": 900.0, "microbatch": 200.0, "block_step": 1000.0, "step": 3000.0}}
    )
    plan = Plan(dp=1, mbs=1, gbs=4)
    assert host_seconds(g, plan, 4) == pytest.approx((15_200e-6, 7_000e-6))


def test_terms_never_go_negative():
    # an engine measured faster than dp makes a difference below 0; the sum is floored at 0
    g = dataclasses.replace(
        G,
        host_us={
            "dp": {"block": 100.0, "microbatch": 0.0, "step": 0.0},
            "tp": {"block": 0.0, "microbatch": 0.0, "step": 0.0},
            "pp": {"block": 0.0, "microbatch": 0.0, "step": 0.0},
        },
    )
    assert host_terms(g, Plan(dp=1, tp=2, pp=2)) == {"block": 0.0, "microbatch": 0.0, "step": 0.0} | Z


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


@pytest.mark.parametrize(
    "host, message",
    [
        ({"ddp": {"block": 1}}, "unknown engine 'ddp'"),
        ({"dp": {"blocks": 1}}, "unknown term 'blocks'"),
        ({"dp": {"block": -1}}, "must be a number of microseconds >= 0"),
        ({"dp": 5}, "host_us.dp must be"),
        ([1], "host_us must be a table"),
    ],
)
def test_bad_host_tables_are_one_line(host, message):
    d = {"memory_gib": 8, "tflops": {"fp32": 0.03}, "hbm_gbps": 8, "link": "gloo", "link_gbps": 1, "host_us": host}
    with pytest.raises(ShardwiseError, match=message) as e:
        _build(GPU, "cpu", d, "box.toml [gpu.cpu]")
    assert "\n" not in str(e.value)
