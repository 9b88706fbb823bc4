"""The harness's layers, read from its source: each module imports only from its own layer or
those below, no modules import each other in a circle, and every module (the agent's too) has
its test module.

The imports are read with `ast`, function-level and `TYPE_CHECKING` ones included (an import
moved into a function to dodge a circle is still a circle); importing a module also runs its
packages' `__init__`, so those count as imported too. Relative imports are banned by ruff
(TID252), so every import names its module in full. The layer order is the one
`lxd_agent_harness/__init__.py` documents.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lxd_agent_harness
from tests.repo import REPO

PACKAGE = "lxd_agent_harness"
ROOT = Path(lxd_agent_harness.__file__).resolve().parent
LAYERS = ("base", "qemu", "lxd", "vm", "image", "host", "scenarios", "cli", "testing")
"""Lowest first."""

NO_TEST_MODULE = {
    f"{PACKAGE}.base.progress": "one type alias",
    f"{PACKAGE}.vm.accel": "one enum and one record, used by every VM test",
}
"""Modules with no test module of their own, and why."""


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package at `root` by dotted name, `__init__` and `__main__` included.

    Only packages' files: `image/emulated/` is package data (a program for guests), not code
    the harness imports.
    """
    found = {}
    for path in sorted(root.rglob("*.py")):
        if not (path.parent / "__init__.py").is_file():
            continue
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that importing `path` runs: those it imports anywhere in it
    (`from X import name` counts as X, and as X.name where that is a module), and their
    packages' `__init__`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    with_packages = set()
    for name in names:
        parts = name.split(".")
        with_packages |= {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
    return {name for name in with_packages if name in known}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Who imports whom, module by module (a module's own name left out)."""
    known = modules(root)
    return {name: imported(path, known) - {name} for name, path in known.items()}


def layer(module: str) -> int | None:
    """The layer's index (0 is lowest); None for the package's top (`__init__`, `__main__`)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Every import from a layer above the importer's own, in words."""
    found = []
    for name, targets in sorted(edges.items()):
        own = layer(name)
        if own is None:  # the package's __main__ may call the command line
            continue
        for target in sorted(targets):
            theirs = layer(target)
            if theirs is not None and theirs > own:
                found.append(f"{name} ({LAYERS[own]}) imports {target} ({LAYERS[theirs]})")
    return found


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


def test_every_module_is_in_a_layer() -> None:
    outside = [
        name
        for name in modules()
        if layer(name) is None and name not in (PACKAGE, f"{PACKAGE}.__main__")
    ]
    assert outside == [], f"modules outside the layers {LAYERS}: {outside}"


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    found = upward(graph())
    assert found == [], "imports from a higher layer:\n" + "\n".join(found)


def test_no_modules_import_each_other_in_a_circle() -> None:
    assert find_circle(graph()) == []


def test_the_packages_inits_import_nothing_of_the_harness() -> None:
    # So that running a package's __init__ on the way to a module can close no circle.
    inits = {
        name: targets for name, targets in graph().items() if modules()[name].stem == "__init__"
    }
    assert {name: targets for name, targets in inits.items() if targets} == {}


def _fake_package(tmp_path: Path) -> Path:
    """A package laid out in the harness's layers, with an upward import hidden in a function
    and a circle through a `TYPE_CHECKING` import."""
    root = tmp_path / PACKAGE
    files = {
        "__init__.py": "",
        "base/__init__.py": "",
        "base/errors.py": (
            f"def late():\n    from {PACKAGE}.cli.main import run  # upward, inside a function\n"
        ),
        "vm/__init__.py": "",
        "vm/a.py": f"import {PACKAGE}.vm.b\n",
        "vm/b.py": (
            f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from {PACKAGE}.vm import a\n"
        ),
        "cli/__init__.py": "",
        "cli/main.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_checks_see_a_function_level_upward_import_and_a_type_checking_circle(
    tmp_path: Path,
) -> None:
    edges = graph(_fake_package(tmp_path))
    assert edges[f"{PACKAGE}.base.errors"] >= {f"{PACKAGE}.cli.main", f"{PACKAGE}.cli"}
    assert upward(edges) == [
        f"{PACKAGE}.base.errors (base) imports {PACKAGE}.cli (cli)",
        f"{PACKAGE}.base.errors (base) imports {PACKAGE}.cli.main (cli)",
    ]
    assert find_circle(edges) == [f"{PACKAGE}.vm.a", f"{PACKAGE}.vm.b", f"{PACKAGE}.vm.a"]


def test_the_circle_finder_finds_a_circle_and_passes_a_chain() -> None:
    # What the old accel/machine/vm trio looked like: vm -> machine -> accel -> vm.
    edges = {"vm": {"machine"}, "machine": {"accel"}, "accel": {"vm", "errors"}, "errors": set()}
    assert find_circle(edges) == ["accel", "vm", "machine", "accel"]
    assert find_circle({"a": {"b"}, "b": set()}) == []


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


def test_every_module_of_the_agent_has_its_test_module() -> None:
    # lxd_agent/guest/X.py -> tests/guest/test_X.py, lxd_agent/X.py -> tests/test_X.py.
    missing = []
    for name, path in modules(REPO / "lxd_agent").items():
        parts = name.split(".")[1:]
        if path.name == "__init__.py" or parts[-1].startswith("_"):
            continue
        expected = (REPO / "tests").joinpath(*parts[:-1], f"test_{parts[-1]}.py")
        if not expected.is_file():
            missing.append(str(expected.relative_to(REPO)))
    assert missing == [], "agent modules without their test module:\n" + "\n".join(missing)
