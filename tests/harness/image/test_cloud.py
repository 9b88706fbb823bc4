"""Tests for lxd_agent_harness.image.cloud: the GPT layout, GRUB's BIOS embedding, the boot config.

The whole build (mmdebstrap) is exercised by the VM tests in tests/in_vm/test_cloud_vm.py; these
check each piece on small files, with the real sfdisk, mtools and GRUB images from Debian's
packages.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.base.errors import ImageError
from lxd_agent_harness.image import cloud as cloudimage
from lxd_agent_harness.image.cloud import (
    BIOS_BOOT,
    ESP,
    GRUB_PC_DIR,
    ROOT,
    SECTOR,
    embed_bios_grub,
    fstab,
    grub_cfg,
    sfdisk_script,
)
from lxd_agent_harness.image.rootfs import ImageSpec

ROOT_UUID = "5430e961-493b-41fb-8b90-62d3accf895d"


def _partitioned(tmp_path: Path) -> Path:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(cloudimage.DISK_BYTES)
    subprocess.run(["sfdisk", "--quiet", str(raw)], input=sfdisk_script(), text=True, check=True)
    return raw


def test_gpt_is_laid_out_as_genericcloud(tmp_path: Path) -> None:
    raw = _partitioned(tmp_path)
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, check=True).stdout
    )["partitiontable"]
    assert table["label"] == "gpt"
    parts = {int(p["node"].rsplit("raw", 1)[1]): p for p in table["partitions"]}
    assert parts[14]["type"] == "21686148-6449-6E6F-744E-656564454649"  # BIOS boot
    assert parts[15]["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"  # EFI system
    assert parts[1]["type"] == "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # Linux root x86-64
    for number, part in ((14, BIOS_BOOT), (15, ESP), (1, ROOT)):
        assert (parts[number]["start"], parts[number]["size"]) == (part.start, part.sectors)
    # Nothing overlaps, and the root leaves room for the backup GPT.
    assert BIOS_BOOT.start + BIOS_BOOT.sectors <= ESP.start
    assert ESP.start + ESP.sectors <= ROOT.start
    assert (ROOT.start + ROOT.sectors) * SECTOR <= cloudimage.DISK_BYTES - 33 * SECTOR


def test_bios_grub_is_embedded_where_grub_bios_setup_puts_it(tmp_path: Path) -> None:
    raw = _partitioned(tmp_path)
    before = raw.read_bytes()[:SECTOR]
    boot_img = (GRUB_PC_DIR / "boot.img").read_bytes()
    core_img = bytes(range(256)) * 7 + b"tail"  # 1796 bytes: 4 sectors
    embed_bios_grub(raw, boot_img, core_img)
    with raw.open("rb") as disk:
        mbr = disk.read(SECTOR)
        disk.seek(BIOS_BOOT.offset)
        core = disk.read(4 * SECTOR)
    assert mbr[:0x5C] == boot_img[:0x5C]  # GRUB's boot code...
    assert mbr[0x1B8:] == before[0x1B8:]  # ...and the protective MBR's table and signature
    assert mbr[0x1FE:] == b"\x55\xaa"
    assert struct.unpack_from("<Q", mbr, 0x5C)[0] == BIOS_BOOT.start
    assert mbr[0x64] == 0xFF and mbr[0x66:0x68] == b"\x90\x90"
    start, length = struct.unpack_from("<QH", core, SECTOR - 12)
    assert (start, length) == (BIOS_BOOT.start + 1, 3)
    assert core[SECTOR : SECTOR + 16] == core_img[SECTOR : SECTOR + 16]


def test_a_core_image_too_big_for_the_bios_boot_partition_is_refused(tmp_path: Path) -> None:
    raw = _partitioned(tmp_path)
    with pytest.raises(ImageError, match=r"core\.img"):
        embed_bios_grub(raw, (GRUB_PC_DIR / "boot.img").read_bytes(), b"x" * (BIOS_BOOT.size + 1))


def test_grub_menu_boots_the_cloud_kernel_by_uuid_with_the_console_on_ttyS0() -> None:
    cfg = grub_cfg(ROOT_UUID, "6.1.0-56-cloud-amd64")
    assert f"search --no-floppy --fs-uuid --set=root {ROOT_UUID}" in cfg
    linux = next(line.split() for line in cfg.splitlines() if line.strip().startswith("linux "))
    assert linux[1] == "/boot/vmlinuz-6.1.0-56-cloud-amd64"
    assert f"root=UUID={ROOT_UUID}" in linux
    # The last console= is /dev/console: the harness reads ttyS0.
    assert [a for a in linux if a.startswith("console=")][-1] == "console=ttyS0,115200"
    assert "terminal_output serial" in cfg


def test_fstab_mounts_root_and_esp_by_uuid() -> None:
    lines = fstab(ROOT_UUID, "4f3c8bec").splitlines()
    assert lines[0].split()[:3] == [f"UUID={ROOT_UUID}", "/", "ext4"]
    assert lines[1].split()[:3] == ["UUID=4F3C-8BEC", "/boot/efi", "vfat"]


def test_the_key_changes_with_the_package_list() -> None:
    one = cloudimage.cloud_key(cloudimage.cloud_spec())
    assert one == cloudimage.cloud_key(cloudimage.cloud_spec())
    assert one != cloudimage.cloud_key(ImageSpec(packages=("systemd-sysv",)))


def test_a_missing_boot_loader_is_one_error_naming_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(cloudimage.BOOT_BINARIES, "shim-signed", tmp_path / "absent.efi")
    with pytest.raises(ImageError, match="shim-signed") as caught:
        cloudimage.require_cloud_tools()
    assert "make setup" in str(caught.value)


def test_an_arm64_cloud_disk_boots_through_uefi_only_with_the_trees_own_loaders() -> None:
    spec = cloudimage.cloud_spec(arch=Arch.ARM64)
    assert set(cloudimage.TREE_LOADER_PACKAGES) <= set(spec.packages)
    assert cloudimage.cloud_key(spec) != cloudimage.cloud_key(cloudimage.cloud_spec())
    loaders = cloudimage.EFI_LOADERS[Arch.ARM64]
    assert loaders.in_tree and loaders.removable_name == "BOOTAA64.EFI"
    script = cloudimage.sfdisk_script(Arch.ARM64)
    assert "B921B045-1DF0-41C3-AF44-4C6F280D3FAE" in script  # root (ARM64)
    cfg = cloudimage.grub_cfg("u", "6.1", Arch.ARM64)
    assert "serial --unit" not in cfg and "console=ttyAMA0,115200" in cfg
