"""Tests for lxd_agent_harness.image.deb: which of the agent's packages the harness takes (a given
one, else the newest of ours in an out/), and what it says when there is none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lxd_agent_harness.image.deb import DEB_PACKAGE, DEB_VARIABLE, PackageNotFound, find_deb


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


def test_the_default_deb_is_the_newest_of_ours_in_out(tmp_path: Path) -> None:
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
