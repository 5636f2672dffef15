"""Which units the report marks as hard to interpret: the low-interpretability rule.

A unit is marked when its interpretability score is far below its layer's (robust z-score
from the median and the median absolute deviation); a layer with few scored units marks
none. The rule's numbers are shown beside the marks (:func:`low_interpretability_rule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dnd.record import Scoring, UnitRecord


def scoring_of(rec: UnitRecord) -> Scoring:
    """The record's Step 3 part; an empty one before Step 3 (no score, no selection)."""
    return rec.scoring if rec.scoring is not None else Scoring(labels=())


LOW_INTERP_Z = 2.0         # robust standard deviations below the layer's median
LOW_INTERP_MIN_UNITS = 8   # fewer scored units: the layer's spread is unknown, flag nothing
_MAD_TO_SD = 1.4826        # MAD x this = standard deviation, for normally distributed scores


@dataclass(frozen=True)
class InterpretabilityRule:
    """Which units of one layer have a low interpretability score; see
    :func:`low_interpretability_rule`. ``threshold`` is None when the rule cannot judge."""

    n: int                     # units of the layer with a score
    median: float | None
    spread: float | None       # robust standard deviation, 1.4826 x MAD
    threshold: float | None    # scores strictly below it are low

    def is_low(self, score: float | None) -> bool:
        return self.threshold is not None and score is not None and score < self.threshold

    def explain(self, score: float | None) -> str:
        """Plain text: the unit's score against the rule, with the rule's numbers."""
        if score is None:
            return "No interpretability score yet (computed at the labels stage)."
        head = f"Interpretability score {score:.3f}"
        if self.threshold is None:
            why = (f"only {self.n} scored unit(s) in this layer, at least "
                   f"{LOW_INTERP_MIN_UNITS} are needed" if self.n < LOW_INTERP_MIN_UNITS
                   else "the layer's scores have no spread")
            return f"{head}; not judged against the layer: {why}."
        rule = (f"this layer's low threshold {self.threshold:.3f} = median {self.median:.3f} "
                f"\u2212 {LOW_INTERP_Z:g} \u00d7 robust SD {self.spread:.3f} over its "
                f"{self.n} scored units")
        if not self.is_low(score):
            return f"{head}, above {rule}."
        return (f"{head} is below {rule}: the unit's top activating images have little in "
                "common by the encoder's measure, so its label is weak evidence of what it "
                "detects.")


def low_interpretability_rule(scores: Sequence[float | None]) -> InterpretabilityRule:
    """The rule that marks a unit's interpretability score as low, for one layer of one run.

    The interpretability score (:func:`dnd.stages.select.interpretability_score`, the mean
    pairwise cosine of the unit's top activating images' embeddings) has no fixed scale:
    where unrelated images land depends on the encoder. So a unit is compared with the
    other units of its layer in the same run: it is **low** when its score is below
    ``median - 2 x 1.4826 x MAD`` of the layer's scores (a robust z-score below -2; about
    2% of units when scores are normally distributed). The rule does not change when all
    scores are shifted or scaled, so it holds for every encoder without a per-encoder
    constant. It judges nothing with fewer than 8 scored units or zero spread (MAD = 0),
    and being relative it cannot flag a layer whose units are all uninterpretable.

    Measured on the toy world's conv4 units 0-31 (``dnd demo``, 2,000 probing scenes):
    median 0.646, robust SD 0.205, threshold 0.236; it flags unit 25 (0.136, labelled "cyan
    triangle" while its top images are red stars and triangles of several colours) and
    unit 0 (0.207, "yellow triangle" over green and yellow triangles and two hexagons), not
    the next, unit 12 (0.376, blue rings). With 800 scenes (``dnd describe --preset toyworld
    --layer conv4 --units 0-31 --probe toyworld:800``) the same two units (0.169, 0.296;
    threshold 0.359).
    The 64 fc units (median 0.665, lowest 0.578, threshold 0.533): none. At 2.5 robust SDs
    unit 25 would escape on the 2,000-scene run (threshold 0.133).

    ``scores``: one per unit of the layer; None (no score yet) is ignored.
    """
    s = np.array([x for x in scores if x is not None], dtype=np.float64)
    if len(s) < LOW_INTERP_MIN_UNITS:
        return InterpretabilityRule(len(s), float(np.median(s)) if len(s) else None, None,
                                    None)
    median = float(np.median(s))
    spread = _MAD_TO_SD * float(np.median(np.abs(s - median)))
    threshold = median - LOW_INTERP_Z * spread if spread > 0 else None
    return InterpretabilityRule(len(s), median, spread, threshold)



def layer_rules(records: Sequence[UnitRecord]) -> dict[str, InterpretabilityRule]:
    """Layer -> its low-interpretability rule over ``records`` (a run's, all layers)."""
    by_layer: dict[str, list[float | None]] = {}
    for rec in records:
        by_layer.setdefault(rec.layer, []).append(scoring_of(rec).interpretability)
    return {layer: low_interpretability_rule(s) for layer, s in by_layer.items()}

