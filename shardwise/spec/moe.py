"""The mixture-of-experts and latent-attention parts of a ModelSpec: which blocks hold the experts,
the attention's parameters (plain multi-head / GQA, Qwen3's QK norms, or DeepSeek's multi-head
latent attention), and the rules between these fields. Takes the spec duck-typed (model.py
imports this module)."""

from __future__ import annotations


def is_moe_layer(m, i: int) -> bool:
    """Block i holds the experts: past the first `first_dense` blocks, every `moe_every`-th one.
    (i + 1) % step is the rule of Hugging Face's Qwen2-MoE (decoder_sparse_step) and Llama 4
    (interleave_moe_layer_step: moe_layers = range(step - 1, layers, step)); DeepSeek-V3 has
    first_k_dense_replace = 3 and moe_layer_freq = 1."""
    return m.experts > 0 and i >= m.first_dense and (i + 1) % m.moe_every == 0


def layout_problems(m) -> list[str]:
    """What is wrong across the MoE / MLA fields, each as one line (empty: nothing)."""
    out = []
    if not isinstance(m.moe_every, int) or isinstance(m.moe_every, bool) or m.moe_every < 1:
        return [f"moe_every must be a positive integer, got {m.moe_every!r}"]
    if not isinstance(m.shared_gate, bool) or not isinstance(m.qk_norm, bool):
        return ["shared_gate and qk_norm must be true or false"]
    if not m.experts and (m.first_dense or m.moe_every > 1 or m.shared_gate):
        out.append("first_dense / moe_every / shared_gate need experts > 0")
    if m.experts and not any(is_moe_layer(m, i) for i in range(m.layers)):
        out.append(
            f"first_dense={m.first_dense} and moe_every={m.moe_every} leave none of the {m.layers} layers "
            "with experts; lower them"
        )
    if m.shared_gate and not m.shared_experts:
        out.append("shared_gate needs shared_experts > 0")
    if m.kv_lora_rank:
        if m.kv_heads != m.heads:
            out.append(f"latent attention (kv_lora_rank) has one key/value head per query head: kv_heads={m.heads}")
        if m.qkv_bias or m.out_bias or m.qk_norm:
            out.append("latent attention (kv_lora_rank) takes no qkv_bias / out_bias / qk_norm")
    elif m.q_lora_rank or m.rope_head_dim or m.v_head_dim:
        out.append("q_lora_rank / rope_head_dim / v_head_dim describe latent attention: give kv_lora_rank too")
    return out


def attention_shapes(m) -> list[tuple[str, tuple[int, ...]]]:
    """One block's attention parameters in registration order, named as the run tier names them.
    MLA (DeepSeek-V3 §2.1.1; torchtitan's deepseek_v3 model names): queries through a low-rank
    latent (wq_a, q_norm, wq_b; a plain wq when q_lora_rank is 0), keys and values through the
    compressed latent c_KV of kv_lora_rank plus one shared rotary key (wkv_a), expanded per head by
    wkv_b into the no-rope key part and the value; wo from heads * v_head_dim."""
    h, out = m.hidden, []

    def linear(prefix: str, o: int, i: int, bias: bool) -> None:
        out.append((f"attention.{prefix}.weight", (o, i)))
        if bias:
            out.append((f"attention.{prefix}.bias", (o,)))

    if m.kv_lora_rank:
        if m.q_lora_rank:
            linear("wq_a", m.q_lora_rank, h, False)
            out.append(("attention.q_norm.weight", (m.q_lora_rank,)))
            linear("wq_b", m.q_dim, m.q_lora_rank, False)
        else:
            linear("wq", m.q_dim, h, False)
        linear("wkv_a", m.kv_lora_rank + m.rope_head_dim, h, False)
        out.append(("attention.kv_norm.weight", (m.kv_lora_rank,)))
        linear("wkv_b", m.heads * (m.head_dim + m.v_head_dim), m.kv_lora_rank, False)
        linear("wo", h, m.heads * m.v_head_dim, False)
        return out
    linear("wq", m.q_dim, h, m.qkv_bias)
    linear("wk", m.kv_dim, h, m.qkv_bias)
    linear("wv", m.kv_dim, h, m.qkv_bias)
    linear("wo", h, m.q_dim, m.out_bias)
    if m.qk_norm:  # Qwen3Attention: q_norm and k_norm, RMSNorm over each head's head_dim
        out += [("attention.q_norm.weight", (m.head_dim,)), ("attention.k_norm.weight", (m.head_dim,))]
    return out


def attention_sizes(m) -> list[tuple[str, int]]:
    out = []
    for name, shape in attention_shapes(m):
        n = 1
        for d in shape:
            n *= d
        out.append((name, n))
    return out
