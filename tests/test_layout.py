"""The layout's rules, read from the code: which library each room may import, imports pointing one way,
no cycle (not even through an import inside a function), no module grown past about 400 lines, and a CLI whose help loads no heavy library."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aetrack"
MODULES = {(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)).removesuffix(".__init__"): path
           for path in sorted(PACKAGE.rglob("*.py"))}
HEAVY = ("torch", "torchvision", "mlflow", "sklearn", "matplotlib", "optuna")

# Who may import a third-party library (anywhere in the module, also inside a function).
ONLY_IN = {"click": ("aetrack.cli",), "optuna": ("aetrack.tuning",),
           "mlflow": ("aetrack.tracking", "aetrack.serving", "aetrack.tuning", "aetrack.cli")}
# Imports point one way: a module imports only modules of its own rank or lower.
# (The registry, aetrack.models, is light and low; the variants in its package sit above the building blocks.)
RANKS = {"aetrack": 0, "aetrack.memory": 0, "aetrack.config": 0, "aetrack.evaluation_settings": 0, "aetrack.models": 1,
         **{f"aetrack.{block}": 2 for block in ("data", "losses", "nets", "priors", "penalties", "samplers", "images",
                                                "modelio", "checkpoints")},
         "aetrack.models.*": 3, "aetrack.training": 4, "aetrack.evaluation.*": 5, "aetrack.serving.*": 6,
         "aetrack.tracking.*": 7, "aetrack.tuning.*": 8, "aetrack.cli.*": 9, "aetrack.__main__": 10}


def rank(module: str) -> int:
    if module in RANKS:
        return RANKS[module]
    for prefix, value in RANKS.items():
        if prefix.endswith(".*") and (module == prefix[:-2] or module.startswith(prefix[:-1])):
            return value
    raise AssertionError(f"{module} has no place in the layout")


def imports(path: Path, known: dict[str, Path] = MODULES) -> set[str]:
    """Every module `path` imports, anywhere in it; `from a import b` names `a.b` too where `a.b` is `known`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known}
    return found


def inside(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_library_is_imported_only_by_its_rooms(module):
    used = {name.split(".")[0] for name in imports(MODULES[module])}
    for library, rooms in ONLY_IN.items():
        assert library not in used or inside(module, rooms), f"{module} imports {library}; only {rooms} may"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    for imported in imports(MODULES[module]):
        if imported.startswith("aetrack.") or imported == "aetrack":
            target = imported if imported in MODULES else imported.rsplit(".", 1)[0]
            assert rank(target) <= rank(module), f"{module} imports {imported}, a room above it"
            assert not inside(target, ("aetrack.cli",)) or inside(module, ("aetrack.cli", "aetrack.__main__")), \
                f"{module} imports the CLI"


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Who imports whom among `modules`: every import, at the top, inside a function or under TYPE_CHECKING
    (an import put off into a function still ties the two modules together). A module's import of its own
    package's __init__ is left out: importing a submodule runs that __init__ first anyway."""
    graph = defaultdict(set)
    for module, path in modules.items():
        for imported in imports(path, modules):
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target in modules and target != module and not (module.startswith(target + ".")
                                                                and modules[target].name == "__init__.py"):
                graph[module].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module, sorted: the modules that import one another."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(groups)


def test_no_import_cycle_not_even_inside_a_function():
    cycles = import_cycles(import_graph(MODULES))
    assert cycles == [], "modules that import one another: " + "; ".join(" <-> ".join(group) for group in cycles)


def test_an_import_cycle_made_inside_a_function_is_found(tmp_path):
    """The check itself: two modules that import each other only inside functions (one of them under
    TYPE_CHECKING) are a cycle; a module importing its package's __init__ is not."""
    files = {"pkg": "from pkg import a\n", "pkg.a": "def f():\n    from pkg.b import g\n    return g()\n",
             "pkg.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n\ndef g():\n    return 1\n",
             "pkg.c": "def h():\n    from pkg import a\n"}
    modules = {}
    for name, text in files.items():
        path = tmp_path / (name.replace(".", "/") + ("/__init__.py" if name == "pkg" else ".py"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        modules[name] = path
    assert import_cycles(import_graph(modules)) == [["pkg.a", "pkg.b"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_much_over_400_lines(module):
    assert len(MODULES[module].read_text().splitlines()) <= 420


def run_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["tune", "--help"], ["study", "--list"]])
def test_help_loads_no_heavy_library(args):
    loaded = run_python(f"""
import contextlib, io, json, sys
from aetrack.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({args!r})
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
""")
    assert loaded == [], f"aetrack {' '.join(args)} imported {loaded}"


def test_a_usage_error_loads_no_heavy_library():
    loaded = run_python(f"""
import contextlib, io, json, sys
from aetrack.cli import main
with contextlib.redirect_stderr(io.StringIO()):
    try:
        main(["train", "--model", "ae", "--prior", "mog"])
    except SystemExit as exit:
        assert exit.code == 2, exit.code
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
""")
    assert loaded == []


def test_library_modules_import_with_click_and_optuna_blocked():
    """Every module outside cli/ and tuning/ imports (with torch, MLflow, ...) while aetrack may not import
    click or Optuna; MLflow itself still may."""
    library = sorted(m for m in MODULES if not inside(m, ("aetrack.cli", "aetrack.tuning")) and m != "aetrack.__main__"
                     and not m.endswith(("pyfunc_model", "reference_model")))  # entry files: they build a model
    result = run_python(f"""
import builtins, importlib, json
real_import = builtins.__import__

def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {{}}).get("__name__", "")
    if name.split(".")[0] in ("click", "optuna") and importer.startswith("aetrack"):
        raise ImportError(f"{{importer}} imports {{name}}")
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = guarded
for name in {library!r}:
    importlib.import_module(name)
print(json.dumps("ok"))
""")
    assert result == "ok"


def test_the_variant_declarations_match_the_registered_classes():
    from aetrack.models import _CLASSES, REGISTRY, build_model
    from aetrack.config import TrainConfig

    for name, variant in REGISTRY.items():
        assert variant.classifies == callable(getattr(variant.cls, "classify", None)), name
        assert variant.generative == callable(getattr(variant.cls, "sample", None)), name
        if not variant.stacked:  # a stacked one loads the model it is built on: tests/test_models.py gives it one
            assert isinstance(build_model(TrainConfig(model=name, hidden=(8,), latent_dim=2), (1, 8, 8), 10), variant.cls)
    assert set(_CLASSES) == set(REGISTRY)
