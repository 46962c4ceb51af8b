"""A Hugging Face `config.json` -> ModelSpec, read as plain JSON (no hub, no transformers import).

Each supported `model_type` maps every field that changes the parameter count or the saved
activations. A field the file leaves out takes the default of that model's transformers config
class, so the file means here what it means to transformers. Fields that change neither (rope
theta and scaling, sliding windows, GPT-NeoX's rotary_pct and parallel residual) are ignored.
"""

from __future__ import annotations

from shardwise.errors import ShardwiseError
from shardwise.spec.model import ModelSpec

_REQUIRED = object()

# architectures[0] -> model_type, for configs that only name the class
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Llama4ForConditionalGeneration": "llama4",
    "Llama4ForCausalLM": "llama4_text",
}


class _Fields:
    """Typed reads from the config dict; every failure is one line naming the file and field."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def _get(self, key: str, default):
        v = self.d.get(key)
        if v is None:  # absent, or null (transformers writes "n_inner": null, "head_dim": null)
            if default is _REQUIRED:
                raise ShardwiseError(
                    f"{self.where}: missing field {key!r}; a config.json of this model type must give it"
                )
            return None
        return v

    def int(self, key: str, default=_REQUIRED) -> int:
        v = self._get(key, default)
        if v is None:
            return default
        if not isinstance(v, int) or isinstance(v, bool):
            raise ShardwiseError(f"{self.where}: field {key!r} must be an integer, got {v!r}")
        if v <= 0:
            raise ShardwiseError(f"{self.where}: field {key!r} must be a positive integer, got {v}")
        return v

    def count(self, key: str, default: int = 0) -> int:
        """A non-negative integer (null -> default): first_k_dense_replace, q_lora_rank."""
        v = self._get(key, default)
        if v is None:
            return default
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ShardwiseError(f"{self.where}: field {key!r} must be a non-negative integer, got {v!r}")
        return v

    def unsupported(self, key: str, why: str) -> ShardwiseError:
        return ShardwiseError(f"{self.where}: field {key!r} = {self.d.get(key)!r}: {why}")

    def bool(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ShardwiseError(f"{self.where}: field {key!r} must be true or false, got {v!r}")
        return v

    def rate(self, *keys: str, default: float = 0.0) -> float:
        """The largest of several dropout rates: ModelSpec carries one."""
        out = 0.0
        for key in keys:
            v = self._get(key, default)
            v = default if v is None else v
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
                raise ShardwiseError(f"{self.where}: field {key!r} must be a rate in [0, 1), got {v!r}")
            out = max(out, float(v))
        return out


def _llama_family(f: _Fields, *, max_seq: int, tied: bool, bias_fields: bool) -> dict:
    """Llama, Mistral, Mixtral, Qwen2, Phi-3: RMSNorm, gated 3-matrix MLP, rotary, GQA."""
    heads = f.int("num_attention_heads")
    attn_bias = f.bool("attention_bias", False) if bias_fields else False
    return dict(
        layers=f.int("num_hidden_layers"),
        hidden=f.int("hidden_size"),
        heads=heads,
        kv_heads=f.int("num_key_value_heads", heads),
        head_dim=f.int("head_dim", 0),  # 0 -> hidden / heads
        vocab=f.int("vocab_size"),
        ffn_hidden=f.int("intermediate_size"),
        max_seq=f.int("max_position_embeddings", max_seq),
        tied_embeddings=f.bool("tie_word_embeddings", tied),
        qkv_bias=attn_bias,  # LlamaAttention: q, k, v AND o take config.attention_bias
        out_bias=attn_bias,
        mlp_bias=f.bool("mlp_bias", False) if bias_fields else False,
        dropout=f.rate("attention_dropout"),
        ffn_kind="swiglu",
        norm="rmsnorm",
        positions="rotary",
    )


def _llama(f: _Fields) -> dict:
    return _llama_family(f, max_seq=2048, tied=False, bias_fields=True)


def _mistral(f: _Fields) -> dict:
    return _llama_family(f, max_seq=4096 * 32, tied=False, bias_fields=False)


def _mixtral(f: _Fields) -> dict:
    # experts hold intermediate_size each; the router is Linear(hidden, experts, bias=False)
    return {**_mistral(f), "experts": f.int("num_local_experts", 8), "top_k": f.int("num_experts_per_tok", 2)}


def _qwen2(f: _Fields) -> dict:
    # Qwen2Attention: bias on q, k and v; none on o
    return {**_llama_family(f, max_seq=32768, tied=False, bias_fields=False), "qkv_bias": True}


def _qwen3(f: _Fields) -> dict:
    # Qwen3Attention: attention_bias on q/k/v/o, and q_norm / k_norm (RMSNorm over head_dim)
    d = _llama_family(f, max_seq=32768, tied=False, bias_fields=True)
    return {**d, "head_dim": f.int("head_dim", 128), "mlp_bias": False, "qk_norm": True}


def _sparse_layers(f: _Fields) -> dict:
    """Qwen2/3-MoE: block i is MoE when (i + 1) % decoder_sparse_step == 0 and i is not in
    mlp_only_layers; a leading run 0..k-1 of mlp_only_layers is first_dense = k."""
    dense = f.d.get("mlp_only_layers") or []
    if not isinstance(dense, list) or dense != list(range(len(dense))):
        raise f.unsupported("mlp_only_layers", "only a leading run 0, 1, ..., k-1 of dense blocks is modeled")
    return {"moe_every": f.int("decoder_sparse_step", 1), "first_dense": len(dense)}


def _qwen3_moe(f: _Fields) -> dict:
    d = _qwen3(f)
    return {
        **d,
        "head_dim": f.int("head_dim", d["hidden"] // d["heads"]),
        "experts": f.int("num_experts", 128),
        "top_k": f.int("num_experts_per_tok", 8),
        "expert_ffn_hidden": f.int("moe_intermediate_size", 768),
        **_sparse_layers(f),
    }


def _qwen2_moe(f: _Fields) -> dict:
    # Qwen2MoeSparseMoeBlock: routed experts of moe_intermediate_size, one shared expert of
    # shared_expert_intermediate_size scaled by sigmoid(shared_expert_gate(x)), Linear(hidden, 1)
    shared = f.count("shared_expert_intermediate_size", 5632)
    return {
        **_qwen2(f),
        "experts": f.int("num_experts", 60),
        "top_k": f.int("num_experts_per_tok", 4),
        "expert_ffn_hidden": f.int("moe_intermediate_size", 1408),
        "shared_experts": 1 if shared else 0,
        "shared_ffn_hidden": shared,
        "shared_gate": bool(shared),
        **_sparse_layers(f),
    }


def _deepseek_v3(f: _Fields) -> dict:
    # DeepSeek-V3 (arXiv 2412.19437 §2.1): MLA attention, n_shared_experts of moe_intermediate_size
    # beside the routed ones, the first first_k_dense_replace blocks dense. The MTP module
    # (num_nextn_predict_layers) is left out, as the paper's 671B leaves it out.
    if f.count("moe_layer_freq", 1) != 1:
        raise f.unsupported("moe_layer_freq", "only every block after first_k_dense_replace holding experts is modeled")
    if f.bool("attention_bias", False):
        raise f.unsupported("attention_bias", "latent attention is modeled without biases")
    heads = f.int("num_attention_heads")
    if f.int("num_key_value_heads", heads) != heads:
        raise f.unsupported("num_key_value_heads", f"latent attention has one key/value head per query head ({heads})")
    return dict(
        layers=f.int("num_hidden_layers"),
        hidden=f.int("hidden_size"),
        heads=heads,
        vocab=f.int("vocab_size"),
        ffn_hidden=f.int("intermediate_size"),
        max_seq=f.int("max_position_embeddings", 4096),
        tied_embeddings=f.bool("tie_word_embeddings", False),
        dropout=f.rate("attention_dropout"),
        experts=f.int("n_routed_experts"),
        top_k=f.int("num_experts_per_tok"),
        shared_experts=f.count("n_shared_experts", 0),
        expert_ffn_hidden=f.int("moe_intermediate_size"),
        first_dense=f.count("first_k_dense_replace", 0),
        q_lora_rank=f.count("q_lora_rank", 0),  # null (DeepSeek-V2-Lite): queries straight from hidden
        kv_lora_rank=f.int("kv_lora_rank"),
        head_dim=f.int("qk_nope_head_dim"),
        rope_head_dim=f.int("qk_rope_head_dim"),
        v_head_dim=f.int("v_head_dim"),
    )


def _llama4(f: _Fields) -> dict:
    """Llama 4's text model: the `text_config` of a Llama4ForConditionalGeneration config (the
    vision encoder is not modeled), or a llama4_text config itself."""
    if f.d.get("model_type") == "llama4":
        text = f.d.get("text_config")
        if not isinstance(text, dict):
            raise f.unsupported("text_config", "a llama4 config.json must hold the text model's fields in it")
        f = _Fields(text, f.where + " text_config")
    # Llama4TextMoe: routed experts and one shared expert, both of intermediate_size; the dense
    # blocks' MLP is intermediate_size_mlp; use_qk_norm is an L2 norm without weights
    d = _llama_family(f, max_seq=4096 * 32, tied=False, bias_fields=False)
    step = f.int("interleave_moe_layer_step", 1)
    given = f.d.get("moe_layers")
    if given is not None and given != list(range(step - 1, d["layers"], step)):
        raise f.unsupported("moe_layers", f"only every interleave_moe_layer_step-th ({step}) block as MoE is modeled")
    return {
        **d,
        "qkv_bias": f.bool("attention_bias", False),
        "out_bias": f.bool("attention_bias", False),
        "head_dim": f.int("head_dim", d["hidden"] // d["heads"]),
        "ffn_hidden": f.int("intermediate_size_mlp", 16384),
        "expert_ffn_hidden": f.int("intermediate_size", 8192),
        "experts": f.int("num_local_experts", 16),
        "top_k": f.int("num_experts_per_tok", 1),
        "shared_experts": 1,
        "moe_every": step,
    }


def _phi3(f: _Fields) -> dict:
    # fused qkv_proj and gate_up_proj hold exactly Llama's q/k/v and gate/up weights, no biases
    d = _llama_family(f, max_seq=4096, tied=False, bias_fields=False)
    return {**d, "dropout": f.rate("attention_dropout", "resid_pdrop", "embd_pdrop")}


def _gemma(f: _Fields) -> dict:
    # Gemma's MLP is gated GELU: the same three matrices and saved tensors as SwiGLU; the head is
    # tied to the embedding; head_dim (256) is independent of hidden / heads
    d = _llama_family(f, max_seq=8192, tied=True, bias_fields=True)
    return {**d, "head_dim": f.int("head_dim", 256), "mlp_bias": False}


def _gpt2(f: _Fields) -> dict:
    if f.bool("add_cross_attention", False):
        raise ShardwiseError(
            f"{f.where}: field 'add_cross_attention' is true; shardwise models "
            "decoder-only transformers, set it to false"
        )
    hidden = f.int("n_embd")
    return dict(
        layers=f.int("n_layer"),
        hidden=hidden,
        heads=f.int("n_head"),
        vocab=f.int("vocab_size"),
        ffn_hidden=f.int("n_inner", 4 * hidden),  # null -> 4 * n_embd
        max_seq=f.int("n_positions", 1024),  # the learned position table
        tied_embeddings=f.bool("tie_word_embeddings", True),
        dropout=f.rate("resid_pdrop", "attn_pdrop", "embd_pdrop", default=0.1),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        ffn_kind="gelu",
        norm="layernorm",
        positions="learned",
    )


def _gpt_neox(f: _Fields) -> dict:
    # rotary_pct rotates part of each head and use_parallel_residual reorders the sum: no params
    bias = f.bool("attention_bias", True)  # query_key_value and dense
    return dict(
        layers=f.int("num_hidden_layers"),
        hidden=f.int("hidden_size"),
        heads=f.int("num_attention_heads"),
        vocab=f.int("vocab_size"),
        ffn_hidden=f.int("intermediate_size"),
        max_seq=f.int("max_position_embeddings", 2048),
        tied_embeddings=f.bool("tie_word_embeddings", False),  # embed_out is its own matrix
        dropout=f.rate("hidden_dropout", "attention_dropout"),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=True,
        ffn_kind="gelu",
        norm="layernorm",
        positions="rotary",
    )


_READERS = {
    "gemma": _gemma,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "llama": _llama,
    "mistral": _mistral,
    "mixtral": _mixtral,
    "phi3": _phi3,
    "qwen2": _qwen2,
    "qwen2_moe": _qwen2_moe,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
    "llama4": _llama4,
    "llama4_text": _llama4,
}
SUPPORTED = tuple(sorted(_READERS))


def from_hf_config(d: dict, where: str, default_name: str) -> ModelSpec:
    """ModelSpec from a parsed config.json. `where` names the file in errors; the model's name is
    the basename of `_name_or_path` when the file carries one, else `default_name`."""
    mt = d.get("model_type")
    if mt is None:
        arch = d.get("architectures")
        first = arch[0] if isinstance(arch, list) and arch else None
        mt = _ARCHITECTURES.get(first) if isinstance(first, str) else None
        if mt is None:
            raise ShardwiseError(
                f"{where}: missing field 'model_type' (and architectures {arch!r} "
                f"is not one shardwise knows); supported: {', '.join(SUPPORTED)}"
            )
    if not isinstance(mt, str):
        raise ShardwiseError(f"{where}: field 'model_type' must be a string, got {mt!r}")
    if mt not in _READERS:
        raise ShardwiseError(
            f"{where}: model_type {mt!r} is not supported; supported: "
            f"{', '.join(SUPPORTED)} (or describe the model in a TOML file of "
            "ModelSpec fields)"
        )
    dims = _READERS[mt](_Fields(d, where))
    try:
        return ModelSpec(name=_name(d, default_name), source=f"{where} (model_type {mt})", **dims)
    except ShardwiseError as e:  # a rule across fields, e.g. heads not dividing hidden
        raise ShardwiseError(f"{where}: {e}") from None


def _name(d: dict, default: str) -> str:
    path = d.get("_name_or_path")
    if isinstance(path, str):
        base = path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        if base not in ("", "."):
            return base
    return default
