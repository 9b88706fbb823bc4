"""Tests for lxd_agent_harness.image.deb: which of the agent's packages the harness takes (a given
one, else `$LXD_AGENT_DEB`, else the newest of ours in an out/), what it says when there is none,
and `dpkg-deb`'s check that it is a readable package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lxd_agent_harness.image.deb import (
    DEB_PACKAGE,
    DEB_VARIABLE,
    BadPackage,
    PackageNotFound,
    check_deb,
    find_deb,
    source_tree,
)
from tests.helpers import minimal_deb
from tests.repo import REPO


def test_no_deb_anywhere_names_deb_the_variable_and_make_deb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEB_VARIABLE, raising=False)
    with pytest.raises(PackageNotFound) as caught:
        find_deb(places=[tmp_path, tmp_path / "a"])
    assert caught.value.looked_in == [tmp_path / "out", tmp_path / "a" / "out"]
    assert caught.value.given is None
    for way in ("--deb PATH", DEB_VARIABLE, "`make deb`"):
        assert way in str(caught.value)


def test_the_default_deb_is_the_newest_of_ours_in_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEB_VARIABLE, raising=False)  # a CI job's own package would win
    out = tmp_path / "out"
    out.mkdir()
    old, new = out / f"{DEB_PACKAGE}_0.1_all.deb", out / f"{DEB_PACKAGE}_0.2_all.deb"
    # The package's name before the rename: never picked up.
    renamed = out / "lxd-agent_9.0_all.deb"
    for deb in (old, new, renamed):
        deb.write_bytes(deb.name.encode())
    os.utime(old, (1, 1))
    assert find_deb(places=[tmp_path]) == new


def test_a_given_deb_is_used_as_it_is(tmp_path: Path) -> None:
    given = tmp_path / "anything.deb"
    given.write_bytes(b"x")
    assert find_deb(given, places=[tmp_path / "nowhere"]) == given


def test_the_variable_names_the_deb_when_none_is_given_and_a_given_one_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    named, given = tmp_path / "named.deb", tmp_path / "given.deb"
    for deb in (named, given):
        deb.write_bytes(b"x")
    monkeypatch.setenv(DEB_VARIABLE, str(named))
    assert find_deb(places=[tmp_path / "nowhere"]) == named
    assert find_deb(given, places=[tmp_path / "nowhere"]) == given


def test_a_variable_naming_no_file_is_refused_naming_that_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{DEB_PACKAGE}_0.1_all.deb").write_bytes(b"x")  # not taken instead
    monkeypatch.setenv(DEB_VARIABLE, str(tmp_path / "gone.deb"))
    with pytest.raises(PackageNotFound) as caught:
        find_deb(places=[tmp_path])
    assert caught.value.given == tmp_path / "gone.deb" and caught.value.looked_in == []
    assert caught.value.given_by == DEB_VARIABLE


def test_a_deb_option_naming_no_file_is_refused_as_given_by_the_option(tmp_path: Path) -> None:
    with pytest.raises(PackageNotFound) as caught:
        find_deb(tmp_path / "gone.deb", places=[tmp_path])
    assert caught.value.given == tmp_path / "gone.deb" and caught.value.given_by == "--deb"


def test_the_source_tree_is_the_clone_the_harness_runs_from() -> None:
    assert source_tree() == REPO


def test_a_real_package_passes_the_check_and_a_cut_one_is_named_with_dpkg_debs_reason(
    tmp_path: Path,
) -> None:
    good = minimal_deb(tmp_path)
    check_deb(good)
    cut = tmp_path / f"{DEB_PACKAGE}_9_all.deb"
    cut.write_bytes(good.read_bytes()[:-20])  # the control part whole, the data part cut
    with pytest.raises(BadPackage) as caught:
        check_deb(cut)
    assert caught.value.path == cut and caught.value.check == "--fsys-tarfile"
    assert caught.value.reason.startswith("dpkg-deb")
