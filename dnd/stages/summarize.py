"""Candidate concepts from image captions (Describe-and-Dissect Step 2, points 2-4).

``Summarizer`` asks a chat LLM, for many units at once: simplify every caption to a short
label, then T times (caption order shuffled each time) for the concept most labels share,
merging replies that list several concepts; the replies are normalised into 1 to 6
candidates. ``ConsensusSummarizer`` needs no LLM: it ranks the word n-grams the captions
share. Both return one frozen ``Candidates`` per unit.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import dnd
from dnd.backends.llm import ChatLLM, ChatRequest

# ------------------------------------------------------------------------ prompts

_PROMPT_NAME = re.compile(r"(?P<base>[a-z0-9_]+)\.v(?P<version>\d+)")


def prompt_dirs() -> list[Path]:
    """Where prompts are looked up: the repository's ``prompts/`` next to the package (a
    source checkout or editable install), then the copy installed inside the package."""
    package = Path(dnd.__file__).resolve().parent
    return [package.parent / "prompts", package / "prompts"]


@dataclass(frozen=True)
class Prompt:
    """A versioned chat prompt: system text, few-shot pairs, and a user template whose
    ``{placeholders}`` are filled with ``str.format`` (plain names only)."""

    name: str
    version: int
    system: str
    examples: tuple[tuple[str, str], ...]
    user: str

    def __post_init__(self) -> None:
        _placeholders(self.user, self.id)  # fail at load time, not at the first request

    @property
    def id(self) -> str:
        """``name.vN``: the prompt's identity in cache keys and results."""
        return f"{self.name}.v{self.version}"

    @property
    def fields(self) -> frozenset[str]:
        """The placeholder names ``messages`` must be given."""
        return _placeholders(self.user, self.id)

    def messages(self, **fields: str) -> list[dict[str, str]]:
        """The chat: system, the few-shot pairs, then the filled-in user template."""
        if set(fields) != self.fields:
            raise ValueError(
                f"prompt {self.id} takes fields {sorted(self.fields)}, got {sorted(fields)}"
            )
        chat = [{"role": "system", "content": self.system}]
        for user, assistant in self.examples:
            chat += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        chat.append({"role": "user", "content": self.user.format(**fields)})
        return chat


def _placeholders(template: str, prompt_id: str) -> frozenset[str]:
    names = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        # Plain names only: '{x.attr}' or '{x[0]}' would reach into the values.
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"prompt {prompt_id}: unsupported placeholder {{{name}}}")
        names.add(name)
    return frozenset(names)


def load_prompt(name: str, prompts_dir: str | Path | None = None) -> Prompt:
    """Load ``<name>.yaml`` (e.g. ``"summarize_concept.v1"``) from ``prompts_dir`` or,
    by default, the first of ``prompt_dirs()`` that has it."""
    match = _PROMPT_NAME.fullmatch(name)
    if not match:
        raise ValueError(f"prompt names look like 'summarize_concept.v1', got {name!r}")
    dirs = [Path(prompts_dir)] if prompts_dir is not None else prompt_dirs()
    path = next((d / f"{name}.yaml" for d in dirs if (d / f"{name}.yaml").is_file()), None)
    if path is None:
        raise FileNotFoundError(f"prompt {name!r} not found in {[str(d) for d in dirs]}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    version = int(match["version"])
    if not isinstance(data, dict) or data.get("version") != version:
        raise ValueError(f"{path}: expected a mapping with 'version: {version}'")
    try:
        examples = tuple((str(e["user"]), str(e["assistant"])) for e in data.get("examples", []))
        return Prompt(match["base"], version, str(data["system"]).strip(), examples,
                      str(data["user"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed prompt ({exc!r})") from exc


# --------------------------------------------------------------------- normalising

# A last word this vague says little about the image, so DnD also tries the concept as
# a background ("floral design" -> "floral design background").
VAGUE_LAST_WORDS = frozenset({"design", "designs", "graphic", "graphics"})

# Lead-ins that models put before the answer, some echoing our own prompts.
_LEAD_IN = re.compile(
    r"^(?:label|concept|shared concept|merged concept|common concept|answer|summary)\s*[:\-]\s*",
    re.IGNORECASE,
)
_NUMBERING = re.compile(r"^\(?\d+[.)](?:\s+|$)")  # "1. ", "2) ", "(3) "; not "1.5 mm"
_BULLET = re.compile(r"^[-*\u2022\u00b7]\s*")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_TRAILING = ".,;:!?\u2026"


def clean_concept(text: str) -> str:
    """One concept, normalised: lower case, no quotes, list markers, lead-ins such as
    'Concept:', or trailing punctuation; single spaces. May return ''."""
    previous = None
    while text != previous:  # markers nest ('1. Concept: "dogs."'), so peel until stable
        previous = text
        text = text.strip()
        text = _NUMBERING.sub("", text)
        text = _BULLET.sub("", text)
        text = _LEAD_IN.sub("", text)
        text = text.strip(_QUOTES).rstrip(_TRAILING)
    return " ".join(text.lower().split())


def split_concepts(reply: str) -> list[str]:
    """The concepts in a reply: one, or several when it lists them (commas, semicolons
    or lines), each cleaned; empty items dropped."""
    return [c for c in map(clean_concept, re.split(r"[,;\n]+", reply)) if c]


def with_background_variants(concepts: Sequence[str], limit: int) -> tuple[str, ...]:
    """The concepts, then '<concept> background' for those ending in a vague word, up
    to ``limit`` in all (the concepts themselves come first)."""
    variants = [f"{c} background" for c in concepts if c.split()[-1] in VAGUE_LAST_WORDS]
    return tuple(dict.fromkeys([*concepts, *variants]))[:limit]


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class Candidates:
    """Candidate concepts for one unit, best supported first.

    ``simplified`` holds the label used for each caption, ``replies`` the raw concept
    replies; ``error`` is set (and ``concepts`` empty) when the unit failed.
    """

    unit: int
    concepts: tuple[str, ...]
    simplified: tuple[str, ...] = ()
    replies: tuple[str, ...] = ()
    prompt_versions: tuple[str, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Candidates:
        return cls(
            unit=int(d["unit"]),
            concepts=tuple(d["concepts"]),
            simplified=tuple(d.get("simplified", ())),
            replies=tuple(d.get("replies", ())),
            prompt_versions=tuple(d.get("prompt_versions", ())),
            error=d.get("error"),
        )


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


# -------------------------------------------------------------------- LLM summariser


@dataclass(frozen=True)
class SummarizeConfig:
    """Settings of ``Summarizer`` (paper: T = 5 samples at temperature 0.3)."""

    num_samples: int = 5
    concept_temperature: float = 0.3
    simplify_temperature: float = 0.0
    merge_temperature: float = 0.0
    max_words: int = 8
    max_candidates: int = 6
    seed: int = 0
    simplify_prompt: str = "simplify_caption.v1"
    concept_prompt: str = "summarize_concept.v1"
    merge_prompt: str = "merge_concepts.v1"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        temps = (self.concept_temperature, self.simplify_temperature, self.merge_temperature)
        if min(temps) < 0:
            raise ValueError(f"temperatures must be >= 0, got {temps}")
        if self.max_words < 1 or self.max_candidates < 1:
            raise ValueError("max_words and max_candidates must be >= 1")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in (self.simplify_prompt, self.concept_prompt, self.merge_prompt):
            if not _PROMPT_NAME.fullmatch(name):
                raise ValueError(f"prompt names look like 'summarize_concept.v1', got {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SummarizeConfig:
        return cls(**d)


@dataclass
class _UnitWork:
    """A unit's intermediate state while its requests are in flight."""

    labels: list[str]
    replies: list[str]
    concepts: list[str]
    errors: list[str]


class Summarizer:
    """Step 2.2-2.4 of DnD through an injected chat LLM (wrap it in ``CachedChat`` to
    make re-runs free)."""

    def __init__(
        self,
        llm: ChatLLM,
        config: SummarizeConfig | None = None,
        prompts_dir: str | Path | None = None,
    ):
        self.llm = llm
        self.config = config or SummarizeConfig()
        self.simplify_prompt = load_prompt(self.config.simplify_prompt, prompts_dir)
        self.concept_prompt = load_prompt(self.config.concept_prompt, prompts_dir)
        self.merge_prompt = load_prompt(self.config.merge_prompt, prompts_dir)

    def summarize(self, captions: Mapping[int, Sequence[str]]) -> dict[int, Candidates]:
        """Candidates for every unit; each round of requests for all units goes out at
        once through ``llm.complete_many``."""
        units = _check_units(captions)
        # 1. Simplify each distinct caption once, however many units share it.
        labels = self._simplify(sorted({c for caps in units.values() for c in caps}))
        work: dict[int, _UnitWork] = {}
        failed: dict[int, str] = {}
        for unit, caps in units.items():
            errors = [str(labels[c]) for c in caps if isinstance(labels[c], Exception)]
            if not caps:
                failed[unit] = "no captions"
            elif errors:
                failed[unit] = f"simplifying a caption failed: {errors[0]}"
            else:
                work[unit] = _UnitWork([labels[c] for c in caps], [], [], [])
        # 2. T concept requests per unit, each over a differently shuffled label list.
        to_merge = self._ask_concepts(work)
        # 3. One merge request per reply that listed several concepts.
        self._merge(to_merge)
        # 4. Normalised, counted candidates.
        return {
            unit: self._result(unit, work.get(unit), failed.get(unit)) for unit in units
        }

    def _send(self, requests: list[ChatRequest]) -> list[str | Exception]:
        return self.llm.complete_many(requests) if requests else []

    def _simplify(self, captions: list[str]) -> dict[str, str | Exception]:
        """Caption -> short label (or the exception that stopped it)."""
        prompt, cfg = self.simplify_prompt, self.config
        requests = [
            ChatRequest(tuple(prompt.messages(caption=c)), cfg.simplify_temperature, prompt.id)
            for c in captions
        ]
        out: dict[str, str | Exception] = {}
        for caption, reply in zip(captions, self._send(requests), strict=True):
            if isinstance(reply, Exception):
                out[caption] = reply
                continue
            label = clean_concept(reply)
            # An empty or rambling label is no simplification: the concept prompt copes
            # with the caption itself.
            ok = label and "\n" not in reply.strip() and len(label.split()) <= cfg.max_words
            out[caption] = label if ok else caption
        return out

    def shuffled_orders(self, unit: int, num_captions: int) -> list[np.ndarray]:
        """The T caption orders for ``unit``: fixed by (config seed, unit id)."""
        rng = np.random.default_rng([self.config.seed, unit])
        return [rng.permutation(num_captions) for _ in range(self.config.num_samples)]

    def _ask_concepts(self, work: dict[int, _UnitWork]) -> list[tuple[_UnitWork, list[str]]]:
        """Send every unit's T requests; single concepts are kept, lists returned."""
        prompt, cfg = self.concept_prompt, self.config
        owners: list[_UnitWork] = []
        requests: list[ChatRequest] = []
        for unit, w in work.items():
            for sample, order in enumerate(self.shuffled_orders(unit, len(w.labels))):
                listing = "\n".join(f"- {w.labels[i]}" for i in order)
                messages = tuple(prompt.messages(captions=listing))
                requests.append(ChatRequest(messages, cfg.concept_temperature, prompt.id, sample))
                owners.append(w)
        to_merge = []
        for w, reply in zip(owners, self._send(requests), strict=True):
            if isinstance(reply, Exception):
                w.errors.append(f"concept request failed: {reply}")
                continue
            w.replies.append(reply)
            parts = split_concepts(reply)
            if len(parts) > 1:
                to_merge.append((w, parts))
            else:
                self._accept(w, parts[0] if parts else "", reply)
        return to_merge

    def _merge(self, to_merge: list[tuple[_UnitWork, list[str]]]) -> None:
        prompt, cfg = self.merge_prompt, self.config
        requests = [
            ChatRequest(tuple(prompt.messages(concepts=", ".join(parts))),
                        cfg.merge_temperature, prompt.id)
            for _, parts in to_merge
        ]
        for (w, _), reply in zip(to_merge, self._send(requests), strict=True):
            if isinstance(reply, Exception):
                w.errors.append(f"merge request failed: {reply}")
                continue
            parts = split_concepts(reply)
            # A merge reply that still lists several: take its leading item.
            self._accept(w, parts[0] if parts else "", reply)

    def _accept(self, w: _UnitWork, concept: str, reply: str) -> None:
        """Keep a cleaned concept unless it is empty or far too long to be one."""
        if concept and len(concept.split()) <= self.config.max_words:
            w.concepts.append(concept)
        else:
            w.errors.append(f"malformed reply {reply[:80]!r}")

    def _result(self, unit: int, w: _UnitWork | None, failure: str | None) -> Candidates:
        versions = (self.simplify_prompt.id, self.concept_prompt.id, self.merge_prompt.id)
        if w is None:
            return Candidates(unit, (), prompt_versions=versions, error=failure)
        # Most often proposed first; ties keep the order of first appearance.
        counts = Counter(w.concepts)
        ranked = sorted(counts, key=lambda c: -counts[c])
        concepts = with_background_variants(ranked, self.config.max_candidates)
        error = None if concepts else "; ".join(w.errors) or "no concept in any reply"
        return Candidates(unit, concepts, tuple(w.labels), tuple(w.replies), versions, error)


# --------------------------------------------------------------- consensus (no LLM)

# Function words, plus the boilerplate image captioners put around every subject.
CAPTION_STOPWORDS = frozenset(
    """a an the and or of on in at to for with without from by near over under into onto
    is are was were be being been has have it its this that these those there their his
    her some two three several many other next up down out off top front back side
    image images picture pictures photo photos photograph view close closeup shot
    showing shows shown made looking sitting standing laying lying arafed araffe""".split()
)

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


@dataclass(frozen=True)
class ConsensusConfig:
    """Settings of ``ConsensusSummarizer``: phrases of 1..``max_n`` words."""

    max_n: int = 4
    max_candidates: int = 6

    def __post_init__(self) -> None:
        if self.max_n < 1 or self.max_candidates < 1:
            raise ValueError("max_n and max_candidates must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConsensusSummarizer:
    """Candidates without an LLM: the phrases most captions share.

    A phrase is a word n-gram (n = 1..max_n) that neither starts nor ends with a stopword;
    its support is the number of captions containing it. A phrase inside a longer one
    with the same support is dropped ('red' when 'red circle' is in as many captions).
    Phrases rank by support, then, given ``embed`` (texts -> array of embeddings), by
    cosine similarity to the mean caption embedding, else by length. Deterministic.
    """

    def __init__(
        self,
        config: ConsensusConfig | None = None,
        embed: Callable[[list[str]], np.ndarray] | None = None,
    ):
        self.config = config or ConsensusConfig()
        self.embed = embed

    def summarize(self, captions: Mapping[int, Sequence[str]]) -> dict[int, Candidates]:
        """Candidates for every unit (one embedding call for all units)."""
        units = _check_units(captions)
        # 1. Supported phrases per unit.
        phrases = {unit: self._phrases(caps) for unit, caps in units.items()}
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
            concepts = tuple(ranked[: self.config.max_candidates])
            error = None if concepts else "no words left after removing stopwords"
            results[unit] = Candidates(unit, concepts, error=error)
        return results

    def _phrases(self, captions: list[str]) -> dict[str, int]:
        """Phrase -> number of captions containing it, sub-phrases with equal support gone."""
        support: Counter[tuple[str, ...]] = Counter()
        for caption in captions:
            words = _WORD.findall(caption.lower())
            grams = set()
            for n in range(1, self.config.max_n + 1):
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
