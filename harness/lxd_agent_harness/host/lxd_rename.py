"""Debian's LXD 5.0.2 with the status port's rename, built from its source package.

The specification's "Daemon Changes" on a real daemon: our patch (`patches/`, written from the
specification and LXD 5.20's layout) on the `lxd` source package the host's own apt sources
offer, built as Debian builds it, with a version of its own (`<Debian's>+rename1`). The steps:
  1. a private apt configuration (its sources: the host's, plus `deb-src` entries made from the
     host's own Debian stanzas; its lists in the build directory), so the host's apt is left
     as it was: `apt-get update`, `apt-get source lxd`;
  2. `apt-get build-dep lxd` into the system (Go 1.19 and about 50 Go libraries: what Debian
     builds it with), the only change to the host;
  3. the patch added to `debian/patches/series`, a changelog entry, `dpkg-buildpackage -b` with
     `nocheck`;
  4. the tests, in dh-golang's GOPATH: LXD's own of the two Go packages the patch changes
     (`lxd/instance/drivers`, `lxd-agent`), ours among them (`TestQemuSerialStatusPortRename`),
     and ours again on the unpatched template, where it must fail.
The `.deb`s and `build.json` (the version, each step's seconds, each test's outcome) go into
`~/.cache/lxd-agent/packages/lxd-rename-<version>-<patch hash>/`, reused by the next call.
Nothing is installed but the build dependencies. Host side only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxd_agent_harness.base.cache import cache_root
from lxd_agent_harness.base.errors import DaemonError, HarnessError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.host.packages import candidate_version, safe_name, unpacked
from lxd_agent_harness.image.aptsources import active_source_files, source_package_sources
from lxd_agent_harness.image.buildsteps import build_directory, run_build_step
from lxd_agent_harness.image.rootfs import reuse_or_build

SOURCE_PACKAGE = "lxd"
RELEASE = "bookworm"
PATCH = Path(__file__).parent / "patches" / "lxd-5.0.2-status-port-rename.patch"
PATCH_NAME = "200-status-port-rename.patch"
VERSION_SUFFIX = "+rename1"
OUR_TEST = "TestQemuSerialStatusPortRename"
TEMPLATES = "lxd/instance/drivers/driver_qemu_templates.go"
GO_PACKAGES = ("github.com/lxc/lxd/lxd/instance/drivers", "github.com/lxc/lxd/lxd-agent")
"""The Go packages the patch changes: LXD's own tests of both run after the build."""

GOPATH = "_build"
"""dh-golang's build directory in the source tree (`debian/rules`: `--builddirectory=_build`):
a GOPATH holding copies of the sources it built."""

BUILD_RECORD = "build.json"
DAEMON_PACKAGES = ("lxd", "lxd-client", "lxd-agent")
"""What a root needs to run the daemon and give its VMs their agent."""


class BuildTestsFailed(HarnessError):
    """The rename build's Go tests: `results` maps each run to "ok" or "FAIL"."""

    def __init__(self, message: str, *, results: dict[str, str]) -> None:
        super().__init__(message)
        self.results = dict(results)


ENTRY_FORMAT = 1


@dataclass(frozen=True)
class RenameBuild:
    """The rename build's cache entry: its `.deb`s and what its build recorded."""

    directory: Path
    record: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.record["version"])

    def root(self, packages: tuple[str, ...] = DAEMON_PACKAGES) -> Path:
        """`packages` of the build unpacked (`dpkg-deb -x`) into a root of their own, once;
        never installed. The daemon is its `usr/bin/lxd`, its agent `usr/bin/lxd-agent`."""
        root = self.directory / "root"
        if not root.is_dir():
            staged = Path(tempfile.mkdtemp(prefix=".root-", dir=self.directory))
            try:
                for package in packages:
                    subprocess.run(
                        ["dpkg-deb", "-x", str(self.deb(package)), str(staged)],
                        check=True,
                        capture_output=True,
                    )
                os.rename(staged, root)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
        return root

    def deb(self, package: str) -> Path:
        """The `.deb` of binary package `package` (`lxd`, `lxd-agent`, `lxd-client`)."""
        found = sorted(self.directory.glob(f"{package}_*.deb"))
        if not found:
            raise DaemonError(f"the rename build in {self.directory} has no {package} .deb")
        return found[-1]


def patch_hash() -> str:
    return hashlib.sha256(PATCH.read_bytes()).hexdigest()[:12]


class _PrivateApt:
    """apt with the host's sources plus `deb-src` ones, and lists of its own under `root`."""

    def __init__(self, root: Path) -> None:
        self.parts = root / "sources.list.d"
        self.lists = root / "lists"
        self.cache = root / "cache"
        for directory in (self.parts, self.lists / "partial", self.cache / "archives/partial"):
            directory.mkdir(parents=True, exist_ok=True)
        for n, path in enumerate(active_source_files()):
            shutil.copyfile(path, self.parts / f"{n:02d}-{path.name}")
        (self.parts / "zz-lxd-agent-deb-src.sources").write_text(source_package_sources(RELEASE))

    def command(self, *args: str) -> list[str]:
        return [
            "apt-get",
            "-q",
            "-o",
            "Dir::Etc::SourceList=/dev/null",
            "-o",
            f"Dir::Etc::SourceParts={self.parts}",
            "-o",
            f"Dir::State::Lists={self.lists}",
            "-o",
            f"Dir::Cache={self.cache}",
            "-o",
            "APT::Sandbox::User=root",
            *args,
        ]


def rename_build(
    progress: Progress, cache: Path | None = None, rebuild: bool = False
) -> RenameBuild:
    """The rename build from the cache, built first when it is not there (about 10 minutes
    here, plus the build dependencies' installation on a machine without them)."""
    # Debian's version is part of the key: a security update of its LXD is a new build.
    debian_version = candidate_version(SOURCE_PACKAGE, RELEASE)
    key = f"lxd-rename-{safe_name(debian_version)}-{patch_hash()}-{ENTRY_FORMAT}"
    entry = (cache or cache_root()) / "packages" / key
    record_path = entry / BUILD_RECORD

    def build() -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with build_directory(entry.parent, key, progress) as work:
            record = _build(work, progress)
            staged = work / "entry"
            staged.mkdir()
            for deb in (work / "out").glob("*.deb"):
                shutil.move(str(deb), staged / deb.name)
            (staged / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(staged, entry)

    reuse_or_build(
        "LXD with the rename", key, entry, record_path.is_file, build, progress, cache, rebuild
    )
    return RenameBuild(entry, json.loads(record_path.read_text()))


def _timed(seconds: dict[str, float], name: str, began: float) -> None:
    seconds[name] = round(time.monotonic() - began, 1)


def _build(work: Path, progress: Progress) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    apt = _PrivateApt(work / "apt")
    began = time.monotonic()
    run_build_step(apt.command("update"), progress, "apt-get update (private lists)")
    sources = work / "source"
    sources.mkdir()
    run_build_step(
        ["sh", "-c", 'cd "$1" && shift && exec "$@"', "-", str(sources),
         *apt.command("source", "--download-only", SOURCE_PACKAGE)],
        progress,
        f"apt-get source {SOURCE_PACKAGE}",
    )  # fmt: skip
    (dsc,) = sources.glob(f"{SOURCE_PACKAGE}_*.dsc")
    tree = work / "tree"
    run_build_step(["dpkg-source", "-x", str(dsc), str(tree)], progress, "dpkg-source -x")
    _timed(seconds, "source", began)

    began = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_build_step(
        apt.command("build-dep", "-y", "--no-install-recommends", SOURCE_PACKAGE),
        progress,
        f"apt-get build-dep {SOURCE_PACKAGE}",
        env=env,
    )
    _timed(seconds, "build_dependencies", began)

    began = time.monotonic()
    unpatched = work / "unpatched-templates.go"
    shutil.copyfile(tree / TEMPLATES, unpatched)
    debian_version = _changelog_version(tree)
    version = debian_version + VERSION_SUFFIX
    shutil.copyfile(PATCH, tree / "debian" / "patches" / PATCH_NAME)
    with (tree / "debian" / "patches" / "series").open("a") as series:
        series.write(PATCH_NAME + "\n")
    _add_changelog_entry(tree, version)
    build_env = {
        **env,
        "DEB_BUILD_OPTIONS": f"nocheck parallel={os.cpu_count() or 1}",
        "GOFLAGS": "-buildvcs=false",
    }
    run_build_step(
        ["sh", "-c", 'cd "$1" && exec dpkg-buildpackage -b -uc -us', "-", str(tree)],
        progress,
        f"dpkg-buildpackage of lxd {version}",
        env=build_env,
    )
    out = work / "out"
    out.mkdir()
    for deb in work.glob("*.deb"):
        shutil.move(str(deb), out / deb.name)
    _timed(seconds, "build", began)

    began = time.monotonic()
    tests = _go_tests(tree, unpatched, progress)
    _timed(seconds, "tests", began)
    if tests["patched"] != "ok" or tests["unpatched_ours"] != "FAIL":
        raise BuildTestsFailed(
            "the rename build's Go tests did not come out as they must (LXD's own and ours "
            f"pass on the patched source, ours fails on the unpatched template): {tests}",
            results=tests,
        )
    return {
        "version": version,
        "debian_version": debian_version,
        "patch": PATCH.name,
        "patch_sha256": hashlib.sha256(PATCH.read_bytes()).hexdigest(),
        "seconds": seconds,
        "go_tests": tests,
        "debs": sorted(deb.name for deb in out.glob("*.deb")),
    }


def _changelog_version(tree: Path) -> str:
    done = subprocess.run(
        ["dpkg-parsechangelog", "-S", "Version"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _add_changelog_entry(tree: Path, version: str) -> None:
    changelog = tree / "debian" / "changelog"
    date = subprocess.run(["date", "-R"], capture_output=True, text=True, check=True).stdout
    entry = (
        f"{SOURCE_PACKAGE} ({version}) {RELEASE}; urgency=medium\n\n"
        f"  * The status port's rename as LXD 5.20 made it ({PATCH_NAME}): the ring on\n"
        "    com.canonical.lxd, org.linuxcontainers.lxd with no chardev, the agent and\n"
        "    the config drive's unit and udev rule on the new name (lxd-agent harness).\n\n"
        f" -- lxd-agent harness <root@localhost>  {date.strip()}\n\n"
    )
    changelog.write_text(entry + changelog.read_text())


def _go(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`go` in the build's GOPATH (dh-golang's build directory), with a build cache there."""
    gopath = tree / GOPATH
    env = {
        **os.environ,
        "GOPATH": str(gopath),
        "GO111MODULE": "off",
        "GOCACHE": str(gopath / "go-build"),
        "GOFLAGS": "-buildvcs=false",
        "CGO_LDFLAGS_ALLOW": "-Wl,-z,now",
    }
    return subprocess.run(
        ["go", *args], cwd=gopath, env=env, capture_output=True, text=True, check=False
    )


def _go_tests(tree: Path, unpatched: Path, progress: Progress) -> dict[str, str]:
    """LXD's own tests of the changed packages (ours among them), then ours on the unpatched
    template: "ok" or "FAIL" each."""
    results: dict[str, str] = {}
    done = _go(tree, "test", "-count=1", *GO_PACKAGES)
    for line in done.stdout.splitlines():
        progress(f"go test: {line}")
    results["patched"] = "ok" if done.returncode == 0 else "FAIL"
    ours = _go(tree, "test", "-count=1", "-v", "-run", OUR_TEST, GO_PACKAGES[0])
    results["patched_ours"] = "ok" if f"--- PASS: {OUR_TEST}" in ours.stdout else "FAIL"
    built = tree / GOPATH / "src" / GO_PACKAGES[0].rsplit("/lxd/instance/drivers", 1)[0] / TEMPLATES
    patched = built.read_bytes()
    try:
        built.unlink()  # it may be a link into the source tree: never write through it
        shutil.copyfile(unpatched, built)
        before = _go(tree, "test", "-count=1", "-v", "-run", OUR_TEST, GO_PACKAGES[0])
    finally:
        built.unlink()
        built.write_bytes(patched)
    for line in before.stdout.splitlines():
        if OUR_TEST in line or "rename_test.go" in line:
            progress(f"go test (unpatched template): {line.strip()}")
    results["unpatched_ours"] = "FAIL" if f"--- FAIL: {OUR_TEST}" in before.stdout else "ok"
    return results


def debian_lxd_root(progress: Progress, cache: Path | None = None) -> Path:
    """Debian's own LXD (the version the host's `bookworm` offers: the rename build's base),
    its daemon, client and agent unpacked into a root of their own, never installed."""
    return unpacked("lxd-debian", DAEMON_PACKAGES, RELEASE, progress, cache)
