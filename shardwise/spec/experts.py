"""Expert parallelism as a Plan has it: which ranks hold which routed experts, and its rules.

Layout (torchtitan's, torchtitan/distributed/parallel_dims.py: EP borrows from the data-parallel
shard ranks): the ep ranks of one expert-parallel group are ep neighbouring data-parallel ranks
(tp apart, tp innermost). Each holds experts / ep of the routed experts of every MoE block, whole
(or tp-sharded, as the dense FFN is); attention, norms, the router and the shared experts stay on
every data-parallel rank as without EP. So a routed expert's parameters are replicated over
dp / ep ranks (the "expert data-parallel" group, ep * tp apart): its gradients are reduced, and
its ZeRO states sharded, over those dp / ep ranks only. Tokens reach their experts through an
all-to-all inside the EP group (dispatch) and come back through another (combine).

Array-safe like the Plan rules: every rule uses only `|`, `&` and comparisons.
"""

from __future__ import annotations

import math

from shardwise.errors import ShardwiseError

CAPACITY_BOUND = 1e3  # GShard's and Switch's capacity factors are 1.0-2.0; past 1000 is a typo


def check_capacity(value) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ShardwiseError(f"capacity factor must be a number, got {value!r}")
    if not 0 <= value <= CAPACITY_BOUND:
        raise ShardwiseError(
            f"capacity factor must be from 0 (dropless) to {CAPACITY_BOUND:g}, got {value!r}; 1.25 is common"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n < 1 << 16 else [1]


# (reason, broken, message), as spec/plan.py's Rule
RULES = (
    (
        "experts",
        lambda p, m, g: (p.ep > 1) & (m.experts == 0),
        lambda p, m, g: f"--ep {p.ep} splits routed experts, and {m.name} is dense (no experts); leave --ep out",
    ),
    (
        "experts",
        lambda p, m, g: (m.experts > 0) & (m.experts % p.ep != 0),
        lambda p, m, g: (
            f"--ep {p.ep} must divide the {m.experts} routed experts of {m.name}; "
            f"try ep in {[d for d in _divisors(m.experts) if p.dp % d == 0]}"
        ),
    ),
    (
        "experts",
        lambda p, m, g: p.dp % p.ep != 0,
        lambda p, m, g: (
            f"--ep {p.ep} must divide dp={p.dp}: expert parallelism borrows data-parallel ranks; "
            f"try ep in {_divisors(p.dp)}"
        ),
    ),
    (
        "experts",
        lambda p, m, g: (p.ep > 1) & (p.shard % p.ep != 0),
        lambda p, m, g: f"--ep {p.ep} must divide the HSDP shard group (--dp-shard {p.dp_shard}); pick a divisor",
    ),
)


def local_experts(model, plan):
    """Routed experts of one MoE block on one rank."""
    return model.experts // plan.ep


def expert_dp(plan):
    """Ranks a routed expert is replicated over: dp / ep (its gradients' group)."""
    return plan.dp // plan.ep
