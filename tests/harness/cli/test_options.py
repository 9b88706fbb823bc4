"""Tests for lxd_agent_harness.cli.options: the commands and options the parser takes, their
defaults, and the choices it refuses itself (with argparse's exit status 2); the values it takes
as text are checked by `cli.main` (tests/harness/cli/test_main.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_agent_harness.base.arch import host_arch
from lxd_agent_harness.cli.main import DEFAULT_BOOT_LAYOUT
from lxd_agent_harness.cli.options import build_parser
from lxd_agent_harness.image.agents import AGENTS
from lxd_agent_harness.image.aptsources import DEFAULT_RELEASE
from lxd_agent_harness.scenarios.matrix import MATRIX_LAYOUTS

COMMANDS = ("boot", "soak", "snapshot", "matrix", "image")
# Commands with a required argument of their own, and that argument.
COMMANDS_WITH_INPUT = {"check": ["--image", "x.qcow2"], "matrix-merge": ["a.json"]}


def test_a_command_is_required_and_each_is_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as exited:
        parser.parse_args([])
    assert exited.value.code == 2
    assert "required: command" in capsys.readouterr().err
    assert [parser.parse_args([name]).command for name in COMMANDS] == list(COMMANDS)
    for name, needed in COMMANDS_WITH_INPUT.items():
        assert parser.parse_args([name, *needed]).command == name
        with pytest.raises(SystemExit):
            parser.parse_args([name])  # without its input


def test_boot_defaults_to_lxd_5_20_the_automatic_accelerator_and_the_default_release() -> None:
    args = build_parser().parse_args(["boot"])
    # No --layout is lxd-5.20 (`cli.main`), and a --layout given is refused with --host.
    assert (args.layout, args.accel, args.release) == (None, "auto", DEFAULT_RELEASE)
    assert DEFAULT_BOOT_LAYOUT == "lxd-5.20"
    assert (args.deb, args.image, args.firmware, args.ring_size, args.timeout) == (None,) * 5
    assert (args.host, args.host_socket) == (None, None)
    assert not any((args.seed, args.rebuild, args.secure_boot, args.keep, args.verbose))


def test_numbers_and_names_stay_text_for_main_to_check() -> None:
    """A bad number is `cli.main`'s one-line error, not an argparse usage dump."""
    args = build_parser().parse_args(
        ["boot", "--timeout", "soon", "--ring-size", "big", "--layout", "lxd-6", "--deb", "x.deb"]
    )
    assert (args.timeout, args.ring_size, args.layout) == ("soon", "big", "lxd-6")
    assert args.deb == Path("x.deb")
    soak = build_parser().parse_args(["soak", "--cycles", "many"])
    assert soak.cycles == "many"
    assert build_parser().parse_args(["soak"]).cycles == "3"


@pytest.mark.parametrize(
    "argv",
    [
        ["boot", "--accel", "hvf"],
        ["boot", "--release", "sid"],
        ["boot", "--firmware", "coreboot"],
        ["image", "--release", "buster"],
        ["matrix", "--accel", "xen"],
        # The scenarios on the project's own image need the package in it: no seed.
        ["snapshot", "--seed"],
        ["matrix", "--seed"],
    ],
)
def test_the_parser_refuses_what_is_no_choice_with_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err or "unrecognized arguments: --seed" in err, err


def test_boot_soak_and_image_may_install_the_package_through_a_seed() -> None:
    for command in ("boot", "soak", "image"):
        assert build_parser().parse_args([command, "--seed"]).seed is True


def test_the_matrix_takes_every_agent_and_layout_unless_told_otherwise() -> None:
    args = build_parser().parse_args(["matrix"])
    assert args.agents.split(",") == list(AGENTS)
    assert args.layouts.split(",") == list(MATRIX_LAYOUTS)
    assert (args.bound, args.markdown, args.readme) == (None, None, None)
    chosen = build_parser().parse_args(["matrix", "--agents", "ours", "--readme", "README.md"])
    assert chosen.agents == "ours" and chosen.readme == Path("README.md")


def test_check_boots_lxd_5_19_5_20_and_incus_through_uefi_unless_told_otherwise() -> None:
    args = build_parser().parse_args(["check", "--image", "disk.qcow2"])
    assert (args.image, args.layout, args.firmware, args.accel) == (
        [Path("disk.qcow2")],
        None,  # cli.main takes CHECK_LAYOUTS
        None,  # cli.main takes UEFI (None: --host can tell that none was given)
        "auto",
    )
    assert (args.host, args.host_socket, args.jobs) == (None, None, "1")
    on_hosts = build_parser().parse_args(
        ["check", "--image", "d", "--host", "lxd", "--host", "incus"]
    )
    assert on_hosts.host == ["lxd", "incus"]
    assert (args.json, args.junit, args.timeout, args.bound, args.secure_boot) == (
        None,
        None,
        None,
        None,
        False,
    )
    many = build_parser().parse_args(
        ["check", "--image", "d", "--layout", "lxd-5.20", "--layout", "incus", "--json", "r.json"]
    )
    assert (many.layout, many.json) == (["lxd-5.20", "incus"], Path("r.json"))


def test_the_matrix_runs_whole_unless_sharded_and_merges_shards_into_the_same_outputs() -> None:
    assert build_parser().parse_args(["matrix"]).shard == "1/1"
    sharded = build_parser().parse_args(["matrix", "--shard", "2/3", "--junit", "s.xml"])
    assert (sharded.shard, sharded.junit) == ("2/3", Path("s.xml"))
    merge = build_parser().parse_args(
        ["matrix-merge", "1.json", "2.json", "--markdown", "m.md", "--readme", "README.md"]
    )
    assert merge.shards == [Path("1.json"), Path("2.json")]
    assert (merge.markdown, merge.readme, merge.json) == (Path("m.md"), Path("README.md"), None)


def test_soak_boots_each_cycle_unless_asked_for_warm_starts() -> None:
    assert build_parser().parse_args(["soak"]).warm is False
    assert build_parser().parse_args(["soak", "--warm"]).warm is True


def test_image_builds_a_cloud_disk_without_an_agent_unless_told_which() -> None:
    assert build_parser().parse_args(["image", "--cloud"]).agent == "none"
    for agent in ("ours", *AGENTS):
        assert build_parser().parse_args(["image", "--cloud", "--agent", agent]).agent == agent


def test_every_command_that_builds_or_boots_takes_the_guests_architecture() -> None:
    for argv in (
        ["boot"],
        ["image"],
        ["soak"],
        ["snapshot"],
        ["matrix"],
    ):
        assert build_parser().parse_args(argv).arch == host_arch().value
        assert build_parser().parse_args([*argv, "--arch", "arm64"]).arch == "arm64"
    # check's comes from the image's metadata.yaml when it has one: None until it is read.
    assert build_parser().parse_args(["check", "--image", "d"]).arch is None
    assert build_parser().parse_args(["check", "--image", "d", "--arch", "arm64"]).arch == "arm64"


def test_check_takes_a_split_image_as_two_paths() -> None:
    args = build_parser().parse_args(["check", "--image", "lxd.tar.xz", "disk.qcow2"])
    assert args.image == [Path("lxd.tar.xz"), Path("disk.qcow2")]
    # Given twice, both count (a second --image does not drop the first).
    twice = build_parser().parse_args(["check", "--image", "lxd.tar.xz", "--image", "d.qcow2"])
    assert twice.image == [Path("lxd.tar.xz"), Path("d.qcow2")]
