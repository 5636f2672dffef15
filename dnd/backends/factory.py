"""Building backends from their registries: one path for every kind of backend.

The factory contract (captioners, LLMs, generators, encoders, plug-ins' backends too):

1. A factory is called with its options (a run config's ``<section>.options``) and the
   keyword ``device``, a ``torch.device``: the run's, or the backend's own ``device``
   option. A backend that runs a model on this machine puts it there; an API client
   accepts it and ignores it.
2. Its options are its own keyword parameters or, when it declares them with
   :func:`declare`, the parameters of a settings dataclass or callable (the one it forwards
   ``**settings`` to). ``device`` is an option only where these have it, i.e. for backends
   that place a model. :func:`build` refuses any other option before the factory runs,
   naming the backend, the option, close matches and the valid options.
3. A backend that needs another declares it (:class:`Dependency`). The chat captioner
   needs a chat LLM: its options ``llm`` (a name in the LLM registry, default ``openai``)
   and ``llm_options`` choose it, and :func:`build` builds it first, on the same device,
   and passes it to the factory as ``llm``.

Errors raised inside a factory (a ``TypeError`` included) propagate unchanged.
This module imports nothing heavy: backend modules import :func:`declare` from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dnd.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from dnd.config import BackendConfig
    from dnd.registry import Registry

F = TypeVar("F", bound=Callable[..., Any])

# Where :func:`declare` keeps its declaration on a factory.
_SPEC_ATTR = "__dnd_backend__"


@dataclass(frozen=True)
class Dependency:
    """Another backend a backend needs: built first, passed to the factory as ``param``.

    The needing backend's options choose it: ``<param>`` is its name in ``registry``
    (``default`` when absent) and ``<param>_options`` its options.
    """

    param: str
    registry: Registry
    default: str

    @property
    def options_key(self) -> str:
        return f"{self.param}_options"


@dataclass(frozen=True)
class BackendSpec:
    """What :func:`declare` attaches to a factory (the default: nothing declared)."""

    options: tuple[Any, ...] = ()
    exclude: frozenset[str] = frozenset()
    depends_on: tuple[Dependency, ...] = ()


@dataclass
class Models:
    """The models of Steps 2-3, loaded once per run and shared by the stages."""

    captioner: Any = None
    llm: Any = None
    generator: Any = None
    encoder: Any = None


def declare(*, options: Any = (), exclude: Iterable[str] = (),
            depends_on: Iterable[Dependency] = ()) -> Callable[[F], F]:
    """Decorator for a factory: its options are the parameters of ``options`` (a dataclass,
    a callable, or a tuple of them), less ``exclude`` (those the factory sets itself);
    without ``options``, the factory's own parameters. ``depends_on``: the backends it
    needs (see :class:`Dependency`)."""
    sources = tuple(options) if isinstance(options, tuple | list) else (options,)
    spec = BackendSpec(sources, frozenset(exclude), tuple(depends_on))

    def deco(fn: F) -> F:
        setattr(fn, _SPEC_ATTR, spec)
        return fn

    return deco


def spec_of(factory: Callable[..., Any]) -> BackendSpec:
    """The declaration of ``factory`` (an empty one when it declares nothing)."""
    return getattr(factory, _SPEC_ATTR, None) or BackendSpec()


def option_names(registry: Registry, name: str) -> list[str]:
    """The options backend ``name`` of ``registry`` accepts, sorted."""
    factory = registry.get(name)
    spec = spec_of(factory)
    names: set[str] = set()
    for source in spec.options or (factory,):
        # A declared source may forward **kwargs to another declared one (the toy
        # captioner to TransformersCaptioner); an undeclared factory may not.
        names |= _parameters(source, strict=not spec.options,
                             where=f"{registry.kind} {name!r}")
    for dep in spec.depends_on:
        names |= {dep.param, dep.options_key}
    return sorted(names - spec.exclude)


def _parameters(source: Any, *, strict: bool, where: str) -> set[str]:
    """Keyword parameter names of a callable, or the init fields of a dataclass."""
    if isinstance(source, type) and dataclasses.is_dataclass(source):
        return {f.name for f in dataclasses.fields(source) if f.init}
    params = inspect.signature(source).parameters.values()
    if strict and any(p.kind is p.VAR_KEYWORD for p in params):
        raise TypeError(f"{where}: its factory takes **kwargs, so its options are unknown; "
                        "declare them with dnd.backends.factory.declare(options=...)")
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def resolve(registry: Registry, backend: BackendConfig) -> list[tuple[Registry, BackendConfig]]:
    """Every backend that building ``backend`` builds, dependencies first and ``backend``
    last, each with only its own options; all options checked (see :func:`check_options`)."""
    return _resolve(registry, backend, "")


def check_options(registry: Registry, backend: BackendConfig) -> None:
    """Raise ConfigError for an option backend ``backend.name`` does not take, also in the
    backends it needs; KeyError (with close matches) for an unknown backend name."""
    _resolve(registry, backend, "")


def _resolve(registry: Registry, backend: BackendConfig, where: str
             ) -> list[tuple[Registry, BackendConfig]]:
    """Every backend that building ``backend`` builds, dependencies first and ``backend``
    last, each with only its own options; all options checked."""
    from dnd.config import BackendConfig

    factory = registry.get(backend.name)
    label = f"{where}{registry.kind} {backend.name!r}"
    valid = option_names(registry, backend.name)
    unknown = sorted(set(backend.options) - set(valid))
    if unknown:
        raise ConfigError(_unknown_options_message(label, unknown, valid))
    own = dict(backend.options)
    used: list[tuple[Registry, BackendConfig]] = []
    for dep in spec_of(factory).depends_on:
        name = own.pop(dep.param, dep.default)
        options = own.pop(dep.options_key, {})
        if not isinstance(name, str):
            raise ConfigError(f"{label}: option {dep.param!r} names a {dep.registry.kind} "
                              f"backend ({', '.join(dep.registry.names())}), got {name!r}")
        if not isinstance(options, Mapping):
            raise ConfigError(f"{label}: option {dep.options_key!r} holds the options of its "
                              f"{dep.registry.kind} as a mapping, got {options!r}")
        used += _resolve(dep.registry, BackendConfig(name, dict(options)),
                         f"{label}, {dep.options_key}: ")
    return used + [(registry, BackendConfig(backend.name, own))]


def _unknown_options_message(label: str, unknown: Sequence[str], valid: Sequence[str]) -> str:
    """"captioner 'blip' has no option 'promt' (did you mean prompt?); its options: ..."."""
    parts = []
    for opt in unknown:
        close = difflib.get_close_matches(opt, valid, n=3, cutoff=0.6)
        parts.append(f"{opt!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return (f"{label} has no option{'s' if len(unknown) > 1 else ''} {', '.join(parts)}; "
            f"its options: {', '.join(valid) or 'none'}")


def build(registry: Registry, backend: BackendConfig, device: str | torch.device) -> Any:
    """Backend ``backend.name`` of ``registry`` with ``backend.options``, on ``device``
    unless its own ``device`` option names another. Options are checked before anything is
    built; the backends it needs are built first, on the same device."""
    from dnd.backends.base import resolve_device
    from dnd.config import BackendConfig

    check_options(registry, backend)
    factory = registry.get(backend.name)
    options = dict(backend.options)
    own_device = options.pop("device", None)
    device = resolve_device(device if own_device is None else own_device)
    for dep in spec_of(factory).depends_on:
        name = options.pop(dep.param, dep.default)
        dep_options = dict(options.pop(dep.options_key, {}))
        options[dep.param] = build(dep.registry, BackendConfig(name, dep_options), device)
    return factory(device=device, **options)


def describe_choices(registry: Registry) -> str:
    """The names of ``registry`` for help texts, each with the backends it needs:
    ``blip, blip2, chat (with options llm, llm_options for its llm), toyworld``."""
    out = []
    for name in registry.names():
        deps = spec_of(registry.get(name)).depends_on
        out.append(name + "".join(f" (with options {d.param}, {d.options_key} for its "
                                  f"{d.registry.kind})" for d in deps))
    return ", ".join(out)
