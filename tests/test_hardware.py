"""The GPU and network catalogs, the Cluster arithmetic, and user hardware files."""

import pytest

from shardwise.errors import ShardwiseError
from shardwise.spec import hardware as hw
from shardwise.spec.hardware import DTYPES, GIB, Cluster, load_gpu, load_network, make_cluster

GPUS = (
    "rtx-4090",
    "v100-32gb",
    "a100-40gb",
    "a100-80gb",
    "h100-80gb",
    "h100-pcie",
    "h200",
    "b200",
    "mi300x",
    "l4",
    "t4",
)
NETWORKS = ("ib-hdr", "ib-ndr", "roce-100g", "roce-200g", "roce-400g", "ethernet-10g", "ethernet-25g", "ethernet-100g")


def test_catalogs_hold_every_required_entry():
    assert set(GPUS) <= set(hw.gpus())
    assert set(NETWORKS) <= set(hw.networks())


@pytest.mark.parametrize("name", GPUS)
def test_every_gpu_is_complete_and_sourced(name):
    g = hw.gpus()[name]
    assert g.name == name and len(g.source) > 40  # a datasheet and a price, named
    assert g.memory_gib > 0 and g.hbm_gbps > 0 and g.link_gbps > 0 and g.link
    assert set(g.tflops) <= set(DTYPES) and "fp32" in g.tflops and "fp16" in g.tflops
    assert 0 < g.link_efficiency <= 1 and g.link_latency_us > 0 and g.price_per_hour > 0
    assert g.gpus_per_node in (4, 8)
    # tensor-core rates exceed the plain FP32 rate; fp8 doubles bf16 where both exist (dense)
    assert g.tflops["fp16"] > g.tflops["fp32"]
    if "fp8" in g.tflops and "bf16" in g.tflops:
        assert g.tflops["fp8"] == pytest.approx(2 * g.tflops["bf16"], rel=0.01)


@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_is_sourced(name):
    n = hw.networks()[name]
    assert n.source and n.gbits > 0 and n.latency_us > 0 and 0 < n.efficiency <= 1


def test_dense_tflops_from_the_datasheets():
    g = hw.gpus()
    # NVIDIA H100 whitepaper, SXM5: BF16 989.4 dense (the datasheet's 1,979 is with sparsity)
    assert g["h100-80gb"].tflops["bf16"] == 989.4
    assert g["h100-80gb"].peak_flops("bf16") == 989.4e12
    assert g["h100-80gb"].tflops["tf32"] == 494.7
    # A100 datasheet: BF16 312 dense (624 with sparsity), TF32 156
    assert g["a100-80gb"].tflops["bf16"] == 312.0 and g["a100-40gb"].tflops["tf32"] == 156.0
    # H200 = H100 SXM compute; B200 (HGX) BF16 4.5 PFLOPS sparse -> 2,250 dense
    assert g["h200"].tflops == g["h100-80gb"].tflops and g["b200"].tflops["bf16"] == 2250.0
    # MI300X datasheet: FP16 1307.4 dense
    assert g["mi300x"].tflops["fp16"] == 1307.4


def test_gpus_without_bf16_tensor_cores_have_no_bf16_figure():
    v100 = hw.gpus()["v100-32gb"]
    assert set(v100.tflops) == {"fp32", "fp16"}  # Volta: FP16 tensor cores only
    with pytest.raises(ShardwiseError, match="no bf16 figure.*use one of fp32, fp16"):
        v100.peak_flops("bf16")
    assert set(hw.gpus()["t4"].tflops) == {"fp32", "fp16"}


def test_memory_is_binary_gib():
    g = hw.gpus()
    # 80 GiB = 80 * 2^30 = 85,899,345,920 bytes
    assert g["h100-80gb"].memory_bytes == 80 * 2**30 == 85_899_345_920
    assert g["h200"].memory_bytes == 141 * GIB and g["mi300x"].memory_bytes == 192 * GIB


def test_link_rates_are_per_direction():
    g = hw.gpus()
    # NVLink 4: 18 links x 25 GB/s each way = 450 (the datasheet's 900 GB/s counts both ways)
    assert g["h100-80gb"].link_gbps == 18 * 25
    assert g["a100-80gb"].link_gbps == 12 * 25 and g["v100-32gb"].link_gbps == 6 * 25
    assert g["b200"].link_gbps == 18 * 50
    # PCIe 4.0 x16: 16 GT/s * 16 lanes * 128/130 encoding / 8 bits = 31.5 GB/s each way
    assert g["l4"].link_gbps == pytest.approx(16 * 16 * 128 / 130 / 8, abs=0.01)
    assert g["h100-pcie"].link_gbps == pytest.approx(32 * 16 * 128 / 130 / 8, abs=0.05)


def test_network_rates_convert_bits_to_bytes():
    n = hw.networks()
    # 400 Gbit/s / 8 = 50 GB/s per GPU per direction
    assert n["ib-ndr"].gbytes_per_s == 50.0 and n["ib-hdr"].gbytes_per_s == 25.0
    assert n["ethernet-25g"].gbytes_per_s == 3.125


# ---- Cluster ------------------------------------------------------------------------------------
def test_cluster_node_arithmetic():
    c = make_cluster("h100-80gb", 64)
    assert (c.nodes, c.node_size, c.gpus_per_node, c.network.name) == (8, 8, 8, "ib-ndr")
    c = make_cluster("h100-80gb", 4)  # a partial node: the link spans only 4 GPUs
    assert (c.nodes, c.node_size) == (1, 4)
    c = make_cluster("a100-80gb", 32, gpus_per_node=4, network="roce-200g")
    assert (c.nodes, c.node_size, c.network.gbits) == (8, 4, 200)
    c = make_cluster("l4", 8)  # 4-card PCIe servers default to plain Ethernet
    assert (c.nodes, c.network.name) == (2, "ethernet-25g")
    assert "8 node(s) x 8" in make_cluster("h100-80gb", 64).describe()


def test_cluster_errors_are_one_line():
    g = load_gpu("h100-80gb")
    with pytest.raises(ShardwiseError, match="12 GPUs is not a whole number of 8-GPU nodes"):
        make_cluster(g, 12)
    for n in (0, -8):
        with pytest.raises(ShardwiseError, match="must be positive"):
            Cluster(gpu=g, gpus=n, gpus_per_node=8, network=load_network("ib-ndr"))
    with pytest.raises(ShardwiseError, match="must be positive"):
        Cluster(gpu=g, gpus=8, gpus_per_node=0, network=load_network("ib-ndr"))


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ShardwiseError, match=r"unknown GPU 'h100'; did you mean .*h100-80gb"):
        load_gpu("h100")
    with pytest.raises(ShardwiseError, match=r"unknown GPU 'a100-80'.*a100-80gb"):
        make_cluster("a100-80", 8)
    with pytest.raises(ShardwiseError, match=r"unknown network 'ib-xdr'; did you mean .*ib-ndr"):
        load_network("ib-xdr")


def test_names_are_case_insensitive():
    assert load_gpu("H100-80GB").name == "h100-80gb" and load_network("IB-NDR").name == "ib-ndr"


# ---- user hardware files ------------------------------------------------------------------------
GOOD = """
[gpu.my-gpu]
memory_gib = 48
tflops = { fp32 = 91.6, bf16 = 362.1 }
hbm_gbps = 864
link = "PCIe 4.0 x16"
link_gbps = 31.5
gpus_per_node = 4
source = "our lab's L40S"

[gpu.h100-80gb]   # the catalog's entry, at our negotiated price
memory_gib = 80
tflops = { fp32 = 66.9, bf16 = 989.4 }
hbm_gbps = 3350
link = "NVLink 4"
link_gbps = 450
price_per_hour = 1.5

[network.our-fabric]
gbits = 100
latency_us = 8
"""


def test_hardware_file_adds_and_overrides(tmp_path):
    p = tmp_path / "hw.toml"
    p.write_text(GOOD)
    g = load_gpu("my-gpu", str(p))
    assert (g.memory_gib, g.tflops["bf16"], g.gpus_per_node) == (48, 362.1, 4)
    assert g.link_efficiency == 0.8  # an omitted field takes the dataclass default
    assert load_gpu("h100-80gb", str(p)).price_per_hour == 1.5
    assert load_gpu("h100-80gb").price_per_hour != 1.5  # the catalog itself is untouched
    c = make_cluster("my-gpu", 8, network="our-fabric", hardware_file=str(p))
    assert (c.nodes, c.network.gbits, c.network.latency_us) == (2, 100, 8)
    assert load_gpu("a100-80gb", str(p)).name == "a100-80gb"  # the rest of the catalog still there


def test_hardware_file_gives_collectives_their_own_figures(tmp_path):
    p = tmp_path / "hw.toml"
    p.write_text(
        GOOD.replace('source = "our lab\'s L40S"', 'link_kinds = { "all-gather" = { latency_us = 40, gbps = 12.5 } }')
        + "kinds = { send = { latency_us = 3, gbits = 200 } }\n"
    )
    assert load_gpu("my-gpu", str(p)).link_kinds == {"all-gather": {"latency_us": 40, "gbps": 12.5}}
    assert load_network("our-fabric", str(p)).kinds == {"send": {"latency_us": 3, "gbits": 200}}


BAD = {
    "not toml": ("[gpu.x\nmemory_gib = 1", "not valid TOML"),
    "unknown field": ("[gpu.x]\nmemroy_gib = 80", "unknown field 'memroy_gib'; did you mean memory_gib"),
    "missing field": (
        '[gpu.x]\nmemory_gib = 80\ntflops = { bf16 = 1.0 }\nlink = "x"\nlink_gbps = 1',
        "missing 1 required positional argument: 'hbm_gbps'",
    ),
    "negative": ("[network.x]\ngbits = -100\nlatency_us = 5", "gbits must not be negative, got -100"),
    "zero": ("[network.x]\ngbits = 0\nlatency_us = 5", "gbits must be positive"),
    "string number": ('[network.x]\ngbits = "100"\nlatency_us = 5', "gbits must be a number, got '100'"),
    "efficiency": (
        "[network.x]\ngbits = 100\nlatency_us = 5\nefficiency = 80",
        r"efficiency is a fraction of nominal bandwidth in \(0, 1\], got 80",
    ),
    "bad dtype": (
        '[gpu.x]\nmemory_gib = 80\ntflops = { bfloat16 = 1.0 }\nhbm_gbps = 1\nlink = "x"\nlink_gbps = 1',
        "tflops has unknown dtype 'bfloat16'",
    ),
    "tflops not a table": (
        '[gpu.x]\nmemory_gib = 80\ntflops = 989\nhbm_gbps = 1\nlink = "x"\nlink_gbps = 1',
        "tflops must be a table",
    ),
    "typo'd table": ("[gpus.x]\nmemory_gib = 80", "'gpus' is not a .* table; did you mean gpu"),
    "overlap": (
        '[gpu.x]\nmemory_gib = 80\ntflops = { bf16 = 1.0 }\nhbm_gbps = 1\nlink = "x"\nlink_gbps = 1\noverlap = 1.5',
        r"overlap is the fraction of a collective that hides behind compute, in \[0, 1\]",
    ),
    "kinds not a table": (
        "[network.x]\ngbits = 100\nlatency_us = 5\nkinds = 3",
        r"kinds must be a table of collective = \{ latency_us = us, gbits = rate \}",
    ),
    "unknown kind": (
        "[network.x]\ngbits = 100\nlatency_us = 5\nkinds = { allreduce = { latency_us = 1, gbits = 1 } }",
        "kinds has unknown collective 'allreduce'; did you mean all-reduce",
    ),
    "kind's rate in GPU units": (
        "[network.x]\ngbits = 100\nlatency_us = 5\nkinds = { send = { latency_us = 1, gbps = 1 } }",
        r"kinds.send must be \{ latency_us = us, gbits = rate \}",
    ),
    "kind's zero rate": (
        '[gpu.x]\nmemory_gib = 80\ntflops = { bf16 = 1.0 }\nhbm_gbps = 1\nlink = "x"\n'
        "link_gbps = 1\nlink_kinds = { broadcast = { latency_us = 5, gbps = 0 } }",
        "link_kinds.broadcast.gbps must be positive, got 0",
    ),
    "kind's negative latency": (
        '[gpu.x]\nmemory_gib = 80\ntflops = { bf16 = 1.0 }\nhbm_gbps = 1\nlink = "x"\n'
        "link_gbps = 1\nlink_kinds = { send = { latency_us = -5, gbps = 1 } }",
        "link_kinds.send.latency_us must be a number >= 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_hardware_files_give_one_line(tmp_path, case):
    text, match = BAD[case]
    p = tmp_path / "hw.toml"
    p.write_text(text)
    loader = load_network if "[network" in text else load_gpu
    with pytest.raises(ShardwiseError, match=match) as e:
        loader("x", str(p))
    assert "\n" not in str(e.value) and "hw.toml" in str(e.value)


def test_missing_hardware_file():
    with pytest.raises(ShardwiseError, match="hardware file 'nope.toml' does not exist"):
        load_gpu("h100-80gb", "nope.toml")
