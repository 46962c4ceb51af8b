"""DeepSpeed `ds_config.json` (keys as deepspeed/runtime/config.py and
deepspeed/runtime/zero/config.py read them; https://www.deepspeed.ai/docs/config-json/) and the
`deepspeed` launcher line.

DeepSpeed checks train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps
* data-parallel size (DeepSpeedConfig._batch_assertion). Tensor parallelism is its AutoTP training
(`tensor_parallel.autotp_size`, DeepSpeed >= 0.16.4), which runs with ZeRO 0-2; pipelining needs the
model rewritten as a PipelineModule, which no config can ask for.
"""

from __future__ import annotations

import json

from shardwise.export.job import Export, Imported, Job, bad_file, refused

FMT = "deepspeed"
BUCKET = 500_000_000  # reduce_bucket_size / allgather_bucket_size defaults (zero/config.py), in elements
OPTIMIZERS = {"adamw": "AdamW", "sgd": "SGD", "adam8bit": None, "adafactor": None}


def refuse(job: Job) -> str | None:
    p = job.plan
    if p.ep > 1:
        return (
            "DeepSpeed's config has no expert parallelism for this model (it lives in its MoE layer's code); use --ep 1"
        )
    if p.pp > 1:
        return (
            "DeepSpeed pipelines only a model rewritten as a PipelineModule, which a config cannot ask for; use --pp 1"
        )
    if p.cp > 1:
        return "DeepSpeed's config has no ring or all-gather context parallelism (Ulysses splits heads, another scheme); use --cp 1"
    if p.tp > 1 and p.zero == 3:
        return "DeepSpeed's AutoTP training runs with ZeRO 0-2, not ZeRO-3; use --zero 2 or --tp 1"
    if p.sp:
        return "DeepSpeed's AutoTP has no sequence parallelism between blocks; drop --sp"
    if p.offload == "params" and p.zero != 3:
        return "DeepSpeed offloads parameters only under ZeRO-3 (zero_optimization.offload_param); use --zero 3"
    if p.offload == "optimizer" and p.zero == 0:
        return (
            "DeepSpeed offloads the optimizer only under ZeRO 1-3 (zero_optimization.offload_optimizer); use --zero 1"
        )
    if OPTIMIZERS[p.optimizer] is None:
        return f"DeepSpeed's built-in optimizers have no {p.optimizer}; use adamw or sgd"
    if p.recompute not in ("none", "full"):
        return "DeepSpeed checkpoints whole blocks the model code wraps; its config cannot ask for selective recompute"
    if p.attention != "flash":
        return "the attention kernel is the model code's, not DeepSpeed's config; export with --attention flash"
    if p.precision.startswith("fp8"):
        return "DeepSpeed's config has no FP8 training (the model code's, through torchao); export with --precision bf16-mixed"
    if p.precision == "bf16":
        return "DeepSpeed's bf16 keeps fp32 master weights (mixed precision); use --precision bf16-mixed"
    if p.compile:  # deepspeed/compile/config.py CompileConfig: deepcompile, offloads, passes; no switch
        return (
            "DeepSpeed's config cannot turn torch.compile on (the training script calls engine.compile(); its "
            "compile section tunes DeepCompile): drop --compile and compile in your script"
        )
    return None


def config(job: Job) -> dict:
    p = job.plan
    zero: dict = {"stage": p.zero}
    if p.zero >= 1:
        zero |= {"reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET, "overlap_comm": True}
    if p.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if p.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    d = {
        "train_batch_size": p.gbs,
        "train_micro_batch_size_per_gpu": p.mbs,
        "gradient_accumulation_steps": p.grad_accum,
        "bf16": {"enabled": p.precision == "bf16-mixed"},
        "fp16": {"enabled": p.precision == "fp16-mixed"},
        "zero_optimization": zero,
        "optimizer": {
            "type": OPTIMIZERS[p.optimizer]
        },  # its learning rate and betas are the training's, not the plan's
        "gradient_clipping": 1.0,
    }
    if p.tp > 1:
        d["tensor_parallel"] = {"autotp_size": p.tp}
    # activation checkpointing itself is the model code's call (deepspeed.checkpointing.checkpoint);
    # this section only configures it
    if p.recompute != "none":
        d["activation_checkpointing"] = {"partition_activations": p.tp > 1, "contiguous_memory_optimization": False}
    return d


def render(job: Job) -> Export:
    if why := refuse(job):
        raise refused(FMT, why)
    cl = job.cluster
    launch = f"deepspeed --num_nodes {cl.nodes} --num_gpus {cl.node_size}"
    if cl.nodes > 1:
        launch += " --hostfile hostfile"
    launch += " train.py --deepspeed --deepspeed_config ds_config.json"
    return Export(json.dumps(config(job), indent=2) + "\n", "ds_config.json", launch)


def read(path: str, text: str) -> Imported:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_file(path, f"not valid JSON ({e})") from None
    if not isinstance(d, dict) or not (
        {"train_batch_size", "train_micro_batch_size_per_gpu", "zero_optimization"} & d.keys()
    ):
        raise bad_file(
            path, "not a DeepSpeed config (no train_batch_size, train_micro_batch_size_per_gpu or zero_optimization)"
        )
    zero = d.get("zero_optimization", {}) or {}
    plan: dict = {"zero": int(zero.get("stage", 0))}
    for key, f in (("train_micro_batch_size_per_gpu", "mbs"), ("train_batch_size", "gbs")):
        if isinstance(d.get(key), int):
            plan[f] = d[key]
    if "auto" in (d.get("train_batch_size"), d.get("train_micro_batch_size_per_gpu")):
        raise bad_file(
            path, "batch sizes are 'auto' (the HF Trainer fills them in); write the numbers, or pass --mbs and --gbs"
        )
    ga = d.get("gradient_accumulation_steps")
    if isinstance(ga, int) and ga > 0 and {"mbs", "gbs"} <= plan.keys() and plan["gbs"] % (plan["mbs"] * ga) == 0:
        plan["dp"] = plan["gbs"] // (plan["mbs"] * ga)  # the batch assertion's data-parallel size
    tp = (d.get("tensor_parallel") or {}).get("autotp_size", 0)
    if tp > 1:
        plan["tp"] = tp
    if (d.get("bf16") or {}).get("enabled"):
        plan["precision"] = "bf16-mixed"
    elif (d.get("fp16") or {}).get("enabled"):
        plan["precision"] = "fp16-mixed"
    else:
        plan["precision"] = "fp32"
    if (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme"):
        plan["offload"] = "params"
    elif (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"):
        plan["offload"] = "optimizer"
    name = (d.get("optimizer") or {}).get("type", "AdamW")
    opt = {"adamw": "adamw", "adam": "adamw", "sgd": "sgd"}.get(str(name).lower())
    if opt is None:
        raise bad_file(path, f"optimizer {name!r} has no shardwise model; use AdamW or SGD")
    plan["optimizer"] = opt
    if "activation_checkpointing" in d:
        plan["recompute"] = "full"
    return Imported(FMT, plan)
