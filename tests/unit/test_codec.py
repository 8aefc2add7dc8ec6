"""The type-driven codec: what decodes round-trips, and every malformed message is one CodecError line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.wire.codec import CodecError, decode, encode, limit, sparse, wire


@dataclass(frozen=True)
class Inner:
    tag: str
    weight: float = 1.0


@dataclass(frozen=True)
class Outer:
    name: str = field(metadata=limit(8))
    count: int
    mode: Literal["a", "b"] = "a"
    inner: Inner | None = None
    items: list[Inner] = field(default_factory=list)
    pair: tuple[int, str] = (0, "")
    extra: dict[str, int] = field(default_factory=dict)
    sender: str | None = field(default=None, metadata=wire("from"))
    blob: Any = None


inners = st.builds(Inner, tag=st.text(max_size=5), weight=st.floats(allow_nan=False, allow_infinity=False))
outers = st.builds(Outer, name=st.text(max_size=8), count=st.integers(-2**63, 2**63 - 1),
                   mode=st.sampled_from(["a", "b"]), inner=st.none() | inners, items=st.lists(inners, max_size=3),
                   pair=st.tuples(st.integers(0, 9), st.text(max_size=3)),
                   extra=st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=3),
                   sender=st.none() | st.text(max_size=4),
                   blob=st.none() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=3))


@given(outers)
def test_what_encodes_decodes_to_the_same_value_through_msgpack(value: Outer) -> None:
    wire_bytes = msgpack.packb(encode(value))
    assert decode(Outer, msgpack.unpackb(wire_bytes)) == value


def test_a_python_keyword_travels_under_its_wire_name() -> None:
    assert encode(Outer("n", 1, sender="x"))["from"] == "x"
    assert decode(Outer, {"name": "n", "count": 1, "from": "y"}).sender == "y"


@pytest.mark.parametrize("data, message", [
    ({"name": "n"}, "count: missing field"),
    ({"name": "n", "count": 1, "colour": 2}, "colour: unknown field"),
    ({"name": "n", "count": True}, "count: expected int, got bool"),
    ({"name": "n", "count": "1"}, "count: expected int, got str"),
    ({"name": "too long a name", "count": 1}, "name: longer than 8"),
    ({"name": "n", "count": 1, "mode": "c"}, "mode: expected one of a, b"),
    ({"name": "n", "count": 1, "items": [{"tag": 3}]}, "items[0].tag: expected str, got int"),
    ({"name": "n", "count": 1, "inner": {"weight": 2}}, "inner.tag: missing field"),
    ({"name": "n", "count": 1, "pair": [1]}, "pair: expected 2 items, got 1"),
    ({"name": "n", "count": 1, "extra": {"k": "v"}}, "extra.k: expected int, got str"),
    ([1, 2], "Outer: expected a map, got a list"),
])
def test_each_fault_is_one_line_naming_the_field(data: Any, message: str) -> None:
    with pytest.raises(CodecError) as caught:
        decode(Outer, data)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_int_is_a_fine_float() -> None:
    assert decode(Inner, {"tag": "t", "weight": 2}).weight == 2.0


@pytest.mark.parametrize("kind, data", [(bool, True), (list[Inner], [Inner("t")]), (Inner | None, None),
                                        (type(None), None), (bytes, b"x" * 3_000_000)])
def test_an_answer_may_be_any_type_the_codec_knows_bounded_only_by_its_frame(kind: Any, data: Any) -> None:
    assert decode(kind, encode(data)) == data


@pytest.mark.parametrize("kind, data, message", [
    (bool, 1, "bool: expected bool, got int"),
    (list[Inner], [{"tag": 1}], "[0].tag: expected str, got int"),
    (type(None), {}, "expected nothing, got a map"),
])
def test_an_answer_that_does_not_fit_its_type_is_one_line(kind: Any, data: Any, message: str) -> None:
    with pytest.raises(CodecError, match=message.replace("[", r"\[")):
        decode(kind, data)


@dataclass(frozen=True)
class Sparse:
    name: str
    note: str | None = field(default=None, metadata=sparse())
    tags: tuple[str, ...] = field(default=(), metadata=sparse())
    slots: Mapping[str, Inner] = field(default_factory=dict, metadata=sparse())
    count: int = 0


sparses = st.builds(Sparse, name=st.text(max_size=3), note=st.none() | st.text(max_size=3),
                    tags=st.lists(st.text(max_size=2), max_size=2).map(tuple),
                    slots=st.dictionaries(st.text(max_size=2), inners, max_size=2), count=st.integers(0, 3))


@given(sparses)
def test_sparse_fields_round_trip_and_travel_only_when_set(value: Sparse) -> None:
    wire_form = encode(value)
    assert decode(Sparse, msgpack.unpackb(msgpack.packb(wire_form))) == value
    assert ("note" in wire_form) == (value.note is not None) and ("tags" in wire_form) == bool(value.tags)
    assert ("slots" in wire_form) == bool(value.slots) and "count" in wire_form  # not sparse: always there


def test_a_mapping_field_decodes_as_a_dict_and_is_checked() -> None:
    assert decode(Sparse, {"name": "n", "slots": {"a": {"tag": "t"}}}).slots == {"a": Inner("t")}
    with pytest.raises(CodecError, match=r"^slots\.a\.tag: expected str, got int$"):
        decode(Sparse, {"name": "n", "slots": {"a": {"tag": 1}}})


class OutOfRange(ValueError):
    """What a type's own check raises (the RPC layer's is `RequestError`): not a CodecError."""


@dataclass(frozen=True)
class Bounded:
    low: int
    high: int

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise OutOfRange(f"need 0 <= low <= high, got {self.low} and {self.high}")


def test_a_type_s_own_check_runs_after_the_codec_s_and_its_error_passes_through_unchanged() -> None:
    """The codec refuses the types (one CodecError line); the type refuses the values, in its own words."""
    assert decode(Bounded, {"low": 1, "high": 2}) == Bounded(1, 2)
    with pytest.raises(CodecError, match=r"^high: expected int, got str$"):
        decode(Bounded, {"low": 1, "high": "2"})  # the type's check never sees a value of the wrong type
    with pytest.raises(OutOfRange, match=r"^need 0 <= low <= high, got 3 and 2$"):
        decode(list[Bounded], [{"low": 3, "high": 2}])
