"""shardwise's own run TOML (the [model] and [plan] tables shardwise/run/config.py reads; the
[data], [optim] and [train] tables keep their defaults, the user's to fill in)."""

from __future__ import annotations

import dataclasses
import tomllib

from shardwise.export.job import Export, Imported, Job, bad_file, refused, toml_text
from shardwise.spec.model import spec_from_dict
from shardwise.spec.plan import Plan, engine_violation
from shardwise.spec.presets import load_model, resolve_name, source_of

FMT = "shardwise"
DIMS = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "max_seq", "experts", "top_k")


def refuse(job: Job) -> str | None:
    return engine_violation(job.plan, job.model)


def model_table(job: Job) -> dict:
    """[model]: the preset or file, plus every dimension that differs from it; all fields when
    the model came from the command line's dimensions alone."""
    if job.model_ref:
        kind, where = source_of(job.model_ref)
        base = load_model(job.model_ref)
        out = {"preset": resolve_name(where)} if kind == "preset" else {"path": where}
        for f in dataclasses.fields(base):
            v = getattr(job.model, f.name)
            if f.name not in ("name", "published_params", "source") and v != getattr(base, f.name):
                out[f.name] = v
        return out
    skip = ("estimated", "published_params", "source")
    return {f.name: getattr(job.model, f.name) for f in dataclasses.fields(job.model) if f.name not in skip}


def render(job: Job) -> Export:
    if why := refuse(job):
        raise refused(FMT, why)
    p = job.plan
    d = Plan()
    plan = {"dp": p.dp, "tp": p.tp, "pp": p.pp, "zero": p.zero, "mbs": p.mbs, "gbs": p.gbs, "seq": p.seq}
    plan |= {
        f.name: getattr(p, f.name)
        for f in dataclasses.fields(p)
        if f.name not in plan and getattr(p, f.name) != getattr(d, f.name)
    }
    header = (
        "# shardwise run config, written by shardwise: "
        + p.short()
        + "\n# add [data], [optim], [train] (see examples/tiny-llama.toml)"
    )
    cl = job.cluster
    if cl.nodes > 1:
        launch = (
            f"torchrun --nnodes {cl.nodes} --nproc-per-node {cl.node_size} --rdzv-backend c10d "
            "--rdzv-endpoint HEAD_NODE:29500 -m shardwise run shardwise.toml"
        )
    else:
        launch = f"shardwise run shardwise.toml --nproc {cl.gpus}"
    return Export(toml_text({"model": model_table(job), "plan": plan}, header), "shardwise.toml", launch)


def read(path: str, text: str) -> Imported:
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise bad_file(path, f"not valid TOML ({e})") from None
    plan = dict(d.get("plan", {}))
    unknown = sorted(set(plan) - {f.name for f in dataclasses.fields(Plan)})
    if unknown:
        raise bad_file(path, f"[plan] has no field {unknown[0]!r}")
    m = dict(d.get("model", {}))
    ref = m.pop("preset", None) or m.pop("path", None)
    if ref:
        model = load_model(ref)
        model = dataclasses.replace(model, **m) if m else model
    elif m:
        model = spec_from_dict({"name": "custom"} | m, path)
    else:
        model = None
    return Imported(FMT, plan, model, ref)
