"""The planner page's server. Each request is turned into the `shardwise plan` command line and
parsed by the `plan` command's own flags, so a field is checked exactly as the flag is, and a bad one comes back
as the CLI's one-line error (HTTP 400), never a stack trace. The chart library is Plotly's own
bundle from the installed `plotly` package, served from here: the page needs no network."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from shardwise.cli import plan as plan_cmd
from shardwise.errors import ShardwiseError
from shardwise.export import FORMATS
from shardwise.spec.hardware import gpus as gpu_catalog
from shardwise.spec.presets import presets

STATIC = Path(__file__).parent / "static"
# the query's fields and the `plan` flag each becomes; a field left empty is not pinned
FIELDS = ("gpu", "gpus", "gpus_per_node", "tp", "pp", "zero", "mbs", "gbs", "seq", "recompute", "precision", "profile")
MAX_CONFIG = 64 * 1024  # a pasted config.json is a few KiB
_CLI = threading.Lock()  # the command line prints to sys.stdout: one request at a time holds it
FILENAMES = {
    "torchtitan": "torchtitan.toml",
    "megatron": "pretrain_gpt.sh",
    "deepspeed": "ds_config.json",
    "accelerate": "accelerate.yaml",
    "slurm": "shardwise.sbatch",
    "shardwise": "shardwise.toml",
}


class Refused(Exception):
    """A request the command line refused: its one-line message."""


def argv_of(q, config_path: str | None) -> list[str]:
    model = config_path or q.get("model") or "llama-3.1-8b"
    argv = ["plan", model]
    for f in FIELDS:
        v = (q.get(f) or "").strip()
        if v:
            argv += ["--" + f.replace("_", "-"), v]
    argv += [f"--{f}" for f in ("sp", "compile") if q.get(f) == "1"]  # the switches
    return argv


class _Parser(argparse.ArgumentParser):
    """The `plan` command's own parser, whose usage errors come back as the request's error."""

    def error(self, message: str):
        raise Refused(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="shardwise")
    plan_cmd.register(p.add_subparsers(dest="command", parser_class=_Parser))
    return p


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Run `shardwise ARGV` (the plan command) in-process: exit code and stdout; a user error
    (exit 2 on the command line) raises Refused with its one line."""
    a = parser().parse_args(argv)
    out = io.StringIO()
    with _CLI, contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            rc = a.func(a)
        except ShardwiseError as e:
            raise Refused(str(e)) from None
    return rc, out.getvalue()


def with_model(q, fn):
    """Call fn(argv) with the query's model: a pasted config.json goes to a temporary file."""
    config = q.get("config") or ""
    if not config.strip():
        return fn(argv_of(q, None))
    if len(config) > MAX_CONFIG:
        raise Refused(f"the pasted config.json is {len(config):,} characters; a config.json is a few KiB")
    try:
        json.loads(config)
    except json.JSONDecodeError as e:
        raise Refused(f"the pasted config.json is not valid JSON ({e.msg}, line {e.lineno})") from None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.json")
        Path(path).write_text(config)
        return fn(argv_of(q, path))


def plan_json(q) -> dict:
    def go(argv):
        return json.loads(run_cli(argv + ["--json", "--top", "20"])[1])

    return with_model(q, go)


def export_text(q, fmt: str) -> str:
    if fmt not in FORMATS:
        raise Refused(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")

    def go(argv):
        return run_cli(argv + ["--export", fmt])[1]

    return with_model(q, go)


async def api_plan(request: Request):
    q = request.query_params
    try:
        return JSONResponse(plan_json(q))
    except (Refused, ShardwiseError) as e:
        return JSONResponse({"error": str(e)}, status_code=400)


async def api_export(request: Request):
    q = request.query_params
    fmt = request.path_params["fmt"]
    try:
        text = export_text(q, fmt)
    except (Refused, ShardwiseError) as e:
        return JSONResponse({"error": str(e)}, status_code=400)
    name = FILENAMES[fmt]
    return Response(text, media_type="text/plain", headers={"Content-Disposition": f'attachment; filename="{name}"'})


async def api_choices(request: Request):
    return JSONResponse({"models": sorted(presets()), "gpus": sorted(gpu_catalog()), "formats": list(FORMATS)})


async def index(request: Request):
    return FileResponse(STATIC / "index.html")


async def plotly_js(request: Request):
    return FileResponse(plotly_path(), media_type="application/javascript")


def plotly_path() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def make_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/plan", api_plan),
            Route("/api/choices", api_choices),
            Route("/api/export/{fmt}", api_export),
            Route("/vendor/plotly.min.js", plotly_js),
            Mount("/static", StaticFiles(directory=STATIC)),
        ]
    )
