"""Hugging Face config.json -> ModelSpec: published files give the published counts exactly, and
every malformed file is one ShardwiseError line naming the file and the field.

tests/data/hf/ holds config.json files as published on the Hugging Face hub (the name says which
repository). gpt2, Llama-2-7b-hf, Llama-3.1-8B, Mistral-7B-v0.1, Mixtral-8x7B-v0.1 and
Qwen2.5-7B-Instruct were checked field for field against copies quoted in public code;
pythia-160m was typed from the hub and its count fields (hidden 768, intermediate 3072, 12 layers,
12 heads, vocab 50304, untied, max positions 2048) checked against the same kind of copies.
"""

import json
from pathlib import Path

import pytest

from shardwise.errors import ShardwiseError
from shardwise.spec.hf import SUPPORTED, from_hf_config
from shardwise.spec.presets import load_model, preset

DATA = Path(__file__).parent / "data" / "hf"

# file -> (published count, name the model gets, preset with the same architecture or None)
PUBLISHED = {
    "gpt2.json": (124_439_808, "gpt2", "gpt2-124m"),
    "llama-2-7b.json": (6_738_415_616, "Llama-2-7b-hf", "llama-2-7b"),  # _name_or_path wins
    "llama-3.1-8b.json": (8_030_261_248, "llama-3.1-8b", "llama-3.1-8b"),
    "mistral-7b-v0.1.json": (7_241_732_096, "mistral-7b-v0.1", "mistral-7b"),
    "mixtral-8x7b-v0.1.json": (46_702_792_704, "mixtral-8x7b-v0.1", "mixtral-8x7b"),
    "qwen2.5-7b-instruct.json": (7_615_616_512, "qwen2.5-7b-instruct", "qwen2.5-7b"),
    # Pythia paper / model card: 162,322,944 total, 85,056,000 non-embedding
    "pythia-160m.json": (162_322_944, "pythia-160m", None),
}


@pytest.mark.parametrize("fname", sorted(PUBLISHED))
def test_published_config_gives_published_count(fname):
    count, name, same_as = PUBLISHED[fname]
    m = load_model(str(DATA / fname))
    assert m.params == count
    assert m.name == name
    assert sum(_numel(s) for _, s in m.param_shapes()) == count
    if same_as:  # the file and the preset describe one architecture
        p = preset(same_as)
        assert m.params == p.params
        assert m.layer_counts == p.layer_counts and m.counts == p.counts


# file -> the Hugging Face id it was published under (the repository named in the docstring)
HUB_IDS = {
    "gpt2.json": "openai-community/gpt2",
    "llama-2-7b.json": "meta-llama/Llama-2-7b-hf",
    "llama-3.1-8b.json": "meta-llama/Llama-3.1-8B",
    "mistral-7b-v0.1.json": "mistralai/Mistral-7B-v0.1",
    "mixtral-8x7b-v0.1.json": "mistralai/Mixtral-8x7B-v0.1",
    "qwen2.5-7b-instruct.json": "Qwen/Qwen2.5-7B-Instruct",
}


@pytest.mark.parametrize("fname", sorted(HUB_IDS))
def test_hub_id_names_the_preset_of_its_published_config(fname):
    """Typing the repository's id gives the architecture of the config.json published there."""
    by_id, by_file = load_model(HUB_IDS[fname]), load_model(str(DATA / fname))
    assert by_id.name == PUBLISHED[fname][2]
    assert by_id.params == by_file.params == PUBLISHED[fname][0]
    assert by_id.layer_counts == by_file.layer_counts and by_id.counts == by_file.counts


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_pythia_160m_by_hand():
    # GPT-NeoX: LayerNorm (weight+bias), biases on every linear, separate embed_in / embed_out.
    # embed_in  50304*768                       = 38,633,472
    # embed_out 50304*768                       = 38,633,472
    # per layer: qkv 768*2304 + 2304            =  1,771,776
    #            dense 768*768 + 768            =    590,592
    #            h->4h 768*3072 + 3072          =  2,362,368
    #            4h->h 3072*768 + 768           =  2,360,064
    #            2 LayerNorms 4*768             =      3,072
    #            total                          =  7,087,872;  x12 = 85,054,464
    # final LayerNorm 2*768                     =      1,536
    # non-embedding 85,054,464 + 1,536 = 85,056,000 (the paper's figure)
    # total 2*38,633,472 + 85,056,000           = 162,322,944
    m = load_model(str(DATA / "pythia-160m.json"))
    assert m.layer_params == 7_087_872
    assert m.params - m.counts["embedding"] - m.counts["lm_head"] == 85_056_000
    assert (m.positions, m.norm, m.ffn_kind, m.tied_embeddings) == ("rotary", "layernorm", "gelu", False)


def test_gpt2_file_maps_learned_positions_tied_head_and_dropout():
    m = load_model(str(DATA / "gpt2.json"))
    assert (m.positions, m.max_seq, m.tied_embeddings, m.ffn_hidden) == ("learned", 1024, True, 3072)
    assert (m.qkv_bias, m.out_bias, m.mlp_bias, m.dropout) == (True, True, True, 0.1)
    assert m.counts["positions"] == 1024 * 768 and m.counts["lm_head"] == 0


def test_mixtral_file_maps_experts_and_active_count():
    m = load_model(str(DATA / "mixtral-8x7b-v0.1.json"))
    assert (m.experts, m.top_k, m.expert_ffn_hidden, m.kv_heads) == (8, 2, 14336, 8)
    assert m.active_params == 12_879_925_248


def test_qwen2_has_bias_on_qkv_only():
    m = load_model(str(DATA / "qwen2.5-7b-instruct.json"))
    assert (m.qkv_bias, m.out_bias, m.mlp_bias) == (True, False, False)
    # q 3584 + k 512 + v 512 bias terms per layer
    assert m.layer_counts["attention"] == 3584 * 3584 + 2 * 3584 * 512 + 3584 * 3584 + 3584 + 2 * 512


# Architectures whose published config.json we read through count-relevant fields only (no file
# kept here): (config, published count)
INLINE = {
    # microsoft/Phi-3-mini-4k-instruct: fused qkv_proj / gate_up_proj, 3,821,079,552 (HF metadata)
    "phi-3-mini": (
        dict(
            model_type="phi3",
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            tie_word_embeddings=False,
        ),
        3_821_079_552,
    ),
    # google/gemma-7b: head_dim 256 (16 heads * 256 = 4096 != hidden 3072), tied, 8,537,680,896
    "gemma-7b": (
        dict(
            model_type="gemma",
            hidden_size=3072,
            intermediate_size=24576,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=16,
            head_dim=256,
            vocab_size=256000,
        ),
        8_537_680_896,
    ),
    # google/gemma-2b: multi-query (1 KV head), 2,506,172,416
    "gemma-2b": (
        dict(
            model_type="gemma",
            hidden_size=2048,
            intermediate_size=16384,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            vocab_size=256000,
        ),
        2_506_172_416,
    ),
    # EleutherAI/gpt-neox-20b: 20,554,567,680 (model card)
    "gpt-neox-20b": (
        dict(
            model_type="gpt_neox",
            hidden_size=6144,
            intermediate_size=24576,
            num_hidden_layers=44,
            num_attention_heads=64,
            vocab_size=50432,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
        20_554_567_680,
    ),
}


@pytest.mark.parametrize("name", sorted(INLINE))
def test_more_architectures_give_published_counts(name):
    d, count = INLINE[name]
    assert from_hf_config(d, f"{name}/config.json", name).params == count


def test_gemma_7b_by_hand():
    # embedding 256000*3072 (tied: no head)            =   786,432,000
    # attention: q 3072*4096, k 3072*4096, v 3072*4096, o 4096*3072 = 50,331,648
    # mlp 3 * 3072 * 24576                             =   226,492,416
    # norms 2*3072                                     =         6,144
    # per layer 276,830,208; x28                       = 7,751,245,824
    # final norm 3072 -> total 786,432,000 + 7,751,245,824 + 3,072 = 8,537,680,896
    m = from_hf_config(INLINE["gemma-7b"][0], "gemma-7b/config.json", "gemma-7b")
    assert m.layer_params == 276_830_208
    assert m.q_dim == 4096 and m.tied_embeddings


def test_architectures_alone_names_the_model_type():
    d = json.loads((DATA / "mistral-7b-v0.1.json").read_text())
    del d["model_type"]
    assert from_hf_config(d, "m.json", "m").params == 7_241_732_096


def test_llama_attention_and_mlp_bias_fields_add_their_biases():
    d = json.loads((DATA / "llama-2-7b.json").read_text())
    base = from_hf_config(d, "x", "x")
    biased = from_hf_config({**d, "attention_bias": True, "mlp_bias": True}, "x", "x")
    # per layer: q, k, v, o biases 4*4096; gate, up 2*11008 and down 4096
    assert biased.params - base.params == 32 * (4 * 4096 + 2 * 11008 + 4096)


def test_null_optional_fields_take_defaults():
    d = json.loads((DATA / "gpt2.json").read_text())
    assert from_hf_config({**d, "n_inner": None}, "x", "x").ffn_hidden == 3072
    d = json.loads((DATA / "llama-3.1-8b.json").read_text())
    assert from_hf_config({**d, "head_dim": None}, "x", "x").head_dim == 128


def test_name_from_name_or_path_or_default(tmp_path):
    d = json.loads((DATA / "mistral-7b-v0.1.json").read_text())
    assert from_hf_config({**d, "_name_or_path": "org/My-Model/"}, "x", "dflt").name == "My-Model"
    assert from_hf_config({**d, "_name_or_path": "./"}, "x", "dflt").name == "dflt"
    # a downloaded model is DIR/config.json: the directory names it
    (tmp_path / "Mistral-7B-v0.1").mkdir()
    p = tmp_path / "Mistral-7B-v0.1" / "config.json"
    p.write_text(json.dumps(d))
    assert load_model(str(p)).name == "Mistral-7B-v0.1"


# ---- bad input: one line, naming the file and the field ---------------------------------------
def _bad(tmp_path, text: str, match: str, fname: str = "bad-config.json"):
    p = tmp_path / fname
    p.write_text(text)
    with pytest.raises(ShardwiseError, match=match) as e:
        load_model(str(p))
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    return msg


def _llama(**changes) -> str:
    d = json.loads((DATA / "llama-2-7b.json").read_text())
    for k, v in changes.items():
        if v is ...:
            del d[k]
        else:
            d[k] = v
    return json.dumps(d)


def test_not_json(tmp_path):
    _bad(tmp_path, '{"model_type": "llama", "hidden_size": 4096,', "not valid JSON")


def test_missing_hidden_size(tmp_path):
    _bad(tmp_path, _llama(hidden_size=...), "missing field 'hidden_size'")


def test_negative_layers(tmp_path):
    _bad(tmp_path, _llama(num_hidden_layers=-2), "'num_hidden_layers' must be a positive integer, got -2")


def test_zero_vocab(tmp_path):
    _bad(tmp_path, _llama(vocab_size=0), "'vocab_size' must be a positive integer, got 0")


def test_wrong_types(tmp_path):
    _bad(tmp_path, _llama(hidden_size="4096"), "'hidden_size' must be an integer, got '4096'")
    _bad(tmp_path, _llama(intermediate_size=11008.0), "'intermediate_size' must be an integer")
    _bad(tmp_path, _llama(num_attention_heads=True), "'num_attention_heads' must be an integer")
    _bad(tmp_path, _llama(tie_word_embeddings="no"), "'tie_word_embeddings' must be true or false")
    _bad(tmp_path, _llama(attention_dropout=1.5), r"'attention_dropout' must be a rate in \[0, 1\)")
    _bad(tmp_path, _llama(model_type=7), "'model_type' must be a string")


def test_unknown_model_type_lists_supported(tmp_path):
    msg = _bad(tmp_path, _llama(model_type="bert"), "model_type 'bert' is not supported")
    for mt in SUPPORTED:
        assert mt in msg


def test_no_model_type_and_unknown_architecture(tmp_path):
    _bad(tmp_path, _llama(model_type=..., architectures=["BertForMaskedLM"]), "missing field 'model_type'")


def test_rule_across_fields_names_the_file(tmp_path):
    # 32 heads, 5 KV heads: ModelSpec's rule, reported against the file
    _bad(tmp_path, _llama(num_key_value_heads=5), "heads 32 must be a multiple of kv_heads 5")
    _bad(tmp_path, _llama(hidden_size=4100), "hidden 4100 is not divisible by heads 32")


def test_gpt2_cross_attention_refused(tmp_path):
    d = json.loads((DATA / "gpt2.json").read_text())
    _bad(tmp_path, json.dumps({**d, "add_cross_attention": True}), "'add_cross_attention'")


def test_top_level_not_an_object(tmp_path):
    _bad(tmp_path, "[1, 2, 3]", "expected an object")
