"""Context parallelism: the sequence split over cp ranks, attention's K/V exchanged between them.

What torch 2.13's `context_parallel` does (torch/distributed/tensor/experimental/_context_parallel/
_attention.py, the engine the run tier uses and torchtitan's `context_parallel_degree` drives):

- The sequence is cut into 2*cp chunks and rank r keeps chunks r and 2*cp-1-r (the head-tail load
  balancer, _load_balancer.py): under a causal mask every rank then does the same attention work,
  and every ring step the same share of it (step 0: both local chunks, causal, (2c)^2/2 = 2c^2
  query-key pairs for chunks of c tokens; every later step one chunk against two, 2c^2).
- Everything but attention sees seq/cp tokens per rank: the matmuls, the activations, tensor- and
  pipeline-parallel traffic. The cp ranks see different tokens of the same sequences, so for the
  gradients they are data-parallel ranks: FSDP shards over dp_shard*cp and gradients are reduced
  over dp*cp (torchtitan's `dp_shard_cp` mesh; the mesh order pp, dp_replicate, dp_shard, cp, tp).
  `local_plan` is that view: dp*cp ranks, seq/cp tokens, gbs*cp sequences of seq/cp tokens.
- Attention: each rank's queries (seq/cp) meet every key (seq): per token the core costs as at the
  full sequence (time.py's attention FLOPs take `keys`, seq/cp * cp).
- K/V exchange, per layer and micro-batch, of K|V concatenated (E bytes on each rank: 2 * mbs *
  seq/cp * kv width/tp * dtype). `_ContextParallelOptions.rotate_method`:
  * allgather, torch 2.13's default and Llama 3's choice (Llama 3 paper, Sec. 3.3.2: with GQA the
    K/V are small beside Q, one gather is simpler than a ring and lets any mask be applied, and its
    O(S) traffic hides behind O(S^2) attention): one all-gather of cp*E in the forward, issued
    before step 0's local attention and waited on at step 1, so it hides behind 1/cp of the
    forward's attention; in the backward one more all-gather (hidden behind 1/cp of it).
  * alltoall: cp-1 passes of E to the next rank (ft_c.permute_tensor), each beside one step's
    attention, forward and backward.
  Both send the K/V gradients around the ring in the backward: cp passes of dK|dV in fp32
  (convert_to_f32, the default), each beside one step of the backward's attention.
- In flight during a layer's attention backward: the K/V being passed (cp*E gathered, or this
  step's and the next step's E), fp32 accumulators of dQ, dK, dV, and the dK|dV pass sent and
  received (2 x fp32 dK|dV). Counted at every moment where activations are alive.
"""

from __future__ import annotations

import dataclasses

from shardwise.estimate._num import where
from shardwise.estimate.pipeline import chunk_blocks, chunks_per_rank, rank_blocks
from shardwise.spec.plan import cp_local, recompute_every, recompute_kind

GRAD_BYTES = 4  # dQ, dK, dV accumulated and passed in fp32 (_ContextParallelOptions.convert_to_f32)


def local_plan(plan):
    """The plan each cp rank runs beside attention (spec/plan.cp_local)."""
    return cp_local(plan)


def kv_width(model, plan):
    """Elements per token of K (and of V) on one tp rank as the kernel takes them: their own width
    (SDPA with enable_gqa) in 16-bit precisions; repeated to the query heads in fp32 (the
    memory-efficient kernel does not take GQA there: run/model.native_gqa)."""
    width = model.q_dim if plan.precision == "fp32" else model.kv_dim
    return width // plan.tp


def kv_bytes(model, plan, dtype_bytes):
    """E: one rank's K|V of one micro-batch and layer, bytes (plan: the full plan, cp > 1)."""
    return 2 * plan.mbs * (plan.seq // plan.cp) * kv_width(model, plan) * dtype_bytes


def attention_calls(model, plan):
    """(forward, backward) attention calls of one micro-batch on the rank, all its layers: the
    forward again where recompute reruns it (full, every k-th block for selective-layer, the
    attention core for selective; selective-op keeps the fused kernel's output)."""
    layers = rank_blocks(model, plan, False)
    kind = recompute_kind(plan.recompute)
    if kind == "selective-layer":
        again = (
            chunk_blocks(model, plan, False)
            // recompute_every(plan.recompute)
            * chunks_per_rank(plan.vpp, plan.schedule)
        )
    else:
        again = layers * (1 if kind in ("full", "selective") else 0)
    return layers + again, layers


def ring_collectives(model, plan, mm_bytes, make) -> list:
    """The K/V exchange of one step on one rank, as Collectives of group "cp", all overlapped
    (time.py hides them behind the attention they run beside: `hiding`). `make(kind, what,
    per_call, count)` builds one on the cp group's link; plan: the full plan."""
    cp, m = plan.cp, plan.grad_accum
    fwd, bwd = attention_calls(model, plan)
    E = kv_bytes(model, plan, mm_bytes)
    G = kv_bytes(model, plan, GRAD_BYTES)
    if plan.cp_rotate == "allgather":
        out = [
            make("all-gather", "K/V to every cp rank, forward (allgather rotate)", cp * E, fwd * m),
            make("all-gather", "K/V to every cp rank, backward (allgather rotate)", cp * E, bwd * m),
        ]
    else:
        out = [
            make("send", "K/V ring pass to the next cp rank, forward", E, (cp - 1) * fwd * m),
            make("send", "K/V ring pass to the next cp rank, backward", E, (cp - 1) * bwd * m),
        ]
    out.append(make("send", "dK/dV (fp32) ring pass to the next cp rank, backward", G, cp * bwd * m))
    # torch passes K/V (alltoall) and dK/dV to the next rank with permute_tensor, a functional
    # all_to_all_single whose whole buffer goes to one neighbour: timed and sent as a send, named
    # as what it is (the run tier records it as an all-to-all)
    return [dataclasses.replace(c, kind="all-to-all") if c.kind == "send" else c for c in out]


def hiding(plan, c) -> float:
    """The share of its pass's attention compute a cp collective runs beside: an all-gather, step
    0's (1/cp of the pass's attention); a K/V ring pass, steps 1..cp-1 ((cp-1)/cp); a dK/dV pass,
    the backward's steps 1..cp-1 ((cp-1)/cp: the last pass waits at the end)."""
    return 1 / plan.cp if c.kind == "all-gather" else (plan.cp - 1) / plan.cp  # all-to-all: the passes


def ring_buffers(model, plan, mm_bytes):
    """Bytes of the exchange in flight during one layer's attention backward, on one rank:
    (K/V being passed, fp32 gradient accumulators and passes). Array-safe; 0 for cp = 1."""
    cp = plan.cp
    on = where(cp > 1, 1, 0)
    E = kv_bytes(model, plan, mm_bytes)
    if plan.cp_rotate == "allgather":
        kv = cp * E  # the gathered K|V of the whole sequence
    else:
        kv = 2 * E  # this step's K|V and the next's, arriving
    tokens = plan.mbs * (plan.seq // cp)
    accum = tokens * (model.q_dim // plan.tp) * GRAD_BYTES + kv_bytes(model, plan, GRAD_BYTES)
    grads = accum + 2 * kv_bytes(model, plan, GRAD_BYTES)  # + the dK|dV pass sent and received
    return on * kv, on * grads


def add_ring_buffers(moments: list, model, plan, mm_bytes) -> list:
    """The memory moments (dicts, or Blends of two) with the exchange's buffers added to every one
    that holds activations, i.e. all but the optimizer step (the last) and empty ones."""
    kv, grads = ring_buffers(model, plan, mm_bytes)
    items = {"buffers.cp_kv_in_flight": kv, "buffers.cp_grad_kv": grads}
    return [_with(m, items) for m in moments[:-1]] + moments[-1:]


def _with(m, items):
    if hasattr(m, "fsdp"):  # a Blend of two engines' moments
        return type(m)(m.fsdp, _with(m.a, items), _with(m.b, items))
    return {**m, **items} if m else m
