"""Layers that return channels-last tensors are read by their channels (dnd.target.layer_layout).

torchvision's and timm's Swin return [B, H, W, C] from their stages; ConvNeXt and MaxViT
return [B, C, H, W] from theirs (ConvNeXt has channels-last Linear layers inside its
blocks). On random-weight models, every stage's unit count is its known width, every
Conv2d, Linear and LayerNorm layer's count is its own width, and an activation map follows
the image's rows and columns.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from dnd.target import Layout, Target, capture, layer_infos, load_target, num_units, split_output

# model -> (layout of its stages, stage -> its width in the model's definition)
SWIN = {"features.0": 96, "features.1": 96, "features.2": 192, "features.3": 192,
        "features.4": 384, "features.5": 384, "features.6": 768, "features.7": 768,
        "norm": 768}
STAGES = {
    "swin_t": ("channels_last", SWIN),
    "swin_v2_t": ("channels_last", SWIN),
    "timm:swin_tiny_patch4_window7_224": ("channels_last", {
        "patch_embed": 96, "layers.0": 96, "layers.1": 192, "layers.2": 384, "layers.3": 768,
        "norm": 768}),
    "convnext_tiny": ("channels_first", {
        "features.0": 96, "features.1": 96, "features.2": 192, "features.3": 192,
        "features.4": 384, "features.5": 384, "features.6": 768, "features.7": 768}),
    "maxvit_t": ("channels_first", {"stem": 64, "blocks.0": 64, "blocks.1": 128,
                                    "blocks.2": 256, "blocks.3": 512}),
}


@functools.cache
def _load(name: str) -> Target:
    """Each model built once for the module (a random Swin takes seconds to build)."""
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notes on random initialisation
        return load_target(name, "none")


def _width(module: nn.Module) -> int | None:
    """A layer's width from its definition (None: not one of these kinds)."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    return None


@pytest.mark.parametrize("name", list(STAGES))
def test_units_are_each_layers_known_width(name):
    target = _load(name)
    kind, stages = STAGES[name]
    first = next(iter(stages.items()))
    last = list(stages.items())[-2]
    for layer, width in (first, last):  # a forward pass each
        assert num_units(target, layer) == width, layer
    infos = {i.name: i for i in layer_infos(target)}  # one forward pass for all
    for layer, width in stages.items():
        assert infos[layer].units == width and infos[layer].note.startswith(
            kind.replace("_", " ")), infos[layer]
    # Inside the stages too: every Conv2d, Linear and LayerNorm whose output is a grid of
    # one image (first axis the batch), ConvNeXt's channels-last Linear layers included.
    checked = 0
    for layer, module in target.module.named_modules():
        width, info = _width(module), infos.get(layer)
        if width is None or info is None or info.units is None or "[B, " not in info.note \
                or "windows" in info.note:
            continue
        assert info.units == width, (layer, info)
        checked += 1
    assert checked >= 10


def test_channels_last_comes_from_the_module_not_the_sizes():
    """A square output whose channel count equals its side is still read by its layout."""
    class Block(nn.Module):
        output_fmt = "NHWC"  # timm's convention, declared on the module

        def forward(self, x):
            return x.permute(0, 2, 3, 1)[:, :3, :3, :]  # [B, 3, 3, 3]: sizes cannot tell

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Block())
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    with torch.no_grad(), capture(model, {"0": model[0], "1": model[1]}) as outs:
        model(x)
    raw = model[1](model[0](x))
    assert torch.equal(outs["1"], raw.permute(0, 3, 1, 2))  # [B, C, H, W] again
    assert outs["0"].shape == (2, 3, 8, 8)


def test_an_activation_map_follows_the_image_rows_and_columns():
    """Changing a wide strip at the top of the image (pixel rows 0-15, columns 160-223)
    changes the patch-embedding maps only in cells rows 0-3, columns 40-55 (4-pixel patches
    on a 56 x 56 grid), and a Swin stage's map most there: the map is not transposed and
    its units are not the image's rows."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    y = x.clone()
    y[:, :, 0:16, 160:224] += 3.0
    cases = [("swin_t", "features.0"), ("swin_v2_t", "features.0"),
             ("timm:swin_tiny_patch4_window7_224", "patch_embed"),
             ("convnext_tiny", "features.0"), ("swin_t", "features.1")]
    for name, layer in cases:
        target = _load(name)
        with torch.no_grad(), capture(target.module, {layer: target.layer(layer)}) as outs:
            target.module(torch.cat([x, y]))
            maps = split_output(outs[layer], "mean", target.num_prefix_tokens)[1]
        assert maps.shape == (2, 96, 56, 56), (name, layer, maps.shape)
        change = (maps[1] - maps[0]).abs().sum(0)  # [56, 56]
        where = (change > 1e-4 * change.max()).nonzero()
        if layer != "features.1":  # patches alone: exactly the cells under the strip
            assert where[:, 0].tolist() and set(where[:, 0].tolist()) == set(range(4)), name
            assert set(where[:, 1].tolist()) == set(range(40, 56)), name
        else:  # window attention spreads it within nearby windows
            row, col = divmod(int(change.argmax()), 56)
            assert row < 4 and col >= 40
            assert change[:14, 28:].sum() > 0.95 * change.sum()


def test_a_layer_the_model_never_calls_in_eval_mode_is_named_with_why():
    target = _load("googlenet")
    with pytest.raises(ValueError, match=r"layer 'aux1' of model googlenet is not called when "
                       r"the model runs on an image in eval mode.*runs only in training"):
        num_units(target, "aux1")
    infos = {i.name: i for i in layer_infos(target)}
    assert infos["aux2.fc2"].units is None and infos["aux2.fc2"].note == "not called in eval mode"
    assert infos["inception5b"].units == 1024


def test_windows_of_tokens_are_refused_with_the_layer_to_use_instead():
    with pytest.raises(ValueError, match="window-partitioned tokens.*describe the partition "
                       "layer that contains it"):
        num_units(_load("maxvit_t"), "blocks.0.layers.0.layers.window_attention.attn_layer")
    with pytest.raises(ValueError, match=r"returns \[64, 49, 96\] for one image: its first "
                       "axis is not the batch"):
        num_units(_load("timm:swin_tiny_patch4_window7_224"), "layers.0.blocks.0.attn")


def test_dnd_layers_lists_each_layers_units_and_axis(capsys, monkeypatch):
    import dnd.target
    from dnd.cli import main

    monkeypatch.setattr(dnd.target, "load_target", lambda name, weights: _load(name))
    assert main(["layers", "--model", "swin_t"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["features.1"].split()[1] == "96"
    assert "channels last [B, H, W, C], units on axis 3" in lines["features.1"]
    assert lines["features.0.0"].split()[1] == "96" and "channels first" in lines["features.0.0"]
    assert Layout("channels_last", "x").axis == 3
