"""The reference model's parameters as the engines split them: each parameter's shape and how
tensor parallelism cuts it (Param, local_shape), the groups a rank's sums run over (embeddings,
one block, the head, a pipelined tied output: groups), which of them a pipeline rank holds
(Stage, stage_of), and one rank's parameters in registration order (stage_params, for
ZeroRedundancyOptimizer's partition, zero1.py). Every profile's memory is summed over these.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from shardwise.estimate._num import ceil_div, maximum, where


@dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]
    tp_dim: int | None  # the dim tensor parallelism splits (engine contract item 7); None: replicated
    uneven: bool  # split like torch.chunk (ceil) rather than evenly: embedding rows
    vocab: bool  # rows are the vocabulary (Megatron pads them)
    linear: bool  # a matmul weight: autocast keeps a low-precision copy of it
    count: int = 1


_COLWISE = {"wq", "wk", "wv", "w1", "w3"}
_ROWWISE = {"wo", "w2"}
_MATMUL = _COLWISE | _ROWWISE | {"router", "output"}


def param(name: str, shape: tuple[int, ...]) -> Param:
    module, kind = name.split(".")[-2:]
    if module in _COLWISE:
        tp_dim = 0
    elif module in _ROWWISE:
        tp_dim = 1 if kind == "weight" else None  # a row-parallel bias is replicated
    elif module in ("tok_embeddings", "pos_embeddings", "output"):
        tp_dim = 0  # vocab-parallel embedding, column-parallel output, position rows
    else:
        tp_dim = None  # norms, the MoE router
    embedding = module in ("tok_embeddings", "pos_embeddings", "output")
    # autocast's cast of a weight is saved by the matmul; a bias's cast is not (addmm's backward
    # does not read the bias)
    return Param(
        shape, tp_dim, embedding, module in ("tok_embeddings", "output"), module in _MATMUL and kind == "weight"
    )


def _grouped(named) -> tuple[Param, ...]:
    """Identical parameters counted once with a multiplicity (MoE experts)."""
    counts: dict[Param, int] = {}
    for name, shape in named:
        p = param(name, shape)
        counts[p] = counts.get(p, 0) + 1
    return tuple(Param(p.shape, p.tp_dim, p.uneven, p.vocab, p.linear, n) for p, n in counts.items())


@lru_cache(maxsize=64)
def groups(model) -> dict[str, tuple[Param, ...]]:
    """embed (first stage), block (every layer), head (last stage), tied (the last stage's own copy
    of a tied embedding when pipelined: run/parallelize.split_pipeline keeps output.weight)."""
    named = model.param_shapes()
    block = model.layer_param_shapes()
    h = model.hidden
    embed = [(n, s) for n, s in named if n.split(".")[0] in ("tok_embeddings", "pos_embeddings")]
    head = [(n, s) for n, s in named if n.split(".")[0] in ("norm", "output")]
    return {
        "embed": _grouped(embed),
        "block": _grouped(block),
        "head": _grouped(head),
        "tied": _grouped([("output.weight", (model.vocab, h))]) if model.tied_embeddings else (),
    }


def local_shape(p: Param, tp, vocab_multiple: int = 1) -> tuple:
    """The shape one tp rank holds (rank 0, the largest where the split is uneven)."""
    if p.tp_dim is None:
        return p.shape
    d = p.shape[p.tp_dim]
    if p.vocab and vocab_multiple > 1:
        d = ceil_div(d, vocab_multiple * tp) * vocab_multiple
    else:
        d = ceil_div(d, tp) if p.uneven else d // tp
    return p.shape[: p.tp_dim] + (d,) + p.shape[p.tp_dim + 1 :]


def elements(shape):
    n = 1
    for d in shape:
        n = n * d
    return n


@dataclass
class Stage:
    """Which parameter groups a pipeline rank holds, with multiplicities (array-safe)."""

    embed: object
    layers: object
    head: object
    tied: object

    def parts(self):
        return (("embed", self.embed), ("block", self.layers), ("head", self.head), ("tied", self.tied))

    def sum(self, groups, f, only=None):
        total = 0
        for name, weight in self.parts():
            if isinstance(weight, int) and weight == 0:
                continue
            for p in groups[name]:
                if only is None or only(p):
                    total = total + weight * p.count * f(p)
        return total

    def max(self, groups, f):
        best = 0
        for name, weight in self.parts():
            if isinstance(weight, int) and weight == 0:
                continue
            for p in groups[name]:
                best = maximum(best, where(weight > 0, f(p), 0))
        return best


def stage_of(model, pp, last: bool, blocks=None, vee: bool = False) -> Stage:
    """The groups of the first (last=False) or last pipeline rank; `blocks`: its transformer blocks
    (pipeline.rank_blocks; None: an even split, layers / pp); `vee`: a V-shaped schedule, whose
    rank 0 holds the first and the last stage and rank p-1 neither."""
    pipelined = where(pp > 1, 1, 0)
    embed = 1 - pipelined if last else 1
    head = (1 - pipelined if last else 1) if vee else (1 if last else 1 - pipelined)
    tied = head * pipelined if model.tied_embeddings else 0
    return Stage(embed, model.layers // pp if blocks is None else blocks, head, tied)


def block_sum(g, f, only=None):
    """f summed over one transformer block's parameters."""
    return sum(p.count * f(p) for p in g["block"] if only is None or only(p))


# ---- one rank's parameters in registration order ----
def stage_param_shapes(
    model, tp: int, pp: int, last: bool, blocks: int | None = None, vee: bool = False
) -> list[tuple[int, ...]]:
    """The local shapes of one pipeline rank's parameters in registration order (scalars only)."""
    return [local_shape(p, tp) for p in stage_params(model, pp, bool(last), blocks, vee)]


@lru_cache(maxsize=64)
def _named_params(model) -> tuple:
    """(top-level module, layer index or -1, Param) of every parameter, in registration order."""
    out = []
    for name, shape in model.param_shapes():
        parts = name.split(".")
        out.append((parts[0], int(parts[1]) if parts[0] == "layers" else -1, param(name, shape)))
    return tuple(out)


@lru_cache(maxsize=1024)
def stage_params(model, pp: int, last: bool, blocks: int | None = None, vee: bool = False) -> tuple[Param, ...]:
    named = _named_params(model)
    if pp == 1:
        return tuple(p for _, _, p in named)
    keep_embed, keep_head = not last, (not last) if vee else last
    per = model.layers // pp if blocks is None else blocks
    # the V's rank p-1 holds the middle blocks, its rank 0 the first and the last per // 2 each
    lo, hi = (model.layers - per, model.layers) if last else (0, per)
    if vee:
        lo, hi = ((model.layers - per) // 2, (model.layers + per) // 2) if last else (0, per // 2)
    out = []
    for top, layer, p in named:
        if top in ("tok_embeddings", "pos_embeddings") and not keep_embed:
            continue
        if top in ("norm", "output") and not keep_head:
            continue
        if top == "layers" and not (lo <= layer < hi or (vee and not last and layer >= model.layers - per // 2)):
            continue
        out.append(p)
    if keep_head and model.tied_embeddings:
        out.append(param("output.weight", (model.vocab, model.hidden)))
    return tuple(out)
