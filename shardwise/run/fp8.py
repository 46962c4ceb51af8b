"""FP8 training in `shardwise run`: torchao's float8 conversion of the blocks' linear layers.

What it keeps and sends is spec/fp8.py's account (the estimate reads the same). torchao is an
optional dependency (`pip install shardwise[fp8]`), imported only when a plan asks for FP8.
"""

from __future__ import annotations

import torch
from torch import nn

from shardwise.errors import ShardwiseError
from shardwise.spec.fp8 import MIN_CAPABILITY, RECIPES, fp8_all_gather, is_fp8
from shardwise.spec.plan import Plan

# torch._scaled_mm needs both dims of each FP8 operand divisible by 16 (torchao's
# float8_linear_utils filters such layers out; torchtitan's converter skips them too)
FP8_DIM_MULTIPLE = 16


def check_fp8(spec, plan: Plan, device: torch.device | None) -> None:
    """Why this device or plan cannot train in FP8, one line with the alternatives; else nothing.
    device None: the plan's own GPU, which the caller has checked (the trace tier, which runs the
    engines on fake CPU tensors for the catalog GPU: spec/fp8.check_gpu)."""
    if not is_fp8(plan.precision):
        return
    keep = "use --precision bf16-mixed"
    if device is not None and device.type != "cuda":
        raise ShardwiseError(f"--precision {plan.precision} needs a CUDA GPU with FP8 (sm_89+: H100, L4, ...); {keep}")
    cap = torch.cuda.get_device_capability(device) if device is not None else MIN_CAPABILITY
    if cap < MIN_CAPABILITY:
        raise ShardwiseError(
            f"--precision {plan.precision} needs FP8 tensor cores (compute capability >= 8.9), "
            f"this GPU is {cap[0]}.{cap[1]}; {keep}"
        )
    if plan.tp > 1:  # torchao's Float8ColwiseParallel / RowwiseParallel are not wired into apply_tp
        raise ShardwiseError(f"--precision {plan.precision} runs with --tp 1 here; {keep} for tensor parallel")
    odd = sorted({d for d in _linear_dims(spec) if d % FP8_DIM_MULTIPLE})
    if odd:
        raise ShardwiseError(
            f"--precision {plan.precision}: FP8 matmuls need linear dimensions divisible by {FP8_DIM_MULTIPLE}, "
            f"{spec.name} has {', '.join(map(str, odd))}; {keep}"
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ShardwiseError(
            f"--precision {plan.precision} needs torchao: pip install 'shardwise[fp8]'; or {keep}"
        ) from None


def _linear_dims(spec) -> set[int]:
    return {spec.hidden, spec.q_dim, spec.kv_dim, spec.ffn_hidden}


def convert(model: nn.Module, plan: Plan) -> None:
    """Swap every transformer block's nn.Linear for torchao's Float8Linear (the output layer stays
    bf16, as spec/fp8.py accounts), on the meta model before FSDP wraps it."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    recipe = RECIPES[plan.precision]
    if recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=fp8_all_gather(plan))
    else:
        config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(
        model, config=config, module_filter_fn=lambda mod, fqn: fqn.startswith("layers.") and isinstance(mod, nn.Linear)
    )


def after_step(model: nn.Module, plan: Plan) -> None:
    """With FP8 all-gather: the next step's weight scales from one all-reduce of every amax
    (torchao's precompute_float8_dynamic_scale_for_fsdp, as the estimate's comm counts it)."""
    if fp8_all_gather(plan):
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
