"""Where a ModelSpec comes from: a preset of the catalog (catalog/models.toml), a Hugging Face
config.json, or a TOML/JSON file of ModelSpec fields."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from shardwise.errors import ShardwiseError, closest
from shardwise.spec.hf import from_hf_config
from shardwise.spec.model import ModelSpec, spec_from_dict

CATALOG = Path(__file__).with_name("catalog") / "models.toml"


def _load_catalog() -> dict[str, dict]:
    with open(CATALOG, "rb") as f:
        return tomllib.load(f)


_PRESETS: dict[str, dict] | None = None


def presets() -> dict[str, ModelSpec]:
    global _PRESETS
    if _PRESETS is None:
        _PRESETS = _load_catalog()
    return {k: spec_from_dict({"name": k, **v}, f"{CATALOG.name} [{k}]") for k, v in _PRESETS.items()}


def preset(name: str) -> ModelSpec:
    global _PRESETS
    if _PRESETS is None:
        _PRESETS = _load_catalog()
    key = name.lower()
    if key not in _PRESETS:
        raise ShardwiseError(
            f"unknown model {name!r}; {closest(key, _PRESETS)} "
            "(or give a config.json / .toml path; see `shardwise models`)"
        )
    return spec_from_dict({"name": key, **_PRESETS[key]}, f"{CATALOG.name} [{key}]")


def load_model(ref: str | ModelSpec) -> ModelSpec:
    """A preset name, a Hugging Face config.json, or a TOML/JSON file of ModelSpec fields."""
    if isinstance(ref, ModelSpec):
        return ref
    p = Path(ref)
    if p.suffix.lower() in (".json", ".toml") or p.exists():
        if not p.is_file():
            raise ShardwiseError(f"model file {ref!r} does not exist; give a preset name or a path")
        return _from_file(p)
    return preset(ref)


def _from_file(p: Path) -> ModelSpec:
    try:
        if p.suffix.lower() == ".toml":
            with open(p, "rb") as f:
                d = tomllib.load(f)
            d = d.get("model", d)
        else:
            d = json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardwiseError(f"{p}: not valid {p.suffix[1:].upper()} ({e})") from None
    if not isinstance(d, dict):
        raise ShardwiseError(f"{p}: expected an object of model fields at the top level")
    if "model_type" in d or "architectures" in d:
        # a downloaded model is DIR/config.json (name = DIR); a saved copy may be NAME.json
        name = (p.resolve().parent.name or p.stem) if p.stem == "config" else p.stem
        return from_hf_config(d, str(p), default_name=name)
    d.setdefault("name", p.stem)
    return spec_from_dict(d, str(p))
