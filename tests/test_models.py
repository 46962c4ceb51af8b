"""ModelSpec presets: derived parameter counts equal the published ones exactly, by hand where it
matters, and every bad specification is one ShardwiseError line."""

from pathlib import Path

import pytest

from shardwise.errors import ShardwiseError
from shardwise.spec.model import ModelSpec, default_ffn_hidden
from shardwise.spec.presets import aliases, hf_ids, load_model, preset, presets, resolve_name

REQUIRED = (
    "gpt2-124m",
    "gpt2-355m",
    "gpt2-774m",
    "gpt2-1.5b",
    "gpt-3-175b",
    "llama-7b",
    "llama-13b",
    "llama-65b",
    "llama-2-7b",
    "llama-2-13b",
    "llama-2-70b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "llama-3.1-405b",
    "mistral-7b",
    "mixtral-8x7b",
    "qwen2.5-7b",
    "qwen2.5-72b",
    "gpt-4-est",
)
ALL = presets()
WITH_COUNT = sorted(k for k, m in ALL.items() if m.published_params)


def test_catalog_has_the_required_presets():
    assert set(REQUIRED) <= set(ALL)
    # every real model in the catalog carries its published count; only these do not
    rounded_moe = {"deepseek-v3", "qwen3-30b-a3b", "qwen3-235b-a22b", "llama-4-scout", "llama-4-maverick"}
    assert set(ALL) - set(WITH_COUNT) == {"gpt-3-175b", "gpt-4-est", "tiny-llama", "tiny-gpt2"} | rounded_moe


@pytest.mark.parametrize("name", WITH_COUNT)
def test_derived_count_equals_published_count(name):
    m = preset(name)
    assert m.params == m.published_params


@pytest.mark.parametrize("name", sorted(ALL))
def test_param_shapes_sum_to_params_and_every_preset_has_a_source(name):
    m = ALL[name]
    total = 0
    for _, shape in m.param_shapes():
        n = 1
        for d in shape:
            n *= d
        total += n
    assert total == m.params
    assert m.source and m.name == name


def test_published_counts_that_the_task_names():
    assert preset("llama-2-7b").params == 6_738_415_616
    assert preset("llama-3.1-8b").params == 8_030_261_248
    assert preset("gpt2-124m").params == 124_439_808
    assert preset("mixtral-8x7b").params == 46_702_792_704


def test_llama_2_7b_by_hand():
    # embedding  32000 * 4096                              =   131,072,000
    # per layer: attention q, k, v, o  4 * 4096^2           =    67,108,864
    #            SwiGLU gate, up, down 3 * 4096 * 11008      =   135,266,304
    #            two RMSNorms 2 * 4096                       =         8,192
    #            total                                       =   202,383,360
    # 32 layers                                              = 6,476,267,520
    # final RMSNorm 4096; untied lm head 32000 * 4096        =   131,072,000
    # 131,072,000 + 6,476,267,520 + 4,096 + 131,072,000      = 6,738,415,616
    m = preset("llama-2-7b")
    assert m.layer_counts == {"attention": 67_108_864, "mlp": 135_266_304, "router": 0, "norms": 8_192}
    assert m.layer_params == 202_383_360
    assert m.counts == {
        "embedding": 131_072_000,
        "positions": 0,
        "layers": 6_476_267_520,
        "final_norm": 4_096,
        "lm_head": 131_072_000,
    }
    assert m.params == 6_738_415_616


def test_gpt2_124m_by_hand():
    # token embedding 50257 * 768                 = 38,597,376 (tied: the head reuses it)
    # learned positions 1024 * 768                =    786,432
    # per layer: c_attn 768 * 2304 + 2304         =  1,771,776
    #            c_proj 768 * 768 + 768           =    590,592   attention 2,362,368
    #            c_fc 768 * 3072 + 3072           =  2,362,368
    #            c_proj 3072 * 768 + 768          =  2,360,064   mlp 4,722,432
    #            ln_1, ln_2 (weight + bias) 4*768 =      3,072
    #            total                            =  7,087,872;  12 layers = 85,054,464
    # ln_f 2 * 768                                =      1,536
    # 38,597,376 + 786,432 + 85,054,464 + 1,536   = 124,439,808
    m = preset("gpt2-124m")
    assert m.layer_counts == {"attention": 2_362_368, "mlp": 4_722_432, "router": 0, "norms": 3_072}
    assert m.counts == {
        "embedding": 38_597_376,
        "positions": 786_432,
        "layers": 85_054_464,
        "final_norm": 1_536,
        "lm_head": 0,
    }
    assert m.params == 124_439_808


def test_mixtral_8x7b_by_hand_and_active_params():
    # embedding 32000 * 4096                                   =    131,072,000
    # per layer: q 4096*4096 + k, v 4096*1024 each + o 4096*4096 = 41,943,040 (GQA: 8 KV heads of 128)
    #            8 experts * 3 * 4096 * 14336 = 8 * 176,160,768 =  1,409,286,144
    #            router 4096 * 8                               =         32,768
    #            norms 2 * 4096                                =          8,192
    #            total                                         =  1,451,270,144; 32 layers = 46,440,644,608
    # final norm 4096, lm head 131,072,000
    # 131,072,000 + 46,440,644,608 + 4,096 + 131,072,000       = 46,702,792,704
    # active: each token uses 2 of 8 experts, so 6 * 176,160,768 * 32 = 33,822,867,456 sit idle
    # 46,702,792,704 - 33,822,867,456                          = 12,879,925,248 (Mistral AI: "12.9B")
    m = preset("mixtral-8x7b")
    assert m.layer_counts == {"attention": 41_943_040, "mlp": 1_409_286_144, "router": 32_768, "norms": 8_192}
    assert m.params == 46_702_792_704
    assert m.active_params == 12_879_925_248
    assert round(m.active_params / 1e9, 1) == 12.9


def test_gpt3_175b_against_the_papers_rounded_figure():
    # No exact count is published; Brown et al. 2020 Table 2.1 lists 175.0B.
    # per layer 12 h^2 + 13 h, h = 12288: 1,811,939,328 + 159,744 = 1,812,099,072; x96 = 173,961,510,912
    # embedding 50257 * 12288 = 617,558,016; positions 2048 * 12288 = 25,165,824; ln_f 24,576
    # total 174,604,259,328: 0.23% under the nominal 175e9, so the paper's figure is a round size,
    # not a rounding of this count to 0.1B (that would be 174.6B). Checked to 0.5%.
    m = preset("gpt-3-175b")
    assert m.layer_params == 1_812_099_072
    assert m.params == 174_604_259_328
    assert abs(m.params - 175e9) / 175e9 < 0.005
    assert m.published_params == 0 and "175.0B" in m.source


def test_gpt4_estimate_lands_on_the_public_figures():
    # SemiAnalysis (2023): ~1.8T total, 120 layers, 16 experts of ~111B, top-2, ~55B attention,
    # ~280B used per token. h = 10752, h^2 = 115,605,504:
    # attention 4 h^2 = 462,422,016 per layer; x120 = 55,490,641,920 (~55B)
    # one expert 2 * h * 4h = 8 h^2 = 924,844,032 per layer; x120 = 110,981,283,840 (~111B)
    m = preset("gpt-4-est")
    assert m.estimated and m.published_params == 0 and "SemiAnalysis" in m.source
    assert (m.layers, m.experts, m.top_k) == (120, 16, 2)
    assert m.layer_counts["attention"] * 120 == 55_490_641_920
    assert m.layer_counts["mlp"] // 16 * 120 == 110_981_283_840
    assert m.params == 1_833_373_366_272 and round(m.params / 1e12, 1) == 1.8
    assert m.active_params == 279_635_392_512 and round(m.active_params / 1e10) * 10 == 280


def test_llama_ffn_rule():
    # 2/3 * 4 * 4096 = 10922.67 -> 10922, rounded up to a multiple of 256 -> 11008 (LLaMA-7B's)
    assert default_ffn_hidden(4096, "swiglu") == 11008
    assert default_ffn_hidden(768, "gelu") == 3072
    assert ModelSpec("x", layers=1, hidden=4096, heads=32, vocab=8).ffn_hidden == 11008


def test_tiny_models_are_tiny_and_split_evenly():
    for name in ("tiny-llama", "tiny-gpt2"):
        m = preset(name)
        assert m.params < 1_000_000 and m.max_seq <= 128 and m.dropout == 0.0
        assert m.layers % 4 == 0 and m.heads % 4 == 0 and m.vocab % 4 == 0  # tp, pp up to 4
    t = preset("tiny-llama")
    assert t.kv_heads < t.heads and t.kv_heads % 4 == 0  # GQA that tp = 4 can still split


def test_preset_lookup_is_case_insensitive():
    assert preset("Llama-2-7B").name == "llama-2-7b"
    assert load_model("MIXTRAL-8x7B").params == 46_702_792_704


# ---- names people type: Hugging Face ids -------------------------------------------------------------
TYPED = {
    "gpt2": "gpt2-124m",
    "openai-community/gpt2": "gpt2-124m",
    "GPT2-XL": "gpt2-1.5b",
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "Llama-2-70b-hf": "llama-2-70b",  # the repository name without its organisation
    "mistralai/Mixtral-8x7B-v0.1": "mixtral-8x7b",
    "Mistral-7B-v0.1": "mistral-7b",
    "Qwen/Qwen2.5-72B-Instruct": "qwen2.5-72b",
    "huggyllama/llama-65b": "llama-65b",
}


@pytest.mark.parametrize("name", sorted(TYPED))
def test_typed_names_resolve_to_their_preset(name):
    assert load_model(name) == preset(TYPED[name]) == ALL[TYPED[name]]


def test_every_hf_id_resolves_to_the_same_spec_as_its_preset():
    ids = hf_ids()
    assert set(ids) == set(ALL)
    for key, names in ids.items():
        for hid in names:
            for typed in (hid, hid.upper(), hid.rsplit("/", 1)[-1]):
                assert resolve_name(typed) == key, typed
                assert load_model(typed) == ALL[key]
    # every real model with a Hugging Face repository carries its id; the guesses and test models have none
    assert {k for k, v in ids.items() if not v} == {"gpt-3-175b", "gpt-4-est", "tiny-llama", "tiny-gpt2"}
    assert "hf_ids" not in ALL["gpt2-124m"].summary()  # a name, not a field of the architecture


def test_no_name_points_at_two_presets():
    owners = {}
    for key, names in hf_ids().items():
        for hid in names:
            for typed in {hid.lower(), hid.lower().rsplit("/", 1)[-1]}:
                assert owners.setdefault(typed, key) == key, typed
                assert typed not in ALL or typed == key, typed
    assert aliases() == owners


def test_a_downloaded_repository_folder_loads_its_config(tmp_path):
    d = tmp_path / "Llama-3.1-8B"
    d.mkdir()
    (d / "config.json").write_text((Path(__file__).parent / "data" / "hf" / "llama-3.1-8b.json").read_text())
    m = load_model(str(d))
    assert m.params == 8_030_261_248 and m.name == "Llama-3.1-8B"


# ---- bad input -----------------------------------------------------------------------------------
def test_unknown_preset_says_did_you_mean():
    with pytest.raises(ShardwiseError, match=r"unknown model 'llama2-7b'; did you mean .*llama-2-7b"):
        preset("llama2-7b")
    with pytest.raises(ShardwiseError, match=r"did you mean .*mixtral-8x7b"):
        load_model("mixtral-8x7")
    with pytest.raises(ShardwiseError, match="known: ") as e:
        preset("zzzzzzzz")
    assert "\n" not in str(e.value)
    # a mistyped Hugging Face id is answered with ids
    with pytest.raises(
        ShardwiseError, match=r"unknown model 'meta-llama/Llama-3.1-8X'; did you mean meta-llama/llama-3.1-8b"
    ):
        load_model("meta-llama/Llama-3.1-8X")
    with pytest.raises(ShardwiseError, match=r"did you mean gpt2"):
        load_model("gpt")


BASE = dict(name="m", layers=2, hidden=64, heads=4, vocab=100)
INVALID = {
    "zero layers": (dict(layers=0), "layers must be a positive integer, got 0"),
    "negative hidden": (dict(hidden=-64), "hidden must be a positive integer, got -64"),
    "float heads": (dict(heads=4.0), "heads must be a positive integer, got 4.0"),
    "bool vocab": (dict(vocab=True), "vocab must be a positive integer, got True"),
    "heads not dividing hidden": (dict(heads=5), "hidden 64 is not divisible by heads 5; give head_dim"),
    "kv_heads not dividing heads": (dict(kv_heads=3), "heads 4 must be a multiple of kv_heads 3"),
    "negative kv_heads": (dict(kv_heads=-1), "kv_heads must be a non-negative integer"),
    "bad ffn_kind": (dict(ffn_kind="relu"), "ffn_kind must be one of gelu, swiglu, got 'relu'"),
    "bad norm": (dict(norm="batchnorm"), "norm must be one of layernorm, rmsnorm"),
    "bad positions": (dict(positions="alibi"), "positions must be one of learned, rotary"),
    "dropout 1": (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    "top_k above experts": (dict(experts=8, top_k=9), "top_k must be between 1 and experts=8, got 9"),
    "experts without top_k": (dict(experts=8), "top_k must be between 1 and experts=8, got 0"),
    "top_k without experts": (dict(top_k=2), "top_k / shared_experts need experts > 0"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_specs_are_one_line_errors(case):
    changes, match = INVALID[case]
    with pytest.raises(ShardwiseError, match=match) as e:
        ModelSpec(**{**BASE, **changes})
    assert "\n" not in str(e.value) and "'m'" in str(e.value)


def test_model_toml_file_errors_name_the_file_and_field(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text("[model]\nlayers = 2\nhidden = 64\nheads = 4\nvocab = 100\nlayer_norm = true\n")
    with pytest.raises(ShardwiseError, match=r"mine.toml: unknown model field 'layer_norm'"):
        load_model(str(p))
    p.write_text("layers = 2\nhidden = 64\nvocab = 100\n")
    with pytest.raises(ShardwiseError, match=r"mine.toml: missing model field 'heads'"):
        load_model(str(p))
    p.write_text("layers = 2\nhidden = 64\nheads = [4]\nvocab = 100\n")
    with pytest.raises(ShardwiseError, match=r"heads must be a positive integer, got \[4\]"):
        load_model(str(p))
    p.write_text("layers = 2\nhidden = 64\nheads = 4\nvocab = 100\nffn_kind = gelu\n")
    with pytest.raises(ShardwiseError, match=r"mine.toml: not valid TOML") as e:
        load_model(str(p))
    assert "\n" not in str(e.value)


def test_model_toml_file_loads(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text("[model]\nlayers = 2\nhidden = 64\nheads = 4\nvocab = 100\nffn_kind = 'gelu'\n")
    m = load_model(str(p))
    # embedding 6400 + 2 * (attention 4*64^2 = 16,384 + mlp 2*64*256 = 32,768 + norms 128)
    # + final norm 64 + head 6400 = 6400 + 98,560 + 64 + 6400 = 111,424
    assert m.name == "mine" and m.params == 111_424


def test_missing_model_file_is_one_line():
    with pytest.raises(ShardwiseError, match="model file 'nope.json' does not exist"):
        load_model("nope.json")
