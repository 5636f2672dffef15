"""The settings of Steps 1-3: typed, self-validating dataclasses, one per stage.

:class:`CropConfig` (Step 1, :mod:`dnd.stages.crop`), :class:`SummarizeConfig` (Steps
2.2-2.4, :mod:`dnd.stages.summarize`) and :class:`ScoreConfig` (Step 3,
:mod:`dnd.stages.score`). They live in this leaf, not beside their stages, so that
:mod:`dnd.config` (a run's whole config) holds them without importing the stages, and the
stages, their backends and the config stay in one direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dnd.prompting import check_prompt_name

# How a crop is scored (CropConfig.score; dnd.stages.crop's module docstring).
CROP_SCORES = ("in_place", "rescored")
# How Label 1 is chosen (ScoreConfig.selection; dnd.stages.select).
SELECTIONS = ("evidence", "paper")


@dataclass(frozen=True)
class CropConfig:
    """Settings of Step 1 (ALGORITHM.md numbers as defaults)."""

    top_n: int = 10            # top probe images per unit
    top_k: int = 10            # activating images kept after re-scoring
    max_crops: int = 4         # crops per image
    iou_between: float = 0.5   # keep a box only if IoU with every kept box <= this
    iou_image: float = 0.8     # ... and IoU with the whole image < this
    # How a crop is scored and which crops are captioned (dnd.stages.crop's docstring): "in_place"
    # (its activation inside the original map; top-K originals + each one's best crop) or
    # "rescored" (the paper: enlarged and re-scored; the top-K of originals and crops).
    score: str = "in_place"
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("top_n", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"crop.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_crops < 0:
            raise ValueError(f"crop.max_crops must be >= 0, got {self.max_crops}")
        for name in ("iou_between", "iou_image"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"crop.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.score not in CROP_SCORES:
            raise ValueError(f"crop.score must be one of {', '.join(CROP_SCORES)}, got "
                             f"{self.score!r}")


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of Step 3 (ALGORITHM.md numbers as defaults)."""

    images_per_concept: int = 10         # Q
    # Adaptive selection (see ConceptScorer.contenders): >0 generates this many images per
    # candidate first; a unit whose best leads every other candidate's screening final
    # score by `contender_margin` (others below margin x best) is decided there, else its
    # best and those of its `contenders` best within the margin get the rest of Q; 0
    # evaluates every candidate on all Q images (the paper).
    screen_images: int = 0
    contenders: int = 2
    contender_margin: float = 0.7
    prompt_template: str = "a realistic photo of {concept}"
    seed: int = 0                        # image j of every concept uses seed + j
    gen_image_size: int = 0              # >0: downsize generated images first (reference: 32)
    rank_score: str = "topk_squared"     # topk_squared | mean | squared_mean
    beta: int = 5
    # How Label 1 is chosen (dnd.stages.select): "evidence" (its generated images fire the
    # unit, at the scale the unit looks at, and its activating images' captions name it;
    # the most general such concept) or "paper" (rank score x image-product weight).
    selection: str = "evidence"
    # evidence: a more general candidate ("red" for "red star") whose score is at least
    # 1 - generality_margin of the best's is preferred to it.
    generality_margin: float = 0.1
    max_labels: int = 3
    dedup_threshold: float = 0.81        # CLIP text similarity above which a label repeats
    # Labels 2-3 need evidence of both kinds (see secondary_evidence): generated images that
    # activate the unit and a share of captions naming them. paper: this far from the
    # median of D_gen towards Label 1's images, and this share of the captions ...
    secondary_min_activation: float = 0.5
    secondary_min_captions: float = 0.5
    # ... evidence: a response R and a coverage S of at least these. A polysemantic unit's
    # second concept shows in about half of its top images, less when the first dominates
    # them: the coverage asked for is under a half, sufficiency (R) carries the weight.
    secondary_min_response: float = 0.5
    secondary_min_coverage: float = 0.4
    batch_size: int = 64                 # target / encoder batch

    def __post_init__(self) -> None:
        if "{concept}" not in self.prompt_template:
            raise ValueError("score.prompt_template must contain {concept}, got "
                             f"{self.prompt_template!r}")
        for name in ("images_per_concept", "beta", "max_labels", "batch_size", "contenders"):
            if getattr(self, name) < 1:
                raise ValueError(f"score.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.screen_images <= self.images_per_concept:
            raise ValueError(f"score.screen_images must be in [0, images_per_concept = "
                             f"{self.images_per_concept}] (0: every candidate gets all "
                             f"images), got {self.screen_images}")
        for name in ("contenders", "contender_margin"):
            if self.screen_images == 0 and getattr(self, name) != getattr(ScoreConfig, name):
                raise ValueError(f"score.{name} ({getattr(self, name)}) applies only to "
                                 "adaptive selection; set score.screen_images too (e.g. 2)")
        if not 0 <= self.contender_margin <= 1:
            raise ValueError(f"score.contender_margin must be in [0, 1], got "
                             f"{self.contender_margin}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"score.selection must be one of {', '.join(SELECTIONS)}, got "
                             f"{self.selection!r}")
        own = {"evidence": ("generality_margin", "secondary_min_response",
                            "secondary_min_coverage"),
               "paper": ("secondary_min_activation", "secondary_min_captions")}
        for rule, names in own.items():
            for name in names:
                if self.selection != rule and getattr(self, name) != getattr(ScoreConfig, name):
                    raise ValueError(f"score.{name} applies only to selection {rule!r}")
        if not 0 <= self.generality_margin < 1:
            raise ValueError(f"score.generality_margin must be in [0, 1), got "
                             f"{self.generality_margin}")
        if self.gen_image_size < 0:
            raise ValueError("score.gen_image_size must be >= 0 (0 = keep the generated size)")
        for name in ("secondary_min_activation", "secondary_min_captions",
                     "secondary_min_response", "secondary_min_coverage"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"score.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class SummarizeConfig:
    """Settings of ``Summarizer``.

    ``num_samples`` concepts (paper: T = 5) are drawn from one prompt at ``temperature``
    (paper: 0.3), each capped at ``max_tokens`` and ended at the first line break. The
    default ``concept_prompt`` (v3) asks for a list of concepts at every level, for
    ``candidates: levels``; v2, for one concept per reply, is the paper preset's. A
    concept is 1 to ``max_words`` words (paper: 1-5). When fewer than half the replies are
    usable, the prompt is asked again, at most ``max_reasks`` times, with a new seed and
    at least ``reask_temperature``. ``consensus_extra`` caps the consensus phrases the
    ``llm+consensus`` summariser adds to the LLM's candidates. ``max_candidates`` caps a
    unit's candidates with ``candidates: phrases``; with levels
    :func:`dnd.stages.summarize.at_levels` ranks them by coverage and keeps
    ``LEVEL_MAX_CANDIDATES`` (setting it there is an error).
    """

    num_samples: int = 5
    temperature: float = 0.3
    reask_temperature: float = 0.7
    max_tokens: int = 40
    max_words: int = 5
    max_candidates: int = 6
    max_reasks: int = 2
    consensus_extra: int = 3
    seed: int = 0
    concept_prompt: str = "summarize_concept.v3"
    merge_prompt: str = "merge_concepts.v2"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if min(self.temperature, self.reask_temperature) < 0:
            raise ValueError("temperatures must be >= 0, got "
                             f"{(self.temperature, self.reask_temperature)}")
        for name in ("max_tokens", "max_words", "max_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_reasks < 0 or self.consensus_extra < 0 or self.seed < 0:
            raise ValueError("max_reasks, consensus_extra and seed must be >= 0")
        for name in (self.concept_prompt, self.merge_prompt):
            check_prompt_name(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SummarizeConfig:
        return cls(**d)
