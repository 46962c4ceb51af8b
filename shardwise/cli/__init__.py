"""`shardwise` command line: one module per subcommand, each with register(subparsers).

Every user error is one line on stderr and exit code 2. No subcommand module imports torch at
import time: `shardwise estimate` and `plan` work where torch is not installed.
"""

from __future__ import annotations

import argparse
import re
import sys

from shardwise import __version__
from shardwise.cli import catalog, check, estimate, export_hf, lecture, plan, run, serve, trace, validate
from shardwise.errors import ShardwiseError

COMMANDS = (catalog, estimate, plan, run, lecture, check, trace, validate, export_hf, serve)
# argparse's own pattern (-2, -.5) plus exponents and the count suffixes of cli.args.parse_count
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[+-]?\d+)?[kmbgt]?$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look) and exit 2, and a
    negative count with a suffix (`--tokens -2T`) reaches its flag's check ("must not be
    negative") instead of being taken for an unknown option ("expected one argument")."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="shardwise", description="How to split a model over GPUs, what it costs, and proof by running it.")
    p.add_argument("--version", action="version", version=f"shardwise {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.register(sub)
    return p


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
