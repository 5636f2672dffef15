"""``dnd.describe``: the pipeline, then the run's HTML report, as ``dnd describe`` does.

The pipeline (:mod:`dnd.pipeline`) writes records, labels and work counts and knows
nothing of reports; the report (:mod:`dnd.report`) renders what a run saved and knows
nothing of the pipeline. The apps join them: the command line's ``describe`` and the
package's ``dnd.describe`` are this function.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dnd.backends.factory import Models
from dnd.config import RunConfig
from dnd.pipeline import RunResult
from dnd.pipeline import describe as describe_units
from dnd.probe import ProbeSet
from dnd.target import Target

log = logging.getLogger(__name__)


def describe(config: RunConfig, run_dir: str | Path, *, target: Target | None = None,
             probe: ProbeSet | None = None, models: Models | None = None,
             progress: bool = True, retry_failed: bool = False, wait: bool = False
             ) -> RunResult:
    """Describe units of one or several layers into ``run_dir`` (the run keeps every
    unit's record, ``labels.csv`` and ``work.json``) and, when the run went to its last
    stage (``stop_after: labels``), write its report (``report/index.html``). A re-run
    resumes.

    ``target``, ``probe`` and ``models`` may be passed in (otherwise built from the
    config); ``retry_failed`` redoes units that failed in an earlier run; ``wait`` waits
    for another process using ``run_dir`` instead of failing. See
    :func:`dnd.pipeline.describe`; the run directory's lock is held until the report is
    written. Returns a :class:`dnd.pipeline.RunResult` (``units``, ``done_now``,
    ``failed``, ``activations``, or per layer ``layers``).
    """
    return describe_units(config, run_dir, target=target, probe=probe, models=models,
                          progress=progress, retry_failed=retry_failed, wait=wait,
                          finished=_write_report if config.stop_after == "labels" else None)


def _write_report(result: RunResult) -> None:
    """Refresh the run's HTML report; a report problem never fails a finished run."""
    from dnd.report import build_report

    try:
        path = build_report(result.run_dir)
        log.info("report: %s", path)
    except Exception as e:  # noqa: BLE001 - the labels are safe on disk either way
        log.warning("could not build the report of %s: %s", result.run_dir, e)
