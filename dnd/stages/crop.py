"""Step 1 of DnD: attention crops of each unit's top images, re-scored by the target.

For each unit: take its top-N probe images and turn the unit's spatial activation map on
each into at most ``max_crops`` boxes (min-max normalise to [0, 255], Otsu threshold,
bounding boxes of the external contours, IoU rules). Which of them become the "activating
images" (captioned, and compared with generated images) depends on ``CropConfig.score``:

- ``in_place`` (default): a crop is scored by the unit's activation inside it on the
  original image (its map's cells under the box, summarised as the run summarises a map),
  so a crop of a small thing the unit fires on keeps the activation it has in the scene.
  The activating images are the top-K originals and, for each, its best crop: the
  captioner then sees both the scene and what the heatmap points at.
- ``rescored`` (the paper): each crop is enlarged to the network's input and re-scored;
  the top-K of originals and crops together are kept. A unit that answers to small things
  only sees a large one in its crop, so its crops rarely make the top-K.

The map is laid over the exact region the network saw (the centre crop), and boxes are
mapped back to original-image pixels, so crops come from the full-resolution photo.
Work is batched across units: one forward pass per unique top image gives the maps of
every unit that needs it, and all crops of all units are re-scored in shared batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dnd.activations import iter_batches
from dnd.probe import ProbeSet
from dnd.record import Box, Evidence, UnitCrops, UnitRecord
from dnd.settings import CropConfig
from dnd.stages.base import RunContext
from dnd.target import Target, capture, split_output

MAP_SIDE = 16  # activation maps kept in unit records are pooled to at most this size


# ---------------------------------------------------------------------------------------
# Boxes from one activation map
# ---------------------------------------------------------------------------------------

def normalize_map(act_map: np.ndarray, size: int) -> np.ndarray | None:
    """Upsample an [h, w] map to [size, size] (bilinear) and min-max scale to uint8 0..255.

    Returns None for a constant map (no region stands out). Min-max scaling replaces the
    reference code's overflow-wrapping cast, which scrambles large activations.
    """
    t = torch.as_tensor(np.asarray(act_map, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    up = up.numpy()
    lo, hi = float(up.min()), float(up.max())
    if not hi > lo:
        return None
    return np.round((up - lo) / (hi - lo) * 255.0).astype(np.uint8)


def otsu_threshold(img: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image: pixels > t are foreground (as cv2.THRESH_OTSU)."""
    hist = np.bincount(img.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)                     # weight of class "<= t"
    mu = np.cumsum(p * np.arange(256))       # its first moment
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * omega - mu) ** 2 / (omega * (1.0 - omega))
    between = np.nan_to_num(between, nan=-1.0, posinf=-1.0)
    return int(np.argmax(between))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes with exclusive ends."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def select_boxes(boxes: Sequence[Box], size: tuple[int, int], *, max_crops: int = 4,
                 iou_between: float = 0.5, iou_image: float = 0.8) -> list[Box]:
    """Apply the keep rules to boxes given largest first; returns at most ``max_crops``."""
    whole = (0, 0, size[0], size[1])
    kept: list[Box] = []
    for b in boxes:
        if len(kept) >= max_crops:
            break
        if box_iou(b, whole) >= iou_image:
            continue
        if all(box_iou(b, k) <= iou_between for k in kept):
            kept.append(b)
    return kept


def attention_boxes(act_map: np.ndarray, size: int, *, max_crops: int = 4,
                    iou_between: float = 0.5, iou_image: float = 0.8) -> list[Box]:
    """Crop boxes (view pixels) from one unit's [h, w] map over a [size, size] view.

    Otsu-binarise the normalised map, fill holes and label 8-connected components: their
    bounding boxes are those of the external contours. Largest region first.
    """
    img = normalize_map(act_map, size)
    if img is None:
        return []
    mask = ndimage.binary_fill_holes(img > otsu_threshold(img))
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    slices = ndimage.find_objects(labels)
    order = sorted(range(n), key=lambda k: (-areas[k], slices[k][0].start, slices[k][1].start))
    boxes = [(slices[k][1].start, slices[k][0].start, slices[k][1].stop, slices[k][0].stop)
             for k in order]
    return select_boxes(boxes, (size, size), max_crops=max_crops, iou_between=iou_between,
                        iou_image=iou_image)


def in_place_activation(act_map: np.ndarray, box: Box, size: int, summary: str) -> float:
    """The unit's activation inside ``box`` (x0, y0, x1, y1 view pixels, ends exclusive) of
    a [size, size] view, read off its [h, w] map: the ``summary`` ("mean" or "max") of the
    map cells the box overlaps."""
    h, w = act_map.shape
    x0, y0, x1, y1 = box
    cols = slice(int(np.floor(x0 * w / size)), max(int(np.ceil(x1 * w / size)), 1))
    rows = slice(int(np.floor(y0 * h / size)), max(int(np.ceil(y1 * h / size)), 1))
    cells = np.asarray(act_map, dtype=np.float64)[rows, cols]
    return float(cells.max() if summary == "max" else cells.mean())


def attention_scale(crops: UnitCrops, max_scale: int) -> int:
    """How many times smaller than the network's input the unit's evidence is: the input
    side over the side of the largest attention box of each top image (its view's side
    over the box's longer side), median over the top images with a box, rounded, in
    1..``max_scale``. 1 when no top image has a box (fc layers, flat maps, no crops).
    Best-concept selection also shows generated images at this scale, since a
    text-to-image model draws a concept large and a unit of small things may not fire on
    it then."""
    ratios = []
    for top in crops.top:
        box = next((c.box for c in crops.crops if c.index == top.index), None)
        if box is None or top.view_box is None:
            continue
        vx0, vy0, vx1, vy1 = top.view_box
        ratios.append(max(vx1 - vx0, vy1 - vy0) / max(box[2] - box[0], box[3] - box[1], 1))
    if not ratios:
        return 1
    return int(min(max(round(float(np.median(ratios))), 1), max_scale))


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------

class CropStage:
    """Step 1 as a pipeline stage (:mod:`dnd.stages.base`): each unit's top images from
    the run's activations, then :class:`Cropper`."""

    name = "crops"

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.cropper = Cropper(ctx.target, ctx.config.crop)

    def __call__(self, records: Sequence[UnitRecord]) -> list[UnitRecord]:
        ctx, cfg = self.ctx, self.ctx.config
        units = [r.unit for r in records]
        top_idx, _ = ctx.activations.top_images(units, cfg.crop.top_n)
        out = self.cropper(ctx.probe, ctx.layer, units, top_idx, summary=cfg.summary,
                           workers=cfg.workers, progress=ctx.progress)
        return [r.finish(self.name, model=ctx.target.name, weights=ctx.target.weights_id,
                         crops=out[r.unit]) for r in records]


class Cropper:
    """Attention crops and re-scoring for many units of one layer at once."""

    def __init__(self, target: Target, config: CropConfig | None = None):
        self.target = target
        self.config = config or CropConfig()

    @torch.no_grad()
    def __call__(self, probe: ProbeSet, layer: str, units: Sequence[int],
                 top_indices: np.ndarray, *, summary: str = "mean", workers: int = 0,
                 progress: bool = True) -> dict[int, UnitCrops]:
        """Step 1 for ``units``; ``top_indices`` [len(units), >= top_n] from the activations.

        Returns unit -> :class:`UnitCrops`.
        """
        cfg = self.config
        tops = {int(u): [int(i) for i in row[:cfg.top_n]] for u, row in zip(units, top_indices)}
        # 1. One forward pass per unique top image: fp32 scores, maps, boxes and the crops'
        #    in-place activations for every unit.
        scores, boxes, heat, in_place = self._maps_and_boxes(probe, layer, tops, summary,
                                                             workers, progress)
        # 2. The paper re-scores all crops of all units, enlarged, in shared batches.
        crop_scores = (in_place if cfg.score == "in_place" else
                       self._score_crops(probe, layer, boxes, summary, progress))
        # 3. Per unit: the activating images (module docstring), highest activation first.
        out = {}
        for u, idx in tops.items():
            top = [Evidence(i, probe.ids[i], None, scores[(u, i)], *heat.get((u, i), (None,
                                                                                   None)))
                   for i in idx]
            crops = [Evidence(i, probe.ids[i], b, crop_scores[(u, i, b)])
                     for i in idx for b in boxes.get((u, i), [])]
            out[u] = UnitCrops(tuple(top), tuple(crops), self._activating(top, crops))
        return out

    def _activating(self, top: list[Evidence], crops: list[Evidence]
                    ) -> tuple[Evidence, ...]:
        """The images later stages see, highest activation first (ties: the original
        before its crops)."""
        def order(e: Evidence) -> tuple:
            return (-e.activation, e.index, e.box or ())

        k = self.config.top_k
        if self.config.score == "rescored":
            return tuple(sorted(top + crops, key=order)[:k])
        kept = sorted(top, key=order)[:k]
        best: dict[int, Evidence] = {}
        for c in crops:  # boxes come largest first, so a tie keeps the larger crop
            if c.index not in best or c.activation > best[c.index].activation:
                best[c.index] = c
        return tuple(sorted(kept + [best[e.index] for e in kept if e.index in best], key=order))

    def _maps_and_boxes(self, probe, layer, tops, summary, workers, progress):
        cfg, target = self.config, self.target
        need: dict[int, list[int]] = defaultdict(list)  # image -> units that need its map
        for u, idx in tops.items():
            for i in idx:
                need[i].append(u)
        images = sorted(need)
        scores: dict[tuple[int, int], float] = {}
        boxes: dict[tuple[int, int], list] = {}
        heat: dict[tuple[int, int], tuple] = {}  # (unit, image) -> (small map, view box)
        in_place: dict[tuple[int, int, Box], float] = {}  # (unit, image, box) -> activation
        module = {layer: target.layer(layer)}
        desc = "attention maps" if progress else None
        with capture(target.module, module) as outs:
            for batch in iter_batches(probe, target, images, cfg.batch_size, workers, desc):
                target.module(batch.pixels.to(target.device))
                s, maps = split_output(outs[layer], summary, target.num_prefix_tokens)
                s = s.float().cpu()
                small = None
                if maps is not None:
                    side = (min(maps.shape[2], MAP_SIDE), min(maps.shape[3], MAP_SIDE))
                    small = F.adaptive_avg_pool2d(maps.float(), side).cpu().numpy()
                crop = target.preprocess.crop
                for b, (i, geom) in enumerate(zip(batch.indices, batch.geoms)):
                    for u in need[i]:
                        scores[(u, i)] = float(s[b, u])
                        if small is not None and geom is not None:
                            heat[(u, i)] = (tuple(tuple(round(float(v), 4) for v in row)
                                                  for row in small[b, u]),
                                            geom.box_to_original((0, 0, crop, crop)))
                        if maps is None or cfg.max_crops == 0 or geom is None:
                            continue
                        unit_map = maps[b, u].float().cpu().numpy()
                        view_boxes = attention_boxes(
                            unit_map, crop, max_crops=cfg.max_crops,
                            iou_between=cfg.iou_between, iou_image=cfg.iou_image)
                        boxes[(u, i)] = [geom.box_to_original(vb) for vb in view_boxes]
                        for vb, ob in zip(view_boxes, boxes[(u, i)]):
                            in_place[(u, i, ob)] = in_place_activation(unit_map, vb, crop,
                                                                       summary)
        return scores, boxes, heat, in_place

    def _score_crops(self, probe, layer, boxes, summary, progress):
        """Summary activation of unit u on each of its crops: (u, image, box) -> float."""
        cfg, target = self.config, self.target
        jobs = [(u, i, b) for (u, i), bs in sorted(boxes.items()) for b in bs]
        by_image: dict[int, list] = defaultdict(list)
        for job in jobs:
            by_image[job[1]].append(job)
        out: dict = {}
        pending: list = []  # (job, tensor)

        def flush():
            x = torch.stack([t for _, t in pending]).to(target.device)
            target.module(x)
            s, _ = split_output(outs[layer], summary, target.num_prefix_tokens)
            s = s.float().cpu()
            for row, (job, _) in enumerate(pending):
                out[job] = float(s[row, job[0]])
            pending.clear()

        module = {layer: target.layer(layer)}
        with capture(target.module, module) as outs:
            it = sorted(by_image)
            if progress and it:
                from tqdm.auto import tqdm
                it = tqdm(it, desc="re-scoring crops", unit="image", leave=False)
            for i in it:
                image = probe.load(i)
                for job in by_image[i]:
                    pending.append((job, target.preprocess(image.crop(job[2]))))
                    if len(pending) == cfg.batch_size:
                        flush()
            if pending:
                flush()
        return out
