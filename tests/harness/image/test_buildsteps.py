"""Tests for lxd_agent_harness.image.buildsteps: a build directory is deleted only with no mount
left in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import ImageError
from lxd_agent_harness.image import buildsteps


def test_mounts_under_sees_the_root_mount_and_none_in_a_fresh_directory(tmp_path: Path) -> None:
    assert "/" in buildsteps.mounts_under(Path("/"))
    assert buildsteps.mounts_under(tmp_path) == []


def test_a_build_directory_with_a_mount_left_in_it_is_not_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    (tree / "sys").mkdir(parents=True)
    monkeypatch.setattr(buildsteps, "mounts_under", lambda path: [str(tree / "sys")])
    with pytest.raises(ImageError, match="umount -R"):
        buildsteps.remove_tree(tree)
    assert (tree / "sys").is_dir()


def test_a_build_directory_without_mounts_is_deleted(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    buildsteps.remove_tree(tree)
    assert not tree.exists()
