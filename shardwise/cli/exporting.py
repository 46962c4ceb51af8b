"""--export FORMAT [--out FILE] and --from FILE for `estimate` and `plan`: the plan written in
another framework's config, and another framework's config read as the plan."""

from __future__ import annotations

import argparse
import sys

from shardwise import paths
from shardwise.cli import args as ca
from shardwise.errors import ShardwiseError
from shardwise.export import FORMATS, Job, export, read_file
from shardwise.export.job import refused
from shardwise.spec.model import ModelSpec


def add_export_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("to and from other frameworks")
    g.add_argument(
        "--export",
        choices=tuple(FORMATS),
        default=None,
        help="write the plan as a torchtitan TOML, Megatron-LM flags, DeepSpeed ds_config.json, accelerate FSDP2 "
        "YAML, Slurm batch script or shardwise run TOML (to stdout, or --out)",
    )
    g.add_argument("--out", default=None, metavar="FILE", help="the file --export writes")
    g.add_argument(
        "--from",
        dest="from_file",
        default=None,
        metavar="FILE",
        help="read the plan (and the model, where it names one) from a torchtitan or shardwise TOML, DeepSpeed JSON, "
        "accelerate or axolotl YAML, or a file of Megatron-LM flags; flags fill what the file leaves out",
    )


def check_outputs(a: argparse.Namespace) -> None:
    """Before any work: --out only with --export, and a file that can be written."""
    if a.out is not None and a.export is None:
        raise ShardwiseError("--out names the file --export writes; add --export FORMAT")
    if a.out is not None:
        paths.check_output_file(a.out, "--out")


def model_ref(a: argparse.Namespace) -> str | None:
    """The preset or file that names the model, for exports that point at it; None for `custom`."""
    return getattr(a, "model_ref", None) or (a.model if a.model not in (None, "custom") else None)


def apply_from(a: argparse.Namespace) -> tuple[ModelSpec, dict]:
    """Read --from FILE into the namespace: its plan fields over the flags, its world size over
    --gpus, its model unless one is given. Returns the model and the plan fields the file set."""
    imp = read_file(a.from_file)
    if a.model is not None:
        model = ca.model_from_args(a)
    elif imp.model is not None:
        dims = {k[4:]: v for k, v in vars(a).items() if k.startswith("dim_") and v is not None}
        model = imp.model.scaled(**dims) if dims else imp.model
        a.model_ref = imp.model_ref
    else:
        raise ShardwiseError(
            f"{a.from_file} ({imp.fmt}) names no model shardwise knows; give one before --from "
            "(a preset, or the model's config.json)"
        )
    for f, v in imp.plan.items():
        setattr(a, f, v)
    tp, pp = a.tp or 1, a.pp or 1
    if imp.gpus is not None:
        a.gpus = imp.gpus
    elif imp.plan.get("dp"):
        a.gpus = imp.plan["dp"] * tp * pp
    if imp.grad_accum is not None and a.gbs is None and a.gpus:
        dp = a.dp or a.gpus // (tp * pp)
        a.gbs = (a.mbs or 1) * imp.grad_accum * dp
    for note in imp.ignored:
        sys.stderr.write(f"shardwise: {a.from_file}: {note} is not modelled\n")
    return model, dict(imp.plan)


def write_export(a: argparse.Namespace, model: ModelSpec, estimate) -> None:
    """--export: the estimate's plan in the framework's format, to --out (then a line saying so on
    stdout) or to stdout (the launch line then goes to stderr, so the file can be piped)."""
    ex = export(a.export, Job(model, estimate.plan, estimate.cluster, model_ref(a)))
    if a.out is None:
        sys.stdout.write(ex.text)
        if ex.launch:
            sys.stderr.write(f"# launch: {ex.launch.replace(ex.filename, 'FILE')}\n")
        return
    with open(a.out, "w") as f:
        f.write(ex.text)
    print(f"wrote {a.out} ({a.export}); launch: {ex.launch.replace(ex.filename, a.out)}")


def expressible(a: argparse.Namespace, model: ModelSpec, ranked: list):
    """The first of the ranked estimates (the recommended one first) that --export's framework can
    express; none of them: its refusal of the first, with what to pin."""
    target = FORMATS[a.export]
    for e in ranked:
        if target.refuse(Job(model, e.plan, e.cluster, model_ref(a))) is None:
            return e
    why = target.refuse(Job(model, ranked[0].plan, ranked[0].cluster, model_ref(a)))
    raise refused(a.export, f"{why} (none of the {len(ranked) - 1} best plans can be; pin flags, or raise --top)")
