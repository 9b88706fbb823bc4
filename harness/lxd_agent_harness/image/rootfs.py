"""Build (or reuse) the guest image the harness boots: a Debian tree made by mmdebstrap.

The image is a raw ext4 filesystem (no partition table, made with `mke2fs -d`, nothing mounted)
plus the kernel and initrd copied out of the tree, so QEMU boots it directly with `-kernel`.
Packages come from the host's own apt sources, read at run time: this module never names a
mirror. Images are cached under `${XDG_CACHE_HOME:-~/.cache}/lxd-agent/images/<key>/`, keyed
by everything that goes into them; a build happens in a temporary directory that is renamed into
place at the end, so an interrupted build leaves nothing half-written.

The Debian tree an image is made from is cached too (`trees/<tree key>/`), keyed by release,
architecture and package list only: images that differ in their .debs (ours, Debian's
lxd-agent beside it, an emulation), and the direct-boot image and cloud disk of one package
list, all start from one mmdebstrap run. Each build copies the tree and installs its .debs on
top with dpkg in a chroot, as mmdebstrap's own chroot would. An arm64 tree costs about ten
minutes of qemu-user; a copy costs seconds.

Host side only. It must not boot anything (that is `vm.instance`) and must never write the cached
image or tree after it is built: boots use an overlay, builds a copy.
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
from lxd_agent_harness.base.cache import building, cache_root, least_recently_used
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

# Bump when the way an image (or its tree) is made changes in a way the hook text below does not
# show. 2: the .debs go on top of a cached tree.
IMAGE_FORMAT_VERSION = 2
TREE_FORMAT_VERSION = 1

GUEST_HOSTNAME = "lxd-agent-guest"
DISK_SIZE = "2G"  # sparse; the tree is well under 1 GiB, cloud-init needs headroom

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
    cloud_init_disabled: bool = False
    """The tree's cloud-init is switched off in this image (`/etc/cloud/cloud-init.disabled`):
    a direct-boot image made from a cloud disk's tree (`image.cloud.direct_boot_spec`)."""

    def tree_key(self) -> str:
        """A short hash of what goes into the Debian tree: all but the .debs and carried files."""
        inputs: dict[str, object] = {
            "format": TREE_FORMAT_VERSION,
            "release": self.release,
            "packages": sorted(pinned_packages(self)),
            "customize": hashlib.sha256(CUSTOMIZE_SCRIPT.encode()).hexdigest(),
        }
        if self.arch is not Arch.AMD64:
            inputs["arch"] = self.arch.value
            inputs["arch_customize"] = hashlib.sha256(ARM64_CONSOLE_SCRIPT.encode()).hexdigest()
        return _short_hash(inputs)

    def key(self) -> str:
        """A short hash of every input, so a changed input gives a different image."""
        inputs: dict[str, object] = {
            "format": IMAGE_FORMAT_VERSION,
            "tree": self.tree_key(),
            "debs": sorted(file_sha256(deb) for deb in self.debs),
            "carried": sorted(f"{p.name}:{file_sha256(p)}" for p in self.carried),
        }
        if self.cloud_init_disabled:
            inputs["cloud_init_disabled"] = True
        return _short_hash(inputs)


def _short_hash(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


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
    """The one mmdebstrap invocation that makes the (cached) tree, top to bottom: the packages
    and the customisation; `spec`'s .debs and carried files go on top of a copy
    (`debian_tree`)."""
    command = [
        "mmdebstrap",
        "--variant=apt",
        "--format=directory",
        "--include=" + ",".join(pinned_packages(spec)),
    ]
    if spec.arch is not host_arch():
        command += [f"--architectures={spec.arch.value}"]
    command += [f'--customize-hook=sh "{hook_script}" "$1"']
    if spec.arch is Arch.ARM64:
        arm64_script = hook_script.with_name("customize-arm64.sh")
        command += [f'--customize-hook=sh "{arm64_script}" "$1"']
    command += [spec.release, str(tree), str(sources_file)]
    return command


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


# The trees a whole `make test` starts from: bookworm, bullseye and trixie with the base packages,
# bookworm and trixie with Debian's lxd-agent, bookworm with cloud-init, arm64's cloud tree: 7,
# each 0.4-1 GB.
KEEP_TREES = 8
# Another run's build of the same tree is waited for: an arm64 tree takes about ten minutes
# under qemu-user here, on a busy machine more.
TREE_LOCK_TIMEOUT = 3600.0
# Where the .debs lie inside the tree while dpkg installs them.
INSTALL_DIR = Path("tmp/lxd-agent-harness-debs")
# What dpkg and the maintainer scripts see in the chroot: dpkg's usual PATH, and nothing of the
# harness's environment (no venv, no pyenv, no locale).
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


def build_lock(cache: Path | None, kind: str, key: str) -> Path:
    """The lock file one build of the cache entry `kind`/`key` holds (`base.cache.building`)."""
    return (cache or cache_root()) / "locks" / f"{kind}-{key}.lock"


def reuse_or_build(
    what: str,
    key: str,
    entry: Path,
    complete: Callable[[], bool],
    build: Callable[[], None],
    progress: Progress,
    cache: Path | None,
    rebuild: bool = False,
) -> bool:
    """Under the build lock of the cache entry `entry` (a tree, image or cloud image: `what`),
    reuse it if `complete()` (marked most recently used, for the pruning), else `build()` it.
    Whether it was built."""
    with building(build_lock(cache, what.replace(" ", "-"), key), TREE_LOCK_TIMEOUT, progress):
        if complete() and not rebuild:
            progress(f"{what}: reusing {entry}")
            os.utime(entry)
            return False
        build()
        return True


def cached_tree(spec: ImageSpec, progress: Progress, cache: Path | None = None) -> Path:
    """The Debian tree of `spec`'s release, architecture and packages, from the cache; made by
    mmdebstrap first (once, however many runs ask at the same time) if it is not there.

    The caller must not write it: `debian_tree` copies it.
    """
    trees = (cache or cache_root()) / "trees"
    key = spec.tree_key()
    entry = trees / key

    def build() -> None:
        started = time.monotonic()
        require_tools(["mmdebstrap"])
        sources = filter_apt_sources(spec.release)
        trees.mkdir(parents=True, exist_ok=True)
        with build_directory(trees, key, progress) as work:
            staged = work / "entry"
            staged.mkdir()
            _mmdebstrap(spec, sources, work, staged / "tree", progress)
            manifest = {
                "key": key,
                "release": spec.release,
                "arch": spec.arch.value,
                "packages": sorted(pinned_packages(spec)),
                "build_seconds": round(time.monotonic() - started, 1),
            }
            (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            os.rename(staged, entry)
        progress(f"tree: made {entry} in {time.monotonic() - started:.0f} s")

    complete = (entry / "manifest.json").is_file
    if not reuse_or_build("tree", key, entry, complete, build, progress, cache):
        return entry / "tree"
    for pruned in prune_images(trees, KEEP_TREES, lambda d: (d / "manifest.json").is_file()):
        progress(f"tree: removed {pruned} (least recently used; the cache keeps {KEEP_TREES})")
    return entry / "tree"


def _mmdebstrap(spec: ImageSpec, sources: str, work: Path, tree: Path, progress: Progress) -> None:
    sources_file = work / "host.sources"
    sources_file.write_text(sources, encoding="utf-8")
    hook = work / "customize.sh"
    hook.write_text(CUSTOMIZE_SCRIPT, encoding="utf-8")
    hook.with_name("customize-arm64.sh").write_text(ARM64_CONSOLE_SCRIPT, encoding="utf-8")
    suites = " ".join(source_suites(sources))
    command, how = foreign_command(spec.arch, mmdebstrap_command(spec, tree, sources_file, hook))
    progress(f"tree: mmdebstrap ({spec.arch.value}; {how}; {suites} from the host's apt sources)")
    run_build_step(
        command,
        progress,
        f"mmdebstrap of Debian {spec.release} {spec.arch.value} "
        f"(suites {suites} of the host's mirror)",
        tmpdir=work / "tmp",
    )


def install_debs(spec: ImageSpec, tree: Path, progress: Progress, label: str) -> None:
    """Install `spec.debs` into `tree` with dpkg in a chroot (through qemu-user for another
    architecture's tree), as mmdebstrap's chroot would. Their dependencies must be in the tree's
    package list, as ours (python3, python3-systemd) and the emulations' are."""
    inside = tree / INSTALL_DIR
    inside.mkdir(parents=True)
    try:
        for deb in spec.debs:
            shutil.copyfile(deb, inside / deb.name)
        paths = [f"/{INSTALL_DIR / deb.name}" for deb in spec.debs]
        command, how = foreign_command(
            spec.arch, ["chroot", str(tree), "dpkg", "--install", *paths]
        )
        names = ", ".join(deb.name for deb in spec.debs)
        progress(f"{label}: dpkg --install {names} ({how})")
        run_build_step(command, progress, f"installing {names} into the tree", env=CHROOT_ENV)
    finally:
        shutil.rmtree(inside, ignore_errors=True)


@contextlib.contextmanager
def debian_tree(
    spec: ImageSpec, work: Path, progress: Progress, label: str, cache: Path | None = None
) -> Iterator[Path]:
    """`spec`'s Debian tree, writable, in the build directory `work`: a copy of the cached tree
    (`cached_tree`) with `spec.debs` installed, `spec.carried` in /root and cloud-init off if
    `spec` says so.

    Removed on exit, after detaching whatever was left mounted in `work`.
    """
    base = cached_tree(spec, progress, cache)
    tree = work / "tree"
    try:
        run_build_step(
            ["cp", "-a", "--reflink=auto", str(base), str(tree)],
            progress,
            f"copying the cached tree {base.parent.name}",
        )
        for path in spec.carried:
            shutil.copyfile(path, tree / "root" / path.name)
        if spec.cloud_init_disabled:
            (tree / "etc" / "cloud").mkdir(parents=True, exist_ok=True)
            (tree / "etc" / "cloud" / "cloud-init.disabled").touch()
        if spec.debs:
            install_debs(spec, tree, progress, label)
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
    if not reuse_or_build(
        "image",
        key,
        final.directory,
        final.is_complete,
        lambda: _build_image(spec, images, final, progress, cache),
        progress,
        cache,
        rebuild,
    ):
        return final
    for pruned in prune_images(images, keep=KEEP_IMAGES):
        progress(f"image: removed {pruned} (least recently used; the cache keeps {KEEP_IMAGES})")
    return final


def _build_image(
    spec: ImageSpec, images: Path, final: GuestImage, progress: Progress, cache: Path | None
) -> None:
    require_tools(["mke2fs"])
    images.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    key = spec.key()
    what = f"{spec.release} with {len(spec.packages)} packages" + (
        f" and {', '.join(d.name for d in spec.debs)}" if spec.debs else ""
    )
    progress(f"image: building {key} ({what})")
    for deb in spec.debs:
        check_deb(deb)  # a corrupt .deb would fail deep inside dpkg
    # Everything is written under the build directory; only the final rename publishes it.
    with build_directory(images, key, progress) as work:
        staged = GuestImage(work / "image")
        staged.directory.mkdir()
        # The tree is large; it goes before the disk is published.
        with debian_tree(spec, work, progress, "image", cache) as tree:
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
            "tree": spec.tree_key(),
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
            remove_tree(final.directory)  # a rebuild: replace it
        os.rename(staged.directory, final.directory)
    progress(f"image: built {final.directory} in {time.monotonic() - started:.0f} s")


# Each image is about 0.5 GB and a new .deb makes a new one: keep a few, not every one ever built.
# A whole `make test` uses 9 (three releases with ours, two with Debian's lxd-agent, cloud-init,
# two emulations, arm64's): fewer would have a session evict the images it still boots.
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
