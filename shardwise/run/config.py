"""The `shardwise run` configuration: one TOML file, six tables, every field overridable.

    [model]  preset = "llama-2-7b" (or path = "config.json", or neither: full dimensions),
             plus any ModelSpec field as an override (layers, hidden, heads, kv_heads, vocab, ...)
    [plan]   exactly the Plan fields (dp, tp, pp, zero, mbs, gbs, seq, schedule, ...)
    [data]   source = "synthetic" | "tokens" | "text", path, seed, branch
    [optim]  lr, min_lr, warmup_steps, weight_decay, betas, grad_clip
    [train]  steps, seed, log_every, metrics, device, nproc, timeout_s
    [checkpoint]  dir, every, keep, async_save, resume

The model becomes a ModelSpec and the plan a resolved Plan: the same objects `shardwise estimate`
uses, never a second description. Every mistake is one ShardwiseError line naming where the
value came from (file, table and field, or the command-line flag) and what to do. Relative paths
in the file are relative to the file; on the command line, to the working directory.
This module imports no torch: a config is checked before anything heavy starts.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from shardwise import paths
from shardwise.errors import ShardwiseError, closest
from shardwise.run import checkpoint_dir
from shardwise.run.data import open_source
from shardwise.spec.model import ModelSpec, spec_from_dict
from shardwise.spec.plan import Plan
from shardwise.spec.presets import load_model

SOURCES = ("synthetic", "tokens", "text")
DEVICES = ("auto", "cpu", "cuda")
MAX_NODES = 1 << 14  # nodes of one job: limits.GPUS over 8 GPUs per node
MAX_RESTARTS = 1000


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"
    path: str = ""  # the token or text file (tokens, text)
    seed: int = 0  # the data stream: which windows / which Markov samples, per step
    branch: int = 4  # synthetic: successors per token (lower -> lower entropy floor)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr: float | None = None  # the cosine's floor; None -> lr / 10 (nanoGPT's rule)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 -> no clipping

    def lr_at(self, step: int, steps: int) -> float:
        """Linear warmup to lr over warmup_steps, then a cosine from lr down to min_lr that lands
        on min_lr at the last step (steps - 1). Steps count from 0; a run too short for any decay
        stays at lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = steps - 1 - self.warmup_steps
        ratio = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 0.0
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - self.min_lr)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 50
    seed: int = 0  # model initialization (and anything else random in the engine)
    log_every: int = 10  # a progress line every this many steps
    metrics: str = ""  # JSON-lines file, one line per step; "" -> none
    device: str = "auto"  # auto -> cuda when available, else cpu
    nproc: int = 0  # processes; 0 -> dp*tp*pp (dp taken as 1 when the plan leaves it out)
    timeout_s: float = 300.0  # process-group start and every collective; a stuck rank fails, not hangs
    measure: str = ""  # JSON file for every rank's Measurement (run/measure.py, `shardwise check`); "" -> none
    # several machines: one `shardwise run` per node, nproc ranks each, meeting at rdzv_endpoint (torchrun's c10d)
    nnodes: int = 1
    rdzv_endpoint: str = ""  # HOST:PORT of the rendezvous (any node's address), the same on every node
    max_restarts: int = 0  # after a rank dies: restart every rank from the latest checkpoint, this many times


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""  # where checkpoints go (DIR/step-000150/); "" -> none
    every: int = 0  # a checkpoint every this many steps; 0 -> only after the last step (when dir is set)
    keep: int = 2  # the newest this many complete checkpoints stay, older ones are deleted
    async_save: bool = False  # DCP's async_save: training goes on while the files are written
    resume: str = ""  # "" -> start at step 0; "latest" -> the newest complete one in dir; or a checkpoint path


@dataclass(frozen=True)
class RunConfig:
    model: ModelSpec
    plan: Plan  # resolved: dp and gbs filled, every rule checked against train.nproc
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    path: str = ""  # the TOML file it came from
    checkpoint: CheckpointConfig = CheckpointConfig()  # resume: resolved to the checkpoint's path

    def to_dict(self) -> dict:
        """Plain JSON-able form, handed to the worker processes; `from_dict` inverts it."""
        return {
            "model": dataclasses.asdict(self.model),
            "plan": dataclasses.asdict(self.plan),
            "data": dataclasses.asdict(self.data),
            "optim": dataclasses.asdict(self.optim),
            "train": dataclasses.asdict(self.train),
            "path": self.path,
            "checkpoint": dataclasses.asdict(self.checkpoint),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        optim = dict(d["optim"], betas=tuple(d["optim"]["betas"]))
        return cls(
            ModelSpec(**d["model"]),
            Plan(**d["plan"]),
            DataConfig(**d["data"]),
            OptimConfig(**optim),
            TrainConfig(**d["train"]),
            d.get("path", ""),
            CheckpointConfig(**d.get("checkpoint", {})),
        )


TABLES = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "checkpoint": CheckpointConfig}
MODEL_SOURCE_KEYS = ("preset", "path")
# ModelSpec fields a user may set; the rest are bookkeeping of the catalog
MODEL_FIELDS = tuple(
    f.name for f in dataclasses.fields(ModelSpec) if f.name not in ("estimated", "published_params", "source")
)
PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(Plan))
ALL_TABLES = ("model", "plan", *TABLES)


def fields_of(table: str) -> tuple[str, ...]:
    if table == "model":
        return MODEL_SOURCE_KEYS + MODEL_FIELDS
    if table == "plan":
        return PLAN_FIELDS
    return tuple(f.name for f in dataclasses.fields(TABLES[table]))


def _types(table: str) -> dict[str, object]:
    cls = {"model": ModelSpec, "plan": Plan, **TABLES}[table]
    hints = typing.get_type_hints(cls)
    if table == "model":
        hints |= {"preset": str, "path": str}
    return hints


# ---- loading ------------------------------------------------------------------------------
Overrides = dict[tuple[str, str], tuple[object, str]]  # (table, field) -> (value, where it came from)


def parse_set(item: str) -> tuple[tuple[str, str], object]:
    """`plan.tp=2` -> (("plan", "tp"), 2). The value is read as TOML (numbers, true/false,
    [lists], "strings"); anything that is not valid TOML is taken as a bare string."""
    key, eq, text = item.partition("=")
    table, dot, name = key.strip().partition(".")
    if not eq or not dot or not name:
        raise ShardwiseError(f"--set {item!r}: write TABLE.FIELD=VALUE, e.g. --set plan.tp=2")
    table, name = table.strip(), name.strip()
    if table not in ALL_TABLES:
        raise ShardwiseError(f"--set {item!r}: unknown table {table!r}; {closest(table, ALL_TABLES)}")
    if name not in fields_of(table):
        raise ShardwiseError(f"--set {item!r}: [{table}] has no field {name!r}; {closest(name, fields_of(table))}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return (table, name), value


def read_toml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ShardwiseError(
            f"config file {path!r} does not exist; give the path of a run TOML (see examples/tiny-llama.toml)"
        )
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ShardwiseError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise ShardwiseError(f"{path}: not a UTF-8 text file; give a TOML run config") from None


def load(path: str, overrides: Overrides | None = None, world: int | None = None) -> RunConfig:
    """Read, merge the command-line overrides, check every field, build ModelSpec and Plan.

    world: the process count when already running under torchrun (its WORLD_SIZE); None when
    shardwise launches the processes itself, from [train] nproc or the plan."""
    raw = read_toml(path)
    base = Path(path).parent
    values: dict[str, dict[str, object]] = {t: {} for t in ALL_TABLES}
    origin: dict[tuple[str, str], str] = {}
    for table, body in raw.items():
        if table not in ALL_TABLES:
            raise ShardwiseError(f"{path}: unknown table [{table}]; {closest(table, ALL_TABLES)}")
        if not isinstance(body, dict):
            raise ShardwiseError(f"{path}: {table!r} must be a table ([{table}]), not a single value")
        for name, v in body.items():
            if name not in fields_of(table):
                raise ShardwiseError(f"{path} [{table}]: unknown field {name!r}; {closest(name, fields_of(table))}")
            if name in ("path", "metrics", "measure", "dir", "resume") and isinstance(v, str) and v and v != "latest":
                v = _relative_to(base, v)
            values[table][name] = v
            origin[(table, name)] = f"{path} [{table}] {name}"
    for (table, name), (v, where) in (overrides or {}).items():
        values[table][name] = v
        origin[(table, name)] = where
    for table in ALL_TABLES:
        hints = _types(table)
        for name, v in values[table].items():
            values[table][name] = _coerce(v, hints[name], origin[(table, name)])

    def where(table: str, name: str) -> str:
        return origin.get((table, name), f"{path} [{table}] {name}")

    data = _section(DataConfig, values["data"], where)
    optim = _section(OptimConfig, values["optim"], where)
    train = _section(TrainConfig, values["train"], where)
    model = _model(values["model"], path, where)
    if world is not None and train.nnodes > 1:
        raise ShardwiseError(
            f"{where('train', 'nnodes')}: under torchrun the nodes are torchrun's (its --nnodes); drop --nnodes"
        )
    per_node = train.nproc
    if train.nnodes > 1 and per_node == 0:  # from the plan: its processes spread evenly over the nodes
        total = (values["plan"].get("dp") or 1) * values["plan"].get("tp", 1) * values["plan"].get("pp", 1)
        _need(
            isinstance(total, int) and total % train.nnodes == 0,
            where("train", "nnodes"),
            f"the plan's {total} processes do not spread evenly over {train.nnodes} nodes; give --nproc per node",
        )
        per_node = total // train.nnodes
    plan, nproc = _plan(values["plan"], model, per_node * train.nnodes, world, path, where)
    if data.source == "synthetic" and data.branch > model.vocab:
        raise ShardwiseError(
            f"{where('data', 'branch')}: {data.branch} successors per token but the vocab is "
            f"{model.vocab}; use a branch below the vocab"
        )
    if data.source != "synthetic":  # the file exists, is long enough, holds tokens below the vocab
        open_source(data, model, plan)
    ckpt = _checkpoint(_section(CheckpointConfig, values["checkpoint"], where), model, plan, train, where)
    _restarts(train, ckpt, where)
    train = dataclasses.replace(train, nproc=nproc // train.nnodes)  # processes on this machine
    return RunConfig(model, plan, data, optim, train, str(path), ckpt)


def _endpoint_ok(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _restarts(train: TrainConfig, ckpt: CheckpointConfig, where) -> None:
    """A restart continues from the latest checkpoint: without a checkpoint directory it could only
    start over at step 0, which is never what a restart is for."""
    _need(
        train.max_restarts == 0 or bool(ckpt.dir),
        where("train", "max_restarts"),
        "a restart resumes from the latest checkpoint: set --checkpoint-dir (and --checkpoint-every N)",
    )


def _relative_to(base: Path, p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else base / q)


def _coerce(v, typ, where: str):
    """Check a TOML value against a dataclass field type; ints are accepted for floats."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):  # float | None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is tuple:
        if not isinstance(v, (list, tuple)) or len(v) != len(args):
            raise ShardwiseError(f"{where}: expected a list of {len(args)} numbers, got {v!r}")
        return tuple(_coerce(x, a, where) for x, a in zip(v, args))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if typ is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if typ is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if typ in (str, bool) and isinstance(v, typ):
        return v
    raise ShardwiseError(f"{where}: expected {names.get(typ, typ)}, got {v!r} ({type(v).__name__})")


def _section(cls, vals: dict, where):
    c = cls(**vals)
    if cls is DataConfig:
        _need(
            c.source in SOURCES,
            where("data", "source"),
            f"unknown source {c.source!r}; {closest(c.source, SOURCES)} (one of {', '.join(SOURCES)})",
        )
        if c.source == "synthetic":
            _need(
                not c.path,
                where("data", "path"),
                'the synthetic source reads no file; drop path, or set source = "tokens" (uint16 .bin) or "text"',
            )
        else:
            _need(
                bool(c.path),
                where("data", "path"),
                f"source {c.source!r} needs a file: set path (relative to the config file)",
            )
        _need(c.branch >= 2, where("data", "branch"), f"must be at least 2, got {c.branch}")
        _need(c.seed >= 0, where("data", "seed"), f"must be a non-negative integer, got {c.seed}")
    elif cls is OptimConfig:
        _need(c.lr > 0 and math.isfinite(c.lr), where("optim", "lr"), f"must be a positive number, got {c.lr}")
        if c.min_lr is None:
            c = dataclasses.replace(c, min_lr=c.lr / 10)
        _need(0 <= c.min_lr <= c.lr, where("optim", "min_lr"), f"must be between 0 and lr = {c.lr}, got {c.min_lr}")
        _need(c.warmup_steps >= 0, where("optim", "warmup_steps"), f"must not be negative, got {c.warmup_steps}")
        _need(c.weight_decay >= 0, where("optim", "weight_decay"), f"must not be negative, got {c.weight_decay}")
        _need(all(0 <= b < 1 for b in c.betas), where("optim", "betas"), f"each must be in [0, 1), got {c.betas}")
        _need(
            c.grad_clip >= 0 and not math.isnan(c.grad_clip),
            where("optim", "grad_clip"),
            f"must be >= 0 (0 turns clipping off), got {c.grad_clip}",
        )
    elif cls is TrainConfig:
        for f in ("steps", "log_every"):
            _need(getattr(c, f) >= 1, where("train", f), f"must be a positive integer, got {getattr(c, f)}")
        _need(c.seed >= 0, where("train", "seed"), f"must be a non-negative integer, got {c.seed}")
        _need(c.nproc >= 0, where("train", "nproc"), f"must be a positive integer (0: from the plan), got {c.nproc}")
        _need(
            c.device in DEVICES,
            where("train", "device"),
            f"unknown device {c.device!r}; {closest(c.device, DEVICES)} (one of {', '.join(DEVICES)})",
        )
        _need(c.timeout_s > 0, where("train", "timeout_s"), f"must be a positive number of seconds, got {c.timeout_s}")
        if c.metrics:  # an output path is checked before the work
            paths.check_output_file(c.metrics, where("train", "metrics"))
        _need(1 <= c.nnodes <= MAX_NODES, where("train", "nnodes"), f"must be from 1 to {MAX_NODES}, got {c.nnodes}")
        _need(
            0 <= c.max_restarts <= MAX_RESTARTS,
            where("train", "max_restarts"),
            f"must be from 0 to {MAX_RESTARTS}, got {c.max_restarts}",
        )
        _need(
            c.nnodes == 1 or _endpoint_ok(c.rdzv_endpoint),
            where("train", "rdzv_endpoint"),
            f"{c.nnodes} nodes meet at a rendezvous: give --rdzv-endpoint HOST:PORT (the same on every node), "
            f"got {c.rdzv_endpoint!r}",
        )
    elif cls is CheckpointConfig:
        _need(c.every >= 0, where("checkpoint", "every"), f"must be >= 0 (0: only after the last step), got {c.every}")
        _need(c.keep >= 1, where("checkpoint", "keep"), f"must be a positive integer, got {c.keep}")
        for f, set_ in (("every", c.every > 0), ("async_save", c.async_save)):
            _need(
                bool(c.dir) or not set_,
                where("checkpoint", f),
                "saves checkpoints, but there is no checkpoint directory: set --checkpoint-dir (checkpoint.dir)",
            )
        if c.dir:  # an output path is checked before the work
            paths.check_output_dir(c.dir, where("checkpoint", "dir"))
    return c


def _checkpoint(c: CheckpointConfig, model: ModelSpec, plan: Plan, train: TrainConfig, where) -> CheckpointConfig:
    """Resolve what a resume names, and refuse, before any process starts, a checkpoint this run
    cannot continue from. Another plan is fine (the checkpoint is resharded); another model or
    optimizer is not (their tensors would not fit)."""
    if not c.resume:
        return c
    at = where("checkpoint", "resume")
    found = checkpoint_dir.resolve(c.resume, c.dir, at)
    state = checkpoint_dir.read_trainer(found)
    shapes = {name: list(s) for name, s in model.param_shapes()}
    if state["param_shapes"] != shapes:
        diff = sorted(set(shapes).symmetric_difference(state["param_shapes"])) or [
            k for k in shapes if shapes[k] != state["param_shapes"][k]
        ]
        raise ShardwiseError(
            f"{at}: {found} holds another model (first difference: {diff[0]}); resume with the [model] it was saved with"
        )
    if state["optimizer"] != plan.optimizer:
        raise ShardwiseError(
            f"{at}: {found} holds {state['optimizer']} states but the plan trains with {plan.optimizer}; "
            f"set --optimizer {state['optimizer']}"
        )
    if state["step"] >= train.steps:
        raise ShardwiseError(
            f"{at}: {found} is at step {state['step']}, the run ends at step {train.steps}; raise --steps to train on"
        )
    return dataclasses.replace(c, resume=str(found))


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ShardwiseError(f"{where}: {what}")


def _model(vals: dict, path: str, where) -> ModelSpec:
    vals = dict(vals)
    preset, file = vals.pop("preset", None), vals.pop("path", None)
    if preset and file:
        raise ShardwiseError(f"{where('model', 'path')}: give preset or path, not both")
    try:
        if preset or file:
            base = load_model(preset or file)
            if not vals:
                return base
            vals.setdefault("name", f"{base.name}-scaled")
            changed = ", ".join(f"{k}={v}" for k, v in vals.items() if k != "name")
            return base.scaled(**vals, source=f"{base.name} with {changed}")
        missing = [f for f in ("layers", "hidden", "heads", "vocab") if f not in vals]
        if missing:
            raise ShardwiseError(
                f'{path} [model]: give preset = "NAME" (see `shardwise models`), path = '
                f'"config.json", or every dimension (missing {", ".join(missing)})'
            )
        return spec_from_dict({"name": "custom", **vals}, f"{path} [model]")
    except ShardwiseError as e:
        msg = str(e)
        raise ShardwiseError(msg if msg.startswith(str(path)) else f"{path} [model]: {msg}") from None


def _plan(vals: dict, model: ModelSpec, nproc: int, world: int | None, path: str, where) -> tuple[Plan, int]:
    if world is not None:
        if nproc and nproc != world:
            raise ShardwiseError(
                f"{where('train', 'nproc')}: asks for {nproc} processes but torchrun started "
                f"{world}; drop --nproc under torchrun (the world size comes from torchrun)"
            )
        nproc = world
    p = Plan(**vals)
    for f in ("dp", "tp", "pp", "cp"):
        v = getattr(p, f)
        if not isinstance(v, int) or v < (0 if f == "dp" else 1):
            raise ShardwiseError(f"{where('plan', f)}: must be a positive integer, got {v!r}")
    split = p.tp * p.pp * p.cp  # the model-parallel ranks; dp is the rest
    names, values = ("tp*pp*cp", f"{p.tp}*{p.pp}*{p.cp}") if p.cp > 1 else ("tp*pp", f"{p.tp}*{p.pp}")
    if nproc == 0:
        nproc = (p.dp or 1) * split
    if p.dp and p.dp * split != nproc:
        src = "torchrun's world size" if world is not None else "--nproc / [train] nproc"
        raise ShardwiseError(
            f"{path} [plan]: dp*{names} = {p.dp}*{values} = {p.dp * split} but there "
            f"are {nproc} processes ({src}); leave dp out to derive it, or make the product {nproc}"
        )
    if split > nproc or nproc % split:
        raise ShardwiseError(
            f"{path} [plan]: {names} = {values} = {split} does not divide the "
            f"{nproc} processes; make nproc a multiple of {names}"
        )
    try:
        return p.resolve(model, nproc), nproc
    except ShardwiseError as e:
        raise ShardwiseError(f"{path} [plan]: {e}") from None
