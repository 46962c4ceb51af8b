"""Megatron-LM `pretrain_gpt.py` arguments (megatron/training/arguments.py: the flag names, each
added in the _add_*_args function named beside it), and a file of such flags read back.

Megatron derives data parallelism from the world size: dp = world / (tp * pp). Its distributed
optimizer (--use-distributed-optimizer) shards the optimizer states and main gradients, ZeRO-1
in shardwise's terms (MegatronProfile); pretrain_gpt has no ZeRO-2/3.
"""

from __future__ import annotations

import shlex

from shardwise.export.job import Export, Imported, Job, bad_file, refused
from shardwise.spec.model import ModelSpec

FMT = "megatron"
INT_FLAGS = {
    "tensor-model-parallel-size", "pipeline-model-parallel-size", "context-parallel-size", "num-layers-per-virtual-pipeline-stage",
    "micro-batch-size", "global-batch-size", "seq-length", "num-layers", "hidden-size", "num-attention-heads",
    "num-query-groups", "ffn-hidden-size", "max-position-embeddings", "num-experts", "moe-router-topk", "vocab-size",
    "expert-model-parallel-size",
}  # fmt: skip
# --cp-comm-type (megatron/training/arguments.py, default p2p): p2p passes K/V around the ring, one
# neighbour per step (torch's alltoall rotate); allgather gathers them once (a2a is Ulysses-style
# head scattering, another scheme)
CP_COMM = {"alltoall": "p2p", "allgather": "allgather"}


def refuse(job: Job) -> str | None:
    p, m = job.plan, job.model
    if p.zero >= 2:
        return "Megatron-LM's distributed optimizer shards optimizer states only (ZeRO-1); use --zero 0 or 1"
    if p.pp > 1 and p.schedule not in ("1f1b", "interleaved"):
        name = "GPipe" if p.schedule == "gpipe" else p.schedule
        return f"Megatron-LM schedules pipelines as 1F1B or interleaved 1F1B, not {name}; use --schedule 1f1b or interleaved"
    if p.recompute not in ("none", "selective", "full"):
        return f"Megatron-LM has no {p.recompute} recompute; use --recompute none, selective or full"
    if p.offload != "none":
        return "pretrain_gpt.py offloads nothing to the CPU; drop --offload"
    if p.precision == "fp8-rowwise":  # its recipes: tensorwise, delayed, mxfp8, blockwise (1x128 / 128x128 tiles)
        return (
            "Megatron-LM's FP8 recipes (--fp8-recipe tensorwise, delayed, mxfp8, blockwise) have no rowwise "
            "scaling; use --precision fp8-tensorwise"
        )
    if p.compile:
        return "Megatron-LM has no torch.compile flag (its fused kernels are its own); drop --compile"
    if p.precision == "bf16":
        return "Megatron-LM keeps fp32 main parameters (bf16 is mixed precision there); use --precision bf16-mixed"
    if p.optimizer not in ("adamw", "sgd"):
        return f"Megatron-LM's optimizers are adam (decoupled weight decay, i.e. AdamW) and sgd, not {p.optimizer}"
    if p.cp > 1 and p.cp_rotate not in CP_COMM:
        return f"Megatron-LM's --cp-comm-type has no {p.cp_rotate}; use --cp-rotate allgather or alltoall"
    if p.sp and p.tp == 1:
        return "Megatron-LM's --sequence-parallel needs --tensor-model-parallel-size > 1"
    if m.norm not in ("rmsnorm", "layernorm") or m.positions not in ("rotary", "learned"):
        return f"{m.name}'s {m.norm} / {m.positions} positions have no Megatron-LM flag"
    return None


def flags(job: Job) -> list[str]:
    p, m = job.plan, job.model
    out = [
        # _add_distributed_args
        "--tensor-model-parallel-size", str(p.tp),
        "--pipeline-model-parallel-size", str(p.pp),
    ]  # fmt: skip
    if p.schedule == "interleaved" and p.pp > 1:
        out += ["--num-layers-per-virtual-pipeline-stage", str(m.layers // (p.pp * p.vpp))]
    if p.cp > 1:
        out += ["--context-parallel-size", str(p.cp), "--cp-comm-type", CP_COMM[p.cp_rotate]]
    if p.sp:
        out.append("--sequence-parallel")
    if p.zero == 1:
        out.append("--use-distributed-optimizer")
    # _add_training_args
    out += ["--micro-batch-size", str(p.mbs), "--global-batch-size", str(p.gbs)]
    if p.recompute == "selective":
        out += ["--recompute-granularity", "selective"]
    elif p.recompute == "full":
        out += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    out += ["--optimizer", "sgd" if p.optimizer == "sgd" else "adam"]
    # _add_mixed_precision_args
    out += {"bf16-mixed": ["--bf16"], "fp16-mixed": ["--fp16"], "fp32": [], "fp8-tensorwise": ["--bf16"]}[p.precision]
    if p.precision == "fp8-tensorwise":
        # _add_transformer_engine_args: Transformer Engine's current (per-tensor) scaling, e4m3 forward and
        # e5m2 gradients ("hybrid"), as torchao's tensorwise Float8LinearConfig casts them
        out += ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]
    # _add_transformer_engine_args / attention backend: fused (flash) or unfused (scores materialized)
    out += ["--attention-backend", "flash" if p.attention == "flash" else "unfused"]
    # _add_network_size_args
    out += [
        "--num-layers", str(m.layers),
        "--hidden-size", str(m.hidden),
        "--num-attention-heads", str(m.heads),
        "--ffn-hidden-size", str(m.ffn_hidden),
        "--seq-length", str(p.seq),
        "--max-position-embeddings", str(max(m.max_seq, p.seq)),
        "--normalization", "RMSNorm" if m.norm == "rmsnorm" else "LayerNorm",
        "--position-embedding-type", "rope" if m.positions == "rotary" else "learned_absolute",
    ]  # fmt: skip
    if m.kv_heads and m.kv_heads != m.heads:
        out += ["--group-query-attention", "--num-query-groups", str(m.kv_heads)]
    if m.ffn_kind == "swiglu":
        out.append("--swiglu")
    if not m.tied_embeddings:
        out.append("--untie-embeddings-and-output-weights")
    if not (m.qkv_bias or m.out_bias or m.mlp_bias):
        out.append("--disable-bias-linear")
    if m.experts:
        out += ["--num-experts", str(m.experts), "--moe-router-topk", str(m.top_k)]
    if job.plan.ep > 1:  # Megatron-LM's EP, like shardwise's, takes its ranks from data parallelism
        out += ["--expert-model-parallel-size", str(job.plan.ep)]
    if job.plan.capacity:
        out += ["--moe-expert-capacity-factor", f"{job.plan.capacity:g}", "--moe-pad-expert-input-to-capacity"]
    # _add_tokenizer_args: the vocabulary as the model has it (a NullTokenizer stands for the user's own)
    out += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(m.vocab)]
    return out


def render(job: Job) -> Export:
    if why := refuse(job):
        raise refused(FMT, why)
    cl = job.cluster
    head = [
        "torchrun",
        "--nnodes", str(cl.nodes),
        "--nproc-per-node", str(cl.node_size),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "HEAD_NODE:29500",
        "pretrain_gpt.py",
    ]  # fmt: skip
    argv = flags(job)
    pairs, i = [], 0
    while i < len(argv):  # one flag (and its value) a line, as Megatron's example scripts write them
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append(shlex.join(argv[i : i + 2]))
            i += 2
        else:
            pairs.append(argv[i])
            i += 1
    text = "#!/bin/bash\n# Megatron-LM pretrain_gpt.py, written by shardwise: " + job.plan.short() + "\n"
    text += " \\\n    ".join([shlex.join(head)] + pairs) + ' \\\n    "$@"  # data, tokenizer, checkpoint flags\n'
    return Export(text, "pretrain_gpt.sh", "bash pretrain_gpt.sh --data-path DATA")


def read(path: str, text: str) -> Imported:
    try:
        words = shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError as e:
        raise bad_file(path, f"not a list of shell words ({e})") from None
    vals: dict[str, str | bool] = {}
    i = 0
    nnodes = nproc = None
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            key, eq, val = w[2:].partition("=")
            if eq:
                vals[key] = val
            elif i + 1 < len(words) and not words[i + 1].startswith("--"):
                vals[key] = words[i + 1]
                i += 1
            else:
                vals[key] = True
        i += 1
    nnodes, nproc = vals.get("nnodes"), vals.get("nproc-per-node") or vals.get("nproc_per_node")

    def num(key, default=None):
        v = vals.get(key, default)
        if v is None:
            return None
        try:
            return int(v)
        except (TypeError, ValueError):
            raise bad_file(path, f"--{key} must be an integer, got {v!r}") from None

    for key in INT_FLAGS & vals.keys():  # every number read below, checked up front
        num(key)
    if "num-layers" not in vals and "tensor-model-parallel-size" not in vals:
        raise bad_file(path, "no Megatron-LM flags (--num-layers, --tensor-model-parallel-size, ...) found")
    tp, pp = num("tensor-model-parallel-size", 1), num("pipeline-model-parallel-size", 1)
    plan: dict = {"tp": tp, "pp": pp, "sp": bool(vals.get("sequence-parallel")), "mbs": num("micro-batch-size", 1)}
    if (cp := num("context-parallel-size")) and cp > 1:
        comm = vals.get("cp-comm-type", "p2p")
        rotate = {v: k for k, v in CP_COMM.items()}.get(comm)
        if rotate is None:
            raise bad_file(path, f"--cp-comm-type {comm} has no shardwise plan; use p2p or allgather")
        plan["cp"], plan["cp_rotate"] = cp, rotate
    plan["zero"] = 1 if vals.get("use-distributed-optimizer") else 0
    if (ep := num("expert-model-parallel-size")) is not None:
        plan["ep"] = ep
    if (g := num("global-batch-size")) is not None:
        plan["gbs"] = g
    if (s := num("seq-length")) is not None:
        plan["seq"] = s
    plan["recompute"] = {None: "none", "selective": "selective", "full": "full"}.get(
        vals.get("recompute-granularity"), "none"
    )
    plan["precision"] = "bf16-mixed" if vals.get("bf16") else "fp16-mixed" if vals.get("fp16") else "fp32"
    if vals.get("fp8-format"):
        recipe = vals.get("fp8-recipe", "delayed")
        if recipe != "tensorwise" or plan["precision"] != "bf16-mixed":
            raise bad_file(
                path,
                f"--fp8-recipe {recipe} over {plan['precision']}: shardwise models FP8 as per-tensor current scaling "
                "over bf16 (--bf16 --fp8-recipe tensorwise)",
            )
        plan["precision"] = "fp8-tensorwise"
    plan["optimizer"] = "sgd" if vals.get("optimizer") == "sgd" else "adamw"
    plan["attention"] = "math" if vals.get("attention-backend") == "unfused" else "flash"
    if pp > 1:
        plan["schedule"] = "1f1b"
    if (per := num("num-layers-per-virtual-pipeline-stage")) and pp > 1 and "num-layers" in vals:
        plan["schedule"], plan["vpp"] = "interleaved", num("num-layers") // (pp * per)
    model = None
    if (
        "num-layers" in vals and "vocab-size" in vals
    ):  # else the tokenizer holds the vocabulary: the model is the user's to name
        layers = num("num-layers")
        heads = num("num-attention-heads")
        model = ModelSpec(
            name=path.rsplit("/", 1)[-1].rsplit(".", 1)[0],
            layers=layers,
            hidden=num("hidden-size"),
            heads=heads,
            kv_heads=num("num-query-groups", heads) if vals.get("group-query-attention") else 0,
            ffn_hidden=num("ffn-hidden-size", 0),
            ffn_kind="swiglu" if vals.get("swiglu") else "gelu",
            vocab=num("vocab-size"),
            tied_embeddings=not vals.get("untie-embeddings-and-output-weights"),
            positions="rotary" if vals.get("position-embedding-type", "learned_absolute") == "rope" else "learned",
            norm="rmsnorm" if vals.get("normalization") == "RMSNorm" else "layernorm",
            max_seq=num("max-position-embeddings", plan.get("seq", 2048)),
            qkv_bias=not vals.get("disable-bias-linear"),
            out_bias=not vals.get("disable-bias-linear"),
            mlp_bias=not vals.get("disable-bias-linear"),
            experts=num("num-experts", 0),
            top_k=num("moe-router-topk", 0) if vals.get("num-experts") else 0,
        )
    gpus = int(nnodes) * int(nproc) if nnodes and nproc and str(nnodes).isdigit() and str(nproc).isdigit() else None
    return Imported(FMT, plan, model, None, gpus)
