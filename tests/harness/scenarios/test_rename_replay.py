"""Tests for lxd_agent_harness.scenarios.rename_replay without a daemon: a replay passes only
when every step passed, and a step never run is `not-checked`. The replay on real daemons is in
tests/harness/scenarios/test_host_check.py (with the other daemon tests: one at a time)."""

from __future__ import annotations

from pathlib import Path

from lxd_agent_harness.base.errors import DaemonError
from lxd_agent_harness.scenarios.rename_replay import (
    DEBIAN_AGENT_STEP,
    FAIL,
    NOT_CHECKED,
    PASS,
    STEPS,
    ReplayVerdict,
    Step,
    _Replay,
)


def test_a_step_not_run_is_not_checked_and_the_replay_does_not_pass() -> None:
    steps = [Step(name) for name in STEPS]
    steps[0].verdict = PASS
    verdict = ReplayVerdict(steps)
    assert [s.verdict for s in steps] == [PASS] + [NOT_CHECKED] * 4
    assert not verdict.passed


def test_the_replay_passes_when_every_step_passed_and_nothing_went_wrong() -> None:
    steps = [Step(name, verdict=PASS) for name in STEPS]
    assert ReplayVerdict(steps).passed
    assert not ReplayVerdict(steps, error=DaemonError("lost", daemon="lxd")).passed
    steps[2].verdict = FAIL
    assert not ReplayVerdict(steps).passed


def test_debian_agent_step_is_there_only_when_asked_for_and_not_checked_it_does_not_pass() -> None:
    assert list(_Replay(Path("ours.qcow2"), None, 1.0, print).steps) == list(STEPS)
    asked = _Replay(Path("ours.qcow2"), Path("debian.qcow2"), 1.0, print).steps
    assert list(asked) == [*STEPS, DEBIAN_AGENT_STEP]
    for name in STEPS:
        asked[name].verdict = PASS
    assert asked[DEBIAN_AGENT_STEP].verdict == NOT_CHECKED
    assert not ReplayVerdict(list(asked.values())).passed


def replay_after(upgraded: str, restarted: str) -> _Replay:
    replay = _Replay(Path("ours.qcow2"), None, 1.0, print)
    replay.steps["upgraded-while-running"].verdict = upgraded
    replay.steps["restarted"].verdict = restarted
    return replay


def snapshot_verdicts(restarted: str, snapshot: bool, failed: bool, loaded: bool) -> list[str]:
    replay = replay_after(PASS, restarted)
    replay._snapshot_verdicts(snapshot=snapshot, failed=failed, loaded=loaded)
    return [replay.steps[name].verdict for name in ("stateful-restore", "way-through")]


def test_the_snapshot_steps_pass_only_as_the_specification_says_and_need_the_cold_start() -> None:
    assert snapshot_verdicts(PASS, snapshot=True, failed=True, loaded=True) == [PASS, PASS]
    # The old state loaded after the upgrade: not what the specification says.
    assert snapshot_verdicts(PASS, snapshot=True, failed=False, loaded=False) == [
        FAIL,
        NOT_CHECKED,
    ]
    # The way through did not load, or the cold start after it never reported.
    assert snapshot_verdicts(PASS, snapshot=True, failed=True, loaded=False) == [PASS, FAIL]
    assert snapshot_verdicts(FAIL, snapshot=True, failed=True, loaded=True) == [FAIL, FAIL]
    # No control on LXD 5.0.2: nothing to compare, never a pass.
    assert snapshot_verdicts(PASS, snapshot=False, failed=False, loaded=False) == [
        NOT_CHECKED,
        NOT_CHECKED,
    ]
