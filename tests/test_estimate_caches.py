"""The estimate tier's caches and shortcuts change no number: a memoized formula gives on arrays
exactly what it gives element by element and runs once per distinct combination, and the
single-stage shortcut (pp = 1: the first pipeline stage's rank is the last's) holds."""

import numpy as np
import pytest

from shardwise.estimate._num import memo, per_unique
from shardwise.estimate.memory import memory
from shardwise.spec.hardware import make_cluster
from shardwise.spec.plan import Plan
from shardwise.spec.presets import preset


def counted(fn):
    calls = []

    def f(*args):
        calls.append(args)
        return fn(*args)

    return f, calls


def test_memo_on_arrays_equals_the_scalar_formula_once_per_combination():
    # a loop over "parameter groups", as the memory model's sums are: sum of d // tp over (4096, 11008, 32000)
    f, calls = counted(lambda model, tp, dp: {"sum": sum(d // tp for d in (4096, 11008, 32000)) * dp, "dp": dp})
    g = memo(f)
    tp = np.array([1, 2, 8, 2, 1, 8, 2])
    dp = np.array([8, 4, 1, 4, 8, 1, 2])
    got = g("m", tp, dp)
    # tp=2: 2048 + 5504 + 16000 = 23552; x dp=4 = 94208 (elements 1 and 3), x dp=2 = 47104 (element 6)
    assert got["sum"][1] == got["sum"][3] == 94_208 and got["sum"][6] == 47_104
    for i in range(len(tp)):
        assert got["sum"][i] == f("m", int(tp[i]), int(dp[i]))["sum"] and got["dp"][i] == dp[i]
    assert got["sum"].dtype == np.int64 and got["sum"].shape == (7,)
    calls.clear()
    g("m", tp, dp)
    assert calls == []  # every combination is in the table now
    g("m", np.array([2, 4]), np.array([4, 4]))
    assert calls == [("m", 4, 4)]  # only the new one is computed
    assert g("m", 2, 4) == {"sum": 94_208, "dp": 4}  # scalars: the plain (lru-cached) function


def test_memo_keeps_tables_apart_by_the_scalar_arguments_and_broadcasts():
    g = memo(lambda model, k, a, b: {"x": k * a + b})
    a, b = np.array([[1, 2], [3, 4]]), np.array([10, 20])  # broadcast to 2 x 2
    assert g("m", 1, a, b)["x"].tolist() == [[11, 22], [13, 24]]
    assert g("m", 100, a, b)["x"].tolist() == [[110, 220], [310, 420]]


def test_memo_falls_back_outside_its_packed_key():
    g = memo(lambda model, a, b: {"x": a - b})
    big = np.array([1 << 40, 3])  # two columns get 31 bits each in the packed key: not this
    assert g("m", big, np.array([1, 1]))["x"].tolist() == [(1 << 40) - 1, 2]
    assert g("m", np.array([-5, 5]), np.array([1, 1]))["x"].tolist() == [-6, 4]
    empty = g("m", np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert empty["x"].shape == (0,)


def test_per_unique_structures():
    f, calls = counted(lambda a, b: (a + b, a * b))
    s, p = per_unique(f, np.array([1, 2, 1]), np.array([3, 3, 3]))
    assert s.tolist() == [4, 5, 4] and p.tolist() == [3, 6, 3] and len(calls) == 2
    assert per_unique(
        lambda a: a * 2,
        np.array([5, 5]),
    ).tolist() == [10, 10]


# ---- pp = 1: memory() examines one rank, the first stage's, and it is the last stage's too -------
@pytest.mark.parametrize("profile", ["torch", "zero-paper", "megatron", "deepspeed"])
@pytest.mark.parametrize("model", ["llama-3.1-8b", "gpt2-124m", "mixtral-8x7b"])
def test_one_stage_is_both_first_and_last(profile, model):
    m, cluster = preset(model), make_cluster("h100-80gb", 8)
    for zero in range(4):
        for kw in (
            dict(tp=1),
            dict(tp=2, sp=True, recompute="selective"),
            dict(tp=8, recompute="full"),
            dict(tp=1, precision="fp32", optimizer="adafactor"),
            dict(tp=2, precision="bf16", mbs=2, gbs=64),
        ):
            if kw.get("tp", 1) > 1 and m.kv_heads % kw["tp"]:
                continue
            plan = Plan(zero=zero, seq=1024, **kw).resolve(m, 8)
            for attention in ("flash", "math"):
                first = memory(m, cluster, plan, profile, attention=attention, stage="first")
                last = memory(m, cluster, plan, profile, attention=attention, stage="last")
                worst = memory(m, cluster, plan, profile, attention=attention)
                assert first.to_dict() == last.to_dict() == worst.to_dict(), (profile, zero, kw, attention)


def test_memo_refuses_non_integers_rather_than_truncate():
    g = memo(lambda model, a: {"x": a / 2})
    assert g("m", 3) == {"x": 1.5}  # one plan: the function itself
    with pytest.raises(TypeError, match="int64"):
        g("m", np.array([3, 4]))
