"""The shape of the code: every module imports on its own, no import cycles, the layer rules hold,
and the objectives' registry is the only list of methods."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "trainer", "launchers")  # installed as advdit.models, advdit.trainer, ...
# Loaded once before the forks, so each child pays only for advdit's own modules.
THIRD_PARTY = ("torch", "numpy", "scipy", "PIL", "yaml", "safetensors", "tqdm", "accelerate", "timm",
               "mlflow", "diffusers", "transformers", "matplotlib", "torch_fidelity", "braceexpand")


def module_files() -> dict[str, Path]:
    """advdit module name -> file, for every module of the three packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(["advdit", *parts])] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The advdit modules ``name`` imports anywhere in its file (also inside functions), except
    under ``if TYPE_CHECKING``; ``from X import y`` counts y when y is itself a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if _is_package(path) else name.rsplit(".", 1)[0]
    found: set[str] = set()
    type_checking = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, "id", None) == "TYPE_CHECKING"
                     for stmt in block.body for node in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base in known:
                found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path whose first and last entries are the same module, or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], node, target] if target in stack else [node, target]
            if target not in state and (cycle := visit(target, [*stack, node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "advdit.trainer.objectives.ddgan" in graph  # the walk found the packages' modules
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_layers_models_never_import_trainer_or_launchers() -> None:
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("advdit.models"):
            assert not {t for t in targets if not t.startswith("advdit.models")}, name
        if name.startswith("advdit.trainer"):
            assert not {t for t in targets if t.startswith("advdit.launchers")}, name


def test_every_module_imports_on_its_own() -> None:
    """Each module in a fresh advdit state: forked children of one process that has loaded the
    third-party libraries (loading them 60 times would take minutes), each importing one module."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork to give each import a fresh advdit state")
    names = sorted(module_files())
    script = (
        "import os, sys, importlib\n"
        f"for lib in {THIRD_PARTY!r}:\n"
        "    try:\n"
        "        importlib.import_module(lib)\n"
        "    except ImportError:\n"
        "        pass\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except BaseException as err:\n"
        "            print(f'{name}: {type(err).__name__}: {err}', flush=True)\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    if os.waitpid(pid, 0)[1] != 0:\n"
        "        failed.append(name)\n"
        "print('FAILED', failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED []" in done.stdout


def test_the_registry_and_the_config_name_the_same_objectives() -> None:
    from typing import get_args

    from advdit.trainer.config import METHOD_SECTIONS, Objective
    from advdit.trainer.objectives import OBJECTIVES

    assert set(OBJECTIVES) == set(get_args(Objective))
    for name, cls in OBJECTIVES.items():
        assert cls.name == name and all(isinstance(attr, str) for attr in cls.adversary_names)
    # Each method declares the sections it reads; the config refuses them for the others.
    declared = {section: {name for name, cls in OBJECTIVES.items() if section in cls.config_sections}
                for cls in OBJECTIVES.values() for section in cls.config_sections}
    assert declared == {section: set(owners) for section, owners in METHOD_SECTIONS.items()}
