"""Versioned chat prompts loaded from ``prompts/<name>.vN.yaml``.

A prompt file holds ``version``, ``system``, optional few-shot ``examples`` (``user`` /
``assistant`` pairs), a ``user`` template whose ``{placeholders}`` are plain names and an
optional ``answer_prefix``: the start of the answer, for chat models that go on from a
prefilled answer (:class:`dnd.backends.llm.ChatRequest`). The
prompt's id (``name.vN``) is its identity in cache keys and results.
Used by the summarisers (:mod:`dnd.stages.summarize`) and the chat captioner
(:mod:`dnd.backends.caption`); it depends on neither.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

_PROMPT_NAME = re.compile(r"(?P<base>[a-z0-9_]+)\.v(?P<version>\d+)")


def check_prompt_name(name: str) -> re.Match[str]:
    """``name`` split into base and version; raises ValueError unless it reads ``base.vN``."""
    match = _PROMPT_NAME.fullmatch(name)
    if not match:
        raise ValueError(f"prompt names look like 'summarize_concept.v2', got {name!r}")
    return match


def prompt_dirs() -> list[Path]:
    """Where prompts are looked up: the repository's ``prompts/`` next to the package (a
    source checkout or editable install), then the copy installed inside the package."""
    package = Path(__file__).resolve().parent
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
    answer_prefix: str = ""

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
    """Load ``<name>.yaml`` (e.g. ``"summarize_concept.v2"``) from ``prompts_dir`` or,
    by default, the first of ``prompt_dirs()`` that has it."""
    match = check_prompt_name(name)
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
                      str(data["user"]), str(data.get("answer_prefix") or ""))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed prompt ({exc!r})") from exc
