"""Build typed config dataclasses from plain mappings (what Hydra/OmegaConf composes, or a dict).

One place turns untyped config trees into the project's dataclasses, with one-line errors that
name the full key path: unknown keys list the allowed ones, wrong types say what was expected, and
a dataclass's own ``__post_init__`` validation is re-raised with the path in front.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from fp8train.errors import ConfigError

__all__ = ["build_dataclass", "to_plain"]

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "true/false"}.get(tp.__name__, tp.__name__)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (dict, Mapping):
        return "mapping"
    if origin in (list, tuple):
        return "list"
    return str(tp)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}={value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{path}={value!r} is not allowed; allowed values: {', '.join(repr(a) for a in allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}={value!r} has the wrong type; expected a mapping")
        return {str(k): v for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} has the wrong type; expected a list")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}={value!r} has the wrong type; expected null")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML writes 1 for 1.0
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
            raise ConfigError(f"{path}={value!r} has the wrong type; expected {_type_name(tp)}")
        return value
    raise TypeError(f"fp8train.trainer._typed cannot convert to {tp!r} (at {path})")


def build_dataclass(cls: type[T], data: Any, path: str, *, prebuilt: Mapping[str, Any] | None = None) -> T:
    """``cls(**data)`` with every field converted to its annotated type, recursively; ``prebuilt``
    fields are passed as they are (for fields whose form needs custom handling).

    Raises ConfigError naming ``path.key`` for an unknown key, a missing required key, a value of
    the wrong type, or a ValueError from ``cls``'s own validation."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}={data!r} has the wrong type; expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prebuilt = dict(prebuilt or {})
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"unknown config key {key!r}; allowed keys{' under ' + path if path else ''}: "
                          + ", ".join(fields))
    kwargs = dict(prebuilt)
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in prebuilt:
            continue
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing config key {key!r} ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists/scalars (for YAML, JSON and wandb's config)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
