"""`dnd explain IMAGE --run RUN_DIR`: one image explained in words, on a finished run.

The Building Blocks of Interpretability (Olah et al. 2018) pair a network's activations on
one image with what its units mean. Here the meanings are the run's DnD labels (Label 1 of
each unit record), and four views are computed on the network's view of the image (resized
and centre-cropped by the target's own preprocessing, ``crop`` x ``crop`` pixels):

1. :func:`semantic_dictionary`: at every spatial position of a layer's output [C, h, w],
   the top-k *labelled* units by activation there. Units without a Label 1 (not
   described, or failed) are left out of the ranking; the count left out is kept.
2. :func:`spatial_attribution`: integrated gradients (captum) of one output (a class logit,
   or a unit's summary activation as the run summarises it) to the input pixels: a map
   [H, W] summed over RGB, with its completeness gap.
3. :func:`channel_attribution`: how much each unit ``a`` of an earlier layer A contributes
   to one unit ``b`` of a later layer B, in words ("conv4 'red' <- conv3 'red circle'
   0.40, 'ring' 0.20"), by integrated gradients in A's activation space.
4. :func:`neuron_groups`: NMF of the image's positions of a layer ([h*w, C], non-negative)
   into a few groups, each a spatial mask [h, w] and a channel factor [C], named by the
   labels of the units the factor weights most ("red + circle").

:class:`Explainer` loads the run's target once and explains any number of images;
:func:`explain` is the one-image shortcut. Each explanation is written as a static page,
``RUN_DIR/explain/<image stem>/index.html``, with its PNG images and ``explanation.json``
beside it, linking each unit to its page of the run's report when that exists.

Baselines. Pixel attributions integrate from a reference image: ``black`` (default; the
black image through the target's normalisation, Sundararajan et al.'s usual choice:
pixels equal to it get no attribution) or ``mean`` (the normalisation's mean colour, a
zero tensor after normalisation). Channel attributions integrate from A's units all off
(zero activations), the reference the Building Blocks' activation x gradient assumes (it
is the one-step version of the same integral); contributions then sum to
f_b(x) - f_b(A = 0).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dnd.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from dnd.store import RunStore, safe_name
from dnd.target import Target, capture, position_sum, split_output

BASELINES = ("black", "mean")
DEFAULT_GROUPS = 4
DEFAULT_TOP = 3
DEFAULT_STEPS = 50  # Gauss-Legendre points: completeness within 0.5% on the toy CNN
DEFAULT_BATCH = 16  # interpolated images per forward pass inside integrated gradients
NMF_ITER = 1000     # at most, scikit-learn's coordinate-descent NMF solver
DISPLAY_PX = 256    # the page's images are upscaled (nearest) to at least this side


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SemanticDictionary:
    """Top-k labelled units per position of ``layer``'s output on one image.

    ``units`` [h, w, k] int: unit ids, highest activation first; ``values`` [h, w, k]:
    their activations there (the layer's own units); ``labels``: Label 1 of every labelled
    unit of the layer; ``n_unlabelled``: the layer's units without a Label 1, left out of
    the ranking.
    """

    layer: str
    units: np.ndarray
    values: np.ndarray
    labels: Mapping[int, str]
    n_unlabelled: int

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w): the layer's spatial positions."""
        return self.units.shape[0], self.units.shape[1]

    def at(self, y: int, x: int) -> list[tuple[int, float, str]]:
        """(unit, activation, Label 1) of the top units at row ``y``, column ``x``."""
        return [(int(u), float(v), self.labels[int(u)])
                for u, v in zip(self.units[y, x], self.values[y, x], strict=True)]

    def to_json(self) -> dict[str, Any]:
        h, w = self.grid
        return {"layer": self.layer, "grid": [h, w], "n_unlabelled": self.n_unlabelled,
                "positions": [{"y": y, "x": x, "top": [
                    {"unit": u, "activation": v, "label": lab} for u, v, lab in self.at(y, x)]}
                    for y in range(h) for x in range(w)]}


@dataclass(frozen=True)
class SpatialAttribution:
    """Integrated gradients of one output to the input pixels.

    ``map`` [H, W]: attribution per view pixel, summed over RGB, in the output's units
    (logit, or activation); it sums to about ``value - baseline_value``. ``gap``: the
    completeness gap |sum(map) - (value - baseline_value)| / |value - baseline_value| (NaN
    when the output does not change from the baseline).
    """

    objective: str
    map: np.ndarray
    value: float
    baseline_value: float
    gap: float
    baseline: str
    steps: int

    def to_json(self) -> dict[str, Any]:
        return {"objective": self.objective, "value": self.value,
                "baseline_value": self.baseline_value, "gap": self.gap,
                "baseline": self.baseline, "steps": self.steps,
                "sum": float(self.map.sum()), "shape": list(self.map.shape)}


@dataclass(frozen=True)
class ChannelAttribution:
    """Contributions of each unit of ``layer_a`` to unit ``unit_b`` of ``layer_b``.

    ``contributions`` [C_A]: integrated gradients in A's activation space from A = 0,
    summed over positions, in B-unit activation units; they sum to about ``total`` =
    f_b(x) - f_b(A = 0). ``gap``: the completeness gap relative to |total|.
    ``labels_a``/``label_b``: Label 1 where the run has one.
    """

    layer_a: str
    layer_b: str
    unit_b: int
    label_b: str | None
    contributions: np.ndarray
    total: float
    gap: float
    labels_a: Mapping[int, str] = field(default_factory=dict)
    summary: str = "mean"

    def top(self, n: int = DEFAULT_TOP) -> list[tuple[int, float, str | None]]:
        """(unit of A, fraction of ``total``, Label 1 or None) of the ``n`` largest
        contributions, largest first (a fraction can be negative when ``total`` is)."""
        order = np.argsort(-self.contributions, kind="stable")[:n]
        denom = self.total if self.total != 0 else float("nan")
        return [(int(u), float(self.contributions[u] / denom), self.labels_a.get(int(u)))
                for u in order]

    def by_label(self) -> list[tuple[str | None, float, tuple[int, ...]]]:
        """(Label 1 or None, fraction of ``total``, units) per concept: the contributions of
        units sharing a label summed, each unlabelled unit alone; largest first."""
        groups: dict[str | int, list[int]] = {}
        for u in range(len(self.contributions)):
            groups.setdefault(self.labels_a.get(u, u), []).append(u)
        denom = self.total if self.total != 0 else float("nan")
        rows = [(key if isinstance(key, str) else None,
                 float(self.contributions[units].sum() / denom), tuple(units))
                for key, units in groups.items()]
        return sorted(rows, key=lambda r: -float(self.contributions[list(r[2])].sum()))

    def sentence(self, n: int = DEFAULT_TOP) -> str:
        """The ``n`` largest concepts of :meth:`by_label`, e.g. ``conv4 'red' <- conv3 'red
        circle' 0.40 (2 units), unit 7 (no label) 0.20``."""
        parts = [f"{_name(lab, units[0])} {frac:.2f}"
                 + (f" ({len(units)} units)" if len(units) > 1 else "")
                 for lab, frac, units in self.by_label()[:n]]
        return f"{self.layer_b} {_name(self.label_b, self.unit_b)} <- {self.layer_a} " + \
            ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"layer_a": self.layer_a, "layer_b": self.layer_b, "unit_b": self.unit_b,
                "label_b": self.label_b, "total": self.total, "gap": self.gap,
                "summary": self.summary, "sentence": self.sentence(),
                "contributions": [float(c) for c in self.contributions]}


@dataclass(frozen=True)
class NeuronGroups:
    """NMF of ``layer``'s activations on one image, [h*w, C] ~ masks x factors.

    ``masks`` [n, h, w] (each scaled to a maximum of 1), ``factors`` [n, C] (activation
    units), groups ordered by the size of their part of the activations; ``labels``: per
    group, its top labelled units' labels joined with " + "; ``top``: per group, (unit,
    share of the factor's sum, Label 1); ``error``: ||X - masks x factors|| / ||X||
    (Frobenius).
    """

    layer: str
    masks: np.ndarray
    factors: np.ndarray
    labels: tuple[str, ...]
    top: tuple[tuple[tuple[int, float, str], ...], ...]
    error: float

    def reconstruction(self) -> np.ndarray:
        """The activations the groups rebuild, [C, h, w]."""
        n, h, w = self.masks.shape
        return (self.masks.reshape(n, h * w).T @ self.factors).T.reshape(-1, h, w)

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "error": self.error, "groups": [
            {"label": lab, "mask": m.tolist(), "top": [
                {"unit": u, "share": s, "label": t} for u, s, t in top]}
            for lab, m, top in zip(self.labels, self.masks, self.top, strict=True)]}


@dataclass
class Explanation:
    """Every view of one image (see the module docstring). ``view``: the RGB image the
    network sees (``crop`` x ``crop``); ``channels``/``groups`` are None when not asked
    for; ``page``: the HTML page, once written."""

    image: Path
    view: Image.Image
    layer: str
    dictionary: SemanticDictionary
    attribution: SpatialAttribution
    channels: ChannelAttribution | None = None
    groups: NeuronGroups | None = None
    page: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.image), "layer": self.layer,
                "view_size": list(self.view.size), "dictionary": self.dictionary.to_json(),
                "attribution": self.attribution.to_json(),
                "channels": self.channels.to_json() if self.channels else None,
                "groups": self.groups.to_json() if self.groups else None}


def _name(label: str | None, unit: int) -> str:
    return f"'{label}'" if label else f"unit {unit} (no label)"


# ---------------------------------------------------------------------------- views


def _as_array(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().float().cpu().numpy()
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"expected a layer's maps [C, h, w], got shape {maps.shape}")
    return maps


def semantic_dictionary(maps: torch.Tensor | np.ndarray, labels: Mapping[int, str],
                        top: int = DEFAULT_TOP, layer: str = "") -> SemanticDictionary:
    """The top-``top`` labelled units at each position of ``maps`` [C, h, w] (one image's
    layer output). ``labels``: unit -> Label 1; units missing from it are left out of the
    ranking (counted in ``n_unlabelled``). Ties go to the lower unit id."""
    maps = _as_array(maps)
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    labelled = sorted(int(u) for u in labels if 0 <= int(u) < maps.shape[0])
    if not labelled:
        raise ValueError(f"layer {layer or '?'} has no labelled unit among its "
                         f"{maps.shape[0]} units: describe it first (`dnd describe`)")
    sub = maps[labelled]                                        # [L, h, w]
    order = np.argsort(-sub, axis=0, kind="stable")[:min(top, len(labelled))]
    values = np.take_along_axis(sub, order, axis=0)
    units = np.asarray(labelled)[order]
    return SemanticDictionary(layer, units.transpose(1, 2, 0), values.transpose(1, 2, 0),
                              {u: str(labels[u]) for u in labelled},
                              maps.shape[0] - len(labelled))


def neuron_groups(maps: torch.Tensor | np.ndarray, labels: Mapping[int, str],
                  n_groups: int = DEFAULT_GROUPS, top: int = DEFAULT_TOP, seed: int = 0,
                  layer: str = "") -> NeuronGroups:
    """Split ``maps`` [C, h, w] (non-negative: a layer after a ReLU) into ``n_groups`` NMF
    groups (scikit-learn ``NMF``, NNDSVDa start, ``seed``); see :class:`NeuronGroups`.
    Each group is named by up to ``top`` distinct labels of its most weighted labelled
    units."""
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    maps = _as_array(maps)
    c, h, w = maps.shape
    name = layer or "the layer"
    low = float(maps.min())
    if low < 0:
        raise ValueError(f"{name} has negative activations on this image (min {low:.3g}): "
                         "NMF groups need non-negative ones; choose a layer after a ReLU, "
                         "or leave the groups out (--groups 0)")
    if not 1 <= n_groups <= min(h * w, c):
        raise ValueError(f"{name} has {h}x{w} positions and {c} units: the number of "
                         f"groups must be between 1 and {min(h * w, c)}, got {n_groups}")
    x = maps.reshape(c, h * w).T.astype(np.float64)              # [hw, C]
    if not x.any():
        raise ValueError(f"{name} is zero everywhere on this image: no groups to find")
    nmf = NMF(n_components=n_groups, init="nndsvda", random_state=seed, max_iter=NMF_ITER)
    with warnings.catch_warnings():
        # Not converging to scikit-learn's tolerance is common and harmless here: the
        # reconstruction error (kept, and shown on the page) says how good the groups are.
        warnings.simplefilter("ignore", ConvergenceWarning)
        wmat = nmf.fit_transform(x)                              # [hw, n]
    hmat = nmf.components_                                       # [n, C]
    # NMF's scale is arbitrary: masks peak at 1, the factors carry the activation units.
    scale = wmat.max(0)
    scale[scale == 0] = 1.0
    wmat, hmat = wmat / scale, hmat * scale[:, None]
    size = np.linalg.norm(wmat, axis=0) * np.linalg.norm(hmat, axis=1)
    order = np.argsort(-size, kind="stable")
    wmat, hmat = wmat[:, order], hmat[order]
    error = float(np.linalg.norm(x - wmat @ hmat) / np.linalg.norm(x))
    names, tops = group_labels(hmat, labels, top)
    return NeuronGroups(layer, wmat.T.reshape(n_groups, h, w).astype(np.float32),
                        hmat.astype(np.float32), names, tops, error)


def group_labels(factors: np.ndarray, labels: Mapping[int, str], top: int = DEFAULT_TOP
                 ) -> tuple[tuple[str, ...], tuple[tuple[tuple[int, float, str], ...], ...]]:
    """Name each group of ``factors`` [n, C]: its labelled units by decreasing weight until
    ``top`` distinct labels, joined with " + " ("(no labelled unit)" when none weighs).
    Returns (names, per group its (unit, share of the factor's sum, Label 1))."""
    names, tops = [], []
    for factor in np.asarray(factors):
        total = float(factor.sum()) or 1.0
        chosen: list[tuple[int, float, str]] = []
        for u in np.argsort(-factor, kind="stable"):
            if len({lab for _, _, lab in chosen}) >= top or factor[u] <= 0:
                break
            if int(u) in labels:
                chosen.append((int(u), float(factor[u] / total), str(labels[int(u)])))
        distinct = list(dict.fromkeys(lab for _, _, lab in chosen))
        names.append(" + ".join(distinct) if distinct else "(no labelled unit)")
        tops.append(tuple(chosen))
    return tuple(names), tuple(tops)


@contextlib.contextmanager
def not_inplace(module: torch.nn.Module) -> Iterator[None]:
    """In-place activations (``ReLU(inplace=True)``) turned off inside the block, restored
    after: an in-place op after a hooked layer would overwrite the output a hook kept, and
    cannot run on an output that a hook replaced with a tensor gradients flow to."""
    changed = [m for m in module.modules() if getattr(m, "inplace", None) is True]
    try:
        for m in changed:
            m.inplace = False
        yield
    finally:
        for m in changed:
            m.inplace = True


def _spatial(out: torch.Tensor, target: Target) -> torch.Tensor:
    """One image's layer output as maps [C, h, w] (a linear layer's [1, F]: [F, 1, 1])."""
    _, maps = split_output(out, "mean", target.num_prefix_tokens)
    if maps is None:
        return out[0][:, None, None]
    return maps[0]


def layer_outputs(target: Target, x: torch.Tensor, layers: Sequence[str]
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass of ``x`` [1, 3, H, W]: each layer's raw output (in the order the
    layers ran) and the model's output."""
    with torch.no_grad(), not_inplace(target.module), capture(
            target.module, {la: target.layer(la) for la in layers}) as outs:
        final = target.module(x)
    missing = [la for la in layers if la not in outs]
    if missing:
        raise ValueError(f"layer(s) {', '.join(missing)} of model {target.name} did not run "
                         "in the forward pass")
    return {la: outs[la].detach() for la in outs}, final.detach()


def unit_output(target: Target, layer: str, unit: int, summary: str = "mean"
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(x): images [n, 3, H, W] -> unit ``unit``'s summary activation on ``layer`` [n]
    (``summary``: the run's spatial ``mean`` or ``max``)."""
    module = target.layer(layer)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with capture(target.module, {layer: module}) as outs:
            target.module(x)
        return split_output(outs[layer], summary, target.num_prefix_tokens)[0][:, unit]

    return forward


def class_output(target: Target, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(x): images [n, 3, H, W] -> the model's output ``index`` (a class logit) [n]."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = target.module(x)
        if out.dim() != 2:
            raise ValueError(f"model {target.name} outputs shape {tuple(out.shape)}, not class "
                             "logits [B, K]: attribute a unit instead (--unit)")
        return out[:, index]

    return forward


def baseline_image(target: Target, kind: str = "black") -> torch.Tensor:
    """The reference input [1, 3, crop, crop]: ``black`` pixels through the target's
    normalisation, or ``mean`` (its mean colour: zeros after normalisation)."""
    crop = target.preprocess.crop
    if kind == "black":
        return target.preprocess.to_tensor(Image.new("RGB", (crop, crop)))[None]
    if kind == "mean":
        return torch.zeros(1, 3, crop, crop)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {kind!r}")


def _gap(attr_sum: float, value: float, base: float) -> float:
    diff = value - base
    return abs(attr_sum - diff) / abs(diff) if diff != 0 else float("nan")


def spatial_attribution(target: Target, x: torch.Tensor,
                        forward: Callable[[torch.Tensor], torch.Tensor], objective: str,
                        baseline: str = "black", steps: int = DEFAULT_STEPS,
                        batch: int = DEFAULT_BATCH) -> SpatialAttribution:
    """Integrated gradients (captum, Gauss-Legendre, ``steps`` points, ``batch`` images per
    pass) of ``forward`` (images [n, 3, H, W] -> [n]; :func:`class_output` or
    :func:`unit_output`) at ``x`` [1, 3, H, W] from the ``baseline`` image."""
    from captum.attr import IntegratedGradients

    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps} and {batch}")
    ref = baseline_image(target, baseline).to(x.device)
    with not_inplace(target.module):
        attr = IntegratedGradients(forward).attribute(
            x, baselines=ref, n_steps=steps, internal_batch_size=batch)
        with torch.no_grad():
            value, base = float(forward(x)[0]), float(forward(ref)[0])
    pixel = attr[0].detach().sum(0).cpu().numpy()                # [H, W]
    return SpatialAttribution(objective, pixel, value, base,
                              _gap(float(pixel.sum()), value, base), baseline, steps)


def _order_error(layer_a: str, layer_b: str) -> str:
    return (f"layer {layer_b} runs before layer {layer_a}: channel attribution needs the "
            "earlier layer as A (--layer) and the later one as B (--next-layer)")


def channel_attribution(target: Target, x: torch.Tensor, layer_a: str, layer_b: str,
                        unit_b: int, summary: str = "mean", steps: int = DEFAULT_STEPS,
                        batch: int = DEFAULT_BATCH, labels_a: Mapping[int, str] | None = None,
                        label_b: str | None = None) -> ChannelAttribution:
    """Each unit of ``layer_a``'s contribution to unit ``unit_b`` of ``layer_b`` (its
    ``summary`` activation) on ``x`` [1, 3, H, W]: integrated gradients (captum) over A's
    activations from zero, A's output replaced through a forward hook (removed after),
    summed over A's positions. ``layer_a`` must run before ``layer_b``."""
    from captum.attr import IntegratedGradients

    module_a, module_b = target.layer(layer_a), target.layer(layer_b)
    with not_inplace(target.module):
        outs, _ = layer_outputs(target, x, [layer_a, layer_b])
        if list(outs) != [layer_a, layer_b]:
            raise ValueError(_order_error(layer_a, layer_b))
        a_x = outs[layer_a]
        replaced: dict[str, torch.Tensor] = {}

        def replace(_mod, _inp, out):
            new = replaced["a"]
            return (new, *out[1:]) if isinstance(out, tuple) else new

        def forward(a: torch.Tensor) -> torch.Tensor:
            replaced["a"] = a
            with capture(target.module, {layer_b: module_b}) as outs_b:
                target.module(x.expand(a.shape[0], *x.shape[1:]))
            return split_output(outs_b[layer_b], summary, target.num_prefix_tokens)[0][:, unit_b]

        handle = module_a.register_forward_hook(replace)
        try:
            attr = IntegratedGradients(forward).attribute(
                a_x, baselines=torch.zeros_like(a_x), n_steps=steps, internal_batch_size=batch)
            with torch.no_grad():
                value, base = float(forward(a_x)[0]), float(forward(torch.zeros_like(a_x))[0])
        finally:
            handle.remove()
            replaced.clear()
    contrib = position_sum(attr.detach()).double()[0].cpu().numpy()     # [C_A]
    total = value - base
    return ChannelAttribution(layer_a, layer_b, int(unit_b), label_b, contrib, total,
                              _gap(float(contrib.sum()), value, base),
                              dict(labels_a or {}), summary)


# ---------------------------------------------------------------------------- explainer


def _labels(store: RunStore, layer: str) -> dict[int, str]:
    """unit -> Label 1 of ``layer``'s records that have one."""
    return {r.unit: r.labels[0] for r in store.records(layer) if r.labels}


class Explainer:
    """The views of :mod:`dnd.explain` on a finished run: the target (loaded once), its
    preprocessing, the run's summary and every layer's labels.

    ``layer``: the layer of the dictionary and the groups (default: the run's, for a run
    of one layer); ``next_layer``: a later layer B for the channel attribution (None: no
    channel attribution; B need not be described, its units are then unlabelled);
    ``device``: default the run's; ``baseline``: ``black`` or ``mean`` (module docstring).
    """

    def __init__(self, run_dir: str | Path, layer: str | None = None,
                 next_layer: str | None = None, device: str | None = None,
                 baseline: str = "black", batch: int = DEFAULT_BATCH):
        from dnd.backends.base import resolve_device
        from dnd.dictionary import attach_configured
        from dnd.target import load_target

        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got "
                             f"{baseline!r}")
        self.store = RunStore(run_dir)
        rc = self.store.layer_config(layer)
        self.layer, self.next_layer, self.summary = rc.layer, next_layer, rc.summary
        self.baseline, self.batch = baseline, batch
        self.target = load_target(rc.model, rc.weights).to(resolve_device(device or rc.device))
        # Dictionary layers (conv4.nmf: dnd.dictionary) read the run's fitted dictionaries.
        attach_configured(self.target, self.store.load_config(), self.store.dictionary_path)
        self.labels = _labels(self.store, self.layer)
        if not self.labels:
            raise ValueError(f"{self.store.root} has no labelled unit of layer {self.layer}; "
                             "finish `dnd describe` first")
        self.next_labels: dict[int, str] = {}
        if next_layer is not None:
            if next_layer == self.layer:
                raise ValueError(f"--next-layer must differ from --layer ({self.layer})")
            if self.layer in self.target.dictionaries:
                raise ValueError(f"{self.layer} is a dictionary layer: its features are read "
                                 "from the network but do not feed it, so nothing later "
                                 "depends on them; give its parent layer as --layer for a "
                                 "channel attribution")
            self.target.layer(next_layer)  # an unknown name raises with close matches
            blank = baseline_image(self.target, "mean").to(self.target.device)
            ran, _ = layer_outputs(self.target, blank, [self.layer, next_layer])
            if list(ran)[0] != self.layer:
                raise ValueError(_order_error(self.layer, next_layer))
            self.next_labels = _labels(self.store, next_layer)

    def tensor(self, image: Image.Image) -> tuple[torch.Tensor, Image.Image]:
        """The network's input [1, 3, crop, crop] and the view it sees."""
        view, _ = self.target.preprocess.view(image)
        return self.target.preprocess.to_tensor(view)[None].to(self.target.device), view

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s maps [C, h, w] on ``x`` and the model output [1, ...]."""
        outs, final = layer_outputs(self.target, x, [self.layer])
        return _spatial(outs[self.layer], self.target), final

    def _objective(self, x: torch.Tensor, final: torch.Tensor, klass: int | str | None,
                   unit: int | None) -> tuple[Callable, str]:
        """The output to attribute: ``klass`` (index or name), ``unit`` of ``layer``, or by
        default the top class (a target with class names) else the top labelled unit."""
        if klass is not None and unit is not None:
            raise ValueError("give a class or a unit to attribute, not both")
        names = self.target.class_names
        if klass is None and unit is None and names and final.dim() == 2:
            klass = int(final[0].argmax())
        if klass is not None:
            if final.dim() != 2:
                raise ValueError(f"model {self.target.name} outputs shape "
                                 f"{tuple(final.shape)}, not class logits: use --unit")
            index = self._class_index(klass, final.shape[1])
            name = f" '{names[index]}'" if names else ""
            return class_output(self.target, index), f"class {index}{name} (logit)"
        if unit is None:
            summary, _ = self._summaries(x, self.layer)
            unit = max(self.labels, key=lambda u: float(summary[u]))
        n = self._summaries(x, self.layer)[0].shape[0]
        if not 0 <= unit < n:
            raise ValueError(f"unit {unit} is out of range: layer {self.layer} has {n} units")
        return (unit_output(self.target, self.layer, unit, self.summary),
                f"{self.layer} unit {unit} {_name(self.labels.get(unit), unit)} "
                f"(spatial {self.summary})")

    def _class_index(self, klass: int | str, n: int) -> int:
        names = self.target.class_names
        if isinstance(klass, str) and not klass.lstrip("-").isdigit():
            if not names or klass not in names:
                from dnd.registry import unknown_name_message
                raise ValueError(unknown_name_message("class", klass, names or [])
                                 + f" (model {self.target.name})")
            return names.index(klass)
        index = int(klass)
        if not 0 <= index < n:
            raise ValueError(f"class {index} is out of range: model {self.target.name} has "
                             f"{n} outputs")
        return index

    def _summaries(self, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        outs, _ = layer_outputs(self.target, x, [layer])
        summary, _ = split_output(outs[layer], self.summary, self.target.num_prefix_tokens)
        return summary[0], outs[layer]

    def explain(self, image: str | Path, *, klass: int | str | None = None,
                unit: int | None = None, next_unit: int | None = None,
                groups: int | None = None, top: int = DEFAULT_TOP,
                steps: int = DEFAULT_STEPS, seed: int = 0, write: bool = True) -> Explanation:
        """Every view of one image file; with ``write``, its page in
        ``RUN_DIR/explain/<stem>/``. ``klass``/``unit``: the output of the pixel
        attribution (default in :meth:`_objective`); ``next_unit``: B's unit (default: its
        top labelled unit on the image, else its top unit); ``groups``: NMF groups (default
        4 on a spatial layer, none on a linear one; 0: none); ``top``: units per position
        and per group label; ``steps``: integrated-gradients points; ``seed``: NMF's."""
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        with Image.open(path) as im:
            pil = im.convert("RGB")
        x, view = self.tensor(pil)
        maps, final = self.maps(x)
        spatial = maps.shape[1] * maps.shape[2] > 1
        if groups is None:
            groups = DEFAULT_GROUPS if spatial else 0
        elif groups and not spatial:
            raise ValueError(f"layer {self.layer} has no spatial positions: NMF groups need "
                             "a spatial layer (leave --groups out)")
        if groups < 0:
            raise ValueError(f"groups must be >= 0, got {groups}")
        forward, objective = self._objective(x, final, klass, unit)
        attribution = spatial_attribution(self.target, x, forward, objective, self.baseline,
                                          steps, self.batch)
        channels = None
        if self.next_layer is not None:
            channels = self._channels(x, next_unit, steps)
        elif next_unit is not None:
            raise ValueError("a unit of the next layer needs --next-layer")
        out = Explanation(
            path, view, self.layer,
            semantic_dictionary(maps, self.labels, top, self.layer), attribution, channels,
            neuron_groups(maps, self.labels, groups, top, seed, self.layer) if groups else None)
        if write:
            out.page = write_page(out, self.store.explain_dir(path.stem),
                                  self.store)
        return out

    def _channels(self, x: torch.Tensor, unit_b: int | None, steps: int) -> ChannelAttribution:
        outs, final = layer_outputs(self.target, x, [self.next_layer])
        out_b = outs[self.next_layer]
        summary = split_output(out_b, self.summary, self.target.num_prefix_tokens)[0][0]
        if unit_b is None:
            pool = list(self.next_labels) or range(summary.shape[0])
            unit_b = max(pool, key=lambda u: float(summary[u]))
        if not 0 <= unit_b < summary.shape[0]:
            raise ValueError(f"unit {unit_b} is out of range: layer {self.next_layer} has "
                             f"{summary.shape[0]} units")
        label_b = self.next_labels.get(unit_b)
        names = self.target.class_names
        if (label_b is None and names and out_b.shape == final.shape == (1, len(names))
                and torch.equal(out_b, final)):
            label_b = f"{names[unit_b]} (class)"  # B is the classifier: its unit is a class
        return channel_attribution(self.target, x, self.layer, self.next_layer, unit_b,
                                   self.summary, steps, self.batch, self.labels, label_b)


def explain(run_dir: str | Path, image_path: str | Path, layer: str | None = None, *,
            next_layer: str | None = None, device: str | None = None,
            baseline: str = "black", **kwargs: Any) -> Explanation:
    """Explain one image on a finished run and write its page (``Explanation.page``);
    ``kwargs`` go to :meth:`Explainer.explain`. Loads the target: for many images, build
    one :class:`Explainer`."""
    return Explainer(run_dir, layer, next_layer, device, baseline).explain(image_path, **kwargs)


# ---------------------------------------------------------------------------- the page


PAGE_CSS = """
.grid{position:relative;display:inline-block}
.grid img{display:block}
.cells{position:absolute;left:0;top:0;width:100%;height:100%;display:grid}
.cells div{border:1px solid rgba(255,255,255,.25)}
.cells div:hover{border:2px solid #ffeb3b}
table.pos{border-collapse:collapse;font-size:13px}
table.pos td,table.pos th{padding:1px 8px;text-align:left;border-bottom:1px solid #e4e4e4}
.quiet{color:#999}
.views{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.views figure{width:260px}
.views figure img{width:auto;height:auto}
ul.legend{list-style:none;padding:0;margin:0;font-size:14px}
.swatch{display:inline-block;width:14px;height:14px;margin-right:6px;vertical-align:middle;
border:1px solid #999}
"""


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _display(image: Image.Image) -> Image.Image:
    """Upscaled (nearest) to at least DISPLAY_PX on its side: a 64-px view stays sharp."""
    k = max(1, math.ceil(DISPLAY_PX / max(image.size)))
    return image.resize((image.size[0] * k, image.size[1] * k), Image.NEAREST)


def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map [h, w] resized (bilinear) to ``size`` (width, height), as float32."""
    im = Image.fromarray(np.asarray(m, dtype=np.float32), mode="F")
    return np.asarray(im.resize(size, Image.BILINEAR), dtype=np.float32)


def attribution_overlay(view: Image.Image, amap: np.ndarray) -> Image.Image:
    """The view in grey with positive attribution in red and negative in blue, opacity
    proportional to |attribution| (scaled by its largest absolute value)."""
    grey = np.asarray(view.convert("L").convert("RGB"), dtype=np.float32) * 0.6 + 50
    peak = float(np.abs(amap).max()) or 1.0
    a = np.clip(amap / peak, -1, 1)[..., None]
    colour = np.where(a > 0, np.array([230.0, 30, 30]), np.array([30.0, 80, 230]))
    alpha = np.abs(a) ** 0.7
    out = grey * (1 - alpha) + colour * alpha
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def dictionary_overlay(view: Image.Image, d: SemanticDictionary
                       ) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int], int]]]:
    """The view with each position tinted by its top unit's label, more opaque where that
    unit is more active (the most frequent labels get :data:`PALETTE`'s colours, the rest
    and positions where nothing fires stay untinted); returns it and the legend (label,
    colour, positions)."""
    h, w = d.grid
    counts: dict[str, int] = {}
    for y in range(h):
        for x in range(w):
            if d.values[y, x, 0] > 0:
                lab = d.labels[int(d.units[y, x, 0])]
                counts[lab] = counts.get(lab, 0) + 1
    ranked = sorted(counts, key=lambda lab: -counts[lab])[:len(PALETTE)]
    colour = {lab: PALETTE[i] for i, lab in enumerate(ranked)}
    tint = np.zeros((h, w, 3), np.float32)
    alpha = np.zeros((h, w, 1), np.float32)
    peak = float(d.values[..., 0].max())
    for y in range(h):
        for x in range(w):
            lab = d.labels[int(d.units[y, x, 0])]
            if d.values[y, x, 0] > 0 and lab in colour:
                # Weak positions fade: the tint's opacity follows the top activation.
                tint[y, x], alpha[y, x] = colour[lab], 0.15 + 0.5 * d.values[y, x, 0] / peak
    size = view.size
    cells = Image.fromarray(tint.astype(np.uint8)).resize(size, Image.NEAREST)
    a = np.asarray(Image.fromarray((alpha[..., 0] * 255).astype(np.uint8)).resize(
        size, Image.NEAREST), np.float32)[..., None] / 255
    out = np.asarray(view, np.float32) * (1 - a) + np.asarray(cells, np.float32) * a
    legend = [(lab, colour[lab], counts[lab]) for lab in ranked]
    return Image.fromarray(out.clip(0, 255).astype(np.uint8)), legend


def mask_overlay(view: Image.Image, mask: np.ndarray) -> Image.Image:
    """The view darkened outside a group's mask [h, w] (upsampled to the view)."""
    m = _upsample(mask, view.size).clip(0, 1)[..., None]
    out = np.asarray(view, dtype=np.float32) * (0.2 + 0.8 * m)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _unit_link(store: RunStore | None, layer: str, unit: int, text: str) -> str:
    """``text`` linked to the unit's report page when the run's report has it."""
    from dnd.report.build import esc

    if store is not None and (store.report_dir / "units" / safe_name(layer)
                              / f"{unit}.html").is_file():
        href = f"../../report/units/{safe_name(layer)}/{unit}.html"
        return f'<a href="{esc(href)}">{esc(text)}</a>'
    return esc(text)


def write_page(ex: Explanation, folder: str | Path, store: RunStore | None = None) -> Path:
    """Write ``folder/index.html`` with its PNGs (``image.png``, ``dictionary.png``,
    ``attribution.png``, ``group-<i>.png``) and ``explanation.json``; links go to
    ``store``'s report unit pages when they exist. Returns the page's path."""
    from dnd.report.assets import CSS
    from dnd.report.build import esc

    folder = Path(folder)
    tinted, legend = dictionary_overlay(ex.view, ex.dictionary)
    files = {"image.png": _display(ex.view), "dictionary.png": _display(tinted),
             "attribution.png": _display(attribution_overlay(ex.view, ex.attribution.map))}
    if ex.groups is not None:
        for i, m in enumerate(ex.groups.masks):
            files[f"group-{i}.png"] = _display(mask_overlay(ex.view, m))
    for name, im in files.items():
        atomic_write_bytes(folder / name, _png(im), durable=False)
    atomic_write_json(folder / "explanation.json", ex.to_json())

    d, layer = ex.dictionary, ex.layer
    h, w = d.grid

    def link(unit: int, text: str, in_layer: str = layer) -> str:
        return _unit_link(store, in_layer, unit, text)

    def cell_title(y: int, x: int) -> str:
        return f"({y}, {x}): " + "; ".join(f"{lab} {v:.2f}" for _, v, lab in d.at(y, x))

    cells = "".join(f'<div title="{esc(cell_title(y, x))}"></div>'
                    for y in range(h) for x in range(w))
    swatches = "".join(
        f'<li><span class=swatch style="background:rgb{rgb}"></span>{esc(lab)} '
        f"({n})</li>" for lab, rgb, n in legend) or "<li>no unit fires</li>"
    rows = []
    for y in range(h):
        for x in range(w):
            entries = " &middot; ".join(
                f'<span class="{"quiet" if v <= 0 else ""}">{link(u, lab)} {v:.2f}</span>'
                for u, v, lab in d.at(y, x))
            rows.append(f"<tr><td>{y}, {x}</td><td>{entries}</td></tr>")
    report = (store.report_dir / "index.html") if store is not None else None
    back = (' &middot; <a href="../../report/index.html">the run\'s report</a>'
            if report is not None and report.is_file() else "")
    a = ex.attribution
    parts = [
        f"<header><b>dnd explain</b>: {esc(ex.image.name)}{back}</header><main>",
        f"<p class=note>The network's view of the image ({ex.view.size[0]}x{ex.view.size[1]} "
        f"pixels, the target's own resize and centre crop); layer <b>{esc(layer)}</b>, "
        f"{h}x{w} positions. Labels are the run's Label 1; {d.n_unlabelled} unit(s) of the "
        "layer have none and are left out.</p>",
        "<h2>Semantic dictionary</h2>",
        "<p>Each position tinted by the label of its top unit, stronger where it is more "
        "active (hover a cell for its top "
        f"{d.units.shape[2]}); positions per label in brackets.</p>",
        '<div class=views><figure><img src="image.png" alt="the image"><figcaption>the '
        "network's view</figcaption></figure>"
        '<div class=grid><img src="dictionary.png" alt="the image, '
        f'tinted by label"><div class=cells style="grid-template-columns:repeat({w},1fr);'
        f'grid-template-rows:repeat({h},1fr)">{cells}</div></div>'
        f"<ul class=legend>{swatches}</ul></div>",
        "<details><summary>Every position (row, column): top units, activation</summary>"
        f"<table class=pos><tr><th>position</th><th>top units</th></tr>{''.join(rows)}"
        "</table></details>",
        "<h2>Spatial attribution</h2>",
        f"<p>Integrated gradients of {esc(a.objective)} to the pixels (red raises it, blue "
        f"lowers it), from the {esc(a.baseline)} image in {a.steps} steps: value "
        f"{a.value:.3f}, at the baseline {a.baseline_value:.3f}; completeness gap "
        f"{100 * a.gap:.2f}% of the difference.</p>",
        '<div class=views><figure><img src="attribution.png" alt="attribution"></figure>'
        '</div>']
    if ex.channels is not None:
        c = ex.channels
        rows_c = "".join(
            f"<tr><td>{link(u, str(u), c.layer_a)}</td><td>{esc(lab or '(no label)')}</td>"
            f"<td>{c.contributions[u]:.3f}</td><td>{frac:.2f}</td></tr>"
            for u, frac, lab in c.top(max(5, DEFAULT_TOP)))
        parts += [
            "<h2>Channel attribution</h2>",
            f"<p><b>{esc(c.sentence())}</b></p>",
            f"<p>Integrated gradients of {esc(c.layer_b)} unit "
            f"{link(c.unit_b, str(c.unit_b), c.layer_b)} (spatial {esc(c.summary)}) over "
            f"{esc(c.layer_a)}'s activations from zero: {c.total:.3f} in all, completeness "
            f"gap {100 * c.gap:.2f}%. Fractions are of that total.</p>",
            f"<table class=pos><tr><th>unit</th><th>label</th><th>contribution</th>"
            f"<th>fraction</th></tr>{rows_c}</table>"]
    if ex.groups is not None:
        g = ex.groups
        figs = "".join(
            f'<figure><img src="group-{i}.png" alt="group {i}"><figcaption><b>'
            f"{esc(lab)}</b><br>" + ", ".join(
                f"{link(u, lab_u)} {share:.2f}" for u, share, lab_u in top_i)
            + "</figcaption></figure>"
            for i, (lab, top_i) in enumerate(zip(g.labels, g.top, strict=True)))
        parts += ["<h2>Neuron groups</h2>",
                  f"<p>NMF of the {h * w} positions x {g.factors.shape[1]} units into "
                  f"{len(g.labels)} groups (reconstruction error {100 * g.error:.1f}%); each "
                  "is named by its most weighted labelled units (share of the group's "
                  "factor).</p>",
                  f"<div class=views>{figs}</div>"]
    parts.append("</main>")
    page = folder / "index.html"
    atomic_write_text(page, (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc('dnd explain: ' + ex.image.name)}</title>"
        f"<style>{CSS}{PAGE_CSS}</style></head>\n<body>{''.join(parts)}</body></html>\n"),
        durable=False)
    return page


# ---------------------------------------------------------------------------- CLI


def add_cli(sub) -> None:
    """Register ``dnd explain IMAGE [IMAGE ...] --run RUN_DIR``."""
    p = sub.add_parser(
        "explain", help="explain images in words with a run's labels (Building Blocks views)",
        description="For each image: the top labelled units at every position of a layer "
        "(semantic dictionary), integrated gradients of a class or unit to the pixels, the "
        "contributions of the layer's units to a unit of a later layer in words, and NMF "
        "groups of the layer's units with their labels. Writes RUN_DIR/explain/<image "
        "stem>/index.html (with its images and explanation.json) and prints its path.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="a run directory made by dnd describe")
    p.add_argument("--layer", help="the layer of the dictionary and the groups, and layer A "
                   "of the channel attribution (default: the run's layer, for a run of one)")
    p.add_argument("--next-layer", help="a later layer B: show what --layer's units "
                   "contribute to one of its units (default: no channel attribution)")
    p.add_argument("--next-unit", type=int, help="that unit of --next-layer (default: its "
                   "top labelled unit on the image, or its top unit when none is labelled)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--class", dest="klass", metavar="C", help="attribute this class "
                       "(index or name) to the pixels (default: the top class when the model "
                       "has class names, else the top labelled unit of --layer)")
    which.add_argument("--unit", type=int, help="attribute this unit of --layer (its "
                       "summary activation, as the run summarises it) instead")
    p.add_argument("--groups", type=int, default=None, metavar="N",
                   help=f"NMF groups of the layer's units; 0 for none (default "
                   f"{DEFAULT_GROUPS} on a spatial layer, none on a linear one)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K",
                   help=f"units shown per position and per group (default {DEFAULT_TOP})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="S",
                   help=f"integrated-gradients steps (default {DEFAULT_STEPS})")
    p.add_argument("--baseline", choices=BASELINES, default="black",
                   help="reference image of the pixel attribution: black, or the "
                   "normalisation's mean colour (default black)")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: the run's device)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    stems = [safe_name(Path(i).stem) for i in args.images]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"images with the same file stem ({', '.join(dup)}) would share "
                         "one explain folder: rename or explain them one at a time")
    explainer = Explainer(args.run, args.layer, args.next_layer, args.device, args.baseline)
    for image in args.images:
        ex = explainer.explain(image, klass=args.klass, unit=args.unit,
                               next_unit=args.next_unit, groups=args.groups, top=args.top,
                               steps=args.steps)
        print(ex.page)
    return 0
