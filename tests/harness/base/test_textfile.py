"""Tests for lxd_agent_harness.base.textfile: files written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxd_agent_harness.base import textfile


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "table.md"
    target.mkdir()  # os.replace of a file onto a directory fails
    with pytest.raises(OSError):
        textfile.write_whole(target, "new\n")
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]
