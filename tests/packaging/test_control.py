"""The binary package's control fields and maintainer scripts, read from the built .deb.

The maintainer scripts are also run for real, in a throw-away root, by test_install.py; the
checks here pin down what must be in them whatever debhelper generates around our own code.
"""

from __future__ import annotations

import re
from pathlib import Path

from lxd_agent import __version__
from tests.packaging.conftest import control_file, control_members, deb_field, relation_names


def test_identity_fields(deb: Path) -> None:
    assert deb_field(deb, "Package") == "lxd-agent"
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


def test_python3_dependency_admits_ubuntu_20_04s_python_3_8(deb: Path) -> None:
    constraint = relation_names(deb_field(deb, "Depends"))["python3"]
    if constraint:
        match = re.fullmatch(r">=\s*3\.(\d+)~?", constraint)
        assert match and int(match.group(1)) <= 8, f"python3 ({constraint}) excludes 3.8"


def test_conflicts_with_and_replaces_ubuntus_lxd_agent_loader(deb: Path) -> None:
    assert "lxd-agent-loader" in relation_names(deb_field(deb, "Conflicts"))
    assert "lxd-agent-loader" in relation_names(deb_field(deb, "Replaces"))


def test_postinst_replays_port_events_only_on_a_running_system(deb: Path) -> None:
    postinst = control_file(deb, "postinst")
    trigger = "udevadm trigger --action=add --subsystem-match=virtio-ports"
    assert trigger in postinst
    guard = postinst[: postinst.index(trigger)]
    for condition in ("[ -d /run/systemd/system ]", '[ -z "${DPKG_ROOT:-}" ]', "! ischroot -t"):
        assert condition in guard


def test_postinst_enables_and_starts_nothing_and_only_restarts_a_running_agent(
    deb: Path,
) -> None:
    postinst = control_file(deb, "postinst")
    assert "enable" not in postinst
    assert "deb-systemd-invoke start" not in postinst
    assert re.search(r"deb-systemd-invoke try-restart '?lxd-agent\.service", postinst)


def test_no_preinst_stops_the_agent_before_an_upgrade(deb: Path) -> None:
    # --no-start without --restart-after-upgrade adds a preinst that stops the agent on upgrade
    # and nothing that starts it again.
    assert "preinst" not in control_members(deb)


def test_prerm_stops_the_agent_on_removal(deb: Path) -> None:
    prerm = control_file(deb, "prerm")
    stop_on_remove = r'\[ "\$1" = remove \].*\n\s*deb-systemd-invoke stop lxd-agent\.service'
    assert re.search(stop_on_remove, prerm)
