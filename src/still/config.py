"""Typed, self-validating dataclass configs that are data only.

Every config in still is a frozen dataclass whose `__post_init__` rejects bad values with a
`StillError` naming them; `check_fields` does the checks that follow from the annotations (a
`Literal` field holds one of its values; a list given for a tuple field is stored as a tuple).
`from_dict` refuses unknown keys (a typo must not silently fall back to a default) and
`to_dict`/`save_config` write plain JSON next to every checkpoint and result.
Nothing here imports or executes anything named in a config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from still.errors import StillError, whole

C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass; tuples become lists. Only the
    fields `from_dict` takes are written: a derived `field(init=False)` is left out."""
    return json.loads(json.dumps(_init_fields(config, nested=True)))


def _init_fields(config: Any, nested: bool = False) -> dict[str, Any]:
    """The fields of `config` that its constructor takes (nested: nested configs as dicts too)."""
    def plain(value: Any) -> Any:
        if nested and dataclasses.is_dataclass(value) and not isinstance(value, type):
            return _init_fields(value, nested=True)
        if nested and isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if nested and isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(annotation: Any) -> tuple | None:
    """The values a `Literal` field (optional or not) may hold; None for any other field."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [(None,) if arg is type(None) else _allowed(arg) for arg in typing.get_args(annotation)]
        if all(part is not None for part in parts):
            return tuple(value for part in parts for value in part)
    return None


def _is_tuple(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_tuple(arg) for arg in typing.get_args(annotation))
    return annotation is tuple or typing.get_origin(annotation) is tuple


def _tuples(value: Sequence) -> tuple:
    """`value` as a tuple, and the lists inside it too (`((64, 64), (128,))` given as lists of lists)."""
    return tuple(_tuples(v) if isinstance(v, list) else v for v in value)


def check_fields(config: Any) -> None:
    """For a config's `__post_init__`: every field holds a value of its annotated type, as
    `from_dict` makes it (a config built directly in Python does not go through it): an int, a
    float (an int given becomes one), a bool (not "no", which is truthy), a string, one of a
    `Literal`'s values; and a tuple field given a list (or another sequence) becomes a tuple, so that
    the config equals itself after a JSON round trip and can be hashed."""
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        annotation, value = _hints(type(config))[f.name], getattr(config, f.name)
        allowed = _allowed(annotation)
        if allowed is not None and value not in allowed:
            raise StillError(f"{type(config).__name__}.{f.name}: {value!r} is not one of "
                             f"{', '.join(map(repr, allowed))}")
        coerced = _coerce(value, annotation, f"{type(config).__name__}.{f.name}")
        if (_is_tuple(annotation) and isinstance(coerced, Sequence)
                and not isinstance(coerced, (tuple, str, bytes))):
            coerced = _tuples(coerced)
        if coerced is not value:
            object.__setattr__(config, f.name, coerced)  # (the dataclass may be frozen)


MAX_SIZE = 2**31 - 1
"""The largest size (a vocabulary, a width, a number of layers or memories) a model's config takes:
no model with a dimension beyond it fits in memory, and a size past int64's range was an overflow
TypeError deep in PyTorch (one past this, an allocator's error)."""


def check_sizes(config: Any, *names: str) -> None:
    """For a config's `__post_init__`: each size field in `names` (an int, or a tuple of them,
    nested or not) is at most `MAX_SIZE`; the first that is not is named."""
    def check_one(where: str, value: Any) -> None:
        if isinstance(value, tuple):
            for i, item in enumerate(value):
                check_one(f"{where}[{i}]", item)
        elif value > MAX_SIZE:
            raise StillError(f"{where} must be at most {MAX_SIZE} (2**31 - 1), got {value}")

    for name in names:
        check_one(name, getattr(config, name))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):  # already built, and so already validated
            return value
        if not isinstance(value, dict):
            raise StillError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where=where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except StillError as e:
                errors.append(str(e))
        raise StillError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise StillError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise StillError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise StillError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if annotation is float:  # (NumPy's numbers too: a sweep's np.linspace, a config's np.int64)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise StillError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an int beyond 1.8e308
            raise StillError(f"{where}: expected a number, got an integer too large for a float "
                             f"(about 1e{int(int(value).bit_length() * math.log10(2))})") from None
    if annotation is int:
        if not whole(value):
            raise StillError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if annotation is bool:
        if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # (NumPy's, as its
            return bool(value)  # numbers are taken; not importing NumPy for it)
        if not isinstance(value, bool):
            raise StillError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise StillError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[C], data: dict[str, Any], where: str | None = None) -> C:
    """Build config `cls` from plain data, rejecting unknown keys and values of the wrong type."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise StillError(f"{where}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise StillError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}")
    sep = ": " if where.endswith(".json") else "."  # (a file's keys after a colon)
    kwargs = {k: _coerce(v, hints[k], f"{where}{sep}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except StillError as e:  # (a value its own checks refuse: where it was read, as for a type error)
        if where == cls.__name__:
            raise
        raise StillError(f"{where}: {e}") from None


def changed_settings(these: dict[str, Any], those: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two settings dicts (`to_dict`'s, or as saved), one
    missing from a dict counting as None, sorted."""
    return sorted(k for k in set(these) | set(those) if these.get(k) != those.get(k))


def changed_paths(these: dict[str, Any], those: dict[str, Any], prefix: str = "") -> list[str]:
    """`changed_settings`, into nested settings: "model.mem_len", not "model"."""
    paths = []
    for key in changed_settings(these, those):
        a, b = these.get(key), those.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            paths += changed_paths(a, b, f"{prefix}{key}.")
        else:
            paths.append(f"{prefix}{key}")
    return paths


def replace(config: C, **changes: Any) -> C:
    """`dataclasses.replace` that goes through the same checks as `from_dict`."""
    return from_dict(type(config), {**_init_fields(config), **changes})


def save_config(config: Any, path: str | Path) -> None:
    """Write `config` as JSON (atomically) to `path`."""
    from still.train.io import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(config), indent=2) + "\n")


def load_config(cls: type[C], path: str | Path) -> C:
    """Read a config written by `save_config`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # (ValueError: not JSON, or not UTF-8, which was a traceback)
        raise StillError(f"cannot read config {path}: {e}") from None
    return from_dict(cls, data, where=str(path))
