"""Judging the planted-unit benchmark: the two judges, the scores, and each method's labels.

The planted channels of that target (:data:`dnd.toyworld.planted.PLANTED`) were trained to
fire on known concepts, so every label of theirs can be judged exactly; a few free
channels per layer are judged too, by the toy world's AP ground truth (as in
:mod:`dnd.benchmarks.toyworld`: only units a concept clearly explains, AP >= 0.5).

Judges (each number of the table names the one it uses):

- ``keyword``: the demo's keyword match with synonyms (:func:`dnd.toyworld.groundtruth.mentions`:
  a label names a concept when it names every word of it, each through any synonym). A
  label is correct when it names ONE of the unit's concepts: either concept of a
  polysemantic unit, either part of a compositional one.
- ``strict``: the same, except that a compositional unit's label must name EVERY part
  ("blue object on stripes"; "blue" alone is wrong), and that the label may name no other
  concept of the toy world (colour, shape, background kind, text) than the unit's own:
  "red star" is wrong for a unit that fires on everything red. Without that second rule a
  whole-scene caption ("a red star and a blue ring on a striped background") would be
  right for most units at once, and the top images' raw captions would beat every method.
  Free units are judged by the keyword rule under both judges: their AP truth is only the
  single concept that explains them best, and such a unit may well fire on "pink cross"
  rather than on everything pink.

A local unit's concept is judged without its "small" (a "small star" unit is named by
"star"): the concept is the object, and whether a caption calls a distractor small is the
captioner's habit, not the unit's.

Scores, per method:

- Label 1 correct, per unit kind and per layer (strict judge; compositional units also
  with the keyword judge);
- polysemantic recall: both concepts named among Labels 1-3 (keyword judge, any label);
- Labels 2-3 precision: the share of secondary labels of planted units naming one of the
  unit's concepts (keyword judge: any part of a compositional unit);
- calibration: AUROC of the interpretability score (``UnitRecord.scoring``) as a predictor
  of "Label 1 correct" (strict judge), over planted units and over every judged unit (DnD
  runs only: the other rows have no score of their own label);
- 95% percentile bootstrap intervals, units resampled (seeded): each method's Label 1
  accuracy per kind, and the paired difference full DnD minus each other row.

Methods and their Labels 1-3:

- the DnD runs of :func:`dnd.benchmarks.toyworld.dnd_runs` on ``toyworld-planted``: the
  ``toyworld`` preset (consensus summariser), no attention crops (``crop.max_crops 0``)
  and, with ``llm``, the LLM summariser rows (slower): their labels;
- no best-concept selection: the full run's first three candidates, in summariser order;
- activation rank only: the full run's candidates ordered by their rank score alone
  (ALGORITHM.md Step 3.3: how strongly their generated images fire the unit), without the
  CLIP image-product weight of Step 3.4-3.5;
- no summariser: the full run's captions of its top activating images (distinct, first 3);
- CLIP-Dissect with the toy CLIP over :func:`dnd.benchmarks.toyworld.concept_set`: its
  three best concepts;
- a constant label: the concept most common among the layer's judged units.

:mod:`dnd.benchmarks.planted` runs the methods and writes the tables.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dnd.record import UnitRecord
from dnd.toyworld.groundtruth import mentions

KEYWORD, STRICT = "keyword", "strict"
JUDGES = (KEYWORD, STRICT)
FREE = "free"  # kind of an unplanted unit, judged by its AP ground truth


# ----------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Truth:
    """What unit ``unit`` of ``layer`` is known to respond to: its ``kind`` (a planted kind
    or :data:`FREE`) and the ``concepts`` a label may name (``small`` already dropped from
    a local unit's concept)."""

    layer: str
    unit: int
    kind: str
    concepts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.concepts or not all(isinstance(c, str) and c for c in self.concepts):
            raise ValueError(f"truth of {self.layer}:{self.unit} needs non-empty concept "
                             f"names, got {self.concepts!r}")

    @classmethod
    def of_planted(cls, unit) -> Truth:
        """The truth of a :class:`dnd.toyworld.planted.PlantedUnit`."""
        from dnd.toyworld.planted import SMALL

        concepts = tuple(c.removeprefix(SMALL) if unit.kind == "local" else c
                         for c in unit.concepts)
        return cls(unit.layer, unit.unit, unit.kind, concepts)

    @property
    def text(self) -> str:
        """e.g. ``polysemantic: red circle | striped`` (``&`` joins compositional parts)."""
        joiner = " & " if self.kind == "compositional" else " | "
        return f"{self.kind}: {joiner.join(self.concepts)}"


def _check_judge(judge: str) -> None:
    if judge not in JUDGES:
        raise ValueError(f"unknown judge {judge!r}; choose one of {', '.join(JUDGES)}")


def label_correct(label: str, truth: Truth, judge: str = STRICT) -> bool:
    """Whether ``label`` names ``truth`` under ``judge`` (module docstring): one of its
    concepts; with the strict judge, for a planted unit, every part of a compositional
    one and nothing else (:func:`other_concepts` empty)."""
    _check_judge(judge)
    hits = [mentions(label, c) for c in truth.concepts]
    if judge == KEYWORD or truth.kind == FREE:
        return any(hits)
    named = all(hits) if truth.kind == "compositional" else any(hits)
    return named and not other_concepts(label, truth)


def both_named(labels: Sequence[str], truth: Truth) -> bool:
    """Whether Labels 1-3 (``labels[:3]``) name every concept of ``truth`` between them
    (polysemantic recall; keyword judge)."""
    return all(any(mentions(x, c) for x in labels[:3]) for c in truth.concepts)


def other_concepts(label: str, truth: Truth) -> tuple[str, ...]:
    """The toy world's concepts (colours, shapes, background kinds, text) that ``label``
    names (keyword match) and ``truth`` does not: how over-specific a label is. The strict
    judge counts a label naming any as wrong; the keyword judge does not, so under it a
    whole-scene caption ("a blue square on a striped gray background") can be right for
    several different units at once."""
    from dnd.toyworld.world import concept_names

    own = {w for c in truth.concepts for w in c.split()}
    return tuple(c for c in concept_names() if c not in own and mentions(label, c))


@dataclass(frozen=True)
class Judged:
    """One method's Labels 1-3 of one unit, with its truth and, for DnD runs, the unit's
    interpretability score and Label 1's confidence (None when the method has none or the
    unit got none), and its candidates (empty when the method has none)."""

    truth: Truth
    labels: tuple[str, ...]
    interpretability: float | None = None
    confidence: float | None = None
    candidates: tuple[str, ...] = ()

    @property
    def offered(self) -> bool:
        """A candidate names the unit's concept (strict judge, as Label 1 would be): the
        summariser put the right answer on the table."""
        return any(label_correct(c, self.truth, STRICT) for c in self.candidates)

    def correct(self, judge: str = STRICT) -> bool:
        """Label 1 is correct under ``judge`` (False when there is no Label 1)."""
        return bool(self.labels) and label_correct(self.labels[0], self.truth, judge)

    @property
    def both(self) -> bool:
        return both_named(self.labels, self.truth)

    @property
    def over_specific(self) -> bool:
        """Label 1 names a concept the unit does not have (:func:`other_concepts`)."""
        return bool(self.labels) and bool(other_concepts(self.labels[0], self.truth))

    @property
    def secondary(self) -> tuple[bool, ...]:
        """Per Label 2-3: names one of the unit's concepts (keyword judge)."""
        return tuple(label_correct(x, self.truth, KEYWORD) for x in self.labels[1:3])


# ----------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class Rate:
    """``hits`` of ``n``, with the 95% bootstrap interval of hits / n (None: not computed)."""

    hits: int
    n: int
    low: float | None = None
    high: float | None = None

    @property
    def value(self) -> float | None:
        return self.hits / self.n if self.n else None

    def cell(self) -> str:
        """``17/19 (89%)``, ``17/19 (89%) [74, 100]`` with an interval, ``-`` when empty."""
        if not self.n:
            return "-"
        text = f"{self.hits}/{self.n} ({100 * self.hits / self.n:.0f}%)"
        if self.low is not None:
            text += f" [{100 * self.low:.0f}, {100 * self.high:.0f}]"
        return text


def rate(flags: Sequence[bool], n_boot: int = 0, seed: int = 0) -> Rate:
    """The share of true ``flags``; with ``n_boot`` > 0 its percentile bootstrap 95%
    interval (flags resampled with replacement, ``seed``)."""
    from dnd.metrics import bootstrap_ci

    flags = [bool(f) for f in flags]
    if not flags or n_boot <= 0:
        return Rate(sum(flags), len(flags))
    _, low, high = bootstrap_ci(np.asarray(flags, dtype=float), n_boot=n_boot, seed=seed)
    return Rate(sum(flags), len(flags), low, high)


def label1_by(judged: Sequence[Judged], key: Callable[[Judged], str], judge: str = STRICT,
              n_boot: int = 0, seed: int = 0) -> dict[str, Rate]:
    """Label 1 accuracy of each group of ``judged`` (``key``: unit -> group, e.g. its
    kind or layer), groups in first-seen order."""
    groups: dict[str, list[bool]] = {}
    for j in judged:
        groups.setdefault(key(j), []).append(j.correct(judge))
    return {g: rate(flags, n_boot, seed) for g, flags in groups.items()}


def polysemantic_recall(judged: Sequence[Judged]) -> Rate:
    """Polysemantic units whose Labels 1-3 name both concepts."""
    return rate([j.both for j in judged if j.truth.kind == "polysemantic"])


def secondary_precision(judged: Sequence[Judged]) -> Rate:
    """Labels 2-3 of planted units naming one of the unit's concepts (free units skipped:
    their AP truth is one concept among several the unit may detect)."""
    return rate([s for j in judged if j.truth.kind != FREE for s in j.secondary])


@dataclass(frozen=True)
class Calibration:
    """AUROC of a score for "Label 1 correct" over ``n`` scored units
    (``correct`` of them correct), with its 95% bootstrap interval; ``auroc`` is None when
    one class is missing. ``unscored``: judged units without a score (left out)."""

    auroc: float | None
    n: int
    correct: int
    unscored: int
    low: float | None = None
    high: float | None = None

    def cell(self) -> str:
        if self.auroc is None:
            return f"- ({self.correct}/{self.n} correct)"
        ci = f" [{self.low:.2f}, {self.high:.2f}]" if self.low is not None else ""
        return f"{self.auroc:.2f}{ci} ({self.correct}/{self.n} correct)"


def calibration(judged: Sequence[Judged], judge: str = STRICT, n_boot: int = 0,
                seed: int = 0, score: str = "interpretability") -> Calibration:
    """:class:`Calibration` of ``score`` ("interpretability" or "confidence") over the units
    of ``judged`` that have it. Resamples holding one class only are skipped (their AUROC
    is undefined)."""
    from dnd.metrics import auroc

    scored = [j for j in judged if getattr(j, score) is not None]
    scores = np.array([getattr(j, score) for j in scored], dtype=float)
    y = np.array([j.correct(judge) for j in scored], dtype=bool)
    unscored = len(judged) - len(scored)
    if y.all() or not y.any():  # also covers no scored unit
        return Calibration(None, len(y), int(y.sum()), unscored)
    value = auroc(scores, y)
    if n_boot <= 0:
        return Calibration(value, len(y), int(y.sum()), unscored)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].any() and not y[idx].all():
            samples.append(auroc(scores[idx], y[idx]))
    if not samples:  # a handful of units: no resample holds both classes
        return Calibration(value, len(y), int(y.sum()), unscored)
    low, high = np.quantile(samples, [0.025, 0.975])
    return Calibration(value, len(y), int(y.sum()), unscored, float(low), float(high))


@dataclass(frozen=True)
class Difference:
    """Mean of a - b over paired units (accuracy difference, in [-1, 1]) and its 95%
    bootstrap interval (units resampled)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def text(self) -> str:
        """``+12 [+3, +21]``: percentage points."""
        return f"{100 * self.mean:+.0f} [{100 * self.low:+.0f}, {100 * self.high:+.0f}]"

    def cell(self) -> str:
        """:attr:`text`, then ``*`` (escaped for markdown) when the interval excludes 0."""
        return self.text + (" \\*" if self.excludes_zero else "")


def paired_difference(a: Sequence[bool], b: Sequence[bool], n_boot: int = 2000,
                      seed: int = 0) -> Difference:
    """Accuracy of ``a`` minus accuracy of ``b``, both [n] correctness flags of the same
    units in the same order; the interval resamples units (pairs kept together)."""
    from dnd.metrics import bootstrap_ci

    if len(a) != len(b) or not len(a):
        raise ValueError(f"need two non-empty flag lists of one length, got {len(a)} and "
                         f"{len(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean, low, high = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    return Difference(mean, low, high, len(diff))


# ----------------------------------------------------------------------------- labels


def dnd_labels(rec: UnitRecord) -> tuple[str, ...]:
    """A DnD run's Labels 1-3."""
    return rec.labels[:3]


def first_candidates(rec: UnitRecord) -> tuple[str, ...]:
    """No best-concept selection: the summariser's first three candidates."""
    return rec.candidates.concepts[:3] if rec.candidates else ()


def by_rank_score(rec: UnitRecord) -> tuple[str, ...]:
    """Activation rank only: the candidates by rank score (lower first; ties keep the
    summariser's order), first three; () when the unit was not scored."""
    sel = rec.scoring.selection if rec.scoring else None
    if sel is None:
        return ()
    order = sorted(range(len(sel.candidates)), key=lambda i: (sel.rank_scores[i], i))
    return tuple(sel.candidates[i] for i in order[:3])


def top_captions(rec: UnitRecord) -> tuple[str, ...]:
    """No summariser: the captions of the top activating images, distinct, first three."""
    return tuple(dict.fromkeys(rec.captions or ()))[:3]


def most_common_concept(truths: Sequence[Truth]) -> str:
    """The concept named by most of ``truths`` (first seen wins a tie); '' when none."""
    common = Counter(c for t in truths for c in t.concepts).most_common(1)
    return common[0][0] if common else ""
