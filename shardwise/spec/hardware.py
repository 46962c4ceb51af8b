"""Hardware: GPU, Network and Cluster, loaded from the TOML catalogs (every number has a source).

Units, everywhere in shardwise: memory in bytes (catalog in GiB), FLOP/s in TFLOP/s dense (no
sparsity), bandwidth in GB/s = 1e9 bytes/s per direction per GPU, latency in microseconds.
Network catalogs quote Gbit/s as vendors do; `Network.gbytes_per_s` converts (/8).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from shardwise.errors import ShardwiseError, closest
from shardwise.spec import limits
from shardwise.units import GIB

_CAT = Path(__file__).with_name("catalog")
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")
# the engines and terms of GPU.host_us (what estimate/host.py combines; calibrate measures them)
HOST_ENGINES = ("dp", "zero1", "zero2", "zero3", "tp", "tp-sp", "pp")
HOST_TERMS = ("block", "microbatch", "block_step", "step")  # block_step: one rank's probe only (calibrate_host.py)
# collectives a hardware file may give their own latency and bandwidth (`shardwise calibrate` fits
# each: on a shared-memory CPU gloo's all-reduce, all-gather, reduce-scatter, broadcast and send
# differ by 3-5x at one size, which no single latency and bandwidth fits); a recv is timed as a send
LINK_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "broadcast", "send")


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    tflops: dict  # dtype -> dense TFLOP/s (tensor cores where the dtype has them)
    hbm_gbps: float  # HBM bandwidth, GB/s
    link: str  # intra-node interconnect, e.g. "NVLink 4", "PCIe 4.0 x16"
    link_gbps: float  # intra-node bandwidth per GPU per direction, GB/s
    link_latency_us: float = 3.0
    link_efficiency: float = 0.8  # achieved / nominal bus bandwidth for large collectives
    # {kind: {latency_us, gbps}} measured per collective (LINK_KINDS); other kinds use the two above
    link_kinds: dict = field(default_factory=dict)
    gpus_per_node: int = 8  # the usual server
    price_per_hour: float = 0.0  # USD per GPU-hour, a typical cloud on-demand figure
    # host time beyond FLOPs and collectives per engine, {engine: {term: us}} (estimate/host.py),
    # measured by `shardwise calibrate`; empty in the catalog: a GPU's host runs ahead of it
    host_us: dict = field(default_factory=dict)
    # local ranks per CPU core when calibrated (CPU only; 1 = a device per rank): a pipeline stage
    # idle in its bubble gives its share of the cores to the busy ranks (time.exposed_bubble)
    oversubscription: float = 1.0
    # the fraction of an overlapped collective's time that hides behind compute running alongside it
    # (DDP's bucket all-reduce in backward, FSDP2's prefetched all-gathers): 1 in the catalog (a
    # GPU's copy engines and NCCL's kernels run beside the math); `shardwise calibrate` measures it
    # (on a CPU gloo's threads compete with the math for the same cores)
    overlap: float = 1.0
    source: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def peak_flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for a compute dtype, falling back fp32 -> tf32 is NOT done silently."""
        if dtype not in self.tflops:
            raise ShardwiseError(
                f"GPU {self.name!r} has no {dtype} figure in the catalog; use one of {', '.join(self.tflops)}"
            )
        return self.tflops[dtype] * 1e12


@dataclass(frozen=True)
class Network:
    name: str
    gbits: float  # per GPU per direction, Gbit/s (one NIC per GPU in the usual rail design)
    latency_us: float
    efficiency: float = 0.8
    kinds: dict = field(default_factory=dict)  # {kind: {latency_us, gbits}} per collective, as GPU.link_kinds
    source: str = ""

    @property
    def gbytes_per_s(self) -> float:
        return self.gbits / 8


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    gpus: int
    gpus_per_node: int
    network: Network

    def __post_init__(self):
        limits.check_count("gpus", self.gpus, limits.GPUS)
        limits.check_count("gpus per node", self.gpus_per_node, limits.GPUS_PER_NODE)
        if self.gpus <= 0 or self.gpus_per_node <= 0:
            raise ShardwiseError(
                f"GPU counts must be positive, got gpus={self.gpus}, gpus_per_node={self.gpus_per_node}"
            )
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ShardwiseError(
                f"{self.gpus} GPUs is not a whole number of {self.gpus_per_node}-GPU "
                "nodes; change --gpus or --gpus-per-node"
            )

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)

    @property
    def node_size(self) -> int:
        """GPUs that share the fast intra-node link (fewer if the cluster is a partial node)."""
        return min(self.gpus, self.gpus_per_node)

    def describe(self) -> str:
        return (
            f"{self.gpus}x {self.gpu.name} ({self.nodes} node(s) x {self.node_size}, "
            f"{self.gpu.link} inside, {self.network.name} between)"
        )


# ---- catalogs ---------------------------------------------------------------------------
def _load(fname: str) -> dict:
    with open(_CAT / fname, "rb") as f:
        return tomllib.load(f)


def _build(cls, name: str, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ShardwiseError(f"{where}: unknown field {unknown[0]!r}; {closest(unknown[0], names)}")
    try:
        obj = cls(name=name, **d)
    except TypeError as e:
        raise ShardwiseError(f"{where}: {e}") from None
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        _check_field(f.name, f.type, v, where)
    return obj


# sizes and rates that a later division needs non-zero; efficiencies are fractions of nominal
_POSITIVE = {"memory_gib", "hbm_gbps", "link_gbps", "gpus_per_node", "gbits"}
_FRACTIONS = {"link_efficiency", "efficiency"}
_UNIT = {"overlap"}  # fractions that may be 0


def _check_field(name: str, typ: str, v, where: str) -> None:
    """A catalog or hardware-file value has the field's type and a sane range (one-line errors)."""
    if typ in ("float", "int"):
        number = isinstance(v, int) if typ == "int" else isinstance(v, (int, float))
        if not number or isinstance(v, bool):
            kind = "an integer" if typ == "int" else "a number"
            raise ShardwiseError(f"{where}: {name} must be {kind}, got {v!r}")
        if v < 0:
            raise ShardwiseError(f"{where}: {name} must not be negative, got {v}")
        if v == 0 and name in _POSITIVE:
            raise ShardwiseError(f"{where}: {name} must be positive, got 0")
        if name in _FRACTIONS and not 0 < v <= 1:
            raise ShardwiseError(f"{where}: {name} is a fraction of nominal bandwidth in (0, 1], got {v}")
        if name in _UNIT and not 0 <= v <= 1:
            raise ShardwiseError(
                f"{where}: {name} is the fraction of a collective that hides behind compute, in [0, 1], got {v}"
            )
    elif typ == "str" and not isinstance(v, str):
        raise ShardwiseError(f"{where}: {name} must be a string, got {v!r}")
    elif name == "tflops":
        if not isinstance(v, dict) or not v:
            raise ShardwiseError(
                f"{where}: tflops must be a table of dtype = dense TFLOP/s, e.g. {{ bf16 = 989.4 }}, got {v!r}"
            )
        _named_numbers(v, where, "tflops", "dtype", DTYPES, "a positive number", lambda x: x > 0)
    elif name == "host_us":
        shape = "{ block = us, microbatch = us, step = us } (block_step = us optional)"
        for eng, terms in _tables(v, where, name, "engine", HOST_ENGINES, shape):
            _named_numbers(
                terms, where, f"host_us.{eng}", "term", HOST_TERMS, "a number of microseconds >= 0", lambda x: x >= 0
            )
    elif name in ("link_kinds", "kinds"):
        rate = "gbps" if name == "link_kinds" else "gbits"
        shape = f"{{ latency_us = us, {rate} = rate }}"
        for kind, figs in _tables(v, where, name, "collective", LINK_KINDS, shape):
            if set(figs) != {"latency_us", rate}:
                raise ShardwiseError(f"{where}: {name}.{kind} must be {shape}, got {figs!r}")
            # a latency may be 0 (fitted away); a rate is a divisor
            _named_numbers(
                figs,
                where,
                f"{name}.{kind}",
                "figure",
                ("latency_us", rate),
                "a number >= 0 (latency) or > 0 (rate)",
                lambda x: x >= 0,
            )
            if figs[rate] == 0:
                raise ShardwiseError(f"{where}: {name}.{kind}.{rate} must be positive, got 0")


def _tables(v, where: str, name: str, noun: str, keys, shape: str) -> list[tuple[str, dict]]:
    """`v` a table of `noun` = `shape` tables, every `noun` one of `keys` (one-line errors): its items."""
    if not isinstance(v, dict):
        raise ShardwiseError(f"{where}: {name} must be a table of {noun} = {shape}, got {v!r}")
    for k, inner in v.items():
        if k not in keys:
            raise ShardwiseError(f"{where}: {name} has unknown {noun} {k!r}; {closest(k, keys)}")
        if not isinstance(inner, dict):
            raise ShardwiseError(f"{where}: {name}.{k} must be {shape}, got {inner!r}")
    return list(v.items())


def _named_numbers(table: dict, where: str, name: str, noun: str, keys, what: str, ok) -> None:
    """Every key of `table` one of `keys`, every value a number that passes `ok` (one-line errors)."""
    for k, x in table.items():
        if k not in keys:
            raise ShardwiseError(f"{where}: {name} has unknown {noun} {k!r}; {closest(k, keys)}")
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not ok(x):
            raise ShardwiseError(f"{where}: {name}.{k} must be {what}, got {x!r}")


def gpus() -> dict[str, GPU]:
    return {k: _build(GPU, k, v, f"gpus.toml [{k}]") for k, v in _load("gpus.toml").items()}


def networks() -> dict[str, Network]:
    return {k: _build(Network, k, v, f"networks.toml [{k}]") for k, v in _load("networks.toml").items()}


def load_gpu(name: str | GPU, hardware_file: str | None = None) -> GPU:
    if isinstance(name, GPU):
        return name
    cat = gpus()
    if hardware_file:
        cat.update(_file_entries(hardware_file, "gpu", GPU))
    key = name.lower()
    if key not in cat:
        raise ShardwiseError(f"unknown GPU {name!r}; {closest(key, cat)} (see `shardwise gpus`)")
    return cat[key]


def load_network(name: str | Network, hardware_file: str | None = None) -> Network:
    if isinstance(name, Network):
        return name
    cat = networks()
    if hardware_file:
        cat.update(_file_entries(hardware_file, "network", Network))
    key = name.lower()
    if key not in cat:
        raise ShardwiseError(f"unknown network {name!r}; {closest(key, cat)} (see `shardwise gpus`)")
    return cat[key]


# [calibration.NAME]: what `shardwise calibrate` measured beyond the GPU's fields (a training step's
# efficiency over the matmul rate); read by `shardwise check`, not by the catalog loaders
FILE_TABLES = ("gpu", "network", "calibration")


def _file_entries(path: str, table: str, cls) -> dict:
    """A user hardware file: [gpu.NAME] and [network.NAME] tables with the catalog's fields."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise ShardwiseError(f"hardware file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ShardwiseError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise ShardwiseError(f"{path}: not a UTF-8 text file; give a TOML hardware file") from None
    except OSError as e:  # a directory, no permission, /proc
        raise ShardwiseError(f"hardware file {path!r} cannot be read ({e.strerror}); give a TOML file") from None
    for top, v in d.items():  # a typo'd [gpus.x] must not be silently ignored
        if top not in FILE_TABLES or not isinstance(v, dict):
            raise ShardwiseError(
                f"{path}: {top!r} is not a [gpu.NAME], [network.NAME] or [calibration.NAME] "
                f"table; {closest(top, FILE_TABLES)}"
            )
        for k, e in v.items():
            if not isinstance(e, dict):
                raise ShardwiseError(f"{path}: {top}.{k} must be a table of fields, got {e!r}")
    return {k.lower(): _build(cls, k.lower(), v, f"{p.name} [{table}.{k}]") for k, v in d.get(table, {}).items()}


def make_cluster(
    gpu: str | GPU = "h100-80gb",
    n_gpus: int = 8,
    gpus_per_node: int | None = None,
    network: str | Network | None = None,
    hardware_file: str | None = None,
) -> Cluster:
    g = load_gpu(gpu, hardware_file)
    gpn = g.gpus_per_node if gpus_per_node is None else gpus_per_node  # 0 is an error, not "the default"
    if network is None:
        network = "ib-ndr" if g.gpus_per_node >= 8 else "ethernet-25g"
    return Cluster(gpu=g, gpus=n_gpus, gpus_per_node=gpn, network=load_network(network, hardware_file))
