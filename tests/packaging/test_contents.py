"""What the .deb ships: the guest agent and its integration files, and nothing of the host side.

Checked against the built artefact (`dpkg-deb --contents`, and the files unpacked from it), so a
change to debian/*.install, debian/rules or pyproject.toml that ships too much or too little
fails here rather than in a guest.
"""

from __future__ import annotations

import ast
import gzip
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lxd_agent_harness.image.deb import DEB_PACKAGE
from tests.repo import REPO

DIST_PACKAGES = "/usr/lib/python3/dist-packages"
DIST_INFO = f"{DIST_PACKAGES}/lxd_agent-{{version}}.dist-info"

# Everything but the Python modules, which are compared with the source tree below.
INTEGRATION_FILES = {
    "/usr/bin/lxd-agent",
    "/lib/systemd/system/lxd-agent.service",
    "/lib/udev/rules.d/60-lxd-agent.rules",
    "/usr/share/man/man8/lxd-agent.8.gz",
    f"/usr/share/doc/{DEB_PACKAGE}/copyright",
    f"/usr/share/doc/{DEB_PACKAGE}/changelog.gz",
    f"/usr/share/lintian/overrides/{DEB_PACKAGE}",
}
# RECORD is left out on purpose (debian/rules): it would list the harness.
DIST_INFO_FILES = {"METADATA", "WHEEL", "entry_points.txt", "top_level.txt"}


@pytest.fixture(scope="module")
def unpacked(deb: Path) -> Iterator[Path]:
    """The .deb's data tree, extracted into a directory removed after the module."""
    with tempfile.TemporaryDirectory(prefix="lxd-agent-deb-") as tmp:
        subprocess.run(["dpkg-deb", "--extract", str(deb), tmp], check=True)
        yield Path(tmp)


def guest_modules_in_source() -> set[str]:
    """The modules that run in the guest, as installed paths: lxd_agent/*.py and the guest."""
    package = REPO / "lxd_agent"
    sources = [*package.glob("*.py"), *(package / "guest").rglob("*.py")]
    return {f"{DIST_PACKAGES}/{p.relative_to(REPO)}" for p in sources}


def regular_files(contents: dict[str, str]) -> set[str]:
    return {path for path, mode in contents.items() if mode.startswith("-")}


def test_ships_exactly_the_guest_modules_of_the_source_tree(contents: dict[str, str]) -> None:
    shipped = {p for p in regular_files(contents) if p.endswith(".py")}
    expected = guest_modules_in_source()
    assert f"{DIST_PACKAGES}/lxd_agent/guest/__main__.py" in expected
    assert shipped == expected, (
        f"missing: {sorted(expected - shipped)}, unexpected: {sorted(shipped - expected)}"
    )


def test_ships_the_entry_point_unit_rule_man_page_and_docs_and_nothing_else(
    contents: dict[str, str], deb: Path
) -> None:
    version = deb.name.split("_")[1]
    dist_info = DIST_INFO.format(version=version)
    expected = INTEGRATION_FILES | {f"{dist_info}/{name}" for name in DIST_INFO_FILES}
    others = {p for p in regular_files(contents) if not p.endswith(".py")}
    assert others == expected, (
        f"missing: {sorted(expected - others)}, unexpected: {sorted(others - expected)}"
    )


def test_ships_nothing_of_the_host_harness(contents: dict[str, str]) -> None:
    host_side = [p for p in contents if "/lxd_agent/host" in p or "harness" in p]
    assert host_side == []


def test_entry_point_is_executable_and_runs_debians_python3(
    contents: dict[str, str], unpacked: Path
) -> None:
    assert contents["/usr/bin/lxd-agent"] == "-rwxr-xr-x"
    script = (unpacked / "usr/bin/lxd-agent").read_text()
    # A bare interpreter (-I -S: no site, no PYTHON* variables), Debian's dist-packages by hand.
    assert script.startswith("#!/usr/bin/python3 -IS\n")
    assert 'sys.path.append("/usr/lib/python3/dist-packages")' in script
    assert "from lxd_agent.guest.cli import main" in script
    assert "import re" not in script


def test_entry_points_metadata_names_only_the_agent(unpacked: Path) -> None:
    (entry_points,) = unpacked.glob("usr/lib/python3/dist-packages/lxd_agent-*/entry_points.txt")
    scripts = [
        line.replace(" ", "")
        for line in entry_points.read_text().splitlines()
        if "=" in line and not line.startswith("[")
    ]
    assert scripts == ["lxd-agent=lxd_agent.guest.cli:main"]


def test_shipped_modules_parse_as_python_3_8_and_never_import_the_host_side(
    unpacked: Path,
) -> None:
    modules = sorted((unpacked / "usr/lib/python3/dist-packages/lxd_agent").rglob("*.py"))
    assert modules
    for module in modules:
        # Ubuntu 20.04's python3 is 3.8: newer syntax would break the agent there.
        tree = ast.parse(module.read_text(), str(module), feature_version=(3, 8))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith(("lxd_agent.host", "lxd_agent_harness")) for n in names), (
                f"{module.name} imports {names}"
            )


@pytest.mark.parametrize(
    ("shipped", "source"),
    [
        ("lib/systemd/system/lxd-agent.service", "systemd/lxd-agent.service"),
        ("lib/udev/rules.d/60-lxd-agent.rules", "systemd/60-lxd-agent.rules"),
    ],
)
def test_unit_and_udev_rule_are_the_repositorys(unpacked: Path, shipped: str, source: str) -> None:
    assert (unpacked / shipped).read_bytes() == (REPO / source).read_bytes(), (
        f"{shipped} in the .deb differs from {source}: rebuild with `make deb`"
    )


def test_manual_page_is_lxd_agent_in_section_8(unpacked: Path) -> None:
    page = gzip.decompress((unpacked / "usr/share/man/man8/lxd-agent.8.gz").read_bytes())
    text = page.decode()
    assert text.startswith(".TH LXD-AGENT 8 ")
    for command in ("lxd-agent run", "lxd-agent probe", "lxd-agent status write"):
        assert f".B {command}" in text


def test_copyright_is_machine_readable_apache_2(unpacked: Path) -> None:
    text = (unpacked / "usr/share/doc" / DEB_PACKAGE / "copyright").read_text()
    assert text.startswith(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
    )
    assert "\nLicense: Apache-2.0\n" in text
    assert "/usr/share/common-licenses/Apache-2.0" in text
