"""`shardwise validate`: the estimate held against published measurements.

Each set (data/*.toml) names its source (paper, table or figure, hardware, configuration) and holds
the published values; `run()` builds every item's Plan, estimates it through the same
`estimate()` the CLI calls (each plan is one `shardwise estimate` command line), and returns
predicted vs published with the error. A set's file:

  title, gpu, profile       the source, the catalog GPU, the accounting profile
  network                   the catalog network between nodes (default: the GPU's usual one)
  plan                      Plan fields every item shares
  [model_defaults]          ModelSpec fields every model shares (a model not in [models] is a preset)
  [models.NAME]             the models' own fields
  [configs.NAME]            model, gpus, plan: one published configuration
  [modes]                   NAME -> Plan fields (e.g. the recompute policy)
  [[item]]                  where (table / figure), metric (METRICS), mode, published {config: value}

Torch-free: it stands on spec and estimate.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from shardwise.errors import ShardwiseError, closest
from shardwise.estimate import estimate
from shardwise.spec.hardware import make_cluster
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan
from shardwise.spec.presets import load_model
from shardwise.validate.metrics import METRICS, UNITS

DATA = Path(__file__).with_name("data")
SETS = tuple(sorted(p.stem for p in DATA.glob("*.toml")))


@dataclass(frozen=True)
class Row:
    """One published value and the estimate's prediction of it."""

    set: str
    where: str  # the table or figure
    metric: str
    config: str
    mode: str
    model: str
    gpus: int
    gpu: str
    network: str
    profile: str
    plan: Plan
    published: float
    predicted: float

    @property
    def error_pct(self) -> float:
        """Signed: (predicted - published) / published, in percent."""
        return (self.predicted - self.published) / self.published * 100

    def to_dict(self) -> dict:
        return {
            "set": self.set,
            "where": self.where,
            "metric": self.metric,
            "unit": UNITS[self.metric],
            "config": self.config,
            "mode": self.mode,
            "model": self.model,
            "gpus": self.gpus,
            "gpu": self.gpu,
            "network": self.network,
            "profile": self.profile,
            "plan": self.plan.to_dict(),
            "published": self.published,
            "predicted": self.predicted,
            "error_pct": self.error_pct,
        }


@dataclass(frozen=True)
class Summary:
    """The errors of one metric of one set: mean and max of their absolute values."""

    set: str
    metric: str
    items: int
    mean_abs_pct: float
    max_abs_pct: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def load_set(name: str) -> dict:
    if name not in SETS:
        raise ShardwiseError(f"unknown validation set {name!r}; {closest(name, SETS)}")
    with open(DATA / f"{name}.toml", "rb") as f:
        return tomllib.load(f)


def models_of(data: dict) -> dict[str, ModelSpec]:
    """The set's models: [model_defaults] with each [models.NAME] over it (a file of ModelSpec
    fields, as `shardwise estimate MODEL.toml` reads one)."""
    base = data.get("model_defaults", {})
    return {name: ModelSpec(name=name, **(base | fields)) for name, fields in data.get("models", {}).items()}


def run(names=None, metrics=None, profile: str | None = None) -> list[Row]:
    """Every item of the named sets (all by default), predicted and published; only the items of
    `metrics` when given; under `profile` instead of each set's own when given (how far another
    engine's accounting is from these runs)."""
    rows = []
    for name in names or SETS:
        data = load_set(name)
        if profile is not None:
            data["profile"] = profile
        rows += _run_set(name, data, metrics)
    return rows


def _run_set(name: str, data: dict, metrics=None) -> list[Row]:
    models = models_of(data)
    rows = []
    for item in data["item"]:
        metric = item["metric"]
        if metric not in METRICS:
            raise ShardwiseError(f"{name}: unknown metric {metric!r}; {closest(metric, METRICS)}")
        if metrics is not None and metric not in metrics:
            continue
        for config, published in item["published"].items():
            cfg = data["configs"][config]
            model = models.get(cfg["model"]) or load_model(cfg["model"])
            cluster = make_cluster(data["gpu"], cfg["gpus"], network=data.get("network"))
            plan = Plan(**(data.get("plan", {}) | cfg.get("plan", {}) | data["modes"][item["mode"]]))
            est = estimate(model, cluster, plan, data["profile"])
            predicted = METRICS[metric](est, data["profile"])
            rows.append(
                Row(
                    name,
                    item["where"],
                    metric,
                    config,
                    item["mode"],
                    model.name,
                    cfg["gpus"],
                    data["gpu"],
                    cluster.network.name,
                    data["profile"],
                    est.plan,
                    float(published),
                    float(predicted),
                )
            )
    return rows


def summarize(rows: list[Row]) -> list[Summary]:
    """Mean and max absolute error per set and metric, in the order they first appear."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r.set, r.metric), []).append(abs(r.error_pct))
    return [Summary(s, m, len(e), sum(e) / len(e), max(e)) for (s, m), e in groups.items()]
