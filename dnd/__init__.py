"""dnd: Describe-and-Dissect, plain-language descriptions of the units of vision networks.

Entry points:

- ``dnd.pipeline.describe(config, run_dir, target=None)``: describe units of one layer;
  the run directory keeps every unit's record, ``labels.csv`` and ``report/index.html``,
  and a re-run resumes. Returns a ``RunResult`` (``units``, ``done_now``, ``failed``).
- ``dnd.config.load_config(path=None, overrides=None, preset=None)``: a validated
  ``RunConfig`` from a YAML file and/or a shipped preset (``"paper"``, ``"toyworld"``),
  with ``overrides`` such as ``{"model": "resnet50", "layer": "layer4", "units": "0-31",
  "probe": ["/data/probe"]}``.
- ``dnd.target.Target``: the network to describe with its own preprocessing;
  ``Target.from_module(module, Preprocess(...), name=...)`` wraps any ``nn.Module``,
  ``dnd.target.load_target(name)`` loads a named one (``dnd models`` lists them).
- ``dnd.report.build_report(run_dir)``: rebuild a run's static HTML report.

Example::

    from dnd.config import load_config
    from dnd.pipeline import describe

    config = load_config(preset="toyworld", overrides={"layer": "fc", "units": "0-3",
                                                       "probe": ["toyworld:200"]})
    result = describe(config, "runs/toy-fc")

The command line (``dnd describe``, ``dnd demo``, ``dnd report``, ``dnd --help``) wraps the
same functions.
"""

__version__ = "0.1.0"
