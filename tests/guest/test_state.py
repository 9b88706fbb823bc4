"""The state line's sources and its switch (lxd_agent.guest.state), on trees a test makes, and
the netlink dump against this machine's own kernel."""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

import pytest

from lxd_agent.guest import state as state_module
from lxd_agent.guest.state import (
    CREDENTIAL,
    MAX_STATE_BYTES,
    Roots,
    guest_state,
    interface_addresses,
    network,
    os_info,
    process_count,
    smbios_credentials,
    state_line,
    state_switch,
)
from lxd_agent.protocol import MINIMAL_STATE_LINE

# The JSON keys of Incus's `api.InstanceState` the agent fills (shared/api/instance_state.go,
# facts §10): anything else would be ignored by the host, or be a typo.
STATE_KEYS = {"pid", "processes", "os_info", "network"}
OS_INFO_KEYS = {"os", "os_version", "kernel_version", "hostname", "fqdn"}
INTERFACE_KEYS = {"addresses", "counters", "hwaddr", "mtu", "state", "type"}
ADDRESS_KEYS = {"family", "address", "netmask", "scope"}
COUNTER_KEYS = {
    "bytes_received",
    "bytes_sent",
    "packets_received",
    "packets_sent",
    "errors_received",
    "errors_sent",
    "packets_dropped_inbound",
    "packets_dropped_outbound",
}


def roots(tmp_path: Path) -> Roots:
    for name in ("etc", "net", "cgroup", "credentials", "dmi"):
        (tmp_path / name).mkdir(exist_ok=True)
    return Roots(
        etc=str(tmp_path / "etc"),
        sys_net=str(tmp_path / "net"),
        cgroup=str(tmp_path / "cgroup"),
        credentials=str(tmp_path / "credentials"),
        smbios=str(tmp_path / "dmi"),
    )


def smbios_type_11(tmp_path: Path, instance: int, *strings: bytes) -> None:
    """/sys/firmware/dmi/entries/11-N/raw: the 5-byte formatted area, then the strings (as QEMU's
    `-smbios type=11,value=...` makes them; read from a guest's sysfs)."""
    entry = tmp_path / "dmi" / f"11-{instance}"
    entry.mkdir()
    raw = bytes([11, 5, 0, 14 + instance, len(strings)]) + b"".join(s + b"\0" for s in strings)
    (entry / "raw").write_bytes(raw + b"\0")


# -- the switch ---------------------------------------------------------------------------------


def test_the_switch_is_off_with_nothing_said(tmp_path: Path) -> None:
    on, why = state_switch(roots(tmp_path))
    assert not on and CREDENTIAL in why


def test_the_images_file_turns_it_on(tmp_path: Path) -> None:
    r = roots(tmp_path)
    (tmp_path / "etc" / "lxd-agent").mkdir()
    (tmp_path / "etc" / "lxd-agent" / "state").write_text("on\n")
    on, why = state_switch(r)
    assert on and "the image" in why


def test_the_hosts_credential_wins_over_the_image(tmp_path: Path) -> None:
    r = roots(tmp_path)
    (tmp_path / "etc" / "lxd-agent").mkdir()
    (tmp_path / "etc" / "lxd-agent" / "state").write_text("on\n")
    (tmp_path / "credentials" / CREDENTIAL).write_text("off")
    assert state_switch(r) == (False, f"off (the host's credential, {r.credentials}/{CREDENTIAL})")
    # The unit's own credentials directory (ImportCredential=, LoadCredential=) comes first.
    unit = tmp_path / "unit"
    unit.mkdir()
    (unit / CREDENTIAL).write_text("yes")
    on, why = state_switch(r, credentials_directory=str(unit))
    assert on and "the unit's credential" in why


def test_the_hosts_smbios_string_turns_it_on_where_no_credential_was_imported(
    tmp_path: Path,
) -> None:
    r = roots(tmp_path)
    smbios_type_11(tmp_path, 0, b"vendor:other", b"io.systemd.credential:lxd-agent.state=on")
    smbios_type_11(tmp_path, 1, b"io.systemd.credential:other=1")
    assert smbios_credentials(r.smbios) == {"lxd-agent.state": "on", "other": "1"}
    assert state_switch(r) == (True, "on (the host's credential, SMBIOS type 11)")
    # Imported by systemd (outside a sandbox the agent sees it there first): the same word.
    (tmp_path / "credentials" / CREDENTIAL).write_text("on")
    on, why = state_switch(r)
    assert on and str(tmp_path / "credentials") in why


def test_a_value_that_is_neither_on_nor_off_is_off_and_named(tmp_path: Path) -> None:
    r = roots(tmp_path)
    (tmp_path / "credentials" / CREDENTIAL).write_text("maybe")
    on, why = state_switch(r)
    assert not on and "'maybe'" in why


# -- the sources --------------------------------------------------------------------------------


def test_os_info_comes_from_os_release_hostname_and_hosts(tmp_path: Path) -> None:
    r = roots(tmp_path)
    etc = tmp_path / "etc"
    (etc / "os-release").write_text(
        'NAME="Debian GNU/Linux"\nVERSION_ID="12"\nVERSION="12 (bookworm)"\n'
    )
    (etc / "hostname").write_text("guest\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 guest.example.org guest\n")
    info = os_info(r)
    assert set(info) == OS_INFO_KEYS
    assert info["os"] == "Debian GNU/Linux" and info["os_version"] == "12 (bookworm)"
    assert info["hostname"] == "guest" and info["fqdn"] == "guest.example.org"
    assert info["kernel_version"] == os.uname().release


def test_os_info_without_a_dotted_name_has_an_empty_fqdn(tmp_path: Path) -> None:
    r = roots(tmp_path)
    (tmp_path / "etc" / "hostname").write_text("guest\n")
    (tmp_path / "etc" / "hosts").write_text("127.0.1.1\tguest\n")
    assert os_info(r)["fqdn"] == ""


def test_processes_are_counted_below_the_root_cgroup_only(tmp_path: Path) -> None:
    r = roots(tmp_path)
    cgroup = tmp_path / "cgroup"
    (cgroup / "cgroup.procs").write_text("2\n3\n4\n")  # the kernel's threads stay in the root
    (cgroup / "init.scope").mkdir()
    (cgroup / "init.scope" / "cgroup.procs").write_text("1\n")
    service = cgroup / "system.slice" / "lxd-agent.service"
    service.mkdir(parents=True)
    (cgroup / "system.slice" / "cgroup.procs").write_text("")
    (service / "cgroup.procs").write_text("300\n301\n")
    assert process_count(r) == 3


def test_processes_are_minus_one_without_cgroup_v2(tmp_path: Path) -> None:
    assert process_count(roots(tmp_path)) == -1


def interface(net: Path, name: str, index: int, flags: int, mac: str, mtu: int) -> None:
    base = net / name
    (base / "statistics").mkdir(parents=True)
    (base / "ifindex").write_text(f"{index}\n")
    (base / "flags").write_text(f"{flags:#x}\n")
    (base / "address").write_text(mac + "\n")
    (base / "mtu").write_text(f"{mtu}\n")
    for n, counter in enumerate(("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")):
        (base / "statistics" / counter).write_text(f"{index * 100 + n}\n")


def test_network_names_each_interface_with_its_addresses_state_and_type(tmp_path: Path) -> None:
    r = roots(tmp_path)
    net = tmp_path / "net"
    interface(net, "lo", 1, 0x9, "00:00:00:00:00:00", 65536)  # UP | LOOPBACK
    interface(net, "enp0s3", 2, 0x1003, "52:54:00:12:34:56", 1500)  # UP | BROADCAST | MULTICAST
    interface(net, "enp0s4", 3, 0x1002, "52:54:00:12:34:57", 1500)  # down
    address = {"family": "inet", "address": "10.0.2.15", "netmask": "24", "scope": "global"}
    found = network(r, addresses=lambda: {2: [address]})
    assert sorted(found) == ["enp0s3", "enp0s4", "lo"]
    nic = found["enp0s3"]
    assert set(nic) == INTERFACE_KEYS
    assert nic["addresses"] == [address]
    assert (nic["hwaddr"], nic["mtu"], nic["state"], nic["type"]) == (
        "52:54:00:12:34:56",
        1500,
        "up",
        "broadcast",
    )
    assert nic["counters"]["bytes_received"] == 200 and nic["counters"]["bytes_sent"] == 201
    assert set(nic["counters"]) <= COUNTER_KEYS
    assert found["lo"]["type"] == "loopback" and found["enp0s4"]["state"] == "down"


def test_network_without_netlink_still_lists_the_interfaces(tmp_path: Path) -> None:
    r = roots(tmp_path)
    interface(tmp_path / "net", "enp0s3", 2, 0x1003, "52:54:00:12:34:56", 1500)

    def refused() -> dict[int, list[dict[str, str]]]:
        raise PermissionError(1, "Operation not permitted")  # RestrictAddressFamilies= without it

    assert network(r, addresses=refused)["enp0s3"]["addresses"] == []


def test_the_netlink_dump_finds_this_machines_loopback_address() -> None:
    addresses = interface_addresses()
    loopback = socket.if_nametoindex("lo")
    assert {"family": "inet", "address": "127.0.0.1", "netmask": "8", "scope": "local"} in (
        addresses[loopback]
    )
    for entries in addresses.values():
        for entry in entries:
            assert set(entry) == ADDRESS_KEYS


def test_an_ipv4_point_to_point_address_is_the_local_one_not_the_peer() -> None:
    def attribute(kind: int, value: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(value), kind) + value

    payload = (
        struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 7)
        + attribute(1, socket.inet_aton("10.9.9.1"))  # IFA_ADDRESS: the peer
        + attribute(2, socket.inet_aton("10.9.9.2"))  # IFA_LOCAL: ours
    )
    assert state_module._address(payload) == (
        7,
        {"family": "inet", "address": "10.9.9.2", "netmask": "32", "scope": "global"},
    )


# -- the line -----------------------------------------------------------------------------------


def test_the_state_of_this_machine_is_one_json_line_with_incus_keys_and_pid_1() -> None:
    line = state_line(guest_state())
    assert "\n" not in line and len(line) <= MAX_STATE_BYTES and line.isascii()
    state = json.loads(line)
    assert set(state) == STATE_KEYS and state["pid"] == 1
    assert set(state["os_info"]) == OS_INFO_KEYS


def test_a_state_too_long_sheds_counters_first_and_keeps_os_info() -> None:
    counters = dict.fromkeys(COUNTER_KEYS, 12345678901)
    interfaces = {
        f"eth{i}": {"addresses": [{"address": f"10.0.{i}.2"}], "counters": counters}
        for i in range(40)
    }
    state = {"pid": 1, "processes": 9, "os_info": {"os": "Debian"}, "network": interfaces}
    assert len(json.dumps(state)) > MAX_STATE_BYTES
    kept = json.loads(state_line(state))
    assert len(kept["network"]) == 40  # all interfaces, their counters gone
    assert all(i["counters"] == {} for i in kept["network"].values())
    assert kept["os_info"] == {"os": "Debian"} and kept["processes"] == 9


@pytest.mark.parametrize("count", [300, 3000])
def test_a_state_with_very_many_interfaces_keeps_as_many_as_fit(count: int) -> None:
    interfaces = {
        f"eth{i}": {"addresses": [{"address": f"10.{i // 250}.{i % 250}.2"}]} for i in range(count)
    }
    state = {"pid": 1, "os_info": {"os": "Debian"}, "network": interfaces}
    line = state_line(state)
    kept = json.loads(line)
    assert MAX_STATE_BYTES - 100 < len(line) <= MAX_STATE_BYTES
    assert list(kept["network"]) == list(interfaces)[: len(kept["network"])]
    assert kept["os_info"] == {"os": "Debian"}


def test_a_state_that_cannot_fit_at_all_is_the_minimal_one() -> None:
    state = {"pid": 1, "os_info": {"os": "x" * (MAX_STATE_BYTES + 1)}}
    assert state_line(state) == MINIMAL_STATE_LINE
