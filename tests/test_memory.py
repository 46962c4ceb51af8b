"""The memory estimate: the ZeRO paper's figures, Megatron's table, hand-worked DDP / ZeRO-1/2/3 /
TP / PP examples per profile, ZeroRedundancyOptimizer's greedy partition, FSDP2's padding, the
optimizer-state formulas, and array plans equal to scalar plans."""

import numpy as np
import pytest

from shardwise.errors import ShardwiseError
from shardwise.estimate.memory import memory, stage_param_shapes
from shardwise.estimate.profiles import (
    CUDA_CONTEXT_BYTES,
    StateBytes,
    megatron_bytes_per_param,
    optimizer_bytes,
    zero_paper_bytes,
)
from shardwise.spec.hardware import make_cluster
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan
from shardwise.spec.presets import preset
from shardwise.units import GB, GIB

FIELDS = ("params", "grads", "optimizer", "activations", "buffers", "overhead")
OVERHEAD = CUDA_CONTEXT_BYTES


def est(model, gpus, profile="torch", **plan):
    return memory(model, make_cluster("h100-80gb", gpus), Plan(**plan).resolve(model, gpus), profile)


# ---- the ZeRO paper (Rajbhandari et al. 2020, Figure 1): Psi = 7.5B, N = 64, K = 12 ------------
def test_zero_paper_figure():
    psi, n = 7_500_000_000, 64
    # baseline (2 + 2 + 12) Psi = 120e9; P_os 4 Psi + 12 Psi/N = 30e9 + 1.40625e9;
    # P_os+g 2 Psi + 14 Psi/N = 15e9 + 1.640625e9; P_os+g+p 16 Psi/N = 1.875e9
    got = [zero_paper_bytes(psi, n, stage) for stage in range(4)]
    assert got == [120_000_000_000, 31_406_250_000, 16_640_625_000, 1_875_000_000]
    # the paper's "GB" is 1e9 bytes: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB (its figure rounds the last
    # to 1.9GB); in GiB the baseline would read 111.8
    assert [round(x / GB, 2) for x in got] == [120.0, 31.41, 16.64, 1.88]
    assert round(got[0] / GIB, 1) == 111.8


def test_zero_paper_profile_on_gpt2():
    # GPT-2 124M: Psi = 124,439,808 (tied embeddings), 4 GPUs, bf16-mixed AdamW:
    # 2 Psi = 248,879,616; 12 Psi = 1,493,277,696; /4 -> 373,319,424 and 62,219,904
    m = preset("gpt2-124m")
    assert m.params == 124_439_808
    states = lambda zero: (lambda e: (e.params, e.grads, e.optimizer))(est(m, 4, "zero-paper", zero=zero, seq=1024))
    assert states(0) == (248_879_616, 248_879_616, 1_493_277_696)
    assert states(1) == (248_879_616, 248_879_616, 373_319_424)
    assert states(2) == (248_879_616, 62_219_904, 373_319_424)
    assert states(3) == (62_219_904, 62_219_904, 373_319_424)


def test_zero_paper_other_optimizers_and_precisions():
    # 1,000-element vector: SGD mixed = master 4 + momentum 4 = 8 bytes/param (K = 8);
    # fp32 AdamW = 8 (no master); pure bf16 AdamW = 4; Adafactor on a vector keeps a full variance
    sb_mixed, sb_fp32, sb_bf16 = StateBytes(2, 2, 4, 4), StateBytes(4, 4, 0, 4), StateBytes(2, 2, 0, 2)
    assert optimizer_bytes("sgd", (1000,), sb_mixed) == 8_000
    assert optimizer_bytes("adamw", (1000,), sb_fp32) == 8_000
    assert optimizer_bytes("adamw", (1000,), sb_bf16) == 4_000
    assert optimizer_bytes("adafactor", (1000,), sb_mixed) == 8_000


def test_factored_and_8bit_optimizer_states():
    # a 4096 x 11008 matrix, n = 45,088,768
    sb = StateBytes(4, 4, 0, 4)  # torch: fp32 parameters are the master
    # Adafactor: row_var 4096 + col_var 11008 fp32 = 60,416 bytes, no first moment
    assert optimizer_bytes("adafactor", (4096, 11008), sb) == 60_416
    # bitsandbytes 8-bit Adam: 2 bytes + two fp32 absmax per 2048-block:
    # 2 * 45,088,768 + 8 * 22,016 = 90,177,536 + 176,128 = 90,353,664
    assert optimizer_bytes("adam8bit", (4096, 11008), sb) == 90_353_664
    # min_8bit_size = 4096: a 4096-vector is quantized (2 * 4096 + 8 * 2 = 8,208), a 4095 one is not
    assert optimizer_bytes("adam8bit", (4096,), sb) == 8_208
    assert optimizer_bytes("adam8bit", (4095,), sb) == 8 * 4095


# ---- Megatron (Megatron Core guide, "Distributed Optimizer") ---------------------------------
def test_megatron_table():
    # bf16 params + fp32 grads: 18 bytes/param, 6 + 12/d with the distributed optimizer
    assert megatron_bytes_per_param("bf16-mixed", 1, distributed=False) == 18
    assert megatron_bytes_per_param("bf16-mixed", 8, distributed=True) == 6 + 12 / 8
    # fp16 params + fp16 grads: 20, 4 + 16/d; fp32: 16, 8 + 8/d
    assert megatron_bytes_per_param("fp16-mixed", 1, distributed=False) == 20
    assert megatron_bytes_per_param("fp16-mixed", 4, distributed=True) == 4 + 16 / 4
    assert megatron_bytes_per_param("fp32", 2, distributed=True) == 8 + 8 / 2


def test_megatron_profile_llama2_7b():
    # Psi = 6,738,415,616 (32,000 is already a multiple of 128: no vocab padding), d = 8:
    # params 2 Psi = 13,476,831,232, grads 4 Psi = 26,953,662,464, optimizer 12 Psi / 8 =
    # 10,107,623,424: 7.5 bytes per parameter = 6 + 12/8
    m = preset("llama-2-7b")
    e = est(m, 8, "megatron", zero=1, seq=4096)
    assert (e.params, e.grads, e.optimizer) == (13_476_831_232, 26_953_662_464, 10_107_623_424)
    assert (e.params + e.grads + e.optimizer) / m.params == 7.5
    assert est(m, 8, "megatron", zero=0, seq=4096).optimizer == 12 * m.params  # 18 bytes without it


def test_megatron_pads_the_vocabulary():
    # GPT-2's 50,257 tokens with tp = 2 pad to a multiple of 128 * 2: 197 * 256 = 50,432, so
    # each tp rank holds 25,216 rows of the (tied) embedding instead of 25,129
    m = preset("gpt2-124m")
    torch_rows = est(m, 2, "zero-paper", tp=2, seq=1024).params
    megatron_rows = est(m, 2, "megatron", tp=2, seq=1024).params
    assert megatron_rows - torch_rows == 2 * (25_216 - 25_129) * 768


# ---- DeepSpeed's default buffers ------------------------------------------------------------
def test_deepspeed_buffers_llama2_7b():
    m = preset("llama-2-7b")
    # ZeRO-2: reduce_bucket_size and allgather_bucket_size, 5e8 elements of 2 bytes each
    d = est(m, 8, "deepspeed", zero=2, seq=4096).detail
    assert d["buffers.ds_reduce_bucket"] == d["buffers.ds_allgather_bucket"] == 1_000_000_000
    # ZeRO-3: the largest layer, the 32,000 x 4,096 embedding, gathered whole: its 16-bit parameters
    # and gradients, 4 * 131,072,000 = 524,288,000 (DeepSpeed's ZeRO-3 estimator)
    e = est(m, 8, "deepspeed", zero=3, seq=4096)
    assert e.detail["buffers.ds_largest_layer"] == 524_288_000
    # tensors <= 1e5 elements stay whole: the 65 norm weights (32 layers * 2 + final), 266,240
    # elements; the rest is split: 2 * (266,240 + ceil((6,738,415,616 - 266,240) / 8))
    assert e.params == 2 * (266_240 + -(-(m.params - 266_240) // 8))


# ---- torch: a tiny model worked by hand ----------------------------------------------------
# 2 layers, h 8, 2 heads (head_dim 4), ffn 16 (SwiGLU), vocab 32, untied, RMSNorm, rotary.
# tok_embeddings 32x8 = 256; per layer: 2 norms 8 + 8, wq/wk/wv/wo 4 x 64, w1/w3 16x8, w2 8x16,
# 3 x 128: 656; final norm 8; output 32x8 = 256. Psi = 256 + 2 * 656 + 8 + 256 = 1,832.
TINY = ModelSpec(name="tiny", layers=2, hidden=8, heads=2, vocab=32, ffn_hidden=16)


def test_tiny_param_count():
    assert TINY.params == 1_832


def test_torch_ddp_bf16_mixed_by_hand():
    # dp = 4, b = 1, s = 8, one micro-batch, AdamW, bf16 autocast over fp32 parameters:
    #   params.local 4 * 1,832 = 7,328; grads.ddp_buckets 7,328 (gradients are bucket views);
    #   optimizer.states 8 * 1,832 = 14,656;
    #   params.autocast_copy: every block Linear weight once in bf16: 2 layers * (4 * 64 + 3 * 128)
    #   = 1,280 elements -> 2,560 bytes (the chunked loss casts the output weight inside, keeps none).
    # activations per layer (b*s = 8 tokens): fp32 norm inputs 2 * 32, rstd 2 * 4, three bf16 copies
    # for wq/wk/wv 48 and two for w1/w3 32, q/k/v 48, logsumexp 2 heads * 4 = 8, attention out 16,
    # SwiGLU 4 * 16 * 2 = 128: 352 per token -> 2,816, + rotary cos/sin 2 * 4 * 2 * 8 = 128:
    # 2,944 per layer, 5,888 for two. Head: token ids 8 * 8 = 64; final norm 8 * (32 + 4) = 288;
    # bf16 head input 128; the loss's int64 targets 64; no logits (the loss is chunked: tp = 1, no
    # pipeline). Its backward (activations.chunked_loss_backward_bytes): V*H = 256, chunks of
    # ceil(8 / ceil(32 / 8)) = 2 rows: the weight's bf16 cast 512 + input gradient 8 * 8 * 2 = 128 +
    # fp32 weight-gradient sum 1,024 + max(8 * 2 * 32 = 512, 2 * 2 * 32 + 2 * 256 = 640) = 2,304.
    e = est(TINY, 4, zero=0, mbs=1, seq=8)
    assert e.detail == {
        "params.local": 7_328,
        "grads.ddp_buckets": 7_328,
        "optimizer.states": 14_656,
        "params.autocast_copy": 2_560,
        "act.layers": 5_888,
        "act.embedding": 64,
        "act.final_norm": 288,
        "act.head_input": 128,
        "act.loss_backward": 2_304,
        "act.targets": 64,
        "overhead.cuda_context": OVERHEAD,
    }
    assert e.total == 42_400 - 512 - 512 - 1_024 + 256 + OVERHEAD
    assert e.capacity == 80 * GIB and e.fits


def test_optimizer_step_moment_ddp():
    # at="step" (what `shardwise check` measures): the same rank when it steps: activations and
    # autocast copies are gone, foreach AdamW's scratch over the 1,792 matrix elements is there
    m = memory(TINY, make_cluster("h100-80gb", 4), Plan(mbs=1, seq=8).resolve(TINY, 4), at="step")
    assert m.detail == {
        "params.local": 7_328,
        "grads.ddp_buckets": 7_328,
        "optimizer.states": 14_656,
        "buffers.optimizer_step": 7_168,
        "overhead.cuda_context": OVERHEAD,
    }


def test_torch_zero1_greedy_partition_by_hand():
    # ZeroRedundancyOptimizer over dp = 3 (run/engine.py's groups: matrices, then vectors), each
    # tensor, largest first, to the least-loaded rank (the first of equals):
    #   256 tok_embeddings -> r0, 256 output -> r1, the six 128s: r2 r2 r0 r1 r2 r0 -> [512, 384, 384]
    #   the eight 64s: r1 r2 r1 r2 r0 r1 r2 r0 -> [640, 576, 576]; the five 8-vectors: r1 r2 r1 r2 r1
    #   -> [640, 600, 592]. Rank 0 holds 640 elements: AdamW 8 * 640 = 5,120 bytes, more than the
    #   8 * 1,832 / 3 = 4,885.3 an even split would give.
    e = est(TINY, 3, zero=1, mbs=1, seq=8)
    assert e.optimizer == 5_120
    # everything else is DDP's
    assert e.params == 7_328 + 2_560 and e.grads == 7_328


def test_fsdp_padding_by_hand():
    # vocab 33 (not divisible by dp = 4): FSDP2 pads every dim-0 shard to ceil(dim0 / 4) rows.
    # tok_embeddings and output 33x8: 9 rows = 72 each; per layer: norms ceil(8/4) = 2 + 2,
    # wq/wk/wv/wo 2 rows x 8 = 16 each, w1/w3 4 x 8 = 32, w2 2 x 16 = 32: 164; final norm 2.
    # Shard: 72 + 2 * 164 + 2 + 72 = 474 elements per rank (1,848 / 4 = 462 without padding).
    m = TINY.scaled(vocab=33)
    e = est(m, 4, zero=3, mbs=1, seq=8, precision="fp32")
    assert e.detail["params.sharded"] == 4 * 474
    assert e.detail["optimizer.states"] == 8 * 474
    # ZeRO-3's peak: the first block's backward begins (fp32, so gathered parameters are 4 bytes;
    # T = 8 tokens, one micro-batch):
    #   the root (embeddings, final norm, output) gathered again: 4 * 4 * (72 + 2 + 72) = 2,336,
    #   and block 1 in use: 4 * 4 * 164 = 2,624; params.unsharded 4,960
    #   block 0 prefetched, in its all-gather output: 2,624
    #   the head's unsharded gradients (output + final norm): 4 * 4 * (72 + 2) = 1,184
    #   no reduce-scatter input yet (block 1's comes at the end of its backward)
    #   SwiGLU's product backward next to w2's kept gradient: 2 * 8 * 16 * 4 + 16 * 8 * 4 = 1,536
    #   the gradient the final norm hands block 1: 4 * 8 * 8 = 256
    #   saved: 2 layers * 560 * 8 = 8,960 (test_pipeline_first_backward_has_no_gradients), token
    #   ids 8 * 8 = 64; no logits (the loss is chunked: tp = 1, no pipeline)
    # 1,896 + 3,792 + 4,960 + 2,624 + 1,184 + 1,536 + 256 + 8,960 + 64 = 25,272
    assert e.detail["params.unsharded"] == 4_960
    assert e.detail["buffers.all_gather"] == 2_624
    assert e.detail["grads.head_unsharded"] == 1_184
    assert e.detail["act.block_backward"] == 1_536 and e.detail["act.block_output_grad"] == 256
    assert "buffers.reduce_scatter" not in e.detail and "grads.sharded" not in e.detail
    assert e.total - OVERHEAD == 25_272


def test_fsdp2_moments_by_hand():
    # TINY with vocab 33 over dp = 4, fp32, one token per micro-batch: the activations are small
    # against the buffers (shards and padding as test_fsdp_padding_by_hand: P = one block gathered,
    # 4 * 4 * 164 = 2,624; the root 2,336; sharded parameters 1,896, AdamW 3,792; one layer's
    # saved tensors 560, token ids 8; the loss is chunked: no logits)
    m = TINY.scaled(vocab=33)
    # ZeRO-3, one micro-batch: the second block's backward ends (block 0, the last). Block 1's
    # reduce-scatter input waits for block 0's post-backward: 2,624; block 0's gradients 2,624;
    # block 1's sharded gradients 4 * 164 = 656; gathered: the root and block 0, 4,960, none
    # prefetched below block 0; the head's gradients 1,184; no layer's saved tensors left, block
    # 0's input gradient 4 * 8 = 32:
    # 1,896 + 3,792 + 2,624 + 2,624 + 656 + 4,960 + 1,184 + 32 + 8 = 17,776
    e = est(m, 4, zero=3, mbs=1, gbs=4, seq=1, precision="fp32")
    assert e.detail["buffers.reduce_scatter"] == 2_624 and e.detail["grads.block_unsharded"] == 2_624
    assert e.detail["grads.sharded"] == 656 and "act.layers" not in e.detail
    assert e.total - OVERHEAD == 17_776
    # ZeRO-2, two micro-batches: the second's forward copies block 1 out. Every block was
    # resharded after the first backward, so block 0 is gathered again, block 1's unsharded
    # parameters are filled from its all-gather output while block 0's output is still held
    # (FSDPParamGroup.wait_for_unshard drops it on return): gathered 2,336 + 2 * 2,624 = 7,584,
    # all-gather outputs 2 * 2,624 = 5,248; the first micro-batch's gradients, unsharded, 7,584;
    # block 0's saved tensors 560 and the token ids 8 (run/engine._accumulate dropped the first
    # micro-batch's logits before this forward): 1,896 + 3,792 + 7,584 + 5,248 + 7,584 + 560 + 8
    # = 26,672
    e = est(m, 4, zero=2, mbs=1, gbs=8, seq=1, precision="fp32")
    assert e.detail["buffers.all_gather"] == 5_248 and "act.logits_previous" not in e.detail
    assert e.total - OVERHEAD == 26_672
    # ... and with 8 tokens the forward's end: every block gathered 7,584, block 1's all-gather
    # output 2,624, the first micro-batch's gradients 7,584; both layers saved 8,960, ids 64, the
    # final norm 36 * 8 = 288, the output's input 32 * 8 = 256. The chunked loss's backward comes
    # below it: all-gather output gone, targets 64 and its transient 1,840 instead
    # (activations.chunked_loss_backward_bytes: input gradient 8 * 8 * 4 = 256, the weight
    # gradient's sum 33 * 8 * 4 = 1,056, chunks of ceil(8 / 5) = 2 rows: 8 * 2 * 33 = 528).
    # 1,896 + 3,792 + 7,584 + 2,624 + 7,584 + 8,960 + 64 + 288 + 256 = 33,048
    e = est(m, 4, zero=2, mbs=1, gbs=8, seq=8, precision="fp32")
    assert e.detail["buffers.all_gather"] == 2_624 and "act.loss_backward" not in e.detail
    assert e.total - OVERHEAD == 33_048


def test_zero2_accumulates_unsharded_fp32_gradients():
    # ZeRO-2 with 4 micro-batches (set_requires_gradient_sync(False) on all but the last): FSDP2
    # keeps the unsharded gradients, upcast to the fp32 reduce dtype, until the last backward:
    # 4 bytes * 4 ranks * 474 (the padded unsharded model of test_fsdp_padding_by_hand)
    m = TINY.scaled(vocab=33)
    e = est(m, 4, zero=2, mbs=1, gbs=16, seq=8)
    assert e.detail["grads.unsharded_accumulated"] == 4 * 4 * 474
    assert e.detail["params.unsharded"] == 2 * 4 * 474  # ZeRO-2: everything stays gathered, in bf16
    assert "grads.unsharded_accumulated" not in est(m, 4, zero=2, mbs=1, gbs=4, seq=8).detail


def test_optimizer_step_can_be_the_peak():
    # One GPU, one micro-batch of 1 token: activations are tiny, so the peak is the optimizer step:
    # fp32 params 4 * 1,832 + their gradients 7,328 + AdamW 14,656 + foreach AdamW's sqrt(v)
    # scratch over the matrices (1,832 - 5 vectors of 8 = 1,792 elements) 4 * 1,792 = 7,168
    e = est(TINY, 1, mbs=1, seq=1, precision="fp32")
    assert e.detail == {
        "params.local": 7_328,
        "grads.local": 7_328,
        "optimizer.states": 14_656,
        "buffers.optimizer_step": 7_168,
        "overhead.cuda_context": OVERHEAD,
    }
    assert e.activations == 0
    # a long sequence moves the peak to the backward, where a lone GPU has no gradients yet
    long = est(TINY, 1, mbs=1, seq=256, precision="fp32")
    assert long.activations > 0 and long.grads == 0


def test_pure_bf16_ddp():
    # bf16 parameters, gradients and AdamW states: 2 + 2 + 4 bytes, no autocast copies
    e = est(TINY, 4, mbs=1, seq=8, precision="bf16")
    assert (e.detail["params.local"], e.detail["grads.ddp_buckets"], e.optimizer) == (3_664, 3_664, 7_328)
    assert "params.autocast_copy" not in e.detail


def test_offload():
    m = TINY.scaled(vocab=33)
    # FSDP2's CPUOffloadPolicy: shards, gradients and the optimizer live on the CPU
    e = est(m, 4, zero=3, mbs=1, seq=8, offload="params")
    assert e.optimizer == 0 and "params.sharded" not in e.detail and "grads.sharded" not in e.detail
    assert e.detail["params.unsharded"] > 0  # compute still needs the gathered parameters
    assert est(m, 4, "zero-paper", zero=1, mbs=1, seq=8, offload="optimizer").optimizer == 0


# ---- tensor and pipeline parallelism --------------------------------------------------------
def test_tensor_parallel_local_shapes_llama2_7b():
    # tp = 8, contract item 7: wq/wk/wv/w1/w3 column- and wo/w2 row-parallel (/8), norms replicated,
    # vocab-parallel embedding and output (/8). Per layer: 2 * 4096 + (4 * 4096^2 + 3 * 4096 *
    # 11008) / 8 = 8,192 + 25,296,896 = 25,305,088; x 32 = 809,762,816; embedding and output
    # 32000 * 4096 / 8 = 16,384,000 each; final norm 4,096: 842,534,912 elements per rank.
    m = preset("llama-2-7b")
    assert sum(np.prod(s) for s in stage_param_shapes(m, tp=8, pp=1, last=False)) == 842_534_912
    assert est(m, 8, "zero-paper", tp=8, seq=4096).params == 2 * 842_534_912


def test_pipeline_stage_params_llama2_7b():
    # pp = 2: the first stage holds the embedding (32000 * 4096 = 131,072,000) and 16 layers of
    # 202,383,360; the last 16 layers, the final norm (4,096) and the output (131,072,000)
    m = preset("llama-2-7b")
    first = sum(np.prod(s) for s in stage_param_shapes(m, tp=1, pp=2, last=False))
    last = sum(np.prod(s) for s in stage_param_shapes(m, tp=1, pp=2, last=True))
    assert first == 131_072_000 + 16 * 202_383_360 == 3_369_205_760
    assert last == first + 4_096
    # tied embeddings: the last stage keeps its own copy of the embedding as the output
    g = preset("gpt2-124m")
    tied = sum(np.prod(s) for s in stage_param_shapes(g, tp=1, pp=2, last=True))
    assert tied == 6 * 7_087_872 + 2 * 768 + 50_257 * 768


def test_worst_rank_is_chosen():
    # GPT-2 124M, pp = 2, 1F1B: with 8 sequences of 1024 the last stage's logits (50,257 wide)
    # dominate (8.5 GiB against 4.7 GiB) ...
    g, c = preset("gpt2-124m"), make_cluster("h100-80gb", 2)
    plan = Plan(pp=2, mbs=8, gbs=16, seq=1024).resolve(g, 2)
    first, last, worst = (memory(g, c, plan, stage=s) for s in ("first", "last", "worst"))
    assert last.total > first.total and worst.detail == last.detail
    assert worst.detail["act.logits"] > 0 and "act.embedding" not in worst.detail
    # ... with a 64-token vocabulary the first stage's two micro-batches in flight do (2.8 / 1.9 GiB)
    small = g.scaled(vocab=64)
    plan = Plan(pp=2, mbs=4, gbs=64, seq=1024).resolve(small, 2)
    first, last, worst = (memory(small, c, plan, stage=s) for s in ("first", "last", "worst"))
    assert first.total > last.total and worst.detail == first.detail
    assert worst.detail["act.embedding"] > 0 and "act.logits" not in worst.detail


def test_pipeline_fsdp_keeps_blocks_gathered():
    # torch.distributed.pipelining turns FSDP's reshard-after-backward and gradient sync off until
    # the last micro-batch: with pp = 2 ZeRO-3 holds the stage gathered like ZeRO-2, and the
    # unsharded gradients accumulate in fp32
    m = preset("llama-2-7b")
    z3 = est(m, 8, zero=3, pp=2, mbs=1, gbs=16, seq=4096).detail
    z2 = est(m, 8, zero=2, pp=2, mbs=1, gbs=16, seq=4096).detail
    assert z3["params.unsharded"] == z2["params.unsharded"]
    assert z3["grads.unsharded_accumulated"] == 2 * z3["params.unsharded"]  # fp32 vs bf16
    assert "buffers.zero3_gather" not in z3


def test_pipeline_first_backward_has_no_gradients():
    # TINY, pp = 2, 1F1B, m = 2 micro-batches of 1 x T tokens, fp32, first stage (tok_embeddings
    # 256 + layer 0 656 = 912 elements: params 3,648, AdamW 7,296, gradients 3,648). Schedule1F1B
    # runs F0 F1 B0 B1 there (warm-up min(m, p) = 2 = m): at B0 two micro-batches are in flight and
    # no gradient exists yet; at B1 one is, with every gradient of the stage. Per micro-batch: the
    # layer 528 T + rotary 32 T (norm inputs 2 * 32, rstd 2 * 4, q/k/v and w1/w3 inputs 2 * 32,
    # q, k, v 96, logsumexp 8, out 32, SwiGLU 4 * 16 * 4 = 256 per token), token ids 8 T, its output
    # 32 T; two gradient receive buffers 2 * 32 T; the block's backward max(2 * 64 T, 64 T + 512).
    c = make_cluster("h100-80gb", 2)
    plan = lambda seq: Plan(pp=2, mbs=1, gbs=2, seq=seq, precision="fp32").resolve(TINY, 2)
    # T = 8: B0 = 2 * 4,480 + 2 * 64 + 2 * 256 + 512 + 1,024 + 3,648 + 7,296 = 22,080; B1 = 4,480 +
    # 64 + 256 + 512 + 1,024 + 3,648 + 3,648 + 7,296 = 20,928: B0, without gradients
    e = memory(TINY, c, plan(8), stage="first")
    assert e.total - OVERHEAD == 22_080 and e.grads == 0 and e.detail["act.layers"] == 2 * 4_480
    # T = 5: B0 = 2 * 2,800 + 2 * 40 + 2 * 160 + 320 + 832 + 10,944 = 18,096; B1 = 2,800 + 40 + 160 +
    # 320 + 832 + 3,648 + 10,944 = 18,744; the step 3,648 * 2 + 7,296 + 3,584 (foreach sqrt(v) over
    # the matrices) + 320 = 18,496: B1
    e = memory(TINY, c, plan(5), stage="first")
    assert e.total - OVERHEAD == 18_744 and e.detail["grads.accumulated"] == 3_648
    assert e.detail["act.layers"] == 2_800


def test_loss_backward_and_block_backward_are_two_moments():
    # One GPU, fp32, T = 256 tokens, TINY with an 8-token vocabulary (1,448 parameters: params
    # 5,792, AdamW 11,584). Saved: 2 layers * (528 + 32) * 256 = 286,720 (test_pipeline_first_...:
    # 528 per token, rotary 32 per position), token ids 8 T = 2,048; the head's final norm 36 T =
    # 9,216, output input 32 T = 8,192, targets 2,048 (the loss is chunked: no logits, no log-probs
    # kept). The chunked loss's backward adds (one chunk: ceil(256 / ceil(8 / 8)) = 256 rows) the
    # input gradient 4 * 8 T = 8,192, the weight gradient's sum 4 * 64 = 256 and the chunk's fp32
    # logits and softmax 8 * 8 T = 16,384: 24,832: 350,432. The first block's backward comes once
    # those head tensors and the loss's temporaries are freed, adding
    # max(2 * T * 16 * 4, T * 16 * 4 + 16 * 8 * 4) = 32,768: 338,912, the smaller
    e = est(TINY.scaled(vocab=8), 1, mbs=1, gbs=1, seq=256, precision="fp32")
    assert e.total - OVERHEAD == 350_432
    assert e.detail["act.loss_backward"] == 24_832 and "act.block_backward" not in e.detail
    # a 64-wide FFN (3,752 parameters: 15,008 + 30,016; layers 2 * (1,296 + 32) * 256 = 679,936):
    # the block's max(2 * T * 64 * 4, ...) = 131,072, next to the gradient the final norm hands
    # it (4 * 8 T = 8,192), over the head-free rest wins: 866,272
    e = est(TINY.scaled(vocab=8, ffn_hidden=64), 1, mbs=1, gbs=1, seq=256, precision="fp32")
    assert e.total - OVERHEAD == 15_008 + 30_016 + 679_936 + 2_048 + 131_072 + 8_192 == 866_272
    assert "act.loss_backward" not in e.detail and "act.final_norm" not in e.detail


def test_vocab_parallel_embedding_gradient_is_whole_during_the_backward():
    # tp = 2 without DDP: DTensor's embedding backward gives every tp rank the whole table's
    # gradient (Replicate; run/engine._align_grads slices it at the step). TINY at tp = 2 holds
    # 128 + 2 * 336 + 8 + 128 = 936 elements (per layer: norms 16, wq/wk/wv/wo 4 * 32, w1/w3 2 * 64,
    # w2 64); with 2 micro-batches the first one's gradients exist at the second's backward, the
    # embedding's 32 x 8 = 256 rows whole: 4 * (936 + 128) = 4,256
    assert est(TINY, 2, tp=2, mbs=1, gbs=2, seq=8, precision="fp32").detail["grads.accumulated"] == 4_256
    # tied: the output's column-parallel gradient comes first and keeps the shard: 4 * 808
    tied = TINY.scaled(tied_embeddings=True)
    assert est(tied, 2, tp=2, mbs=1, gbs=2, seq=8, precision="fp32").detail["grads.accumulated"] == 4 * 808
    # DDP without a pipeline: the gradients are views of its buckets, zeroed in place each step,
    # so no fresh ones come during the backward (run/engine._clear_grads)
    assert "grads.accumulated" not in est(TINY, 4, dp=2, tp=2, mbs=1, gbs=4, seq=8, precision="fp32").detail
    # at the optimizer step the gradients are the shards again
    at_step = memory(
        TINY,
        make_cluster("h100-80gb", 2),
        Plan(tp=2, mbs=1, gbs=2, seq=8, precision="fp32").resolve(TINY, 2),
        at="step",
    )
    assert at_step.grads == 4 * 936


def test_cpu_kernels():
    # device="cpu": rms_norm's composite keeps an fp32 input and an fp32 normalized tensor. TINY on
    # one GPU, T = 256 tokens: fp32, 2 layers * 2 norms * 256 * 8 * 4 = 32,768 more in the layers
    # and 256 * 8 * 4 = 8,192 in the final norm; pure bf16, (4 - 2 + 4) * 8 = 48 bytes per norm
    # and token: 49,152 and 12,288
    for precision, layers, final in (("fp32", 32_768, 8_192), ("bf16", 49_152, 12_288)):
        plan = Plan(mbs=1, gbs=1, seq=256, precision=precision).resolve(TINY, 1)
        cuda, cpu = (memory(TINY, make_cluster("h100-80gb", 1), plan, device=d).detail for d in ("cuda", "cpu"))
        assert cpu["act.layers"] - cuda["act.layers"] == layers
        assert cpu["act.final_norm"] - cuda["act.final_norm"] == final


def test_interleaved_ranks_measured():
    # `shardwise check examples/tiny-llama.toml --nproc 4 --tp 2 --pp 2 --schedule interleaved
    # --vpp 2` on the CPU. Rank 0 (stages 0 and 2) at B1 of stage 0 (its last 1F1B backward):
    #   params 4 * 279,040 = 1,116,160 (tok_embeddings 128 x 128 + 2 layers of 131,328), AdamW
    #   2,232,320, gradients 4 * (279,040 + 16,384) = 1,181,696 (the embedding's whole),
    #   5 chunks of a layer 5 * 2,117,632 = 10,588,160 (test_interleaved_rank_items_hand_worked),
    #   token ids 3 * 2,048 = 6,144, the block's backward 2 * 256 * 256 * 4 = 524,288,
    #   8 outputs 1,048,576, 2 input gradients held 262,144, 2 idle activation receive buffers
    #   262,144, 8 gradient receive buffers 1,048,576: 18,270,208.
    # Measured (MemTracker): 17,748,172 = 18,270,208 - 4 gradient receive buffers no op of the
    # measured step touched (MemTracker sees a storage when an op makes a tensor of it) + 8,320 of
    # the caller's [16, 65] int64 batch - 6,144 + 76 of AdamW's step counters: exact.
    # Rank 2 (stages 1 and 3) at B3 of stage 3: 14,623,744; measured 14,367,972 = that - 2
    # untouched gradient buffers (262,144) + 8,320 - 2,048 (no targets copy) + 80 + 20 (scalars).
    m = preset("llama-2-7b").scaled(layers=4, hidden=128, heads=4, vocab=256)
    plan = Plan(tp=2, pp=2, mbs=4, gbs=16, seq=64, schedule="interleaved", vpp=2, precision="fp32").resolve(m, 4)
    first, last = (memory(m, make_cluster("h100-80gb", 4), plan, stage=s, device="cpu") for s in ("first", "last"))
    assert first.total - OVERHEAD == 18_270_208
    assert (
        first.detail["grads.accumulated"],
        first.detail["act.stage_output"],
        first.detail["act.stage_input_grad"],
    ) == (1_181_696, 1_048_576, 262_144)
    assert last.total - OVERHEAD == 14_623_744
    assert 17_748_172 == 18_270_208 - 4 * 131_072 + 8_320 - 6_144 + 76
    assert 14_367_972 == 14_623_744 - 2 * 131_072 + 8_320 - 2_048 + 80 + 20


# ---- one code path for one plan or many ----------------------------------------------------
PLANS = [
    dict(dp=8, tp=1, pp=1, mbs=1, gbs=64, seq=4096),
    dict(dp=4, tp=2, pp=1, mbs=2, gbs=64, seq=2048),
    dict(dp=2, tp=2, pp=2, mbs=1, gbs=16, seq=4096),
    dict(dp=1, tp=8, pp=1, mbs=1, gbs=4, seq=4096),
    dict(dp=1, tp=2, pp=4, mbs=2, gbs=32, seq=1024),
    dict(dp=2, tp=1, pp=4, mbs=1, gbs=8, seq=4096),
    dict(dp=1, tp=4, pp=2, mbs=1, gbs=2, seq=512),
]


@pytest.mark.parametrize("profile", ["torch", "zero-paper", "megatron", "deepspeed"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "interleaved"])
def test_array_plan_equals_scalar_plans(profile, zero, schedule):
    m, cluster = preset("llama-3.1-8b"), make_cluster("h100-80gb", 8)
    plans = (
        [p for p in PLANS if p["pp"] > 1 and (p["gbs"] // (p["dp"] * p["mbs"])) % p["pp"] == 0]
        if schedule == "interleaved"
        else PLANS
    )
    kw = dict(schedule=schedule, vpp=2 if schedule == "interleaved" else 1)
    arrays = {k: np.array([p[k] for p in plans]) for k in plans[0]}
    for device in ("cuda", "cpu"):
        batch = memory(m, cluster, Plan(zero=zero, **kw, **arrays), profile, device=device)
        for i, p in enumerate(plans):
            one = memory(m, cluster, Plan(zero=zero, **kw, **p), profile, device=device)
            for f in FIELDS:
                assert int(getattr(batch, f)[i]) == getattr(one, f), (profile, zero, p, f)
            assert {k: int(v[i]) for k, v in batch.detail.items() if v[i]} == one.detail


def test_scalar_estimate_is_fast():
    import time

    m, cluster = preset("llama-2-70b"), make_cluster("h100-80gb", 64)
    plan = Plan(tp=8, pp=2, zero=1, mbs=1, gbs=512, seq=4096).resolve(m, 64)
    memory(m, cluster, plan)  # warm the per-model caches
    n, t0 = 200, time.perf_counter()
    for _ in range(n):
        memory(m, cluster, plan)
    assert (time.perf_counter() - t0) / n < 1e-3  # well under a millisecond even on a busy CI box


# ---- bad input ------------------------------------------------------------------------------
def test_bad_inputs_are_one_line():
    m, c, p = TINY, make_cluster("h100-80gb", 4), Plan(mbs=1, seq=8).resolve(TINY, 4)
    with pytest.raises(ShardwiseError, match="profile") as e:
        memory(m, c, p, "fsdp")
    assert "\n" not in str(e.value)
    with pytest.raises(ShardwiseError, match="attention"):
        memory(m, c, p, attention="xformers")
    with pytest.raises(ShardwiseError, match="device") as e:
        memory(m, c, p, device="tpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ShardwiseError, match="megatron"):
        memory(m, c, Plan(zero=3, mbs=1, seq=8, offload="params").resolve(m, 4), "megatron")


def test_attention_is_a_plan_field_that_reaches_the_inventory():
    """Plan.attention picks the inventory memory() counts (the keyword still overrides it): with
    "math" the s x s scores are saved; selective recompute drops them, but the core's backward
    makes them again (activations.core_backward_bytes: 6 score-sized tensors, so above flash's)."""
    m, c = preset("llama-2-7b"), make_cluster("h100-80gb", 8)
    flash = Plan(zero=3, seq=4096).resolve(m, 8)
    math = flash.replace(attention="math")
    assert memory(m, c, math) == memory(m, c, flash, attention="math")
    assert memory(m, c, math).activations > memory(m, c, flash).activations
    sel = lambda p: memory(m, c, p.replace(recompute="selective")).activations
    assert sel(flash) < sel(math) < memory(m, c, math).activations
    assert math.short().endswith("attn-math") and "attn" not in flash.short()
    with pytest.raises(ShardwiseError, match="unknown attention 'xformers'"):
        Plan(attention="xformers").resolve(m, 8)
