"""Tests for lxd_agent_harness.qemu.disk: the overlay a boot writes instead of its base image, a
user image's format, and the boot signature checked before any firmware runs (real `qemu-img`,
on images of a megabyte)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.qemu.disk import (
    BOOT_SIGNATURE,
    NotBootable,
    UnsupportedDiskFormat,
    check_boot_sector,
    disk_format,
    make_overlay,
)


def _raw(path: Path, signed: bool) -> Path:
    """A 1 MiB raw disk, with or without the boot signature at the end of its first sector."""
    data = bytearray(1 << 20)
    if signed:
        data[510:512] = BOOT_SIGNATURE
    path.write_bytes(bytes(data))
    return path


def _info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    info = json.loads(out)
    assert isinstance(info, dict)
    return info


def test_an_overlay_is_qcow2_backed_by_the_base_which_it_leaves_alone(tmp_path: Path) -> None:
    base = _raw(tmp_path / "base.raw", signed=True)
    before = base.read_bytes()
    overlay = tmp_path / "run" / "overlay.qcow2"
    overlay.parent.mkdir()
    make_overlay(base, "raw", overlay)
    info = _info(overlay)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(base.resolve())
    assert info["backing-filename-format"] == "raw"
    assert base.read_bytes() == before


def test_an_overlay_over_a_missing_base_is_one_error_naming_the_base(tmp_path: Path) -> None:
    with pytest.raises(VmError, match=r"could not make an overlay over .*none\.raw") as caught:
        make_overlay(tmp_path / "none.raw", "raw", tmp_path / "overlay.qcow2")
    assert "is it a readable disk image?" in str(caught.value)


def test_the_format_is_raw_or_qcow2_as_qemu_sees_it(tmp_path: Path) -> None:
    base = _raw(tmp_path / "disk.img", signed=False)  # the name says nothing of the format
    overlay = tmp_path / "disk.qcow2"
    make_overlay(base, "raw", overlay)
    assert disk_format(base) == "raw"
    assert disk_format(overlay) == "qcow2"


def test_another_format_or_no_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True, timeout=60
    )
    with pytest.raises(UnsupportedDiskFormat) as refused:
        disk_format(vmdk)
    assert (refused.value.path, refused.value.disk_format) == (vmdk, "vmdk")
    with pytest.raises(VmError, match="found nothing; pass an existing --image"):
        disk_format(tmp_path / "missing.qcow2")


def test_a_signed_first_sector_passes_raw_or_through_a_qcow2(tmp_path: Path) -> None:
    base = _raw(tmp_path / "base.raw", signed=True)
    overlay = tmp_path / "overlay.qcow2"
    make_overlay(base, "raw", overlay)
    check_boot_sector(base, "raw")
    # A qcow2 file's own bytes 510-511 are no signature: the disk is read through qemu-img.
    assert overlay.read_bytes()[510:512] != BOOT_SIGNATURE
    check_boot_sector(overlay, "qcow2")


def test_a_disk_without_the_boot_signature_is_not_bootable_and_says_what_was_there(
    tmp_path: Path,
) -> None:
    blank = _raw(tmp_path / "blank.raw", signed=False)
    with pytest.raises(NotBootable) as caught:
        check_boot_sector(blank, "raw")
    assert caught.value.path == blank and caught.value.found == "0000"
    assert "no boot signature 55aa at byte 510, found 0000" in str(caught.value)
    # An overlay over a blank disk is as blank: its disk is read, not its file.
    overlay = tmp_path / "overlay.qcow2"
    make_overlay(blank, "raw", overlay)
    with pytest.raises(NotBootable):
        check_boot_sector(overlay, "qcow2")
