"""`shardwise validate`: the estimate against published measurements (shardwise/validate/data),
predicted vs published per item with the error, and the mean and max absolute error per metric.

Each item's plan is a `shardwise estimate` command line: `--json` gives its flags (`argv`), with
the model's fields and the GPU, so any row can be reproduced by hand.
"""

from __future__ import annotations

import json

from shardwise import validate as v
from shardwise.cli.plan import plan_argv
from shardwise.estimate.profiles import PROFILES
from shardwise.validate.metrics import UNITS

SCHEMA = 1


def register(sub) -> None:
    s = sub.add_parser("validate", help="the estimate against published runs and engines' own estimators")
    s.add_argument(
        "--set",
        dest="sets",
        action="append",
        choices=v.SETS,
        metavar="NAME",
        help=f"a published set (repeatable; default: all): {', '.join(v.SETS)}",
    )
    s.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        default=None,
        help="estimate every set under this accounting profile instead of its own",
    )
    s.add_argument("--json", action="store_true", help="every row and summary as JSON")
    s.set_defaults(func=cmd_validate)


def cmd_validate(a) -> int:
    rows = v.run(a.sets, profile=a.profile)
    summary = v.summarize(rows)
    if a.json:
        out = {
            "schema": SCHEMA,
            "rows": [r.to_dict() | {"argv": _argv(r)} for r in rows],
            "summary": [s.to_dict() for s in summary],
        }
        print(json.dumps(out, indent=2))
        return 0
    for name in dict.fromkeys(r.set for r in rows):
        mine = [r for r in rows if r.set == name]
        title = v.load_set(name)["title"]
        print(f"{title}  [--set {name}, --profile {mine[0].profile}, --gpu {mine[0].gpu}]")
        w = max(len(r.where) for r in mine)
        head = f"{'metric':<26} {'config':<8} {'mode':<9} {'published':>11} {'predicted':>11} {'error':>8}"
        print(f"  {'where':<{w}} {head}")
        for r in mine:
            print(
                f"  {r.where:<{w}} {r.metric:<26} {r.config:<8} {r.mode:<9} "
                f"{r.published:>11.4g} {r.predicted:>11.4g} {r.error_pct:>+7.2f}%"
            )
        for s in (s for s in summary if s.set == name):
            print(
                f"  {s.metric} ({UNITS[s.metric]}): mean |error| {s.mean_abs_pct:.2f}%, "
                f"max {s.max_abs_pct:.2f}% over {s.items} items"
            )
        print()
    return 0


def _argv(r) -> list[str]:
    """The `shardwise estimate` flags of a row (the model: the set's fields for it, or a preset)."""
    return [
        "--gpu",
        r.gpu,
        "--gpus",
        str(r.gpus),
        "--network",
        r.network,
        "--profile",
        r.profile,
        *plan_argv(r.plan),
    ]
