"""`shardwise` command line. Every user error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from shardwise.errors import ShardwiseError

# subcommands that live beside their tier; each module has register(subparsers)
PLUGINS = ("shardwise.search_cli", "shardwise.run.command", "shardwise.report.lecture_cli",
           "shardwise.report.check_cli")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look) and exit 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from shardwise import cli_args as ca

    p = _Parser(prog="shardwise", description="How to split a model over GPUs, what it costs, and proof by "
                                               "running it.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("models", help="the model catalog with derived parameter counts")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("gpus", help="the GPU and network catalog")
    s.add_argument("--json", action="store_true")
    s.add_argument("--hardware", default=None, metavar="FILE", help="also show a user hardware file's entries")
    s.set_defaults(func=cmd_gpus)

    s = sub.add_parser("estimate", help="memory, communication and time per GPU for one plan")
    ca.add_model_args(s)
    ca.add_cluster_args(s)
    ca.add_plan_args(s)
    ca.add_estimate_opts(s)
    s.set_defaults(func=cmd_estimate)

    for mod in PLUGINS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # that part is not built in this version
                continue
            raise
        m.register(sub)
    return p


def _version() -> str:
    from shardwise import __version__

    return f"shardwise {__version__}"


def cmd_models(a) -> int:
    from shardwise.report.tables import print_models
    from shardwise.spec.model import presets

    ms = presets()
    if a.json:
        print(json.dumps({k: m.summary() for k, m in ms.items()}, indent=2))
    else:
        print_models(ms)
    return 0


def cmd_gpus(a) -> int:
    import dataclasses

    from shardwise.report.tables import print_hardware
    from shardwise.spec import hardware as hw

    g, n = hw.gpus(), hw.networks()
    if a.hardware:
        g |= hw._file_entries(a.hardware, "gpu", hw.GPU)
        n |= hw._file_entries(a.hardware, "network", hw.Network)
    if a.json:
        print(json.dumps({"gpus": {k: dataclasses.asdict(v) for k, v in g.items()},
                          "networks": {k: dataclasses.asdict(v) for k, v in n.items()}}, indent=2))
    else:
        print_hardware(g, n)
    return 0


def cmd_estimate(a) -> int:
    from shardwise import cli_args as ca
    from shardwise.estimate import estimate

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
        from shardwise.report.tables import print_estimate

        print_estimate(est)
    return 0 if est.memory.fits else 1


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        a = parser.parse_args(argv)
        if not getattr(a, "func", None):
            parser.print_help()
            return 0
        return int(a.func(a) or 0)
    except ShardwiseError as e:
        sys.stderr.write(f"shardwise: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("shardwise: interrupted\n")
        return 130
    except BrokenPipeError:  # `shardwise models | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
