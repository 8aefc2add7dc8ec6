"""One codec for messages and records, driven by their types: frozen dataclasses to and from msgpack's
plain values (maps, lists, strings, numbers, booleans, None).

`decode(Type, data)` checks everything a peer could get wrong before any handler sees it: an unknown
field, a missing field, a value of the wrong type (`bool` is not an `int`; an `int` is a fine `float`),
a string or list longer than its field allows. Each failure is one `CodecError` line naming the field
path (`spec.vms[2].vcpus: expected int, got str`). `encode(value)` is the inverse for answers and
records. Supported field types: the plain ones (a float must be finite), `Any` (left as is: its handler
checks it), `X | None`, `Literal[...]`, `list[X]`, `tuple[X, ...]`, `dict[str, X]` (or `Mapping[str, X]`,
decoded as a dict), nested dataclasses, and unions of dataclasses, tagged on the wire by a `type` field
naming the class (`encode_tagged`).

Size limits are field metadata: `name: str = field(metadata=limit(200))`; so is a wire name that is
no Python name (`field(metadata=wire("from"))`), and `sparse()`: a field left off the wire while it holds
its default, so that a record gains optional parts without changing the shape of those that lack them.
A dataclass may refuse more in its own `__post_init__` (a range, a rule across fields): what that raises
is not a CodecError and passes through unchanged (a request type raises the RPC layer's one-line
`RequestError`, so the handler's caller reads the same line whoever checked).
This module never imports anything of ours: every layer's messages use it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")
MAX_ITEMS = 100_000
"""Longest list or map accepted where a field sets no limit (a frame is at most 4 MiB anyway)."""


class CodecError(ValueError):
    """A value does not fit its type; the message names the field."""


def limit(n: int) -> dict[str, int]:
    """Field metadata: at most `n` characters (a string) or items (a list or map)."""
    return {"limit": n}


def wire(name: str, n: int | None = None) -> dict[str, Any]:
    """Field metadata: the field's name on the wire (e.g. a Python keyword), and optionally its limit."""
    return {"wire": name, **({"limit": n} if n is not None else {})}


def sparse() -> dict[str, bool]:
    """Field metadata: `encode` leaves the field out while it equals its default (`decode` fills it back in)."""
    return {"sparse": True}


def _wire_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("wire", f.name))


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(cls: Any, data: Any, where: str = "") -> Any:
    """`data` (as msgpack decoded it) as an instance of the dataclass `cls` (or of the union of
    dataclasses `cls`, by its `type` tag; or of any other type the module supports: an answer may be a
    `bool`, `bytes` or a `list[X]`, bounded by the frame it came in rather than by MAX_ITEMS), or CodecError."""
    if dataclasses.is_dataclass(cls):
        return _record(cls, data, where)
    if typing.get_origin(cls) in (Union, types.UnionType):
        return _value(cls, data, where)
    return _value(cls, data, where or _name(cls), sys.maxsize)


def _record(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise CodecError(f"{where or cls.__name__}: expected a map, got {_kind(data)}")
    fields = {_wire_name(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise CodecError(f"{_at(where, unknown[0])}: unknown field (known: {', '.join(fields) or 'none'})")
    hints, values = _hints(cls), {}
    for name, f in fields.items():
        if name in data:
            values[f.name] = _value(hints[f.name], data[name], _at(where, name), f.metadata.get("limit"))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CodecError(f"{_at(where, name)}: missing field")
    return cls(**values)


def _value(kind: Any, data: Any, where: str, size: int | None = None) -> Any:
    fast = _fast(kind)
    if fast is not None:
        try:
            return fast(data, MAX_ITEMS if size is None else size)
        except _Miss:
            pass  # the slow way below finds the fault and names its path
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return data
    if origin in (Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1 and all(dataclasses.is_dataclass(a) for a in options):
            return _tagged(options, data, where)
        errors = []
        for option in options:
            try:
                return _value(option, data, where, size)
            except CodecError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else CodecError(f"{where}: expected {_name(kind)}, got {_kind(data)}")
    if origin is Literal:
        if data not in args or isinstance(data, bool) != any(isinstance(a, bool) for a in args if a == data):
            raise CodecError(f"{where}: expected one of {', '.join(map(str, args))}, got {data!r}")
        return data
    if dataclasses.is_dataclass(kind):
        return _record(kind, data, where)
    if origin in (list, tuple):
        if not isinstance(data, list | tuple):
            raise CodecError(f"{where}: expected a list, got {_kind(data)}")
        _check_size(data, where, size)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(data) != len(args):
                raise CodecError(f"{where}: expected {len(args)} items, got {len(data)}")
            return tuple(_value(a, d, f"{where}[{i}]") for i, (a, d) in enumerate(zip(args, data, strict=True)))
        item = args[0] if args else Any
        out = [_value(item, d, f"{where}[{i}]") for i, d in enumerate(data)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping) or kind is dict:
        if not isinstance(data, Mapping):
            raise CodecError(f"{where}: expected a map, got {_kind(data)}")
        _check_size(data, where, size)
        key_kind, item = args if args else (Any, Any)
        return {_value(key_kind, k, f"{where} key"): _value(item, v, f"{where}.{k}") for k, v in data.items()}
    if kind is float:
        if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(data):
            raise CodecError(f"{where}: expected a finite number, got {data!r}")
        return float(data)
    if kind in (int, str, bool, bytes):
        if not isinstance(data, kind) or (kind is int and isinstance(data, bool)):
            raise CodecError(f"{where}: expected {kind.__name__}, got {_kind(data)}")
        if kind in (str, bytes):
            _check_size(data, where, size)
        return data
    if kind is type(None):
        if data is not None:
            raise CodecError(f"{where}: expected nothing, got {_kind(data)}")
        return None
    raise TypeError(f"{where}: the codec has no rule for {kind!r}")  # a bug in a message type, not the peer


class _Miss(Exception):
    """A fast check failed: the value is decoded again the slow way, which says where and why."""


Fast = Callable[[Any, int], Any]


@functools.cache
def _fast(kind: Any) -> Fast | None:
    """A check of `kind` without field paths, for the plain values and the lists and tuples of them that
    hot RPCs answer (peers, records, entries: thousands a second in simulations); None for other kinds.
    It returns what `_value` would, or raises _Miss where `_value` might raise."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return lambda data, size: data
    if kind in (int, str, bool, bytes, float, type(None)):
        return functools.partial(_fast_plain, kind)
    if origin in (Union, types.UnionType):
        options = [f for a in args if a is not type(None) and (f := _fast(a)) is not None]
        if len(options) != len([a for a in args if a is not type(None)]) or not options:
            return None
        return functools.partial(_fast_union, type(None) in args, options)
    if origin in (list, tuple) and args:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            items = [f for a in args if (f := _fast(a)) is not None]
            return None if len(items) != len(args) else functools.partial(_fast_fixed, items)
        item = _fast(args[0])
        return None if item is None else functools.partial(_fast_list, item, origin is tuple)
    return None


def _fast_plain(kind: Any, data: Any, size: int) -> Any:
    if type(data) is not kind:
        if kind is float and type(data) is int:
            return float(data)
        raise _Miss
    if (kind is str or kind is bytes) and len(data) > size or kind is float and not math.isfinite(data):
        raise _Miss
    return data


def _fast_union(optional: bool, options: list[Fast], data: Any, size: int) -> Any:
    if data is None and optional:
        return None
    for option in options:
        try:
            return option(data, size)
        except _Miss:
            pass
    raise _Miss


def _fast_fixed(items: list[Fast], data: Any, size: int) -> tuple[Any, ...]:
    if not isinstance(data, list | tuple) or len(data) != len(items) or len(data) > size:
        raise _Miss
    return tuple(item(d, MAX_ITEMS) for item, d in zip(items, data, strict=True))


def _fast_list(item: Fast, as_tuple: bool, data: Any, size: int) -> Any:
    if not isinstance(data, list | tuple) or len(data) > size:
        raise _Miss
    out = [item(d, MAX_ITEMS) for d in data]
    return tuple(out) if as_tuple else out


def _tagged(options: list[Any], data: Any, where: str) -> Any:
    names = {cls.__name__: cls for cls in options}
    if not isinstance(data, Mapping):
        raise CodecError(f"{where or 'message'}: expected a map, got {_kind(data)}")
    cls = names.get(data.get("type"))
    if cls is None:
        raise CodecError(f"{_at(where, 'type')}: expected one of {', '.join(names)}, got {data.get('type')!r}")
    return _record(cls, {k: v for k, v in data.items() if k != "type"}, where)


def _check_size(data: Any, where: str, size: int | None) -> None:
    if len(data) > (size if size is not None else MAX_ITEMS):
        raise CodecError(f"{where}: longer than {size if size is not None else MAX_ITEMS}")


def encode(value: Any) -> Any:
    """A dataclass (nested ones too) as plain msgpack values; other values as they are."""
    if type(value) in _PLAIN:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {_wire_name(f): encode(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("sparse") and getattr(value, f.name) == _default(f))}
    if isinstance(value, list | tuple):
        return [v if type(v) in _PLAIN else encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


_PLAIN = frozenset({int, str, float, bool, bytes, type(None)})


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    if f.default is dataclasses.MISSING:
        raise TypeError(f"sparse field {f.name} has no default")  # a bug in a record type, not the peer
    return f.default


def encode_tagged(value: Any) -> dict[str, Any]:
    """A dataclass that travels as one of a union's members: its fields and `type`, its class name."""
    return {"type": type(value).__name__, **encode(value)}


def _at(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _kind(data: Any) -> str:
    return {dict: "a map", list: "a list", tuple: "a list", type(None): "nothing"}.get(type(data), type(data).__name__)


def _name(kind: Any) -> str:
    return str(getattr(kind, "__name__", None) or str(kind).replace("typing.", ""))
