"""Tests for discovery.spec: the VE spec model, its YAML parser and the validation both entry points share."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from discovery.spec import MAX_SPEC_BYTES, MAX_VMS, SpecError, VESpec, VMSpec, load_spec, parse_spec

VALID = """\
name: web-shop
site: lyon
vms:
  - name: front
    vcpus: 2
    memory_mb: 1024
    disk_gb: 10
    image: debian-12
  - name: db
    vcpus: 4
    memory_mb: 4096
"""

# Line 3 holds the first VM's fields, so a substituted field is reported on line 3.
ONE_VM = "name: ve\nvms:\n  - {name: a, vcpus: 1, memory_mb: 16, %s}\n"


def spec_error(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "spec.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def assert_error(text: str, line: int | None, *fragments: str) -> None:
    message = spec_error(text)
    prefix = "spec.yaml: " if line is None else f"spec.yaml:{line}: "
    assert message.startswith(prefix), message
    for fragment in fragments:
        assert fragment in message, message


def wire_error(data: object) -> str:
    with pytest.raises(SpecError) as info:
        VESpec.from_dict(data)  # type: ignore[arg-type]
    return str(info.value)


def test_valid_spec_parses_with_defaults() -> None:
    spec = parse_spec(VALID)
    assert spec == VESpec(
        name="web-shop",
        site="lyon",
        vms=(VMSpec("front", 2, 1024, 10, "debian-12"), VMSpec("db", 4, 4096, 1, "none")),
    )


def test_site_is_optional_and_may_be_null() -> None:
    assert parse_spec(VALID.replace("site: lyon\n", "")).site is None
    assert parse_spec(VALID.replace("site: lyon", "site: ~")).site is None


def test_yaml_integer_syntax_is_accepted() -> None:
    spec = parse_spec(ONE_VM % "disk_gb: 0x10, image: a:b/c")
    assert spec.vms[0].disk_gb == 16
    assert spec.vms[0].image == "a:b/c"


def test_to_dict_is_plain_data_that_round_trips_through_msgpack() -> None:
    spec = parse_spec(VALID)
    data = spec.to_dict()
    assert data == {
        "name": "web-shop",
        "site": "lyon",
        "vms": [
            {"name": "front", "vcpus": 2, "memory_mb": 1024, "disk_gb": 10, "image": "debian-12"},
            {"name": "db", "vcpus": 4, "memory_mb": 4096, "disk_gb": 1, "image": "none"},
        ],
    }
    assert VESpec.from_dict(data) == spec
    assert VESpec.from_dict(msgpack.unpackb(msgpack.packb(data))) == spec


def test_from_dict_applies_defaults_and_accepts_tuples() -> None:
    spec = VESpec.from_dict({"name": "x", "vms": ({"name": "a", "vcpus": 1, "memory_mb": 16},)})
    assert spec == VESpec("x", (VMSpec("a", 1, 16, 1, "none"),))


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        ("- a\n- b\n", 1, ["expected a mapping, got a list"]),
        ("just words\n", 1, ["expected a mapping, got 'just words'"]),
        ("name: x\ncolour: red\nvms: []\n", 2, ["unknown key 'colour'", "name, site, vms"]),
        (ONE_VM % "colour: red", 3, ["vms[0]: unknown key 'colour'", "vcpus, memory_mb, disk_gb, image"]),
        ("name: x\nsite: a\nname: y\n", 3, ["duplicate key 'name'", "line 1"]),
        (ONE_VM % "vcpus: 2", 3, ["vms[0]: duplicate key 'vcpus'", "line 3"]),
        ("name: x\n1: y\n", 2, ["expected string keys, got 1"]),
        ("name: x\nvms:\n  - name: a\n    <<: {vcpus: 1}\n", 4, ["vms[0]", "merge keys are not supported"]),
        ("name: x\n", 1, ["missing required key 'vms'"]),
        ("name: x\nvms:\n  - name: a\n    vcpus: 1\n", 3, ["vms[0]: missing required key 'memory_mb'"]),
    ],
)
def test_structure_errors(text: str, line: int, fragments: list[str]) -> None:
    assert_error(text, line, *fragments)


def test_vm_mapping_may_not_be_a_scalar() -> None:
    assert_error("name: x\nvms:\n  - a\n  - b\n", 3, "vms[0]: expected a mapping, got 'a'")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("Web", "'Web'"),
        ("-web", "'-web'"),
        ("web-", "'web-'"),
        ("a" * 64, "'aaaa"),
        ("'we b'", "'we b'"),
        ("''", "''"),
        ("wéb", "'wéb'"),
        ('"web\\n"', "'web\\n'"),
        ("123", "123"),
        ("true", "true"),
        ("null", "null"),
        ("[a]", "a list"),
    ],
)
def test_bad_ve_name(value: str, shown: str) -> None:
    assert_error(f"name: {value}\nvms: []\n", 1, "name: must be 1-63 characters of a-z, 0-9, '.', '_' or '-'",
                 f"got {shown}")


def test_name_boundaries() -> None:
    for good in ("a", "0", "a" * 63, "a.b_c-d"):
        assert parse_spec(f"name: '{good}'\nvms: [{{name: '{good}', vcpus: 1, memory_mb: 16}}]").name == good


def test_bad_site() -> None:
    assert_error("name: x\nsite: Lyon\nvms: []\n", 2, "site: must be 1-63 characters", "got 'Lyon'")
    assert_error("name: x\nsite: 42\nvms: []\n", 2, "site: must be", "got 42")


def test_bad_vm_name() -> None:
    text = "name: x\nvms:\n  - name: DB\n    vcpus: 1\n    memory_mb: 16\n"
    assert_error(text, 3, "vms[0].name: must be 1-63 characters", "got 'DB'")


@pytest.mark.parametrize(
    ("vms", "line", "fragments"),
    [
        ("", 2, ["vms: expected a list of VMs, got null"]),
        (" {a: 1}", 2, ["vms: expected a list of VMs, got a mapping"]),
        (" []", 2, ["vms: must list 1 to 64 VMs, got 0"]),
    ],
)
def test_bad_vm_list(vms: str, line: int, fragments: list[str]) -> None:
    assert_error(f"name: x\nvms:{vms}\n", line, *fragments)


def vm_lines(count: int) -> str:
    return "".join(f"  - {{name: v{i}, vcpus: 1, memory_mb: 16}}\n" for i in range(count))


def test_vm_count_limit() -> None:
    assert len(parse_spec("name: x\nvms:\n" + vm_lines(MAX_VMS)).vms) == MAX_VMS
    assert_error("name: x\nvms:\n" + vm_lines(MAX_VMS + 1), 3, "vms: must list 1 to 64 VMs, got 65")


def test_duplicate_vm_names_name_both_indexes() -> None:
    text = "name: x\nvms:\n" + vm_lines(2) + "  - name: v0\n    vcpus: 1\n    memory_mb: 16\n"
    assert_error(text, 5, "vms[2].name: duplicate VM name 'v0', already used by vms[0]")


def test_memory_error_matches_the_documented_format() -> None:
    text = VALID.replace("memory_mb: 4096", "memory_mb: lots")
    assert spec_error(text) == (
        "spec.yaml:11: vms[1].memory_mb: must be an integer between 16 and 1048576, got 'lots'"
    )


@pytest.mark.parametrize(
    ("field", "value", "shown", "bounds"),
    [
        ("vcpus", "true", "true", "1 and 256"),
        ("vcpus", "yes", "yes", "1 and 256"),
        ("vcpus", "1.5", "1.5", "1 and 256"),
        ("vcpus", "'2'", "'2'", "1 and 256"),
        ("vcpus", "0", "0", "1 and 256"),
        ("vcpus", "257", "257", "1 and 256"),
        ("vcpus", "null", "null", "1 and 256"),
        ("vcpus", "[1]", "a list", "1 and 256"),
        ("vcpus", "!!int lots", "lots", "1 and 256"),
        ("vcpus", "!custom 2", "a value tagged !custom", "1 and 256"),
        ("memory_mb", "15", "15", "16 and 1048576"),
        ("memory_mb", "1048577", "1048577", "16 and 1048576"),
        ("disk_gb", "-1", "-1", "0 and 65536"),
        ("disk_gb", "65537", "65537", "0 and 65536"),
        ("disk_gb", "false", "false", "0 and 65536"),
    ],
)
def test_bad_integer(field: str, value: str, shown: str, bounds: str) -> None:
    values = {"vcpus": "1", "memory_mb": "16", "disk_gb": "1", field: value}
    text = "name: ve\nvms:\n  - name: a\n" + "".join(f"    {key}: {v}\n" for key, v in values.items())
    line = {"vcpus": 4, "memory_mb": 5, "disk_gb": 6}[field]
    assert_error(text, line, f"vms[0].{field}: must be an integer between {bounds}, got {shown}")


def test_integer_bounds_are_inclusive() -> None:
    low = parse_spec("name: x\nvms: [{name: a, vcpus: 1, memory_mb: 16, disk_gb: 0}]")
    high = parse_spec("name: x\nvms: [{name: a, vcpus: 256, memory_mb: 1048576, disk_gb: 65536}]")
    assert low.vms[0] == VMSpec("a", 1, 16, 0)
    assert high.vms[0] == VMSpec("a", 256, 1048576, 65536)


@pytest.mark.parametrize(
    ("image", "shown"), [("''", "''"), ("a b", "'a b'"), ("x" * 129, "'xxx"), ("a+b", "'a+b'"), ("12", "12")]
)
def test_bad_image(image: str, shown: str) -> None:
    assert_error(ONE_VM % f"image: {image}", 3, "vms[0].image: must be 1-128 characters", f"got {shown}")


def test_image_length_limit() -> None:
    assert parse_spec(ONE_VM % f"image: {'x' * 128}").vms[0].image == "x" * 128


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_document(text: str) -> None:
    assert_error(text, None, "empty document")


def test_yaml_syntax_error_reports_its_line() -> None:
    assert_error("name: x\nvms:\n  - name: a\n - vcpus: 1\n", 4, "invalid YAML")
    assert_error("name: x\nvms: [a, b\n", 3, "invalid YAML")


def test_several_documents_are_refused() -> None:
    assert_error("name: x\n---\nname: y\n", 2, "invalid YAML", "single document")


def test_unprintable_character_reports_its_line() -> None:
    assert_error("name: x\nvms: []\nsite: a\x00\n", 3, "invalid YAML", r"'\x00'")


def test_text_that_is_not_utf8_is_refused() -> None:
    assert_error("name: x\nsite: \ud800\n", 2, "not valid UTF-8")


def test_deep_nesting_is_refused_without_recursion_error() -> None:
    assert_error("[" * 100_000, 1, "nesting is deeper")


def test_python_tags_are_never_constructed() -> None:
    assert_error("name: x\nvms: !!python/object/apply:os.system [false]\n", 2, "vms: expected a list of VMs")


def test_size_limit() -> None:
    padding = MAX_SPEC_BYTES - len(VALID.encode()) - 2
    assert parse_spec(VALID + "#" + "x" * padding + "\n").name == "web-shop"
    assert_error(VALID + "#" + "x" * (padding + 1) + "\n", None, f"larger than the limit of {MAX_SPEC_BYTES}")
    assert_error(VALID + "#" + "é" * (padding // 2 + 1) + "\n", None, "larger than the limit")


def test_load_spec_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(VALID)
    assert load_spec(path) == parse_spec(VALID)
    assert load_spec(str(path)).name == "web-shop"


def load_error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_load_spec_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(VALID.replace("vcpus: 4", "vcpus: four"))
    assert load_error(path).startswith(f"{path}:10: vms[1].vcpus: must be an integer between 1 and 256")


def test_load_spec_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert load_error(path) == f"{path}: cannot read: No such file or directory"


def test_load_spec_directory(tmp_path: Path) -> None:
    assert load_error(tmp_path) == f"{tmp_path}: cannot read: Is a directory"


def test_load_spec_non_utf8_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"name: x\r\nvms: []\r\nsite: \xff\n")
    assert load_error(path) == f"{path}:3: not valid UTF-8: invalid start byte at byte 24"


def test_load_spec_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"#" * (MAX_SPEC_BYTES + 1))
    assert load_error(path) == f"{path}: larger than the limit of {MAX_SPEC_BYTES} bytes"


def test_from_dict_errors_have_no_line() -> None:
    data = parse_spec(VALID).to_dict()
    data["vms"][1]["memory_mb"] = "lots"
    assert wire_error(data) == (
        "<wire>: vms[1].memory_mb: must be an integer between 16 and 1048576, got 'lots'"
    )


def one_vm(**fields: object) -> dict[str, object]:
    return {"name": "x", "vms": [{"name": "a", "vcpus": 1, "memory_mb": 16, **fields}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "<wire>: expected a mapping, got None"),
        ([], "<wire>: expected a mapping, got a list"),
        ({"name": "x"}, "<wire>: missing required key 'vms'"),
        ({"name": "x", "vms": [], 1: 2}, "<wire>: expected string keys, got 1"),
        ({"name": "x", "vms": [], "ram": 1}, "<wire>: unknown key 'ram'; allowed keys are name, site, vms"),
        ({"name": "X", "vms": []}, "<wire>: name: must be 1-63 characters"),
        ({"name": "x", "vms": "a"}, "<wire>: vms: expected a list of VMs, got 'a'"),
        (one_vm(vcpus=True), "<wire>: vms[0].vcpus: must be an integer between 1 and 256, got True"),
        (one_vm(vcpus=2.0), "<wire>: vms[0].vcpus: must be an integer between 1 and 256, got 2.0"),
        (one_vm(image=b"x"), "<wire>: vms[0].image: must be 1-128 characters"),
    ],
)
def test_from_dict_errors(data: object, message: str) -> None:
    assert wire_error(data).startswith(message)


def test_long_values_are_shortened_in_messages() -> None:
    message = wire_error({"name": "x" * 1000, "vms": []})
    assert message.endswith("got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...")


names = st.from_regex(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?", fullmatch=True)
vm_specs = st.builds(
    VMSpec,
    name=names,
    vcpus=st.integers(1, 256),
    memory_mb=st.integers(16, 1048576),
    disk_gb=st.integers(0, 65536),
    image=st.from_regex(r"[A-Za-z0-9._:/-]{1,128}", fullmatch=True),
)
ve_specs = st.builds(
    VESpec,
    name=names,
    vms=st.lists(vm_specs, min_size=1, max_size=8, unique_by=lambda vm: vm.name).map(tuple),
    site=st.none() | names,
)


@given(ve_specs)
def test_dict_round_trip(spec: VESpec) -> None:
    assert VESpec.from_dict(spec.to_dict()) == spec


@given(ve_specs)
def test_yaml_round_trip(spec: VESpec) -> None:
    assert parse_spec(yaml.safe_dump(spec.to_dict())) == spec


def assert_only_spec_errors(text: str) -> None:
    try:
        parse_spec(text, "fuzz.yaml")
    except SpecError as err:
        assert "\n" not in str(err)


@given(st.text())
def test_arbitrary_text_raises_only_spec_error(text: str) -> None:
    assert_only_spec_errors(text)


@given(st.text(alphabet=" \t\n\r-:?,[]{}&*!|>'\"%@`#.~=<\\abnmesv01\x85\u2028\x00", max_size=200))
def test_yaml_like_text_raises_only_spec_error(text: str) -> None:
    assert_only_spec_errors(text)


@given(st.data())
def test_mangled_specs_raise_only_spec_error(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(VALID)))
    insert = data.draw(st.text(alphabet=" \n-:[]{}&*!'\"#abc01", max_size=10))
    assert_only_spec_errors(VALID[:position] + insert + VALID[position:])


wire_keys = st.sampled_from(["name", "site", "vms", "vcpus", "memory_mb", "disk_gb", "image", "x"])
wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats() | st.text(max_size=3) | st.just(b"x"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(wire_keys, inner),
    max_leaves=20,
)


@given(wire_values)
def test_arbitrary_wire_data_raises_only_spec_error(data: object) -> None:
    try:
        VESpec.from_dict(data)  # type: ignore[arg-type]
    except SpecError as err:
        assert "\n" not in str(err)
