"""examples/: the CI workflow's command lines are ones the harness takes.

The workflow itself (GitHub's runners, its container, artifacts) is not run here; the commands
in it are, elsewhere in `make test`: `check` (tests/harness/scenarios/test_check.py), matrix
shards and `matrix-merge` (test_matrix.py), pytest with the plugin on examples/image-tests
from the installed wheel (test_installed.py). This test fails when an option they use is
renamed or dropped.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from lxd_agent_harness.cli.options import build_parser
from tests.repo import REPO

WORKFLOW = REPO / "examples" / "ci" / "github-actions.yml"
HARNESS = "/opt/harness/bin/lxd-agent-harness"
PYTEST = "/opt/harness/bin/pytest"
# What the runner puts in place of the workflow's expressions and variables.
SUBSTITUTIONS = {
    "${{ matrix.layout }}": "lxd-5.20",
    "${{ matrix.shard }}": "2",
    '"$DEB"': "agent.deb",
    "$DEB": "agent.deb",
}


def commands(program: str) -> list[list[str]]:
    """Each command line of `program` in the workflow, its folded continuation lines joined."""
    lines = WORKFLOW.read_text().splitlines()
    found = []
    for number, line in enumerate(lines):
        if program not in line:
            continue
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        for following in lines[number + 1 :]:
            if not following.strip() or len(following) - len(following.lstrip()) < indent:
                break
            text += " " + following.strip()
        text = text.split("$(", 1)[-1].split(" | ", 1)[0]
        for expression, value in SUBSTITUTIONS.items():
            text = text.replace(expression, value)
        words = shlex.split(text)
        found.append(words[words.index(program) + 1 :])
    return found


def test_every_harness_command_in_the_workflow_parses() -> None:
    found = commands(HARNESS)
    assert [words[0] for words in found] == ["image", "check", "matrix", "matrix-merge"]
    for words in found:
        assert not any("${{" in word or word.startswith("$") for word in words), words
        build_parser().parse_args(words)  # exits 2 (SystemExit) on an unknown option


def test_the_workflows_pytest_options_are_the_plugins() -> None:
    (words,) = commands(PYTEST)
    help_text = subprocess.run(
        [sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO / "examples",
    ).stdout
    options = [word.split("=")[0] for word in words if word.startswith("--")]
    assert "--lxd-image" in options
    for option in options:
        assert re.search(rf"(^|\s){re.escape(option)}[=,\s]", help_text, re.MULTILINE), option
