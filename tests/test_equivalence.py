"""The core test of the project: every engine trains exactly like one process does.

Same seed, same data, AdamW, gradient accumulation: the per-step losses under DDP, ZeRO-1/2/3,
TP, TP+SP, PP (GPipe, 1F1B, interleaved 1F1B, interleaved zero bubble, ZBV, DualPipeV), recompute, and the mixes dp x tp, dp x pp,
tp x pp, dp x tp x pp must equal single-process training within 1e-5 relative, and so must
the final parameters. CPU, gloo, fp32.

Several plans run inside one spawned group (process start-up is most of the cost on CPU).
Mixed precision runs on CPU too (autocast, FSDP2's MixedPrecisionPolicy, pure bf16); the GPU
tests at the end (NCCL, one GPU each) are skipped without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
from _dist import run_ranks
from _models import TINY_GPT2, TINY_LLAMA

from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan

STEPS = 10
SEED = 1234
LR = 1e-3
LOSS_RTOL = 1e-5
# AdamW divides each element's step by that element's own gradient size, so an element whose
# gradient is near zero turns rounding-level differences (another summation order) into step
# differences of up to lr. atol = 1% of one step at lr 1e-3; each tensor as a whole must agree
# to TENSOR_RTOL in norm, so a few noisy elements pass but a wrong engine does not (a lost
# micro-batch or a wrong average moves whole tensors by ~lr).
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-5
TENSOR_RTOL = 1e-5

LLAMA, GPT2 = TINY_LLAMA, TINY_GPT2
# softmax(q.(k + b)) = softmax(q.k) per query: the key bias's exact gradient is zero, so what
# it holds after training is rounding noise amplified by Adam, different for every summation
# order. It is checked for staying at noise level instead of elementwise.
ZERO_GRADIENT = ("attention.wk.bias",)
NOISE_LEVEL = 1e-4  # 1% of the ~1e-2 that 10 AdamW steps at lr 1e-3 move a parameter with a real gradient
BASE = Plan(mbs=2, gbs=8, seq=32, precision="fp32")  # single process: 4 micro-batches of 2


def batches(spec: ModelSpec, plan: Plan) -> torch.Tensor:
    """[steps, gbs, seq+1] random tokens, fixed by the seed: the same global batches for every plan."""
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, spec.vocab, (STEPS, plan.gbs, plan.seq + 1), generator=g)


def train(spec: ModelSpec, plan: Plan, device: str = "cpu") -> tuple[list[float], list[float], dict | None]:
    """STEPS steps of AdamW under `plan`; (losses, grad norms, full state dict on rank 0)."""
    from shardwise.run.dist import local_device
    from shardwise.run.engine import Engine

    eng = Engine(spec, plan, device=local_device(device), seed=SEED, lr=LR, weight_decay=0.1)
    data = batches(spec, eng.plan)
    per = eng.plan.gbs // eng.dp_size
    losses, norms = [], []
    for step in range(STEPS):
        stats = eng.train_step(data[step, eng.dp_rank * per : (eng.dp_rank + 1) * per])
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
    state = eng.state_dict_full()
    return losses, norms, (state if eng.rank == 0 else None)


def train_many(spec: ModelSpec, plans: list[Plan]) -> list[tuple]:
    """Rank-side: each plan in turn in one process group."""
    import torch.distributed as dist

    out = []
    for p in plans:
        out.append(train(spec, p))
        dist.barrier()
    return out


_reference: dict[tuple, tuple] = {}


def reference(spec: ModelSpec, optimizer: str = "adamw", chunked: bool = True) -> tuple:
    """Single-process training: one rank, no process group, 4 micro-batches per step. With the
    loss the plan under test computes: chunked (spec/loss.py, tp = 1 and no pipeline), or the
    plain F.cross_entropy on the logits, so that the engines are compared, not the two loss
    kernels' rounding (tests/test_loss.py holds those to 1e-6)."""
    import shardwise.run.engine as engine

    key = (spec.name, optimizer, chunked)
    if key not in _reference:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the ranks run with one thread each; this is the fast setting here too
        kept = engine.chunked_loss
        if not chunked:
            engine.chunked_loss = lambda plan: False
        try:
            _reference[key] = train(spec, BASE.replace(dp=1, optimizer=optimizer))
        finally:
            engine.chunked_loss = kept
            torch.set_num_threads(threads)
    return _reference[key]


def assert_same_training(spec: ModelSpec, plan: Plan, got: tuple) -> None:
    from shardwise.spec.loss import chunked_loss

    ref_losses, ref_norms, ref_state = reference(spec, plan.optimizer, bool(chunked_loss(plan)))
    losses, norms, state = got
    name = plan.short()
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(ref_losses, dtype=torch.float64),
        rtol=LOSS_RTOL,
        atol=0,
        msg=lambda m: f"{name}: losses differ\n{m}",
    )
    torch.testing.assert_close(
        torch.tensor(norms, dtype=torch.float64),
        torch.tensor(ref_norms, dtype=torch.float64),
        rtol=1e-4,
        atol=0,
        msg=lambda m: f"{name}: grad norms differ\n{m}",
    )
    assert list(state) == list(ref_state), f"{name}: parameter names differ"
    for k in ref_state:
        if k.endswith(ZERO_GRADIENT):
            assert state[k].abs().max() < NOISE_LEVEL and ref_state[k].abs().max() < NOISE_LEVEL, k
            continue
        torch.testing.assert_close(
            state[k], ref_state[k], rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=lambda m: f"{name}: final {k} differs\n{m}"
        )
        rel = float((state[k] - ref_state[k]).norm() / ref_state[k].norm())
        assert rel < TENSOR_RTOL, f"{name}: final {k} differs by {rel:.2e} of its norm"


def train_all(items: list[tuple[ModelSpec, Plan]]) -> list[tuple]:
    """Rank-side: each (model, plan) in turn, in one process group."""
    import torch.distributed as dist

    out = []
    for spec, plan in items:
        out.append(train(spec, plan))
        dist.barrier()
    return out


# ---- the plans ----------------------------------------------------------------------------------
# world size -> (model, plan fields); 39 plans. One spawned group per world size runs all of its plans
# (starting ranks is most of the cost here); each plan is then its own test.
PLANS: dict[int, list[tuple[ModelSpec, dict]]] = {
    2: [  # every engine alone
        (LLAMA, dict(dp=2, zero=0)),
        (LLAMA, dict(dp=2, zero=1)),
        (LLAMA, dict(dp=2, zero=2)),
        (LLAMA, dict(dp=2, zero=3)),
        (LLAMA, dict(tp=2)),
        (LLAMA, dict(tp=2, sp=True)),
        (LLAMA, dict(pp=2, schedule="gpipe")),
        (LLAMA, dict(pp=2, schedule="1f1b")),
        (LLAMA, dict(pp=2, schedule="interleaved", vpp=2)),
        # torch's zero-bubble schedules (backward split into inputs' and weights'); the V ones
        # place stages 0 and 3 on rank 0; 4 micro-batches = DualPipeV's minimum (one per stage)
        (LLAMA, dict(pp=2, schedule="interleaved-zb", vpp=2)),
        (LLAMA, dict(pp=2, schedule="zbv")),
        (LLAMA, dict(pp=2, schedule="dualpipev")),
        # recompute on top of FSDP, TP+SP and PP
        (LLAMA, dict(dp=2, zero=3, recompute="full")),
        (LLAMA, dict(tp=2, sp=True, recompute="selective")),
        (LLAMA, dict(pp=2, recompute="full")),
        # other optimizers (Adafactor needs whole parameters: see test_refusals)
        (LLAMA, dict(tp=2, sp=True, optimizer="sgd")),
        (LLAMA, dict(dp=2, zero=3, optimizer="sgd")),
        (LLAMA, dict(dp=2, zero=1, optimizer="adafactor")),
        (LLAMA, dict(pp=2, optimizer="adafactor")),
        # GPT-2 style: biases, LayerNorm, learned positions (position-parallel under TP+SP) and
        # the tied embedding (across pipeline stages: summed gradients of the two copies)
        (GPT2, dict(dp=2)),
        (GPT2, dict(tp=2)),
        (GPT2, dict(tp=2, sp=True)),
        (GPT2, dict(pp=2)),
        (GPT2, dict(pp=2, schedule="interleaved", vpp=2)),
    ],
    4: [  # the mixes
        (LLAMA, dict(dp=2, tp=2)),
        (LLAMA, dict(dp=2, tp=2, zero=1, sp=True)),
        (LLAMA, dict(dp=2, tp=2, zero=3, sp=True)),
        (LLAMA, dict(dp=2, pp=2)),
        (LLAMA, dict(dp=2, pp=2, zero=1, schedule="gpipe")),
        (LLAMA, dict(dp=2, pp=2, zero=3, schedule="interleaved", vpp=2)),
        # zero-bubble over dp: right under ZeRO-2 only (the others are refused: spec/plan.py)
        (LLAMA, dict(dp=2, pp=2, zero=2, schedule="zbv")),
        (LLAMA, dict(tp=2, pp=2, sp=True)),
        (LLAMA, dict(tp=2, pp=2, schedule="interleaved", vpp=2)),
        (GPT2, dict(dp=2, tp=2, zero=2, sp=True)),
        (GPT2, dict(dp=2, pp=2, zero=1)),
        (GPT2, dict(dp=2, pp=2, zero=3)),
        (GPT2, dict(tp=2, pp=2, sp=True)),
    ],
    8: [  # all three at once: DDP + TP path with ZeRO-1, and FSDP2 on the 2-D dp x tp mesh, per stage
        (LLAMA, dict(dp=2, tp=2, pp=2, zero=1, sp=True)),
        (LLAMA, dict(dp=2, tp=2, pp=2, zero=3)),
    ],
}


def check_world(world: int) -> None:
    """Run every plan of this world size in one spawned group; report every plan that differs."""
    items = [(spec, BASE.replace(**fields).resolve(spec, world)) for spec, fields in PLANS[world]]
    ranks = run_ranks(train_all, world, items, timeout=420)
    failures = []
    for i, (spec, plan) in enumerate(items):
        try:
            for r in range(1, world):  # the loss is all-reduced: every rank reports the same
                assert ranks[r][i][0] == ranks[0][i][0], f"rank {r} reports another loss"
            assert_same_training(spec, plan, ranks[0][i])
        except AssertionError as e:
            failures.append(f"{spec.name} {plan.short()} {plan.optimizer}: {e}")
    assert not failures, f"{len(failures)} of {len(items)} plans differ from one process:\n" + "\n\n".join(failures)


# One test per world size (not per plan): under pytest-xdist a per-plan test would start the
# same group of ranks once per worker.
@pytest.mark.slow
def test_two_ranks():
    check_world(2)


@pytest.mark.slow
def test_four_ranks():
    check_world(4)


@pytest.mark.slow
def test_eight_ranks():
    check_world(8)


# ---- mixed precision: the GPU code paths, run on CPU ---------------------------------------------
MIXED = [
    dict(dp=2, precision="bf16-mixed"),
    dict(dp=2, zero=3, precision="bf16-mixed"),
    dict(pp=2, precision="bf16-mixed"),
    dict(tp=2, sp=True, precision="bf16-mixed"),
    dict(dp=2, precision="bf16"),
]


def train_mixed(items, device="cpu"):
    out = []
    for spec, plan in items:
        losses, _, state = train(spec, plan, device)
        out.append((losses, {state[k].dtype for k in state} if state is not None else None))
    return out


@pytest.mark.slow
def test_mixed_precision_runs_in_low_precision():
    """bf16-mixed (autocast under DDP/TP/PP, FSDP2's MixedPrecisionPolicy under ZeRO-3) and pure
    bf16: the losses stay within bf16's resolution of fp32 training (8 bits of mantissa: 2^-8
    relative per op; 1e-3 on a mean over 512 tokens), yet are not the fp32 ones, so the low
    precision is really in effect. Mixed precision keeps fp32 parameters (FSDP2: the shard is
    the master), pure bf16 keeps bf16 ones."""
    items = [(LLAMA, BASE.replace(**v).resolve(LLAMA, 2)) for v in MIXED]
    ranks = run_ranks(train_mixed, 2, items, timeout=300)
    ref = torch.tensor(reference(LLAMA)[0], dtype=torch.float64)
    for (spec, plan), (losses, dtypes) in zip(items, ranks[0]):
        got = torch.tensor(losses, dtype=torch.float64)
        rel = float(((got - ref).abs() / ref).max())
        assert 1e-6 < rel < 1e-3, f"{plan.short()} {plan.precision}: losses {rel:.1e} from fp32"
        want = torch.bfloat16 if plan.precision == "bf16" else torch.float32
        assert dtypes == {want}, f"{plan.short()} {plan.precision}: parameters in {dtypes}"


# ---- on GPUs (skipped without CUDA) -------------------------------------------------------------
GPU_LOSS_RTOL = 1e-4  # fp32 on the GPU: other kernels (cuBLAS, memory-efficient SDPA), other rounding


@pytest.mark.gpu
def test_gpu_one_rank_every_precision():
    """One GPU: fp32 trains like the CPU; bf16-mixed (autocast), fp16-mixed (autocast + GradScaler)
    and pure bf16 stay within low precision's reach of it, in low precision for real."""
    ref = torch.tensor(reference(LLAMA)[0], dtype=torch.float64)
    for precision in ("fp32", "bf16-mixed", "fp16-mixed", "bf16"):
        losses, norms, state = train(LLAMA, BASE.replace(dp=1, precision=precision), "cuda")
        rel = float(((torch.tensor(losses, dtype=torch.float64) - ref).abs() / ref).max())
        if precision == "fp32":
            assert rel < GPU_LOSS_RTOL, f"fp32 on the GPU: losses {rel:.1e} from the CPU's"
        else:
            assert 1e-6 < rel < 1e-3, f"{precision}: losses {rel:.1e} from fp32"
        assert all(math.isfinite(n) for n in norms), precision
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert {v.dtype for v in state.values()} == {want}, precision


def train_gpu_group(items):
    return [train(spec, plan, "cuda") for spec, plan in items]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_nccl_two_ranks():
    """NCCL, one GPU per rank: DDP, FSDP2 (fp32, and bf16 through MixedPrecisionPolicy with fp32
    gradient reduction), TP+SP and 1F1B match one process (the CPU reference)."""
    fp32 = [dict(dp=2), dict(dp=2, zero=3), dict(tp=2, sp=True), dict(pp=2)]
    mixed = [dict(dp=2, zero=3, precision="bf16-mixed"), dict(dp=2, precision="bf16-mixed")]
    items = [(LLAMA, BASE.replace(**v).resolve(LLAMA, 2)) for v in fp32 + mixed]
    ranks = run_ranks(train_gpu_group, 2, items, timeout=600, device="cuda")
    ref = torch.tensor(reference(LLAMA)[0], dtype=torch.float64)
    for (spec, plan), (losses, _, state) in zip(items, ranks[0]):
        rel = float(((torch.tensor(losses, dtype=torch.float64) - ref).abs() / ref).max())
        bound = GPU_LOSS_RTOL if plan.precision == "fp32" else 1e-3
        assert rel < bound, f"{plan.short()} {plan.precision}: losses {rel:.1e} from one CPU process"
        assert {v.dtype for v in state.values()} == {torch.float32}
