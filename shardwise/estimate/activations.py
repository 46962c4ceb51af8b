"""Activation memory, from an inventory of the tensors autograd saves for backward.

Each transformer block is listed tensor by tensor (name, elements per token, dtype, how tensor
parallelism splits it), derived from the architecture: so GQA, SwiGLU, RMSNorm, rotary
positions, no dropout and flash attention come out right, and Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", Sec. 4) is the special case
of a GPT block with dropout and materialized attention: s*b*h*(34 + 5*a*s/h) bytes.

Two layouts:
- `torch`: the run tier's reference model (run/model.py) on PyTorch's kernels:
  * norms save their input and fp32 statistics (CUDA's fused rms_norm: rstd; layer_norm: mean
    and rstd). On the CPU (device="cpu") rms_norm is a composite of ATen ops: it saves its input
    in fp32 (an fp32 copy of a bf16 input), rstd, and the fp32 normalized tensor the weight's
    gradient reads; layer_norm is one kernel on both, keeping mean and rstd in fp32 on CUDA and
    in the input's dtype on the CPU.
  * autocast (DDP / ZeRO-1 / TP / PP mixed precision) keeps the residual stream in fp32 (the
    embedding runs in fp32, bf16 branch + fp32 residual = fp32) and casts the fp32 norm output
    to bf16 once per consuming Linear: wq, wk and wv each save their own copy.
  * grouped-query attention goes to SDPA with enable_gqa, so its kernel saves K and V at their
    own width, except CUDA in fp32 (whose memory-efficient kernel does not take GQA: the model
    repeats K/V to the query heads first); rotary saves its cos and sin [s, head_dim].
  * flash SDPA saves q, k, v, its output (which is also wo's input) and an fp32 logsumexp per
    head and token; the math kernel saves the scaled q and k, the softmax [b, a, s, s], the
    dropout mask and output, and v.
  * sequence parallel (torchtitan's layout) shards norms, residuals and dropout on the sequence,
    but the all-gathered input of wq/wk/wv, w1/w3 and the output head is saved whole.
- `torch` with compile (Plan.compile: each block under torch.compile, run/inductor.py): what
  AOTAutograd's min-cut partitioner keeps of the block's joint graph, where the pointwise ops
  that inductor fuses are recomputed in the backward's fused kernels from a smaller set
  (block_inventory's `compiled`, measured on the CPU, tests/test_compile.py).
- `megatron`: Megatron-LM (the papers' layout, used by the megatron, deepspeed and zero-paper
  profiles): one fused QKV and one fused w1|w3 input, residual in the compute dtype, the fused
  SwiGLU saves only its input, sequence parallel saves the linear inputs sharded and gathers
  them again in backward (so everything is /t), vocab-parallel logits and loss.

Numeric plan fields (mbs, seq, tp, pp, vpp, gbs, dp) may be numpy arrays: only arithmetic and
the _num helpers touch them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from shardwise.errors import ShardwiseError
from shardwise.estimate import pipeline
from shardwise.estimate._num import maximum, where
from shardwise.spec.loss import chunked_loss, loss_chunk_rows
from shardwise.spec.plan import ATTENTION, recompute_every, recompute_kind

LAYOUTS = ("torch", "megatron")
DEVICES = ("cuda", "cpu")  # where the torch layout's kernels run (rms_norm differs)
DTYPE_BYTES = {"fp32": 4, "mask": 1, "int64": 8}  # plus "act" and "res", set by the precision


@dataclass(frozen=True)
class Saved:
    """One tensor a block keeps for its backward.

    width: elements per token (per="token": times b*s; per="position": times s, shared by the
      batch; per="score": times b*s*s, width = attention heads).
    dtype: "act" (the matmul dtype), "res" (the residual stream's dtype), "fp32", "mask" (a bool
      dropout mask, 1 byte), "int64".
    split: how tensor parallelism divides it. "tp": by tp always (heads, FFN columns);
      "seq": by tp only with sequence parallel (norms, residual, dropout masks); "gather": the
      input of a column-parallel Linear: by tp with sequence parallel in the megatron layout only;
      "none": never.
    core: saved inside the attention core (scores, softmax, dropout, attention times V), which
      selective recompute discards.
    """

    name: str
    width: int
    dtype: str = "act"
    split: str = "tp"
    per: str = "token"
    core: bool = False


def _check(layout: str, attention: str, device: str = "cuda") -> None:
    if device not in DEVICES:
        raise ShardwiseError(f"unknown device {device!r}; use cuda or cpu (whose kernels' saved tensors are counted)")
    if layout not in LAYOUTS:
        raise ShardwiseError(f"unknown activation layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if attention not in ATTENTION:
        raise ShardwiseError(
            f"unknown attention kernel {attention!r}; use flash (no s*s scores saved) or math (materialized scores)"
        )


@lru_cache(maxsize=256)
def block_inventory(
    model,
    layout: str = "torch",
    attention: str = "flash",
    selective: bool = False,
    autocast: bool = False,
    device: str = "cuda",
    gqa: bool = True,
    compiled: bool = False,
) -> tuple[Saved, ...]:
    """Every tensor one transformer block saves, without full recompute.

    selective: the attention core is checkpointed, keeping only its inputs q, k, v.
    autocast: torch layout under torch.autocast (one bf16 copy of the norm output per Linear).
    device: torch layout, where the kernels run: "cpu" has the composite rms_norm.
    gqa: torch layout, the flash kernel takes K/V at their own width (run/model.native_gqa: the
    CPU, or half precision on CUDA); else they are repeated to the query heads before it.
    compiled: torch layout, the block under torch.compile. Against eager (saved_tensors_hooks on
    the run tier's block, CPU, fp32 / bf16 / autocast, tests/test_compile.py), the partitioner:
      * RMSNorm keeps its input in its own dtype and an fp32 rstd, as CUDA's fused kernel does:
        the CPU composite's fp32 copy and normalized tensor are recomputed (fused into the norm's
        backward kernel); LayerNorm's decomposition keeps what its eager kernel does (mean and
        rstd in the input's dtype on the CPU, torch/_decomp's native_layer_norm);
      * under autocast one bf16 copy of a norm's output feeds every Linear that reads it (the
        cast is computed once), not one copy per Linear;
      * rotary's cos and sin are recomputed from the positions (a constant of the graph);
      * SwiGLU's silu(w1 x) is recomputed from w1's output in the backward's fused kernel; its
        inputs w1 x, w3 x and the product (w2's input) stay (GELU: its input and output stay);
      * the residual h = x + attention(x), ffn_norm's input, is recomputed from x and wo's
        output, which is kept instead: its dtype is the matmul's (bf16 under autocast, where h
        is fp32);
      * dropout masks stay (a random op is not recomputed), as 1-byte masks.
    The flash kernel's q, k, v, output and logsumexp and every matmul input are kept as eager.
    The math kernel's scores are counted as eager (not measured under compile).
    """
    _check(layout, attention, device)
    torch_ = layout == "torch"
    compiled = compiled and torch_
    autocast = autocast and torch_
    h, a, f = model.hidden, model.heads, model.ffn_hidden
    stats = 1 if model.norm == "rmsnorm" else 2  # rstd; or mean and rstd
    cpu = torch_ and device == "cpu"
    composite = cpu and model.norm == "rmsnorm" and not compiled  # compiled: input and rstd, as CUDA's kernel
    drop = model.dropout > 0
    math = attention == "math"
    inv: list[Saved] = []

    def norm(prefix: str) -> None:
        inv.append(Saved(f"{prefix}.input", h, "fp32" if composite else "res", "seq"))
        # CPU's layer_norm keeps mean and rstd in the input's dtype, CUDA's in fp32
        inv.append(Saved(f"{prefix}.stats", stats, "res" if cpu and not composite else "fp32", "seq"))
        if composite:  # x * rstd, saved by the multiplication with the weight
            inv.append(Saved(f"{prefix}.normalized", h, "fp32", "seq"))

    def linear_inputs(prefix: str, names: tuple[str, ...], width: int = h) -> None:
        if autocast and not compiled:  # autocast casts the fp32 input once per Linear; each keeps its copy
            inv.extend(Saved(f"{prefix}.{n}.input", width, "act", "gather") for n in names)
        else:
            inv.append(Saved(f"{prefix}.{'_'.join(names)}.input", width, "act", "gather"))

    # ---- attention -------------------------------------------------------------------------
    norm("attention_norm")
    if model.is_mla:
        inv += _mla(model, linear_inputs)
    else:
        linear_inputs("attention", ("wq", "wk", "wv"))
    if torch_ and model.positions == "rotary" and not compiled:
        inv.append(Saved("attention.rotary_cos_sin", 2 * model.head_dim, "act", "none", per="position"))
    # K/V at the query width where repeated before the kernel saves them (the math kernel, torch's
    # and megatron's unfused path; torch's flash where it does not take GQA), at their own width
    # where the recomputed core keeps only its inputs or the fused kernel takes GQA natively
    expanded = not selective and (math or (torch_ and not gqa))
    kv = model.q_dim if expanded else model.kv_dim
    v = model.heads * model.v_head_dim if model.is_mla else kv  # MLA's values are narrower than its keys
    inv += [Saved("attention.q", model.q_dim), Saved("attention.k", kv), Saved("attention.v", v)]
    if math:
        inv.append(Saved("attention.softmax", a, per="score", core=True))
        if drop:
            inv.append(Saved("attention.dropout_mask", a, "mask", per="score", core=True))
            inv.append(Saved("attention.dropout_out", a, per="score", core=True))
    else:
        inv.append(Saved("attention.logsumexp", a, "fp32", core=True))
    # flash: the kernel's output, which wo saves too (one storage); math: wo's contiguous copy
    inv.append(Saved("attention.out", model.heads * model.v_head_dim if model.is_mla else model.q_dim))
    if drop:
        inv.append(Saved("attention.resid_dropout_mask", h, "mask", "seq"))

    # ---- feed-forward ----------------------------------------------------------------------
    if compiled:  # h = x + attention(x) is recomputed from x and wo's output, kept in the matmul dtype
        inv.append(Saved("attention.wo_out", h, "act", "seq"))
    norm("ffn_norm")
    if compiled:
        inv = [t for t in inv if t.name != "ffn_norm.input"]
    if model.is_moe:
        inv += _moe(model, layout, autocast)
    else:
        names = ("w1", "w3") if model.ffn_kind == "swiglu" else ("w1",)
        linear_inputs("feed_forward", names)
        inv += _mlp("feed_forward", model.ffn_kind, f, layout)
    if compiled:  # silu(w1 x): recomputed from w1's output by the backward's fused kernel
        inv = [t for t in inv if not t.name.endswith(".silu_out")]
    if drop:
        inv.append(Saved("feed_forward.resid_dropout_mask", h, "mask", "seq"))
    if selective:
        inv = [s for s in inv if not s.core]
    return tuple(inv)


def _mla(model, linear_inputs) -> list[Saved]:
    """Multi-head latent attention's own saved tensors (DeepSeek-V2 §2.1, V3 §2.1.1): the block's
    normed input goes to the down-projections wq_a (or wq) and wkv_a; the latent query c_Q
    (q_lora_rank) and the latent K/V c_KV (kv_lora_rank) each pass an RMSNorm (its input and rstd
    saved) whose output the up-projections wq_b and wkv_b save; the shared rotary key (rope_head_dim)
    is rotated once for every head. All of it is whole on every tp rank, with sequence parallelism
    too (the down-projections and the latent norms are not split, and see the gathered input:
    torchtitan's deepseek_v3 plan), so split "none"."""
    out: list[Saved] = []
    linear_inputs("attention", ("wq_a" if model.q_lora_rank else "wq", "wkv_a"))
    for name, rank in (("q", model.q_lora_rank), ("kv", model.kv_lora_rank)):
        if rank:
            out += [
                Saved(f"attention.{name}_norm.input", rank, "act", "none"),
                Saved(f"attention.{name}_norm.stats", 1, "fp32", "none"),
                Saved(f"attention.w{name}_b.input", rank, "act", "none"),
            ]
    out.append(Saved("attention.k_rope", model.rope_head_dim, "act", "none"))
    return out


def _mlp(prefix: str, kind: str, f: int, layout: str, times: int = 1) -> list[Saved]:
    """The MLP's internal tensors (its input is listed by the caller)."""
    if kind == "gelu":  # GELU saves its input; w2 saves GELU's output
        return [Saved(f"{prefix}.gelu_input", times * f), Saved(f"{prefix}.w2.input", times * f)]
    if layout == "megatron":  # fused SwiGLU: saves the [w1|w3] output, recomputes silu
        return [Saved(f"{prefix}.w1_w3_out", times * 2 * f), Saved(f"{prefix}.w2.input", times * f)]
    # silu saves w1's output; silu(.) * w3(.) saves both factors; w2 saves the product
    return [
        Saved(f"{prefix}.w1_out", times * f),
        Saved(f"{prefix}.silu_out", times * f),
        Saved(f"{prefix}.w3_out", times * f),
        Saved(f"{prefix}.w2.input", times * f),
    ]


def _moe(model, layout: str, autocast: bool) -> list[Saved]:
    """A mixture-of-experts FFN, estimate only (the run tier builds dense models): balanced
    routing, so each token's top_k expert copies go through one expert MLP each."""
    h, k = model.hidden, model.top_k
    out = [
        Saved("feed_forward.input", h, "act", "gather"),
        Saved("feed_forward.router_probs", model.experts, "fp32", "none"),  # softmax in fp32
        Saved("feed_forward.routed_input", k * h, "act", "gather"),
    ]  # token copies per expert
    out += _mlp("feed_forward.experts", model.ffn_kind, model.expert_ffn_hidden, layout, times=k)
    if model.shared_experts:
        out += _mlp("feed_forward.shared", model.ffn_kind, model.ffn_hidden, layout, times=model.shared_experts)
    out.append(Saved("feed_forward.routed_output", k * h, "act", "gather"))  # weighted by the router
    return out


def _seq_split(split: str, sp: bool, layout: str) -> bool:
    return sp and (split == "seq" or (split == "gather" and layout == "megatron"))


class _Terms(NamedTuple):
    """An inventory summed into bytes per row, by what a row is: every _term is rows x width x
    bytes, so the sum is a handful of products. Ints for what tensor parallelism leaves whole,
    ((width, bytes), ...) for what it divides (each width // tp on its own, as _term floors it)."""

    token: int  # per [b, s] row
    token_seq: int  # per [b, s/tp] row (sequence-parallel shards)
    token_tp: tuple
    position: int  # per [s] row, shared by the batch
    position_tp: tuple
    score: int  # per [b, s, s] element (attention heads)
    score_tp: tuple


@lru_cache(maxsize=1024)
def _terms(inv: tuple[Saved, ...], sp: bool, act, res, layout: str) -> _Terms:
    acc = {"token": 0, "token_seq": 0, "position": 0, "score": 0}
    cut: dict[str, dict[int, int]] = {"token": {}, "position": {}, "score": {}}
    for t in inv:
        nbytes = act if t.dtype == "act" else res if t.dtype == "res" else DTYPE_BYTES[t.dtype]
        if t.split == "tp":
            cut[t.per][t.width] = cut[t.per].get(t.width, 0) + nbytes
        elif t.per == "token" and _seq_split(t.split, sp, layout):
            acc["token_seq"] += t.width * nbytes
        else:
            acc[t.per] += t.width * nbytes
    return _Terms(
        acc["token"],
        acc["token_seq"],
        tuple(cut["token"].items()),
        acc["position"],
        tuple(cut["position"].items()),
        acc["score"],
        tuple(cut["score"].items()),
    )


def _divided(pairs: tuple, tp):
    """sum of (width // tp) * bytes."""
    total = 0
    for width, nbytes in pairs:
        total = total + (width // tp) * nbytes
    return total


def _evaluate(t: _Terms, *, b, s, tp, bs, rows):
    """Bytes of the summed inventory for one micro-batch: bs = b*s, rows = b*(s//tp) (sp) or bs."""
    total = bs * (t.token + _divided(t.token_tp, tp)) if t.token_tp else bs * t.token
    if t.token_seq:
        total = total + rows * t.token_seq
    if t.position or t.position_tp:
        total = total + s * (t.position + _divided(t.position_tp, tp))
    if t.score or t.score_tp:
        total = total + bs * s * (t.score + _divided(t.score_tp, tp))
    return total


def inventory_bytes(inv: tuple[Saved, ...], *, b, s, tp, sp: bool, act, res, layout: str):
    """Bytes one block's saved tensors take on one rank, for one micro-batch."""
    bs = b * s
    return _evaluate(_terms(inv, sp, act, res, layout), b=b, s=s, tp=tp, bs=bs, rows=b * (s // tp) if sp else bs)


@lru_cache(maxsize=1024)
def _block_terms(
    model,
    layout: str,
    attention: str,
    selective: bool,
    autocast: bool,
    sp: bool,
    act,
    res,
    device: str = "cuda",
    compiled: bool = False,
) -> _Terms:
    # the flash kernel takes GQA on the CPU and in half precision on CUDA (run/model.native_gqa)
    gqa = device == "cpu" or act != 4
    inv = block_inventory(model, layout, attention, selective, autocast, device, gqa, compiled)
    return _terms(inv, sp, act, res, layout)


def layer_bytes(model, plan, *, layout: str, attention: str, autocast: bool, act, res, device: str = "cuda"):
    """(kept per layer per micro-batch, extra held once while one block is recomputed)."""
    bs = plan.mbs * plan.seq
    rows = plan.mbs * (plan.seq // plan.tp) if plan.sp else bs
    return _layer_bytes(model, plan, layout, attention, autocast, act, res, bs, rows, device)


def op_policy_bytes_per_token(model, attention: str, act, tp=1):
    """What the per-op policy (recompute "selective-op", run/recompute.py) keeps of one block per
    token besides its input: every matmul's output, q (q_dim), k and v (kv_dim), wo's (h), w1's
    and w3's (f each; GELU: w1's only) and w2's (h), in the compute dtype; and the flash kernel's
    output (q_dim) and fp32 logsumexp (one per head). The math kernel's scores are batched
    matmuls, recomputed. Measured (tests/test_recompute.py): Llama-style, h 64, q 64, kv 32,
    f 128, fp32: (64 + 32 + 32 + 64 + 128 + 128 + 64 + 64) * 4 + 4 * 4 = 2,320 bytes a token."""
    f, width = _ffn_widths(model, tp)
    ffn = (2 if model.ffn_kind == "swiglu" else 1) * width
    h = model.hidden
    mm = model.q_dim // tp + 2 * (model.kv_dim // tp) + h + ffn + h * (model.top_k if model.is_moe else 1)
    sdpa = (model.q_dim // tp) * act + (model.heads // tp) * 4 if attention == "flash" else 0
    return mm * act + sdpa


def _layer_bytes(model, plan, layout, attention, autocast, act, res, bs, rows, device="cuda"):
    kw = dict(b=plan.mbs, s=plan.seq, tp=plan.tp, bs=bs, rows=rows)
    compiled = bool(getattr(plan, "compile", False))
    whole = _evaluate(
        _block_terms(model, layout, attention, False, autocast, plan.sp, act, res, device, compiled), **kw
    )
    if recompute_kind(plan.recompute) == "selective-layer":
        # a block left alone keeps everything; a checkpointed one its input, and rebuilds the rest
        # during its backward (rank_sizes counts which blocks are which)
        return whole, whole - rows * (model.hidden * res)
    if plan.recompute == "full":  # torch.utils.checkpoint around each block keeps its input only
        # (compiled: the checkpoint also saves the RNG state, 5,056 bytes on the CPU, 16 on CUDA: not counted)
        kept = rows * (model.hidden * res)
        return kept, whole - kept
    if plan.recompute == "selective-op":
        # the block's input and the policy's outputs; the block's backward recomputes the rest of
        # what it saves without recompute, and of the policy's outputs frees those its backward
        # does not read (q and k before rotary, wo's output) but w2's, which the recomputed
        # residual add still holds: rebuilt = whole - input - policy + w2's output (MemTracker,
        # exact: tests/test_recompute.py)
        inp = rows * (model.hidden * res)
        policy = bs * op_policy_bytes_per_token(model, attention, act, plan.tp)
        w2_out = bs * (model.hidden * act)
        if compiled:
            # the partitioner keeps of the policy's outputs only what the backward reads: not w2's
            # (measured, tests/test_compile.py); the rebuilt transient is eager's form, over the
            # compiled block (not measured under compile)
            return inp + policy - w2_out, whole - inp - policy + w2_out
        return inp + policy, whole - inp - policy + w2_out
    if plan.recompute != "selective":
        return whole, 0
    terms = _block_terms(model, layout, attention, True, autocast, plan.sp, act, res, device, compiled)
    return _evaluate(terms, **kw), 0


def chunked_loss_backward_bytes(tokens, vocab: int, hidden: int, act, weight):
    """The chunked loss's backward (run/loss.py) over what is alive when it begins, T tokens, the
    output weight [V, H] stored in `weight` bytes, computed in `act`, r = spec/loss.loss_chunk_rows:
      the weight cast to the compute dtype (where it is stored wider: autocast): V*H*act;
      the input gradient [T, H] (act) and the weight gradient's fp32 sum [V, H] (4), made first;
      then per chunk the larger of: its logits and their softmax in fp32 (8 r V, the compute
      dtype's logits freed by the cast, or one tensor in fp32), or its gradient in the compute
      dtype next to the [V, H] product it adds to the sum (act r V, + V*H*act below fp32); and
      at the end the sum cast to a weight stored below fp32 (V*H*weight).
    Measured by MemTracker on the CPU: these bytes plus one 8-byte scalar (tests/test_loss.py)."""
    rows = loss_chunk_rows(tokens, vocab, hidden)
    vh = vocab * hidden
    cast = vh * act if weight != act else 0
    chunk = maximum(8 * rows * vocab, act * rows * vocab + (vh * act if act < 4 else 0))
    end = vh * weight if weight < 4 else 0
    return cast + tokens * hidden * act + vh * 4 + maximum(chunk, end)


def block_backward_bytes(model, plan, *, act, autocast: bool, grads_kept: bool = False):
    """The transient inside one block's backward (torch layout), over its saved activations: the
    MLP's activation gradients and one weight gradient, T = mbs*seq tokens, f = the FFN width
    on this rank (ffn_hidden / tp), on the run tier's block (MemTracker, run/model.py):
      SwiGLU, w2(silu(a) * b): w2's backward makes dg [T, f] and frees its saved input; the
        product's backward makes d silu(a) and d b while dg is alive: +2*T*f. Later a weight
        gradient [f, h] is made next to one [T, f] gradient: +T*f + f*h. The larger of the two.
      GELU, w2(gelu(a)): GELU's backward makes da next to dg, w2's saved input freed: +T*f; then
        w1's weight gradient [f, h]: +T*f + f*h.
    The weight gradient is a fresh tensor accumulated into .grad (or copied into a bucket) and
    freed: in the parameter's gradient dtype, under autocast its bf16 product and the fp32 cast
    (act + 4 bytes). The attention's gradients are [T, h]-sized and smaller where f >= h.
    grads_kept: each weight gradient stays until the block's backward ends (FSDP2: it is the
    unsharded parameter's .grad until the block's reduce-scatter). SwiGLU's product backward then
    runs next to w2's gradient [f, h], made just before: 2*T*f + f*h; its later weight gradients
    come as its saved tensors go (w3's: 2*f*h - T*f over the block's start), which the end of
    the block's backward bounds (memory/fsdp2.py). GELU's da comes next to w2's gradient already
    (T*f + f*h); at T < h its later moments, weight gradients accumulating as the MLP's tensors
    are freed, go above it (by 69,632 bytes, 17%, for h = 128, f = 512, T = 64, fp32)."""
    f, width = _ffn_widths(model, plan.tp)
    tokens = plan.mbs * plan.seq
    grads = tokens * width * act
    weight = f * model.hidden * (act + (4 if autocast else 0))
    if model.ffn_kind == "swiglu":
        if grads_kept:
            return 2 * grads + f * model.hidden * act
        return maximum(2 * grads, grads + weight)
    return grads + weight


def core_backward_bytes(model, plan, *, attention: str, act):
    """The math attention kernel's backward under selective recompute (torch layout), over the
    block's saved tensors: torch.utils.checkpoint reruns the core (SDPA's math composite, aten's
    _scaled_dot_product_attention_math: scores = q k^T, masked softmax, times v; it computes in
    fp32, upcasting bf16/fp16 inputs) inside its own backward, which then holds score-sized
    tensors [b, a/tp, s, s] and q-sized ones [b, s, q_dim/tp], in fp32 whatever the compute dtype:
    S = b*(a/tp)*s*s, Q = b*s*(q_dim/tp) elements. Measured by MemTracker on the CPU over its
    inputs q, k, v, its output and the output's gradient (fp32 and bf16, b 1-2, a 4-16, GQA and
    not, s 256-2048, d 16-128; fake and real tensors): exactly 3*(S + Q) fp32 elements; the
    output's gradient (Q in the compute dtype) is not among the block's saved tensors:
    12*(S + Q) + Q*act bytes. Hand-worked: b 1, a 4, s 256, d 16, bf16: S = 262,144, Q = 16,384:
    3,342,336 + 32,768 bytes. The flash kernel's backward holds no score-sized tensor: 0."""
    if attention != "math" or plan.recompute != "selective":
        return 0
    S = plan.mbs * (model.heads // plan.tp) * plan.seq * plan.seq
    Q = plan.mbs * plan.seq * (model.q_dim // plan.tp)
    return 12 * (S + Q) + Q * act


def ffn_saved_bytes(model, plan, *, layout: str, attention: str, autocast: bool, act, res, device: str = "cuda"):
    """What one block saves for its feed-forward half (ffn_norm, the MLP): freed by the time the
    block's backward reaches its attention."""
    inv = block_inventory(
        model,
        layout,
        attention,
        plan.recompute == "selective",
        autocast,
        device,
        device == "cpu" or act != 4,
        bool(getattr(plan, "compile", False)),
    )
    half = tuple(t for t in inv if t.name.startswith(("ffn_norm.", "feed_forward.")))
    return inventory_bytes(half, b=plan.mbs, s=plan.seq, tp=plan.tp, sp=plan.sp, act=act, res=res, layout=layout)


def _ffn_widths(model, tp):
    """(one MLP's FFN width on this rank, the FFN width a token passes through on this rank)."""
    if model.is_moe:  # the routed tokens' expert MLPs, each token through top_k of them
        return model.expert_ffn_hidden // tp, model.top_k * model.expert_ffn_hidden // tp
    return model.ffn_hidden // tp, model.ffn_hidden // tp


# ---- the pipeline: micro-batches in flight ------------------------------------------------
def _if(last, a, b):
    """a on the last pipeline stage's rank, else b. `last` is a bool, or a bool array when
    memory() examines the first and the last stage's ranks of array plans in one pass."""
    if last is True or last is False:
        return a if last else b
    return where(last, a, b)


def backwards(plan, last: bool):
    """The backwards of the first (last=False) or last pipeline rank at which its peak can fall,
    what each finds alive (estimate/pipeline.py: backwards, in torch.distributed.pipelining's
    orders); without a pipeline, the one micro-batch of each backward."""
    return pipeline.backwards(plan.pp, plan.grad_accum, plan.vpp, plan.schedule, last)


def inflight(plan, last: bool):
    """(chunks, first-stage micro-batches, head micro-batches) in flight at the rank's last 1F1B
    backward, the first of backwards(): its most chunks in flight (pipeline.inflight_microbatches).

    A chunk is one micro-batch through one of the rank's virtual stages (L / (pp*vpp) layers;
    vpp = 1 unless interleaved). gpipe: all m micro-batches. 1f1b (Schedule1F1B): rank r runs
    min(m, pp - r) forwards before its first backward and then alternates B, F: min(m, pp-r).
    interleaved (ScheduleInterleaved1F1B): warm-up w = (v-1)*pp + 2*(pp-1-r) chunk forwards, then
    F before B: min(w+1, v*m) chunks. On rank 0 that is (v+1)*pp - 1 chunks = pp*(1 + (pp-1)/(pp*v))
    micro-batches of the rank's layers, Korthikanti et al. 2022's interleaved factor. The last
    stage holds one micro-batch's logits at a time (1F1B and interleaved run its F then its B at
    once); GPipe holds all m. Without a pipeline (pp = 1) one micro-batch is in flight.
    """
    b = backwards(plan, last)[0]
    return b.chunks, b.first, b.head


def rank_activations(
    model,
    plan,
    *,
    last: bool,
    layout: str,
    attention: str,
    autocast: bool,
    act,
    res,
    vocab: int,
    flight=None,
    device: str = "cuda",
) -> dict:
    """Activation items (and the pipeline's receive buffers) of the first or last pipeline rank
    at one of its backwards, by name. `vocab` is the logits' width on this rank (padded/sharded by
    layout); `flight`: one of backwards(plan, last) (default: the first, the most chunks in flight);
    `device`: where the torch layout's kernels run."""
    sizes = rank_sizes(
        model,
        plan,
        last=last,
        layout=layout,
        attention=attention,
        autocast=autocast,
        act=act,
        res=res,
        vocab=vocab,
        device=device,
    )
    return priced(sizes, flight if flight is not None else backwards(plan, last)[0])


class RankSizes(NamedTuple):
    """Bytes per unit of what a rank holds at a backward (priced() multiplies them by a
    backward's counts): computed once per rank, priced once per backward."""

    torch: bool  # the torch layout (pipeline buffers, the block's backward transient)
    chunk: object  # one chunk's saved tensors (its layers, per micro-batch)
    layer: object  # one layer's saved tensors (per micro-batch); selective-layer: an unchecked one's
    layer_checkpointed: object  # a checkpointed layer's (its input) under selective-layer, else = layer
    every: object  # selective-layer's k: the chunk's blocks k-1, 2k-1, ... are checkpointed; else 1
    recompute: object  # held once while one block is recomputed
    embedding: object  # per micro-batch through global stage 0
    head: dict  # per micro-batch through the last global stage, by item
    loss_backward: object  # the loss's backward temporaries
    block_backward: object  # the transient inside one block's backward
    block_backward_kept: object  # the same where weight gradients stay (FSDP2's unsharded ones)
    x: object  # one residual-stream tensor: a stage output, an input gradient, a receive buffer
    top_grad: object  # the gradient the head hands the top block (a residual-stream tensor)
    act_recv: object  # activation receive buffers of the rank (bytes), none holding an input
    grad_recv: object  # gradient receive buffers (bytes)
    core_backward: object = 0  # the math attention core's backward under selective recompute
    ffn_saved: object = 0  # one layer's feed-forward saved tensors, freed before its attention's backward


def rank_sizes(
    model, plan, *, last: bool, layout: str, attention: str, autocast: bool, act, res, vocab: int, device: str = "cuda"
) -> RankSizes:
    """RankSizes of the first or last pipeline rank (rank_activations' arguments)."""
    pp, tp, sp = plan.pp, plan.tp, plan.sp
    b, s, h = plan.mbs, plan.seq, model.hidden
    v = pipeline.chunks_per_rank(plan.vpp, plan.schedule)
    bs = b * s  # rows of a [b, s] tensor
    rows = b * (s // tp) if sp else bs  # rows of the residual stream, sequence-sharded with sp
    torch_ = layout == "torch"

    kept, rebuilt = _layer_bytes(model, plan, layout, attention, autocast, act, res, bs, rows, device)
    x = rows * (h * res)  # one residual-stream tensor [b, s(/tp), h]
    n = pipeline.chunk_blocks(model, plan, last)
    every, kept_ck = 1, kept
    if recompute_kind(plan.recompute) == "selective-layer":
        every, kept_ck = recompute_every(plan.recompute), x
        # the rebuilt block is held while a checkpointed block's backward runs: the chunk's top
        # block (the first backward, over every other block's saved tensors) is one when k divides n
        rebuilt = where(n % every == 0, rebuilt, 0)

    emb = bs * 8 + s * 8 if model.positions == "learned" else bs * 8  # token (and position) ids
    if model.dropout > 0:
        emb = emb + rows * h * DTYPE_BYTES["mask"]  # embedding dropout mask

    # the head: final norm, the output projection's input, logits, the fp32 loss
    head_in = (rows if _seq_split("gather", sp, layout) else bs) * (h * act)
    if torch_:
        # run/model.py's output is column-parallel with the full logits gathered on every tp
        # rank; the loss is F.cross_entropy(logits.float()): the caller (or the pipeline's
        # forward cache) keeps the logits, log_softmax saves its fp32 output, and the backward
        # adds two fp32 [b*s, V] tensors at once (d log-probs from nll_loss, d logits from
        # log_softmax's backward) while those are still alive.
        logits, saved_fp32, backward = bs * (vocab * act), bs * (vocab * 4), bs * (vocab * 8)
        # ... except where the loss runs chunked (tp = 1, no pipeline: spec/loss.py): no logits kept
        chunked = chunked_loss(plan)
        if chunked is not False:
            cut = chunked_loss_backward_bytes(bs, vocab, h, act, 4 if autocast else act)
            logits, saved_fp32, backward = (
                where(chunked, 0, logits),
                where(chunked, 0, saved_fp32),
                where(chunked, cut, backward),
            )
    else:
        # Megatron's vocab-parallel cross entropy on logits.float(): the bf16 logits are dropped,
        # the fp32 copy becomes the saved softmax in place, the backward works in place and
        # casts the gradient back to the compute dtype.
        logits, saved_fp32 = 0 * b, bs * (vocab * 4)
        backward = bs * (vocab * (act if act != 4 else 0))
    # the final norm saves what a block's norms save (block_inventory)
    stats = 1 if model.norm == "rmsnorm" else 2
    norm, stat = h * res, DTYPE_BYTES["fp32"]
    if torch_ and device == "cpu":
        norm, stat = (h * 8, stat) if model.norm == "rmsnorm" else (norm, res)
    head = {
        "act.final_norm": rows * (norm + stats * stat),
        "act.head_input": head_in,
        # without a pipeline run/engine._accumulate drops the logits once the loss is computed: the
        # graph does not save them (the loss saves its fp32 log-softmax); a pipeline's cache keeps them
        "act.logits": where(pp > 1, logits, 0 * logits),
        "act.loss_fp32": saved_fp32,
        "act.targets": bs * 8,
    }  # the loss saves the flattened int64 targets (a copy)

    # torch.distributed.pipelining: every non-first stage has a receive buffer per micro-batch
    # for activations and every non-last one per micro-batch for gradients, allocated once and
    # kept (PipelineStage._setup_forward_recv_info / _create_grad_recv_info)
    pipelined = where(pp > 1, 1, 0)
    holds_first, holds_last = pipeline.holds_ends(pp, last, plan.schedule)
    m = plan.grad_accum
    return RankSizes(
        torch_,
        n * kept - (n // every) * (kept - kept_ck),
        kept,
        kept_ck,
        every,
        rebuilt,
        emb,
        head,
        backward,
        block_backward_bytes(model, plan, act=act, autocast=autocast) if torch_ else 0,
        block_backward_bytes(model, plan, act=act, autocast=autocast, grads_kept=True) if torch_ else 0,
        pipelined * x,
        x if torch_ else 0,
        pipelined * (v - holds_first) * m * x,
        pipelined * (v - holds_last) * m * x,
        core_backward_bytes(model, plan, attention=attention, act=act) if torch_ else 0,
        ffn_saved_bytes(
            model, plan, layout=layout, attention=attention, autocast=autocast, act=act, res=res, device=device
        )
        if torch_
        else 0,
    )


def first_blocks(z: RankSizes, m):
    """Saved bytes of a chunk's first m blocks (per micro-batch): of them m // k are checkpointed
    under selective-layer:k (positions k-1, 2k-1, ...), none otherwise (k = 1, the same bytes)."""
    return m * z.layer - (m // z.every) * (z.layer - z.layer_checkpointed)


def priced(z: RankSizes, f) -> dict:
    """The items of a rank at backward `f` (pipeline.Backward) from its RankSizes."""
    out = {"act.layers": f.chunks * z.chunk, "act.recompute": z.recompute, "act.embedding": f.first * z.embedding}
    for k, v in z.head.items():
        out[k] = f.head * v
    out["act.loss_backward"] = f.loss * z.loss_backward
    if z.torch:
        # the blocks' backward runs after the loss's temporaries are freed: the rank's transient
        # is the larger of the two (the excess of the block's is counted here)
        out["act.block_backward"] = maximum(z.block_backward - out["act.loss_backward"], 0)
        # a non-last stage keeps its output for each in-flight micro-batch (fwd_cache), and the
        # schedule keeps what it sent (pipeline.backwards): the outputs and the input gradients
        # (the stage input's, sent back) its send works hold. A receive buffer holding an
        # in-flight micro-batch's input is counted as that block's saved input.
        out["act.stage_output"] = f.outputs * z.x
        out["act.stage_input_grad"] = f.grads_sent * z.x
        out["buffers.pp_act_recv"] = z.act_recv - (f.chunks - f.first) * z.x
        out["buffers.pp_grad_recv"] = z.grad_recv
    return out
