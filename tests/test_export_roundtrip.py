"""Export then import gives back the same Plan (a property test over the plans each framework can
express), other tools' own files are read into Plans, and the command line's --export, --out and
--from behave: one-line errors, nothing written half-way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _export import dims, job, plan_back
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.export import READERS, export, read_file
from shardwise.spec.plan import Plan

# fields a format's file cannot hold and the command line supplies (accelerate: the training script's batch)
FROM_FLAGS = {"accelerate": ("mbs", "gbs", "seq"), "deepspeed": ("seq",)}


# the layouts each format can hold, so the property spends its examples on plans it accepts
LAYOUTS = {"deepspeed": ([1, 2, 4, 8], [1]), "accelerate": ([1], [1])}


@st.composite
def plans(draw, fmt):
    gpus = draw(st.sampled_from([8, 16, 64]))
    tps, pps = LAYOUTS.get(fmt, ([1, 2, 4, 8], [1, 2, 4]))
    tp = draw(st.sampled_from(tps))
    pp = draw(st.sampled_from(pps))
    cp = draw(st.sampled_from([1, 1, 2, 4]))
    assume(gpus % (tp * pp * cp) == 0)
    dp = gpus // (tp * pp * cp)
    mbs = draw(st.sampled_from([1, 2, 4]))
    ga = draw(st.sampled_from([1, 2, 4, 8, 16]))
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "interleaved"])) if pp > 1 else "1f1b"
    fields = dict(
        tp=tp,
        pp=pp,
        zero=draw(st.sampled_from([0, 1, 2, 3])),
        mbs=mbs,
        gbs=dp * mbs * ga,
        seq=draw(st.sampled_from([1024, 2048, 4096])),
        schedule=schedule,
        vpp=draw(st.sampled_from([1, 2])) if schedule == "interleaved" else 1,
        recompute=draw(st.sampled_from(["none", "selective", "selective-op", "selective-layer:3", "full"])),
        sp=draw(st.booleans()) if tp > 1 else False,
        precision=draw(st.sampled_from(["bf16-mixed", "fp16-mixed", "fp32", "bf16", "fp8-tensorwise", "fp8-rowwise"])),
        optimizer=draw(st.sampled_from(["adamw", "sgd"])),
        offload=draw(st.sampled_from(["none", "optimizer", "params"])),
        attention=draw(st.sampled_from(["flash", "math"])),
        compile=draw(st.booleans()),
        cp=cp,
        cp_rotate=draw(st.sampled_from(["allgather", "alltoall"])) if cp > 1 else "allgather",
    )
    return gpus, fields


@pytest.mark.parametrize("fmt", sorted(READERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_export_then_import_gives_back_the_same_plan(tmp_path_factory, fmt, data):
    gpus, fields = data.draw(plans(fmt))
    try:
        j = job(gpus=gpus, **fields)
    except ShardwiseError:
        assume(False)  # not a legal plan at all
    assume(READERS[fmt].refuse(j) is None)
    ex = export(fmt, j)
    path = tmp_path_factory.mktemp(fmt) / ex.filename
    path.write_text(ex.text)
    imp = read_file(str(path))
    flags = FROM_FLAGS.get(fmt, ())
    if fmt == "accelerate" and j.plan.zero == 0:
        flags += ("recompute",)  # DDP: the launch line's --gradient_checkpointing, not the YAML's
    assert plan_back(imp, j.plan, flags) == j.plan
    if imp.model is not None:
        assert dims(imp.model) == dims(j.model)


def test_the_property_reaches_every_format():
    """The filter above leaves plans for every format: each accepts this one."""
    j = job(gpus=16, zero=0, mbs=2, gbs=64)
    assert all(r.refuse(j) is None for r in READERS.values())


# ---- other tools' own files ------------------------------------------------------------------
def test_reads_a_torchtitan_toml_as_torchtitan_writes_it(tmp_path):
    """torchtitan's own llama3 8B example (torchtitan/models/llama3/train_configs/llama3_8b.toml,
    its training and parallelism tables), trimmed to what a plan holds."""
    f = tmp_path / "llama3_8b.toml"
    f.write_text(
        '[model]\nname = "llama3"\nflavor = "8B"\n[training]\nlocal_batch_size = 1\nseq_len = 8192\n'
        "[parallelism]\ndata_parallel_replicate_degree = 1\ndata_parallel_shard_degree = -1\n"
        'tensor_parallel_degree = 1\npipeline_parallel_degree = 1\n[activation_checkpoint]\nmode = "selective"\n'
    )
    imp = read_file(str(f))
    assert imp.model.name == "llama-3.1-8b"
    assert imp.plan == dict(
        tp=1, pp=1, sp=False, zero=3, mbs=1, seq=8192, precision="bf16-mixed", recompute="selective-layer:2"
    )  # torchtitan's selective_ac_option defaults to "2": every second block


def test_reads_an_axolotl_yaml(tmp_path):
    f = tmp_path / "qlora.yml"
    f.write_text(
        "base_model: meta-llama/Llama-3.1-8B\nsequence_len: 4096\nmicro_batch_size: 2\n"
        "gradient_accumulation_steps: 4\nbf16: auto\ngradient_checkpointing: true\n"
        "fsdp_config:\n  fsdp_version: 2\n  reshard_after_forward: true\n"
    )
    imp = read_file(str(f))
    assert imp.fmt == "axolotl" and imp.model.name == "llama-3.1-8b" and imp.grad_accum == 4
    # 8 GPUs: gbs = 2 per micro-batch x 4 accumulated x dp 8 = 64
    assert plan_back(imp, Plan(dp=8, gbs=64)) == Plan(
        dp=8, mbs=2, gbs=64, seq=4096, zero=3, recompute="full", precision="bf16-mixed"
    )


def test_reads_a_deepspeed_config_with_auto_batch_as_an_error(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 2}}))
    with pytest.raises(ShardwiseError, match="'auto'"):
        read_file(str(f))


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("a.toml", "[parallelism\n", "not valid TOML"),
        ("a.toml", "[other]\nx = 1\n", "neither a torchtitan job config"),
        ("a.json", "{", "not valid JSON"),
        ("a.json", '{"x": 1}', "not a DeepSpeed config"),
        ("a.yaml", "a: [", "not valid YAML"),
        ("a.yaml", "x: 1\n", "not an accelerate config"),
        ("a.txt", "hello\n", "unknown config kind"),
        ("m.sh", "--num-layers x --tensor-model-parallel-size 2", "--num-layers must be an integer"),
        ("a.toml", '[parallelism]\npipeline_parallel_degree = 2\npipeline_parallel_schedule = "ZBV"\n', "'ZBV' has no"),
    ],
)
def test_a_bad_file_is_one_line(tmp_path, name, text, words):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ShardwiseError) as e:
        read_file(str(f))
    assert words in str(e.value) and "\n" not in str(e.value)


# ---- the command line -------------------------------------------------------------------------
def cli(capsys, argv):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_estimate_export_to_stdout_pipes_the_file_alone(capsys):
    rc, out, err = cli(
        capsys,
        [
            "estimate",
            "llama-3.1-8b",
            "--gpus",
            "8",
            "--zero",
            "3",
            "--mbs",
            "2",
            "--gbs",
            "64",
            "--recompute",
            "full",
            "--export",
            "deepspeed",
        ],
    )
    assert rc == 0
    d = json.loads(out)
    assert (d["train_batch_size"], d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"]) == (64, 2, 4)
    assert err.startswith("# launch: deepspeed --num_nodes 1 --num_gpus 8")


def test_plan_export_writes_the_best_plan_the_framework_can_express(tmp_path, capsys):
    out_file = tmp_path / "pretrain.sh"
    rc, out, err = cli(capsys, f"plan llama-3.1-8b --gpus 16 --export megatron --out {out_file}".split())
    assert rc == 0 and f"wrote {out_file} (megatron)" in out
    imp = read_file(str(out_file))
    assert imp.plan["zero"] <= 1 and imp.gpus == 16  # Megatron-LM has no ZeRO-2/3: the best it can run
    assert "the best plan megatron can express" in out


def test_plan_from_says_how_much_faster_the_recommended_plan_is(tmp_path, capsys):
    f = tmp_path / "ds_config.json"
    f.write_text(json.dumps({"train_batch_size": 2048, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 256,
                             "bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))  # fmt: skip
    rc, out, err = cli(capsys, f"plan llama-3.1-8b --from {f} --top 3".split())
    assert rc == 0 and f"{f} (dp8 tp1 pp1 zero0 mbs1 ga256)" in " ".join(out.split())
    assert "as fast" in out


def test_estimate_from_a_megatron_flags_file(tmp_path, capsys):
    f = tmp_path / "run.sh"
    f.write_text(export("megatron", job(gpus=16, tp=2, sp=True, zero=1, mbs=1, gbs=64)).text)
    rc, out, err = cli(capsys, f"estimate --from {f} --json".split())
    d = json.loads(out)
    assert rc in (0, 1) and d["plan"]["tp"] == 2 and d["plan"]["dp"] == 8 and d["plan"]["zero"] == 1
    assert d["model"]["layers"] == 32


@pytest.mark.parametrize(
    "argv, words",
    [
        ("estimate llama-3.1-8b --out x.toml", "--out names the file --export writes"),
        ("estimate llama-3.1-8b --export deepspeed --pp 2 --gbs 64", "--export deepspeed: DeepSpeed pipelines"),
        ("estimate llama-3.1-8b --export torchtitan --out {tmp}", "is a directory"),
        ("estimate --from {tmp}/none.toml", "no such file"),
        ("estimate --export slurm", "give a model"),
        ("estimate llama-3.1-8b --export nope", "invalid choice"),
    ],
)
def test_export_and_import_errors_are_one_line_exit_2(tmp_path, capsys, argv, words):
    rc, out, err = cli(capsys, argv.format(tmp=tmp_path).split())
    assert rc == 2 and words in err and err.count("\n") == 1 and not list(Path(tmp_path).iterdir())


def test_the_sample_config_json_is_qwen2_5_0_5b():
    """examples/config.json, the README tour's Hugging Face config, reads as the catalog's model."""
    from shardwise.spec.presets import load_model, preset

    m = load_model(str(Path(__file__).parent.parent / "examples" / "config.json"))
    assert dims(m) == dims(preset("qwen2.5-0.5b")) and m.params == 494_032_768


@pytest.mark.parametrize("precision", ["fp8-tensorwise", "fp8-rowwise"])
@pytest.mark.parametrize("fmt", ["torchtitan", "accelerate", "shardwise"])
def test_compile_and_fp8_come_back(tmp_path, fmt, precision):
    """The property's draws, pinned: compile with each FP8 recipe, wherever the format holds them."""
    j = job(gpus=16, zero=3, mbs=2, gbs=64, precision=precision, compile=True)
    if READERS[fmt].refuse(j) is not None:
        assert fmt == "accelerate" and precision == "fp8-rowwise"  # its config holds tensorwise only
        return
    ex = export(fmt, j)
    (tmp_path / ex.filename).write_text(ex.text)
    imp = read_file(str(tmp_path / ex.filename))
    assert plan_back(imp, j.plan, FROM_FLAGS.get(fmt, ())) == j.plan
