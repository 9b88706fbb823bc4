"""Tests for lxd_agent_harness.image.aptsources: the host's apt sources, filtered and renamed for
the release an image is built for."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_agent_harness.image.aptsources import (
    AptSourcesError,
    backports_sources,
    filter_apt_sources,
    host_release,
    source_package_sources,
    source_suites,
)

SOURCES = """\
Types: deb deb-src
# a comment the filter must drop
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://other.invalid/
Suites: nodistro
Components: main

Types: deb
Enabled: no
URIs: http://off.invalid/
Suites: bookworm
Components: main
"""


def _debian_sources_dir(tmp_path: Path) -> Path:
    """A sources.list.d with SOURCES only."""
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(SOURCES)
    return d


def _sources_dir(tmp_path: Path) -> Path:
    """SOURCES, a disabled file, and a one-line list with options, backports and deb-src."""
    d = _debian_sources_dir(tmp_path)
    (d / "thirdparty.sources.disabled-by-farm").write_text(
        "Types: deb\nURIs: http://disabled.invalid/\nSuites: bookworm\nComponents: main\n"
    )
    (d / "old.list").write_text(
        "deb [signed-by=/k.gpg arch=amd64] http://list.invalid/debian "
        "bookworm-proposed-updates main\n"
        "deb http://list.invalid/debian bookworm-backports main  # never for a guest\n"
        "deb-src http://list.invalid/debian bookworm main\n"
        "deb http://list.invalid/debian bullseye main  # another release\n"
    )
    return d


def test_sources_keep_only_the_release_suites_of_active_binary_stanzas(tmp_path: Path) -> None:
    text = filter_apt_sources(
        "bookworm", _sources_dir(tmp_path), tmp_path / "missing.list", host="bookworm"
    )
    stanzas = [s for s in text.split("\n\n") if s.strip()]
    assert "Suites: bookworm bookworm-updates\n" in stanzas[0]
    assert "Types: deb\n" in stanzas[0]
    assert "trixie" not in text
    assert "comment" not in text
    assert "Suites: bookworm-security" in text
    assert "nodistro" not in text
    assert "off.invalid" not in text
    assert "disabled.invalid" not in text
    assert "bullseye" not in text
    assert "Signed-By: /k.gpg" in text and "Suites: bookworm-proposed-updates" in text
    assert "backports" not in text
    assert len(stanzas) == 3


def test_sources_for_another_release_swap_only_the_hosts_codename(tmp_path: Path) -> None:
    text = filter_apt_sources(
        "trixie", _sources_dir(tmp_path), tmp_path / "missing.list", host="bookworm"
    )
    stanzas = [s for s in text.split("\n\n") if s.strip()]
    # The host's URIs, components and keys; its suites renamed, and its own `trixie` once.
    assert "URIs: http://mirror.invalid/debian\n" in stanzas[0]
    assert "Suites: trixie trixie-updates\n" in stanzas[0]
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in stanzas[0]
    assert "Suites: trixie-security\n" in stanzas[1]
    assert "Suites: trixie-proposed-updates\n" in stanzas[2] and "Signed-By: /k.gpg" in stanzas[2]
    assert source_suites(text) == [
        "trixie",
        "trixie-updates",
        "trixie-security",
        "trixie-proposed-updates",
    ]
    assert "bookworm" not in text and "bullseye" not in text and "nodistro" not in text
    assert len(stanzas) == 3


def test_sources_for_bullseye_come_from_the_same_mirror(tmp_path: Path) -> None:
    text = filter_apt_sources(
        "bullseye", _sources_dir(tmp_path), tmp_path / "missing.list", host="bookworm"
    )
    # old.list's own bullseye line is kept too: it is a source for the release asked for. Its
    # bookworm-backports is not renamed bullseye-backports: guests get no backports.
    assert source_suites(text) == [
        "bullseye",
        "bullseye-updates",
        "bullseye-security",
        "bullseye-proposed-updates",
        "bullseye",
    ]


def test_a_hosts_backports_never_reach_a_guest(tmp_path: Path) -> None:
    d = _sources_dir(tmp_path)  # old.list has bookworm-backports, one-line
    (d / "lxd-agent-backports.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm-backports\n"
        "Components: main\n"
    )
    for release in ("bullseye", "bookworm", "trixie"):
        text = filter_apt_sources(release, d, tmp_path / "missing.list", host="bookworm")
        assert not [s for s in source_suites(text) if "backports" in s], text


def test_sources_on_a_host_of_unknown_release_name_what_was_found(tmp_path: Path) -> None:
    with pytest.raises(AptSourcesError) as caught:
        filter_apt_sources("sid", _sources_dir(tmp_path), tmp_path / "missing.list", host="")
    assert caught.value.release == "sid"
    assert "bookworm" in caught.value.found_suites and "nodistro" in caught.value.found_suites


def test_the_hosts_release_is_read_from_os_release(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text(
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_CODENAME=bookworm\n'
    )
    assert host_release(os_release) == "bookworm"
    assert host_release(tmp_path / "missing") == ""


def test_backports_come_from_the_stanzas_that_serve_the_release_itself(tmp_path: Path) -> None:
    d = _debian_sources_dir(tmp_path)
    listed = tmp_path / "sources.list"
    listed.write_text(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://list.invalid/debian bookworm main contrib\n"
        "deb [signed-by=/etc/apt/keyrings/vendor.asc] http://vendor.invalid/ bookworm stable\n"
    )
    text = backports_sources("bookworm", d, listed)
    assert text is not None
    stanzas = [dict(line.split(": ", 1) for line in s.splitlines()) for s in text.split("\n\n")]
    # Only Debian's stanzas with the suite `bookworm` itself: not -security, not the disabled
    # one, not another vendor's `bookworm` (signed by its own key).
    debian_key = "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert [(s["URIs"], s["Suites"], s["Components"], s.get("Signed-By")) for s in stanzas] == [
        ("http://list.invalid/debian", "bookworm-backports", "main contrib", debian_key),
        ("http://mirror.invalid/debian", "bookworm-backports", "main", debian_key),
    ]
    assert {s["Types"] for s in stanzas} == {"deb"}


def test_backports_already_in_the_sources_are_not_added_twice(tmp_path: Path) -> None:
    # old.list in _sources_dir already has bookworm-backports.
    assert backports_sources("bookworm", _sources_dir(tmp_path), tmp_path / "missing.list") is None


def test_backports_with_no_source_of_the_release_name_what_was_found(tmp_path: Path) -> None:
    with pytest.raises(AptSourcesError) as caught:
        backports_sources("buster", _sources_dir(tmp_path), tmp_path / "missing.list")
    assert caught.value.release == "buster"
    assert "bookworm" in caught.value.found_suites and "buster" not in caught.value.found_suites


def test_source_packages_come_from_debians_stanzas_of_the_release(tmp_path: Path) -> None:
    text = source_package_sources("bookworm", _sources_dir(tmp_path), tmp_path / "missing.list")
    stanzas = [dict(line.split(": ", 1) for line in s.splitlines()) for s in text.split("\n\n")]
    # The release's own suites (not trixie), from Debian's stanzas: not the list signed by
    # another key, not the disabled one, not nodistro; a stanza with no Signed-By is apt's
    # default keyring's, Debian's.
    assert [(s["Types"], s["URIs"], s["Suites"]) for s in stanzas] == [
        ("deb-src", "http://mirror.invalid/debian", "bookworm bookworm-updates"),
        ("deb-src", "http://mirror.invalid/debian-security", "bookworm-security"),
    ]


def test_source_packages_with_no_source_of_the_release_name_what_was_found(
    tmp_path: Path,
) -> None:
    with pytest.raises(AptSourcesError) as caught:
        source_package_sources("buster", _sources_dir(tmp_path), tmp_path / "missing.list")
    assert caught.value.release == "buster"
