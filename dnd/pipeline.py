"""The DnD pipeline over all requested units of one or several layers, resumable through the
run store.

Stages: activations (one pass over the probing set for every layer of the run), then the
per-unit stages, each an object with one contract (:mod:`dnd.stages.base`): crops (Step 1),
captions (Step 2.1), candidates (Steps 2.2-2.4), labels (Step 3). Layers go through one
after another, each layer's units in chunks; within a chunk each stage runs for all its
units at once (batched, deduplicated), and every unit's record
(:class:`dnd.record.UnitRecord`) is written as soon as a stage finishes, so a crash loses
at most one stage of one chunk and a re-run continues where it stopped. The chunks run in
this process or on the actors of a Ray cluster (:mod:`dnd.executor`, which then writes
each record once, as its chunk returns). Every model is loaded once, before the heavy
work (:mod:`dnd.loading`, which Ray's actors call too), and the run's caches (captions,
LLM replies, generated-image features) serve every layer, so a caption or concept two
layers need is computed once.

Why layer by layer rather than chunks mixing layers: a stage is built for one layer (its
activations, its hooks on the target) and a chunk's records are keyed by unit id; what
layers share is shared through the content-keyed caches, so mixing layers in a chunk would
gain only fuller last chunks. A record therefore equals the one a run of its layer alone
writes.

The pipeline writes records, labels and ``work.json``; the HTML report is the apps'
(:func:`dnd.api.describe`, ``dnd describe``), which build it when the run finishes.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dnd import loading
from dnd.activations import LayerActivations, compute_activations
from dnd.backends.factory import Models
from dnd.config import RunConfig
from dnd.errors import ConfigError
from dnd.executor import LocalExecutor, RayExecutor, open_executor
from dnd.probe import ProbeSet
from dnd.record import UnitRecord
from dnd.store import RunLock, RunStore
from dnd.target import Target, is_layer_pattern
from dnd.work import Work

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerResult:
    """What a run did for one layer. ``units``: every requested unit, each in exactly one of
    ``done_now`` (finished in this run), ``already_done`` (finished by an earlier run) and
    ``failed`` (unit -> reason; ``failed_before`` lists those that failed in an earlier run
    and were left alone, as ``retry_failed`` was not set)."""

    layer: str
    units: list[int]
    done_now: list[int]
    failed: dict[int, str]
    activations: LayerActivations
    already_done: list[int] = field(default_factory=list)
    failed_before: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class RunResult:
    """What one :func:`describe` call did: ``layers`` (layer -> :class:`LayerResult`, in the
    config's order), images of the probing set that could not be read, wall seconds per
    stage (summed over layers) and the work asked of the models (:mod:`dnd.work`, for the
    whole call: the activation pass and the caches serve every layer at once).

    For a run of one layer, ``units``, ``done_now``, ``failed``, ``activations``,
    ``already_done`` and ``failed_before`` are that layer's (as before runs had several
    layers); for several they raise, naming ``result.layers``."""

    run_dir: Path
    layers: dict[str, LayerResult]
    n_unreadable: int
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds, this run
    work: Work = field(default_factory=Work)  # what this run asked of the models (dnd.work)

    def _only(self, name: str) -> LayerResult:
        if len(self.layers) != 1:
            raise AttributeError(f"this run describes {len(self.layers)} layers "
                                 f"({', '.join(self.layers)}): use "
                                 f"result.layers[LAYER].{name}")
        return next(iter(self.layers.values()))

    @property
    def units(self) -> list[int]:
        return self._only("units").units

    @property
    def done_now(self) -> list[int]:
        return self._only("done_now").done_now

    @property
    def failed(self) -> dict[int, str]:
        return self._only("failed").failed

    @property
    def activations(self) -> LayerActivations:
        return self._only("activations").activations

    @property
    def already_done(self) -> list[int]:
        return self._only("already_done").already_done

    @property
    def failed_before(self) -> list[int]:
        return self._only("failed_before").failed_before


def describe(config: RunConfig, run_dir: str | Path, *, target: Target | None = None,
             probe: ProbeSet | None = None, models: Models | None = None,
             progress: bool = True, retry_failed: bool = False, wait: bool = False,
             finished: Callable[[RunResult], None] | None = None) -> RunResult:
    """Run the pipeline up to ``config.stop_after`` for ``config.units`` of each of
    ``config.layers`` (the same unit spec for every layer).

    ``target``, ``probe`` and ``models`` may be passed in (Python API, tests); otherwise they
    are built from the config (:func:`dnd.loading.load_run_models`). Every input check
    happens before the pass over the probe (every layer's name and unit range among them).
    Units that failed in an earlier run are left alone unless ``retry_failed``: then they
    are redone from the stage that failed.

    The run directory is held for the whole call (:class:`dnd.store.RunLock`): if another
    process is using it, this raises :class:`dnd.store.RunDirBusy` naming that process, or
    with ``wait`` waits for it to finish. ``finished(result)`` runs last, still holding it:
    the apps write the report there (:func:`dnd.api.describe`), as the pipeline itself
    knows nothing of reports.
    """
    with RunLock(run_dir, wait=wait):
        return _describe(config, run_dir, target=target, probe=probe, models=models,
                         progress=progress, retry_failed=retry_failed, finished=finished)


def _describe(config: RunConfig, run_dir: str | Path, *, target: Target | None,
              probe: ProbeSet | None, models: Models | None, progress: bool,
              retry_failed: bool, finished: Callable[[RunResult], None] | None
              ) -> RunResult:
    """:func:`describe`, with the run directory held."""
    # 1. Cheap checks first: devices and every model's files (before any is loaded), run
    #    dir, API key, model, layers, unit ranges, probing set (dnd.loading).
    loading.check_run(config, target=target, models=models)
    store = RunStore(run_dir)
    if not any(is_layer_pattern(la) for la in config.layers):
        store.check(config)  # else once the target names the layers they match
    local = config.executor == "local"
    if models is not None and not local:
        raise ConfigError("models were passed in, but executor ray builds its own in each "
                          "actor from the config: leave models out, or use executor local")
    work = Work()
    # Ray's actors load their own backends (dnd.executor.ChunkWorker), so the driver needs
    # none; it fits the run's dictionaries, which the actors then read from the run.
    with loading.load_run_models(config, store, work, target=target, probe=probe,
                                 models=models, backends=local) as loaded:
        if loaded.probe.skipped:
            log.warning("skipped %d non-image file(s) in the probing set, e.g. %s",
                        len(loaded.probe.skipped), loaded.probe.skipped[0][0])
        store.save_config(loaded.config)
        result = _run(loaded.config, store, loaded.target, loaded.probe, loaded.models,
                      loaded.units, progress, retry_failed, work)
    if finished is not None:
        finished(result)
    return result


def _run(config: RunConfig, store: RunStore, target: Target, probe: ProbeSet,
         models: Models, units: dict[str, list[int]], progress: bool, retry_failed: bool,
         work: Work) -> RunResult:
    """Steps 2-3 of :func:`_describe`: everything checked and loaded, models counted.
    ``units``: layer -> its requested units."""
    layers = list(units)
    invocation = {"id": uuid.uuid4().hex[:12],
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  **({"layer": layers[0]} if len(layers) == 1 else {"layers": layers})}
    processed = dict.fromkeys(layers, 0)  # units taken through the stages, per layer

    def chunk_done(layer: str, n: int) -> None:
        processed[layer] = n
        save_work()

    def save_work() -> None:
        n = sum(processed.values())
        per_layer = {} if len(layers) == 1 else {"units_processed_by_layer": dict(processed)}
        store.save_work({**invocation, "units_processed": n, **per_layer,
                         "work": work.to_dict(),
                         "per_unit": {k: round(v, 3) for k, v in work.per_unit(n).items()}})

    # 2. One pass over the probing set for every layer (or matching cached ones).
    started = time.perf_counter()
    acts = activation_passes(config, store, target, probe, progress)
    seconds = {"activations": time.perf_counter() - started}
    n_bad = int((~acts[layers[0]].valid).sum())  # one pass: the same images for every layer
    if config.stop_after == "activations":
        save_work()
        return RunResult(store.root, {la: LayerResult(la, units[la], [], {}, acts[la])
                                      for la in layers}, n_bad, seconds, work)
    # 3. The per-unit stages, layer by layer and chunk by chunk, for units not finished by
    #    an earlier run, on the config's executor (dnd.executor).
    results = {}
    with open_executor(config, store, target=target, probe=probe, models=models, work=work,
                       progress=progress) as executor:
        for layer in layers:
            results[layer] = _run_layer(config.for_layer(layer), store, executor, acts[layer],
                                        units[layer], retry_failed, seconds,
                                        functools.partial(chunk_done, layer))
            store.write_labels(layer, layers)
    if not any(processed.values()):  # nothing to do still gets its (empty) entry
        save_work()
    return RunResult(store.root, results, n_bad, seconds, work)


def _run_layer(config: RunConfig, store: RunStore, executor: LocalExecutor | RayExecutor,
               acts: LayerActivations, units: list[int], retry_failed: bool,
               seconds: dict[str, float], done_so_far: Callable[[int], None]) -> LayerResult:
    """The per-unit stages for ``units`` of ``config.layer`` (a one-layer config), chunk by
    chunk on ``executor``; ``done_so_far(n)`` is called after each chunk with the units
    processed so far."""
    layer = config.layer
    records = {u: store.read_unit(layer, u) or UnitRecord(layer, u) for u in units}
    if retry_failed:
        for u, rec in records.items():
            if rec.failed:
                records[u] = rec.retry()
                store.write_unit(records[u])
    todo = [u for u in units if not records[u].reached(config.stop_after)]
    failed_before = [u for u in todo if records[u].failed]
    log.info("%s: %d of %d units to do (%d already done, %d failed earlier)", layer,
             len(todo) - len(failed_before), len(units), len(units) - len(todo),
             len(failed_before))
    chunks = [[records[u] for u in todo[start:start + config.chunk_units]]
              for start in range(0, len(todo), config.chunk_units)]
    failed: dict[int, str] = {}
    processed = 0
    for chunk in executor.run_layer(config, acts, chunks, seconds):
        failed.update({r.unit: r.error for r in chunk if r.failed})
        processed += len(chunk)
        done_so_far(processed)
    return LayerResult(layer, units, [u for u in todo if u not in failed], failed, acts,
                       [u for u in units if u not in todo], failed_before)


def activation_passes(config: RunConfig, store: RunStore, target: Target, probe: ProbeSet,
                      progress: bool) -> dict[str, LayerActivations]:
    """Every layer's activations [images, units] over the probing set (layer -> them),
    computed in one pass into the run's activation cache (layers with a matching cached
    pass are read, the others computed together)."""
    return compute_activations(target, probe, config.layers, store.activations_dir,
                               summary=config.summary, batch_size=config.batch_size,
                               workers=config.workers, progress=progress)


def activation_pass(config: RunConfig, store: RunStore, target: Target, probe: ProbeSet,
                    progress: bool) -> LayerActivations:
    """The activations of a one-layer config's layer (:func:`activation_passes`)."""
    (acts,) = activation_passes(config, store, target, probe, progress).values()
    return acts
