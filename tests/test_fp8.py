"""FP8 training (torchao float8 over bf16-mixed): the estimate's time, communication and memory
terms worked by hand, what torchao itself saves (measured on CPU), the run tier's conversion, and
the one-line refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _models import TINY_LLAMA
from test_time import GPU_T, TOY, cluster

from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.estimate.comm import collectives
from shardwise.estimate.time import GEMM_FIXED_S, MATMUL_EFFICIENCY, step_time
from shardwise.search import search
from shardwise.spec.fp8 import base_precision, check_gpu, fp8_all_gather
from shardwise.spec.hardware import load_gpu, make_cluster
from shardwise.spec.plan import PRECISIONS, Plan

GPU_FP8 = dataclasses.replace(GPU_T, tflops={**GPU_T.tflops, "fp8": 200.0})
H100 = make_cluster("h100-80gb", 8)
# Llama-3.1-8B, one block: q/k/v/o 4096 x (4096 + 1024 + 1024 + 4096) and SwiGLU 3 x 4096 x 14336
# = 218,103,808 linear weight elements; two RMSNorm weights 2 x 4096 = 8,192
LINEAR, NORMS = 218_103_808, 8_192


def test_fp8_precisions_are_plan_values_over_bf16_mixed():
    assert {"fp8-tensorwise", "fp8-rowwise"} <= set(PRECISIONS)
    assert base_precision("fp8-rowwise") == "bf16-mixed" and base_precision("fp32") == "fp32"
    assert fp8_all_gather(Plan(precision="fp8-tensorwise", zero=3))
    assert not fp8_all_gather(Plan(precision="fp8-rowwise", zero=3))  # torchao: tensorwise only
    assert not fp8_all_gather(Plan(precision="fp8-tensorwise", zero=1))  # no FSDP2 gather


def test_linear_matmuls_run_at_the_fp8_rate_the_attention_core_and_head_at_bf16():
    """TOY on one GPU (bf16 100, fp8 200 TFLOP/s), 2 micro-batches of 2 x 512 tokens (M = 1024):
    qkv 2*1024*1024*3072 + out 2*1024*1024*1024 + MLP 2 x 2*1024*1024*4096 = 25,769,803,776 FLOPs
    at fp8; the core 2 x 2*2*512*512*1024 = 2,147,483,648 at bf16 (test_shaped_step_hand_worked's
    27,917,287,424 block FLOPs split in two)."""
    plan = Plan(gbs=4, mbs=2, seq=512, precision="fp8-tensorwise").resolve(TOY, 1)
    cl = dataclasses.replace(cluster(1), gpu=GPU_FP8)
    t = step_time(TOY, cl, plan, collectives(TOY, cl, plan))
    block = (
        25_769_803_776 / (200e12 * MATMUL_EFFICIENCY)
        + 2_147_483_648 / (100e12 * MATMUL_EFFICIENCY)
        + 6 * GEMM_FIXED_S
        + 37_748_736 / 1e12
    )
    head = 2 * 1024 * 1024 * 1000 / (100e12 * MATMUL_EFFICIENCY) + GEMM_FIXED_S
    assert t.detail["forward_s"] == pytest.approx(2 * (2 * block + head))
    # MFU against the fp8 peak: 2048 tokens x 169,721,856 FLOPs per token (3 x forward)
    assert t.mfu == pytest.approx(2048 * 169_721_856 / (t.step_s * 200e12))


def test_fp8_with_a_measured_efficiency_splits_the_same_way():
    plan = Plan(gbs=4, mbs=2, seq=512, precision="fp8-rowwise").resolve(TOY, 1)
    cl = dataclasses.replace(cluster(1), gpu=GPU_FP8)
    t = step_time(TOY, cl, plan, collectives(TOY, cl, plan), efficiency=0.5)
    block = 25_769_803_776 / (200e12 * 0.5) + 2_147_483_648 / (100e12 * 0.5)
    head = 2 * 1024 * 1024 * 1000 / (100e12 * 0.5)
    assert t.detail["forward_s"] == pytest.approx(2 * (2 * block + head))


def _gathers(precision):
    plan = Plan(zero=3, mbs=2, gbs=16, seq=8192, precision=precision)
    est = estimate("llama-3.1-8b", H100, plan)
    return est, {c.what: c for c in est.comm}


def test_fsdp2_gathers_linear_weights_in_fp8_tensorwise_only():
    _, bf16 = _gathers("bf16-mixed")
    _, tw = _gathers("fp8-tensorwise")
    _, rw = _gathers("fp8-rowwise")
    (b,) = [c for w, c in bf16.items() if w.endswith("of each transformer block (FSDP2)") and c.kind == "all-gather"]
    (t,) = [c for w, c in tw.items() if w.endswith("of each transformer block (FSDP2)") and c.kind == "all-gather"]
    assert b.bytes == 2 * (LINEAR + NORMS) == 436_224_000  # 416.02 MiB
    assert t.bytes == 1 * LINEAR + 2 * NORMS == 218_120_192  # 208.02 MiB: the linears in 1 byte
    assert t.count == b.count
    # torchao's precompute_float8_dynamic_scale_for_fsdp: one fp32 amax per weight, 32 x 7 weights
    (amax,) = [c for w, c in tw.items() if w.startswith("FP8 weight amaxes")]
    assert (amax.kind, amax.bytes, amax.count, amax.group) == ("all-reduce", 32 * 7 * 4, 1, "dp")
    assert {c.bytes for c in rw.values()} == {c.bytes for c in bf16.values()}  # rowwise gathers bf16


def test_fsdp2_holds_the_gathered_linears_in_one_byte():
    """Each gathered block copy the peak holds (params.unsharded, buffers.all_gather) shrinks from
    2 (LINEAR + NORMS) to LINEAR + 2 NORMS bytes; everything else is bf16-mixed's."""
    b = _gathers("bf16-mixed")[0].memory.detail
    t = _gathers("fp8-tensorwise")[0].memory.detail
    root = 2 * (4096 * 128_256 * 2 + 4096)  # embeddings, output, final norm in bf16: not converted
    held = 0
    for item in ("params.unsharded", "buffers.all_gather"):
        blocks = (b[item] - (root if item == "params.unsharded" else 0)) / (2 * (LINEAR + NORMS))
        assert blocks == int(blocks) and blocks >= 0
        assert b[item] - t[item] == blocks * LINEAR
        held += blocks
    assert held >= 1  # (the chunked loss's backward: the root gathered, the last block's all-gather prefetched)
    assert {k: v for k, v in b.items() if k not in ("params.unsharded", "buffers.all_gather")} == {
        k: v for k, v in t.items() if k not in ("params.unsharded", "buffers.all_gather")
    }


def test_autocast_keeps_no_cast_of_a_float8_weight():
    """DDP/ZeRO-1 under autocast: bf16-mixed keeps 2 bytes per block linear weight element of the
    blocks whose forward is saved; FP8 keeps none (the chunked loss casts no output weight)."""
    plan = dict(zero=1, mbs=1, gbs=8, seq=2048)
    b = estimate("llama-3.1-8b", H100, Plan(**plan)).memory.detail
    t = estimate("llama-3.1-8b", H100, Plan(**plan, precision="fp8-tensorwise")).memory.detail
    assert b["params.autocast_copy"] == 32 * 2 * LINEAR  # every block's forward is in flight
    assert t.get("params.autocast_copy", 0) == 0
    # the rest is bf16-mixed's: torchao saves the bf16 input each nn.Linear saves under autocast
    assert {k: v for k, v in b.items() if k != "params.autocast_copy"} == t


def test_float8_linear_saves_the_high_precision_input_and_the_weight_itself():
    """torchao float8_linear.py: save_for_backward(input_hp, weight_hp_t): measured on CPU (torch
    has a CPU _scaled_mm), the weight saved is the fp32 parameter's own storage, where autocast's
    nn.Linear saves a new bf16 copy."""
    float8 = pytest.importorskip("torchao.float8")
    lin = torch.nn.Linear(64, 32, bias=False)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    conv = torch.nn.Sequential(lin)
    float8.convert_to_float8_training(conv, config=float8.Float8LinearConfig())
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)

    def saved(model):
        out = []
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: out.append(t) or t, lambda t: t)
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        return out

    kept = saved(conv)
    weight = conv[0].weight
    assert any(t.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr() for t in kept)
    assert not any(t.dtype == torch.float8_e4m3fn for t in kept)  # FP8 copies are never kept
    plain = saved(ref)
    assert any(t.dtype == torch.bfloat16 and t.numel() == 32 * 64 for t in plain)  # autocast's weight cast


def test_run_converts_the_block_linears_not_the_output():
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from shardwise.run import fp8
    from shardwise.run.model import build

    model = build(TINY_LLAMA, device="meta")
    fp8.convert(model, Plan(precision="fp8-rowwise"))
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {
        f"layers.{i}.{w}"
        for i in range(4)
        for w in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        )
    }


def test_run_refuses_fp8_off_an_fp8_gpu():
    from shardwise.run.fp8 import check_fp8

    plan = Plan(precision="fp8-tensorwise").resolve(TINY_LLAMA, 1)
    with pytest.raises(ShardwiseError, match="needs a CUDA GPU with FP8.*use --precision bf16-mixed"):
        check_fp8(TINY_LLAMA, plan, torch.device("cpu"))
    check_fp8(TINY_LLAMA, Plan().resolve(TINY_LLAMA, 1), torch.device("cpu"))  # bf16-mixed: nothing to say


@pytest.mark.parametrize("gpu", ["a100-80gb", "v100-32gb", "t4"])
def test_estimate_and_search_refuse_fp8_on_a_gpu_without_it(gpu, capsys):
    with pytest.raises(ShardwiseError, match=f"needs FP8 tensor cores, which {gpu} has not.*h100-80gb"):
        check_gpu("fp8-rowwise", load_gpu(gpu))
    with pytest.raises(ShardwiseError, match="FP8 tensor cores"):
        search("llama-3.1-8b", make_cluster(gpu, 8), precision="fp8-tensorwise")
    code = main(["estimate", "llama-3.1-8b", "--gpu", gpu, "--gpus", "8", "--precision", "fp8-tensorwise"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bf16-mixed" in err and "Traceback" not in err


def test_search_proposes_fp8_plans_on_an_fp8_gpu():
    ranked = search("llama-3.1-8b", H100, precision="fp8-tensorwise", seq=8192, top=3)
    assert ranked and all(e.plan.precision == "fp8-tensorwise" for e in ranked)
    bf16 = search("llama-3.1-8b", H100, seq=8192, top=1)[0]
    assert ranked[0].time.tokens_per_s > bf16.time.tokens_per_s


@pytest.mark.gpu
def test_check_fp8_on_cuda_one_gpu(capsys):
    """Estimate against measured peak memory, torchao's conversion run on one FP8 GPU."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("this CUDA GPU has no FP8 tensor cores")
    from test_check import LLAMA

    for precision in ("fp8-tensorwise", "fp8-rowwise"):
        code = main(["check", LLAMA, "--device", "cuda", "--nproc", "1", "--precision", precision, "--json"])
        out = json.loads(capsys.readouterr().out)
        peak = next(r for r in out["rows"] if r["item"] == "peak memory")
        assert code == 0 and out["passed"], (precision, peak)


@pytest.mark.parametrize("fmt", ["megatron", "deepspeed", "accelerate"])  # torchtitan writes it (test_export.py)
def test_exports_refuse_fp8_in_one_line(fmt, tmp_path, capsys):
    out = tmp_path / "plan.out"
    argv = ["estimate", "llama-3.1-8b", "--gpu", "h100-80gb", "--gpus", "8", "--precision", "fp8-rowwise"]
    code = main(argv + ["--export", fmt, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fp8" in err.lower() and not out.exists()
