"""Step 1 on a hand-weighted network with known answers: top images and crop boxes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import colour_target

from dnd.activations import compute_activations
from dnd.probe import open_probe
from dnd.settings import CropConfig
from dnd.stages.crop import (
    Cropper,
    attention_boxes,
    box_iou,
    normalize_map,
    otsu_threshold,
    select_boxes,
)


def _close(a, b, tol=3):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def _step1(colour_probe, tmp_path, score):
    folder, red, green = colour_probe
    target, probe = colour_target(), open_probe(str(folder))
    acts = compute_activations(target, probe, ["pool"], tmp_path / "acts", progress=False)["pool"]
    idx, _ = acts.top_images([0, 1], 6)
    out = Cropper(target, CropConfig(top_n=6, top_k=10, score=score))(
        probe, "pool", [0, 1], idx, progress=False)
    return out, red, green, probe


@pytest.fixture
def step1(colour_probe, tmp_path):
    """The paper's Step 1: crops enlarged and re-scored."""
    return _step1(colour_probe, tmp_path, "rescored")


@pytest.fixture
def in_place(colour_probe, tmp_path):
    """The default Step 1: crops scored inside the original map."""
    return _step1(colour_probe, tmp_path, "in_place")


def test_top_images_are_exactly_the_pattern_images(step1):
    out, red, _, probe = step1
    assert {e.index for e in out[0].top} == set(red)
    assert all(e.activation > 0 for e in out[0].top)


def test_crop_box_matches_the_pattern_in_original_pixels(step1):
    out, red, _, _ = step1
    for i, box in red.items():
        crops = [c.box for c in out[0].crops if c.index == i]
        assert len(crops) == 1, (i, crops)
        assert _close(crops[0], box), (i, crops[0], box)


def test_top_images_keep_a_small_map_and_the_region_it_covers(step1):
    out, red, _, _ = step1
    top = next(e for e in out[0].top if e.index == 2)
    assert top.view_box == (16, 0, 80, 64)  # the 64x64 centre crop of a 96x64 image
    m = np.array(top.act_map)
    assert m.shape == (16, 16)
    # Red square at original x 40..56, y 20..36 -> view 24..40 -> pooled cells 6..9, 5..8.
    ys, xs = np.nonzero(m == m.max())
    assert set(xs) <= set(range(6, 10)) and set(ys) <= set(range(5, 9))
    assert "map" in top.to_json() and "map" not in out[0].crops[0].to_json()


def test_two_separated_blobs_give_two_crops(step1):
    out, _, (green_idx, green_boxes), _ = step1
    crops = sorted(c.box for c in out[1].crops if c.index == green_idx)
    assert len(crops) == 2
    for got, want in zip(crops, sorted(green_boxes)):
        assert _close(got, want), (got, want)


def test_tight_crops_outscore_originals_and_lead_the_activating_images(step1):
    out, _, _, _ = step1
    act = out[0].activating
    assert len(act) == 10
    assert act[0].box is not None  # the crop fills the view with red: higher mean activation
    assert [e.activation for e in act] == sorted((e.activation for e in act), reverse=True)
    crops_by_image = {c.index: c.activation for c in out[0].crops}
    top_by_image = {t.index: t.activation for t in out[0].top}
    assert all(crops_by_image[i] > top_by_image[i] for i in crops_by_image)


def test_in_place_crops_keep_the_maps_activation_and_join_their_originals(in_place, step1):
    out, red, _, _ = in_place
    # The same boxes either way; only their scores and the activating images differ.
    assert [c.box for c in out[0].crops] == [c.box for c in step1[0][0].crops]
    top = {t.index: t for t in out[0].top}
    for c in out[0].crops:  # mean of the map cells under the box: above the image's mean
        assert top[c.index].activation < c.activation
    act = out[0].activating
    # Every top image, then each one's best crop: 6 originals + one crop per red image.
    assert sorted(e.index for e in act if e.box is None) == sorted(top)
    assert sorted(e.index for e in act if e.box is not None) == sorted(red)
    assert [e.activation for e in act] == sorted((e.activation for e in act), reverse=True)


def test_in_place_activation_reads_the_cells_under_the_box():
    from dnd.stages.crop import in_place_activation

    m = np.zeros((4, 4))
    m[1, 2] = 8.0
    m[3, 0] = 2.0
    # A 16-px view: cell (row 1, col 2) covers x 8..12, y 4..8.
    assert in_place_activation(m, (8, 4, 12, 8), 16, "max") == 8.0
    assert in_place_activation(m, (6, 4, 12, 8), 16, "mean") == 4.0  # cells 1 and 2 of row 1
    assert in_place_activation(m, (0, 0, 16, 16), 16, "mean") == pytest.approx(10 / 16)


def test_fc_layer_has_no_crops(colour_probe, tmp_path):
    folder, _, _ = colour_probe
    target, probe = colour_target(), open_probe(str(folder))
    acts = compute_activations(target, probe, ["fc"], tmp_path / "a", progress=False)["fc"]
    idx, _ = acts.top_images([0], 5)
    out = Cropper(target, CropConfig(top_n=5, top_k=3))(probe, "fc", [0], idx, progress=False)
    assert out[0].crops == () and len(out[0].activating) == 3


def test_otsu_matches_brute_force():
    rng = np.random.default_rng(1)
    img = np.concatenate([rng.normal(60, 10, 500), rng.normal(190, 15, 300)])
    img = np.clip(img, 0, 255).astype(np.uint8)
    best, best_t = -1, None
    for t in range(255):
        lo, hi = img[img <= t].astype(float), img[img > t].astype(float)
        if len(lo) == 0 or len(hi) == 0:
            continue
        var = len(lo) * len(hi) * (lo.mean() - hi.mean()) ** 2
        if var > best:
            best, best_t = var, t
    assert otsu_threshold(img) == best_t


def test_normalize_map_is_min_max_not_wrapped():
    m = np.array([[1000.0, 2000.0], [3000.0, 4000.0]])
    img = normalize_map(m, 2)
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    assert normalize_map(np.full((3, 3), 7.0), 8) is None


def test_iou_rules():
    size = (100, 100)
    big = (0, 0, 95, 95)          # IoU with the image 0.9025 >= 0.8: dropped
    a = (10, 10, 50, 50)
    overlap = (12, 12, 52, 52)    # IoU with a ~0.82 > 0.5: dropped
    side = (30, 10, 70, 50)       # IoU with a = 0.333 <= 0.5: kept
    far = [(60, 60, 70, 70), (80, 80, 90, 90), (0, 80, 10, 90)]
    assert box_iou(a, overlap) > 0.5 and box_iou(a, side) == pytest.approx(1 / 3)
    kept = select_boxes([big, a, overlap, side, *far], size)
    assert kept == [a, side, far[0], far[1]]  # at most 4 crops
    assert select_boxes([a, side], size, max_crops=1) == [a]
    assert select_boxes([big], size, iou_image=0.95) == [big]


def test_attention_boxes_largest_first_and_holes_filled():
    m = np.zeros((32, 32))
    m[2:10, 2:10] = 1.0            # small blob
    m[14:30, 14:30] = 1.0          # big blob with a hole: one external contour
    m[20:24, 20:24] = 0.0
    boxes = attention_boxes(m, 32)
    assert boxes[0] == (14, 14, 30, 30) and boxes[1] == (2, 2, 10, 10)
