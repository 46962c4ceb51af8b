"""shardwise: how to split a model over GPUs, what it costs, and proof by running it."""

__version__ = "0.1.0"  # before the imports: cli reads it while this package is still loading

from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.search import search
from shardwise.spec.breakdown import Collective, Estimate, Measurement, Memory, Time
from shardwise.spec.hardware import GPU, Cluster, Network, make_cluster
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan
from shardwise.spec.presets import load_model, preset

__all__ = [
    "Cluster",
    "Collective",
    "Estimate",
    "GPU",
    "Measurement",
    "Memory",
    "ModelSpec",
    "Network",
    "Plan",
    "ShardwiseError",
    "Time",
    "estimate",
    "load_model",
    "make_cluster",
    "preset",
    "search",
]
