"""Tests for lxd_agent_harness.host.lxd_rename: our patch, the private apt configuration and the
changelog entry without a build; then the build itself (Debian's LXD source with our patch,
its Go tests, the `.deb`s), cached after its first run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lxd_agent_harness.host import lxd_rename
from lxd_agent_harness.host.lxd_rename import (
    OUR_TEST,
    PATCH,
    VERSION_SUFFIX,
    _add_changelog_entry,
    _changelog_version,
    _PrivateApt,
    rename_build,
)


def test_the_patch_changes_the_template_the_agent_the_config_drive_and_adds_our_test() -> None:
    text = PATCH.read_text()
    files = sorted(re.findall(r"^\+\+\+ b/(\S+)", text, re.MULTILINE))
    assert files == [
        "lxd-agent/main_agent.go",
        "lxd/instance/drivers/driver_qemu.go",
        "lxd/instance/drivers/driver_qemu_config_test.go",
        "lxd/instance/drivers/driver_qemu_rename_test.go",
        "lxd/instance/drivers/driver_qemu_templates.go",
    ]
    assert f"func {OUR_TEST}(t *testing.T)" in text
    # DEP-3: what it does and who wrote it, before the first diff.
    header = text.split("\n---\n", 1)[0]
    assert header.startswith("Description: ") and "\nAuthor: " in header


def test_the_private_apt_reads_the_hosts_sources_and_ours_and_keeps_its_lists(
    tmp_path: Path,
) -> None:
    apt = _PrivateApt(tmp_path)
    names = sorted(p.name for p in apt.parts.iterdir())
    assert names[-1] == "zz-lxd-agent-deb-src.sources"
    assert "Types: deb-src" in (apt.parts / names[-1]).read_text()
    command = apt.command("update")
    assert command[0] == "apt-get" and command[-1] == "update"
    options = dict(arg.split("=", 1) for arg in command if "::" in arg)
    assert options == {
        "Dir::Etc::SourceList": "/dev/null",
        "Dir::Etc::SourceParts": str(apt.parts),
        "Dir::State::Lists": str(tmp_path / "lists"),
        "Dir::Cache": str(tmp_path / "cache"),
        "APT::Sandbox::User": "root",
    }


def test_the_build_has_a_version_of_its_own_in_the_changelog(tmp_path: Path) -> None:
    (tmp_path / "debian").mkdir()
    (tmp_path / "debian" / "changelog").write_text(
        "lxd (5.0.2-5+deb12u6) bookworm-security; urgency=high\n\n  * A fix.\n\n"
        " -- Someone <someone@example.org>  Mon, 01 Jun 2026 00:00:00 +0000\n"
    )
    _add_changelog_entry(tmp_path, "5.0.2-5+deb12u6" + VERSION_SUFFIX)
    assert _changelog_version(tmp_path) == "5.0.2-5+deb12u6+rename1"
    done = subprocess.run(
        ["dpkg", "--compare-versions", "5.0.2-5+deb12u6+rename1", "gt", "5.0.2-5+deb12u6"],
        check=False,
    )
    assert done.returncode == 0  # an upgrade of Debian's, as the specification's upgrade is


# -- the build ----------------------------------------------------------------------------------


@pytest.mark.vm
def test_the_rename_build_passes_lxds_tests_and_ours_fails_on_the_unpatched_source(
    tmp_path: Path,
) -> None:
    build = rename_build(print)
    record = build.record
    print("lxd rename build:", record["seconds"])
    assert record["go_tests"] == {"patched": "ok", "patched_ours": "ok", "unpatched_ours": "FAIL"}
    assert build.version.endswith(VERSION_SUFFIX) and record["patch"] == PATCH.name
    for package in ("lxd", "lxd-agent", "lxd-client"):
        deb = build.deb(package)
        version = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert version == build.version, deb
    # The daemon in the .deb carries the new layout; the agent writes the new name.
    root = tmp_path / "root"
    for package in ("lxd", "lxd-agent"):
        subprocess.run(["dpkg-deb", "-x", str(build.deb(package)), str(root)], check=True)
    assert b'device "qemu_serial_legacy"' in (root / "usr/bin/lxd").read_bytes()
    assert b"/dev/virtio-ports/com.canonical.lxd" in (root / "usr/bin/lxd-agent").read_bytes()
    shutil.rmtree(root)
    assert lxd_rename.patch_hash() in build.directory.name
