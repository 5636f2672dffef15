"""Where the per-unit stages run: in this process (``executor: local``, the default) or on
the actors of a Ray cluster (``executor: ray``, ``pip install "dnd[ray]"``).

Both take a layer's units chunk by chunk (``chunk_units``) through the same stages
(:func:`build_stages`, :func:`advance`) and hand the finished records back to the
pipeline, so a run's records do not depend on the executor: a run started with one
resumes with the other.

The Ray executor (:class:`RayExecutor`):

- **Actors.** Each actor (:class:`ChunkWorker`) holds one copy of everything the stages
  use: the target network, the probing set, the captioner, generator, encoder and LLM
  client, on one GPU of the cluster (``num_gpus=1``; one CPU on a cluster without GPUs).
  Why whole replicas rather than an actor per model: a chunk passes images from model to
  model (crops to the captioner, generated images to the target and the encoder), and
  keeping them in one actor keeps those images off the network; the paper's models fit one
  GPU together (BLIP-large, Stable Diffusion v1-5 in fp16, CLIP ViT-B/16 and ResNet-50 take
  under 8 GB). LLM requests go out from every actor at once, each actor sending its own
  concurrently (``llm.options.max_concurrency``).
- **Scheduling** is Ray's: each idle actor is given the next chunk and ``ray.wait`` returns
  whichever finishes first (the loop of ``ray.util.ActorPool``, which cannot say which
  chunk a failure belongs to).
- **Failures.** A lost actor (killed, out of host memory, its node gone) is restarted by
  Ray (``max_restarts``) and its chunk retried on it (``max_task_retries``): a chunk is tried
  :data:`TRIES` times in all. A chunk that still loses its actor is recorded as failed for
  its units (``--retry-failed`` redoes them) and the others go on; if no actor comes back,
  the run stops with that error. An exception inside the stages stops the run as it would
  locally; a unit's own failure (a bad reply, out of memory at batch size 1) is recorded
  in its record as always.
- **One source of truth.** Only the driver writes records, labels and ``work.json``, each
  record once, when its chunk returns. The actors write only the content-keyed caches
  (captions, LLM replies, generated images' features, the image bank), which several
  processes may share (:mod:`dnd.cache`). So on a cluster of several machines the run
  directory and the probing set must be on a filesystem every node mounts at the same
  path, and the LLM's API key in every node's environment; a cluster that
  :func:`ray.init` starts on this machine has both.
- **Progress**: one bar per layer over the whole cluster, by finished units.
- **Work counts**: each actor counts what it asks of its models and returns the counts
  with each chunk; the driver adds them to the run's (stage seconds are summed over
  actors, so they exceed wall time with several actors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from dnd.activations import LayerActivations
from dnd.config import RunConfig
from dnd.errors import ConfigError
from dnd.loading import load_run_models
from dnd.record import STAGES, UnitRecord
from dnd.stages.base import RunContext, Stage
from dnd.store import RunStore
from dnd.work import Work

log = logging.getLogger(__name__)

# How often a chunk is tried when its actor is lost (Ray restarts the actor each time).
TRIES = 3


def build_stages(ctx: RunContext) -> list[Stage]:
    """The per-unit stages of Steps 1-3 up to ``ctx.config.stop_after``, in order."""
    from dnd.stages.candidates import CandidateStage
    from dnd.stages.caption import CaptionStage
    from dnd.stages.crop import CropStage
    from dnd.stages.score import ScoreStage

    ordered = [CropStage, CaptionStage, CandidateStage, ScoreStage]  # = STAGES[1:]
    return [s(ctx) for s in ordered[:STAGES.index(ctx.config.stop_after)]]


def advance(stages: Sequence[Stage], records: Sequence[UnitRecord], store: RunStore | None,
            seconds: dict[str, float] | None = None) -> list[UnitRecord]:
    """Take ``records`` through ``stages``, each stage for the records due for it, all of
    them at once; every record is written to ``store`` as soon as a stage finishes it, so
    a crash loses at most one stage (``store`` None: not written, the caller writes them, as
    for a Ray actor's chunk). Returns the records, same order. ``seconds`` (stage -> wall
    seconds) is added to."""
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
            if store is not None:
                store.write_unit(rec)
    return [out[r.unit] for r in records]


class LocalExecutor:
    """The per-unit stages in this process, with the models the pipeline loaded
    (:func:`dnd.loading.load_run_models`); each stage's records are written as soon as it
    finishes (a crash loses one stage of one chunk)."""

    def __init__(self, store: RunStore, target, probe, models, progress: bool):
        self.store, self.target, self.probe, self.progress = store, target, probe, progress
        self.models = models

    def run_layer(self, config: RunConfig, acts: LayerActivations,
                  chunks: Sequence[list[UnitRecord]], seconds: dict[str, float]
                  ) -> Iterator[list[UnitRecord]]:
        """Take each chunk of ``config.layer``'s records through the stages, yielding each
        chunk's records once written. ``seconds`` (stage -> wall seconds) is added to."""
        stages = build_stages(RunContext(config, self.target, self.probe, acts, self.models,
                                         self.store.caption_cache, self.store.features,
                                         self.progress))
        for chunk in chunks:
            yield advance(stages, chunk, self.store, seconds)

    def close(self) -> None:
        pass


class ChunkWorker:
    """A Ray actor's copy of the run's models, loaded as the driver loads its own
    (:func:`dnd.loading.load_run_models`), taking chunks of unit records through the stages
    without writing them (the driver does); the run's caches are shared through the run
    directory."""

    def __init__(self, config: RunConfig, run_dir: str):
        self.store = RunStore(run_dir)
        self.work = Work()
        # Held for the actor's life: its dictionaries attached, its target counted. The
        # driver fitted and saved the run's dictionaries before starting the actors.
        self._loaded = contextlib.ExitStack()
        loaded = self._loaded.enter_context(
            load_run_models(config, self.store, self.work, fit=False))
        self.target, self.probe, self.models = loaded.target, loaded.probe, loaded.models
        self._stages: dict[str, list] = {}  # layer -> its stages, built on its first chunk

    def ready(self) -> int:
        """The actor's process id, once its models are loaded."""
        return os.getpid()

    def run(self, config: RunConfig, acts: LayerActivations, records: list[UnitRecord]
            ) -> tuple[list[UnitRecord], dict[str, float], dict[str, Any]]:
        """(records after the stages, stage -> seconds, the work counts of this chunk)."""
        if config.layer not in self._stages:
            self._stages[config.layer] = build_stages(RunContext(
                config, self.target, self.probe, acts, self.models, self.store.caption_cache,
                self.store.features, progress=False))
        self.work.take()  # counts of this chunk only
        seconds: dict[str, float] = {}
        out = advance(self._stages[config.layer], records, None, seconds)
        return out, seconds, self.work.take()


class RayExecutor:
    """The per-unit stages on the actors of a Ray cluster (see the module docstring).
    Starts a local cluster unless Ray is already initialised or ``config.ray_address``
    names one; :meth:`close` removes the actors (and a cluster it started)."""

    def __init__(self, config: RunConfig, store: RunStore, work: Work, progress: bool):
        ray = import_ray()
        self.store, self.work, self.progress = store, work, progress
        started = time.perf_counter()
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=config.ray_address, include_dashboard=False,
                     configure_logging=False,
                     log_to_driver=logging.getLogger("dnd").isEnabledFor(logging.INFO))
        elif config.ray_address:
            log.warning("Ray is already initialised in this process: ray_address %r is not "
                        "used", config.ray_address)
        try:
            self.actors = self._start_actors(ray, config)
        except BaseException:
            self.close()
            raise
        self._startup_s: float | None = time.perf_counter() - started

    def _start_actors(self, ray, config: RunConfig) -> list:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if config.device != "cpu" else 0
        if config.device == "cuda" and not gpus:
            raise ConfigError("device cuda with executor ray, but the Ray cluster has no GPU")
        n = config.ray_actors or (gpus or max(1, int(resources.get("CPU", 1)) // 2))
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        worker = ray.remote(max_restarts=-1, max_task_retries=TRIES - 1, **options)(ChunkWorker)
        prefix = f"dnd-{uuid.uuid4().hex[:8]}"
        # Named, so that tools (and the fault tests) can find them: ray.get_actor(name).
        self.actor_names = [f"{prefix}-{i}" for i in range(n)]
        actors = [worker.options(name=name).remote(config, str(self.store.root))
                  for name in self.actor_names]
        ray.get([a.ready.remote() for a in actors])  # a model that cannot load fails here
        log.info("ray: %d actor(s) with %s each", n, "1 GPU" if gpus else "1 CPU")
        return actors

    def run_layer(self, config: RunConfig, acts: LayerActivations,
                  chunks: Sequence[list[UnitRecord]], seconds: dict[str, float]
                  ) -> Iterator[list[UnitRecord]]:
        """Run the chunks of ``config.layer`` on the actors, yielding each chunk's records
        (written) in the order they finish. ``seconds`` gets the actors' stage seconds
        (summed over actors), ``ray startup`` (cluster and actors, once per run) and ``ray
        overhead``: per chunk, the time from sending it to having its records written,
        less the actor's time in the stages (moving the chunk, its records and the
        activations, scheduling and writing the records)."""
        ray = import_ray()
        from ray.exceptions import RayActorError
        from tqdm.auto import tqdm

        # The activations go to the object store once per layer (memory-mapped arrays
        # are copied out of their file: a remote node has no such file).
        acts_ref = ray.put(dataclasses.replace(acts, values=np.array(acts.values),
                                               valid=np.array(acts.valid)))
        if self._startup_s is not None:
            seconds["ray startup"] = self._startup_s
            self._startup_s = None
        queue = deque(chunks)
        idle = list(self.actors)
        # result ref -> (actor, chunk, when it was sent)
        running: dict[Any, tuple[Any, list[UnitRecord], float]] = {}
        with tqdm(total=sum(len(c) for c in chunks), desc=f"{config.layer} units",
                  unit="unit", disable=not self.progress) as bar:
            while queue or running:
                while idle and queue:
                    actor, chunk = idle.pop(), queue.popleft()
                    running[actor.run.remote(config, acts_ref, chunk)] = (
                        actor, chunk, time.perf_counter())
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor, chunk, sent = running.pop(ref)
                try:
                    records, secs, work = ray.get(ref)
                except RayActorError as e:
                    if not self._alive(ray, actor):  # not the chunk's fault: someone else's
                        if not self.actors:
                            raise RuntimeError(f"every Ray actor of this run is gone; last "
                                               f"error: {e}") from e
                        queue.appendleft(chunk)
                        continue
                    records, secs, work = [_lost(r, e) for r in chunk], {}, {}
                idle.append(actor)
                for name, s in secs.items():
                    seconds[name] = seconds.get(name, 0.0) + s
                if work:
                    self.work.merge(work)
                for rec in records:
                    self.store.write_unit(rec)
                seconds["ray overhead"] = (seconds.get("ray overhead", 0.0)
                                           + time.perf_counter() - sent - sum(secs.values()))
                bar.update(len(records))
                yield records

    def _alive(self, ray, actor) -> bool:
        """Whether ``actor`` answers (after Ray's restart); a dead one leaves the pool."""
        from ray.exceptions import RayActorError

        try:
            ray.get(actor.ready.remote())
            return True
        except RayActorError:
            log.warning("a Ray actor of this run is gone for good; %d left",
                        len(self.actors) - 1)
            self.actors = [a for a in self.actors if a is not actor]
            return False

    def close(self) -> None:
        """Remove this run's actors, and the local cluster if this executor started it."""
        ray = import_ray()
        for actor in getattr(self, "actors", []):
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()


def _lost(record: UnitRecord, error: Exception) -> UnitRecord:
    """``record`` failed at its next stage: its chunk lost its actor :data:`TRIES` times
    (a record with no stage due, e.g. one that failed earlier, is returned as it was)."""
    stage = next((s for s in STAGES[1:] if record.due(s)), None)
    if stage is None:
        return record
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return record.fail(stage, f"{stage}: the Ray actor running it was lost {TRIES} times "
                       f"({first[:200]})")


def import_ray():
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError('executor ray needs Ray: pip install "dnd[ray]" (or pip install '
                          '"ray>=2.9")') from None
    return ray


@contextlib.contextmanager
def open_executor(config: RunConfig, store: RunStore, *, target, probe, models, work: Work,
                  progress: bool) -> Iterator[LocalExecutor | RayExecutor]:
    """The executor ``config.executor`` names, closed on exit (``models``: the loaded
    models, for the local executor; Ray's actors load their own)."""
    executor = (RayExecutor(config, store, work, progress) if config.executor == "ray"
                else LocalExecutor(store, target, probe, models, progress))
    try:
        yield executor
    finally:
        executor.close()
