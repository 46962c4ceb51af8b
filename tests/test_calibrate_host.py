"""The engines' host-time probe (shardwise/calibrate_host.py): its plans and points, the exact
solve for the four terms, worked by hand, and a real probe of every engine on 2 ranks."""
import pytest

from shardwise import calibrate_host as ch
from shardwise.spec.model import ModelSpec
from _dist import run_ranks

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
    # (blocks per stage, micro-batches): the corners of 1 or 9 blocks x 1 or 3 micro-batches;
    # a pipeline needs a micro-batch per stage (and doubles each stage's blocks with 4 more)
    assert ch.probe_points({"dp": 4}) == [(1, 1), (9, 1), (1, 3), (9, 3)]
    assert ch.probe_points({"dp": 2, "pp": 2}) == [(1, 2), (5, 2), (1, 6), (5, 6)]


def test_solve_recovers_the_terms_hand_worked():
    # block 2 ms, microbatch 0.5 ms, block_step 1 ms, step 3 ms;
    # rest = (1 + bubble) * (m*k*block + m*microbatch) + k*block_step + step
    # no pipeline: (1,1): 2 + 0.5 + 1 + 3 = 6.5 ms; (5,1): 10 + 0.5 + 5 + 3 = 18.5 ms;
    #              (1,2): 4 + 1 + 1 + 3 = 9 ms;     (5,2): 20 + 1 + 5 + 3 = 29 ms
    want = {"block": 2000.0, "microbatch": 500.0, "block_step": 1000.0, "step": 3000.0}
    got = ch.solve_terms([(1, 1, 0.0, 6.5e-3), (5, 1, 0.0, 18.5e-3), (1, 2, 0.0, 9e-3), (5, 2, 0.0, 29e-3)])
    assert got == pytest.approx(want)
    # pp 2: bubble (p-1)/m = 1/2 at m = 2, 1/4 at m = 4; the step terms are not stretched
    # (1,2): 1.5 * (4 + 1) + 1 + 3 = 11.5 ms;   (3,2): 1.5 * (12 + 1) + 3 + 3 = 25.5 ms;
    # (1,4): 1.25 * (8 + 2) + 1 + 3 = 16.5 ms;  (3,4): 1.25 * (24 + 2) + 3 + 3 = 38.5 ms
    got = ch.solve_terms([(1, 2, 0.5, 11.5e-3), (3, 2, 0.5, 25.5e-3), (1, 4, 0.25, 16.5e-3), (3, 4, 0.25, 38.5e-3)])
    assert got == pytest.approx(want)


def test_three_points_would_charge_the_step_work_to_every_micro_batch():
    # the same machine solved with block_step forced into block (the old three-term model): the
    # block term from (1,1) and (5,1) alone is (18.5 - 6.5) / 4 = 3 ms, which at 4 micro-batches
    # and 4 blocks charges 4 * 4 * 3 = 48 ms where the machine spends 4 * 4 * 2 + 4 * 1 = 36 ms;
    # the fourth corner tells the two apart
    got = ch.solve_terms([(1, 1, 0.0, 6.5e-3), (5, 1, 0.0, 18.5e-3), (1, 2, 0.0, 9e-3), (5, 2, 0.0, 29e-3)])
    assert 4 * 4 * got["block"] + 4 * got["block_step"] == pytest.approx(36_000.0)


def test_noise_that_makes_a_term_negative_gives_0():
    # the extra micro-batches cost less than nothing: microbatch solves to -1 ms, reported as 0
    # (1,1): 2 - 1 + 0 + 3 = 4 ms; (5,1): 10 - 1 + 3 = 12 ms; (1,2): 4 - 2 + 3 = 5 ms; (5,2): 20 - 2 + 3 = 21 ms
    got = ch.solve_terms([(1, 1, 0.0, 4e-3), (5, 1, 0.0, 12e-3), (1, 2, 0.0, 5e-3), (5, 2, 0.0, 21e-3)])
    assert got == pytest.approx({"block": 2000.0, "microbatch": 0.0, "block_step": 0.0, "step": 3000.0})


def _probe(spec=SPEC, engines=None):
    import torch
    import torch.distributed as dist

    from shardwise.spec.hardware import GPU, Cluster, Network

    n = dist.get_world_size()
    gpu = GPU(name="p", memory_gib=4, tflops={"fp32": 0.03}, hbm_gbps=8, link="", link_gbps=1,
              link_latency_us=300, link_efficiency=1.0, gpus_per_node=n)
    cluster = Cluster(gpu=gpu, gpus=n, gpus_per_node=n, network=Network(name="p", gbits=8, latency_us=300))
    return ch.measure(spec, "fp32", cluster, 1.0, torch.device("cpu"), n, engines, steps=3, warmup=1)


def test_every_engine_is_probed_on_2_ranks():
    host, notes = run_ranks(_probe, 2, timeout=300)[0]
    assert notes == []
    assert list(host) == ["dp", "zero1", "zero2", "zero3", "tp", "tp-sp", "pp"]
    assert all(set(t) == {"block", "microbatch", "block_step", "step"} and min(t.values()) >= 0
               for t in host.values())
    # FSDP2's hooks and DTensor's dispatch cost a CPU many times a plain block's Python
    assert host["zero3"]["block"] > host["dp"]["block"] and host["tp"]["block"] > host["dp"]["block"]


def test_tied_embeddings_are_untied_for_the_tp_probe_beside_dp():
    # DDP + TP cannot hold tied embeddings (the run tier refuses dp 2 x tp 2 for GPT-2); the probe
    # unties them, which moves no block's host time, and so measures tp 2 beside dp 2 as plans use it
    # 2 heads: tp 4 is no fallback, so only the untied tp 2 x dp 2 probe can succeed
    tied = ModelSpec(name="g", layers=1, hidden=64, heads=2, vocab=128, ffn_hidden=256, ffn_kind="gelu",
                     tied_embeddings=True)
    assert ch.probe_plans(4, tied)["tp"] == [{"dp": 2, "tp": 2}]
    host, notes = run_ranks(_probe, 4, tied, ("tp",), timeout=300)[0]
    assert notes == [] and list(host) == ["tp"] and sum(host["tp"].values()) > 0
