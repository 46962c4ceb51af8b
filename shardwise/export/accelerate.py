"""Hugging Face accelerate config for FSDP2 (the YAML `accelerate config` writes and
`accelerate launch --config_file` reads: accelerate/commands/config/config_args.py ClusterConfig;
FSDP keys as accelerate/utils/dataclasses.py FullyShardedDataParallelPlugin and
https://huggingface.co/docs/accelerate/usage_guides/fsdp name them), and axolotl's YAML read back.

The batch, sequence and optimizer are the training script's: the launch line passes them as the
Hugging Face Trainer's arguments (per_device_train_batch_size, gradient_accumulation_steps).
"""

from __future__ import annotations

import contextlib

import yaml

from shardwise.errors import ShardwiseError
from shardwise.export.job import Export, Imported, Job, bad_file, refused
from shardwise.spec.fp8 import fp8_all_gather
from shardwise.spec.presets import load_model

FMT = "accelerate"
MIXED = {"bf16-mixed": "bf16", "fp16-mixed": "fp16", "fp32": "no"}  # ClusterConfig.mixed_precision
# mixed_precision "fp8" with fp8_config backend "AO" (accelerate/commands/config/cluster.py; utils/
# dataclasses.py AORecipeKwargs): torchao's default Float8LinearConfig, i.e. tensorwise scaling, with
# enable_fsdp_float8_all_gather from the config; a rowwise recipe is an AORecipeKwargs in the script
FP8 = "fp8-tensorwise"
# dynamo_config (cluster.py, the "dynamo_" keys; TorchDynamoPlugin): inductor, one graph per region,
# regional compilation = each repeated block compiled on its own, what --compile does
DYNAMO = {"dynamo_backend": "INDUCTOR", "dynamo_use_fullgraph": True, "dynamo_use_regional_compilation": True}


def refuse(job: Job) -> str | None:
    p = job.plan
    if p.ep > 1:
        return (
            "this accelerate config holds data parallelism only, not expert parallelism; use --ep 1, or export megatron"
        )
    if p.tp > 1 or p.pp > 1 or p.cp > 1:
        return "this accelerate config holds data parallelism (DDP or FSDP2) only; use --tp 1 --pp 1 --cp 1, or export torchtitan or megatron"
    if p.zero == 1:
        return "accelerate has no ZeRO-1 with FSDP2 (DDP or fully sharded); use --zero 0, 2 or 3"
    if p.offload == "optimizer" or (p.offload == "params" and p.zero < 2):
        return "accelerate's FSDP2 offloads parameters, gradients and optimizer together (fsdp_offload_params); use --offload params with --zero 2 or 3"
    if p.recompute not in ("none", "full"):
        return "accelerate checkpoints whole transformer layers (fsdp_activation_checkpointing); use --recompute full or none"
    if p.precision == "fp8-rowwise":
        return (
            "accelerate's config builds torchao's default (tensorwise) float8 recipe; rowwise needs AORecipeKwargs "
            "in the training script: use --precision fp8-tensorwise"
        )
    if p.precision not in MIXED and p.precision != FP8:
        return f"accelerate's mixed_precision is bf16, fp16, fp8 or no, not pure {p.precision}; use bf16-mixed"
    if p.optimizer != "adamw" or p.attention != "flash":
        return "the optimizer and attention kernel are the training script's, not accelerate's; export with adamw and flash"
    return None


def render(job: Job) -> Export:
    if why := refuse(job):
        raise refused(FMT, why)
    p, cl = job.plan, job.cluster
    d: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if p.zero >= 2 else "MULTI_GPU",
        "mixed_precision": "fp8" if p.precision == FP8 else MIXED[p.precision],
        "num_machines": cl.nodes,
        "num_processes": cl.gpus,  # all processes, over every machine
        "machine_rank": 0,
        "main_training_function": "main",
        "rdzv_backend": "c10d" if cl.nodes > 1 else "static",
        "same_network": True,
        "use_cpu": False,
    }
    if cl.nodes > 1:
        d |= {"main_process_ip": "HEAD_NODE", "main_process_port": 29500}
    if p.precision == FP8:
        d["fp8_config"] = {"backend": "AO", "enable_fsdp_float8_all_gather": fp8_all_gather(p)}
    if p.compile:
        d["dynamo_config"] = dict(DYNAMO)
    if p.zero >= 2:
        d["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": p.zero == 3,  # False: ZeRO-2, parameters kept after forward
            "fsdp_offload_params": p.offload == "params",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_activation_checkpointing": p.recompute == "full",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
        }
    text = "# accelerate config (FSDP2), written by shardwise: " + p.short() + "\n" + yaml.safe_dump(d, sort_keys=False)
    launch = (
        f"accelerate launch --config_file accelerate.yaml --machine_rank NODE_RANK train.py "
        f"--per_device_train_batch_size {p.mbs} --gradient_accumulation_steps {p.grad_accum} --max_seq_length {p.seq}"
    )
    if p.recompute == "full" and p.zero < 2:
        launch += " --gradient_checkpointing"
    return Export(text, "accelerate.yaml", launch)


def _yaml(path: str, text: str) -> dict:
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise bad_file(path, f"not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise bad_file(path, "expected a mapping of settings at the top level")
    return d


def read(path: str, text: str) -> Imported:
    d = _yaml(path, text)
    if "base_model" in d or "micro_batch_size" in d:
        return read_axolotl(path, d)
    if "distributed_type" not in d:
        raise bad_file(path, "not an accelerate config (no distributed_type) nor an axolotl one (no base_model)")
    plan: dict = {}
    dt = d["distributed_type"]
    fsdp = d.get("fsdp_config") or {}
    if dt == "FSDP":
        if fsdp.get("fsdp_version", 1) != 2:
            raise bad_file(path, "FSDP1 (fsdp_version 1) has no shardwise plan; set fsdp_version: 2")
        plan["zero"] = (
            3 if fsdp.get("fsdp_reshard_after_forward", True) not in (False, "NO_SHARD", "SHARD_GRAD_OP") else 2
        )
        if fsdp.get("fsdp_offload_params"):
            plan["offload"] = "params"
        if fsdp.get("fsdp_activation_checkpointing"):
            plan["recompute"] = "full"
    elif dt in ("MULTI_GPU", "NO"):
        plan["zero"] = 0
    else:
        raise bad_file(path, f"distributed_type {dt} has no shardwise plan here; use FSDP (version 2) or MULTI_GPU")
    mp = d.get("mixed_precision", "no")
    prec = {v: k for k, v in MIXED.items()}.get(mp)
    if mp == "fp8" and (d.get("fp8_config") or {}).get("backend", "AO") == "AO":
        prec = FP8
    if prec is None:
        raise bad_file(path, f"mixed_precision {mp!r} has no shardwise precision; use bf16, fp16, no or fp8 (AO)")
    plan["precision"] = prec
    if (d.get("dynamo_config") or {}).get("dynamo_backend", "NO").upper() == "INDUCTOR":
        plan["compile"] = True
    n = d.get("num_processes")
    return Imported(FMT, plan, None, None, n if isinstance(n, int) and n > 0 else None)


def read_axolotl(path: str, d: dict) -> Imported:
    """axolotl's YAML (https://docs.axolotl.ai/docs/config-reference.html): base_model,
    micro_batch_size, gradient_accumulation_steps, sequence_len, bf16/fp16, gradient_checkpointing,
    fsdp_config (FSDP2 with fsdp_version 2) or deepspeed (a DeepSpeed JSON's path)."""
    plan: dict = {}
    for key, f in (("micro_batch_size", "mbs"), ("sequence_len", "seq")):
        if key in d:
            if not isinstance(d[key], int):
                raise bad_file(path, f"{key} must be an integer, got {d[key]!r}")
            plan[f] = d[key]
    ga = d.get("gradient_accumulation_steps", 1)
    if not isinstance(ga, int) or ga < 1:
        raise bad_file(path, f"gradient_accumulation_steps must be a positive integer, got {ga!r}")
    plan["precision"] = "bf16-mixed" if d.get("bf16") in (True, "auto") else "fp16-mixed" if d.get("fp16") else "fp32"
    if d.get("gradient_checkpointing"):
        plan["recompute"] = "full"
    fsdp = d.get("fsdp_config") or {}
    if fsdp:
        plan["zero"] = 3 if fsdp.get("reshard_after_forward", fsdp.get("fsdp_reshard_after_forward", True)) else 2
        if fsdp.get("offload_params", fsdp.get("fsdp_offload_params")):
            plan["offload"] = "params"
    elif d.get("deepspeed"):
        raise bad_file(path, f"training runs through DeepSpeed: import its config instead (--from {d['deepspeed']})")
    else:
        plan["zero"] = 0
    model = None
    with contextlib.suppress(ShardwiseError):  # a Hugging Face id the catalog knows; else the user gives the model
        model = load_model(d["base_model"]) if isinstance(d.get("base_model"), str) else None
    return Imported("axolotl", plan, model, d.get("base_model") if model else None, grad_accum=ga)
