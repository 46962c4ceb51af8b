"""Recompute "selective-layer[:k]": torch.utils.checkpoint on every k-th block of a model chunk
(run/parallelize.apply_recompute, torchtitan's per-layer AC). What a chain of blocks keeps and
its backward rebuilds, as the estimate says (activations.rank_sizes, first_blocks), measured by
MemTracker on the run tier's blocks; the same gradients as no recompute; the recompute's time
and replayed tensor-parallel collectives; the exports and the refusals."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from _models import TINY_GPT2, TINY_LLAMA
from _saved import measure_blocks
from torch import nn

from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.estimate.activations import first_blocks, layer_bytes, rank_sizes
from shardwise.estimate.comm import _tp
from shardwise.estimate.profiles import TORCH
from shardwise.export.torchtitan import _ac
from shardwise.run.model import Block
from shardwise.run.parallelize import apply_recompute
from shardwise.spec.hardware import make_cluster
from shardwise.spec.plan import Plan, recompute_every, recompute_kind
from shardwise.spec.presets import preset

B, S = 2, 32


def test_names_and_k():
    assert recompute_kind("selective-layer:3") == "selective-layer" and recompute_every("selective-layer:3") == 3
    assert recompute_every("selective-layer") == 2  # the default: every second block
    assert recompute_every("full") == 1 and recompute_every("none") == recompute_every("selective-op") == 0


def _chain(spec, mode, n, frozen=False):
    torch.manual_seed(0)
    blocks = nn.ModuleDict({str(i): Block(spec).train().requires_grad_(not frozen) for i in range(n)})
    apply_recompute(types.SimpleNamespace(layers=blocks), mode)
    return blocks


def test_every_kth_block_of_the_chunk_is_checkpointed():
    blocks = _chain(TINY_LLAMA, "selective-layer:3", 7)
    assert [b.recompute for b in blocks.values()] == ["none", "none", "full"] * 2 + ["none"]


def _measure(spec, mode, n, autocast, frozen=False):
    """(bytes n chained blocks keep besides the first one's input, their backward's peak over
    what is alive when it begins)."""
    return measure_blocks(list(_chain(spec, mode, n, frozen).values()), spec.hidden, autocast, B, S)


def _sizes(spec, recompute, n, autocast):
    spec = dataclasses.replace(spec, layers=n)
    plan = Plan(dp=1, mbs=B, gbs=B, seq=S, recompute=recompute)
    kw = dict(layout="torch", attention="flash", autocast=autocast, act=2 if autocast else 4, res=4, device="cpu")
    return rank_sizes(spec, plan, last=False, vocab=spec.vocab, **kw), kw


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize(("n", "mode"), [(4, "selective-layer"), (4, "selective-layer:3"), (5, "selective-layer")])
def test_chain_keeps_what_the_inventory_says(spec, autocast, n, mode):
    """Kept: the unchecked blocks' saved tensors whole, the checkpointed ones' input. Hand-worked,
    TINY_LLAMA fp32, b 2, s 32: a block keeps 284,160 bytes, its input 16,384; 4 blocks, k 2:
    2 x 284,160 + 2 x 16,384 = 601,088. Under autocast the unchecked blocks also hold their
    weights' bf16 casts (the estimate's params.autocast_copy, memory/ddp.py)."""
    z, kw = _sizes(spec, mode, n, autocast)
    whole, _ = layer_bytes(spec, Plan(dp=1, mbs=B, gbs=B, seq=S), **kw)
    inp = B * S * spec.hidden * 4
    k = recompute_every(mode)
    assert z.chunk == first_blocks(z, n) == n * whole - (n // k) * (whole - inp)
    if spec is TINY_LLAMA and not autocast and (n, k) == (4, 2):
        assert z.chunk == 601_088
    casts = sum(o * i for name, (o, *rest) in spec.layer_param_shapes() for i in rest if name.endswith("weight")) * 2
    kept, _ = _measure(spec, mode, n, autocast)
    assert kept == z.chunk - inp + (casts * (n - n // k) if autocast else 0)


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize(("n", "mode"), [(4, "selective-layer"), (4, "selective-layer:3"), (3, "selective-layer:3")])
def test_chain_rebuilds_one_block_where_the_top_one_is_checkpointed(spec, n, mode):
    """The backward's peak (fp32, weights frozen so that no gradient grows with the blocks done):
    the top block's rebuilt tensors (the estimate's act.recompute) where k divides n, over the
    transient of one plain block's backward; otherwise that transient alone (a checkpointed block
    lower down rebuilds over fewer saved tensors)."""
    z, _ = _sizes(spec, mode, n, False)
    _, plain = _measure(spec, "none", 1, False, frozen=True)
    _, transient = _measure(spec, mode, n, False, frozen=True)
    _, one_full = _measure(spec, "full", 1, False, frozen=True)
    assert transient == (one_full if n % recompute_every(mode) == 0 else plain)
    assert z.recompute == (z.layer - z.layer_checkpointed if n % recompute_every(mode) == 0 else 0)
    assert one_full - plain <= z.layer - z.layer_checkpointed  # the rebuilt tensors, some freed early


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
def test_same_gradients_as_no_recompute(spec):
    grads = {}
    for mode in ("none", "selective-layer", "selective-layer:3"):
        blocks = _chain(spec, mode, 4)
        x = torch.randn(B, S, spec.hidden, requires_grad=True)
        y = x
        for b in blocks.values():
            y = b(y)
        y.square().sum().backward()
        grads[mode] = [x.grad] + [p.grad for p in blocks.parameters()]
    for mode in ("selective-layer", "selective-layer:3"):
        for a, b in zip(grads["none"], grads[mode]):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_llama_3_1_8b_keeps_part_of_the_blocks():
    """Llama-3.1-8B, ZeRO-3 on 8 H100-80GB, micro-batch 2 x 8192, at the first block's backward
    (the peak): 32 blocks, k 2: 16 keep what no recompute keeps, 16 their bf16 input (16,384
    tokens x 4096 x 2 bytes), and the top block (a checkpointed one, k divides 32) rebuilds the
    rest of its tensors; the recompute runs 16 blocks' forward, half of full recompute's. k 4: 8
    checkpointed; k 3: 10 (blocks 2, 5, ..., 29), and the top block is not one of them."""
    cluster = make_cluster("h100-80gb", 8)
    e = lambda r: estimate("llama-3.1-8b", cluster, Plan(zero=3, mbs=2, seq=8192, recompute=r))
    none, full = e("none"), e("full")
    whole, inp = none.memory.detail["act.layers"] / 32, 16_384 * 4096 * 2
    assert whole == int(whole) and full.memory.detail["act.recompute"] == whole - inp
    for r, ck in (("selective-layer", 16), ("selective-layer:4", 8), ("selective-layer:3", 10)):
        got, k = e(r), recompute_every(r)
        assert got.memory.detail["act.layers"] == (32 - ck) * whole + ck * inp
        assert got.memory.detail.get("act.recompute", 0) == (whole - inp if 32 % k == 0 else 0)
        rc = full.time.detail["recompute_s"] / k
        assert got.time.detail["recompute_s"] == pytest.approx(rc, rel=1e-12) and rc > 0
        assert none.memory.total > got.memory.total > full.memory.total


def test_tensor_parallel_replays_the_checkpointed_blocks_collectives():
    """With tp, a checkpointed block's recompute replays its forward all-reduce but the last (not
    needed: torch.utils.checkpoint stops once every saved tensor is back): 4 blocks, k 2, one
    micro-batch: 2 x 4 + 2 = 10 forward all-reduces of block outputs; full: 12; none: 8."""
    model, cluster = TINY_LLAMA, make_cluster("h100-80gb", 2)
    dt = {"resid": 4, "mm": 4}

    def calls(r):
        plan = Plan(dp=1, tp=2, mbs=1, gbs=1, seq=S, recompute=r).resolve(model, 2)
        return next(c.count for c in _tp(model, cluster, plan, TORCH, dt, False) if "block outputs" in c.what)

    assert (calls("none"), calls("selective-layer"), calls("selective-layer:3"), calls("full")) == (8, 10, 9, 12)


def test_torchtitan_export_names_the_option():
    # torchtitan's ActivationCheckpoint: mode "selective", selective_ac_option "2" = every 2nd block
    assert _ac("selective-layer") == {"mode": "selective", "selective_ac_option": "2"}
    assert _ac("selective-layer:4") == {"mode": "selective", "selective_ac_option": "4"}


def test_bad_values_are_one_line(capsys):
    m = preset("llama-3.1-8b")
    for bad, words in (
        ("selective-layer:1", "at least 2"),
        ("selective-layer:x", "at least 2"),
        ("full:2", "only selective-layer"),
        ("selective-layr", "selective-layer"),
    ):
        with pytest.raises(ShardwiseError, match=words) as e:
            Plan(recompute=bad).resolve(m, 8)
        assert "\n" not in str(e.value)
        with pytest.raises(SystemExit) as ex:
            main(["estimate", "llama-3.1-8b", "--gpus", "8", "--recompute", bad])
        assert ex.value.code == 2 and words in capsys.readouterr().err
    # Megatron-LM checkpoints the first N blocks of a stage or groups of N, not every k-th one
    with pytest.raises(ShardwiseError, match="--recompute full or selective") as e:
        estimate(m, make_cluster("h100-80gb", 8), Plan(recompute="selective-layer"), profile="megatron")
    assert "\n" not in str(e.value)
