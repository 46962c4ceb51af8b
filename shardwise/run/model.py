"""The reference model: one decoder-only transformer class that a ModelSpec drives.

Llama-style (RMSNorm, rotary positions, grouped-query attention, SwiGLU) and GPT-2-style
(LayerNorm, learned positions, GELU MLP, biases, tied embeddings) are the same class with
different spec fields. Parameter names and shapes are exactly `ModelSpec.param_shapes()`, so
the estimate tier's inventory, the run's measurements and checkpoints all speak of the same tensors.

Layers live in a ModuleDict keyed "0".."L-1" and the top-level modules may be None: a pipeline
stage is this model with the modules it does not own removed (torchtitan's scheme), and keeps
the original names.

Initialization is per parameter from a generator seeded by (seed, parameter name), so the
initial weights do not depend on how the model is split: a shard takes its slice of the same
full tensor (see `init_weights`).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from shardwise.errors import ShardwiseError
from shardwise.run.loss import chunked_cross_entropy
from shardwise.run.recompute import op_checkpoint
from shardwise.spec.model import ModelSpec

NORM_EPS = 1e-5  # Llama 2/3 and GPT-2 all use 1e-5
ROPE_THETA = 10000.0  # Llama 1/2's base; ModelSpec has no field for it (Llama 3 uses 500000)
INIT_STD = 0.02  # GPT-2 / nanoGPT


def check_runnable(spec: ModelSpec) -> None:
    """The run tier builds dense models only; MoE routing/expert parallelism is estimate-only."""
    if spec.is_moe:
        raise ShardwiseError(
            f"model {spec.name!r} is a mixture of experts; `shardwise run` trains dense "
            "models only (estimate and search handle MoE)"
        )


def _norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(spec.hidden, eps=NORM_EPS)
    return nn.LayerNorm(spec.hidden, eps=NORM_EPS)


def rotary(seq: int, head_dim: int, device, dtype, positions=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq, head_dim] for rotate-half rotary embeddings (GPT-NeoX / HF layout),
    at positions 0..seq-1 or at `positions` (context parallel: this rank's tokens, run/context.py)."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    at = torch.arange(seq, device=device) if positions is None else positions
    angles = torch.outer(at.to(torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, s, heads, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def native_gqa(q: torch.Tensor) -> bool:
    """Whether SDPA's kernel for q takes K/V with fewer heads (activations.block_inventory's gqa)."""
    return q.device.type == "cpu" or q.dtype in (torch.bfloat16, torch.float16)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h = spec.hidden
        self.head_dim = spec.head_dim
        self.n_rep = spec.heads // spec.kv_heads
        self.rotary = spec.positions == "rotary"
        self.dropout = spec.dropout
        self.wq = nn.Linear(h, spec.q_dim, bias=spec.qkv_bias)
        self.wk = nn.Linear(h, spec.kv_dim, bias=spec.qkv_bias)
        self.wv = nn.Linear(h, spec.kv_dim, bias=spec.qkv_bias)
        self.wo = nn.Linear(spec.q_dim, h, bias=spec.out_bias)
        self.recompute_core = False  # selective recompute: set by parallelize()
        self.kernel = "flash"  # Plan.attention, set by parallelize(): "math" forces SDPA's math kernel
        self.positions: torch.Tensor | None = None  # context parallel: this rank's token positions (run/context.py)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scores, softmax, dropout, times V: what selective recompute throws away.
        Grouped-query attention goes to SDPA as it is (enable_gqa), so the kernel saves K and V at
        their own width, where the kernel SDPA picks takes it: the CPU's flash kernel, CUDA's flash
        kernel (half precision). CUDA's memory-efficient kernel, its choice in fp32, does not
        (sdp_utils.cpp: check_grouped_query_attention), and SDPA would fall back to the math
        kernel: there K and V are repeated to the query heads first (inside the recomputed region)."""
        gqa = self.n_rep > 1
        if gqa and not native_gqa(q):
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
            gqa = False
        p = self.dropout if self.training else 0.0
        if self.kernel == "math":  # the scores materialized and saved, as the estimate's "math" counts them
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds heads/tp of them
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.rotary:
            cos, sin = rotary(s, self.head_dim, q.device, q.dtype, self.positions)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            out = self.core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, f, bias = spec.hidden, spec.ffn_hidden, spec.mlp_bias
        self.swiglu = spec.ffn_kind == "swiglu"
        self.w1 = nn.Linear(h, f, bias=bias)
        self.w2 = nn.Linear(f, h, bias=bias)
        if self.swiglu:
            self.w3 = nn.Linear(h, f, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))  # GPT-2's gelu


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attention_norm = _norm(spec)
        self.attention = Attention(spec)
        self.ffn_norm = _norm(spec)
        self.feed_forward = FeedForward(spec)
        self.resid_dropout = nn.Dropout(spec.dropout)
        self.recompute = "none"  # "full" or "selective-op" (a block-wide policy): set by parallelize()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.resid_dropout(self.attention(self.attention_norm(x)))
        return h + self.resid_dropout(self.feed_forward(self.ffn_norm(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            # keeps only the block's input; the rest is recomputed in backward
            return checkpoint(self._forward, x, use_reentrant=False)
        if self.recompute == "selective-op" and torch.is_grad_enabled():
            return op_checkpoint(self._forward, x)  # keeps the matmul and attention outputs
        return self._forward(x)


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        check_runnable(spec)
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_embeddings = nn.Embedding(spec.max_seq, spec.hidden) if spec.positions == "learned" else None
        self.embed_dropout = nn.Dropout(spec.dropout)
        self.layers = nn.ModuleDict({str(i): Block(spec) for i in range(spec.layers)})
        self.norm = _norm(spec)
        self.output = nn.Linear(spec.hidden, spec.vocab, bias=False)
        self.tie_weights()
        self.autocast_dtype: torch.dtype | None = None  # mixed precision without FSDP: set by parallelize()
        self.positions: torch.Tensor | None = None  # context parallel: this rank's token positions (run/context.py)

    def tie_weights(self) -> None:
        """Tied embeddings: the output projection IS the token embedding. Module.to_empty and
        parallelize_module replace parameters one module at a time, which unties them; call
        again after either."""
        if self.spec.tied_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab]; a pipeline stage maps whatever it receives
        (tokens or hidden states) to what it sends on. With targets [b, s] (a model holding the
        output projection): the mean token cross-entropy, computed chunk by chunk (run/loss.py)
        so that the full logits never exist."""
        if self.autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                return self._forward(x, targets)
        return self._forward(x, targets)

    def _forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.tok_embeddings is not None:
            s = x.shape[1]
            x = self.tok_embeddings(x)
            if self.pos_embeddings is not None:
                at = torch.arange(s, device=x.device) if self.positions is None else self.positions
                x = x + self.pos_embeddings(at)
            x = self.embed_dropout(x)
        for layer in self.layers.values():
            x = layer(x)
        if self.norm is not None:
            x = self.norm(x)
        if targets is not None:
            return chunked_cross_entropy(x, self.output.weight, targets)
        if self.output is not None:
            x = self.output(x)
        return x

    def init_name(self, name: str) -> str:
        """The name whose initial values a parameter takes: the tied output copy that a last
        pipeline stage keeps takes the token embedding's."""
        if name == "output.weight" and self.spec.tied_embeddings:
            return "tok_embeddings.weight"
        return name

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Fill every parameter (materialized: after to_empty) deterministically.

        Each parameter's FULL tensor is drawn on the CPU from a generator seeded by
        (seed, name); a DTensor (TP or FSDP shard) then keeps its own slice of it. So the
        initial model is the same under every plan, one full parameter in memory at a time.
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, p in self.named_parameters():
            full = initial_value(self.spec, self.init_name(name), tuple(p.shape), seed)
            if isinstance(p, DTensor):
                # src_data_rank=None: every rank holds the same full tensor, slice locally, no comm
                local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(local)
            else:
                p.copy_(full)


def initial_value(spec: ModelSpec, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial full fp32 tensor of one parameter. GPT-2's scheme: N(0, 0.02) for weights and
    embeddings, the residual projections (wo, w2) scaled by 1/sqrt(2L), zero biases, unit norms."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:  # the only 1-D weights are norm scales
        return torch.ones(shape)
    std = INIT_STD
    if name.rsplit(".", 2)[-2] in ("wo", "w2"):
        std = INIT_STD / math.sqrt(2 * spec.layers)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=g)


def build(spec: ModelSpec, device: torch.device | str = "meta", seed: int | None = None) -> Transformer:
    """The full model: on the meta device (any size, no memory), or materialized on `device`
    and initialized from `seed` (0 if none)."""
    device = torch.device(device)
    # real meta tensors even under the trace tier's FakeTensorMode: a fake parameter cannot be
    # materialized (to_empty would have to swap it in place, which its weak references forbid)
    with unset_fake_temporarily(), torch.device("meta"):
        model = Transformer(spec)
    if device.type != "meta":
        model.to_empty(device=device)
        model.tie_weights()
        model.init_weights(0 if seed is None else seed)
    return model
