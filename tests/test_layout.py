"""The package shows its flow: every import goes one way, and no module imports itself back.

Reads every module's imports with ``ast`` (lazy imports inside functions included: they are
imports all the same) and checks them against the order in the README's Development section:

    commands -> run -> sending -> clients, results -> inputs -> model
                 run -> coordination (Redis: shared budget and work) -> model
                 report (beside: reads results)    emulator (beside: uses inputs' rules)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dispatcher"

# What each stage may import besides itself. The top-level package (``dispatcher``, its
# ``__init__`` and ``__main__``) is the public face and may import any stage; no stage may
# import it back, nor any stage listed above it.
ALLOWED: dict[str, frozenset[str]] = {
    "model": frozenset(),
    "inputs": frozenset({"model"}),
    "results": frozenset({"model"}),
    "clients": frozenset({"model"}),
    "sending": frozenset({"clients", "results", "model"}),
    "report": frozenset({"results", "model"}),
    "coordination": frozenset({"model"}),
    "emulator": frozenset({"inputs", "model"}),
    "run": frozenset(
        {"coordination", "sending", "clients", "results", "inputs", "report", "model"}
    ),
    "commands": frozenset(
        {
            "run",
            "coordination",
            "sending",
            "clients",
            "results",
            "inputs",
            "report",
            "emulator",
            "model",
        }
    ),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every ``dispatcher`` module that ``name`` imports, resolved to a module we have."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from dispatcher.run import runner`` imports the module dispatcher.run.runner.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        for target in targets:
            if target == "dispatcher" or target.startswith("dispatcher."):
                while target not in known:
                    target = target.rpartition(".")[0]
                yield target


def stage_of(module: str) -> str | None:
    """``dispatcher.sending.engine`` -> ``sending``; the top-level package has no stage."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in {"__main__"}:
        return None
    return parts[1]


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imports_of(name, path, known)) - {name} for name, path in found.items()}


def test_every_module_belongs_to_a_known_stage() -> None:
    stages = {stage_of(name) for name in modules()} - {None}
    assert stages == set(ALLOWED), "a new stage needs its place in ALLOWED and the README"


def test_top_level_holds_few_modules() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= 5, loose


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_go_one_way(module: str) -> None:
    here = stage_of(module)
    if here is None:
        return
    wrong = sorted(
        target
        for target in graph()[module]
        if stage_of(target) != here and stage_of(target) not in ALLOWED[here]
    )
    assert not wrong, f"{module} ({here}) must not import {wrong}"


def test_no_import_cycles() -> None:
    edges = graph()
    # The top-level package imports the public API from the stages, which import the
    # top-level package's submodules only through their own stage: checked above. Here
    # every module, the package's __init__ excepted, must form an acyclic graph.
    edges = {
        m: {t for t in ts if t != "dispatcher"} for m, ts in edges.items() if m != "dispatcher"
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an import against the order is found, lazy ones included."""
    source = "def later() -> None:\n    from dispatcher.commands import cli\n"
    path = tmp_path / "engine.py"
    path.write_text(source)
    known = {"dispatcher.commands.cli", "dispatcher.commands", "dispatcher"}
    found = set(imports_of("dispatcher.sending.engine", path, known))
    assert found == {"dispatcher.commands.cli"}
    assert "commands" not in ALLOWED["sending"]


def test_every_stage_says_what_it_holds() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} needs a docstring: what the stage holds, what it knows nothing of"
        assert 2 <= len(doc.splitlines()) <= 4 or init.parent.name == "emulator", init
