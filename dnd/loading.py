"""A describe run's models: checked, loaded once, counted.

:func:`load_run_models` is the one place that builds what the per-unit stages use: the
target network on the run's device (with the run's dictionaries attached), the probing set
and the backends (captioner, LLM, generator, encoder), each model counted in the run's
:class:`dnd.work.Work` and the LLM behind the run's reply cache. The pipeline's driver
(:mod:`dnd.pipeline`) and every Ray actor (:class:`dnd.executor.ChunkWorker`) call it, so
an actor's copy of the models is the driver's. Before any of them is loaded,
:func:`check_run` checks every option and device and that every model is on this machine
(:mod:`dnd.preflight`).

Which backends a config's stages need, and building them, is here too
(:func:`backends_used`, :func:`load_llm`, :func:`load_models`, through
:func:`dnd.backends.factory.build`). The counters (:func:`count_models`,
:func:`counting_target`) wrap models without changing
what they return: only work a model actually did is counted (see :mod:`dnd.work`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dnd import preflight
from dnd.backends import registered
from dnd.backends.base import resolve_device
from dnd.backends.factory import Models, build, resolve
from dnd.config import STAGES, BackendConfig, RunConfig, parse_units
from dnd.dictionary.attach import attach_configured
from dnd.errors import ConfigError
from dnd.probe import ProbeSet, open_probe
from dnd.registry import Registry
from dnd.store import RunStore
from dnd.target import Target, is_layer_pattern, load_target, match_layers, num_units, target_needs
from dnd.work import Work

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- preflight


def _backends_used(config: RunConfig) -> list[tuple[Any, str, dict[str, Any]]]:
    """(registry, name, options) of every backend the run's stages load, the backends they
    need included (:func:`backends_used`); checks their options."""
    return [(registry, b.name, b.options) for registry, b in backends_used(config)]


def run_needs(config: RunConfig, *, target: bool = True, backends: bool = True
              ) -> list[preflight.Need]:
    """Everything ``dnd describe`` with ``config`` loads: the target's weights (``target``)
    and the backends of the stages it runs (``backends``)."""
    needs = target_needs(config.model, config.weights) if target else []
    for registry, name, options in _backends_used(config) if backends else []:
        needs += preflight.backend_needs(registry, name, options)
    return needs


def check_run(config: RunConfig, *, target: Any = None, models: Any = None) -> None:
    """The preflight of ``dnd describe``: the backends' names and options, the run's device
    and any device a backend option names, then every model the run will load (the target
    unless ``target`` is given, the backends unless ``models`` are), all before any of them
    is loaded."""
    used = _backends_used(config) if models is None else []
    for device in [config.device] + [o["device"] for _, _, o in used
                                     if isinstance(o.get("device"), str)]:
        resolve_device(device)
    preflight.check(run_needs(config, target=target is None, backends=models is None))


# ------------------------------------------------------------------- the run's backends


def _needs(config: RunConfig, stage: str) -> bool:
    return STAGES.index(config.stop_after) >= STAGES.index(stage)


def backends_used(config: RunConfig) -> list[tuple[Registry, BackendConfig]]:
    """(registry, backend config) of every backend :func:`load_llm` and
    :func:`load_models` build for ``config``, the ones a backend needs before it, each with
    its own options only. Checks every option on the way (ConfigError); an unknown
    backend name raises KeyError with close matches."""
    caps, llms, gens, encs = registered()
    top: list[tuple[Registry, BackendConfig]] = []
    if _needs(config, "captions"):
        top.append((caps, config.captioner))
    if _needs(config, "candidates") and config.uses_llm:
        top.append((llms, config.llm))
    if _needs(config, "labels"):
        top += [(gens, config.generator), (encs, config.encoder)]
    return [used for registry, backend in top for used in resolve(registry, backend)]


def load_llm(config: RunConfig, device: str | torch.device | None = None) -> Any:
    """The summariser's chat backend on ``device`` (default: the run's, ``config.device``),
    or None when no stage asks an LLM. Cheap for an API client: a missing key fails here."""
    if not (_needs(config, "candidates") and config.uses_llm):
        return None
    _, llms, _, _ = registered()
    return build(llms, config.llm, config.device if device is None else device)


def load_models(config: RunConfig, device: torch.device, llm: Any = None) -> Models:
    """Build the backends the requested stages need on ``device`` (``llm`` from
    :func:`load_llm`)."""
    m = Models(llm=llm)
    if not _needs(config, "captions"):
        return m
    caps, _, gens, encs = registered()
    # A chat captioner's LLM is built here too, without a reply cache: the caption stage
    # already caches by image pixels.
    m.captioner = build(caps, config.captioner, device)
    if _needs(config, "labels"):
        m.generator = build(gens, config.generator, device)
        m.encoder = build(encs, config.encoder, device)
    return m


# ------------------------------------------------------------------------ the models


@dataclass(frozen=True)
class RunModels:
    """What :func:`load_run_models` loaded. ``config``: the run's config with its layer
    patterns expanded (the layers' names); ``units``: layer -> its requested units;
    ``models``: the backends, counted and the LLM behind the reply cache (None when they
    were not asked for: Ray's driver, whose actors build their own)."""

    config: RunConfig
    target: Target
    probe: ProbeSet
    models: Models | None
    units: dict[str, list[int]]


@contextlib.contextmanager
def load_run_models(config: RunConfig, store: RunStore, work: Work, *,
                    target: Target | None = None, probe: ProbeSet | None = None,
                    models: Models | None = None, backends: bool = True,
                    fit: bool = True) -> Iterator[RunModels]:
    """Load the run's models, in order of cost, each check as early as it can be made:

    1. the summariser's LLM client (with ``backends``): a missing API key fails here;
    2. the target on the run's device; layer patterns (``layer?``) expanded, the expanded
       config checked against the run directory, unknown layers refused;
    3. the probing set;
    4. the run's dictionaries attached: fitted on the probing set and saved in the run on
       a first run (``fit``), else read from the run (a Ray actor: the driver fitted
       them); taken off the target again on exit;
    5. every layer's unit range checked;
    6. the backends built (with ``backends``; ``models`` given are used as they are) and
       counted in ``work``, the LLM behind the run's reply cache;
    7. every image through the target counted in ``work`` while the block runs.

    ``target``, ``probe`` and ``models`` may be passed in (Python API, tests); a target
    passed in is the caller's, but is moved to the run's device.
    """
    llm = load_llm(config) if backends and models is None else None
    device = resolve_device(config.device)
    target = target or load_target(config.model, config.weights)
    target.to(device)
    if any(is_layer_pattern(layer) for layer in config.layers):
        config = _expand_layers(config, target)
        store.check(config)
    _check_layer_names(config, target)
    probe = probe or open_probe(config.probe)
    with contextlib.ExitStack() as stack:
        for handle in attach_configured(target, config, store.dictionary_path,
                                        probe if fit else None):
            stack.callback(handle.remove)
            work.add(target_images=handle.fitted_images)
        units = _check_units(config, target)
        if backends:
            models = with_reply_cache(
                count_models(models or load_models(config, device, llm), work), store)
        stack.enter_context(counting_target(target, work))
        yield RunModels(config, target, probe, models, units)


def with_reply_cache(models: Models, store: RunStore) -> Models:
    """``models`` with the LLM behind the run's reply cache (a re-run pays nothing for
    replies it already has). Wrap after :func:`count_models`, so cached replies count
    nothing."""
    if models.llm is None:
        return models
    from dnd.backends.llm import CachedChat

    return dataclasses.replace(models, llm=CachedChat(models.llm, store.llm_cache))


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


# --------------------------------------------------------------------------- counting


class _Counted:
    """A backend whose ``method`` adds to a :class:`Work`; every other attribute is the
    wrapped backend's (``identity``, ``cache_identity``, options)."""

    def __init__(self, inner: Any, method: str, work: Work, model: str, count):
        self._inner, self._method, self._work, self._model = inner, method, work, model
        self._count = count  # (inputs, outputs) -> counts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def counted(items, *args, **kwargs):
            start = time.perf_counter()
            out = attr(items, *args, **kwargs)
            self._work.add(seconds=(self._model, time.perf_counter() - start),
                           **self._count(items, out))
            return out

        return counted


class _CountedChat(_Counted):
    """A chat backend whose ``complete`` goes through the counted ``complete_many``."""

    def complete(self, messages, *, temperature: float, sample: int = 0) -> str:
        from dnd.backends.llm import complete_one

        return complete_one(self, messages, temperature, sample)


class _CountedEncoder(_Counted):
    """An encoder whose images and texts are both counted."""

    def encode_texts(self, texts: Sequence[str]):
        start = time.perf_counter()
        out = self._inner.encode_texts(texts)
        self._work.add(seconds=("encoder", time.perf_counter() - start),
                       encoded_texts=len(texts))
        return out


def _chat_counts(requests, replies) -> dict[str, int]:
    paid = [r for r in replies if not isinstance(r, Exception)]
    return {"llm_requests": len(requests),
            "prompt_tokens": sum(r.prompt_tokens for r in paid),
            "completion_tokens": sum(r.completion_tokens for r in paid)}


def count_models(models: Models, work: Work) -> Models:
    """``models`` with every call counted in ``work``. Wrap the LLM before any reply cache,
    so that cached replies count nothing."""
    def made(out) -> int:
        return sum(not isinstance(x, Exception) for x in out)

    def gen_counts(requests, out) -> dict[str, int]:
        steps = int((getattr(models.generator, "identity", None) or {}).get("steps", 0) or 0)
        return {"generated_images": made(out), "denoising_steps": made(out) * steps}

    def wrap(inner, cls, method, model, count):
        return None if inner is None else cls(inner, method, work, model, count)

    return dataclasses.replace(
        models,
        captioner=wrap(models.captioner, _Counted, "caption", "captioner",
                       lambda images, _: {"captioned_images": len(images)}),
        llm=wrap(models.llm, _CountedChat, "complete_many", "llm", _chat_counts),
        generator=wrap(models.generator, _Counted, "generate", "generator", gen_counts),
        encoder=wrap(models.encoder, _CountedEncoder, "encode_images", "encoder",
                     lambda images, _: {"encoded_images": len(images)}))


@contextlib.contextmanager
def counting_target(target: Target, work: Work) -> Iterator[None]:
    """Count every image that goes through ``target``'s network while the block runs (a
    forward pre-hook: the batch size of each call's first input)."""
    def hook(_module, inputs):
        if inputs and hasattr(inputs[0], "shape") and len(inputs[0].shape):
            work.add(target_images=int(inputs[0].shape[0]))

    handle = target.module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
