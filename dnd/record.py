"""The unit record: everything the pipeline learned about one unit, typed.

A *unit* is one feature of a layer. Today that is a neuron (``basis="neuron"``: a conv
channel, a linear output, a ViT channel); the ``basis`` field leaves room for other
feature bases over the same activations (dictionary features, directions) without a new
record type. Each stage fills one part:

==============  ===========================================================
stage           part
==============  ===========================================================
``crops``       :class:`UnitCrops` (top images, attention crops, activating images)
``captions``    ``captions`` (one per activating image) and the captioner identity
``candidates``  :class:`Candidates` (concepts, LLM replies, rejections, usage)
``labels``      :class:`Scoring` (labels, :class:`Selection`, generated images)
==============  ===========================================================

This module alone knows the JSON layout (``<run>/units/<layer>/<unit>.json``). Files carry
``"schema": 2``; files without it (schema 1, written before the field existed) have the
same layout and are read as they are. A file from a newer dnd is refused with a clear
error instead of being half-read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 2
# In pipeline order. A record's ``stage`` is the last stage it finished.
STAGES = ("activations", "crops", "captions", "candidates", "labels")
NEURON = "neuron"

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), original-image pixels, end exclusive


class RecordError(ValueError):
    """A unit record file this version of dnd cannot read."""


# ----------------------------------------------------------------------- Step 1


@dataclass(frozen=True)
class Evidence:
    """One image shown to later stages: a probe image or a crop of one.

    ``box`` is None for the whole image; otherwise original-image pixels.
    ``activation`` is the unit's summary activation on it (float32 forward pass).
    """

    index: int
    image_id: str
    box: Box | None
    activation: float
    # Top images only: the unit's activation map, average-pooled to a few cells a side,
    # and the region of the original image it covers (for heatmap overlays).
    act_map: tuple[tuple[float, ...], ...] | None = None
    view_box: Box | None = None

    def pixels(self, probe: Any) -> Any:
        """The image as the stages saw it: probe image ``index`` (a PIL image from a
        :class:`dnd.probe.ProbeSet`), cropped to ``box``."""
        image = probe.load(self.index)
        return image.crop(self.box) if self.box else image

    def to_json(self) -> dict[str, Any]:
        d = {"index": self.index, "image": self.image_id,
             "box": list(self.box) if self.box else None, "activation": self.activation}
        if self.act_map is not None:
            d["map"] = [list(row) for row in self.act_map]
            d["view_box"] = list(self.view_box) if self.view_box else None
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Evidence:
        amap = d.get("map")
        return cls(int(d["index"]), str(d["image"]), _box(d.get("box")), float(d["activation"]),
                   tuple(tuple(float(v) for v in row) for row in amap) if amap else None,
                   _box(d.get("view_box")))


def _box(b: Sequence[int] | None) -> Box | None:
    return tuple(int(v) for v in b) if b else None  # type: ignore[return-value]


@dataclass(frozen=True)
class UnitCrops:
    """Step 1 output for one unit: top images, their crops, and the top-K activating
    images (originals and crops together, highest activation first)."""

    top: tuple[Evidence, ...]
    crops: tuple[Evidence, ...]
    activating: tuple[Evidence, ...]

    def to_json(self) -> dict[str, Any]:
        return {"top_images": [e.to_json() for e in self.top],
                "crops": [e.to_json() for e in self.crops],
                "activating_images": [e.to_json() for e in self.activating]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> UnitCrops:
        return cls(*(tuple(Evidence.from_json(e) for e in d.get(k) or ())
                     for k in ("top_images", "crops", "activating_images")))


# ----------------------------------------------------------------------- Step 2


@dataclass(frozen=True)
class Rejection:
    """A reply the summariser did not use, and why."""

    reply: str
    reason: str


@dataclass(frozen=True)
class LLMUsage:
    """What a unit's summary cost: requests sent (cached ones included), tokens as the
    backend counted them, and how many of the requests were answered from the cache."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: int = 0

    def plus(self, reply: Any) -> LLMUsage:
        """This usage and one more reply (a :class:`dnd.backends.llm.ChatReply`)."""
        return LLMUsage(self.requests + 1, self.prompt_tokens + reply.prompt_tokens,
                        self.completion_tokens + reply.completion_tokens,
                        self.cached + int(reply.cached))


@dataclass(frozen=True)
class Candidates:
    """Candidate concepts for one unit, best supported first.

    ``sources`` gives, per concept, where it came from (``llm``, ``consensus``;
    ``background-variant`` for an added '<concept> background'). ``replies`` holds the
    raw LLM replies, ``rejected`` the replies not used and why, ``usage`` the LLM's cost.
    ``fallback`` says why the candidates come from a fallback source (e.g. every LLM reply
    was rejected). ``error`` is set (and ``concepts`` empty) when the unit failed.
    """

    unit: int
    concepts: tuple[str, ...]
    sources: tuple[tuple[str, ...], ...] = ()
    replies: tuple[str, ...] = ()
    rejected: tuple[Rejection, ...] = ()
    prompt_versions: tuple[str, ...] = ()
    usage: LLMUsage = LLMUsage()
    fallback: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Candidates:
        return cls(
            unit=int(d["unit"]),
            concepts=tuple(d["concepts"]),
            sources=tuple(tuple(s) for s in d.get("sources", ())),
            replies=tuple(d.get("replies", ())),
            rejected=tuple(Rejection(**r) for r in d.get("rejected", ())),
            prompt_versions=tuple(d.get("prompt_versions", ())),
            usage=LLMUsage(**d.get("usage", {})),
            fallback=d.get("fallback"),
            error=d.get("error"),
        )


# ----------------------------------------------------------------------- Step 3


@dataclass(frozen=True)
class Selection:
    """Everything needed to see why a label won (:func:`dnd.stages.select.select_concept`).

    Per-image fields have length n_generated (D_gen: the candidates' generated images in
    candidate order); per-candidate fields length C."""

    candidates: tuple[str, ...]
    rank_score_name: str
    beta: int
    k: int
    image_candidate: tuple[int, ...]  # [n_generated] candidate index owning each image
    activations: tuple[float, ...]  # [n_generated] unit's summary activation
    ranks: tuple[float, ...]  # [n_generated] 1 = highest activation, ties averaged
    top_k: tuple[int, ...]  # generated-image indices in the overall top-k, best first
    rank_scores: tuple[float, ...]  # [C] lower is better
    positions: tuple[int, ...]  # [C] 0 = best rank score
    weights: tuple[float, ...]  # [C] image-product weight, -1 if no image in top_k
    final_scores: tuple[float, ...]  # [C] the rule's score: (C - position) x weight, or R x S
    order: tuple[int, ...]  # candidate indices, Label 1 first
    # Which rule made ``final_scores`` and ``order`` (dnd.stages.select): "paper" or
    # "evidence". The evidence rule's parts, per candidate [C]: ``responses`` R (its
    # generated images' activation on the unit's own scale, 0..1), ``coverage`` S (share of
    # the unit's activating images whose captions name it) and ``scales`` (how many times
    # smaller than the input its images were shown for R: 1 = as generated).
    rule: str = "paper"
    responses: tuple[float, ...] = ()
    coverage: tuple[float, ...] = ()
    scales: tuple[int, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        """All candidates, best first: labels[0] is the description, [1:3] Labels 2-3."""
        return tuple(self.candidates[i] for i in self.order)

    @property
    def label(self) -> str:
        return self.candidates[self.order[0]]

    @property
    def winner_score(self) -> float:
        """Label 1's final score."""
        return float(self.final_scores[self.order[0]])

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (lists, floats, ints, strs), plus the derived ``labels``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if self.rule == "paper" and f.name in _EVIDENCE_FIELDS:
                continue  # the paper's records read as they did before the evidence rule
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["labels"] = list(self.labels)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Selection:
        """Inverse of ``to_json`` (the derived ``labels`` entry is ignored)."""
        return cls(**{f.name: tuple(d[f.name]) if isinstance(d[f.name], list) else d[f.name]
                      for f in dataclasses.fields(cls) if f.name in d})


_EVIDENCE_FIELDS = ("rule", "responses", "coverage", "scales")


@dataclass(frozen=True)
class Scoring:
    """Step 3 output for one unit.

    ``labels``: Label 1 and the Labels 2-3 that have evidence. ``selection`` is None when
    no candidate could be rendered; then ``fallback`` says so and Label 1 is unscored.
    ``generated``: concept -> feature-cache keys of its usable generated images (the
    store maps a key to its thumbnail); ``prompts``: concept -> text-to-image prompt;
    ``dropped``: concept -> why it could not be scored. ``confidence`` in [0, 1]: how far
    the evidence supports Label 1 (:mod:`dnd.stages.select`; None for the paper's rule,
    which has none, and for records written before it existed).
    """

    labels: tuple[str, ...]
    interpretability: float | None = None
    dropped: Mapping[str, str] = field(default_factory=dict)
    selection: Selection | None = None
    generated: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    prompts: Mapping[str, str] = field(default_factory=dict)
    fallback: str | None = None
    confidence: float | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"labels": list(self.labels), "dropped": dict(self.dropped),
                             "interpretability": self.interpretability}
        if self.confidence is not None:  # absent, as before, under the paper's rule
            d["confidence"] = self.confidence
        if self.selection is not None:
            d["selection"] = self.selection.to_json()
            d["generated"] = {c: list(k) for c, k in self.generated.items()}
            d["prompts"] = dict(self.prompts)
        if self.fallback is not None:
            d["fallback"] = self.fallback
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Scoring:
        sel = d.get("selection")
        return cls(tuple(d.get("labels") or ()), d.get("interpretability"),
                   dict(d.get("dropped") or {}), Selection.from_json(sel) if sel else None,
                   {c: tuple(k) for c, k in (d.get("generated") or {}).items()},
                   dict(d.get("prompts") or {}), d.get("fallback"), d.get("confidence"))


# ----------------------------------------------------------------------- the record


@dataclass(frozen=True)
class UnitRecord:
    """What is known of one unit of one layer; see the module docstring.

    ``stage`` is the last stage finished (None before the first). A failed unit keeps the
    parts it finished, plus ``error`` (a short reason) and ``failed_at`` (the stage).
    """

    layer: str
    unit: int
    basis: str = NEURON
    stage: str | None = None
    model: str | None = None
    weights: str | None = None
    crops: UnitCrops | None = None
    captions: tuple[str, ...] | None = None
    captioner: Mapping[str, Any] | None = None
    candidates: Candidates | None = None
    scoring: Scoring | None = None
    error: str | None = None
    failed_at: str | None = None

    # -- reading ------------------------------------------------------------------------

    @property
    def labels(self) -> tuple[str, ...]:
        """Label 1 (and Labels 2-3 with evidence); empty before Step 3 or on failure."""
        return self.scoring.labels if self.scoring else ()

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """Why a part of this record came from a fallback (empty when none did)."""
        return tuple(r for r in (self.candidates and self.candidates.fallback,
                                 self.scoring and self.scoring.fallback) if r)

    def reached(self, stage: str) -> bool:
        """True if the record has finished ``stage`` (or a later one)."""
        return self.stage is not None and STAGES.index(self.stage) >= STAGES.index(stage)

    def due(self, stage: str) -> bool:
        """True when ``stage`` is next for this unit: it finished the previous stage and
        has not failed."""
        if self.failed:
            return False
        return STAGES.index(self.stage or "activations") == STAGES.index(stage) - 1

    # -- changing (records are frozen: each returns a new one) ----------------------------

    def finish(self, stage: str, **parts: Any) -> UnitRecord:
        """The record with ``stage`` done and its ``parts`` set (e.g. ``captions=...``)."""
        return dataclasses.replace(self, stage=stage, error=None, failed_at=None, **parts)

    def fail(self, stage: str, reason: str, **parts: Any) -> UnitRecord:
        """The record failed at ``stage`` for ``reason`` (``parts`` kept for diagnosis)."""
        return dataclasses.replace(self, error=reason, failed_at=stage, **parts)

    def retry(self) -> UnitRecord:
        """The record with its failure forgotten: redone from the stage that failed."""
        return dataclasses.replace(self, error=None, failed_at=None)

    # -- JSON ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``<run>/units/<layer>/<unit>.json``."""
        d: dict[str, Any] = {"schema": SCHEMA_VERSION, "layer": self.layer, "unit": self.unit}
        if self.basis != NEURON:
            d["basis"] = self.basis
        for name in ("stage", "error", "failed_at"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if self.crops is not None:  # the network the crops (and all later parts) came from
            d.update(model=self.model, weights=self.weights, **self.crops.to_json())
        if self.captions is not None:
            d["captions"] = list(self.captions)
            d["captioner"] = dict(self.captioner) if self.captioner is not None else None
        if self.candidates is not None:
            d["candidates"] = self.candidates.to_json()
        if self.scoring is not None:
            d.update(self.scoring.to_json())
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> UnitRecord:
        """Read a record file's object (schema 1 or 2); raises :class:`RecordError`."""
        schema = d.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise RecordError(f"unit record schema {schema!r} is newer than this dnd reads "
                              f"({SCHEMA_VERSION}); upgrade dnd to read this run")
        try:
            return cls(
                layer=str(d["layer"]), unit=int(d["unit"]), basis=d.get("basis", NEURON),
                stage=d.get("stage"), model=d.get("model"), weights=d.get("weights"),
                crops=UnitCrops.from_json(d) if "top_images" in d else None,
                captions=tuple(d["captions"]) if "captions" in d else None,
                captioner=d.get("captioner"),
                candidates=Candidates.from_json(d["candidates"]) if d.get("candidates")
                else None,
                scoring=Scoring.from_json(d) if "labels" in d else None,
                error=d.get("error"), failed_at=d.get("failed_at"))
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"unit record of layer {d.get('layer')!r} unit "
                              f"{d.get('unit')!r} is malformed ({type(e).__name__}: {e})"
                              ) from None
