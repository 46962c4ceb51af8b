"""`shardwise plan`: the plan to train a model with on a cluster, answer first: the recommended
plan in one line and the command that trains it, the plans the estimate cannot tell apart from it,
the ranked table; why (--explain) and what was rejected (-v) on request.

Exit codes: 0 plans found; 1 nothing fits under the pinned flags (the answer says what would);
2 a user error, including a request no plan can meet.
"""

from __future__ import annotations

import argparse
import json
import shlex

from shardwise import units
from shardwise.cli import args as ca
from shardwise.cli import exporting
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.estimate.checkpoint import check_storage, checkpoint_cost
from shardwise.report.search import print_search
from shardwise.report.tables import print_checkpoint
from shardwise.search.core import (
    DEFAULT_HEADROOM,
    MAX_GPUS,
    RANKS,
    Options,
    fewest_gpus,
    run_search,
    what_it_would_take,
)
from shardwise.search.equivalent import BAND_WHY, EQUIVALENT_BAND, SIMPLEST, equivalent, row_plan
from shardwise.search.explain import why_lines, why_recommended
from shardwise.spec.plan import Plan
from shardwise.spec.presets import resolve_name, source_of


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
    ca.add_plan_args(p, defaults=False, batch_default=True)
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
        "--explain", action="store_true", help="say why each plan ranks where it does (against #1 and its alternatives)"
    )
    g.add_argument(
        "-v", "--verbose", action="store_true", help="also print the search's statistics and what it rejected, and why"
    )
    g.add_argument(
        "--trace-top",
        type=int,
        default=0,
        metavar="K",
        help="trace the K best plans (shardwise trace: one real step per rank role on fake tensors) and "
        "re-rank them by traced memory; slow: seconds to minutes per plan",
    )
    g.add_argument(
        "--min-gpus",
        action="store_true",
        help="find the fewest GPUs of this kind that can train the model (up to --gpus if given), "
        "and the best plan there",
    )
    exporting.add_export_args(p)
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
    exporting.check_outputs(a)
    theirs = None
    if a.from_file:  # their plan is estimated as it is; the search holds only its training choices
        model, fields = exporting.apply_from(a)
        theirs = {f: getattr(a, f) for f in ca.PLAN_FLAGS if getattr(a, f, None) is not None}
        for f in set(fields) - {"gbs", "seq", "precision", "optimizer", "attention", "compile"}:
            setattr(a, f, None)
    else:
        model = ca.model_from_args(a)
    pinned = ca.plan_fields_from_args(a)  # what the user gave, before any default is filled in
    notes = [n for n in (ca.clamp_seq(a, model),) if n]
    fixed = ca.plan_fields_from_args(a)
    if a.top < 1:
        raise ShardwiseError(f"--top must be a positive integer, got {a.top}")
    check_storage(a.storage_gbps)
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
        probe = ca.cluster_from_args(a, gpus=a.gpus if a.gpus is not None else 1)
        found = fewest_gpus(model, probe, fixed, Options(**kw), limit=a.gpus or MAX_GPUS)
        if found is None:
            where = f"up to {a.gpus}" if a.gpus else "any number of"
            raise ShardwiseError(
                f"no plan fits {model.name} on {where} {probe.gpu.name} GPUs under these flags; "
                "try a GPU with more memory, a shorter --seq, or fewer pinned flags"
            )
        cluster = ca.cluster_from_args(a, gpus=found)
    else:
        cluster = ca.cluster_from_args(a, gpus=a.gpus if a.gpus is not None else 8)
    res = run_search(model, cluster, **kw, top=a.top, rank=a.rank, **fixed)
    advice = what_it_would_take(res) if not res.fits else []
    eq = equivalent(res)
    command = train_command(eq.recommended, model_argv(a)) if eq else None
    if theirs is not None:
        notes.append(compare_line(a, model, cluster, theirs, eq))
    chosen = None
    if a.export:
        if eq is None:
            raise ShardwiseError("--export: no plan fits, so there is none to export (see `shardwise plan` without it)")
        # the frameworks express fewer plans than PyTorch's engines: look past the table's --top
        pool = (
            res.ranked
            if a.top >= EXPORT_POOL
            else run_search(model, cluster, **kw, top=EXPORT_POOL, rank=a.rank, **fixed).ranked
        )
        chosen = exporting.expressible(a, model, [eq.recommended, *pool])
        if chosen is not eq.recommended:
            notes.append(f"--export {a.export}: the best plan {a.export} can express is {chosen.plan.short()}")
        if a.out is None:
            exporting.write_export(a, model, chosen)
            return 0
    ckpt = None
    if eq is not None:  # what the recommended plan's checkpoints cost
        r = eq.recommended
        ckpt = checkpoint_cost(r.model, r.plan, r.cluster.gpus, a.storage_gbps)
    traced = _trace_top(a, model, res) if a.trace_top else None
    if a.json:
        out = to_json(res, advice, found, eq=eq, command=command, notes=notes, pinned=pinned)
        if ckpt is not None:
            out["recommended"]["checkpoint"] = ckpt.to_dict()
        print(json.dumps(out | ({"trace_top": traced} if traced is not None else {}), indent=2))
    else:
        print_search(
            res,
            advice,
            found,
            eq=eq,
            command=command,
            command_note=COMMAND_NOTE + (MULTI_NODE_NOTE if eq and eq.recommended.cluster.nodes > 1 else ""),
            notes=notes,
            explain=a.explain,
            verbose=a.verbose,
        )
        if ckpt is not None:
            print_checkpoint(ckpt, what="checkpoint of the recommended plan")
        if traced is not None:
            _print_traced(traced)
    if chosen is not None:
        exporting.write_export(a, model, chosen)
    return 0 if res.fits else 1


def _trace_top(a, model, res) -> list[dict]:
    if a.trace_top < 0:
        raise ShardwiseError(f"--trace-top must be a positive integer, got {a.trace_top}")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ShardwiseError("--trace-top needs PyTorch: pip install -e '.[run]'") from None
    from shardwise.check.trace_rank import rerank

    return rerank(model, res.ranked[: a.trace_top], a.headroom)


def _print_traced(rows: list[dict]) -> None:
    print("\ntraced (one real step per rank role on fake tensors), re-ranked by traced memory:")
    for i, r in enumerate(rows, 1):
        if r["traced_bytes"] is None:
            print(f"  {i}. {r['plan']} (estimate #{r['estimate_rank']}): {r['note']}")
            continue
        verdict = "fits" if r["fits"] else "does NOT fit"
        print(
            f"  {i}. {r['plan']} (estimate #{r['estimate_rank']}): traced peak {units.gib(r['traced_bytes'])} "
            f"({r['worst_role']}), estimated {units.gib(r['estimated_bytes'])}, {verdict}"
            + (f"; {r['note']}" if r["note"] else "")
        )


EXPORT_POOL = 500  # ranked plans searched for one the --export framework can express


def compare_line(a, model, cluster, theirs: dict, eq) -> str:
    """--from: their config's estimate against the recommended plan's, in one line."""
    est = estimate(model, cluster, Plan(**theirs), a.profile, efficiency=a.efficiency)
    mine = f"{a.from_file} ({est.plan.short()}): {est.time.tokens_per_s:,.0f} tokens/s"
    if not est.memory.fits:
        mine += ", does not fit"
    if eq is None:
        return mine + "; no plan fits to compare it with"
    best = eq.recommended
    ratio = best.time.tokens_per_s / est.time.tokens_per_s
    return f"{mine}; the recommended plan ({best.plan.short()}) is {ratio:.2f}x as fast"


# ---- the command that trains the recommended plan --------------------------------------------
COMMAND_NOTE = (
    "CONFIG.toml: a run config with your [data], [optim] and [train] (see examples/tiny-llama.toml); "
    "the model and the plan are in the flags"
)
MULTI_NODE_NOTE = "; run the same line on every node, HEAD_NODE being the first node's address"
RENDEZVOUS_PORT = 29500  # torchrun's default master port


def model_argv(a: argparse.Namespace) -> list[str]:
    """The `shardwise run` flags that name the model the search planned for: the preset (its
    catalog name, whatever alias the user typed) or the file, and any dimension the user changed."""
    out = []
    ref = exporting.model_ref(a)  # None for `custom`, and for a --from file that gives only dimensions
    if ref is not None:
        kind, where = source_of(ref)
        out += ["--set", f"model.preset={resolve_name(where)}" if kind == "preset" else f"model.path={where}"]
    for name in ca.DIM_FLAGS:
        v = getattr(a, "dim_" + name, None)
        if v is not None:
            out += ["--" + name.replace("_", "-"), str(v)]
    if getattr(a, "dim_tied_embeddings", None):  # `run` has no --tied: its [model] field instead
        out += ["--set", "model.tied_embeddings=true"]
    return out


def plan_argv(p: Plan) -> list[str]:
    """The `shardwise run` plan flags that give exactly Plan p: the parallel layout and the batch
    always, every other field where it differs from Plan's default."""
    out = []
    for f in ("dp", "tp", "pp", "zero", "mbs", "gbs", "seq"):
        out += ["--" + f, str(int(getattr(p, f)))]
    d = Plan()
    for f in ca.PLAN_FLAGS:  # every other plan field `run` takes, so a new field cannot be left out
        if f in ("dp", "tp", "pp", "zero", "mbs", "gbs", "seq", "sp", "compile") or getattr(p, f) == getattr(d, f):
            continue
        out += ["--" + f.replace("_", "-"), str(getattr(p, f))]
    out += [f"--{f}" for f in ("sp", "compile") if getattr(p, f)]  # the switches
    return out


def train_command(e, model_flags: list[str]) -> list[str]:
    """argv of the command that trains Estimate e's plan on its cluster: `shardwise run` spawning
    the ranks on one node, or one rank per GPU under torchrun on several (`shardwise run` then
    takes its world size from torchrun). CONFIG.toml and HEAD_NODE are the user's to fill in."""
    cl = e.cluster
    if cl.nodes > 1:
        head = [
            "torchrun",
            "--nnodes",
            str(cl.nodes),
            "--nproc-per-node",
            str(cl.node_size),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"HEAD_NODE:{RENDEZVOUS_PORT}",
            "-m",
            "shardwise",
            "run",
            "CONFIG.toml",
        ]
    else:
        head = ["shardwise", "run", "CONFIG.toml", "--nproc", str(cl.gpus)]
    return head + model_flags + plan_argv(e.plan)


SCHEMA = 2  # the JSON contract's version: 2 added schema, recommended, equivalent and notes


def to_json(
    res,
    advice: list[str],
    min_gpus: int | None = None,
    *,
    eq=None,
    command: list[str] | None = None,
    notes: list[str] = (),
    pinned: dict | None = None,
) -> dict:
    """The search as JSON: the ranked Estimates (Estimate.to_dict(), plus rank and why), what was
    searched and rejected, and for nothing-fits the closest plan and what would make one fit.

    Keys as before (model, cluster, min_gpus, held, pinned, headroom, host_memory_bytes_per_node,
    rank_by, searched, rejected, rejected_examples, ranked, closest, what_it_would_take), and since
    schema 2:

    - schema: 2;
    - recommended: the plan to train (null when nothing fits): Estimate.to_dict() plus rank (its
      place in the ranking), why (why it over #1), command (the `shardwise run` argv that trains
      it) and command_line (the same, one shell line);
    - equivalent: the plans the estimate cannot tell apart from the best (null when nothing fits):
      band (0.10: within 10% of the best by the ranking), basis (why that width), chosen_by (how the
      recommended one is picked), count, and plans: up to EQUIVALENT_JSON of them, the recommended
      first, then best first, each {rank, plan (Plan.to_dict()), short, gpus, tokens_per_s,
      memory_total};
    - notes: the command line's notes (e.g. a sequence clamped to a learned position table).
    """

    why = why_lines(res)
    t = res.tally
    out = {
        "schema": SCHEMA,
        "model": res.model.summary(),
        "cluster": {
            "gpu": res.cluster.gpu.name,
            "gpus": res.cluster.gpus,
            "gpus_per_node": res.cluster.gpus_per_node,
            "network": res.cluster.network.name,
        },
        "min_gpus": min_gpus,
        "held": {"gbs": res.gbs, "gbs_pinned": "gbs" in res.fixed, "seq": res.seq},
        "pinned": res.fixed if pinned is None else pinned,
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
        "recommended": None,
        "equivalent": None,
        "notes": list(notes),
    }
    if eq is not None:
        c = res.table.cols
        out["recommended"] = eq.recommended.to_dict() | {
            "rank": eq.position,
            "why": why_recommended(res, eq),
            "command": command,
            "command_line": shlex.join(command) if command else None,
        }
        out["equivalent"] = {
            "band": EQUIVALENT_BAND,
            "basis": BAND_WHY,
            "chosen_by": SIMPLEST,
            "count": len(eq),
            "plans": [
                {
                    "rank": int((res.order == r).nonzero()[0][0]) + 1,
                    "plan": (p := row_plan(res, int(r))).to_dict(),
                    "short": p.short(),
                    "gpus": int(c["gpus"][r]),
                    "tokens_per_s": float(c["tokens_per_s"][r]),
                    "memory_total": int(c["mem_total"][r]),
                }
                for r in eq.rows[:EQUIVALENT_JSON]
            ],
        }
    return out


EQUIVALENT_JSON = 100  # plans of the band listed in the JSON (count says how many there are)
