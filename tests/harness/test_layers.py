"""The harness's layers, read from its source: each module imports only from its own layer or
those below, no modules import each other in a circle, and every module has its test module.

The imports are read with `ast`, function-level ones included (an import moved into a function
to dodge a circle is still a circle). The layer order is the one `lxd_agent_harness/__init__.py`
documents.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lxd_agent_harness
from tests.repo import REPO

PACKAGE = "lxd_agent_harness"
ROOT = Path(lxd_agent_harness.__file__).resolve().parent
LAYERS = ("base", "qemu", "lxd", "vm", "image", "scenarios", "cli")
"""Lowest first."""

NO_TEST_MODULE = {
    f"{PACKAGE}.base.progress": "one type alias",
    f"{PACKAGE}.vm.accel": "one enum and one record, used by every VM test",
}
"""Modules with no test module of their own, and why."""


def modules() -> dict[str, Path]:
    """Every module of the harness by dotted name, `__init__` and `__main__` included.

    Only packages' files: `image/emulated/` is package data (a program for guests), not code
    the harness imports.
    """
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        if not (path.parent / "__init__.py").is_file():
            continue
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(path: Path) -> set[str]:
    """The harness modules `path` imports, anywhere in it (`from X import name` counts as X,
    or as X.name where that is a module)."""
    names = set()
    known = modules()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in known}


def layer(module: str) -> int | None:
    """The layer's index (0 is lowest); None for the package's top (`__init__`, `__main__`)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def graph() -> dict[str, set[str]]:
    return {name: imported(path) - {name} for name, path in modules().items()}


def test_every_module_is_in_a_layer() -> None:
    outside = [
        name
        for name in modules()
        if layer(name) is None and name not in (PACKAGE, f"{PACKAGE}.__main__")
    ]
    assert outside == [], f"modules outside the layers {LAYERS}: {outside}"


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = []
    for name, targets in graph().items():
        own = layer(name)
        if own is None:  # the package's __main__ may call the command line
            continue
        for target in sorted(targets):
            theirs = layer(target)
            if theirs is not None and theirs > own:
                upward.append(f"{name} ({LAYERS[own]}) imports {target} ({LAYERS[theirs]})")
    assert upward == [], "imports from a higher layer:\n" + "\n".join(upward)


def find_circle(edges: dict[str, set[str]]) -> list[str]:
    """One circle of imports as [a, b, ..., a], or [] when there is none."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return []
        for target in sorted(edges.get(name, ())):
            circle = visit(target, [*path, name])
            if circle:
                return circle
        done.add(name)
        return []

    for name in sorted(edges):
        circle = visit(name, [])
        if circle:
            return circle
    return []


def test_no_modules_import_each_other_in_a_circle() -> None:
    # The package's own __init__ is imported on the way to every module; it imports nothing.
    edges = {name: {t for t in targets if t != PACKAGE} for name, targets in graph().items()}
    assert find_circle(edges) == []


def test_the_circle_finder_finds_a_circle_through_a_function_level_import() -> None:
    # What the old accel/machine/vm trio looked like: vm -> machine -> accel -> vm.
    edges = {"vm": {"machine"}, "machine": {"accel"}, "accel": {"vm", "errors"}, "errors": set()}
    assert find_circle(edges) == ["accel", "vm", "machine", "accel"]
    assert find_circle({"a": {"b"}, "b": set()}) == []


def test_the_layer_check_sees_an_upward_import() -> None:
    assert layer(f"{PACKAGE}.base.errors") == 0
    assert layer(f"{PACKAGE}.cli.main") == len(LAYERS) - 1
    vm, qemu = layer(f"{PACKAGE}.vm.instance"), layer(f"{PACKAGE}.qemu.process")
    assert vm is not None and qemu is not None and vm > qemu


def test_the_guest_agent_never_imports_the_harness() -> None:
    agent = REPO / "lxd_agent"
    offenders = []
    for path in sorted(agent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith(PACKAGE)]
    assert offenders == []


def test_every_module_has_a_test_module_that_mirrors_its_path() -> None:
    tests = REPO / "tests" / "harness"
    missing = []
    for name in modules():
        parts = name.split(".")[1:]
        if len(parts) < 2 or parts[-1].startswith("_") or name in NO_TEST_MODULE:
            continue
        expected = tests.joinpath(*parts[:-1], f"test_{parts[-1]}.py")
        if not expected.is_file():
            missing.append(str(expected.relative_to(REPO)))
    assert missing == [], "modules without their test module:\n" + "\n".join(missing)
