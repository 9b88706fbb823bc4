"""Build (or reuse) a cloud disk like Debian's `genericcloud`, offline, from Debian's packages.

The image is a qcow2 GPT disk laid out as Debian's genericcloud images are: partition 14 is a
BIOS boot partition holding GRUB's core.img, 15 an EFI system partition (FAT32) and 1 the ext4
root. GRUB boots it both ways: under BIOS from boot.img in the MBR and core.img in partition 14
(`grub-pc-bin`); under UEFI through Debian's signed shim as `EFI/BOOT/BOOTX64.EFI`, which loads
Debian's signed GRUB (`shim-signed`, `grub-efi-amd64-signed`), so secure boot can be tried. The
root carries the cloud kernel, cloud-init (NoCloud only) and a console on ttyS0, from the same
mmdebstrap tree as the root image (`image.rootfs`, the host's own apt sources).

Nothing is mounted and no loop device is used: sfdisk writes the partition table into a file,
`mkfs.vfat --offset` and mtools fill the ESP in place, `mke2fs -E offset= -d` writes the root
from the tree, and GRUB's boot.img and core.img are written where grub-bios-setup puts them. Images
are cached under `<cache>/cloud-images/<key>/`, keyed by everything that goes into them
(packages, this module's layout, the host's boot loader binaries); a build happens in a
temporary directory renamed into place at the end, so a failed build leaves nothing behind.

Host side only. It must not boot anything (that is `vm.instance`) and must never write a built
image: boots use an overlay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.base.cache import building, cache_root
from lxd_agent_harness.base.errors import ImageError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.image.aptsources import DEFAULT_RELEASE
from lxd_agent_harness.image.buildsteps import build_directory, remove_tree, run_build_step
from lxd_agent_harness.image.lxd_image import (
    SPLIT_DIRECTORY,
    SPLIT_DISK,
    SPLIT_METADATA,
    UNIFIED,
    ImageKind,
    metadata_yaml,
    write_lxd_image,
)
from lxd_agent_harness.image.rootfs import (
    BASE_PACKAGES,
    CLOUD_INIT_PACKAGES,
    ImageSpec,
    build_lock,
    debian_tree,
    file_sha256,
    kernel_version,
    prune_images,
    reuse_or_build,
)

# Bump when the way a cloud image is made changes in a way the inputs below do not show.
CLOUD_FORMAT_VERSION = 2

SECTOR = 512
MIB = 1 << 20
DISK_BYTES = 3 << 30  # sparse; genericcloud's is 2 GiB, cloud-init and the .deb want headroom


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # in sectors
    sectors: int
    type_guid: str
    name: str

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


# GPT type GUIDs: BIOS boot, EFI system, Linux root (x86-64), as genericcloud uses them.
BIOS_BOOT = Partition(14, 2048, 4 * MIB // SECTOR, "21686148-6449-6E6F-744E-656564454649", "bios")
ESP = Partition(15, 10240, 124 * MIB // SECTOR, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "efi")
_ROOT_START = ESP.start + ESP.sectors
# The backup GPT takes the disk's last 33 sectors; leave the last MiB free.
ROOT = Partition(
    1,
    _ROOT_START,
    (DISK_BYTES - MIB) // SECTOR - _ROOT_START,
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    "root",
)
PARTITIONS = (BIOS_BOOT, ESP, ROOT)
ROOT_TYPE = {
    Arch.AMD64: ROOT.type_guid,
    Arch.ARM64: "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",  # Linux root (ARM64)
}
"""The root partition's GPT type by architecture (the Discoverable Partitions Specification's)."""

# The host's boot loaders, from Debian's packages (Makefile: APT_PACKAGES).
GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
SHIM = Path("/usr/lib/shim/shimx64.efi.signed")
MOK_MANAGER = Path("/usr/lib/shim/mmx64.efi.signed")
GRUB_EFI_SIGNED = Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed")
BOOT_BINARIES = {
    "shim-signed": SHIM,
    "shim-signed (MokManager)": MOK_MANAGER,
    "grub-efi-amd64-signed": GRUB_EFI_SIGNED,
    "grub-pc-bin": GRUB_PC_DIR / "boot.img",
}


@dataclass(frozen=True)
class EfiLoaders:
    """The signed shim, its MokManager and Debian's signed GRUB, and their names on the ESP."""

    shim: Path
    mok_manager: Path
    grub: Path
    removable_name: str
    """shim's name as the firmware's removable-media loader: `EFI/BOOT/<name>`."""
    grub_name: str
    mok_name: str
    in_tree: bool
    """The files come from the guest's own tree (a foreign architecture's packages), not the
    host's."""


EFI_LOADERS = {
    Arch.AMD64: EfiLoaders(
        SHIM, MOK_MANAGER, GRUB_EFI_SIGNED, "BOOTX64.EFI", "grubx64.efi", "mmx64.efi", False
    ),
    Arch.ARM64: EfiLoaders(
        Path("usr/lib/shim/shimaa64.efi.signed"),
        Path("usr/lib/shim/mmaa64.efi.signed"),
        Path("usr/lib/grub/arm64-efi-signed/grubaa64.efi.signed"),
        "BOOTAA64.EFI",
        "grubaa64.efi",
        "mmaa64.efi",
        True,
    ),
}
TREE_LOADER_PACKAGES = ("shim-signed", "grub-efi-arm64-signed")
"""Installed into an arm64 cloud tree for its loaders (the host's are amd64's)."""
TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "sfdisk": "fdisk",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mke2fs": "e2fsprogs",
    "grub-mkimage": "grub-common",
    "qemu-img": "qemu-utils",
}

# GRUB modules built into core.img, so BIOS GRUB needs nothing from the root but grub.cfg.
CORE_MODULES = (
    "biosdisk", "part_gpt", "ext2", "search", "search_fs_uuid", "configfile", "normal",
    "linux", "echo", "test", "serial", "terminal", "gzio",
)  # fmt: skip

KERNEL_CONSOLE = "console=tty0 console=ttyS0,115200"
KERNEL_CONSOLES = {Arch.AMD64: KERNEL_CONSOLE, Arch.ARM64: "console=ttyAMA0,115200"}

# Each cloud image is about 1 GB. A whole `make test` uses 4: without an agent (booted with a
# seed, and checked as it is), with ours and with the LXD 5.0 emulation (checked as they are),
# and arm64's with ours.
KEEP_CLOUD_IMAGES = 5


@dataclass(frozen=True)
class CloudImage:
    """A built cloud image in the cache: one qcow2 disk and its manifest."""

    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.json"

    def is_complete(self) -> bool:
        return self.disk.is_file() and self.manifest.is_file()


def cloud_spec(
    release: str = DEFAULT_RELEASE, debs: tuple[Path, ...] = (), arch: Arch = Arch.AMD64
) -> ImageSpec:
    """The cloud image's tree: the base packages, cloud-init and `debs` (an agent's package, for
    `check`). Without `debs` it has no agent: `boot --image` installs ours from a seed. A
    foreign architecture's tree also gets its signed boot loaders."""
    packages: tuple[str, ...] = BASE_PACKAGES + CLOUD_INIT_PACKAGES
    if EFI_LOADERS[arch].in_tree:
        packages += TREE_LOADER_PACKAGES
    return ImageSpec(release=release, packages=packages, debs=debs, arch=arch)


DEBIAN_LXD_AGENT = "lxd-agent"
"""Debian's package of LXD 5.0.2's own agent (the real Go binary, its unit and udev rule)."""


def with_debian_package(spec: ImageSpec, package: str) -> ImageSpec:
    """`spec` with one more of Debian's packages in its tree: `lxd-agent` (LXD 5.0.2's own Go
    agent, as Debian ships it) for the replay's step 4 and the checks on real LXD."""
    return dataclasses.replace(spec, packages=(*spec.packages, package))


def direct_boot_spec(cloud: ImageSpec) -> ImageSpec:
    """The direct-boot image made from the tree of the cloud disk `cloud`: one tree for both,
    made once (an arm64 tree costs about ten minutes of qemu-user). Its cloud-init is off: with
    no seed it would configure the guest from its fallback source, write to the console the
    harness reads, and leave the system degraded (seen on arm64)."""
    return dataclasses.replace(cloud, cloud_init_disabled=True)


def cloud_key(spec: ImageSpec) -> str:
    """A short hash of every input: the tree's, this layout's, and the host's boot loaders."""
    inputs = {
        "format": CLOUD_FORMAT_VERSION,
        "tree": spec.key(),
        "partitions": [vars(p) for p in PARTITIONS],
        "disk": DISK_BYTES,
        "modules": CORE_MODULES,
        "console": KERNEL_CONSOLE,
        "boot": {name: file_sha256(path) for name, path in sorted(BOOT_BINARIES.items())},
    }
    if spec.arch is not Arch.AMD64:  # the loaders come from the tree (its key has them)
        inputs["boot"] = {}
        inputs["arch"] = spec.arch.value
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def require_cloud_tools(arch: Arch = Arch.AMD64) -> None:
    """Every tool and boot loader file the build needs, or one error naming what to install."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not EFI_LOADERS[arch].in_tree:
        missing += sorted(name for name, path in BOOT_BINARIES.items() if not path.is_file())
    if missing:
        raise ImageError(
            f"looked for the cloud image's build tools and boot loaders and did not find: "
            f"{', '.join(sorted(set(missing)))}; install these Debian packages "
            "(in a clone of the project, `make setup` does)"
        )


# ---------------------------------------------------------------------------------------------
# What goes into the image


def sfdisk_script(arch: Arch = Arch.AMD64) -> str:
    """The GPT as sfdisk reads it; partition numbers as genericcloud's (1 root, 14, 15)."""
    lines = ["label: gpt", "unit: sectors", "first-lba: 2048", ""]
    for p in sorted(PARTITIONS, key=lambda p: p.number):
        type_guid = ROOT_TYPE[arch] if p is ROOT else p.type_guid
        lines.append(
            f"disk.raw{p.number} : start={p.start}, size={p.sectors}, "
            f'type={type_guid}, name="{p.name}"'
        )
    return "\n".join(lines) + "\n"


def grub_cfg(root_uuid: str, kernel_version: str, arch: Arch = Arch.AMD64) -> str:
    """The one GRUB menu both boot paths end in: /boot/grub/grub.cfg on the root. On arm64 GRUB
    talks through the firmware's console, which AAVMF puts on the serial port."""
    terminal = (
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        if arch is Arch.AMD64
        else ""
    )
    return f"""\
{terminal}set timeout=1
menuentry 'Debian GNU/Linux ({kernel_version})' {{
  search --no-floppy --fs-uuid --set=root {root_uuid}
  linux /boot/vmlinuz-{kernel_version} root=UUID={root_uuid} ro {KERNEL_CONSOLES[arch]}
  initrd /boot/initrd.img-{kernel_version}
}}
"""


def find_root_cfg(root_uuid: str) -> str:
    """What core.img (BIOS) and the ESP's grub.cfg (UEFI) run: find the root, read its menu."""
    return (
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        "set prefix=($root)/boot/grub\n"
        "configfile $prefix/grub.cfg\n"
    )


def fstab(root_uuid: str, esp_id: str) -> str:
    esp_uuid = f"{esp_id[:4]}-{esp_id[4:]}".upper()
    return (
        f"UUID={root_uuid} / ext4 rw,discard,errors=remount-ro 0 1\n"
        f"UUID={esp_uuid} /boot/efi vfat umask=0077,nofail 0 1\n"
    )


CLOUD_INIT_SOURCES = "datasource_list: [ NoCloud, ConfigDrive ]\nnetwork: {config: disabled}\n"
"""Where the cloud disk's cloud-init looks: a NoCloud seed (the harness's, for `boot --image`)
and nothing else. ConfigDrive is listed only because ds-identify trusts a list of one without
looking; these VMs never have one (no `config-2` file system, no OpenStack DMI)."""

CLOUD_INIT_POLICY = "policy: search,found=all,maybe=none,notfound=disabled\n"
"""ds-identify's policy: with no seed attached, cloud-init stays off for that boot. Its four
stages took 21 s of a 28 s boot under TCG (one vCPU), left the system degraded (no network to
configure), and held the console's login prompt 11 s after the agent's STARTED; without them
the prompt comes at the same time as STARTED (measured on this machine, README)."""


def _prepare_tree(tree: Path, root_uuid: str, esp_id: str, arch: Arch) -> str:
    """Write the files that name this disk into the tree, and its cloud-init's sources; the
    kernel version."""
    version = kernel_version(tree)
    (tree / "etc" / "fstab").write_text(fstab(root_uuid, esp_id))
    cloud = tree / "etc" / "cloud"
    if (cloud / "cloud.cfg.d").is_dir():
        (cloud / "cloud.cfg.d" / "90-lxd-agent.cfg").write_text(CLOUD_INIT_SOURCES)
        (cloud / "ds-identify.cfg").write_text(CLOUD_INIT_POLICY)
    (tree / "boot" / "efi").mkdir(parents=True, exist_ok=True)
    grub = tree / "boot" / "grub"
    grub.mkdir(parents=True, exist_ok=True)
    (grub / "grub.cfg").write_text(grub_cfg(root_uuid, version, arch))
    return version


# ---------------------------------------------------------------------------------------------
# Building


def _fill_esp(
    raw: Path,
    work: Path,
    esp_id: str,
    root_uuid: str,
    progress: Progress,
    loaders: EfiLoaders = EFI_LOADERS[Arch.AMD64],
    tree: Path | None = None,
) -> None:
    """FAT32 in partition 15, written in place; shim as the removable-media boot loader.

    One sector per cluster: with the default size 124 MiB has too few clusters for FAT32,
    and mtools refuses to read it.
    """
    run_build_step(
        ["mkfs.vfat", "-F", "32", "-s", "1", "-n", "EFI", "-i", esp_id, f"--offset={ESP.start}",
         str(raw), str(ESP.size // 1024)],
        progress, "making the EFI system partition",
    )  # fmt: skip
    image = f"{raw}@@{ESP.offset}"
    cfg = work / "esp-grub.cfg"
    cfg.write_text(find_root_cfg(root_uuid))
    run_build_step(
        ["mmd", "-i", image, "::/EFI", "::/EFI/BOOT", "::/EFI/debian"], progress, "ESP dirs"
    )

    # shim loads grubx64.efi (grubaa64.efi) from its own directory; Debian's signed GRUB reads
    # its config from EFI/debian (its built-in prefix), so the same small config goes to both.
    def loader(path: Path) -> Path:
        if loaders.in_tree:
            assert tree is not None
            return tree / path
        return path

    copies = [
        (loader(loaders.shim), f"::/EFI/BOOT/{loaders.removable_name}"),
        (loader(loaders.grub), f"::/EFI/BOOT/{loaders.grub_name}"),
        (loader(loaders.mok_manager), f"::/EFI/BOOT/{loaders.mok_name}"),
        (cfg, "::/EFI/BOOT/grub.cfg"),
        (cfg, "::/EFI/debian/grub.cfg"),
    ]
    missing = [str(path) for path, _ in copies if not path.is_file()]
    if missing:
        raise ImageError(
            f"the boot loaders for the ESP are missing: {', '.join(missing)}; check the "
            f"packages {', '.join(TREE_LOADER_PACKAGES)} in the tree"
        )
    for source, target in copies:
        run_build_step(["mcopy", "-i", image, str(source), target], progress, f"ESP {target}")


def _install_bios_grub(raw: Path, work: Path, root_uuid: str, progress: Progress) -> None:
    """core.img into the BIOS boot partition and boot.img into the MBR, as grub-bios-setup does.

    Not grub-bios-setup itself: it insists on finding the OS device of its GRUB directory among
    the device map's disks, which for a file image means naming the host's own disk.
    """
    early = work / "core.cfg"
    early.write_text(find_root_cfg(root_uuid))
    core_path = work / "core.img"
    run_build_step(
        ["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_PC_DIR), "-o", str(core_path),
         "-c", str(early), "-p", "/boot/grub", *CORE_MODULES],
        progress, "making GRUB's core.img",
    )  # fmt: skip
    embed_bios_grub(raw, (GRUB_PC_DIR / "boot.img").read_bytes(), core_path.read_bytes())


# Offsets in GRUB's i386-pc boot.img and core.img (grub/include/grub/i386/pc/boot.h).
BOOT_KERNEL_SECTOR = 0x5C  # u64: where core.img starts on the disk
BOOT_DRIVE = 0x64  # 0xff: the drive the BIOS booted from
BOOT_DRIVE_CHECK = 0x66  # a jump that grub-bios-setup turns into two NOPs on a hard disk
MBR_KEEP = slice(0x1B8, 0x200)  # disk signature, partition table and 0x55AA, from sfdisk
CORE_BLOCKLIST = SECTOR - 12  # u64 start, u16 length: the rest of core.img after sector 1


def embed_bios_grub(raw: Path, boot_img: bytes, core_img: bytes) -> None:
    """Write `core_img` at the start of the BIOS boot partition and `boot_img` into the MBR."""
    sectors = -(-len(core_img) // SECTOR)
    if len(boot_img) != SECTOR or sectors > BIOS_BOOT.sectors:
        raise ImageError(
            f"GRUB's boot.img is {len(boot_img)} bytes (want {SECTOR}) and core.img "
            f"{sectors} sectors (room: {BIOS_BOOT.sectors}); check the grub-pc-bin package"
        )
    core = bytearray(core_img.ljust(sectors * SECTOR, b"\0"))
    struct.pack_into("<QH", core, CORE_BLOCKLIST, BIOS_BOOT.start + 1, sectors - 1)
    with raw.open("r+b") as disk:
        mbr = disk.read(SECTOR)
        boot = bytearray(boot_img)
        boot[MBR_KEEP] = mbr[MBR_KEEP]
        struct.pack_into("<Q", boot, BOOT_KERNEL_SECTOR, BIOS_BOOT.start)
        boot[BOOT_DRIVE] = 0xFF
        boot[BOOT_DRIVE_CHECK : BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
        disk.seek(0)
        disk.write(boot)
        disk.seek(BIOS_BOOT.offset)
        disk.write(core)


def _write_disk(
    tree: Path, work: Path, raw: Path, progress: Progress, arch: Arch = Arch.AMD64
) -> dict[str, str]:
    root_uuid = str(uuid.uuid4())
    esp_id = os.urandom(4).hex()
    kernel_version = _prepare_tree(tree, root_uuid, esp_id, arch)
    with raw.open("wb") as f:
        f.truncate(DISK_BYTES)
    script = work / "gpt.sfdisk"
    script.write_text(sfdisk_script(arch))
    bios = " BIOS GRUB" if arch is Arch.AMD64 else ""
    progress(f"cloud image: GPT, ESP (shim + signed GRUB), ext4 root{',' + bios if bios else ''}")
    with script.open() as stdin_file:
        run_build_step(["sfdisk", "--quiet", str(raw)], progress, "partitioning", stdin=stdin_file)
    _fill_esp(raw, work, esp_id, root_uuid, progress, EFI_LOADERS[arch], tree)
    run_build_step(
        ["mke2fs", "-q", "-t", "ext4", "-L", "root", "-U", root_uuid,
         "-E", f"offset={ROOT.offset}", "-d", str(tree), str(raw), f"{ROOT.size // 1024}k"],
        progress, "making the root file system",
    )  # fmt: skip
    if arch is Arch.AMD64:  # the others boot through UEFI only
        _install_bios_grub(raw, work, root_uuid, progress)
    return {"root_uuid": root_uuid, "esp_id": esp_id, "kernel": kernel_version}


def build_cloud_image(
    spec: ImageSpec,
    progress: Progress = print,
    cache: Path | None = None,
    rebuild: bool = False,
) -> CloudImage:
    """Return the cached cloud image for `spec`, building it first if it is not there yet."""
    require_cloud_tools(spec.arch)
    images = (cache or cache_root()) / "cloud-images"
    key = cloud_key(spec)
    final = CloudImage(images / key)
    if not reuse_or_build(
        "cloud image",
        key,
        final.directory,
        final.is_complete,
        lambda: _build_cloud_image(spec, images, final, progress, cache),
        progress,
        cache,
        rebuild,
    ):
        return final
    for pruned in prune_images(images, KEEP_CLOUD_IMAGES, lambda d: CloudImage(d).is_complete()):
        progress(f"cloud image: removed {pruned} (least recently used)")
    return final


# How long a second run waits for the first to write the same split or unified image.
FORMAT_LOCK_TIMEOUT = 600.0


def cloud_image_as(
    cloud: CloudImage, kind: ImageKind, spec: ImageSpec, agent: str, progress: Progress
) -> Path:
    """The cloud disk as LXD's `kind` of image (`image --cloud --format`): the disk itself, or
    a split directory or unified tarball written once beside it in its cache entry (so it
    goes when the entry goes)."""
    if kind is ImageKind.DISK:
        return cloud.disk
    target = cloud.directory / (SPLIT_DIRECTORY if kind is ImageKind.SPLIT else UNIFIED)
    split = kind is ImageKind.SPLIT
    complete = [target / SPLIT_METADATA, target / SPLIT_DISK] if split else [target]
    cache = cloud.directory.parent.parent  # CACHE/cloud-images/KEY
    # The entry's own build lock: a `--rebuild` of the disk never runs beside this write.
    lock = build_lock(cache, "cloud-image", cloud.directory.name)
    with building(lock, FORMAT_LOCK_TIMEOUT, progress):
        if not cloud.is_complete():
            raise ImageError(
                f"the cloud image {cloud.directory} went away while it was being written as a "
                f"{kind.value} image; run the command again"
            )
        if not all(path.is_file() for path in complete):
            if target.is_dir():  # what a killed write left
                remove_tree(target)
            properties = {
                "os": "Debian",
                "release": spec.release,
                "architecture": spec.arch.value,
                "variant": "cloud",
                "description": f"Debian {spec.release} {spec.arch.value} cloud disk, agent: "
                f"{agent} (lxd-agent-harness)",
            }
            created = int(cloud.disk.stat().st_mtime)
            started = time.monotonic()
            try:
                write_lxd_image(
                    cloud.disk, kind, target, metadata_yaml(spec.arch, created, properties)
                )
            except OSError as e:
                raise ImageError(
                    f"could not write the {kind.value} image {target} ({e}); free some room "
                    "in the cache and run the command again"
                ) from None
            progress(
                f"cloud image: wrote the {kind.value} image {target} in "
                f"{time.monotonic() - started:.1f} s"
            )
    return target


def _build_cloud_image(
    spec: ImageSpec, images: Path, final: CloudImage, progress: Progress, cache: Path | None
) -> None:
    images.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    key = final.directory.name
    progress(f"cloud image: building {key} (Debian {spec.release} {spec.arch.value})")
    with build_directory(images, key, progress) as work:
        staged = CloudImage(work / "image")
        staged.directory.mkdir()
        raw = work / "disk.raw"
        with debian_tree(spec, work, progress, "cloud image", cache) as tree:
            facts = _write_disk(tree, work, raw, progress, spec.arch)
        run_build_step(
            ["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(staged.disk)],
            progress,
            "converting to qcow2",
        )
        manifest = {
            "key": key,
            "tree": spec.tree_key(),
            "release": spec.release,
            "packages": list(spec.packages),
            "arch": spec.arch.value,
            "partitions": {p.name: p.number for p in PARTITIONS},
            **facts,
            "boot": {
                name: str(path)
                for name, path in (
                    BOOT_BINARIES.items()
                    if spec.arch is Arch.AMD64
                    else vars(EFI_LOADERS[spec.arch]).items()
                )
            },
            "build_seconds": round(time.monotonic() - started, 1),
        }
        staged.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        if final.directory.exists():
            remove_tree(final.directory)
        os.rename(staged.directory, final.directory)
    progress(f"cloud image: built {final.disk} in {time.monotonic() - started:.0f} s")
