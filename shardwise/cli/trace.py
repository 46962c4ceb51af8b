"""`shardwise trace`: one real training step of a plan, at full size and world size, on fake tensors.

    shardwise trace llama-3.1-70b --gpus 512 --tp 8 --pp 4 --zero 3 [--gbs N] [--json]
    shardwise trace examples/tiny-llama.toml --dp 2 --tp 2        (a run config plus flags)

The run tier's own model, parallelize() and Engine step, under FakeTensorMode and a fake process
group, once per rank role (each pipeline stage: first, one middle, last). Prints per role the
model states, peak memory by category and by moment, every collective, FLOPs by module.
Exit codes: 0 every role fits its GPU, 1 one does not, 2 a user error. No torch until it runs.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

from shardwise import units
from shardwise.cli import args as ca
from shardwise.cli.estimate import default_batch
from shardwise.errors import ShardwiseError
from shardwise.run import config
from shardwise.spec.hardware import make_cluster
from shardwise.spec.plan import Plan, engine_violation


def register(sub) -> None:
    s = sub.add_parser(
        "trace",
        help="one real training step per rank role, at full size and world size, on fake tensors",
        description="Build the plan's ranks with the run tier's own engines on fake tensors and a fake "
        "process group (no GPU, no memory for the model) and trace one training step per rank role: "
        "model states, peak memory by category and moment, every collective, FLOPs by module. The "
        "model is a preset, a model file, or a run config (TOML with [model] and [plan]).",
    )
    ca.add_model_args(s)
    ca.add_cluster_args(s)
    ca.add_plan_args(s, batch_default=True)
    s.add_argument("--seed", type=int, default=0, help="the run's seed (the weights' init draws)")
    s.add_argument("--no-flops", action="store_true", help="skip the FLOP count (a little faster)")
    s.add_argument("--json", action="store_true", help="print the traces as JSON")
    s.set_defaults(func=cmd_trace)


def is_run_config(path: str) -> bool:
    """A TOML file with a [plan] or [train] table is a run config (a model file has neither)."""
    p = Path(path)
    if p.suffix.lower() != ".toml" or not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return False  # the model loader says what is wrong with it
    return "plan" in doc or "train" in doc


def inputs(a: argparse.Namespace):
    """(model, resolved plan, cluster, notes) from estimate's flags or a run config plus flags."""
    notes = []
    if is_run_config(a.model):
        given = {f: getattr(a, f) for f in ca.PLAN_FLAGS if getattr(a, f, None) not in (None, _DEFAULTS.get(f))}
        over = {("plan", f): (v, "--" + f) for f, v in given.items()}
        over |= {
            ("model", k[4:]): (v, "--" + k[4:].replace("_", "-"))
            for k, v in vars(a).items()
            if k.startswith("dim_") and v is not None
        }
        cfg = config.load(a.model, over)
        model, plan = cfg.model, cfg.plan
        cluster = make_cluster(a.gpu, plan.world, a.gpus_per_node, a.network, a.hardware)
    else:
        model = ca.model_from_args(a)
        cluster = ca.cluster_from_args(a)
        notes += [n for n in (ca.clamp_seq(a, model),) if n]
        if default_batch(a, cluster.gpus):
            notes.append(f"gbs {a.gbs}: about 4M tokens, as `shardwise estimate` takes it (pin another with --gbs)")
        plan = ca.plan_from_args(a).resolve(model, cluster.gpus)
    plan.validate(model, cluster.gpus)
    why = engine_violation(plan, model)
    if why:
        raise ShardwiseError(why)
    return model, plan, cluster, notes


_DEFAULTS = {f: getattr(Plan(), f) for f in ca.PLAN_FLAGS if f not in ("dp", "gbs", "seq")}


def cmd_trace(a: argparse.Namespace) -> int:
    model, plan, cluster, notes = inputs(a)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ShardwiseError("`shardwise trace` needs PyTorch: pip install -e '.[run]'") from None
    from shardwise.trace import tracer

    tracer.check_traceable(model, plan, cluster.gpu)
    traces = tracer.trace(model, plan, seed=a.seed, flops=not a.no_flops)
    capacity = cluster.gpu.memory_bytes
    fits = all(t["measurement"]["memory"]["detail"].get("peak", 0) <= capacity for t in traces)
    if a.json:
        out = {
            "model": model.name,
            "plan": plan.to_dict(),
            "gpu": cluster.gpu.name,
            "capacity_bytes": capacity,
            "fits": fits,
            "roles": traces,
            "notes": notes,
        }
        print(json.dumps(out, indent=2))
    else:
        print_traces(model, plan, cluster, traces, notes)
    return 0 if fits else 1


def print_traces(model, plan, cluster, traces: list[dict], notes: list[str]) -> None:
    capacity = cluster.gpu.memory_bytes
    print(
        f"trace  {model.name} ({model.params:,} parameters), {plan.short()}, seq {plan.seq}, gbs {plan.gbs}, "
        f"{plan.precision}, {plan.optimizer}; {plan.world} ranks, {len(traces)} role(s) traced on fake tensors"
    )
    for t in traces:
        m = t["measurement"]["memory"]
        peak = m["detail"].get("peak", 0)
        c = t["coords"]
        verdict = "fits" if peak <= capacity else "does NOT fit"
        print(
            f"\n{t['role']}: rank {t['rank']} (pp {c['pp']}, dp {c['dp']}, tp {c['tp']}), traced in "
            f"{units.seconds(t['seconds'])}"
        )
        print(
            f"  memory   peak {units.binary_bytes(peak)} ({verdict} in {cluster.gpu.name}'s {units.binary_bytes(capacity)}): "
            f"parameters {units.binary_bytes(m['params'])}, gradients {units.binary_bytes(m['grads'])}, optimizer "
            f"{units.binary_bytes(m['optimizer'])}, activations and the rest {units.binary_bytes(m['activations'])}"
        )
        cats = ", ".join(f"{k.lower()} {units.binary_bytes(v)}" for k, v in t["peak_by_category"].items() if v)
        print(
            f"  at peak  {cats}  (MemTracker's categories; parameters and gradient buckets held before the step: other)"
        )
        print("  moments  " + ", ".join(f"{k} {units.binary_bytes(v)}" for k, v in t["moments"].items()))
        comm = sorted(t["measurement"]["comm"], key=lambda x: (x["group"], x["kind"], -x["bytes"]))
        print(f"  collectives per step ({len(comm)} kinds of message):")
        for x in comm:
            print(
                f"    {x['kind']:<15}{x['group']:<8}{x['ranks']:>6} ranks  {units.binary_bytes(x['bytes']):>12}  "
                f"x{x['count']:<6} {x['what']}"
            )
        if t["flops"]:
            total = t["flops"].get("total", 0)
            # the model's own modules under whatever wrapper holds them (DDP's .module, FSDP's class)
            top = sorted(
                ((k.split(".", 1)[1].removeprefix("module."), v) for k, v in t["flops"].items() if k.count(".") >= 1),
                key=lambda kv: -kv[1],
            )
            top = [(k, v) for k, v in top if k != "module"]
            print(
                f"  FLOPs    {units.count(total)} this step"
                + ("; " + ", ".join(f"{k} {units.count(v)}" for k, v in top[:6]) if top else "")
            )
    for n in notes:
        print(f"note   {n}")
