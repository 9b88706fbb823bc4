"""The host's apt sources, rewritten for the Debian release a guest is built from.

The harness never names a mirror: it reads the machine's own apt configuration (deb822
`*.sources` and one-line `*.list` files, as apt does) at run time, keeps the Debian stanzas and
changes only the suite names to the release asked for (`bookworm-security` becomes
`trixie-security`). Host side only; it reads files and runs nothing.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterable

from lxd_agent_harness.base.errors import HarnessError

# The Debian releases a guest can be built from, with their version numbers. The host's own
# mirror serves them all: only the suite names in its apt sources change (see filter_apt_sources).
RELEASES = {"bullseye": 11, "bookworm": 12, "trixie": 13}
DEFAULT_RELEASE = "bookworm"
OS_RELEASE = Path("/etc/os-release")

APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
DEBIAN_KEYRING = "debian-archive-keyring"
"""In a Debian stanza's Signed-By (or none: apt's trusted keys, Debian's on a Debian host)."""
APT_SOURCES_LIST = Path("/etc/apt/sources.list")


class AptSourcesError(HarnessError):
    """The host's apt sources have nothing to build the release from."""

    def __init__(self, message: str, *, release: str, found_suites: list[str]) -> None:
        super().__init__(message)
        self.release = release
        self.found_suites = found_suites
        """Every suite of the host's active binary sources, sorted."""


def _suite_belongs(suite: str, release: str) -> bool:
    """`bookworm`, `bookworm-updates`, `bookworm-security` and `bookworm/updates` all belong."""
    return suite == release or suite.startswith((release + "-", release + "/"))


def _parse_deb822(text: str) -> list[dict[str, str]]:
    """Stanzas of a deb822 file as ordered field dicts; comments dropped, continuations kept."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, None
        elif line[0] in " \t" and last is not None:
            current[last] += "\n" + line
        elif ":" in line:
            name, _, value = line.partition(":")
            last = name.strip()
            current[last] = value.strip()
    return stanzas


def _one_line_to_deb822(text: str) -> list[dict[str, str]]:
    """`deb [opt=v ...] URI SUITE COMPONENT...` lines of a sources.list as deb822 stanzas."""
    option_fields = {"signed-by": "Signed-By", "arch": "Architectures", "trusted": "Trusted"}
    stanzas: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue  # deb-src lines are not needed to build a tree
        rest = line[4:].strip()
        stanza = {"Types": "deb"}
        match = re.match(r"\[([^\]]*)\]\s*(.*)", rest)
        if match:
            for option in match.group(1).split():
                name, _, value = option.partition("=")
                if name in option_fields:
                    stanza[option_fields[name]] = value.replace(",", " ")
            rest = match.group(2)
        words = rest.split()
        if len(words) < 2:
            continue
        stanza["URIs"] = words[0]
        stanza["Suites"] = words[1]
        stanza["Components"] = " ".join(words[2:])
        stanzas.append(stanza)
    return stanzas


def _active_source_files(sources_dir: Path, sources_list: Path) -> list[Path]:
    """The files apt itself reads: `*.sources` and `*.list`, not `*.disabled-*` or backups."""
    files = [sources_list] if sources_list.is_file() else []
    if sources_dir.is_dir():
        files += sorted(
            p for p in sources_dir.iterdir() if p.is_file() and p.suffix in (".sources", ".list")
        )
    return files


def host_release(os_release: Path = OS_RELEASE) -> str:
    """The host's Debian codename (`VERSION_CODENAME` in /etc/os-release), "" if it has none."""
    with contextlib.suppress(OSError):
        for line in os_release.read_text(encoding="utf-8", errors="replace").splitlines():
            name, _, value = line.partition("=")
            if name.strip() == "VERSION_CODENAME":
                return value.strip().strip("\"'")
    return ""


def _release_suites(suites: Iterable[str], release: str, host: str) -> list[str]:
    """The suites of one stanza for `release`: its own, or the host's with the codename swapped.

    `bookworm-security` becomes `trixie-security` for a trixie guest on a bookworm host; suites
    of other releases and of third-party repositories (`nodistro`) are dropped, and so are
    backports: a guest is the release as Debian ships it, and an old release's backports leave
    the mirrors (bullseye-backports is gone: a host's bookworm-backports, renamed, failed apt).
    """
    kept: list[str] = []
    for suite in suites:
        if "-backports" in suite:
            continue
        if _suite_belongs(suite, release):
            kept.append(suite)
        elif host and _suite_belongs(suite, host):
            kept.append(release + suite[len(host) :])
    return list(dict.fromkeys(kept))


def filter_apt_sources(
    release: str,
    sources_dir: Path = APT_SOURCES_DIR,
    sources_list: Path = APT_SOURCES_LIST,
    host: str | None = None,
) -> str:
    """The host's active binary apt sources for `release`, as deb822 text.

    The URIs, components and keys are the host's; the suites are the host's own release's with
    its codename changed to `release` (and any suite of `release` the host lists itself).
    Other suites are dropped, so third-party repositories do not leak into the guest.
    """
    if host is None:
        host = host_release()
    stanzas: list[dict[str, str]] = []
    seen_suites: set[str] = set()
    for stanza in _active_binary_stanzas(sources_dir, sources_list):
        suites = stanza.get("Suites", "").split()
        seen_suites.update(suites)
        kept = _release_suites(suites, release, host)
        if kept and stanza.get("URIs"):
            stanzas.append({**stanza, "Types": "deb", "Suites": " ".join(kept)})
    if not stanzas:
        found = sorted(seen_suites)
        raise AptSourcesError(
            f"looked for apt sources for release {release!r} (or the host's {host or 'unknown'}) "
            f"in {sources_list} and {sources_dir}/*.sources|*.list and found suites: "
            f"{', '.join(found) or 'none'}; add a Debian source on the host or pick a --release",
            release=release,
            found_suites=found,
        )
    return _deb822_text(stanzas)


def backports_sources(
    release: str, sources_dir: Path = APT_SOURCES_DIR, sources_list: Path = APT_SOURCES_LIST
) -> str | None:
    """A deb822 entry for `release`-backports on the host's own mirror; None if apt has one.

    Made from the host's Debian stanzas that serve `release` itself (their URIs, components and
    key): packaging/qemu-from-backports adds it to install a QEMU newer than the release's own.
    A stanza signed by another key than Debian's archive keyring is another vendor's (Docker's
    and others use the suite `bookworm` too), whose repository has no backports.
    """
    backports = f"{release}-backports"
    stanzas = _active_binary_stanzas(sources_dir, sources_list)
    suites = sorted({s for stanza in stanzas for s in stanza.get("Suites", "").split()})
    if backports in suites:
        return None
    mains = [
        s
        for s in stanzas
        if release in s.get("Suites", "").split()
        and s.get("URIs")
        and DEBIAN_KEYRING in s.get("Signed-By", DEBIAN_KEYRING)
    ]
    if not mains:
        raise AptSourcesError(
            f"looked for a Debian apt source of the suite {release!r} to add {backports} beside "
            f"it, in {sources_list} and {sources_dir}/*.sources|*.list, and found suites: "
            f"{', '.join(suites) or 'none'}; add the host's Debian mirror to its apt sources",
            release=release,
            found_suites=suites,
        )
    return _deb822_text([{**stanza, "Types": "deb", "Suites": backports} for stanza in mains])


def source_package_sources(
    release: str, sources_dir: Path = APT_SOURCES_DIR, sources_list: Path = APT_SOURCES_LIST
) -> str:
    """`deb-src` entries for `release` (and its updates and security suites) on the host's own
    Debian mirrors: the host's Debian stanzas that serve it, as `deb-src`, for `apt-get source`
    and `apt-get build-dep` with a private apt configuration (host.lxd_rename)."""
    stanzas = _active_binary_stanzas(sources_dir, sources_list)
    found = []
    for stanza in stanzas:
        if not stanza.get("URIs") or DEBIAN_KEYRING not in stanza.get("Signed-By", DEBIAN_KEYRING):
            continue
        suites = [
            s
            for s in stanza.get("Suites", "").split()
            if _suite_belongs(s, release) and "-backports" not in s
        ]
        if suites:
            found.append({**stanza, "Types": "deb-src", "Suites": " ".join(suites)})
    if not found:
        suites = sorted({s for stanza in stanzas for s in stanza.get("Suites", "").split()})
        raise AptSourcesError(
            f"looked for a Debian apt source of the suite {release!r} to get source packages "
            f"from, in {sources_list} and {sources_dir}/*.sources|*.list, and found suites: "
            f"{', '.join(suites) or 'none'}; add the host's Debian mirror to its apt sources",
            release=release,
            found_suites=suites,
        )
    return _deb822_text(found)


def active_source_files(
    sources_dir: Path = APT_SOURCES_DIR, sources_list: Path = APT_SOURCES_LIST
) -> list[Path]:
    """The host's apt source files apt reads (for a private apt configuration to copy)."""
    return _active_source_files(sources_dir, sources_list)


def _active_binary_stanzas(sources_dir: Path, sources_list: Path) -> list[dict[str, str]]:
    """The `deb` stanzas apt would use: from its active files, not `Enabled: no`."""
    stanzas: list[dict[str, str]] = []
    for path in _active_source_files(sources_dir, sources_list):
        text = path.read_text(encoding="utf-8", errors="replace")
        parsed = _parse_deb822(text) if path.suffix == ".sources" else _one_line_to_deb822(text)
        stanzas += [
            stanza
            for stanza in parsed
            if stanza.get("Enabled", "yes").lower() != "no"
            and "deb" in stanza.get("Types", "").split()
        ]
    return stanzas


def _deb822_text(stanzas: list[dict[str, str]]) -> str:
    return "\n".join(
        "".join(f"{name}: {value}\n" for name, value in stanza.items()) for stanza in stanzas
    )


def source_suites(sources: str) -> list[str]:
    """Every suite named in deb822 `sources` text, in order."""
    return [s for stanza in _parse_deb822(sources) for s in stanza.get("Suites", "").split()]
