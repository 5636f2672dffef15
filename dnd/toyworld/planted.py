"""Planted units: hidden channels of the ``toyworld-planted`` target whose concept is known.

``PLANTED`` lists which channel of which layer was trained (``train.py --only planted``,
an auxiliary loss next to the classification loss) to fire on which concept(s), and
:func:`planted_indicator` says, from a scene's description alone, whether a scene should
fire a unit. Every other channel is free (trained only by the classification loss).

Concepts are names of the toy world's vocabulary (``world.py``):

- an object concept: a colour ("red"), a shape ("circle") or a class name ("red circle");
  present when ANY object of the scene (main object or distractor) matches it;
- a background kind ("striped"): present when the scene's background is of that kind;
- ``"text"``: present when a word is rendered (whatever the word and its colour);
- ``"small <object concept>"`` ("small star"): present when a distractor object (size
  "small", i.e. one of ``objects[1:]``, radius ``SMALL_RADIUS`` of the image side) matches
  the object concept; the main object never counts, however it looks.

How a unit's concepts combine, by ``kind``:

- ``monosemantic``: one object concept or background kind; fires iff it is present;
- ``polysemantic``: two unrelated concepts (object concepts or background kinds sharing no
  word); fires iff EITHER is present (OR);
- ``local``: one ``"small ..."`` concept; fires iff a distractor object matches it (the
  units of conv3, whose 22-px view cannot always see an object's size, also answer about
  half as strongly to a large object of their colour; those of conv4 do not);
- ``textual``: ``("text",)``; fires iff a word is rendered;
- ``compositional``: one object concept and one background kind; fires iff BOTH are
  present (AND): an object matching the first on a background of the second kind.

How the units were made to fire (``train.train_planted``): next to the classification
loss, each planted channel's pre-ReLU map (max-pooled like the block's output) is trained
with binary cross-entropy of its spatial max against :func:`planted_indicator`, of every
cell against :func:`planted_region` (fire on the concept's pixels, nowhere else). A
negative scene is pushed below zero at every cell, so after the ReLU its map is zero and
both summaries the pipeline offers rank it below the firing scenes, and every firing
scene's peak is drawn to one level, so a unit's concepts fire about equally strongly under
the max. The behaviour is stated for the spatial max (``SUMMARY``); the trained weights'
held-out AP per unit, under both summaries, is in ``weights/toy_planted.json``.

Planting concepts of one's own: a spec file (YAML or JSON, :func:`load_spec`) lists units
as ``{layer, unit, kind, concepts}``, e.g. ``eval/planted_heldout.yaml``;
``python -m dnd.toyworld.train --only planted --spec FILE --out DIR`` trains weights for it
and ``dnd tables --only toyworld_planted --spec FILE --weights DIR`` judges describers on
its units. ``PLANTED`` stays the default everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dnd.toyworld.world import BACKGROUND_KINDS, COLOURS, SHAPES, TEXT_CONCEPT, SceneSpec

if TYPE_CHECKING:
    from dnd.toyworld.render import Scene

KINDS: tuple[str, ...] = ("monosemantic", "polysemantic", "local", "textual", "compositional")
# The spatial summary the planted behaviour is stated for (``dnd.config`` ``summary``):
# every unit was trained on its map's max. Under the mean, the units of conv3 that fire on
# a small area (local, compositional) are weaker: a few weak cells on a large object of
# the same colour (a ring's band, a cross's arm, which conv3's 22-px view cannot tell from
# a small object) outweigh one small true object; and a polysemantic unit's background
# concept, which fills the map, outweighs its object concept (AP under both summaries is
# in weights/toy_planted.json).
SUMMARY = "max"
SMALL = "small "  # prefix of a local concept: only distractor-sized objects count


def _is_object_concept(concept: str) -> bool:
    """A colour, a shape, or a "colour shape" class name."""
    words = concept.split()
    if len(words) == 1:
        return words[0] in COLOURS or words[0] in SHAPES
    return len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES


def _object_matches(concept: str, colour: str, shape: str) -> bool:
    return concept in (colour, shape, f"{colour} {shape}")


@dataclass(frozen=True)
class PlantedUnit:
    """Channel ``unit`` of block ``layer`` of ToyCNN, trained to fire on ``concepts``
    combined as its ``kind`` says (module docstring). Invalid combinations raise."""

    layer: str
    unit: int
    kind: str
    concepts: tuple[str, ...]

    def __post_init__(self) -> None:
        concepts = self.concepts
        if not isinstance(concepts, tuple):
            raise TypeError(f"{self}: concepts must be a tuple of concept names")
        problem = _kind_problem(self.kind, concepts)
        if problem:
            raise ValueError(f"planted unit {self.layer}:{self.unit} ({self.kind}, "
                             f"{concepts}): {problem}")

    @property
    def name(self) -> str:
        """``layer:unit``, e.g. ``conv4:3``."""
        return f"{self.layer}:{self.unit}"


def _kind_problem(kind: str, concepts: tuple[str, ...]) -> str | None:
    """Why ``concepts`` do not fit ``kind`` (None when they do)."""
    if kind not in KINDS:
        return f"unknown kind; choose one of {', '.join(KINDS)}"
    plain = [c for c in concepts if _is_object_concept(c) or c in BACKGROUND_KINDS]
    if kind == "monosemantic":
        if len(concepts) != 1 or len(plain) != 1:
            return "needs one object concept or background kind"
    elif kind == "polysemantic":
        if len(concepts) != 2 or len(plain) != 2:
            return "needs two object concepts or background kinds"
        if set(concepts[0].split()) & set(concepts[1].split()):
            return "its two concepts must be unrelated (share no word)"
    elif kind == "local":
        if (len(concepts) != 1 or not concepts[0].startswith(SMALL)
                or not _is_object_concept(concepts[0][len(SMALL):])):
            return f"needs one '{SMALL}<colour|shape|colour shape>' concept"
    elif kind == "textual":
        if concepts != (TEXT_CONCEPT,):
            return f"needs exactly ({TEXT_CONCEPT!r},)"
    elif kind == "compositional":
        if (len(concepts) != 2 or not _is_object_concept(concepts[0])
                or concepts[1] not in BACKGROUND_KINDS):
            return "needs (object concept, background kind), e.g. ('blue', 'striped')"
    return None


def concept_present(concept: str, spec: SceneSpec) -> bool:
    """Whether ``concept`` (any form of the module docstring) holds in scene ``spec``."""
    if concept == TEXT_CONCEPT:
        return spec.text is not None
    if concept in BACKGROUND_KINDS:
        return spec.background.kind == concept
    if concept.startswith(SMALL) and _is_object_concept(concept[len(SMALL):]):
        inner = concept[len(SMALL):]
        return any(o.size == "small" and _object_matches(inner, o.colour, o.shape)
                   for o in spec.objects)
    if _is_object_concept(concept):
        return any(_object_matches(concept, o.colour, o.shape) for o in spec.objects)
    raise ValueError(f"unknown concept {concept!r}: use a colour, shape, 'colour shape', "
                     f"'{SMALL}<object concept>', a background kind or {TEXT_CONCEPT!r}")


def planted_indicator(unit: PlantedUnit, spec: SceneSpec) -> bool:
    """Whether scene ``spec`` should fire ``unit`` (OR for polysemantic, AND for
    compositional, the single concept otherwise; module docstring)."""
    present = [concept_present(c, spec) for c in unit.concepts]
    return all(present) if unit.kind == "compositional" else any(present)


def concept_region(concept: str, scene: Scene) -> np.ndarray:
    """bool [H, W]: the pixels of rendered ``scene`` where ``concept`` is: its matching
    objects' pixels (only distractors for ``"small ..."``), the background's pixels when
    the background is of that kind, the word's bounding box for ``"text"`` (the box, not
    the 1-px strokes); all False when the concept is absent."""
    spec = scene.description
    region = np.zeros(scene.masks[TEXT_CONCEPT].shape, dtype=bool)
    if concept == TEXT_CONCEPT:
        if spec.text is not None:
            x0, y0, x1, y1 = spec.text.bbox
            region[y0:y1, x0:x1] = True
        return region
    if concept in BACKGROUND_KINDS:
        return scene.masks[concept].copy() if spec.background.kind == concept else region
    small = concept.startswith(SMALL)
    inner = concept[len(SMALL):] if small else concept
    if not _is_object_concept(inner):
        concept_present(concept, spec)  # raises with the list of valid forms
    for o, mask in zip(spec.objects, scene.object_masks, strict=True):
        if (o.size == "small" or not small) and _object_matches(inner, o.colour, o.shape):
            region |= mask
    return region


def planted_region(unit: PlantedUnit, scene: Scene) -> np.ndarray:
    """bool [H, W]: where in ``scene`` the unit's concepts are (``concept_region``): their
    union, or for a compositional unit the object's pixels when the background matches.
    Empty exactly when ``planted_indicator`` is False (up to words or objects of no
    pixels, which the renderer never makes)."""
    if unit.kind == "compositional":
        if not planted_indicator(unit, scene.description):
            return np.zeros(scene.masks[TEXT_CONCEPT].shape, dtype=bool)
        return concept_region(unit.concepts[0], scene)
    regions = [concept_region(c, scene) for c in unit.concepts]
    return np.logical_or.reduce(regions)


def indicator_matrix(units: Sequence[PlantedUnit], specs: Sequence[SceneSpec]) -> np.ndarray:
    """bool [n_specs, n_units]: ``planted_indicator`` of every unit on every scene."""
    return np.array([[planted_indicator(u, s) for u in units] for s in specs],
                    dtype=bool).reshape(len(specs), len(units))


def _layer(layer: str, start: int, table: Sequence[tuple[str, tuple[str, ...]]]
           ) -> list[PlantedUnit]:
    """Consecutive channels ``start ..`` of ``layer`` planted as ``(kind, concepts)``."""
    return [PlantedUnit(layer, start + i, kind, concepts)
            for i, (kind, concepts) in enumerate(table)]


# Channels 0.. of each layer; the rest of each layer is free. After each unit: its positive
# rate (share of scenes that fire it) over renders 0..1999, from
# `python -c "from dnd.toyworld.planted import print_positive_rates; print_positive_rates()"`
# (the held-out rates are in weights/toy_planted.json). Concepts were chosen so that each
# rate is >= 3.5% and, per layer, so that the layer can see them: conjunctions pair a
# colour with a background texture (conjunctions with a shape, or with the sparse "dotted"
# and the slow "gradient" backgrounds, stayed near chance), conv3's local units are
# colours (its view is too small for small shapes), and polysemantic units join two
# frequent concepts (a class name such as "red circle", in 3% of scenes, peaked at half
# its partner's level, so its scenes never reached the unit's top images).
PLANTED: list[PlantedUnit] = [
    # conv2 sees 10 px (its receptive field after pooling): colours, textures and text
    # strokes, but not an object's size or a background beyond the object's edge, so it
    # has no local or compositional units (trained there, they stayed near chance).
    *_layer("conv2", 0, [
        ("monosemantic", ("red",)),  # 0.223
        ("monosemantic", ("noisy",)),  # 0.176
        ("polysemantic", ("yellow", "checkered")),  # 0.347
        ("polysemantic", ("green", "noisy")),  # 0.380
        ("textual", (TEXT_CONCEPT,)),  # 0.271
        ("textual", (TEXT_CONCEPT,)),  # 0.271
    ]),
    *_layer("conv3", 0, [
        ("monosemantic", ("blue",)),  # 0.227
        ("monosemantic", ("ring",)),  # 0.231
        ("monosemantic", ("checkered",)),  # 0.171
        ("monosemantic", ("striped",)),  # 0.177
        ("polysemantic", ("orange", "dotted")),  # 0.355
        ("polysemantic", ("yellow", "striped")),  # 0.367
        ("polysemantic", ("ring", "noisy")),  # 0.365
        ("local", ("small red",)),  # 0.118
        ("local", ("small purple",)),  # 0.126
        ("local", ("small green",)),  # 0.119
        ("textual", (TEXT_CONCEPT,)),  # 0.271
        ("textual", (TEXT_CONCEPT,)),  # 0.271
        ("textual", (TEXT_CONCEPT,)),  # 0.271
        ("compositional", ("red", "noisy")),  # 0.050
        ("compositional", ("green", "noisy")),  # 0.035
        ("compositional", ("blue", "noisy")),  # 0.037
    ]),
    *_layer("conv4", 0, [
        ("monosemantic", ("red",)),  # 0.223
        ("monosemantic", ("triangle",)),  # 0.237
        ("monosemantic", ("dotted",)),  # 0.156
        ("monosemantic", ("ring",)),  # 0.231
        ("polysemantic", ("circle", "striped")),  # 0.362
        ("polysemantic", ("green", "checkered")),  # 0.368
        ("polysemantic", ("star", "noisy")),  # 0.365
        ("polysemantic", ("cross", "gradient")),  # 0.369
        ("local", ("small star",)),  # 0.117
        ("local", ("small yellow",)),  # 0.117
        ("local", ("small cross",)),  # 0.122
        ("local", ("small blue",)),  # 0.110
        ("textual", (TEXT_CONCEPT,)),  # 0.271
        ("textual", (TEXT_CONCEPT,)),  # 0.271
        ("textual", (TEXT_CONCEPT,)),  # 0.271
        ("compositional", ("blue", "striped")),  # 0.042
        ("compositional", ("yellow", "checkered")),  # 0.046
        ("compositional", ("purple", "checkered")),  # 0.040
        ("compositional", ("pink", "noisy")),  # 0.037
    ]),
]


# The ToyCNN blocks a unit may be planted in, in network order (``target.ToyCNN``).
LAYERS: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4")


def planted_layers(units: Sequence[PlantedUnit] = PLANTED) -> list[str]:
    """The layers with planted units among ``units`` (default: ``PLANTED``), in network
    order."""
    present = {u.layer for u in units}
    return [layer for layer in LAYERS if layer in present]


def units_of(layer: str, units: Sequence[PlantedUnit] = PLANTED) -> list[PlantedUnit]:
    """The planted units of ``layer`` among ``units`` (default: ``PLANTED``), by channel."""
    return sorted((u for u in units if u.layer == layer), key=lambda u: u.unit)


# ---------------------------------------------------------------------------- spec files

SPEC_KEYS: tuple[str, ...] = ("layer", "unit", "kind", "concepts")


def spec_to_dicts(units: Sequence[PlantedUnit]) -> list[dict]:
    """``units`` as the mappings of a spec file (:func:`load_spec`): layer, unit, kind and
    the list of concepts, in order."""
    return [{"layer": u.layer, "unit": u.unit, "kind": u.kind, "concepts": list(u.concepts)}
            for u in units]


def _spec_entries(raw: object, where: str) -> list:
    """The list of unit mappings of a parsed spec file: the file itself or its ``units``."""
    if isinstance(raw, dict):
        extra = sorted(set(raw) - {"units"})
        if extra or "units" not in raw:
            raise ValueError(f"{where}: a mapping at the top must hold only 'units' (the list "
                             f"of planted units), got key(s) {', '.join(map(str, raw)) or 'none'}")
        raw = raw["units"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: expected a non-empty list of planted units, each "
                         f"{{layer, unit, kind, concepts}} (or {{units: [...]}}), got "
                         f"{type(raw).__name__ if raw else 'nothing'}")
    return raw


def _spec_unit(entry: object, what: str, widths: dict[str, int]) -> PlantedUnit:
    """One validated unit of a spec file; ``what`` names the file and entry in errors."""
    if not isinstance(entry, dict):
        raise ValueError(f"{what}: expected a mapping with keys {', '.join(SPEC_KEYS)}, "
                         f"got {entry!r}")
    unknown = sorted(map(str, set(entry) - set(SPEC_KEYS)))
    missing = [k for k in SPEC_KEYS if k not in entry]
    if unknown or missing:
        raise ValueError(f"{what}: " + "; ".join(
            ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
            + ([f"missing key(s) {', '.join(missing)}"] if missing else []))
            + f"; each unit has exactly {', '.join(SPEC_KEYS)}")
    layer, unit, kind, concepts = (entry[k] for k in SPEC_KEYS)
    if layer not in widths:
        raise ValueError(f"{what}: ToyCNN has no layer {layer!r}; choose one of "
                         f"{', '.join(widths)}")
    if isinstance(unit, bool) or not isinstance(unit, int) or not 0 <= unit < widths[layer]:
        raise ValueError(f"{what}: unit must be a channel index 0..{widths[layer] - 1} of "
                         f"{layer} ({widths[layer]} channels), got {unit!r}")
    if not isinstance(kind, str):
        raise ValueError(f"{what}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if (not isinstance(concepts, list) or not concepts
            or not all(isinstance(c, str) for c in concepts)):
        raise ValueError(f"{what}: concepts must be a list of concept names, e.g. [red] or "
                         f"[blue, striped], got {concepts!r}")
    try:
        return PlantedUnit(layer, unit, kind, tuple(concepts))
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def load_spec(path: str | Path, widths: Sequence[int] | None = None) -> list[PlantedUnit]:
    """The planted units of a YAML or JSON spec file, in file order.

    The file holds a list of ``{layer, unit, kind, concepts}`` mappings, or ``{units:
    [...]}`` with that list: ``layer`` one of ``conv1``..``conv4``, ``unit`` a channel index
    below the layer's width (``widths``: ToyCNN's channels per block, default
    ``target.DEFAULT_WIDTHS``, the width every trained ToyCNN has), ``kind`` and
    ``concepts`` as the module docstring says. Raises ValueError naming the file and the
    entry for anything else, and for a (layer, unit) given twice."""
    import json

    import yaml

    from dnd.toyworld.target import DEFAULT_WIDTHS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"planted spec not found: {path}")
    text = path.read_text()
    try:  # JSON is read by its own parser: its error messages point at JSON syntax
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}"
                         f": {e}") from None
    layer_widths = dict(zip(LAYERS, widths or DEFAULT_WIDTHS, strict=True))
    units, seen = [], {}
    for i, entry in enumerate(_spec_entries(raw, str(path))):
        name = (f" ({entry.get('layer')}:{entry.get('unit')})" if isinstance(entry, dict)
                else "")
        unit = _spec_unit(entry, f"{path}, unit {i + 1}{name}", layer_widths)
        if unit.name in seen:
            raise ValueError(f"{path}, unit {i + 1}: {unit.name} is already planted by unit "
                             f"{seen[unit.name]}; give each (layer, unit) once")
        seen[unit.name] = i + 1
        units.append(unit)
    return units


def positive_rates(units: Sequence[PlantedUnit], specs: Sequence[SceneSpec]) -> np.ndarray:
    """float [n_units]: share of ``specs`` that fire each unit."""
    return indicator_matrix(units, specs).mean(0)


def print_positive_rates(n: int = 2000, units: Sequence[PlantedUnit] = PLANTED) -> None:
    """Print every planted unit of ``units`` (default: ``PLANTED``; or a spec's,
    :func:`load_spec`) with its positive rate over the scenes of seeds 0..n-1."""
    from dnd.toyworld.render import sample_spec

    specs = [sample_spec(np.random.default_rng(seed)) for seed in range(n)]
    for unit, rate in zip(units, positive_rates(units, specs), strict=True):
        print(f"{unit.name:9s} {unit.kind:14s} {' | '.join(unit.concepts):22s} {rate:.3f}")


# ---------------------------------------------------------------------------- measuring


def channel_summaries(model, images: np.ndarray, channels: Sequence[tuple[str, int]],
                      batch_size: int = 256) -> dict[str, np.ndarray]:
    """Spatial ``mean`` and ``max`` of each ``(layer, channel)`` map as the pipeline sees it
    (the block's output: after ReLU and pooling): float [n_images, n_channels] each, for a
    ToyCNN ``model`` (put in eval mode) on uint8 ``images`` [n, 64, 64, 3]."""
    import torch

    from dnd.target import capture
    from dnd.toyworld.target import preprocess

    model.eval()
    modules = {layer: model.get_submodule(layer) for layer, _ in channels}
    means, maxes = [], []
    with torch.no_grad(), capture(model, modules) as outputs:
        for start in range(0, len(images), batch_size):
            model(preprocess(images[start : start + batch_size]))
            maps = [outputs[layer][:, c] for layer, c in channels]  # each [b, h, w]
            means.append(torch.stack([m.mean((1, 2)) for m in maps], 1))
            maxes.append(torch.stack([m.amax((1, 2)) for m in maps], 1))
    return {"mean": torch.cat(means).numpy(), "max": torch.cat(maxes).numpy()}


def planted_summaries(model, images: np.ndarray, units: Sequence[PlantedUnit] = PLANTED,
                      batch_size: int = 256) -> dict[str, np.ndarray]:
    """``channel_summaries`` of ``units``' channels: {"mean", "max"} [n_images, n_units]."""
    return channel_summaries(model, images, [(u.layer, u.unit) for u in units], batch_size)


def planted_report(model, images: np.ndarray, specs: Sequence[SceneSpec],
                   units: Sequence[PlantedUnit] = PLANTED) -> list[dict]:
    """Per unit: layer, unit, kind, concepts, the positive rate of its indicator on
    ``specs`` and the average precision against it of its ``SUMMARY`` (``ap``) and of its
    mean and max summaries (``planted_summaries``)."""
    from dnd.toyworld.groundtruth import average_precision

    acts = planted_summaries(model, images, units)
    truth = indicator_matrix(units, specs)
    rows = []
    for i, u in enumerate(units):
        aps = {s: round(average_precision(acts[s][:, i], truth[:, i]), 4) for s in acts}
        rows.append({"layer": u.layer, "unit": u.unit, "kind": u.kind,
                     "concepts": list(u.concepts),
                     "positive_rate": round(float(truth[:, i].mean()), 4),
                     "ap": aps[SUMMARY], "ap_mean": aps["mean"], "ap_max": aps["max"]})
    return rows


def train_command(spec: str | Path, out: str | Path) -> str:
    """The command that trains ``toyworld-planted`` weights for the units of ``spec`` into
    folder ``out`` (quoted for a shell)."""
    import shlex

    return (f"python -m dnd.toyworld.train --only planted --spec {shlex.quote(str(spec))} "
            f"--out {shlex.quote(str(out))}")
