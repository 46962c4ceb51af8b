"""The accounting profiles as objects: one per engine, resolved from its name once, immutable, and
each answering by hand-worked numbers what its engine keeps and sends."""

import copy
import pickle

import numpy as np
import pytest

from shardwise import estimate, make_cluster
from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.estimate.profiles import (
    DEEPSPEED,
    MEGATRON,
    PROFILES,
    TORCH,
    ZERO_PAPER,
    Profile,
    profile,
)
from shardwise.search.core import Options, run_search
from shardwise.spec.plan import Plan


# ---- names in, objects out -----------------------------------------------------------------------
def test_each_name_resolves_to_its_one_object():
    assert list(PROFILES) == ["torch", "zero-paper", "megatron", "deepspeed"]  # the CLI's --profile choices
    for name, obj in PROFILES.items():
        assert profile(name) is obj and profile(obj) is obj
        assert obj.name == name and str(obj) == name and f"{obj}" == name
        assert isinstance(obj, Profile)


def test_unknown_profile_is_one_line_that_says_what_to_use():
    with pytest.raises(ShardwiseError, match=r"^unknown accounting profile 'torhc'; did you mean torch\?$"):
        profile("torhc")
    with pytest.raises(ShardwiseError, match="known: deepspeed, megatron, torch, zero-paper") as e:
        profile(None)
    assert "\n" not in str(e.value)
    with pytest.raises(ShardwiseError, match="unknown accounting profile 'fsdp'"):
        Options(profile="fsdp")  # the search's boundary resolves it too, before any plan is tried


def test_profiles_are_immutable_singletons():
    with pytest.raises(AttributeError, match="immutable"):
        TORCH.vocab_multiple = 128
    with pytest.raises(TypeError):
        MEGATRON.states["bf16-mixed"] = None  # the tables are read-only views
    assert pickle.loads(pickle.dumps(DEEPSPEED)) is DEEPSPEED
    assert copy.deepcopy(Options(profile="megatron")).profile is MEGATRON


def test_the_name_stays_the_public_api():
    opts = Options(profile="zero-paper")
    assert opts.profile is ZERO_PAPER and f"profile {opts.profile}" == "profile zero-paper"
    cl = make_cluster("h100-80gb", 8)
    by_name = estimate("gpt2-124m", cl, Plan(zero=1, seq=1024), "deepspeed")
    by_object = estimate("gpt2-124m", cl, Plan(zero=1, seq=1024), DEEPSPEED)
    assert by_name.profile == by_object.profile == "deepspeed"  # Estimate.profile and its JSON: the string
    assert by_name.to_dict() == by_object.to_dict()


# ---- what each keeps ---------------------------------------------------------------------------------
def test_bytes_per_parameter_with_adamw():
    # bf16-mixed AdamW, param + grad + master + 2 states: torch keeps the fp32 parameter as the
    # master, 4 + 4 + 0 + 8 = 16; the paper 2 + 2 + 4 + 8 = 16 (its 2 + 2 + K, K = 12); Megatron's fp32
    # main gradients 2 + 4 + 4 + 8 = 18; fp16 adds Megatron's fp32 copy of the gradients: 2 + 2 + 4 + 8 + 4;
    # DeepSpeed's fp32 gradient partition beside the paper's: 2 + 2 + 4 + 8 + 4 = 20
    got = {p.name: p.state_bytes("bf16-mixed").model_states for p in PROFILES.values()}
    assert got == {"torch": 16, "zero-paper": 16, "megatron": 18, "deepspeed": 20}
    assert MEGATRON.state_bytes("fp16-mixed").model_states == 20
    assert {p.state_bytes("bf16").model_states for p in PROFILES.values()} == {2 + 2 + 2 * 2}


def test_megatron_shards_only_the_optimizer_the_paper_shards_by_stage():
    sb = MEGATRON.state_bytes("bf16-mixed")  # 2-byte params, 4-byte main grads
    # n = 1000 elements, 12,000 optimizer bytes, dp = 8, ZeRO-3: the distributed optimizer divides
    # the optimizer part only: 2,000 + 4,000 + 12,000 / 8
    assert MEGATRON.model_states(sb, 1000, 12_000, 0, 8, 3) == (2000, 4000, 1500)
    assert MEGATRON.model_states(sb, 1000, 12_000, 0, 8, 0) == (2000, 4000, 12_000)
    paper = ZERO_PAPER.state_bytes("bf16-mixed")
    # P_os+g+p: 2,000 / 8, 2,000 / 8, 12,000 / 8 (rounded up per rank: 1,001 elements -> ceil(2002 / 8) = 251)
    assert ZERO_PAPER.model_states(paper, 1000, 12_000, 0, 8, 3) == (250, 250, 1500)
    assert ZERO_PAPER.model_states(paper, 1001, 12_012, 0, 8, 2) == (2002, 251, 1502)


def test_deepspeed_keeps_small_tensors_whole_at_zero3():
    sb = DEEPSPEED.state_bytes("bf16-mixed")
    # 1,000,000 elements of which 100,000 in tensors <= stage3_param_persistence_threshold:
    # params 2 * (100,000 + 900,000 / 8) = 425,000 bytes; the gradients live in the optimizer's fp32
    # partition (DeepSpeed's ZeRO-3 estimator counts 18 bytes / N: 2 + 4 + 4 + 8), none of their own
    assert DEEPSPEED.model_states(sb, 1_000_000, 12_000_000, 100_000, 8, 3) == (425_000, 0, 1_500_000)
    assert DEEPSPEED.model_states(sb, 1_000_000, 12_000_000, 100_000, 8, 2) == (2_000_000, 250_000, 1_500_000)


def test_deepspeed_states_are_its_estimators():
    # estimate_zero2_model_states_mem_needs: 2 = params_16bit, 18 = 2_grads_16bit + 4_grads_32bit +
    # 4_params_32bit + 8_optimizer_states_32bit; fp16 and bf16 alike, the paper's 16 elsewhere
    for prec in ("bf16-mixed", "fp16-mixed"):
        sb = DEEPSPEED.state_bytes(prec)
        assert (sb.param, sb.grad, sb.master + 2 * sb.state + sb.grad_copy) == (2, 2, 16)
    assert DEEPSPEED.state_bytes("fp32").model_states == ZERO_PAPER.state_bytes("fp32").model_states == 16


def test_deepspeed_buffers_and_nobody_elses():
    sb = DEEPSPEED.state_bytes("bf16-mixed")
    n, block, largest = 7_000_000_000, 200_000_000, 131_072_000
    # reduce bucket 2 bytes * min(5e8, n) = 1e9; ZeRO-3: the largest layer's 16-bit parameters and
    # gradients, 4 * 131,072,000 (estimate_zero3_model_states_mem_needs' largest_layer_memory)
    assert DEEPSPEED.buffers(sb, n, block, 3, largest) == {
        "buffers.ds_reduce_bucket": 1_000_000_000,
        "buffers.ds_largest_layer": 524_288_000,
    }
    # ZeRO-1/2: an all-gather bucket of 5e8 parameters too; a small model's buckets are the model
    assert DEEPSPEED.buffers(sb, n, block, 1)["buffers.ds_allgather_bucket"] == 1_000_000_000
    assert DEEPSPEED.buffers(sb, 1000, 100, 0) == {"buffers.ds_reduce_bucket": 2000}
    assert (
        TORCH.buffers(sb, n, block, 3) == ZERO_PAPER.buffers(sb, n, block, 3) == MEGATRON.buffers(sb, n, block, 1) == {}
    )


# ---- what each sends ---------------------------------------------------------------------------------
def test_dtypes_on_the_wire():
    plan = Plan(zero=3, dp=8, precision="bf16-mixed")
    # FSDP2 mixed precision: fp32 shards, gathered in bf16, reduce-scattered in fp32, computing in bf16
    assert TORCH.dtypes(plan) == {"P": 4, "grad": 4, "gather": 2, "reduce": 4, "resid": 2, "mm": 2}
    # Megatron reduces fp32 main gradients; the paper moves everything in 16 bits
    assert MEGATRON.dtypes(plan) == {"P": 2, "grad": 4, "gather": 2, "reduce": 4, "resid": 2, "mm": 2}
    assert set(ZERO_PAPER.dtypes(plan).values()) == {2}
    assert set(DEEPSPEED.dtypes(plan.replace(precision="fp32")).values()) == {4}


def test_send_tables_by_zero_stage():
    assert TORCH.sends is None  # its engines' own collectives, bucket by bucket (comm._torch_dp)
    for p in (ZERO_PAPER, MEGATRON, DEEPSPEED):
        assert sorted(p.sends) == [0, 1, 2, 3] and p.sends[1] == p.sends[2]  # ZeRO-1 and 2 send the same
        assert [s.kind for s in p.sends[0]] == ["all-reduce"]
        assert [s.kind for s in p.sends[1]] == ["reduce-scatter", "all-gather"]
        assert [s.kind for s in p.sends[3]] == ["all-gather", "all-gather", "reduce-scatter"]
        assert all(s.per_micro_batch for s in p.sends[3]) and not p.sends[1][1].overlapped


def test_bucket_elements():
    # Megatron: max(40M, 1M * dp) elements; DeepSpeed: its fixed sizes; the paper: one call
    rs = MEGATRON.sends[1][0]
    assert rs.bucket_elements(8) == 40_000_000 and rs.bucket_elements(64) == 64_000_000
    assert rs.bucket_elements(np.array([8, 64])).tolist() == [40_000_000, 64_000_000]
    assert DEEPSPEED.sends[3][0].bucket_elements(64) == 50_000_000  # stage3_prefetch_bucket_size
    assert ZERO_PAPER.sends[0][0].bucket_elements(64) is None
    assert MEGATRON.sends[3][0].bucket_elements(64) is None  # ZeRO-3 gathers: one call per micro-batch


# ---- what each engine can run: the search proposes only that; a strict profile refuses the rest -----
def test_megatron_has_no_zero_2_3_nor_parameter_offload():
    m, c = "llama-2-7b", make_cluster("h100-80gb", 8)
    for plan, words in (
        (Plan(zero=3, seq=4096), "no ZeRO-3"),
        (Plan(zero=2, seq=4096), "no ZeRO-2"),
        (Plan(zero=3, seq=4096, offload="params"), "no ZeRO-3"),
    ):
        with pytest.raises(ShardwiseError, match=words) as e:
            estimate(m, c, plan, "megatron")
        assert "\n" not in str(e.value) and "--profile megatron" in str(e.value)
    assert estimate(m, c, Plan(zero=1, seq=4096), "megatron").memory.total > 0  # the distributed optimizer
    offload = next(r for r in MEGATRON.rules if "offload" in r.message(Plan(offload="params"), None, 8))
    assert offload.broken(Plan(dp=8, zero=1, offload="params"), None, 8)
    assert not offload.broken(Plan(dp=8, zero=1, offload="optimizer"), None, 8)
    assert MEGATRON.strict and not TORCH.strict and not ZERO_PAPER.rules and not DEEPSPEED.rules


def test_torch_estimates_what_run_cannot_train_with_a_note():
    est = estimate("llama-2-7b", make_cluster("h100-80gb", 8), Plan(zero=1, offload="optimizer"), "torch")
    assert any(n.startswith("PyTorch's engines") and "optimizer-only offload" in n for n in est.notes)


def test_the_megatron_search_proposes_only_what_megatron_runs():
    from shardwise.search.core import run_search

    res = run_search("llama-2-7b", make_cluster("h100-80gb", 8), profile="megatron", top=50, seq=4096)
    assert res.fits and len(res.ranked) == 50
    assert all(e.plan.zero <= 1 and e.plan.offload != "params" for e in res.ranked)
    assert {e.plan.zero for e in res.ranked} == {0, 1}
    # pinned into nothing-fits, the relaxed retries stay inside the profile too
    res = run_search("llama-3.1-70b", make_cluster("h100-80gb", 8), profile="megatron", tp=1, pp=1)
    assert not res.fits and res.closest is not None and res.closest.plan.zero <= 1


# ---- the search under each profile proposes only what its engine runs ---------------------------
def test_megatron_search_proposes_only_what_megatron_runs(capsys):
    res = run_search("llama-2-7b", make_cluster("a100-80gb", 8), profile="megatron", top=None)
    assert res.ranked and all(e.plan.zero <= 1 and e.plan.offload != "params" for e in res.ranked)
    # nothing fits: the search relaxes the pins it may and still proposes no ZeRO-2/3 nor parameter
    # offload; the answer is one line and exit 2, never a traceback
    assert main(["plan", "llama-2-70b", "--gpu", "a100-80gb", "--gpus", "2", "--profile", "megatron"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit on 2x a100-80gb" in err and "zero1" in err
    assert "Traceback" not in err and "zero3" not in err and "offload-params" not in err
