"""Tests for discovery.ve.spec: the VE spec model, its YAML parser and the validation both entry points share."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from discovery.ve.spec import (
    BANDWIDTH_RANGE,
    DEFAULT_MAX_LAG,
    MAX_COPIES,
    MAX_LAG_RANGE,
    MAX_SPEC_BYTES,
    MAX_VMS,
    NO_HA,
    PRIORITY_RANGE,
    REPLICATION_MODES,
    SNAPSHOT_EVERY_RANGE,
    Constraints,
    HaPolicy,
    SpecError,
    VESpec,
    VMSpec,
    format_duration,
    load_spec,
    parse_spec,
)

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


priorities = st.integers(*PRIORITY_RANGE)
ha_policies = st.one_of(
    st.just(NO_HA),
    st.builds(HaPolicy, st.just("standby"), st.integers(1, MAX_COPIES), priority=priorities,
              replication=st.sampled_from(REPLICATION_MODES), bandwidth=st.none() | st.integers(*BANDWIDTH_RANGE),
              max_lag=st.integers(*MAX_LAG_RANGE)),
    st.builds(HaPolicy, st.just("restart"), priority=priorities),
    st.builds(HaPolicy, st.just("restart"), st.just(0), st.integers(*SNAPSHOT_EVERY_RANGE), st.integers(1, 100),
              priorities),
)


@st.composite
def ve_specs(draw: st.DrawFn) -> VESpec:
    """Valid specs, with constraints half of the time (drawn freely; contradictory ones are rejected), and an
    HA policy or none."""
    vms = draw(st.lists(vm_specs, min_size=1, max_size=8, unique_by=lambda vm: vm.name).map(tuple))
    site = draw(st.none() | names)
    ha = draw(ha_policies)
    if len(vms) < 2 or draw(st.booleans()):
        return VESpec(draw(names), vms, site, ha=ha)
    vm_names = [vm.name for vm in vms]
    groups = st.lists(st.lists(st.sampled_from(vm_names), min_size=2, max_size=4, unique=True).map(tuple),
                      max_size=3).map(tuple)
    constraints = Constraints(
        affinity=draw(groups), anti_affinity=draw(groups), same_site=draw(st.booleans()),
        spread_sites=draw(st.none() | st.integers(1, len(vms))), max_per_node=draw(st.none() | st.integers(1, MAX_VMS)))
    spec = VESpec(draw(names), vms, site, constraints, ha)
    try:
        VESpec.from_dict(spec.to_dict())
    except SpecError:
        assume(False)
    return spec


@given(ve_specs())
def test_dict_round_trip(spec: VESpec) -> None:
    assert VESpec.from_dict(spec.to_dict()) == spec
    assert VESpec.from_dict(msgpack.unpackb(msgpack.packb(spec.to_dict()))) == spec


@given(ve_specs())
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


wire_keys = st.sampled_from(["name", "site", "vms", "vcpus", "memory_mb", "disk_gb", "image", "x", "constraints",
                             "affinity", "anti_affinity", "same_site", "spread_sites", "max_per_node", "ha", "mode",
                             "copies", "snapshot_every", "keep", "priority"])
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


# -- constraints -----------------------------------------------------------------------------------

# Lines: 8 constraints, 9 affinity, 10 anti_affinity, 11 same_site, 12 spread_sites, 13 max_per_node.
CONSTRAINED = """\
name: web-shop
site: lyon
vms:
  - {name: front-1, vcpus: 2, memory_mb: 2048}
  - {name: front-2, vcpus: 2, memory_mb: 2048}
  - {name: app, vcpus: 4, memory_mb: 8192}
  - {name: db, vcpus: 8, memory_mb: 16384}
constraints:
  affinity: [[app, db]]
  anti_affinity: [[front-1, front-2]]
  same_site: true
  spread_sites: 1
  max_per_node: 2
"""


def constrained(**lines: str) -> str:
    """CONSTRAINED with some constraint lines replaced ('key: value') or removed (empty string)."""
    text = CONSTRAINED
    for key, line in lines.items():
        old = next(row for row in text.splitlines() if row.startswith(f"  {key}:") or row.startswith(f"{key}:"))
        text = text.replace(old + "\n", line + "\n" if line else "")
    return text


def test_constraints_parse() -> None:
    spec = parse_spec(CONSTRAINED)
    assert spec.constraints == Constraints(
        affinity=(("app", "db"),), anti_affinity=(("front-1", "front-2"),), same_site=True, spread_sites=1,
        max_per_node=2)
    assert spec.site == "lyon"


def test_constraints_default_to_none() -> None:
    assert parse_spec(VALID).constraints == Constraints()
    assert VESpec("x", (VMSpec("a", 1, 16),)).constraints == Constraints()
    for empty in ("constraints:\n", "constraints: {}\n", "constraints: {affinity: [], spread_sites: ~}\n"):
        spec = parse_spec(VALID + empty)
        assert spec.constraints == Constraints()
        assert "constraints" not in spec.to_dict()


def test_yaml_booleans_are_accepted_for_same_site() -> None:
    assert parse_spec(constrained(same_site="  same_site: yes")).constraints.same_site is True
    assert parse_spec(constrained(same_site="  same_site: off")).constraints.same_site is False


def test_constraints_to_dict_keeps_what_is_set_and_round_trips() -> None:
    spec = parse_spec(constrained(same_site="", spread_sites=""))
    assert spec.to_dict()["constraints"] == {
        "affinity": [["app", "db"]], "anti_affinity": [["front-1", "front-2"]], "max_per_node": 2}
    assert VESpec.from_dict(msgpack.unpackb(msgpack.packb(spec.to_dict()))) == spec
    assert parse_spec(yaml.safe_dump(spec.to_dict())) == spec


def test_affinity_groups_sharing_a_vm_are_merged() -> None:
    constraints = Constraints(affinity=(("a", "b"), ("c", "d"), ("e", "f"), ("d", "b")))
    assert constraints.together() == (("a", "b", "c", "d"), ("e", "f"))
    text = constrained(affinity="  affinity: [[app, db], [front-1, db]]", anti_affinity="", max_per_node="")
    assert parse_spec(text).constraints.together() == (("app", "db", "front-1"),)


@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        ({"same_site": "  colour: red"}, 11, "constraints: unknown key 'colour'; allowed keys are affinity, "
                                              "anti_affinity, same_site, spread_sites, max_per_node"),
        ({"affinity": "  affinity: app"}, 9, "constraints.affinity: expected a list of groups of VM names, got 'app'"),
        ({"affinity": "  affinity: [app, db]"}, 9, "constraints.affinity[0]: expected a list of VM names, got 'app'"),
        ({"affinity": "  affinity: [[app, dbx]]"}, 9, "constraints.affinity[0][1]: no VM named 'dbx' in vms"),
        ({"affinity": "  affinity: [[app, DB]]"}, 9, "constraints.affinity[0][1]: must be 1-63 characters"),
        ({"affinity": "  affinity: [[app]]"}, 9, "constraints.affinity[0]: a group needs at least 2 VMs, got 1"),
        ({"affinity": "  affinity: [[app, app]]"}, 9, "constraints.affinity[0][1]: VM 'app' is already in this group"),
        ({"anti_affinity": "  anti_affinity: [[front-1, app, db]]"}, 10,
         "constraints.anti_affinity[0]: vms 'app' and 'db' must be on different nodes, but affinity [app, db] "
         "puts them on one node"),
        ({"affinity": "  affinity: [[app, db], [db, front-1]]", "anti_affinity": "  anti_affinity: [[front-1, app]]",
          "max_per_node": ""}, 10,
         "constraints.anti_affinity[0]: vms 'front-1' and 'app' must be on different nodes, but affinity "
         "[app, db, front-1] puts them on one node"),
        ({"same_site": "  same_site: 1"}, 11, "constraints.same_site: must be true or false, got 1"),
        ({"same_site": "  same_site: 'true'"}, 11, "constraints.same_site: must be true or false, got 'true'"),
        ({"max_per_node": "  max_per_node: 1"}, 13,
         "constraints.max_per_node: 1 is less than the 2 VMs that affinity puts on one node (app, db)"),
        ({"max_per_node": "  max_per_node: 0"}, 13,
         "constraints.max_per_node: must be an integer between 1 and 64, got 0"),
        ({"spread_sites": "  spread_sites: 0"}, 12,
         "constraints.spread_sites: must be an integer between 1 and 64, got 0"),
        ({"spread_sites": "  spread_sites: 2"}, 12,
         "constraints.spread_sites: spread over 2 sites contradicts same_site: true"),
        ({"spread_sites": "  spread_sites: 2", "same_site": "  same_site: false"}, 12,
         "constraints.spread_sites: spread over 2 sites contradicts the pinned site lyon (line 2)"),
        ({"spread_sites": "  spread_sites: 5", "same_site": "", "site": ""}, 10,
         "constraints.spread_sites: spread over 5 sites needs at least 5 VMs, the VE has 4"),
        ({"spread_sites": "  spread_sites: 4", "same_site": "", "site": ""}, 10,
         "constraints.spread_sites: spread over 4 sites needs 4 VMs that can be apart; affinity binds the 4 VMs "
         "into 3 groups"),
    ],
)
def test_constraint_errors(lines: dict[str, str], line: int, message: str) -> None:
    assert spec_error(constrained(**lines)).startswith(f"spec.yaml:{line}: {message}")


def test_constraints_must_be_a_mapping() -> None:
    assert spec_error(VALID + "constraints: [a]\n") == "spec.yaml:12: constraints: expected a mapping, got a list"


def test_constraint_errors_point_at_the_group_item() -> None:
    text = constrained(affinity="  affinity:\n    - [app, db]\n    - - app\n      - nope")
    assert spec_error(text) == "spec.yaml:12: constraints.affinity[1][1]: no VM named 'nope' in vms"


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        ([], "<wire>: constraints: expected a mapping, got a list"),
        ({"same_site": 1}, "<wire>: constraints.same_site: must be true or false, got 1"),
        ({"spread_sites": True}, "<wire>: constraints.spread_sites: must be an integer between 1 and 64, got True"),
        ({"affinity": [["a", "a"]]}, "<wire>: constraints.affinity[0][1]: VM 'a' is already in this group"),
        ({"anti_affinity": [("a", "z")]}, "<wire>: constraints.anti_affinity[0][1]: no VM named 'z' in vms"),
    ],
)
def test_constraint_wire_errors(constraints: object, message: str) -> None:
    assert wire_error({**one_vm(), "constraints": constraints}) == message


def test_wire_pinned_site_contradiction_has_no_line() -> None:
    data = {"name": "x", "site": "lyon", "vms": [{"name": n, "vcpus": 1, "memory_mb": 16} for n in "ab"],
            "constraints": {"spread_sites": 2}}
    assert wire_error(data) == "<wire>: constraints.spread_sites: spread over 2 sites contradicts the pinned site lyon"


def test_wire_groups_may_be_tuples() -> None:
    data = {"name": "x", "vms": [{"name": n, "vcpus": 1, "memory_mb": 16} for n in "ab"],
            "constraints": {"anti_affinity": (("a", "b"),), "same_site": True}}
    assert VESpec.from_dict(data).constraints == Constraints(anti_affinity=(("a", "b"),), same_site=True)


@given(st.data())
def test_mangled_constrained_specs_raise_only_spec_error(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(CONSTRAINED)))
    insert = data.draw(st.text(alphabet=" \n-:[]{}&*!'\"#abc01", max_size=10))
    assert_only_spec_errors(CONSTRAINED[:position] + insert + CONSTRAINED[position:])


def test_examples_are_valid() -> None:
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_spec(path)


# -- HA policy ----------------------------------------------------------------------------------------

# Line 4 holds the policy.
WITH_HA = "name: x\nvms:\n  - {name: a, vcpus: 1, memory_mb: 16}\nha: %s\n"


@pytest.mark.parametrize(("policy", "parsed"), [
    ("{mode: restart, snapshot_every: 30s, keep: 3, priority: 5}", HaPolicy("restart", 0, 30, 3, 5)),
    ("{mode: standby, copies: 1, priority: 5}", HaPolicy("standby", 1, priority=5)),
    ("{mode: standby}", HaPolicy("standby", 1)),  # one copy unless told
    ("{mode: restart}", HaPolicy("restart")),  # from the image and the snapshots taken by hand
    ("{mode: restart, snapshot_every: 5m}", HaPolicy("restart", 0, 300, 3)),  # 3 kept unless told
    ("{mode: restart, snapshot_every: 1h30m, keep: 1}", HaPolicy("restart", 0, 5400, 1)),
    ("{mode: restart, snapshot_every: 90, priority: -2}", HaPolicy("restart", 0, 90, 3, -2)),  # a number: seconds
    ("{mode: restart, snapshot_every: '45'}", HaPolicy("restart", 0, 45, 3)),
    ("{mode: standby, copies: 2, priority: ~}", HaPolicy("standby", 2)),
    ("{mode: none}", NO_HA),
    ("~", NO_HA),
])
def test_ha_policies_parse(policy: str, parsed: HaPolicy) -> None:
    assert parse_spec(WITH_HA % policy).ha == parsed


def test_no_policy_is_unprotected_and_leaves_the_spec_as_before() -> None:
    spec = parse_spec(VALID)
    assert spec.ha == NO_HA and not spec.ha.protected and "ha" not in spec.to_dict()
    assert "ha" not in parse_spec(WITH_HA % "{mode: none}").to_dict()
    standby = parse_spec(WITH_HA % "{mode: standby, priority: 5}")
    assert standby.ha.protected and standby.to_dict()["ha"] == {"mode": "standby", "copies": 1, "priority": 5}
    restart = parse_spec(WITH_HA % "{mode: restart, snapshot_every: 1m}").to_dict()["ha"]
    assert restart == {"mode": "restart", "snapshot_every": 60, "keep": 3}  # seconds on the wire


@pytest.mark.parametrize(("policy", "message"), [
    ("standby", "ha: expected a mapping, got 'standby'"),
    ("{copies: 1}", "ha: missing required key 'mode'"),
    ("{mode: hot}", "ha.mode: must be one of none, restart, standby, got 'hot'"),
    ("{mode: off}", "ha.mode: must be one of none, restart, standby, got off"),
    ("{mode: standby, watchers: 2}", "ha: unknown key 'watchers'; allowed keys are mode, copies, snapshot_every, "
                                     "keep, priority, replication, bandwidth, max_lag"),
    ("{mode: standby, copies: 0}", f"ha.copies: must be an integer between 1 and {MAX_COPIES}, got 0"),
    ("{mode: standby, copies: 17}", f"ha.copies: must be an integer between 1 and {MAX_COPIES}, got 17"),
    ("{mode: standby, copies: yes}", f"ha.copies: must be an integer between 1 and {MAX_COPIES}, got yes"),
    ("{mode: standby, snapshot_every: 30s}", "ha.snapshot_every: only for mode restart (mode is standby)"),
    ("{mode: restart, copies: 1}", "ha.copies: only for mode standby (mode is restart)"),
    ("{mode: none, priority: 3}", "ha.priority: only for mode restart or standby (mode is none)"),
    ("{mode: restart, keep: 3}", "ha.keep: counts periodic snapshots: give snapshot_every too"),
    ("{mode: restart, snapshot_every: 30s, keep: 0}", "ha.keep: must be an integer between 1 and 100, got 0"),
    ("{mode: restart, snapshot_every: 5s}", "ha.snapshot_every: must be a duration from 10s to 24h (seconds, or "
                                            "as in 30s, 5m, 1h30m), got '5s'"),
    ("{mode: restart, snapshot_every: 25h}", "ha.snapshot_every: must be a duration from 10s to 24h"),
    ("{mode: restart, snapshot_every: 2d}", "ha.snapshot_every: must be a duration from 10s to 24h"),
    ("{mode: restart, snapshot_every: 1.5}", "ha.snapshot_every: must be a duration from 10s to 24h"),
    ("{mode: restart, snapshot_every: 30 s}", "ha.snapshot_every: must be a duration from 10s to 24h"),
    ("{mode: restart, snapshot_every: m}", "ha.snapshot_every: must be a duration from 10s to 24h"),
    ("{mode: standby, priority: 1001}", "ha.priority: must be an integer between -1000 and 1000, got 1001"),
])
def test_ha_errors_name_the_field_and_line(policy: str, message: str) -> None:
    assert spec_error(WITH_HA % policy).startswith(f"spec.yaml:4: {message}")


@pytest.mark.parametrize(("data", "message"), [
    ({"mode": "standby", "copies": True}, f"ha.copies: must be an integer between 1 and {MAX_COPIES}, got True"),
    ({"mode": "restart", "snapshot_every": 30.0}, "ha.snapshot_every: must be a duration from 10s to 24h"),
    ({"mode": None}, "ha.mode: must be one of none, restart, standby, got None"),
    ("standby", "ha: expected a mapping, got 'standby'"),
])
def test_a_policy_alone_is_checked_alike(data: object, message: str) -> None:
    """`ve ha` sends the policy alone; its refusals read as a spec's, without a file or line."""
    with pytest.raises(SpecError) as info:
        HaPolicy.from_dict(data)
    assert str(info.value).startswith(message)
    assert wire_error({**one_vm(), "ha": data}).startswith(f"<wire>: {message}")


@given(st.integers(*SNAPSHOT_EVERY_RANGE))
def test_a_duration_reads_back_as_written(seconds: int) -> None:
    for written in (seconds, str(seconds), format_duration(seconds)):
        assert HaPolicy.from_dict({"mode": "restart", "snapshot_every": written}).snapshot_every == seconds


@given(st.text(alphabet="0123456789hms .-+_:²٣", max_size=12) | st.integers() | st.floats())
def test_any_duration_parses_in_bounds_or_is_refused_in_one_line(written: object) -> None:
    try:
        every = HaPolicy.from_dict({"mode": "restart", "snapshot_every": written}).snapshot_every
    except SpecError as err:
        assert "\n" not in str(err) and str(err).startswith("ha.snapshot_every: ")
    else:
        assert every is not None and SNAPSHOT_EVERY_RANGE[0] <= every <= SNAPSHOT_EVERY_RANGE[1]


# -- continuous replication of a standby VE ---------------------------------------------------------------


@pytest.mark.parametrize(("policy", "parsed"), [
    ("{mode: standby, replication: sync, bandwidth: 50, max_lag: 10s}",
     HaPolicy("standby", 1, replication="sync", bandwidth=50, max_lag=10)),
    ("{mode: standby, copies: 2, replication: async, bandwidth: 100000, max_lag: 1h}",
     HaPolicy("standby", 2, replication="async", bandwidth=100_000, max_lag=3600)),
    ("{mode: standby, replication: 'off'}", HaPolicy("standby", 1, replication="off")),
    ("{mode: standby, bandwidth: 1, max_lag: 1}", HaPolicy("standby", 1, bandwidth=1, max_lag=1)),  # the bounds
    ("{mode: standby, max_lag: '90'}", HaPolicy("standby", 1, max_lag=90)),
    ("{mode: standby, replication: ~, bandwidth: ~, max_lag: ~}", HaPolicy("standby", 1)),  # null: the default
])
def test_replication_keys_parse(policy: str, parsed: HaPolicy) -> None:
    assert parse_spec(WITH_HA % policy).ha == parsed


def test_replication_defaults_to_async_unthrottled_five_seconds_behind_at_most() -> None:
    ha = parse_spec(WITH_HA % "{mode: standby}").ha
    assert (ha.replication, ha.bandwidth, ha.max_lag) == ("async", None, 5) and DEFAULT_MAX_LAG == 5
    assert (NO_HA.replication, NO_HA.bandwidth, NO_HA.max_lag) == ("async", None, 5)
    assert HaPolicy.from_dict({"mode": "standby"}) == ha


@pytest.mark.parametrize(("policy", "message"), [
    ("{mode: standby, replication: fast}", "ha.replication: must be one of async, sync, off, got 'fast'"),
    ("{mode: standby, replication: 2}", "ha.replication: must be one of async, sync, off, got 2"),
    ("{mode: standby, replication: ASYNC}", "ha.replication: must be one of async, sync, off, got 'ASYNC'"),
    ("{mode: standby, bandwidth: 0}", "ha.bandwidth: must be an integer between 1 and 100000, got 0"),
    ("{mode: standby, bandwidth: 100001}", "ha.bandwidth: must be an integer between 1 and 100000, got 100001"),
    ("{mode: standby, bandwidth: 1.5}", "ha.bandwidth: must be an integer between 1 and 100000, got 1.5"),
    ("{mode: standby, bandwidth: 50MiB}", "ha.bandwidth: must be an integer between 1 and 100000, got '50MiB'"),
    ("{mode: standby, max_lag: 0}", "ha.max_lag: must be a duration from 1s to 1h (seconds, or as in 30s, 5m, "
                                    "1h30m), got 0"),
    ("{mode: standby, max_lag: 61m}", "ha.max_lag: must be a duration from 1s to 1h"),
    ("{mode: restart, replication: sync}", "ha.replication: only for mode standby (mode is restart)"),
    ("{mode: restart, bandwidth: 50}", "ha.bandwidth: only for mode standby (mode is restart)"),
    ("{mode: restart, snapshot_every: 1m, max_lag: 10s}", "ha.max_lag: only for mode standby (mode is restart)"),
    ("{mode: none, replication: 'off'}", "ha.replication: only for mode standby (mode is none)"),
])
def test_replication_errors_name_the_field_and_line(policy: str, message: str) -> None:
    assert spec_error(WITH_HA % policy).startswith(f"spec.yaml:4: {message}")


@pytest.mark.parametrize(("data", "message"), [
    ({"mode": "standby", "bandwidth": True}, "ha.bandwidth: must be an integer between 1 and 100000, got True"),
    ({"mode": "standby", "replication": False}, "ha.replication: must be one of async, sync, off, got False"),
    ({"mode": "standby", "max_lag": 2.5}, "ha.max_lag: must be a duration from 1s to 1h"),
    ({"mode": "restart", "replication": "async"}, "ha.replication: only for mode standby (mode is restart)"),
])
def test_replication_wire_errors(data: object, message: str) -> None:
    with pytest.raises(SpecError) as info:
        HaPolicy.from_dict(data)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_replication_off_can_be_written_as_documented() -> None:
    """`replication: off` is how the docs spell it; refusing it with "must be one of async, sync, off, got off"
    contradicts itself (`same_site` takes YAML's booleans, `on`/`off` included)."""
    assert parse_spec(WITH_HA % "{mode: standby, replication: off}").ha.replication == "off"


def test_replication_keys_are_sent_when_set_and_read_back() -> None:
    spec = parse_spec(WITH_HA % "{mode: standby, replication: sync, bandwidth: 50, max_lag: 10s}")
    assert spec.to_dict()["ha"] == {"mode": "standby", "copies": 1, "replication": "sync", "bandwidth": 50,
                                    "max_lag": 10}  # seconds on the wire
    assert VESpec.from_dict(spec.to_dict()) == spec
    assert VESpec.from_dict(msgpack.unpackb(msgpack.packb(spec.to_dict()))) == spec
    assert parse_spec(yaml.safe_dump(spec.to_dict())) == spec
    assert parse_spec(WITH_HA % "{mode: standby}").to_dict()["ha"] == {"mode": "standby", "copies": 1}  # as before


@given(st.sampled_from(REPLICATION_MODES), st.none() | st.integers(*BANDWIDTH_RANGE), st.integers(*MAX_LAG_RANGE))
def test_any_valid_replication_policy_round_trips(replication: str, bandwidth: int | None, max_lag: int) -> None:
    policy = HaPolicy("standby", 1, replication=replication, bandwidth=bandwidth, max_lag=max_lag)
    spec = VESpec("x", (VMSpec("a", 1, 16),), ha=policy)
    assert VESpec.from_dict(spec.to_dict()).ha == policy
    assert parse_spec(yaml.safe_dump(spec.to_dict())).ha == policy
    assert HaPolicy.from_dict({"mode": "standby", "max_lag": format_duration(max_lag)}).max_lag == max_lag
