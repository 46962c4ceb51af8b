"""The estimate's checkpoint bytes (estimate/checkpoint.py) by hand and against what `shardwise run`
writes: the tensor bytes in each rank's .distcp file, read from DCP's own metadata, and the files'
sizes (those bytes plus torch.save's framing of each item)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
from _models import TINY_GPT2, TINY_LLAMA
from test_run_failures import LLAMA, env, shardwise

from shardwise.errors import ShardwiseError
from shardwise.estimate.checkpoint import DEFAULT_GBPS_PER_GPU, checkpoint_cost, stage_bytes
from shardwise.spec.plan import Plan

FRAME = 2048  # bytes of torch.save framing per item at most (about 1.2 KiB: written() measures it)


def test_tiny_llama_by_hand():
    """TINY_LLAMA: hidden 64, 4 heads of 16, 2 KV heads, FFN 128, vocab 128, 4 layers, untied.
    A layer: wq 64x64 + wk 64x32 + wv 64x32 + wo 64x64 = 12,288; w1, w2, w3 64x128 = 24,576; two
    norms 128: 36,992 parameters in 9 tensors. Embedding and output 128x64 each, final norm 64:
    16,448 in 3. All: 164,416 parameters in 39 tensors. AdamW in fp32: 4 + 4 + 4 bytes each, plus a
    4-byte step per tensor: 12 x 164,416 + 4 x 39 = 1,973,148 bytes."""
    plan = Plan(dp=2, mbs=1, gbs=2, seq=32, precision="fp32").resolve(TINY_LLAMA, 2)
    c = checkpoint_cost(TINY_LLAMA, plan, gpus=2, storage_gbps=1.0)
    assert c.bytes == 1_973_148
    assert c.bytes_per_rank == 986_574  # two DDP replicas share the writing
    assert c.seconds == pytest.approx(1_973_148 / 1e9)
    # SGD keeps one momentum buffer and no step; pure bf16 halves everything
    sgd = Plan(mbs=1, gbs=1, seq=32, precision="bf16", optimizer="sgd").resolve(TINY_LLAMA, 1)
    assert checkpoint_cost(TINY_LLAMA, sgd, gpus=1).bytes == 2 * 2 * 164_416


def test_stages_and_the_default_bandwidth():
    plan = Plan(pp=2, dp=1, mbs=1, gbs=2, seq=32, precision="fp32").resolve(TINY_LLAMA, 2)
    first, last = stage_bytes(TINY_LLAMA, plan)
    layer = 12 * 36_992 + 4 * 9
    assert first == 2 * layer + 12 * 8192 + 4  # the embedding
    assert last == 2 * layer + 12 * (8192 + 64) + 4 * 2  # the final norm and the output
    c = checkpoint_cost(TINY_LLAMA, plan, gpus=2)
    assert c.bytes_per_rank == last and c.storage_default
    assert c.storage_gbps == pytest.approx(2 * 2e12 / 16_384 / 1e9) == 2 * DEFAULT_GBPS_PER_GPU
    tied = Plan(mbs=1, gbs=1, seq=32, precision="fp32").resolve(TINY_GPT2, 1)
    assert checkpoint_cost(TINY_GPT2, tied, 1).bytes == 12 * TINY_GPT2.params + 4 * len(TINY_GPT2.param_shapes())
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ShardwiseError, match="--storage-gbps"):
            checkpoint_cost(TINY_LLAMA, tied, 1, storage_gbps=bad)


def written(ckpt: Path) -> tuple[dict, dict, int, int]:
    """({file: tensor bytes}, {file: items}, the largest tensor item, items' framing at most),
    from the checkpoint's own metadata."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(ckpt)).read_metadata()
    payload, items, largest, frame = {}, {}, 0, 0
    for idx, info in md.storage_data.items():
        meta = md.state_dict_metadata[idx.fqn]
        n = 0
        if isinstance(meta, TensorStorageMetadata):
            chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(idx.offset))
            n = math.prod(chunk.sizes) * torch.empty((), dtype=meta.properties.dtype).element_size()
        payload[info.relative_path] = payload.get(info.relative_path, 0) + n
        items[info.relative_path] = items.get(info.relative_path, 0) + 1
        largest, frame = max(largest, n), max(frame, info.length - n)
    return payload, items, largest, frame


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--dp", "2"), ("--pp", "2", "--dp", "1"), ("--dp", "2", "--zero", "3")])
def test_the_estimate_holds_against_the_files_written(tmp_path, flags):
    from shardwise.run import config

    ck = tmp_path / "ck"
    argv = ("--nproc", "2", "--steps", "1", "--device", "cpu", "--checkpoint-dir", str(ck), *flags)
    r = subprocess.run(shardwise(LLAMA, *argv), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = config.load(
        LLAMA,
        {("plan", f[2:]): (int(v), f) for f, v in zip(flags[::2], flags[1::2])} | {("train", "nproc"): (2, "--nproc")},
    )
    est = checkpoint_cost(cfg.model, cfg.plan, gpus=2)
    payload, items, largest, frame = written(ck / "step-000001")
    assert sum(payload.values()) == est.bytes  # every tensor byte, exactly
    # the busiest rank: the estimate's even share, within one tensor (DCP's greedy dedup)
    assert abs(max(payload.values()) - est.bytes_per_rank) <= largest
    assert frame < FRAME  # torch.save's framing of an item
    for f, n in payload.items():
        size = (ck / "step-000001" / f).stat().st_size
        assert n <= size <= n + items[f] * FRAME
