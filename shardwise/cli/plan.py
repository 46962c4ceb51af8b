"""`shardwise plan`: the best plans for a model on a cluster, ranked and explained.

Exit codes: 0 plans found; 1 nothing fits under the pinned flags (the answer says what would);
2 a user error, including a request no plan can meet.
"""

from __future__ import annotations

import argparse
import json

from shardwise.cli import args as ca
from shardwise.errors import ShardwiseError
from shardwise.report.search import print_search
from shardwise.search.core import (
    DEFAULT_HEADROOM,
    MAX_GPUS,
    RANKS,
    Options,
    fewest_gpus,
    run_search,
    what_it_would_take,
)
from shardwise.search.explain import why_lines


def register(sub) -> None:

    p = sub.add_parser(
        "plan",
        help="search every legal parallel plan, rank by throughput, explain the choice",
        description="Enumerate every legal dp x tp x pp x ZeRO x micro-batch x schedule x recompute "
        "x sequence-parallel x offload plan, drop those that do not fit, rank the rest. "
        "A plan flag pins that field; gbs, seq, precision and optimizer are training "
        "choices and are held (at their defaults unless given), never searched.",
    )
    ca.add_model_args(p)
    ca.add_cluster_args(p, gpus_required=True)
    ca.add_plan_args(p, defaults=False)
    ca.add_estimate_opts(p)
    g = p.add_argument_group("search")
    g.add_argument("--top", type=int, default=10, help="how many plans to show (default 10)")
    g.add_argument(
        "--rank",
        default="throughput",
        choices=RANKS,
        help="throughput (tokens/s, default); time or cost to train --tokens, comparing GPU counts "
        "up to --gpus too (powers of two below a node, power-of-two node counts, all of them)",
    )
    g.add_argument(
        "--headroom",
        type=_fraction,
        default=DEFAULT_HEADROOM,
        help=f"share of GPU memory a plan must leave free, e.g. 0.1 or 10%% "
        f"(default {DEFAULT_HEADROOM * 100:.0f}%%; see the README)",
    )
    g.add_argument(
        "--host-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="CPU memory per node for offloaded states, GiB (default 128 GiB per GPU: a DGX A100's 1 TB for 8)",
    )
    g.add_argument(
        "--allow-cross-node-tp",
        action="store_true",
        help="let tensor-parallel groups span nodes (by default each tp group stays inside one node)",
    )
    g.add_argument(
        "--min-gpus",
        action="store_true",
        help="find the fewest GPUs of this kind that can train the model (up to --gpus if given), "
        "and the best plan there",
    )
    p.set_defaults(func=cmd_plan)


def _fraction(text: str) -> float:
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r} (write 0.1 or 10%)") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (or 0%..99%), got {text!r}")
    return v


def cmd_plan(a) -> int:

    model = ca.model_from_args(a)
    fixed = ca.plan_fields_from_args(a)
    if a.top < 1:
        raise ShardwiseError(f"--top must be a positive integer, got {a.top}")
    kw = dict(
        profile=a.profile,
        headroom=a.headroom,
        host_memory_gib=a.host_memory,
        efficiency=a.efficiency,
        tokens=a.tokens,
        price=a.price,
        cross_node_tp=a.allow_cross_node_tp,
    )
    found = None
    if a.min_gpus:
        if a.rank != "throughput":
            raise ShardwiseError("--min-gpus ranks the plans on the fewest GPUs by throughput; drop --rank")
        probe = ca.cluster_from_args(a, gpus=a.gpus or 1)
        found = fewest_gpus(model, probe, fixed, Options(**kw), limit=a.gpus or MAX_GPUS)
        if found is None:
            where = f"up to {a.gpus}" if a.gpus else "any number of"
            raise ShardwiseError(
                f"no plan fits {model.name} on {where} {probe.gpu.name} GPUs under these flags; "
                "try a GPU with more memory, a shorter --seq, or fewer pinned flags"
            )
        cluster = ca.cluster_from_args(a, gpus=found)
    else:
        cluster = ca.cluster_from_args(a, gpus=a.gpus or 8)
    res = run_search(model, cluster, **kw, top=a.top, rank=a.rank, **fixed)
    advice = what_it_would_take(res) if not res.fits else []
    if a.json:
        print(json.dumps(to_json(res, advice, found), indent=2))
    else:
        print_search(res, advice, found)
    return 0 if res.fits else 1


def to_json(res, advice: list[str], min_gpus: int | None = None) -> dict:
    """The search as JSON: the ranked Estimates (Estimate.to_dict(), plus rank and why), what was
    searched and rejected, and for nothing-fits the closest plan and what would make one fit."""

    why = why_lines(res)
    t = res.tally
    return {
        "model": res.model.summary(),
        "cluster": {
            "gpu": res.cluster.gpu.name,
            "gpus": res.cluster.gpus,
            "gpus_per_node": res.cluster.gpus_per_node,
            "network": res.cluster.network.name,
        },
        "min_gpus": min_gpus,
        "held": {"gbs": res.gbs, "gbs_pinned": "gbs" in res.fixed, "seq": res.seq},
        "pinned": res.fixed,
        "headroom": res.headroom,
        "host_memory_bytes_per_node": res.opts.host_bytes(res.cluster) / (1 - res.headroom),
        "rank_by": res.rank,
        "searched": {
            "enumerated": t.enumerated,
            "legal": t.legal,
            "dominated": t.dominated,
            "estimated": t.estimated,
            "fit": t.fit,
            "option_combinations_skipped": t.skipped_groups,
            "seconds": res.seconds,
        },
        "rejected": dict(t.rejected),
        "rejected_examples": dict(t.examples),
        "ranked": [e.to_dict() | {"rank": i + 1, "why": w} for i, (e, w) in enumerate(zip(res.ranked, why))],
        "closest": res.closest.to_dict() if res.closest is not None else None,
        "what_it_would_take": advice,
    }
