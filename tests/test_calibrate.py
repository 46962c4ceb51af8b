"""`shardwise calibrate`: the fit of the estimate's cost model, the shapes, the hardware file it
writes (read back by the estimate tier), one real (quick, one-rank) calibration, and bad input."""

from __future__ import annotations

import os

import pytest

from shardwise.check.calibrate import Result, calibrate, fit_kinds, fit_link, model_shapes, model_terms
from shardwise.cli import main
from shardwise.spec.hardware import load_gpu, load_network, make_cluster
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan

MIB = 2**20


def test_model_terms_are_the_estimates_ring_model():
    # all-reduce among 4 ranks of 1 MiB: 2*(4-1) = 6 latency steps, 2*(4-1)/4 * 1 MiB = 1,572,864 B moved
    assert model_terms("all-reduce", 4, MIB) == (6, 1_572_864)
    # all-gather / reduce-scatter: 3 steps, 3/4 of the gathered buffer
    assert model_terms("all-gather", 4, MIB) == (3, 786_432)
    assert model_terms("reduce-scatter", 4, MIB) == (3, 786_432)
    # broadcast (pipelined chain): 3 steps and the whole message; send: one hop
    assert model_terms("broadcast", 4, MIB) == (3, MIB)
    assert model_terms("send", 2, MIB) == (1, MIB)


def test_fit_recovers_latency_and_bandwidth_exactly():
    # timings made by the model itself with a = 50 us, B = 2 GB/s; e.g. all-reduce of 1 MiB over 4:
    # 6 * 50 us + 1,572,864 B / 2e9 B/s = 300 + 786.432 = 1,086.432 us
    a, bw = 50e-6, 2e9
    samples = []
    for kind in ("all-reduce", "all-gather", "reduce-scatter", "broadcast", "send"):
        for b in (4096, 65536, MIB, 16 * MIB):
            cl, cb = model_terms(kind, 4, b)
            samples.append((kind, b, cl * a + cb / bw))
    assert samples[2][2] == pytest.approx(1086.432e-6, rel=1e-12)
    fa, fbw, errs = fit_link(samples, 4)
    assert fa == pytest.approx(a, rel=1e-9)
    assert fbw == pytest.approx(bw, rel=1e-9)
    assert max(errs.values()) < 1e-9


def test_each_kind_fitted_alone_recovers_its_own_figures():
    # gloo on a CPU: all-reduce 500 us a step at 1 GB/s, send 100 us at 4 GB/s. One latency and
    # bandwidth cannot reproduce both; each kind's own fit does, exactly. E.g. a send of 1 MiB:
    # 1 step * 100 us + 1,048,576 B / 4e9 B/s = 100 + 262.144 = 362.144 us
    figs = {"all-reduce": (500e-6, 1e9), "send": (100e-6, 4e9)}
    samples = []
    for kind, (a, bw) in figs.items():
        for b in (4096, 65536, MIB, 16 * MIB):
            cl, cb = model_terms(kind, 4, b)
            samples.append((kind, b, cl * a + cb / bw))
    assert samples[6][2] == pytest.approx(362.144e-6, rel=1e-12)
    assert max(fit_link(samples, 4)[2].values()) > 0.2  # one fit for both misses by more than 20%
    own = fit_kinds(samples, 4)
    assert list(own) == ["all-reduce", "send"]
    for kind, (a, bw) in figs.items():
        fa, fbw, err = own[kind]
        assert fa == pytest.approx(a, rel=1e-9) and fbw == pytest.approx(bw, rel=1e-9) and err < 1e-9


def test_fit_keeps_latency_non_negative():
    # a link with no latency at all but a small negative timing error on the tiny messages: the
    # unconstrained fit would give a < 0; the fit keeps a = 0 and fits the bandwidth alone
    # (1 GB/s: an all-reduce of 1 MiB over 4 moves 1,572,864 B, 1,572.864 us)
    samples = [
        ("all-reduce", b, model_terms("all-reduce", 4, b)[1] / 1e9 * (0.9 if b < 65536 else 1.0))
        for b in (4096, 16384, 65536, MIB, 16 * MIB)
    ]
    a, bw, errs = fit_link(samples, 4)
    assert a == 0.0
    assert bw == pytest.approx(1e9, rel=0.05)
    # the same data scaled by a uniform latency: every point 6 steps of 100 us later
    shifted = [(k, b, t + 6 * 100e-6) for k, b, t in samples]
    a2, bw2, _ = fit_link(shifted, 4)
    assert 90e-6 < a2 < 110e-6 and bw2 == pytest.approx(1e9, rel=0.05)


def test_overlap_is_what_running_both_at_once_saved():
    from shardwise.check.calibrate import overlap_from

    # matmuls 10 ms alone, a collective 6 ms alone: 16 ms one after the other
    assert overlap_from(10e-3, 6e-3, 12e-3) == pytest.approx(4 / 6)  # 4 of the collective's 6 ms hid
    assert overlap_from(10e-3, 6e-3, 10e-3) == 1.0  # all of it: the step is the matmuls' alone
    assert overlap_from(10e-3, 6e-3, 16e-3) == 0.0  # none: serial
    # noise either side stays a fraction: slower than serial is 0, faster than the longer one is 1
    assert overlap_from(10e-3, 6e-3, 18e-3) == 0.0 and overlap_from(10e-3, 6e-3, 9e-3) == 1.0


def test_model_shapes_are_six_n_d():
    # tiny Llama: h 64, 4 heads of 16 (q 64), 2 KV heads (kv 32), SwiGLU ffn 128, vocab 128;
    # T = mbs 2 * seq 32 = 64 tokens. Linear weights (in x out): q 64x64, k 64x32, v 64x32, o 64x64,
    # w1 64x128, w2 128x64, w3 64x128, output 64x128 = 45,056 weights. Three products each
    # (forward, input grad, weight grad) of 2*T*in*out FLOPs: 6 * 64 * 45,056 = 17,301,504.
    spec = ModelSpec(name="t", layers=4, hidden=64, heads=4, kv_heads=2, vocab=128, ffn_hidden=128)
    shapes = model_shapes(spec, Plan(mbs=2, seq=32, tp=1))
    assert len(shapes) == 24
    assert shapes[3:6] == [(64, 64, 32), (64, 32, 64), (32, 64, 64)]  # wk: forward, input grad, weight grad
    assert sum(2 * m * k * n for m, k, n in shapes) == 17_301_504
    # tp = 2 halves every column-parallel output and row-parallel input (and the vocab)
    half = model_shapes(spec, Plan(mbs=2, seq=32, tp=2))
    assert sum(2 * m * k * n for m, k, n in half) == 17_301_504 // 2


def test_hardware_file_round_trips(tmp_path):
    r = Result(
        name="box",
        device="cpu",
        backend="gloo",
        nproc=4,
        tflops={"fp32": 0.0214, "bf16": 0.05},
        hbm_gbps=12.5,
        memory_gib=5.25,
        latency_us=250.0,
        gbps=1.25,
        shapes="s",
        device_name="x86",
        host_us={
            "dp": {"block": 850.0, "microbatch": 120.0, "step": 3000.0},
            "tp-sp": {"block": 41000.0, "microbatch": 0.0, "step": 12.5},
        },
        kinds={"all-reduce": (1.5e-3, 0.5e9, 0.02), "send": (2e-4, 2e9, 0.1)},
        overlap=0.35,
    )
    f = tmp_path / "box.toml"
    f.write_text(r.toml())
    g = load_gpu("box", str(f))
    assert g.tflops == {"fp32": 0.0214, "bf16": 0.05}
    assert (g.memory_gib, g.hbm_gbps, g.link_gbps, g.link_latency_us, g.link_efficiency, g.gpus_per_node) == (
        5.25,
        12.5,
        1.25,
        250.0,
        1.0,
        4,
    )
    assert g.host_us == r.host_us
    assert g.overlap == 0.35
    # 4 ranks: on a CPU, ranks per core (at least 1); the same figure the estimate's bubble reads
    assert g.oversubscription == pytest.approx(max(1.0, 4 / (os.cpu_count() or 1)), rel=1e-3)
    n = load_network("box", str(f))
    assert (n.gbits, n.latency_us, n.efficiency) == (10.0, 250.0, 1.0)  # 1.25 GB/s = 10 Gbit/s
    # each kind's own fit, in each table's units: 0.5 GB/s = 4 Gbit/s, 2 GB/s = 16 Gbit/s
    assert g.link_kinds == {
        "all-reduce": {"latency_us": 1500.0, "gbps": 0.5},
        "send": {"latency_us": 200.0, "gbps": 2.0},
    }
    assert n.kinds == {"all-reduce": {"latency_us": 1500.0, "gbits": 4.0}, "send": {"latency_us": 200.0, "gbits": 16.0}}
    # the estimate tier builds a cluster from it: 4 ranks fit the "node"
    c = make_cluster("box", 4, None, "box", str(f))
    assert c.nodes == 1 and c.gpu.peak_flops("fp32") == pytest.approx(0.0214e12)


def test_one_rank_calibration_writes_a_usable_file(tmp_path):
    # one rank: no link to time; matmul and copy are measured for real (quick timings)
    r = calibrate(1, "cpu", name="solo", quick=True)
    assert r.tflops["fp32"] > 0 and r.tflops["bf16"] > 0 and r.hbm_gbps > 0 and r.memory_gib > 0
    assert r.link_samples == []
    f = tmp_path / "solo.toml"
    f.write_text(r.toml())
    assert load_gpu("solo", str(f)).tflops["fp32"] == pytest.approx(r.tflops["fp32"], rel=1e-3)
    # one rank shows one engine, the plain one, trained for real at four points: four terms
    # (a block's share of the step's work apart), none negative
    assert list(r.host_us) == ["dp"] and set(r.host_us["dp"]) == {"block", "microbatch", "block_step", "step"}
    # (quick timings on a busy CI machine can put one term at 0; host time there is, in all)
    assert min(r.host_us["dp"].values()) >= 0 and sum(r.host_us["dp"].values()) > 0
    assert load_gpu("solo", str(f)).host_us["dp"] == pytest.approx(r.host_us["dp"], rel=1e-3, abs=1e-9)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "--out", "x.txt"], "as .toml"),
        (["calibrate", "--out", "/no/such/dir/x.toml"], "does not exist"),
        (["calibrate", "--out", "x.toml", "--nproc", "0"], "--nproc must be a positive integer"),
        (["calibrate", "--out", "x.toml", "--name", "a b"], "--name"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_plain_step_host_time_is_taken_out_of_the_efficiency():
    # timings made up: 1 block 2 ms, 5 blocks 6 ms -> 1 ms a block and 1 ms of the rest; a 10 ms
    # step of the 2-layer model doing 7e9 FLOPs spends 10 - 2 * 1 - 1 = 7 ms on them: 1 TFLOP/s
    from shardwise.check.calibrate import split_plain

    assert split_plain(2e-3, 6e-3, 10e-3, 2, 7e9) == pytest.approx((1e-3, 1e-3, 1.0))
    # noise that makes more blocks faster: no host time per block, all of the 1-block time is the rest
    assert split_plain(2e-3, 1.5e-3, 10e-3, 2, 8e9) == pytest.approx((0.0, 2e-3, 1.0))
    # host time never takes the whole step: at least 5% of it is left to the FLOPs
    assert split_plain(2e-3, 22e-3, 10e-3, 2, 5e8) == pytest.approx((5e-3, 0.0, 1.0))


def test_a_step_faster_than_the_matmuls_raises_the_dtype_figure():
    from shardwise.check.calibrate import raise_to_step

    # the step reached 0.05 TFLOP/s, the matmul benchmark 0.04: fp32 becomes 0.05 (efficiency 1)
    assert raise_to_step({"fp32": 0.04, "bf16": 0.06}, "fp32", 0.05) == ({"fp32": 0.05, "bf16": 0.06}, True)
    # slower than the matmuls: unchanged (the efficiency is the fraction)
    assert raise_to_step({"fp32": 0.04}, "fp32", 0.03) == ({"fp32": 0.04}, False)
