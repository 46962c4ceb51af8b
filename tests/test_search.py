"""The search against the plain one-plan estimate: the same plans, the same numbers, the same order;
what it drops and why; the fewest-GPUs scan; bad requests."""

from __future__ import annotations

import dataclasses
import random

import pytest

from shardwise import Plan, ShardwiseError, estimate, make_cluster, preset, search
from shardwise.search.core import Options, capacity_bound, fewest_gpus, fitting_space, rank_key, run_search
from shardwise.search.space import OFFLOAD_ORDER, RECOMPUTE_ORDER
from shardwise.search.vectorized import offloaded_bytes
from shardwise.spec.hardware import GIB, Cluster
from shardwise.spec.plan import engine_violation, violation

FIELDS = (
    "dp",
    "tp",
    "pp",
    "zero",
    "mbs",
    "gbs",
    "seq",
    "schedule",
    "vpp",
    "recompute",
    "sp",
    "precision",
    "optimizer",
    "offload",
    "dp_shard",
    "last_less",
)


def key(p: Plan) -> tuple:
    return tuple(getattr(p, f) for f in FIELDS)


def small_gpu(cluster: Cluster, gib: float) -> Cluster:
    """The same cluster with less memory per GPU, so that small models feel memory pressure."""
    return dataclasses.replace(cluster, gpu=dataclasses.replace(cluster.gpu, memory_gib=gib))


def generated(space) -> list[Plan]:
    """Every candidate of a Space as scalar plans, in the order the fast path generates them."""
    out = []
    for fam in space.families():
        grid = space.grid(fam["sp"], fam["schedule"], fam["zero"] >= 2)
        for var in space.variants():
            out += [space.scalar(grid, fam | var, i) for i in range(len(grid["dp"]))]
    return out


def lighter(p: Plan) -> list[Plan]:
    """The same plan with less recompute and/or less offload (never both equal)."""
    r, o = RECOMPUTE_ORDER.index(p.recompute), OFFLOAD_ORDER.index(p.offload)
    return [
        p.replace(recompute=rc, offload=off)
        for i, rc in enumerate(RECOMPUTE_ORDER)
        for j, off in enumerate(OFFLOAD_ORDER)
        if i <= r and j <= o and (i, j) != (r, o)
    ]


def brute_force(model, cluster, fixed: dict, opts: Options) -> list:
    """The search done the slow way: every candidate through `violation` (and, as the `torch` profile
    recommends only what `shardwise run` can train, `engine_violation`) and the plain `estimate`,
    one at a time; keep what fits (GPU memory with headroom, CPU memory for offload), drop a plan
    when a lighter recompute/offload variant of it fits, rank by tokens/s, then memory, then the
    generation order. Returns [(plan key, Estimate)] best first."""
    space = fitting_space(model, cluster, fixed, opts)[0]
    fits, rows = {}, []
    for n, p in enumerate(generated(space)):
        if violation(p, model, cluster.gpus) or engine_violation(p, model):  # the torch profile: runnable only
            continue
        e = estimate(model, cluster, p)
        host = offloaded_bytes(model, cluster, p, "torch") * space.node_size
        fits[key(p)] = e.memory.total <= (1 - opts.headroom) * e.memory.capacity and host <= opts.host_bytes(cluster)
        rows.append((n, p, e))
    kept = [
        (float(rank_key(e.time.tokens_per_s, cluster.gpus, "throughput")), e.memory.total, n, key(p), e)
        for n, p, e in rows
        if fits[key(p)] and not any(fits.get(key(q)) for q in lighter(p))
    ]
    kept.sort(key=lambda r: r[:3])
    return [(r[3], r[4]) for r in kept]


# ---- the fast path is the plain estimate --------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [
        # GPT-2 124M on 4 GPUs of 4 GiB: DDP does not fit, sharding and recompute do; offload hits a
        # small CPU memory (--host-memory 1) on some plans
        (
            "gpt2-124m",
            small_gpu(make_cluster("rtx-4090", 4), 4.0),
            {"gbs": 16, "seq": 512},
            Options(host_memory_gib=1.0),
        ),
        # two 4-GPU nodes over Ethernet: tp inside a node, dp/pp across; pinned ZeRO-1 and sp off
        ("tiny-llama", make_cluster("rtx-4090", 8, 4), {"gbs": 16, "seq": 64, "zero": 1, "sp": False}, Options()),
    ],
)
def test_fast_path_ranks_exactly_as_plain_estimates(case):
    name, cluster, fixed, opts = case
    model = preset(name)
    want = brute_force(model, cluster, fixed, opts)
    res = run_search(model, cluster, top=None, headroom=opts.headroom, host_memory_gib=opts.host_memory_gib, **fixed)
    assert len(want) > 5 and res.tally.fit > len(want) - 1  # a real ranking, not a trivial one
    assert [key(e.plan) for e in res.ranked] == [k for k, _ in want]
    # the vectorized numbers (the table the ranking used) equal the one-plan estimates bit for bit
    for row, (_, e) in zip(res.order, want):
        assert res.table.cols["tokens_per_s"][row] == e.time.tokens_per_s
        assert res.table.cols["mem_total"][row] == e.memory.total


def test_sampled_plans_agree_on_a_larger_search():
    """Llama-3.1-8B on 16 H100s (2 nodes): 200 random candidates, each either in the ranked table
    with its plain estimate's numbers, or out of it for a reason the plain estimate confirms."""
    model, cluster = preset("llama-3.1-8b"), make_cluster("h100-80gb", 16)
    fixed, opts = {"gbs": 64, "seq": 4096}, Options()
    res = run_search(model, cluster, top=None, **fixed)
    rows = {key(e.plan): i for i, e in enumerate(res.ranked)}
    space = fitting_space(model, cluster, fixed, opts)[0]
    plans = generated(space)
    budget = (1 - opts.headroom) * cluster.gpu.memory_bytes

    def illegal(p):  # a Plan rule, or (the torch profile) a limit of PyTorch's engines
        return violation(p, model, 16) or engine_violation(p, model)

    def fits(p):
        return not illegal(p) and estimate(model, cluster, p).memory.total <= budget

    seen = {"ranked": 0, "illegal": 0, "too big": 0, "dominated": 0}
    for p in random.Random(3).sample(plans, 200):
        if key(p) in rows:
            e, got = estimate(model, cluster, p), res.ranked[rows[key(p)]]
            assert (got.time.tokens_per_s, got.memory.total) == (e.time.tokens_per_s, e.memory.total)
            seen["ranked"] += 1
        elif illegal(p):
            seen["illegal"] += 1
        elif not fits(p):
            seen["too big"] += 1
        else:
            assert any(fits(q) for q in lighter(p)), p.short()
            seen["dominated"] += 1
    assert min(seen.values()) > 0, seen  # the sample exercised every fate


def test_more_recompute_or_offload_is_never_faster():
    """Why a heavier variant of a fitting plan may go unestimated: the time model never makes it
    faster. Checked on plans of three shapes (DDP/ZeRO, TP+SP, PP) for every lighter variant."""
    cases = [
        ("llama-3.1-8b", make_cluster("h100-80gb", 16), Plan(tp=2, pp=2, zero=3, mbs=1, gbs=64, seq=4096, sp=True)),
        ("llama-2-7b", make_cluster("a100-80gb", 8), Plan(zero=3, mbs=2, gbs=64)),
        ("gpt2-1.5b", make_cluster("rtx-4090", 4), Plan(pp=2, zero=1, mbs=1, gbs=64, seq=1024)),
    ]
    checked = 0
    for name, cluster, base in cases:
        for rc in RECOMPUTE_ORDER:
            for off in OFFLOAD_ORDER:
                p = base.replace(recompute=rc, offload=off)
                if off == "params" and p.zero != 3:
                    continue
                heavy = estimate(name, cluster, p)
                for q in lighter(p):
                    if q.offload == "optimizer" and q.zero == 0:
                        continue
                    assert estimate(name, cluster, q).time.step_s <= heavy.time.step_s, (q.short(), p.short())
                    checked += 1
    assert checked > 40


def test_every_returned_plan_fits_with_headroom_and_is_legal():
    cluster = make_cluster("a100-80gb", 8)
    for e in search("llama-2-7b", cluster, top=None, gbs=256):
        assert violation(e.plan, e.model, 8) is None
        assert e.memory.total <= 0.9 * e.memory.capacity
    tight = search("llama-2-7b", cluster, top=None, gbs=256, headroom=0.3)
    assert tight and all(e.memory.total <= 0.7 * e.memory.capacity for e in tight)


def test_offloaded_bytes_come_from_the_memory_estimate():
    """ZeRO-3 over 8 with parameter offload moves the shard's parameters, gradients and AdamW
    states off the GPU: the difference of two plain memory estimates."""
    cluster = make_cluster("a100-80gb", 8)
    p = Plan(dp=8, zero=3, mbs=1, gbs=64, seq=2048, offload="params")
    on, off = estimate("llama-2-70b", cluster, p.replace(offload="none")), estimate("llama-2-70b", cluster, p)
    states = lambda e: e.memory.params + e.memory.grads + e.memory.optimizer
    moved = offloaded_bytes(preset("llama-2-70b"), cluster, p, "torch")
    assert moved == states(on) - states(off)
    # about 16 bytes per parameter (fp32 master, fp32 gradient, two fp32 AdamW moments) / 8 ranks:
    # 68,976,648,192 * 16 / 8 = 137.95e9 bytes, less the few GPU-resident unsharded pieces
    assert 0.97 * 68_976_648_192 * 16 / 8 < moved <= 68_976_648_192 * 16 / 8 * 1.01


def test_host_memory_limits_offload():
    """LLaMA-2-70B on 8x A100: on PyTorch's engines only FSDP2's parameter offload fits, and it
    moves 16 bytes/param to the host: with 2 TiB per node it fits, with the default 1 TiB (128 GiB
    per GPU) it does not, and then nothing fits at all."""
    cluster = make_cluster("a100-80gb", 8)
    res = run_search("llama-2-70b", cluster, host_memory_gib=2048, top=3)
    assert res.ranked and all(e.plan.offload != "none" for e in res.ranked)
    moved = offloaded_bytes(res.model, cluster, res.ranked[0].plan, "torch") * 8
    assert moved <= 0.9 * 2048 * GIB
    with pytest.raises(ShardwiseError, match="does not fit on 8x a100-80gb with any plan"):
        run_search("llama-2-70b", cluster, host_memory_gib=1024)


# ---- the global batch ------------------------------------------------------------------------
def test_default_gbs_falls_back_to_a_batch_some_plan_fits():
    """Llama-3.1-405B on 16,384 H100s at seq 8192: ~4M tokens is 512 sequences. With uneven
    pipeline stages every power-of-two pp is open (126 layers: 15 x 8 + 6 at pp 16), so dp 512
    and below serve that batch and pipelined plans fit it: no fallback is needed. Pinned to pp 2
    and the batch 1024, nothing fits (a pipeline stage accumulates its unsharded gradients:
    405B/16 * 4 bytes = 101 GB), and a pinned batch has no fallback."""
    res = run_search("llama-3.1-405b", make_cluster("h100-80gb", 16384), seq=8192, top=3)
    assert res.gbs == 512 and res.ranked
    assert all(e.plan.gbs == 512 and e.plan.pp > 2 for e in res.ranked)
    pinned = run_search(
        "llama-3.1-405b", make_cluster("h100-80gb", 16384), seq=8192, gbs=1024, zero=3, tp=8, pp=2, top=1
    )
    assert not pinned.ranked  # pinned: no fallback, the answer is "nothing fits" (exit 1)


# ---- the fewest GPUs -------------------------------------------------------------------------
def test_fewest_gpus_fits_there_and_not_below():
    """LLaMA-2-70B on A100-80GB without offload: the lecture's rule of thumb says
    ceil(70e9 * 18 / 80e9) = 16 GPUs; the search's answer must fit and every smaller count tried
    (1, 2, 4, 8, then whole nodes) must not."""
    cl = make_cluster("a100-80gb", 8)
    opts = Options()
    n = fewest_gpus("llama-2-70b", cl, {"offload": "none"}, opts)
    assert n is not None and n % 8 == 0 and n >= 16
    fits = lambda g: fitting_space(
        preset("llama-2-70b"),
        Cluster(cl.gpu, g, 8, cl.network),
        {"offload": "none"},
        opts,
    )[1]
    assert fits(n)
    assert not any(fits(g) for g in [1, 2, 4] + list(range(8, n, 8)))


def test_capacity_bound_by_hand():
    """LLaMA-2-70B, torch bf16-mixed AdamW: 4 (fp32 parameter, the master) + 8 (two moments) = 12
    bytes x 68,976,648,192 = 827.7e9 bytes. An A100-80GB offers 0.9 * 80 GiB = 77.3e9 on the GPU
    plus 0.9 * 1024 GiB / 8 = 123.7e9 of its node's CPU memory: 201.0e9 -> at least 5 GPUs;
    without CPU memory (--host-memory 0): 827.7 / 77.3 -> 11."""
    m, cl = preset("llama-2-70b"), make_cluster("a100-80gb", 8)
    assert capacity_bound(m, cl, {}, Options()) == 5
    assert capacity_bound(m, cl, {}, Options(host_memory_gib=0)) == 11
    # pure bf16 halves every byte: 6 x 68.98e9 / 77.3e9 -> 6
    assert capacity_bound(m, cl, {"precision": "bf16"}, Options(host_memory_gib=0)) == 6


def test_larger_gpu_is_the_smallest_catalog_gpu_that_fits():
    """Bisection over the catalog (by memory) gives what trying each GPU in order gives."""
    from shardwise.search.core import larger_gpu
    from shardwise.spec.hardware import gpus

    cl, opts, fixed = make_cluster("a100-80gb", 8), Options(), {"offload": "none"}
    got = larger_gpu(preset("llama-2-70b"), cl, fixed, opts)
    bigger = sorted((g for g in gpus().values() if g.memory_gib > 80), key=lambda g: (g.memory_gib, g.name))
    first = next(
        g for g in bigger if fitting_space(preset("llama-2-70b"), dataclasses.replace(cl, gpu=g), fixed, opts)[1]
    )
    assert got == first and got.memory_gib > 80


def test_fewest_gpus_below_a_node():
    # GPT-2 124M fits on one 24 GB card
    assert fewest_gpus("gpt2-124m", make_cluster("rtx-4090", 1), {"seq": 1024}, Options()) == 1


# ---- bad requests: one line, ShardwiseError ---------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"tp": 3}, "tp=3 must divide the attention heads"),
        ({"gbs": 3, "pp": 1}, "global batch 3 is not a multiple of dp\\*mbs"),  # pp=1: dp >= 16/8 = 2
        ({"pp": 4, "last_less": 3}, "--last-less 3: 32 \\+ 3 is not a multiple of the 4 stages"),
        ({"sp": True, "tp": 1}, "sequence parallel \\(--sp\\) needs tp > 1"),
        ({"offload": "params", "zero": 1}, "parameter offload needs ZeRO-3"),
        ({"dp": 5}, "dp\\*tp\\*pp = 5"),
        ({"zero": 7}, "ZeRO stage must be 0, 1, 2 or 3"),
        ({"pipeline": 2}, "unknown plan field 'pipeline'"),
        ({"headroom": 1.5}, "headroom must be a fraction"),
        ({"rank": "cost"}, "ranking by cost needs a token budget"),
    ],
)
def test_impossible_requests_are_one_line_errors(kw, match):
    with pytest.raises(ShardwiseError, match=match) as e:
        run_search("llama-2-7b", make_cluster("h100-80gb", 16), **({"gbs": 64} | kw if "gbs" not in kw else kw))
    assert "\n" not in str(e.value)


def test_a_model_no_plan_can_fit_is_an_error_naming_what_would():
    with pytest.raises(ShardwiseError) as e:
        run_search("llama-3.1-405b", make_cluster("rtx-4090", 4), seq=2048, host_memory_gib=64)
    msg = str(e.value)
    assert "does not fit on 4x rtx-4090 with any plan" in msg and "\n" not in msg
    # 405B * 12 bytes (fp32 parameter + two AdamW moments) over (21.6 GiB + 64 GiB * 0.9 / 8) per GPU
    bound = capacity_bound(preset("llama-3.1-405b"), make_cluster("rtx-4090", 4), {}, Options(host_memory_gib=64))
    assert f"alone need {bound} such GPUs" in msg and bound > 100


def test_nothing_fits_under_pins_is_an_answer_not_an_error():
    """Pinned DDP cannot hold LLaMA-2-7B's 16 bytes/param on an A100-80GB: [] from search(), and
    run_search keeps the closest plan (the least memory over) to explain."""
    cluster = make_cluster("a100-80gb", 8)
    assert search("llama-2-7b", cluster, zero=0, tp=1, pp=1, gbs=64) == []
    res = run_search("llama-2-7b", cluster, zero=0, tp=1, pp=1, gbs=64)
    assert res.closest is not None and res.closest.memory.total > 0.9 * res.closest.memory.capacity
    # params + grads + AdamW states in fp32: 6,738,415,616 * 16 bytes = 107.8e9 > 72 GiB usable
    c = res.closest.memory
    assert c.params + c.grads + c.optimizer >= 6_738_415_616 * 16
