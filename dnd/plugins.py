"""Plug-ins: packages that add targets, backends or probing-set schemes to dnd's registries.

A plug-in is a Python entry point in the group ``dnd.plugins`` of any installed package::

    [project.entry-points."dnd.plugins"]
    mine = "my_package.dnd_plugin"             # a module: importing it registers its parts
    mine = "my_package.dnd_plugin:register"    # or a function, called once, that registers them

A module that defines a ``register()`` function has it called after the import. Parts are
registered with the registries' decorators (``TARGETS.register("my-cnn")``,
``CAPTIONERS.register(...)``, ``PROBE_SCHEMES.register(...)``, ...); registering a name
that is taken raises, so a plug-in can never replace another's part.

Plug-ins load once, on the first lookup in any registry (:class:`dnd.registry.Registry`), so
user code never calls anything. A plug-in that fails to load is skipped with a
:class:`PluginWarning` naming it and its error; the other plug-ins and every command that
does not need it keep working, and asking a registry for a name it lacks repeats the error
(see :func:`failure_note`). The toy world ships as such a plug-in (``dnd.toyworld.plugin``).
"""

from __future__ import annotations

import importlib.metadata
import threading
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

GROUP = "dnd.plugins"


class PluginWarning(UserWarning):
    """A plug-in could not be loaded (its parts are missing from the registries)."""


@dataclass
class _State:
    loading: bool = False
    loaded: bool = False
    failures: dict[str, str] = field(default_factory=dict)  # entry-point name -> error


_STATE = _State()
# Re-entrant: a plug-in's import may look something up in a registry, which lands here again
# on the same thread and must return (with the registries as filled so far) instead of
# deadlocking. Another thread waits until loading is done and then sees every plug-in.
_LOCK = threading.RLock()


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    """The installed ``dnd.plugins`` entry points (tests replace this function)."""
    return importlib.metadata.entry_points(group=GROUP)


def load_plugins() -> None:
    """Load every installed plug-in, once; later calls (and calls made while plug-ins are
    loading) return at once. Failures warn and are remembered for :func:`failure_note`."""
    if _STATE.loaded:
        return
    with _LOCK:
        if _STATE.loaded or _STATE.loading:
            return
        _STATE.loading = True
        try:
            seen = set()
            for ep in _entry_points():
                if ep.value in seen:  # one package seen twice on sys.path
                    continue
                seen.add(ep.value)
                _load_one(ep)
        finally:
            _STATE.loading = False
            _STATE.loaded = True


def _load_one(ep: importlib.metadata.EntryPoint) -> None:
    try:
        register, what = ep.load(), ep.value
        if isinstance(register, types.ModuleType):
            if not hasattr(register, "register"):
                return  # the module registered its parts when imported
            register, what = register.register, f"{ep.value}.register"
        if not callable(register):
            raise TypeError(f"{what} is of type {type(register).__name__!r}, not a function")
        register()
    except Exception as e:  # any error in third-party code: report it, keep dnd usable
        reason = f"{type(e).__name__}: {e}"
        _STATE.failures[ep.name] = reason
        # stacklevel 1: the lookup that set off loading is rarely the culprit; the
        # message names the plug-in instead.
        warnings.warn(f"dnd plug-in {ep.name!r} ({ep.value}) failed to load and is skipped: "
                      f"{reason}", PluginWarning, stacklevel=1)


def failures() -> dict[str, str]:
    """Plug-ins that failed to load: entry-point name -> error (after loading)."""
    return dict(_STATE.failures)


def failure_note() -> str:
    """Sentence to append to an unknown-name error: the plug-ins that failed to load, which
    may be the ones providing the name; empty when every plug-in loaded."""
    if not _STATE.failures:
        return ""
    failed = "; ".join(f"{name!r} ({reason})" for name, reason in _STATE.failures.items())
    return f" Plug-ins that failed to load, and may provide it: {failed}."
