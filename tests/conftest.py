"""Shared fixtures: a hand-weighted colour network with known answers, and probe images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

# Tests never touch the network: a stray hub id must fail at once, not retry for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests never share generated images through the user's image bank (dnd.cache.ImageBank):
# a test that counts generations must see its own; the bank's tests name a folder.
os.environ["DND_IMAGE_BANK"] = "none"
torch.set_num_threads(2)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


class ColourNet(nn.Module):
    """Unit 0 of ``detect``/``pool`` fires only on pure red pixels, unit 1 on pure green,
    unit 2 on pure blue; grey backgrounds give exactly zero.

    Inputs are raw RGB in [0, 1] (preprocess mean 0, std 1). ``pool`` averages 4x4 cells,
    so its maps are 16x16 on a 64x64 view and must be upsampled to find boxes.
    """

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail
        self.detect = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            w = -torch.ones(3, 3)
            w.fill_diagonal_(1.0)
            self.detect.weight.copy_(w.view(3, 3, 1, 1))
            self.detect.bias.fill_(-0.5)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if self.fail:
            raise RuntimeError("injected failure inside the model")
        x = self.pool(self.relu(self.detect(x)))
        return self.fc(x.mean((2, 3)))


def colour_target(fail: bool = False):
    from dnd.target import Preprocess, Target

    return Target.from_module(ColourNet(fail), Preprocess(resize=64, crop=64, mean=(0, 0, 0),
                                                          std=(1, 1, 1)), name="colournet")


def grey_image(rng: np.random.Generator, w: int = 96, h: int = 64) -> np.ndarray:
    """A grey noisy image [h, w, 3] uint8 with equal channels (no unit fires on it)."""
    g = rng.uniform(0.2, 0.8) + rng.uniform(-0.05, 0.05, size=(h, w, 1))
    return (np.repeat(np.clip(g, 0, 1), 3, axis=2) * 255).astype(np.uint8)


def paint(img: np.ndarray, box, rgb) -> None:
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = rgb


@pytest.fixture
def colour_probe(tmp_path):
    """20 images of 96x64; six have a red 16x16 square (known boxes), one has two green squares.

    Returns (folder, {index: red box in original pixels}, (index, [green boxes])).
    """
    rng = np.random.default_rng(0)
    red = {2: (40, 20, 56, 36), 5: (20, 8, 36, 24), 7: (60, 40, 76, 56), 11: (30, 30, 46, 46),
           13: (44, 4, 60, 20), 17: (24, 44, 40, 60)}
    green_idx, green = 9, [(18, 4, 34, 20), (62, 40, 78, 56)]
    folder = tmp_path / "probe"
    folder.mkdir()
    for i in range(20):
        img = grey_image(rng)
        if i in red:
            paint(img, red[i], (255, 0, 0))
        if i == green_idx:
            for b in green:
                paint(img, b, (0, 255, 0))
        Image.fromarray(img).save(folder / f"img{i:02d}.png")
    return folder, red, (green_idx, green)
