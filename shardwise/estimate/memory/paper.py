"""Memory of the accounting profiles that count every model state at once, the papers' static
sum (the zero-paper, megatron and deepspeed profiles): bytes per parameter from the profile's
table, sharded over dp as its engine does, its own buffers, and the activations of its layout
(Megatron's), at one moment, A. The torch profile's memory is engines.py.
"""

from __future__ import annotations

from shardwise.estimate import activations as acts
from shardwise.estimate import profiles
from shardwise.estimate._num import ceil_div, memo, where
from shardwise.estimate.memory.shapes import block_sum, elements, groups, local_shape, stage_of
from shardwise.estimate.pipeline import rank_blocks, vee
from shardwise.estimate.profiles import Profile, compute_bytes, optimizer_bytes


@memo
def _paper_sizes(model, prof: Profile, optimizer, precision, tp, pp, last, blocks, vee=False):
    """Elements, optimizer bytes, elements in tensors kept whole (Profile.persistence_threshold),
    one block's elements, the largest tensor's, the transformer layers' on the rank."""
    g, sb = groups(model), prof.state_bytes(precision)
    st = stage_of(model, pp, last, blocks, vee)
    mult, whole = prof.vocab_multiple, prof.persistence_threshold
    numel = lambda p: elements(local_shape(p, tp, mult))
    return {
        "n": st.sum(g, numel),
        "opt": st.sum(g, lambda p: optimizer_bytes(optimizer, local_shape(p, tp, mult), sb)),
        "small": st.sum(g, lambda p: where(numel(p) <= whole, numel(p), 0)) if whole else 0,
        "block": block_sum(g, numel),
        "largest": st.max(g, numel),
        "layers": st.layers * block_sum(g, numel),
    }


def paper_moment(model, plan, last: bool, prof: Profile, attention: str) -> dict:
    """Model states from the profile's bytes-per-parameter table, sharded as its engine does
    (Profile.model_states), its own buffers (Profile.buffers), and its activation layout."""
    sb = prof.state_bytes(plan.precision)
    tp, dp, zero = plan.tp, plan.dp, plan.zero
    z = _paper_sizes(
        model, prof, plan.optimizer, plan.precision, tp, plan.pp, last, rank_blocks(model, plan, last), vee(plan)
    )
    n = z["n"]
    p, gr, o = prof.model_states(sb, n, z["opt"], z["small"], dp, zero)
    if plan.offload != "none":
        o = 0
    if plan.offload == "params":
        p, gr = 0, 0
    out = {"params.model": p, "grads.model": gr, "optimizer.states": o, **prof.overhead}
    out.update(prof.buffers(sb, n, z["block"], zero, z["largest"]))
    c = compute_bytes(plan.precision)
    mult = prof.vocab_multiple
    out.update(
        acts.rank_activations(
            model,
            plan,
            last=last,
            layout=prof.activation_layout,
            attention=attention,
            autocast=False,
            act=c,
            res=c,
            vocab=ceil_div(model.vocab, mult * tp) * mult,
        )
    )
    return out


def layer_fraction(model, plan, profile, last: bool = False) -> float:
    """The share of a pipeline rank's parameter elements that sit in its transformer layers (the
    rest: embeddings, the output head, the final norm). Papers that count the layers alone
    (Korthikanti et al. 2022's Figure 1: 18 bytes for each of 12*L*h^2/(t*p) parameters per GPU)
    are compared with this share of the rank's model states."""
    prof, blocks = profiles.profile(profile), rank_blocks(model, plan, last)
    z = _paper_sizes(model, prof, plan.optimizer, plan.precision, plan.tp, plan.pp, last, blocks)
    return z["layers"] / z["n"]
