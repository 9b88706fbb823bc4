"""The disk images a boot uses, through `qemu-img`: an overlay over a base, a user image's format
and whether its first sector can boot at all.

A boot never writes its base image: it runs on a qcow2 overlay in its own temporary directory.
Host side only: the guest agent never imports this module.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from lxd_agent_harness.base.errors import VmError

QEMU_IMG_MISSING = (
    "qemu-img not found on PATH; install Debian's qemu-utils (in a clone: `make setup`)"
)


def make_overlay(base: Path, base_format: str, overlay: Path) -> None:
    """A qcow2 overlay over `base`, so a boot never writes the base image."""
    command = [
        "qemu-img", "create", "-q", "-f", "qcow2",
        "-b", str(base.resolve()), "-F", base_format, str(overlay),
    ]  # fmt: skip
    _qemu_img(
        command, f"qemu-img could not make an overlay over {base}", "is it a readable disk image?"
    )


def _qemu_img(command: list[str], failed: str, hint: str = "") -> str:
    """Run `qemu-img` (bounded); its stdout, or a `VmError` that says `failed` and qemu-img's
    own words (then `hint`, what to check)."""
    try:
        done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise VmError(QEMU_IMG_MISSING) from None
    except subprocess.CalledProcessError as e:
        said = f"{failed}: {e.stderr.strip()}"
        raise VmError(f"{said}; {hint}" if hint else said) from None
    return done.stdout


def disk_format(path: Path) -> str:
    """`raw` or `qcow2` (as QEMU sees it) for a user's image; a clear error otherwise."""
    if not path.is_file():
        raise VmError(f"looked for the image {path} and found nothing; pass an existing --image")
    out = _qemu_img(
        ["qemu-img", "info", "--output=json", str(path)], f"qemu-img info {path} failed"
    )
    fmt = str(json.loads(out).get("format", ""))
    if fmt not in BOOTABLE_FORMATS:
        raise UnsupportedDiskFormat(path, fmt)
    return fmt


BOOTABLE_FORMATS = ("raw", "qcow2")


class UnsupportedDiskFormat(VmError):
    """A disk image in a format the harness does not boot (`BOOTABLE_FORMATS`)."""

    def __init__(self, path: Path, disk_format: str) -> None:
        super().__init__(
            f"the image {path} is in format {disk_format!r}; give a qcow2 or raw cloud image "
            "(convert with `qemu-img convert -O qcow2`)"
        )
        self.path = path
        self.disk_format = disk_format
        """`qemu-img info`'s name for the format, e.g. `vmdk`."""


class NotBootable(VmError):
    """A user's image has no partition table a firmware could boot from."""

    def __init__(self, path: Path, found: str) -> None:
        self.path = path
        self.found = found
        """What sits where the boot signature belongs (its two bytes, in hex)."""
        super().__init__(
            f"the image {path} has no partition table (no boot signature 55aa at byte 510, "
            f"found {found}): no firmware can boot it; give a cloud image (GPT or MBR)"
        )


BOOT_SIGNATURE = b"\x55\xaa"
"""The last two bytes of a disk's first sector: an MBR, or GPT's protective MBR."""


def check_boot_sector(path: Path, fmt: str) -> None:
    """A `NotBootable` unless the disk's first sector ends in the boot signature.

    Random bytes or a bare filesystem would otherwise boot into the firmware's dead ends and
    fail only at the harness's timeout. A qcow2 image is read through `qemu-img dd`.
    """
    with tempfile.TemporaryDirectory(prefix="lxd-agent-disk-") as tmp:
        sector = Path(tmp) / "sector0"
        command = [
            "qemu-img", "dd", "-f", fmt, "-O", "raw", "bs=512", "count=1",
            f"if={path}", f"of={sector}",
        ]  # fmt: skip
        _qemu_img(command, f"qemu-img could not read the first sector of {path}")
        first = sector.read_bytes()
    found = first[510:512]
    if found != BOOT_SIGNATURE:
        raise NotBootable(path, found.hex() or "nothing: the image is under 512 bytes")
