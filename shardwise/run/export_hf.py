"""A checkpoint of `shardwise run` as a Hugging Face model directory: `model.safetensors` + `config.json`.

    shardwise export-hf runs/ck --out my-model      # the newest checkpoint in runs/ck (or a step-N directory)
    AutoModelForCausalLM.from_pretrained("my-model") # transformers: LlamaForCausalLM or GPT2LMHeadModel

The checkpoint is read with DCP into full tensors on the CPU (whatever plan wrote it: DCP assembles
the shards), the optimizer states are left out, and every parameter is renamed (and for GPT-2
re-laid-out) to transformers' names. The model is the run tier's (run/model.py): rotate-half rotary
embeddings, which is the layout of transformers' Llama (`rotate_half` in modeling_llama.py), so
q_proj and k_proj need no permutation; GPT-2's Conv1D stores weights as [in, out] and fuses q, k, v
into c_attn (modeling_gpt2.py, GPT2Attention), so those are transposed and concatenated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardwise.errors import ShardwiseError
from shardwise.run import checkpoint_dir as layout
from shardwise.run.model import NORM_EPS, ROPE_THETA
from shardwise.spec.model import ModelSpec

WEIGHTS, CONFIG = "model.safetensors", "config.json"

# run tier name (after "layers.N.") -> transformers' LlamaForCausalLM name (after "model.layers.N.")
_LLAMA_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1": "mlp.gate_proj",  # silu(w1 x) * w3 x: gate, up
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}


def family(spec: ModelSpec) -> str:
    """ "llama" or "gpt2": the transformers architecture this model is exactly, or a one-line refusal."""
    if spec.ffn_kind == "swiglu" and spec.norm == "rmsnorm" and spec.positions == "rotary":
        if spec.qkv_bias != spec.out_bias:
            # LlamaAttention gives q, k, v and o one switch, config.attention_bias
            raise ShardwiseError(
                f"model {spec.name!r}: bias on q/k/v ({spec.qkv_bias}) but not on the output projection "
                f"({spec.out_bias}) has no transformers Llama config; it cannot be exported"
            )
        return "llama"
    if spec.ffn_kind == "gelu" and spec.norm == "layernorm" and spec.positions == "learned":
        if spec.kv_heads != spec.heads or spec.heads * spec.head_dim != spec.hidden:
            raise ShardwiseError(
                f"model {spec.name!r}: GPT-2 has heads x head_dim = hidden and no grouped-query attention; "
                "this model cannot be exported as GPT2LMHeadModel"
            )
        return "gpt2"
    raise ShardwiseError(
        f"model {spec.name!r} ({spec.ffn_kind}, {spec.norm}, {spec.positions} positions) is neither Llama-style "
        "nor GPT-2-style; export-hf writes those two"
    )


def hf_config(spec: ModelSpec) -> dict:
    """config.json for transformers: the fields its LlamaConfig / GPT2Config read, with the run
    tier's constants (norm epsilon, rotary base, GPT-2's tanh GELU) spelled out."""
    if family(spec) == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": spec.vocab,
            "hidden_size": spec.hidden,
            "intermediate_size": spec.ffn_hidden,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "head_dim": spec.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": spec.max_seq,
            "rms_norm_eps": NORM_EPS,
            "rope_theta": ROPE_THETA,  # transformers < 5
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},  # transformers >= 5
            "attention_bias": spec.qkv_bias,
            "attention_dropout": spec.dropout,
            "mlp_bias": spec.mlp_bias,
            "tie_word_embeddings": spec.tied_embeddings,
            "torch_dtype": "float32",
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": spec.vocab,
        "n_embd": spec.hidden,
        "n_layer": spec.layers,
        "n_head": spec.heads,
        "n_inner": spec.ffn_hidden,
        "n_positions": spec.max_seq,
        "activation_function": "gelu_new",  # the tanh approximation, as run/model.py's FeedForward
        "layer_norm_epsilon": NORM_EPS,
        "resid_pdrop": spec.dropout,
        "embd_pdrop": spec.dropout,
        "attn_pdrop": spec.dropout,
        "tie_word_embeddings": spec.tied_embeddings,
        "torch_dtype": "float32",
    }


def _llama_tensors(spec: ModelSpec, sd: dict) -> dict:
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not spec.tied_embeddings:  # tied: transformers ties lm_head to embed_tokens on load
        out["lm_head.weight"] = sd["output.weight"]
    for name, t in sd.items():
        if not name.startswith("layers."):
            continue
        _, i, rest = name.split(".", 2)
        for ours, theirs in _LLAMA_LAYER.items():
            if rest.startswith(ours):
                out[f"model.layers.{i}.{theirs}{rest[len(ours) :]}"] = t
                break
        else:
            raise ShardwiseError(f"checkpoint tensor {name!r} has no transformers Llama name")
    return out


def _gpt2_tensors(spec: ModelSpec, sd: dict) -> dict:
    def bias(name: str, n: int) -> torch.Tensor:
        return sd.get(name, torch.zeros(n))  # a model without that bias: transformers' GPT-2 has one, zero is exact

    h = spec.hidden
    out = {
        "transformer.wte.weight": sd["tok_embeddings.weight"],
        "transformer.wpe.weight": sd["pos_embeddings.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "transformer.ln_f.bias": sd["norm.bias"],
    }
    if not spec.tied_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(spec.layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        a, f = p + "attention.", p + "feed_forward."
        # Conv1D: y = x @ W + b with W [in, out]; c_attn's output is q | k | v
        out[q + "attn.c_attn.weight"] = torch.cat([sd[a + w + ".weight"] for w in ("wq", "wk", "wv")]).T
        out[q + "attn.c_attn.bias"] = torch.cat([bias(a + w + ".bias", h) for w in ("wq", "wk", "wv")])
        out[q + "attn.c_proj.weight"] = sd[a + "wo.weight"].T
        out[q + "attn.c_proj.bias"] = bias(a + "wo.bias", h)
        out[q + "mlp.c_fc.weight"] = sd[f + "w1.weight"].T
        out[q + "mlp.c_fc.bias"] = bias(f + "w1.bias", spec.ffn_hidden)
        out[q + "mlp.c_proj.weight"] = sd[f + "w2.weight"].T
        out[q + "mlp.c_proj.bias"] = bias(f + "w2.bias", h)
        for ours, theirs in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[q + theirs + ".weight"] = sd[p + ours + ".weight"]
            out[q + theirs + ".bias"] = sd[p + ours + ".bias"]
    return out


def hf_tensors(spec: ModelSpec, sd: dict) -> dict:
    """The run tier's full state dict (names of ModelSpec.param_shapes()) -> transformers' names,
    contiguous (safetensors stores each tensor as one buffer)."""
    out = _llama_tensors(spec, sd) if family(spec) == "llama" else _gpt2_tensors(spec, sd)
    return {k: v.detach().contiguous() for k, v in out.items()}


def spec_of(path: Path) -> ModelSpec:
    state = layout.read_trainer(path)
    if "spec" not in state:
        raise ShardwiseError(f"{path}: this checkpoint does not record its model's dimensions; it cannot be exported")
    return ModelSpec(**state["spec"])


def read_parameters(path: Path, spec: ModelSpec) -> dict:
    """Every parameter of the checkpoint as a full fp32 CPU tensor (no optimizer state). The tied
    output projection is not in the checkpoint (it is the embedding)."""
    tied = {"output.weight"} if spec.tied_embeddings else set()
    sd = {name: torch.empty(shape) for name, shape in spec.param_shapes() if name not in tied}
    try:
        dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise ShardwiseError(f"{path}: cannot read the checkpoint's parameters ({type(e).__name__})") from None
    return sd


def export(checkpoint: str, out: str) -> Path:
    """Write out/model.safetensors and out/config.json from a checkpoint (or a checkpoint
    directory: its newest). Returns the checkpoint exported."""
    from safetensors.torch import save_file

    path = layout.resolve(checkpoint, "", "export-hf")
    spec = spec_of(path)
    config = hf_config(spec)  # refuses an unexportable model before anything is read
    tensors = hf_tensors(spec, read_parameters(path, spec))
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "source": str(path), "shardwise_model": json.dumps(dataclasses.asdict(spec))}
    save_file(tensors, str(dst / WEIGHTS), metadata=meta)
    (dst / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path
