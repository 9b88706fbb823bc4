"""Build (or reuse) the guest image the harness boots: a Debian tree made by mmdebstrap.

The image is a raw ext4 filesystem (no partition table, made with `mke2fs -d`, nothing mounted)
plus the kernel and initrd copied out of the tree, so QEMU boots it directly with `-kernel`.
Packages come from the host's own apt sources, read at run time: this module never names a
mirror. Images are cached under `${XDG_CACHE_HOME:-~/.cache}/lxd-agent/images/<key>/`, keyed
by everything that goes into them; a build happens in a temporary directory that is renamed into
place at the end, so an interrupted build leaves nothing half-written.

Host side only. It must not boot anything (that is `vm.instance`) and must never write the cached
image after it is built: boots use an overlay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from lxd_agent_harness.base.arch import Arch, host_arch
from lxd_agent_harness.base.cache import cache_root, least_recently_used
from lxd_agent_harness.base.errors import ImageError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.image.aptsources import DEFAULT_RELEASE, filter_apt_sources, source_suites
from lxd_agent_harness.image.buildsteps import (
    build_directory,
    detach_mounts_under,
    remove_tree,
    run_build_step,
)
from lxd_agent_harness.image.deb import check_deb
from lxd_agent_harness.image.foreign import foreign_command
from lxd_agent_harness.vm.config import ARCH_FILE, GuestImage

# What every guest needs (facts §6): without dbus, logind does not run and the ACPI power
# button is ignored; the cloud kernel's initrd has virtio_blk, virtio_console loads from the tree.
BASE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "python3",
    "python3-systemd",
    # agetty's --autologin runs /bin/login; from trixie on `login` is no longer essential, so
    # --variant=apt leaves it out.
    "login",
)

KERNEL_PACKAGE = "linux-image-cloud-amd64"
"""The kernel in `BASE_PACKAGES`; a guest of another architecture gets that one's
(`linux-image-cloud-arm64`)."""

# Packages taken from a release's own suite rather than its newest (security) version. The
# mirror these machines reach lists bullseye-security's linux-image-cloud-amd64 5.10.262-1 but
# answers 404 for its file (seen 2026-11-26); bullseye's own 5.10.223-1 is served. Bullseye's
# LTS ended in August 2026, so a test guest loses nothing by it.
SUITE_PINS = {"bullseye": {"linux-image-cloud-amd64": "bullseye"}}

# Added for the NoCloud install path (seed.py): the image then gets the .deb from its seed.
CLOUD_INIT_PACKAGES = ("cloud-init",)

# Bump when the way an image is made changes in a way the hook text below does not show.
IMAGE_FORMAT_VERSION = 1

GUEST_HOSTNAME = "lxd-agent-guest"
DISK_SIZE = "2G"  # sparse; the tree is well under 1 GiB, cloud-init needs headroom

FILE_MIRROR_HOOKS = Path("/usr/share/mmdebstrap/hooks/file-mirror-automount")

# Run by mmdebstrap inside its --customize-hook with "$1" = the tree. Part of the cache key,
# so editing it rebuilds the image.
CUSTOMIZE_SCRIPT = f"""\
set -eu
root="$1"
echo {GUEST_HOSTNAME} > "$root/etc/hostname"
printf '127.0.0.1\\tlocalhost\\n127.0.1.1\\t{GUEST_HOSTNAME}\\n' > "$root/etc/hosts"
# The disk is a bare ext4 filesystem that QEMU exposes as the first virtio disk.
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$root/etc/fstab"
# The harness runs commands through the serial console, so root logs in there by itself.
# The tty by name (%I), not stdin (-): bullseye's serial-getty@ unit gives agetty no tty on stdin.
mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
cat > "$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
EOF
# cloud-init (when present): look only for a NoCloud seed, and leave the network alone (the
# test VM has none, and the image has no network renderer for cloud-init to drive).
if [ -d "$root/etc/cloud/cloud.cfg.d" ]; then
  printf 'datasource_list: [ NoCloud, None ]\\nnetwork: {{config: disabled}}\\n' \\
    > "$root/etc/cloud/cloud.cfg.d/90-lxd-agent.cfg"
fi
# A stable machine-id is not wanted: systemd makes one at first boot of each overlay.
: > "$root/etc/machine-id"
"""

# Run after CUSTOMIZE_SCRIPT in an arm64 tree (and part of its key only): its first serial
# port is the PL011, ttyAMA0, and root logs in there too.
ARM64_CONSOLE_SCRIPT = """\
set -eu
root="$1"
mkdir -p "$root/etc/systemd/system/serial-getty@ttyAMA0.service.d"
cp "$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" \\
  "$root/etc/systemd/system/serial-getty@ttyAMA0.service.d/autologin.conf"
"""


@dataclass(frozen=True)
class ImageSpec:
    """Everything that goes into an image; its `key()` names the cache directory."""

    release: str = DEFAULT_RELEASE
    packages: tuple[str, ...] = BASE_PACKAGES
    debs: tuple[Path, ...] = ()
    carried: tuple[Path, ...] = ()
    """Files copied into the image's /root, not installed (e.g. a .deb to install at run time)."""
    arch: Arch = Arch.AMD64
    """The guest's architecture; another than the host's is built through qemu-user
    (`image.foreign`)."""

    def key(self) -> str:
        """A short hash of every input, so a changed input gives a different image."""
        inputs: dict[str, object] = {
            "format": IMAGE_FORMAT_VERSION,
            "release": self.release,
            "packages": sorted(pinned_packages(self)),
            "debs": sorted(file_sha256(deb) for deb in self.debs),
            "carried": sorted(f"{p.name}:{file_sha256(p)}" for p in self.carried),
            "customize": hashlib.sha256(CUSTOMIZE_SCRIPT.encode()).hexdigest(),
        }
        if self.arch is not Arch.AMD64:  # amd64 images keep the keys they always had
            inputs["arch"] = self.arch.value
            inputs["arch_customize"] = hashlib.sha256(ARM64_CONSOLE_SCRIPT.encode()).hexdigest()
        blob = json.dumps(inputs, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise ImageError(
            f"tried to read the package {path} for the image: {e.strerror}; "
            "pass an existing --deb (in a clone of the project, `make deb` makes one)"
        ) from e
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Building


def require_tools(tools: Iterable[str]) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ImageError(
            f"looked for {', '.join(missing)} on PATH and did not find it; "
            "install Debian's mmdebstrap, e2fsprogs and qemu-utils (in a clone: `make setup`)"
        )


def pinned_packages(spec: ImageSpec) -> list[str]:
    """`spec.packages` for apt, the kernel the architecture's, with `SUITE_PINS` as
    `name/suite`."""
    pins = SUITE_PINS.get(spec.release, {})
    kernel = f"linux-image-cloud-{spec.arch.value}"
    packages = [kernel if p == KERNEL_PACKAGE else p for p in spec.packages]
    return [f"{p}/{pins[p]}" if p in pins else p for p in packages]


def mmdebstrap_command(
    spec: ImageSpec, tree: Path, sources_file: Path, hook_script: Path
) -> list[str]:
    """The one mmdebstrap invocation that makes the tree, top to bottom."""
    command = [
        "mmdebstrap",
        "--variant=apt",
        "--format=directory",
        "--include=" + ",".join(pinned_packages(spec)),
    ]
    if spec.arch is not host_arch():
        command += [f"--architectures={spec.arch.value}"]
    if spec.debs:
        # A local .deb is only reachable from inside the tree through this hook (facts §6).
        command += [f"--hook-dir={FILE_MIRROR_HOOKS}"]
        command += [f"--include={deb.resolve()}" for deb in spec.debs]
    command += [f"--customize-hook=copy-in {path.resolve()} /root" for path in spec.carried]
    command += [f'--customize-hook=sh "{hook_script}" "$1"']
    if spec.arch is Arch.ARM64:
        arm64_script = hook_script.with_name("customize-arm64.sh")
        command += [f'--customize-hook=sh "{arm64_script}" "$1"']
    command += [spec.release, str(tree), str(sources_file)]
    return command


# How long a build step gets to end after SIGTERM (mmdebstrap unmounts and removes what it made)
# before its whole process group is killed.
def kernel_version(tree: Path) -> str:
    """The version of the newest kernel in the built tree's /boot, which must have its initrd."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError(
            f"looked for boot/vmlinuz-* in the built tree {tree} and found none; "
            "is a linux-image package in the package list?"
        )
    version = kernels[-1].name[len("vmlinuz-") :]
    if not (tree / "boot" / f"initrd.img-{version}").is_file():
        raise ImageError(
            f"looked for boot/initrd.img-{version} next to the kernel in {tree} and found "
            "none; initramfs-tools did not run in the tree"
        )
    return version


def _copy_boot_files(tree: Path, out: GuestImage) -> str:
    """Copy the tree's kernel and initrd out; return the kernel version."""
    version = kernel_version(tree)
    shutil.copyfile(tree / "boot" / f"vmlinuz-{version}", out.kernel)
    shutil.copyfile(tree / "boot" / f"initrd.img-{version}", out.initrd)
    return version


@contextlib.contextmanager
def debian_tree(
    spec: ImageSpec, sources: str, work: Path, progress: Progress, label: str
) -> Iterator[Path]:
    """`spec`'s Debian tree, made by mmdebstrap in the build directory `work` from `sources`.

    Removed on exit, after detaching whatever mmdebstrap left mounted in `work`.
    """
    tree = work / "tree"
    sources_file = work / "host.sources"
    sources_file.write_text(sources, encoding="utf-8")
    hook = work / "customize.sh"
    hook.write_text(CUSTOMIZE_SCRIPT, encoding="utf-8")
    hook.with_name("customize-arm64.sh").write_text(ARM64_CONSOLE_SCRIPT, encoding="utf-8")
    try:
        suites = " ".join(source_suites(sources))
        command, how = foreign_command(
            spec.arch, mmdebstrap_command(spec, tree, sources_file, hook)
        )
        progress(
            f"{label}: mmdebstrap ({spec.arch.value}; {how}; {suites} from the host's apt sources)"
        )
        run_build_step(
            command,
            progress,
            f"mmdebstrap of Debian {spec.release} {spec.arch.value} "
            f"(suites {suites} of the host's mirror)",
            tmpdir=work / "tmp",
        )
        yield tree
    finally:
        detach_mounts_under(work)
        remove_tree(tree)


def build_image(
    spec: ImageSpec,
    progress: Progress = print,
    cache: Path | None = None,
    rebuild: bool = False,
) -> GuestImage:
    """Return the cached image for `spec`, building it first if it is not there yet."""
    for deb in (*spec.debs, *spec.carried):
        if not deb.is_file():
            raise ImageError(
                f"looked for the package {deb} to put in the image and found nothing; "
                "pass an existing --deb (in a clone of the project, `make deb` makes one)"
            )
    images = (cache or cache_root()) / "images"
    key = spec.key()
    final = GuestImage(images / key)
    if final.is_complete() and not rebuild:
        progress(f"image: reusing {final.directory}")
        os.utime(final.directory)  # most recently used: kept by prune_images
        return final

    require_tools(["mmdebstrap", "mke2fs"])
    sources = filter_apt_sources(spec.release)
    images.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    what = f"{spec.release} with {len(spec.packages)} packages" + (
        f" and {', '.join(d.name for d in spec.debs)}" if spec.debs else ""
    )
    progress(f"image: building {key} ({what}); this takes about a minute")
    for deb in spec.debs:
        check_deb(deb)  # a corrupt .deb would fail deep inside mmdebstrap
    # Everything is written under the build directory; only the final rename publishes it.
    with build_directory(images, key, progress) as work:
        staged = GuestImage(work / "image")
        staged.directory.mkdir()
        # The tree is large; it goes before the disk is published.
        with debian_tree(spec, sources, work, progress, "image") as tree:
            kernel_version = _copy_boot_files(tree, staged)
            progress(f"image: mke2fs -d (kernel {kernel_version})")
            run_build_step(
                [
                    "mke2fs",
                    "-q",
                    "-t",
                    "ext4",
                    "-L",
                    "root",
                    "-d",
                    str(tree),
                    str(staged.disk),
                    DISK_SIZE,
                ],
                progress,
                "making the disk",
            )
        manifest = {
            "key": key,
            "release": spec.release,
            "packages": list(spec.packages),
            "debs": {d.name: file_sha256(d) for d in spec.debs},
            "carried": {p.name: file_sha256(p) for p in spec.carried},
            "kernel": kernel_version,
            "arch": spec.arch.value,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (staged.directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (staged.directory / ARCH_FILE).write_text(spec.arch.value + "\n")
        if final.directory.exists():
            # A rebuild, or another build that finished first: replace it.
            remove_tree(final.directory)
        os.rename(staged.directory, final.directory)
    progress(f"image: built {final.directory} in {time.monotonic() - started:.0f} s")
    for pruned in prune_images(images, keep=KEEP_IMAGES):
        progress(f"image: removed {pruned} (least recently used; the cache keeps {KEEP_IMAGES})")
    return final


# Each image is about 0.5 GB and a new .deb makes a new one: keep a few, not every one ever built.
# A whole `make test` uses 8 (three releases with ours, two with Debian's lxd-agent, cloud-init,
# two emulations): fewer would have a session evict the images it still boots.
KEEP_IMAGES = 10


def prune_images(
    images: Path, keep: int, is_image: Callable[[Path], bool] | None = None
) -> list[Path]:
    """Remove all but the `keep` most recently used images in `images`; return what went.

    `is_image` tells a built image's directory (default: a complete `GuestImage`). Build
    directories in progress (`.build-*`) are not images and are left alone.
    """
    complete = is_image or (lambda d: GuestImage(d).is_complete())
    pruned = least_recently_used(images, keep, complete)
    for directory in pruned:
        remove_tree(directory)
    return pruned
