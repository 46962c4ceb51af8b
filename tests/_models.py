"""The tiny reference models the multi-process tests train: a Llama (RMSNorm, rotary, GQA, SwiGLU)
and a GPT-2 (biases, LayerNorm, learned positions, and a tied embedding, copied across pipeline
stages), small enough that 2-8 CPU ranks train them in seconds."""

from shardwise.spec.model import ModelSpec

TINY_LLAMA = ModelSpec(name="tiny-llama", layers=4, hidden=64, heads=4, kv_heads=2, vocab=128, ffn_hidden=128)
TINY_GPT2 = ModelSpec(
    name="tiny-gpt2",
    layers=4,
    hidden=64,
    heads=4,
    vocab=128,
    ffn_kind="gelu",
    norm="layernorm",
    positions="learned",
    max_seq=32,
    tied_embeddings=True,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
)
