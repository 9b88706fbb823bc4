"""Tests for lxd_agent_harness.image.rootfs: the image cache key, the mmdebstrap command, and
builds with stand-ins for mmdebstrap and mke2fs (no real image is built)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path

import pytest

from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.base.errors import BuildStepFailed, HarnessError, ImageError
from lxd_agent_harness.image import buildsteps
from lxd_agent_harness.image import rootfs as image
from lxd_agent_harness.image.deb import BadPackage
from lxd_agent_harness.image.rootfs import (
    ImageSpec,
    mmdebstrap_command,
    pinned_packages,
    prune_images,
)
from lxd_agent_harness.vm.config import GuestImage
from tests.helpers import minimal_deb


def _deb(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_key_is_stable_for_the_same_inputs(tmp_path: Path) -> None:
    deb = _deb(tmp_path, "a.deb", b"one")
    assert ImageSpec(debs=(deb,)).key() == ImageSpec(debs=(deb,)).key()


def test_key_ignores_package_order() -> None:
    packages = ("python3", "udev", "dbus")
    assert ImageSpec(packages=packages).key() == ImageSpec(packages=packages[::-1]).key()


def test_key_changes_when_the_deb_content_changes(tmp_path: Path) -> None:
    deb = _deb(tmp_path, "a.deb", b"one")
    before = ImageSpec(debs=(deb,)).key()
    deb.write_bytes(b"two")
    assert ImageSpec(debs=(deb,)).key() != before


def test_key_changes_with_release_packages_and_deb_presence(tmp_path: Path) -> None:
    deb = _deb(tmp_path, "a.deb", b"one")
    keys = {
        ImageSpec().key(),
        ImageSpec(release="trixie").key(),
        ImageSpec(packages=(*image.BASE_PACKAGES, "cloud-init")).key(),
        ImageSpec(debs=(deb,)).key(),
    }
    assert len(keys) == 4


def test_key_does_not_depend_on_where_the_deb_lies(tmp_path: Path) -> None:
    a = _deb(tmp_path, "a.deb", b"same")
    (tmp_path / "sub").mkdir()
    b = _deb(tmp_path / "sub", "b.deb", b"same")
    assert ImageSpec(debs=(a,)).key() == ImageSpec(debs=(b,)).key()


def test_missing_deb_is_a_harness_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.deb"
    with pytest.raises(HarnessError, match=r"nope\.deb"):
        ImageSpec(debs=(missing,)).key()


def test_build_refuses_a_missing_deb_before_doing_anything(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="make deb"):
        image.build_image(ImageSpec(debs=(tmp_path / "x.deb",)), cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_complete_cached_image_is_reused_without_building(tmp_path: Path) -> None:
    spec = ImageSpec()
    directory = tmp_path / "images" / spec.key()
    directory.mkdir(parents=True)
    for name in ("disk.raw", "vmlinuz", "initrd.img"):
        (directory / name).write_bytes(b"x")
    os.utime(directory, (1_000_000, 1_000_000))
    messages: list[str] = []
    built = image.build_image(spec, progress=messages.append, cache=tmp_path)
    assert built.directory == directory
    assert any("reusing" in m for m in messages)
    # Marked as used, so pruning keeps it over images not used since.
    assert directory.stat().st_mtime > 1_000_000


def test_mmdebstrap_makes_the_tree_without_the_debs_or_carried_files(tmp_path: Path) -> None:
    deb = _deb(tmp_path, "lxd-agent_0.1.0_all.deb", b"x")
    tree, sources, hook = tmp_path / "t", tmp_path / "s", tmp_path / "h"
    plain = image.mmdebstrap_command(ImageSpec(), tree, sources, hook)
    spec = ImageSpec(debs=(deb,), carried=(deb,))
    assert image.mmdebstrap_command(spec, tree, sources, hook) == plain
    assert not any(str(deb) in arg or arg.startswith("--hook-dir") for arg in plain)
    assert plain[-3:] == ["bookworm", str(tree), str(sources)]
    assert spec.tree_key() == ImageSpec().tree_key() != ImageSpec(release="trixie").tree_key()


def test_carried_files_change_the_key_but_not_the_tree(tmp_path: Path) -> None:
    carried = _deb(tmp_path, "x.deb", b"one")
    spec = ImageSpec(carried=(carried,))
    before = spec.key()
    carried.write_bytes(b"two")
    assert spec.key() != before != ImageSpec().key()
    assert spec.tree_key() == ImageSpec().tree_key()


def test_a_pinned_package_is_asked_for_from_the_releases_own_suite(tmp_path: Path) -> None:
    tree, sources, hook = tmp_path / "t", tmp_path / "s", tmp_path / "h"
    bullseye = image.mmdebstrap_command(ImageSpec(release="bullseye"), tree, sources, hook)
    trixie = image.mmdebstrap_command(ImageSpec(release="trixie"), tree, sources, hook)
    assert "linux-image-cloud-amd64/bullseye" in next(a for a in bullseye if "linux-" in a)
    assert "linux-image-cloud-amd64," in next(a for a in trixie if "linux-" in a)


FAKE_MMDEBSTRAP = """#!/bin/sh
# Stands in for mmdebstrap: the tree is the second-to-last argument.
for last; do :; done
eval tree=\\${$(($# - 1))}
echo run >> "$COUNT_FILE"
mkdir -p "$tree/boot"
echo kernel > "$tree/boot/vmlinuz-6.1.0-test"
echo initrd > "$tree/boot/initrd.img-6.1.0-test"
echo "I: fake mmdebstrap into $tree"
if [ -n "${LEAVE_A_MOUNT:-}" ]; then
  # What the real one leaves when its setup fails: a bind mount inside the tree.
  mkdir -p "$tree/dev" && mount --bind "$LEAVE_A_MOUNT" "$tree/dev" || exit 99
fi
[ -z "${FAIL_MMDEBSTRAP:-}" ] || { echo "E: failed on purpose"; exit 1; }
"""

FAKE_CHROOT = """#!/bin/sh
# Stands in for chroot: records what would run in the tree (dpkg --install PATHS).
echo "$*" >> "$CHROOT_FILE"
"""

FAKE_MKE2FS = """#!/bin/sh
for last; do :; done
eval disk=\\${$(($# - 1))}
echo disk > "$disk"
"""


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """mmdebstrap and mke2fs stand-ins on PATH; returns the file counting mmdebstrap runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("mmdebstrap", FAKE_MMDEBSTRAP),
        ("mke2fs", FAKE_MKE2FS),
        ("chroot", FAKE_CHROOT),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    count = tmp_path / "count"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("COUNT_FILE", str(count))
    # dpkg's chroot gets CHROOT_ENV alone: the stand-in must be on its PATH.
    chroot_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CHROOT_FILE": str(tmp_path / "chroot")}
    monkeypatch.setattr(image, "CHROOT_ENV", {**image.CHROOT_ENV, **chroot_env})
    monkeypatch.setattr(image, "filter_apt_sources", lambda release: "Types: deb\nSuites: x\n")
    return count


def _runs(count: Path) -> int:
    return len(count.read_text().split()) if count.exists() else 0


def test_a_build_publishes_a_complete_image_and_a_second_run_reuses_it(
    tmp_path: Path, fake_tools: Path
) -> None:
    cache = tmp_path / "cache"
    built = image.build_image(ImageSpec(), progress=lambda _: None, cache=cache)
    assert built.is_complete() and (built.directory / "manifest.json").is_file()
    assert built.kernel.read_text() == "kernel\n"
    again = image.build_image(ImageSpec(), progress=lambda _: None, cache=cache)
    assert again.directory == built.directory and _runs(fake_tools) == 1
    assert [p.name for p in (cache / "images").iterdir()] == [ImageSpec().key()]


def test_a_changed_deb_builds_a_new_image_on_the_same_cached_tree(
    tmp_path: Path, fake_tools: Path
) -> None:
    cache, deb = tmp_path / "cache", minimal_deb(tmp_path, "1")
    first = image.build_image(ImageSpec(debs=(deb,)), progress=lambda _: None, cache=cache)
    deb.write_bytes(minimal_deb(tmp_path, "2").read_bytes())
    second = image.build_image(ImageSpec(debs=(deb,)), progress=lambda _: None, cache=cache)
    assert first.directory != second.directory and _runs(fake_tools) == 1
    installs = (tmp_path / "chroot").read_text().splitlines()
    assert len(installs) == 2
    assert all(f"dpkg --install /{image.INSTALL_DIR / deb.name}" in line for line in installs)
    assert [p.name for p in (cache / "trees").iterdir()] == [ImageSpec().tree_key()]


@pytest.mark.parametrize("cut", [0, 100, -20])
def test_a_corrupt_deb_is_named_before_mmdebstrap_runs(
    tmp_path: Path, fake_tools: Path, cut: int
) -> None:
    """Random bytes, a cut control part, a cut data part: dpkg-deb's reason, nothing built."""
    good = minimal_deb(tmp_path).read_bytes()
    deb = _deb(tmp_path, "broken_all.deb", os.urandom(500) if cut == 0 else good[:cut])
    cache = tmp_path / "cache"
    with pytest.raises(BadPackage) as caught:
        image.build_image(ImageSpec(debs=(deb,)), progress=lambda _: None, cache=cache)
    assert caught.value.path == deb
    assert caught.value.reason.startswith("dpkg-deb")
    assert caught.value.check == ("--info" if cut >= 0 else "--fsys-tarfile")
    assert _runs(fake_tools) == 0
    assert not (cache / "images").exists() or list((cache / "images").iterdir()) == []


def test_a_failed_build_leaves_nothing_in_the_cache(
    tmp_path: Path, fake_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL_MMDEBSTRAP", "1")
    cache = tmp_path / "cache"
    with pytest.raises(BuildStepFailed) as failed:
        image.build_image(ImageSpec(), progress=lambda _: None, cache=cache)
    assert failed.value.command[0] == "mmdebstrap" and failed.value.status != 0
    assert "failed on purpose" in failed.value.tail[-1]
    assert "Debian bookworm" in failed.value.step
    assert list((cache / "images").iterdir()) == []


def test_a_failed_build_that_left_a_bind_mount_leaves_nothing_and_names_its_cause(
    tmp_path: Path, fake_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_dir = tmp_path / "host-dev"
    (host_dir / "keep").mkdir(parents=True)
    monkeypatch.setenv("FAIL_MMDEBSTRAP", "1")
    monkeypatch.setenv("LEAVE_A_MOUNT", str(host_dir))
    cache = tmp_path / "cache"
    with pytest.raises(BuildStepFailed) as failed:
        image.build_image(ImageSpec(), progress=lambda _: None, cache=cache)
    assert "failed on purpose" in failed.value.tail[-1]  # the cause, not the cleanup
    assert list((cache / "images").iterdir()) == []
    assert buildsteps.mounts_under(tmp_path) == []
    assert (host_dir / "keep").is_dir()  # detached, never deleted through


def test_an_interrupted_build_leaves_nothing_in_the_cache(tmp_path: Path, fake_tools: Path) -> None:
    def interrupt(line: str) -> None:
        if "fake mmdebstrap" in line:
            raise KeyboardInterrupt

    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        image.build_image(ImageSpec(), progress=interrupt, cache=cache)
    assert list((cache / "images").iterdir()) == []


def _fake_image(images: Path, key: str, mtime: float) -> Path:
    image = GuestImage(images / key)
    image.directory.mkdir(parents=True)
    for path in (image.disk, image.kernel, image.initrd):
        path.write_bytes(b"")
    os.utime(image.directory, (mtime, mtime))
    return image.directory


def test_pruning_keeps_the_most_recently_used_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    dirs = [_fake_image(images, f"key{i}", 1_000_000 + i) for i in range(5)]
    building = images / ".build-key9-x"
    building.mkdir()
    (images / "incomplete").mkdir()
    pruned = prune_images(images, keep=2)
    assert sorted(pruned) == sorted(dirs[:3])
    assert sorted(p.name for p in images.iterdir()) == [
        ".build-key9-x",
        "incomplete",
        "key3",
        "key4",
    ]


def test_an_arm64_image_gets_its_kernel_its_console_and_mmdebstrap_told_the_architecture(
    tmp_path: Path,
) -> None:
    amd64, arm64 = ImageSpec(), ImageSpec(arch=Arch.ARM64)
    assert "linux-image-cloud-amd64" in pinned_packages(amd64)
    assert "linux-image-cloud-arm64" in pinned_packages(arm64)
    assert "linux-image-cloud-amd64" not in pinned_packages(arm64)
    assert amd64.key() != arm64.key()
    command = mmdebstrap_command(arm64, tmp_path / "t", tmp_path / "s", tmp_path / "customize.sh")
    assert "--architectures=arm64" in command
    assert f'--customize-hook=sh "{tmp_path / "customize-arm64.sh"}" "$1"' in command
    assert not any(
        a.startswith("--architectures")
        for a in mmdebstrap_command(
            amd64, tmp_path / "t", tmp_path / "s", tmp_path / "customize.sh"
        )
    )


def test_two_runs_asking_for_one_image_at_once_build_its_tree_and_image_once(
    tmp_path: Path, fake_tools: Path
) -> None:
    cache, deb = tmp_path / "cache", minimal_deb(tmp_path, "1")
    spec = ImageSpec(debs=(deb,))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        built = list(
            pool.map(lambda _: image.build_image(spec, lambda _: None, cache=cache), range(2))
        )
    assert built[0].directory == built[1].directory and built[0].is_complete()
    assert _runs(fake_tools) == 1
    assert len((tmp_path / "chroot").read_text().splitlines()) == 1


def test_an_image_with_cloud_init_disabled_shares_the_tree_and_says_so_in_it(
    tmp_path: Path, fake_tools: Path
) -> None:
    cache = tmp_path / "cache"
    spec = ImageSpec(packages=(*image.BASE_PACKAGES, *image.CLOUD_INIT_PACKAGES))
    off = dataclasses.replace(spec, cloud_init_disabled=True)
    assert off.tree_key() == spec.tree_key() and off.key() != spec.key()
    seen: list[bool] = []
    real = image._copy_boot_files

    def look(tree: Path, out: GuestImage) -> str:
        seen.append((tree / "etc" / "cloud" / "cloud-init.disabled").is_file())
        return real(tree, out)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(image, "_copy_boot_files", look)
        image.build_image(spec, lambda _: None, cache=cache)
        image.build_image(off, lambda _: None, cache=cache)
    assert seen == [False, True] and _runs(fake_tools) == 1
