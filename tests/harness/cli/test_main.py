"""Tests for lxd_agent_harness.cli.main: the command's input checks (one line, exit 2, before
anything is built or booted), what `matrix` writes into a README, and one real `boot` (marked
vm)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from lxd_agent.protocol import PORT_NAME
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.cli import main as cli
from lxd_agent_harness.cli import records, report
from lxd_agent_harness.image.agents import AGENTS, OURS
from lxd_agent_harness.scenarios.matrix import MatrixVerdict, Shard, merge_shards
from lxd_agent_harness.vm.accel import Accel, AccelChoice
from lxd_agent_harness.vm.config import GuestImage
from tests.harness.image.test_lxd_image import X86_METADATA, _qcow2, _tarball
from tests.harness.scenarios.test_matrix import good_cell, sharded
from tests.helpers import harness_command, minimal_deb
from tests.repo import REPO
from tests.vms import TEST_DEADLINE


@pytest.fixture
def fake_deb(tmp_path: Path) -> Path:
    return minimal_deb(tmp_path)


@pytest.fixture
def random_image(tmp_path: Path) -> Path:
    """What qemu-img takes for a raw disk, with no partition table: nothing could boot it."""
    path = tmp_path / "random.img"
    data = bytearray(os.urandom(1 << 20))
    data[510:512] = b"\x00\x00"  # never the boot signature by chance
    path.write_bytes(bytes(data))
    return path


# -- boot -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "lxd-6"], "unknown layout 'lxd-6'; choose one of: lxd-5.19"),
        (["--ring-size", "24"], "not a positive power of two"),
        (["--ring-size", "big"], "is not an integer"),
        # 4 B can never hold STARTED\n; QEMU silently shrinks 2^40 B.
        (["--ring-size", "4"], "outside 16..1048576 bytes"),
        (["--ring-size", str(1 << 40)], "outside 16..1048576 bytes"),
        (["--image", "{random}"], "has no partition table (no boot signature 55aa"),
        (["--deb", "{corrupt}"], "is not a Debian format archive"),
        (["--timeout", "0"], "must be more than 0 seconds"),
        (["--timeout", "soon"], "is not a number of seconds"),
        (["--image", "/nonexistent/cloud.qcow2"], "looked for --image"),
        (["--firmware", "bios"], "add --image FILE"),
        (["--secure-boot"], "add --image FILE"),
        (["--image", "{deb}", "--firmware", "bios", "--secure-boot"], "needs UEFI firmware"),
        (["--credential", "lxd-agent.state"], "give NAME=VALUE"),
        (["--credential", "a/b=on"], "use letters, digits"),
        (["--raw-qemu-conf", "/nonexistent/raw.conf"], "/nonexistent/raw.conf: cannot read it"),
        (["--raw-qemu-conf", "{conf}"], ':2: neither a [section] nor key = "value"'),
        (["--raw-qemu-conf", "{past}"], "there are only 1 [device"),
        (["--host-socket", "/x.sock"], "--host-socket needs --host"),
        (
            ["--host", "lxd", "--layout", "lxd-5.19", "--seed", "--keep"],
            "--host cannot be given with --seed (the image is booted as it is), --keep (use the "
            "daemon's own console), --layout (a daemon's layout follows its version); drop it",
        ),
        (["--host", "incus", "--ring-size", "16"], "--ring-size (the daemon's own)"),
        (["--host", "lxd", "--credential", "a=b"], "--credential on --host lxd"),
        (["--host", "incus", "--image", "{random}"], "has no partition table"),
        (["--host", "incus", "--raw-qemu-conf", "{conf}"], ":2: neither a [section] nor key"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str],
    message: str,
    fake_deb: Path,
    random_image: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    corrupt = tmp_path / "corrupt_all.deb"
    corrupt.write_bytes(os.urandom(4096))
    conf, past = tmp_path / "raw.conf", tmp_path / "past.conf"
    conf.write_text('[device "qemu_serial_legacy"]\nremove it\n')
    past.write_text('[device "qemu_serial"][2]\ndriver = "virtconsole"\n')
    args = [
        arg.format(deb=fake_deb, random=random_image, corrupt=corrupt, conf=conf, past=past)
        for arg in args
    ]
    assert cli.main(["boot", "--deb", str(fake_deb), *args]) == cli.EXIT_USAGE
    out = capsys.readouterr().out
    assert message in out
    assert len(out.strip().splitlines()) == 1


def test_a_missing_deb_says_to_run_make_deb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["boot", "--deb", str(tmp_path / "none.deb")]) == cli.EXIT_USAGE
    assert "make deb" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cycles", "0"], "--cycles must be 1..1000"),
        (["--cycles", "many"], "is not a whole number"),
        (["--layout", "lxd-6"], "unknown layout 'lxd-6'"),
    ],
)
def test_bad_soak_input_is_one_line_and_exit_2(
    args: list[str], message: str, fake_deb: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["soak", "--deb", str(fake_deb), *args]) == cli.EXIT_USAGE
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and message in out[0], out


# -- matrix -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--agents", "ours,lxd-6"], "--agents 'ours,lxd-6': choose from ours, lxd-5.0, lxd-5.21"),
        (["--layouts", ","], "--layouts ',': choose from lxd-5.19"),
        (["--bound", "0"], "--bound must be more than 0 seconds"),
        (["--bound", "601"], "--bound must be at most 600 s"),
        (["--timeout", "soon"], "--timeout 'soon' is not a number"),
        (["--jobs", "two"], "--jobs 'two' is not a whole number"),
        (["--readme", "/nonexistent/README.md"], "cannot write into /nonexistent"),
        (["--markdown", "/nonexistent/dir/m.md"], "cannot write into /nonexistent/dir"),
        (["--markdown", "/tmp"], "--markdown /tmp is a directory"),
    ],
)
def test_bad_matrix_input_is_one_line_and_exit_2_before_anything_is_built(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deb = minimal_deb(tmp_path)
    assert cli.main(["matrix", "--deb", str(deb), *argv]) == cli.EXIT_USAGE
    out = capsys.readouterr().out
    assert says in out and len(out.splitlines()) == 1


def test_a_readme_without_markers_is_refused_and_left_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "docs").mkdir()
    readme = tmp_path / "docs" / "README.md"
    readme.write_text("# no table here\n")
    deb = minimal_deb(tmp_path)
    assert cli.main(["matrix", "--deb", str(deb), "--readme", str(readme)]) == cli.EXIT_USAGE
    assert "has no line" in capsys.readouterr().out
    assert readme.read_text() == "# no table here\n"
    assert [p.name for p in readme.parent.iterdir()] == ["README.md"]  # no temporary file left


def test_matrix_writes_the_table_into_the_readme_keeping_its_mode_and_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command's write path, with the boots faked (the real ones are the VM tests below)."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{report.MATRIX_BEGIN}\nold\n{report.MATRIX_END}\nend\n")
    readme.chmod(0o644)
    verdict = MatrixVerdict(agents=[AGENTS[OURS]], layouts=["lxd-5.20"], cells=[good_cell()])

    async def fake_accel(*args: object) -> AccelChoice:
        return AccelChoice(Accel.TCG, "faked")

    async def fake_matrix(*args: object, **kwargs: object) -> MatrixVerdict:
        return verdict

    monkeypatch.setattr(cli, "agent_images", lambda *args, **kwargs: {OURS: None})
    monkeypatch.setattr(cli, "choose_accel", fake_accel)
    monkeypatch.setattr(cli, "run_matrix", fake_matrix)
    argv = ["matrix", "--deb", str(minimal_deb(tmp_path)), "--readme", str(readme)]
    assert cli.main([*argv, "--agents", OURS, "--layouts", "lxd-5.20"]) == cli.EXIT_OK
    text = readme.read_text()
    assert text.startswith(f"# title\n{report.MATRIX_BEGIN}\n\n") and text.endswith("end\n")
    assert "\n".join(report.matrix_markdown(verdict)) in text and "old" not in text
    assert readme.stat().st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".README")]
    # A cell without a result leaves the README as it was.
    verdict.cells[0] = replace(good_cell(), error=VmError("no login prompt"))
    assert cli.main([*argv, "--agents", OURS, "--layouts", "lxd-5.20"]) == cli.EXIT_FAILED
    assert readme.read_text() == text
    assert "left as it was" in capsys.readouterr().out


def test_a_sharded_matrix_leaves_the_readme_for_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.MATRIX_BEGIN}\nold\n{report.MATRIX_END}\n")
    shard = sharded(2)[0]

    async def fake_accel(*args: object) -> AccelChoice:
        return AccelChoice(Accel.TCG, "faked")

    async def fake_matrix(*args: object, **kwargs: object) -> MatrixVerdict:
        assert kwargs["shard"] == Shard(1, 2)
        return shard

    monkeypatch.setattr(cli, "agent_images", lambda *args, **kwargs: {OURS: None})
    monkeypatch.setattr(cli, "choose_accel", fake_accel)
    monkeypatch.setattr(cli, "run_matrix", fake_matrix)
    record = tmp_path / "1.json"
    argv = ["matrix", "--deb", str(minimal_deb(tmp_path)), "--shard", "1/2"]
    assert cli.main([*argv, "--readme", str(readme), "--json", str(record)]) == cli.EXIT_OK
    assert "old" in readme.read_text()
    assert "this is shard 1/2; merge the shards" in capsys.readouterr().out
    assert json.loads(record.read_text())["shard"] == {"index": 1, "count": 2}


# -- matrix-merge -------------------------------------------------------------------------------


def write_shards(tmp_path: Path, shards: list[MatrixVerdict]) -> list[str]:
    paths = []
    for verdict in shards:
        path = tmp_path / f"shard-{verdict.shard.index}.json"
        path.write_text(json.dumps(records.matrix_json(verdict)))
        paths.append(str(path))
    return paths


def test_matrix_merge_writes_what_the_whole_run_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = sharded(3)
    paths = write_shards(tmp_path, shards)
    outputs = {name: tmp_path / name for name in ("m.md", "m.json", "m.xml")}
    argv = ["--markdown", str(outputs["m.md"]), "--json", str(outputs["m.json"])]
    code = cli.main(["matrix-merge", *reversed(paths), *argv, "--junit", str(outputs["m.xml"])])
    assert code == cli.EXIT_OK, capsys.readouterr().out
    whole = merge_shards(shards)
    assert outputs["m.md"].read_text() == "\n".join(report.matrix_markdown(whole)) + "\n"
    merged = json.loads(outputs["m.json"].read_text())
    assert merged["shard"] == {"index": 1, "count": 1} and len(merged["cells"]) == 6
    assert outputs["m.xml"].read_text().count("<testcase") == 6
    assert "merged 3 shards: 6 cells" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["missing", "not-json", "not-a-matrix"])
def test_matrix_merge_refuses_what_is_not_one_whole_matrix_in_one_line(
    problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_shards(tmp_path, sharded(3))
    if problem == "missing":
        paths = paths[:2]
        says = "missing [3], given twice none"
    elif problem == "not-json":
        Path(paths[1]).write_text("<xml/>")
        says = "is not JSON"
    else:
        Path(paths[1]).write_text(json.dumps({"schema": records.SCHEMA, "command": "check"}))
        says = "not a matrix record"
    assert cli.main(["matrix-merge", *paths]) == cli.EXIT_USAGE
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and says in out[0], out


# -- check ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "/nonexistent/disk.qcow2"], "looked for the image /nonexistent/disk.qcow2"),
        (["--image", "{random}"], "has no partition table (no boot signature 55aa"),
        (["--image", "{random}", "--layout", "lxd-6"], "unknown layout 'lxd-6'"),
        (["--image", "{random}", "--firmware", "bios", "--secure-boot"], "needs UEFI firmware"),
        (["--image", "{random}", "--bound", "0"], "--bound must be more than 0 seconds"),
        (["--image", "{random}", "--timeout", "soon"], "is not a number of seconds"),
        (["--image", "{random}", "--jobs", "0"], "--jobs must be 1..16, not 0"),
        (["--image", "{random}", "--host-socket", "/x.sock"], "--host-socket needs --host"),
        (
            ["--image", "{random}", "--host", "lxd", "--layout", "lxd-5.20", "--nic", "open"],
            "--host cannot be given with --layout (a daemon's layout follows its version), "
            "--nic (the VM gets no NIC); drop it",
        ),
        (["--image", "{random}", "--host", "lxd", "--firmware", "bios"], "--firmware bios"),
        (
            ["--image", "{random}", "--host", "lxd", "--credential", "a=b"],
            "--credential on --host lxd (LXD has no systemd.credential keys; Incus has)",
        ),
        (
            ["--image", "{random}", "--host", "lxd", "--host", "incus", "--host-socket", "/x"],
            "--host-socket is one daemon's",
        ),
        (["--image", "{random}", "--json", "/tmp"], "--json /tmp is a directory"),
        (["--image", "{random}", "--junit", "/nonexistent/x.xml"], "cannot write into"),
    ],
)
def test_bad_check_input_is_one_line_and_exit_2_before_anything_boots(
    args: list[str], message: str, random_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [arg.replace("{random}", str(random_image)) for arg in args]
    assert cli.main(["check", *argv]) == cli.EXIT_USAGE
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and message in out[0], out


@pytest.mark.parametrize(
    ("given", "options", "message"),
    [
        (["meta"], [], "is a split image's metadata tarball; give its disk too"),
        (["meta", "disk"], ["--arch", "arm64"], "--arch arm64 disagrees with the image's"),
        (["arm-meta", "disk"], ["--host", "lxd"], "--host runs amd64 images; this image is arm64"),
        (["meta", "disk", "disk"], [], "--image takes one or two paths, not 3"),
    ],
)
def test_an_lxd_image_that_cannot_be_checked_is_one_line_and_exit_2(
    given: list[str],
    options: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = {
        "meta": _tarball(tmp_path / "lxd.tar", {"metadata.yaml": X86_METADATA.encode()}),
        "arm-meta": _tarball(tmp_path / "arm.tar", {"metadata.yaml": b"architecture: aarch64\n"}),
        "disk": _qcow2(tmp_path / "disk.qcow2"),
    }
    argv = ["check", "--image", *(str(paths[name]) for name in given), *options]
    assert cli.main(argv) == cli.EXIT_USAGE
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and message in out[0], out


# -- rename-replay -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "/nonexistent/disk.qcow2"], "looked for the image /nonexistent/disk.qcow2"),
        (["--image", "{random}"], "has no partition table"),
        (["--timeout", "soon"], "is not a number of seconds"),
        (["--json", "/tmp"], "--json /tmp is a directory"),
    ],
)
def test_bad_rename_replay_input_is_one_line_and_exit_2(
    args: list[str],
    message: str,
    fake_deb: Path,
    random_image: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [arg.replace("{random}", str(random_image)) for arg in args]
    assert cli.main(["rename-replay", "--deb", str(fake_deb), *argv]) == cli.EXIT_USAGE
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and message in out[0], out


# -- image ------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", [["--agent", "ours"], ["--format", "split"]])
def test_an_agent_and_a_format_are_chosen_for_a_cloud_disk_only(
    option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["image", *option]) == cli.EXIT_USAGE
    assert f"{option[0]} is for a --cloud disk; add --cloud" in capsys.readouterr().out


def test_a_corrupt_deb_is_refused_before_any_build_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "lxd-status-agent_9_all.deb"
    corrupt.write_bytes(os.urandom(2048))
    assert cli.main(["image", "--deb", str(corrupt)]) == cli.EXIT_USAGE
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "is not a Debian format archive" in out[0], out


# -- a real boot -------------------------------------------------------------------------------


@pytest.mark.vm
def test_harness_boot_exits_0_after_started_then_stopped(
    deb: Path, guest_image: GuestImage
) -> None:
    result = subprocess.run(
        harness_command("boot", "--layout", "lxd-5.20", "--accel", "tcg", "--deb", str(deb)),
        capture_output=True, text=True, timeout=TEST_DEADLINE, cwd=REPO,
    )  # fmt: skip
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    assert f"OK: STARTED then STOPPED on {PORT_NAME}" in result.stdout
    assert re.search(r"STARTED +[0-9.]+ s +on com\.canonical\.lxd", result.stdout)
