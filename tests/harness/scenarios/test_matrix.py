"""Tests for lxd_agent_harness.scenarios.matrix: its cells' logic without a VM, then the real
matrix.

The VM part boots every agent in every layout once (a module fixture), writes the table to
out/matrix.md, and checks the cells: ours must do what it must in every layout (a regression
fails CI), and each emulation of LXD's agent must show the behaviour it emulates, or it proves
nothing about LXD.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from lxd_agent.protocol import INCUS_PORT_NAME, LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.cli import report
from lxd_agent_harness.image.agents import AGENTS, OURS, agent_images
from lxd_agent_harness.image.aptsources import DEFAULT_RELEASE
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.lxd.monitor import EntryKind, TimelineEntry
from lxd_agent_harness.scenarios.matrix import (
    MATRIX_LAYOUTS,
    Cell,
    MatrixVerdict,
    Shard,
    ShardError,
    merge_shards,
    ours_problems,
    run_matrix,
    table_cells,
)
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import GuestImage
from lxd_agent_harness.vm.units import UnitFacts
from tests.harness.vm.test_units import RUNNING
from tests.helpers import harness_command, run
from tests.repo import REPO
from tests.vms import BOOT_TIMEOUT, Figures

README = REPO / "README.md"


def state(seconds: float, status: str, port: str) -> TimelineEntry:
    return TimelineEntry(seconds, EntryKind.STATE, f"unknown -> {status}", port)


def good_cell(layout: str = "lxd-5.20") -> Cell:
    """What ours does on `layout`: STARTED, not held, off in a second, STOPPED."""
    facts = UnitFacts.parse(RUNNING.replace("multi-user.target ", ""))
    port = PORT_NAME if layout != "lxd-5.19" else LEGACY_PORT_NAME
    return Cell(
        agent=OURS,
        layout=layout,
        bound=20.0,
        started=state(11.0, STARTED, port),
        stopped=state(21.0, STOPPED, port),
        system_state="running",
        unit=facts,
        target_reached_us=6_000_000,
        powered_down=20.3,
        guest_off=21.5,
    )


# -- cells, without a VM ------------------------------------------------------------------------


def test_the_boot_is_held_only_by_a_unit_ordered_before_multi_user_for_its_start() -> None:
    ours = good_cell()
    assert ours.boot_held is None  # not ordered before multi-user.target
    lxd = replace(ours, unit=UnitFacts.parse(RUNNING))
    assert lxd.boot_held == pytest.approx(0.4)  # job begun -> READY=1
    stuck = replace(
        ours,
        unit=UnitFacts.parse(RUNNING.replace("=active", "=activating")),
        target_reached_us=0,
    )
    assert stuck.boot_held_past_bound and stuck.boot_held == 20.0
    # Active only after multi-user.target was reached: the target did not wait for it.
    late = replace(lxd, target_reached_us=5_200_000)
    assert late.boot_held is None
    # Never started (condition failed): nothing waited.
    skipped = replace(lxd, unit=UnitFacts.parse(RUNNING.replace("5000000", "0")))
    assert skipped.boot_held is None


def test_a_good_cell_of_ours_has_no_problem_and_each_shortfall_is_named() -> None:
    assert ours_problems(good_cell(), PORT_NAME) == []
    assert ours_problems(good_cell("lxd-5.19"), LEGACY_PORT_NAME) == []
    wrong_port = ours_problems(good_cell(), LEGACY_PORT_NAME)
    assert wrong_port == [f"STARTED not seen on {LEGACY_PORT_NAME} (on {PORT_NAME})"]
    held = replace(good_cell(), power_off_held=True, stopped=None)
    assert ours_problems(held, PORT_NAME) == [
        "STOPPED not seen after the power button",
        "the power-off was held for more than 20 s",
    ]
    waited = replace(good_cell(), unit=UnitFacts.parse(RUNNING))
    assert ours_problems(waited, PORT_NAME) == ["the boot waited for the agent (0.40 s)"]
    failed = replace(good_cell(), error=VmError("no login prompt"))
    assert ours_problems(failed, PORT_NAME) == ["no result: no login prompt"]


def test_without_an_lxd_ring_ours_must_be_skipped_cleanly() -> None:
    skipped = replace(
        good_cell("incus"),
        started=None,
        stopped=None,
        unit=UnitFacts.parse("ActiveState=inactive\nSubState=dead\nResult=success\n"),
    )
    assert ours_problems(skipped, None) == []
    looping = replace(skipped, unit=UnitFacts.parse("ActiveState=failed\nResult=exit-code\n"))
    assert ours_problems(looping, None) == [
        "no LXD ring, yet the unit was not skipped cleanly (failed (), Result=exit-code)"
    ]


# -- shards, without a VM -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0", "-1/2", "1/2/3", ""])
def test_a_shard_is_k_of_n_with_k_from_1_to_n(text: str) -> None:
    with pytest.raises(ShardError) as raised:
        Shard.parse(text)
    assert raised.value.kind == "syntax"


def test_shards_split_the_table_so_every_cell_runs_once_and_every_shard_gets_a_share() -> None:
    cells = table_cells(list(AGENTS), list(MATRIX_LAYOUTS))
    assert Shard.parse("2/5") == Shard(2, 5)
    for count in (1, 2, 3, 5, 12, 13):
        shards = [Shard(index, count) for index in range(1, count + 1)]
        taken = [[c for i, c in enumerate(cells) if shard.takes(i)] for shard in shards]
        assert sorted(c for part in taken for c in part) == sorted(cells)
        sizes = [len(part) for part in taken]
        assert max(sizes) - min(sizes) <= 1, (count, sizes)


def sharded(count: int) -> list[MatrixVerdict]:
    """`count` shards of a 2-agent, 3-layout table of good cells (every layout with an LXD
    ring), as their runs give them."""
    agents, layouts = [AGENTS[OURS], AGENTS["lxd-5.0"]], ["lxd-5.19", "lxd-5.20", "bridged"]
    cells = table_cells([a.name for a in agents], layouts)
    shards = []
    for index in range(1, count + 1):
        shard = Shard(index, count)
        mine = [
            replace(good_cell(layout), agent=agent)
            for i, (agent, layout) in enumerate(cells)
            if shard.takes(i)
        ]
        shards.append(MatrixVerdict(agents=agents, layouts=layouts, cells=mine, shard=shard))
    return shards


def test_merged_shards_are_the_whole_table_in_its_order() -> None:
    shards = sharded(3)
    merged = merge_shards(list(reversed(shards)))
    assert merged.shard == Shard(1, 1)
    assert [(c.agent, c.layout) for c in merged.cells] == table_cells(
        [OURS, "lxd-5.0"], ["lxd-5.19", "lxd-5.20", "bridged"]
    )


def refusal(shards: list[MatrixVerdict]) -> ShardError:
    with pytest.raises(ShardError) as raised:
        merge_shards(shards)
    return raised.value


def test_shards_that_do_not_make_one_whole_table_are_refused_with_the_reason() -> None:
    shards = sharded(3)
    gap = refusal([shards[0], shards[2]])
    assert (gap.kind, gap.missing, gap.twice) == ("shards", [2], [])
    again = refusal([shards[0], shards[0], shards[2]])
    assert (again.kind, again.missing, again.twice) == ("shards", [2], [1])
    assert refusal([shards[0], sharded(2)[1], shards[2]]).kind == "other-split"
    other = replace(shards[1], layouts=["lxd-5.19", "lxd-5.20", "incus"])
    assert refusal([shards[0], other, shards[2]]).kind == "other-matrix"
    doubled = replace(shards[1], cells=[*shards[1].cells, shards[0].cells[0]])
    twice = refusal([shards[0], doubled, shards[2]])
    assert (twice.kind, twice.twice) == ("cell-twice", [(OURS, "lxd-5.19")])
    short = replace(shards[1], cells=shards[1].cells[:1])
    incomplete = refusal([shards[0], short, shards[2]])
    assert (incomplete.kind, incomplete.missing) == ("incomplete", ["lxd-5.0 on lxd-5.20"])
    assert refusal([]).kind == "none"


def test_the_readme_shows_a_generated_row_for_every_agent_and_layout() -> None:
    text = README.read_text()
    block = text.split(report.MATRIX_BEGIN, 1)[1].split(report.MATRIX_END, 1)[0]
    for agent in AGENTS.values():
        for layout in MATRIX_LAYOUTS:
            assert f"| {agent.title} | `{layout}` |" in block, (agent.name, layout)


# -- the real matrix ----------------------------------------------------------------------------

# Fifteen boots, three of them held for the bound twice (boot and power-off).
MATRIX_DEADLINE = 1500.0


@pytest.fixture(scope="module")
def matrix(guest_image: GuestImage, deb: Path, figures: Figures) -> MatrixVerdict:
    images = agent_images(list(AGENTS.values()), deb, DEFAULT_RELEASE, print, rebuild=False)
    assert images[OURS] == guest_image  # the session's image, not a second build
    layouts = [get_layout(name) for name in MATRIX_LAYOUTS]
    verdict = run(
        # Three cells at a time: each guest has one vCPU here and gives its core up after the
        # login (then it only waits out its bounds), so two boot while a third waits.
        run_matrix(
            list(AGENTS.values()), layouts, images, Accel.TCG, BOOT_TIMEOUT, progress=print, jobs=3
        ),
        MATRIX_DEADLINE,
    )
    out = REPO / "out"
    out.mkdir(exist_ok=True)
    (out / "matrix.md").write_text("\n".join(report.matrix_markdown(verdict)) + "\n")
    print("\n".join(report.matrix_lines(verdict)))
    for cell in verdict.cells:
        if cell.started is not None:
            figures[f"matrix: {cell.agent} on {cell.layout}: STARTED"] = (
                f"{cell.started.seconds:.2f} s"
            )
    return verdict


def changes(cell: Cell, port: str) -> list[str]:
    return [e.text for e in cell.entries if e.kind is EntryKind.STATE and e.port == port]


@pytest.mark.vm
def test_no_cell_of_ours_regresses_and_the_harness_failed_no_cell(matrix: MatrixVerdict) -> None:
    assert [(c.agent, c.layout, str(c.error)) for c in matrix.harness_failures()] == []
    assert [(c.layout, problems) for c, problems in matrix.our_problems()] == []


@pytest.mark.vm
def test_ours_reports_on_the_ring_lxd_reads_and_never_on_the_other(matrix: MatrixVerdict) -> None:
    full = [f"unknown -> {STARTED}", f"{STARTED} -> {STOPPED}"]
    legacy = matrix.cell(OURS, "lxd-5.19")
    assert changes(legacy, LEGACY_PORT_NAME) == full
    bridged = matrix.cell(OURS, "bridged")
    assert changes(bridged, PORT_NAME) == full
    # The monitor read the legacy ring after every event, the power-off included: never a line.
    assert changes(bridged, LEGACY_PORT_NAME) == []
    assert [
        e for e in bridged.entries if e.kind is EntryKind.READ and e.port == LEGACY_PORT_NAME
    ] == []
    # Incus's own port, whether 7.3's rule reads it (16 KiB) or LXD's (16 B, before 7.3).
    for layout in ("incus", "incus-6"):
        incus = matrix.cell(OURS, layout)
        assert changes(incus, INCUS_PORT_NAME) == full, layout
        assert incus.unit is not None and incus.unit.status_text.startswith(
            f"reporting to {INCUS_PORT_NAME} ("
        ), layout


@pytest.mark.vm
def test_lxd_5_0s_agent_reports_only_where_the_old_name_has_a_ring(matrix: MatrixVerdict) -> None:
    """Where it started at all: LXD 5.0's unit races udev (see the next test), so in a given
    boot it may have been skipped before the port had its name."""
    for layout in ("lxd-5.19", "bridged"):
        cell = matrix.cell("lxd-5.0", layout)
        assert cell.unit is not None, layout
        if cell.unit.active == "active":
            assert cell.started is not None and cell.started.port == LEGACY_PORT_NAME, layout
            assert cell.stopped is not None, layout
        else:
            assert cell.started is None and not cell.unit.condition_met, layout
    for layout in ("lxd-5.20", "incus", "incus-6"):
        assert matrix.cell("lxd-5.0", layout).started is None, layout


@pytest.mark.vm
def test_lxd_5_0s_agent_never_gets_ready_on_the_dead_legacy_port(matrix: MatrixVerdict) -> None:
    """The specification's hazard: the old name exists on 5.20 and Incus, with nothing behind it.

    Its first STARTED, written before READY=1, never returns: the unit stays in its start job,
    or was skipped earlier because the port had no name yet when the job ran (a race in LXD 5.0's
    unit, which nothing orders after udev). Never active: that would need READY=1.
    """
    for layout in ("lxd-5.20", "incus", "incus-6"):
        cell = matrix.cell("lxd-5.0", layout)
        assert cell.unit is not None, layout
        stuck = (cell.unit.active, cell.unit.sub) == ("activating", "start")
        skipped = cell.unit.active == "inactive" and not cell.unit.condition_met
        assert stuck or skipped, (layout, cell.unit.summary())
        if stuck:
            assert cell.system_state == "starting", layout


@pytest.mark.vm
def test_lxd_5_21s_agent_is_silent_before_the_rename_and_holds_the_boot_until_ready(
    matrix: MatrixVerdict,
) -> None:
    old_host = matrix.cell("lxd-5.21", "lxd-5.19")
    assert old_host.started is None and old_host.unit is not None
    assert old_host.unit.active == "active"  # running, writing nowhere
    for layout in ("lxd-5.20", "bridged"):
        cell = matrix.cell("lxd-5.21", layout)
        assert cell.started is not None and cell.started.port == PORT_NAME, layout
        assert cell.stopped is not None, layout
        assert cell.boot_held is not None and not cell.boot_held_past_bound, layout


def masked(row: str) -> str:
    """A table row without its measured seconds: what two runs of the same cell share."""
    return re.sub(r"\d+\.\d+ s", "N s", row)


@pytest.mark.vm
def test_two_shards_merged_give_the_unsharded_tables_cells(
    matrix: MatrixVerdict, deb: Path, tmp_path: Path
) -> None:
    """As a CI system runs it: each shard on its own runner writes JSON, one job merges them."""
    part = ["--agents", OURS, "--layouts", "lxd-5.19,lxd-5.20", "--deb", str(deb)]
    # Side by side, as two runners run them (each guest has one vCPU here).
    shards = [
        subprocess.Popen(
            harness_command(
                "matrix", *part, "--shard", f"{index}/2", "--json", str(tmp_path / f"{index}.json")
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in (1, 2)
    ]
    try:
        for shard in shards:
            out, _ = shard.communicate(timeout=MATRIX_DEADLINE)
            print(out)
            assert shard.returncode == 0, out
    finally:
        for shard in shards:  # a shard past its deadline is stopped (the harness cleans up)
            if shard.poll() is None:
                shard.terminate()
                shard.wait()
    merged_md, merged_json = tmp_path / "merged.md", tmp_path / "merged.json"
    merge = subprocess.run(
        harness_command(
            "matrix-merge",
            str(tmp_path / "2.json"),
            str(tmp_path / "1.json"),
            "--markdown",
            str(merged_md),
            "--json",
            str(merged_json),
            "--junit",
            str(tmp_path / "merged.xml"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    print(merge.stdout, merge.stderr)
    assert merge.returncode == 0, merge.stdout
    record = json.loads(merged_json.read_text())
    assert record["shard"] == {"index": 1, "count": 1}
    assert [(c["agent"], c["layout"]) for c in record["cells"]] == [
        (OURS, "lxd-5.19"),
        (OURS, "lxd-5.20"),
    ]
    unsharded = {
        line.split(" | ")[1]: masked(line)
        for line in report.matrix_markdown(matrix)
        if line.startswith(f"| {AGENTS[OURS].title} |")
    }
    title = f"| {AGENTS[OURS].title} |"
    rows = [line for line in merged_md.read_text().splitlines() if line.startswith(title)]
    assert [masked(row) for row in rows] == [
        unsharded["`lxd-5.19`"],
        unsharded["`lxd-5.20`"],
    ]
