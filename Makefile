# One entry point for people and CI. `make demo` is the main job, `make test` runs every test.
# Both install what they need (apt-get, pip) on a fresh Debian 12 machine, as root.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV := .venv
PY := $(VENV)/bin/python
# Debian packages: build tools for the .deb, QEMU and mmdebstrap for the harness,
# python3-systemd so the venv (made with --system-site-packages) sees systemd-python.
# The cloud image (image --cloud) needs fdisk, dosfstools, mtools and GRUB for BIOS and UEFI,
# Debian's signed shim and GRUB for secure boot; its UEFI boots need OVMF.
# arm64 guests: QEMU's aarch64 system emulator and its UEFI (AAVMF), and qemu-user-static with
# arch-test to build their trees (image/foreign.py: nothing is registered on the host).
# On Debian 12, QEMU's system emulators then come from bookworm-backports, through the host's own
# mirror (packaging/qemu-from-backports says why: 7.2's multi-threaded TCG crashes guests).
# `check --host lxd` and its tests run Debian's own LXD daemon (started by the harness in a state
# directory of its own, never the system's); python3-seccomp for its memlock filter.
APT_PACKAGES := \
	python3 python3-venv python3-pip python3-systemd \
	debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	dpkg-dev fakeroot lintian \
	qemu-system-x86 qemu-utils mmdebstrap e2fsprogs \
	fdisk dosfstools mtools grub-common grub-pc-bin grub-efi-amd64-bin \
	grub-efi-amd64-signed shim-signed ovmf \
	qemu-system-arm qemu-efi-aarch64 qemu-user-static arch-test \
	lxd python3-seccomp \
	systemd

.PHONY: all setup apt venv lint test unit vm deb wheels demo soak matrix bench clean

all: test

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi
	packaging/qemu-from-backports

# Debian's own python3 (not a pyenv one) so that python3-systemd is importable in the venv.
$(VENV)/.installed: pyproject.toml harness/pyproject.toml | apt
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e ./harness
	touch $@

venv: $(VENV)/.installed

setup: apt venv

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

deb: setup
	packaging/build-deb

# The two Python distributions as wheels, for installing the harness without this clone:
# out/wheels/lxd_agent-*.whl (the agent, whose protocol names the harness imports) and
# out/wheels/lxd_agent_harness-*.whl.
wheels: setup
	rm -rf out/wheels
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w out/wheels . ./harness
	@ls out/wheels/*.whl

# Everything: lint, the package, unit tests, then the VM tests under QEMU, on three pytest-xdist
# workers whose guests have one vCPU each and share the machine's two cores (vm/lock.py: a guest
# gives its core up once its boot is done; tests/conftest.py; README "Where make test spends its
# time" has the figures).
TEST_WORKERS ?= 3
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadscope

test: setup
	$(MAKE) lint
	$(MAKE) deb
	$(VENV)/bin/pytest -ra --durations=25 $(PYTEST_PARALLEL)

unit: setup
	$(VENV)/bin/pytest -ra -m 'not vm'

vm: setup deb
	$(VENV)/bin/pytest -ra --durations=25 $(PYTEST_PARALLEL) -m vm

demo: setup deb
	$(VENV)/bin/lxd-agent-harness boot --layout lxd-5.20

# The long soak: 50 boots, each with a reboot, a port replug, a host reader restart, an agent
# SIGKILL and a power-off (make test runs 2 of them). About a minute a cycle under TCG here.
SOAK_CYCLES ?= 50
soak: setup deb
	$(VENV)/bin/lxd-agent-harness soak --cycles $(SOAK_CYCLES) --layout lxd-5.20

# Every agent (ours, emulations of LXD 5.0's and 5.21's) in every layout, one boot each, and the
# table put into README.md. About 6 minutes under TCG here; `make test` runs it too (out/matrix.md).
matrix: setup deb
	$(VENV)/bin/lxd-agent-harness matrix --readme README.md --markdown out/matrix.md

# The agent's costs next to their floors, in one table: natively, then in one guest (TCG).
# Figures only, never pass/fail. About 4 minutes; root (a private /dev for the agent's port).
bench: setup deb
	PYTHONPATH=. $(PY) benchmarks/bench.py

clean:
	rm -rf out build dist harness/build *.egg-info harness/*.egg-info *.egg-info .pytest_cache .mypy_cache .ruff_cache .pybuild
