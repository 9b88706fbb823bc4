"""Tests for lxd_agent_harness.image.lxd_image: LXD's image formats, told apart and written.

Small qcow2 disks made by the real `qemu-img`; tarballs laid out as LXD's documentation,
distrobuilder and `lxc image export` lay them out. Booting them is in
tests/harness/scenarios/test_check.py (`check` on the harness's split and unified images).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.image import lxd_image
from lxd_agent_harness.image.lxd_image import (
    ImageArchError,
    ImageInputError,
    ImageKind,
    metadata_yaml,
    opened_image,
    resolve_image,
    write_lxd_image,
)

X86_METADATA = (
    "architecture: x86_64\ncreation_date: 1700000000\n"
    "properties:\n  os: Debian\n  release: bookworm\n"
)


def _qcow2(path: Path, content: bytes = b"boot") -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True, timeout=30
    )
    # Something of its own in the disk, so that an extracted copy can be told from another.
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {content[0]} 0 512", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


def _tarball(path: Path, members: dict[str, bytes | Path | None], mode: str = "w") -> Path:
    """A tarball of `members`: bytes as files, a Path as that file's content, None as a
    directory; names as given (LXD's own exports prefix none, some builders `./`)."""
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for name, content in members.items():
            if content is None:
                entry = tarfile.TarInfo(name)
                entry.type = tarfile.DIRTYPE
                tar.addfile(entry)
            elif isinstance(content, Path):
                tar.add(content, arcname=name)
            else:
                entry = tarfile.TarInfo(name)
                entry.size = len(content)
                tar.addfile(entry, io.BytesIO(content))
    return path


def _gzipped(source: Path, target: Path) -> Path:
    with source.open("rb") as f, gzip.open(target, "wb") as out:
        shutil.copyfileobj(f, out)
    return target


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return _qcow2(tmp_path / "made.qcow2")


def test_a_bare_qcow2_disk_is_a_disk_without_metadata(disk: Path) -> None:
    with opened_image([disk], print) as image:
        assert (image.kind, image.disk, image.disk_format, image.metadata) == (
            ImageKind.DISK,
            disk,
            "qcow2",
            None,
        )
        assert image.guest_arch(None, Arch.ARM64) is Arch.ARM64  # nothing says otherwise


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz"])
def test_a_unified_tarball_is_extracted_for_the_check_and_removed_after(
    tmp_path: Path, disk: Path, mode: str
) -> None:
    tarball = _tarball(
        tmp_path / "image.tar",
        {"./metadata.yaml": X86_METADATA.encode(), "./rootfs.img": disk, "./templates": None},
        mode,
    )
    with opened_image([tarball], print) as image:
        assert image.kind is ImageKind.UNIFIED
        assert image.paths == (tarball,)
        assert image.disk_format == "qcow2"
        assert image.disk.read_bytes() == disk.read_bytes()
        assert image.metadata is not None and image.metadata.properties["release"] == "bookworm"
        assert image.guest_arch(None, Arch.ARM64) is Arch.AMD64
        extracted = image.disk
    assert not extracted.exists() and not extracted.parent.exists()


def test_an_error_inside_the_check_still_removes_the_extracted_disk(
    tmp_path: Path, disk: Path
) -> None:
    tarball = _tarball(
        tmp_path / "u.tar", {"metadata.yaml": X86_METADATA.encode(), "rootfs.img": disk}
    )
    with pytest.raises(RuntimeError), opened_image([tarball], print) as image:
        extracted = image.disk
        raise RuntimeError("the boot failed")
    assert not extracted.parent.exists()


@pytest.mark.parametrize(
    ("metadata_name", "disk_name"),
    [
        ("lxd.tar.xz", "disk.qcow2"),  # distrobuilder's build-lxd --vm
        ("incus.tar.xz", "disk.qcow2"),  # images.linuxcontainers.org
        ("meta-0123abcd.tar", "0123abcd.qcow2"),  # lxc image export (LXD's lxd/images.go)
    ],
)
def test_a_split_image_is_found_by_content_in_a_directory_or_as_two_paths_in_either_order(
    tmp_path: Path, metadata_name: str, disk_name: str
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    mode = "w:xz" if metadata_name.endswith(".xz") else "w"
    meta = _tarball(
        folder / metadata_name, {"metadata.yaml": X86_METADATA.encode(), "templates": None}, mode
    )
    split_disk = _qcow2(folder / disk_name)
    (folder / "SHA256SUMS").write_text("not an image\n")  # a builder's other files are left alone
    for given in ([folder], [meta, split_disk], [split_disk, meta]):
        with opened_image(given, print) as image:
            assert (image.kind, image.paths, image.disk) == (
                ImageKind.SPLIT,
                (meta, split_disk),
                split_disk,
            )
            assert image.metadata is not None and image.metadata.architecture == "x86_64"


@pytest.mark.parametrize(
    ("layout", "says"),
    [
        ("metadata-alone", "is a split image's metadata tarball; give its disk too"),
        ("container-unified", "is a container image's unified tarball (rootfs/)"),
        ("squashfs", "is a squashfs root, a container image's"),
        ("two-disks", "found no single image in"),
        ("raw-split-disk", "a split VM image's disk is qcow2"),
        ("no-architecture", "has no `architecture`, which LXD requires"),
        ("not-yaml", "is not YAML"),
        ("zstd", "zstd-compressed (decompress it first"),
        ("three-paths", "--image takes one or two paths, not 3"),
        ("empty-directory", "(no files)"),
        ("gzip-disk", "gzip-compressed, not a tarball (decompress it first)"),
        ("container-without-its-directory", "a container image's unified tarball (rootfs/)"),
    ],
)
def test_what_is_no_image_is_refused_saying_what_was_found(
    tmp_path: Path, disk: Path, layout: str, says: str
) -> None:
    meta = _tarball(tmp_path / "lxd.tar", {"metadata.yaml": X86_METADATA.encode()})
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\1" * 4096)
    given: list[Path] = {
        "metadata-alone": lambda: [meta],
        "container-unified": lambda: [
            _tarball(tmp_path / "c.tar", {"metadata.yaml": X86_METADATA.encode(), "rootfs": None})
        ],
        "squashfs": lambda: [tmp_path / "rootfs.squashfs"],
        "two-disks": lambda: [tmp_path / "two"],
        "raw-split-disk": lambda: [meta, raw],
        "no-architecture": lambda: [
            _tarball(
                tmp_path / "n.tar", {"metadata.yaml": b"creation_date: 1\n", "rootfs.img": disk}
            )
        ],
        "not-yaml": lambda: [
            _tarball(
                tmp_path / "y.tar",
                {"metadata.yaml": b"architecture: [x86_64\n", "rootfs.img": disk},
            )
        ],
        "zstd": lambda: [tmp_path / "image.tar.zst"],
        "three-paths": lambda: [meta, disk, raw],
        "empty-directory": lambda: [tmp_path / "empty"],
        "gzip-disk": lambda: [_gzipped(disk, tmp_path / "disk.qcow2.gz")],
        "container-without-its-directory": lambda: [
            _tarball(
                tmp_path / "d.tar", {"metadata.yaml": X86_METADATA.encode(), "rootfs/etc/os": b""}
            )
        ],
    }[layout]()
    (tmp_path / "rootfs.squashfs").write_bytes(b"hsqs" + b"\0" * 100)
    (tmp_path / "image.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "two").mkdir()
    _tarball(tmp_path / "two" / "lxd.tar", {"metadata.yaml": X86_METADATA.encode()})
    _qcow2(tmp_path / "two" / "first.qcow2")
    _qcow2(tmp_path / "two" / "second.qcow2")
    with pytest.raises(ImageInputError) as raised:
        resolve_image(given)
    assert says in str(raised.value)
    assert raised.value.paths == tuple(given)
    if layout == "two-disks":  # each file looked at is named with what it is
        assert f"{tmp_path / 'two' / 'second.qcow2'}: a qcow2 disk" in raised.value.found
        assert f"{tmp_path / 'two' / 'lxd.tar'}: a metadata tarball" in raised.value.found


@pytest.mark.parametrize(
    ("architecture", "asked", "expected"),
    [
        ("x86_64", None, Arch.AMD64),
        ("amd64", Arch.AMD64, Arch.AMD64),
        ("aarch64", None, Arch.ARM64),
        ("arm64", Arch.ARM64, Arch.ARM64),
    ],
)
def test_the_guest_architecture_comes_from_metadata_yaml(
    architecture: str, asked: Arch | None, expected: Arch
) -> None:
    image = lxd_image.ImageInput(
        ImageKind.SPLIT, (), Path("d"), "qcow2", lxd_image.ImageMetadata(architecture)
    )
    assert image.guest_arch(asked, Arch.AMD64) is expected


def test_an_arch_that_disagrees_with_metadata_yaml_is_an_error_with_both() -> None:
    image = lxd_image.ImageInput(
        ImageKind.UNIFIED, (), Path("d"), "qcow2", lxd_image.ImageMetadata("aarch64")
    )
    with pytest.raises(ImageArchError) as raised:
        image.guest_arch(Arch.AMD64, Arch.AMD64)
    assert (raised.value.metadata_arch, raised.value.asked) == ("aarch64", "amd64")
    s390x = lxd_image.ImageInput(
        ImageKind.SPLIT, (), Path("d"), "qcow2", lxd_image.ImageMetadata("s390x")
    )
    with pytest.raises(ImageArchError) as raised:
        s390x.guest_arch(None, Arch.AMD64)
    assert (raised.value.metadata_arch, raised.value.asked) == ("s390x", None)


@pytest.mark.parametrize("kind", [ImageKind.SPLIT, ImageKind.UNIFIED])
def test_what_the_harness_writes_reads_back_as_that_kind_with_its_metadata(
    tmp_path: Path, disk: Path, kind: ImageKind
) -> None:
    text = metadata_yaml(Arch.ARM64, 1700000000, {"os": "Debian", "release": "trixie"})
    target = tmp_path / ("split" if kind is ImageKind.SPLIT else "unified.tar")
    assert write_lxd_image(disk, kind, target, text) == target
    with opened_image([target], print) as image:
        assert image.kind is kind
        assert image.disk.read_bytes() == disk.read_bytes()
        assert image.metadata == lxd_image.ImageMetadata(
            "aarch64", 1700000000, {"os": "Debian", "release": "trixie"}
        )
    if kind is ImageKind.SPLIT:  # the cache's disk, linked rather than copied
        assert os.path.samefile(target / "disk.qcow2", disk)
        with tarfile.open(target / "lxd.tar.xz") as tar:
            assert tar.getnames() == ["metadata.yaml", "templates"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_write_that_fails_leaves_neither_the_target_nor_its_work(
    tmp_path: Path, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(source: Path, target: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lxd_image, "_link_or_copy", full)
    target = tmp_path / "split"
    with pytest.raises(OSError):
        write_lxd_image(disk, ImageKind.SPLIT, target, metadata_yaml(Arch.AMD64, 1, {}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made.qcow2"]


def test_a_blank_raw_disk_is_a_disk_though_its_zeros_read_as_an_empty_tarball(
    tmp_path: Path,
) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    assert tarfile.is_tarfile(blank)  # what the shape test has to look past
    kind, (seen,) = resolve_image([blank])
    assert (kind, seen.disk_format) == (ImageKind.DISK, "raw")


def test_a_unified_tarballs_raw_rootfs_is_refused_as_lxd_refuses_it(tmp_path: Path) -> None:
    raw = tmp_path / "rootfs.raw"
    raw.write_bytes(b"\1" * 4096)
    tarball = _tarball(
        tmp_path / "u.tar", {"metadata.yaml": X86_METADATA.encode(), "rootfs.img": raw}
    )
    with pytest.raises(ImageInputError) as raised, opened_image([tarball], print):
        pass
    assert "its rootfs.img is a raw disk; a VM image's is qcow2" in str(raised.value)
    assert list(Path(tempfile.gettempdir()).glob(f"lxd-agent-image-*/{raw.name}")) == []


def test_an_arch_that_disagrees_is_refused_before_anything_is_extracted(
    tmp_path: Path, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object) -> Path:
        raise AssertionError("extracted before the architecture was checked")

    monkeypatch.setattr(lxd_image, "_extract_rootfs", never)
    tarball = _tarball(
        tmp_path / "u.tar", {"metadata.yaml": X86_METADATA.encode(), "rootfs.img": disk}
    )
    with pytest.raises(ImageArchError), opened_image([tarball], print, Arch.ARM64):
        pass


def test_a_split_image_is_never_written_over_one_that_is_there(tmp_path: Path, disk: Path) -> None:
    target = tmp_path / "split"
    write_lxd_image(disk, ImageKind.SPLIT, target, metadata_yaml(Arch.AMD64, 1, {}))
    with pytest.raises(OSError):
        write_lxd_image(disk, ImageKind.SPLIT, target, metadata_yaml(Arch.ARM64, 2, {}))
    with opened_image([target], print) as image:  # the first, whole
        assert image.metadata is not None and image.metadata.architecture == "x86_64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made.qcow2", "split"]
