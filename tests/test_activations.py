"""The activation inventory: Korthikanti et al. 2022's formulas as special cases, hand-worked
Llama examples, the pipeline's micro-batches in flight, and a torch cross-check: the tensors the
run tier's reference block really saves, counted with saved_tensors_hooks."""

import pytest

from shardwise.errors import ShardwiseError
from shardwise.estimate.activations import (
    block_backward_bytes,
    block_inventory,
    inflight,
    inventory_bytes,
    layer_bytes,
    rank_activations,
)
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan
from shardwise.spec.presets import preset

# GPT-3 175B with dropout, the model of Korthikanti et al. 2022 ("Reducing Activation
# Recomputation in Large Transformer Models", Sec. 4): a = 96 heads, h = 12288, s = 2048, b = 1
GPT3 = preset("gpt-3-175b").scaled(dropout=0.1)
S, B, H, A, T = 2048, 1, 12288, 96, 8
SBH = S * B * H  # 25,165,824
SCORES = 5 * A * S / H  # 5as/h = 5*96*2048/12288 = 80
LN_STATS = 2 * 2 * 4 * S * B  # two LayerNorms x (mean, rstd) x fp32 x sb = 32,768 (the paper ignores them)


def gpt_layer(tp=1, sp=False, selective=False):
    """Megatron layout, materialized attention, 2-byte activations, 1-byte dropout masks."""
    inv = block_inventory(GPT3, "megatron", "math", selective)
    return inventory_bytes(inv, b=B, s=S, tp=tp, sp=sp, act=2, res=2, layout="megatron")


def test_korthikanti_no_parallelism():
    # sbh(34 + 5as/h) = 25,165,824 * (34 + 80) = 2,868,903,936 bytes, + 32,768 of LN statistics
    assert SBH * (34 + SCORES) == 2_868_903_936
    assert gpt_layer() == 2_868_903_936 + LN_STATS


def test_korthikanti_tensor_parallel():
    # sbh(10 + 24/t + 5as/(ht)), t = 8: 25,165,824 * (10 + 3 + 10) = 578,813,952
    # (the 10 replicated: two LN inputs 4, QKV and MLP inputs 4, two dropout masks 2; LN
    # statistics are replicated too without sequence parallel)
    assert gpt_layer(tp=T) == 578_813_952 + LN_STATS


def test_korthikanti_tensor_and_sequence_parallel():
    # sbh/t (34 + 5as/h) = 3,145,728 * 114 = 358,612,992; the LN statistics split too
    assert gpt_layer(tp=T, sp=True) == 358_612_992 + LN_STATS // T


def test_korthikanti_selective_recompute():
    # selective drops the 5as/h of the attention core: 34 sbh/t = 3,145,728 * 34 = 106,954,752
    assert gpt_layer(tp=T, sp=True, selective=True) == 106_954_752 + LN_STATS // T
    # without sequence parallel: sbh(10 + 24/t) = 25,165,824 * 13 = 327,155,712
    assert gpt_layer(tp=T, selective=True) == 327_155_712 + LN_STATS


def test_korthikanti_full_recompute():
    # full recompute keeps each layer's input: 2sbh = 50,331,648 (and /t with sequence parallel),
    # plus one block's whole inventory while it is recomputed
    plan = Plan(dp=1, tp=1, mbs=B, seq=S, gbs=1, recompute="full")
    kept, rebuilt = layer_bytes(GPT3, plan, layout="megatron", attention="math", autocast=False, act=2, res=2)
    assert kept == 2 * SBH == 50_331_648
    assert kept + rebuilt == gpt_layer()
    kept_sp, _ = layer_bytes(
        GPT3, plan.replace(tp=T, sp=True), layout="megatron", attention="math", autocast=False, act=2, res=2
    )
    assert kept_sp == 2 * SBH // T == 6_291_456


def test_flash_attention_drops_the_scores():
    # flash keeps q, k, v and out as the math kernel does (all 34 sbh stay) but none of the
    # 5as^2b score tensors: instead one fp32 logsumexp per head and token, 4*a*s*b = 786,432:
    # 34 * 25,165,824 + 786,432 = 856,424,448
    inv = block_inventory(GPT3, "megatron", "flash")
    got = inventory_bytes(inv, b=B, s=S, tp=1, sp=False, act=2, res=2, layout="megatron")
    assert got == 856_424_448 + LN_STATS


# ---- Llama-style: SwiGLU, RMSNorm, rotary, GQA, no dropout, flash -----------------------
LLAMA2 = preset("llama-2-7b")  # h 4096, 32 heads (MHA), ffn 11008, head_dim 128


def test_llama2_7b_fsdp_bf16_layer():
    # torch layout, bf16 activations everywhere (FSDP2 param_dtype=bf16, no autocast), flash,
    # b = 1, s = 4096. Per token (bytes):
    #   attention_norm input 2h = 8,192     rstd (fp32) 4
    #   wq/wk/wv input (one tensor) 8,192
    #   q, k, v 3 * 8,192 = 24,576          logsumexp 32 heads * 4 = 128
    #   attention out (= wo's input) 8,192
    #   ffn_norm input 8,192                rstd 4
    #   w1/w3 input 8,192
    #   w1 out, silu out, w3 out, w2 input: 4 * 11,008 * 2 = 88,064
    #   total 153,736 per token, plus rotary cos and sin 2 * 128 * 2 = 512 per position
    # -> (153,736 + 512) * 4096 = 631,799,808 bytes per layer (37.7 sbh)
    inv = block_inventory(LLAMA2, "torch", "flash")
    got = inventory_bytes(inv, b=1, s=4096, tp=1, sp=False, act=2, res=2, layout="torch")
    assert got == 631_799_808


def test_llama2_7b_autocast_layer():
    # DDP with torch.autocast: the residual stream is fp32 (norm inputs 4h = 16,384 each) and the
    # fp32 norm output is cast once per Linear: wq, wk, wv keep 3 * 8,192, w1 and w3 2 * 8,192.
    #   16,384 + 4 + 24,576 + 24,576 + 128 + 8,192 + 16,384 + 4 + 16,384 + 88,064 = 194,696
    # -> (194,696 + 512) * 4096 = 799,571,968 bytes per layer
    inv = block_inventory(LLAMA2, "torch", "flash", autocast=True)
    got = inventory_bytes(inv, b=1, s=4096, tp=1, sp=False, act=2, res=4, layout="torch")
    assert got == 799_571_968


def test_gqa_kv_width():
    # Llama-3.1-8B: 32 query heads, 8 KV heads, head_dim 128: kv_dim 1024 vs q_dim 4096.
    m = preset("llama-3.1-8b")
    width = lambda inv: {s.name: s.width for s in inv}
    # the run model hands GQA to SDPA (enable_gqa): the flash kernel saves K/V at 1024 ...
    assert width(block_inventory(m, "torch", "flash"))["attention.k"] == 1024
    # ... except where it does not take GQA (CUDA fp32): K/V repeated to the query heads, 4096 ...
    assert width(block_inventory(m, "torch", "flash", gqa=False))["attention.k"] == 4096
    # ... and the math kernel repeats them itself
    assert width(block_inventory(m, "torch", "math"))["attention.v"] == 4096
    # the recomputed core keeps only its (unrepeated) inputs
    assert width(block_inventory(m, "torch", "flash", selective=True, gqa=False))["attention.k"] == 1024
    # Megatron's fused attention takes GQA natively
    assert width(block_inventory(m, "megatron", "flash"))["attention.v"] == 1024


def test_torch_sequence_parallel_keeps_gathered_inputs_whole():
    # torchtitan's SP all-gathers the norm output before wq/wk/wv and w1/w3 and autograd saves
    # the gathered tensor: those two 2sbh stay whole while the rest divides by t.
    # Llama-2-7B, bf16, b=1, s=4096, t=8: per token, whole: 2 * 8,192 = 16,384;
    # split: (153,736 - 16,384) / 8 = 17,169; rotary 512 per position (not split)
    inv = block_inventory(LLAMA2, "torch", "flash")
    got = inventory_bytes(inv, b=1, s=4096, tp=8, sp=True, act=2, res=2, layout="torch")
    assert got == (16_384 + 17_169 + 512) * 4096


def test_cpu_rms_norm_is_a_composite():
    # on the CPU each rms_norm saves its input in fp32, rstd and the fp32 normalized tensor: per
    # norm and token 4h + 4 + 4h against CUDA's res*h + 4. Llama-2-7B, bf16 (res 2), b=1, s=4096:
    # per layer 2 norms * (8h - 2h) = 12h = 49,152 bytes per token more -> + 201,326,592
    # (631,799,808 of test_llama2_7b_fsdp_bf16_layer -> 833,126,400)
    inv = block_inventory(LLAMA2, "torch", "flash", device="cpu")
    got = inventory_bytes(inv, b=1, s=4096, tp=1, sp=False, act=2, res=2, layout="torch")
    assert got == 631_799_808 + 201_326_592 == 833_126_400
    # LayerNorm is one kernel on both devices; the CPU's keeps mean and rstd in the input's dtype:
    # GPT-2 124M (h 768), bf16: 2 norms * 2 statistics * (4 - 2) = 8 bytes per token less; in fp32
    # the same bytes
    gpt = preset("gpt2-124m")
    size = lambda device, nbytes: inventory_bytes(
        block_inventory(gpt, "torch", "flash", device=device),
        b=1,
        s=1024,
        tp=1,
        sp=False,
        act=nbytes,
        res=nbytes,
        layout="torch",
    )
    assert size("cuda", 2) - size("cpu", 2) == 8 * 1024
    assert size("cuda", 4) == size("cpu", 4)


def test_bad_kernel_is_one_line():
    with pytest.raises(ShardwiseError, match="cuda or cpu") as e:
        block_inventory(LLAMA2, "torch", "flash", device="tpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ShardwiseError, match="flash"):
        block_inventory(LLAMA2, "torch", "sdpa")
    with pytest.raises(ShardwiseError, match="layout"):
        block_inventory(LLAMA2, "deepspeed", "flash")


# ---- the pipeline ------------------------------------------------------------------------
def _simulated_peak(pp, m, v, schedule, rank):
    """Walk torch's per-rank order (estimate/pipeline.py) and track chunks in flight."""
    from shardwise.estimate.pipeline import rank_order

    live, peak, peak_first = set(), 0, 0
    for kind, mb, chunk in rank_order(pp, m, v, schedule, rank):
        if kind == "F":
            live.add((mb, chunk))
        else:
            live.discard((mb, chunk))
        if len(live) > peak:
            peak, peak_first = len(live), sum(1 for _, c in live if c == 0)
    return peak, peak_first


@pytest.mark.parametrize(
    "schedule,pp,m,v",
    [
        ("gpipe", 4, 8, 1),
        ("1f1b", 4, 8, 1),
        ("1f1b", 4, 2, 1),
        ("interleaved", 4, 8, 2),
        ("interleaved", 2, 8, 4),
        ("interleaved", 4, 4, 3),
    ],
)
def test_inflight_matches_torch_order(schedule, pp, m, v):
    plan = Plan(dp=1, pp=pp, gbs=m, mbs=1, schedule=schedule, vpp=v)
    for last in (False, True):
        chunks, first_stage, head = inflight(plan, last)
        peak, peak_first = _simulated_peak(pp, m, v, schedule, pp - 1 if last else 0)
        assert chunks == peak
        if not last:
            assert first_stage == peak_first


def test_interleaved_matches_korthikanti_factor():
    # rank 0 holds (v+1)p - 1 chunks of L/(pv) layers: L * (1 + (p-1)/(p v)) layer-micro-batches.
    # p = 4, v = 2, m = 8: 11 chunks = 11/8 L = L * (1 + 3/8)
    chunks, _, _ = inflight(Plan(dp=1, pp=4, gbs=8, mbs=1, schedule="interleaved", vpp=2), last=False)
    assert chunks == 11


def test_one_microbatch_in_flight_without_a_pipeline():
    for schedule in ("gpipe", "1f1b"):
        assert inflight(Plan(dp=1, pp=1, gbs=16, mbs=1, schedule=schedule), last=False) == (1, 1, 1)


def test_head_items_torch():
    # The last stage of Llama-2-7B (V = 32,000), b = 1, s = 4096, bf16 under FSDP (no autocast).
    # With tp = 2 the head is column-parallel, its logits gathered whole, the loss plain:
    #   logits b*s*V*2 = 262,144,000, kept by a pipeline's cache (pp > 1), dropped without one once
    #   the loss is computed (run/engine._accumulate: the graph saves the fp32 copy's log-softmax,
    #   not them); log_softmax's fp32 output: 524,288,000; the backward's two fp32 [b*s, V]
    #   gradients: 1,048,576,000.
    kw = dict(last=True, layout="torch", attention="flash", autocast=False, act=2, res=2, vocab=LLAMA2.vocab)
    plain = rank_activations(LLAMA2, Plan(dp=4, tp=2, pp=1, mbs=1, gbs=4, seq=4096), **kw)
    assert plain["act.logits"] == 0
    piped = rank_activations(LLAMA2, Plan(dp=2, tp=2, pp=2, mbs=1, gbs=4, seq=4096), **kw)
    assert piped["act.logits"] == 262_144_000
    assert plain["act.loss_fp32"] == 524_288_000
    assert plain["act.loss_backward"] == 1_048_576_000
    # tp = 1: the loss runs chunked (run/loss.py), T = 4096 tokens in ceil(V / H) = 8 chunks of
    # 512: nothing of the logits kept; its backward holds the input gradient T*H*2 = 33,554,432 and
    # the weight gradient's fp32 sum V*H*4 = 524,288,000, and at most max(a chunk's fp32 logits
    # and softmax 8*512*V = 131,072,000, a chunk's bf16 gradient 2*512*V = 32,768,000 next to its
    # bf16 [V, H] product 262,144,000, the sum cast to bf16 at the end 262,144,000) = 294,912,000:
    # 852,754,432 (against 1,048,576,000 + 786,432,000 kept)
    plan = Plan(dp=8, tp=1, pp=1, mbs=1, gbs=8, seq=4096)
    items = rank_activations(LLAMA2, plan, **kw)
    assert items["act.logits"] == 0 and items["act.loss_fp32"] == 0
    assert items["act.loss_backward"] == 33_554_432 + 524_288_000 + 294_912_000 == 852_754_432
    # final norm input 2 * 4096 * 4096 + rstd 4 * 4096; the output's input 2 * 4096 * 4096
    assert items["act.final_norm"] == 33_554_432 + 16_384
    assert items["act.head_input"] == 33_554_432
    # 32 layers x 631,799,808 (test_llama2_7b_fsdp_bf16_layer)
    assert items["act.layers"] == 32 * 631_799_808


def test_pipeline_buffers_and_stage_output():
    # Llama-2-7B, pp = 4, 1F1B, m = 8 micro-batches of b = 1, s = 4096, bf16 (FSDP-less: use bf16):
    # one residual tensor X = 1 * 4096 * 4096 * 2 = 33,554,432 bytes.
    plan = Plan(dp=1, pp=4, mbs=1, gbs=8, seq=4096, schedule="1f1b", precision="bf16")
    x = 33_554_432
    kw = dict(layout="torch", attention="flash", autocast=False, act=2, res=2, vocab=LLAMA2.vocab)
    first = rank_activations(LLAMA2, plan, last=False, **kw)
    # rank 0 at its last 1F1B backward (B4): 4 micro-batches in flight through 8 layers, each one's
    # output kept for the send; and micro-batch 2's: Schedule1F1B's warm-up fired the sends of F0,
    # F1, F2 one at a time and keeps the last one's work until the 1F1B loop ends (B2 is done)
    assert first["act.layers"] == 4 * 8 * 631_799_808
    assert first["act.stage_output"] == 5 * x
    assert first["act.stage_input_grad"] == 0  # stage 0 sends no gradient back
    assert first["buffers.pp_grad_recv"] == 8 * x  # one gradient buffer per micro-batch
    assert first["buffers.pp_act_recv"] == 0
    assert first["act.logits"] == 0
    last = rank_activations(LLAMA2, plan, last=True, **kw)
    # the last rank at B7: 1 in flight; of its 8 receive buffers one is that micro-batch's input,
    # already in act.layers as the first block's saved input; B6's input gradient, held by its
    # send ops until B7's are made
    assert last["act.layers"] == 8 * 631_799_808
    assert last["buffers.pp_act_recv"] == 7 * x
    assert last["buffers.pp_grad_recv"] == 0
    assert last["act.stage_output"] == 0
    assert last["act.stage_input_grad"] == 1 * x
    assert last["act.logits"] == 1 * 4096 * 32_000 * 2


def test_interleaved_rank_items_hand_worked():
    # examples/tiny-llama.toml (h 128, 4 heads, ffn 512, vocab 256, 4 layers) with tp = 2, pp = 2,
    # interleaved v = 2, m = 4 micro-batches of 4 x 64, fp32: 1 layer per virtual stage; one
    # residual tensor X = 4 * 64 * 128 * 4 = 131,072 bytes. A layer per micro-batch on a tp rank
    # (T = 256 tokens; q/k/v, out, logsumexp and the FFN halved): norm inputs 2 * 512 T, rstd
    # 2 * 4 T, the q/k/v input and the w1/w3 input 2 * 512 T, q, k, v 3 * 256 T, logsumexp 2 heads
    # * 4 T, out 256 T, SwiGLU 4 * 256 * 4 T, rotary cos/sin 2 * 32 * 4 * 64: 7,232 T + 16,384 =
    # 1,855,488; on the CPU each rms_norm also keeps its fp32 normalized tensor: + 2 * 512 T =
    # 2,117,632. Rank 0 (stages 0 and 2) at B1 of stage 0 (pipeline.backwards: its last 1F1B one):
    # 5 chunks in flight (3 of stage 0), all 8 outputs alive, 2 input gradients held (B0', B1' of
    # stage 2), stage 2's 4 receive buffers of which 2 hold in-flight inputs.
    plan = Plan(dp=1, tp=2, pp=2, mbs=4, gbs=16, seq=64, schedule="interleaved", vpp=2, precision="fp32")
    m = preset("llama-2-7b").scaled(layers=4, hidden=128, heads=4, vocab=256)
    assert m.ffn_hidden == 512
    kw = dict(layout="torch", attention="flash", autocast=False, act=4, res=4, vocab=256)
    x = 131_072
    first = rank_activations(m, plan, last=False, **kw)
    assert first["act.layers"] == 5 * 1_855_488
    assert rank_activations(m, plan, last=False, device="cpu", **kw)["act.layers"] == 5 * 2_117_632
    assert (first["act.embedding"], first["act.stage_output"], first["act.stage_input_grad"]) == (
        3 * 256 * 8,
        8 * x,
        2 * x,
    )
    assert (first["buffers.pp_act_recv"], first["buffers.pp_grad_recv"]) == (2 * x, 8 * x)
    # rank 1 (stages 1 and 3) at B3 of stage 3, the loss's: chunks 2, 3 of stage 1 and 3 of
    # stage 3 in flight, stage 1's 4 outputs alive, 5 input gradients held (B0' B1' B0 B1 B2');
    # 8 receive buffers, 3 holding in-flight inputs; one micro-batch's head
    last = rank_activations(m, plan, last=True, **kw)
    assert last["act.layers"] == 3 * 1_855_488
    assert (last["act.stage_output"], last["act.stage_input_grad"]) == (4 * x, 5 * x)
    assert (last["buffers.pp_act_recv"], last["buffers.pp_grad_recv"]) == (5 * x, 4 * x)
    assert last["act.logits"] == 256 * 256 * 4 and last["act.loss_backward"] == 256 * 256 * 8


# ---- torch cross-check: what autograd really saves ------------------------------------------
def _saved_storages(module, seen: dict):
    """A saved_tensors_hooks context that records {storage: bytes} of every distinct storage
    autograd saves for backward, the module's parameters excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _saved_bytes(spec, b, s, *, kernel="flash", selective=False, full=False, autocast=False, bf16=False):
    """Bytes of distinct storages the run tier's Block saves for backward (parameters excluded)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from shardwise.run.model import Block

    torch.manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    block = Block(spec).train().to(dtype)
    block.attention.recompute_core, block.recompute = selective, "full" if full else "none"
    x = torch.randn(b, s, spec.hidden, requires_grad=True, dtype=dtype)
    seen = {}
    backend = SDPBackend.MATH if kernel == "math" else SDPBackend.FLASH_ATTENTION
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with sdpa_kernel(backend), cast, _saved_storages(block, seen):
        block(x)
    return sum(seen.values())


TINY_LLAMA = ModelSpec(name="t", layers=2, hidden=64, heads=8, kv_heads=2, vocab=128, ffn_hidden=96)
TINY_GPT = ModelSpec(
    name="g",
    layers=2,
    hidden=64,
    heads=4,
    vocab=128,
    ffn_kind="gelu",
    norm="layernorm",
    positions="learned",
    max_seq=64,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
)
b, s = 2, 16


def _cpu_rmsnorm_extra(spec):
    # CPU's rms_norm is a composite that also saves the normalized tensor (CUDA's fused kernel
    # saves input and rstd only): one fp32 [b, s, h] per norm, two norms per block
    return 2 * b * s * spec.hidden * 4 if spec.norm == "rmsnorm" else 0


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT], ids=["llama", "gpt"])
@pytest.mark.parametrize("kernel", ["flash", "math"])
@pytest.mark.parametrize("selective", [False, True])
def test_inventory_equals_saved_tensors_fp32(spec, kernel, selective):
    """Exact: the CPU inventory is what autograd saves (fp32, no dropout, CPU kernels), and CUDA's
    differs by rms_norm's normalized tensor only."""
    inv = block_inventory(spec, "torch", kernel, selective, device="cpu")
    want = inventory_bytes(inv, b=b, s=s, tp=1, sp=False, act=4, res=4, layout="torch")
    assert _saved_bytes(spec, b, s, kernel=kernel, selective=selective) == want
    cuda = inventory_bytes(
        block_inventory(spec, "torch", kernel, selective), b=b, s=s, tp=1, sp=False, act=4, res=4, layout="torch"
    )
    assert want - cuda == _cpu_rmsnorm_extra(spec)


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT], ids=["llama", "gpt"])
def test_inventory_equals_saved_tensors_bf16(spec):
    """Pure bf16 on the CPU: bf16 activations, fp32 logsumexp and norm statistics, and rms_norm's
    fp32 copy of its input and fp32 normalized tensor (the bf16 input itself is not kept)."""
    inv = block_inventory(spec, "torch", "flash", device="cpu")
    want = inventory_bytes(inv, b=b, s=s, tp=1, sp=False, act=2, res=2, layout="torch")
    assert _saved_bytes(spec, b, s, bf16=True) == want


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT], ids=["llama", "gpt"])
def test_full_recompute_saves_the_block_input_only(spec):
    assert _saved_bytes(spec, b, s, full=True) == b * s * spec.hidden * 4


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT], ids=["llama", "gpt"])
def test_inventory_under_autocast(spec):
    """bf16 autocast over fp32 weights: fp32 residual, one bf16 copy of the norm output per
    Linear, plus each Linear's bf16 weight cast (estimate/memory's params.autocast_copy; biases' casts
    are not saved)."""
    inv = block_inventory(spec, "torch", "flash", autocast=True, device="cpu")
    want = inventory_bytes(inv, b=b, s=s, tp=1, sp=False, act=2, res=4, layout="torch")
    weights = sum(o * i for _, (o, *rest) in spec.layer_param_shapes() for i in rest)  # the 2-D ones
    assert _saved_bytes(spec, b, s, autocast=True) == want + 2 * weights


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT.scaled(tied_embeddings=True)], ids=["llama", "gpt"])
def test_whole_model_saved_tensors(spec):
    """Embedding, blocks, final norm and the chunked loss as run/engine.py computes them (tp = 1,
    no pipeline: model(x, y)), against the first (= last) rank's activation items on the CPU.
    Exact, apart from the loss's backward temporaries (not saved tensors)."""
    import torch

    from shardwise.run.model import Transformer

    torch.manual_seed(0)
    model = Transformer(spec).train()
    tokens = torch.randint(0, spec.vocab, (b, s + 1))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:]
    seen = {}
    with _saved_storages(model, seen):
        model(x, y)
    plan = Plan(dp=1, mbs=b, gbs=b, seq=s, precision="fp32")
    items = rank_activations(
        spec,
        plan,
        last=True,
        layout="torch",
        attention="flash",
        autocast=False,
        act=4,
        res=4,
        vocab=spec.vocab,
        device="cpu",
    )
    unsaved = ("act.logits", "act.loss_backward", "act.block_backward")
    want = sum(v for k, v in items.items() if k.startswith("act.") and k not in unsaved)
    assert sum(seen.values()) == want
    # CUDA's fused rms_norm: one fp32 [b, s, h] less per norm, 2L + 1 of them; and in fp32 its
    # flash kernel does not take GQA: K and V saved at the query width, (q_dim - kv_dim) more each
    cuda = rank_activations(
        spec, plan, last=True, layout="torch", attention="flash", autocast=False, act=4, res=4, vocab=spec.vocab
    )
    rms = (2 * spec.layers + 1) * b * s * spec.hidden * 4 if spec.norm == "rmsnorm" else 0
    kv = spec.layers * 2 * b * s * (spec.q_dim - spec.kv_dim) * 4
    assert sum(items.values()) - sum(cuda.values()) == rms - kv


# ---- the transient inside one block's backward --------------------------------------------------
MID_LLAMA = ModelSpec(name="l", layers=1, hidden=128, heads=4, vocab=256, ffn_hidden=512)  # the examples' block
MID_GPT = ModelSpec(
    name="g",
    layers=1,
    hidden=128,
    heads=4,
    vocab=256,
    ffn_hidden=512,
    ffn_kind="gelu",
    norm="layernorm",
    positions="learned",
    max_seq=64,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
)


def test_block_backward_hand_worked():
    # T = mbs*seq = 4*64 = 256 tokens, h = 128, f = 512, fp32:
    #   [T, f] gradient = 256*512*4 = 524,288; weight gradient [f, h] = 512*128*4 = 262,144
    #   SwiGLU: max(2 * 524,288, 524,288 + 262,144) = 1,048,576; GELU: 524,288 + 262,144 = 786,432
    plan = Plan(dp=1, mbs=4, gbs=4, seq=64)
    assert block_backward_bytes(MID_LLAMA, plan, act=4, autocast=False) == 1_048_576
    assert block_backward_bytes(MID_GPT, plan, act=4, autocast=False) == 786_432
    # one token row (mbs 1, seq 64): 64*512*4 = 131,072; SwiGLU max(262,144, 393,216) = 393,216
    one = Plan(dp=1, mbs=1, gbs=1, seq=64)
    assert block_backward_bytes(MID_LLAMA, one, act=4, autocast=False) == 393_216
    # tp = 2 (f = 256 per rank): max(2 * 262,144, 262,144 + 131,072) = 524,288
    assert block_backward_bytes(MID_LLAMA, Plan(dp=1, tp=2, mbs=4, gbs=4, seq=64), act=4, autocast=False) == 524_288
    # autocast: bf16 gradients (256*512*2 = 262,144) and a weight gradient in bf16 + its fp32
    # cast (512*128*6 = 393,216): max(524,288, 655,360) = 655,360
    assert block_backward_bytes(MID_LLAMA, plan, act=2, autocast=True) == 655_360
    # weight gradients kept (FSDP2): SwiGLU's product backward next to w2's [h, f] gradient,
    # 2 * 524,288 + 262,144 = 1,310,720; one token row 2 * 131,072 + 262,144 = 524,288; GELU's
    # transient holds w2's already: 786,432
    assert block_backward_bytes(MID_LLAMA, plan, act=4, autocast=False, grads_kept=True) == 1_310_720
    assert block_backward_bytes(MID_LLAMA, one, act=4, autocast=False, grads_kept=True) == 524_288
    assert block_backward_bytes(MID_GPT, plan, act=4, autocast=False, grads_kept=True) == 786_432


def test_block_backward_is_the_larger_of_it_and_the_loss_backward():
    # one rank, the head's loss backward 8*T*V = 8*256*256 = 524,288 < the block's 1,048,576:
    # the excess 524,288 is counted; at tp = 2 the block's 524,288 is no larger: nothing
    kw = dict(last=True, layout="torch", attention="flash", autocast=False, act=4, res=4, vocab=256)
    items = rank_activations(MID_LLAMA, Plan(dp=1, mbs=4, gbs=4, seq=64), **kw)
    assert items["act.loss_backward"] == 524_288 and items["act.block_backward"] == 524_288
    items = rank_activations(MID_LLAMA, Plan(dp=1, tp=2, mbs=4, gbs=4, seq=64), **kw)
    assert items["act.block_backward"] == 0
    # a pipeline stage without the head: the block's transient whole
    two = MID_LLAMA.scaled(layers=2)
    first = rank_activations(two, Plan(dp=1, pp=2, mbs=4, gbs=8, seq=64), **{**kw, "last": False})
    assert first["act.loss_backward"] == 0 and first["act.block_backward"] == 1_048_576


@pytest.mark.parametrize(
    "spec, mbs, kept",
    [
        (MID_LLAMA, 1, False),
        (MID_LLAMA, 4, False),
        (MID_GPT, 1, False),
        (MID_GPT, 4, False),
        (MID_LLAMA, 1, True),
        (MID_LLAMA, 4, True),
        (MID_GPT, 4, True),
    ],
)
def test_block_backward_equals_measured(spec, mbs, kept):
    """The run tier's block, its gradients already accumulated (the last micro-batch of a step;
    kept: none yet, so each weight gradient made stays as .grad, as FSDP2's unsharded gradients
    do until the block's reduce-scatter): the peak during its backward over what is alive when it
    begins (parameters, gradients, saved tensors, output and output gradient), by PyTorch's
    MemTracker. Exact for SwiGLU; GELU's block adds one bias gradient [h] (128*4 = 512 bytes,
    < 0.1%) the formula leaves out. (GELU kept at one token row is left out: its peak comes
    later, block_backward_bytes says by how much.)"""
    import torch

    from shardwise.run.measure import _peak_tracker
    from shardwise.run.model import Block

    torch.manual_seed(0)
    block = Block(spec).train()
    for p in block.parameters():
        p.grad = None if kept else torch.zeros_like(p)
    x = torch.randn(mbs, 64, spec.hidden, requires_grad=True)
    mt = _peak_tracker()
    mt.track_external(x, *block.parameters(), *[p.grad for p in block.parameters() if p.grad is not None])
    with mt:
        y = block(x)
        dy = torch.randn_like(y)
        alive = sum(d.get("Total", 0) for d in mt.get_tracker_snapshot("current").values())
        y.backward(dy)
        peak = sum(d.get("Total", 0) for d in mt.get_tracker_snapshot("peak").values())
    bias = spec.hidden * 4 if spec.mlp_bias else 0
    plan = Plan(dp=1, mbs=mbs, gbs=mbs, seq=64)
    assert peak - alive == block_backward_bytes(spec, plan, act=4, autocast=False, grads_kept=kept) + bias
