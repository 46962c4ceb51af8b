"""The engines' host-time probe (shardwise/calibrate_host.py): its plans and points, the exact
solve for the three terms, worked by hand, and a real probe of every engine on 2 ranks."""

import pytest
from _dist import run_ranks

from shardwise.check import host_probe as ch
from shardwise.spec.model import ModelSpec

SPEC = ModelSpec(name="t", layers=1, hidden=64, heads=4, vocab=128, ffn_hidden=128)


def test_probe_plans_use_every_rank():
    assert ch.probe_plans(1, SPEC) == {"dp": [{"dp": 1}]}
    four = ch.probe_plans(4, SPEC)
    assert list(four) == ["dp", "zero1", "zero2", "zero3", "tp", "tp-sp", "pp"]
    # tp 2 beside dp 2 first, tp 4 alone if the run tier refuses it
    assert four["tp-sp"] == [{"dp": 2, "tp": 2, "sp": True}, {"dp": 1, "tp": 4, "sp": True}]
    assert four["pp"] == [{"dp": 2, "pp": 2}]
    assert ch.probe_plans(2, SPEC)["tp"] == [{"dp": 1, "tp": 2}]
    # 3 ranks: tp 3 does not divide 4 heads, and no even split for pp
    assert list(ch.probe_plans(3, SPEC)) == ["dp", "zero1", "zero2", "zero3"]
    # 3 heads cannot be split over 2 tensor-parallel ranks
    odd = ModelSpec(name="o", layers=1, hidden=96, heads=3, vocab=128, ffn_hidden=128)
    assert "tp" not in ch.probe_plans(2, odd) and "pp" in ch.probe_plans(2, odd)


def test_probe_points():
    # (blocks per stage, micro-batches): a pipeline needs a micro-batch per stage
    assert ch.probe_points({"dp": 4}) == [(1, 1), (9, 1), (1, 3)]
    assert ch.probe_points({"dp": 2, "pp": 2}) == [(1, 2), (5, 2), (1, 6)]
    # one rank: the fourth corner
    assert ch.probe_points({"dp": 1}, one_rank=True) == [(1, 1), (9, 1), (1, 3), (9, 3)]


def test_solve_recovers_the_terms_hand_worked():
    # block 2 ms, microbatch 0.5 ms, step 3 ms; rest = (1 + bubble) * (m*k*block + m*microbatch) + step
    # no pipeline: (1,1): 2 + 0.5 + 3 = 5.5 ms; (5,1): 10 + 0.5 + 3 = 13.5 ms; (1,2): 4 + 1 + 3 = 8 ms
    got = ch.solve_terms([(1, 1, 0.0, 5.5e-3), (5, 1, 0.0, 13.5e-3), (1, 2, 0.0, 8e-3)])
    assert got == pytest.approx({"block": 2000.0, "microbatch": 500.0, "step": 3000.0})
    # pp 2: bubble (p-1)/m = 1/2 at m = 2, 1/4 at m = 4
    # (1,2): 1.5 * (4 + 1) + 3 = 10.5 ms; (3,2): 1.5 * (12 + 1) + 3 = 22.5 ms; (1,4): 1.25 * (8 + 2) + 3 = 15.5 ms
    got = ch.solve_terms([(1, 2, 0.5, 10.5e-3), (3, 2, 0.5, 22.5e-3), (1, 4, 0.25, 15.5e-3)])
    assert got == pytest.approx({"block": 2000.0, "microbatch": 500.0, "step": 3000.0})


def test_four_points_separate_a_blocks_step_work_hand_worked():
    # block 0.9 ms per micro-batch, microbatch 0.2 ms, block_step 1 ms, step 3 ms;
    # rest = m*k*block + m*microbatch + k*block_step + step (one rank, no pipeline):
    # (1,1): 0.9 + 0.2 + 1 + 3 = 5.1 ms; (9,1): 8.1 + 0.2 + 9 + 3 = 20.3 ms;
    # (1,3): 2.7 + 0.6 + 1 + 3 = 7.3 ms; (9,3): 24.3 + 0.6 + 9 + 3 = 36.9 ms
    pts = [(1, 1, 0.0, 5.1e-3), (9, 1, 0.0, 20.3e-3), (1, 3, 0.0, 7.3e-3), (9, 3, 0.0, 36.9e-3)]
    got = ch.solve_terms(pts)
    assert got == pytest.approx({"block": 900.0, "microbatch": 200.0, "block_step": 1000.0, "step": 3000.0})
    # the first three alone: exactly, block (20.3 - 5.1) / 8 = 1.9 ms, both kinds of a block's
    # work in one term, and microbatch (7.3 - 5.1) / 2 - 1.9 = -0.8 ms < 0. Without it the best
    # line through (m*k, rest) = (1, 5.1), (9, 20.3), (3, 7.3) ms: mean x 13/3, mean y 10.9;
    # Sxx = 11.11 + 21.78 + 1.78 = 34.67, Sxy = 19.33 + 43.87 + 4.8 = 68.0: block 68 / 34.67 =
    # 1.9615 ms, step 10.9 - 1.9615 * 13/3 = 2.4 ms
    assert ch.solve_terms(pts[:3]) == pytest.approx({"block": 1961.538, "microbatch": 0.0, "step": 2400.0})


def test_a_negative_term_gives_the_best_non_negative_fit():
    # rest = 2 ms * m*k + 3 ms, missed by (0.3, 0.1, -0.4) ms at (1,1), (9,1), (1,3): a miss that
    # sums to 0 and is orthogonal to m*k = (1, 9, 3) (0.3 + 0.9 - 1.2 = 0), so 2 and 3 ms are the
    # best line through the points: 5.3, 21.1 and 8.6 ms. Solved exactly, microbatch comes out
    # (8.6 - 5.3) / 2 - (21.1 - 5.3) / 8 = 1.65 - 1.975 = -0.325 ms; without it, the line
    got = ch.solve_terms([(1, 1, 0.0, 5.3e-3), (9, 1, 0.0, 21.1e-3), (1, 3, 0.0, 8.6e-3)])
    assert got == pytest.approx({"block": 2000.0, "microbatch": 0.0, "step": 3000.0})
    # (zeroing the -0.325 ms and keeping block 1.975 ms, step 5.3 - 1.975 + 0.325 = 3.65 ms would
    # put the 9-block point at 17.775 + 3.65 = 21.4 ms and a 4-block, 4-micro-batch plan at
    # 31.6 + 3.65 = 35.25 ms against the line's 32 + 3 = 35 ms)


def test_zero1_takes_dps_blocks_and_solves_its_step():
    # dp: block 2 ms, microbatch 0.5 ms. ZeRO-1 points with a 9 ms step: (1,1): 2 + 0.5 + 9 = 11.5 ms;
    # (5,1): 10 + 0.5 + 9 = 19.5 ms; (1,3): 6 + 1.5 + 9 = 16.5 ms; one point 0.3 ms noisier: mean step 9.1 ms
    dp = {"block": 2000.0, "microbatch": 500.0, "step": 3000.0}
    got = ch.solve_step([(1, 1, 0.0, 11.5e-3), (5, 1, 0.0, 19.5e-3), (1, 3, 0.0, 16.8e-3)], dp)
    assert got == pytest.approx({"block": 2000.0, "microbatch": 500.0, "step": 9100.0})


def _probe(spec=SPEC, engines=None):
    import torch
    import torch.distributed as dist

    from shardwise.spec.hardware import GPU, Cluster, Network

    n = dist.get_world_size()
    gpu = GPU(
        name="p",
        memory_gib=4,
        tflops={"fp32": 0.03},
        hbm_gbps=8,
        link="",
        link_gbps=1,
        link_latency_us=300,
        link_efficiency=1.0,
        gpus_per_node=n,
    )
    cluster = Cluster(gpu=gpu, gpus=n, gpus_per_node=n, network=Network(name="p", gbits=8, latency_us=300))
    return ch.measure(spec, "fp32", cluster, 1.0, torch.device("cpu"), n, engines, steps=3, warmup=1)


def test_every_engine_is_probed_on_2_ranks():
    host, notes = run_ranks(_probe, 2, timeout=300)[0]
    assert notes == []
    assert list(host) == ["dp", "zero1", "zero2", "zero3", "tp", "tp-sp", "pp"]
    assert all(set(t) == {"block", "microbatch", "step"} and min(t.values()) >= 0 for t in host.values())
    # FSDP2's hooks and DTensor's dispatch cost a CPU many times a plain block's Python
    assert host["zero3"]["block"] > host["dp"]["block"] and host["tp"]["block"] > host["dp"]["block"]


def test_tied_embeddings_are_untied_for_the_tp_probe_beside_dp():
    # DDP + TP cannot hold tied embeddings (the run tier refuses dp 2 x tp 2 for GPT-2); the probe
    # unties them, which moves no block's host time, and so measures tp 2 beside dp 2 as plans use it
    # 2 heads: tp 4 is no fallback, so only the untied tp 2 x dp 2 probe can succeed
    tied = ModelSpec(
        name="g", layers=1, hidden=64, heads=2, vocab=128, ffn_hidden=256, ffn_kind="gelu", tied_embeddings=True
    )
    assert ch.probe_plans(4, tied)["tp"] == [{"dp": 2, "tp": 2}]
    host, notes = run_ranks(_probe, 4, tied, ("tp",), timeout=300)[0]
    assert notes == [] and list(host) == ["tp"] and sum(host["tp"].values()) > 0
