"""`shardwise models` and `shardwise gpus`: the catalogs, as tables or JSON."""

from __future__ import annotations

import dataclasses
import json

from shardwise.report.tables import print_hardware, print_models
from shardwise.spec import hardware as hw
from shardwise.spec.presets import hf_ids, presets


def register(sub) -> None:
    s = sub.add_parser("models", help="the model catalog with derived parameter counts")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("gpus", help="the GPU and network catalog")
    s.add_argument("--json", action="store_true")
    s.add_argument("--hardware", default=None, metavar="FILE", help="also show a user hardware file's entries")
    s.set_defaults(func=cmd_gpus)


def cmd_models(a) -> int:
    ms = presets()
    if a.json:
        ids = hf_ids()
        print(json.dumps({k: m.summary() | {"hf_ids": ids[k]} for k, m in ms.items()}, indent=2))
    else:
        print_models(ms)
    return 0


def cmd_gpus(a) -> int:
    g, n = hw.gpus(), hw.networks()
    if a.hardware:
        g |= hw._file_entries(a.hardware, "gpu", hw.GPU)
        n |= hw._file_entries(a.hardware, "network", hw.Network)
    if a.json:
        print(
            json.dumps(
                {
                    "gpus": {k: dataclasses.asdict(v) for k, v in g.items()},
                    "networks": {k: dataclasses.asdict(v) for k, v in n.items()},
                },
                indent=2,
            )
        )
    else:
        print_hardware(g, n)
    return 0
