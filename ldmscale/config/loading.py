"""Building a Config: dataclass defaults <- YAML files (`include:`) <- `section.key=value` overrides, each value
coerced to its field's type or refused naming the key; and the config as it is saved and logged."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ldmscale.config.checks import validate
from ldmscale.config.schema import Config, ConfigError
from ldmscale.runtime.redact import redact


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or fail naming the key."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # (an annotation: a class, never an instance)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if origin is Literal:
        allowed = list(typing.get_args(tp))
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # the first type the value fits (str | dict: a string, else a mapping)
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        return _coerce(value, args[-1], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise ConfigError(f"{key}: expected a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; allowed keys in {prefix or 'the top level'}: "
            + ", ".join(sorted(names))
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    base = cls()
    for k, v in kwargs.items():
        if dataclasses.is_dataclass(v) and getattr(base, k) is not None:
            # merge nested sections field by field so a partial YAML section keeps the other defaults
            sub = getattr(base, k)
            for f in dataclasses.fields(v):
                if f.name in data[k]:
                    setattr(sub, f.name, getattr(v, f.name))
            v = sub
        setattr(base, k, v)
    return base


def deep_merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_merge(into[k], v)
        else:
            into[k] = v
    return into


def parse_override(item: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    path, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote strings that "
            f"hold braces or colons inside a list, e.g. 'data.shards=[\"s3://b/{{00000..00099}}.tar\"]'"
        ) from None
    out: dict[str, Any] = {}
    node = out
    parts = path.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (which may `include:` other YAML files) <- `key=value` overrides; then validate."""
    raw: dict[str, Any] = {}
    if path:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        deep_merge(raw, parse_override(item))
    cfg = _from_dict(Config, raw)
    validate(cfg)
    return cfg


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config file with its `include:` files (paths relative to it) merged under it."""
    where = f" (included by {seen[-1]})" if seen else ""
    if path.resolve() in {p.resolve() for p in seen}:
        raise ConfigError(f"{path} includes itself{where}: remove the `include:` that closes the circle")
    if not path.is_file():
        what = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}{where}; configs/ has the shipped ones")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where} is not valid YAML{at}: {problem}; fix that line (indentation, a missing "
                          f"space after ':', an unclosed quote or bracket)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}{where} cannot be read ({type(e).__name__}: {e})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    includes = data.pop("include", None) or []
    if isinstance(includes, str):  # `include: base.yaml`: one file, not a list of its letters
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError(f"{path}: include: must name a YAML file or a list of them, got {includes!r}")
    merged: dict[str, Any] = {}
    for inc in includes:
        deep_merge(merged, _read_yaml((path.parent / inc).resolve(), (*seen, path)))
    return deep_merge(merged, data)


def to_dict(cfg: Config) -> dict[str, Any]:
    def conv(x: Any) -> Any:
        if isinstance(x, tuple):
            return list(x)
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x

    return conv(dataclasses.asdict(cfg))


def public_dict(cfg: Config) -> dict[str, Any]:
    """The config as saved and logged (config.yaml, checkpoints, W&B): storage credentials masked."""
    d = to_dict(cfg)
    d["data"]["storage_options"] = redact(d["data"]["storage_options"])
    for source in d["data"]["sources"]:
        source["storage_options"] = redact(source["storage_options"])
    return d


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(public_dict(cfg), sort_keys=False)


# Fields added with a default that changes what a saved run meant: a config saved before the field existed gets
# the value its run actually used, not today's default (else its checkpoint no longer loads).
ADDED_FIELDS_OLD_VALUES: dict[tuple[str, str], Any] = {
    ("style", "colour_stats"): False,  # the style encoder's colour-statistics input (new default: on for conv)
    ("style", "clip_head"): "pooled",  # backbone=clip: CLIPVisionModel's pooled output (new: ip_adapter)
    ("style", "global_path"): False,  # the style tokens added to the time embedding (new default: on for conv)
    ("style", "lr_scale"): 1.0,
}


def config_from_yaml_text(text: str) -> Config:
    """Rebuild a saved config (no validation of paths: a checkpoint may have moved machines)."""
    raw = yaml.safe_load(text) or {}
    for (section, key), old in ADDED_FIELDS_OLD_VALUES.items():
        if isinstance(raw.get(section), dict) and key not in raw[section]:
            raw[section][key] = old
    return _from_dict(Config, raw)


