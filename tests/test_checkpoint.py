"""Checkpoints: a run cut short and resumed trains exactly like one run straight through; a checkpoint
saved under one plan loads under another with the same parameters and optimizer states; a half-written
checkpoint is never taken for the latest.

The multi-process tests run the real training loop (run/train.py) on CPU/gloo, several plans per
spawned group, as tests/test_equivalence.py does. A run is "cut" the way a preempted job is: every
rank raises at the start of step CUT (the test hook of tests/test_run_failures.py), after the
checkpoint of the steps before it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from _dist import run_ranks
from _models import TINY_GPT2, TINY_LLAMA

from shardwise.run import checkpoint_dir as layout
from shardwise.run.config import CheckpointConfig, DataConfig, OptimConfig, RunConfig, TrainConfig
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan

STEPS, CUT = 4, 2
LLAMA, GPT2 = TINY_LLAMA, TINY_GPT2


def config(spec: ModelSpec, fields: dict, world: int, root: Path, name: str, **ckpt) -> RunConfig:
    """4 steps of AdamW with warmup then cosine (the LR differs every step, so a resume that lost
    its place in the schedule shows), 4 micro-batches of 2 x 32 tokens."""
    plan = Plan(**{"mbs": 2, "gbs": 8, "seq": 32, "precision": "fp32", **fields}).resolve(spec, world)
    return RunConfig(
        spec,
        plan,
        DataConfig(seed=3),
        OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.1),
        TrainConfig(steps=STEPS, seed=7, log_every=100, metrics=str(root / f"{name}.jsonl"), device="cpu", nproc=world),
        checkpoint=CheckpointConfig(**ckpt),
    )


def triple(spec: ModelSpec, fields: dict, world: int, root: Path, tag: str, **extra) -> tuple[RunConfig, ...]:
    """(straight through, cut at CUT, resumed): the cut and the resumed run share the metrics file
    and the checkpoint directory, as a job and its restart do."""
    straight = config(spec, fields, world, root, f"{tag}-straight", dir=str(root / f"{tag}-straight"))
    cut = config(spec, fields, world, root, f"{tag}-cut", dir=str(root / f"{tag}-cut"), every=CUT, **extra)
    resumed = dataclasses.replace(cut, checkpoint=dataclasses.replace(cut.checkpoint, resume="latest"))
    return straight, cut, resumed


def run_triples(triples: list[tuple[RunConfig, ...]], reshard: list[tuple[RunConfig, str, str]] = ()) -> None:
    """Rank-side. Each triple: train straight, train until every rank fails at CUT, resume to the
    end. Then each reshard item: build the Engine of its plan, load the checkpoint, save it again."""
    import torch.distributed as dist

    from shardwise.run.dist import local_device
    from shardwise.run.train import FAIL_RANK, FAIL_STEP, train

    dev = local_device("cpu")
    for straight, cut, resumed in triples:
        train(straight, dev)
        dist.barrier()
        os.environ.update({FAIL_RANK: str(dist.get_rank()), FAIL_STEP: str(CUT)})
        try:
            train(cut, dev)
            raise AssertionError("the cut run did not stop")
        except RuntimeError as e:
            assert "injected failure" in str(e), e
        finally:
            del os.environ[FAIL_RANK], os.environ[FAIL_STEP]
        dist.barrier()
        train(resumed, dev)
        dist.barrier()
    for cfg, src, dst in reshard:
        reshard_once(cfg, src, dst)
        dist.barrier()


def reshard_once(cfg: RunConfig, src: str, dst: str) -> None:
    """Load `src` under cfg's plan and save what was loaded to `dst` (the step it was at)."""
    from shardwise.run import checkpoint
    from shardwise.run.dist import local_device
    from shardwise.run.engine import Engine

    o = cfg.optim
    eng = Engine(
        cfg.model, cfg.plan, device=local_device("cpu"), seed=cfg.train.seed, lr=o.lr, weight_decay=o.weight_decay
    )
    state = checkpoint.load(eng, src)
    saver = checkpoint.Checkpointer(eng, CheckpointConfig(dir=dst), model=cfg.model, steps=cfg.train.steps)
    saver.save(state["step"])


# ---- checking -----------------------------------------------------------------------------------
def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def contents(path: Path, tmp: Path) -> dict:
    """Every entry of a DCP checkpoint, whole (dcp_to_torch_save gathers the shards)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / (path.parent.name + "-" + path.name + ".pt")
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False)


def assert_identical(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:6]}"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"
        else:
            assert a[k] == b[k], f"{what}: {k}: {a[k]!r} != {b[k]!r}"


def assert_complete(state: dict, spec: ModelSpec) -> None:
    """A checkpoint holds every parameter and every parameter's AdamW states (not a subset that a
    save and a load could agree on while both being wrong)."""
    names = [n for n, _ in spec.param_shapes()]
    want = set(names) | {f"state.{n}.{s}" for n in names for s in ("step", "exp_avg", "exp_avg_sq")}
    assert want <= set(state), sorted(want - set(state))[:6]
    if spec.tied_embeddings:  # the last pipeline stage's copy is not saved: the embedding's keys are its values
        assert not [k for k in state if "output.weight" in k]


def check_triple(straight: RunConfig, resumed: RunConfig, tmp: Path, resumed_from: int = CUT) -> None:
    name = resumed.plan.short()
    ref = records(Path(straight.train.metrics))
    got = records(Path(resumed.train.metrics))
    assert [r["step"] for r in ref] == list(range(STEPS)), name
    # one file: the cut run's steps 0..CUT-1, then the resumed run's, appended, the first one marked
    assert [r["step"] for r in got] == list(range(CUT)) + list(range(resumed_from, STEPS)), name
    marked = [i for i, r in enumerate(got) if "resumed_from" in r]
    assert marked == [CUT] and got[CUT]["resumed_from"] == resumed_from, name
    # bit-exact: the same floats, not close ones (the same arithmetic in the same order)
    assert [r["loss"] for r in got] == [r["loss"] for r in ref[:CUT] + ref[resumed_from:]], name
    assert [r["lr"] for r in got] == [r["lr"] for r in ref[:CUT] + ref[resumed_from:]], name
    # final parameters and optimizer states: the end-of-run checkpoints of both runs
    a = contents(Path(straight.checkpoint.dir) / layout.step_name(STEPS), tmp)
    b = contents(Path(resumed.checkpoint.dir) / layout.step_name(STEPS), tmp)
    assert_complete(a, straight.model)
    assert_identical(a, b, name)
    assert layout.read_trainer(Path(resumed.checkpoint.dir) / layout.step_name(STEPS))["step"] == STEPS


# ---- bit-exact resume ---------------------------------------------------------------------------
TWO = [  # every engine alone
    ("ddp", LLAMA, dict(dp=2, zero=0)),
    ("zero1", LLAMA, dict(dp=2, zero=1)),
    ("zero2", LLAMA, dict(dp=2, zero=2)),
    ("zero3", LLAMA, dict(dp=2, zero=3)),
    ("tp", LLAMA, dict(tp=2, sp=True)),
    ("pp", GPT2, dict(pp=2, schedule="1f1b")),  # the last stage's tied copy is loaded from the embedding's keys
]


@pytest.mark.slow
def test_resume_is_bit_exact_on_two_ranks_and_reshards_zero3_to_tp(tmp_path):
    """DDP, ZeRO-1/2/3, TP+SP and 1F1B (tied embedding): losses after the resume and the final
    parameters and optimizer states equal those of the straight run, bit for bit. ZeRO-3 also runs
    with async saves (every step): the save in flight when the run fails is never committed, the
    resume takes the one before. Then the dp2 zero3 checkpoint is loaded under tp2 and saved again:
    the same tensors, whole."""
    triples = [triple(spec, f, 2, tmp_path, tag) for tag, spec, f in TWO]
    async_ = triple(LLAMA, dict(dp=2, zero=3), 2, tmp_path, "zero3-async")
    async_ = (
        async_[0],
        *(
            dataclasses.replace(c, checkpoint=dataclasses.replace(c.checkpoint, every=1, async_save=True))
            for c in async_[1:]
        ),
    )
    src = tmp_path / "zero3-straight" / layout.step_name(STEPS)
    to_tp = config(LLAMA, dict(tp=2), 2, tmp_path, "to-tp")
    run_ranks(run_triples, 2, [*triples, async_], [(to_tp, str(src), str(tmp_path / "to-tp"))], timeout=600)

    failures = []
    for (tag, _, _), (straight, _, resumed) in zip(TWO, triples):
        try:
            check_triple(straight, resumed, tmp_path)
            # the cut run saved step 2, the resumed one step 4: both kept (keep = 2)
            got = sorted(p.name for p in Path(resumed.checkpoint.dir).iterdir())
            assert got == ["step-000002", "step-000004"], got
        except AssertionError as e:
            failures.append(f"{tag}: {e}")
    try:
        # async, every step, cut at 2: the save of step 1 was committed after step 2 ran; that of step 2
        # was in flight when the run failed, left as .tmp-step-000002, and "latest" passed it over
        check_triple(async_[0], async_[2], tmp_path, resumed_from=1)
        # the resumed run saved 2, 3 and 4 again (the .tmp- reused), committed each, kept the newest 2
        assert sorted(p.name for p in (tmp_path / "zero3-async-cut").iterdir()) == ["step-000003", "step-000004"]
    except AssertionError as e:
        failures.append(f"zero3 async: {e}")
    assert not failures, "\n".join(failures)

    a = contents(src, tmp_path)
    b = contents(tmp_path / "to-tp" / layout.step_name(STEPS), tmp_path)
    assert_complete(a, LLAMA)
    assert_identical(a, b, "dp2 zero3 -> tp2")

    # dp2 zero1 (each rank holds the optimizer states of the parameters it owns) -> one process
    one_process_reshard(LLAMA, tmp_path / "zero1-straight" / layout.step_name(STEPS), tmp_path, "zero1")


def one_process_reshard(spec: ModelSpec, src: Path, tmp: Path, tag: str) -> None:
    """Load a multi-rank checkpoint in this process (one rank, no process group): the parameters are
    the checkpoint's, and saving them again gives back every tensor of the checkpoint, bit for bit."""
    cfg = config(spec, {}, 1, tmp, f"{tag}-one")
    dst = tmp / f"{tag}-one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reshard_once(cfg, str(src), str(dst))
    finally:
        torch.set_num_threads(threads)
    a = contents(src, tmp)
    b = contents(dst / layout.step_name(STEPS), tmp)
    assert_complete(a, spec)
    assert_identical(a, b, f"{tag} -> one process")


MIXES = [
    ("dp2-tp2-zero1", LLAMA, dict(dp=2, tp=2, zero=1, sp=True)),  # DDP + TP's local shards, ZeRO-1 owners
    ("dp2-pp2", GPT2, dict(dp=2, pp=2, zero=1)),  # stages, tied embedding copy, ZeRO-1 over each stage's dp
]


@pytest.mark.slow
def test_resume_is_bit_exact_on_four_ranks_and_reshards_to_one_process(tmp_path):
    """Two mixes resume bit-exactly; their checkpoints load into one process with every parameter
    and optimizer state as saved (the pipeline stages' union, the tied copy's keys left out)."""
    triples = [triple(spec, f, 4, tmp_path, tag) for tag, spec, f in MIXES]
    run_ranks(run_triples, 4, triples, timeout=600)
    failures = []
    for (tag, spec, _), (straight, _, resumed) in zip(MIXES, triples):
        try:
            check_triple(straight, resumed, tmp_path)
            one_process_reshard(spec, Path(straight.checkpoint.dir) / layout.step_name(STEPS), tmp_path, tag)
        except AssertionError as e:
            failures.append(f"{tag}: {e}")
    assert not failures, "\n".join(failures)


# ---- one process (no process group), in this process ---------------------------------------------
def run_here(triples, device: str = "cpu") -> None:
    """run_triples without a process group: the ranks' fail hook names rank 0, this process."""
    from shardwise.run.dist import local_device
    from shardwise.run.train import FAIL_RANK, FAIL_STEP, train

    dev = local_device(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for straight, cut, resumed in triples:
            train(straight, dev)
            os.environ.update({FAIL_RANK: "0", FAIL_STEP: str(CUT)})
            try:
                with pytest.raises(RuntimeError, match="injected failure"):
                    train(cut, dev)
            finally:
                del os.environ[FAIL_RANK], os.environ[FAIL_STEP]
            train(resumed, dev)
    finally:
        torch.set_num_threads(threads)


def test_resume_is_bit_exact_in_one_process(tmp_path):
    """No process group at all (`shardwise run` with one process): the same guarantee."""
    t = triple(LLAMA, {}, 1, tmp_path, "one")
    run_here([t])
    check_triple(t[0], t[2], tmp_path)


def test_a_step_draws_no_randomness():
    """Why restoring the RNG is a formality today: with dropout 0 (every preset) a training step
    leaves the global RNG where it was; the data is a function of the step, initialization uses its
    own seeded generators. The checkpoint still carries each rank's RNG state for dropout > 0."""
    from shardwise.run.engine import Engine

    eng = Engine(LLAMA, Plan(mbs=2, gbs=4, seq=16, precision="fp32"), device="cpu", seed=0)
    before = torch.get_rng_state()
    eng.train_step(torch.randint(0, LLAMA.vocab, (4, 17), generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.gpu
def test_fp16_loss_scaler_resumes_on_one_gpu(tmp_path):
    """fp16-mixed: the GradScaler's scale and growth tracker are in the checkpoint; without them the
    resumed run would start again at 2^16 and scale (and skip) differently. Not bit-exact here: CUDA's
    attention backward accumulates with atomics, so two runs straight through differ in the last bits
    as well; the losses agree to fp16-mixed's noise (1e-4 relative) and the scaler state exactly."""
    t = triple(LLAMA, dict(precision="fp16-mixed"), 1, tmp_path, "fp16")
    t = tuple(dataclasses.replace(c, train=dataclasses.replace(c.train, device="cuda")) for c in t)
    run_here([t], "cuda")
    ref, got = records(Path(t[0].train.metrics)), records(Path(t[2].train.metrics))
    assert [r["step"] for r in got] == list(range(CUT)) + list(range(CUT, STEPS))
    for a, b in zip(ref[CUT:], got[CUT:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    final = [layout.read_trainer(Path(c.checkpoint.dir) / layout.step_name(STEPS))["scaler"] for c in (t[0], t[2])]
    assert final[0] is not None and final[0]["scale"] > 0
    assert final[0] == final[1]


# ---- the directory: latest, keep, leftovers --------------------------------------------------------
def fake_checkpoint(root: Path, name: str, *, metadata: bool = True, trainer: bool = True) -> Path:
    p = root / name
    p.mkdir(parents=True)
    if metadata:
        (p / layout.DCP_METADATA).write_bytes(b"x")
    if trainer:
        layout.write_trainer(p, {"step": int(name.rsplit("-", 1)[1])})
    return p


def test_latest_skips_half_written_checkpoints(tmp_path):
    """A .tmp-step-* (a save that never finished, however complete it looks), a step-* without DCP's
    metadata (written last) or without the trainer state: none of them is the latest."""
    assert layout.latest(tmp_path) is None and layout.latest(tmp_path / "absent") is None
    fake_checkpoint(tmp_path, "step-000003")
    fake_checkpoint(tmp_path, "step-000010")
    fake_checkpoint(tmp_path, ".tmp-step-000020")
    fake_checkpoint(tmp_path, "step-000030", metadata=False)
    fake_checkpoint(tmp_path, "step-000040", trainer=False)
    (tmp_path / "step-000050").write_text("a file")
    assert layout.latest(tmp_path) == tmp_path / "step-000010"
    assert [s for s, _ in layout.complete(tmp_path)] == [3, 10]
    # "latest" and a checkpoint directory both resolve to the newest complete one
    assert layout.resolve("latest", str(tmp_path), "w") == tmp_path / "step-000010"
    assert layout.resolve(str(tmp_path), "", "w") == tmp_path / "step-000010"
    assert layout.resolve(str(tmp_path / "step-000003"), "", "w") == tmp_path / "step-000003"


def test_keep_deletes_the_oldest_complete_ones(tmp_path):
    for s in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, layout.step_name(s))
    fake_checkpoint(tmp_path, ".tmp-step-000001")
    removed = layout.prune(tmp_path, 2)
    assert [p.name for p in removed] == ["step-000002", "step-000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step-000001", "step-000006", "step-000008"]
    assert layout.prune(tmp_path, 2) == []


def test_commit_renames_and_replaces(tmp_path):
    old = fake_checkpoint(tmp_path, "step-000004")
    (old / "stale").write_text("from an earlier attempt")
    tmp = fake_checkpoint(tmp_path, ".tmp-step-000004")
    layout.commit(tmp, old)
    assert not tmp.exists() and layout.is_complete(old) and not (old / "stale").exists()


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    """A checkpoint whose tensor file was cut short (a full disk, a copy that died): one line naming
    it, not DCP's per-rank traceback."""
    from shardwise.errors import ShardwiseError
    from shardwise.run import checkpoint
    from shardwise.run.engine import Engine

    spec, plan = LLAMA, Plan(mbs=2, gbs=4, seq=16, precision="fp32")
    eng = Engine(spec, plan, device="cpu", seed=0)
    checkpoint.Checkpointer(eng, CheckpointConfig(dir=str(tmp_path)), model=spec, steps=1).save(1)
    path = tmp_path / layout.step_name(1)
    (data,) = path.glob("*.distcp")
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ShardwiseError) as e:
        checkpoint.load(Engine(spec, plan, device="cpu", seed=0), str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: cannot load this checkpoint") and "EOFError" in msg
