"""Step 2.1: caption every unit's activating images, batched across units.

The same probe image (or crop) is often an activating image of many units: images are
deduplicated by a hash of their pixels, captioned once in large batches, and cached on disk
under (captioner identity, pixel hash), so re-runs and overlapping runs caption nothing twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image

from dnd.backends.base import Captioner
from dnd.cache import JsonCache
from dnd.io import bytes_hash, stable_hash
from dnd.record import UnitRecord
from dnd.stages.base import RunContext


def image_hash(image: Image.Image) -> str:
    """Hash of an image's RGB pixels and size (not of its file): the dedupe key."""
    im = image.convert("RGB")
    return bytes_hash(f"{im.size}".encode() + im.tobytes())


class CaptionStage:
    """Step 2.1 as a pipeline stage (:mod:`dnd.stages.base`): every unit's activating
    images captioned by :class:`BatchCaptioner` with the run's captioner and cache."""

    name = "captions"

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.captioner = BatchCaptioner(ctx.models.captioner, ctx.caption_cache)

    def __call__(self, records: Sequence[UnitRecord]) -> list[UnitRecord]:
        probe = self.ctx.probe
        caps = self.captioner({r.unit: [e.pixels(probe) for e in r.crops.activating]
                               for r in records})
        return [r.finish(self.name, captions=tuple(caps[r.unit]),
                         captioner=self.captioner.captioner.identity) for r in records]


class BatchCaptioner:
    """Caption the images of many units with one injected captioner."""

    def __init__(self, captioner: Captioner, cache: JsonCache | None):
        """``cache`` None: nothing is reused between calls."""
        self.captioner = captioner
        self.cache = cache

    def __call__(self, images: Mapping[int, Sequence[Image.Image]]) -> dict[int, list[str]]:
        """unit -> its images' captions, in order. Each distinct image is captioned once."""
        # 1. Dedupe by pixels across all units.
        keys = {u: [image_hash(im) for im in ims] for u, ims in images.items()}
        unique: dict[str, Image.Image] = {}
        for u, ims in images.items():
            for k, im in zip(keys[u], ims):
                unique.setdefault(k, im)
        # 2. Reuse cached captions; caption the rest in one batched call.
        ident = self.captioner.identity
        cache_key = {k: stable_hash({"captioner": ident, "image": k}) for k in unique}
        captions = {k: self.cache.get(cache_key[k]) if self.cache else None for k in unique}
        todo = [k for k, c in captions.items() if c is None]
        if todo:
            for k, text in zip(todo, self.captioner.caption([unique[k] for k in todo])):
                if self.cache:
                    self.cache.put(cache_key[k], text)
                captions[k] = text
        # 3. Back to units.
        return {u: [captions[k] for k in ks] for u, ks in keys.items()}
