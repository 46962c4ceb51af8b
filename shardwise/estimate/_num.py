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


def memo(fn):
    """Cache a formula written for scalars with a Python loop inside (sums over parameter groups,
    ZeroRedundancyOptimizer's greedy partition), and let it take arrays. fn returns a dict of ints.

    Scalars go through functools.lru_cache. With arrays, the results for every combination of the
    array arguments' values seen so far are kept as int64 columns, sorted by one packed int64 key
    per combination: a search's plans (a few dozen distinct dp, tp, pp among thousands) are looked
    up all at once (np.searchsorted) and fn runs once per combination it has not seen."""
    from functools import lru_cache

    cached = lru_cache(maxsize=8192)(fn)
    tables: dict = {}  # (scalar arguments, array positions) -> [keys, names, values]

    def wrapper(*args):
        if not _is_array(*args):
            return cached(*args)
        import numpy as np

        pos = tuple(i for i, a in enumerate(args) if getattr(a, "shape", None))
        cols = [args[i] for i in pos]
        shape = cols[0].shape
        if any(c.shape != shape for c in cols):
            cols = np.broadcast_arrays(*cols)
            shape = cols[0].shape
        flat = [np.ravel(c) for c in cols]
        if flat[0].size == 0:
            return fn(*args)  # no plans: the array formulas give the empty arrays
        bits = 63 // len(flat)
        either = flat[0]
        for c in flat[1:]:
            either = either | c  # fails on non-integers, which are not plan sizes
        if either.min() < 0 or either.max() >= (1 << bits):
            return per_unique(cached, *args)
        key = flat[0]
        for c in flat[1:]:
            key = (key << bits) | c
        name = tuple(a for i, a in enumerate(args) if i not in pos) + (pos,)
        table = tables.get(name)
        if table is not None:
            at = np.searchsorted(table[0], key)
            np.minimum(at, len(table[0]) - 1, out=at)
            new = key[table[0][at] != key]
        else:
            new = key
        if table is None or new.size:
            new = np.unique(new)
            mask = (1 << bits) - 1
            values = [(new >> (bits * (len(pos) - 1 - j))) & mask for j in range(len(pos))]
            call = list(args)
            results = []
            for row in zip(*(v.tolist() for v in values)):
                for i, v in zip(pos, row):
                    call[i] = v
                results.append(cached(*call))
            names = table[1] if table is not None else tuple(results[0])
            rows = [[r[k] for r in results] for k in names]
            if not all(isinstance(v, (int, np.integer)) for row in rows for v in row):
                raise TypeError(f"memo keeps int64 tables: {fn.__name__} returned a non-integer")
            block = np.array(rows, dtype=np.int64).reshape(len(names), -1)
            if table is not None:
                new, block = np.concatenate([table[0], new]), np.concatenate([table[2], block], axis=1)
            order = np.argsort(new, kind="stable")
            if len(tables) >= 256:
                tables.clear()
            table = tables[name] = [new[order], names, block[:, order]]
            at = np.searchsorted(table[0], key)
        picked = table[2][:, at]
        if len(shape) != 1:
            picked = picked.reshape((len(table[1]),) + shape)
        return dict(zip(table[1], picked))

    def cache_clear():
        cached.cache_clear()
        tables.clear()

    wrapper.cache_clear = cache_clear
    return wrapper


def per_unique(fn, *args):
    """fn(*args) once per distinct combination of the array arguments' elements, spread back over
    their broadcast shape (np.unique + take), for formulas with a Python loop inside (sums over
    parameter groups, ZeroRedundancyOptimizer's greedy partition): a search's plans share a few
    dozen (dp, tp, pp). Non-array arguments pass through. fn returns a number, a tuple of numbers
    or a dict of numbers; the same structure of arrays comes back."""
    import numpy as np

    pos = [i for i, a in enumerate(args) if getattr(a, "shape", None)]
    cols = np.broadcast_arrays(*(np.asarray(args[i]) for i in pos))
    shape = cols[0].shape
    flat = [c.ravel() for c in cols]
    if len(flat) == 1:
        key = flat[0]
    else:  # one int64 key per element: each column in its own bits, when they fit
        bits = 63 // len(flat)
        stacked = np.stack(flat)
        if stacked.dtype.kind in "iu" and stacked.min() >= 0 and stacked.max() < (1 << bits):
            key = stacked[0]
            for c in stacked[1:]:
                key = (key << bits) | c
        else:
            key = np.unique(stacked.T, axis=0, return_inverse=True)[1].ravel()
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    rows = zip(*(c[first].tolist() for c in flat))
    call = list(args)
    results = []
    for row in rows:
        for i, v in zip(pos, row):
            call[i] = v
        results.append(fn(*call))
    inverse = inverse.ravel()

    def spread(values):
        return np.asarray(values)[inverse].reshape(shape)

    r0 = results[0]
    if isinstance(r0, dict):
        return {k: spread([r[k] for r in results]) for k in r0}
    if isinstance(r0, tuple):
        return tuple(spread([r[j] for r in results]) for j in range(len(r0)))
    return spread(results)
