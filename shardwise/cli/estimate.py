"""`shardwise estimate`: memory, communication and time per GPU for one plan.

Exit codes: 0 the plan fits; 1 it does not fit (the estimate is still printed); 2 a user error.
"""

from __future__ import annotations

import json

from shardwise.cli import args as ca
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.report.tables import print_estimate


def register(sub) -> None:
    s = sub.add_parser("estimate", help="memory, communication and time per GPU for one plan")
    ca.add_model_args(s)
    ca.add_cluster_args(s)
    ca.add_plan_args(s)
    ca.add_estimate_opts(s)
    s.set_defaults(func=cmd_estimate)


def cmd_estimate(a) -> int:
    model = ca.model_from_args(a)
    cluster = ca.cluster_from_args(a)
    plan = ca.plan_from_args(a)
    if a.efficiency is not None and not 0 < a.efficiency <= 1:
        raise ShardwiseError(f"--efficiency must be in (0, 1], got {a.efficiency}")
    if a.price is not None and a.price < 0:
        raise ShardwiseError(f"--price must not be negative, got {a.price}")
    est = estimate(model, cluster, plan, a.profile, efficiency=a.efficiency, tokens=a.tokens, price=a.price)
    if a.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        print_estimate(est)
    return 0 if est.memory.fits else 1
