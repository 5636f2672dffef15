"""The stage contract: every per-unit stage is an object built from the run's
:class:`RunContext` and called on a batch of unit records.

``stage(records) -> records``: one record in, one record out, same order. A stage fills
its own part of each record (:meth:`dnd.record.UnitRecord.finish`) or marks the unit as
failed with a short reason (:meth:`dnd.record.UnitRecord.fail`); it never writes files of
the run directory itself (the caches it is given do that) and knows nothing of how its
caller batches units: the pipeline calls it once per chunk of units, the speed benchmark's
per-unit baseline once per unit with no caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from dnd.record import UnitRecord

if TYPE_CHECKING:
    from dnd.activations import LayerActivations
    from dnd.cache import FeatureCache, JsonCache
    from dnd.config import RunConfig
    from dnd.probe import ProbeSet
    from dnd.target import Target


@dataclass(frozen=True)
class RunContext:
    """What the stages of one run share.

    ``models``: the loaded backends (captioner, generator, encoder; ``llm`` is the chat
    backend as the summariser should use it, e.g. behind a reply cache).
    ``caption_cache``: captions by (captioner, image pixels), or None for none.
    ``features``: Step 3's generated images' features and thumbnails.
    """

    config: RunConfig
    target: Target
    probe: ProbeSet
    activations: LayerActivations
    models: Any
    caption_cache: JsonCache | None
    features: FeatureCache
    progress: bool = True

    @property
    def layer(self) -> str:
        return self.config.layer


class Stage(Protocol):
    """One step of the pipeline for a batch of units (see the module docstring)."""

    name: ClassVar[str]  # the record stage it finishes: "crops", "captions", ...

    def __call__(self, records: Sequence[UnitRecord]) -> list[UnitRecord]: ...
