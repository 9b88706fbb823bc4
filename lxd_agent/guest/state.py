"""The guest's state as Incus 7.3 reads it after ``STARTED`` (facts §10), and the switch for it.

An Incus 7.3 host takes a JSON line after ``STARTED`` on its port (``org.linuxcontainers.incus``)
as the VM's state (Incus's ``api.InstanceState``, kept only with ``pid`` 1) and shows it in
``incus list`` and ``incus info`` instead of asking an agent over vsock, which this agent does
not serve. The line is built here from what the guest itself knows: ``os-release``, the host
name, ``/sys/class/net``, the addresses from one netlink dump, and the processes in the cgroup
tree. No subprocess, no DNS, no socket but one read-only netlink one; every read is bounded.

The line is off unless switched on (`state_switch`): a host before 7.3 has a 16 B ring, and
there the JSON's tail is all that is left, so ``STARTED`` would never be read. The guest cannot
see the ring's size, so the host says it, per VM, as a systemd credential (Incus turns
``systemd.credential.lxd-agent.state=on`` into an SMBIOS type 11 string that systemd 252+
imports), or the image says it in ``/etc/lxd-agent/state``.

Runs in the guest. `state_switch` is on the path to the first ``STARTED`` on Incus's port, so
this module imports only ``os`` and ``struct`` at the top; ``json`` (which loads ``re``) and
``socket`` (which loads ``enum``) are imported when a state is gathered, after ``READY=1``.
Python 3.8 and later (the oldest supported guest's).
"""

from __future__ import annotations

import os
import struct

from lxd_agent.protocol import MINIMAL_STATE_LINE, STARTED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict

    State = Dict[str, Any]

CREDENTIAL = "lxd-agent.state"
"""The switch's name: a systemd credential (``systemd.credential.lxd-agent.state=on`` on Incus)."""

SYSTEM_CREDENTIALS = "/run/credentials/@system"
"""Where systemd (252+) puts the system credentials it imported (SMBIOS type 11, kernel command
line): readable by root, which the agent is."""

SMBIOS_ENTRIES = "/sys/firmware/dmi/entries"
"""The firmware's SMBIOS tables; type 11's strings carry ``io.systemd.credential:NAME=VALUE``.
Read here as well because a sandboxed unit does not see ``/run/credentials/@system`` (its own
mount namespace), and ``LoadCredential=`` of a system credential fails a unit under Debian 11's
systemd 247, which imports none anyway."""

SMBIOS_CREDENTIAL = "io.systemd.credential:"

GUEST_SWITCH = "/etc/lxd-agent/state"
"""The image's own way: a file saying ``on`` (or ``off``); the host's credential wins over it."""

ON_WORDS = ("1", "on", "yes", "true")
OFF_WORDS = ("0", "off", "no", "false")

MAX_STATE_BYTES = 8192 - len(STARTED) - 2
"""The longest state line written: a refresh (``STARTED\n{json}\n``) is then at most half of
Incus's 16 KiB ring, so two the host has not read yet fit whole, and however many pile up, the
ring's last write is always complete, status line first."""


_READ_LIMIT = 65536  # bytes read from any one file: os-release, hosts, a cgroup's processes

# netlink (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h)
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")  # length, type
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_GETADDR = 22
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_AF_UNSPEC, _AF_INET, _AF_INET6 = 0, 2, 10
_SCOPES = {0: "global", 200: "site", 253: "link", 254: "local"}
_NETLINK_TIMEOUT = 1.0

# net/if.h
_IFF_UP, _IFF_BROADCAST, _IFF_LOOPBACK, _IFF_POINTOPOINT = 0x1, 0x2, 0x8, 0x10

# /sys/class/net/IF/statistics/FILE -> Incus's `InstanceStateNetworkCounters` key
_COUNTERS = (
    ("rx_bytes", "bytes_received"),
    ("tx_bytes", "bytes_sent"),
    ("rx_packets", "packets_received"),
    ("tx_packets", "packets_sent"),
    ("rx_errors", "errors_received"),
    ("tx_errors", "errors_sent"),
    ("rx_dropped", "packets_dropped_inbound"),
    ("tx_dropped", "packets_dropped_outbound"),
)


class Roots:
    """Where the state is read from: the real ones, or a tree a test made."""

    __slots__ = ("cgroup", "credentials", "etc", "smbios", "sys_net")

    def __init__(
        self,
        etc: str = "/etc",
        sys_net: str = "/sys/class/net",
        cgroup: str = "/sys/fs/cgroup",
        credentials: str = SYSTEM_CREDENTIALS,
        smbios: str = SMBIOS_ENTRIES,
    ) -> None:
        self.etc = etc
        self.sys_net = sys_net
        self.cgroup = cgroup
        self.credentials = credentials
        self.smbios = smbios


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(_READ_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return None


# -- the switch ---------------------------------------------------------------------------------


def smbios_credentials(entries: str = SMBIOS_ENTRIES) -> dict[str, str]:
    """The systemd credentials in the firmware's SMBIOS type 11 strings, by name (the way Incus
    and QEMU's ``-smbios type=11,value=io.systemd.credential:NAME=VALUE`` pass them)."""
    found: dict[str, str] = {}
    try:
        names = sorted(n for n in os.listdir(entries) if n.startswith("11-"))
    except OSError:
        return found
    for name in names:
        try:
            with open(os.path.join(entries, name, "raw"), "rb") as f:
                raw = f.read(_READ_LIMIT)
        except OSError:
            continue
        if len(raw) < 5 or raw[0] != 11:
            continue
        # The formatted area (its length in byte 1), then NUL-terminated strings.
        for string in raw[raw[1] :].split(b"\0"):
            text = string.decode("utf-8", errors="replace")
            if text.startswith(SMBIOS_CREDENTIAL):
                key, sep, value = text[len(SMBIOS_CREDENTIAL) :].partition("=")
                if sep:
                    found.setdefault(key, value)
    return found


def state_switch(
    roots: Roots | None = None, credentials_directory: str | None = None
) -> tuple[bool, str]:
    """Whether to write the state line, and why: (on, where it was said).

    The host's word first (the unit's own ``$CREDENTIALS_DIRECTORY``, the system's imported
    credentials, the SMBIOS strings they come from), then the image's file. A value that is none
    of `ON_WORDS` and `OFF_WORDS` counts as off, and the reason says what was found.
    """
    roots = roots or Roots()
    said: list[tuple[str | None, str]] = []
    if credentials_directory:
        path = os.path.join(credentials_directory, CREDENTIAL)
        said.append((_read(path), f"the unit's credential, {path}"))
    path = os.path.join(roots.credentials, CREDENTIAL)
    said.append((_read(path), f"the host's credential, {path}"))
    said.append(
        (smbios_credentials(roots.smbios).get(CREDENTIAL), "the host's credential, SMBIOS type 11")
    )
    path = os.path.join(roots.etc, "lxd-agent", "state")
    said.append((_read(path), f"the image, {path}"))
    for text, where in said:
        if text is None:
            continue
        word = text.strip().lower()
        if word in ON_WORDS:
            return True, f"on ({where})"
        if word in OFF_WORDS:
            return False, f"off ({where})"
        return False, f"off: {where} says {text.strip()[:40]!r}, not one of on/off"
    return False, f"off (no {CREDENTIAL} credential, no {GUEST_SWITCH})"


# -- what the state says ------------------------------------------------------------------------


def os_info(roots: Roots | None = None) -> dict[str, str]:
    """Incus's ``os_info``: ``os-release``'s NAME and VERSION, the kernel, the host names.

    The host name is ``/etc/hostname`` (what the guest configured; the unit's own UTS namespace,
    from ``ProtectHostname=``, keeps the name it started with), else the kernel's. The FQDN is
    the first dotted name ``/etc/hosts`` gives that host name, as ``hostname -f`` would find it
    with no DNS; empty when there is none.
    """
    roots = roots or Roots()
    release: dict[str, str] = {}
    text = _read(os.path.join(roots.etc, "os-release")) or _read("/usr/lib/os-release") or ""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            release[key.strip()] = value.strip().strip("\"'")
    hostname = (_read(os.path.join(roots.etc, "hostname")) or "").strip() or os.uname().nodename
    return {
        "os": release.get("NAME", ""),
        "os_version": release.get("VERSION", release.get("VERSION_ID", "")),
        "kernel_version": os.uname().release,
        "hostname": hostname,
        "fqdn": _fqdn(hostname, _read(os.path.join(roots.etc, "hosts")) or ""),
    }


def _fqdn(hostname: str, hosts: str) -> str:
    if "." in hostname:
        return hostname
    short = hostname.split(".")[0]
    for line in hosts.splitlines():
        names = line.split("#")[0].split()[1:]
        if short in names or any(name.split(".")[0] == short for name in names):
            for name in names:
                if "." in name and name.split(".")[0] == short:
                    return name
    return ""


def process_count(roots: Roots | None = None) -> int:
    """The guest's processes, kernel threads left out: every process in a cgroup below the
    root (cgroup v2: kernel threads stay in the root's), as Incus counts from pid 1 down.
    -1 when the tree is not cgroup v2."""
    roots = roots or Roots()
    if not os.path.exists(os.path.join(roots.cgroup, "cgroup.procs")):
        return -1
    count = 0
    for directory, _subdirectories, files in os.walk(roots.cgroup):
        if directory != roots.cgroup and "cgroup.procs" in files:
            text = _read(os.path.join(directory, "cgroup.procs")) or ""
            count += len(text.split())
    return count


def interface_addresses() -> dict[int, list[dict[str, str]]]:
    """Every address of every interface, by interface index, from one netlink dump
    (``RTM_GETADDR``): Incus's ``addresses`` entries (family, address, netmask, scope)."""
    import socket

    found: dict[int, list[dict[str, str]]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(_NETLINK_TIMEOUT)
        sock.bind((0, 0))
        request = _IFADDRMSG.pack(_AF_UNSPEC, 0, 0, 0, 0)
        header = _NLMSG_HEADER.pack(
            _NLMSG_HEADER.size + len(request), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        )
        sock.send(header + request)
        while True:
            data = sock.recv(65536)
            for kind, payload in _messages(data):
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", payload)
                    if errno:
                        raise OSError(-errno, os.strerror(-errno))
                    continue
                address = _address(payload)
                if address is not None:
                    index, entry = address
                    found.setdefault(index, []).append(entry)


def _messages(data: bytes) -> list[tuple[int, bytes]]:
    messages = []
    offset = 0
    while offset + _NLMSG_HEADER.size <= len(data):
        length, kind, _flags, _seq, _port = _NLMSG_HEADER.unpack_from(data, offset)
        if length < _NLMSG_HEADER.size:
            break
        messages.append((kind, data[offset + _NLMSG_HEADER.size : offset + length]))
        offset += (length + 3) & ~3
    return messages


def _address(payload: bytes) -> tuple[int, dict[str, str]] | None:
    if len(payload) < _IFADDRMSG.size:
        return None
    import socket

    family, prefix, _flags, scope, index = _IFADDRMSG.unpack_from(payload)
    if family not in (_AF_INET, _AF_INET6):
        return None
    attributes: dict[int, bytes] = {}
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        attributes[kind] = payload[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    # IFA_LOCAL is an IPv4 interface's own address (IFA_ADDRESS is the peer's on a
    # point-to-point link); IPv6 gives only IFA_ADDRESS.
    raw = attributes.get(_IFA_LOCAL) or attributes.get(_IFA_ADDRESS)
    if raw is None:
        return None
    return index, {
        "family": "inet" if family == _AF_INET else "inet6",
        "address": socket.inet_ntop(family, raw),
        "netmask": str(prefix),
        "scope": _SCOPES.get(scope, str(scope)),
    }


def network(
    roots: Roots | None = None,
    addresses: Callable[[], dict[int, list[dict[str, str]]]] = interface_addresses,
) -> dict[str, dict[str, Any]]:
    """Incus's ``network``: each interface in ``/sys/class/net`` with its addresses, MAC, MTU,
    state (up or down), type and counters."""
    roots = roots or Roots()
    try:
        names = sorted(os.listdir(roots.sys_net))
    except OSError:
        return {}
    try:
        by_index = addresses()
    except OSError:
        by_index = {}
    result: dict[str, dict[str, Any]] = {}
    for name in names:
        base = os.path.join(roots.sys_net, name)
        flags = _number(_read(os.path.join(base, "flags")), 16)
        if flags is None:
            continue
        if flags & _IFF_LOOPBACK:
            kind = "loopback"
        elif flags & _IFF_BROADCAST:
            kind = "broadcast"
        elif flags & _IFF_POINTOPOINT:
            kind = "point-to-point"
        else:
            kind = "unknown"
        index = _number(_read(os.path.join(base, "ifindex")))
        counters = {}
        for file, key in _COUNTERS:
            value = _number(_read(os.path.join(base, "statistics", file)))
            if value is not None:
                counters[key] = value
        result[name] = {
            "addresses": by_index.get(index, []) if index is not None else [],
            "counters": counters,
            "hwaddr": (_read(os.path.join(base, "address")) or "").strip(),
            "mtu": _number(_read(os.path.join(base, "mtu"))) or 0,
            "state": "up" if flags & _IFF_UP else "down",
            "type": kind,
        }
    return result


def _number(text: str | None, base: int = 10) -> int | None:
    try:
        return int((text or "").strip(), base)
    except ValueError:
        return None


def guest_state(roots: Roots | None = None) -> State:
    """The state as Incus's ``api.InstanceState`` names it, from the guest's own sources."""
    return {
        "pid": 1,
        "processes": process_count(roots),
        "os_info": os_info(roots),
        "network": network(roots),
    }


def state_line(state: State, limit: int = MAX_STATE_BYTES) -> str:
    """``state`` as one JSON line of at most ``limit`` bytes.

    Too long (a guest with hundreds of interfaces or addresses), it sheds what the host can
    best do without, in turn: the counters, the loopback's entry, addresses past the first four
    per interface, and then as many of the last interfaces as it must; ``pid``, ``processes``
    and ``os_info`` always stay.
    """
    import json

    def dump(state: State) -> str:
        return json.dumps(state, separators=(",", ":"), ensure_ascii=True)

    line = dump(state)
    for shed in (_no_counters, _no_loopback, _few_addresses):
        if len(line) <= limit:
            return line
        state = shed(state)
        line = dump(state)
    if len(line) <= limit:
        return line
    # The most interfaces that fit, found by halving (each try is one dump).
    interfaces = list((state.get("network") or {}).items())
    fits, low, high = dump(dict(state, network={})), 0, len(interfaces)
    while low < high:
        middle = (low + high + 1) // 2
        line = dump(dict(state, network=dict(interfaces[:middle])))
        if len(line) <= limit:
            fits, low = line, middle
        else:
            high = middle - 1
    return fits if len(fits) <= limit else MINIMAL_STATE_LINE


def _interfaces(state: State, change: Callable[[dict[str, Any]], Any]) -> State:
    kept = {}
    for name, interface in (state.get("network") or {}).items():
        changed = change(dict(interface))
        if changed is not None:
            kept[name] = changed
    return dict(state, network=kept)


def _no_counters(state: State) -> State:
    return _interfaces(state, lambda interface: dict(interface, counters={}))


def _no_loopback(state: State) -> State:
    return _interfaces(
        state, lambda interface: None if interface.get("type") == "loopback" else interface
    )


def _few_addresses(state: State) -> State:
    return _interfaces(
        state, lambda interface: dict(interface, addresses=list(interface.get("addresses", []))[:4])
    )
