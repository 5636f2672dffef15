"""Swappable model backends. :func:`registered` imports every shipped backend module so that
the registries are complete (imports are deferred: they pull in transformers and diffusers);
plug-ins' backends (the toy world's among them) come with the registries' first lookup."""

from __future__ import annotations


def registered():
    """(CAPTIONERS, LLMS, GENERATORS, ENCODERS) with every shipped backend registered, and
    the plug-ins' (with their ``declares_needs``, which preflight reads without a lookup)."""
    import dnd.backends.caption  # noqa: F401
    import dnd.backends.encode  # noqa: F401
    import dnd.backends.generate  # noqa: F401
    import dnd.backends.local_chat  # noqa: F401
    import dnd.backends.openai_chat  # noqa: F401
    from dnd.backends.base import CAPTIONERS, ENCODERS, GENERATORS
    from dnd.backends.llm import LLMS
    from dnd.plugins import load_plugins

    load_plugins()

    return CAPTIONERS, LLMS, GENERATORS, ENCODERS
