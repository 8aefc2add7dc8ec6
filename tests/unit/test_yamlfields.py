"""Tests for discovery.yamlfields: the primitives YAML formats share (the VE spec's are tested in test_spec*.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery.yamlfields import FieldError, Fields, compose, describe, read

RATES = (0.0, 100.0)


class CampaignError(FieldError):
    """A format's own error, to check that the primitives raise it."""


class Campaign(Fields):
    error_type = CampaignError


def field(value: str) -> object:
    """The node of `value` written on line 2 of a file, as `rate: <value>`."""
    root = compose(f"# a campaign\nrate: {value}\n", "c.yaml", max_depth=4)
    return Campaign("c.yaml").mapping(root, "", ("rate",), required=("rate",))["rate"]


def number_error(value: object) -> str:
    with pytest.raises(CampaignError) as info:
        Campaign("c.yaml").number(value, "rate", RATES)
    return str(info.value)


@pytest.mark.parametrize(("written", "expected"), [("0.5", 0.5), ("2", 2.0), ("1_0", 10.0), (".5", 0.5),
                                                   ("1.5e+1", 15.0), ("0x10", 16.0), ("100", 100.0)])
def test_a_number_is_a_yaml_int_or_float(written: str, expected: float) -> None:
    assert Campaign("c.yaml").number(field(written), "rate", RATES) == expected


@pytest.mark.parametrize("written", ["true", "yes", "off", "'0.5'", ".nan", ".inf", "-0.1", "100.5", "[1]", "~"])
def test_a_number_refuses_booleans_strings_and_what_is_out_of_bounds_on_its_line(written: str) -> None:
    message = number_error(field(written))
    assert message.startswith("c.yaml:2: rate: must be a number between 0.0 and 100.0, got "), message


@given(st.floats(allow_nan=False) | st.integers())
def test_a_number_on_the_wire_is_kept_within_its_bounds(value: float) -> None:
    low, high = RATES
    if low <= value <= high:
        assert Campaign("<wire>").number(value, "rate", RATES) == value
    else:
        assert "must be a number" in number_error(value)


@pytest.mark.parametrize("value", [True, False, "1", None, math.nan, 10**400])
def test_a_number_on_the_wire_refuses_booleans_strings_nan_and_huge_integers(value: object) -> None:
    assert number_error(value) == f"c.yaml: rate: must be a number between 0.0 and 100.0, got {describe(value)}"


@pytest.mark.parametrize("written", ["1.5", "true", "'3'"])
def test_an_integer_refuses_floats_booleans_and_strings_on_their_line(written: str) -> None:
    with pytest.raises(CampaignError, match=r"^c\.yaml:2: rate: must be an integer between 0 and 9, got "):
        Campaign("c.yaml").integer(field(written), "rate", (0, 9))


def test_errors_of_the_reader_and_composer_are_of_the_format_and_on_their_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"rate: 1\nname: \xff\n")
    with pytest.raises(CampaignError, match=rf"^{path}:2: not valid UTF-8"):
        read(path, 100, CampaignError)
    with pytest.raises(CampaignError, match=rf"^{path}: larger than the limit of 10 bytes$"):
        read(path, 10, CampaignError)
    with pytest.raises(CampaignError, match=r"^c\.yaml:2: invalid YAML: nesting is deeper than 2 levels$"):
        compose("a:\n  b:\n    c: 1\n", "c.yaml", 2, CampaignError)
    with pytest.raises(FieldError, match=r"^c\.yaml:2: invalid YAML"):
        compose("a: 1\n: : [\n", "c.yaml", 8)
