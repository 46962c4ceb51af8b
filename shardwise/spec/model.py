"""ModelSpec: the architecture of a decoder-only transformer, and its exact parameter count.

The parameter count is always derived from the dimensions, never typed in; presets carry the
published count only so the tests can hold the derivation against it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from shardwise.errors import ShardwiseError, closest
from shardwise.spec import limits, moe

FFN_KINDS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    kv_heads: int = 0  # 0 -> same as heads (plain multi-head attention)
    ffn_hidden: int = 0  # 0 -> 4*hidden (gelu) or the Llama rule (swiglu)
    ffn_kind: str = "swiglu"
    tied_embeddings: bool = False
    positions: str = "rotary"
    max_seq: int = 4096  # context length; the size of a learned position table
    norm: str = "rmsnorm"
    qkv_bias: bool = False
    out_bias: bool = False  # attention output projection bias
    mlp_bias: bool = False
    head_dim: int = 0  # 0 -> hidden // heads
    experts: int = 0  # 0 -> dense FFN; >0 -> MoE with a router per layer
    top_k: int = 0
    shared_experts: int = 0
    expert_ffn_hidden: int = 0  # 0 -> ffn_hidden
    # the MoE layout beyond experts / top_k (spec/moe.py: which layers, the shared expert's width,
    # Qwen2-MoE's shared-expert gate, DeepSeek's multi-head latent attention)
    shared_ffn_hidden: int = 0  # one shared expert's FFN width; 0 -> expert_ffn_hidden
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(hidden, 1)) scales the shared experts
    first_dense: int = 0  # the first k blocks keep a dense FFN (DeepSeek's first_k_dense_replace)
    moe_every: int = 1  # after those, block i is MoE when (i + 1) % moe_every == 0 (Llama 4 Maverick: 2)
    qk_norm: bool = False  # Qwen3: an RMSNorm(head_dim) on queries and keys (Llama 4's has no weights)
    q_lora_rank: int = 0  # MLA (DeepSeek-V2/V3) when kv_lora_rank > 0: head_dim is then qk_nope_head_dim
    kv_lora_rank: int = 0
    rope_head_dim: int = 0  # MLA: the rotary part of each query/key head (qk_rope_head_dim)
    v_head_dim: int = 0  # MLA: each value head's width; 0 -> head_dim
    dropout: float = 0.0
    estimated: bool = False  # dimensions are a public guess (the lecture's "GPT-4 (est.)")
    published_params: int = 0  # for tests and display only; 0 -> none published
    source: str = ""

    def __post_init__(self):
        def fail(what: str) -> None:
            raise ShardwiseError(f"model {self.name!r}: {what}")

        for f in ("layers", "hidden", "heads", "vocab", "max_seq"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f"{f} must be a positive integer, got {v!r}")
        for f in (
            "kv_heads",
            "ffn_hidden",
            "head_dim",
            "experts",
            "top_k",
            "shared_experts",
            "expert_ffn_hidden",
            "shared_ffn_hidden",
            "first_dense",
            "q_lora_rank",
            "kv_lora_rank",
            "rope_head_dim",
            "v_head_dim",
            "published_params",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(f"{f} must be a non-negative integer, got {v!r}")
        for f, bound in limits.MODEL.items():
            limits.check_count(f"model {self.name!r}: {f}", getattr(self, f), bound)
        if self.ffn_kind not in FFN_KINDS:
            fail(f"ffn_kind must be one of {', '.join(FFN_KINDS)}, got {self.ffn_kind!r}")
        if self.norm not in NORMS:
            fail(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.positions not in POSITIONS:
            fail(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout!r}")
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.kv_heads == 0:
            set_("kv_heads", self.heads)
        if self.head_dim == 0:
            if self.hidden % self.heads:
                fail(f"hidden {self.hidden} is not divisible by heads {self.heads}; give head_dim")
            set_("head_dim", self.hidden // self.heads)
        if self.heads % self.kv_heads:
            fail(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.ffn_hidden == 0:
            set_("ffn_hidden", default_ffn_hidden(self.hidden, self.ffn_kind))
        if self.experts:
            if not 1 <= self.top_k <= self.experts:
                fail(f"top_k must be between 1 and experts={self.experts}, got {self.top_k}")
            if self.expert_ffn_hidden == 0:
                set_("expert_ffn_hidden", self.ffn_hidden)
            if self.shared_ffn_hidden == 0:
                set_("shared_ffn_hidden", self.expert_ffn_hidden)
        elif self.top_k or self.shared_experts:
            fail("top_k / shared_experts need experts > 0")
        for v in moe.layout_problems(self):
            fail(v)
        if self.kv_lora_rank and self.v_head_dim == 0:
            set_("v_head_dim", self.head_dim)

    # ---- shapes -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Width of all query heads together (MLA: each head's no-rope and rotary parts)."""
        return self.heads * (self.head_dim + self.rope_head_dim)

    @property
    def kv_dim(self) -> int:
        """Width of all key (= value, without MLA) heads together."""
        return self.kv_heads * (self.head_dim + self.rope_head_dim)

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @cached_property
    def moe_layers(self) -> int:
        """How many blocks hold the experts (the rest keep a dense FFN of ffn_hidden)."""
        return sum(moe.is_moe_layer(self, i) for i in range(self.layers)) if self.is_moe else 0

    # ---- parameter counts -----------------------------------------------------------------
    def _mlp_params(self, ffn: int) -> int:
        mats = 3 if self.ffn_kind == "swiglu" else 2
        bias = (ffn * (mats - 1) + self.hidden) if self.mlp_bias else 0
        return mats * self.hidden * ffn + bias

    def block_counts(self, moe_block: bool) -> dict[str, int]:
        """Parameters of one transformer block, by part: a MoE block or a dense one."""
        h = self.hidden
        attn = sum(n for _, n in moe.attention_sizes(self))
        norm = 2 * h if self.norm == "layernorm" else h
        if moe_block:
            mlp = self.experts * self._mlp_params(self.expert_ffn_hidden)
            mlp += self.shared_experts * self._mlp_params(self.shared_ffn_hidden)
            router = h * self.experts + (h if self.shared_gate else 0)
        else:
            mlp, router = self._mlp_params(self.ffn_hidden), 0
        return {"attention": attn, "mlp": mlp, "router": router, "norms": 2 * norm}

    @cached_property
    def layer_counts(self) -> dict[str, int]:
        """Parameters of one transformer block, by part (a MoE block for a MoE model: the block the
        estimate sums over every layer)."""
        return self.block_counts(self.is_moe)

    @cached_property
    def counts(self) -> dict[str, int]:
        """Whole-model parameters by part (embedding, positions, layers, final norm, lm head)."""
        h = self.hidden
        dense = self.layers - self.moe_layers
        return {
            "embedding": self.vocab * h,
            "positions": self.max_seq * h if self.positions == "learned" else 0,
            "layers": self.moe_layers * sum(self.block_counts(True).values())
            + dense * sum(self.block_counts(False).values()),
            "final_norm": 2 * h if self.norm == "layernorm" else h,
            "lm_head": 0 if self.tied_embeddings else self.vocab * h,
        }

    @cached_property
    def layer_params(self) -> int:
        return sum(self.layer_counts.values())

    @cached_property
    def params(self) -> int:
        return sum(self.counts.values())

    @cached_property
    def active_params(self) -> int:
        """Parameters touched per token (MoE: top_k of the experts); = params for dense."""
        if not self.is_moe:
            return self.params
        unused = (self.experts - self.top_k) * self._mlp_params(self.expert_ffn_hidden)
        return self.params - self.moe_layers * unused

    def layer_param_shapes(self, moe_block: bool | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """Parameters of one block (by default a MoE block for a MoE model), named as the run
        tier's reference model names them (relative to `layers.{i}.`), in registration order.
        Sum of sizes = block_counts."""
        moe_block = self.is_moe if moe_block is None else moe_block
        h, f = self.hidden, self.ffn_hidden
        out: list[tuple[str, tuple[int, ...]]] = []

        def norm(prefix: str) -> None:
            out.append((f"{prefix}.weight", (h,)))
            if self.norm == "layernorm":
                out.append((f"{prefix}.bias", (h,)))

        def linear(prefix: str, o: int, i: int, bias: bool) -> None:
            out.append((f"{prefix}.weight", (o, i)))
            if bias:
                out.append((f"{prefix}.bias", (o,)))

        def mlp(prefix: str, ffn: int) -> None:
            linear(f"{prefix}.w1", ffn, h, self.mlp_bias)
            linear(f"{prefix}.w2", h, ffn, self.mlp_bias)
            if self.ffn_kind == "swiglu":
                linear(f"{prefix}.w3", ffn, h, self.mlp_bias)

        norm("attention_norm")
        out += moe.attention_shapes(self)
        norm("ffn_norm")
        if moe_block:
            linear("feed_forward.router", self.experts, h, False)
            if self.shared_gate:
                linear("feed_forward.shared_gate", 1, h, False)
            for e in range(self.experts):
                mlp(f"feed_forward.experts.{e}", self.expert_ffn_hidden)
            for e in range(self.shared_experts):
                mlp(f"feed_forward.shared.{e}", self.shared_ffn_hidden)
        else:
            mlp("feed_forward", f)
        return out

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every parameter of the reference model (run/model.py), by name, in registration order:
        tok_embeddings, [pos_embeddings], layers.{i}.*, norm, [output]. Tied: no output.weight."""
        h = self.hidden
        out = [("tok_embeddings.weight", (self.vocab, h))]
        if self.positions == "learned":
            out.append(("pos_embeddings.weight", (self.max_seq, h)))
        blocks = {True: self.layer_param_shapes(True), False: self.layer_param_shapes(False)} if self.is_moe else {}
        for i in range(self.layers):
            block = blocks[moe.is_moe_layer(self, i)] if self.is_moe else self.layer_param_shapes()
            out += [(f"layers.{i}.{n}", s) for n, s in block]
        out.append(("norm.weight", (h,)))
        if self.norm == "layernorm":
            out.append(("norm.bias", (h,)))
        if not self.tied_embeddings:
            out.append(("output.weight", (self.vocab, h)))
        return out

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d["params"] = self.params
        d["active_params"] = self.active_params
        return d

    def scaled(self, **dims) -> ModelSpec:
        """The same architecture with some dimensions replaced (for runnable tiny copies)."""
        if "hidden" in dims or "heads" in dims:
            dims.setdefault("head_dim", 0)
        if "hidden" in dims and "ffn_hidden" not in dims:
            dims["ffn_hidden"] = 0
        if "heads" in dims and "kv_heads" not in dims and self.kv_heads == self.heads:
            dims["kv_heads"] = 0  # multi-head attention stays multi-head (GQA needs kv_heads given)
        dims.setdefault("published_params", 0)
        return dataclasses.replace(self, **dims)


def default_ffn_hidden(hidden: int, kind: str) -> int:
    """GELU: 4h. SwiGLU: Llama's rule, 2/3 of 4h rounded up to a multiple of 256."""
    if kind == "gelu":
        return 4 * hidden
    return 256 * ((int(2 * 4 * hidden / 3) + 255) // 256)


# ---- sources ----------------------------------------------------------------------------
_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)}


def spec_from_dict(d: dict, where: str) -> ModelSpec:
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise ShardwiseError(f"{where}: unknown model field {unknown[0]!r}; {closest(unknown[0], _FIELDS)}")
    missing = [f for f in ("name", "layers", "hidden", "heads", "vocab") if f not in d]
    if missing:
        raise ShardwiseError(f"{where}: missing model field {missing[0]!r}")
    try:
        return ModelSpec(**d)
    except TypeError as e:  # a wrong type that __post_init__ did not catch
        raise ShardwiseError(f"{where}: {e}") from None
