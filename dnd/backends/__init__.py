"""Swappable model backends. :func:`registered` imports every backend module so that the
registries are complete (imports are deferred: they pull in transformers and diffusers)."""

from __future__ import annotations


def registered():
    """(CAPTIONERS, LLMS, GENERATORS, ENCODERS) with every shipped backend registered."""
    import dnd.backends.caption  # noqa: F401
    import dnd.backends.encode  # noqa: F401
    import dnd.backends.generate  # noqa: F401
    import dnd.toyworld.backends  # noqa: F401
    from dnd.backends.base import CAPTIONERS, ENCODERS, GENERATORS
    from dnd.backends.llm import LLMS

    return CAPTIONERS, LLMS, GENERATORS, ENCODERS
