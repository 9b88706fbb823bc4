"""The harness as a user gets it: its wheel (and the agent's, for the shared protocol names)
installed into a fresh venv in a directory that holds nothing of this repository, run from there.

One venv for the module: `--help`, a missing package, `image`, `boot`, a `matrix` cell of an
emulated LXD agent (its program, unit and rule come from the wheel's package data), and
examples/image-tests run by that venv's pytest with the wheel's plugin. The image cache is the
user's, shared with the other tests, so the guests are built once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.repo import REPO

pytestmark = pytest.mark.vm

# pip resolves qemu.qmp, pyserial, pycdlib and PyYAML from the package index (seconds with
# its cache).
INSTALL_TIMEOUT = 600
COMMAND_TIMEOUT = 900


class Installed:
    """A venv with both wheels installed, and an empty working directory outside the clone."""

    def __init__(self, root: Path) -> None:
        self.venv = root / "venv"
        self.cwd = root / "elsewhere"
        self.cwd.mkdir()

    @property
    def command(self) -> Path:
        return self.venv / "bin" / "lxd-agent-harness"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a user's shell gives: nothing of this venv or of the clone."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.pop("LXD_AGENT_DEB", None)
        env["PATH"] = (
            f"{self.venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        )
        env.update(extra)
        return env

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.command), *args],
            cwd=self.cwd,
            env=self.env(**extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        print(f"$ lxd-agent-harness {' '.join(args)}  (exit {done.returncode})\n{done.stdout}")
        return done


def _checked(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    # Built from a copy of the clone's files (those git tracks or would track): a build in the
    # clone itself leaves build/ and *.egg-info there, and a stale build/ goes into later wheels.
    source = root / "source"
    listed = _checked(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO)
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels = root / "wheels"
    # With the build tools already here (Debian's setuptools), no index.
    _checked(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(source), str(source / "harness")],
        cwd=root,
    )  # fmt: skip
    built = sorted(p.name for p in wheels.glob("*.whl"))
    assert [name.split("-")[0] for name in built] == ["lxd_agent", "lxd_agent_harness"], built
    site = Installed(root)
    _checked(["/usr/bin/python3", "-m", "venv", str(site.venv)], cwd=root)
    agent_wheel, harness_wheel = sorted(wheels.glob("*.whl"))
    # The harness with its `pytest` extra: the plugin, as an image builder's CI installs it.
    _checked(
        [
            str(site.venv / "bin" / "pip"),
            "install",
            "-q",
            str(agent_wheel),
            f"{harness_wheel}[pytest]",
        ],
        cwd=site.cwd,
    )
    return site


def test_the_installed_harness_imports_from_its_venv_not_from_the_clone(
    installed: Installed,
) -> None:
    where = subprocess.run(
        [
            str(installed.venv / "bin" / "python"),
            "-c",
            "import lxd_agent_harness, lxd_agent.protocol as p; print(lxd_agent_harness.__file__);"
            " print(p.__file__)",
        ],
        cwd=installed.cwd,
        env=installed.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert Path(path).is_relative_to(installed.venv), where.stdout
        assert not Path(path).is_relative_to(REPO), where.stdout
    # The emulations' program, units and rules are package data in the wheel.
    data = installed.venv.glob("lib/python3*/site-packages/lxd_agent_harness/image/emulated/*")
    assert {p.name for p in data} >= {"emulated_lxd_agent.py", "lxd-5.0", "lxd-5.21"}


def test_help_lists_every_command(installed: Installed) -> None:
    done = installed.run("--help")
    assert done.returncode == 0
    for command in ("boot", "image", "soak", "snapshot", "matrix"):
        assert command in done.stdout


def test_without_a_package_it_says_how_to_give_one_in_one_line(installed: Installed) -> None:
    done = installed.run("boot", "--layout", "lxd-5.20")
    assert done.returncode == 2
    said = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(said) == 1, done.stdout
    assert "--deb PATH" in said[0] and "LXD_AGENT_DEB" in said[0]


def test_image_and_boot_from_the_installed_wheel(installed: Installed, deb: Path) -> None:
    image = installed.run("image", "--deb", str(deb))
    assert image.returncode == 0
    built = Path(image.stdout.strip().splitlines()[-1])
    assert (built / "disk.raw").is_file(), image.stdout
    # The package from the environment this time: the other way a CI job gives it.
    boot = installed.run("boot", "--layout", "lxd-5.20", LXD_AGENT_DEB=str(deb))
    assert boot.returncode == 0
    assert "OK: STARTED then STOPPED on com.canonical.lxd" in boot.stdout


def test_a_matrix_cell_of_an_emulation_from_the_installed_wheel(
    installed: Installed, deb: Path
) -> None:
    table = installed.cwd / "matrix.md"
    done = installed.run(
        "matrix",
        "--deb",
        str(deb),
        "--agents",
        "lxd-5.21",
        "--layouts",
        "lxd-5.20",
        "--markdown",
        str(table),
    )
    assert done.returncode == 0
    rows = [line for line in table.read_text().splitlines() if line.startswith("| LXD 5.21")]
    assert len(rows) == 1 and "`com.canonical.lxd`" in rows[0], table.read_text()


def test_the_example_tests_run_on_the_plugin_of_the_installed_wheel(
    installed: Installed, deb: Path
) -> None:
    tests = installed.cwd / "image-tests"
    shutil.copytree(REPO / "examples" / "image-tests", tests)
    pytest_command = installed.venv / "bin" / "pytest"
    plugin = subprocess.run(
        [str(pytest_command), "--version", "--version"],
        cwd=installed.cwd,
        env=installed.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "lxd-agent-harness-0.2.0" in plugin.stdout + plugin.stderr, plugin.stdout
    done = subprocess.run(
        [str(pytest_command), "-p", "no:cacheprovider", "image-tests", "--lxd-warm"],
        cwd=installed.cwd,
        env=installed.env(LXD_AGENT_DEB=str(deb)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    print(done.stdout)
    assert done.returncode == 0
    assert "2 passed" in done.stdout
