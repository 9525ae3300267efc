"""heft's rooms import downward only (README "Layout"), and every room ships in the wheel.

The import rules are read from the source, not from running it: every ``import`` and ``from ...
import`` in every module, function-local ones and ``if TYPE_CHECKING:`` ones included, is given a
room and a level, and an import that runs sideways (another room on the same level) or upward fails
the test, naming the file and line. Cycles between modules are checked over the imports that run
(``TYPE_CHECKING`` ones never do). What keeps the next capabilities from undoing the layout.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

# Top-level rooms: a room may import its own modules and rooms of a lower level.
TOP_LEVELS = {"data": 0, "reweighting": 0, "model": 1, "launcher": 2}

# launcher/'s sub-rooms and top-level modules (heft's application room; see README "Layout").
LAUNCHER_LEVELS = {
    "atomic": 0,                   # the one atomic-write helper
    "launch": 1, "metrics": 1,     # processes on one machine; the metrics.jsonl format
    "config": 2,                   # the configuration tree and its validation
    "checkpoint": 3,               # a checkpoint on disk, with no Trainer
    "preflight": 4,                # what is checked or estimated before any process starts
    "train": 5,                    # the worker's training loop and its parts
    "evaluate": 6, "jobs": 6,      # a trained checkpoint in use; Slurm jobs
    "worker": 7,                   # python -m heft.launcher.worker
    "lm_eval_model": 7,            # the public import path of evaluate/lm_eval_model.py
    "cli": 8,                      # heft
}


@dataclass(frozen=True)
class Import:
    source: str        # the importing module, dotted (heft.launcher.train.loop)
    target: str        # the imported heft module, dotted
    file: Path
    line: int
    type_only: bool    # under `if TYPE_CHECKING:`: never executed


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["heft", *parts])


def heft_modules() -> dict[str, Path]:
    return {module_name(p): p for room in TOP_LEVELS for p in (REPO / room).rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """A heft module named by an import (`from heft.launcher.checkpoint import files` names
    heft.launcher.checkpoint.files), or None for anything outside heft."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: dict[str, Path], source: str | None = None) -> list[Import]:
    source = source or module_name(path)
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_type_only = type_only or (isinstance(child, ast.If) and _is_type_checking(child))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{alias.name}" for alias in child.names]
            for name in names:
                if name.startswith("heft."):
                    target = _resolve(name, modules)
                    if target and target != source:
                        found.append(Import(source, target, path, child.lineno, child_type_only))
            visit(child, child_type_only)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def room_and_level(module: str) -> tuple[str, int] | None:
    """("launcher.train", 5), ("model", 1), ...; None for modules outside the rules (heft.slurm)."""
    parts = module.split(".")[1:]
    if not parts or parts[0] not in TOP_LEVELS:
        return None
    if parts[0] != "launcher":
        return parts[0], TOP_LEVELS[parts[0]]
    if len(parts) == 1:
        return None  # the launcher package itself (its __init__ is empty)
    return f"launcher.{parts[1]}", LAUNCHER_LEVELS[parts[1]]


def layering_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        source, target = room_and_level(imp.source), room_and_level(imp.target)
        if source is None or target is None or source[0] == target[0]:
            continue
        (source_room, source_level), (target_room, target_level) = source, target
        top_source, top_target = source_room.split(".")[0], target_room.split(".")[0]
        if top_source != top_target:  # between top-level rooms, by their levels
            source_level, target_level = TOP_LEVELS[top_source], TOP_LEVELS[top_target]
        if target_level >= source_level:
            way = "sideways" if target_level == source_level else "upward"
            where = imp.file.relative_to(REPO) if imp.file.is_relative_to(REPO) else imp.file
            bad.append(f"{where}:{imp.line}: {source_room} (level {source_level}) "
                       f"imports {imp.target} ({target_room}, level {target_level}): {way}")
    return bad


def import_cycles(imports: list[Import]) -> list[str]:
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.type_only:
            graph.setdefault(imp.source, set()).add(imp.target)
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return cycles


def all_imports() -> list[Import]:
    modules = heft_modules()
    return [imp for path in modules.values() for imp in imports_of(path, modules)]


def test_every_import_runs_downward_and_none_is_circular():
    imports = all_imports()
    assert len(imports) > 150  # the parser sees heft's imports (function-local ones too)
    problems = layering_violations(imports) + [f"import cycle: {c}" for c in import_cycles(imports)]
    assert not problems, "\n".join(problems)


def test_every_launcher_room_has_a_level():
    rooms = {p.name for p in (REPO / "launcher").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in (REPO / "launcher").glob("*.py") if p.stem != "__init__"}
    assert rooms | modules == set(LAUNCHER_LEVELS), "give each new room or module a level here"


def test_the_checker_finds_upward_sideways_and_circular_imports(tmp_path):
    """The rules applied to planted imports (the real tree is checked above)."""
    modules = {name: tmp_path for name in ("heft.launcher.config", "heft.launcher.train.loop",
                                           "heft.launcher.jobs.status", "heft.launcher.evaluate.heldout",
                                           "heft.model.build", "heft.data.loader", "heft.launcher.launch.agent")}
    planted = tmp_path / "planted.py"
    def imp(source, target, type_only=False):
        return Import(source, target, planted, 7, type_only)
    found = layering_violations([
        imp("heft.launcher.config", "heft.launcher.train.loop"),             # upward
        imp("heft.launcher.jobs.status", "heft.launcher.evaluate.heldout"),  # sideways
        imp("heft.model.build", "heft.launcher.config"),                     # a library importing the app
        imp("heft.launcher.train.loop", "heft.launcher.config"),             # fine: downward
        imp("heft.launcher.train.loop", "heft.data.loader"),                 # fine
    ])
    assert len(found) == 3 and all("planted.py:7" in line for line in found), found
    assert "upward" in found[0] and "sideways" in found[1] and "upward" in found[2]
    cycle = [imp("heft.launcher.train.loop", "heft.launcher.launch.agent"),
             imp("heft.launcher.launch.agent", "heft.launcher.train.loop")]
    assert import_cycles(cycle)
    assert not import_cycles([cycle[0], imp("heft.launcher.launch.agent", "heft.launcher.train.loop", type_only=True)])
    # A planted file is parsed like heft's own: function-local and TYPE_CHECKING imports count.
    planted.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from heft.model import build\n"
                       "def f():\n    import heft.data.loader\n")
    parsed = imports_of(planted, modules, source="heft.launcher.planted")
    assert {(i.target, i.type_only, i.line) for i in parsed} == {("heft.model.build", True, 3),
                                                                 ("heft.data.loader", False, 5)}


@pytest.mark.slow
def test_the_wheel_ships_every_room_and_the_public_entry_points(heft_wheel, tmp_path):
    """`pip wheel .`, then each room imported from the wheel alone (no editable install in sight)."""
    wheel = heft_wheel
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
        entry_points = archive.read(next(n for n in archive.namelist() if n.endswith("entry_points.txt")))
    assert b"heft = heft.launcher.cli:run" in entry_points
    rooms = sorted(p.name for p in (REPO / "launcher").iterdir() if (p / "__init__.py").is_file())
    site_packages = next(p for p in map(Path, sys.path) if p.name == "site-packages")
    # -S: no site-packages .pth files, so the editable install's finder stays out; the wheel's
    # files come first, the dependencies from this environment's site-packages.
    script = ("import heft.launcher.cli, heft.launcher.worker, heft.launcher.lm_eval_model, heft.slurm, sys\n"
              f"for room in {rooms!r}:\n"
              "    __import__('heft.launcher.' + room)\n"
              "assert heft.launcher.cli.__file__.startswith(sys.argv[1]), heft.launcher.cli.__file__\n"
              "from importlib import resources\n"
              "assert resources.files('heft.slurm').joinpath('heft.sbatch.j2').is_file()\n"
              "print('imported', len(sys.argv))\n")
    done = subprocess.run([sys.executable, "-S", "-c", script, str(unpacked)], capture_output=True, text=True,
                          env={"PYTHONPATH": f"{unpacked}:{site_packages}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-3000:]
    worker = subprocess.run([sys.executable, "-S", "-m", "heft.launcher.worker"], capture_output=True, text=True,
                            env={"PYTHONPATH": f"{unpacked}:{site_packages}", "PATH": "/usr/bin:/bin"})
    assert worker.returncode == 2 and "usage: python -m heft.launcher.worker" in worker.stderr, worker.stderr[-3000:]
