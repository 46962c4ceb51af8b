"""Checkpoints of `shardwise run` on PyTorch Distributed Checkpoint (DCP): save, resume, reshard.

What a checkpoint holds (layout: run/checkpoint_dir.py):
- every parameter and optimizer state, under the parameter's name in ModelSpec.param_shapes(), taken
  with DCP's get_state_dict (flattened optimizer state: "state.NAME.exp_avg", "param_groups.NAME.lr")
  and written by dcp.save. Sharded tensors go in as DTensors, so DCP records which slice each rank
  holds and any other plan can read back the slices it needs: that is the resharding.
- trainer.json: the number of finished steps (the data position and the LR schedule are functions of
  it), every rank's RNG states, the fp16 loss scaler, the plan and model it was saved under.

The Engine's modules cannot be handed to get_state_dict as they are: a rank may run several pipeline
stages (one optimizer over all of them), DDP + TP swaps the module's parameters for plain local shards,
and ZeroRedundancyOptimizer is not an optimizer get_state_dict knows. So the state dict is taken from
a module built for it (`_holder`): the Engine's own parameter objects registered under their global
names, with the optimizer that steps them (ZeRO-1: its local optimizer, which holds the states of the
parameters this rank owns; DCP's union over ranks is the whole optimizer).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import shutil
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from shardwise.errors import ShardwiseError
from shardwise.run import checkpoint_dir as layout
from shardwise.run import dist as rdist
from shardwise.run.config import CheckpointConfig
from shardwise.run.engine import Engine, sharding_spec

# flattened optimizer state: one key per parameter, so each pipeline stage (and each ZeRO-1 owner)
# contributes only its own parameters' entries (torchtitan does the same for PP)
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
TIED = "output.weight"  # the last pipeline stage's copy of a tied embedding
EMBEDDING = "tok_embeddings.weight"


# ---- the state dict -------------------------------------------------------------------------
def _holder(engine: Engine) -> nn.Module:
    """A module whose parameters are exactly the Engine's (the same objects the optimizer steps),
    named as in ModelSpec.param_shapes()."""
    root = nn.Module()
    for name, p in engine.named_parameters():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if part not in m._modules:
                m._modules[part] = nn.Module()
            m = m._modules[part]
        m._parameters[leaf] = p  # DDP + TP's local shards are plain tensors: register_parameter would refuse
    return root


def _optimizer(engine: Engine) -> torch.optim.Optimizer:
    """ZeRO-1 (the Engine's ZeroRedundancyOptimizer, on the same condition): its local optimizer."""
    plan = engine.plan
    return engine.optimizer.optim if plan.zero == 1 and plan.dp > 1 else engine.optimizer


def _name_of(key: str) -> str:
    """The parameter a flattened key belongs to: "state.layers.0.wq.weight.exp_avg" -> "layers.0.wq.weight"."""
    for head in ("state.", "param_groups."):
        if key.startswith(head):
            return key[len(head) :].rsplit(".", 1)[0]
    return key


def _dcp_view(engine: Engine, flat: dict, saving: bool) -> tuple[dict, dict]:
    """What goes to DCP: (state, aliases). Local shards of DDP + TP become the DTensors they are
    (sharing storage, so a load fills them in place). The tied copy of the embedding is not saved
    and is loaded from the embedding's keys: its values and states are the embedding's (the two
    copies take the same step from the same summed gradient), and a plan without pipeline stages
    has no copy at all. aliases: DCP key -> the key in `flat`."""
    from torch.distributed.tensor import DTensor

    tied = {r.name for r in engine.params if r.tied_copy}
    params = dict(engine.named_parameters())
    out, alias = {}, {}
    for key, v in flat.items():
        name = _name_of(key)
        if name in tied and saving:
            continue
        key_out = key.replace(TIED, EMBEDDING, 1) if name in tied else key
        p = params.get(name)
        spec = sharding_spec(p) if p is not None and not isinstance(p, DTensor) else None
        if spec is not None and isinstance(v, torch.Tensor) and v.shape == p.shape and v.ndim > 0:
            mesh, placements, shape, stride = spec
            v = DTensor.from_local(v, mesh, placements, shape=shape, stride=stride, run_check=False)
        out[key_out] = v
        alias[key_out] = key
    return out, alias


@contextlib.contextmanager
def _nonempty_groups(opt: torch.optim.Optimizer):
    """ZeRO-1's local optimizer keeps one group per group of the model, empty where this rank owns
    none of its parameters; the flattened state dict names a group by its first parameter and fails
    on an empty one. Hidden while the state dict is taken or set; the list keeps its length after
    (ZeroRedundancyOptimizer syncs its groups into the local ones by position)."""
    groups = opt.param_groups
    kept = [g for g in groups if g["params"]]
    opt.param_groups = kept
    try:
        yield bool(kept)
    finally:
        new = iter(opt.param_groups)  # load_state_dict puts new group dicts in place of the kept ones
        opt.param_groups = [next(new) if g["params"] else g for g in groups]


def _state(engine: Engine) -> tuple[nn.Module, torch.optim.Optimizer, dict, dict]:
    holder, opt = _holder(engine), _optimizer(engine)
    with _nonempty_groups(opt) as any_params:
        model_sd, optim_sd = get_state_dict(holder, opt if any_params else [], options=OPTIONS)
    return holder, opt, model_sd, optim_sd


def _rng_states(device: torch.device) -> dict:
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    out = {"cpu": b64(torch.get_rng_state())}
    if device.type == "cuda":
        out["cuda"] = b64(torch.cuda.get_rng_state(device))
    return out


def _set_rng_states(states: dict, device: torch.device) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(states["cpu"]))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(tensor(states["cuda"]), device)


def _single() -> bool:
    """One process, no process group: DCP is told so. It warns that it assumes as much all the same,
    also from async_save's thread, where a catch_warnings around the call does not reach: this one
    message is filtered for the process (re-added at each call: filterwarnings does not duplicate it,
    and a caller may have reset the filters, as pytest does per test)."""
    warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent")
    return rdist.world_size() == 1


def _barrier() -> None:
    if rdist.world_size() > 1:
        dist.barrier()


# ---- saving ---------------------------------------------------------------------------------
class Checkpointer:
    """Saves during training: every `every` steps and after the last, atomically, keeping the newest
    `keep`. Every rank calls every method at the same steps (they are collective)."""

    def __init__(self, engine: Engine, cfg: CheckpointConfig, *, model, steps: int, timeout_s: float = 300.0):
        self.engine, self.cfg, self.model, self.steps = engine, cfg, model, steps
        self.timeout_s = timeout_s
        self.root = cfg.dir
        self.pending = None  # (future, step) of an async save not yet committed
        self.saved: int | None = None  # the last step saved
        # async: DCP's background thread runs its own collectives; on the training's process group
        # they would interleave with the step's, in no agreed order. A group of its own (gloo: DCP's
        # async collectives run on the CPU)
        self.group = None
        if cfg.async_save and rdist.world_size() > 1:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def after_step(self, done: int) -> None:
        """`done` steps are finished. Commit an async save started one step ago; save if due."""
        self.commit()
        if self.cfg.every and done % self.cfg.every == 0 and done < self.steps:
            self.save(done)

    def finish(self, done: int) -> None:
        """After the last step: its checkpoint (unless just saved), committed before returning."""
        self.commit()
        if self.saved != done:
            self.save(done)
        self.commit()

    def save(self, step: int) -> None:
        engine = self.engine
        tmp = layout.tmp_path(self.root, step)
        if engine.rank == 0:  # a leftover from a crash at this step: start clean
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        _, _, model_sd, optim_sd = _state(engine)
        state, _ = _dcp_view(engine, {**model_sd, **optim_sd}, saving=True)
        trainer = self._trainer_state(step)
        if self.cfg.async_save:
            # DCP stages (copies) the tensors before it returns: training may change them meanwhile
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group, no_dist=_single())
            self.pending = (future, step, trainer)
        else:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=_single())
            self.pending = (None, step, trainer)
            self.commit()
        self.saved = step

    def abandon(self) -> None:
        """Training failed: let an async save in flight finish writing its .tmp- directory (a later
        run may reuse that name), but never commit it: the other ranks may not have written theirs."""
        if self.pending is not None and self.pending[0] is not None:
            with contextlib.suppress(Exception):  # the failure being raised is the one to report
                self.pending[0].result(timeout=self.timeout_s)
        self.pending = None

    def commit(self) -> None:
        """Wait for the files, then every rank has written its part (barrier): rank 0 adds the
        trainer state, renames .tmp-step-N to step-N and prunes the oldest."""
        if self.pending is None:
            return
        future, step, trainer = self.pending
        self.pending = None
        if future is not None:
            future.result()
        _barrier()
        if self.engine.rank == 0:
            tmp = layout.tmp_path(self.root, step)
            layout.write_trainer(tmp, trainer)
            layout.commit(tmp, tmp.parent / layout.step_name(step))
            layout.prune(self.root, self.cfg.keep)
        _barrier()  # when this returns, the checkpoint is there for every rank to read

    def _trainer_state(self, step: int) -> dict:
        engine = self.engine
        rng = _rng_states(engine.device)
        ranks = [rng]
        if rdist.world_size() > 1:
            ranks = [None] * rdist.world_size()
            dist.all_gather_object(ranks, rng)
        return {
            "step": step,  # finished steps: the next runs step index `step`, on the data of that step
            "rng": ranks,  # by global rank
            "scaler": engine.scaler.state_dict() if engine.scaler is not None else None,
            "plan": dataclasses.asdict(engine.plan),
            "plan_short": engine.plan.short(),
            "optimizer": engine.plan.optimizer,
            "model": self.model.name,
            "spec": dataclasses.asdict(self.model),  # what export-hf needs to name and shape the tensors
            "param_shapes": {name: list(s) for name, s in self.model.param_shapes()},
        }


# ---- loading --------------------------------------------------------------------------------
def load(engine: Engine, path: str) -> dict:
    """Fill the Engine's parameters and optimizer states from a checkpoint saved under any plan;
    restore RNG and loss-scaler state; return the trainer state (its "step": steps already done).
    Collective: every rank calls it, after the Engine is built and before the first step."""
    state = layout.read_trainer(path)
    holder, opt, model_sd, optim_sd = _state(engine)  # the templates: this plan's shapes and slices
    flat = {**model_sd, **optim_sd}
    view, alias = _dcp_view(engine, flat, saving=False)
    try:
        dcp.load(view, checkpoint_id=str(path), no_dist=_single())
    except (Exception, CheckpointException) as e:  # a BaseException, holding every failed rank's (error, traceback)
        why = next(iter(e.failures.values()), e) if isinstance(e, CheckpointException) else e
        why = why[0] if isinstance(why, tuple) else why
        text = " ".join(f"{type(why).__name__} {why}".split())
        raise ShardwiseError(f"{path}: cannot load this checkpoint ({text}); resume from another one") from None
    from torch.distributed.tensor import DTensor

    for key_out, v in view.items():
        key = alias[key_out]
        if isinstance(v, DTensor) and not isinstance(flat[key], DTensor):
            continue  # a DDP + TP local shard, filled in place through the DTensor around it
        # tensors were filled in place (the same objects); plain values (lr, betas) were replaced
        (model_sd if key in model_sd else optim_sd)[key] = v
    with _nonempty_groups(opt) as any_params:
        set_state_dict(
            holder, opt if any_params else [], model_state_dict=model_sd, optim_state_dict=optim_sd, options=OPTIONS
        )

    rng = state["rng"]
    if len(rng) == rdist.world_size():
        _set_rng_states(rng[engine.rank], engine.device)
    elif engine.spec.dropout > 0 and engine.rank == 0:
        # the only randomness a step draws is dropout's; with another rank count its streams do not map
        print(
            f"note: {path} was saved by {len(rng)} ranks, this run has {rdist.world_size()}: dropout masks are "
            "drawn afresh (the run continues, not bit-exactly)"
        )
    if engine.scaler is not None and state.get("scaler"):
        engine.scaler.load_state_dict(state["scaler"])
    return state
