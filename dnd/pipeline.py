"""The DnD pipeline over all requested units of a layer, resumable through the run store.

Stages: activations (one pass over the probing set), crops (Step 1), captions (Step 2.1),
candidates (Steps 2.2-2.4), labels (Step 3). Units go through in chunks; within a chunk each
stage runs for all its units at once (batched, deduplicated), and every unit's record is
written as soon as a stage finishes, so a crash loses at most one stage of one chunk and a
re-run continues where it stopped. Every model is loaded once, before the heavy work.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dnd import preflight
from dnd.activations import LayerActivations, compute_activations
from dnd.config import STAGES, BackendConfig, RunConfig, parse_units
from dnd.probe import ProbeSet, open_probe
from dnd.stages.crop import CropStage
from dnd.store import RunLock, RunStore
from dnd.target import Target, load_target, num_units

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


@dataclass
class Models:
    """The models of Steps 2-3, loaded once per run and shared by the stages."""

    captioner: Any = None
    llm: Any = None
    generator: Any = None
    encoder: Any = None


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; a device this machine lacks (``cuda``
    without a GPU, ``cuda:N`` beyond the count, ``mps`` off Apple silicon) raises a
    ConfigError naming it."""
    from dnd.preflight import check_device

    return check_device(device)


def _needs(config: RunConfig, stage: str) -> bool:
    return STAGES.index(config.stop_after) >= STAGES.index(stage)


def _create(registry, backend: BackendConfig, **extra):
    try:
        return registry.create(backend.name, **{**backend.options, **extra})
    except TypeError as e:  # an option the factory does not take
        raise ValueError(f"{registry.kind} {backend.name!r}: bad option ({e})") from None


def load_llm(config: RunConfig):
    """The summariser's chat backend, or None. Cheap: a missing API key fails here."""
    if not (_needs(config, "candidates") and config.uses_llm):
        return None
    from dnd.backends.llm import LLMS

    return _create(LLMS, config.llm)


def load_models(config: RunConfig, device: torch.device, llm: Any = None) -> Models:
    """Build the backends the requested stages need (``llm`` from :func:`load_llm`)."""
    m = Models(llm=llm)
    if not _needs(config, "captions"):
        return m
    from dnd.backends import registered

    caps, llms, gens, encs = registered()
    if config.captioner.name == "chat":
        from dnd.backends.caption import ChatCaptioner
        opts = dict(config.captioner.options)
        chat = _create(llms, BackendConfig(opts.pop("llm", "openai"), opts.pop("llm_options",
                                                                              {})))
        # No reply cache here: the caption stage already caches by image pixels.
        m.captioner = ChatCaptioner(chat, **opts)
    else:
        m.captioner = _create(caps, config.captioner, **_device_opt(caps, config.captioner,
                                                                    device))
    if _needs(config, "labels"):
        m.generator = _create(gens, config.generator, **_device_opt(gens, config.generator,
                                                                    device))
        m.encoder = _create(encs, config.encoder, **_device_opt(encs, config.encoder, device))
    return m


def _device_opt(registry, backend: BackendConfig, device: torch.device) -> dict:
    """Pass the run's device to a backend whose factory takes one, unless options name one."""
    import inspect

    params = inspect.signature(registry.get(backend.name)).parameters
    takes = "device" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    return {"device": str(device)} if takes and "device" not in backend.options else {}


def describe(config: RunConfig, run_dir: str | Path, *, target: Target | None = None,
             probe: ProbeSet | None = None, models: Models | None = None,
             progress: bool = True, retry_failed: bool = False,
             per_unit: bool = False, wait: bool = False) -> RunResult:
    """Run the pipeline up to ``config.stop_after`` for ``config.units`` of ``config.layer``.

    ``target``, ``probe`` and ``models`` may be passed in (Python API, tests); otherwise they
    are built from the config. Every input check happens before the pass over the probe.
    Units that failed in an earlier run are left alone unless ``retry_failed``: then they
    are redone from the stage that failed.

    ``per_unit`` is the speed benchmark's baseline (``dnd bench describe --compare naive``):
    the reference implementation's way, with models loaded once but every unit taken
    through every stage alone: no cross-unit batching, no deduplication or caches, one LLM
    call at a time. It gives the same records, only slower.

    The run directory is held for the whole call (:class:`dnd.store.RunLock`): if another
    process is using it, this raises :class:`dnd.store.RunDirBusy` naming that process, or
    with ``wait`` waits for it to finish.
    """
    with RunLock(run_dir, wait=wait):
        return _describe(config, run_dir, target=target, probe=probe, models=models,
                         progress=progress, retry_failed=retry_failed, per_unit=per_unit)


def _describe(config: RunConfig, run_dir: str | Path, *, target: Target | None,
              probe: ProbeSet | None, models: Models | None, progress: bool,
              retry_failed: bool, per_unit: bool) -> RunResult:
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
    # 2. One pass over the probing set (or a matching cached one).
    started = time.perf_counter()
    acts = compute_activations(target, probe, [config.layer], store.activations_dir,
                               summary=config.summary, batch_size=config.batch_size,
                               workers=config.workers, progress=progress)[config.layer]
    seconds = {"activations": time.perf_counter() - started}
    n_bad = int((~acts.valid).sum())
    if config.stop_after == "activations":
        return RunResult(store.root, units, [], {}, acts, n_bad, seconds)
    # 3. The per-unit stages, chunk by chunk, for units not finished by an earlier run.
    if retry_failed:
        for u in units:
            rec = store.read_unit(config.layer, u)
            if rec is not None and "error" in rec:
                rec.pop("error")
                rec.pop("failed_at", None)
                store.write_unit(config.layer, u, rec)
    runner = _StageRunner(config, store, target, probe, acts, models, progress, per_unit)
    todo = [u for u in units if not store.unit_done(config.layer, u, config.stop_after)]
    failed_before = [u for u in todo if "error" in (store.read_unit(config.layer, u) or {})]
    log.info("%d of %d units to do (%d already done, %d failed earlier)",
             len(todo) - len(failed_before), len(units), len(units) - len(todo),
             len(failed_before))
    failed: dict[int, str] = {}
    chunk = 1 if per_unit else config.chunk_units
    for start in range(0, len(todo), chunk):
        failed.update(runner.run_chunk(todo[start:start + chunk]))
    store.write_labels(config.layer)
    if config.stop_after == "labels":
        _report(store.root)
    seconds.update(runner.seconds)
    return RunResult(store.root, units, [u for u in todo if u not in failed], failed, acts,
                     n_bad, seconds, [u for u in units if u not in todo], failed_before)


def _report(run_dir: Path) -> None:
    """Refresh the run's HTML report; a report problem never fails a finished run."""
    from dnd.report import build_report

    try:
        path = build_report(run_dir)
        log.info("report: %s", path)
    except Exception as e:  # noqa: BLE001 - the labels are safe on disk either way
        log.warning("could not build the report of %s: %s", run_dir, e)


class _StageRunner:
    """Runs the per-unit stages for one chunk, reading and writing unit records."""

    def __init__(self, config: RunConfig, store: RunStore, target: Target, probe: ProbeSet,
                 acts: LayerActivations, models: Models, progress: bool, per_unit: bool = False):
        self.config, self.store, self.target, self.probe = config, store, target, probe
        self.acts, self.models, self.progress = acts, models, progress
        self.layer = config.layer
        self.per_unit = per_unit  # the benchmark baseline: see describe()
        self.seconds: dict[str, float] = {}  # stage -> wall seconds summed over chunks
        self.llm = None
        if models.llm is not None and per_unit:
            self.llm = _OneAtATime(models.llm)
        elif models.llm is not None:  # every reply cached in the run: a re-run pays nothing
            from dnd.backends.llm import CachedChat
            from dnd.cache import JsonCache
            self.llm = CachedChat(models.llm, JsonCache(store.root / "cache" / "llm"))

    def run_chunk(self, chunk: list[int]) -> dict[int, str]:
        """Advance every unit of ``chunk`` to ``stop_after``; returns unit -> failure."""
        recs = {u: self.store.read_unit(self.layer, u) for u in chunk}
        for stage in STAGES[1:STAGES.index(self.config.stop_after) + 1]:
            due = [u for u, r in recs.items() if _due(r, stage)]
            if not due:
                continue
            log.info("%s: %d unit(s)", stage, len(due))
            started = time.perf_counter()
            try:
                results = getattr(self, f"_{stage}")(due, recs)
            except torch.OutOfMemoryError as e:  # still out of memory at batch size 1
                reason = f"{stage}: out of memory even at batch size 1 ({str(e)[:200]})"
                results = {u: {"error": reason} for u in due}
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
            for u in due:
                rec = dict(recs[u] or {})
                rec.update(results[u])
                rec.update({"layer": self.layer, "unit": u})
                if "error" in results[u]:
                    rec["failed_at"] = stage
                else:
                    rec["stage"] = stage
                    rec.pop("error", None)
                    rec.pop("failed_at", None)
                recs[u] = rec
                self.store.write_unit(self.layer, u, rec)
        return {u: r["error"] for u, r in recs.items() if r and "error" in r}

    # -- one method per stage: (units, records) -> unit -> fields to add ---------------------

    def _crops(self, units, recs):
        cfg = self.config
        top_idx, _ = self.acts.top_images(units, cfg.crop.top_n)
        out = CropStage(self.target, cfg.crop)(self.probe, self.layer, units, top_idx,
                                               summary=cfg.summary, workers=cfg.workers,
                                               progress=self.progress)
        return {u: {"model": self.target.name, "weights": self.target.weights_id,
                    **out[u].to_dict()} for u in units}

    def _images(self, rec) -> list:
        from dnd.stages.caption import evidence_image

        return [evidence_image(self.probe, e) for e in rec["activating_images"]]

    def _captions(self, units, recs):
        from dnd.cache import JsonCache
        from dnd.stages.caption import CaptionStage

        cache = None if self.per_unit else JsonCache(self.store.root / "cache" / "captions")
        stage = CaptionStage(self.models.captioner, cache, dedupe=not self.per_unit)
        caps = stage({u: self._images(recs[u]) for u in units})
        return {u: {"captions": caps[u], "captioner": self.models.captioner.identity}
                for u in units}

    def _candidates(self, units, recs):
        from dnd.stages.summarize import ConsensusSummarizer, Summarizer, join_candidates

        captions = {u: recs[u]["captions"] for u in units}
        enc = self.models.encoder
        consensus = ConsensusSummarizer(embed=enc.encode_texts if enc is not None else None)
        if self.config.summarizer == "consensus":
            cands = consensus.summarize(captions)
        else:
            cands = Summarizer(self.llm, self.config.summarize).summarize(captions)
            phrases = consensus.summarize(captions)
            extra = self.config.summarize.consensus_extra
            for u, c in cands.items():
                if self.config.summarizer == "llm+consensus" and c.ok:
                    cands[u] = join_candidates(c, phrases[u], extra)
                elif c.ok and not c.concepts:
                    # Every reply was rejected: the captions' shared phrases stand in,
                    # marked as a fallback (a failed request fails the unit instead).
                    cands[u] = join_candidates(c, phrases[u], len(phrases[u].concepts))
                    cands[u] = dataclasses.replace(cands[u], fallback=(
                        f"the LLM gave no usable concept in {len(c.replies)} replies; "
                        "candidates are the captions' shared phrases"))
        out = {}
        for u in units:
            c = cands[u]
            out[u] = {"candidates": c.to_dict()}
            if not c.ok or not c.concepts:
                out[u]["error"] = f"candidates: {c.error or 'no candidate concept'}"
        return out

    def _labels(self, units, recs):
        from dnd.stages.score import ScoreStage, UnitInput

        stage = ScoreStage(self.target, self.layer, self.config.summary, self.models.generator,
                           self.models.encoder, self.store.root / "cache" / "generated",
                           self.config.score, reuse=not self.per_unit)
        inputs = [UnitInput(u, recs[u]["candidates"]["concepts"], self._images(recs[u]),
                            recs[u]["captions"]) for u in units]
        return stage(inputs)


class _OneAtATime:
    """A chat backend whose batches are sent one request after another (per-unit baseline)."""

    def __init__(self, llm):
        self.llm = llm

    @property
    def cache_identity(self) -> dict[str, Any]:
        return self.llm.cache_identity

    def complete(self, messages, *, temperature: float, sample: int = 0) -> str:
        return self.llm.complete(messages, temperature=temperature, sample=sample)

    def complete_many(self, requests: Sequence) -> list:
        return [self.llm.complete_many([r])[0] for r in requests]


def _due(rec: dict | None, stage: str) -> bool:
    """A unit is due for ``stage`` when it finished the previous one and has not failed."""
    if rec is None:
        return stage == "crops"
    if "error" in rec:
        return False
    return STAGES.index(rec.get("stage", "activations")) == STAGES.index(stage) - 1
