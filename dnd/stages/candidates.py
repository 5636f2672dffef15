"""Steps 2.2-2.4 as a pipeline stage: candidate concepts from each unit's captions.

Which summariser runs is ``config.summarizer``: ``consensus`` (the phrases the captions
share, no LLM), ``llm`` (:class:`dnd.stages.summarize.Summarizer`) or ``llm+consensus``
(the LLM's candidates joined by up to ``summarize.consensus_extra`` shared phrases). When
every LLM reply of a unit is rejected, the shared phrases stand in, marked as a fallback;
a failed LLM request fails the unit instead (it is retried on the next run).

With ``config.candidates`` "levels" (the default) the candidates are taken at every level:
the consensus summariser adds the words and conjunctions of words the captions share,
every multi-word candidate's parts join it, and the candidates are ranked by how many of
the unit's captions name them (:func:`dnd.stages.summarize.at_levels`). "phrases" keeps the
summariser's candidates as they are (the paper).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dnd.record import UnitRecord
from dnd.stages.base import RunContext
from dnd.stages.summarize import (
    LEVEL_MAX_CANDIDATES,
    ConsensusSummarizer,
    Summarizer,
    at_levels,
    join_candidates,
)


class CandidateStage:
    """See the module docstring; the contract is in :mod:`dnd.stages.base`."""

    name = "candidates"

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        enc = ctx.models.encoder
        self.levels = ctx.config.candidates == "levels"
        self.consensus = ConsensusSummarizer(embed=enc.encode_texts if enc is not None else None,
                                             levels=self.levels)
        self.summarizer = (Summarizer(ctx.models.llm, ctx.config.summarize, levels=self.levels)
                           if ctx.config.uses_llm else None)

    def __call__(self, records: Sequence[UnitRecord]) -> list[UnitRecord]:
        captions = {r.unit: list(r.captions) for r in records}
        if self.summarizer is None:
            cands = self.consensus.summarize(captions)
        else:
            cands = self.summarizer.summarize(captions)
            pooled = self.ctx.config.summarizer == "llm+consensus"
            # Shared phrases only where they are used: every unit when pooling, else the
            # units whose LLM replies were all rejected.
            need = [u for u, c in cands.items() if c.ok and (pooled or not c.concepts)]
            phrases = self.consensus.summarize({u: captions[u] for u in need}) if need else {}
            extra = self.ctx.config.summarize.consensus_extra
            for u in need:
                c = cands[u]
                if pooled:
                    cands[u] = join_candidates(c, phrases[u], extra)
                else:
                    cands[u] = dataclasses.replace(
                        join_candidates(c, phrases[u], len(phrases[u].concepts)),
                        fallback=f"the LLM gave no usable concept in {len(c.replies)} "
                                 "replies; candidates are the captions' shared phrases")
        if self.levels:
            cands = {u: at_levels(c, captions[u], LEVEL_MAX_CANDIDATES)
                     for u, c in cands.items()}
        out = []
        for r in records:
            c = cands[r.unit]
            if c.ok and c.concepts:
                out.append(r.finish(self.name, candidates=c))
            else:
                out.append(r.fail(self.name, f"candidates: {c.error or 'no candidate concept'}",
                                  candidates=c))
        return out
