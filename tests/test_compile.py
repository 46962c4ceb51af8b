"""--compile: each transformer block under torch.compile (inductor, on the CPU here) trains like
eager single-process training, alone and under FSDP2 and tensor parallelism; the saved tensors of
a compiled block are the estimate's compiled inventory.

Compiled training is held to the equivalence test's band (tests/test_equivalence.py): inductor
fuses pointwise ops and reorders their reductions (RMSNorm's mean of squares, the fused residual
add), which moves fp32 results by rounding only; over a few AdamW steps that stays within
1e-5 relative, where a wrong engine is off by ~lr. Compiling costs seconds on the CPU: one tiny
model, two steps, one process group for the distributed plans.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _dist import run_ranks
from _models import TINY_GPT2, TINY_LLAMA

from shardwise.spec.plan import Plan

STEPS = 2
SEED = 1234
RTOL = 1e-5  # the equivalence test's LOSS_RTOL / PARAM_RTOL / TENSOR_RTOL
BASE = Plan(mbs=2, gbs=4, seq=32, precision="fp32")
SPEC = TINY_LLAMA.scaled(layers=2)


def train(spec, plan):
    """STEPS AdamW steps; (losses, full state dict on rank 0)."""
    from shardwise.run.dist import local_device
    from shardwise.run.engine import Engine

    eng = Engine(spec, plan, device=local_device("cpu"), seed=SEED, lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(SEED + 1)
    data = torch.randint(0, spec.vocab, (STEPS, eng.plan.gbs, eng.plan.seq + 1), generator=g)
    per = eng.plan.gbs // eng.dp_size
    losses = [eng.train_step(data[i, eng.dp_rank * per : (eng.dp_rank + 1) * per]).loss for i in range(STEPS)]
    state = eng.state_dict_full()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # how many graphs dynamo compiled
    return losses, (state if eng.rank == 0 else None), graphs


def train_all(items):
    import torch.distributed as dist

    out = []
    for spec, plan in items:
        out.append(train(spec, plan))
        dist.barrier()
    return out


def assert_same(got, ref, name):
    torch.testing.assert_close(
        torch.tensor(got[0]), torch.tensor(ref[0]), rtol=RTOL, atol=0, msg=lambda m: f"{name}: {m}"
    )
    assert list(got[1]) == list(ref[1]), f"{name}: parameter names differ"
    for k, want in ref[1].items():
        rel = float((got[1][k] - want).norm() / want.norm())
        assert rel < RTOL, f"{name}: final {k} differs by {rel:.2e} of its norm"


@pytest.mark.slow
def test_compiled_plans_train_like_one_eager_process():
    ref = train(SPEC, BASE.replace(dp=1).resolve(SPEC, 1))
    # FSDP2 (ZeRO-3) with the per-op recompute policy inside each compiled block
    plan = BASE.replace(compile=True, dp=2, zero=3, recompute="selective-op").resolve(SPEC, 2)
    got = run_ranks(train_all, 2, [(SPEC, plan)], timeout=300)[0][0]
    assert got[2] > 0, "nothing was compiled"
    assert_same(got, ref, plan.short())
    # inductor itself saves what the partition-only backend of the fast tests does
    assert compiled_saved_bytes(LLAMA_BLOCK, backend="inductor") == estimated(LLAMA_BLOCK, act=4, res=4)


# ---- refusals: one line, before anything starts -------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


NO_CXX = {"cpp.cxx": (None, "no-such-g++")}  # inductor's compiler search list, as CXX=no-such-g++ sets it


def test_a_missing_cpu_compiler_is_named_with_its_fix():
    from torch._inductor import config

    from shardwise.run.inductor import missing_compiler

    assert missing_compiler(torch.device("cpu")) is None  # g++ and Python.h are on every machine here
    with config.patch(NO_CXX):
        why = missing_compiler(torch.device("cpu"))
    assert "C++ compiler" in why and "no-such-g++ not found" in why and "apt-get install g++" in why


def test_missing_python_headers_are_named(monkeypatch, tmp_path):
    from shardwise.run import inductor

    monkeypatch.setattr(inductor.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert "python3-dev" in inductor.missing_compiler(torch.device("cpu"))


def test_cuda_without_triton_is_named(monkeypatch):
    import torch.utils._triton as triton

    from shardwise.run.inductor import missing_compiler

    monkeypatch.setattr(triton, "has_triton", lambda: False)
    assert "pip install triton" in missing_compiler(torch.device("cuda"))


def test_run_refuses_in_one_line_and_starts_nothing(monkeypatch, capsys):
    from torch._inductor import config

    from shardwise import cli
    from shardwise.run import launch

    def no(*a, **k):
        raise AssertionError("nothing may start on a refusal")

    monkeypatch.setattr(launch, "launch", no)
    monkeypatch.setattr(launch, "worker", no)
    llama = str(ROOT / "examples/tiny-llama.toml")
    assert cli.main(["run", llama, "--compile", "--tp", "2", "--nproc", "2", "--device", "cpu"]) == 2
    assert "--compile with --tp 2" in capsys.readouterr().err
    with config.patch(NO_CXX):
        assert cli.main(["run", llama, "--compile", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardwise: error: --compile on the CPU needs a C++ compiler") and err.count("\n") == 1
    assert cli.main(["trace", "llama-3.1-8b", "--gpus", "8", "--compile"]) == 2
    assert "trace without it" in capsys.readouterr().err
    assert cli.main(["check", llama, "--compile", "--device", "cpu"]) == 2
    assert "MemTracker" in capsys.readouterr().err


def test_plan_argv_carries_compile():
    from shardwise.cli.plan import plan_argv

    argv = plan_argv(Plan(dp=2, gbs=2, compile=True, dp_shard=2, zero=3))
    assert "--compile" in argv and argv[argv.index("--dp-shard") + 1] == "2"
    assert "--compile" not in plan_argv(Plan(dp=2, gbs=2))


# ---- what a compiled block saves: the estimate's compiled inventory ------------------------------
# The partitioner of AOTAutograd decides what a compiled graph saves, before inductor writes its
# kernels: "aot_eager_decomp_partition" runs the same decompositions and min-cut partition without
# the C++ build (seconds less per graph). The slow test below holds inductor itself to the same bytes.
PARTITION_ONLY = "aot_eager_decomp_partition"
b, s = 2, 16
LLAMA_BLOCK = TINY_LLAMA.scaled(layers=1, heads=8, ffn_hidden=96)
GPT_BLOCK = TINY_GPT2.scaled(layers=1, ffn_hidden=96, tied_embeddings=False)


def compiled_saved_bytes(spec, *, dtype=torch.float32, autocast=False, recompute="none", backend=PARTITION_ONLY):
    """Bytes of the distinct storages the run tier's Block saves for backward under torch.compile,
    its parameters and their autocast copies excluded (estimate/memory counts those)."""
    from shardwise.run.model import Block

    torch.manual_seed(0)
    block = Block(spec).train().to(dtype)
    block.recompute = recompute
    block.forward = torch.compile(block.forward, fullgraph=True, backend=backend)
    x = torch.randn(b, s, spec.hidden, requires_grad=True, dtype=dtype)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    weights = {(tuple(p.shape), tuple(reversed(p.shape))) for p in block.parameters() if p.ndim == 2}
    seen = {}

    def pack(t):
        cast_weight = autocast and t.dtype == torch.bfloat16 and any(t.shape in w for w in weights)
        if t.untyped_storage().data_ptr() not in params and not cast_weight:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(seen.values())


def estimated(spec, *, act, res, autocast=False, recompute="none"):
    from shardwise.estimate.activations import layer_bytes

    plan = Plan(dp=1, mbs=b, gbs=b, seq=s, compile=True, recompute=recompute)
    kept, _ = layer_bytes(
        spec, plan, layout="torch", attention="flash", autocast=autocast, act=act, res=res, device="cpu"
    )
    return kept


@pytest.mark.slow  # a compile per case: seconds, not a unit test's fraction of one
@pytest.mark.parametrize(
    "spec, dtype, autocast, act, res",
    [
        (LLAMA_BLOCK, torch.float32, False, 4, 4),
        (LLAMA_BLOCK, torch.float32, True, 2, 4),  # autocast: fp32 residual, bf16 matmuls
        (GPT_BLOCK, torch.bfloat16, False, 2, 2),
    ],
    ids=["llama-fp32", "llama-autocast", "gpt-bf16"],
)
def test_compiled_block_saves_the_compiled_inventory(spec, dtype, autocast, act, res):
    """Exact, per block: the estimate's compiled inventory is what the compiled block saves."""
    assert compiled_saved_bytes(spec, dtype=dtype, autocast=autocast) == estimated(
        spec, act=act, res=res, autocast=autocast
    )


@pytest.mark.slow
def test_compiled_per_op_policy_keeps_only_what_the_backward_reads():
    """selective-op under compile: the block's input and the policy's outputs but w2's, which no
    backward reads (eager's policy keeps it): 8,192 + 62,464 - 8,192 bytes (fp32, 32 tokens)."""
    got = compiled_saved_bytes(LLAMA_BLOCK, recompute="selective-op")
    assert got == estimated(LLAMA_BLOCK, act=4, res=4, recompute="selective-op") == 62_464


def test_compiled_block_inventory_hand_worked():
    """Llama block, h 64, q 64 (8 heads of 8), kv 16, f 96, b*s = 32 tokens, fp32, CPU. Eager keeps
    121,088 bytes: x, h (the two norms' inputs) and both norms' fp32 normalized tensors, 4 x 8,192;
    the 2 rstd 2 x 128; wq/wk/wv's input 8,192; cos and sin 2 x 16 x 8 x 4 = 1,024; q 8,192,
    k, v 2 x 2,048; the flash output (wo's input) 8,192 and logsumexp 8 x 32 x 4 = 1,024;
    w1/w3's input 8,192; w1 x, silu, w3 x and the product 4 x 12,288. Compiled drops the two
    normalized tensors, cos and sin and silu (16,384 + 1,024 + 12,288) and keeps wo's output in
    place of h (the same 8,192 in fp32): 121,088 - 29,696 = 91,392 (measured above)."""
    from shardwise.estimate.activations import layer_bytes

    kw = dict(layout="torch", attention="flash", autocast=False, act=4, res=4, device="cpu")
    plan = Plan(dp=1, mbs=b, gbs=b, seq=s)
    assert layer_bytes(LLAMA_BLOCK, plan, **kw)[0] == 121_088
    assert layer_bytes(LLAMA_BLOCK, plan.replace(compile=True), **kw)[0] == 91_392
    # under autocast h is fp32 and wo's output bf16: the swap saves 4,096 more, and the three (two)
    # bf16 copies of the norms' outputs become one each: 3 x 4,096 fewer
    auto = dict(kw, autocast=True, act=2)
    assert (
        layer_bytes(LLAMA_BLOCK, plan, **auto)[0] - layer_bytes(LLAMA_BLOCK, plan.replace(compile=True), **auto)[0]
        == 2 * 8_192 + 512 + 6_144 + 4_096 + 3 * 4_096
    )


# ---- time: fewer memory-bound passes -------------------------------------------------------------
def test_compiled_elementwise_passes_hand_worked():
    """GELU model (h 1024, f 4096), mbs 2 x seq 512, bf16: eager moves the residual stream
    (1024 x 1024 elements) 10 times (2 norms x 2, 2 residual adds x 3), compiled 9 (norm 2, the
    add fused with the second norm 4, the last add 3); GELU 2 passes either way. A SwiGLU model with
    dropout: eager 10 + 2 x 2.5 and SwiGLU 5, compiled 9 + 2 x 0.5 (the masks' writes) and 3."""
    from shardwise.estimate.time import layer_elementwise_bytes
    from shardwise.spec.model import ModelSpec

    toy = ModelSpec(name="toy", layers=2, hidden=1024, heads=8, vocab=1000, ffn_kind="gelu", ffn_hidden=4096)
    plan = Plan(mbs=2, seq=512)
    r, f = 1024 * 1024, 1024 * 4096
    assert layer_elementwise_bytes(toy, plan, "flash", 2)["block"] == 2 * (10 * r + 2 * f)
    assert layer_elementwise_bytes(toy, plan.replace(compile=True), "flash", 2)["block"] == 2 * (9 * r + 2 * f)
    swiglu = toy.scaled(ffn_kind="swiglu", dropout=0.1)
    assert layer_elementwise_bytes(swiglu, plan, "flash", 2)["block"] == 2 * (15 * r + 5 * f)
    assert layer_elementwise_bytes(swiglu, plan.replace(compile=True), "flash", 2)["block"] == 2 * (10 * r + 3 * f)


def test_estimate_says_what_compile_changes():
    from shardwise import estimate
    from shardwise.spec.hardware import make_cluster

    cl = make_cluster("h100-80gb", 8)
    plan = Plan(zero=3, mbs=1, seq=4096)
    eager, comp = estimate("llama-3.1-8b", cl, plan), estimate("llama-3.1-8b", cl, plan.replace(compile=True))
    assert comp.memory.activations < eager.memory.activations and comp.time.step_s < eager.time.step_s
    (note,) = [n for n in comp.notes if n.startswith("--compile")]
    assert "lower per GPU than eager" in note and not any(n.startswith("--compile") for n in eager.notes)
