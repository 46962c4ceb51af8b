"""Engine: one training step of any Plan, the same arithmetic as single-process training.

The training loop (run/train.py) owns data, schedules, logging; it asks the Engine for
`train_step(tokens)` with this dp rank's slice of the global batch. The Engine splits it into
micro-batches (or hands it to the pipeline schedule), accumulates gradients, clips to a global
norm, steps the optimizer. The loss it returns is the mean token cross-entropy over the whole
global batch, the same number on every rank, and the same number single-process training gets.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardwise.errors import ShardwiseError
from shardwise.run import context as rcontext
from shardwise.run import dist as rdist
from shardwise.run import fp8
from shardwise.run.model import Transformer, build, check_runnable
from shardwise.run.parallelize import check_supported, parallelize, precision, split_pipeline, uses_fsdp
from shardwise.spec.loss import chunked_loss
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan, cp_local

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coef = max_norm / (norm + 1e-6)


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean token cross-entropy over the global batch
    grad_norm: float  # global L2 norm of the gradient, before clipping
    skipped: bool = False  # fp16 only: non-finite gradients, the optimizer step was skipped


@dataclass
class _Param:
    name: str  # as in ModelSpec.param_shapes()
    param: nn.Parameter  # what the optimizer steps (a DTensor, or a local shard/replica)
    norm_weight: float  # 1 / (ranks in this pipeline stage holding the same values); 0: not counted
    tied_copy: bool = False  # the last pipeline stage's copy of a tied embedding


class Engine:
    """Builds the mesh, the model, parallelizes it and makes the optimizer; then trains."""

    def __init__(
        self,
        spec: ModelSpec,
        plan: Plan,
        *,
        device: torch.device | str,
        seed: int,
        optimizer: str | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        grad_clip: float = 1.0,
        mesh=None,
    ):
        check_runnable(spec)
        self.device = torch.device(device)
        if optimizer is not None:  # one source of truth: the plan's field
            plan = plan.replace(optimizer=optimizer)
        self.spec = spec
        rdist.check_world(plan)
        plan = plan.resolve(spec, rdist.world_size())
        # context parallel (run/context.py): the engines run each cp rank's local plan (dp*cp
        # data-parallel ranks, seq/cp tokens) on a mesh whose "dp" is dp x cp; the step shards
        self.plan, self.local = plan, cp_local(plan)
        check_supported(spec, plan, self._supported_on())
        rcontext.check(plan)
        plan = self.local
        if grad_clip is not None and not grad_clip > 0:
            raise ShardwiseError(f"grad_clip must be positive (or None for no clipping), got {grad_clip!r}")
        self.grad_clip = grad_clip
        cp = self.plan.cp > 1
        if mesh is None:
            mesh = rcontext.build_mesh(self.plan, self.device) if cp else rdist.build_mesh(plan, self.device)
        self.mesh = mesh
        # mesh[d]: a flattened dim too (HSDP's dp = dp_replicate x dp_shard, context parallel's dp x cp)
        coord = (lambda d: self.mesh[d].get_local_rank()) if self.mesh is not None else (lambda d: 0)
        self.pp_rank, self.dp_rank, self.tp_rank = coord("pp"), coord("dp_data" if cp else "dp"), coord("tp")
        self.dp_size = self.plan.dp  # the batch's split: the cp ranks of a dp rank read the same sequences
        self.rank = rdist.rank()
        self.is_logging_rank = self.rank == 0
        self.prec = precision(plan)

        # ---- model: split, parallelize, materialize, wrap -------------------------------------
        full = build(spec)  # meta
        parts = split_pipeline(full, plan, self.pp_rank) if plan.pp > 1 else [(0, full)]
        self.n_stages = plan.pp * plan.vpp
        self.stages: list[tuple[int, Transformer, nn.Module]] = []  # (index, module, wrapped module)
        for idx, m in parts:
            self.stages.append((idx, m, parallelize(m, plan, self.mesh, device=self.device, seed=seed)))
        # names now: DDP + TP turns parameters into plain attributes at the first forward
        self.params = self._registry()
        self._tied_pairs = self._tied_embedding_group()

        self.optimizer = self._optimizer(lr, weight_decay, betas, eps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.prec.grad_scaler else None
        self.schedule = self._pipeline_schedule() if plan.pp > 1 else None

    def _supported_on(self) -> torch.device | None:
        """The device the plan is checked against (run/parallelize.check_supported)."""
        return self.device

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """What this rank's optimizer steps, named as in ModelSpec.param_shapes(): DTensors
        (TP, FSDP2), DDP + TP's local shards, or plain tensors (each pipeline stage's own).
        Use this, not module.parameters(): DDP + TP unregisters the module's parameters at the
        first forward."""
        return [(r.name, r.param) for r in self.params]

    # ---- set-up helpers -------------------------------------------------------------------------
    def _registry(self) -> list[_Param]:
        within_stage = self.local.dp * self.local.tp  # ranks that run the same pipeline stage
        out = []
        for idx, m, _ in self.stages:
            for name, p in m.named_parameters():
                tied_copy = self.spec.tied_embeddings and idx != 0 and name == "output.weight"
                # the tied copy's gradient equals the first stage's after the all-reduce: count once
                weight = 0.0 if tied_copy else _shards(p) / within_stage
                out.append(_Param(name, p, weight, tied_copy))
        return out

    def _tied_embedding_group(self):
        """Pipeline + tied embeddings: the first and last stage each hold the embedding matrix;
        their gradients are summed after every backward (Megatron's embedding group), so both
        copies take the same step. Returns (group, param) on those two ranks, else None."""
        if not (self.spec.tied_embeddings and self.local.pp > 1):
            return None
        ranks = self.mesh.mesh  # [pp, dp, tp] global ranks
        mine = None
        for first, last in zip(ranks[0].flatten().tolist(), ranks[-1].flatten().tolist()):
            g = dist.new_group([first, last])  # every rank creates every group, in the same order
            if self.rank in (first, last):
                mine = g
        if mine is None:
            return None
        # rank of stage 0 holds the embedding, rank of the last stage the tied copy (pp > 1: never both)
        param = next(r.param for r in self.params if r.name == "tok_embeddings.weight" or r.tied_copy)
        return mine, param

    def _optimizer(self, lr, weight_decay, betas, eps) -> torch.optim.Optimizer:
        # weight decay on matrices only (nanoGPT): not on norm scales and biases
        decay = [r.param for r in self.params if r.param.ndim >= 2]
        no_decay = [r.param for r in self.params if r.param.ndim < 2]
        groups = [
            g
            for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]
        ]
        name = self.local.optimizer
        if name == "adamw":
            cls, kw = torch.optim.AdamW, dict(lr=lr, betas=betas, eps=eps)
        elif name == "sgd":
            cls, kw = torch.optim.SGD, dict(lr=lr, momentum=0.9)
        elif name == "adafactor":
            cls, kw = torch.optim.Adafactor, dict(lr=lr)
        else:  # check_supported refused the rest
            raise ShardwiseError(f"optimizer {name!r} is not available in `shardwise run`; use adamw, sgd or adafactor")
        kinds = {(type(p).__name__, str(getattr(p, "device_mesh", ""))) for p in decay + no_decay}
        if len(kinds) > 1:
            kw["foreach"] = False  # _foreach kernels take one kind of tensor (plain, or DTensors on one mesh)
        if self.local.zero == 1 and self.local.dp > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            # parameters_as_bucket_view: each owner broadcasts its parameters as one flat bucket after
            # the step, not one call per parameter (52 calls of ~0.4 ms each on gloo for tiny GPT-2)
            return ZeroRedundancyOptimizer(
                groups,
                optimizer_class=cls,
                process_group=self.mesh.get_group("dp"),
                parameters_as_bucket_view=True,
                **kw,
            )
        return cls(groups, **kw)

    def _pipeline_schedule(self):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleDualPipeV,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleInterleavedZeroBubble,
            ScheduleZBVZeroBubble,
        )

        group = self.mesh.get_group("pp")
        stages = [
            PipelineStage(wrapped, idx, self.n_stages, self.device, *self._stage_io(idx), group=group)
            for idx, _, wrapped in self.stages
        ]
        n = self.local.grad_accum
        # scale_grads=False: the loss is divided by the micro-batch count instead (as without PP).
        # The schedule's own scaling walks submod.parameters(), which DDP + TP has emptied.
        multi = {
            "interleaved": ScheduleInterleaved1F1B,
            "interleaved-zb": ScheduleInterleavedZeroBubble,
            "zbv": ScheduleZBVZeroBubble,
            "dualpipev": ScheduleDualPipeV,
        }.get(self.local.schedule)
        if multi is not None:
            return multi(stages, n_microbatches=n, loss_fn=self._pp_loss, scale_grads=False)
        cls = ScheduleGPipe if self.local.schedule == "gpipe" else Schedule1F1B
        return cls(stages[0], n_microbatches=n, loss_fn=self._pp_loss, scale_grads=False)

    def _stage_io(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What stage `idx` receives and sends, as meta tensors. Given up front, the pipeline
        runs in its static mode: no trial forward through the (DDP-wrapped) stage, which would
        leave DDP's reducer expecting a backward that never comes.

        Between stages flows the residual stream [mbs, seq, hidden] (seq/tp with sequence
        parallel) in the dtype it is kept in: fp32 under autocast (embeddings and residual adds
        stay fp32), bf16 under FSDP2 mixed precision or pure bf16. The last stage sends logits."""
        plan, spec, prec = self.local, self.spec, self.prec
        seq = plan.seq // plan.tp if plan.sp else plan.seq
        stream = prec.fsdp_param_dtype or prec.param_dtype
        logits = prec.autocast_dtype or stream

        def act():
            return torch.empty(plan.mbs, seq, spec.hidden, dtype=stream, device="meta", requires_grad=True)

        inp = torch.empty(plan.mbs, plan.seq, dtype=torch.long, device="meta") if idx == 0 else act()
        out = (
            torch.empty(plan.mbs, plan.seq, spec.vocab, dtype=logits, device="meta", requires_grad=True)
            if idx == self.n_stages - 1
            else act()
        )
        return inp, out

    # ---- training ---------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    @staticmethod
    def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def _pp_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self._loss(logits, targets) / self.local.grad_accum
        return loss * self._loss_scale if self.scaler is not None else loss

    def train_step(self, tokens: torch.Tensor) -> StepStats:
        """tokens: [gbs // dp, seq + 1] for this dp rank; inputs [:, :-1], targets [:, 1:]."""
        plan, full = self.local, self.plan
        want = (full.gbs // full.dp, full.seq + 1)
        if tuple(tokens.shape) != want:
            raise ShardwiseError(
                f"train_step wants this dp rank's tokens as {list(want)} (gbs/dp, seq+1), got {list(tokens.shape)}"
            )
        tokens = tokens.to(self.device, non_blocking=True)
        x, y = tokens[:, :-1], tokens[:, 1:]
        self._loss_scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        if self.schedule is not None:
            local_loss = self._pipeline_step(x, y)
        elif full.cp > 1:  # x, y and their positions sharded over the cp ranks in place: own copies
            x, y = x.clone(), y.clone()
            with rcontext.sharded(self.mesh, full, x, y, [m for _, m, _ in self.stages]):
                local_loss = self._accumulate(x, y)
        else:
            local_loss = self._accumulate(x, y)

        _align_grads(self.params)
        if self._tied_pairs is not None:
            group, p = self._tied_pairs
            dist.all_reduce(_local(p.grad), group=group)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

        # one all-reduce for both numbers: the loss (from the ranks that have it, already a
        # mean over their micro-batches, /dp) and the squared gradient norm (each shard once)
        reports = self.holds_last and self.tp_rank == 0
        sq = _weighted_sq_norm(self.params, self.device)
        packed = torch.stack([(local_loss.float() / plan.dp) if reports else torch.zeros((), device=self.device), sq])
        if self.mesh is not None:
            dist.all_reduce(packed)
        loss, sq = self._values(packed)
        grad_norm = math.sqrt(sq)

        skipped = not math.isfinite(grad_norm)
        if self.scaler is not None and skipped:
            # every rank skips together: the norm is global, the scaler's inf check is local
            self.scaler.update(new_scale=self._loss_scale * self.scaler.get_backoff_factor())
        else:
            if self.grad_clip is not None:
                coef = self.grad_clip / (grad_norm + CLIP_EPS)
                if coef < 1.0:
                    for r in self.params:
                        if r.param.grad is not None:
                            r.param.grad.mul_(coef)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            for _, _, wrapped in self.stages:
                fp8.after_step(wrapped, self.local)
        self._clear_grads()
        return StepStats(loss=loss, grad_norm=grad_norm, skipped=skipped and self.scaler is not None)

    def _clear_grads(self) -> None:
        """Under DDP the gradients are views of its buckets (gradient_as_bucket_view): zeroed in
        place, so the next step's micro-batches accumulate into the buckets themselves. Set to None
        instead, each no_sync backward would make fresh .grad tensors that DDP copies into its
        buckets in the synchronizing backward: a second gradient for the whole accumulation.
        Elsewhere .grad = None frees them until the next backward makes them."""
        ddp = self.local.dp > 1 and not uses_fsdp(self.local) and self.schedule is None
        for r in self.params:
            if ddp and r.param.grad is not None:
                r.param.grad.zero_()
            else:
                r.param.grad = None

    def _values(self, packed: torch.Tensor) -> list[float]:
        """The step's reduced numbers as Python floats (the trace tier's tensors hold no values)."""
        return packed.tolist()

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient accumulation over grad_accum micro-batches; each micro-batch loss is scaled by
        1/grad_accum and DDP/FSDP average over dp, so the gradient is the global-batch mean."""
        plan = self.local
        ((_, module, model),) = self.stages
        ga, mbs = plan.grad_accum, plan.mbs
        total = torch.zeros((), device=self.device)
        for i in range(ga):
            last = i == ga - 1
            xi, yi = x[i * mbs : (i + 1) * mbs], y[i * mbs : (i + 1) * mbs]
            with self._sync(module, model, last):
                if chunked_loss(plan):
                    loss = model(xi, yi) / ga  # the model's own chunked loss: no full logits (run/loss.py)
                else:
                    logits = model(xi)
                    loss = self._loss(logits, yi) / ga
                    # let this micro-batch's logits go now, not when the next forward returns and
                    # rebinds them: the next forward's peak would hold them (a batch x seq x vocab tensor)
                    del logits
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
            del loss
        return total

    def _sync(self, module: Transformer, model: nn.Module, last: bool):
        """Gradient communication once per step where the engine contract says so: DDP no_sync and
        ZeRO-2's set_requires_gradient_sync(False) on all but the last micro-batch. ZeRO-3
        reduce-scatters every micro-batch (its gradients stay sharded)."""
        if self.local.dp == 1:
            return contextlib.nullcontext()
        if uses_fsdp(self.local):
            if self.local.zero == 2:
                module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else model.no_sync()

    @property
    def holds_last(self) -> bool:
        """This rank runs the last stage (the loss): pp rank p-1, or rank 0 under a V schedule."""
        return any(idx == self.n_stages - 1 for idx, _, _ in self.stages)

    def _pipeline_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        first = self.pp_rank == 0
        last = self.holds_last
        losses: list[torch.Tensor] = []
        args = (x,) if first else ()
        # autocast once per step (torchtitan's pipeline path): the stages' own autocast nests inside
        # it, so its cache holds one low-precision cast of each weight for every micro-batch in
        # flight, not one per micro-batch (estimate/memory/ddp.py)
        amp = self.prec.autocast_dtype
        with torch.autocast(self.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            self.schedule.step(*args, target=y if last else None, losses=losses if last else None, return_outputs=False)
        if not last:
            return torch.zeros((), device=self.device)
        # each is a micro-batch mean / grad_accum (equal token counts): their sum is the mean
        return torch.stack([x.detach().float() for x in losses]).sum() / self._loss_scale

    # ---- export -------------------------------------------------------------------------------
    @torch.no_grad()
    def state_dict_full(self) -> dict[str, torch.Tensor]:
        """Every parameter, unsharded, on every rank (CPU), named and ordered as
        ModelSpec.param_shapes(). Collective: every rank must call it."""
        mine: dict[str, torch.Tensor] = {}
        for r in self.params:
            full = _full(r.param)  # collective for sharded parameters: call on every rank
            if not r.tied_copy:
                mine[r.name] = full.detach().cpu().clone()
        if self.local.pp > 1:
            parts: list[dict] = [None] * self.local.pp  # type: ignore[list-item]
            dist.all_gather_object(parts, mine, group=self.mesh.get_group("pp"))
            for p in parts:
                mine.update(p)
        return {name: mine[name] for name, _ in self.spec.param_shapes()}


# ---- tensor helpers -----------------------------------------------------------------------------
def sharding_spec(p: torch.Tensor):
    """(mesh, placements, shape, stride) of a sharded parameter: a DTensor's own, or the spec that
    DDP's DDP+TP path leaves on the local shard it swapped in (`_st_info`); None if plain."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        return p.device_mesh, p.placements, p.shape, p.stride()
    info = getattr(p, "_st_info", None)
    if info is not None:
        return info.mesh, info.placements, info.shape, info.stride
    return None


def _shards(p: torch.Tensor) -> int:
    """Into how many distinct pieces the parameter is cut (1 if every rank has all of it)."""
    spec = sharding_spec(p)
    if spec is None:
        return 1
    mesh, placements = spec[0], spec[1]
    n = 1
    for i, pl in enumerate(placements):
        # Shard, or FSDP-over-TP's _StridedShard (not a Shard subclass): anything but a copy
        if not (pl.is_replicate() or pl.is_partial()):
            n *= mesh.size(i)
    return n


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    spec = sharding_spec(p)
    if spec is None:
        return p
    if isinstance(p, DTensor):
        return p.full_tensor()
    mesh, placements, shape, stride = spec
    return DTensor.from_local(p, mesh, placements, shape=shape, stride=stride, run_check=False).full_tensor()


def _align_grads(params: list[_Param]) -> None:
    """Give every DTensor gradient its parameter's layout. DTensor's rule for the embedding
    backward under vocab-parallel TP returns the whole table's gradient Replicate on every tp
    rank; the optimizer and the norm want this rank's shard only (Replicate -> Shard is a local
    slice, no communication)."""
    from torch.distributed.tensor import DTensor

    for r in params:
        p, g = r.param, r.param.grad
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


def _weighted_sq_norm(params: list[_Param], device: torch.device) -> torch.Tensor:
    """This rank's share of the global squared gradient norm: each local piece's squared norm
    times 1/(copies of it in the stage), so summing over all ranks counts every value once."""
    total = torch.zeros((), device=device, dtype=torch.float32)
    for r in params:
        if r.param.grad is None or r.norm_weight == 0.0:
            continue
        g = _local(r.param.grad)  # on the CPU under --offload params
        total += torch.linalg.vector_norm(g, dtype=torch.float32).square().to(device) * r.norm_weight
    return total
