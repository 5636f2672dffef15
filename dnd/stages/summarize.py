"""Candidate concepts from image captions (Describe-and-Dissect Step 2, points 2-4).

``Summarizer`` asks a chat LLM, for many units at once, for the concept most of a unit's
captions share (T replies from one prompt), validates every reply, re-asks a bounded number
of times when too few are usable, and merges replies that list several concepts; the
replies become 1 to 6 candidates. ``ConsensusSummarizer`` needs no LLM: it ranks the word
n-grams the captions share. Both return one frozen ``Candidates`` per unit;
:func:`join_candidates` pools two summarisers' candidates.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dnd.backends.llm import JSON_SCHEMA, PREFIX, ChatLLM, ChatReply, ChatRequest, reply_form
from dnd.prompting import load_prompt
from dnd.record import Candidates, LLMUsage, Rejection
from dnd.settings import SummarizeConfig
from dnd.stages.words import (
    CAPTION_STOPWORDS,
    HEAD_NOUNS,
    WORD,
    conjunctions,
    content_words,
    coverage,
    parts,
    said_in,
    shared_words,
    unquoted,
)

# --------------------------------------------------------------------- normalising

# A last word this vague says little about the image, so DnD also tries the concept as
# a background ("floral design" -> "floral design background").
VAGUE_LAST_WORDS = frozenset({"design", "designs", "graphic", "graphics"})

# Lead-ins that models put before the answer, some echoing our own prompts.
_LEAD_IN = re.compile(
    r"^(?:label|concept|shared concept|merged concept|common concept|answer|summary|"
    r"phrase|shared phrase)\s*[:\-]\s*",
    re.IGNORECASE,
)
# A whole-sentence answer ("The object in every image is a red circle", "Most captions
# mention a red circle"): the phrase after its first verb of this list is the answer.
# A verb right after "that", "which" or "who" opens a relative clause ("The object that is
# in almost every caption is a red circle"), not the answer: it is skipped.
_SENTENCE = re.compile(
    r"^(?:the|most|all|every|each|these|they|it|many|almost)\b.*?"
    r"(?<!\bthat )(?<!\bwhich )(?<!\bwho )\b(?:is|are|shows?|"
    r"mentions?|contains?|depicts?|features?|includes?)\s+(?P<phrase>.+)$",
    re.IGNORECASE,
)
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)
# Captioners' boilerplate around the subject: "a picture of", "a close up of".
_FRAMING = re.compile(r"^(?:(?:a|an|the)\s+)?(?:picture|photo|photograph|image|drawing|"
                      r"painting|close\s*up|closeup|view)\s+of\s+", re.IGNORECASE)
_NUMBERING = re.compile(r"^\(?\d+[.)](?:\s+|$)")  # "1. ", "2) ", "(3) "; not "1.5 mm"
_BULLET = re.compile(r"^[-*\u2022\u00b7]\s*")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_DROP_QUOTES = str.maketrans("", "", "\"`\u201c\u201d\u00ab\u00bb")
_TRAILING = ".,;:!?\u2026"


def clean_concept(text: str) -> str:
    """One concept, normalised: lower case, no quotes, list markers, lead-ins such as
    'Concept:' or 'The object in every image is', leading article or trailing
    punctuation; single spaces. May return ''."""
    previous = None
    while text != previous:  # markers nest ('1. Concept: "dogs."'), so peel until stable
        previous = text
        text = text.strip()
        text = _NUMBERING.sub("", text)
        text = _BULLET.sub("", text)
        text = _LEAD_IN.sub("", text)
        if match := _SENTENCE.match(text):
            text = match["phrase"]
        text = _FRAMING.sub("", text)
        text = _ARTICLE.sub("", text)
        text = text.strip(_QUOTES).rstrip(_TRAILING)
    # Double quotes inside ('blue ring" and a red') are debris of a cut sentence.
    return " ".join(text.translate(_DROP_QUOTES).lower().split())


def split_concepts(reply: str) -> list[str]:
    """The concepts a reply lists (separated by commas, semicolons or lines), each
    cleaned; empty items dropped."""
    return [c for c in map(clean_concept, re.split(r"[,;\n]+", reply)) if c]


# Words that end the subject of a caption-like phrase ("red circle | on a dotted ...").
_SUBJECT_END = frozenset("""on in with against near under over beside behind above below at
    next inside from and while that which""".split())


def main_phrase(concept: str) -> str:
    """The subject of a caption-like concept: the words before the first word that starts
    a setting or a second object ("red circle on a dotted background" -> "red circle";
    "dog running in a park" -> "dog running"). Unchanged when there is no such word."""
    words = concept.split()
    cut = next((i for i, w in enumerate(words) if i > 0 and w in _SUBJECT_END), len(words))
    return " ".join(words[:cut])


def concepts_in_reply(reply: str, max_words: int) -> list[str]:
    """The concepts a reply names, cleaned. A sentence ("The object in every caption is a
    red circle, a blue star and ...") or a reply longer than ``max_words`` words (often an
    echoed caption) is not a list: only its first part counts, cut to its subject
    (:func:`main_phrase`). A list of short items ('dogs, puppies') stays a list."""
    text = " ".join(reply.split())
    if match := _SENTENCE.match(_LEAD_IN.sub("", text.strip(_QUOTES))):
        text = match["phrase"].split(",")[0]
    parts = split_concepts(text)
    if len(parts) > 1 and any(len(p.split()) > max_words for p in parts):
        parts = parts[:1]
    return [p if len(p.split()) <= max_words else clean_concept(main_phrase(p))
            for p in parts]


def with_background_variants(concepts: Sequence[str], limit: int | None
                             ) -> tuple[str, ...]:
    """The concepts, then '<concept> background' for those ending in a vague word, up
    to ``limit`` in all (None: no limit; the concepts themselves come first)."""
    variants = [f"{c} background" for c in concepts if c.split()[-1] in VAGUE_LAST_WORDS]
    return tuple(dict.fromkeys([*concepts, *variants]))[:limit]


# Words that may repeat in a sound concept ("black and white stripes and dots").
_REPEATABLE = frozenset("a an the and or of on in with".split())
# A concept made of these words alone says nothing about what the unit detects.
_VAGUE = frozenset("""object objects thing things item items one ones image images picture
    pictures photo photos something stuff element elements kind kinds type types various
    different same common most many some all every other""".split())
# Words of a reply about the task itself ("I'm ready to help you", "based on the example").
_META = frozenset("""caption captions description descriptions answer answers question
    questions help example examples list prompt unit neuron network""".split())


def concept_problem(concept: str, max_words: int) -> str | None:
    """Why a cleaned concept is no usable label, or None when it is one.

    Rejected: no letters; more than ``max_words`` words; a word used twice (the loops of
    small models: "white-white-white", "blue and blue"), hyphens counting as word breaks;
    a chain of four or more hyphen-joined parts ("cyan-blue-green-red"); words about the
    task rather than the images ("caption", "answer", "help"); nothing but vague words
    ("object", "images", "ones").
    """
    if not re.search(r"[a-z]", concept):
        return "no words"
    if len(concept.split()) > max_words:
        return f"more than {max_words} words"
    words = [w for w in re.split(r"[\s-]+", concept) if w and w not in _REPEATABLE]
    if len(words) != len(set(words)):
        return "a repeated word"
    if any(len(token.split("-")) >= 4 for token in concept.split()):
        return "a hyphen chain"
    plain = re.findall(r"[a-z]+", concept)
    if any(w in _META for w in plain):
        return "about the task, not the images"
    if all(w in _VAGUE or w in _REPEATABLE for w in plain):
        return "too vague"
    return None


# ---------------------------------------------------------------------- results


def _check_units(captions: Mapping[int, Sequence[str]]) -> dict[int, list[str]]:
    """Captions per unit, stripped, empty ones dropped; unit ids must be ints >= 0."""
    units = {}
    for unit, caps in captions.items():
        if isinstance(unit, bool) or not isinstance(unit, (int, np.integer)) or unit < 0:
            raise ValueError(f"unit ids must be integers >= 0, got {unit!r}")
        if isinstance(caps, str):
            raise TypeError(f"unit {unit}: expected a list of captions, got one string")
        units[int(unit)] = [c.strip() for c in caps if c.strip()]
    return units


def join_candidates(first: Candidates, second: Candidates, extra: int) -> Candidates:
    """``first``'s candidates, then up to ``extra`` of ``second``'s that are new; sources
    merged (a concept both proposed names both). Everything else is ``first``'s."""
    sources = dict(zip(first.concepts, first.sources or [("llm",)] * len(first.concepts)))
    added = 0
    for concept, src in zip(second.concepts,
                            second.sources or [("consensus",)] * len(second.concepts)):
        if concept in sources:
            sources[concept] = tuple(dict.fromkeys([*sources[concept], *src]))
        elif added < extra:
            sources[concept] = tuple(src)
            added += 1
    error = first.error if not sources else None
    return dataclasses.replace(first, concepts=tuple(sources), sources=tuple(sources.values()),
                               error=error)


def at_levels(cands: Candidates, captions: Sequence[str], limit: int) -> Candidates:
    """``cands`` with the parts of each multi-word concept (:func:`dnd.stages.words.parts`:
    "red circle" -> "red", "circle"; source ``part``), ranked by coverage (the share of
    ``captions`` naming them; ties: fewer words first, then the summariser's order), one
    per set of content words a head noun aside ("checkered background" repeats "checkered";
    "background" alone names nothing), the first ``limit``.
    Unchanged when it failed. The parts make an attribute a candidate whenever a
    summariser names an object that has it, and coverage puts the concepts the unit's
    images share before those of one scene."""
    if not cands.ok or not cands.concepts:
        return cands
    sources = dict(zip(cands.concepts, cands.sources or [()] * len(cands.concepts)))
    for concept in cands.concepts:
        for part in parts(concept):
            sources.setdefault(part, ("part",))
    cover = {c: coverage(c, captions) for c in sources}
    # One candidate per meaning, in its fewest words: "checkered background" and
    # "background with the word" say what "checkered" and "word" say.
    ranked = sorted(sources, key=lambda c: (-cover[c], len(c.split())))  # stable otherwise
    seen: set[frozenset[str]] = set()
    kept = []
    for c in ranked:
        key = content_words(c) - HEAD_NOUNS
        # "background" alone names no concept; "thing" says nothing (concept_problem)
        if key and key not in seen and concept_problem(c, LEVEL_MAX_WORDS) is None:
            seen.add(key)
            kept.append(c)
    kept = kept[:limit]
    return dataclasses.replace(cands, concepts=tuple(kept),
                               sources=tuple(sources[c] for c in kept))


# -------------------------------------------------------------------- LLM summariser


@dataclass
class _UnitWork:
    """A unit's state while its requests are in flight."""

    captions: list[str]
    concepts: list[str] = field(default_factory=list)
    lists: list[list[str]] = field(default_factory=list)  # replies naming several concepts
    replies: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    usage: LLMUsage = LLMUsage()
    error: str | None = None
    usable: int = 0  # replies that gave at least one concept


# The structured-output schema of a concept request: the concepts, most shared first.
CONCEPTS_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["concepts"],
                   "properties": {"concepts": {"type": "array", "items": {"type": "string"}}}}


def reply_items(text: str, form: str | None, max_words: int, levels: bool = False
                ) -> list[str]:
    """What one reply names, cleaned: the ``concepts`` of a JSON reply (structured output;
    text that is not such JSON is read as text), else :func:`concepts_in_reply`; with
    ``levels``, every item of the text, split at commas, semicolons, line breaks and
    "and" (an item may be long: an echoed caption)."""
    if form == JSON_SCHEMA:
        try:
            items = json.loads(text)["concepts"]
            if isinstance(items, list) and all(isinstance(i, str) for i in items):
                return [c for c in map(clean_concept, items) if c]
        except (ValueError, KeyError, TypeError):
            pass  # a server that ignored the schema: its text
    if levels:
        text = " ".join(text.split())
        if match := _SENTENCE.match(_LEAD_IN.sub("", text.strip(_QUOTES))):
            text = match["phrase"]
        return [c for c in map(clean_concept, re.split(r"[,;\n]+|\s+and\s+", text)) if c]
    return concepts_in_reply(text, max_words)


class Summarizer:
    """Steps 2.2-2.4 of DnD through an injected chat LLM, for many units at once (wrap the
    LLM in ``CachedChat`` to make re-runs free).

    Per unit, at most ``2 + max_reasks`` requests:
    1. one prompt listing the unit's captions, answered ``num_samples`` times (the
       captions are given whole: the prompt asks to drop the details Step 2.2's
       simplification drops, which saves a request per caption);
    2. every reply is cleaned and validated (:func:`concept_problem`, an echo of a
       few-shot answer the captions do not support); rejected replies are recorded;
    3. while fewer than half the replies are usable, the prompt is asked again with a new
       seed (bounded by ``max_reasks``);
    4. replies listing several concepts are merged by one more request;
    5. concepts are counted, most proposed first, with '<concept> background' variants.
    Each round of requests for all units goes out at once through ``llm.complete_many``.

    The answer is asked for in a form that needs no parsing where the LLM takes one
    (:func:`dnd.backends.llm.reply_form`): a JSON list (:data:`CONCEPTS_SCHEMA`) from a
    server with structured output, the prompt's ``answer_prefix`` written for a local chat
    model to go on from; a plain reply otherwise.

    With ``levels`` (``RunConfig.candidates``), a reply is a list of concepts at any level
    (the v3 prompt asks for that): each item is a concept, an item too long to be one (an
    echoed caption) gives its words instead, and nothing is merged (step 4 is skipped).
    """

    def __init__(self, llm: ChatLLM, config: SummarizeConfig | None = None,
                 prompts_dir: str | Path | None = None, levels: bool = False):
        self.llm = llm
        self.config = config or SummarizeConfig()
        self.levels = levels
        self.form = reply_form(llm)
        self.concept_prompt = load_prompt(self.config.concept_prompt, prompts_dir)
        self.merge_prompt = load_prompt(self.config.merge_prompt, prompts_dir)
        # Answers of the few-shot examples: a reply repeating one is an echo unless the
        # unit's own captions say it.
        self._example_answers = frozenset(
            clean_concept(a) for p in (self.concept_prompt, self.merge_prompt)
            for _, a in p.examples)

    def summarize(self, captions: Mapping[int, Sequence[str]]) -> dict[int, Candidates]:
        """Candidates for every unit (see the class docstring for the steps)."""
        units = _check_units(captions)
        work = {u: _UnitWork(caps) for u, caps in units.items() if caps}
        # 1-3. Concept requests, then re-asks for units with too few usable replies.
        needed = (self.config.num_samples + 1) // 2
        for attempt in range(self.config.max_reasks + 1):
            due = {u: w for u, w in work.items() if w.error is None and w.usable < needed}
            if not due:
                break
            self._ask_concepts(due, attempt)
        # 4. One merge request per unit whose replies listed several concepts (levels:
        #    lists are the answer, nothing is merged).
        self._merge({u: w for u, w in work.items() if w.lists})
        # 5. Normalised, counted candidates.
        return {u: self._result(u, work.get(u)) for u in units}

    def _send(self, requests: list[ChatRequest]) -> list[ChatReply | Exception]:
        return self.llm.complete_many(requests) if requests else []

    def _ask_concepts(self, due: dict[int, _UnitWork], attempt: int) -> None:
        cfg, prompt = self.config, self.concept_prompt
        temperature = cfg.temperature if attempt == 0 else max(cfg.temperature,
                                                                 cfg.reask_temperature)
        form = {"schema": CONCEPTS_SCHEMA} if self.form == JSON_SCHEMA else \
            {"answer_prefix": prompt.answer_prefix} if self.form == PREFIX else {}
        requests = [
            ChatRequest(tuple(prompt.messages(captions=_numbered(w.captions))), temperature,
                        prompt.id, sample=attempt, n=cfg.num_samples,
                        max_tokens=cfg.max_tokens, stop=() if self.form == JSON_SCHEMA
                        else ("\n",), **form)
            for w in due.values()]
        for w, reply in zip(due.values(), self._send(requests), strict=True):
            if isinstance(reply, Exception):
                w.error = f"concept request failed: {reply}"
                continue
            w.usage = w.usage.plus(reply)
            for text in reply.texts:
                w.replies.append(text)
                parts = reply_items(text, self.form, cfg.max_words, self.levels)
                if self.levels:
                    self._take_items(w, text, parts)
                    continue
                problem = self._problem(parts, w.captions)
                if problem:
                    w.rejected.append(Rejection(text, problem))
                elif len(parts) > 1:
                    w.lists.append(parts)
                    w.usable += 1
                else:
                    w.concepts.append(parts[0])
                    w.usable += 1

    def _take_items(self, w: _UnitWork, text: str, items: list[str]) -> None:
        """Levels: every usable item of one reply is a concept; an item of more than
        ``max_words`` words gives its short parts (its words) instead."""
        max_words = self.config.max_words
        short = [p for item in items
                 for p in ([item] if len(item.split()) <= max_words
                           else [q for q in parts(item) if len(q.split()) <= max_words])]
        good, problems = [], []
        for item in dict.fromkeys(short):
            problem = self._problem([item], w.captions)
            (problems if problem else good).append(problem or item)
        if good:
            w.concepts += good
            w.usable += 1
        else:
            w.rejected.append(Rejection(text, problems[0] if problems else "empty"))

    def _merge(self, due: dict[int, _UnitWork]) -> None:
        cfg, prompt = self.config, self.merge_prompt
        listed = {u: list(dict.fromkeys(c for parts in w.lists for c in parts))
                  for u, w in due.items()}
        requests = [ChatRequest(tuple(prompt.messages(concepts=", ".join(listed[u]))), 0.0,
                                prompt.id, max_tokens=cfg.max_tokens, stop=("\n",))
                    for u in due]
        for (u, w), reply in zip(due.items(), self._send(requests), strict=True):
            if isinstance(reply, Exception):
                w.error = f"merge request failed: {reply}"
                continue
            w.usage = w.usage.plus(reply)
            w.replies.append(reply.text)
            parts = concepts_in_reply(reply.text, cfg.max_words)
            problem = self._problem(parts[:1], [*w.captions, *listed[u]])
            if problem:
                # The lists themselves stay evidence: their most proposed item counts.
                w.rejected.append(Rejection(reply.text, f"merge: {problem}"))
                counts = Counter(c for parts in w.lists for c in parts)
                w.concepts += [counts.most_common(1)[0][0]] * len(w.lists)
            else:
                w.concepts += [parts[0]] * len(w.lists)

    def _problem(self, parts: list[str], evidence: list[str]) -> str | None:
        """Why a reply (its cleaned ``parts``) is unusable, or None. An answer of a
        few-shot example is an echo unless the ``evidence`` texts say it too."""
        if not parts:
            return "empty"
        for part in parts:
            problem = concept_problem(part, self.config.max_words)
            if problem:
                return problem
            if part in self._example_answers and not said_in(part, evidence):
                return "an echo of a prompt example"
        return None

    def _result(self, unit: int, w: _UnitWork | None) -> Candidates:
        versions = (self.concept_prompt.id, self.merge_prompt.id)
        if w is None:
            return Candidates(unit, (), prompt_versions=versions, error="no captions")
        common = dict(replies=tuple(w.replies), rejected=tuple(w.rejected),
                      prompt_versions=versions, usage=w.usage)
        if w.error is not None:  # a failed request: the unit is retried, not guessed
            return Candidates(unit, (), error=w.error, **common)
        counts = Counter(w.concepts)
        ranked = sorted(counts, key=lambda c: -counts[c])  # stable: first proposed first
        # With levels every concept goes on: at_levels ranks them and their parts by
        # coverage and keeps LEVEL_MAX_CANDIDATES (a cut by count here would drop the
        # pairs an echoed caption's words form, "yellow triangle" after "yellow").
        concepts = with_background_variants(
            ranked, None if self.levels else self.config.max_candidates)
        sources = tuple(("llm",) if c in counts else ("background-variant",)
                        for c in concepts)
        return Candidates(unit, concepts, sources, **common)


def _numbered(captions: Sequence[str]) -> str:
    return "\n".join(f"{i}. {c}" for i, c in enumerate(captions, 1))


# --------------------------------------------------------------- consensus (no LLM)



# The consensus summariser's two settings are constants, not run config: no run has needed
# other values. Phrases of up to 4 words cover "red circle on stripes"; 6 candidates is what
# the LLM summariser keeps by default (summarize.max_candidates).
CONSENSUS_MAX_WORDS = 4
CONSENSUS_MAX_CANDIDATES = 6
# Candidates at every level (RunConfig.candidates "levels"): a word or a conjunction is a
# candidate when at least this share of the unit's captions name it.
LEVEL_MIN_SHARE = 0.5
# ... and a unit keeps at most this many candidates, the most covered first, each passing
# concept_problem (the consensus summariser's phrases have up to CONSENSUS_MAX_WORDS content
# words, a conjunction up to two and their function words: at most this many words).
LEVEL_MAX_CANDIDATES = 8
LEVEL_MAX_WORDS = 6


class ConsensusSummarizer:
    """Candidates without an LLM: the phrases most captions share.

    A phrase is a word n-gram (n = 1..``max_n``) that neither starts nor ends with a stopword;
    its support is the number of captions containing it. A phrase inside a longer one
    with the same support is dropped ('red' when 'red circle' is in as many captions).
    With ``levels``, also every word at least half the captions share, even inside a longer
    phrase ('word' of 'background with the word'; source ``shared word``), and conjunctions
    of two such words the captions say apart ('red ... noisy': 'red on a noisy background';
    source ``conjunction``, :func:`dnd.stages.words.conjunctions`), so that an attribute or
    a combination of attributes is a candidate and not only the scene phrases around it.
    Candidates rank by support, then, given ``embed`` (texts -> array of embeddings), by
    cosine similarity to the mean caption embedding, else by length; the first
    ``max_candidates`` are kept (with ``levels`` all: :func:`at_levels` ranks and cuts).
    Deterministic.
    """

    def __init__(
        self,
        embed: Callable[[list[str]], np.ndarray] | None = None,
        *,
        levels: bool = False,
        max_n: int = CONSENSUS_MAX_WORDS,
        max_candidates: int = CONSENSUS_MAX_CANDIDATES,
    ):
        if max_n < 1 or max_candidates < 1:
            raise ValueError(f"max_n and max_candidates must be >= 1, got {max_n}, "
                             f"{max_candidates}")
        self.embed = embed
        self.levels = levels
        self.max_n = max_n
        self.max_candidates = max_candidates

    def summarize(self, captions: Mapping[int, Sequence[str]]) -> dict[int, Candidates]:
        """Candidates for every unit (one embedding call for all units)."""
        units = _check_units(captions)
        # 1. Supported phrases per unit (with levels: shared words and conjunctions too).
        found = {unit: self._supported(caps) for unit, caps in units.items()}
        phrases = {unit: {p: n for p, (n, _) in f.items()} for unit, f in found.items()}
        # 2. Optional tie-break by closeness to what the captions say overall.
        closeness = self._closeness(units, phrases) if self.embed else {}
        # 3. Rank and cut.
        results = {}
        for unit, support in phrases.items():
            sim = closeness.get(unit, {})
            ranked = sorted(
                support,
                key=lambda p: (-support[p], -sim.get(p, 0.0), -len(p.split()), p),
            )
            concepts = tuple(ranked if self.levels else ranked[: self.max_candidates])
            error = None if concepts else "no words left after removing stopwords"
            results[unit] = Candidates(unit, concepts,
                                       tuple((found[unit][c][1],) for c in concepts),
                                       error=error)
        return results

    def _supported(self, captions: list[str]) -> dict[str, tuple[int, str]]:
        """Candidate -> (support, source) for one unit's captions (with levels, what they
        quote left out: :func:`dnd.stages.words.unquoted`)."""
        phrases = self._phrases([unquoted(c) for c in captions] if self.levels else captions)
        out = {p: (n, "consensus") for p, n in phrases.items()}
        if self.levels and captions:
            shared = shared_words(captions, LEVEL_MIN_SHARE)
            for word, n in shared.items():
                out.setdefault(word, (n, "shared word"))
            for text, n in conjunctions(captions, list(shared), LEVEL_MIN_SHARE).items():
                out.setdefault(text, (n, "conjunction"))
        return out

    def _phrases(self, captions: list[str]) -> dict[str, int]:
        """Phrase -> number of captions containing it, sub-phrases with equal support gone."""
        support: Counter[tuple[str, ...]] = Counter()
        for caption in captions:
            words = WORD.findall(caption.lower())
            grams = set()
            for n in range(1, self.max_n + 1):
                for i in range(len(words) - n + 1):
                    gram = tuple(words[i : i + n])
                    if gram[0] not in CAPTION_STOPWORDS and gram[-1] not in CAPTION_STOPWORDS:
                        grams.add(gram)
            support.update(grams)
        subsumed = set()
        for gram, count in support.items():
            for n in range(1, len(gram)):
                for i in range(len(gram) - n + 1):
                    if support.get(gram[i : i + n]) == count:
                        subsumed.add(gram[i : i + n])
        return {" ".join(g): c for g, c in support.items() if g not in subsumed}

    def _closeness(
        self, units: dict[int, list[str]], phrases: dict[int, dict[str, int]]
    ) -> dict[int, dict[str, float]]:
        """Cosine similarity of each phrase to the unit's mean caption embedding."""
        texts = sorted({t for u in units for t in [*units[u], *phrases[u]]})
        if not texts:
            return {}
        vectors = np.asarray(self.embed(texts), dtype=np.float64)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        index = {t: i for i, t in enumerate(texts)}
        out = {}
        for unit, caps in units.items():
            if not caps:
                continue
            centre = vectors[[index[c] for c in caps]].mean(axis=0)
            centre /= max(np.linalg.norm(centre), 1e-12)
            out[unit] = {p: float(vectors[index[p]] @ centre) for p in phrases[unit]}
        return out
