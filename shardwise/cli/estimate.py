"""`shardwise estimate`: memory, communication and time per GPU for one plan.

Exit codes: 0 the plan fits; 1 it does not fit (the estimate is still printed); 2 a user error.
"""

from __future__ import annotations

import argparse
import json

from shardwise.cli import args as ca
from shardwise.cli import exporting
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.estimate.checkpoint import check_storage, checkpoint_cost
from shardwise.report.tables import print_checkpoint, print_estimate
from shardwise.search.space import default_gbs
from shardwise.spec.plan import Plan

SCHEMA = 2  # the JSON contract's version: 2 added schema, held and the CLI's notes


def register(sub) -> None:
    s = sub.add_parser("estimate", help="memory, communication and time per GPU for one plan")
    ca.add_model_args(s)
    ca.add_cluster_args(s)
    ca.add_plan_args(s, batch_default=True)
    ca.add_estimate_opts(s)
    exporting.add_export_args(s)
    s.set_defaults(func=cmd_estimate)


def cmd_estimate(a) -> int:
    exporting.check_outputs(a)
    model = exporting.apply_from(a)[0] if a.from_file else ca.model_from_args(a)
    cluster = ca.cluster_from_args(a)
    notes = [n for n in (ca.clamp_seq(a, model),) if n]
    gbs_default = default_batch(a, cluster.gpus)
    plan = ca.plan_from_args(a)
    if a.efficiency is not None and not 0 < a.efficiency <= 1:
        raise ShardwiseError(f"--efficiency must be in (0, 1], got {a.efficiency}")
    if a.price is not None and a.price < 0:
        raise ShardwiseError(f"--price must not be negative, got {a.price}")
    check_storage(a.storage_gbps)
    est = estimate(model, cluster, plan, a.profile, efficiency=a.efficiency, tokens=a.tokens, price=a.price)
    ckpt = checkpoint_cost(est.model, est.plan, cluster.gpus, a.storage_gbps)
    if a.export and a.out is None:  # the file alone on stdout, to pipe or redirect
        exporting.write_export(a, model, est)
    elif a.json:
        print(json.dumps(to_json(est, gbs_default, notes) | {"checkpoint": ckpt.to_dict()}, indent=2))
    else:
        print_estimate(est, gbs_default=gbs_default, notes=notes)
        print_checkpoint(ckpt)
    if a.export and a.out is not None:
        exporting.write_export(a, model, est)
    return 0 if est.memory.fits else 1


def default_batch(a: argparse.Namespace, gpus: int) -> bool:
    """Without --gbs, the global batch `plan` would hold: about 4M tokens, a multiple of this
    plan's dp * mbs (search.space.default_gbs), so `estimate` and `plan` answer for the same batch.
    Sets a.gbs; True when it did. A tp * pp that does not divide the GPUs is left to the plan's
    own rule, which says what to change."""
    if a.gbs is not None:
        return False
    tp_pp = a.tp * a.pp
    if tp_pp <= 0 or gpus % tp_pp or (a.dp is not None and a.dp <= 0) or a.mbs <= 0:
        return False
    dp = a.dp if a.dp is not None else gpus // tp_pp
    a.gbs = default_gbs(a.seq or Plan().seq, [dp * a.mbs])
    return True


def to_json(est, gbs_default: bool, notes: list[str]) -> dict:
    """The estimate as JSON: Estimate.to_dict() (model, cluster, plan, profile, memory, comm, time,
    rule_of_thumb_bytes, notes), every key as before, plus (schema 2):
    - schema: 2;
    - held: {gbs, gbs_default (true: --gbs was not given, the default of about 4M tokens was used),
      seq} — the training choices the estimate was made for;
    - notes: the estimate's notes, then the command line's (e.g. a sequence clamped to a learned
      position table).
    """
    d = est.to_dict()
    p = est.plan
    d["notes"] = list(d.get("notes", [])) + list(notes)
    return {"schema": SCHEMA} | d | {"held": {"gbs": int(p.gbs), "gbs_default": gbs_default, "seq": int(p.seq)}}
