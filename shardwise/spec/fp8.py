"""FP8 training as PyTorch users train it: torchao's float8 recipes over bf16-mixed.

What torchao (0.18, torchao/float8/) does, which the estimate and `run` follow:
- `convert_to_float8_training` swaps the transformer blocks' nn.Linear for Float8Linear (the output
  layer stays bf16, as torchtitan's converter filters it out). Each Float8Linear matmul casts its
  input and weight to float8_e4m3 with a dynamic scale (tensorwise: one fp32 scale per tensor;
  rowwise: one per row, Float8LinearConfig.from_recipe_name) and runs torch._scaled_mm.
- float8_linear.py, matmul_with_hp_or_float8_args.forward: `ctx.save_for_backward(input_hp,
  weight_hp_t)`: what backward keeps is the high-precision input and weight, as bf16-mixed keeps;
  the FP8 copies and their scales are cast again in backward and never held across the step.
- Float8Linear.forward casts the input to the autocast dtype but calls no autocast op on the
  weight, so autocast caches no bf16 copy of a converted weight (bf16-mixed's DDP path does).
- Delayed scaling (an amax history per tensor) was removed from torchao: no history is kept.
- FSDP2: with `enable_fsdp_float8_all_gather` (tensorwise only: config.py __post_init__ asserts
  it) each converted weight's shard is cast to FP8 before the all-gather
  (fsdp_utils.WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather), so the gather carries and
  the unsharded weight holds 1 byte per element instead of bf16's 2;
  `precompute_float8_dynamic_scale_for_fsdp` all-reduces one fp32 amax per such weight once per
  step (after the optimizer), replacing one all-reduce per weight per gather.
"""

from __future__ import annotations

from shardwise.errors import ShardwiseError
from shardwise.spec.hardware import gpus

FP8_PRECISIONS = ("fp8-tensorwise", "fp8-rowwise")
RECIPES = {"fp8-tensorwise": "tensorwise", "fp8-rowwise": "rowwise"}  # torchao Float8LinearRecipeName values
MIN_CAPABILITY = (8, 9)  # torch._scaled_mm needs FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) onward
FP8_BYTES = 1


def is_fp8(precision: str) -> bool:
    return precision in FP8_PRECISIONS


def base_precision(precision: str) -> str:
    """The precision everything but the blocks' linear matmuls runs at."""
    return "bf16-mixed" if precision in FP8_PRECISIONS else precision


def fp8_all_gather(plan) -> bool:
    """FSDP2 gathers the converted weights in FP8: tensorwise scaling under ZeRO-2/3 (fully_shard)."""
    return plan.precision == "fp8-tensorwise" and plan.zero >= 2


def check_gpu(precision: str, gpu) -> None:
    """A catalog GPU without FP8 tensor cores cannot train an FP8 plan: one line, the alternatives."""
    if is_fp8(precision) and "fp8" not in gpu.tflops:
        have = ", ".join(n for n, g in gpus().items() if "fp8" in g.tflops)
        raise ShardwiseError(
            f"--precision {precision} needs FP8 tensor cores, which {gpu.name} has not; "
            f"use --precision bf16-mixed on it, or an FP8 GPU ({have})"
        )
