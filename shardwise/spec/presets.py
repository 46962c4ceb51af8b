"""Where a ModelSpec comes from: a preset of the catalog (catalog/models.toml), named by its own
name or by a Hugging Face id of the same architecture; a Hugging Face config.json; or a TOML/JSON
file of ModelSpec fields."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from shardwise.errors import ShardwiseError, closest
from shardwise.spec.hf import from_hf_config
from shardwise.spec.model import ModelSpec, spec_from_dict

CATALOG = Path(__file__).with_name("catalog") / "models.toml"
ALIAS_KEY = "hf_ids"  # catalog key of a preset's Hugging Face ids: names, not a ModelSpec field


def _load_catalog() -> dict[str, dict]:
    with open(CATALOG, "rb") as f:
        return tomllib.load(f)


_PRESETS: dict[str, dict] | None = None
_ALIASES: dict[str, str] | None = None  # lowercase name a user may type -> preset name


def _catalog() -> dict[str, dict]:
    global _PRESETS
    if _PRESETS is None:
        _PRESETS = _load_catalog()
    return _PRESETS


def _spec(key: str) -> ModelSpec:
    fields = {k: v for k, v in _catalog()[key].items() if k != ALIAS_KEY}
    return spec_from_dict({"name": key, **fields}, f"{CATALOG.name} [{key}]")


def hf_ids() -> dict[str, list[str]]:
    """Preset name -> its Hugging Face ids as the hub spells them (empty list: none)."""
    return {k: list(v.get(ALIAS_KEY, [])) for k, v in _catalog().items()}


def aliases() -> dict[str, str]:
    """Every name that resolves to a preset, lowercase -> preset name: each Hugging Face id
    (`meta-llama/Llama-3.1-8B`) and its repository name alone (`Llama-3.1-8B`, `Mistral-7B-v0.1`,
    what people type when they drop the organisation). A name that would point at two presets is
    a catalog mistake and fails here, so `shardwise models` and the tests catch it."""
    global _ALIASES
    if _ALIASES is None:
        out: dict[str, str] = {}
        for key, ids in hf_ids().items():
            for hid in ids:
                for name in {hid.lower(), hid.lower().rsplit("/", 1)[-1]}:
                    other = name if name in _catalog() else out.get(name, key)
                    if other != key:
                        raise ShardwiseError(f"{CATALOG.name}: {hid!r} of [{key}] also names [{other}]")
                    out[name] = key
        _ALIASES = out
    return _ALIASES


def presets() -> dict[str, ModelSpec]:
    return {k: _spec(k) for k in _catalog()}


def resolve_name(name: str) -> str | None:
    """The preset a name means (its own name or a Hugging Face id, any case), or None."""
    key = name.strip().lower()
    if key in _catalog():
        return key
    return aliases().get(key)


def preset(name: str) -> ModelSpec:
    key = resolve_name(name)
    if key is None:
        # suggest what the user was typing: a Hugging Face id when it has an organisation
        ids = "/" in name
        known = set(_catalog()) | {a for a in aliases() if ("/" in a) == ids}
        raise ShardwiseError(
            f"unknown model {name!r}; {closest(name.strip().lower(), known)} "
            "(or give a config.json / .toml path or a Hugging Face id; see `shardwise models`)"
        )
    return _spec(key)


def load_model(ref: str | ModelSpec) -> ModelSpec:
    """A preset name or a Hugging Face id of one (`gpt2`, `meta-llama/Llama-3.1-8B`), a Hugging
    Face config.json (or the folder of a downloaded repository holding one), or a TOML/JSON file
    of ModelSpec fields."""
    if isinstance(ref, ModelSpec):
        return ref
    kind, where = source_of(ref)
    if kind == "preset":
        return preset(where)
    p = Path(where)
    if not p.is_file():
        raise ShardwiseError(f"model file {ref!r} does not exist; give a preset name or a path")
    return _from_file(p)


def source_of(ref: str) -> tuple[str, str]:
    """Where load_model looks for `ref`: ("path", the file) for a file, a .json/.toml name (found or
    not) or a downloaded Hugging Face repository (its config.json); else ("preset", ref)."""
    p = Path(ref)
    if p.is_dir() and (p / "config.json").is_file():
        return "path", str(p / "config.json")
    if p.suffix.lower() in (".json", ".toml") or p.is_file():
        return "path", ref
    return "preset", ref


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
