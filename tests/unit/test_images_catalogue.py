"""The image catalogue over an in-memory conditional store, and where new copies of an image go."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from images.catalogue import Catalogue
from images.messages import ImageEntry, check_image_name, tagged
from images.replication import targets
from overlay.dht import Record, WriteConflict
from overlay.wire.rpc import Conflict, NotFound, RequestError

ENTRY = ImageEntry("web:latest", "d1" * 32, 1 << 30, 100, 1 << 20, "alice", 0.0, {})


class Records:
    """Versioned records with compare-and-set, as the DHT gives them; `racing` writes first, once."""

    def __init__(self) -> None:
        self.held: dict[str, Record] = {}
        self.racing: tuple[str, Any] | None = None

    async def get(self, key: str) -> Record | None:
        record = self.held.get(key)
        return None if record is None or record.deleted else record

    async def get_record(self, key: str) -> Record | None:
        return self.held.get(key)

    async def put_if(self, key: str, value: Any, expect: Record | None) -> Record:
        if self.racing is not None:
            other, self.racing = self.racing, None
            self.held[key] = Record(key, other[1], (expect.version if expect else 0) + 1, other[0])
        held = self.held.get(key)
        if held != expect:
            raise WriteConflict(key, held.stamp if held else (0, ""))
        self.held[key] = Record(key, value, (expect.version if expect else 0) + 1, "me")
        return self.held[key]

    async def scan(self, prefix: str) -> list[Record]:
        return [r for k, r in self.held.items() if k.startswith(prefix) and not r.deleted]


async def test_holders_are_added_under_a_race_and_a_name_holds_one_content() -> None:
    records = Records()
    catalogue = Catalogue(records)
    await catalogue.add_holder(ENTRY, "n1", "rennes")
    other = ImageEntry(**{**ENTRY.__dict__, "holders": {"n2": "lyon"}})
    records.racing = ("n2", {**records.held["image/web:latest"].value, "holders": {"n1": "rennes", "n2": "lyon"}})
    entry = await catalogue.add_holder(ENTRY, "n3", "nancy")
    assert entry.holders == {"n1": "rennes", "n2": "lyon", "n3": "nancy"}  # the racer's holder kept
    assert other.digest == entry.digest
    with pytest.raises(Conflict, match="already exists with other content"):
        await catalogue.add_holder(ImageEntry(**{**ENTRY.__dict__, "digest": "ff" * 32}), "n1", "rennes")
    assert (await catalogue.drop_holder("web:latest", "n2")).holders == {"n1": "rennes", "n3": "nancy"}
    assert [e.name for e in await catalogue.list()] == ["web:latest"]
    assert (await catalogue.remove("web:latest")).digest == ENTRY.digest
    assert await catalogue.get("web:latest") is None and await catalogue.list() == []
    with pytest.raises(NotFound, match="no image named 'web:latest'"):
        await catalogue.find("web:latest")


async def test_a_change_that_keeps_losing_gives_up_in_one_line(autojump_clock: trio.abc.Clock) -> None:
    class Busy(Records):
        async def put_if(self, key: str, value: Any, expect: Record | None) -> Record:
            raise WriteConflict(key, (9, "other"))

    with pytest.raises(RequestError, match="kept changing for 12 attempts"):
        await Catalogue(Busy()).add_holder(ENTRY, "n1", "rennes")


def test_names_are_normalised_and_checked() -> None:
    assert check_image_name("web") == "web:latest" == tagged("web")
    assert check_image_name("web:2") == "web:2" == tagged("web:2")
    assert check_image_name("snap/shop/db:20250101-120000") == "snap/shop/db:20250101-120000"
    for bad in ("", "a:b:c", "-x", "a b", "x" * 65, "web:", "/x", "x/", "a//b", "a/-b:1", "/".join(["x" * 60] * 3)):
        with pytest.raises(RequestError, match="NAME\\[:TAG\\]"):
            check_image_name(bad)


def test_new_copies_go_first_to_sites_without_one() -> None:
    live = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b", "c1": "c"}
    one = ImageEntry(**{**ENTRY.__dict__, "holders": {"a1": "a", "gone": "z"}})
    chosen = targets(one, live, 3)
    assert len(chosen) == 2 and {live[n] for n in chosen} == {"b", "c"}  # the dead holder does not count
    assert targets(one, live, 1) == [] and targets(one, {"a1": "a"}, 3) == []
    four = targets(one, live, 4)
    assert len(four) == 3 and {live[n] for n in four[:2]} == {"b", "c"}
