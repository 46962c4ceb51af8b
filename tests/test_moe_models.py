"""The mixture-of-experts presets and config.json readers: each derived total and active count held
to the figure its publisher states, worked by hand; the readers' refusals, one line each.

The publishers state rounded counts (DeepSeek-V3 "671B / 37B", Qwen3's model cards "30.5B / 3.3B"),
some cut (37.55B is stated as 37B, 3.353B as 3.3B), some rounded (Qwen3-235B's non-embedding
233.85B as 234B, Qwen3-8B's 6.946B as 6.95B). `_stated` holds the derived count to less than one
unit of the stated figure's last digit, which either reading meets and a wrong layout does not."""

import json
import math
from pathlib import Path

import pytest

from shardwise.errors import ShardwiseError
from shardwise.spec.hf import from_hf_config
from shardwise.spec.model import ModelSpec
from shardwise.spec.presets import load_model, preset

DATA = Path(__file__).parent / "data" / "hf"


def _stated(count: int, figure: float, unit: float) -> bool:
    """`count` is within one unit of the last digit of `figure` (in `unit`s: 30.5 of 1e9)."""
    digits = len(repr(figure).partition(".")[2].rstrip("0")) if "." in repr(figure) else 0
    return abs(count / (unit / 10**digits) - round(figure * 10**digits)) < 1


def test_deepseek_v3_by_hand():
    # MLA attention per block (DeepSeek-V3 §2.1.1), h = 7168, 128 heads:
    #   wq_a 7168*1536 = 11,010,048; q_norm 1536; wq_b 1536 * 128*(128+64) = 37,748,736
    #   wkv_a 7168*(512+64) = 4,128,768; kv_norm 512; wkv_b 512 * 128*(128+128) = 16,777,216
    #   wo 128*128 * 7168 = 117,440,512                                  -> 187,107,328
    # norms 2 * 7168 = 14,336
    # dense block (the first 3): MLP 3*7168*18432 = 396,361,728          -> 583,483,392
    # MoE block: 257 experts (256 routed + 1 shared) * 3*7168*2048 = 257 * 44,040,192 = 11,318,329,344
    #            router 256*7168 = 1,835,008                             -> 11,507,286,016
    # 3 * 583,483,392 + 58 * 11,507,286,016 = 669,173,039,104
    # embedding + head 2 * 129280*7168 = 1,853,358,080; final norm 7,168 -> 671,026,404,352
    # (+ 58 * 256 = 14,848 for the router's e_score_correction_bias in the checkpoint, not modeled)
    m = preset("deepseek-v3")
    assert m.block_counts(False) == {"attention": 187_107_328, "mlp": 396_361_728, "router": 0, "norms": 14_336}
    assert sum(m.block_counts(True).values()) == 11_507_286_016
    assert (m.moe_layers, m.params) == (58, 671_026_404_352)
    # active: 248 of 256 routed experts idle per MoE block: 58 * 248 * 44,040,192 = 633,474,121,728
    assert m.active_params == 671_026_404_352 - 633_474_121_728 == 37_552_282_624
    assert _stated(m.params, 671, 1e9) and _stated(m.active_params, 37, 1e9)


def test_qwen3_moe_by_hand():
    # Qwen3-30B-A3B, h = 2048: q 2048*4096 + k, v 2048*512 + o 4096*2048 = 18,874,368; q/k norm 2*128
    # 128 experts * 3*2048*768 = 603,979,776; router 128*2048 = 262,144; norms 4,096
    # block 623,120,640; x48 = 29,909,790,720; + final norm 2,048 = 29,909,792,768 non-embedding ("29.9B")
    # + 2 * 151936*2048 = 622,329,856 -> 30,532,122,624 ("30.5B")
    # active: 120 idle * 4,718,592 * 48 = 27,179,089,920 -> 3,353,032,704 ("3.3B")
    m = preset("qwen3-30b-a3b")
    assert sum(m.block_counts(True).values()) == 623_120_640
    assert m.params == 30_532_122_624 and m.active_params == 3_353_032_704
    assert _stated(m.params - 2 * 151936 * 2048, 29.9, 1e9)
    assert _stated(m.params, 30.5, 1e9) and _stated(m.active_params, 3.3, 1e9)
    # Qwen3-235B-A22B, h = 4096: attention 71,303,168 + 256; 128 * 18,874,368 = 2,415,919,104;
    # router 524,288; norms 8,192 -> 2,487,755,008 x94 + 4,096 = 233,848,974,848 ("234B" non-embedding)
    # + 2 * 151936*4096 = 1,244,659,712 -> 235,093,634,560; active - 94*120*18,874,368 = 22,190,763,520
    big = preset("qwen3-235b-a22b")
    assert big.params == 235_093_634_560 and big.active_params == 22_190_763_520
    assert _stated(big.params, 235, 1e9) and _stated(big.active_params, 22, 1e9)
    assert _stated(big.params - 1_244_659_712, 234, 1e9)


def test_mixtral_8x22b_exact_and_active():
    # attention 2*6144^2 + 2*6144*1024 = 88,080,384; 8 * 3*6144*16384 = 2,415,919,104; router 49,152;
    # norms 12,288 -> 2,504,060,928 x56 = 140,227,411,968 + 2 * 32768*6144 + 6,144 = 140,630,071,296
    # active: 56 * 6 * 301,989,888 idle = 101,468,602,368 -> 39,161,468,928 ("39B active of 141B")
    m = preset("mixtral-8x22b")
    assert m.params == m.published_params == 140_630_071_296
    assert m.active_params == 39_161_468_928 and _stated(m.active_params, 39, 1e9)
    assert round(m.params / 1e9) == 141


def test_llama4_text_by_hand():
    # attention 2*5120^2 + 2*5120*1024 = 62,914,560; norms 10,240; one expert 3*5120*8192 = 125,829,120
    # Scout: every block MoE, 16 routed + 1 shared + router 16*5120 -> 2,202,101,760 x48 = 105,700,884,480
    # + 2 * 202048*5120 = 2,068,971,520 + 5,120 -> 107,769,861,120 (the card's 109B adds the vision encoder)
    # active: 48 * 15 * 125,829,120 idle -> 17,172,894,720 ("17B")
    s = preset("llama-4-scout")
    assert s.params == 107_769_861_120 and s.active_params == 17_172_894_720
    assert 107e9 < s.params < 109e9 and _stated(s.active_params, 17, 1e9)
    # Maverick: 24 MoE blocks (1, 3, ..., 47) of 128 + 1 experts + router 128*5120 = 16,295,536,640; 24 dense
    # blocks with 3*5120*16384 = 251,658,240 -> 314,583,040; 391,092,879,360 + 7,549,992,960 + 2,068,976,640
    # = 400,711,848,960 ("400B"); active - 24 * 127 * 125,829,120 = 17,184,691,200 ("17B")
    v = preset("llama-4-maverick")
    assert v.moe_layers == 24 and v.params == 400_711_848_960 and v.active_params == 17_184_691_200
    assert _stated(v.params, 400, 1e9) and _stated(v.active_params, 17, 1e9)
    names = [n for n, _ in v.param_shapes()]
    assert "layers.0.feed_forward.w1.weight" in names and "layers.1.feed_forward.experts.127.w1.weight" in names


# fixture -> (preset it equals or None, total, active)
CONFIGS = {
    "deepseek-v3.json": ("deepseek-v3", 671_026_404_352, 37_552_282_624),
    "qwen3-30b-a3b.json": ("qwen3-30b-a3b", 30_532_122_624, 3_353_032_704),
    "llama-4-scout.json": ("llama-4-scout", 107_769_861_120, 17_172_894_720),
    "llama-4-maverick.json": ("llama-4-maverick", 400_711_848_960, 17_184_691_200),
    # Qwen3-8B card: 8.2B, 6.95B non-embedding: blocks 36 * (41,943,040 + 256 + 8,192 + 150,994,944)
    "qwen3-8b.json": (None, 8_190_735_360, 8_190_735_360),
    # Qwen1.5-MoE-A2.7B card: 14.3B total, 2.7B activated. Block: attention 4*2048^2 + q/k/v bias 6,144;
    # 60 * 3*2048*1408 = 519,045,120; shared 3*2048*5632 = 34,603,008; router 122,880 + shared gate 2,048
    "qwen1.5-moe-a2.7b.json": (None, 14_315_784_192, 2_689_173_504),
}


@pytest.mark.parametrize("fname", sorted(CONFIGS))
def test_config_json_gives_the_preset(fname):
    same, total, active = CONFIGS[fname]
    m = load_model(str(DATA / fname))
    assert (m.params, m.active_params) == (total, active)
    assert sum(math.prod(s) for _, s in m.param_shapes()) == total
    if same:
        p = preset(same)
        assert (m.counts, m.block_counts(True), m.moe_layers) == (p.counts, p.block_counts(True), p.moe_layers)
    if fname == "qwen3-8b.json":
        assert _stated(m.params, 8.2, 1e9) and _stated(m.params - 2 * 151936 * 4096, 6.95, 1e9)
    if fname == "qwen1.5-moe-a2.7b.json":
        assert _stated(m.params, 14.3, 1e9) and round(m.active_params / 1e9, 1) == 2.7
        assert m.shared_gate and m.shared_ffn_hidden == 5632


def _cfg(fname, **changes):
    d = json.loads((DATA / fname).read_text())
    text = d.get("text_config")
    for k, v in changes.items():
        (text if text is not None and k != "text_config" else d)[k] = v
    return d


@pytest.mark.parametrize(
    "fname, changes, field",
    [
        ("deepseek-v3.json", {"moe_layer_freq": 2}, "moe_layer_freq"),
        ("deepseek-v3.json", {"num_key_value_heads": 8}, "num_key_value_heads"),
        ("deepseek-v3.json", {"attention_bias": True}, "attention_bias"),
        ("deepseek-v3.json", {"kv_lora_rank": None}, "kv_lora_rank"),
        ("qwen3-30b-a3b.json", {"mlp_only_layers": [5, 9]}, "mlp_only_layers"),
        ("qwen3-30b-a3b.json", {"num_experts_per_tok": 200}, "top_k"),
        ("llama-4-scout.json", {"moe_layers": [0, 7]}, "moe_layers"),
        ("llama-4-scout.json", {"text_config": None}, "text_config"),
        ("qwen1.5-moe-a2.7b.json", {"shared_expert_intermediate_size": -1}, "shared_expert_intermediate_size"),
    ],
)
def test_config_json_it_cannot_represent_is_one_line_naming_the_field(fname, changes, field):
    with pytest.raises(ShardwiseError) as e:
        from_hf_config(_cfg(fname, **changes), fname, "x")
    msg = str(e.value)
    assert "\n" not in msg and field in msg and fname in msg


def test_qwen2_moe_leading_dense_layers_are_first_dense():
    m = from_hf_config(_cfg("qwen1.5-moe-a2.7b.json", mlp_only_layers=[0, 1]), "q.json", "q")
    assert (m.first_dense, m.moe_layers) == (2, 22)


@pytest.mark.parametrize(
    "dims, words",
    [
        (dict(experts=8, top_k=2, first_dense=4), "leave none of the 4 layers"),
        (dict(first_dense=1), "need experts > 0"),
        (dict(experts=8, top_k=2, moe_every=0), "moe_every must be a positive integer"),
        (dict(kv_lora_rank=16, kv_heads=2), "one key/value head per query head"),
        (dict(rope_head_dim=8), "give kv_lora_rank too"),
        (dict(experts=8, top_k=2, shared_gate=True), "shared_gate needs shared_experts"),
    ],
)
def test_moe_fields_that_do_not_fit_together(dims, words):
    with pytest.raises(ShardwiseError, match=words):
        ModelSpec(name="t", layers=4, hidden=64, heads=4, vocab=32, **dims)


def test_mla_saved_activations_by_hand():
    # 4 heads of no-rope 16 + rotary 8 (q and k: 4 * 24 = 96 per token), values of 12 (4 * 12 = 48),
    # latent query 24 and latent K/V 32 (each: the RMSNorm's input and rstd, and the up-projection's
    # input), one shared rotary key of 8; the block's normed input feeds wq_a and wkv_a
    from shardwise.estimate.activations import block_inventory

    m = ModelSpec(
        name="mla", layers=2, hidden=64, heads=4, vocab=128, head_dim=16,
        q_lora_rank=24, kv_lora_rank=32, rope_head_dim=8, v_head_dim=12,
    )  # fmt: skip
    inv = {s.name: (s.width, s.split) for s in block_inventory(m, layout="megatron")}
    assert inv["attention.wq_a_wkv_a.input"] == (64, "gather")
    assert (inv["attention.q"], inv["attention.k"], inv["attention.v"]) == ((96, "tp"), (96, "tp"), (48, "tp"))
    assert inv["attention.out"] == (48, "tp")
    latent = {
        k: v for k, v in inv.items() if k.split(".")[1].startswith(("q_norm", "kv_norm", "wq_b", "wkv_b", "k_rope"))
    }
    assert latent == {
        "attention.q_norm.input": (24, "none"), "attention.q_norm.stats": (1, "none"), "attention.wq_b.input": (24, "none"),
        "attention.kv_norm.input": (32, "none"), "attention.kv_norm.stats": (1, "none"),
        "attention.wkv_b.input": (32, "none"), "attention.k_rope": (8, "none"),
    }  # fmt: skip
