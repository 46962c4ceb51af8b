"""`shardwise serve`: the interactive planner on http://127.0.0.1:PORT (another interface only
when --host asks for it)."""

from __future__ import annotations

from shardwise.errors import ShardwiseError
from shardwise.serve import app as serve_app  # a module: serve.app imports cli.plan, which loads cli


def register(sub) -> None:
    p = sub.add_parser("serve", help="the interactive planner as a local web page")
    p.add_argument("--port", type=int, default=8700, help="port on 127.0.0.1 (default 8700)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(a) -> int:
    if not 0 < a.port < 65536:
        raise ShardwiseError(f"--port must be in 1..65535, got {a.port}")
    try:
        import plotly  # noqa: F401  (the page's chart library)
        import uvicorn
    except ImportError as e:
        raise ShardwiseError(f"serve needs {e.name}: pip install -e '.[serve]'") from None
    print(f"shardwise planner on http://{a.host}:{a.port}/ (Ctrl-C to stop)")
    uvicorn.run(serve_app.make_app(), host=a.host, port=a.port, log_level="warning")
    return 0
