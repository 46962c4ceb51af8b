"""Plan: derivation of dp / gbs / grad_accum, and every validation rule's one-line refusal."""

import pytest

from shardwise import Plan, ShardwiseError, preset
from shardwise.spec.plan import RULES, violation

L2_70B = preset("llama-2-70b")  # 80 layers, 64 heads, 8 KV heads, ffn 28672
GPT2 = preset("gpt2-124m")  # learned positions, max_seq 1024, 12 heads


def test_dp_and_gbs_are_derived():
    # 64 GPUs / (tp 8 * pp 2) = dp 4; gbs 512 / (dp 4 * mbs 1) = 128 micro-batches per rank
    p = Plan(tp=8, pp=2, mbs=1, gbs=512, seq=4096).resolve(L2_70B, 64)
    assert (p.dp, p.grad_accum, p.world) == (4, 128, 64)
    assert p.tokens_per_step == 512 * 4096
    # no gbs: one micro-batch per rank, gbs = dp * mbs = 8 * 2
    q = Plan(mbs=2).resolve(L2_70B, 8)
    assert (q.dp, q.gbs, q.grad_accum) == (8, 16, 1)


@pytest.mark.parametrize(
    "plan, gpus, words",
    [
        (Plan(dp=3, tp=8, pp=2), 64, "dp*tp*pp = 3*8*2 = 48 but there are 64 GPUs"),
        (Plan(tp=3), 24, "tp=3 must divide the attention heads (64) and KV heads (8)"),
        (Plan(tp=16), 16, "tp=16 must divide the attention heads (64) and KV heads (8)"),
        (Plan(pp=81), 81, "pp=81 is more stages than"),
        (Plan(pp=3, vpp=2, schedule="interleaved", gbs=24), 24, "uneven stages are modeled for gpipe and 1f1b only"),
        (Plan(pp=3, last_less=2), 24, "use --last-less 1 (or that plus a multiple of 3)"),
        (Plan(gbs=100, mbs=1), 8, "global batch 100 is not a multiple of dp*mbs = 8*1 = 8"),
        (Plan(vpp=2, pp=2), 8, "vpp=2 needs --schedule interleaved"),
        (Plan(schedule="interleaved"), 8, "the interleaved schedule needs pp > 1"),
        (Plan(schedule="interleaved", pp=4, vpp=2, gbs=6, mbs=1), 8, "multiple of pp=4"),
        (Plan(sp=True), 8, "sequence parallel (--sp) needs tp > 1"),
        (Plan(sp=True, tp=8, seq=4095), 8, "seq=4095 must be a multiple of tp=8"),
        (Plan(offload="optimizer"), 8, "optimizer offload needs ZeRO >= 1"),
        (Plan(offload="params", zero=2), 8, "parameter offload needs ZeRO-3"),
    ],
)
def test_each_rule_refuses_with_one_line(plan, gpus, words):
    with pytest.raises(ShardwiseError) as e:
        plan.resolve(L2_70B, gpus)
    msg = str(e.value)
    assert words in msg and "\n" not in msg


def test_learned_positions_cap_the_sequence():
    with pytest.raises(ShardwiseError, match="exceeds gpt2-124m's learned position table"):
        Plan(seq=2048).resolve(GPT2, 1)
    assert Plan(seq=1024).resolve(GPT2, 1).seq == 1024


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"schedule": "1fb1"}, "unknown schedule '1fb1'; did you mean 1f1b?"),
        ({"recompute": "ful"}, "unknown recompute 'ful'"),
        ({"precision": "bf32"}, "unknown precision"),
        ({"zero": 4}, "ZeRO stage must be 0, 1, 2 or 3"),
        ({"tp": 0}, "tp must be a positive integer"),
        ({"mbs": -1}, "mbs must be a positive integer"),
        ({"seq": 2.5}, "seq must be a positive integer"),
        ({"gbs": -8}, "gbs must be a non-negative integer"),
    ],
)
def test_bad_values_are_refused(kw, words):
    with pytest.raises(ShardwiseError, match=words.replace("?", r"\?").replace("(", r"\(")):
        Plan(**kw).resolve(L2_70B, 8)


def test_tp_that_does_not_divide_the_gpus_when_dp_is_derived():
    with pytest.raises(ShardwiseError, match="tp\\*pp = 16 does not divide 24 GPUs"):
        Plan(tp=8, pp=2).resolve(L2_70B, 24)


def test_rules_work_on_arrays_like_on_scalars():
    """The search evaluates RULES on array plans; each element must match the scalar verdict."""
    np = pytest.importorskip("numpy")
    combos = [(dp, tp, pp, mbs) for dp in (1, 2, 3) for tp in (1, 2, 3, 8) for pp in (1, 2, 3) for mbs in (1, 2)]
    arr = Plan(
        dp=np.array([c[0] for c in combos]),
        tp=np.array([c[1] for c in combos]),
        pp=np.array([c[2] for c in combos]),
        mbs=np.array([c[3] for c in combos]),
        gbs=np.full(len(combos), 24),
        seq=np.full(len(combos), 4096),
        vpp=np.ones(len(combos), dtype=int),
    )
    for rule in RULES:
        mask = np.broadcast_to(rule.broken(arr, L2_70B, 48), (len(combos),))
        for i, (dp, tp, pp, mbs) in enumerate(combos):
            scalar = Plan(dp=dp, tp=tp, pp=pp, mbs=mbs, gbs=24, seq=4096)
            assert bool(mask[i]) == bool(rule.broken(scalar, L2_70B, 48)), (rule.reason, combos[i])
    # and violation() finds nothing wrong with a plan that breaks no rule
    assert violation(Plan(dp=3, tp=8, pp=2, gbs=24, seq=4096), L2_70B, 48) is None


def test_engine_rules_name_what_pytorch_cannot_train():
    """The `torch` profile's search skips these; `shardwise run` refuses them with the same words."""
    from shardwise.spec.plan import engine_violation

    m = preset("llama-2-7b")
    ok = Plan(dp=8, zero=3, offload="params").resolve(m, 8)
    assert engine_violation(ok, m) is None
    assert "optimizer-only offload has no PyTorch engine" in engine_violation(
        Plan(zero=1, offload="optimizer").resolve(m, 8), m
    )
    assert "needs dp > 1" in engine_violation(Plan(zero=3, offload="params").resolve(m, 1), m)
    assert "bitsandbytes" in engine_violation(Plan(optimizer="adam8bit").resolve(m, 8), m)
    assert "adafactor needs whole parameters" in engine_violation(Plan(optimizer="adafactor", tp=2).resolve(m, 8), m)
    assert engine_violation(Plan(optimizer="adafactor", zero=1).resolve(m, 8), m) is None
    g = preset("gpt2-124m")  # tied embeddings: DDP + TP cannot hold them, FSDP2 can
    assert "ties its embeddings" in engine_violation(Plan(tp=2, zero=1, seq=1024).resolve(g, 4), g)
    assert engine_violation(Plan(tp=2, zero=2, seq=1024).resolve(g, 4), g) is None
    # zero-bubble schedules over dp or cp ranks train right only under ZeRO-2; dp = cp = 1 needs no reduction
    for z in (0, 1, 3):
        for sched, extra in (("zbv", {}), ("interleaved-zb", {"vpp": 2}), ("dualpipev", {})):
            bad = Plan(pp=2, zero=z, schedule=sched, mbs=1, gbs=8, **extra).resolve(m, 4)
            assert "does not reduce correctly" in engine_violation(bad, m)
    assert "does not reduce correctly" in engine_violation(
        Plan(pp=2, cp=2, schedule="zbv", mbs=1, gbs=8, seq=1024).resolve(m, 4), m
    )
    assert engine_violation(Plan(pp=2, zero=2, schedule="zbv", mbs=1, gbs=8).resolve(m, 4), m) is None
    assert engine_violation(Plan(pp=2, zero=2, dp_shard=2, schedule="zbv", mbs=1, gbs=16).resolve(m, 8), m) is None
    assert engine_violation(Plan(pp=2, schedule="zbv", mbs=1, gbs=8).resolve(m, 2), m) is None
    assert engine_violation(Plan(pp=2, zero=0, schedule="1f1b", mbs=1, gbs=8).resolve(m, 4), m) is None


def test_search_never_recommends_what_run_cannot_train():
    from shardwise import make_cluster, search
    from shardwise.spec.plan import engine_violation

    m = preset("gpt2-124m")
    for e in search(m, make_cluster("rtx-4090", 4), top=None, gbs=16, seq=512):
        assert engine_violation(e.plan, m) is None, e.plan.short()
