"""Tests for lxd_agent_harness.base.textfile: files written whole or not at all, keeping their
mode, and read with one error naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lxd_agent_harness.base import textfile
from lxd_agent_harness.base.errors import HarnessError


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "table.md"
    target.mkdir()  # os.replace of a file onto a directory fails
    with pytest.raises(OSError):
        textfile.write_whole(target, "new\n")
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_a_write_replaces_the_text_keeps_the_mode_and_leaves_no_temporary_file(
    tmp_path: Path,
) -> None:
    target = tmp_path / "README.md"
    target.write_text("old\n")
    target.chmod(0o640)
    textfile.write_whole(target, "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o7777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_a_new_file_gets_the_umasks_mode(tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        textfile.write_whole(tmp_path / "matrix.md", "| a |\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "matrix.md").stat().st_mode & 0o7777 == 0o640  # not mkstemp's 0600


def test_a_file_that_cannot_be_read_is_one_harness_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "README.md"
    with pytest.raises(textfile.TextFileError) as caught:
        textfile.read_text(missing)
    assert isinstance(caught.value, HarnessError)
    assert str(caught.value) == f"cannot read {missing}: No such file or directory"
    with pytest.raises(textfile.TextFileError, match="Is a directory"):
        textfile.read_text(tmp_path)
