"""Command-line flags shared by every command that takes a model, a cluster and a plan
(estimate, plan, lecture, check): one definition, so a flag means the same thing everywhere."""

from __future__ import annotations

import argparse
import re

from shardwise.errors import ShardwiseError
from shardwise.spec.hardware import Cluster, make_cluster
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import (
    ATTENTION,
    CP_ROTATE,
    OFFLOAD,
    OPTIMIZERS,
    PRECISIONS,
    RECOMPUTE,
    SCHEDULES,
    Plan,
    check_recompute,
)
from shardwise.spec.presets import load_model

# model dimensions that may be given (or overridden) on the command line
DIM_FLAGS = {
    "layers": int,
    "hidden": int,
    "heads": int,
    "kv_heads": int,
    "ffn_hidden": int,
    "vocab": int,
    "max_seq": int,
    "experts": int,
    "top_k": int,
    "ffn_kind": str,
    "norm": str,
    "positions": str,
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a preset name or a Hugging Face id of one (gpt2, meta-llama/Llama-3.1-8B; see `shardwise "
        "models`), a Hugging Face config.json or its folder, a TOML/JSON file of model fields, or `custom` "
        "with the dimension flags",
    )
    g = p.add_argument_group("model dimensions (override a preset, or define a `custom` model)")
    add_dim_args(g)
    g.add_argument(
        "--tied", dest="dim_tied_embeddings", action="store_true", default=None, help="tie input and output embeddings"
    )


def add_dim_args(group) -> None:
    """--layers, --hidden, ... (DIM_FLAGS) as dim_* fields: a model's dimensions, or overrides of
    them, the same flags for estimate, plan, run and check."""
    for name, typ in DIM_FLAGS.items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest="dim_" + name,
            type=typ,
            default=None,
            metavar="N" if typ is int else "KIND",
        )


def model_from_args(a: argparse.Namespace) -> ModelSpec:
    dims = {k[4:]: v for k, v in vars(a).items() if k.startswith("dim_") and v is not None}
    if a.model is None:
        raise ShardwiseError("give a model: a preset name (see `shardwise models`), a config.json, or `custom`")
    if a.model == "custom":
        missing = [f for f in ("layers", "hidden", "heads", "vocab") if f not in dims]
        if missing:
            raise ShardwiseError(
                f"a custom model needs --{missing[0].replace('_', '-')} (and --layers --hidden --heads --vocab)"
            )
        return ModelSpec(name="custom", **dims)
    m = load_model(a.model)
    return m.scaled(**dims) if dims else m


def add_cluster_args(p: argparse.ArgumentParser, gpus_required: bool = False) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--gpu", default="h100-80gb", help="GPU name from `shardwise gpus` (default h100-80gb)")
    g.add_argument("--gpus", type=int, default=None if gpus_required else 8, help="total GPU count (default 8)")
    g.add_argument("--gpus-per-node", type=int, default=None, help="default: the GPU's usual server (8)")
    g.add_argument("--network", default=None, help="network between nodes (default ib-ndr for 8-GPU servers)")
    g.add_argument(
        "--hardware",
        default=None,
        metavar="FILE",
        help="a TOML hardware file ([gpu.NAME], [network.NAME]) that overrides the catalog",
    )


def cluster_from_args(a: argparse.Namespace, gpus: int | None = None) -> Cluster:
    n = gpus if gpus is not None else a.gpus
    if n is None or n <= 0:
        raise ShardwiseError(f"--gpus must be a positive integer, got {n}")
    return make_cluster(a.gpu, n, a.gpus_per_node, a.network, a.hardware)


def add_plan_args(p: argparse.ArgumentParser, defaults: bool = True, batch_default: bool = False) -> None:
    """Plan flags. With defaults=False every flag defaults to None ("not pinned"), for the search.
    --gbs and --seq always default to None, so a command can tell a value the user gave from its
    own default (cli.estimate.default_batch, clamp_seq); batch_default: the command has plan's and
    estimate's defaults (gbs about 4M tokens, seq 2048 or the position table), for the help."""
    d = Plan() if defaults else None
    dv = (lambda f: getattr(d, f)) if defaults else (lambda f: None)
    g = p.add_argument_group("plan")
    g.add_argument("--dp", type=int, default=None, help="data-parallel size (default: GPUs / (tp*pp))")
    g.add_argument(
        "--dp-shard",
        type=int,
        default=dv("dp_shard") or None,
        help="HSDP: shard ZeRO-2/3 states over groups of this many dp ranks, replicate across groups",
    )
    g.add_argument("--tp", type=int, default=dv("tp"), help="tensor-parallel size")
    g.add_argument(
        "--ep", type=int, default=dv("ep"), help="expert-parallel size: routed experts split over ep of the dp ranks"
    )
    g.add_argument(
        "--capacity-factor",
        dest="capacity",
        type=float,
        default=dv("capacity"),
        help="MoE all-to-all buffers as a multiple of the balanced share (0: dropless)",
    )
    g.add_argument("--pp", type=int, default=dv("pp"), help="pipeline stages")
    g.add_argument(
        "--cp", type=int, default=dv("cp"), help="context-parallel size: the sequence split over this many ranks"
    )
    g.add_argument(
        "--cp-rotate",
        default=dv("cp_rotate"),
        choices=CP_ROTATE,
        help="how cp ranks exchange K/V: allgather (torch's default, Llama 3's) or alltoall (a ring of passes)",
    )
    g.add_argument("--zero", type=int, default=dv("zero"), choices=(0, 1, 2, 3), help="ZeRO stage")
    g.add_argument("--mbs", type=int, default=dv("mbs"), help="micro-batch size (sequences)")
    g.add_argument(
        "--gbs",
        type=int,
        default=None,
        help="global batch (sequences); default about 4M tokens, a multiple of dp*mbs"
        if batch_default
        else "global batch (sequences); default dp*mbs",
    )
    g.add_argument(
        "--seq",
        type=int,
        default=None,
        help=f"sequence length (tokens); default {Plan().seq}, or a learned position table's length when shorter"
        if batch_default
        else "sequence length (tokens)",
    )
    g.add_argument("--schedule", default=dv("schedule"), choices=SCHEDULES, help="pipeline schedule")
    g.add_argument("--vpp", type=int, default=dv("vpp"), help="virtual stages per rank (interleaved)")
    g.add_argument(
        "--last-less",
        type=int,
        default=dv("last_less") or None,
        help="transformer blocks the last pipeline stage holds fewer than the others (default: the remainder "
        "when pp*vpp does not divide the layers, else 0)",
    )
    g.add_argument(
        "--recompute",
        default=dv("recompute"),
        type=recompute_arg,
        help=f"activation recompute: {', '.join(RECOMPUTE)}; selective-layer:k checkpoints every k-th block",
    )
    g.add_argument(
        "--sp", action="store_true", default=(False if defaults else None), help="sequence parallel (needs tp > 1)"
    )
    g.add_argument(
        "--compile",
        action="store_true",
        default=(False if defaults else None),
        help="torch.compile each transformer block (inductor), as torchtitan does",
    )
    g.add_argument("--precision", default=dv("precision"), choices=PRECISIONS)
    g.add_argument("--optimizer", default=dv("optimizer"), choices=OPTIMIZERS)
    g.add_argument("--offload", default=dv("offload"), choices=OFFLOAD, help="CPU offload")
    g.add_argument(
        "--attention",
        default=dv("attention"),
        choices=ATTENTION,
        help="attention kernel: flash (fused, no s x s scores kept; default) or math (scores materialized)",
    )


PLAN_FLAGS = (
    "dp",
    "tp",
    "pp",
    "zero",
    "mbs",
    "gbs",
    "seq",
    "schedule",
    "vpp",
    "recompute",
    "sp",
    "precision",
    "optimizer",
    "offload",
    "attention",
    "dp_shard",
    "last_less",
    "compile",
    "cp",
    "cp_rotate",
    "ep",
    "capacity",
)


def plan_fields_from_args(a: argparse.Namespace) -> dict:
    """The plan flags the user actually gave (None = not given)."""
    return {f: getattr(a, f) for f in PLAN_FLAGS if getattr(a, f, None) is not None}


def plan_from_args(a: argparse.Namespace) -> Plan:
    return Plan(**plan_fields_from_args(a))


def clamp_seq(a: argparse.Namespace, model: ModelSpec) -> str | None:
    """When the user gave no --seq and the model's context is shorter than the default sequence
    (GPT-2's learned position table: 1024 < 2048), use the model's length: a default the model
    cannot take would make every plan illegal. Sets a.seq; returns the one-line note to show, or
    None. A --seq the user gave is never changed (too long, it stays the plan rule's error)."""
    default = Plan().seq
    if a.seq is not None or model.max_seq >= default:
        return None
    a.seq = model.max_seq
    what = "learned position table holds" if model.positions == "learned" else "context is"
    return (
        f"seq {model.max_seq}: {model.name}'s {what} {model.max_seq} positions, "
        f"fewer than the default {default} (pin another with --seq)"
    )


def add_estimate_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("accounting")
    g.add_argument(
        "--profile",
        default="torch",
        choices=("torch", "zero-paper", "megatron", "deepspeed"),
        help="memory accounting: torch (what `shardwise run` does), zero-paper (the ZeRO paper and "
        "the lecture), megatron, deepspeed",
    )
    g.add_argument(
        "--efficiency",
        type=float,
        default=None,
        help="fraction of peak FLOP/s the matmuls reach (default in the README)",
    )
    g.add_argument("--tokens", type=parse_count, default=0.0, help="training budget in tokens, e.g. 2T, 300B")
    g.add_argument("--price", type=float, default=None, help="USD per GPU-hour (default: the catalog's)")
    g.add_argument(
        "--storage-gbps",
        type=float,
        default=None,
        metavar="GBPS",
        help="checkpoint storage write bandwidth for the job, GB/s (default: Llama 3's, 0.12 GB/s per GPU)",
    )
    g.add_argument("--json", action="store_true", help="print the JSON contract instead of tables")


_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> float:
    """'2T' -> 2e12, '300B' -> 3e11, '1.5e9' -> 1.5e9."""
    m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (write e.g. 2T, 300B, 1.5e12)")
    v = float(m.group(1)) * _SUFFIX[m.group(2)]
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return v


def recompute_arg(text: str) -> str:
    """--recompute's value: a policy name, or selective-layer:k."""
    try:
        check_recompute(text)
    except ShardwiseError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
