"""dnd: Describe-and-Dissect, plain-language descriptions of the units of vision networks.

Entry points, at the package top (each is imported on first use, so ``import dnd`` stays
fast and loads neither torch nor pandas):

- ``dnd.load_config(path=None, overrides=None, preset=None)`` (``dnd.config.load_config``):
  a validated ``RunConfig`` from a YAML file and/or a shipped preset (``"paper"``,
  ``"toyworld"``), with ``overrides`` such as ``{"model": "resnet50", "layer": "layer4",
  "units": "0-31", "probe": ["/data/probe"]}``.
- ``dnd.describe(config, run_dir, target=None)`` (``dnd.api.describe``): describe
  units of one or several layers; the run directory keeps every unit's record,
  ``labels.csv`` and ``report/index.html``, and a re-run resumes. Returns a ``RunResult``
  (``units``, ``done_now``, ``failed``, ``activations``).
- ``dnd.open_run(run_dir)`` (``dnd.run.open_run``): a finished or partial run, read-only:
  ``run.labels()`` as a pandas DataFrame, ``run.unit(layer, unit)`` a typed
  ``UnitRecord``, ``run.work``, ``run.config``. In Jupyter a run shows as a table with
  thumbnails and a unit as its report card (images embedded, no server).
- ``dnd.Target`` (``dnd.target.Target``): the network to describe with its own
  preprocessing; ``Target.from_module(module, dnd.Preprocess(...), name=...)`` wraps any
  ``nn.Module``, ``dnd.load_target(name)`` loads a named one (``dnd models`` lists them).
- ``dnd.explain_image(run_dir, image_path, layer=None)`` (``dnd.explain.explain``): one
  image explained with the run's labels, written as a page under ``<run>/explain/``.
- ``dnd.featurevis_run(run_dir, units=None, layer=None)``
  (``dnd.featurevis.featurevis_run``): feature visualizations of a run's units.
- ``dnd.build_report(run_dir)`` (``dnd.report.build_report``): rebuild a run's static
  HTML report.

Example::

    import dnd

    config = dnd.load_config(preset="toyworld", overrides={"units": "0-7",
                                                           "probe": ["toyworld:300"]})
    dnd.describe(config, "runs/quickstart")
    run = dnd.open_run("runs/quickstart")
    run.labels()          # a DataFrame: unit, Label 1-3, score, interpretability, ...
    run.unit("fc", 3)     # in a notebook: the unit's report card

The command line (``dnd describe``, ``dnd demo``, ``dnd report``, ``dnd --help``) wraps the
same functions.
"""

import importlib

__version__ = "0.1.0"

# Not typing.TYPE_CHECKING: importing typing would add milliseconds to `import dnd`. Type
# checkers treat a name TYPE_CHECKING as true, so they and IDEs see the real objects.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from dnd import explain as explain
    from dnd import featurevis as featurevis
    from dnd import report as report
    from dnd.api import describe
    from dnd.config import RunConfig, load_config
    from dnd.explain import explain as explain_image
    from dnd.featurevis import featurevis_run
    from dnd.record import UnitRecord
    from dnd.report import build_report
    from dnd.run import Run, open_run
    from dnd.target import Preprocess, Target, load_target

# Public name -> (module, attribute). Resolved by __getattr__ on first use: dnd.api
# pulls in torch, transformers and friends (seconds), which `import dnd` must not pay for.
# explain() and featurevis_run() get names of their own: `dnd.explain` and `dnd.featurevis`
# are submodules, and the import system rebinds a package attribute to its submodule when
# that is first imported, so a function under the same name would turn into the module
# depending on import order.
_EXPORTS: dict[str, tuple[str, str]] = {
    "describe": ("dnd.api", "describe"),
    "load_config": ("dnd.config", "load_config"),
    "RunConfig": ("dnd.config", "RunConfig"),
    "Target": ("dnd.target", "Target"),
    "Preprocess": ("dnd.target", "Preprocess"),
    "load_target": ("dnd.target", "load_target"),
    "open_run": ("dnd.run", "open_run"),
    "Run": ("dnd.run", "Run"),
    "UnitRecord": ("dnd.record", "UnitRecord"),
    "explain_image": ("dnd.explain", "explain"),
    "featurevis_run": ("dnd.featurevis", "featurevis_run"),
    "build_report": ("dnd.report", "build_report"),
}
# Submodules `dnd.<name>` reaches without an import statement (same as after one).
_SUBMODULES = ("explain", "featurevis", "report")

__all__ = ["Preprocess", "Run", "RunConfig", "Target", "UnitRecord", "__version__",
           "build_report", "describe", "explain_image", "featurevis_run", "load_config",
           "load_target", "open_run"]  # the names of _EXPORTS (a test checks)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'dnd' has no attribute {name!r}")


def __dir__() -> list[str]:
    dunders = {n for n in globals() if n.startswith("__")}
    return sorted({*dunders, *__all__, *_SUBMODULES})
