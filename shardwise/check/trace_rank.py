"""`shardwise plan --trace-top K`: the search's K best plans traced, and re-ranked by traced memory.

The search ranks by the estimate; the trace says what each plan's ranks really hold. A plan keeps
its place if its traced peak fits (tensor bytes traced, plus what no trace sees and the estimate
counts: the CUDA context and the allocator's overhead, under the search's headroom); plans that do
not fit go to the bottom. Where the traced tensor peak and the estimate's differ by more than the
check's tolerance (5%), or the fit verdicts differ, the row says so.
"""

from __future__ import annotations

from shardwise.check.compare import TRACE_TOL
from shardwise.errors import ShardwiseError
from shardwise.trace import tracer


def rerank(model, estimates: list, headroom: float) -> list[dict]:
    """One row per estimate (best first by the estimate), re-ordered: traced fits first."""
    rows = []
    for i, est in enumerate(estimates, 1):
        plan, mem = est.plan, est.memory
        row = {"estimate_rank": i, "plan": plan.short(), "estimated_bytes": int(mem.total - mem.overhead)}
        try:
            tracer.check_traceable(model, plan)
            roles = tracer.trace(model, plan, flops=False)
        except ShardwiseError as e:
            rows.append(row | {"traced_bytes": None, "fits": None, "note": f"not traced: {e}"})
            continue
        traced = max(r["measurement"]["memory"]["detail"]["peak"] for r in roles)
        limit = mem.capacity * (1 - headroom)
        fits = traced + mem.overhead <= limit
        error = (row["estimated_bytes"] - traced) / traced if traced else 0.0
        notes = []
        if abs(error) > TRACE_TOL["peak"]:
            notes.append(f"the estimate is {error:+.1%} off the traced peak")
        if fits != (mem.total <= limit):
            notes.append("the trace " + ("fits where the estimate does not" if fits else "does not fit"))
        worst = max(roles, key=lambda r: r["measurement"]["memory"]["detail"]["peak"])
        rows.append(
            row
            | {"traced_bytes": int(traced), "worst_role": worst["role"], "error": error, "fits": fits}
            | {"note": "; ".join(notes)}
        )
    return sorted(rows, key=lambda r: (r["fits"] is not True, r["estimate_rank"]))
