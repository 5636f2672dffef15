"""Several layers in one run (`dnd describe --layer fc --layer conv4`): one pass over the
probing set for every layer, the run's caches shared (a concept two layers need is drawn
once), records equal to runs of each layer alone, labels per layer, resume, and the errors
for an unknown layer or a changed layer list. Small toy-world runs with the models loaded
once for all of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from test_pipeline import CountingProbe

from dnd.api import describe
from dnd.backends.base import resolve_device
from dnd.cli import main
from dnd.config import ConfigError, load_config
from dnd.loading import load_llm, load_models
from dnd.probe import open_probe
from dnd.store import RunDirConflict, RunStore
from dnd.work import COUNTS

N_PROBE = 200
Q = 4  # generated images per candidate concept
LAYERS = ["fc", "conv4"]


def _config(layer, **kw):
    return load_config(preset="toyworld", overrides={
        "layer": layer, "probe": [f"toyworld:{N_PROBE}"], "units": "0-1",
        "crop.top_k": 4, "score.images_per_concept": Q, **kw})


@pytest.fixture(scope="module")
def models():
    config = _config(LAYERS)
    return load_models(config, resolve_device(config.device), load_llm(config))


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """Each layer alone, then both in one run: name -> (run dir, result, probe images read).
    The two-layer run has an image bank (the default outside tests), through which its
    layers share generated images."""
    root = tmp_path_factory.mktemp("multilayer")
    out = {}
    for name, layer, bank in (("fc", "fc", "none"), ("conv4", "conv4", "none"),
                              ("both", LAYERS, str(root / "bank"))):
        probe = CountingProbe(open_probe(f"toyworld:{N_PROBE}"))
        res = describe(_config(layer, image_bank=bank), root / name, models=models,
                       probe=probe, progress=False)
        out[name] = (root / name, res, probe.loads)
    return out


def _scored(run_dir, layer):
    """The candidate concepts that got generated images, over the layer's records."""
    return {c for rec in RunStore(run_dir).records(layer) for c in rec.to_json()["generated"]}


def _activating(run_dir, layer):
    """The distinct activating images (probe image and crop box) of the layer's records."""
    return {(e["index"], str(e["box"])) for rec in RunStore(run_dir).records(layer)
            for e in rec.to_json()["activating_images"]}


def test_two_layers_read_the_probing_set_once_and_share_the_caches(runs):
    (_, fc, fc_reads), (_, conv4, conv4_reads) = runs["fc"], runs["conv4"]
    both_dir, both, both_reads = runs["both"]
    # The stages read the same images either way; the pass over the probe happens once.
    assert both_reads == fc_reads + conv4_reads - N_PROBE
    assert both.work.target_images == (fc.work.target_images + conv4.work.target_images
                                       - N_PROBE)
    for layer, alone in (("fc", fc), ("conv4", conv4)):
        assert np.array_equal(both.layers[layer].activations.values, alone.activations.values)
    # A concept both layers score is drawn once, an image both layers' units activate on
    # is captioned once.
    shared = _scored(both_dir, "fc") & _scored(both_dir, "conv4")
    assert shared, "the test's units should share a candidate concept"
    assert both.work.generated_images == Q * len(_scored(both_dir, "fc")
                                                 | _scored(both_dir, "conv4"))
    assert (fc.work.generated_images + conv4.work.generated_images
            == both.work.generated_images + Q * len(shared))
    assert fc.work.captioned_images == len(_activating(runs["fc"][0], "fc"))
    assert both.work.captioned_images == len(_activating(both_dir, "fc")
                                             | _activating(both_dir, "conv4"))
    entry = json.loads((both_dir / "work.json").read_text())["invocations"][0]
    assert entry["layers"] == LAYERS and "layer" not in entry
    assert entry["units_processed"] == 4
    assert entry["units_processed_by_layer"] == {"fc": 2, "conv4": 2}


def test_records_and_labels_equal_those_of_each_layer_alone(runs):
    both_dir, both, _ = runs["both"]
    assert list(both.layers) == LAYERS
    for layer in LAYERS:
        alone_dir, alone, _ = runs[layer]
        assert both.layers[layer].done_now == alone.done_now == [0, 1]
        mine = [r.to_json() for r in RunStore(both_dir).records(layer)]
        theirs = [r.to_json() for r in RunStore(alone_dir).records(layer)]
        assert len(mine) == 2 and mine == theirs
        # Labels per layer beside each other; labels.csv only in a run of one layer.
        assert ((both_dir / f"labels-{layer}.csv").read_text()
                == (alone_dir / "labels.csv").read_text())
        assert (alone_dir / "labels.csv").read_text().startswith(
            "Neuron ID,Label 1,Label 2,Label 3\n0,")
        assert not (alone_dir / f"labels-{layer}.csv").exists()
    assert not (both_dir / "labels.csv").exists()
    for layer in LAYERS:  # one report for the run, every layer's units in it
        assert (both_dir / "report" / "units" / layer / "1.html").is_file()
    assert yaml.safe_load((both_dir / "config.yaml").read_text())["layer"] == LAYERS
    assert yaml.safe_load((runs["fc"][0] / "config.yaml").read_text())["layer"] == "fc"
    with pytest.raises(AttributeError, match=r"2 layers \(fc, conv4\).*result.layers"):
        both.done_now  # noqa: B018 - the property raises
    assert runs["fc"][1].done_now == [0, 1]  # one layer: as before several existed


def test_a_two_layer_run_resumes_with_nothing_to_do_and_refuses_other_layers(runs, models):
    both_dir = runs["both"][0]
    probe = CountingProbe(open_probe(f"toyworld:{N_PROBE}"))
    again = describe(_config(LAYERS[::-1]), both_dir, models=models, probe=probe,
                     progress=False)  # the order of the layers is not part of the run
    assert probe.loads == 0 and again.work.counts() == dict.fromkeys(COUNTS, 0)
    assert all(r.already_done == [0, 1] and not r.done_now for r in again.layers.values())
    for layers in ("fc", ["fc", "conv4", "conv3"]):
        with pytest.raises(RunDirConflict, match=r"describes layers conv4, fc, not .*same "
                           r"layers \(--layer (fc|conv4) --layer (conv4|fc)\).*new --run-dir"):
            describe(_config(layers), both_dir, models=models, progress=False)


def test_an_unknown_layer_among_several_fails_before_models_and_the_pass(tmp_path,
                                                                        monkeypatch):
    import dnd.loading as loading

    def no_models(*a, **k):
        raise AssertionError("no model may load before the layers are checked")

    monkeypatch.setattr(loading, "load_models", no_models)
    probe = CountingProbe(open_probe(f"toyworld:{N_PROBE}"))
    with pytest.raises(ValueError, match="unknown layer 'conv44'.*did you mean: conv4"):
        describe(_config(["fc", "conv44"]), tmp_path / "r", probe=probe, progress=False)
    with pytest.raises(ConfigError, match=r"layer fc: unit id\(s\) \[64\] out of range.*"
                       "--units applies to every layer"):
        describe(_config(["conv4", "fc"], units="64"), tmp_path / "r", probe=probe,
                 progress=False)
    assert probe.loads == 0 and not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="fc given twice"):
        _config(["fc", "conv4", "fc"])


def test_cli_repeats_layer_and_a_yaml_config_may_list_them(tmp_path, capsys):
    argv = ["describe", "--preset", "toyworld", "--probe", "toyworld:40", "--units", "0-1",
            "--stop-after", "activations", "-q"]
    assert main(argv + ["--layer", "fc", "--layer", "conv4", "--run-dir",
                        str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "activations of 64 units of fc\nactivations of 128 units of conv4." in out
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["layer"] == LAYERS
    (tmp_path / "run.yaml").write_text("layer: [fc, conv4]\n")
    assert main(argv + ["--config", str(tmp_path / "run.yaml"), "--run-dir",
                        str(tmp_path / "a")]) == 0  # the same layers: resumes
    assert main(argv + ["--layer", "fc", "--run-dir", str(tmp_path / "a")]) == 2
    assert "--layer fc --layer conv4" in capsys.readouterr().err


def test_a_layer_pattern_describes_the_layers_it_matches(models, tmp_path):
    def run(layer, where=tmp_path):
        return describe(_config(layer, stop_after="activations"), where, models=models,
                        progress=False)

    assert list(run("conv[34]").layers) == ["conv3", "conv4"]  # not conv3.0, conv4.1, ...
    assert RunStore(tmp_path).load_config().layers == ["conv3", "conv4"]
    assert list(run(["conv4", "conv3"]).layers) == ["conv4", "conv3"]  # resumes by name
    assert list(run(["conv[34]", "conv3", "fc"], tmp_path / "b").layers) == [
        "conv3", "conv4", "fc"]  # each layer once
    with pytest.raises(RunDirConflict, match="describes layers conv3, conv4"):
        run("conv?", tmp_path)  # conv1-conv4: another run's layers
    with pytest.raises(ValueError, match="layer pattern 'block\\*' matches no layer"):
        run("block*", tmp_path / "c")
