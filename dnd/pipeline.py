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
work, and the run's caches (captions, LLM replies, generated-image features) serve every
layer, so a caption or concept two layers need is computed once.

Why layer by layer rather than chunks mixing layers: a stage is built for one layer (its
activations, its hooks on the target) and a chunk's records are keyed by unit id; what
layers share is shared through the content-keyed caches, so mixing layers in a chunk would
gain only fuller last chunks. A record therefore equals the one a run of its layer alone
writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dnd import preflight
from dnd.activations import LayerActivations, compute_activations
from dnd.backends.base import resolve_device
from dnd.backends.factory import Models, load_llm, load_models
from dnd.config import ConfigError, RunConfig, parse_units
from dnd.dictionary import attach_configured
from dnd.executor import LocalExecutor, RayExecutor, open_executor
from dnd.probe import ProbeSet, open_probe
from dnd.record import UnitRecord
from dnd.store import RunLock, RunStore
from dnd.target import Target, is_layer_pattern, load_target, match_layers, num_units
from dnd.work import Work, count_models, counting_target

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
             progress: bool = True, retry_failed: bool = False, wait: bool = False
             ) -> RunResult:
    """Run the pipeline up to ``config.stop_after`` for ``config.units`` of each of
    ``config.layers`` (the same unit spec for every layer).

    ``target``, ``probe`` and ``models`` may be passed in (Python API, tests); otherwise they
    are built from the config. Every input check happens before the pass over the probe
    (every layer's name and unit range among them). Units that failed in an earlier run are
    left alone unless ``retry_failed``: then they are redone from the stage that failed.

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
    #    dir, API key, model, layers, unit ranges, probing set.
    preflight.check_run(config, target=target, models=models)
    store = RunStore(run_dir)
    patterns = any(is_layer_pattern(la) for la in config.layers)
    if not patterns:  # else once the target names the layers they match
        store.check(config)
    local = config.executor == "local"
    if models is not None and not local:
        raise ConfigError("models were passed in, but executor ray builds its own in each "
                          "actor from the config: leave models out, or use executor local")
    llm = load_llm(config) if models is None and local else None
    device = resolve_device(config.device)
    target = target or load_target(config.model, config.weights)
    target.to(device)
    if patterns:
        config = _expand_layers(config, target)
        store.check(config)
    _check_layer_names(config, target)
    probe = probe or open_probe(config.probe)
    if probe.skipped:
        log.warning("skipped %d non-image file(s) in the probing set, e.g. %s",
                    len(probe.skipped), probe.skipped[0][0])
    work = Work()
    with contextlib.ExitStack() as attached:
        # Dictionary layers (conv4.nmf): fitted on the probing set on a first run (a pass
        # over it, counted), saved in the run; taken off at the end (a target passed in is
        # the caller's).
        for handle in attach_configured(target, config, store.dictionary_path, probe):
            attached.callback(handle.remove)
            work.add(target_images=handle.fitted_images)
        units = _check_units(config, target)
        if local:  # Ray's actors load their own models, so the driver needs none
            models = count_models(models or load_models(config, device, llm), work)
        store.save_config(config)
        with counting_target(target, work):
            return _run(config, store, target, probe, models, units, progress, retry_failed,
                        work)


def _expand_layers(config: RunConfig, target: Target) -> RunConfig:
    """``config`` with each layer pattern (``layer?``) replaced by the layers it matches
    (:func:`dnd.target.match_layers`), in the order given, each layer once. The run saves
    the names, so it resumes with the same pattern or the names."""
    names: list[str] = []
    for spec in config.layers:
        for name in match_layers(target, spec) if is_layer_pattern(spec) else [spec]:
            if name not in names:
                names.append(name)
    log.info("layers: %s", ", ".join(names))
    return dataclasses.replace(config, layer=names)


def _check_layer_names(config: RunConfig, target: Target) -> None:
    """Every unknown layer raises here, with close matches (a dictionary layer's, such as
    ``conv4.nmf``, is the layer it reads): after the target (needed to know its layers) and
    the summariser's API client, before fitting a dictionary, the pass and the models."""
    unknown = []
    for layer in config.layers:
        try:
            target.layer(config.dictionary_layers.get(layer, layer))
        except ValueError as e:
            unknown.append(str(e))
    if unknown:
        raise ValueError("; ".join(unknown))


def _check_units(config: RunConfig, target: Target) -> dict[str, list[int]]:
    """Layer -> its requested units; an out of range unit spec raises, naming its layer."""
    units = {}
    for layer in config.layers:
        try:
            units[layer] = parse_units(config.units, num_units(target, layer))
        except ConfigError as e:
            if len(config.layers) == 1:
                raise
            raise ConfigError(f"layer {layer}: {e} (--units applies to every layer)") from None
    return units


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
    if config.stop_after == "labels":
        _report(store.root)
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


def _report(run_dir: Path) -> None:
    """Refresh the run's HTML report; a report problem never fails a finished run."""
    from dnd.report import build_report

    try:
        path = build_report(run_dir)
        log.info("report: %s", path)
    except Exception as e:  # noqa: BLE001 - the labels are safe on disk either way
        log.warning("could not build the report of %s: %s", run_dir, e)
