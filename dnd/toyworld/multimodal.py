"""The multimodal check: does a unit respond to its concept both drawn and written?

For a unit of a target that sees toy-world scenes (the toy CLIP's image tower,
``toyworld-clip``): its mean activation on renders of a concept as an object or background,
on renders of the concept written as a word (the renderer writes any word of up to 10
characters in its bitmap font; the world's colour, shape and background-kind names all
fit), and on controls without the concept (no word; another word). See
:func:`multimodal_check` for the rule. The toy CLIP offers it to ``dnd featurevis``'s text
part through :attr:`dnd.target.ClipModel.multimodal` (:func:`run_check`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dnd.target import Target, capture, split_output
from dnd.toyworld.render import render_request
from dnd.toyworld.world import (
    BACKGROUND_KINDS,
    COLOURS,
    SHAPES,
    WORDS,
    ObjectRequest,
    SceneRequest,
)

MULTIMODAL_THRESHOLD = 1.0   # in standard deviations of the unit over ordinary scenes


def multimodal_concepts() -> list[str]:
    """The concepts the check can render both ways: colours, shapes, background kinds
    (single words of at most 9 letters, all of which the renderer can write)."""
    return [*COLOURS, *SHAPES, *BACKGROUND_KINDS]


@dataclass(frozen=True)
class MultimodalResponse:
    """A unit's mean activation on ``n`` renders each of its ``concept`` as an object or
    background (``object``), written as a word with the concept absent (``word``), scenes
    without the concept and without a word (``control``) and scenes without the concept
    with another word (``other_word``). ``spread``: the unit's standard deviation over
    ordinary scenes without words; ``object_z = (object - control) / spread``,
    ``word_z = (word - other_word) / spread``; ``both``: both >= the threshold."""

    unit: int
    concept: str
    object: float
    word: float
    control: float
    other_word: float
    spread: float
    object_z: float
    word_z: float
    both: bool

    def to_json(self) -> dict:
        return asdict(self)


def _has(scene, concept: str) -> bool:
    if concept in BACKGROUND_KINDS:
        return scene.description.background.kind == concept
    return bool(scene.masks[concept].any())


def _renders(request_fn, keep, n: int, seed: int, what: str) -> list:
    """``n`` renders of ``request_fn(s)`` that pass ``keep``, from seeds ``s = seed,
    seed+1, ...``."""
    out, s = [], seed
    while len(out) < n:
        if s - seed > 50 * n:
            raise RuntimeError(f"could not render {n} scenes of {what}")
        try:
            scene = render_request(request_fn(s), s)
        except RuntimeError:  # a requested word or object did not fit
            scene = None
        s += 1
        if scene is not None and keep(scene):
            out.append(scene)
    return out


def _check_concept(concept: str) -> None:
    if concept not in multimodal_concepts():
        raise ValueError(f"multimodal check: unknown concept {concept!r}; choose one of "
                         f"{', '.join(multimodal_concepts())}")


def concept_scenes(concept: str, n: int = 24, seed: int = 0) -> dict[str, list]:
    """Renders of ``concept`` for the check: {"object", "word"} (see
    :class:`MultimodalResponse`); the seeds depend on the concept, not on other concepts."""
    _check_concept(concept)
    if concept in COLOURS:
        obj = SceneRequest(objects=(ObjectRequest(colour=concept),), text="")
    elif concept in SHAPES:
        obj = SceneRequest(objects=(ObjectRequest(shape=concept),), text="")
    else:
        obj = SceneRequest(background_kind=concept, text="")
    base = seed + 1_000_003 * (1 + multimodal_concepts().index(concept))
    return {"object": _renders(lambda _: obj, lambda s: True, n, base, f"a {concept} object"),
            "word": _renders(lambda _: SceneRequest(text=concept),
                             lambda s: not _has(s, concept), n, base + 500_000,
                             f"the word {concept!r} without the concept")}


def control_scenes(n: int = 256, seed: int = 0) -> dict[str, list]:
    """Ordinary scenes without a word ("control") and with one of the toy world's own words
    ("other_word": cat, dog, ...), shared by every concept (each keeps those without it)."""
    return {"control": _renders(lambda _: SceneRequest(text=""), lambda s: True, n,
                                seed + 7_000_000, "control scenes"),
            "other_word": _renders(lambda s: SceneRequest(text=WORDS[s % len(WORDS)]),
                                   lambda s: True, n, seed + 8_000_000, "scenes with a word")}


def scene_activations(target: Target, layer: str, scenes: Sequence, summary: str,
                 batch: int = 128) -> np.ndarray:
    """Summary activations [len(scenes), n_units] of ``layer`` on rendered ``scenes``."""
    rows = []
    with torch.no_grad(), capture(target.module, {layer: target.layer(layer)}) as outs:
        for i in range(0, len(scenes), batch):
            x = torch.stack([target.preprocess(s.image) for s in scenes[i:i + batch]])
            target.module(x.to(target.device))
            rows.append(split_output(outs[layer], summary, target.num_prefix_tokens)[0]
                        .float().cpu().numpy())
    return np.concatenate(rows)


@dataclass
class MultimodalTable:
    """Mean activations per concept and unit: ``object``, ``word``, ``control``,
    ``other_word`` [len(concepts), len(units)] and ``spread`` [len(units)] (see
    :class:`MultimodalResponse`)."""

    units: list[int]
    concepts: list[str]
    object: np.ndarray
    word: np.ndarray
    control: np.ndarray
    other_word: np.ndarray
    spread: np.ndarray

    @property
    def object_z(self) -> np.ndarray:
        return (self.object - self.control) / self.spread

    @property
    def word_z(self) -> np.ndarray:
        return (self.word - self.other_word) / self.spread

    def response(self, j: int, concept: str,
                 threshold: float = MULTIMODAL_THRESHOLD) -> MultimodalResponse:
        """Unit ``units[j]``'s response to ``concept``."""
        c = self.concepts.index(concept)
        oz, wz = float(self.object_z[c, j]), float(self.word_z[c, j])
        return MultimodalResponse(
            self.units[j], concept, float(self.object[c, j]), float(self.word[c, j]),
            float(self.control[c, j]), float(self.other_word[c, j]), float(self.spread[j]),
            oz, wz, bool(oz >= threshold and wz >= threshold))


def multimodal_table(target: Target, layer: str, units: Sequence[int],
                     concepts: Sequence[str] | None = None, *, n: int = 24,
                     n_control: int = 256, seed: int = 0, summary: str = "mean"
                     ) -> MultimodalTable:
    """The renders of :func:`multimodal_check` for ``concepts`` (default: all of
    :func:`multimodal_concepts`), every unit's mean activation on each."""
    units = [int(u) for u in units]
    concepts = list(dict.fromkeys(concepts or multimodal_concepts()))
    for c in concepts:
        _check_concept(c)
    ctrl = control_scenes(n_control, seed)
    acts = {k: scene_activations(target, layer, v, summary)[:, units] for k, v in ctrl.items()}
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("object", "word", "control",
                                                         "other_word")}
    for c in concepts:
        sc = concept_scenes(c, n, seed)
        for k in ("object", "word"):
            rows[k].append(scene_activations(target, layer, sc[k], summary)[:, units].mean(0))
        for k, scenes in ctrl.items():
            without = np.array([not _has(s, c) for s in scenes])
            rows[k].append(acts[k][without].mean(0))
    return MultimodalTable(units, concepts, *(np.stack(rows[k]) for k in rows),
                           spread=acts["control"].std(0).clip(min=1e-6))


def multimodal_check(target: Target, layer: str, units: Sequence[int],
                     concepts: Mapping[int, str | Sequence[str]] | None = None, *,
                     n: int = 24, n_control: int = 256, seed: int = 0, summary: str = "mean",
                     threshold: float = MULTIMODAL_THRESHOLD) -> list[MultimodalResponse]:
    """Does each unit respond to its concept both as a thing and as a written word?

    ``concepts``: unit -> its concept, or a list of concepts to choose from (one of
    :func:`multimodal_concepts` each); a unit's concept is the given one, else among the
    given (or, for a unit left out, among all) the one with the largest ``object_z`` (its
    preferred concept in the toy world). Per concept: ``n`` renders with it as the main
    object's colour or shape or as the background kind and no word; ``n`` renders of its
    name written by the renderer (black or white bitmap letters) with the concept absent
    from the picture. Controls: ``n_control`` ordinary scenes without a word and as many
    with one of the toy world's own words ("cat", "dog", ...), each concept keeping those
    without it.

    Rule: a unit **responds to both** when ``object_z >= threshold`` and
    ``word_z >= threshold`` (default 1.0): its mean moves by at least one standard
    deviation of its activation over ordinary scenes, for the picture against scenes
    without the concept, and for the written word against scenes with some other word
    (so a unit that fires on any text does not count as reading the word).
    """
    units = [int(u) for u in units]
    concepts = dict(concepts or {})
    choices = {u: ([concepts[u]] if isinstance(concepts.get(u), str)
                   else list(concepts.get(u) or multimodal_concepts())) for u in units}
    needed = sorted({c for cs in choices.values() for c in cs})
    table = multimodal_table(target, layer, units, needed, n=n, n_control=n_control,
                             seed=seed, summary=summary)
    oz = table.object_z
    out = []
    for j, u in enumerate(units):
        best = max(choices[u], key=lambda c, j=j: oz[table.concepts.index(c), j])
        out.append(table.response(j, best, threshold))
    return out


def run_check(target: Target, layer: str, units: Sequence[int], labels: Mapping[int, str], *,
              summary: str = "mean", seed: int = 0) -> dict[int, dict]:
    """:func:`multimodal_check` of ``units`` as ``dnd featurevis`` runs it: a unit's concept
    is one its Label 1 (``labels``: unit -> Label 1) names (keyword match), else its
    preferred one. Unit -> the result as saved (JSON), with the threshold it used."""
    from dnd.toyworld.groundtruth import mentions

    concepts = {}
    for unit in units:
        named = [c for c in multimodal_concepts() if unit in labels
                 and mentions(labels[unit], c)]
        if named:
            concepts[unit] = named
    return {r.unit: {**r.to_json(), "threshold": MULTIMODAL_THRESHOLD}
            for r in multimodal_check(target, layer, units, concepts, summary=summary,
                                      seed=seed)}
