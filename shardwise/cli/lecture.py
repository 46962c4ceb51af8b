"""`shardwise lecture`: the seed lecture's five parts, computed by the library.

The README's figures (docs/figures/*.png, one per part, each under 150 KB) are made by:

    shardwise lecture --out docs/figures --formats png --dpi 90
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shardwise import __version__
from shardwise.errors import ShardwiseError
from shardwise.paths import check_output_dir, check_output_file
from shardwise.report.html import page
from shardwise.report.lecture import PARTS, Lecture, Settings, part_key, render_figures
from shardwise.report.lecture.terminal import print_section
from shardwise.report.tables import make_console

DEFAULT_OUT = "shardwise-lecture"


def register(sub) -> None:
    s = sub.add_parser(
        "lecture",
        help="the distributed-training lecture, every number computed by shardwise, with figures",
        description="The five parts of the seed lecture (why distributed training, parallelism strategies, "
        "ZeRO, communication, choosing a strategy) as tables, figures (PNG + SVG) and an optional "
        "self-contained HTML page. Every number comes from the estimate tier and the search; where "
        "the lecture's own numbers are wrong, the output says so and cites the source.",
    )
    s.add_argument(
        "--part",
        action="append",
        default=None,
        metavar="PART",
        help="why|strategies|zero|comm|choose or 1-5 (repeatable; default: all five)",
    )
    g = s.add_argument_group("what to compute for (default: the lecture's 7B model on 8x A100-80GB, 400 Gbit/s)")
    g.add_argument("--model", default=None, help="preset name or config file (default llama-7b)")
    g.add_argument("--gpus", type=int, default=None, help="GPU count (default 8)")
    g.add_argument("--gpu", default=None, help="GPU from `shardwise gpus` (default a100-80gb)")
    g.add_argument("--gpus-per-node", type=int, default=None, help="default: the GPU's usual server")
    g.add_argument("--network", default=None, help="network between nodes (default ib-ndr, the lecture's 400 Gbit/s)")
    g.add_argument("--seq", type=int, default=2048, help="sequence length of the default plan (default 2048)")
    g.add_argument("--mbs", type=int, default=1, help="micro-batch size of the default plan (default 1)")
    o = s.add_argument_group("output")
    o.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"figure folder (default ./{DEFAULT_OUT}/)")
    o.add_argument("--html", default=None, metavar="FILE", help="also write one self-contained HTML page")
    o.add_argument("--no-figures", action="store_true", help="tables only: draw and write no figures")
    o.add_argument("--formats", default="png,svg", help="figure formats, comma-separated (default png,svg)")
    o.add_argument("--dpi", type=int, default=110, help="PNG resolution (default 110)")
    o.add_argument("--json", action="store_true", help="print the parts' tables and numbers as JSON")
    s.set_defaults(func=cmd_lecture)


def cmd_lecture(a: argparse.Namespace) -> int:

    keys = list(dict.fromkeys(part_key(p) for p in a.part)) if a.part else list(PARTS)
    formats = tuple(f.strip().lower() for f in a.formats.split(",") if f.strip())
    bad = [f for f in formats if f not in ("png", "svg")]
    if bad or not formats:
        raise ShardwiseError(f"unknown figure format {bad[0] if bad else a.formats!r}; use png, svg or png,svg")
    if not 20 <= a.dpi <= 600:
        raise ShardwiseError(f"--dpi must be between 20 and 600, got {a.dpi}")
    if a.gpus is not None and a.gpus <= 0:
        raise ShardwiseError(f"--gpus must be a positive integer, got {a.gpus}")
    if not a.no_figures:  # output paths before the work
        check_output_dir(a.out, "--out")
    if a.html:
        check_output_file(a.html, "--html")
    lec = Lecture(
        Settings(
            model=a.model,
            gpus=a.gpus,
            gpu=a.gpu,
            network=a.network,
            gpus_per_node=a.gpus_per_node,
            seq=a.seq,
            mbs=a.mbs,
        )
    )
    sections = lec.sections(keys)

    paths, svgs = {}, {}
    if not a.no_figures:
        paths, svgs = render_figures(sections, Path(a.out), formats, a.dpi, inline=bool(a.html))
    if a.html:
        _write_html(Path(a.html), lec, sections, svgs)

    if a.json:
        print(json.dumps(_to_json(sections, paths, a.html), indent=2))
        return 0

    c = make_console()
    for s in sections:
        print_section(s, c, paths)
    if paths:
        c.print(f"[dim]{sum(len(p) for p in paths.values())} figure files in {a.out}/[/]")
    if a.html:
        c.print(f"[dim]report: {a.html} (self-contained, opens offline)[/]")
    return 0


def _write_html(path: Path, lec, sections, svgs) -> None:
    s = lec.settings
    sub = (
        f"Lecture 14 (Distributed Training), every number computed by shardwise {__version__}: "
        f"{lec.model.name} on {lec.cluster.describe()}, seq {s.seq}, micro-batch {s.mbs}."
    )
    text = page(
        sections,
        svgs,
        "Distributed training, computed",
        sub,
        "Generated by `shardwise lecture`. Memory in GiB (2^30 bytes), traffic in GB (10^9 bytes), "
        "bandwidth in GB/s unless marked Gbit/s.",
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ShardwiseError(f"cannot write {path}: {e.strerror}") from None


def _to_json(sections, paths, html) -> dict:
    return {
        "parts": [
            {
                "key": s.key,
                "number": s.number,
                "title": s.title,
                "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows} for t in s.tables],
                "notes": [{"kind": n.kind, "text": n.text, "source": n.source} for n in s.notes],
                "figures": {f.stem: [str(p) for p in paths.get(f.stem, [])] for f in s.figures},
                "data": s.data,
            }
            for s in sections
        ],
        "html": html,
    }
