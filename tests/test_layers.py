"""The package's layering, read from the source: which modules may import which.

- Only the apps layer (the CLI, the benches, the paper tables, the toy world itself) imports
  ``dnd.toyworld``; everything below reaches the toy world through the registries, which
  load it as a plug-in (``dnd/plugins.py``).
- Backends import no stage and not the pipeline; stages do not import the pipeline.

Imports are found with ``ast`` (deferred imports inside functions included, relative ones
resolved, ``importlib.import_module("...")`` with a literal name too), so nothing is run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dnd"

# dnd.textvis: `dnd featurevis`'s text part, whose multimodal check renders toy-world scenes
# and whose toy-CLIP vocabulary comes from the toy world's captions.
APPS_LAYER = {"dnd.cli", "dnd.bench", "dnd.bench_paper", "dnd.bench_ray",
              "dnd.evaluation.tables", "dnd.textvis"}


def module_name(path: Path) -> str:
    """``dnd/stages/crop.py`` -> ``dnd.stages.crop``; a package's ``__init__`` -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``source``, the module ``module``.

    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from the module's package
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            found.append((node.lineno, node.args[0].value))
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _modules() -> list[tuple[str, Path]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 30, f"found only {len(paths)} modules under {PACKAGE}"
    return [(module_name(p), p) for p in paths]


def violations(importer: str, forbidden: str, exempt=lambda module: False) -> list[str]:
    """'file:line imports X' for each module inside ``importer`` (not ``exempt``) that
    imports ``forbidden`` or one of its submodules."""
    out = {}  # one per import statement
    for module, path in _modules():
        if not _within(module, importer) or exempt(module):
            continue
        source = path.read_text(encoding="utf-8")
        for line, name in imports_of(source, module, path.name == "__init__.py"):
            if _within(name, forbidden):
                out.setdefault((str(path.relative_to(ROOT)), line), name)
    return [f"{file}:{line} imports {name}" for (file, line), name in sorted(out.items())]


def _apps_layer(module: str) -> bool:
    return module in APPS_LAYER or _within(module, "dnd.toyworld")


def test_only_the_apps_layer_imports_the_toy_world():
    found = violations("dnd", "dnd.toyworld", exempt=_apps_layer)
    assert found == [], ("below the apps layer, reach the toy world through the registries "
                         "(it is a plug-in, dnd/toyworld/plugin.py):\n" + "\n".join(found))


@pytest.mark.parametrize("forbidden", ["dnd.stages", "dnd.pipeline"])
def test_backends_import_no_stage_and_not_the_pipeline(forbidden):
    found = violations("dnd.backends", forbidden)
    assert found == [], "backends sit below the stages:\n" + "\n".join(found)


def test_stages_do_not_import_the_pipeline():
    found = violations("dnd.stages", "dnd.pipeline")
    assert found == [], "the pipeline composes the stages, not the reverse:\n" + "\n".join(found)


def test_the_apps_layer_modules_exist():
    """A renamed apps-layer module would silently widen the exemption."""
    names = {m for m, _ in _modules()}
    assert APPS_LAYER <= names, sorted(APPS_LAYER - names)


def test_the_import_scanner_sees_every_form():
    source = "\n".join([
        "import dnd.toyworld.render as r",
        "from dnd import toyworld",
        "from ..toyworld import clip",
        "from . import backends",
        "def f():",
        "    from dnd.toyworld.target import ToyCNN",
        "    importlib.import_module('dnd.toyworld.plugin')",
        "import dnd.toyworldly",  # a different package: only its exact name is reported
    ])
    found = imports_of(source, "dnd.stages.crop")
    hits = [(line, n) for line, n in found if _within(n, "dnd.toyworld")]
    assert hits == [(1, "dnd.toyworld.render"), (2, "dnd.toyworld"), (3, "dnd.toyworld"),
                    (3, "dnd.toyworld.clip"), (6, "dnd.toyworld.target"),
                    (6, "dnd.toyworld.target.ToyCNN"), (7, "dnd.toyworld.plugin")]
    assert (4, "dnd.stages.backends") in found  # '.' is the module's own package
    # In a package's __init__, '.' is the package itself.
    assert (1, "dnd.backends.base") in imports_of("from .base import X", "dnd.backends",
                                                  is_package=True)
