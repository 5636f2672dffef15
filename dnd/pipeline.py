"""The DnD pipeline over all requested units of a layer, resumable through the run store.

Stages so far: activations (one pass over the probing set) and crops (Step 1). Units are
processed in chunks; each finished unit's record is written at once, so a crash loses at
most the chunk in flight and a re-run continues where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dnd.activations import LayerActivations, compute_activations
from dnd.config import RunConfig, parse_units
from dnd.probe import ProbeSet, open_probe
from dnd.stages.crop import CropStage
from dnd.store import RunStore
from dnd.target import Target, load_target, num_units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a run did: where, which units, how many were new, and the activations used."""

    run_dir: Path
    units: list[int]
    done_now: list[int]
    activations: LayerActivations
    n_unreadable: int


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def describe(config: RunConfig, run_dir: str | Path, *, target: Target | None = None,
             probe: ProbeSet | None = None, progress: bool = True) -> RunResult:
    """Run the pipeline up to ``config.stop_after`` for ``config.units`` of ``config.layer``.

    ``target`` and ``probe`` may be passed in (Python API, tests); otherwise they are built
    from the config. Every check of the input happens before the pass over the probing set.
    """
    # 1. Check everything cheap first: run dir, model, layer, unit range, probing set.
    store = RunStore(run_dir)
    store.check(config)
    target = target or load_target(config.model, config.weights)
    target.to(resolve_device(config.device))
    target.layer(config.layer)
    units = parse_units(config.units, num_units(target, config.layer))
    probe = probe or open_probe(config.probe)
    store.save_config(config)
    if probe.skipped:
        log.warning("skipped %d non-image file(s) in the probing set, e.g. %s",
                    len(probe.skipped), probe.skipped[0][0])
    # 2. One pass over the probing set (or a matching cached one).
    acts = compute_activations(target, probe, [config.layer], store.activations_dir,
                               summary=config.summary, batch_size=config.batch_size,
                               workers=config.workers, progress=progress)[config.layer]
    n_bad = int((~acts.valid).sum())
    if config.stop_after == "activations":
        return RunResult(store.root, units, [], acts, n_bad)
    # 3. Step 1 for units not finished by an earlier run, chunk by chunk.
    todo = [u for u in units if not store.unit_done(config.layer, u, "crops")]
    log.info("%d of %d units to do (%d already done)", len(todo), len(units),
             len(units) - len(todo))
    stage = CropStage(target, config.crop)
    for start in range(0, len(todo), config.chunk_units):
        chunk = todo[start:start + config.chunk_units]
        top_idx, _ = acts.top_images(chunk, config.crop.top_n)
        results = stage(probe, config.layer, chunk, top_idx, summary=config.summary,
                        workers=config.workers, progress=progress)
        for u in chunk:
            store.write_unit(config.layer, u, {
                "layer": config.layer, "unit": u, "stage": "crops", "model": target.name,
                "weights": target.weights_id, **results[u].to_dict()})
    store.write_labels(config.layer)
    return RunResult(store.root, units, todo, acts, n_bad)
