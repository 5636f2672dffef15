"""The toy world's models behind the pipeline's backend protocols.

- generator ``toyworld``: the grounded scene renderer (text it cannot ground -> CannotRender)
- encoder ``toyworld``: the tiny CLIP trained on the world's captions
- captioner ``toyworld``: the tiny BLIP trained on the world's captions and crop captions

All run offline from the weights committed under ``dnd/toyworld/weights``: the captioner and
the encoder on the run's device, the renderer on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from dnd.backends.base import CAPTIONERS, ENCODERS, GENERATORS, CannotRender, GenRequest
from dnd.backends.caption import TransformersCaptioner
from dnd.backends.factory import declare
from dnd.toyworld.blip import toy_captioner


class ToyWorldGenerator:
    """Text-to-image by rendering: one scene per (prompt, seed) that contains the concept."""

    def __init__(self, size: int = 64):
        from dnd.toyworld.generator import ToyRenderer

        self.renderer = ToyRenderer(size=size)
        self.identity = {"backend": "toyworld", "size": size}

    def generate(self, requests: Sequence[GenRequest]) -> list[Image.Image | Exception]:
        out: list[Image.Image | Exception] = []
        for r in requests:
            try:
                out.append(self.renderer.generate(r.prompt, 1, r.seed)[0])
            except CannotRender as e:  # returned in place: the other requests go on
                out.append(e)
        return out


@GENERATORS.register("toyworld")
@declare(options=ToyWorldGenerator)
def _toy_generator(size: int = 64, *, device: Any = None) -> ToyWorldGenerator:
    """``device`` is accepted and ignored: scenes are drawn on the CPU."""
    return ToyWorldGenerator(size=size)


@ENCODERS.register("toyworld")
def _toy_encoder(device: Any = None, batch_size: int = 256):
    from dnd.backends.encode import OpenClipEncoder
    from dnd.toyworld.clip import load_toy_clip

    # Named "toyworld-clip", not by its folder: cache keys must not depend on the machine.
    return OpenClipEncoder("toyworld-clip", None, device=device, batch_size=batch_size,
                           components=load_toy_clip())


@CAPTIONERS.register("toyworld")
@declare(options=(toy_captioner, TransformersCaptioner), exclude=("model_id", "kind"))
def _toy_captioner(*, device: Any = None, **kw: Any):
    """``toy_captioner``'s options and the ``TransformersCaptioner`` settings it passes on."""
    return toy_captioner(device=device, **kw)
