"""Each export held against the framework's own config parser where it installs on a CPU machine
(DeepSpeed's DeepSpeedConfig, accelerate's ClusterConfig, shardwise's run config), against golden
files elsewhere (torchtitan needs triton to import; Megatron-LM's argument parser is not on the
package index), and refused in one line where the framework cannot express the plan."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from _export import dims, framework, job

from shardwise.errors import ShardwiseError
from shardwise.export import FORMATS, export

GOLDEN = Path(__file__).parent / "golden"


class _Mpu:
    """What DeepSpeedConfig asks a model-parallel unit for: the data-parallel size."""

    def __init__(self, dp):
        self.dp = dp

    def get_data_parallel_world_size(self):
        return self.dp


@pytest.mark.parametrize(
    "plan, gpus",
    [
        (dict(zero=2, mbs=2, gbs=64), 8),  # hand-worked: 64 = 2 per micro-batch x 4 accumulated x dp 8
        (dict(zero=3, mbs=1, gbs=256, offload="params", precision="fp16-mixed"), 16),
        (dict(zero=1, tp=2, mbs=4, gbs=32, offload="optimizer", recompute="full"), 8),
        (dict(zero=0, mbs=1, gbs=8, precision="fp32", optimizer="sgd"), 8),
    ],
)
def test_deepspeed_config_parses_in_deepspeed(tmp_path, monkeypatch, plan, gpus):
    ds_config = framework("deepspeed.runtime.config")
    # no process group here: DeepSpeedConfig asks the mpu for the data-parallel size once it has a rank
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a: 0)
    j = job(gpus=gpus, **plan)
    ex = export("deepspeed", j)
    (tmp_path / ex.filename).write_text(ex.text)
    p = j.plan
    c = ds_config.DeepSpeedConfig(str(tmp_path / ex.filename), mpu=_Mpu(p.dp))
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu) == (p.gbs, p.mbs)
    assert c.gradient_accumulation_steps == p.grad_accum
    if plan == dict(zero=2, mbs=2, gbs=64):
        assert c.gradient_accumulation_steps == 4
    assert c.zero_optimization_stage == p.zero
    assert c.bfloat16_config.enabled == (p.precision == "bf16-mixed")
    assert c.float16_config.enabled == (p.precision == "fp16-mixed")
    zc = c.zero_config
    assert (zc.offload_param is not None) == (p.offload == "params")
    assert (zc.offload_optimizer is not None) == (p.offload in ("optimizer", "params"))
    if p.tp > 1:
        assert c.tensor_parallel_config.autotp_size == p.tp
    assert "--num_gpus 8" in ex.launch and "--deepspeed_config ds_config.json" in ex.launch


@pytest.mark.parametrize(
    "plan, gpus, kind",
    [
        (dict(zero=3, recompute="full"), 16, "FSDP"),
        (dict(zero=3, offload="params", precision="fp16-mixed"), 8, "FSDP"),
        (dict(zero=2), 8, "FSDP"),
        (dict(zero=0, precision="fp32"), 8, "MULTI_GPU"),
    ],
)
def test_accelerate_config_loads_in_accelerate(tmp_path, plan, gpus, kind):
    config_args = framework("accelerate.commands.config.config_args")
    j = job(gpus=gpus, **plan)
    ex = export("accelerate", j)
    (tmp_path / ex.filename).write_text(ex.text)
    c = config_args.ClusterConfig.from_yaml_file(str(tmp_path / ex.filename))
    p = j.plan
    assert str(c.distributed_type).endswith(kind)
    assert (c.num_processes, c.num_machines) == (gpus, gpus // 8)
    assert (
        str(c.mixed_precision).lower().endswith({"bf16-mixed": "bf16", "fp16-mixed": "fp16", "fp32": "no"}[p.precision])
    )
    if kind == "FSDP":
        f = c.fsdp_config
        assert f["fsdp_version"] == 2
        assert f["fsdp_reshard_after_forward"] == (p.zero == 3)
        assert f["fsdp_offload_params"] == (p.offload == "params")
        assert f["fsdp_activation_checkpointing"] == (p.recompute == "full")
    assert f"--per_device_train_batch_size {p.mbs} --gradient_accumulation_steps {p.grad_accum}" in ex.launch


def test_run_config_loads_in_shardwise_run(tmp_path):
    """shardwise's own run TOML, read by the run tier's loader: the same Plan and ModelSpec."""
    from shardwise.run import config

    j = job("tiny-llama", gpus=4, tp=2, zero=3, mbs=2, gbs=8, seq=64, sp=True, recompute="selective", precision="fp32")
    j = type(j)(j.model.scaled(layers=6), j.plan, j.cluster, "tiny-llama")
    ex = export("shardwise", j)
    (tmp_path / ex.filename).write_text(ex.text)
    c = config.load(str(tmp_path / ex.filename), world=4)
    assert c.plan == j.plan
    assert dims(c.model) == dims(j.model)
    assert "layers = 6" in ex.text and 'preset = "tiny-llama"' in ex.text


@pytest.mark.parametrize(
    "fmt, plan, gpus",
    [
        (
            "torchtitan",
            dict(
                tp=2,
                pp=2,
                zero=3,
                sp=True,
                mbs=2,
                gbs=64,
                schedule="interleaved",
                vpp=2,
                recompute="selective-op",
                precision="fp8-tensorwise",
                compile=True,
            ),
            16,
        ),
        (
            "megatron",
            dict(tp=4, pp=2, zero=1, sp=True, mbs=1, gbs=128, schedule="interleaved", vpp=2, recompute="full"),
            64,
        ),
        ("slurm", dict(tp=2, zero=3, sp=True, mbs=1, gbs=32), 16),
    ],
)
def test_export_matches_its_golden_file(fmt, plan, gpus):
    """Golden files: tests/golden/<format>.*; their header comments cite where each field is defined."""
    ex = export(fmt, job(gpus=gpus, **plan))
    golden = next(GOLDEN.glob(f"{fmt}.*"))
    body = "".join(line for line in golden.read_text().splitlines(keepends=True) if not line.startswith("##"))
    assert ex.text == body


def test_slurm_script_is_valid_bash(tmp_path):
    ex = export("slurm", job(gpus=16, zero=3))
    (tmp_path / "s.sbatch").write_text(ex.text)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sbatch")]).returncode == 0
    assert "#SBATCH --nodes=2" in ex.text and "--nproc-per-node 8" in ex.text


@pytest.mark.parametrize(
    "fmt, plan, words",
    [
        ("megatron", dict(zero=3), "Megatron-LM's distributed optimizer shards optimizer states only (ZeRO-1)"),
        ("megatron", dict(pp=2, schedule="gpipe", gbs=64), "not GPipe"),
        ("deepspeed", dict(pp=2, gbs=64), "PipelineModule"),
        ("deepspeed", dict(tp=2, zero=3), "AutoTP training runs with ZeRO 0-2"),
        ("torchtitan", dict(zero=1), "torchtitan has no ZeRO-1"),
        ("torchtitan", dict(tp=2, zero=3), "add --sp"),
        ("accelerate", dict(tp=2, zero=3, sp=True), "data parallelism (DDP or FSDP2) only"),
        ("accelerate", dict(zero=3, recompute="selective"), "whole transformer layers"),
        ("shardwise", dict(zero=3, offload="optimizer"), "optimizer-only offload has no PyTorch engine"),
    ],
)
def test_what_a_framework_cannot_express_is_refused_in_one_line(fmt, plan, words):
    with pytest.raises(ShardwiseError) as e:
        export(fmt, job(gpus=16, **plan))
    msg = str(e.value)
    assert msg.startswith(f"--export {fmt}: ") and words in msg and "\n" not in msg


def test_torchtitan_refuses_a_model_it_has_no_flavor_for():
    with pytest.raises(ShardwiseError, match="llama3 8B, 70B, 405B"):
        export("torchtitan", job("qwen2.5-7b", gpus=8, zero=3))


def test_every_format_is_tested_here():
    assert set(FORMATS) == {"torchtitan", "megatron", "deepspeed", "accelerate", "slurm", "shardwise"}


# ---- FP8 and torch.compile in each framework's own terms -----------------------------------------
def test_fp8_and_compile_map_to_each_framework():
    fp8 = dict(zero=3, gbs=16, compile=True)
    tt = tomllib.loads(export("torchtitan", job(gpus=16, precision="fp8-rowwise", **fp8)).text)
    assert tt["model"]["converters"] == ["quantize.linear.float8"]
    assert tt["quantize"]["linear"]["float8"] == {"recipe_name": "rowwise", "filter_fqns": ["output"]}
    assert tt["compile"] == {"enable": True, "components": ["model", "loss"]}
    assert (tt["training"]["dtype"], tt["training"]["mixed_precision_param"]) == ("float32", "bfloat16")
    mg = export("megatron", job(gpus=16, precision="fp8-tensorwise", zero=1, gbs=16)).text
    assert "--bf16" in mg and "--fp8-format hybrid" in mg and "--fp8-recipe tensorwise" in mg
    acc = yaml.safe_load(export("accelerate", job(gpus=16, precision="fp8-tensorwise", **fp8)).text)
    assert acc["mixed_precision"] == "fp8" and acc["fp8_config"] == {
        "backend": "AO",
        "enable_fsdp_float8_all_gather": True,
    }
    assert (
        acc["dynamo_config"]["dynamo_backend"] == "INDUCTOR" and acc["dynamo_config"]["dynamo_use_regional_compilation"]
    )


@pytest.mark.parametrize(
    "fmt, plan, words",
    [
        ("megatron", dict(zero=1, precision="fp8-rowwise"), "no rowwise scaling; use --precision fp8-tensorwise"),
        ("megatron", dict(zero=1, compile=True), "Megatron-LM has no torch.compile flag"),
        ("deepspeed", dict(zero=3, compile=True), "engine.compile()"),
        ("accelerate", dict(zero=3, precision="fp8-rowwise"), "AORecipeKwargs"),
    ],
)
def test_fp8_and_compile_a_framework_cannot_hold_are_refused(fmt, plan, words):
    with pytest.raises(ShardwiseError, match=re.escape(words)):
        export(fmt, job(gpus=16, gbs=16, **plan))
