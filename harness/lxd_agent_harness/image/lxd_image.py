"""LXD's image formats, read and written: what `check --image` takes, what `image --format` writes.

A VM image for LXD or Incus comes in one of three shapes (LXD's doc/reference/image_format.md):

- a bare disk, qcow2 or raw: what `check` always took;
- a split image: a metadata tarball (`metadata.yaml`, optional `templates/`; distrobuilder calls
  it `lxd.tar.xz` or `incus.tar.xz`, `lxc image export` `meta-FINGERPRINT.tar*`) and a qcow2
  disk (`disk.qcow2`, `FINGERPRINT.qcow2`);
- a unified tarball: `metadata.yaml`, `rootfs.img` (the qcow2 disk) and `templates/` in one.

Each may be given as the directory that holds it (a builder's output, an export). `opened_image`
tells them apart by their content, never by their names, reads `metadata.yaml` (its
`architecture` is the guest's), and extracts a unified tarball's `rootfs.img` into a private
temporary directory that it removes on every exit path. `write_lxd_image` makes the split and
unified shapes of a cloud disk. Host side only; it boots nothing.
"""

from __future__ import annotations

import contextlib
import enum
import io
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

import yaml

from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.base.errors import ImageError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.qemu.disk import UnsupportedDiskFormat, disk_format

METADATA = "metadata.yaml"
ROOTFS = "rootfs.img"
TEMPLATES = "templates"
SPLIT_METADATA = "lxd.tar.xz"
"""The metadata tarball's name in a split image the harness writes (distrobuilder's for LXD)."""
SPLIT_DISK = "disk.qcow2"
SPLIT_DIRECTORY = "lxd-split"
"""Where `image --cloud --format split` writes them, in the cloud disk's cache entry."""
UNIFIED = "lxd-unified.tar"
"""The unified tarball the harness writes: uncompressed (its qcow2 is already compact), which
LXD and Incus import as they do `.tar.xz`."""

# metadata.yaml's `architecture` as LXD names it (shared/osarch), and the aliases it accepts.
_ARCHITECTURES = {
    "x86_64": Arch.AMD64,
    "amd64": Arch.AMD64,
    "aarch64": Arch.ARM64,
    "arm64": Arch.ARM64,
}

# Magic numbers of what is not a VM image's file, to name it in the error.
_ZSTD = b"\x28\xb5\x2f\xfd"
_SQUASHFS = b"hsqs"
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"))


class ImageKind(str, enum.Enum):
    DISK = "disk"
    SPLIT = "split"
    UNIFIED = "unified"


class ImageInputError(ImageError):
    """What was given as an image is none of the shapes `check` boots.

    `paths` are what was given; `found` says, per file looked at, what it is."""

    def __init__(self, message: str, *, paths: Sequence[Path], found: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.paths = tuple(paths)
        self.found = tuple(found)


class ImageArchError(ImageError):
    """metadata.yaml names an architecture the harness cannot boot, or not the `--arch` given."""

    def __init__(self, message: str, *, metadata_arch: str, asked: str | None) -> None:
        super().__init__(message)
        self.metadata_arch = metadata_arch
        """`architecture` as metadata.yaml says it."""
        self.asked = asked
        """The `--arch` given, if one was."""


@dataclass(frozen=True)
class ImageMetadata:
    """What an image's metadata.yaml says that the harness uses or reports."""

    architecture: str
    creation_date: int | None = None
    properties: Mapping[str, str] = field(default_factory=dict)

    @property
    def arch(self) -> Arch:
        found = _ARCHITECTURES.get(self.architecture)
        if found is None:
            raise ImageArchError(
                f"the image's metadata.yaml says architecture {self.architecture!r}; the harness "
                f"boots {', '.join(sorted(_ARCHITECTURES))} guests",
                metadata_arch=self.architecture,
                asked=None,
            )
        return found


@dataclass(frozen=True)
class ImageInput:
    """An image as given, resolved to the disk to boot."""

    kind: ImageKind
    paths: tuple[Path, ...]
    """The files it was read from (a directory's, when a directory was given)."""
    disk: Path
    """The disk to boot: the given one, or a unified tarball's `rootfs.img` extracted."""
    disk_format: str
    metadata: ImageMetadata | None = None

    def guest_arch(self, asked: Arch | None, default: Arch) -> Arch:
        """The architecture to boot: metadata.yaml's, which an `asked` one must agree with;
        `asked` or `default` for a bare disk."""
        if self.metadata is None:
            return asked or default
        return _metadata_arch(self.metadata, asked)

    def describe(self) -> str:
        """One line for the progress: the shape, and what metadata.yaml says."""
        what = {
            ImageKind.DISK: f"a {self.disk_format} disk",
            ImageKind.SPLIT: "a split image (metadata tarball and qcow2 disk)",
            ImageKind.UNIFIED: "a unified tarball",
        }[self.kind]
        if self.metadata is not None:
            props = self.metadata.properties
            said = " ".join(str(props[k]) for k in ("os", "release") if props.get(k))
            what += f", {self.metadata.architecture}" + (f", {said}" if said else "")
        return f"image: {what}"


def _metadata_arch(metadata: ImageMetadata, asked: Arch | None) -> Arch:
    arch = metadata.arch
    if asked is not None and asked is not arch:
        raise ImageArchError(
            f"--arch {asked.value} disagrees with the image's metadata.yaml (architecture "
            f"{metadata.architecture}); drop --arch or give the {asked.value} image",
            metadata_arch=metadata.architecture,
            asked=asked.value,
        )
    return arch


# -- telling the shapes apart --------------------------------------------------------------------


@dataclass(frozen=True)
class _Seen:
    path: Path
    what: str  # "metadata", "unified", "container", "disk" or "other"
    detail: str
    disk_format: str = ""
    metadata: ImageMetadata | None = None

    def line(self) -> str:
        return f"{self.path}: {self.detail}"


def _name(member: tarfile.TarInfo) -> str:
    """A member's name without the `./` or `/` some builders put before each."""
    return member.name.removeprefix("./").lstrip("/").rstrip("/")


def _read_metadata(stream: IO[bytes] | None, where: Path) -> ImageMetadata:
    try:
        loaded: Any = yaml.safe_load(stream.read() if stream is not None else b"")
    except yaml.YAMLError as e:
        raise ImageInputError(
            f"{where}: its {METADATA} is not YAML ({e}); the image is damaged or not LXD's",
            paths=(where,),
        ) from None
    if not isinstance(loaded, dict) or not loaded.get("architecture"):
        raise ImageInputError(
            f"{where}: its {METADATA} has no `architecture`, which LXD requires; add it "
            "(e.g. `architecture: x86_64`)",
            paths=(where,),
        )
    created = loaded.get("creation_date")
    properties = loaded.get("properties") or {}
    return ImageMetadata(
        architecture=str(loaded["architecture"]),
        creation_date=created if isinstance(created, int) else None,
        properties={str(k): str(v) for k, v in properties.items()}
        if isinstance(properties, dict)
        else {},
    )


def _look_at_tarball(path: Path) -> _Seen:
    """A tarball's shape, read in one pass that stops at the disk's header: a compressed
    unified tarball is not decompressed through its disk just to be told apart."""
    metadata: ImageMetadata | None = None
    names: list[str] = []
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            name = _name(member)
            names.append(name)
            if name == METADATA:
                if not member.isfile():
                    return _Seen(path, "other", f"a tarball whose {METADATA} is no regular file")
                metadata = _read_metadata(tar.extractfile(member), path)
            elif name == "rootfs" or name.startswith("rootfs/"):
                return _Seen(path, "container", "a container image's unified tarball (rootfs/)")
            if metadata is not None and ROOTFS in names:
                break
    if not names:  # a blank disk's zeros read as an empty tarball
        return _as_disk(path)
    if metadata is None:
        return _Seen(path, "other", f"a tarball without {METADATA}")
    if ROOTFS in names:
        return _Seen(path, "unified", "a unified tarball", metadata=metadata)
    return _Seen(path, "metadata", "a metadata tarball", metadata=metadata)


def _look_at(path: Path) -> _Seen:
    """What one file is, by its content."""
    try:
        with path.open("rb") as f:
            head = f.read(6)
        if head.startswith(_ZSTD):
            return _Seen(path, "other", "zstd-compressed (decompress it first: `zstd -d`)")
        if head.startswith(_SQUASHFS):
            return _Seen(path, "container", "a squashfs root, a container image's")
        if tarfile.is_tarfile(path):
            return _look_at_tarball(path)
    except (tarfile.TarError, EOFError) as e:
        return _Seen(path, "other", f"a damaged tarball ({e})")
    except OSError as e:
        return _Seen(path, "other", f"unreadable ({e.strerror})")
    for magic, tool in _COMPRESSED:
        if head.startswith(magic):
            return _Seen(path, "other", f"{tool}-compressed, not a tarball (decompress it first)")
    return _as_disk(path)


def _as_disk(path: Path) -> _Seen:
    try:
        fmt = disk_format(path)
    except UnsupportedDiskFormat as e:
        return _Seen(path, "other", f"a {e.disk_format} disk")
    return _Seen(path, "disk", f"a {fmt} disk", disk_format=fmt)


_USAGE = (
    "give a qcow2 or raw disk, a unified tarball, a split image's metadata tarball and its "
    "disk, or the directory that holds one of them"
)


def resolve_image(paths: Sequence[Path]) -> tuple[ImageKind, list[_Seen]]:
    """The shape of the image given as `paths` (one file, a split image's two, or a directory),
    and the files it is made of (the disk; the unified tarball; the metadata tarball, then the
    disk)."""
    if not 1 <= len(paths) <= 2:
        raise ImageInputError(
            f"--image takes one or two paths, not {len(paths)}; {_USAGE}", paths=paths
        )
    for path in paths:
        if not path.exists():
            raise ImageInputError(
                f"looked for the image {path} and found nothing; {_USAGE}", paths=paths
            )
    directory = len(paths) == 1 and paths[0].is_dir()
    if any(p.is_dir() for p in paths) and not directory:
        raise ImageInputError(f"a directory must be the only --image; {_USAGE}", paths=paths)
    if directory:
        seen = [_look_at(p) for p in sorted(paths[0].iterdir()) if p.is_file()]
    else:
        seen = [_look_at(p) for p in paths]
    found = [s.line() for s in seen]
    for s in seen:
        if s.what == "container":
            raise ImageInputError(
                f"{s.path} is {s.detail}; check boots virtual machine images (a qcow2 "
                f"{ROOTFS} or disk)",
                paths=paths,
                found=found,
            )
    if len(paths) == 1 and not directory:
        only = seen[0]
        if only.what == "disk":
            return ImageKind.DISK, seen
        if only.what == "unified":
            return ImageKind.UNIFIED, seen
        if only.what == "metadata":
            raise ImageInputError(
                f"{only.path} is a split image's metadata tarball; give its disk too "
                "(--image METADATA DISK) or the directory that holds both",
                paths=paths,
                found=found,
            )
        raise ImageInputError(f"{only.line()}; {_USAGE}", paths=paths, found=found)
    # A directory's raw files are as likely logs or checksum lists as disks: its disk is qcow2,
    # as LXD's split VM images' are.
    parts = [
        s
        for s in seen
        if s.what in ("unified", "metadata")
        or (s.what == "disk" and (s.disk_format == "qcow2" or not directory))
    ]
    if directory and [s.what for s in parts] == ["unified"]:
        return ImageKind.UNIFIED, parts
    metadata = [s for s in parts if s.what == "metadata"]
    disks = [s for s in parts if s.what == "disk"]
    if len(metadata) == 1 and len(disks) == 1 and len(parts) == 2:
        if disks[0].disk_format != "qcow2":
            raise ImageInputError(
                f"{disks[0].path} is a {disks[0].disk_format} disk; a split VM image's disk is "
                "qcow2 (`qemu-img convert -O qcow2`)",
                paths=paths,
                found=found,
            )
        return ImageKind.SPLIT, [metadata[0], disks[0]]
    given = " and ".join(map(str, paths))
    raise ImageInputError(
        f"found no single image in {given} ({'; '.join(found) or 'no files'}); {_USAGE}",
        paths=paths,
        found=found,
    )


def _extract_rootfs(tarball: Path, into: Path, progress: Progress) -> Path:
    """The tarball's `rootfs.img`, copied into `into` in one streaming pass."""
    progress(f"image: extracting {ROOTFS} from {tarball} into {into}")
    started = time.monotonic()
    target = into / ROOTFS
    try:
        with tarfile.open(tarball, "r|*") as tar:
            for member in tar:
                if _name(member) != ROOTFS:
                    continue
                source = tar.extractfile(member) if member.isfile() else None
                if source is None:
                    raise ImageInputError(
                        f"{tarball}: its {ROOTFS} is not a regular file; the tarball is not LXD's",
                        paths=(tarball,),
                    )
                free = shutil.disk_usage(into).free
                if member.size > free:
                    raise ImageInputError(
                        f"{tarball}: its {ROOTFS} is {member.size >> 20} MiB and {into} has "
                        f"{free >> 20} MiB free; point TMPDIR to a file system with room",
                        paths=(tarball,),
                    )
                with source, target.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                break
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImageInputError(
            f"could not extract {ROOTFS} from {tarball} into {into} ({e}); check the tarball "
            "and the room in TMPDIR",
            paths=(tarball,),
        ) from None
    size = target.stat().st_size >> 20
    progress(f"image: {ROOTFS} ({size} MiB) in {time.monotonic() - started:.1f} s")
    return target


@contextlib.contextmanager
def opened_image(
    paths: Sequence[Path], progress: Progress, asked_arch: Arch | None = None
) -> Iterator[ImageInput]:
    """The image given as `paths`, ready to boot, for as long as the context lasts.

    A unified tarball's disk is extracted into a temporary directory (in TMPDIR) that is
    removed on exit, however the context ends. Every error comes before anything boots, and
    an `asked_arch` that metadata.yaml disagrees with before anything is extracted."""
    kind, parts = resolve_image(paths)
    files = tuple(s.path for s in parts)
    if parts[0].metadata is not None:
        _metadata_arch(parts[0].metadata, asked_arch)
    if kind is ImageKind.DISK:
        yield ImageInput(kind, files, parts[0].path, parts[0].disk_format)
        return
    if kind is ImageKind.SPLIT:
        yield ImageInput(kind, files, parts[1].path, parts[1].disk_format, parts[0].metadata)
        return
    with tempfile.TemporaryDirectory(prefix="lxd-agent-image-") as tmp:
        disk = _extract_rootfs(parts[0].path, Path(tmp), progress)
        fmt = disk_format(disk)
        if fmt != "qcow2":  # as LXD, which refuses any other rootfs.img
            raise ImageInputError(
                f"{parts[0].path}: its {ROOTFS} is a {fmt} disk; a VM image's is qcow2 "
                "(`qemu-img convert -O qcow2`)",
                paths=files,
            )
        yield ImageInput(kind, files, disk, fmt, parts[0].metadata)


# -- writing them ----------------------------------------------------------------------------------


def metadata_yaml(arch: Arch, created: int, properties: Mapping[str, str]) -> str:
    """metadata.yaml as LXD reads it: its two required fields and the image's properties."""
    return yaml.safe_dump(
        {
            "architecture": arch.kernel_name,
            "creation_date": created,
            "properties": dict(properties),
        },
        sort_keys=False,
    )


def _add_metadata(tar: tarfile.TarFile, text: str, mtime: int) -> None:
    data = text.encode()
    entry = tarfile.TarInfo(METADATA)
    entry.size, entry.mtime, entry.mode = len(data), mtime, 0o644
    tar.addfile(entry, io.BytesIO(data))
    templates = tarfile.TarInfo(TEMPLATES)
    templates.type, templates.mtime, templates.mode = tarfile.DIRTYPE, mtime, 0o755
    tar.addfile(templates)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links refused: a copy
        shutil.copyfile(source, target)


def write_lxd_image(disk: Path, kind: ImageKind, target: Path, metadata: str) -> Path:
    """Write `disk` (qcow2) with `metadata` (metadata.yaml's text) as LXD's `kind` of image at
    `target`, which must not exist yet: a directory (`lxd.tar.xz`, `disk.qcow2`) for split, a
    tarball for unified. Whole or not at all: it is made beside `target` and renamed into
    place. The disk is hard-linked where it can be (it is the cache's, which `image --cloud`
    prints as it is: import or copy it, never write to it)."""
    mtime = int(disk.stat().st_mtime)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        if kind is ImageKind.SPLIT:
            with tarfile.open(work / SPLIT_METADATA, "w:xz") as tar:
                _add_metadata(tar, metadata, mtime)
            _link_or_copy(disk, work / SPLIT_DISK)
            made = work
        elif kind is ImageKind.UNIFIED:
            made = work / target.name
            with tarfile.open(made, "w") as tar:
                _add_metadata(tar, metadata, mtime)
                tar.add(disk, arcname=ROOTFS)
        else:
            raise ValueError(f"{kind.value} is not one of LXD's image formats")
        made.chmod(0o755 if made.is_dir() else 0o644)
        os.rename(made, target)  # a directory there already is refused: never half of one
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
