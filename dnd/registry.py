"""Name -> factory registries for swappable parts (targets, captioners, LLMs, ...).

One factory per kind; registering a name twice raises, so a plug-in can never silently
replace another. CLI choices come from ``Registry.names()``. Every lookup (``get``,
``names``, ``in``, ``create``) first loads the installed plug-ins, once (:mod:`dnd.plugins`),
so their parts are there without the caller importing anything.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from dnd import plugins


class Registry:
    """A named collection of factories of one kind (e.g. ``"target"``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@REG.register("name")`` adds a factory under ``name``."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        plugins.load_plugins()
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        plugins.load_plugins()
        return name in self._factories

    def get(self, name: str) -> Callable[..., Any]:
        """The factory for ``name``; an unknown name raises with close matches listed (and
        the plug-ins that failed to load, one of which may provide it)."""
        plugins.load_plugins()
        try:
            return self._factories[name]
        except KeyError:
            raise KeyError(unknown_name_message(self.kind, name, self.names())
                           + plugins.failure_note()) from None

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)


def unknown_name_message(kind: str, name: str, choices: list[str]) -> str:
    """'unknown layer 'layr4'; did you mean: layer4, layer3? (...)' style message."""
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    msg = f"unknown {kind} {name!r}" + (f"; did you mean: {', '.join(close)}?" if close
                                        else ".")
    shown = choices if len(choices) <= 30 else choices[:30] + [f"... ({len(choices)} in all)"]
    return msg + f" Valid {kind}s: {', '.join(shown)}"
