"""Which axis of a layer's output holds its units: [B, C, H, W] or [B, H, W, C].

PyTorch's image layout is channels first, but some families (Swin, ConvNeXt blocks, MaxViT
partitions) return channels last. :func:`layer_layout` reads it off the module, what it
declares (timm's ``output_fmt``) and its family; :func:`as_channels_first` puts a 4-D
output in the one layout the rest of dnd reads.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    pass


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
