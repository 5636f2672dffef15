"""The target adapter: a network, the preprocessing it was trained with, its layers by name.

A :class:`Target` is what every stage that runs the network receives. It knows exactly
which region of an image the network sees (resize the shorter side, centre crop), so
spatial activation maps can be put back on the original image (ALGORITHM.md Step 1: the
reference code stretches a centre-crop map over the uncropped image; we do not). Also
here: capturing layer outputs (:func:`capture`, hooks removed in ``finally``), a layer
output as per-unit summaries and maps (:func:`split_output`), layer names and patterns,
and each layer's unit count (:func:`num_units`, :func:`layer_infos`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from dnd.registry import unknown_name_message
from dnd.target.layout import as_channels_first, layer_layout

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite (TF-Lite): (x - 127) / 128 on 0-255 pixels, i.e. about 0.5 and 0.5.
EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ViewGeometry:
    """How the network's input view maps back onto the original image.

    A view pixel ``(x, y)`` covers original pixels ``((x + left) / scale_x, (y + top) / scale_y)``.
    """

    scale_x: float
    scale_y: float
    left: float
    top: float
    original_size: tuple[int, int]  # (width, height) of the original image

    def box_to_original(self, box: Sequence[float]) -> tuple[int, int, int, int]:
        """Map an (x0, y0, x1, y1) view box (exclusive end) to original pixel coordinates."""
        x0, y0, x1, y1 = box
        w, h = self.original_size
        ox0 = int(np.floor((x0 + self.left) / self.scale_x))
        oy0 = int(np.floor((y0 + self.top) / self.scale_y))
        ox1 = int(np.ceil((x1 + self.left) / self.scale_x))
        oy1 = int(np.ceil((y1 + self.top) / self.scale_y))
        return max(ox0, 0), max(oy0, 0), min(ox1, w), min(oy1, h)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, centre-crop ``crop`` x ``crop``, normalise.

    ``resize == crop`` on a square image is a plain resize (e.g. CIFAR or the toy world).
    ``resize_mode="squash"`` resizes both sides to ``resize`` instead, ignoring the aspect
    ratio (open_clip's ``squash``, used by SigLIP and CLIPA weights), then crops the same way.
    ``mean``/``std`` (per RGB channel, on pixels scaled to [0, 1]) are the ones the weights
    were trained with. Left out, they default to the ImageNet statistics and ``defaulted``
    names them, so :meth:`Target.from_module` can say so: a network trained with other
    values (EfficientNet-Lite0: 0.5 and 0.5) otherwise loses accuracy without any error.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str = "bilinear"
    resize_mode: str = "shortest"
    # Which of mean/std were not given and hold the ImageNet defaults (not part of equality).
    defaulted: tuple[str, ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.crop <= 0 or self.resize < self.crop:
            raise ValueError(f"Preprocess needs 0 < crop <= resize, got resize={self.resize}, "
                             f"crop={self.crop}")
        defaulted = []
        for name, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
                defaulted.append(name)
        object.__setattr__(self, "defaulted", tuple(defaulted))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("Preprocess mean and std need 3 values (RGB)")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"Preprocess interpolation must be 'bilinear' or 'bicubic', got "
                             f"{self.interpolation!r}")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"Preprocess resize_mode must be 'shortest' or 'squash', got "
                             f"{self.resize_mode!r}")

    def view(self, image: Image.Image) -> tuple[Image.Image, ViewGeometry]:
        """The exact RGB crop the network sees (crop x crop) and its geometry."""
        image = image.convert("RGB")
        w, h = image.size
        # Same rounding as torchvision's Resize(int): shorter side exact, longer truncated.
        nw, nh = (self.resize, int(self.resize * h / w)) if w <= h else (
            int(self.resize * w / h), self.resize)
        if self.resize_mode == "squash":
            nw = nh = self.resize
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[self.interpolation]
        resized = image.resize((nw, nh), resample)
        # torchvision CenterCrop: offset = round((size - crop) / 2).
        left = int(round((nw - self.crop) / 2.0))
        top = int(round((nh - self.crop) / 2.0))
        view = resized.crop((left, top, left + self.crop, top + self.crop))
        geom = ViewGeometry(scale_x=nw / w, scale_y=nh / h, left=left, top=top,
                            original_size=(w, h))
        return view, geom

    def to_tensor(self, view: Image.Image) -> torch.Tensor:
        """[3, crop, crop] float tensor, normalised, from a view image."""
        arr = torch.from_numpy(np.asarray(view.convert("RGB"), dtype=np.float32) / 255.0)
        arr = arr.permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (arr - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.view(image)[0])

    def to_dict(self) -> dict:
        out = {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
               "std": list(self.std), "interpolation": self.interpolation}
        # Only when not the default, so the identities (cache keys) of every target that
        # resizes the shorter side stay as they were before the field existed.
        if self.resize_mode != "shortest":
            out["resize_mode"] = self.resize_mode
        return out


@dataclass
class Target:
    """A network to dissect: module (eval mode), preprocessing and an identity for caches.

    ``weights_id`` names the weights (e.g. ``IMAGENET1K_V2``, a file hash, ``random``) so
    cached activations are never reused across different weights.
    """

    name: str
    module: nn.Module
    preprocess: Preprocess
    weights_id: str
    class_names: list[str] | None = None
    # Tokens before the patch grid in a ViT's [B, T, D] output (CLS, registers).
    num_prefix_tokens: int = 1
    # Dictionaries attached as extra layers (dnd.dictionary.attach.attach): dotted name -> their
    # fingerprint, part of the identity so cached activations follow the exact dictionary.
    dictionaries: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_module(cls, module: nn.Module, preprocess: Preprocess, *, name: str = "custom",
                    weights_id: str = "custom", class_names: list[str] | None = None) -> Target:
        """Wrap any ``nn.Module`` with its preprocessing (the Python-API entry point).

        State the normalisation the weights expect: ``Preprocess(..., mean=..., std=...)``.
        Without it the ImageNet statistics are used and a warning names them (they are also
        in :meth:`identity`, so they are part of every cached result's key).
        """
        if preprocess.defaulted:
            values = ", ".join(f"{k}={getattr(preprocess, k)}" for k in preprocess.defaulted)
            log.warning("model %r: Preprocess gives no %s, so inputs are normalised with the "
                        "ImageNet statistics (%s). If the weights were trained otherwise, pass "
                        "Preprocess(..., mean=..., std=...).", name,
                        " or ".join(preprocess.defaulted), values)
        return cls(name=name, module=module.eval(), preprocess=preprocess,
                   weights_id=weights_id, class_names=class_names)

    def to(self, device: str | torch.device) -> Target:
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def layer_names(self) -> list[str]:
        return [n for n, _ in self.module.named_modules() if n]

    def layer(self, name: str) -> nn.Module:
        """The submodule called ``name``; an unknown name raises with close matches."""
        try:
            return self.module.get_submodule(name)
        except AttributeError:
            raise ValueError(unknown_name_message("layer", name, self.layer_names())
                             + f" (model {self.name})") from None

    @property
    def identity(self) -> dict:
        """What must match for cached activations to be reused (an attribute, like the
        backends' ``identity``)."""
        out = {"model": self.name, "weights": self.weights_id,
               "preprocess": self.preprocess.to_dict()}
        if self.dictionaries:  # only then, so every other target's cache keys stay as they were
            out["dictionaries"] = dict(sorted(self.dictionaries.items()))
        return out



@contextlib.contextmanager
def capture(module: nn.Module, layers: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``layers`` during forward passes inside the ``with`` block.

    Yields a dict layer-name -> latest output tensor, a 4-D one always as [B, C, H, W]: the
    output of a layer that returns [B, H, W, C] (:func:`layer_layout`) is a permuted view.
    Hooks are removed on exit, also when the forward pass raises (the test suite checks
    this).
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for lname, layer in layers.items():
            layout = layer_layout(module, lname, layer)

            def hook(_mod, _inp, out, lname=lname, layout=layout):
                out = out[0] if isinstance(out, tuple) else out
                outputs[lname] = as_channels_first(out, layout) \
                    if isinstance(out, torch.Tensor) else out
            handles.append(layer.register_forward_hook(hook))
        yield outputs
    finally:
        for h in handles:
            h.remove()


def hook_count(module: nn.Module) -> int:
    """Number of forward hooks attached anywhere in ``module`` (for leak checks)."""
    return sum(len(m._forward_hooks) for m in module.modules())


def split_output(out: torch.Tensor, summary: str, num_prefix_tokens: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn a layer output into (per-unit summary [B, U], spatial maps [B, U, h, w] or None).

    - conv output [B, C, h, w]: units are channels; summary = spatial mean or max
      (:func:`capture` gives a [B, H, W, C] layer's output in this layout).
    - linear output [B, F]: units are features; used as is, no spatial map.
    - transformer tokens [B, T, D]: units are features; summary = the CLS token's value,
      spatial maps from the patch tokens laid out on their square grid.
    """
    if out.dim() == 4:
        flat = out.flatten(2)
        s = flat.mean(2) if summary == "mean" else flat.amax(2)
        return s, out
    if out.dim() == 2:
        return out, None
    if out.dim() == 3:
        patches = out[:, num_prefix_tokens:, :]
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise ValueError(f"cannot lay {patches.shape[1]} patch tokens on a square grid; "
                             f"set Target.num_prefix_tokens (now {num_prefix_tokens})")
        maps = patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
        return out[:, 0, :], maps
    raise ValueError(f"unsupported layer output shape {tuple(out.shape)}: expected "
                     "[B, C, h, w], [B, F] or [B, T, D]")


LAYER_PATTERN_CHARS = "*?["


def is_layer_pattern(name: str) -> bool:
    """Whether a ``--layer`` value is a pattern (``layer?``, ``encoder.layers.*``)."""
    return any(c in name for c in LAYER_PATTERN_CHARS)


def match_layers(target: Target, pattern: str) -> list[str]:
    """The layer names ``pattern`` matches, in the network's module order. Matched part by
    part between the dots with shell wildcards (``*``, ``?``, ``[1-4]``), so ``*`` stays
    within one part: ``layer?`` is a ResNet's ``layer1``-``layer4`` and not their blocks,
    ``encoder.layers.*`` a torchvision ViT's blocks. Raises ValueError when none matches."""
    parts = pattern.split(".")
    names = [n for n in target.layer_names() if len(n.split(".")) == len(parts)
             and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("."), parts))]
    if not names:
        raise ValueError(f"layer pattern {pattern!r} matches no layer of model {target.name} "
                         "(* and ? stay within one dot-separated part); `dnd layers --model "
                         f"{target.name}` lists them")
    return names


def position_sum(t: torch.Tensor) -> torch.Tensor:
    """A layer output summed over its positions: [n, C, h, w], [n, T, C] (tokens) or
    [n, C] -> [n, C]."""
    if t.dim() == 4:
        return t.sum((2, 3))
    if t.dim() == 3:
        return t.sum(1)
    return t


def _did_not_run(target: Target, layer: str) -> ValueError:
    return ValueError(
        f"layer {layer!r} of model {target.name} is not called when the model runs on an "
        "image in eval mode, so it has no output to describe: it runs only in training "
        "(e.g. googlenet's aux1 and aux2, inception_v3's AuxLogits), the model's forward "
        "skips it, or its parent uses its weights without calling it. Pick a layer that "
        f"runs: `dnd layers --model {target.name}` lists each layer's units")


def num_units(target: Target, layer: str) -> int:
    """Number of units of ``layer``, from one forward pass of a blank image. Raises a
    ValueError naming the layer when it does not run in eval mode or holds windows of
    tokens rather than an image grid (:func:`layer_layout`)."""
    module = target.layer(layer)
    layout = layer_layout(target.module, layer, module)
    if layout.kind == "windows":
        raise ValueError(f"layer {layer!r} of model {target.name} holds window-partitioned "
                         f"tokens ({layout.why}), not an image grid; describe the partition "
                         "layer that contains it, which returns [B, C, H, W]")
    blank = torch.zeros(1, 3, target.preprocess.crop, target.preprocess.crop,
                        device=target.device)
    with torch.no_grad(), capture(target.module, {layer: module}) as outs:
        target.module(blank)
    if layer not in outs:
        raise _did_not_run(target, layer)
    out = outs[layer]
    if out.shape[0] != 1:
        raise ValueError(f"layer {layer!r} of model {target.name} returns {list(out.shape)} "
                         "for one image: its first axis is not the batch (windows or heads "
                         "inside a block), so it has no units per image; describe the block "
                         "that contains it")
    summary, _ = split_output(out, "mean", target.num_prefix_tokens)
    if out.dim() == 4:
        log.info("layer %s of %s: %d units, %s", layer, target.name, summary.shape[1],
                 layout.describe())
    return int(summary.shape[1])


@dataclass(frozen=True)
class LayerInfo:
    """One layer as ``dnd layers`` lists it: ``units`` None when it has none to describe,
    ``note`` saying where its units are or why it has none."""

    name: str
    units: int | None
    note: str


def layer_infos(target: Target) -> list[LayerInfo]:
    """Every layer of ``target`` with its unit count, from one forward pass of a blank
    image (only shapes are kept, so any model fits in memory)."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    handles = []

    def record(name: str):
        def hook(_mod, _inp, out):
            out = out[0] if isinstance(out, (tuple, list)) and out else out
            shapes[name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return hook

    names = target.layer_names()
    try:
        for name in names:
            handles.append(target.layer(name).register_forward_hook(record(name)))
        blank = torch.zeros(1, 3, target.preprocess.crop, target.preprocess.crop,
                            device=target.device)
        with torch.no_grad():
            target.module(blank)
    finally:
        for h in handles:
            h.remove()
    infos = []
    for name in names:
        if name not in shapes:
            container = isinstance(target.layer(name), (nn.ModuleList, nn.ModuleDict))
            infos.append(LayerInfo(name, None, "a container that is never called" if container
                                   else "not called in eval mode"))
            continue
        shape = shapes[name]
        if shape is None or len(shape) not in (2, 3, 4):
            infos.append(LayerInfo(name, None, f"output {shape or 'not a tensor'}"))
        elif shape[0] != 1:
            infos.append(LayerInfo(name, None, f"output {list(shape)} for one image: its first "
                                   "axis is not the batch (windows or heads inside a block)"))
        elif len(shape) == 4:
            layout = layer_layout(target.module, name)
            units = None if layout.kind == "windows" else shape[layout.axis]
            infos.append(LayerInfo(name, units, layout.describe()))
        else:
            infos.append(LayerInfo(name, shape[-1], "tokens [B, T, D]" if len(shape) == 3
                                   else "features [B, F]"))
    return infos


@contextlib.contextmanager
def no_empty_cache_folders() -> Iterator[None]:
    """torch.hub creates its checkpoint folders before downloading; when the download
    fails, remove the ones it created empty instead of leaving them behind."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    created = []  # the folders a download would create, innermost first
    for p in [checkpoints, *checkpoints.parents]:
        if p.exists():
            break
        created.append(p)
    try:
        yield
    except BaseException:
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()  # only succeeds on an empty folder
        raise
