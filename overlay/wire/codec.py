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

Decoders are compiled, because the overlay's hops decode thousands of answers a second in a simulation:
the first `decode` of a type builds its decoder once (a closure per kind, holding the field table, limits
and member decoders it needs), so a later one asks `typing` nothing and writes no field path while the
value fits. A fault is raised with its path relative to the decoder that found it; each enclosing record,
list or map adds its segment on the way out, and `decode` writes the one line. Encoders are chosen once
per class in the same way.

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


def decode(cls: Any, data: Any, where: str = "") -> Any:
    """`data` (as msgpack decoded it) as an instance of the dataclass `cls` (or of the union of
    dataclasses `cls`, by its `type` tag; or of any other type the module supports: an answer may be a
    `bool`, `bytes` or a `list[X]`, bounded by the frame it came in rather than by MAX_ITEMS), or CodecError."""
    decoder, name = _entry(cls)
    try:
        return decoder(data)
    except _Fault as fault:
        raise (TypeError if isinstance(fault, _NoRule) else CodecError)(fault.line(where or name)) from None


Decoder = Callable[[Any], Any]
"""A compiled decoder: plain msgpack values in, the value of its type out, or `_Fault`."""


class _Fault(Exception):
    """What a compiled decoder raises: why the value does not fit, and the path to it from the decoder that
    raised, innermost segment first (each enclosing record, list or map adds its own on the way out)."""

    def __init__(self, why: str, unnamed: str = "") -> None:
        self.why = why
        self.unnamed = unnamed
        """What the line names when the path is empty (a record: its class)."""
        self.path: list[tuple[bool, str]] = []
        """(True, a field name) or (False, text written as it is: "[2]", " key", ".key")."""

    def field(self, name: str) -> _Fault:
        self.path.append((True, name))
        return self

    def item(self, text: str) -> _Fault:
        self.path.append((False, text))
        return self

    def line(self, where: str) -> str:
        for named, text in reversed(self.path):
            where = _at(where, text) if named else where + text
        return f"{where or self.unnamed}: {self.why}"


class _NoRule(_Fault):
    """A type the codec has no rule for: a bug in a message type, not the peer's (`decode` raises TypeError)."""


@functools.cache
def _entry(cls: Any) -> tuple[Decoder, str]:
    """The decoder `decode` uses for `cls`, and what names the value when the caller gives no `where`: a
    record or a union needs no name (a field path or the record's class does), another type is its own."""
    if dataclasses.is_dataclass(cls) or typing.get_origin(cls) in (Union, types.UnionType):
        return _decoder(cls), ""
    return _decoder(cls, sys.maxsize), _name(cls)


@functools.cache
def _decoder(kind: Any, size: int | None = None) -> Decoder:
    """The decoder of `kind`, compiled once; `size` is the field's limit (None: MAX_ITEMS)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    most = MAX_ITEMS if size is None else size
    if kind is Any:
        return _as_is
    if origin in (Union, types.UnionType):
        return _union(kind, size)
    if origin is Literal:
        return _literal(args)
    if dataclasses.is_dataclass(kind):
        return _record(kind)
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            fixed = _fixed([_decoder(a) for a in args], most)
            return _row(list(args), fixed) if len(args) <= most and set(args) <= _ROW_KINDS else fixed
        return _list(_decoder(args[0] if args else Any), most, origin is tuple)
    if origin in (dict, Mapping) or kind is dict:
        key_kind, item = args if args else (Any, Any)
        return _map(_decoder(key_kind), _decoder(item), most)
    if kind is float:
        return _float
    if kind in (int, str, bool, bytes):
        return _instance(kind, most)
    if kind is type(None):
        return _none
    return _no_rule(kind)


def _as_is(data: Any) -> Any:
    return data


def _union(kind: Any, size: int | None) -> Decoder:
    """`X | None` tries None first; a union of dataclasses goes by its tag; any other union takes the first
    member that fits (a lone member says itself what is wrong)."""
    args = typing.get_args(kind)
    options = [a for a in args if a is not type(None)]
    if len(options) > 1 and all(dataclasses.is_dataclass(a) for a in options):
        inner = _tagged(options)
    elif len(options) == 1:
        inner = _decoder(options[0], size)
    else:
        inner = _first_fit([_decoder(a, size) for a in options], f"expected {_name(kind)}, got ")
    if type(None) not in args:
        return inner

    def decode_optional(data: Any) -> Any:
        return None if data is None else inner(data)
    return decode_optional


def _first_fit(decoders: list[Decoder], expected: str) -> Decoder:
    def decode_first_fit(data: Any) -> Any:
        for decoder in decoders:
            try:
                return decoder(data)
            except _NoRule:
                raise
            except _Fault:
                pass
        raise _Fault(expected + _kind(data))
    return decode_first_fit


def _tagged(options: list[Any]) -> Decoder:
    names = {cls.__name__: _decoder(cls) for cls in options}
    expected = f"expected one of {', '.join(names)}, got "

    def decode_tagged(data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise _Fault(f"expected a map, got {_kind(data)}", "message")
        tag = data.get("type")
        decoder = names.get(tag) if isinstance(tag, str) else None
        if decoder is None:
            raise _Fault(f"{expected}{tag!r}").field("type")
        return decoder({k: v for k, v in data.items() if k != "type"})
    return decode_tagged


def _literal(args: tuple[Any, ...]) -> Decoder:
    expected = f"expected one of {', '.join(map(str, args))}, got "

    def decode_literal(data: Any) -> Any:
        if data not in args or isinstance(data, bool) != any(isinstance(a, bool) for a in args if a == data):
            raise _Fault(f"{expected}{data!r}")
        return data
    return decode_literal


_ABSENT = object()
"""What `decode_record` reads for a field the map lacks (None is a value)."""


def _record(cls: Any) -> Decoder:
    """A dataclass from a map. Its fields are compiled at its first decode, so that a type may name itself."""
    plan: dict[str, tuple[str, Decoder, bool]] | None = None

    def decode_record(data: Any) -> Any:
        nonlocal plan
        fields = plan if plan is not None else (plan := _fields(cls))
        if type(data) is not dict and not isinstance(data, Mapping):
            raise _Fault(f"expected a map, got {_kind(data)}", cls.__name__)
        if not data.keys() <= fields.keys():
            unknown = sorted(str(k) for k in data if k not in fields)
            raise _Fault(f"unknown field (known: {', '.join(fields) or 'none'})").field(unknown[0])
        values = {}
        for name, (attribute, decoder, required) in fields.items():
            value = data.get(name, _ABSENT)
            if value is not _ABSENT:
                try:
                    values[attribute] = decoder(value)
                except _Fault as fault:
                    fault.field(name)
                    raise
            elif required:
                raise _Fault("missing field").field(name)
        return cls(**values)
    return decode_record


def _fields(cls: Any) -> dict[str, tuple[str, Decoder, bool]]:
    """Wire name: (attribute, decoder, required), in the order of the class."""
    hints = typing.get_type_hints(cls)
    return {_wire_name(f): (f.name, _decoder(hints[f.name], f.metadata.get("limit")),
                            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)}


def _list(item: Decoder, most: int, as_tuple: bool) -> Decoder:
    def decode_list(data: Any) -> Any:
        if not isinstance(data, list | tuple):
            raise _Fault(f"expected a list, got {_kind(data)}")
        if len(data) > most:
            raise _Fault(f"longer than {most}")
        out = []
        try:
            for d in data:
                out.append(item(d))
        except _Fault as fault:
            fault.item(f"[{len(out)}]")
            raise
        return tuple(out) if as_tuple else out
    return decode_list


def _fixed(items: list[Decoder], most: int) -> Decoder:
    """`tuple[X, Y, Z]`: exactly one item per member."""
    def decode_fixed(data: Any) -> tuple[Any, ...]:
        if not isinstance(data, list | tuple):
            raise _Fault(f"expected a list, got {_kind(data)}")
        if len(data) > most:
            raise _Fault(f"longer than {most}")
        if len(data) != len(items):
            raise _Fault(f"expected {len(items)} items, got {len(data)}")
        out = []
        try:
            for item, d in zip(items, data, strict=True):
                out.append(item(d))
        except _Fault as fault:
            fault.item(f"[{len(out)}]")
            raise
        return tuple(out)
    return decode_fixed


_ROW_KINDS = frozenset({int, str, bool, bytes})


def _row(kinds: list[type], fixed: Decoder) -> Decoder:
    """A tuple of plain values (a peer, an entry: the items of the hottest answers) checked at once, by the
    exact type of each item; anything unusual (a bool for an int, an overlong string, a tuple of another
    length) goes the way of `_fixed`, which says what is wrong."""
    sized = [i for i, kind in enumerate(kinds) if kind in (str, bytes)]

    def decode_row(data: Any) -> Any:
        if type(data) is list and [*map(type, data)] == kinds:
            for i in sized:
                if len(data[i]) > MAX_ITEMS:
                    return fixed(data)
            return tuple(data)
        return fixed(data)
    return decode_row


def _map(key: Decoder, item: Decoder, most: int) -> Decoder:
    def decode_map(data: Any) -> dict[Any, Any]:
        if not isinstance(data, Mapping):
            raise _Fault(f"expected a map, got {_kind(data)}")
        if len(data) > most:
            raise _Fault(f"longer than {most}")
        out = {}
        for k, v in data.items():
            try:
                decoded = key(k)
            except _Fault as fault:
                fault.item(" key")
                raise
            try:
                out[decoded] = item(v)
            except _Fault as fault:
                fault.item(f".{k}")
                raise
        return out
    return decode_map


def _float(data: Any) -> float:
    if type(data) is float and math.isfinite(data):
        return data
    if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(data):
        raise _Fault(f"expected a finite number, got {data!r}")
    return float(data)


def _instance(kind: Any, most: int) -> Decoder:
    """int, bool, str or bytes: an instance (a bool is no int), a string or bytes at most `most` long."""
    sized = kind in (str, bytes)
    refused = bool if kind is int else ()

    def decode_instance(data: Any) -> Any:
        if type(data) is not kind and (not isinstance(data, kind) or isinstance(data, refused)):
            raise _Fault(f"expected {kind.__name__}, got {_kind(data)}")
        if sized and len(data) > most:
            raise _Fault(f"longer than {most}")
        return data
    return decode_instance


def _none(data: Any) -> None:
    if data is not None:
        raise _Fault(f"expected nothing, got {_kind(data)}")


def _no_rule(kind: Any) -> Decoder:
    def refuse(data: Any) -> Any:
        raise _NoRule(f"the codec has no rule for {kind!r}")
    return refuse


def encode(value: Any) -> Any:
    """A dataclass (nested ones too) as plain msgpack values; other values as they are."""
    kind = type(value)
    return value if kind in _PLAIN else _ENCODERS[kind](value)


_PLAIN = frozenset({int, str, float, bool, bytes, type(None)})
Encoder = Callable[[Any], Any]


class _Encoders(dict[type, Encoder]):
    """How `encode` writes a value of each class, chosen at the first value of that class."""

    def __missing__(self, kind: type) -> Encoder:
        if dataclasses.is_dataclass(kind):
            encoder = _record_encoder(kind)
        elif issubclass(kind, list | tuple):
            encoder = _encode_items
        elif issubclass(kind, dict):
            encoder = _encode_map
        else:
            encoder = _as_is
        self[kind] = encoder
        return encoder


_ENCODERS = _Encoders()


_KEPT = object()
"""The default of a field that is not sparse: the field always travels."""


def _record_encoder(cls: Any) -> Encoder:
    fields = [(_wire_name(f), f.name, _default(f) if f.metadata.get("sparse") else _KEPT)
              for f in dataclasses.fields(cls)]

    def encode_record(value: Any) -> dict[str, Any]:
        out = {}
        for name, attribute, default in fields:
            v = getattr(value, attribute)
            if default is _KEPT or v != default:
                out[name] = v if type(v) in _PLAIN else _ENCODERS[type(v)](v)
        return out
    return encode_record


def _encode_items(value: list[Any] | tuple[Any, ...]) -> list[Any]:
    if _PLAIN.issuperset(map(type, value)):  # a peer, an entry: copied without a step per item
        return list(value)
    return [v if type(v) in _PLAIN else _ENCODERS[type(v)](v) for v in value]


def _encode_map(value: dict[Any, Any]) -> dict[Any, Any]:
    return {k: v if type(v) in _PLAIN else _ENCODERS[type(v)](v) for k, v in value.items()}


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
