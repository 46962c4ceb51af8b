"""Sanity bounds on every size a user can type. A value past one is a typo (an extra zero or
three), and failing at once, in one line, beats an estimate that loops for minutes or a search
that eats the machine. Each bound sits far above the largest published value (the reason beside
it), so no real configuration meets one."""

from __future__ import annotations

import math

from shardwise.errors import ShardwiseError

MODEL = {
    "layers": 1 << 12,  # 126 in Llama 3.1 405B, 128 in GPT 1T (Narayanan et al. 2021)
    "hidden": 1 << 20,  # 25,600 in GPT 1T
    "heads": 1 << 16,  # 160 in GPT 1T
    "kv_heads": 1 << 16,
    "head_dim": 1 << 16,  # 256 in Gemma
    "ffn_hidden": 1 << 22,  # 53,248 in Llama 3.1 405B
    "expert_ffn_hidden": 1 << 22,
    "vocab": 1 << 24,  # 256,000 in Gemma
    "max_seq": 1 << 27,  # 10M tokens of context in Llama 4 Scout
    "experts": 1 << 16,  # 256 routed experts in DeepSeek-V3
    "top_k": 1 << 16,
    "shared_experts": 1 << 16,
    "shared_ffn_hidden": 1 << 22,
    "first_dense": 1 << 12,  # 3 in DeepSeek-V3
    "moe_every": 1 << 12,  # 2 in Llama 4 Maverick
    "q_lora_rank": 1 << 20,  # 1,536 in DeepSeek-V3
    "kv_lora_rank": 1 << 20,  # 512 in DeepSeek-V3
    "rope_head_dim": 1 << 16,  # 64 in DeepSeek-V3
    "v_head_dim": 1 << 16,  # 128 in DeepSeek-V3
}
GPUS = 1 << 17  # 131,072: larger than any cluster built so far (the search's --min-gpus stops here too)
GPUS_PER_NODE = 1 << 10  # 72 in a GB200 NVL72 rack
PLAN = {
    "mbs": 1 << 16,  # sequences per micro-batch
    "gbs": 1 << 24,  # sequences per step: Llama 3's 16M tokens per step is 2,048 of 8,192 tokens
    "seq": MODEL["max_seq"],
    "vpp": 1 << 10,  # virtual stages per rank: never more than the layers allow
    "cp": 1 << 17,  # context-parallel ranks: never more than the GPUs
    "ep": 1 << 16,  # expert-parallel ranks: never more than the routed experts (256 in DeepSeek-V3)
}
TOKENS = 1e18  # a training budget: Llama 3 was trained on 15.6T tokens
PRICE = 1e6  # USD per GPU-hour


def check_count(what: str, value, bound) -> None:
    """One line when `value` is past `bound` (a model field, a GPU count, a plan field)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > bound:
        raise ShardwiseError(
            f"{what}={value:,} is past the sanity bound of {bound:,}; check it for a typo (an extra zero)"
        )


def check_amount(what: str, value: float, bound: float) -> None:
    """One line when a budget or a price is not a finite number in [0, bound]."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= bound):
        raise ShardwiseError(f"{what} must be a finite number from 0 to {bound:g}, got {value!r}")
