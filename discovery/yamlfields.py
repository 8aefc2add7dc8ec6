"""Validation primitives for the YAML files users write (VE specs, campaigns), sans IO except `read`.

Each format validates the composed node tree itself, with these primitives, rather than what `yaml.safe_load`
builds, because:

- errors are one line naming the source, the line and the field path ("source:line: path: reason"), so that a
  user can fix the file without guessing; only the first error is reported;
- nothing is constructed from tags: a value is read only where the format expects it, as what it expects;
- nesting is limited (`compose`'s `max_depth`): PyYAML composes recursively, so deep input hits RecursionError;
- size is limited (`read`, `check_text`), before any parsing.

The same primitives take plain data too (dicts, lists, scalars: what a peer sends on the wire), with the same
rules; plain data has no lines to show.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Self, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

T = TypeVar("T", bound=str)

_DURATION_RE = re.compile(r"([0-9]{1,9})|(?:([0-9]{1,6})h)?(?:([0-9]{1,6})m)?(?:([0-9]{1,6})s)?")
_DURATION_RULE = "seconds, or as in 30s, 5m, 1h30m"

_YAML_TAG_PREFIX = "tag:yaml.org,2002:"
_STR_TAG = _YAML_TAG_PREFIX + "str"
_INT_TAG = _YAML_TAG_PREFIX + "int"
_FLOAT_TAG = _YAML_TAG_PREFIX + "float"
_BOOL_TAG = _YAML_TAG_PREFIX + "bool"
_NULL_TAG = _YAML_TAG_PREFIX + "null"
_MAP_TAG = _YAML_TAG_PREFIX + "map"
_SEQ_TAG = _YAML_TAG_PREFIX + "seq"
_MERGE_TAG = _YAML_TAG_PREFIX + "merge"
_YAML_TAG_RE = re.compile("^" + re.escape(_YAML_TAG_PREFIX))  # shown as the usual "!!" shorthand
# The line breaks PyYAML counts in its marks, so that lines we compute ourselves agree with its own.
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
_MAX_SHOWN = 40

# Used only for its YAML 1.1 number syntax (0x1f, 1_000, 1:30, .5, ...); it never constructs objects from tags.
_CONSTRUCTOR = SafeConstructor()


class FieldError(ValueError):
    """An invalid file or value; str() is one line, 'source[:line]: [path: ]reason', fit to show a user as is.

    Each format raises its own subclass (`error_type` of the functions and of `Fields`), so that its callers
    catch its errors only."""

    @classmethod
    def at(cls, source: str, reason: str, *, line: int | None = None, path: str = "") -> Self:
        """The one-line error; unknown parts are left out."""
        location = source if line is None else f"{source}:{line}"
        return cls(": ".join(part for part in (location, path, reason) if part))


def read(path: str | Path, max_bytes: int, error_type: type[FieldError] = FieldError) -> str:
    """A file's text, reading no more than `max_bytes` (refused if larger); errors are named after the path."""
    source = str(path)
    try:
        with Path(path).open("rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise error_type.at(source, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise _too_large(source, max_bytes, error_type)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error_type.at(source, f"not valid UTF-8: {exc.reason} at byte {exc.start}",
                            line=_line_at(data[:exc.start].decode("utf-8"))) from None


def check_text(text: str, source: str, max_bytes: int, error_type: type[FieldError] = FieldError) -> None:
    """Refuses a text that is more than `max_bytes` of UTF-8, or that UTF-8 cannot encode (lone surrogates)."""
    if len(text) > max_bytes:  # each character takes at least one byte: skip encoding huge texts
        raise _too_large(source, max_bytes, error_type)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise error_type.at(source, f"not valid UTF-8: cannot encode {text[exc.start]!r}",
                            line=_line_at(text[:exc.start])) from None
    if size > max_bytes:
        raise _too_large(source, max_bytes, error_type)


def compose(text: str, source: str, max_depth: int, error_type: type[FieldError] = FieldError) -> Node | None:
    """The YAML node tree (None for an empty document), which keeps the line of every value; nothing is
    constructed from tags. Nesting deeper than `max_depth` is refused."""
    try:
        loader = _Loader(text, max_depth)  # its reader already refuses unprintable characters
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = "; ".join(part for part in (exc.context, exc.problem) if part)
        raise error_type.at(source, f"invalid YAML: {reason}", line=mark.line + 1 if mark else None) from None
    except ReaderError as exc:
        raise error_type.at(source, f"invalid YAML: character {chr(exc.character)!r} is not allowed",
                            line=_line_at(text[:exc.position])) from None


class _Loader(yaml.SafeLoader):
    """SafeLoader with a nesting limit: PyYAML composes recursively, so deep input hits RecursionError."""

    def __init__(self, stream: str, max_depth: int) -> None:
        super().__init__(stream)
        self._depth = 0
        self._max_depth = max_depth

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self._depth >= self._max_depth:
            raise yaml.composer.ComposerError(None, None, f"nesting is deeper than {self._max_depth} levels",
                                              self.peek_event().start_mark)  # type: ignore[no-untyped-call, unused-ignore]
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class Fields:
    """Reads the values of a document, given as a composed YAML node tree or as plain data, with the same rules.

    A format subclasses it with a method for each of its own parts, and sets `error_type` to its error. Each
    method takes the value (`obj`) and its field path for errors, and returns the value checked, or raises.
    Only what is asked for is walked, so aliases, even cyclic ones, cannot make validation loop or blow up.
    """

    error_type: ClassVar[type[FieldError]] = FieldError

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, obj: object, path: str, reason: str) -> FieldError:
        """The error to raise about `obj`, on its line if it has one."""
        return self.error_type.at(self.source, reason, line=line(obj), path=path)

    def mapping(
        self, obj: object, path: str, keys: tuple[str, ...], required: tuple[str, ...]
    ) -> dict[str, object]:
        """The values of a mapping by key; refuses non-string, unknown, duplicate and missing keys."""
        if isinstance(obj, MappingNode) and obj.tag == _MAP_TAG:
            pairs = [(key, string(key), value) for key, value in obj.value]
        elif isinstance(obj, Mapping):
            pairs = [(key, string(key), value) for key, value in obj.items()]
        else:
            raise self.error(obj, path, f"expected a mapping, got {describe(obj)}")
        values: dict[str, object] = {}
        key_objs: dict[str, object] = {}
        for key_obj, key, value in pairs:
            if key is None:
                raise self.error(key_obj, path, f"expected string keys, got {describe(key_obj)}")
            if key not in keys:
                raise self.error(key_obj, path, f"unknown key {key!r}; allowed keys are {', '.join(keys)}")
            if key in values:
                first_line = line(key_objs[key])
                raise self.error(key_obj, path, f"duplicate key {key!r}, first given on line {first_line}")
            values[key] = value
            key_objs[key] = key_obj
        for key in required:
            if key not in values:
                raise self.error(obj, path, f"missing required key {key!r}")
        return values

    def items(self, obj: object, path: str, what: str) -> list[object]:
        """The items of a list (a YAML sequence, or a list or tuple on the wire)."""
        if isinstance(obj, SequenceNode) and obj.tag == _SEQ_TAG:
            return list(obj.value)
        if isinstance(obj, list | tuple):
            return list(obj)
        raise self.error(obj, path, f"expected {what}, got {describe(obj)}")

    def boolean(self, obj: object, path: str) -> bool:
        value = boolean(obj)
        if value is None:
            raise self.error(obj, path, f"must be true or false, got {describe(obj)}")
        return value

    def text(self, obj: object, path: str, pattern: re.Pattern[str], rule: str) -> str:
        """A string that `pattern` matches whole; `rule` says what it allows, in words."""
        value = string(obj)
        if value is None or not pattern.fullmatch(value):
            raise self.error(obj, path, f"must be {rule}, got {describe(obj)}")
        return value

    def integer(self, obj: object, path: str, bounds: tuple[int, int]) -> int:
        low, high = bounds
        value = _integer(obj)
        if value is None or not low <= value <= high:
            raise self.error(obj, path, f"must be an integer between {low} and {high}, got {describe(obj)}")
        return value

    def number(self, obj: object, path: str, bounds: tuple[float, float]) -> float:
        """An integer or a float (a rate of 0.5 per second), between the bounds; NaN never is."""
        low, high = bounds
        value = _number(obj)
        if value is None or not low <= value <= high:
            raise self.error(obj, path, f"must be a number between {low} and {high}, got {describe(obj)}")
        return value

    def choice(self, obj: object, path: str, options: tuple[T, ...]) -> T:
        """One of `options` (strings), named by `obj`."""
        chosen = next((o for o in options if o == string(obj)), None)
        if chosen is None:
            raise self.error(obj, path, f"must be one of {', '.join(options)}, got {describe(obj)}")
        return chosen

    def duration(self, obj: object, path: str, bounds: tuple[int, int]) -> int:
        """Whole seconds, from an integer or a string ("90", "30s", "5m", "1h30m")."""
        low, high = bounds
        seconds = _integer(obj)
        text = string(obj)
        if seconds is None and text is not None:
            seconds = _seconds(text)
        if seconds is None or not low <= seconds <= high:
            raise self.error(obj, path, f"must be a duration from {format_duration(low)} to {format_duration(high)} "
                             f"({_DURATION_RULE}), got {describe(obj)}")
        return seconds


def format_duration(seconds: int) -> str:
    """Whole seconds as a file writes them (`Fields.duration`): 30s, 5m, 1h30m."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    shown = "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
    return shown or "0s"


def line(obj: object) -> int | None:
    """The 1-based line a YAML node starts on; None for plain data."""
    return obj.start_mark.line + 1 if isinstance(obj, Node) else None


def string(obj: object) -> str | None:
    """The string a value is (a YAML string, quoted or not), None if it is not one."""
    if isinstance(obj, Node):
        return obj.value if isinstance(obj, ScalarNode) and obj.tag == _STR_TAG else None
    return obj if isinstance(obj, str) else None


def boolean(obj: object) -> bool | None:
    """YAML's booleans (true, false, and YAML 1.1's yes, no, on, off); on the wire, only a real bool."""
    if isinstance(obj, Node):
        if isinstance(obj, ScalarNode) and obj.tag == _BOOL_TAG:
            return bool(_CONSTRUCTOR.construct_yaml_bool(obj))
        return None
    return obj if isinstance(obj, bool) else None


def is_null(obj: object) -> bool:
    """Whether a value is null (YAML's null, ~ or nothing; None on the wire): for optional keys given as such."""
    return obj is None or (isinstance(obj, ScalarNode) and obj.tag == _NULL_TAG)


def describe(obj: object) -> str:
    """A rejected value for an error message: strings quoted, other scalars as written, one short line."""
    if isinstance(obj, Node):
        if isinstance(obj, MappingNode) and obj.tag == _MAP_TAG:
            return "a mapping"
        if isinstance(obj, SequenceNode) and obj.tag == _SEQ_TAG:
            return "a list"
        if is_null(obj):
            return "null"
        if isinstance(obj, ScalarNode) and obj.tag == _MERGE_TAG:
            return "'<<' (merge keys are not supported)"
        if isinstance(obj, ScalarNode) and obj.tag.startswith(_YAML_TAG_PREFIX):
            shown = repr(obj.value) if obj.tag == _STR_TAG else repr(obj.value)[1:-1]
        else:  # %-escapes in a tag can spell any character, hence repr
            shown = "a value tagged " + repr(_YAML_TAG_RE.sub("!!", obj.tag))[1:-1]
    elif isinstance(obj, Mapping):
        return "a mapping"
    elif isinstance(obj, list | tuple):
        return "a list"
    else:
        shown = repr(obj)
    return shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN - 3] + "..."


def _integer(obj: object) -> int | None:
    """Booleans are rejected although Python makes them ints: `vcpus: yes` is a mistake, not 1 vCPU."""
    if isinstance(obj, Node):
        if not (isinstance(obj, ScalarNode) and obj.tag == _INT_TAG):
            return None
        try:
            return _CONSTRUCTOR.construct_yaml_int(obj)
        except ValueError:  # an explicit `!!int lots`, or more digits than Python converts
            return None
    return int(obj) if isinstance(obj, int) and not isinstance(obj, bool) else None


def _number(obj: object) -> float | None:
    """An integer (see `_integer`) or a float, as a float; None if it is neither or too large for a float."""
    if isinstance(obj, ScalarNode) and obj.tag == _FLOAT_TAG:
        try:
            return float(_CONSTRUCTOR.construct_yaml_float(obj))
        except ValueError:  # an explicit `!!float lots`
            return None
    if isinstance(obj, float):
        return obj
    integer = _integer(obj)
    try:
        return float(integer) if integer is not None else None
    except OverflowError:
        return None


def _seconds(text: str) -> int | None:
    """The seconds a duration string says (see `Fields.duration`), None if it is none."""
    match = _DURATION_RE.fullmatch(text)
    if match is None or not any(match.groups()):
        return None
    plain, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return plain + hours * 3600 + minutes * 60 + seconds


def _too_large(source: str, max_bytes: int, error_type: type[FieldError]) -> FieldError:
    return error_type.at(source, f"larger than the limit of {max_bytes} bytes")


def _line_at(prefix: str) -> int:
    """The 1-based line on which the text following prefix starts."""
    return len(_LINE_BREAK.findall(prefix)) + 1
