"""Unit ground truth: metric sanity checks (Neuron_Eval) and known-answer units."""

import numpy as np
import pytest

from dnd.toyworld.groundtruth import (
    average_precision,
    dissection_iou,
    image_labels,
    unit_ground_truth,
)
from dnd.toyworld.render import render_batch


@pytest.fixture(scope="module")
def scenes():
    return render_batch(range(3_000_000, 3_000_300))


def _noisy_detector(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return labels + rng.normal(0.0, 0.4, labels.shape)


def _drop_half_positives(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    positives = np.flatnonzero(labels)
    dropped = labels.copy().reshape(-1)
    dropped[rng.choice(positives, len(positives) // 2, replace=False)] = False
    return dropped.reshape(labels.shape)


def _add_false_positives(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    negatives = np.flatnonzero(~labels)
    noisy = labels.copy().reshape(-1)
    noisy[rng.choice(negatives, int(labels.sum()), replace=False)] = True
    return noisy.reshape(labels.shape)


@pytest.mark.parametrize("corrupt", [_drop_half_positives, _add_false_positives])
def test_average_precision_drops_when_labels_are_corrupted(scenes, corrupt):
    names, labels = image_labels(scenes)
    rng = np.random.default_rng(0)
    for concept in ("red", "circle", "striped", "text"):
        truth = labels[:, names.index(concept)]
        acts = _noisy_detector(truth.astype(float), rng)
        assert average_precision(acts, corrupt(truth, rng)) < average_precision(acts, truth) - 0.05


@pytest.mark.parametrize("corrupt", [_drop_half_positives, _add_false_positives])
def test_dissection_iou_drops_when_masks_are_corrupted(scenes, corrupt):
    rng = np.random.default_rng(1)
    for concept in ("blue", "star", "text"):
        truth = np.stack([scene.masks[concept] for scene in scenes])
        active = truth & (rng.random(truth.shape) < 0.9)  # a detector missing 10% of pixels
        assert dissection_iou(active, corrupt(truth, rng)) < dissection_iou(active, truth) - 0.1


def test_average_precision_matches_definition():
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([True, False, True])) == (
        pytest.approx((1 + 2 / 3) / 2)
    )
    assert average_precision(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    assert np.isnan(average_precision(np.array([1.0]), np.array([False])))


def test_summary_ground_truth_finds_planted_units(scenes):
    rng = np.random.default_rng(2)
    red_area = np.array([scene.masks["red"].mean() for scene in scenes])
    dotted = np.array([scene.masks["dotted"].any() for scene in scenes], dtype=float)
    random_unit = rng.normal(size=len(scenes))
    acts = np.stack([red_area, dotted + 0.1 * rng.normal(size=len(scenes)), random_unit], 1)
    red, dots, noise = unit_ground_truth(acts, scenes)
    assert (red.unit, red.concept, red.clear) == (0, "red", True)
    assert (dots.concept, dots.clear) == ("dotted", True) and dots.score > 0.95
    assert not noise.clear and noise.score < 0.5


def test_spatial_ground_truth_finds_planted_units(scenes):
    rng = np.random.default_rng(3)
    # 16x16 maps, like a mid-level layer: block-average the concept masks.
    def pooled(concept):
        masks = np.stack([scene.masks[concept] for scene in scenes]).astype(float)
        return masks.reshape(len(scenes), 16, 4, 16, 4).mean((2, 4))

    maps = np.stack([pooled("triangle"), pooled("text"), rng.random((len(scenes), 16, 16))], 1)
    triangle, text, noise = unit_ground_truth(maps, scenes)
    assert (triangle.concept, triangle.clear) == ("triangle", True)
    assert (text.concept, text.clear) == ("text", True)
    assert not noise.clear


def test_rejects_misaligned_inputs(scenes):
    with pytest.raises(ValueError):
        unit_ground_truth(np.zeros((len(scenes) - 1, 2)), scenes)
    with pytest.raises(ValueError):
        unit_ground_truth(np.zeros((len(scenes), 2, 3)), scenes)
