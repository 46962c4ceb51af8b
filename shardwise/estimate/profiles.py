"""Accounting profiles: how many bytes each engine keeps per parameter.

A profile is a small table, not a code path. memory.py reads these numbers for every plan:

- `torch`: what `shardwise run` keeps (the engine contract). Mixed precision keeps the fp32
  parameter as the master (autocast or FSDP2's MixedPrecisionPolicy cast it on the fly), so
  there is no separate master copy; optimizer states have the parameter's dtype.
- `zero-paper`: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", Sec. 3.1: mixed-precision Adam keeps 2 + 2 + K bytes per parameter (fp16
  parameters, fp16 gradients, K = 12: fp32 master, momentum, variance).
- `deepspeed`: DeepSpeed ZeRO's layout, the paper's bytes plus its default buffers (below).
- `megatron`: Megatron-LM: bf16 parameters, fp32 main gradients, fp32 master + Adam in the
  (distributed) optimizer. The Megatron Core guide's table ("Distributed Optimizer",
  docs.nvidia.com/megatron-core/developer-guide/latest/api-guide/dist_optimizer.html): 18 bytes
  per parameter, 6 + 12/d with the distributed optimizer (bf16 params, fp32 grads); 20 and
  4 + 16/d for fp16 (fp16 grads, the optimizer keeps an fp32 copy of them); 16 and 8 + 8/d
  for fp32. Megatron has no ZeRO-2/3: zero >= 1 means the distributed optimizer.

Pure bf16 ("bf16"): parameters, gradients and optimizer states all in bf16 (no master) in every
profile; no engine's paper defines it, this is what PyTorch does with a bf16 model.

Numeric arguments may be numpy arrays (the search); `shape` entries likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.errors import ShardwiseError, closest
from shardwise.estimate._num import ceil_div, where

PROFILES = ("torch", "zero-paper", "megatron", "deepspeed")

# Overhead outside the caching allocator: the CUDA context of one process with lazy module
# loading (CUDA_MODULE_LOADING=LAZY, PyTorch's default since 1.13): 287,047,680 bytes measured
# in pytorch/pytorch#86509 (vs 666,632,192 eager). NCCL's communicator buffers and cuBLAS
# workspaces vary by topology and are not counted.
CUDA_CONTEXT_BYTES = 287_047_680

# bitsandbytes 8-bit Adam (bitsandbytes/optim/optimizer.py, Optimizer2State.init_state): two
# uint8 states plus one fp32 absmax per 2048-element block for each; tensors with fewer than
# min_8bit_size = 4096 elements keep two fp32 states. (Two shared 256-entry fp32 quantization
# maps, 2 KiB per GPU, are not counted.)
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 2048

# DeepSpeed ZeRO defaults, deepspeed/runtime/zero/config.py (DeepSpeedZeroConfig):
DS_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size: elements reduced at a time
DS_ALLGATHER_BUCKET = 500_000_000  # allgather_bucket_size (stages 1-2): elements all-gathered at a time
DS_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size: elements fetched ahead of use
DS_MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters: gathered elements at most
DS_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller tensors stay whole

# Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by (128) times tp
# (megatron/training/tokenizer: _vocab_size_with_padding).
MEGATRON_VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter element, by what they hold."""

    param: int  # the parameters the model is stored in
    grad: int  # the gradients the backward produces and the optimizer reads
    master: int  # a separate fp32 master copy (0: the parameter itself is the master)
    state: int  # one optimizer-state element (Adam moment, momentum, Adafactor factor)
    grad_copy: int = 0  # Megatron fp16: the optimizer's fp32 copy of the gradients

    @property
    def model_states(self) -> int:
        """Bytes per parameter with AdamW (two states): the paper's 2 + 2 + K."""
        return self.param + self.grad + self.master + 2 * self.state + self.grad_copy


_MIXED = ("bf16-mixed", "fp16-mixed")
_TABLES = {
    "torch": {
        "fp32": StateBytes(4, 4, 0, 4),
        "bf16-mixed": StateBytes(4, 4, 0, 4),
        "fp16-mixed": StateBytes(4, 4, 0, 4),
        "bf16": StateBytes(2, 2, 0, 2),
    },
    "zero-paper": {
        "fp32": StateBytes(4, 4, 0, 4),
        "bf16-mixed": StateBytes(2, 2, 4, 4),
        "fp16-mixed": StateBytes(2, 2, 4, 4),
        "bf16": StateBytes(2, 2, 0, 2),
    },
    "megatron": {
        "fp32": StateBytes(4, 4, 0, 4),
        "bf16-mixed": StateBytes(2, 4, 4, 4),
        "fp16-mixed": StateBytes(2, 2, 4, 4, grad_copy=4),
        "bf16": StateBytes(2, 2, 0, 2),
    },
}
_TABLES["deepspeed"] = _TABLES["zero-paper"]


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ShardwiseError(
            f"unknown accounting profile {profile!r}; {closest(profile, PROFILES)} (one of {', '.join(PROFILES)})"
        )


def state_bytes(profile: str, precision: str) -> StateBytes:
    check_profile(profile)
    return _TABLES[profile][precision]


def is_mixed(precision: str) -> bool:
    return precision in _MIXED


def compute_bytes(precision: str) -> int:
    """Bytes of an activation element: the matmul dtype."""
    return 4 if precision == "fp32" else 2


# ---- optimizer states per parameter tensor ----------------------------------------------
def _numel(shape):
    n = 1
    for d in shape:
        n = n * d
    return n


def optimizer_bytes(optimizer: str, shape, sb: StateBytes):
    """Optimizer bytes one parameter tensor of `shape` costs (master copy included).

    adamw: two states (torch.optim.AdamW's exp_avg, exp_avg_sq; its `step` lives on the CPU).
    sgd: one momentum buffer (SGD(momentum=0.9)).
    adafactor: torch.optim.Adafactor keeps no first moment (beta1 is not supported) and factors
      the second moment of a matrix into a row and a column vector (row_var [.., r, 1] and
      col_var [.., 1, c]); a vector keeps a full `variance`.
    adam8bit: bitsandbytes' blockwise 8-bit states (see BNB_* above); 1 byte per element is
      independent of the precision.
    """
    n = _numel(shape)
    base = sb.master * n + sb.grad_copy * n
    if optimizer == "adamw":
        return base + 2 * sb.state * n
    if optimizer == "sgd":
        return base + sb.state * n
    if optimizer == "adafactor":
        if len(shape) >= 2:
            lead = _numel(shape[:-2])
            return base + sb.state * lead * (shape[-2] + shape[-1])
        return base + sb.state * n
    if optimizer == "adam8bit":
        eight = 2 * n + 2 * 4 * ceil_div(n, BNB_BLOCK)
        return base + where(n < BNB_MIN_8BIT_SIZE, 2 * 4 * n, eight)
    raise ShardwiseError(f"unknown optimizer {optimizer!r}; use adamw, sgd, adafactor or adam8bit")


def step_temp_bytes(optimizer: str, numel, sb: StateBytes, foreach: bool):
    """Scratch memory torch's optimizer step allocates, for tensors of `numel` elements in total
    (foreach) or for the largest one (single-tensor loop).

    AdamW foreach (_multi_tensor_adam): one list `exp_avg_sq_sqrt` as large as the group; the
    single-tensor loop: `exp_avg_sq.sqrt() / bias_correction2_sqrt`, two temporaries of one tensor.
    Adafactor (single-tensor by default, see its docstring): one `var_estimate` per tensor.
    SGD updates its momentum in place; bitsandbytes runs fused kernels.
    """
    if optimizer == "adamw":
        return sb.state * numel * (1 if foreach else 2)
    if optimizer == "adafactor":
        return sb.state * numel
    return 0 * numel


# ---- the ZeRO paper's per-rank model states ------------------------------------------------
def shard_states(params, grads, optimizer, dp, zero: int):
    """Per-rank bytes of (params, grads, optimizer) under ZeRO stage `zero` over dp ranks, the
    paper's partitioning (P_os, P_os+g, P_os+g+p): stage 1 splits the optimizer states, 2 also
    the gradients, 3 also the parameters. Each rank holds ceil(x / dp) bytes of what is split."""
    o = ceil_div(optimizer, dp) if zero >= 1 else optimizer
    g = ceil_div(grads, dp) if zero >= 2 else grads
    p = ceil_div(params, dp) if zero >= 3 else params
    return p, g, o


def zero_paper_bytes(psi, dp, zero: int, k: int = 12, param_bytes: int = 2, grad_bytes: int = 2):
    """The ZeRO paper's model-state memory per rank: (2 + 2 + K) * Psi sharded by stage.
    Psi=7.5e9, N=64, K=12: 120e9, 31.4e9, 16.6e9, 1.875e9 bytes (its Figure 1)."""
    return sum(shard_states(param_bytes * psi, grad_bytes * psi, k * psi, dp, zero))


def megatron_bytes_per_param(precision: str, dp, distributed: bool):
    """Megatron's per-parameter model-state bytes (its dist_optimizer.md table): the optimizer part
    (master + Adam + fp16's gradient copy) is divided by dp with the distributed optimizer."""
    sb = state_bytes("megatron", precision)
    opt = sb.master + 2 * sb.state + sb.grad_copy
    return sb.param + sb.grad + (opt / dp if distributed else opt)
