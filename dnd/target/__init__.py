"""Target networks: a module, the preprocessing it was trained with, and its layers by name.

A :class:`Target` is what every stage that runs the network receives (:mod:`.core`).
Targets come from the ``TARGETS`` registry by name (:mod:`.zoo`: ``resnet50``,
``timm:vit_base_patch16_224``, ``efficientnet-lite0``, ``open_clip:RN50x4/openai`` from
:mod:`.open_clip`, and those plug-ins add, e.g. the toy world's ``toyworld-cnn``) or from
:meth:`Target.from_module` for any ``nn.Module`` in the Python API. :mod:`.layout` reads
which axis of a layer's output holds its units.

This package's namespace is the targets' public interface, for users and plug-ins
(``dnd.target.TARGETS``, ``dnd.target.Target``, ``dnd.target.load_target``); dnd's own
modules import it from here too.
"""

from dnd.target.core import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LAYER_PATTERN_CHARS,
    LayerInfo,
    Preprocess,
    Target,
    ViewGeometry,
    capture,
    hook_count,
    is_layer_pattern,
    layer_infos,
    match_layers,
    num_units,
    position_sum,
    split_output,
)
from dnd.target.layout import Layout, as_channels_first, layer_layout
from dnd.target.open_clip import (
    CLIP_MODELS,
    OPEN_CLIP_PREFIX,
    ClipModel,
    is_clip_target,
    load_clip_for_target,
    open_clip_image_target,
    open_clip_preprocess,
    open_clip_target,
)
from dnd.target.zoo import (
    TARGETS,
    WEIGHTS_OPTION,
    imagenet_class_names,
    load_target,
    load_weights_file,
    model_names,
    target_needs,
    torchvision_preprocess,
)

__all__ = [
    "CLIP_MODELS", "EFFICIENTNET_LITE_MEAN", "EFFICIENTNET_LITE_STD", "IMAGENET_MEAN",
    "IMAGENET_STD", "LAYER_PATTERN_CHARS", "OPEN_CLIP_PREFIX", "TARGETS", "WEIGHTS_OPTION",
    "ClipModel", "LayerInfo", "Layout", "Preprocess", "Target", "ViewGeometry",
    "as_channels_first", "capture", "hook_count", "imagenet_class_names", "is_clip_target",
    "is_layer_pattern", "layer_infos", "layer_layout", "load_clip_for_target", "load_target",
    "load_weights_file", "match_layers", "model_names", "num_units", "open_clip_image_target",
    "open_clip_preprocess", "open_clip_target", "position_sum", "split_output",
    "target_needs", "torchvision_preprocess",
]
