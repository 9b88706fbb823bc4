"""Fixtures every VM test shares (tests/in_vm and the harness's VM tests in tests/harness): the
package under test, its image, the measured figures.

`make test` runs the suite on three pytest-xdist workers (`-n 3 --dist loadscope`: a module's
tests stay on one worker, with its module fixtures). Its guests have one vCPU each, so two boot
side by side on this machine's two cores (vm.lock gives each booting VM a core, which a guest
gives up once its boot is done and it only waits out its bounds): the third worker's guest takes
a core a waiting guest gave up. Images are built once whichever worker asks first (the cache's
build locks). Each worker writes its figures to a file; the controller prints them all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from lxd_agent_harness.image.deb import PackageNotFound
from lxd_agent_harness.image.rootfs import ImageSpec, build_image
from lxd_agent_harness.vm.config import VCPUS_ENV, GuestImage
from tests.helpers import harness_command
from tests.repo import REPO, built_deb
from tests.vms import TOOLS, Figures

# The longest modules, in seconds, as a warm `make test` measured them (`0dae9b5`, its time per
# module): the workers take them first, longest first, so that no long one is left for the end
# while the other worker idles (README "Where make test spends its time"). Only their order
# matters; a module not named here comes after them.
LONGEST_MODULES = {
    "tests/harness/scenarios/test_host_check.py": 550,
    "tests/harness/scenarios/test_matrix.py": 262,
    "tests/harness/scenarios/test_check.py": 232,
    "tests/in_vm/test_releases.py": 214,
    "tests/in_vm/test_arm64.py": 135,
    "tests/in_vm/test_cloud_vm.py": 106,
    "tests/harness/cli/test_interrupt.py": 97,
    "tests/in_vm/test_vm.py": 94,
    "tests/harness/scenarios/test_snapshot.py": 88,
    "tests/harness/scenarios/test_soak.py": 81,
    "tests/packaging/test_apt.py": 78,
    "tests/harness/vm/test_warm.py": 68,
    "tests/in_vm/test_incus.py": 61,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with VM tests first, the longest of them first (`LONGEST_MODULES`), so that the
    workers start on the long ones and the many short unit tests fill the end; tests marked
    `last` after all others: they check what the others left behind. Otherwise in the order
    collected."""
    with_vms = {item.path for item in items if item.get_closest_marker("vm") is not None}

    def seconds(item: pytest.Item) -> int:
        return LONGEST_MODULES.get(item.nodeid.split("::")[0], 0)

    items.sort(
        key=lambda item: (
            item.get_closest_marker("last") is not None,
            item.path not in with_vms,
            -seconds(item),
        )
    )


# The arm64 tree is the one slow build (about ten minutes of qemu-user on one core, README
# "Where make test spends its time"); the tests that need it come late. It is built from the
# start of the session in a process of its own at a low priority, so it takes the cores the
# guests leave idle and the amd64 boots keep theirs; test_arm64's fixtures then wait for it on
# the cache's build lock, or find it done.
ARM64_PREBUILD = ("image", "--cloud", "--agent", "ours", "--arch", "arm64")
PREBUILD_NICE = 10
PREBUILD_STOP_TIMEOUT = 120.0
_prebuild: subprocess.Popen[bytes] | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _prebuild
    wanted = any(item.nodeid.startswith("tests/in_vm/test_arm64.py") for item in session.items)
    # Every worker collects every test: the first one alone starts the build.
    worker = getattr(session.config, "workerinput", {}).get("workerid", "gw0")
    if not wanted or session.config.option.collectonly or worker != "gw0":
        return
    try:
        deb = built_deb()
    except PackageNotFound:
        return  # the `deb` fixture fails the VM tests with the reason
    log = REPO / "out" / "arm64-prebuild.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("wb") as output:
        _prebuild = subprocess.Popen(
            [
                "nice",
                "-n",
                str(PREBUILD_NICE),
                *harness_command(*ARM64_PREBUILD, "--deb", str(deb)),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The background build ends with the session: asked to stop (it cleans up its build
    directory) if the tests that needed it did not wait for it, killed if it does not."""
    if _prebuild is None or _prebuild.poll() is not None:
        return
    _prebuild.send_signal(signal.SIGTERM)
    try:
        _prebuild.wait(timeout=PREBUILD_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(_prebuild.pid, signal.SIGKILL)
        _prebuild.wait()


FIGURES_ENV = "LXD_AGENT_TEST_FIGURES"
"""The directory where each test process (each xdist worker) leaves its figures for the run."""


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    # One vCPU per guest, so that the two workers' guests run side by side; a person's own
    # setting wins. Set here, before the workers start, so they and every harness they run see it.
    os.environ.setdefault(VCPUS_ENV, "1")
    if not _is_worker(config) and FIGURES_ENV not in os.environ:
        folder = REPO / "out" / "figures" / str(os.getpid())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.environ[FIGURES_ENV] = str(folder)


_module_time: dict[str, float] = {}
_module_tests: dict[str, set[str]] = {}
_module_worker: dict[str, str] = {}
_worker_time: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Where the run's time goes, per module and per worker (setup, call and teardown)."""
    module = report.nodeid.split("::")[0]
    worker = getattr(getattr(report, "node", None), "gateway", None)
    worker_id = getattr(worker, "id", "main")
    _module_time[module] = _module_time.get(module, 0.0) + report.duration
    _module_tests.setdefault(module, set()).add(report.nodeid)
    _module_worker[module] = worker_id
    _worker_time[worker_id] = _worker_time.get(worker_id, 0.0) + report.duration


MODULES_SHOWN = 20


def _time_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _module_time:
        return
    terminalreporter.section("Time per module (setup, call and teardown; the budget: README)")
    ranked = sorted(_module_time.items(), key=lambda item: item[1], reverse=True)
    for module, seconds in ranked[:MODULES_SHOWN]:
        tests = len(_module_tests[module])
        terminalreporter.write_line(
            f"{seconds:8.1f} s  {_module_worker[module]:<5} {tests:4d} tests  {module}"
        )
    rest = ranked[MODULES_SHOWN:]
    if rest:
        terminalreporter.write_line(
            f"{sum(s for _, s in rest):8.1f} s  in the other {len(rest)} modules"
        )
    for worker, seconds in sorted(_worker_time.items()):
        terminalreporter.write_line(f"worker {worker}: {seconds:.1f} s in tests")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Where the time went, and the figures every test process measured, printed by the one
    that reports the run."""
    if _is_worker(terminalreporter.config):
        return
    _time_summary(terminalreporter)
    if FIGURES_ENV not in os.environ:
        return
    folder = Path(os.environ[FIGURES_ENV])
    measured: Figures = {}
    for part in sorted(folder.glob("*.json")):
        measured.update(json.loads(part.read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    if measured:
        terminalreporter.section("Measured figures (guests under TCG; the agent's start storm)")
        for name, value in measured.items():
            terminalreporter.write_line(f"{name:<48} {value}")


@pytest.fixture
def short_tmp_path() -> Iterator[Path]:
    """A temporary directory with a short path: a VM's QMP socket or a daemon's goes in it, and
    a socket's path has at most 107 bytes (pytest-xdist's tmp_path,
    /tmp/pytest-of-root/pytest-N/popen-gwN/test_an_interrupted_boot_leave1/tmp/..., has more)."""
    path = Path(tempfile.mkdtemp(prefix="it-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    """Measured figures, printed after the run whether the tests passed or not."""
    measured: Figures = {}
    yield measured
    if measured and FIGURES_ENV in os.environ:
        part = Path(os.environ[FIGURES_ENV]) / f"{os.getpid()}.json"
        part.write_text(json.dumps(measured))


@pytest.fixture(scope="session")
def deb() -> Path:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH: the VM tests need it; run `make setup`")
    try:
        return built_deb()
    except PackageNotFound as e:
        pytest.fail(f"the VM tests need the package: {e}")


@pytest.fixture(scope="session")
def guest_image(deb: Path, figures: Figures) -> GuestImage:
    """The image with the package installed (bookworm), built once per session (or reused)."""
    started = time.monotonic()
    image = build_image(ImageSpec(debs=(deb,)), progress=print)
    figures["image with the .deb: build or reuse"] = f"{time.monotonic() - started:.1f} s"
    return image
