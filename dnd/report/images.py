"""The report's image files: written once per build, each page naming them by path.

:class:`ReportImages` turns a record's evidence (probe images re-read from the run's
probing set, their crops and heatmaps), generated images (copied from the run's cache) and
``dnd featurevis``'s images into files under ``report/img/``; :mod:`dnd.report.inline`
gives the same images as data URIs for notebooks.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dnd.config import RunConfig
from dnd.io import atomic_write_bytes
from dnd.probe import ProbeError, ProbeSet, open_probe
from dnd.record import Evidence
from dnd.store import RunStore, safe_name

log = logging.getLogger("dnd")

GRID_PX = 160   # thumbnails in grids and cards
LARGE_PX = 320  # top images with their crop boxes, rating-study images
CARD_THUMBS = 4


class ReportImages:
    """Writes the report's image files once per build; paths are relative to report/.

    Every image goes out through :meth:`_put` or :meth:`_put_file`, which return what a
    page's ``src`` names (here the file's path relative to report/); ``done`` maps each
    image's report path to it, so an image shown twice is made once. A subclass that
    returns data URIs instead renders the same pages inline (:mod:`dnd.report.inline`).
    """

    def __init__(self, store: RunStore, probe: ProbeSet | None):
        self.store, self.out, self.probe = store, store.report_dir, probe
        self.sizes: dict[int, tuple[int, int]] = {}  # probe index -> original (w, h)
        self.done: dict[str, str] = {}  # report path -> the src that shows it
        self.bad: set[int] = set()

    def _put(self, rel: str, data: bytes) -> str:
        """Keep an image's bytes as ``rel`` (a path under report/); return its src."""
        # Report files are rebuilt from the records on every run: no flush to disk.
        atomic_write_bytes(self.out / rel, data, durable=False)
        self.done[rel] = rel
        return rel

    def _put_file(self, rel: str, src: Path) -> str:
        """Keep a copy of the image file ``src`` as ``rel``; return its src."""
        (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.out / rel)
        self.done[rel] = rel
        return rel

    def _save(self, rel: str, image: Image.Image, px: int) -> str:
        thumb = image.convert("RGB")
        thumb.thumbnail((px, px))
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=85)
        return self._put(rel, buf.getvalue())

    def _load(self, index: int) -> Image.Image | None:
        """Probe image ``index``; None (once warned) when it is gone or unreadable, so one
        bad file costs a placeholder, not the report."""
        if self.probe is None or index in self.bad:
            return None
        try:
            image = self.probe.load(index)
        except (OSError, IndexError) as e:
            log.warning("report: probe image %d unreadable (%s)", index, e)
            self.bad.add(index)
            return None
        self.sizes[index] = image.size
        return image

    def probe_image(self, index: int, large: bool = False) -> str | None:
        """Thumbnail of probe image ``index`` (None if it cannot be read)."""
        index = int(index)
        rel = f"img/probe/{index}{'_l' if large else ''}.jpg"
        if rel in self.done:
            return self.done[rel]
        image = self._load(index)
        return None if image is None else self._save(rel, image, LARGE_PX if large else GRID_PX)

    def size(self, index: int) -> tuple[int, int] | None:
        """Original size of a probe image, the pixel space of crop boxes."""
        if int(index) not in self.sizes:
            self._load(int(index))
        return self.sizes.get(int(index))

    def evidence(self, ev: Evidence, large: bool = False) -> str | None:
        """Thumbnail of an evidence image: the probe image or its crop."""
        if not ev.box:
            return self.probe_image(ev.index, large)
        rel = f"img/crop/{ev.index}_{'-'.join(map(str, ev.box))}{'_l' if large else ''}.jpg"
        if rel in self.done:
            return self.done[rel]
        if self._load(ev.index) is None:
            return None
        # Evidence.pixels is the pipeline's own definition of a record's pixels.
        return self._save(rel, ev.pixels(self.probe), LARGE_PX if large else GRID_PX)

    def heatmap(self, layer: str, unit: int, index: int, act_map: Sequence[Sequence[float]]
                ) -> str:
        """A translucent warm-colour PNG of a unit's activation map on one image."""
        # By layer too: unit 0 of two conv layers on one image has two maps.
        rel = f"img/heat/{safe_name(layer)}/{int(unit)}_{int(index)}.png"
        if rel in self.done:
            return self.done[rel]
        m = np.asarray(act_map, dtype=np.float32)
        span = float(m.max() - m.min())
        v = (m - m.min()) / span if span > 0 else np.zeros_like(m)
        # Transparent where the unit is quiet, opaque red-to-yellow where it fires.
        rgba = np.stack([np.full_like(v, 255), 255 * v, np.zeros_like(v), 190 * v], -1)
        buf = io.BytesIO()
        Image.fromarray(rgba.astype(np.uint8), "RGBA").save(buf, format="PNG")
        return self._put(rel, buf.getvalue())

    def featurevis(self, layer: str, unit: int) -> list[tuple[str, list[tuple[str, float]],
                                                             list[float]]]:
        """The unit's feature visualizations (``dnd featurevis``), plain first: per kind,
        (kind, [(image path, activation)], activations of the starting noise); the PNGs
        are copied into the report."""
        root = self.store.featurevis_dir(layer).parent
        # texts/: a CLIP unit's top texts (dnd.textvis), a section of its own.
        kinds = sorted((p.name for p in root.iterdir() if p.is_dir() and p.name != "texts"),
                       key=lambda k: (k != "plain", k)) if root.is_dir() else []
        out = []
        for kind in kinds:
            meta, paths = self.store.featurevis_files(layer, unit, kind)
            if not paths or not all(p.is_file() for p in paths):
                continue
            data = json.loads(meta.read_text())
            shown = []
            for path, act in zip(paths, data["activations"], strict=True):
                rel = f"img/fv/{safe_name(layer)}/{kind}/{path.name}"
                shown.append((self.done.get(rel) or self._put_file(rel, path), float(act)))
            out.append((kind, shown, [float(a) for a in data["start_activations"]]))
        return out

    def generated(self, key: str) -> str | None:
        """Copy of a generated image's cached thumbnail (None if the cache lacks it)."""
        try:
            src = self.store.features.thumbnail(key)
        except ValueError as e:  # not a cache key: the record is damaged, not the report
            log.warning("report: generated image %r has no thumbnail (%s)", key, e)
            return None
        rel = f"img/gen/{src.name}"
        if rel in self.done:
            return self.done[rel]
        return self._put_file(rel, src) if src.is_file() else None


def run_config(store: RunStore) -> RunConfig | None:
    """The run's saved config, or None (with a warning) when it is missing or unreadable."""
    try:
        return store.load_config()
    except (OSError, ValueError, TypeError, yaml.YAMLError) as e:
        log.warning("report without probe images: cannot read the run's config (%s)", e)
        return None


def open_run_probe(config: RunConfig | None) -> ProbeSet | None:
    """The run's probing set, or None (with a warning) when it cannot be opened any more."""
    if config is None:
        return None  # run_config said why
    try:
        return open_probe(config.probe)
    except (OSError, ProbeError, ValueError) as e:
        log.warning("report without probe images: cannot open the run's probing set (%s)", e)
        return None
