"""`dnd explain IMAGE --run RUN_DIR`: one image explained in words, on a finished run.

:class:`Explainer` loads the run's target once and computes the Building Blocks' four views
of any number of images with the run's labels (:mod:`dnd.blocks`: the semantic dictionary,
spatial and channel attribution, neuron groups); :func:`explain` is the one-image shortcut.
Each explanation is written as a static page, ``RUN_DIR/explain/<image stem>/index.html``,
with its PNG images and ``explanation.json`` beside it, linking each unit to its page of the
run's report when that exists. :func:`add_cli` registers the command.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dnd.blocks import (
    BASELINES,
    DEFAULT_BATCH,
    DEFAULT_GROUPS,
    DEFAULT_STEPS,
    DEFAULT_TOP,
    ChannelAttribution,
    Explanation,
    SemanticDictionary,
    baseline_image,
    channel_attribution,
    class_output,
    layer_outputs,
    neuron_groups,
    order_error,
    semantic_dictionary,
    spatial_attribution,
    spatial_maps,
    unit_name,
    unit_output,
)
from dnd.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from dnd.store import RunStore, safe_name
from dnd.target import split_output

DISPLAY_PX = 256    # the page's images are upscaled (nearest) to at least this side


# ---------------------------------------------------------------------------- explainer


def _labels(store: RunStore, layer: str) -> dict[int, str]:
    """unit -> Label 1 of ``layer``'s records that have one."""
    return {r.unit: r.labels[0] for r in store.records(layer) if r.labels}


class Explainer:
    """The views of :mod:`dnd.blocks` on a finished run: the target (loaded once), its
    preprocessing, the run's summary and every layer's labels.

    ``layer``: the layer of the dictionary and the groups (default: the run's, for a run
    of one layer); ``next_layer``: a later layer B for the channel attribution (None: no
    channel attribution; B need not be described, its units are then unlabelled);
    ``device``: default the run's; ``baseline``: ``black`` or ``mean`` (:mod:`dnd.blocks`).
    """

    def __init__(self, run_dir: str | Path, layer: str | None = None,
                 next_layer: str | None = None, device: str | None = None,
                 baseline: str = "black", batch: int = DEFAULT_BATCH):
        from dnd.backends.base import resolve_device
        from dnd.dictionary.attach import attach_configured
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
                raise ValueError(order_error(self.layer, next_layer))
            self.next_labels = _labels(self.store, next_layer)

    def tensor(self, image: Image.Image) -> tuple[torch.Tensor, Image.Image]:
        """The network's input [1, 3, crop, crop] and the view it sees."""
        view, _ = self.target.preprocess.view(image)
        return self.target.preprocess.to_tensor(view)[None].to(self.target.device), view

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s maps [C, h, w] on ``x`` and the model output [1, ...]."""
        outs, final = layer_outputs(self.target, x, [self.layer])
        return spatial_maps(outs[self.layer], self.target), final

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
                f"{self.layer} unit {unit} {unit_name(self.labels.get(unit), unit)} "
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
    from dnd.report.html import esc

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
    from dnd.report.html import esc

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
