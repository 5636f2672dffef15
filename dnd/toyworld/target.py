"""ToyCNN: the toy world's target network, classifying the main object's colour + shape.

64 classes ("red circle", ..., "pink hexagon"), so the final layer ``fc`` has one unit per
named concept pair and intermediate blocks ``conv1``..``conv4`` carry spatial maps whose
ground truth the toy world knows exactly (see ``groundtruth.py``). Importing this module
registers two targets in :data:`dnd.target.TARGETS`: ``toyworld-cnn`` (trained on the
classification loss alone) and ``toyworld-planted`` (the same network, with chosen hidden
channels also trained to fire on known concepts: ``planted.py``); ``clip.py`` registers the
third, ``toyworld-clip`` (the toy CLIP's image tower).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dnd.target import TARGETS, Preprocess, Target, load_weights_file
from dnd.toyworld.world import COLOURS, SHAPES, SceneSpec

CLASS_NAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
# Mean/std of the RGB channels over 2,000 renders (seeds 0..1999), in [0, 1] units.
TOY_PREPROCESS: dict = {"size": 64, "mean": (0.556, 0.502, 0.446), "std": (0.289, 0.265, 0.282)}
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WIDTHS = (16, 32, 64, 128)


def class_index(spec: SceneSpec) -> int:
    """Index in ``CLASS_NAMES`` of a scene's main object."""
    return CLASS_NAMES.index(spec.main_object.label)


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ToyCNN(nn.Module):
    """Four Conv-BN-ReLU blocks, global average pool, linear classifier.

    Input: float [B, 3, 64, 64] normalised with ``TOY_PREPROCESS``. Spatial outputs:
    ``conv1`` [B, w1, 32, 32], ``conv2`` [B, w2, 16, 16], ``conv3`` [B, w3, 8, 8],
    ``conv4`` [B, w4, 8, 8]; ``pool`` [B, w4, 1, 1]; ``fc`` logits [B, num_classes].
    """

    def __init__(
        self, widths: tuple[int, ...] = DEFAULT_WIDTHS, num_classes: int = len(CLASS_NAMES)
    ):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.conv1 = _block(3, w1, pool=True)
        self.conv2 = _block(w1, w2, pool=True)
        self.conv3 = _block(w2, w3, pool=True)
        self.conv4 = _block(w3, w4, pool=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def preprocess(images: Iterable[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images (resized to 64 px) or a uint8 array [n, 64, 64, 3] -> float [n, 3, 64, 64]."""
    if not isinstance(images, np.ndarray):
        size = TOY_PREPROCESS["size"]
        images = np.stack(
            [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images]
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(TOY_PREPROCESS["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(TOY_PREPROCESS["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


CNN_STEM = "toy_cnn"  # toy_cnn.safetensors + toy_cnn.json in WEIGHTS_DIR: toyworld-cnn
PLANTED_STEM = "toy_planted"  # the same for toyworld-planted (dnd.toyworld.planted)


def save_toy_cnn(model: ToyCNN, out_dir: str | Path, extra: dict | None = None,
                 stem: str = CNN_STEM) -> Path:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` (widths, classes, preprocessing and
    ``extra``, e.g. the training record) into ``out_dir``; returns the weights' path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    widths = [getattr(model, f"conv{i}")[0].out_channels for i in range(1, 5)]
    config = {"widths": widths, "class_names": CLASS_NAMES, "preprocess": TOY_PREPROCESS,
              **(extra or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / f"{stem}.safetensors"))
    (out_dir / f"{stem}.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir / f"{stem}.safetensors"


def load_toy_cnn(weights_dir: str | Path = WEIGHTS_DIR, stem: str = CNN_STEM) -> ToyCNN:
    """The trained ToyCNN ``<stem>`` from ``weights_dir`` (default: the committed
    toyworld-cnn weights; ``stem=PLANTED_STEM``: toyworld-planted's), eval mode."""
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    config_path = weights_dir / f"{stem}.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; train it with `python -m "
                                f"dnd.toyworld.train` (`--only planted` for {PLANTED_STEM})")
    config = json.loads(config_path.read_text())
    if config["class_names"] != CLASS_NAMES:
        raise ValueError(f"{config_path} was trained for other classes than CLASS_NAMES")
    model = ToyCNN(tuple(config["widths"]), len(CLASS_NAMES))
    model.load_state_dict(load_file(str(weights_dir / f"{stem}.safetensors")))
    return model.eval()


def _toy_target(name: str, stem: str, weights: str) -> Target:
    """Target ``name``: a ToyCNN with the committed ``<stem>`` weights (``DEFAULT``),
    random ones (``none``), a weights file, or a folder holding ``<stem>.safetensors`` and
    ``<stem>.json`` (what ``python -m dnd.toyworld.train --out DIR`` writes; its widths are
    read from the json)."""
    from dnd.io import bytes_hash

    if weights == "DEFAULT":
        module = load_toy_cnn(stem=stem)
        # The file's hash, so activations cached for older weights are never reused.
        data = (WEIGHTS_DIR / f"{stem}.safetensors").read_bytes()
        wid = f"{name}.committed:{bytes_hash(data)}"
    elif weights.lower() == "none":
        module, wid = ToyCNN(), "random"
    elif Path(weights).is_dir():
        module = load_toy_cnn(weights, stem=stem)
        # The same id as the file itself (load_weights_file): one activation cache for both.
        wid = f"file:{bytes_hash((Path(weights) / f'{stem}.safetensors').read_bytes())}"
    else:
        module = ToyCNN()
        wid = load_weights_file(module, weights)
    pp = TOY_PREPROCESS
    return Target(name=name, module=module.eval(),
                  preprocess=Preprocess(resize=pp["size"], crop=pp["size"],
                                        mean=tuple(pp["mean"]), std=tuple(pp["std"])),
                  weights_id=wid, class_names=list(CLASS_NAMES))


@TARGETS.register("toyworld-cnn")
def _toyworld_cnn(weights: str = "DEFAULT") -> Target:
    """The trained ToyCNN (``DEFAULT``: the committed weights; ``none``: random; or a file,
    or a folder holding ``toy_cnn.safetensors``)."""
    return _toy_target("toyworld-cnn", CNN_STEM, weights)


@TARGETS.register("toyworld-planted")
def _toyworld_planted(weights: str = "DEFAULT") -> Target:
    """ToyCNN whose channels listed in ``dnd.toyworld.planted.PLANTED`` (or in the spec it
    was trained for) fire on known concepts (``DEFAULT``: the committed weights; ``none``:
    random; or a file, or a folder holding ``toy_planted.safetensors`` as ``python -m
    dnd.toyworld.train --only planted --spec FILE --out DIR`` writes)."""
    return _toy_target("toyworld-planted", PLANTED_STEM, weights)
