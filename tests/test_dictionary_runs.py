"""Dictionary features described by `dnd describe` (`--dictionary nmf --layer conv4.nmf`):
the run fits the dictionary on the probing set once and keeps it, a dictionary layer's
activations are the dictionary's features of its layer, and directions that pick single
channels give exactly those channels' activations and labels. Small toy-world runs."""

from __future__ import annotations

import numpy as np
import pytest

from dnd.api import describe
from dnd.config import ConfigError, load_config
from dnd.dictionary.files import load_dictionary
from dnd.store import RunStore
from dnd.target import load_target

N_PROBE = 200


def _config(layer, **kw):
    return load_config(preset="toyworld", overrides={
        "layer": layer, "probe": [f"toyworld:{N_PROBE}"], "units": "0-1", "crop.top_k": 4,
        "score.images_per_concept": 4, "image_bank": "none", **kw})


def test_nmf_features_are_fitted_once_saved_and_described(tmp_path):
    config = _config(["conv4", "conv4.nmf"], stop_after="activations",
                     **{"dictionary.kind": "nmf", "dictionary.features": 6,
                        "dictionary.samples": 4000})
    first = describe(config, tmp_path, progress=False)
    store = RunStore(tmp_path)
    saved = store.dictionary_path("conv4.nmf")
    assert saved.is_file() and saved.with_suffix(".json").is_file()
    nmf = load_dictionary(saved)
    assert nmf.n_features == 6 and nmf.in_features == 128
    acts = first.layers["conv4.nmf"].activations
    assert acts.n_units == 6
    # A feature's activation is the spatial mean of the NMF codes of conv4's positions.
    target = load_target("toyworld-cnn")
    neurons = first.layers["conv4"].activations
    probe_image = int(np.argmax(neurons.values[:, 0]))
    from dnd.probe import open_probe
    from dnd.target import capture

    x = target.preprocess(open_probe(f"toyworld:{N_PROBE}").load(probe_image))[None]
    import torch

    with torch.no_grad(), capture(target.module, {"conv4": target.layer("conv4")}) as out:
        target.module(x)
        h = out["conv4"]
    codes = nmf(h).mean((2, 3))[0].numpy()
    np.testing.assert_allclose(acts.values[probe_image].astype(np.float32), codes,
                               rtol=2e-3, atol=2e-3)
    # Re-running reuses the saved dictionary (same file, not refitted) and the activations.
    stamp = saved.stat().st_mtime_ns
    again = describe(config, tmp_path, progress=False)
    assert saved.stat().st_mtime_ns == stamp
    assert np.array_equal(again.layers["conv4.nmf"].activations.values, acts.values)


def test_directions_that_pick_channels_describe_those_channels(tmp_path):
    picks = (1, 0)  # feature 0 reads channel 1, feature 1 channel 0
    eye = np.zeros((2, 128), dtype=np.float32)
    eye[0, picks[0]] = eye[1, picks[1]] = 1.0
    np.save(tmp_path / "picks.npy", eye)
    config = _config(["conv4.dict", "conv4"],
                     **{"dictionary.kind": "file", "dictionary.path": str(tmp_path / "picks.npy")})
    result = describe(config, tmp_path / "run", progress=False)
    features = result.layers["conv4.dict"].activations.values
    neurons = result.layers["conv4"].activations.values
    assert np.array_equal(features[:, :2], neurons[:, list(picks)])
    store = RunStore(tmp_path / "run")
    labels = {r.unit: r.labels for r in store.records("conv4")}
    assert [r.labels for r in store.records("conv4.dict")] == [labels[1], labels[0]]
    assert (tmp_path / "run" / "labels-conv4.dict.csv").is_file()


def test_dictionary_settings_are_checked():
    with pytest.raises(ConfigError, match=r"no layer names its features: describe "
                                          r"<layer>.nmf \(e.g. --layer fc.nmf"):
        _config("fc", **{"dictionary.kind": "nmf"})
    with pytest.raises(ConfigError, match="dictionary.k given, but dictionary kind 'nmf'"):
        _config("conv4.nmf", **{"dictionary.kind": "nmf", "dictionary.k": 4})
    with pytest.raises(ConfigError, match="needs dictionary.path"):
        _config("conv4.dict", **{"dictionary.kind": "file"})
    with pytest.raises(ConfigError, match="dictionary.kind must be one of none, nmf, sae, file"):
        _config("conv4.pca", **{"dictionary.kind": "pca"})
    # Without a dictionary the saved config is as before (no dictionary section).
    assert "dictionary" not in _config("fc").to_dict()


def test_an_unknown_layer_under_a_dictionary_is_named_before_fitting(tmp_path):
    config = _config("conv9.nmf", **{"dictionary.kind": "nmf"})
    with pytest.raises(ValueError, match="conv9"):
        describe(config, tmp_path, progress=False)
    assert not (tmp_path / "dictionaries").exists()
