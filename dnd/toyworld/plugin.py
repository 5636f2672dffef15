"""The toy world as a dnd plug-in: importing this module registers its parts.

- targets ``toyworld-cnn``, ``toyworld-planted`` (:mod:`dnd.toyworld.target`) and
  ``toyworld-clip``, with the whole toy CLIP for text feature visualization
  (:mod:`dnd.toyworld.clip`)
- captioner, generator and encoder ``toyworld`` (:mod:`dnd.toyworld.backends`)
- probing sets ``toyworld:N`` (:mod:`dnd.toyworld.probe`)

Nothing in dnd's core imports the toy world: pyproject.toml declares this module as the
entry point ``toyworld`` of group ``dnd.plugins``, and the registries load it on their first
lookup (:mod:`dnd.plugins`), exactly as they load a third-party plug-in.
"""

from __future__ import annotations

import dnd.toyworld.backends  # noqa: F401
import dnd.toyworld.clip  # noqa: F401
import dnd.toyworld.probe  # noqa: F401
import dnd.toyworld.target  # noqa: F401
