"""Recompute by policy (run/recompute.py, recompute = "selective-op"): what each block keeps and
rebuilds, as the estimate's inventory says (activations.op_policy_bytes_per_token, _layer_bytes),
measured by MemTracker on the run tier's block; the same gradients as no recompute; and the
Llama-3.1-8B FSDP plan that Megatron-style selective recompute cannot fit on 80 GB."""

from __future__ import annotations

import pytest
import torch
from _models import TINY_GPT2, TINY_LLAMA
from _saved import measure_blocks

from shardwise.estimate import estimate
from shardwise.estimate.activations import layer_bytes, op_policy_bytes_per_token
from shardwise.run.model import Block
from shardwise.spec.hardware import make_cluster
from shardwise.spec.plan import Plan
from shardwise.spec.presets import preset

B, S = 2, 32


def test_policy_bytes_by_hand():
    # TINY_LLAMA (h 64, q 64, kv 32, f 128, 4 heads), fp32: matmul outputs q 64 + k 32 + v 32 +
    # wo 64 + w1 128 + w3 128 + w2 64 = 512, the flash output 64, all 4 bytes; logsumexp 4 * 4:
    # 2,320 bytes a token. The math kernel's output is a batched matmul's, recomputed: 2,048.
    assert op_policy_bytes_per_token(TINY_LLAMA, "flash", 4) == 576 * 4 + 16 == 2_320
    assert op_policy_bytes_per_token(TINY_LLAMA, "math", 4) == 512 * 4
    # Llama-3.1-8B in bf16 (q 4096, kv 1024, f 14,336, 32 heads): (4096 + 2048 + 4096 + 28,672 +
    # 4096 + 4096) * 2 + 32 * 4 = 94,336 bytes a token and layer
    assert op_policy_bytes_per_token(preset("llama-3.1-8b"), "flash", 2) == 94_336


def _measure(spec, mode, autocast):
    """(bytes the block keeps besides its input, its backward's peak over what is alive when it
    begins), the block's parameters and input external."""
    torch.manual_seed(0)
    block = Block(spec).train()
    block.recompute = mode
    return measure_blocks([block], spec.hidden, autocast, B, S)


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
def test_policy_keeps_and_rebuilds_what_the_inventory_says(spec, autocast):
    """Kept: exactly the policy's outputs. The backward's peak: one block's rebuilt tensors (the
    inventory's second number; under autocast also the block's weight casts, which the estimate
    counts as params.autocast_copy, one block's) plus the block's own backward transient, which
    the same block without recompute measures."""
    act = 2 if autocast else 4
    plan = Plan(dp=1, mbs=B, gbs=B, seq=S, recompute="selective-op")
    kw = dict(layout="torch", attention="flash", autocast=autocast, act=act, res=4, device="cpu")
    kept, transient = _measure(spec, "selective-op", autocast)
    _, plain_transient = _measure(spec, "none", autocast)
    assert kept == B * S * op_policy_bytes_per_token(spec, "flash", act)
    per_layer, rebuilt = layer_bytes(spec, plan, **kw)
    assert per_layer == kept + B * S * spec.hidden * 4  # and the block's input
    casts = sum(o * i for n, (o, *rest) in spec.layer_param_shapes() for i in rest if n.endswith("weight")) * 2
    # GPT-2's block under autocast: one bias cast (128 bytes) the inventory leaves out
    slack = 128 if autocast and spec.mlp_bias else 0
    assert transient == rebuilt + (casts if autocast else 0) + plain_transient - slack


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
def test_policy_gives_the_same_gradients(spec):
    grads = {}
    for mode in ("none", "selective-op"):
        torch.manual_seed(0)
        block = Block(spec).train()
        block.recompute = mode
        x = torch.randn(B, S, spec.hidden, requires_grad=True)
        block(x).square().sum().backward()
        grads[mode] = [x.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(grads["none"], grads["selective-op"]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_llama_3_1_8b_fsdp_fits_with_the_op_policy():
    """Llama-3.1-8B, FSDP (ZeRO-3) on 8 H100-80GB, bf16, micro-batch 2 x 8192 tokens: Megatron's
    selective recompute (the attention core, which flash attention already does not save) leaves
    the layers' saved tensors almost whole and does not fit; the per-op policy keeps per token and
    layer the bf16 block input (8,192 bytes) and 94,336 of matmul and attention outputs
    (test_policy_bytes_by_hand): 32 layers x 16,384 tokens x 102,528 = 53.75 GB of the 71 GiB."""
    cluster = make_cluster("h100-80gb", 8)
    plan = dict(zero=3, mbs=2, seq=8192)
    sel = estimate("llama-3.1-8b", cluster, Plan(recompute="selective", **plan))
    op = estimate("llama-3.1-8b", cluster, Plan(recompute="selective-op", **plan))
    assert not sel.memory.fits and op.memory.fits
    assert op.memory.detail["act.layers"] == 32 * 16_384 * (8_192 + 94_336)


def test_op_policy_recomputes_no_matmul_with_flash():
    """The policy keeps every matmul's and the flash kernel's outputs: no matmul FLOPs run again;
    with the math kernel its attention core (batched matmuls) runs again, as Megatron's selective."""
    cluster = make_cluster("h100-80gb", 8)
    t = lambda **kw: estimate("llama-3.1-8b", cluster, Plan(zero=3, mbs=1, seq=4096, **kw)).time.detail["recompute_s"]
    assert t(recompute="selective-op") == 0
    assert t(recompute="selective-op", attention="math") == t(recompute="selective", attention="math") > 0


def test_bad_policies_are_one_line():
    from shardwise.errors import ShardwiseError

    m = preset("llama-3.1-8b")
    with pytest.raises(ShardwiseError) as e:
        Plan(recompute="selective-opp").resolve(m, 8)
    msg = str(e.value)
    assert "\n" not in msg and "selective-op" in msg and "none, selective-op, selective, selective-layer, full" in msg
    # Megatron-LM has no per-op policy: its profile refuses it, naming what it has
    with pytest.raises(ShardwiseError, match="--recompute selective") as e:
        estimate(m, make_cluster("h100-80gb", 8), Plan(recompute="selective-op"), profile="megatron")
    assert "\n" not in str(e.value)
