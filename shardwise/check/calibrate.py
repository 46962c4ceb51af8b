"""`shardwise calibrate`: measure this machine and write it as a hardware file the estimate reads.

    shardwise calibrate --out mymachine.toml --nproc 4           # 4 local ranks (gloo on CPU, NCCL on CUDA)
    shardwise estimate ... --hardware mymachine.toml --gpu mymachine --network mymachine

Every rank runs the benchmarks at once, as a training job's ranks would, so what one rank gets
is what the file says one "GPU" has (on a CPU machine the ranks share the cores: a "GPU" is one
rank's share of them). Measured:
    tflops       matmul throughput per compute dtype at the model's shapes (a run config's
                 linear layers: forward, input-gradient and weight-gradient products at its
                 micro-batch, sequence length and tp), or a standard set of square ones
    hbm_gbps     a large tensor copy (bytes read + written per second)
    link         all-reduce, all-gather, reduce-scatter, broadcast and send/recv among the ranks
                 at message sizes from 4 KiB up; the estimate's own cost model (estimate/comm.py,
                 time = latency steps * a + bytes moved / B) is fitted to them by least squares
                 on relative error, so `a` and `B` are the figures that make the estimate's
                 formulas reproduce this machine (link_efficiency 1: B is already achieved);
                 once over all of them (link_gbps, link_latency_us) and once per kind
                 (link_kinds: gloo's collectives differ by several times at one size)
    memory_gib   CUDA: the device's memory; CPU: the memory available now, split over the ranks
    efficiency   (with a run config) a whole training step's FLOP/s at the config's shapes over the
                 matmul figure, with the step's fixed host time taken out (the model at a few
                 tokens with 1 and 5 blocks: the time per block and the rest)
    host_us      the engines' host time per block, micro-batch and step (calibrate_host.py; on
                 one rank also each block's share of the step's work): each engine trains the
                 config's model (default: DEFAULT_PROBE_MODEL) at a probe size with the run
                 tier's own Engine; what the estimate predicts is taken out
The network table carries the same link figures: every rank is on this one machine.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field

from shardwise import units
from shardwise.check import host_probe as ch
from shardwise.check import timing
from shardwise.check.timing import MIN_SECONDS
from shardwise.errors import ShardwiseError
from shardwise.estimate.comm import seconds
from shardwise.estimate.time import PEAK_DTYPE, forward_flops_per_token
from shardwise.run.config import load
from shardwise.run.model import build
from shardwise.spec.hardware import GPU, Cluster, Network
from shardwise.spec.hardware import LINK_KINDS as KINDS  # every collective is timed and fitted
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan
from shardwise.spec.presets import load_model

CPU_SIZES = tuple(4 * 1024 * 4**i for i in range(7))  # 4 KiB .. 16 MiB
GPU_SIZES = tuple(64 * 1024 * 4**i for i in range(8))  # 64 KiB .. 1 GiB
TORCH_DTYPES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # tf32: fp32 tensors
STANDARD_DIMS = {"cpu": (256, 512, 1024), "cuda": (2048, 4096, 8192)}
STANDARD_TOKENS = {"cpu": 512, "cuda": 8192}
OVERHEAD_SEQ, OVERHEAD_BLOCKS = 8, 4  # the efficiency's host time: 8 tokens, 1 vs 5 blocks
EFFICIENCY_ROUNDS = 15  # calls of each of the efficiency's three models, taking turns, per chunk: one chunk
# before the matmuls, one after the collectives, one after the overlap (StepSampler)
# the host probe's model without a run config: Llama's architecture at laptop size (examples/tiny-llama.toml)
DEFAULT_PROBE_MODEL = {"preset": "llama-2-7b", "layers": 1, "hidden": 128, "heads": 4, "vocab": 256}


@dataclass
class Result:
    """What one calibration found (rank 0's view, per-rank figures averaged over the ranks)."""

    name: str
    device: str  # "cpu" | "cuda"
    backend: str
    nproc: int
    tflops: dict[str, float]
    hbm_gbps: float
    memory_gib: float
    latency_us: float
    gbps: float
    link_samples: list[tuple[str, int, float]] = field(default_factory=list)  # (kind, bytes, seconds)
    fit_error: dict[str, float] = field(default_factory=dict)  # kind -> mean |relative error| of the fit
    # kind -> (latency s, bytes/s, mean |relative error|) of its own fit (fit_kinds)
    kinds: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    overlap: float = 1.0  # the fraction of an async collective that hid behind matmuls (overlap_fraction)
    shapes: str = ""
    device_name: str = ""
    efficiency: float = 0.0  # a whole training step's FLOP/s over the matmul figure (with a run config)
    efficiency_dtype: str = ""
    efficiency_model: str = ""
    host_us: dict = field(
        default_factory=dict
    )  # engine -> {block, microbatch, [block_step,] step} us (calibrate_host.py)
    tflops_raised: bool = False  # the efficiency dtype's figure is the training step's own (it beat the matmuls)
    host_model: str = ""
    notes: list[str] = field(default_factory=list)

    def toml(self) -> str:
        tf = ", ".join(f"{k} = {v:.4g}" for k, v in self.tflops.items())
        errs = ", ".join(f"{k} {100 * v:.0f}%" for k, v in self.fit_error.items())
        own = ", ".join(f"{k} {100 * e:.0f}%" for k, (_, _, e) in self.kinds.items())
        raised = (
            f"; {self.efficiency_dtype} raised to the training step's rate, which beat the matmuls"
            if self.tflops_raised
            else ""
        )
        src = (
            f"shardwise calibrate on {time.strftime('%Y-%m-%d')}: {self.nproc} rank(s) of {self.device_name} "
            f"({self.backend}); matmul at {self.shapes}; link fitted to {len(self.link_samples)} timed "
            f"collectives (mean fit error by kind: {errs or 'n/a, one rank'}; each kind fitted alone "
            f"(link_kinds): {own or 'n/a'}){raised}"
        )
        link = f"{self.backend} among {self.nproc} local rank(s), measured"
        return "\n".join(
            [
                f"# written by `shardwise calibrate`: this machine as {self.nproc} rank(s) see it",
                f"[gpu.{self.name}]",
                f"memory_gib = {self.memory_gib:.3f}",
                f"tflops = {{ {tf} }}",
                f"hbm_gbps = {self.hbm_gbps:.4g}",
                f'link = "{link}"',
                f"link_gbps = {self.gbps:.4g}",
                f"link_latency_us = {self.latency_us:.4g}",
                "link_efficiency = 1.0",
                f"link_kinds = {{ {kinds_toml(self.kinds, 'gbps', 1e-9)} }}",
                f"gpus_per_node = {self.nproc}",
                f"oversubscription = {oversubscription(self.device, self.nproc):.4g}",
                "# the fraction of an overlapped collective (DDP's, FSDP2's) that hid behind matmuls beside it",
                f"overlap = {self.overlap:.3f}",
                "price_per_hour = 0.0",
                f"# engines' host time in us beyond FLOPs and collectives, {self.host_model or 'not measured'}",
                f"host_us = {{ {host_toml(self.host_us)} }}",
                f'source = "{src}"',
                "",
                f"[network.{self.name}]",
                f"gbits = {self.gbps * 8:.4g}",
                f"latency_us = {self.latency_us:.4g}",
                "efficiency = 1.0",
                f"kinds = {{ {kinds_toml(self.kinds, 'gbits', 8e-9)} }}",
                f'source = "{link}; the same figures as the gpu table: every rank is on this machine"',
                "",
            ]
            + (
                [
                    "# read by `shardwise check` (and pass it to `shardwise estimate --efficiency`): the estimate's",
                    "# compute time is FLOPs / (tflops * efficiency); this efficiency is what a whole training step",
                    "# of the model reached (norms, attention, loss and framework overhead included) over the matmuls",
                    f"[calibration.{self.name}]",
                    f"efficiency = {self.efficiency:.4g}",
                    f'dtype = "{self.efficiency_dtype}"',
                    f'source = "forward + backward of {self.efficiency_model}, timed on every rank at once"',
                    "",
                ]
                if self.efficiency
                else []
            )
        )


def kinds_toml(kinds: dict, rate: str, scale: float) -> str:
    """{kind: (latency s, bytes/s, error)} as the inside of an inline TOML table of
    kind = { latency_us, <rate> = bytes/s * scale } (GPU.link_kinds in GB/s, Network.kinds in Gbit/s)."""
    return ", ".join(
        f'"{k}" = {{ latency_us = {a * 1e6:.4g}, {rate} = {b * scale:.4g} }}' for k, (a, b, _) in kinds.items()
    )


def host_toml(host: dict) -> str:
    """{engine: {term: us}} as the inside of an inline TOML table (quoted keys: tp-sp has a dash)."""
    return ", ".join(
        f'"{e}" = {{ ' + ", ".join(f"{t} = {v:.4g}" for t, v in terms.items()) + " }" for e, terms in host.items()
    )


# ---- shapes -------------------------------------------------------------------------------------
def model_shapes(spec, plan) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matmul one training step of one layer does on one rank: each linear
    layer's forward [T, in] @ [in, out], input gradient [T, out] @ [out, in] and weight gradient
    [out, T] @ [T, in], T = mbs * seq tokens, tp-local sizes (column-parallel outputs and
    row-parallel inputs divided by tp), plus the output projection."""
    t = plan.mbs * plan.seq
    tp = plan.tp
    h, f = spec.hidden, spec.ffn_hidden
    lin = [
        (h, spec.q_dim // tp),
        (h, spec.kv_dim // tp),
        (h, spec.kv_dim // tp),
        (spec.q_dim // tp, h),
        (h, f // tp),
        (f // tp, h),
    ]
    if spec.ffn_kind == "swiglu":
        lin.append((h, f // tp))
    lin.append((h, -(-spec.vocab // tp)))
    out = []
    for i, o in lin:
        out += [(t, i, o), (t, o, i), (o, t, i)]
    return out


def standard_shapes(device: str) -> list[tuple[int, int, int]]:
    t = STANDARD_TOKENS[device]
    return [(t, d, d) for d in STANDARD_DIMS[device]]


# ---- benchmarks (run on every rank at once) -------------------------------------------------------


def matmul_tflops(shapes, dtype, device, min_s: float = MIN_SECONDS) -> float:
    """Achieved TFLOP/s over the set of shapes (total FLOPs / total time), per rank."""
    import torch

    mats = [
        (torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
        for m, k, n in shapes
    ]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def run():
        for a, b in mats:
            torch.mm(a, b)

    return flops / timing.timed(run, device, min_s) / 1e12


def copy_gbps(device, nbytes: int, min_s: float = MIN_SECONDS) -> float:
    """Memory bandwidth: a copy reads and writes nbytes."""
    import torch

    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    return 2 * nbytes / timing.timed(lambda: b.copy_(a), device, min_s) / 1e9


def collective_seconds(kind: str, nbytes: int, device, min_s: float = MIN_SECONDS) -> float:
    """Seconds per call of one collective with a message of nbytes (the full buffer for
    all-gather / reduce-scatter, as the estimate counts it). send: every even rank sends to the
    next odd one (pipeline neighbours), all pairs at once."""
    import torch
    import torch.distributed as dist

    n, r = dist.get_world_size(), dist.get_rank()
    elems = max(n, nbytes // 4 // n * n)
    full = torch.ones(elems, dtype=torch.float32, device=device)
    part = torch.ones(elems // n, dtype=torch.float32, device=device)
    if kind == "all-reduce":
        fn = lambda: dist.all_reduce(full)
    elif kind == "all-gather":
        fn = lambda: dist.all_gather_into_tensor(full, part)
    elif kind == "reduce-scatter":
        fn = lambda: dist.reduce_scatter_tensor(part, full)
    elif kind == "broadcast":
        fn = lambda: dist.broadcast(full, 0)
    elif kind == "send":
        peer = r + 1 if r % 2 == 0 else r - 1

        def fn():
            if peer >= n:
                return
            if r % 2 == 0:
                dist.send(full, peer)
            else:
                dist.recv(full, peer)
    else:
        raise ValueError(kind)
    return timing.timed(fn, device, min_s)


OVERLAP_BYTES = {"cpu": 4 * 2**20, "cuda": 256 * 2**20}  # an FSDP2 block's all-gather, a DDP bucket
OVERLAP_KINDS = ("all-gather", "all-reduce")  # FSDP2's prefetch, DDP's bucket all-reduce in backward


def overlap_from(t_compute: float, t_comm: float, t_both: float) -> float:
    """The fraction of the shorter of compute and a collective that hid behind the other when both
    ran at once: (t_compute + t_comm - t_both) / min(t_compute, t_comm), in [0, 1]."""
    short = min(t_compute, t_comm)
    return 0.0 if short <= 0 else min(1.0, max(0.0, (t_compute + t_comm - t_both) / short))


def overlap_fraction(kind: str, shapes, dtype, device, min_s: float = MIN_SECONDS) -> float:
    """How much of an asynchronous collective (kind, OVERLAP_BYTES) hides behind matmuls at the
    model's shapes issued right after it, as DDP and FSDP2 issue theirs: the matmuls are repeated
    to last about as long as the collective alone, then timed alone, and both at once."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size()
    elems = OVERLAP_BYTES[device.type] // 4 // n * n
    full = torch.ones(elems, dtype=torch.float32, device=device)
    part = torch.ones(elems // n, dtype=torch.float32, device=device)
    issue = (
        (lambda: dist.all_reduce(full, async_op=True))
        if kind == "all-reduce"
        else (lambda: dist.all_gather_into_tensor(full, part, async_op=True))
    )
    mats = [
        (torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, nn, device=device, dtype=dtype))
        for m, k, nn in shapes
    ]

    def matmuls():
        for a, b in mats:
            torch.mm(a, b)

    t_comm = timing.timed(lambda: issue().wait(), device, min_s)
    reps = torch.tensor([max(1, round(t_comm / timing.timed(matmuls, device, min_s)))], device=device)
    dist.all_reduce(reps, op=dist.ReduceOp.MAX)  # the same work on every rank
    reps = int(reps.item())

    def compute():
        for _ in range(reps):
            matmuls()

    def both():
        w = issue()
        compute()
        w.wait()

    return overlap_from(timing.timed(compute, device, min_s), t_comm, timing.timed(both, device, min_s))


# ---- the fit ------------------------------------------------------------------------------------
def model_terms(kind: str, n: int, nbytes: int) -> tuple[float, float]:
    """(latency coefficient, bytes coefficient) of the estimate's time for one call:
    seconds = c_lat * a + c_bytes / B. Read off estimate/comm.py's own `seconds` (linear in a
    and 1/B), so the fit and the estimate use one model."""

    c_lat = seconds(kind, n, 1, nbytes, math.inf, 1.0)
    c_bytes = seconds(kind, n, 1, nbytes, 1.0, 0.0)
    return c_lat, c_bytes


def fit_link(samples: list[tuple[str, int, float]], n: int) -> tuple[float, float, dict[str, float]]:
    """Least squares for (a, 1/B) in t = c_lat * a + c_bytes / B over every sample, each weighted
    by 1/t (relative error), so 4 KiB and 16 MiB messages count alike. Returns (a seconds,
    B bytes/s, mean |relative error| per kind)."""
    rows = [(model_terms(k, n, b), t) for k, b, t in samples]
    s11 = sum((cl / t) ** 2 for (cl, cb), t in rows)
    s22 = sum((cb / t) ** 2 for (cl, cb), t in rows)
    s12 = sum((cl / t) * (cb / t) for (cl, cb), t in rows)
    y1 = sum(cl / t for (cl, cb), t in rows)  # (x / t) . (t / t)
    y2 = sum(cb / t for (cl, cb), t in rows)
    det = s11 * s22 - s12 * s12
    if det <= 0:
        raise ShardwiseError(
            "the collective timings do not determine a latency and a bandwidth; "
            "run calibrate again with more ranks or larger messages"
        )
    a = (y1 * s22 - y2 * s12) / det
    inv_b = (s11 * y2 - s12 * y1) / det
    if a < 0 or inv_b <= 0:  # one term is not supported by the data: fit the other alone
        a, inv_b = (0.0, y2 / s22) if inv_b > 0 else (y1 / s11, 1e-15)
    errs: dict[str, list[float]] = {}
    for (k, _, t), ((cl, cb), _) in zip(samples, rows):
        errs.setdefault(k, []).append(abs(cl * a + cb * inv_b - t) / t)
    return a, 1.0 / inv_b, {k: statistics.fmean(v) for k, v in errs.items()}


def fit_kinds(samples: list[tuple[str, int, float]], n: int) -> dict[str, tuple[float, float, float]]:
    """fit_link on each kind's samples alone: {kind: (a seconds, B bytes/s, mean |relative error|)}."""
    out = {}
    for kind in dict.fromkeys(k for k, _, _ in samples):
        a, b, errs = fit_link([s for s in samples if s[0] == kind], n)
        out[kind] = (a, b, errs[kind])
    return out


# ---- one rank ------------------------------------------------------------------------------------
def _available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: total physical memory
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _tp_local(spec, tp: int, **change):
    """The reference model as one tensor-parallel rank computes it: q/k/v, FFN and vocabulary / tp."""
    import dataclasses

    return dataclasses.replace(
        spec,
        name=f"{spec.name}-tp-local",
        heads=spec.heads // tp,
        kv_heads=spec.kv_heads // tp,
        head_dim=spec.head_dim,
        ffn_hidden=spec.ffn_hidden // tp,
        vocab=-(-spec.vocab // tp),
        published_params=0,
        **change,
    )


def _step_fn(local, mbs: int, seq: int, precision: str, device):
    """One forward + backward (loss included) of `local` on mbs x seq tokens, as a callable."""
    import torch
    import torch.nn.functional as F

    model = build(local, device, seed=0)
    if precision == "bf16":
        model.to(torch.bfloat16)
    low = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(precision)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, local.vocab, (mbs, seq + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def run():
        with torch.autocast(device.type, dtype=low, enabled=low is not None):
            logits = model(x)
        F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()
        for p in model.parameters():
            p.grad = None

    return run


def split_plain(t_one: float, t_more: float, t_real: float, layers: int, flops: float) -> tuple[float, float, float]:
    """(host seconds per block, the rest's host seconds, TFLOP/s) of a plain forward + backward:
    t_one and t_more are the model with 1 and 1 + OVERHEAD_BLOCKS blocks at OVERHEAD_SEQ tokens
    (FLOPs next to nothing: t = rest + blocks * per block), t_real the `layers`-block model at
    the plan's shapes doing `flops`; its host time is taken out before dividing (the estimate adds
    the engines' host time, host_us, on its own), never all of it."""
    block = max(0.0, (t_more - t_one) / OVERHEAD_BLOCKS)
    rest = max(0.0, t_one - block)
    busy = max(t_real - layers * block - rest, 0.05 * t_real)
    return block, rest, flops / busy / 1e12


class StepSampler:
    """Achieved TFLOP/s of a training step's forward + backward of the reference model as one
    tensor-parallel rank computes it (its q/k/v, FFN and vocabulary divided by tp), at the plan's
    micro-batch, sequence and precision, FLOPs counted as the estimate counts them (time.py),
    with the step's host time taken out (split_plain). Sampled in chunks spread over the whole
    calibration (`sample`), the median of them all: on a shared machine a burst of other work
    lasting a second would otherwise decide the one figure a step's compute time rests on (three
    calibrations minutes apart gave efficiency 0.95, 1.0 and 0.46 with one 0.5 s chunk)."""

    def __init__(self, spec, plan, device):
        local = _tp_local(spec, plan.tp)
        seq = min(OVERHEAD_SEQ, plan.seq)
        self.fns = [
            _step_fn(_tp_local(spec, plan.tp, layers=n), 1, seq, plan.precision, device)
            for n in (1, 1 + OVERHEAD_BLOCKS)
        ] + [_step_fn(local, plan.mbs, plan.seq, plan.precision, device)]
        self.flops = 3 * forward_flops_per_token(local, plan.seq) * plan.mbs * plan.seq
        self.layers, self.device = local.layers, device
        self.times: list[list[float]] = [[] for _ in self.fns]

    def sample(self, rounds: int) -> None:
        for k, x in enumerate(timing.samples_together(self.fns, self.device, rounds)):
            self.times[k] += x

    def tflops(self) -> float:
        t_one, t_more, t_real = timing.slowest_median(self.times, self.device)
        return split_plain(t_one, t_more, t_real, self.layers, self.flops)[2]


def rank_main(device_kind: str, shapes: list, sizes: tuple, dtypes: tuple, quick: bool, model=None) -> dict:
    """The benchmarks on this rank (every rank runs them together). Returns rank 0's findings."""
    import platform

    import torch
    import torch.distributed as dist

    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_kind == "cuda" else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    n = dist.get_world_size() if dist.is_initialized() else 1
    out: dict = {"tflops": {}}
    min_s = MIN_SECONDS / 5 if quick else MIN_SECONDS
    step, rounds = None, EFFICIENCY_ROUNDS // (3 if quick else 1)
    if model is not None:
        spec, plan = ModelSpec(**model[0]), Plan(**model[1])
        step = StepSampler(spec, plan, device)
        step.sample(rounds)
    for name in dtypes:
        dt = getattr(torch, TORCH_DTYPES[name])
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        out["tflops"][name] = _mean_over_ranks(matmul_tflops(shapes, dt, device, min_s), device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    copy_bytes = (16 if quick else 64) * 2**20 if device.type == "cpu" else 2**30
    out["hbm_gbps"] = _mean_over_ranks(copy_gbps(device, copy_bytes, min_s), device)
    samples = []
    if n > 1:
        for kind in KINDS:
            for b in sizes:
                samples.append((kind, b, collective_seconds(kind, b, device, min_s)))
    out["samples"] = samples
    if step is not None:
        step.sample(rounds)
    if n > 1:  # the model's dtype where a run config gives it, else fp32 (a CPU's, and the safe one)
        name = PEAK_DTYPE[model[1]["precision"]] if model is not None else "fp32"
        dt = getattr(torch, TORCH_DTYPES[name])
        out["overlap"] = statistics.fmean(overlap_fraction(k, shapes, dt, device, min_s) for k in OVERLAP_KINDS)
    if step is not None:
        step.sample(rounds)
        out["step_tflops"] = step.tflops()
        dtype = PEAK_DTYPE[plan.precision]
        out["tflops"], out["raised"] = raise_to_step(out["tflops"], dtype, out["step_tflops"])
        if dtype in out["tflops"]:
            out["efficiency"] = min(1.0, out["step_tflops"] / out["tflops"][dtype])
    out["host_us"], out["host_notes"], out["host_model"] = _host_probe(out, n, device, model, quick)
    if device.type == "cuda":
        out["memory"] = torch.cuda.get_device_properties(device).total_memory
        out["device_name"] = torch.cuda.get_device_name(device)
    else:
        out["memory"] = _available_memory_bytes() // n
        out["device_name"] = (
            f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} thread(s) per rank"
        )
    out["backend"] = dist.get_backend() if dist.is_initialized() else ("nccl" if device.type == "cuda" else "gloo")
    return out


def oversubscription(device: str, n: int) -> float:
    """Local ranks per core on a CPU (at least 1); 1 on CUDA, a device per rank."""
    return max(1.0, n / (os.cpu_count() or 1)) if device == "cpu" else 1.0


def raise_to_step(tflops: dict, dtype: str, step: float) -> tuple[dict, bool]:
    """When a training step's matmuls beat the standalone benchmark (on a CPU its weights stay in
    cache across a step), the dtype's figure becomes the step's rate: the estimate's compute time
    is then the step's, and the efficiency 1, not a fraction above 1."""
    if dtype in tflops and step > tflops[dtype]:
        return tflops | {dtype: step}, True
    return tflops, False


def _host_probe(out: dict, n: int, device, model, quick: bool) -> tuple[dict, list[str], str]:
    """The engines' host time (calibrate_host.py), on the cluster these figures describe."""

    if model is not None:
        spec, precision = ModelSpec(**model[0]), model[1]["precision"]
    else:
        d = dict(DEFAULT_PROBE_MODEL)
        spec = load_model(d.pop("preset")).scaled(**d)
        precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    eff = out.get("efficiency", 1.0)  # what `shardwise check` uses: the file's efficiency, else 1
    a, bw = fit_link(out["samples"], n)[:2] if out["samples"] else (0.0, out["hbm_gbps"] * 1e9)
    kinds = fit_kinds(out["samples"], n)
    gpu = GPU(
        name="probe",
        memory_gib=max(out.get("memory", 2**30) / 2**30, 1.0),
        tflops=out["tflops"],
        hbm_gbps=out["hbm_gbps"],
        link="",
        link_gbps=bw / 1e9,
        link_latency_us=a * 1e6,
        link_efficiency=1.0,
        link_kinds={k: {"latency_us": ka * 1e6, "gbps": kb / 1e9} for k, (ka, kb, _) in kinds.items()},
        gpus_per_node=n,
        oversubscription=oversubscription(device.type, n),
        overlap=out.get("overlap", 1.0),
    )
    net = Network(
        name="probe",
        gbits=bw * 8 / 1e9,
        latency_us=a * 1e6,
        efficiency=1.0,
        kinds={k: {"latency_us": ka * 1e6, "gbits": kb * 8 / 1e9} for k, (ka, kb, _) in kinds.items()},
    )
    cluster = Cluster(gpu=gpu, gpus=n, gpus_per_node=n, network=net)
    steps, warmup, passes = (4, 2, 1) if quick else (ch.STEPS, ch.WARMUP, ch.PASSES)
    host, notes = ch.measure(spec, precision, cluster, eff, device, n, steps=steps, warmup=warmup, passes=passes)
    return (
        host,
        notes,
        (
            f"each engine's Engine trained {spec.name} ({precision}) at {ch.PROBE_SEQ} tokens per "
            f"micro-batch on {n} rank(s)"
        ),
    )


def _mean_over_ranks(x: float, device) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _entry(device_kind: str, shapes: list, sizes: tuple, dtypes: tuple, quick: bool, model=None) -> dict:
    """One rank started by the elastic agent: join the group, benchmark, leave."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    if device_kind == "cpu":  # the threads a `shardwise run` worker would use (run/launch.py)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1:
        if device_kind == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    try:
        return rank_main(device_kind, shapes, sizes, dtypes, quick, model)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- the command ---------------------------------------------------------------------------------
def calibrate(
    nproc: int,
    device_kind: str = "auto",
    name: str | None = None,
    shapes: list | None = None,
    shapes_text: str = "",
    quick: bool = False,
    model=None,
) -> Result:
    """Start nproc local ranks, benchmark, fit; returns the Result (write it with .toml())."""
    import torch

    if not isinstance(nproc, int) or nproc < 1:
        raise ShardwiseError(f"--nproc must be a positive integer, got {nproc!r}")
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise ShardwiseError("--device cuda was asked for but this PyTorch sees no CUDA device; use --device cpu")
        if nproc > torch.cuda.device_count():
            raise ShardwiseError(
                f"--nproc {nproc} but this machine has {torch.cuda.device_count()} CUDA device(s); one rank per GPU"
            )
    elif device_kind != "cpu":
        raise ShardwiseError(f"unknown device {device_kind!r}; use cpu, cuda or auto")
    shapes = shapes or standard_shapes(device_kind)
    shapes_text = shapes_text or f"the standard shapes {', '.join(f'{m}x{k}x{n}' for m, k, n in shapes)}"
    sizes = GPU_SIZES if device_kind == "cuda" else CPU_SIZES
    if quick:
        sizes = sizes[::2]
    dtypes = ("fp32", "tf32", "bf16", "fp16") if device_kind == "cuda" else ("fp32", "bf16")
    # a run config's model and plan (as plain dicts, for the spawned ranks): also time its step
    model_arg = None
    if model is not None:
        import dataclasses

        model_arg = (dataclasses.asdict(model[0]), dataclasses.asdict(model[1]))
    args = (device_kind, shapes, sizes, dtypes, quick, model_arg)
    if nproc == 1:
        out = _entry(*args)
    else:
        out = _launch(nproc, args)
    samples = out["samples"]
    if samples:
        a, bw, errs = fit_link(samples, nproc)
    else:  # one rank: no link to measure; the memory copy bandwidth is what a self-copy costs
        a, bw, errs = 0.0, out["hbm_gbps"] * 1e9, {}
    kinds = fit_kinds(samples, nproc)
    return Result(
        name=(name or f"this-{device_kind}").lower(),
        device=device_kind,
        backend=out["backend"],
        nproc=nproc,
        tflops=out["tflops"],
        hbm_gbps=out["hbm_gbps"],
        memory_gib=out["memory"] / 2**30,
        latency_us=a * 1e6,
        gbps=bw / 1e9,
        link_samples=samples,
        fit_error=errs,
        kinds=kinds,
        overlap=out.get("overlap", 1.0),
        shapes=shapes_text,
        device_name=out["device_name"],
        host_us=out["host_us"],
        host_model=out["host_model"],
        notes=out["host_notes"],
        tflops_raised=bool(out.get("raised")),
        **_efficiency(out, model),
    )


def _efficiency(out: dict, model) -> dict:
    if model is None or "efficiency" not in out:
        return {}

    spec, plan = model
    return {
        "efficiency": out["efficiency"],
        "efficiency_dtype": PEAK_DTYPE[plan.precision],
        "efficiency_model": f"{spec.name} as one tp={plan.tp} rank (mbs {plan.mbs}, seq {plan.seq}, {plan.precision})",
    }


def _launch(nproc: int, args: tuple) -> dict:
    """nproc ranks under torchrun's elastic agent (standalone rendezvous); rank 0's result."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    lc = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(lc, entrypoint=_entry)(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise ShardwiseError(f"calibration rank {rank} failed: {failure.message or failure.exitcode}") from None
    return results[0]


def from_config(path: str, overrides=None) -> tuple[list, str, tuple]:
    """(matmul shapes, their description, (ModelSpec, Plan)) of a run config."""

    cfg = load(path, overrides)
    p = cfg.plan
    return (
        model_shapes(cfg.model, p),
        (
            f"{cfg.model.name}'s linear layers (mbs {p.mbs} x seq {p.seq} tokens, "
            f"tp {p.tp}; forward and both backward products)"
        ),
        (cfg.model, p),
    )


def print_result(r: Result, out: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    c = console or Console(soft_wrap=True)
    c.print(f"calibrated {r.nproc} rank(s) of {r.device_name} ({r.backend})", highlight=False)
    c.print(
        "matmul  " + ", ".join(f"{k} {v * 1e3:,.1f} GFLOP/s" for k, v in r.tflops.items()) + f" per rank at {r.shapes}",
        highlight=False,
    )
    c.print(f"memory  {r.hbm_gbps:,.1f} GB/s copy bandwidth, {r.memory_gib:,.2f} GiB per rank", highlight=False)
    per = {
        "block": "block per micro-batch",
        "microbatch": "micro-batch",
        "block_step": "block per step",
        "step": "step",
    }
    for eng, terms in r.host_us.items():
        c.print(
            f"host    {eng:<6} "
            + ", ".join(f"{v:,.0f} us per {per[t]}" for t, v in terms.items())
            + " beyond FLOPs and collectives",
            highlight=False,
        )
    for note in r.notes:
        c.print(f"note    {note}", highlight=False)
    if r.efficiency:
        c.print(
            f"step    {r.efficiency:.3f} of the {r.efficiency_dtype} matmul rate in a training step of "
            f"{r.efficiency_model} (use --efficiency {r.efficiency:.3f} with `shardwise estimate`)",
            highlight=False,
        )
    if r.link_samples:
        c.print(
            f"link    latency {r.latency_us:,.1f} us per step, bandwidth {r.gbps:,.3f} GB/s (fitted to every "
            "kind; the kinds' own fits below are what the estimate uses)",
            highlight=False,
        )
        c.print(
            f"overlap {r.overlap:.2f} of an asynchronous {' / '.join(OVERLAP_KINDS)} of "
            f"{units.binary_bytes(OVERLAP_BYTES[r.device], 0)} hid behind matmuls running beside it",
            highlight=False,
        )
        for kind, (ka, kb, _) in r.kinds.items():
            c.print(
                f"link    {kind:<14} latency {ka * 1e6:,.1f} us per step, bandwidth {kb / 1e9:,.3f} GB/s",
                highlight=False,
            )
        t = Table(
            title="collectives: measured vs the model fitted to every kind, and to each kind alone", show_lines=False
        )
        for col in ("kind", "message", "measured", "one fit", "error", "own fit", "error "):
            t.add_column(col, justify="right" if col != "kind" else "left")
        for kind, b, s in r.link_samples:
            cl, cb = model_terms(kind, r.nproc, b)
            one = cl * r.latency_us * 1e-6 + cb / (r.gbps * 1e9)
            ka, kb, _ = r.kinds[kind]
            own = cl * ka + cb / kb
            t.add_row(
                kind,
                units.binary_bytes(b, 0),
                units.seconds(s),
                units.seconds(one),
                f"{100 * (one - s) / s:+.0f}%",
                units.seconds(own),
                f"{100 * (own - s) / s:+.0f}%",
            )
        c.print(t)
    c.print(f"wrote {out}: use it as `--hardware {out} --gpu {r.name} --network {r.name}`", highlight=False)
