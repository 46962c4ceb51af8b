"""export-hf: a checkpoint written by `shardwise run` becomes a Hugging Face model directory that
transformers loads, and the loaded model's logits are the run tier's model's on the same weights.

The run tier's reference is built independently of the exporter: the checkpoint is gathered with
DCP's own dcp_to_torch_save and loaded into run/model.py's Transformer by its own names."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from _models import TINY_GPT2, TINY_LLAMA

from shardwise.errors import ShardwiseError
from shardwise.run import checkpoint_dir as layout
from shardwise.run.config import CheckpointConfig, DataConfig, OptimConfig, RunConfig, TrainConfig
from shardwise.run.export_hf import export, family, hf_config
from shardwise.run.model import build
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan

transformers = pytest.importorskip("transformers")
# GPT-2 without bias on q/k/v or the MLP: exported with zero biases, which transformers' GPT-2 always has
GPT2_NO_MLP_BIAS = dataclasses.replace(TINY_GPT2, name="tiny-gpt2-nobias", mlp_bias=False, tied_embeddings=False)
LLAMA_TIED = dataclasses.replace(TINY_LLAMA, name="tiny-llama-tied", tied_embeddings=True, kv_heads=4)


def trained_checkpoint(spec: ModelSpec, root) -> str:
    """Two AdamW steps in this process (so the weights are not the initial ones), checkpointed."""
    from shardwise.run.train import train

    plan = Plan(mbs=2, gbs=2, seq=16, precision="fp32").resolve(spec, 1)
    cfg = RunConfig(
        spec,
        plan,
        DataConfig(seed=1),
        OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0),
        TrainConfig(steps=2, seed=5, log_every=100, device="cpu", nproc=1),
        checkpoint=CheckpointConfig(dir=str(root / "ck")),
    )
    train(cfg, torch.device("cpu"))
    return str(root / "ck")


def run_tier_logits(spec: ModelSpec, ckpt: str, tokens: torch.Tensor, tmp) -> torch.Tensor:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, str(tmp / "full.pt"))
    full = torch.load(tmp / "full.pt", weights_only=False)
    model = build(spec, "cpu")
    names = [n for n, _ in spec.param_shapes()]
    sd = {n: full[n] for n in names if n in full}
    if spec.tied_embeddings:
        sd["output.weight"] = full["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT2, GPT2_NO_MLP_BIAS, LLAMA_TIED], ids=lambda s: s.name)
def test_transformers_loads_the_export_with_the_same_logits(spec, tmp_path):
    root = trained_checkpoint(spec, tmp_path)
    ckpt = layout.latest(root)
    export(root, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == family(spec)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    hf.eval()
    # the same parameters, plus the zero MLP biases a GPT-2 without them is given
    zero_biases = 0 if spec.mlp_bias or family(spec) == "llama" else (spec.ffn_hidden + spec.hidden) * spec.layers
    assert sum(p.numel() for p in hf.parameters()) == spec.params + zero_biases
    tokens = torch.randint(0, spec.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = hf(tokens).logits
    want = run_tier_logits(spec, str(ckpt), tokens, tmp_path)
    assert got.shape == want.shape == (2, 16, spec.vocab)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    # and the weights are not the initial ones: two steps moved them
    init = build(spec, "cpu", seed=5)
    with torch.no_grad():
        assert not torch.allclose(init(tokens), want, atol=1e-3)


def test_the_cli_writes_both_files_and_refuses_a_missing_checkpoint(tmp_path):
    root = trained_checkpoint(TINY_LLAMA, tmp_path)
    cmd = [sys.executable, "-m", "shardwise", "export-hf"]
    ok = subprocess.run([*cmd, root, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    bad = subprocess.run(
        [*cmd, str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    assert not (tmp_path / "o2").exists()
    unwritable = subprocess.run([*cmd, root, "--out", "/proc/x"], capture_output=True, text=True)
    assert unwritable.returncode == 2 and "--out" in unwritable.stderr and "Traceback" not in unwritable.stderr


def test_models_neither_llama_nor_gpt2_are_refused_in_one_line():
    odd = dataclasses.replace(TINY_LLAMA, name="odd", qkv_bias=True, out_bias=False)
    with pytest.raises(ShardwiseError, match="output projection"):
        hf_config(odd)
    mixed = dataclasses.replace(TINY_LLAMA, name="mixed", norm="layernorm")
    with pytest.raises(ShardwiseError, match="neither Llama-style nor GPT-2-style"):
        family(mixed)
