"""Which mirror `images.debian` builds from: the one apt on the host uses for bookworm main, in either syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from images import debian


def apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "sources.list.d").mkdir(exist_ok=True)
    return tmp_path


def test_deb822_stanza_with_bookworm_main(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\n# a comment\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb deb-src\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")})
    assert debian.mirror(apt) == "http://mirror.example/debian"


def test_one_line_entry_and_disabled_stanzas(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, {
        "sources.list": "# deb http://old.example/debian bookworm main\n"
                        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n",
        "sources.list.d/off.sources": "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
                                      "Components: main\nEnabled: no\n",
        "sources.list.d/other.list.disabled": "deb http://ignored.example/debian bookworm main\n"})
    assert debian.mirror(apt) == "http://one.example/debian"


def test_no_bookworm_main_is_a_clear_error(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, {"sources.list": "deb http://mirror.example/debian trixie main\n"})
    with pytest.raises(debian.Unavailable, match="no apt source for bookworm main"):
        debian.mirror(apt)
