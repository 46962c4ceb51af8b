"""The trace tier: the run tier's step on fake tensors and a fake process group.

The estimate is held against the trace at real shapes (Llama-3.1-8B's and 70B's hidden size, heads,
vocabulary and 8192-token sequence; fewer layers, which every per-layer item multiplies) on world
sizes from 8 to 512, for every engine and plan family the run tier builds: collectives exact,
model states within 1%, peak within 5% (check.compare.TRACE_TOL). A family the estimate gets
wrong is a failing test. Two families run in the fast suite; the rest, and whole models, are slow.
"""

from __future__ import annotations

import json

import pytest

from shardwise.check.compare import check_trace
from shardwise.cli import main
from shardwise.spec.hardware import make_cluster
from shardwise.spec.plan import Plan
from shardwise.spec.presets import load_model
from shardwise.trace import tracer

SEQ = 8192  # Llama 3.1's pre-training context


def _verdict(name: str, layers: int, gpus: int, **plan) -> None:
    spec = load_model(name)
    if layers:
        spec = spec.scaled(layers=layers)
    p = Plan(seq=SEQ, **plan).resolve(spec, gpus)
    rep = check_trace(spec, p, make_cluster("h100-80gb", gpus))
    bad = [f"{r.ranks} {r.item}: predicted {r.predicted} traced {r.measured}" for r in rep.judged if not r.ok]
    assert rep.judged and not bad, f"{p.short()}: " + "; ".join(bad)
    # every role traced, and the peak holds at least the model states it steps with
    for r in rep.ranks:
        m = r["measurement"]["memory"]
        assert m["detail"]["peak"] >= m["params"] + m["grads"] + m["optimizer"]


# ---- the fast suite: DDP's rebuilt buckets, and FSDP2 over TP + SP at world 64 --------------------------
def test_ddp_at_llama_8b_shapes_matches_the_estimate():
    _verdict("llama-3.1-8b", 2, 8, dp=8, zero=0, gbs=16)


def test_fsdp_over_tp_sp_at_world_64_matches_the_estimate():
    _verdict("llama-3.1-8b", 2, 64, tp=8, sp=True, zero=3, gbs=16)


FAMILIES = [
    ("zero1", "llama-3.1-8b", 2, 8, dict(dp=8, zero=1, gbs=16)),
    ("zero2", "llama-3.1-8b", 2, 8, dict(dp=8, zero=2, gbs=16)),
    # the chunked loss runs inside the model: the root's pre-backward (gathered again, the last block
    # prefetched) comes before the loss's backward (estimate/memory/fsdp2._fsdp_alone)
    ("zero3-dp64", "llama-3.1-8b", 2, 64, dict(dp=64, zero=3, gbs=128)),
    ("ddp+tp", "llama-3.1-8b", 2, 16, dict(tp=8, dp=2, zero=0, gbs=4)),
    ("1f1b-pp4-zero1", "llama-3.1-8b", 4, 8, dict(pp=4, dp=2, zero=1, gbs=8)),
    ("interleaved-tp2", "llama-3.1-8b", 4, 8, dict(pp=2, vpp=2, schedule="interleaved", tp=2, dp=2, gbs=4)),
    ("gpipe", "llama-3.1-8b", 2, 8, dict(pp=2, dp=4, schedule="gpipe", gbs=8)),
    ("zero3-full-recompute", "llama-3.1-8b", 2, 8, dict(dp=8, zero=3, recompute="full", gbs=8)),
    (
        "zero3-tp2-selective-math",
        "llama-3.1-8b",
        2,
        16,
        dict(tp=2, dp=8, zero=3, recompute="selective", attention="math", gbs=8),
    ),
    ("zero3-tp2-selective", "llama-3.1-8b", 2, 16, dict(tp=2, dp=8, zero=3, recompute="selective", gbs=8)),
    # the first stage: DTensor's embedding backward makes the whole [V, H] table's gradient on every tp
    # rank, which FSDP2 accumulates in fp32 (estimate/memory/fsdp2._fsdp_sizes' e_grad); the last: its
    # loss's backward runs resharded (1F1B: a forward before each backward)
    ("70b-tp8-pp4-dp16-zero3", "llama-3.1-70b", 8, 512, dict(tp=8, pp=4, dp=16, zero=3, sp=True, gbs=64)),
    ("tp8-pp2-dp4-zero3", "llama-3.1-8b", 2, 64, dict(tp=8, pp=2, dp=4, zero=3, sp=True, gbs=8)),
    ("pp2-dp4-zero3-m4", "llama-3.1-8b", 4, 8, dict(pp=2, dp=4, zero=3, gbs=16)),  # 1F1B's steady state
    ("hsdp-zero3", "llama-3.1-8b", 2, 8, dict(dp=8, dp_shard=4, zero=3, gbs=16)),
    ("uneven-pp2-zero1", "llama-3.1-8b", 4, 8, dict(pp=2, dp=4, last_less=2, zero=1, gbs=8)),
    ("zero3-selective-op", "llama-3.1-8b", 2, 8, dict(dp=8, zero=3, recompute="selective-op", gbs=8)),
    ("zero3-selective-layer", "llama-3.1-8b", 2, 8, dict(dp=8, zero=3, recompute="selective-layer:2", gbs=8)),
    # torchao's Float8Linear on fake tensors; FSDP2 gathers the linears in FP8 (scales precomputed)
    ("fp8-tensorwise-zero2", "llama-3.1-8b", 2, 8, dict(dp=8, zero=2, precision="fp8-tensorwise", gbs=16)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,model,layers,gpus,plan", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_plan_family_at_real_shapes_matches_the_estimate(name, model, layers, gpus, plan):
    _verdict(model, layers, gpus, **plan)


@pytest.mark.slow
def test_whole_llama_8b_zero3_matches_the_estimate():
    _verdict("llama-3.1-8b", 0, 8, dp=8, zero=3, gbs=16)


# ---- the pieces ----------------------------------------------------------------------------------------
def test_roles_are_each_pipeline_stage_at_dp_and_tp_rank_0():
    # mesh (pp, dp, tp), tp innermost: rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank = 4 * pp_rank here
    p = Plan(dp=2, tp=2, pp=4, gbs=8)
    assert [(r.rank, r.coords["pp"]) for r in tracer.roles(p)] == [(0, 0), (4, 1), (12, 3)]
    assert [r.name for r in tracer.roles(p)] == ["stage 0 (first)", "stage 1 (middle)", "stage 3 (last)"]
    assert [r.rank for r in tracer.roles(Plan(dp=8))] == [0]
    assert [r.rank for r in tracer.roles(Plan(dp=2, pp=2, gbs=4))] == [0, 2]


def test_memory_is_counted_in_cuda_allocator_blocks():
    """A 1-byte tensor holds one 512-byte block, 513 bytes two (1024), 1024 bytes two."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from shardwise.trace import fake

    with fake.world(2, 0), fake.fake_tensors():
        sizes = {}
        for n in (1, 513, 1024):
            mt = MemTracker()
            with mt:
                t = torch.empty(n, dtype=torch.uint8)
                sizes[n] = sum(d["Total"] for d in mt.get_tracker_snapshot("current").values())
            del t
    assert sizes == {1: 512, 513: 1024, 1024: 1024}


def test_dtensor_sharding_propagation_is_not_this_ranks_memory():
    """DTensor learns an op's output layout by running the op on fakes of the global shapes, in the
    fake mode already active: those are not counted. A [1024, 1032] fp32 tensor sharded over 2 ranks:
    the product's local half (2 MiB + a block's rounding) is all the step allocates."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from shardwise.trace import fake

    with fake.world(2, 0):
        mesh = init_device_mesh("cpu", (2,))
        with fake.fake_tensors():
            x = DTensor.from_local(torch.empty(512, 1032), mesh, [Shard(0)], run_check=False)
            mt = MemTracker()
            with mt:
                y = x * 3.0
                peak = sum(d["Total"] for d in mt.get_tracker_snapshot("peak").values())
    assert y.to_local().shape == (512, 1032) and peak == 512 * 1032 * 4


# ---- the command line ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,says",
    [
        (["mixtral-8x7b", "--gpus", "8"], "mixture of experts"),
        (["llama-3.1-8b", "--gpus", "8", "--precision", "fp16-mixed"], "fp16-mixed"),
        (["llama-3.1-8b", "--gpus", "8", "--zero", "3", "--offload", "params"], "offload params"),
        (["llama-3.1-8b", "--gpus", "8", "--tp", "3"], "does not divide"),
        (["llama-3.1-8b", "--gpus", "8", "--gpu", "a100-80gb", "--precision", "fp8-tensorwise"], "FP8 tensor cores"),
    ],
)
def test_a_plan_the_run_tier_cannot_build_is_one_line(argv, says, capsys):
    assert main(["trace", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err


def test_trace_json_of_a_run_config(capsys):
    assert main(["trace", "examples/tiny-llama.toml", "--dp", "2", "--zero", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["dp"] == 2 and out["fits"] is True
    (role,) = out["roles"]
    m = role["measurement"]
    kinds = {(c["kind"], c["group"]) for c in m["comm"]}
    assert {("all-gather", "dp"), ("reduce-scatter", "dp")} <= kinds
    assert m["memory"]["detail"]["peak"] == role["moments"]["peak"] >= role["moments"]["optimizer step"]
    assert role["flops"]["total"] > 0


def test_check_trace_passes_on_a_run_config(capsys):
    assert main(["check", "examples/tiny-llama.toml", "--trace", "--dp", "2", "--zero", "2"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "peak 5%" in out


def _outgrow(q) -> None:
    tracer._limit_memory()
    try:
        bytearray(2 * tracer._available() + 2**30)
        q.put("allocated")
    except MemoryError:
        q.put("MemoryError")


def test_a_trace_child_cannot_outgrow_the_machine():
    """The cap every trace child sets: asking for twice the memory available fails at once (MemoryError,
    reported as one line by the parent), instead of swapping the machine."""
    import multiprocessing as mp

    if not tracer._available():
        pytest.skip("no /proc/meminfo here: the cap is not set")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_outgrow, args=(q,))
    p.start()
    p.join(60)
    assert q.get(timeout=5) == "MemoryError"
