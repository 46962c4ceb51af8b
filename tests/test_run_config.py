"""The `shardwise run` config: one TOML, overrides, one-line errors naming file/table/field,
the ModelSpec and Plan it resolves to, and the learning-rate schedule. No torch needed."""

import math
import os
from pathlib import Path

import pytest

from shardwise.errors import ShardwiseError
from shardwise.run import config as C
from shardwise.spec.plan import Plan
from shardwise.spec.presets import preset

ROOT = Path(__file__).resolve().parents[1]
TINY = """
[model]
layers = 4
hidden = 128
heads = 4
vocab = 256
[plan]
seq = 64
mbs = 2
gbs = 8
precision = "fp32"
[optim]
lr = 3e-3
warmup_steps = 5
[train]
steps = 50
"""


def write(tmp_path, text, name="run.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def error(fn, *a, **kw) -> str:
    with pytest.raises(ShardwiseError) as e:
        fn(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg, "a user error is one line"
    return msg


# ---- what a config resolves to -----------------------------------------------------------
def test_tiny_llama_example_is_llama_2_7b_scaled():
    cfg = C.load(str(ROOT / "examples/tiny-llama.toml"))
    m = cfg.model
    base = preset("llama-2-7b")
    # same architecture as the preset, dimensions replaced; MHA stays MHA (kv_heads follows heads)
    for f in ("ffn_kind", "norm", "positions", "tied_embeddings", "qkv_bias"):
        assert getattr(m, f) == getattr(base, f)
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.vocab) == (4, 128, 4, 4, 256)
    # Llama FFN rule at hidden 128: 2/3 * 4 * 128 = 341.3 -> rounded up to a multiple of 256 = 512
    assert m.ffn_hidden == 512
    # params: embedding 256*128 = 32,768; per layer attention 4*128*128 = 65,536, SwiGLU 3*128*512 =
    # 196,608, two RMSNorms 256 -> 262,400; 4 layers 1,049,600; final norm 128; untied head 32,768
    # total 32,768 + 1,049,600 + 128 + 32,768 = 1,115,264
    assert m.params == 1_115_264
    assert m.name == "llama-2-7b-scaled"
    # dp left out -> derived from the processes (default: 1); gbs 16 over mbs 4 -> 4 micro-batches
    assert cfg.plan == Plan(dp=1, mbs=4, gbs=16, seq=64, precision="fp32")
    assert cfg.plan.grad_accum == 4 and cfg.train.nproc == 1


def test_tiny_gpt2_example_keeps_gpt2_architecture():
    m = C.load(str(ROOT / "examples/tiny-gpt2.toml")).model
    assert (m.ffn_kind, m.norm, m.positions, m.tied_embeddings, m.mlp_bias) == (
        "gelu",
        "layernorm",
        "learned",
        True,
        True,
    )
    assert (m.max_seq, m.dropout, m.ffn_hidden) == (128, 0.0, 4 * 128)


def test_full_dimensions_and_defaults(tmp_path):
    cfg = C.load(write(tmp_path, TINY))
    assert cfg.model.name == "custom" and cfg.model.params == 1_115_264
    assert cfg.data == C.DataConfig()  # synthetic, seed 0, branch 4
    assert cfg.optim.min_lr == pytest.approx(3e-4)  # default lr / 10
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.grad_clip == 1.0
    assert cfg.train.steps == 50 and cfg.train.device == "auto" and cfg.train.metrics == ""


def test_model_from_a_config_json(tmp_path):
    hf = tmp_path / "config.json"
    hf.write_text(
        '{"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, '
        '"num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 300}'
    )
    cfg = C.load(
        write(
            tmp_path,
            TINY.replace("layers = 4\nhidden = 128\nheads = 4\nvocab = 256", 'path = "config.json"\nlayers = 3'),
        )
    )
    m = cfg.model
    # path is relative to the TOML file; the override replaces layers only
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.ffn_hidden, m.vocab) == (3, 64, 4, 2, 128, 300)


def test_nproc_derives_dp_and_round_trips(tmp_path):
    cfg = C.load(write(tmp_path, TINY), {("train", "nproc"): (4, "--nproc"), ("plan", "tp"): (2, "--tp")})
    assert (cfg.plan.dp, cfg.plan.tp, cfg.plan.gbs, cfg.train.nproc) == (2, 2, 8, 4)
    assert C.RunConfig.from_dict(cfg.to_dict()) == cfg
    # no nproc: dp*tp*pp with dp given, or tp*pp with dp left out
    assert C.load(write(tmp_path, TINY), {("plan", "dp"): (2, "--dp")}).train.nproc == 2
    assert C.load(write(tmp_path, TINY), {("plan", "pp"): (2, "--pp")}).train.nproc == 2
    # under torchrun the world size decides
    assert C.load(write(tmp_path, TINY), world=4).plan.dp == 4


def test_overrides_reach_every_table(tmp_path):
    ov = {}
    for item in (
        "model.hidden=256",
        "plan.zero=3",
        "plan.sp=false",
        "data.branch=2",
        "optim.betas=[0.8, 0.9]",
        "optim.lr=1e-3",
        "train.device=cpu",
        "train.metrics=out/m.jsonl",
    ):
        key, value = C.parse_set(item)
        ov[key] = (value, f"--set {item}")
    cfg = C.load(write(tmp_path, TINY), ov)
    assert cfg.model.hidden == 256 and cfg.model.head_dim == 64  # head_dim re-derived: 256 / 4
    assert cfg.plan.zero == 3 and cfg.plan.sp is False
    assert cfg.data.branch == 2 and cfg.optim.betas == (0.8, 0.9) and cfg.optim.lr == 1e-3
    assert cfg.train.device == "cpu"
    assert cfg.train.metrics == "out/m.jsonl"  # from the command line: relative to the working directory


def test_parse_set_values():
    assert C.parse_set("plan.tp=2") == (("plan", "tp"), 2)
    assert C.parse_set("optim.lr=3e-4") == (("optim", "lr"), 3e-4)
    assert C.parse_set("plan.sp=true") == (("plan", "sp"), True)
    assert C.parse_set("data.path=/data/train.bin") == (("data", "path"), "/data/train.bin")  # bare string
    assert C.parse_set('model.preset="llama-2-7b"') == (("model", "preset"), "llama-2-7b")
    assert C.parse_set(" plan.schedule = gpipe ") == (("plan", "schedule"), "gpipe")


def test_file_paths_are_relative_to_the_config(tmp_path):
    sub = tmp_path / "cfgs"
    sub.mkdir()
    (sub / "train.bin").write_bytes(bytes(range(200)) * 2)
    text = TINY + '[data]\nsource = "text"\npath = "train.bin"\n'
    cfg = C.load(write(sub, text.replace("[train]\n", '[train]\nmetrics = "m.jsonl"\n')))
    assert cfg.data.path == str(sub / "train.bin") and cfg.train.metrics == str(sub / "m.jsonl")


# ---- one-line errors that say where ------------------------------------------------------------
def test_unknown_table_and_field_suggest(tmp_path):
    msg = error(C.load, write(tmp_path, TINY + "[trian]\nsteps = 3\n"))
    assert "run.toml" in msg and "[trian]" in msg and "did you mean train" in msg
    msg = error(C.load, write(tmp_path, TINY.replace("steps = 50", "stpes = 50")))
    assert "[train]" in msg and "'stpes'" in msg and "steps" in msg
    msg = error(C.load, write(tmp_path, TINY.replace("mbs = 2", "mbs = 2\nzeros = 1")))
    assert "[plan]" in msg and "did you mean zero" in msg
    assert "did you mean" in error(C.parse_set, "plan.tpp=2")
    assert "unknown table" in error(C.parse_set, "plna.tp=2")
    assert "TABLE.FIELD=VALUE" in error(C.parse_set, "tp=2")


@pytest.mark.parametrize(
    "edit, table, field, says",
    [
        (("steps = 50", 'steps = "50"'), "train", "steps", "expected an integer"),
        (("steps = 50", "steps = 5.5"), "train", "steps", "expected an integer"),
        (("steps = 50", "steps = 0"), "train", "steps", "positive"),
        (("steps = 50", "steps = -3"), "train", "steps", "positive"),
        (("steps = 50", "log_every = 0"), "train", "log_every", "positive"),
        (("steps = 50", 'device = "tpu"'), "train", "device", "one of auto, cpu, cuda"),
        (("steps = 50", "timeout_s = 0"), "train", "timeout_s", "positive"),
        (("steps = 50", "nproc = -1"), "train", "nproc", "positive"),
        (("lr = 3e-3", "lr = 0"), "optim", "lr", "positive"),
        (("lr = 3e-3", "lr = true"), "optim", "lr", "expected a number"),
        (("lr = 3e-3", "lr = 3e-3\nmin_lr = 1.0"), "optim", "min_lr", "between 0 and lr"),
        (("lr = 3e-3", "lr = 3e-3\nbetas = [0.9, 1.0]"), "optim", "betas", "[0, 1)"),
        (("lr = 3e-3", "lr = 3e-3\nbetas = 0.9"), "optim", "betas", "list of 2 numbers"),
        (("lr = 3e-3", "lr = 3e-3\ngrad_clip = -1"), "optim", "grad_clip", ">= 0"),
        (("lr = 3e-3", "lr = 3e-3\nweight_decay = -0.1"), "optim", "weight_decay", "negative"),
        (("warmup_steps = 5", "warmup_steps = -1"), "optim", "warmup_steps", "negative"),
        (("mbs = 2", 'mbs = "two"'), "plan", "mbs", "expected an integer"),
        (("mbs = 2", "mbs = 2\nsp = 1"), "plan", "sp", "true or false"),
        (("hidden = 128", "hidden = 12.8"), "model", "hidden", "expected an integer"),
    ],
)
def test_bad_field_names_file_table_and_field(tmp_path, edit, table, field, says):
    msg = error(C.load, write(tmp_path, TINY.replace(*edit)))
    assert msg.startswith(str(tmp_path / "run.toml")) and f"[{table}]" in msg and field in msg and says in msg


def test_bad_values_the_spec_and_plan_refuse(tmp_path):
    path = write(tmp_path, TINY)
    msg = error(C.load, write(tmp_path, TINY.replace("heads = 4", "heads = 0"), "bad.toml"))
    assert "[model]" in msg and "heads must be a positive integer" in msg
    msg = error(C.load, path, {("plan", "tp"): (3, "--tp")})
    assert "[plan]" in msg and "tp=3 must divide the attention heads" in msg
    msg = error(C.load, path, {("plan", "zero"): (5, "--set plan.zero")})
    assert "ZeRO stage must be 0, 1, 2 or 3" in msg
    msg = error(C.load, path, {("plan", "schedule"): ("1f1", "--set plan.schedule")})
    assert "did you mean 1f1b" in msg
    msg = error(C.load, path, {("plan", "gbs"): (7, "--gbs")})
    assert "global batch 7 is not a multiple of dp*mbs" in msg


def test_override_errors_name_the_flag(tmp_path):
    msg = error(C.load, write(tmp_path, TINY), {("train", "steps"): (0, "--steps")})
    assert msg.startswith("--steps:")
    key, value = C.parse_set("optim.lr=fast")
    assert error(C.load, write(tmp_path, TINY), {key: (value, "--set optim.lr")}).startswith("--set optim.lr:")


def test_world_size_mismatch_is_caught_before_anything_starts(tmp_path):
    path = write(tmp_path, TINY)
    msg = error(C.load, path, {("plan", "dp"): (4, "--dp"), ("train", "nproc"): (2, "--nproc")})
    # dp*tp*pp = 4*1*1 = 4 but 2 processes
    assert "dp*tp*pp = 4*1*1 = 4" in msg and "2 processes" in msg and "leave dp out" in msg
    msg = error(C.load, path, {("plan", "tp"): (2, "--tp"), ("train", "nproc"): (3, "--nproc")})
    assert "tp*pp = 2*1 = 2 does not divide the 3 processes" in msg
    msg = error(C.load, path, {("train", "nproc"): (2, "--nproc")}, world=4)
    assert "torchrun started 4" in msg
    msg = error(C.load, path, {("plan", "dp"): (2, "--dp")}, world=4)
    assert "torchrun's world size" in msg


def test_model_and_data_source_errors(tmp_path):
    msg = error(C.load, write(tmp_path, TINY.replace("vocab = 256\n", "")))
    assert "missing vocab" in msg and "preset" in msg
    msg = error(C.load, write(tmp_path, TINY.replace("layers = 4", 'preset = "lama-2-7b"')))
    assert "[model]" in msg and "did you mean" in msg and "llama-2-7b" in msg
    msg = error(C.load, write(tmp_path, TINY.replace("layers = 4", 'preset = "llama-2-7b"\npath = "x.json"')))
    assert "not both" in msg
    msg = error(C.load, write(tmp_path, TINY + '[data]\nsource = "tokenz"\n'))
    assert "[data] source" in msg and "did you mean tokens" in msg
    msg = error(C.load, write(tmp_path, TINY + '[data]\nsource = "tokens"\n'))
    assert "[data] path" in msg and "needs a file" in msg
    msg = error(C.load, write(tmp_path, TINY + '[data]\npath = "x.bin"\n'))
    assert "synthetic source reads no file" in msg
    msg = error(C.load, write(tmp_path, TINY + '[data]\nsource = "tokens"\npath = "nope.bin"\n'))
    assert "does not exist" in msg and "nope.bin" in msg
    msg = error(C.load, write(tmp_path, TINY + "[data]\nbranch = 1\n"))
    assert "[data] branch" in msg and "at least 2" in msg
    msg = error(C.load, write(tmp_path, TINY + "[data]\nbranch = 300\n"))
    assert "branch" in msg and "vocab is 256" in msg


def test_file_level_errors(tmp_path):
    assert "does not exist" in error(C.load, str(tmp_path / "none.toml"))
    msg = error(C.load, write(tmp_path, "[plan\nseq = 1"))
    assert "not valid TOML" in msg
    assert "must be a table" in error(C.load, write(tmp_path, "model = 3\n"))


# ---- the learning-rate schedule --------------------------------------------------------------
def test_warmup_then_cosine_hand_worked():
    o = C.OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4)
    lrs = [o.lr_at(s, 10) for s in range(10)]
    # warmup: lr * (step + 1) / 4 -> 2.5e-4, 5e-4, 7.5e-4, 1e-3
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # cosine over steps 4..9 (span 5): ratio (s - 4) / 5; lr = min + (1 + cos(pi * ratio)) / 2 * (lr - min)
    # s=4: ratio 0 -> 1e-3;  s=5: ratio 0.2 -> (1 + 0.809017) / 2 = 0.9045085 -> 1e-4 + 0.9045085 * 9e-4 = 9.1405765e-4
    # s=6: ratio 0.4 -> (1 + 0.309017) / 2 = 0.6545085 -> 1e-4 + 5.8905765e-4 = 6.8905765e-4
    # s=9: ratio 1 -> min_lr 1e-4
    assert lrs[4] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(9.1405765e-4)
    assert lrs[6] == pytest.approx(6.8905765e-4)
    assert lrs[9] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # never rises after warmup
    # the midpoint of the cosine is the mean of lr and min_lr: steps 21, warmup 0 -> ratio 0.5 at step 10
    o0 = C.OptimConfig(lr=1e-3, min_lr=1e-4)
    assert o0.lr_at(10, 21) == pytest.approx(5.5e-4)
    assert o0.lr_at(0, 21) == 1e-3
    # a one-step run (no room to decay) trains at lr
    assert o0.lr_at(0, 1) == 1e-3
    assert math.isclose(C.OptimConfig(lr=2e-3, min_lr=2e-3).lr_at(7, 10), 2e-3)


# ---- [checkpoint] ------------------------------------------------------------------------------
def fake_checkpoint(root: Path, step: int, model=None, optimizer="adamw") -> Path:
    """A checkpoint directory as run/checkpoint.py leaves it, minus the tensors config.py never reads."""
    from shardwise.run import checkpoint_dir as layout

    p = root / layout.step_name(step)
    p.mkdir(parents=True)
    (p / layout.DCP_METADATA).write_bytes(b"x")
    model = model or C.load(write(root, TINY, "ref.toml")).model
    shapes = {n: list(s) for n, s in model.param_shapes()}
    layout.write_trainer(p, {"step": step, "optimizer": optimizer, "param_shapes": shapes})
    return p


def test_checkpoint_table_defaults_paths_and_round_trip(tmp_path):
    cfg = C.load(write(tmp_path, TINY))
    assert cfg.checkpoint == C.CheckpointConfig(dir="", every=0, keep=2, async_save=False, resume="")
    cfg = C.load(write(tmp_path, TINY + '[checkpoint]\ndir = "ck"\nevery = 10\nkeep = 3\nasync_save = true\n'))
    # relative to the config file, like metrics; nothing is created before the run
    assert cfg.checkpoint == C.CheckpointConfig(dir=str(tmp_path / "ck"), every=10, keep=3, async_save=True)
    assert not (tmp_path / "ck").exists()
    assert C.RunConfig.from_dict(cfg.to_dict()) == cfg


def test_resume_resolves_latest_before_the_run(tmp_path):
    ck = tmp_path / "ck"
    fake_checkpoint(ck, 10)
    newest = fake_checkpoint(ck, 20)
    (ck / ".tmp-step-000030").mkdir()  # a save that never finished
    path = write(tmp_path, TINY + '[checkpoint]\ndir = "ck"\nresume = "latest"\n')
    assert C.load(path).checkpoint.resume == str(newest)
    # a path: a checkpoint, or a directory of them (its newest); from the command line, as given
    older = str(ck / "step-000010")
    assert C.load(path, {("checkpoint", "resume"): (older, "--resume")}).checkpoint.resume == older
    assert C.load(write(tmp_path, TINY), {("checkpoint", "resume"): (str(ck), "--resume")}).checkpoint.resume == str(
        newest
    )


@pytest.mark.parametrize(
    "table, says",
    [
        ("every = 5", "no checkpoint directory"),
        ("async_save = true", "no checkpoint directory"),
        ('dir = "ck"\nevery = -1', "must be >= 0"),
        ('dir = "ck"\nkeep = 0', "must be a positive integer"),
        ('resume = "latest"', "set --checkpoint-dir"),
        ('dir = "ck"\nresume = "latest"', "no complete checkpoint in"),
        ('resume = "nowhere"', "does not exist"),
        ('dir = "ck"\nevery = "often"', "expected an integer"),
    ],
)
def test_checkpoint_errors_are_one_line(tmp_path, table, says):
    msg = error(C.load, write(tmp_path, TINY + "[checkpoint]\n" + table + "\n"))
    assert "[checkpoint]" in msg and says in msg, msg


def test_checkpoint_dir_must_be_writable_before_the_run(tmp_path):
    (tmp_path / "afile").write_text("x")
    msg = error(C.load, write(tmp_path, TINY), {("checkpoint", "dir"): (str(tmp_path / "afile"), "--checkpoint-dir")})
    assert msg.startswith("--checkpoint-dir:") and "is a file" in msg
    under_file = str(tmp_path / "afile" / "ck")
    msg = error(C.load, write(tmp_path, TINY), {("checkpoint", "dir"): (under_file, "--checkpoint-dir")})
    assert "cannot write in" in msg
    if os.geteuid() != 0:  # root writes anywhere: the permission check cannot fail for it
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        msg = error(C.load, write(tmp_path, TINY), {("checkpoint", "dir"): (str(ro / "ck"), "--checkpoint-dir")})
        assert "cannot write in" in msg


def test_a_checkpoint_the_run_cannot_continue_is_refused(tmp_path):
    ck = tmp_path / "ck"
    path = write(tmp_path, TINY)

    def resume(p, more=None):
        return {("checkpoint", "resume"): (str(p), "--resume"), **(more or {})}

    at = fake_checkpoint(ck, 50)
    msg = error(C.load, path, resume(at))
    assert msg.startswith("--resume:") and "is at step 50, the run ends at step 50" in msg
    longer = {("train", "steps"): (60, "--steps")}
    assert C.load(path, resume(at, longer)).checkpoint.resume == str(at)
    # another plan is fine (resharding); another model or optimizer is not
    assert C.load(path, resume(at, {**longer, ("plan", "tp"): (2, "--tp")})).plan.tp == 2
    msg = error(C.load, path, resume(at, {**longer, ("model", "hidden"): (64, "--hidden")}))
    assert "holds another model" in msg and "tok_embeddings.weight" in msg
    sgd = fake_checkpoint(tmp_path / "other", 10, optimizer="sgd")
    msg = error(C.load, path, resume(sgd))
    assert "holds sgd states" in msg and "--optimizer sgd" in msg
