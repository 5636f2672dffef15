"""The Building Blocks' views of one image: what a network's units do there, in words.

The Building Blocks of Interpretability (Olah et al. 2018) pair a network's activations on
one image with what its units mean (here a run's DnD labels: unit -> Label 1). Each view
works on the network's view of the image (``x``: preprocessed by the target's own
preprocessing, ``crop`` x ``crop`` pixels):

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

Baselines. Pixel attributions integrate from a reference image (:func:`baseline_image`):
``black`` (default; the black image through the target's normalisation, Sundararajan et
al.'s usual choice: pixels equal to it get no attribution) or ``mean`` (the
normalisation's mean colour, a zero tensor after normalisation). Channel attributions
integrate from A's units all off (zero activations), the reference the Building Blocks'
activation x gradient assumes (it is the one-step version of the same integral);
contributions then sum to f_b(x) - f_b(A = 0).

:mod:`dnd.explain` runs them on a finished run (``dnd explain``) and writes the page.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dnd.target import Target, capture, position_sum, split_output

BASELINES = ("black", "mean")
DEFAULT_GROUPS = 4
DEFAULT_TOP = 3
DEFAULT_STEPS = 50  # Gauss-Legendre points: completeness within 0.5% on the toy CNN
DEFAULT_BATCH = 16  # interpolated images per forward pass inside integrated gradients
NMF_ITER = 1000     # at most, scikit-learn's coordinate-descent NMF solver


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
        parts = [f"{unit_name(lab, units[0])} {frac:.2f}"
                 + (f" ({len(units)} units)" if len(units) > 1 else "")
                 for lab, frac, units in self.by_label()[:n]]
        return f"{self.layer_b} {unit_name(self.label_b, self.unit_b)} <- {self.layer_a} " + \
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


def unit_name(label: str | None, unit: int) -> str:
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


def spatial_maps(out: torch.Tensor, target: Target) -> torch.Tensor:
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


def order_error(layer_a: str, layer_b: str) -> str:
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
            raise ValueError(order_error(layer_a, layer_b))
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
