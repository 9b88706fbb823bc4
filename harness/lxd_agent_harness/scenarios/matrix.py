"""The compatibility matrix: every agent booted in every layout, and what the host saw.

One boot per cell (an agent's image in a QEMU layout). Each cell records, as data: when the host
first saw `STARTED` (and on which ring), whether the agent held up the boot (how long
`multi-user.target` waited for its start, or that it was still waiting at the bound), the
agent unit's state as systemd says, how long the power button took to power the guest off, and
whether `STOPPED` was seen. A hang is a value, not a harness hang: every wait is bounded by the
cell's `bound`, and a guest still up then is recorded as "held" (with the stop job systemd
printed) and killed. `run_matrix` returns a `MatrixVerdict`; it never prints. `cli.report`
renders the table; `ours_problems` says where our agent fell short of what it must do.

Host side only; how QEMU, the rings and the console work belongs to vm, monitor and console.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from lxd_agent.protocol import STARTED, STOPPED
from lxd_agent_harness.base.aio import in_turn
from lxd_agent_harness.base.errors import HarnessError, MonitorTimeout, VmError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.image.agents import OURS, MatrixAgent
from lxd_agent_harness.lxd.layouts import Layout, get_layout, lxd_ring_port
from lxd_agent_harness.lxd.monitor import ONE_REFRESH, TimelineEntry
from lxd_agent_harness.scenarios.observed import (
    PowerOffFigures,
    first_state,
    power_off_within,
    record,
)
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, VmConfig
from lxd_agent_harness.vm.instance import Vm
from lxd_agent_harness.vm.units import AGENT_UNIT, UnitFacts, agent_unit, unit_properties

MATRIX_LAYOUTS = ("lxd-5.19", "lxd-5.20", "incus", "incus-6", "bridged")

# How long a cell waits for the boot to finish and for the guest to power off before it calls
# it "held". systemd itself gives up on a start or stop job after 90 s (DefaultTimeout*Sec);
# an agent that holds anything for 20 s under TCG here holds it until systemd's timeout.
DEFAULT_BOUND = 20.0


@dataclass
class Cell(PowerOffFigures):
    """One agent in one layout. Times are seconds since QEMU started; None: not reached."""

    agent: str
    layout: str
    bound: float
    started: TimelineEntry | None = None
    """The first `STARTED` the host saw, on any ring."""
    stopped: TimelineEntry | None = None
    """The first `STOPPED` the host saw after the power button."""
    system_state: str = ""
    """`systemctl is-system-running --wait`, cut off at `bound`: `starting` means still booting."""
    unit: UnitFacts | None = None
    target_reached_us: int = 0
    """When multi-user.target became active (CLOCK_MONOTONIC µs); 0: not within the bound."""
    kernel_up: float | None = None
    powered_down: float | None = None
    guest_off: float | None = None
    power_off_held: bool = False
    job_running: str = ""
    """What systemd said it was waiting for on the console (`stop job ... for LXD - agent`)."""
    error: HarnessError | None = None
    """A failure of the harness itself (not of the agent): the cell has no result."""
    entries: list[TimelineEntry] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)

    @property
    def boot_held(self) -> float | None:
        """Seconds multi-user.target waited for the agent's start; None when it did not wait.

        It waits when the unit is ordered `Before=multi-user.target` and was started in the boot;
        for how long is the unit's start (job begun to active, i.e. `READY=1`). A start still
        running when the bound ran out gives `bound`: see `boot_held_past_bound`.
        """
        unit = self.unit
        if unit is None or "multi-user.target" not in unit.before or not unit.start_began_us:
            return None
        if self.boot_held_past_bound:
            return self.bound
        if unit.active_at_us and (
            not self.target_reached_us or self.target_reached_us >= unit.active_at_us
        ):
            return (unit.active_at_us - unit.start_began_us) / 1e6
        return None

    @property
    def boot_held_past_bound(self) -> bool:
        unit = self.unit
        return (
            unit is not None
            and "multi-user.target" in unit.before
            and unit.active == "activating"
            and not self.target_reached_us
        )


class ShardError(HarnessError):
    """A shard that cannot be run or merged. `kind` says which way: `syntax` (not K/N with
    1 <= K <= N), `none` (nothing to merge), `other-matrix` (other agents or layouts),
    `other-split` (another N), `shards` (a shard `missing` or given `twice`), `cell-twice` (a
    cell in two shards; `cells` names it), `incomplete` (cells `missing` from the table)."""

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        missing: Sequence[object] = (),
        twice: Sequence[object] = (),
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.missing = list(missing)
        self.twice = list(twice)


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` (from 1): the cells at positions index-1, index-1+count, ...

    Positions are those of the whole table (agents in order, each with every layout in order),
    so the same agents and layouts always give the same split, and every shard gets cells of
    every agent.
    """

    index: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ShardError(
                f"shard {self.index}/{self.count}: give K/N with 1 <= K <= N", kind="syntax"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`K/N`, e.g. `2/3`; a `ShardError` saying what is wrong otherwise."""
        index, slash, count = text.partition("/")
        try:
            shard = cls(int(index), int(count)) if slash else None
        except ValueError:
            shard = None
        if shard is None:
            raise ShardError(f"--shard {text!r} is not K/N (e.g. 1/2)", kind="syntax")
        return shard

    def takes(self, position: int) -> bool:
        return position % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard()


def table_cells(agents: Sequence[str], layouts: Sequence[str]) -> list[tuple[str, str]]:
    """(agent, layout) for every cell, in the table's order."""
    return [(agent, layout) for agent in agents for layout in layouts]


@dataclass
class MatrixVerdict:
    agents: list[MatrixAgent]
    layouts: list[str]
    cells: list[Cell] = field(default_factory=list)
    shard: Shard = WHOLE
    """Which part of the table this run made (the whole table: 1/1)."""

    def cell(self, agent: str, layout: str) -> Cell:
        return next(c for c in self.cells if c.agent == agent and c.layout == layout)

    def harness_failures(self) -> list[Cell]:
        return [c for c in self.cells if c.error is not None]

    def our_problems(self) -> list[tuple[Cell, list[str]]]:
        """Our cells that fell short, each with what fell short."""
        found = []
        for cell in self.cells:
            if cell.agent == OURS and cell.error is None:  # those are harness failures
                problems = ours_problems(cell, lxd_ring_port(get_layout(cell.layout)))
                if problems:
                    found.append((cell, problems))
        return found

    @property
    def passed(self) -> bool:
        return not self.harness_failures() and not self.our_problems()


def ours_problems(cell: Cell, ring_port: str | None) -> list[str]:
    """What our agent must do in every layout, as a list of what it did not do.

    With a ring on an LXD port (`ring_port`): the host sees STARTED on it, and STOPPED after the
    power button. Without one (Incus): the unit is skipped cleanly. Always: the boot does not
    wait for it, the power-off is not held, the unit never restarted.
    """
    if cell.error is not None:
        return [f"no result: {cell.error}"]
    problems = []
    if ring_port is not None:
        if cell.started is None or cell.started.port != ring_port:
            seen = f"on {cell.started.port}" if cell.started else "never"
            problems.append(f"STARTED not seen on {ring_port} ({seen})")
        if cell.stopped is None:
            problems.append("STOPPED not seen after the power button")
    elif cell.unit is None or (cell.unit.active, cell.unit.result) != ("inactive", "success"):
        shown = cell.unit.summary() if cell.unit else "unknown"
        problems.append(f"no LXD ring, yet the unit was not skipped cleanly ({shown})")
    if cell.boot_held is not None:
        problems.append(f"the boot waited for the agent ({cell.boot_held:.2f} s)")
    if cell.unit is not None and cell.unit.active == "activating":
        problems.append(f"the unit was still starting {cell.bound:g} s after the login")
    if cell.power_off_held:
        problems.append(f"the power-off was held for more than {cell.bound:g} s")
    if cell.unit is not None and cell.unit.restarts:
        problems.append(f"the unit restarted {cell.unit.restarts} times")
    return problems


# ---------------------------------------------------------------------------------------------
# Running


async def run_matrix(
    agents: Sequence[MatrixAgent],
    layouts: Sequence[Layout],
    images: dict[str, GuestImage],
    accel: Accel,
    timeout: float,
    bound: float = DEFAULT_BOUND,
    progress: Progress | None = None,
    shard: Shard = WHOLE,
    jobs: int = 1,
) -> MatrixVerdict:
    """Boot each agent's image (`images[agent.name]`) in each layout, `jobs` cells at a time
    (each guest on a fresh overlay of its own), the cells kept in the table's order.

    Every cell runs under `accel`; only `shard`'s cells run. A harness failure in one cell is
    kept in that cell and the matrix goes on.
    """
    verdict = MatrixVerdict(
        agents=list(agents), layouts=[layout.name for layout in layouts], shard=shard
    )
    by_name = {layout.name: layout for layout in layouts}
    cells = table_cells([agent.name for agent in agents], list(by_name))

    def start(agent: str, layout: Layout) -> Callable[[], Awaitable[Cell]]:
        async def one() -> Cell:
            if progress is not None:
                progress(f"matrix: {agent} on {layout.name}")
            config = VmConfig(layout=layout, boot=DirectBoot(images[agent]), accel=accel)
            return await run_cell(config, agent, timeout, bound, progress)

        return one

    starts = [
        start(agent, by_name[layout_name])
        for position, (agent, layout_name) in enumerate(cells)
        if shard.takes(position)
    ]
    verdict.cells.extend(await in_turn(starts, jobs))
    return verdict


def merge_shards(shards: Sequence[MatrixVerdict]) -> MatrixVerdict:
    """The whole table from its shards' verdicts: the same matrix, every shard once.

    The cells come out in the table's order, as an unsharded run gives them.
    """
    if not shards:
        raise ShardError("no shards to merge; give every shard's JSON", kind="none")
    first = shards[0]
    agents = [agent.name for agent in first.agents]
    count = first.shard.count
    for verdict in shards[1:]:
        its_agents = [agent.name for agent in verdict.agents]
        if its_agents != agents or verdict.layouts != first.layouts:
            raise ShardError(
                f"shard {verdict.shard} is of another matrix (agents {its_agents}, layouts "
                f"{verdict.layouts}; shard {first.shard}: {agents}, {first.layouts})",
                kind="other-matrix",
            )
        if verdict.shard.count != count:
            raise ShardError(
                f"shard {verdict.shard} splits the table in {verdict.shard.count}, "
                f"shard {first.shard} in {count}: run every shard with the same N",
                kind="other-split",
            )
    indexes = sorted(verdict.shard.index for verdict in shards)
    if indexes != list(range(1, count + 1)):
        missing = sorted(set(range(1, count + 1)) - set(indexes))
        twice = sorted({i for i in indexes if indexes.count(i) > 1})
        raise ShardError(
            f"the shards of a {count}-way split are 1..{count}, each once; "
            f"missing {missing or 'none'}, given twice {twice or 'none'}",
            kind="shards",
            missing=missing,
            twice=twice,
        )
    by_cell: dict[tuple[str, str], Cell] = {}
    for verdict in shards:
        for cell in verdict.cells:
            key = (cell.agent, cell.layout)
            if key in by_cell:
                raise ShardError(
                    f"{cell.agent} on {cell.layout} is in two shards",
                    kind="cell-twice",
                    twice=[key],
                )
            by_cell[key] = cell
    order = table_cells(agents, first.layouts)
    missing_cells = [f"{a} on {layout}" for a, layout in order if (a, layout) not in by_cell]
    if missing_cells or len(by_cell) != len(order):
        raise ShardError(
            f"the shards do not hold the whole table: missing {missing_cells or 'none'}, "
            f"{len(by_cell)} cells for {len(order)} places",
            kind="incomplete",
            missing=missing_cells,
        )
    return MatrixVerdict(
        agents=list(first.agents),
        layouts=list(first.layouts),
        cells=[by_cell[key] for key in order],
    )


async def run_cell(
    config: VmConfig,
    agent: str,
    timeout: float,
    bound: float = DEFAULT_BOUND,
    progress: Progress | None = None,
) -> Cell:
    """Boot once and fill one `Cell`; only the harness's own failures go into `Cell.error`."""
    cell = Cell(agent=agent, layout=config.layout.name, bound=bound)
    vm = Vm(config, progress=progress)
    try:
        async with vm:
            try:
                await _observe(vm, cell, timeout)
            finally:
                _record(vm, cell)
    except HarnessError as e:
        cell.error = e
    return cell


async def _observe(vm: Vm, cell: Cell, timeout: float) -> None:
    bound = cell.bound
    await vm.login(timeout=timeout)
    # From here the guest only answers a few commands and waits (out the bound, one refresh):
    # its core goes to the next VM.
    vm.release_cores()
    # The state after at most `bound` s of waiting: `starting` while a start job still runs.
    state = await vm.run(
        f"timeout {bound:g} systemctl is-system-running --wait >/dev/null; "
        "systemctl is-system-running",
        timeout=bound + timeout,
    )
    cell.system_state = state.output.strip()
    vm.note(f"guest: is-system-running: {cell.system_state}")
    cell.unit = await agent_unit(vm)
    vm.note(f"guest: {AGENT_UNIT}: {cell.unit.summary()}")
    target = await unit_properties(vm, "multi-user.target", ["ActiveEnterTimestampMonotonic"])
    with contextlib.suppress(ValueError):
        cell.target_reached_us = int(target["ActiveEnterTimestampMonotonic"])
    # An agent that reports at all has written a line by now or does within one refresh
    # (`_record` takes the first STARTED from the timeline).
    await _wait_unless_timeout(vm, STARTED, ONE_REFRESH)
    power_off = await power_off_within(vm, bound)
    cell.power_off_held = power_off.held
    cell.job_running = power_off.job_running


async def _wait_unless_timeout(vm: Vm, status: str, timeout: float) -> None:
    """Wait for `status` on any ring; a timeout is an answer ("never"), other failures raise."""
    try:
        await vm.wait_for_state(status, None, timeout=timeout)
    except VmError as e:
        if not isinstance(e.__cause__, MonitorTimeout):
            raise  # the rings could not be read, or the guest stopped: no answer, not "never"


def _record(vm: Vm, cell: Cell) -> None:
    """What every scenario records, then the first STARTED, and the first STOPPED after the
    power button."""
    record(vm, cell)
    cell.started = first_state(cell.entries, STARTED, 0.0)
    if cell.powered_down is not None:
        cell.stopped = first_state(cell.entries, STOPPED, cell.powered_down)
