"""The binary package's control fields and maintainer scripts, read from the built .deb.

The maintainer scripts are also run for real, in a throw-away root, by test_install.py; the
checks here pin down what must be in them whatever debhelper generates around our own code.
"""

from __future__ import annotations

import re
from pathlib import Path

from lxd_agent import __version__
from lxd_agent_harness.image.deb import DEB_PACKAGE
from tests.packaging.conftest import control_file, deb_field, relation_names


def test_identity_fields(deb: Path) -> None:
    assert deb_field(deb, "Package") == DEB_PACKAGE
    assert deb_field(deb, "Architecture") == "all"
    assert deb_field(deb, "Version") == __version__
    assert deb_field(deb, "Section") == "admin"
    assert deb_field(deb, "Priority") == "optional"
    assert deb_field(deb, "Maintainer")
    assert deb_field(deb, "Description").startswith("guest agent that reports")


def test_depends_on_python3_and_python3_systemd_only(deb: Path) -> None:
    depends = relation_names(deb_field(deb, "Depends"))
    # sdnotify is the fallback for pip installs; the .deb has systemd-python.
    assert set(depends) == {"python3", "python3-systemd"}
    assert depends["python3-systemd"] == ""


def test_python3_dependency_has_no_bound_that_excludes_a_supported_guest(deb: Path) -> None:
    # One .deb for Python 3.8 (Ubuntu 20.04) to 3.13 (Debian 13): dh_python3 would write
    # "python3 (<< 3.12)" for a package tied to the build's Python, which trixie cannot satisfy.
    depends = deb_field(deb, "Depends")
    python3 = [c.strip() for c in depends.split(",") if c.strip().startswith("python3 ")]
    python3 += [c.strip() for c in depends.split(",") if c.strip().startswith("python3:any")]
    assert python3, depends
    for clause in python3:
        assert "<<" not in clause and "<=" not in clause, clause
        lower = re.search(r">=\s*3\.(\d+)", clause)
        assert lower is None or int(lower.group(1)) <= 8, clause


def test_conflicts_with_and_replaces_every_package_with_our_paths(deb: Path) -> None:
    # Debian's lxd-agent (and our own 0.1.0 of that name) and Ubuntu's lxd-agent-loader ship
    # /usr/bin/lxd-agent or lxd-agent.service too; tests/packaging/test_apt.py runs the swap.
    for field in ("Conflicts", "Replaces"):
        assert set(relation_names(deb_field(deb, field))) == {"lxd-agent", "lxd-agent-loader"}


def test_does_not_claim_to_be_lxds_agent(deb: Path) -> None:
    # A package that depends on lxd-agent wants LXD's exec/file API, which this one lacks.
    assert "lxd-agent" not in relation_names(deb_field(deb, "Provides"))


def test_postinst_replays_port_events_only_on_a_running_system(deb: Path) -> None:
    postinst = control_file(deb, "postinst")
    trigger = "udevadm trigger --action=add --subsystem-match=virtio-ports"
    assert trigger in postinst
    guard = postinst[: postinst.index(trigger)]
    for condition in ("[ -d /run/systemd/system ]", '[ -z "${DPKG_ROOT:-}" ]', "! ischroot -t"):
        assert condition in guard


def test_postinst_enables_nothing_and_starts_the_agent_only_on_a_running_system(
    deb: Path,
) -> None:
    postinst = control_file(deb, "postinst")
    assert "enable" not in postinst
    start = "deb-systemd-invoke start lxd-agent.service"
    assert postinst.count(start) == 1
    guard = postinst[: postinst.index(start)].rsplit("\nif ", 1)[1]
    for condition in ("[ -d /run/systemd/system ]", '[ -z "${DPKG_ROOT:-}" ]', "! ischroot -t"):
        assert condition in guard
    assert re.search(r"deb-systemd-invoke try-restart '?lxd-agent\.service", postinst)


def test_preinst_stops_nothing_and_only_diverts_the_merged_usr_alias_of_the_unit(
    deb: Path,
) -> None:
    # --no-start without --restart-after-upgrade adds a preinst that stops the agent on upgrade
    # and nothing that starts it again.
    preinst = control_file(deb, "preinst")
    assert "deb-systemd-invoke" not in preinst and "systemctl" not in preinst
    assert "dpkg-divert --package lxd-status-agent --no-rename" in preinst
    for script in ("postinst", "postrm"):
        assert '--remove "$unit"' in control_file(deb, script), script


def test_prerm_stops_the_agent_on_removal(deb: Path) -> None:
    prerm = control_file(deb, "prerm")
    stop_on_remove = r'\[ "\$1" = remove \].*\n\s*deb-systemd-invoke stop lxd-agent\.service'
    assert re.search(stop_on_remove, prerm)
