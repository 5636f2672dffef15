"""Step 3: regenerate images for every candidate concept and keep the one the unit prefers.

For all units of a chunk at once:
1. one generation request per (concept prompt, seed), deduplicated across units (many units
   share concepts such as "dog"); previously generated images come from the feature cache;
2. the target network runs once per new generated image and keeps the summary activation
   of every unit of the layer; the image-text encoder embeds it once;
3. per unit, :func:`dnd.stages.select.select_concept` ranks the candidates, labels are
   de-duplicated by text similarity, and the interpretability score is computed.

The feature cache (``<cache>/<key>.npz`` + a JPEG thumbnail for reports) is keyed by the
generator identity, prompt and seed plus the target, layer and summary: a resumed run scores
exactly the numbers an uninterrupted one would, without generating again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from dnd.backends.base import CannotRender, Generator, GenRequest, ImageTextEncoder, run_batched
from dnd.cache import FeatureCache, ImageBank
from dnd.io import stable_hash
from dnd.record import Scoring, Selection, UnitRecord
from dnd.settings import ScoreConfig
from dnd.stages.base import RunContext
from dnd.stages.crop import attention_scale
from dnd.stages.select import (
    deduplicate_labels,
    evidence_order,
    interpretability_score,
    normalized_response,
    select_concept,
)
from dnd.stages.words import coverage, more_general, said_in
from dnd.target import Target, capture, split_output

# Generated images are also shown this many times smaller (tiled to fill the input) to
# units that look at small regions (dnd.stages.crop.attention_scale).
SCALES = (2, 3, 4)


@dataclass(frozen=True)
class UnitInput:
    """What Step 3 needs of one unit: its candidates, its activating images and their
    captions (the coverage of the evidence rule, and evidence for Labels 2-3). For the
    evidence rule also: ``reference`` (the unit's median activation over the probing set,
    the mean over its top images; :func:`dnd.stages.select.normalized_response`) and
    ``scale`` (1, or a factor of :data:`SCALES` at which the unit also sees generated
    images)."""

    unit: int
    candidates: Sequence[str]
    activating: Sequence[Image.Image]
    captions: Sequence[str] = ()
    reference: tuple[float, float] | None = None
    scale: int = 1


class ScoreStage:
    """Step 3 as a pipeline stage (:mod:`dnd.stages.base`): :class:`ConceptScorer` with
    the run's generator, encoder and generated-image folder."""

    name = "labels"

    def __init__(self, ctx: RunContext):
        cfg = ctx.config
        self.ctx = ctx
        self.scorer = ConceptScorer(ctx.target, ctx.layer, cfg.summary, ctx.models.generator,
                                    ctx.models.encoder, ctx.features, cfg.score,
                                    bank=cfg.open_image_bank())

    def __call__(self, records: Sequence[UnitRecord]) -> list[UnitRecord]:
        probe, evidence = self.ctx.probe, self.ctx.config.score.selection == "evidence"
        medians = (unit_medians(self.ctx.activations, [r.unit for r in records])
                   if evidence else {})
        out = self.scorer([UnitInput(
            r.unit, r.candidates.concepts, [e.pixels(probe) for e in r.crops.activating],
            r.captions,
            reference=(medians[r.unit], float(np.mean([e.activation for e in r.crops.top])))
            if evidence else None,
            scale=attention_scale(r.crops, max(SCALES)) if evidence else 1)
            for r in records])
        return [r.finish(self.name, scoring=out[r.unit]) for r in records]


def unit_medians(activations: Any, units: Sequence[int]) -> dict[int, float]:
    """Each unit's median summary activation over the probing set (``activations``: a
    :class:`dnd.activations.LayerActivations`; one read of the units' columns)."""
    cols = np.asarray(activations.values[:, list(units)], dtype=np.float32)
    return {u: float(m) for u, m in zip(units, np.median(cols, axis=0))}


class ConceptScorer:
    """Generate, score and select for many units of one layer."""

    def __init__(self, target: Target, layer: str, summary: str, generator: Generator,
                 encoder: ImageTextEncoder, features: FeatureCache,
                 config: ScoreConfig | None = None, bank: ImageBank | None = None):
        """``features``: generated images' features and thumbnails, read and written.
        ``bank``: generated images and embeddings shared across runs (None: not used)."""
        self.target, self.layer, self.summary = target, layer, summary
        self.generator, self.encoder = generator, encoder
        self.features = features
        self.config = config or ScoreConfig()
        self.bank = bank

    def prompt(self, concept: str) -> str:
        return self.config.prompt_template.format(concept=concept)

    def request_key(self, req: GenRequest) -> str:
        """Cache key of one generated image's features (see module docstring)."""
        # The evidence rule's entries also hold the image's activations at SCALES.
        scaled = {"scales": list(SCALES)} if self.config.selection == "evidence" else {}
        return stable_hash({"generator": self.generator.identity, "prompt": req.prompt,
                            "seed": req.seed, "target": self.target.identity,
                            "layer": self.layer, "summary": self.summary,
                            "encoder": self.encoder.identity,
                            "size": self.config.gen_image_size, **scaled})

    def requests(self, concept: str, first: int = 0, stop: int | None = None
                 ) -> list[GenRequest]:
        """Generation requests of images ``first`` .. ``stop`` (default Q) of ``concept``."""
        stop = self.config.images_per_concept if stop is None else stop
        return [GenRequest(self.prompt(concept), self.config.seed + j)
                for j in range(first, stop)]

    def __call__(self, units: Sequence[UnitInput]) -> dict[int, Scoring]:
        """unit -> its labels, selection and generated images.

        Every candidate of every unit gets Q generated images, deduplicated across units;
        with ``screen_images`` = q > 0 (adaptive selection) it first gets q of them, the
        unit's selection is computed on those, and only its ``contenders`` best candidates
        get the other Q - q (image j of a concept is the same whichever way it is made, so
        the screening images are part of the full set). A unit sees only what its own
        evaluation asked for, so its labels do not depend on which units share its batch;
        its activating images and candidate texts are embedded in batches of its own too,
        so not even their last bits do.
        """
        cfg = self.config
        q = cfg.screen_images or cfg.images_per_concept
        # 1. Requests of every (unit, concept), deduplicated.
        reqs = {c: self.requests(c, 0, q) for u in units for c in u.candidates}
        feats = self._features([r for rs in reqs.values() for r in rs])
        # 2. Each unit's activating images and candidates, embedded.
        embs = {u.unit: (self.encoder.encode_images(list(u.activating)),
                         self.encoder.encode_texts(list(u.candidates))) for u in units}
        # 3. Adaptive: the rest of Q for each unit's contenders on the screening images.
        full = {u.unit: list(u.candidates) for u in units}
        if q < cfg.images_per_concept:
            for u in units:
                sel = self._select(u, reqs, feats, *embs[u.unit]).selection
                full[u.unit] = self.contenders(sel) if sel else []
            more = {c: self.requests(c, q) for cs in full.values() for c in cs}
            feats.update(self._features([r for rs in more.values() for r in rs]))
        out: dict[int, dict[str, Any]] = {}
        for u in units:
            mine = {c: reqs[c] + (self.requests(c, q) if c in full[u.unit] else [])
                    for c in u.candidates}
            out[u.unit] = self._select(u, mine, feats, *embs[u.unit])
        return out

    def contenders(self, screening: Selection) -> list[str]:
        """The candidates that get the rest of the Q images after screening.

        None when the unit is decided on its screening images: its best has a positive
        final score and every other candidate's is below ``contender_margin`` of it (the
        winner's score and Labels 2-3 then rest on the screening images). Otherwise the
        best, and those of the ``contenders`` best whose final score reaches the margin;
        with margin 0, simply the ``contenders`` best. ``dnd bench selection`` measures how
        often this keeps the full evaluation's Label 1, on the units the defaults were
        chosen on and on held-out ones (where it keeps fewer)."""
        order, final, margin = screening.order, screening.final_scores, self.config.contender_margin
        best = final[order[0]]
        close = [i for i in order[1:] if margin == 0 or (best > 0 and final[i] >= margin * best)]
        if margin > 0 and best > 0 and not close:
            return []
        keep = [order[0]] + [i for i in close if i in order[1:self.config.contenders]]
        return [screening.candidates[i] for i in keep]

    def _select(self, u: UnitInput, reqs, feats, emb, text_emb) -> Scoring:
        """One unit's scoring; ``emb``: its activating images' embeddings [K, d],
        ``text_emb``: its candidates' [C, d] (``u.candidates`` order)."""
        cfg = self.config
        # A candidate is scored on its usable images; one with none is dropped.
        keys = {c: [k for k in map(self.request_key, reqs[c])
                    if not isinstance(feats[k], Exception)] for c in u.candidates}
        kept = [c for c in u.candidates if keys[c]]
        dropped = {c: str(feats[self.request_key(reqs[c][0])]) for c in u.candidates
                   if c not in kept}
        interpretability = interpretability_score(emb) if len(emb) >= 2 else None
        if not kept:
            # Nothing to score: Label 1 is the best supported candidate, marked unscored.
            return Scoring(tuple(u.candidates[:1]), interpretability, dropped, fallback=(
                "no candidate could be rendered, so none was scored; Label 1 is the "
                "summariser's best supported candidate"))
        gen_acts = [np.array([feats[k]["acts"][u.unit] for k in keys[c]]) for c in kept]
        gen_emb = np.stack([feats[k]["emb"] for c in kept for k in keys[c]])
        sel = select_concept(kept, gen_acts, emb @ gen_emb.T, k=len(u.activating),
                             beta=cfg.beta, rank_score=cfg.rank_score)
        confidence = None
        if cfg.selection == "evidence":
            scaled = ([np.array([feats[k]["scaled"][SCALES.index(u.scale)][u.unit]
                                 for k in keys[c]]) for c in kept] if u.scale > 1 else None)
            sel = self._by_evidence(sel, u, gen_acts, scaled)
            confidence = float(sel.final_scores[sel.order[0]])
        t = np.asarray(text_emb)[[list(u.candidates).index(c) for c in kept]]
        evidence = (secondary_evidence(sel, u.captions, cfg.secondary_min_response,
                                       cfg.secondary_min_coverage) if sel.rule == "evidence"
                    else secondary_evidence(sel, u.captions, cfg.secondary_min_activation,
                                            cfg.secondary_min_captions))
        labels_idx = deduplicate_labels(evidence,
                                        t @ t.T, max_labels=cfg.max_labels,
                                        threshold=cfg.dedup_threshold)
        return Scoring(tuple(kept[i] for i in labels_idx), interpretability, dropped, sel,
                       generated={c: tuple(keys[c]) for c in kept},
                       prompts={c: self.prompt(c) for c in kept}, confidence=confidence)

    def _by_evidence(self, sel: Selection, u: UnitInput, gen_acts: list[np.ndarray],
                     scaled: list[np.ndarray] | None) -> Selection:
        """``sel`` (the paper's numbers, kept for comparison) reordered by the evidence rule
        (:func:`dnd.stages.select.evidence_order`): each candidate's response at the scale
        where its images fire the unit more (as generated, or ``u.scale`` times smaller),
        and its coverage in the unit's captions."""
        if u.reference is None:
            raise ValueError(f"unit {u.unit}: selection 'evidence' needs the unit's reference "
                             "activations (UnitInput.reference)")
        median, top = u.reference
        responses, scales = [], []
        for c, acts in enumerate(gen_acts):
            best = (float(normalized_response(acts, median, top).mean()), 1)
            if scaled is not None:
                small = float(normalized_response(scaled[c], median, top).mean())
                best = max(best, (small, u.scale))
            responses.append(best[0])
            scales.append(best[1])
        cover = [coverage(c, u.captions) for c in sel.candidates]
        scores, order = evidence_order(sel.candidates, responses, cover,
                                       self.config.generality_margin)
        return dataclasses.replace(
            sel, rule="evidence", final_scores=tuple(float(x) for x in scores), order=order,
            responses=tuple(responses), coverage=tuple(cover), scales=tuple(scales))

    # -- generated images -> cached features ----------------------------------------------
    #
    # Batched kernels round differently with a batch's size and contents, so an image run
    # beside other images gets features that differ in their last bits, and a near-tie
    # between two candidates can then go either way. Under the Ray executor which actor
    # draws a concept's images first depends on timing, and the local executor's chunks
    # decide which images share a batch. So every generated image is run through the target
    # and the encoder in a batch fixed by its own key, its block (:meth:`feature_block`):
    # the same image gets bit-identical features whichever process or chunk computes it.

    def feature_block(self, req: GenRequest) -> tuple[str, int, int]:
        """(prompt, first seed, stop seed): the block of images that ``req``'s image is
        computed with, fixed by the request alone. Blocks follow the requests of
        :meth:`__call__`: seeds ``seed + [0, q)`` and ``seed + [q, Q)`` with adaptive
        selection (q = ``screen_images``), else ``seed + [0, Q)``; other seeds in blocks of
        Q. A request for part of a block makes the whole block (its other images cached)."""
        cfg = self.config
        n, q = cfg.images_per_concept, cfg.screen_images
        j = req.seed - cfg.seed
        first = (j // n) * n
        stop = first + n
        if first == 0 and 0 < q < n:
            first, stop = (0, q) if j < q else (q, n)
        return req.prompt, cfg.seed + first, cfg.seed + stop

    def _features(self, requests: Sequence[GenRequest]) -> dict[str, Any]:
        """key -> {"acts": [n_units] float32, "emb": [d] float32} or the CannotRender, for
        every request; what the cache lacks is computed block by block."""
        unique = {self.request_key(r): r for r in requests}
        feats: dict[str, Any] = {k: self.features.get(k) for k in unique}
        blocks = sorted({self.feature_block(r) for k, r in unique.items() if feats[k] is None})
        for prompt, first, stop in blocks:
            made = self._block_features([GenRequest(prompt, s) for s in range(first, stop)])
            feats.update({k: v for k, v in made.items() if k in feats and feats[k] is None})
        if self.bank and blocks:  # once per call, after its images and embeddings are in
            self.bank.evict()
        return feats

    def _block_features(self, block: list[GenRequest]) -> dict[str, Any]:
        """key -> features or CannotRender of every image of one block (seeds in order):
        what the cache holds, the rest computed together and cached.

        Its usable images go through the target and the encoder as one batch (split only
        by ``batch_size``). When the cache holds part of the block (another process is
        writing it, or a run stopped while it did), the whole block is computed again, so
        that its missing images are not batched without the others."""
        keys = [self.request_key(r) for r in block]
        cached = {k: self.features.get(k) for k in keys}
        out: dict[str, Any] = {k: f for k, f in cached.items() if f is not None}
        gen_id, bank = self.generator.identity, self.bank
        bank_key = ({k: bank.key(gen_id, r.prompt, r.seed) for k, r in zip(keys, block)}
                    if bank else {})
        missing = [i for i, k in enumerate(keys) if k not in out]
        images = dict(zip((keys[i] for i in missing),
                          self._block_images([block[i] for i in missing], bank_key)))
        out.update({k: im for k, im in images.items() if isinstance(im, CannotRender)})
        if all(k in out for k in keys):  # nothing new to run
            return out
        if len(missing) < len(keys):  # a partial block: its cached images are needed too
            rest = [i for i in range(len(keys)) if i not in missing]
            images.update(zip((keys[i] for i in rest),
                              self._block_images([block[i] for i in rest], bank_key)))
        ok = [(k, images[k]) for k in keys if not isinstance(images[k], CannotRender)]
        pics = [self._resize(im) for _, im in ok]
        acts = self._target_acts(pics)
        embs = self._embeddings([k for k, _ in ok], pics, bank_key)
        # The evidence rule also reads each image shown smaller (shrink_and_tile).
        scaled = (np.stack([self._target_acts([shrink_and_tile(p, n) for p in pics])
                            for n in SCALES], axis=1)
                  if self.config.selection == "evidence" else None)  # [images, scales, units]
        for j, ((k, im), a, e) in enumerate(zip(ok, acts, embs, strict=True)):
            if cached[k] is None:  # a cached one stays as other processes read it
                out[k] = {"acts": a, "emb": np.asarray(e, dtype=np.float32),
                          **({"scaled": scaled[j]} if scaled is not None else {})}
                self.features.put(k, out[k]["acts"], out[k]["emb"], im,
                                  scaled=out[k].get("scaled"))
        return out

    def _block_images(self, requests: list[GenRequest], bank_key: dict[str, str]
                      ) -> list[Image.Image | CannotRender]:
        """The images of ``requests`` (part of one block): from the bank when another run
        made them, else generated in one call (and banked). A generator error other than
        :class:`CannotRender` is raised."""
        bank = self.bank
        keys = [self.request_key(r) for r in requests]
        out: list[Any] = [bank.get_image(bank_key[k]) if bank else None for k in keys]
        new = [i for i, im in enumerate(out) if im is None]
        made = self.generator.generate([requests[i] for i in new]) if new else []
        for i, im in zip(new, made, strict=True):
            out[i] = _usable(im)
            if isinstance(out[i], CannotRender):
                continue
            if isinstance(out[i], Exception):
                raise out[i]
            if bank:
                bank.put_image(bank_key[keys[i]], out[i])
        return out

    def _embeddings(self, keys: list[str], pics: list[Image.Image], bank_key: dict[str, str]
                    ) -> list[np.ndarray]:
        """Encoder embeddings [d] of ``pics``, the usable images of one block (request
        ``keys``): from the bank when all are banked, else all encoded together (one fixed
        batch, as for the target) and the missing ones banked."""
        bank, enc_id, size = self.bank, self.encoder.identity, self.config.gen_image_size
        banked = [bank.get_embedding(bank_key[k], enc_id, size) if bank else None
                  for k in keys]
        if all(e is not None for e in banked):
            return banked
        out = [np.asarray(e, dtype=np.float32) for e in self.encoder.encode_images(pics)]
        if bank:
            for k, e, b in zip(keys, out, banked, strict=True):
                if b is None:
                    bank.put_embedding(bank_key[k], enc_id, size, e)
        return out

    def _resize(self, im: Image.Image) -> Image.Image:
        s = self.config.gen_image_size
        return im.convert("RGB").resize((s, s), Image.BILINEAR) if s else im.convert("RGB")

    @torch.no_grad()
    def _target_acts(self, images: list[Image.Image]) -> list[np.ndarray]:
        """The layer's summary activations [n_units] float32 on ``images`` (one block), in
        batches of ``batch_size``."""
        target, module = self.target, {self.layer: self.target.layer(self.layer)}

        def run(batch: list[Image.Image]) -> list[np.ndarray]:
            x = torch.stack([target.preprocess(im) for im in batch]).to(target.device)
            with capture(target.module, module) as outs:
                target.module(x)
            s, _ = split_output(outs[self.layer], self.summary, target.num_prefix_tokens)
            return list(s.float().cpu().numpy())

        return run_batched(run, images, self.config.batch_size, "scoring generated images")


def secondary_evidence(sel: Selection, captions: Sequence[str], min_activation: float = 0.5,
                       min_captions: float = 0.5) -> tuple[int, ...]:
    """``sel.order`` with Labels 2-3 kept only when the unit responds to them.

    Label 1 (the winner) always stays. A later candidate stays only with evidence of both
    kinds:
    1. its generated images activate the unit: at least one is in the overall top-k of
       D_gen (its weight is not -1), and their mean activation is at least
       ``min_activation`` of the way from the median activation over D_gen to the mean of
       Label 1's images (a scale- and sign-free measure);
    2. the unit's own activating images show it: at least ``min_captions`` of their
       ``captions`` name every word of it (a plural 's' aside).
    Rule and defaults were chosen on the toy world's fc and conv4 units (whose units are
    all but monosemantic, so a sound rule keeps few). A secondary label is supported there
    when a concept it names detects the unit with average precision >= 0.5: with the
    consensus summariser, 2 of the 3 kept are (``results/toyworld_benchmark.md``), against
    39 of 92 under the rule "an image in the top-k and half Label 1's final score".

    Under the evidence rule (``sel.rule``), point 1 is its response R >= ``min_activation``
    and point 2 its coverage S >= ``min_captions``; and a candidate that only restates a
    kept label, more or less specifically ("red star" after "red"), is left out.
    """
    best = sel.order[0]
    if sel.rule == "evidence":
        kept = [best]
        for c in sel.order[1:]:
            name = sel.candidates[c]
            if (sel.responses[c] >= min_activation and sel.coverage[c] >= min_captions
                    and not any(more_general(name, sel.candidates[k])
                                or more_general(sel.candidates[k], name) for k in kept)):
                kept.append(c)
        return tuple(kept)
    acts = np.asarray(sel.activations)
    owner = np.asarray(sel.image_candidate)
    median, top = float(np.median(acts)), float(acts[owner == best].mean())

    def responds(c: int) -> bool:
        if sel.weights[c] == -1 or top <= median:
            return False
        return (float(acts[owner == c].mean()) - median) / (top - median) >= min_activation

    def shown(c: int) -> bool:
        if not captions:  # nothing to show it: only a rule that asks for nothing passes
            return min_captions == 0
        named = sum(said_in(sel.candidates[c], [cap]) for cap in captions)
        return named >= min_captions * len(captions)

    return (best, *(c for c in sel.order[1:] if responds(c) and shown(c)))


def shrink_and_tile(image: Image.Image, k: int) -> Image.Image:
    """``image`` shown ``k`` times smaller: shrunk to 1/k of each side and tiled k x k over
    an image of the same size (the last row and column of tiles cut to fit), so what it
    shows appears at 1/k of its size everywhere, as a small thing in a scene would."""
    w, h = image.size
    tw, th = max(1, -(-w // k)), max(1, -(-h // k))
    tile = image.convert("RGB").resize((tw, th), Image.BILINEAR)
    out = Image.new("RGB", (w, h))
    for y in range(0, h, th):
        for x in range(0, w, tw):
            out.paste(tile, (x, y))
    return out


# Brightest pixel value (0-255) of an image that counts as blank.
_BLANK_MAX = 2


def _usable(image: Image.Image | Exception) -> Image.Image | Exception:
    """The image, or :class:`CannotRender` when it is blank: Stable Diffusion's safety
    checker replaces an image it blocks with an all-black one. A dark but real image (a
    photo of a black background) has brighter pixels than ``_BLANK_MAX`` somewhere."""
    if isinstance(image, Exception):
        return image
    if max(high for _, high in image.convert("RGB").getextrema()) <= _BLANK_MAX:
        return CannotRender("the generator returned an all-black image (e.g. one its "
                            "safety checker blocked)")
    return image
