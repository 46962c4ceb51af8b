"""Context parallelism in the run tier: torch's `context_parallel` (torch.distributed.tensor.
experimental), as torchtitan drives it.

- The mesh is (pp, dp, cp, tp) (torchtitan's order: pp, dp_replicate, dp_shard, cp, tp), with dp
  and cp flattened into the data-parallel dim the engines reduce gradients over ("dp": dp*cp
  ranks; the batch's own rank is "dp_data"): FSDP2 shards and DDP all-reduces over dp*cp, as
  torchtitan's dp_shard_cp mesh does.
- Each step runs inside `context_parallel(mesh["cp"], buffers=[inputs, targets, positions])`:
  torch's head-tail load balancer keeps chunks r and 2*cp-1-r of every sequence on cp rank r, and
  SDPA runs as ring attention (`_templated_ring_attention`), K/V rotated by `set_rotate_method`
  (Plan.cp_rotate). The model takes the positions of its tokens from the sharded `positions`
  buffer (rotary angles, learned position embeddings), so every token keeps its place.
- torch 2.13 maps only CUDA's SDPA kernels (flash, memory-efficient, cuDNN) to ring attention;
  the CPU's flash kernel, `_scaled_dot_product_flash_attention_for_cpu`, returns the same
  (output, logsumexp) pair and its backward the same gradients, so `cpu_ring_attention()` hands
  it to torch's own ring functions (`_templated_ring_attention[_backward]`) with the sequence-
  sharded strategy torch registers for the CUDA kernels. Nothing of the ring is rewritten here.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from shardwise.errors import ShardwiseError
from shardwise.spec.plan import Plan

MESH_DIMS = ("pp", "dp_data", "cp", "tp")
SEQ_DIM = 2  # SDPA's [batch, heads, seq, head_dim]
aten = torch.ops.aten


def check(plan: Plan) -> None:
    """What context parallelism does not run with here, one line each."""
    if plan.cp == 1:
        return
    if plan.pp > 1:
        raise ShardwiseError(
            "`shardwise run` runs context parallelism without a pipeline (pp = 1); use --pp 1, "
            "or estimate the plan (shardwise estimate) and train it with torchtitan (--export torchtitan)"
        )
    if 0 < plan.dp_shard < plan.dp:
        raise ShardwiseError("`shardwise run` has no HSDP with context parallelism; leave --dp-shard out")


def build_mesh(plan: Plan, device: torch.device) -> DeviceMesh:
    """(pp, dp_data, cp, tp), with "dp" = dp_data x cp flattened: the engines' gradient group."""
    mesh = init_device_mesh(device.type, (plan.pp, plan.dp, plan.cp, plan.tp), mesh_dim_names=MESH_DIMS)
    mesh["dp_data", "cp"]._flatten("dp")
    return mesh


def set_positions(modules, positions: torch.Tensor | None) -> None:
    """Give every module with a `positions` attribute (attention, the model's position embedding)
    the tensor of its tokens' positions; None: 0..s-1."""
    for module in modules:
        for m in module.modules():
            if hasattr(m, "positions"):
                m.positions = positions


@contextlib.contextmanager
def sharded(mesh: DeviceMesh, plan: Plan, x: torch.Tensor, y: torch.Tensor, modules):
    """One step's sequences split over the cp ranks: x, y ([b, s]) and their positions sharded
    in place (torch's load balancer), SDPA as ring attention, the rotate method the plan's."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    if x.device.type == "cpu":
        cpu_ring_attention()
    set_rotate_method(plan.cp_rotate)
    positions = torch.arange(x.shape[1], device=x.device)
    set_positions(modules, positions)
    try:
        with context_parallel(
            mesh["cp"], buffers=[x, y, positions], buffer_seq_dims=[1, 1, 0], no_restore_buffers={x, y}
        ):
            yield
    finally:
        set_positions(modules, None)


@functools.cache
def cpu_ring_attention() -> None:
    """Teach torch 2.13's context parallelism the CPU's flash kernel (the module docstring): its
    sequence-sharded strategy, and a handler that runs it through torch's ring functions."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._op_schema import OpStrategy, RuntimeSchemaInfo
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy, register_op_strategy
    from torch.distributed.tensor.experimental._context_parallel import _attention as ring

    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward.default

    def placements(op_schema, outputs: int) -> list:
        n = sum(isinstance(a, OpStrategy) for a in op_schema.args_schema)
        return [[Replicate()] * (outputs + n), [Shard(SEQ_DIM)] * (outputs + n)]

    # forward: (out, logsumexp) from (q, k, v); backward: (dq, dk, dv) from (dout, q, k, v, out, lse)
    register_op_strategy(fwd, schema_info=RuntimeSchemaInfo(3))(
        lambda s: expand_to_full_mesh_op_strategy(s.get_mesh_from_args(), s, placements(s, 2), input_index=2)
    )
    register_op_strategy(bwd)(
        lambda s: expand_to_full_mesh_op_strategy(
            s.get_mesh_from_args(validate=False), s, placements(s, 3), input_index=3
        )
    )

    def handler(op_call, args, kwargs):
        info = DTensor._op_dispatcher.unwrap_to_op_info(op_call, args, kwargs)
        DTensor._op_dispatcher.sharding_propagator.propagate(info)
        spec = info.output_sharding
        group = info.compute_mesh.get_group()
        kw = dict(info.local_kwargs)
        if op_call is fwd:
            q, k, v, *rest = info.local_args
            dropout_p = rest[0] if rest else kw.pop("dropout_p", 0.0)
            causal = rest[1] if len(rest) > 1 else kw.pop("is_causal", False)
            out = ring._templated_ring_attention(
                group, SEQ_DIM, fwd, query=q, key=k, value=v, is_causal=causal, dropout_p=dropout_p, **kw
            )
        else:
            dout, q, k, v, o, lse, dropout_p, causal = info.local_args
            out = ring._templated_ring_attention_backward(
                group, SEQ_DIM, bwd, grad_out=dout, grad_out_name="grad_out", query=q, key=k, value=v,
                out=o, logsumexp=lse, is_causal=causal, dropout_p=dropout_p, **kw,
            )  # fmt: skip
        return DTensor._op_dispatcher.wrap(tuple(out), spec.output_spec)

    # context_parallel installs ring.custom_ops as DTensor's handlers while it is entered
    ring.custom_ops[fwd] = handler
    ring.custom_ops[bwd] = handler
