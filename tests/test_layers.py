"""The import contract: dnd's layers, read from the code's own imports.

pyproject.toml holds the contract (``[tool.importlinter]``): a ``layers`` contract listing
every module and package of ``dnd`` from the top layer down (imports point down only) and an
``independence`` contract for the apps and the toy-world plug-in (none imports another).
import-linter checks it on grimp's import graph, which reads every import statement of the
source, deferred imports inside functions and ``TYPE_CHECKING`` imports included, so nothing
is run. Besides the contract: the graph has no import cycles at all (also within a layer),
nothing imports the package root (its lazy ``__getattr__`` is for users), and the README's
Architecture table names the contract's layers, in order, with the same modules.

The same counts, on any checkout: ``upward_imports`` and ``import_cycles`` below.
"""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path

import grimp
import pytest
from importlinter import api as _importlinter_api  # noqa: F401 - configures import-linter
from importlinter.application.use_cases import lint_imports

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli, the same parser
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
PACKAGE = "dnd"


def _contracts() -> list[dict]:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]


def contract_layers() -> list[list[str]]:
    """The layers contract's layers, top first, each a list of module names (``dnd.cli``)."""
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    return [[f"{PACKAGE}.{m.strip()}" for m in re.split(r"[:|]", layer)]
            for layer in layers["layers"]]


@cache
def _graph() -> grimp.ImportGraph:
    # The same graph import-linter builds: this checkout's package, every import statement.
    sys.path.insert(0, str(ROOT))
    try:
        return grimp.build_graph(PACKAGE, cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))


def _layer_of(module: str, layers: list[list[str]]) -> int | None:
    for i, names in enumerate(layers):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def upward_imports(graph: grimp.ImportGraph, layers: list[list[str]]) -> list[str]:
    """Every direct import from a layer to a higher one (``a:line -> b``), and every import
    of a module in no layer: the contract's own count of imports against the layers."""
    out = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            low, high = _layer_of(importer, layers), _layer_of(imported, layers)
            if importer == PACKAGE:
                continue  # the package root: lazy public names, above every layer
            if low is None or high is None or high < low:
                for d in graph.get_import_details(importer=importer, imported=imported):
                    out.append(f"{importer}:{d['line_number']} -> {imported}")
    return out


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)
    succ = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return sorted(cycles)


def test_the_import_contract_is_kept():
    """``lint-imports`` on pyproject.toml's contracts; on failure its report (above the
    assertion, in the captured output) names every broken import chain, line by line."""
    sys.path.insert(0, str(ROOT))
    try:
        kept = lint_imports(config_filename=str(PYPROJECT), cache_dir=None, no_logo=True)
    finally:
        sys.path.remove(str(ROOT))
    assert kept, "the import contract is broken: see import-linter's report above"


def test_no_upward_imports_by_the_contracts_count():
    found = upward_imports(_graph(), contract_layers())
    assert found == [], f"{len(found)} import(s) against the layers:\n" + "\n".join(found)


def test_no_import_cycles():
    cycles = import_cycles(_graph())
    assert cycles == [], "import cycles:\n" + "\n".join(", ".join(c) for c in cycles)


def test_nothing_imports_the_package_root():
    """``dnd/__init__.py`` resolves its public names on first use; a module that imports
    the root would import, through it, whatever a user touched first."""
    graph = _graph()
    found = sorted(graph.find_modules_that_directly_import(PACKAGE))
    assert found == [], found


def readme_layers() -> list[list[str]]:
    """The Architecture section's layer table: per row, its modules (``cli.py`` ->
    ``dnd.cli``, ``report/`` -> ``dnd.report``), top row first."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("| layer | modules |", 1)[1].split("\n\n", 1)[0]
    out = []
    for row in table.splitlines()[2:]:  # after the header's rest and the rule
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`([\w/]+?)(?:\.py|/)`", cells[1])
        out.append([f"{PACKAGE}.{n.replace('/', '.')}" for n in names])
    return out


def test_the_readme_layer_table_is_the_contract():
    assert [sorted(r) for r in readme_layers()] == [sorted(la) for la in contract_layers()]


def test_no_import_hides_from_the_graph():
    """An import by a computed name (``importlib.import_module``) is a dependency the graph
    cannot see: only the package root (its lazy public names) and the benchmarks' command
    table (names inside the benchmarks package) use one."""
    import ast

    from dnd.benchmarks.cli import TOY_TABLE_BENCHES

    found = set()
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(
                    node.func, "attr", getattr(node.func, "id", None)) in ("import_module",
                                                                         "__import__"):
                found.add(path.relative_to(ROOT).as_posix())
    assert found == {"dnd/__init__.py", "dnd/benchmarks/cli.py"}, found
    assert all(spec.startswith("dnd.benchmarks.") for spec, _ in TOY_TABLE_BENCHES.values())


def test_the_checks_see_every_form_of_import(tmp_path):
    """Deferred and TYPE_CHECKING imports are in the graph; a cycle through a function-level
    import and an upward import inside a function are both found."""
    pkg = tmp_path / "layered_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from layered_pkg import low\n")
    (pkg / "low.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from layered_pkg.mid import M\n"
        "def f():\n    from layered_pkg import top\n")
    (pkg / "mid.py").write_text("import layered_pkg.low\n")
    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph("layered_pkg", cache_dir=None)
    finally:
        sys.path.remove(str(tmp_path))
    layers = [["layered_pkg.top"], ["layered_pkg.mid"], ["layered_pkg.low"]]
    assert import_cycles(graph) == [["layered_pkg.low", "layered_pkg.mid", "layered_pkg.top"]]
    assert upward_imports(graph, layers) == ["layered_pkg.low:3 -> layered_pkg.mid",
                                             "layered_pkg.low:5 -> layered_pkg.top"]


@pytest.mark.parametrize("name", ["dnd.toyworld", "dnd.benchmarks"])
def test_only_the_layers_above_import_the_plugin_and_the_benchmarks(name):
    """The toy world is a plug-in (the registries load it, dnd/toyworld/plugin.py) and the
    benchmarks are apps: only the benchmarks and the command line import them."""
    graph = _graph()
    importers = {m for m in graph.find_modules_that_directly_import(name, as_package=True)
                 if not (m == name or m.startswith(name + "."))}
    allowed = ("dnd.cli", "dnd.benchmarks")
    assert sorted(m for m in importers if not m.startswith(allowed)) == []
