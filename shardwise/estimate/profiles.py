"""Accounting profiles: what each engine keeps and sends, one object per engine.

The formulas never compare a profile's name: they ask the profile. `profile(name)` resolves the
public name (`estimate(..., "torch")`, `--profile torch`) to its object once, where a request
enters (estimate(), memory(), collectives(), the search's Options); PROFILES is the registry.

- `torch` (TorchProfile): what `shardwise run` trains on, PyTorch's own engines.
- `zero-paper` (ZeroPaperProfile): the ZeRO paper's idealized accounting (the lecture's).
- `megatron` (MegatronProfile): what Megatron-LM allocates and sends.
- `deepspeed` (DeepSpeedProfile): DeepSpeed ZeRO, the paper's layout in its default buckets.

Pure bf16 ("bf16"): parameters, gradients and optimizer states all in bf16 (no master) in every
profile; no engine's paper defines it, this is what PyTorch does with a bf16 model.

Numeric arguments may be numpy arrays (the search); `shape` entries likewise.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from shardwise.errors import ShardwiseError, closest
from shardwise.estimate._num import ceil_div, maximum, minimum, where
from shardwise.spec.fp8 import FP8_PRECISIONS, base_precision
from shardwise.spec.plan import ENGINE_RULES, Rule, recompute_kind
from shardwise.units import MIB

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

# PyTorch DDP's gradient buckets (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES; DistributedDataParallel(
# bucket_cap_mb=None) -> 25 MiB)
DDP_FIRST_BUCKET = 1 * MIB
DDP_BUCKET = 25 * MIB

# DeepSpeed ZeRO defaults, deepspeed/runtime/zero/config.py (DeepSpeedZeroConfig), in elements:
DS_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size (also the non-ZeRO allreduce_bucket_size)
DS_ALLGATHER_BUCKET = 500_000_000  # allgather_bucket_size (stages 1-2): elements all-gathered at a time
DS_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size: elements fetched ahead of use
DS_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller tensors stay whole

# Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by (128) times tp
# (megatron/training/tokenizer: _vocab_size_with_padding).
MEGATRON_VOCAB_MULTIPLE = 128
# Megatron-core DistributedDataParallel with overlap_grad_reduce: buckets of max(40M, 1M * dp) elements
MEGATRON_BUCKET_MIN = 40_000_000
MEGATRON_BUCKET_PER_DP = 1_000_000


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter element, by what they hold."""

    param: int  # the parameters the model is stored in
    grad: int  # the gradients the backward produces and the optimizer reads
    master: int  # a separate fp32 master copy (0: the parameter itself is the master)
    state: int  # one optimizer-state element (Adam moment, momentum, Adafactor factor)
    # an fp32 copy of the gradients the optimizer steps on, sharded with the optimizer states:
    # Megatron fp16's main_param.grad, DeepSpeed's fp32 gradient partition
    grad_copy: int = 0

    @property
    def model_states(self) -> int:
        """Bytes per parameter with AdamW (two states): the paper's 2 + 2 + K."""
        return self.param + self.grad + self.master + 2 * self.state + self.grad_copy


@dataclass(frozen=True)
class Send:
    """One data-parallel collective a profile's ZeRO stage sends (comm._sent prices it): the
    rank's parameters moved as `payload` ("grad": gradients, "gather": parameters, keys of
    Profile.dtypes), in calls of `bucket` elements (None: one call), or of
    max(bucket, bucket_per_rank * dp) elements; once per step, or once per micro-batch."""

    kind: str  # all-reduce | reduce-scatter | all-gather
    what: str
    payload: str
    bucket: int | None = None
    bucket_per_rank: int = 0
    per_micro_batch: bool = False
    overlapped: bool = True  # runs alongside compute (time.py hides it up to that compute)

    def bucket_elements(self, dp):
        """Elements per call over dp ranks (None: one call for everything)."""
        if self.bucket is None or not self.bucket_per_rank:
            return self.bucket
        return maximum(self.bucket, self.bucket_per_rank * dp)


def _frozen(d: dict) -> MappingProxyType:
    return MappingProxyType(d)


def _by_stage(ddp: tuple, zero12: tuple, zero3: tuple) -> MappingProxyType:
    """Sends by ZeRO stage: 0 (plain data parallel), 1 and 2 (the same collectives), 3."""
    return _frozen({0: ddp, 1: zero12, 2: zero12, 3: zero3})


_TORCH_STATES = _frozen(
    {
        "fp32": StateBytes(4, 4, 0, 4),
        "bf16-mixed": StateBytes(4, 4, 0, 4),
        "fp16-mixed": StateBytes(4, 4, 0, 4),
        "bf16": StateBytes(2, 2, 0, 2),
    }
)
_PAPER_STATES = _frozen(
    {
        "fp32": StateBytes(4, 4, 0, 4),
        "bf16-mixed": StateBytes(2, 2, 4, 4),
        "fp16-mixed": StateBytes(2, 2, 4, 4),
        "bf16": StateBytes(2, 2, 0, 2),
    }
)
_MEGATRON_STATES = _frozen(
    {
        "fp32": StateBytes(4, 4, 0, 4),
        "bf16-mixed": StateBytes(2, 4, 4, 4),
        "fp16-mixed": StateBytes(2, 2, 4, 4, grad_copy=4),
        "bf16": StateBytes(2, 2, 0, 2),
    }
)
# DeepSpeed's own estimators (deepspeed/runtime/zero/stage_1_and_2.py,
# estimate_zero2_model_states_mem_needs: "2 = params_16bit, 18 = 2_grads_16bit + 4_grads_32bit +
# 4_params_32bit + 8_optimizer_states_32bit", gpu_mem = 2 * total_params + 18 * total_params / total_gpus):
# beside the paper's 2 + 2 + 12 an fp32 gradient partition, 4 bytes sharded with the optimizer states
_DEEPSPEED_STATES = _frozen(
    {
        "fp32": StateBytes(4, 4, 0, 4),
        "bf16-mixed": StateBytes(2, 2, 4, 4, grad_copy=4),
        "fp16-mixed": StateBytes(2, 2, 4, 4, grad_copy=4),
        "bf16": StateBytes(2, 2, 0, 2),
    }
)
_MIXED = ("bf16-mixed", "fp16-mixed", *FP8_PRECISIONS)


class Profile:
    """The questions the memory and communication formulas ask of an engine. Immutable: a profile
    is a singleton of its class (PROFILES), compared and hashed by identity (a cache key)."""

    __slots__ = ()
    name: str
    states: MappingProxyType  # precision -> bytes per parameter element of each model state
    # memory: True: the run tier's engines, moment by moment (memory/engines.py); False: every
    # model state at once, the paper's static sum (memory/paper.py)
    moment_by_moment: bool = False
    # True: what `shardwise run` trains: PyTorch's engine limits (spec.plan.ENGINE_RULES) apply and
    # the run tier's own per-step all-reduces (comm._engine) are sent
    run_engines: bool = False
    # tensor-parallel collectives: DTensor's layout (comm._tp) or Megatron's f/g operators
    dtensor_tp: bool = False
    # pipeline sends: each tp rank sends its 1/tp slice, the receiver all-gathers it (comm._pp)
    pp_scatter_gather: bool = False
    activation_layout: str = "megatron"  # activations.LAYOUTS
    vocab_multiple: int = 1  # the vocabulary padded to a multiple of this times tp
    offloads_params: bool = True  # has a parameter offload (offload="params")
    persistence_threshold: int = 0  # ZeRO-3: tensors of at most this many elements stay whole
    # zero stage -> its data-parallel collectives; None: the engines' own (comm._torch_dp)
    sends: MappingProxyType | None = None
    # the plans this engine cannot run (spec.plan.Rule): the search never proposes them; with
    # `strict`, estimate() refuses them, else it estimates them with a note (the torch profile
    # still accounts a plan `shardwise run` cannot train, as PyTorch would lay it out)
    rules: tuple = ()
    strict: bool = True
    engine: str = "this engine"  # who cannot run a refused plan, in the search's rejection counts
    # bytes outside the caching allocator, every rank
    overhead: MappingProxyType = _frozen({"overhead.cuda_context": CUDA_CONTEXT_BYTES})

    def __setattr__(self, name, value):
        raise AttributeError(f"the {self.name} profile is immutable")

    def __reduce__(self):
        return profile, (self.name,)

    def __repr__(self) -> str:
        return f"profile({self.name!r})"

    def __str__(self) -> str:
        return self.name

    def state_bytes(self, precision: str) -> StateBytes:
        # FP8 training keeps bf16-mixed's states: only the linears' matmul inputs are cast (spec/fp8.py)
        return self.states[base_precision(precision)]

    def dtypes(self, plan) -> dict:
        """Bytes per element of what each collective carries. P: stored parameters; grad:
        DDP/data-parallel gradients; gather / reduce: ZeRO parameter all-gather and gradient
        reduce-scatter; resid: the residual stream (embedding output, norm outputs, block inputs
        and their gradients, pipeline activations); mm: matmul outputs (wo, w2, logits) and
        their gradients. The papers: everything in the 16-bit compute dtype (fp32 for fp32)."""
        b16 = 4 if plan.precision == "fp32" else 2
        return {"P": b16, "grad": b16, "gather": b16, "reduce": b16, "resid": b16, "mm": b16}

    def model_states(self, sb: StateBytes, n, opt, small, dp, zero: int):
        """Per-rank bytes of (params, grads, optimizer) of n parameter elements whose optimizer
        states take `opt` bytes (`small` of the elements are in tensors of at most
        persistence_threshold), under ZeRO stage `zero` over dp ranks: the paper's partition."""
        return shard_states(sb.param * n, sb.grad * n, opt, dp, zero)

    def buffers(self, sb: StateBytes, n, block, zero: int, largest=0) -> dict:
        """The engine's own communication buffers, for n parameter elements on the rank, `block`
        in one transformer block, `largest` in its largest parameter tensor."""
        return {}


class TorchProfile(Profile):
    """`torch`: exactly the engines `shardwise run` uses (run/parallelize.py, run/engine.py).

    Keeps: mixed precision keeps the fp32 parameter as the master (autocast or FSDP2's
    MixedPrecisionPolicy cast it on the fly), so there is no separate master copy; optimizer
    states have the parameter's dtype. Memory is followed moment by moment through the step
    (memory/engines.py): DDP and ZeroRedundancyOptimizer (memory/ddp.py, memory/zero1.py),
    FSDP2 for ZeRO-2/3 (memory/fsdp2.py), the torch activation layout.
    Sends: DDP's gradient all-reduce in its real buckets (DDP_FIRST_BUCKET, then DDP_BUCKET);
    ZeroRedundancyOptimizer's broadcast of each owner's bucket after the step
    (parameters_as_bucket_view); FSDP2 all-gathers and reduce-scatters per fully_shard group with
    padded shards, in bf16 and fp32 under mixed precision; DTensor TP collectives as the
    contract's layout issues them (checked against PyTorch 2.13 with a dispatch-mode log on a
    fake process group); the engine's own all-reduces (loss and grad norm, tied embedding).
    """

    __slots__ = ()
    name = "torch"
    states = _TORCH_STATES
    moment_by_moment = True
    run_engines = True
    dtensor_tp = True
    activation_layout = "torch"
    rules = ENGINE_RULES
    strict = False
    engine = "PyTorch's engines (so `shardwise run`)"

    def dtypes(self, plan) -> dict:
        prec = plan.precision
        mixed = prec in _MIXED
        b16 = 4 if prec == "fp32" else 2
        p = 2 if prec == "bf16" else 4
        # mixed: FSDP2 (zero 2/3 with dp > 1) computes in the 16-bit param dtype; otherwise autocast
        # keeps the residual stream in fp32 and only matmul outputs are 16-bit (contract item 6)
        resid = where(plan.dp > 1, 2, 4) if (mixed and plan.zero >= 2) else (4 if mixed else p)
        return {"P": p, "grad": p, "gather": 2 if mixed else p, "reduce": 4 if mixed else p, "resid": resid, "mm": b16}


class ZeroPaperProfile(Profile):
    """`zero-paper`: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
    Trillion Parameter Models".

    Keeps (Sec. 3.1): mixed-precision Adam keeps 2 + 2 + K bytes per parameter (fp16 parameters,
    fp16 gradients, K = 12: fp32 master, momentum, variance); stage 1 splits the optimizer
    states, 2 also the gradients, 3 also the parameters (P_os, P_os+g, P_os+g+p).
    Sends (Sec. 7): 16-bit gradients and parameters; DDP one all-reduce; ZeRO-1/2 a
    reduce-scatter of gradients and an all-gather of parameters (the same volume as the
    all-reduce); ZeRO-3 an all-gather in forward, another in backward and a reduce-scatter (1.5x).
    TP/PP and activations as Megatron-LM (which the paper uses for model parallelism).
    """

    __slots__ = ()
    name = "zero-paper"
    states = _PAPER_STATES
    sends = _by_stage(
        (Send("all-reduce", "gradients", "grad"),),
        (
            Send("reduce-scatter", "gradients to their owners", "grad"),
            Send("all-gather", "updated parameters after the step", "gather", overlapped=False),
        ),
        (
            Send("all-gather", "parameters, forward", "gather", per_micro_batch=True),
            Send("all-gather", "parameters, backward", "gather", per_micro_batch=True),
            Send("reduce-scatter", "gradients", "grad", per_micro_batch=True),
        ),
    )


_MEGATRON_BUCKET = {"bucket": MEGATRON_BUCKET_MIN, "bucket_per_rank": MEGATRON_BUCKET_PER_DP}


MEGATRON_RULES = (
    Rule(
        "engine",
        lambda p, m, g: p.recompute == "selective-op",
        lambda p, m, g: (
            "Megatron-LM's selective recompute is the attention core (--recompute selective); "
            "selective-op is PyTorch's per-op policy: use --profile torch, or --recompute selective or full"
        ),
    ),
    Rule(
        "engine",
        lambda p, m, g: recompute_kind(p.recompute) == "selective-layer",
        lambda p, m, g: (
            "Megatron-LM checkpoints the first N blocks of each stage (--recompute-method block) or groups of N "
            "(uniform), not every k-th block: use --profile torch, or --recompute full or selective"
        ),
    ),
    Rule(
        "engine",
        lambda p, m, g: p.zero >= 2,
        lambda p, m, g: (
            f"Megatron-LM has no ZeRO-{p.zero}: its distributed optimizer (--zero 1) shards the optimizer "
            "states and reduce-scatters the gradients; use --zero 0 or 1, or --profile deepspeed or torch"
        ),
    ),
    Rule(
        "engine",
        lambda p, m, g: p.offload == "params",
        lambda p, m, g: (
            "Megatron-LM has no parameter offload; use --profile torch or deepspeed, or --offload optimizer"
        ),
    ),
)


class MegatronProfile(Profile):
    """`megatron`: Megatron-LM.

    Keeps: bf16 parameters, fp32 main gradients, fp32 master + Adam in the (distributed)
    optimizer. The Megatron Core guide's table ("Distributed Optimizer",
    docs.nvidia.com/megatron-core/developer-guide/latest/api-guide/dist_optimizer.html): 18 bytes
    per parameter, 6 + 12/d with the distributed optimizer (bf16 params, fp32 grads); 20 and
    4 + 16/d for fp16 (fp16 grads, the optimizer keeps an fp32 copy of them); 16 and 8 + 8/d
    for fp32. Megatron has no ZeRO-2/3: zero >= 1 means the distributed optimizer. No parameter
    offload. The vocabulary is padded (MEGATRON_VOCAB_MULTIPLE).
    Sends: fp32 main gradients (bf16 training), all-reduced in DDP buckets, or reduce-scattered
    by the distributed optimizer (ZeRO-1/2) which then all-gathers 16-bit parameters, in buckets
    of max(40M, 1M * dp) elements, after the backward (--overlap-grad-reduce and
    --overlap-param-gather are off by default, megatron/training/arguments.py); its vocab-parallel cross-entropy and f/g TP operators; pipeline
    activations by scatter-gather without sequence parallel (Narayanan et al. 2021, sec. 4.1).
    """

    __slots__ = ()
    name = "megatron"
    states = _MEGATRON_STATES
    vocab_multiple = MEGATRON_VOCAB_MULTIPLE
    pp_scatter_gather = True
    offloads_params = False
    rules = MEGATRON_RULES
    engine = "Megatron-LM"
    sends = _by_stage(
        (Send("all-reduce", "main gradients (DDP buckets)", "grad", overlapped=False, **_MEGATRON_BUCKET),),
        (
            Send(
                "reduce-scatter",
                "main gradients (distributed optimizer buckets)",
                "grad",
                overlapped=False,
                **_MEGATRON_BUCKET,
            ),
            Send(
                "all-gather",
                "updated 16-bit parameters (distributed optimizer)",
                "gather",
                overlapped=False,
                **_MEGATRON_BUCKET,
            ),
        ),
        (
            Send("all-gather", "parameters, forward", "gather", per_micro_batch=True),
            Send("all-gather", "parameters, backward", "gather", per_micro_batch=True),
            Send("reduce-scatter", "main gradients", "grad", per_micro_batch=True),
        ),
    )

    def dtypes(self, plan) -> dict:
        prec = plan.precision
        b16 = 4 if prec == "fp32" else 2
        grad = 2 if prec in ("fp16-mixed", "bf16") else 4  # bf16 training reduces fp32 main grads
        return {"P": b16, "grad": grad, "gather": b16, "reduce": grad, "resid": b16, "mm": b16}

    def model_states(self, sb: StateBytes, n, opt, small, dp, zero: int):
        # zero >= 1: the distributed optimizer shards the optimizer part only
        return sb.param * n, sb.grad * n, ceil_div(opt, dp) if zero >= 1 else opt


class DeepSpeedProfile(ZeroPaperProfile):
    """`deepspeed`: DeepSpeed ZeRO's layout as its own estimators count it, plus its default
    buffers (deepspeed/runtime/zero/config.py, DS_* above).

    Keeps, mixed precision: 16-bit parameters and gradients, and in the optimizer an fp32 master,
    two Adam moments and an fp32 gradient partition (4 + 8 + 4 bytes, _DEEPSPEED_STATES).
    ZeRO-1: 2 + 2 + 16/N; ZeRO-2: 2 + 18/N (estimate_zero2_model_states_mem_needs); ZeRO-3:
    18/N (estimate_zero3_model_states_mem_needs: the 16-bit gradients are reduce-scattered into
    the fp32 partition, no 16-bit gradient shard is counted) plus the largest layer gathered
    whole, its 16-bit parameters and gradients (4 * largest_layer_params); tensors up to
    stage3_param_persistence_threshold elements stay whole. Buffers: a reduce bucket of gradients,
    at ZeRO-1/2 an all-gather bucket of parameters.
    Sends: the paper's collectives in DeepSpeed's default buckets. TP/PP and activations as the
    paper's (Megatron-LM's).
    """

    __slots__ = ()
    name = "deepspeed"
    states = _DEEPSPEED_STATES
    persistence_threshold = DS_PERSISTENCE_THRESHOLD
    sends = _by_stage(
        (Send("all-reduce", "gradients (allreduce_bucket_size)", "grad", DS_REDUCE_BUCKET),),
        (
            Send("reduce-scatter", "gradients (reduce_bucket_size)", "grad", DS_REDUCE_BUCKET),
            Send(
                "all-gather",
                "updated parameters (allgather_bucket_size)",
                "gather",
                DS_ALLGATHER_BUCKET,
                overlapped=False,
            ),
        ),
        (
            Send(
                "all-gather",
                "parameters, forward (stage3_prefetch_bucket_size)",
                "gather",
                DS_PREFETCH_BUCKET,
                per_micro_batch=True,
            ),
            Send(
                "all-gather",
                "parameters, backward (stage3_prefetch_bucket_size)",
                "gather",
                DS_PREFETCH_BUCKET,
                per_micro_batch=True,
            ),
            Send("reduce-scatter", "gradients (reduce_bucket_size)", "grad", DS_REDUCE_BUCKET, per_micro_batch=True),
        ),
    )

    def model_states(self, sb: StateBytes, n, opt, small, dp, zero: int):
        p, g, o = shard_states(sb.param * n, sb.grad * n, opt, dp, zero)
        if zero == 3:  # small tensors stay whole; gradients live in the optimizer's fp32 partition
            p = sb.param * (small + ceil_div(n - small, dp))
            g = 0 if sb.grad_copy else g
        return p, g, o

    def buffers(self, sb: StateBytes, n, block, zero: int, largest=0) -> dict:
        out = {"buffers.ds_reduce_bucket": sb.grad * minimum(DS_REDUCE_BUCKET, n)}
        if zero in (1, 2):
            out["buffers.ds_allgather_bucket"] = sb.param * minimum(DS_ALLGATHER_BUCKET, n)
        if zero == 3:  # the estimator's largest_layer_memory: 16-bit parameters and gradients, gathered whole
            out["buffers.ds_largest_layer"] = (sb.param + sb.grad) * largest
        return out


TORCH = TorchProfile()
ZERO_PAPER = ZeroPaperProfile()
MEGATRON = MegatronProfile()
DEEPSPEED = DeepSpeedProfile()
PROFILES: dict[str, Profile] = {p.name: p for p in (TORCH, ZERO_PAPER, MEGATRON, DEEPSPEED)}


def profile(name_or_profile) -> Profile:
    """The profile object of a name (or the object itself)."""
    if isinstance(name_or_profile, Profile):
        return name_or_profile
    found = PROFILES.get(name_or_profile) if isinstance(name_or_profile, str) else None
    if found is None:
        raise ShardwiseError(
            f"unknown accounting profile {name_or_profile!r}; {closest(str(name_or_profile), PROFILES)}"
        )
    return found


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
    sb = MEGATRON.state_bytes(precision)
    opt = sb.master + 2 * sb.state + sb.grad_copy
    return sb.param + sb.grad + (opt / dp if distributed else opt)
