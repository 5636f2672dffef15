"""ToyCNN: committed weights classify fresh renders; the training script runs."""

import json

import numpy as np
import pytest
import torch

from dnd.toyworld import train
from dnd.toyworld.groundtruth import fc_ground_truth
from dnd.toyworld.render import images_array, render_batch
from dnd.toyworld.target import (
    CLASS_NAMES,
    TOY_PREPROCESS,
    WEIGHTS_DIR,
    ToyCNN,
    class_index,
    load_toy_cnn,
    preprocess,
)

FRESH_SEEDS = range(2_000_000, 2_000_300)  # disjoint from training and held-out seeds


@pytest.fixture(scope="module")
def fresh():
    scenes = render_batch(FRESH_SEEDS)
    with torch.no_grad():
        logits = load_toy_cnn()(preprocess(images_array(scenes))).numpy()
    return scenes, logits


def test_committed_weights_classify_fresh_renders(fresh):
    scenes, logits = fresh
    labels = np.array([class_index(scene.description) for scene in scenes])
    accuracy = (logits.argmax(1) == labels).mean()
    assert accuracy >= 0.95, accuracy


def test_fc_units_are_their_classes(fresh):
    scenes, logits = fresh
    truths = fc_ground_truth(logits, scenes)
    assert [t.concept for t in truths] == CLASS_NAMES
    scored = [t for t in truths if not np.isnan(t.score)]
    assert len(scored) > 50
    assert np.mean([t.clear for t in scored]) > 0.9


def test_model_shapes_and_preprocessing():
    model = load_toy_cnn()
    assert not model.training
    assert len(CLASS_NAMES) == 64 and CLASS_NAMES[0] == "red circle"
    image = render_batch([0])[0].image
    x = preprocess([image.resize((100, 100))])  # PIL input is resized to the model's size
    assert x.shape == (1, 3, TOY_PREPROCESS["size"], TOY_PREPROCESS["size"])
    features = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: features.__setitem__(name, out.shape)
        )
        for name in ("conv1", "conv2", "conv3", "conv4", "pool", "fc")
    ]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    assert features["conv1"][-1] == 32 and features["conv4"][-1] == 8
    assert features["fc"] == (1, 64)
    config = json.loads((WEIGHTS_DIR / "toy_cnn.json").read_text())
    assert config["training"]["heldout_accuracy"] >= 0.95
    assert (WEIGHTS_DIR / "toy_cnn.safetensors").stat().st_size < 4_000_000


def test_train_script_runs_a_few_steps(tmp_path, capsys):
    metrics = train.main([
        "--only", "target", "--steps", "3", "--n-train", "32", "--n-eval", "16",
        "--batch-size", "8", "--out", str(tmp_path), "--seed", "1",
    ])
    assert 0.0 <= metrics["target"]["heldout_accuracy"] <= 1.0
    assert "held-out accuracy" in capsys.readouterr().out
    model = load_toy_cnn(tmp_path)
    assert isinstance(model, ToyCNN)
    reference = ToyCNN()
    assert model.state_dict().keys() == reference.state_dict().keys()
