"""Activations, probing sets, hooks, the run directory and the CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import colour_target
from PIL import Image

from dnd.activations import compute_activations
from dnd.api import describe
from dnd.cli import main
from dnd.config import ConfigError, RunConfig, load_config, parse_units
from dnd.probe import ProbeError, open_probe
from dnd.store import RunDirConflict, RunStore
from dnd.target import Preprocess, hook_count, split_output


def _config(folder, **kw):
    base = {"model": "colournet", "layer": "pool", "probe": [str(folder)], "units": "0-2",
            "crop": {"top_n": 6}, "stop_after": "crops"}
    base.update(kw)
    return RunConfig.from_dict(base)


class CountingProbe:
    """Wraps a probe and counts image loads: proves that no pass over it happened."""

    def __init__(self, probe):
        self.inner, self.loads = probe, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def load(self, i):
        self.loads += 1
        return self.inner.load(i)


# --- hooks -------------------------------------------------------------------------------

def test_hooks_removed_after_normal_run_bad_unit_and_model_exception(colour_probe, tmp_path):
    folder, _, _ = colour_probe
    target = colour_target()
    describe(_config(folder), tmp_path / "run", target=target, progress=False)
    assert hook_count(target.module) == 0

    with pytest.raises(ConfigError, match="valid ids are 0-2"):
        describe(_config(folder, units="0-9"), tmp_path / "run", target=target, progress=False)
    assert hook_count(target.module) == 0

    failing = colour_target(fail=True)
    with pytest.raises(RuntimeError, match="injected failure"):
        compute_activations(failing, open_probe(str(folder)), ["pool"], tmp_path / "x",
                            progress=False)
    assert hook_count(failing.module) == 0


# --- bad input fails before any pass over the probing set ---------------------------------

def test_unknown_layer_and_out_of_range_units_fail_before_the_pass(colour_probe, tmp_path):
    folder, _, _ = colour_probe
    probe = CountingProbe(open_probe(str(folder)))
    with pytest.raises(ValueError, match="did you mean: pool"):
        describe(_config(folder, layer="pol"), tmp_path / "a", target=colour_target(),
                 probe=probe, progress=False)
    with pytest.raises(ConfigError, match="this layer has 3 units, valid ids are 0-2"):
        describe(_config(folder, units="2-3"), tmp_path / "b", target=colour_target(),
                 probe=probe, progress=False)
    assert probe.loads == 0


def test_parse_units():
    assert parse_units("0-3,7,2", 10) == [0, 1, 2, 3, 7]
    assert parse_units("all", 4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="bad unit spec"):
        parse_units("3-1", 10)
    with pytest.raises(ConfigError, match=r"\[10\] out of range"):
        parse_units("9,10", 10)


# --- probing sets --------------------------------------------------------------------------

def test_corrupt_and_non_image_files_are_skipped_and_counted(colour_probe, tmp_path):
    folder, red, _ = colour_probe
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "readme.txt").write_text("hello")
    (folder / "sub").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "sub" / "allred.jpg")
    probe = open_probe(str(folder))
    assert len(probe) == 22 and [p for p, _ in probe.skipped] == [str(folder / "readme.txt")]
    acts = compute_activations(colour_target(), probe, ["pool"], tmp_path / "a",
                               progress=False)["pool"]
    assert int((~acts.valid).sum()) == 1 and not acts.valid[probe.ids.index("broken.png")]
    top, _ = acts.top_images([0], 1)
    assert probe.ids[top[0, 0]] == "sub/allred.jpg"


def test_class_subfolders_give_labels(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / cls / f"{i}.png")
    probe = open_probe(str(tmp_path))
    assert probe.class_names == ["cat", "dog"] and probe.labels == [0, 0, 1, 1]


def test_npz_and_concatenation(tmp_path, colour_probe):
    folder, _, _ = colour_probe
    imgs = np.zeros((5, 32, 32, 3), np.uint8)
    imgs[3, :, :, 0] = 255
    np.savez(tmp_path / "cifar10_small.npz", images=imgs, labels=np.arange(5))
    probe = open_probe([str(folder), f"cifar10:{tmp_path / 'cifar10_small.npz'}"])
    assert len(probe) == 25 and probe.ids[23] == "1:cifar10/3"
    assert np.asarray(probe.load(23))[0, 0].tolist() == [255, 0, 0]


def test_missing_and_empty_probing_sets_are_clear_errors(tmp_path):
    with pytest.raises(ProbeError, match="not found"):
        open_probe(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(ProbeError, match="holds no image file"):
        open_probe(str(tmp_path / "empty"))


@pytest.mark.skipif(not __import__("os").path.isfile(
    __import__("conftest").SHARED + "/data/cifar10-test/cifar10_test.npz"),
    reason="shared CIFAR-10 npz absent")
def test_shared_cifar10_npz():
    from conftest import SHARED

    probe = open_probe(f"cifar10:{SHARED}/data/cifar10-test/cifar10_test.npz")
    assert len(probe) == 10000 and probe.class_names[0] == "airplane"
    assert probe.load(0).size == (32, 32)


# --- activation cache -----------------------------------------------------------------------

def test_activations_recomputed_only_when_something_changes(colour_probe, tmp_path):
    folder, _, _ = colour_probe
    target, probe, cache = colour_target(), open_probe(str(folder)), tmp_path / "cache"
    first = compute_activations(target, probe, ["pool", "fc"], cache, progress=False)
    assert not first["pool"].reused and not first["fc"].reused
    again = compute_activations(target, probe, ["pool"], cache, progress=False)["pool"]
    assert again.reused and np.array_equal(again.values, first["pool"].values)
    assert again.values.dtype == np.float16 and isinstance(again.values, np.memmap)
    assert not compute_activations(target, probe, ["pool"], cache, summary="max",
                                   progress=False)["pool"].reused
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "new.png")
    changed = compute_activations(target, open_probe(str(folder)), ["pool"], cache,
                                  progress=False)["pool"]
    assert not changed.reused and changed.values.shape[0] == 21
    other_weights = colour_target()
    other_weights.weights_id = "other"
    assert not compute_activations(other_weights, probe, ["pool"], cache,
                                   progress=False)["pool"].reused


def test_summary_mean_and_max_values(colour_probe, tmp_path):
    folder, red, _ = colour_probe
    probe = open_probe(str(folder))
    acts = {s: compute_activations(colour_target(), probe, ["pool"], tmp_path / s, summary=s,
                                   progress=False)["pool"] for s in ("mean", "max")}
    i = probe.ids.index("img02.png")
    # Red square: 16x16 px of 0.5 in a 64x64 view -> 16 pooled cells of 0.5 out of 256.
    assert float(acts["mean"].values[i, 0]) == pytest.approx(0.5 * 16 / 256, rel=1e-3)
    assert float(acts["max"].values[i, 0]) == pytest.approx(0.5, rel=1e-3)


def test_vit_tokens_split_into_cls_and_patch_maps():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # CLS + 2x2 patches
    summary, maps = split_output(tokens, "mean", num_prefix_tokens=1)
    assert torch.equal(summary, tokens[:, 0])
    assert maps.shape == (2, 3, 2, 2) and maps[0, 1, 1, 0] == tokens[0, 3, 1]


def test_preprocess_geometry_maps_view_boxes_back():
    pre = Preprocess(resize=64, crop=64)
    view, geom = pre.view(Image.new("RGB", (192, 128)))
    assert view.size == (64, 64)
    # Scale 0.5, centre crop offset 16 view pixels = 32 original pixels.
    assert geom.box_to_original((0, 0, 64, 64)) == (32, 0, 160, 128)


# --- run directory and CLI -----------------------------------------------------------------

def test_run_directory_records_resume_and_conflict(colour_probe, tmp_path):
    folder, red, _ = colour_probe
    run = tmp_path / "run"
    target = colour_target()
    first = describe(_config(folder, units="0-1"), run, target=target, progress=False)
    assert first.done_now == [0, 1]
    rec = __import__("json").loads((run / "units" / "pool" / "0.json").read_text())
    assert rec["unit"] == 0 and rec["stage"] == "crops"
    assert {t["index"] for t in rec["top_images"]} == set(red)
    # The 6 top images (top_n), each with its best crop (the red square's).
    act = rec["activating_images"]
    assert sum(e["box"] is None for e in act) == 6
    assert sorted(e["index"] for e in act if e["box"] is not None) == sorted(red)
    with open(run / "labels.csv") as f:
        assert next(csv.reader(f)) == ["Neuron ID", "Label 1", "Label 2", "Label 3"]
    again = describe(_config(folder, units="0-2"), run, target=target, progress=False)
    assert again.done_now == [2] and again.activations.reused
    with pytest.raises(RunDirConflict, match="summary: 'mean' -> 'max'"):
        describe(_config(folder, summary="max"), run, target=target, progress=False)
    assert "secret" not in (run / "config.yaml").read_text().lower()
    # A run directory from an older dnd, with a setting that no longer exists.
    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(saved + "summarize: {simplify_temperature: 0.0}\n")
    with pytest.raises(RunDirConflict, match="cannot read.*simplify_temperature.*new --run-dir"):
        describe(_config(folder), run, target=target, progress=False)


def test_naming_an_llm_switches_a_consensus_preset_or_is_an_error(tmp_path):
    """`--llm smollm2` on the toyworld preset (consensus) uses the LLM; with `--summarizer
    consensus` given as well it is an error, never silence. A consensus run's saved config
    holds no LLM section, so it loads again as is."""
    switched = load_config(preset="toyworld", overrides={"llm.name": "smollm2"})
    assert switched.summarizer == "llm" and switched.llm.name == "smollm2"
    url = load_config(preset="toyworld", overrides={"llm.options.base_url": "http://x/v1"})
    assert url.summarizer == "llm"
    with pytest.raises(ConfigError, match=r"LLM settings given \(llm.name\).*consensus"):
        load_config(preset="toyworld", overrides={"llm.name": "smollm2",
                                                  "summarizer": "consensus"})
    (tmp_path / "run.yaml").write_text("summarizer: consensus\nllm: {name: openai}\n")
    with pytest.raises(ConfigError, match="uses no LLM"):
        load_config(tmp_path / "run.yaml", preset="toyworld")
    pooled = load_config(preset="toyworld", overrides={"summarizer": "llm+consensus",
                                                       "llm.name": "smollm2"})
    assert pooled.uses_llm and "llm" in pooled.to_dict()
    consensus = load_config(preset="toyworld")
    assert "llm" not in consensus.to_dict() and "summarize" not in consensus.to_dict()
    import yaml
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(consensus.to_dict()))
    assert load_config(tmp_path / "saved.yaml") == consensus
    # ... and a consensus run directory opens again (resume compares results keys)
    assert "llm" not in consensus.results_key()
    store = RunStore(tmp_path / "consensus-run")
    store.save_config(consensus)
    store.check(load_config(tmp_path / "saved.yaml"))
    with pytest.raises(RunDirConflict, match="summarizer: 'consensus' -> 'llm'"):
        store.check(switched)


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key.*layr"):
        RunConfig.from_dict({"model": "m", "layr": "x", "probe": ["p"]})
    with pytest.raises(ConfigError, match="crop.top_n must be int"):
        RunConfig.from_dict({"model": "m", "layer": "x", "probe": ["p"],
                             "crop": {"top_n": "ten"}})
    (tmp_path / "c.yaml").write_text("model: resnet18\nlayer: layer4\nprobe: [p]\n")
    cfg = load_config(tmp_path / "c.yaml", {"crop.top_k": 5, "units": "0-3"})
    assert cfg.crop.top_k == 5 and cfg.units == "0-3" and cfg.model == "resnet18"


def test_switching_a_backend_drops_the_old_backends_options(tmp_path):
    """`--preset paper --llm smollm2` must not hand the local model the preset's
    `model: gpt-4o-mini`; options given with the switch, or to the same backend, stay."""
    base = {"probe": ["p"]}
    cfg = load_config(None, {**base, "llm.name": "smollm2"}, preset="paper")
    assert cfg.llm.name == "smollm2" and cfg.llm.options == {}
    cfg = load_config(None, {**base, "llm.options.model": "m", "llm.name": "transformers"},
                      preset="paper")
    assert cfg.llm.options == {"model": "m"}
    cfg = load_config(None, {**base, "llm.name": "openai", "generator.options.steps": 20},
                      preset="paper")
    assert cfg.llm.options == {"model": "gpt-4o-mini"}
    assert cfg.generator.options["steps"] == 20 and "model_id" in cfg.generator.options
    (tmp_path / "c.yaml").write_text("encoder: {name: hf_clip}\n"
                                     "generator: {options: {steps: 25}}\n")
    cfg = load_config(tmp_path / "c.yaml", base, preset="paper")
    assert cfg.encoder.options == {} and cfg.generator.options["steps"] == 25
    assert cfg.generator.options["model_id"].endswith("stable-diffusion-v1-5")


def test_cli_describe_end_to_end(colour_probe, tmp_path, capsys):
    folder, _, _ = colour_probe
    argv = ["describe", "--model", "resnet18", "--weights", "none", "--layer", "layer4",
            "--probe", str(folder), "--units", "0-2", "--top-n", "3", "--stop-after", "crops",
            "--run-dir",
            str(tmp_path / "r"), "-q"]
    assert main(argv) == 0
    assert "3 done now" in capsys.readouterr().out
    rec = __import__("json").loads((tmp_path / "r/units/layer4/1.json").read_text())
    assert len(rec["top_images"]) == 3 and rec["model"] == "resnet18"
    assert main(argv) == 0 and "3 already done" in capsys.readouterr().out
    assert main(argv[:6] + ["layer9"] + argv[7:-2] + [str(tmp_path / "r2"), "-q"]) == 2
    assert "did you mean: layer4" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()  # nothing written for a config that failed checks


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["describe", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--weights", "--layer", "--probe", "--units", "--summary",
                 "--stop-after", "--batch-size", "--workers", "--device", "--chunk-units",
                 "--top-n", "--top-k", "--max-crops", "--run-dir", "--config", "--quiet"):
        assert flag in text


def test_torchvision_preprocessing_follows_the_chosen_weights():
    """resnet50's two ImageNet weights were trained with different resizes (V1: 256, V2:
    232); each must get its own, not the DEFAULT entry's."""
    import torchvision

    from dnd.target import torchvision_preprocess

    w = torchvision.models.ResNet50_Weights
    assert torchvision_preprocess(w.IMAGENET1K_V1).resize == 256
    assert torchvision_preprocess(w.IMAGENET1K_V2).resize == 232
    assert torchvision_preprocess(w.IMAGENET1K_V1).crop == 224
