"""torchtitan job TOML (torchtitan 0.2, `torchtitan/config/job_config.py`: the JobConfig dataclasses
whose sections and field names the file uses; `--job.config_file` reads it).

Each field below cites the JobConfig class that defines it. torchtitan's batch is per data-parallel
rank (`training.local_batch_size`); its gradient accumulation is global_batch_size / (local * dp)
(torchtitan/train.py), and with pipelining the local batch is split into micro-batches of
`parallelism.pipeline_parallel_microbatch_size` (torchtitan/distributed/pipeline_parallel.py).
"""

from __future__ import annotations

import tomllib

from shardwise.export.job import Export, Imported, Job, bad_file, refused, toml_text
from shardwise.spec.fp8 import RECIPES, base_precision, fp8_all_gather, is_fp8
from shardwise.spec.plan import MULTI_STAGE, recompute_every, recompute_kind
from shardwise.spec.presets import preset, resolve_name

FMT = "torchtitan"
# torchtitan/models/llama3/__init__.py: llama3_configs (the flavors its trainer can build)
FLAVORS = {"llama-3.1-8b": ("llama3", "8B"), "llama-3.1-70b": ("llama3", "70B"), "llama-3.1-405b": ("llama3", "405B")}
# torch.distributed.pipelining.schedules.get_schedule_class names, which torchtitan passes through
SCHEDULES = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved": "Interleaved1F1B",
    "interleaved-zb": "InterleavedZeroBubble",
    "zbv": "ZBVZeroBubble",
    "dualpipev": "DualPipeV",
}
# Training.mixed_precision_param / Training.dtype: Literal["bfloat16", "float32"]
PRECISION = {"bf16-mixed": ("float32", "bfloat16"), "fp32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16")}
OPTIMIZERS = {"adamw": "AdamW"}  # torchtitan/components/optimizer.py: {"Adam", "AdamW"}
# FP8 (torchtitan/config/job_config.py: Model.converters, and JobConfig.quantize -> Quantize.linear
# -> QuantizedLinear.float8 -> Float8Linear: enable_fsdp_float8_all_gather,
# precompute_float8_dynamic_scale_for_fsdp, recipe_name "tensorwise" | "rowwise" | "rowwise_with_gw_hp"
# | None = tensorwise, filter_fqns): torchao's float8 training of every Linear but those filtered out
FLOAT8 = "quantize.linear.float8"  # the converter's name and its table
FLOAT8_LEGACY = "float8"  # the converter's name in older torchtitan ([float8] table)
# shardwise converts the blocks' linears only (spec/fp8.py): the output layer stays bf16
FLOAT8_FILTER = ["output"]


def flavor(job: Job) -> tuple[str, str] | None:
    name = resolve_name(job.model_ref) if job.model_ref else None
    if name in FLAVORS and preset(name) == job.model:
        return FLAVORS[name]
    return None


def refuse(job: Job) -> str | None:
    p = job.plan
    if flavor(job) is None:
        return (
            f"torchtitan builds only its registered flavors (llama3 8B, 70B, 405B: torchtitan/models/llama3); "
            f"{job.model.name} is not one of them: add it there, or export to another framework"
        )
    if p.zero == 1:
        return "torchtitan has no ZeRO-1 (it replicates with DDP or shards with FSDP2); use --zero 0, 2 or 3"
    if p.cp > 1 and p.zero < 2:  # ParallelDims.fsdp_enabled: dp_shard > 1 or cp > 1
        return "with cp > 1 torchtitan shards with FSDP2 over dp_shard*cp (its dp_shard_cp mesh); use --zero 3 (or 2)"
    if p.zero >= 2 and p.dp * p.cp == 1:
        return "with dp 1 torchtitan applies no FSDP (ParallelDims: FSDP needs data_parallel_shard_degree > 1); use --zero 0"
    if p.tp > 1 and not p.sp:
        return "torchtitan's tensor parallelism always shards the sequence between blocks; add --sp"
    if base_precision(p.precision) not in PRECISION:
        return f"torchtitan trains in bfloat16 or float32 (Training.mixed_precision_param), not {p.precision}"
    if p.optimizer not in OPTIMIZERS:
        return f"torchtitan's optimizers are Adam and AdamW, not {p.optimizer}; use --optimizer adamw"
    if p.offload == "optimizer":
        return "torchtitan offloads parameters, gradients and optimizer together (Training.enable_cpu_offload); use --offload params"
    if p.attention != "flash":
        return "torchtitan's llama3 runs SDPA's fused attention kernels; drop --attention math"
    if p.recompute == "selective":
        return "torchtitan has no attention-core-only recompute (Megatron's selective); use --recompute selective-op"
    return None


def _ac(recompute: str) -> dict:
    """ActivationCheckpoint (torchtitan/distributed/activation_checkpoint.py): mode none | full |
    selective, and for selective the option "op" (per-operator: shardwise's selective-op) or an
    integer k (every k-th block: shardwise's selective-layer:k)."""
    if recompute_kind(recompute) == "selective-layer":
        return {"mode": "selective", "selective_ac_option": str(recompute_every(recompute))}
    if recompute == "selective-op":
        return {"mode": "selective", "selective_ac_option": "op"}
    return {"mode": recompute}


def _recompute(path, ac: dict) -> str:
    """The inverse of _ac."""
    mode = ac.get("mode", "selective")
    if mode in ("none", "full"):
        return mode
    if mode != "selective":
        raise bad_file(
            path, f"activation_checkpoint.mode {mode!r} has no shardwise recompute; use none, selective or full"
        )
    option = str(ac.get("selective_ac_option", "2"))
    if option == "op":
        return "selective-op"
    if not option.isdigit() or int(option) < 1:
        raise bad_file(path, f"activation_checkpoint.selective_ac_option {option!r}: give 'op' or a positive integer")
    return "full" if int(option) == 1 else f"selective-layer:{option}"


def _float8(p) -> dict:
    """Float8Linear: tensorwise is its default (recipe_name unset), with FSDP2's FP8 all-gather
    and the once-a-step scale precompute where shardwise models them (spec/fp8.fp8_all_gather);
    rowwise by its recipe name (torchao allows no FP8 all-gather there)."""
    if RECIPES[p.precision] == "tensorwise":
        ag = fp8_all_gather(p)
        return {
            "enable_fsdp_float8_all_gather": ag,
            "precompute_float8_dynamic_scale_for_fsdp": ag,
            "filter_fqns": FLOAT8_FILTER,
        }
    return {"recipe_name": RECIPES[p.precision], "filter_fqns": FLOAT8_FILTER}


def _read_float8(path, d: dict, mdl: dict, prec: str) -> tuple[str, list[str]]:
    """The precision a file's float8 converter (if any) gives over its training dtype, and what of
    its float8 table shardwise does not model."""
    conv = mdl.get("converters", [])
    conv = [c.strip() for c in conv.split(",")] if isinstance(conv, str) else list(conv)
    if FLOAT8 not in conv and FLOAT8_LEGACY not in conv:
        return prec, []
    if prec != "bf16-mixed":
        raise bad_file(path, f"the float8 converter over {prec}: shardwise models FP8 over bf16-mixed only")
    f8 = d.get("quantize", {}).get("linear", {}).get("float8", d.get("float8", {}))
    recipe = f8.get("recipe_name") or "tensorwise"
    back = {v: k for k, v in RECIPES.items()}
    if recipe not in back:
        raise bad_file(path, f"float8 recipe_name {recipe!r} has no shardwise precision; use tensorwise or rowwise")
    ignored = (
        [f"float8.filter_fqns = {f8['filter_fqns']}"] if f8.get("filter_fqns", FLOAT8_FILTER) != FLOAT8_FILTER else []
    )
    return back[recipe], ignored


def render(job: Job) -> Export:
    if why := refuse(job):
        raise refused(FMT, why)
    p = job.plan
    name, flav = flavor(job)
    dtype, param = PRECISION[base_precision(p.precision)]
    local = p.mbs * p.grad_accum if p.pp > 1 else p.mbs
    parallelism = {
        # Parallelism: replicate = DDP, shard = FSDP2; ZeRO-2 is FSDP2 that keeps parameters after forward
        "data_parallel_replicate_degree": p.dp if p.zero == 0 else 1,
        "data_parallel_shard_degree": p.dp if p.zero >= 2 else 1,
        "fsdp_reshard_after_forward": "never" if p.zero == 2 else "default",
        "tensor_parallel_degree": p.tp,
        "pipeline_parallel_degree": p.pp,
        "pipeline_parallel_schedule": SCHEDULES[p.schedule],
        "pipeline_parallel_microbatch_size": p.mbs,
    }
    if p.cp > 1:  # torchtitan's rotate methods are torch's set_rotate_method names: allgather, alltoall
        parallelism |= {"context_parallel_degree": p.cp, "context_parallel_rotate_method": p.cp_rotate}
    if p.pp > 1 and p.vpp > 1:  # stages per rank follow from the layers in each stage
        parallelism["pipeline_parallel_layers_per_stage"] = job.model.layers // (p.pp * p.vpp)
    tables = {
        "job": {"description": f"{job.model.name}: {p.short()} (from shardwise)"},
        "model": {"name": name, "flavor": flav} | ({"converters": [FLOAT8]} if is_fp8(p.precision) else {}),
        "optimizer": {"name": OPTIMIZERS[p.optimizer]},  # Optimizer
        "training": {  # Training
            "local_batch_size": local,
            "global_batch_size": p.gbs,
            "seq_len": p.seq,
            "dtype": dtype,
            "mixed_precision_param": param,
            "enable_cpu_offload": p.offload == "params",
        },
        "parallelism": parallelism,
        "activation_checkpoint": _ac(p.recompute),
        # Compile: "model" compiles each transformer block (torchtitan/models/llama3/infra/parallelize.py,
        # apply_compile), what shardwise's --compile is; "loss" its cross-entropy
        "compile": {"enable": True, "components": ["model", "loss"]} if p.compile else {"enable": False},
    }
    if is_fp8(p.precision):
        tables[FLOAT8] = _float8(p)
    nodes, per = job.cluster.nodes, job.cluster.node_size
    launch = (
        f"torchrun --nnodes {nodes} --nproc-per-node {per} --rdzv-backend c10d --rdzv-endpoint HEAD_NODE:29500 "
        "-m torchtitan.train --job.config_file torchtitan.toml"
    )
    return Export(
        toml_text(tables, "# torchtitan job config (torchtitan/config/job_config.py), written by shardwise"),
        "torchtitan.toml",
        launch,
    )


def read(path: str, text: str) -> Imported:
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise bad_file(path, f"not valid TOML ({e})") from None
    par, tr = d.get("parallelism", {}), d.get("training", {})
    ac, opt, mdl = d.get("activation_checkpoint", {}), d.get("optimizer", {}), d.get("model", {})
    # JobConfig's defaults where the file is silent
    rep, shard = par.get("data_parallel_replicate_degree", 1), par.get("data_parallel_shard_degree", -1)
    tp, pp = par.get("tensor_parallel_degree", 1), par.get("pipeline_parallel_degree", 1)
    if rep > 1 and shard > 1:
        raise bad_file(path, "HSDP (replicate and shard both > 1) has no shardwise plan; set one of them to 1")
    cp = par.get("context_parallel_degree", 1)
    plan: dict = {"tp": tp, "pp": pp, "sp": tp > 1}
    if cp > 1:
        plan |= {"cp": cp, "cp_rotate": par.get("context_parallel_rotate_method", "allgather")}
    if shard == -1:  # torchtitan: -1 = every GPU left after the other degrees
        plan["zero"] = 0 if rep > 1 and cp == 1 else 3
    else:
        plan["zero"] = 0 if shard == 1 and cp == 1 else 3
        plan["dp"] = max(rep, shard)
    if plan["zero"] == 3 and par.get("fsdp_reshard_after_forward", "default") == "never":
        plan["zero"] = 2
    if pp > 1:
        sched = {v: k for k, v in SCHEDULES.items()}.get(par.get("pipeline_parallel_schedule", "1F1B"))
        if sched is None:
            raise bad_file(
                path,
                f"pipeline schedule {par['pipeline_parallel_schedule']!r} has no shardwise plan; use one of {', '.join(SCHEDULES.values())}",
            )
        plan["schedule"] = sched
        plan["mbs"] = par.get("pipeline_parallel_microbatch_size", 1)
        if "pipeline_parallel_layers_per_stage" in par and sched in MULTI_STAGE:
            plan["vpp"] = -1  # resolved with the model below: layers / (pp * layers_per_stage)
    else:
        plan["mbs"] = tr.get("local_batch_size", 8)
    if "global_batch_size" in tr and tr["global_batch_size"] > 0:
        plan["gbs"] = tr["global_batch_size"]
    plan["seq"] = tr.get("seq_len", 2048)
    dtype, param = tr.get("dtype", "float32"), tr.get("mixed_precision_param", "bfloat16")
    prec = {v: k for k, v in PRECISION.items()}.get((dtype, param))
    if prec is None:
        raise bad_file(path, f"training dtype {dtype} with parameters in {param} has no shardwise precision")
    plan["precision"], ignored = _read_float8(path, d, mdl, prec)
    if tr.get("enable_cpu_offload"):
        plan["offload"] = "params"
    plan["recompute"] = _recompute(path, ac)
    if opt.get("name", "AdamW") not in ("AdamW", "Adam"):
        raise bad_file(path, f"optimizer {opt['name']!r}: shardwise models torchtitan's Adam and AdamW")
    model = ref = None
    key = (mdl.get("name", "llama3"), mdl.get("flavor", "debugmodel"))
    for name, fl in FLAVORS.items():
        if fl == key:
            model, ref = preset(name), name
    if model is not None and plan.get("vpp") == -1:
        plan["vpp"] = model.layers // (pp * par["pipeline_parallel_layers_per_stage"])
    elif plan.get("vpp") == -1:
        del plan["vpp"]
    comp = d.get("compile", {})
    if comp.get("enable"):  # the blocks are compiled where "model" is among the components
        plan["compile"] = "model" in comp.get("components", ["model", "loss"])
    return Imported(FMT, plan, model, ref, None, ignored=ignored)
