"""What a checkpoint of `shardwise run` writes, and how long that takes at a storage bandwidth.

A checkpoint (run/checkpoint.py, PyTorch Distributed Checkpoint) holds every parameter and every
optimizer state once, in the dtype the run tier keeps them (the torch profile's StateBytes: fp32,
or bf16 for pure bf16), plus AdamW's and Adafactor's per-tensor `step` (a float32 scalar). A tied
embedding is written once (the pipeline's copy is not saved).

Who writes what: each rank writes the slices it holds. Sharded tensors (FSDP2, tensor parallelism,
ZeRO-1's optimizer states) are written by their one owner; a tensor several ranks hold whole (DDP's
replicas, a norm under TP) is written by one of them: DCP's planner deduplicates it and gives it to
the rank with the fewest bytes planned so far (torch/distributed/checkpoint/_dedup_save_plans.py,
dedup_save_plans with save_to_lowest_rank=False, DefaultSavePlanner's default). So the bytes of a
pipeline stage spread evenly over its dp * tp ranks, to within one tensor, and the rank that writes
most belongs to the largest stage (the first holds the embeddings, the last the head).

DCP's file writer frames each tensor with torch.save (filesystem._write_item, SerializationFormat
.TORCH_SAVE): about a kilobyte per tensor on top of these bytes, and a .metadata file; for any model
worth a checkpoint that is well under 1%, and it is left out here (tests/test_checkpoint_size.py
holds the estimate against the files on disk).

The time assumes the job's ranks write in parallel and the storage is the limit: bytes / bandwidth.
Without --storage-gbps the bandwidth scales with the job: Llama 3's checkpoint storage (Tectonic)
sustained 2 TB/s for 16,384 H100s (Dubey et al. 2024, "The Llama 3 Herd of Models", section 3.3.1,
Storage), about 0.12 GB/s per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise import units
from shardwise.errors import ShardwiseError
from shardwise.estimate.memory.shapes import elements
from shardwise.estimate.profiles import TORCH, optimizer_bytes

LLAMA3_STORAGE_BPS = 2e12  # bytes/s sustained, Llama 3 paper section 3.3.1
LLAMA3_GPUS = 16_384
DEFAULT_GBPS_PER_GPU = LLAMA3_STORAGE_BPS / LLAMA3_GPUS / 1e9  # 0.122 GB/s
STEP_BYTES = 4  # torch.optim's per-tensor `step`, a float32 scalar (AdamW, Adafactor)
MAX_GBPS = 1e6  # a sanity bound: 1 PB/s, 140x the Llama 3 cluster's peak (7 TB/s)


@dataclass(frozen=True)
class CheckpointCost:
    bytes: int  # one checkpoint: every parameter and optimizer state, once
    bytes_per_rank: int  # the rank that writes most (its stage's bytes over its dp * tp ranks)
    storage_gbps: float  # GB/s the job writes at
    storage_default: bool  # True: scaled from Llama 3's storage, not given
    seconds: float

    def to_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "bytes_per_rank_max": self.bytes_per_rank,
            "storage_gbps": self.storage_gbps,
            "storage_gbps_default": self.storage_default,
            "seconds": self.seconds,
        }

    def line(self, what: str = "checkpoint") -> str:
        src = " (Llama 3's storage per GPU; set --storage-gbps)" if self.storage_default else ""
        return (
            f"{what}: {units.gib(self.bytes)} per save ({units.gib(self.bytes_per_rank)} from the busiest rank), "
            f"{_seconds(self.seconds)} at {self.storage_gbps:,.3g} GB/s{src}"
        )


def _seconds(s: float) -> str:
    return f"{s:,.1f} s" if s < 120 else f"{s / 60:,.1f} min"


def tensor_bytes(shape: tuple[int, ...], precision: str, optimizer: str) -> int:
    """One parameter tensor and its optimizer states, as the run tier's checkpoint holds them."""
    sb = TORCH.state_bytes(precision)
    step = STEP_BYTES if optimizer in ("adamw", "adafactor") else 0
    return int(sb.param * elements(shape) + optimizer_bytes(optimizer, shape, sb) + step)


def stage_bytes(model, plan) -> list[int]:
    """Bytes each pipeline stage holds (the run tier splits the layers evenly: layers // pp each)."""
    per = {}
    for name, shape in model.param_shapes():
        per[name] = tensor_bytes(tuple(shape), plan.precision, plan.optimizer)
    layers_per = model.layers // plan.pp
    out = []
    for s in range(plan.pp):
        lo, hi = s * layers_per, (s + 1) * layers_per
        total = 0
        for name, b in per.items():
            top, *rest = name.split(".")
            if top == "layers":
                total += b if lo <= int(rest[0]) < hi else 0
            elif top in ("tok_embeddings", "pos_embeddings"):
                total += b if s == 0 else 0
            else:  # norm, output: the last stage
                total += b if s == plan.pp - 1 else 0
        out.append(total)
    return out


def check_storage(storage_gbps: float | None) -> None:
    if storage_gbps is not None and not (0 < storage_gbps <= MAX_GBPS):
        raise ShardwiseError(f"--storage-gbps must be a number of GB/s in (0, {MAX_GBPS:g}], got {storage_gbps!r}")


def checkpoint_cost(model, plan, gpus: int, storage_gbps: float | None = None) -> CheckpointCost:
    check_storage(storage_gbps)
    stages = stage_bytes(model, plan)
    total = sum(stages)
    per_rank = -(-max(stages) // (plan.dp * plan.tp))
    default = storage_gbps is None
    gbps = DEFAULT_GBPS_PER_GPU * gpus if default else float(storage_gbps)
    return CheckpointCost(total, per_rank, gbps, default, total / (gbps * 1e9))
