"""What a published figure measures, read off an Estimate: one function per metric, taking the
estimate and its accounting profile's name."""

from __future__ import annotations

from shardwise.estimate import estimate
from shardwise.estimate.memory.paper import layer_fraction
from shardwise.units import GIB


def _states(e) -> int:
    m = e.memory
    return m.params + m.grads + m.optimizer


def layer_states_gib(e, profile) -> float:
    """Parameters, gradients and optimizer states of the rank's transformer layers (the first
    pipeline stage's, without its embeddings), GiB: what Korthikanti et al. 2022's Figure 1 counts."""
    return _states(e) * layer_fraction(e.model, e.plan, profile) / GIB


def layer_activations_gib(e, profile) -> float:
    """The transformer layers' saved activations on the worst rank (act.layers: the paper's
    per-layer term times the layers and micro-batches in flight), GiB."""
    return e.memory.detail.get("act.layers", 0) / GIB


def relative_activations_pct(e, profile) -> float:
    """act.layers over the same plan's without recompute and without sequence parallel, %
    (Korthikanti et al. 2022's Figure 7)."""
    ref = estimate(e.model, e.cluster, e.plan.replace(recompute="none", sp=False), profile)
    return 100 * layer_activations_gib(e, profile) / layer_activations_gib(ref, profile)


def step_s(e, profile) -> float:
    return e.time.step_s


def tflops_per_gpu(e, profile) -> float:
    """Hardware FLOPs per step (recompute included, Narayanan et al. 2021's eq. 3) over the step
    time, per GPU, TFLOP/s."""
    return e.time.detail["hardware_flops_per_step"] / e.time.step_s / e.plan.world / 1e12


def model_states_gb(e, profile) -> float:
    """Parameters, gradients and optimizer states per GPU, plus the largest layer DeepSpeed's ZeRO-3
    gathers whole (its estimator counts it), GB (1e9 bytes)."""
    return (_states(e) + e.memory.detail.get("buffers.ds_largest_layer", 0)) / 1e9


METRICS = {
    "layer_states_gib": layer_states_gib,
    "layer_activations_gib": layer_activations_gib,
    "relative_activations_pct": relative_activations_pct,
    "step_s": step_s,
    "tflops_per_gpu": tflops_per_gpu,
    "model_states_gb": model_states_gb,
}
UNITS = {
    "layer_states_gib": "GiB",
    "layer_activations_gib": "GiB",
    "relative_activations_pct": "%",
    "step_s": "s",
    "tflops_per_gpu": "TFLOP/s",
    "model_states_gb": "GB",
}
