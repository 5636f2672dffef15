"""CLIP image towers as targets: ``open_clip:<model>/<pretrained>`` and ``toyworld-clip``.

Nothing here downloads weights: open_clip names are built with ``weights="none"`` (random
weights, the tag's preprocessing) or with open_clip's download replaced; the toy CLIP's
committed weights and a tiny ViT saved as an open_clip folder stand in for real towers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dnd import preflight  # noqa: E402
from dnd.target import (  # noqa: E402
    Preprocess,
    capture,
    load_target,
    open_clip_preprocess,
    split_output,
    target_needs,
)

# CLIP's own normalisation (github.com/openai/CLIP, clip.py `_transform`), written out here
# rather than imported, so a wrong constant anywhere in the chain fails this file.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_VIT = {  # a 32-px ViT with 8-px patches: a 4 x 4 grid + one class token
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 24, "layers": 2, "head_width": 12,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
TINY_VIT_PREPROCESS = {"size": 32, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3],
                       "interpolation": "bilinear", "resize_mode": "squash"}


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A non-square noisy image, so resize and crop mistakes change pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    """A tiny open_clip ViT saved as a ``local-dir:`` folder; returns (folder, model)."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = CLIP(**TINY_VIT).eval()
    out = tmp_path_factory.mktemp("tiny_vit")
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_VIT, "preprocess_cfg": TINY_VIT_PREPROCESS}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))
    return out, model


@pytest.fixture(scope="module")
def toy_clip_target():
    return load_target("toyworld-clip")


# --- preprocessing: the model's own --------------------------------------------------------

def test_openai_tag_gets_clips_own_preprocessing_and_layers():
    """RN50x4/openai: 288 px, bicubic, CLIP's mean/std; random weights from the config."""
    target = load_target("open_clip:RN50x4/openai", weights="none")
    pre = target.preprocess
    assert (pre.resize, pre.crop, pre.interpolation, pre.resize_mode) == (288, 288, "bicubic",
                                                                         "shortest")
    assert pre.mean == OPENAI_MEAN and pre.std == OPENAI_STD and pre.defaulted == ()
    assert target.weights_id == "random" and target.name == "open_clip:RN50x4/openai"
    names = target.layer_names()
    assert {"layer1", "layer4", "attnpool"} <= set(names)
    assert "transformer" not in names  # the image tower only, not the text tower
    with torch.no_grad(), capture(target.module, {"layer4": target.layer("layer4")}) as outs:
        embedding = target.module(torch.zeros(1, 3, 288, 288))
    assert embedding.shape == (1, 640)  # RN50x4's embedding width
    assert outs["layer4"].shape == (1, 2560, 9, 9)  # 288 / 32


def test_random_weights_keep_a_tags_own_preprocessing():
    """MobileCLIP2-S0/dfndr2b: 256 px, bilinear, mean 0 and std 1 (open_clip's defaults,
    which open_clip itself applies when it loads no tag, are 224, bicubic, CLIP's)."""
    target = load_target("open_clip:MobileCLIP2-S0/dfndr2b", weights="none")
    pre = target.preprocess
    assert (pre.crop, pre.interpolation, pre.resize_mode) == (256, "bilinear", "shortest")
    assert pre.mean == (0.0, 0.0, 0.0) and pre.std == (1.0, 1.0, 1.0)
    assert target.num_prefix_tokens == 0  # a timm convolutional trunk: no tokens


def test_pretrained_weights_path_takes_the_tags_preprocessing_and_activation(monkeypatch):
    """The DEFAULT path, with open_clip's download replaced (no file: random weights).

    Same preprocessing as the tag's; OpenAI's ViT weights were trained with QuickGELU, which
    open_clip 3 only warns about: the target must build with it. The weights id names the
    tag, so activations cached for other weights are never reused."""
    import open_clip
    from open_clip.transformer import QuickGELU

    calls = []
    monkeypatch.setattr(open_clip.factory, "download_pretrained",
                        lambda cfg, **kw: calls.append(cfg) or "")
    target = load_target("open_clip:ViT-B-32/openai")
    assert calls and calls[0]["hf_hub"] == "timm/vit_base_patch32_clip_224.openai/"
    pre = target.preprocess
    assert (pre.crop, pre.interpolation, pre.mean, pre.std) == (224, "bicubic", OPENAI_MEAN,
                                                                OPENAI_STD)
    assert target.weights_id == "open_clip:ViT-B-32.openai"
    assert isinstance(target.layer("transformer.resblocks.0.mlp.gelu"), QuickGELU)
    other = load_target("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert other.weights_id != target.weights_id and other.identity != target.identity
    assert not isinstance(other.layer("transformer.resblocks.0.mlp.gelu"), QuickGELU)


@pytest.mark.parametrize("size, mode, interpolation", [(288, "shortest", "bicubic"),
                                                       (32, "squash", "bilinear")])
def test_preprocess_equals_open_clips_own_transform(size, mode, interpolation):
    """On a non-square image, dnd's view + normalisation give open_clip's tensor."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = {"size": size, "mean": OPENAI_MEAN, "std": OPENAI_STD,
           "interpolation": interpolation, "resize_mode": mode}
    ours = open_clip_preprocess(cfg)
    theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    for image in (_photo(400, 300), _photo(90, 130, seed=1)):
        assert torch.allclose(ours(image), theirs(image), atol=1e-5)
    view, geom = ours.view(_photo(400, 300))
    assert view.size == (size, size)
    if mode == "squash":  # both sides stretched to the size: no crop, unequal scales
        assert (geom.left, geom.top) == (0, 0) and geom.scale_x != geom.scale_y
        assert ours.to_dict()["resize_mode"] == "squash"
    else:  # the default mode stays out of the identity (cache keys of older targets)
        assert "resize_mode" not in ours.to_dict()


def test_unrepresentable_preprocessing_is_a_clear_error():
    base = {"size": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic"}
    with pytest.raises(ValueError, match="resize_mode 'longest'"):
        open_clip_preprocess({**base, "resize_mode": "longest"}, "open_clip:X/y")
    with pytest.raises(ValueError, match="not square"):
        open_clip_preprocess({**base, "size": (224, 160)})
    with pytest.raises(ValueError, match="resize_mode must be"):
        Preprocess(resize=8, crop=8, resize_mode="longest")
    # open_clip uses bicubic at inference for 'random'; a scalar mean means all channels.
    pre = open_clip_preprocess({**base, "interpolation": "random", "mean": 0.5, "std": 0.5})
    assert pre.interpolation == "bicubic" and pre.mean == (0.5, 0.5, 0.5)


# --- toyworld-clip ----------------------------------------------------------------------

def test_toyworld_clip_reads_its_preprocessing_from_the_folder(toy_clip_target):
    from dnd.toyworld.clip import CLIP_DIR

    saved = json.loads((CLIP_DIR / "open_clip_config.json").read_text())["preprocess_cfg"]
    pre = toy_clip_target.preprocess
    assert (pre.resize, pre.crop, pre.interpolation) == (64, 64, saved["interpolation"])
    assert pre.mean == tuple(saved["mean"]) and pre.std == tuple(saved["std"])
    assert toy_clip_target.weights_id.startswith("toyworld-clip.committed:")
    assert load_target("toyworld-clip", weights="none").weights_id == "random"


def test_toyworld_clip_layers_and_shapes(toy_clip_target):
    target = toy_clip_target
    assert {"layer1", "layer2", "layer3", "layer4", "attnpool"} <= set(target.layer_names())
    layers = {n: target.layer(n) for n in ("layer1", "layer4", "attnpool")}
    with torch.no_grad(), capture(target.module, layers) as outs:
        target.module(torch.zeros(2, 3, 64, 64))
    assert outs["layer1"].shape == (2, 64, 16, 16)
    assert outs["layer4"].shape == (2, 512, 2, 2)
    summary, maps = split_output(outs["attnpool"], "mean")
    assert summary.shape == (2, 64) and maps is None  # units = embedding dimensions


def test_toyworld_clip_embedding_is_encode_image(toy_clip_target):
    """The target's output on its own preprocessing of renders is the toy CLIP's
    ``encode_image`` (unnormalised), computed by an independently loaded copy."""
    from dnd.toyworld.clip import load_toy_clip
    from dnd.toyworld.render import render_batch

    model, transform, _ = load_toy_clip()
    images = [s.image for s in render_batch(range(5_000_000, 5_000_006))]
    images.append(images[0].resize((96, 80)))  # non-square: resize + crop like open_clip
    pixels = torch.stack([toy_clip_target.preprocess(im) for im in images])
    assert torch.allclose(pixels, torch.stack([transform(im) for im in images]), atol=1e-5)
    with torch.no_grad():
        ours = toy_clip_target.module(pixels)
        theirs = model.encode_image(pixels)
    assert ours.shape == (7, 64) and torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)  # not a constant output


# --- a tiny ViT tower: tokens, patch grid, weights --------------------------------------

def test_vit_tower_tokens_become_a_patch_grid(tiny_vit_dir):
    folder, model = tiny_vit_dir
    target = load_target(f"open_clip:local-dir:{folder}")
    assert target.num_prefix_tokens == 1  # the class token; open_clip's ViT has no registers
    assert target.preprocess == Preprocess(resize=32, crop=32, mean=(0.4, 0.5, 0.6),
                                           std=(0.2, 0.25, 0.3), interpolation="bilinear",
                                           resize_mode="squash")
    x = torch.randn(3, 3, 32, 32)
    block = "transformer.resblocks.1"
    with torch.no_grad(), capture(target.module, {block: target.layer(block)}) as outs:
        embedding = target.module(x)
    tokens = outs[block]
    assert tokens.shape == (3, 1 + 16, 24)  # batch first: [B, T, D]
    summary, maps = split_output(tokens, "mean", target.num_prefix_tokens)
    assert summary.shape == (3, 24) and maps.shape == (3, 24, 4, 4)
    assert torch.equal(summary, tokens[:, 0])  # the class token's value
    assert torch.equal(maps[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])  # row-major patches
    with torch.no_grad():
        assert torch.allclose(embedding, model.encode_image(x), atol=1e-5)


def test_weights_file_and_folder_weights_are_told_apart(tiny_vit_dir, tmp_path):
    """The tower's own state dict loads as --weights FILE; the ids differ with the data."""
    from safetensors.torch import save_file

    folder, model = tiny_vit_dir
    name = f"open_clip:local-dir:{folder}"
    default = load_target(name)
    assert default.weights_id.startswith("local-dir:")
    state = {k: v + 1.0 for k, v in model.visual.state_dict().items()}
    path = tmp_path / "tower.safetensors"
    save_file(state, str(path))
    loaded = load_target(name, weights=str(path))
    assert loaded.weights_id.startswith("file:") and loaded.weights_id != default.weights_id
    assert torch.equal(loaded.module.conv1.weight, state["conv1.weight"])
    with pytest.raises(FileNotFoundError, match="no/such.pt"):
        load_target(name, weights="/no/such.pt")


# --- names, errors, preflight -----------------------------------------------------------

def test_a_name_without_its_tag_names_the_tags():
    with pytest.raises(ValueError, match=r"needs a pretrained tag.*RN50x4/TAG.*openai"):
        load_target("open_clip:RN50x4")
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'opneai'; did you mean: "
                                         r"openai"):
        load_target("open_clip:RN50x4/opneai")


def test_an_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'RN50x5'; did you mean: "
                                         r".*RN50x4"):
        load_target("open_clip:RN50x5/openai", weights="none")


def test_preflight_names_the_file_open_clip_would_download(tmp_path):
    role = "target open_clip:RN50x4/openai"
    (need,) = target_needs("open_clip:RN50x4/openai")
    assert (need.role, need.source, need.ref) == (role, "hf", "timm/resnet50x4_clip.openai")
    assert need.files == ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    (need,) = target_needs("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert need.ref == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert target_needs("open_clip:RN50x4/openai", "none") == []
    (need,) = target_needs("open_clip:RN50x4/openai", str(tmp_path / "w.pt"))
    assert (need.source, need.ref) == ("path", str(tmp_path / "w.pt"))
    (need,) = target_needs("open_clip:local-dir:/no/clip", "none")  # the config is read
    assert (need.source, need.ref) == ("path", "/no/clip")
    assert target_needs("open_clip:RN50x4") == []  # loading names the tags


def test_describe_offline_fails_before_loading_naming_the_weights(tmp_path, monkeypatch,
                                                                  capsys):
    from dnd.cli import main

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(preflight, "host_reachable", lambda url, *a: False)

    def forbidden(*a, **k):
        raise AssertionError("a model was built before the preflight failed")

    monkeypatch.setattr("dnd.loading.load_target", forbidden)
    assert main(["describe", "--preset", "toyworld", "--model", "open_clip:RN50x4/openai",
                 "--layer", "layer4", "--probe", "toyworld:4", "--run-dir",
                 str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "target open_clip:RN50x4/openai: timm/resnet50x4_clip.openai" in err, err


# --- dnd describe, unchanged -------------------------------------------------------------

def test_describe_runs_on_toyworld_clip(tmp_path):
    """A small end-to-end toy-world run on the toy CLIP's embedding units."""
    from dnd.api import describe
    from dnd.config import load_config

    config = load_config(preset="toyworld", overrides={
        "model": "toyworld-clip", "layer": "attnpool", "units": "0-1",
        "probe": ["toyworld:60"]})
    describe(config, tmp_path / "run", progress=False)
    records = sorted((tmp_path / "run" / "units" / "attnpool").glob("*.json"))
    assert [p.stem for p in records] == ["0", "1"]
    labels = (tmp_path / "run" / "labels.csv").read_text().splitlines()
    assert len(labels) == 3 and labels[1].startswith("0,") and labels[2].startswith("1,")
    for line in labels[1:]:
        assert line.split(",")[1], labels  # every unit got a Label 1
