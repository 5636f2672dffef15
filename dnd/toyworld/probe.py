"""The probing-set scheme ``toyworld:N``: N rendered toy-world scenes.

Scenes come from seeds ``TOY_PROBE_START .. TOY_PROBE_START + N - 1``, disjoint from the
seeds the toy models were trained and evaluated on. Registered in
:data:`dnd.probe.PROBE_SCHEMES` when imported (the toy world's plug-in imports it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from PIL import Image

from dnd.io import stable_hash
from dnd.probe import ProbeError, ProbeSet, probe_scheme

TOY_PROBE_START = 2_000_000  # toy training uses seeds < 1e6, held-out evaluation 1e6..2e6


@dataclass
class ToyWorldProbe(ProbeSet):
    """N toy-world scenes rendered from seeds ``offset .. offset+N-1``."""

    offset: int = TOY_PROBE_START

    def load(self, i: int) -> Image.Image:
        return _toy_image(self.offset + i).copy()  # a copy: callers may draw on it

    def fingerprint(self) -> str:
        return stable_hash({"kind": "toyworld", "n": len(self), "offset": self.offset})


@functools.lru_cache(maxsize=8192)  # ~100 MB of 64-px renders at most
def _toy_image(seed: int) -> Image.Image:
    """The render of toy scene ``seed``. Cached: the pipeline loads each top image several
    times (crops, captions, scoring) and rendering costs ~1 ms, a quarter of a toy run."""
    from dnd.toyworld.render import render_scene

    return render_scene(seed).image


def clear_render_cache() -> None:
    """Forget cached toy-world renders (benchmarks time cold runs)."""
    _toy_image.cache_clear()


@probe_scheme("toyworld", usage="toyworld:N")
def open_toyworld(arg: str) -> ToyWorldProbe:
    """``toyworld:N`` -> the first N probing scenes."""
    try:
        n = int(arg)
    except ValueError:
        raise ProbeError(f"toyworld probing set needs a count, e.g. toyworld:2000; "
                         f"got {'toyworld:' + arg!r}") from None
    return ToyWorldProbe(name=f"toyworld:{n}", ids=[f"toy/{i}" for i in range(n)])


def probe_scenes(n_probe: int) -> list:
    """The scenes of the ``toyworld:N`` probing set, with their annotations (the ground
    truth its units are judged against)."""
    from dnd.toyworld.render import render_batch

    return render_batch(range(TOY_PROBE_START, TOY_PROBE_START + n_probe))
