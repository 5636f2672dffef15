"""The DnD pipeline over all requested units of a layer, resumable through the run store.

Stages: activations (one pass over the probing set), then the per-unit stages, each an
object with one contract (:mod:`dnd.stages.base`): crops (Step 1), captions (Step 2.1),
candidates (Steps 2.2-2.4), labels (Step 3). Units go through in chunks; within a chunk each
stage runs for all its units at once (batched, deduplicated), and every unit's record
(:class:`dnd.record.UnitRecord`) is written as soon as a stage finishes, so a crash loses
at most one stage of one chunk and a re-run continues where it stopped. Every model is
loaded once, before the heavy work.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from dnd import preflight
from dnd.activations import LayerActivations, compute_activations
from dnd.backends.base import resolve_device
from dnd.backends.factory import Models, load_llm, load_models
from dnd.config import RunConfig, parse_units
from dnd.probe import ProbeSet, open_probe
from dnd.record import STAGES, UnitRecord
from dnd.stages.base import RunContext, Stage
from dnd.store import RunLock, RunStore
from dnd.target import Target, load_target, num_units
from dnd.work import Work, count_models, counting_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a run did. ``units``: every requested unit, each in exactly one of
    ``done_now`` (finished in this run), ``already_done`` (finished by an earlier run) and
    ``failed`` (unit -> reason; ``failed_before`` lists those that failed in an earlier run
    and were left alone, as ``retry_failed`` was not set)."""

    run_dir: Path
    units: list[int]
    done_now: list[int]
    failed: dict[int, str]
    activations: LayerActivations
    n_unreadable: int
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds, this run
    already_done: list[int] = field(default_factory=list)
    failed_before: list[int] = field(default_factory=list)
    work: Work = field(default_factory=Work)  # what this run asked of the models (dnd.work)


def describe(config: RunConfig, run_dir: str | Path, *, target: Target | None = None,
             probe: ProbeSet | None = None, models: Models | None = None,
             progress: bool = True, retry_failed: bool = False, wait: bool = False
             ) -> RunResult:
    """Run the pipeline up to ``config.stop_after`` for ``config.units`` of ``config.layer``.

    ``target``, ``probe`` and ``models`` may be passed in (Python API, tests); otherwise they
    are built from the config. Every input check happens before the pass over the probe.
    Units that failed in an earlier run are left alone unless ``retry_failed``: then they
    are redone from the stage that failed.

    The run directory is held for the whole call (:class:`dnd.store.RunLock`): if another
    process is using it, this raises :class:`dnd.store.RunDirBusy` naming that process, or
    with ``wait`` waits for it to finish.
    """
    with RunLock(run_dir, wait=wait):
        return _describe(config, run_dir, target=target, probe=probe, models=models,
                         progress=progress, retry_failed=retry_failed)


def _describe(config: RunConfig, run_dir: str | Path, *, target: Target | None,
              probe: ProbeSet | None, models: Models | None, progress: bool,
              retry_failed: bool) -> RunResult:
    """:func:`describe`, with the run directory held."""
    # 1. Cheap checks first: devices and every model's files (before any is loaded), run
    #    dir, API key, model, layer, unit range, probing set.
    preflight.check_run(config, target=target, models=models)
    store = RunStore(run_dir)
    store.check(config)
    llm = load_llm(config) if models is None else None
    device = resolve_device(config.device)
    target = target or load_target(config.model, config.weights)
    target.to(device)
    target.layer(config.layer)
    units = parse_units(config.units, num_units(target, config.layer))
    probe = probe or open_probe(config.probe)
    if probe.skipped:
        log.warning("skipped %d non-image file(s) in the probing set, e.g. %s",
                    len(probe.skipped), probe.skipped[0][0])
    models = models or load_models(config, device, llm)
    store.save_config(config)
    work = Work()
    with counting_target(target, work):
        return _run(config, store, target, probe, count_models(models, work), units,
                    progress, retry_failed, work)


def _run(config: RunConfig, store: RunStore, target: Target, probe: ProbeSet,
         models: Models, units: list[int], progress: bool, retry_failed: bool,
         work: Work) -> RunResult:
    """Steps 2-3 of :func:`_describe`: everything checked and loaded, models counted."""
    invocation = {"id": uuid.uuid4().hex[:12],
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "layer": config.layer}

    def save_work(units_processed: int) -> None:
        store.save_work({**invocation, "units_processed": units_processed,
                         "work": work.to_dict(),
                         "per_unit": {k: round(v, 3)
                                      for k, v in work.per_unit(units_processed).items()}})

    # 2. One pass over the probing set (or a matching cached one).
    started = time.perf_counter()
    acts = activation_pass(config, store, target, probe, progress)
    seconds = {"activations": time.perf_counter() - started}
    n_bad = int((~acts.valid).sum())
    if config.stop_after == "activations":
        save_work(0)
        return RunResult(store.root, units, [], {}, acts, n_bad, seconds, work=work)
    # 3. The per-unit stages, chunk by chunk, for units not finished by an earlier run.
    layer = config.layer
    records = {u: store.read_unit(layer, u) or UnitRecord(layer, u) for u in units}
    if retry_failed:
        for u, rec in records.items():
            if rec.failed:
                records[u] = rec.retry()
                store.write_unit(records[u])
    todo = [u for u in units if not records[u].reached(config.stop_after)]
    failed_before = [u for u in todo if records[u].failed]
    log.info("%d of %d units to do (%d already done, %d failed earlier)",
             len(todo) - len(failed_before), len(units), len(units) - len(todo),
             len(failed_before))
    if models.llm is not None:  # every reply cached in the run: a re-run pays nothing
        from dnd.backends.llm import CachedChat

        models = dataclasses.replace(models, llm=CachedChat(models.llm, store.llm_cache))
    ctx = RunContext(config, target, probe, acts, models, store.caption_cache,
                     store.features, progress)
    stages = build_stages(ctx)
    failed: dict[int, str] = {}
    for start in range(0, len(todo), config.chunk_units):
        chunk = [records[u] for u in todo[start:start + config.chunk_units]]
        failed.update({r.unit: r.error for r in advance(stages, chunk, store, seconds)
                       if r.failed})
        save_work(start + len(chunk))
    if not todo:  # nothing to do still gets its (empty) entry; chunks wrote theirs
        save_work(0)
    store.write_labels(layer)
    if config.stop_after == "labels":
        _report(store.root)
    return RunResult(store.root, units, [u for u in todo if u not in failed], failed, acts,
                     n_bad, seconds, [u for u in units if u not in todo], failed_before,
                     work)


def activation_pass(config: RunConfig, store: RunStore, target: Target, probe: ProbeSet,
                    progress: bool) -> LayerActivations:
    """The layer's activations [images, units] over the probing set, computed once into the
    run's activation cache (or read from a matching cached pass)."""
    return compute_activations(target, probe, [config.layer], store.activations_dir,
                               summary=config.summary, batch_size=config.batch_size,
                               workers=config.workers, progress=progress)[config.layer]


def build_stages(ctx: RunContext) -> list[Stage]:
    """The per-unit stages of Steps 1-3 up to ``ctx.config.stop_after``, in order."""
    from dnd.stages.candidates import CandidateStage
    from dnd.stages.caption import CaptionStage
    from dnd.stages.crop import CropStage
    from dnd.stages.score import ScoreStage

    ordered = [CropStage, CaptionStage, CandidateStage, ScoreStage]  # = STAGES[1:]
    return [s(ctx) for s in ordered[:STAGES.index(ctx.config.stop_after)]]


def advance(stages: Sequence[Stage], records: Sequence[UnitRecord], store: RunStore,
            seconds: dict[str, float] | None = None) -> list[UnitRecord]:
    """Take ``records`` through ``stages``, each stage for the records due for it, all of
    them at once; every record is written to ``store`` as soon as a stage finishes it, so
    a crash loses at most one stage. Returns the records, same order. ``seconds`` (stage ->
    wall seconds) is added to."""
    out = {r.unit: r for r in records}
    for stage in stages:
        due = [r for r in out.values() if r.due(stage.name)]
        if not due:
            continue
        log.info("%s: %d unit(s)", stage.name, len(due))
        started = time.perf_counter()
        try:
            done = stage(due)
        except torch.OutOfMemoryError as e:  # still out of memory at batch size 1
            reason = f"{stage.name}: out of memory even at batch size 1 ({str(e)[:200]})"
            done = [r.fail(stage.name, reason) for r in due]
        if seconds is not None:
            seconds[stage.name] = seconds.get(stage.name, 0.0) + time.perf_counter() - started
        for rec in done:
            out[rec.unit] = rec
            store.write_unit(rec)
    return [out[r.unit] for r in records]


def _report(run_dir: Path) -> None:
    """Refresh the run's HTML report; a report problem never fails a finished run."""
    from dnd.report import build_report

    try:
        path = build_report(run_dir)
        log.info("report: %s", path)
    except Exception as e:  # noqa: BLE001 - the labels are safe on disk either way
        log.warning("could not build the report of %s: %s", run_dir, e)
