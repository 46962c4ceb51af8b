"""Arithmetic helpers that work on Python numbers and on numpy arrays alike.

The estimate formulas are written once. `shardwise.estimate` calls them with one scalar Plan;
the search calls them with a Plan whose numeric fields are numpy arrays (one element per
candidate plan). So formulas must not branch with `if` on dp/tp/pp/mbs/gbs/vpp/seq or use
math.ceil/min/max on them: use these instead. Categorical fields (zero, schedule, recompute,
sp, precision, optimizer, offload) are always scalars and may be branched on freely.
"""
from __future__ import annotations


def _is_array(*xs) -> bool:
    # a plain loop, not any(genexpr): the search calls this ~30,000 times per plan search
    for x in xs:
        if getattr(x, "shape", None):  # () for Python/numpy scalars, (n,) for arrays
            return True
    return False


def where(cond, a, b):
    if _is_array(cond, a, b):
        import numpy as np

        return np.where(cond, a, b)
    return a if cond else b


def maximum(a, b):
    if _is_array(a, b):
        import numpy as np

        return np.maximum(a, b)
    return a if a >= b else b


def minimum(a, b):
    if _is_array(a, b):
        import numpy as np

        return np.minimum(a, b)
    return a if a <= b else b


def ceil_div(a, b):
    """ceil(a / b) for non-negative integers (arrays too)."""
    return -(-a // b)
