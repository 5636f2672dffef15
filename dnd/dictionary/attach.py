"""Dictionaries on a target: :func:`attach` hangs one under its layer.

``attach(target, "layer4", sae, name="sae")`` registers the dictionary as
``layer4.sae`` with a forward hook on the layer that feeds it the layer's output and leaves
that output unchanged. ``Target.layer("layer4.sae")`` then finds it, and every stage that
captures a layer's output by name (activation pass, attention crops, re-scoring generated
images, feature visualization) reads the features as units without a change.
:func:`attach_configured` attaches a run's configured dictionaries: fitted on the probing
set and saved in the run on its first run, read back from the run after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnd.dictionary.files import load_dictionary, save_dictionary
from dnd.dictionary.fit import fit_dictionary, sample_positions
from dnd.dictionary.kinds import Dictionary, DictionaryError
from dnd.probe import ProbeSet
from dnd.target import Target

log = logging.getLogger(__name__)


@dataclass
class AttachedDictionary:
    """Handle of an attached dictionary: ``layer`` is its dotted name (``layer4.sae``).
    ``remove()`` (or leaving a ``with`` block) takes the hook and the attribute off."""

    target: Target
    parent: str
    name: str
    dictionary: Dictionary
    _module: nn.Module = field(repr=False, default=None)
    _hook: Any = field(repr=False, default=None)
    # Images read to fit the dictionary before attaching it (0: loaded; attach_configured).
    fitted_images: int = 0

    @property
    def layer(self) -> str:
        return f"{self.parent}.{self.name}" if self.parent else self.name

    def remove(self) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        if self._module.__dict__.get(self.name) is self.dictionary:
            del self._module.__dict__[self.name]
        self.target.dictionaries.pop(self.layer, None)

    def __enter__(self) -> AttachedDictionary:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(target: Target, layer: str, dictionary: Dictionary, name: str = "dict"
           ) -> AttachedDictionary:
    """Hang ``dictionary`` under ``layer`` as ``f"{layer}.{name}"`` and feed it the layer's
    output on every forward pass; the layer's output is returned unchanged.

    The dictionary is set as a plain attribute of the layer module, not registered with
    ``add_module``: ``get_submodule`` (so ``Target.layer`` and ``capture``) finds it all the
    same, but an ``nn.Sequential`` layer (torchvision's ``layer4``, the toy CNN's blocks)
    runs every registered child in turn, so registering it would change the layer's output;
    the target's ``state_dict`` and parameters stay the network's own too. The hook runs
    the dictionary only while something hooks it (``capture`` on ``layer.name``), so an
    attached dictionary costs nothing otherwise, and moves it to the device of the layer's
    output. Checks the channel count at once with one forward pass of a blank image.
    """
    if not name.isidentifier():
        raise DictionaryError(f"dictionary name {name!r} must be a Python identifier "
                              "(letters, digits, underscores; no dots)")
    module = target.layer(layer)
    if hasattr(module, name):
        raise DictionaryError(f"layer {layer!r} of model {target.name} already has an "
                              f"attribute {name!r}; attach the dictionary under another name")
    _check_layer(target, layer, module, dictionary)
    dictionary.eval()

    def hook(_mod, _inp, out):
        if not (dictionary._forward_hooks or dictionary._forward_pre_hooks):
            return None  # nobody reads the features: skip the work
        h = out[0] if isinstance(out, tuple) else out
        if dictionary._device != h.device:
            dictionary.to(h.device)
        dictionary(h)
        return None  # the layer's own output goes on untouched

    object.__setattr__(module, name, dictionary)
    handle = AttachedDictionary(target, layer, name, dictionary, module,
                                module.register_forward_hook(hook))
    target.dictionaries[handle.layer] = dictionary.fingerprint()  # in the target's identity
    return handle


def detach(handle: AttachedDictionary) -> None:
    """Remove an attached dictionary (its hook and attribute); idempotent."""
    handle.remove()


def attached(target: Target) -> dict[str, Dictionary]:
    """Dotted name -> dictionary of every dictionary attached to ``target``'s layers."""
    found = {}
    for lname, mod in target.module.named_modules():
        for attr, value in vars(mod).items():
            if isinstance(value, Dictionary):
                found[f"{lname}.{attr}" if lname else attr] = value
    return found


def attach_configured(target: Target, config: Any, saved: Callable[[str], Path],
                      probe: ProbeSet | None = None) -> list[AttachedDictionary]:
    """Attach the dictionary of a run's ``config`` (:class:`dnd.config.RunConfig`) under
    every layer it names (``config.dictionary_layers``: ``conv4.nmf`` reads ``conv4``).

    ``file``: loaded from ``config.dictionary.path``. ``nmf``/``sae``: read from
    ``saved(run_layer)`` (the run's copy, :meth:`dnd.store.RunStore.dictionary_path`), or
    when absent fitted on ``config.dictionary.samples`` positions of the probing set
    ``probe`` and saved there first (then read back, so every process of the run, Ray's
    actors included, uses the same numbers; the handle's ``fitted_images`` counts the images
    that fitting read). Without ``probe`` a missing copy raises FileNotFoundError."""
    dc = config.dictionary
    handles = []
    for run_layer, parent in config.dictionary_layers.items():
        fitted = 0
        if dc.kind == "file":
            dictionary = load_dictionary(dc.path)
        else:
            path = saved(run_layer)
            if not path.is_file():
                if probe is None:
                    raise FileNotFoundError(f"the run has no fitted dictionary for {run_layer} "
                                            f"({path}); run dnd describe first")
                _fit_and_save(target, config, parent, probe, path)
                fitted = len(probe)
            dictionary = load_dictionary(path)
        handles.append(attach(target, parent, dictionary, name=dc.name))
        handles[-1].fitted_images = fitted
    return handles


def _fit_and_save(target: Target, config: Any, layer: str, probe: ProbeSet, path: Path) -> None:
    """Fit ``config.dictionary`` on ``layer``'s positions over ``probe`` and save it to
    ``path`` atomically, with what it was fitted on in ``<path>.json``."""
    import os
    import time

    from dnd.io import atomic_write_json

    dc = config.dictionary
    started = time.perf_counter()
    samples = sample_positions(target, probe, layer, max_samples=dc.samples, seed=dc.seed,
                               batch_size=config.batch_size, workers=config.workers)
    n = dc.n_features(samples.shape[1])
    log.info("fitting %s with %d features on %d positions of %s", dc.kind, n, len(samples),
             layer)
    dictionary = fit_dictionary(dc.kind, samples, n, seed=dc.seed, **dc.fit_options())
    dictionary.source = f"fitted on {len(samples)} positions of {layer} over {probe.name}"
    tmp = path.with_name(path.name + ".tmp")
    save_dictionary(dictionary, tmp)
    os.replace(tmp, path)
    x = torch.from_numpy(samples[:20_000])
    with torch.no_grad():
        fvu = _unexplained(dictionary, x)
    atomic_write_json(path.with_suffix(".json"), {
        "layer": layer, "kind": dc.kind, "features": n, "positions": len(samples),
        "channels": int(samples.shape[1]), "seed": dc.seed, "probe": probe.name,
        "fraction_of_variance_unexplained": fvu,
        "seconds": round(time.perf_counter() - started, 2)})


def _unexplained(dictionary: Dictionary, x: torch.Tensor) -> float | None:
    """Fraction of the variance of ``x`` [N, C] its reconstruction leaves (None for a
    dictionary that cannot reconstruct)."""
    decode = getattr(dictionary, "decode", None)
    if decode is None:
        return None
    err = (decode(dictionary.encode(x)) - x).pow(2).sum()
    return round(float(err / (x - x.mean(0)).pow(2).sum()), 4)


def _check_layer(target: Target, layer: str, module: nn.Module, dictionary: Dictionary) -> None:
    """Run ``dictionary`` once on ``layer``'s output for a blank image, inside a hook (a
    later in-place op, e.g. ``ReLU(inplace=True)``, may overwrite the output afterwards)."""
    where = f"layer {layer!r} of model {target.name!r}"

    def check(_mod, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        dictionary.check_input(h, where=where)
        try:
            dictionary.to(h.device)(h)
        except DictionaryError as err:
            raise DictionaryError(f"{where}: {err}") from None

    blank = torch.zeros(1, 3, target.preprocess.crop, target.preprocess.crop,
                        device=target.device)
    handle = module.register_forward_hook(check)
    try:
        with torch.no_grad():
            target.module(blank)
    finally:
        handle.remove()

