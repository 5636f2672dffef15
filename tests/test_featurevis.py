"""Feature visualization (dnd.featurevis): hand-weighted units with known answers, facets on
the toy world, and `dnd featurevis` on a run directory with its report section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import colour_target

from dnd.config import DictionaryConfig, RunConfig
from dnd.featurevis import (
    ColourBasis,
    FeatureVisConfig,
    featurevis_run,
    pooled_features,
    start_images,
    train_facet,
    visualize,
)
from dnd.record import UnitRecord
from dnd.report import build_report
from dnd.store import RunStore
from dnd.target import capture, hook_count, load_target

FAST = FeatureVisConfig(steps=40, lr=0.05, batch_size=8)


def _mean_rgb(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0) / 255


@pytest.mark.parametrize("unit, channel", [(0, 0), (1, 1), (2, 2)])
def test_a_unit_that_fires_on_one_colour_gets_an_image_of_that_colour(unit, channel):
    # ColourNet's `detect` unit 0 fires on pure red, 1 on green, 2 on blue.
    target = colour_target()
    (vis,) = visualize(target, "detect", [unit], FAST)
    rgb = _mean_rgb(vis.images[0])
    others = np.delete(rgb, channel)
    assert rgb[channel] > 0.6 and (others < rgb[channel] - 0.3).all(), rgb
    assert vis.activations[0] > vis.start_activations[0] + 0.3


def test_with_alpha_a_colour_unit_keeps_its_colour_opaque_over_the_mean_colour():
    """An opacity mask: the red unit's image is red where it is opaque, and the rest shows
    the probing images' mean colour (here grey); the starting colours match the opaque
    parameterisation's, so alpha changes only what is optimised, not the seed stream."""
    from dnd.featurevis import FourierImage

    target = colour_target()
    cfg = FeatureVisConfig(steps=40, lr=0.05, batch_size=8, alpha=True)
    (vis,) = visualize(target, "detect", [0], cfg)
    rgb = _mean_rgb(vis.images[0])
    assert rgb[0] > rgb[1] + 0.2 and rgb[0] > rgb[2] + 0.2, rgb
    assert vis.activations[0] > vis.start_activations[0] + 0.3
    opaque = FourierImage([3], 8, ColourBasis(), 1.0)
    masked = FourierImage([3], 8, ColourBasis(), 1.0, alpha=True)
    assert torch.equal(opaque.spectrum[:, :3], masked.spectrum[:, :3])
    masked.spectrum.data[:, 3] = 0
    masked.spectrum.data[:, 3, 0, 0, 0] = -1e4  # a constant, fully transparent mask
    grey = torch.full((1, 3, 1, 1), 0.5)
    assert torch.allclose(masked(), grey.expand(1, 3, 8, 8), atol=1e-3)
    assert torch.allclose(masked(torch.ones(1, 3, 1, 1)), torch.ones(1, 3, 8, 8), atol=1e-3)


def test_the_target_is_left_as_it_was():
    target = colour_target()
    before = {k: v.clone() for k, v in target.module.state_dict().items()}
    visualize(target, "pool", [0, 1], FAST)
    assert hook_count(target.module) == 0
    assert all(p.grad is None for p in target.module.parameters())
    assert all(torch.equal(before[k], v) for k, v in target.module.state_dict().items())
    assert not target.module.training


def test_hooks_are_removed_when_the_optimisation_fails():
    target = colour_target()
    with pytest.raises(IndexError):
        visualize(target, "detect", [7], FAST)  # `detect` has 3 units
    assert hook_count(target.module) == 0


def test_a_units_images_do_not_depend_on_the_units_sharing_its_batch():
    target = colour_target()
    alone = visualize(target, "detect", [1], FAST)[0]
    shared = visualize(target, "detect", [0, 1, 2], FAST)[1]
    assert alone.unit == shared.unit == 1
    diff = np.abs(np.asarray(alone.images[0], np.int16) - np.asarray(shared.images[0], np.int16))
    assert diff.max() <= 2  # float reductions may differ by a rounding step


def test_diversity_makes_a_units_images_differ_in_what_the_layer_sees():
    target = load_target("toyworld-cnn")

    def style_similarity(diversity: float) -> float:
        """Mean pairwise cosine similarity of conv4's Gram matrices on unit 5's images."""
        (vis,) = visualize(target, "conv4", [5], FeatureVisConfig(
            steps=30, per_unit=3, batch_size=6, diversity=diversity))
        x = torch.stack([target.preprocess(im) for im in vis.images])
        with torch.no_grad(), capture(target.module, {"conv4": target.layer("conv4")}) as out:
            target.module(x)
        f = out["conv4"].flatten(2)
        s = torch.nn.functional.normalize(torch.bmm(f, f.transpose(1, 2)).flatten(1), dim=1)
        m = s @ s.T
        return float((m.sum() - m.trace()) / 6)

    plain, diverse = style_similarity(0.0), style_similarity(1.0)
    assert diverse < plain - 0.2, (plain, diverse)


@pytest.fixture(scope="module")
def conv4_positions() -> np.ndarray:
    """The toy CNN's conv4 channel vectors at every position of 200 probing renders:
    float32 [12800, 128]."""
    from dnd.dictionary.fit import sample_positions
    from dnd.probe import open_probe

    return sample_positions(load_target("toyworld-cnn"), open_probe("toyworld:200"), "conv4",
                            max_samples=200 * 64)


@pytest.mark.parametrize("kind", ["topk_sae", "nmf"])
def test_every_dictionary_feature_is_raised_above_its_starting_noise(kind, conv4_positions):
    # A TopK latent below its position's top k has no gradient at all, and redirecting the
    # network's ReLUs left most TopK latents at zero and some NMF factors below their
    # start: the dictionary's stand-in gradient has to wake them.
    from dnd.dictionary.attach import attach
    from dnd.dictionary.fit import train_sae
    from dnd.dictionary.kinds import NMFDictionary

    target = load_target("toyworld-cnn")
    dictionary = (train_sae(conv4_positions, 256, k=8, steps=600) if kind == "topk_sae"
                  else NMFDictionary.fit(conv4_positions[::4], 32))
    with torch.no_grad():
        firing = (dictionary.encode(torch.from_numpy(conv4_positions)) > 0).float().mean(0)
    # Features the probing data switches on at 1% of positions or more (a rarer one may
    # stay off: 13 of 256 TopK latents, mostly rare ones, in a one-off run at the
    # default settings).
    units = torch.nonzero(firing >= 0.01).flatten().tolist()
    cfg = FeatureVisConfig(batch_size=16)
    with attach(target, "conv4", dictionary, "dict"):
        if kind == "topk_sae":  # the latents that are off on their starting image
            starts = pooled_features(target, "conv4.dict",
                                     start_images(units, 64, cfg, ColourBasis()))
            units = [u for i, u in enumerate(units) if starts[i, u] == 0]
        units = units[::2][:16]
        assert len(units) == 16
        vis = visualize(target, "conv4.dict", units, cfg)
    start = np.array([v.start_activations[0] for v in vis])
    final = np.array([v.activations[0] for v in vis])
    if kind == "topk_sae":
        assert (start == 0).all(), start
    assert (final > 0).all() and (final > start).all(), (units, start, final)


def test_colour_basis_centres_on_the_images_mean_colour():
    rng = np.random.default_rng(0)
    images = (rng.uniform(0.6, 0.9, (8, 16, 16, 3)) * [1.0, 0.5, 0.2] * 255).astype(np.uint8)
    basis = ColourBasis.from_images(images)
    assert np.allclose(basis.mean, images.reshape(-1, 3).mean(0) / 255, atol=1e-3)
    root = np.array(basis.sqrt_cov)
    assert np.allclose(root, root.T) and np.isclose(np.linalg.norm(root, axis=0).max(), 1)


def test_the_facet_term_moves_the_image_towards_the_facet():
    """On toyworld-planted, a probe for 'a written word' on conv2 steers a textual planted
    unit's visualization: the probe scores the faceted images higher than the plain ones."""
    from dnd.toyworld.planted import PLANTED
    from dnd.toyworld.render import render_request
    from dnd.toyworld.world import SceneRequest

    target = load_target("toyworld-planted")
    scenes = [render_request(SceneRequest(), s) for s in range(200)]
    words = [sc.image for sc in scenes if sc.description.text is not None][:40]
    plain = [sc.image for sc in scenes if sc.description.text is None][:40]
    facet, acc = train_facet(target, "conv2", "text", words, plain, weight=4.0)
    assert acc > 0.9
    unit = next(p.unit for p in PLANTED if p.layer == "conv4" and p.kind == "textual")
    # Words are fine strokes: a flatter spectrum (decay 1) than the default's reaches them.
    cfg = FeatureVisConfig(steps=64, lr=0.05, decay=1.0, batch_size=2)
    with_facet = visualize(target, "conv4", [unit], cfg, facet=facet)[0]
    without = visualize(target, "conv4", [unit], cfg)[0]
    w = torch.tensor(facet.direction)

    def probe(vis) -> float:
        return float(pooled_features(target, "conv2", vis.images) @ w)

    assert with_facet.facet == "text" and without.facet is None
    assert probe(with_facet) > probe(without)
    assert hook_count(target.module) == 0


def test_bad_settings_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="batch_size"):
        FeatureVisConfig(per_unit=4, batch_size=2)
    with pytest.raises(ValueError, match="summary"):
        FeatureVisConfig(summary="median")


def test_featurevis_run_saves_resumes_and_shows_in_the_report(tmp_path, capsys):
    run = tmp_path / "run"
    store = RunStore(run)
    store.save_config(RunConfig(model="toyworld-cnn", layer="fc", probe=["toyworld:40"],
                                summarizer="consensus"))
    cfg = FeatureVisConfig(steps=6, per_unit=2, batch_size=4)
    with pytest.raises(ValueError, match="no unit records"):
        featurevis_run(run, None, cfg, progress=False)
    out = featurevis_run(run, "0-2", cfg, progress=False)
    assert (out["done"], out["skipped"]) == (3, 0)
    meta, paths = store.featurevis_files("fc", 1)
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    again = featurevis_run(run, "0-3", cfg, progress=False)
    assert (again["done"], again["skipped"]) == (1, 3)
    # Other settings are another result, not a reuse.
    assert featurevis_run(run, "0", FeatureVisConfig(steps=7, batch_size=4),
                          progress=False)["done"] == 1
    assert featurevis_run(run, "0", FeatureVisConfig(steps=7, batch_size=4, alpha=True),
                          progress=False)["done"] == 1

    with pytest.raises(ValueError, match=r"'conv9' is not one of this run's layers \(fc\)"):
        featurevis_run(run, "0", cfg, layer="conv9", progress=False)

    store.write_unit(UnitRecord.from_json({"layer": "fc", "unit": 1, "model": "toyworld-cnn",
                                           "stage": "labels", "labels": ["red square"]}))
    build_report(run)
    page = (run / "report" / "units" / "fc" / "1.html").read_text()
    assert "id=featurevis" in page and page.count("feature visualization") == 2
    assert (run / "report" / "img" / "fv" / "fc" / "plain" / "1_1.png").is_file()
    assert "id=fv-stuck" not in page
    # A unit the optimiser left at its starting noise is flagged, not shown as evidence.
    import json
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "activations": [0.0, 0.0],
                                "start_activations": [0.0, 0.0]}))
    build_report(run)
    page = (run / "report" / "units" / "fc" / "1.html").read_text()
    assert "id=fv-stuck" in page and "show nothing it responds to" in page


def test_cli_needs_every_facet_option(tmp_path):
    from dnd.cli import main

    assert main(["featurevis", str(tmp_path), "--facet", "text"]) == 2


def test_cli_options_reach_the_settings(tmp_path, monkeypatch):
    import dnd.featurevis as fv
    from dnd.cli import main

    seen = {}

    def fake_run(run_dir, units, config, **kw):
        seen.update(config=config, units=units, **kw)
        return {"done": 0, "skipped": 0, "folder": run_dir, "seconds": 0.0}

    monkeypatch.setattr(fv, "featurevis_run", fake_run)
    RunStore(tmp_path).save_config(RunConfig(model="toyworld-cnn", layer="fc",
                                             probe=["toyworld:40"], summarizer="consensus"))
    assert main(["featurevis", str(tmp_path), "--units", "0-3", "--alpha", "--steps", "9",
                 "--decay", "1.5", "--per-unit", "2", "--seed", "4", "--batch-size", "6",
                 "-q"]) == 0
    cfg = seen["config"]
    assert (cfg.alpha, cfg.steps, cfg.decay, cfg.per_unit, cfg.seed, cfg.batch_size) == (
        True, 9, 1.5, 2, 4, 6)
    assert seen["units"] == "0-3" and seen["progress"] is False


def test_featurevis_bench_judges_visualizations_and_their_starting_images(tmp_path):
    from dnd.benchmarks.featurevis import featurevis_bench, featurevis_bench_lines

    r = featurevis_bench(120, {"short": FeatureVisConfig(steps=8, lr=0.05)},
                         (DictionaryConfig(kind="sae", features=32, steps=100),))
    row = r["rows"]["short"]
    # Even 8 steps make the toy CNN pick the unit's own class far above chance (1/64).
    assert row["fc_self"] > 0.2
    assert 0 <= row["fc_start"]["class"] <= row["fc"]["colour"] <= 1
    assert len(row["hidden"]) == len(row["hidden_start"]) == len(r["hidden"]) > 0
    (sae,) = r["dictionaries"]
    assert sae["features"] == 32 and sae["positions"] == 120 * 64
    assert 0 < sae["on"] <= sae["features"] and sae["on_of_firing"] <= sae["fire_on_probe"]
    text = "\n".join(featurevis_bench_lines(r, "dnd bench featurevis"))
    assert "Regenerate: `dnd bench featurevis`" in text and "| short (steps 8" in text
    assert f"| TopK SAE, k = 8, on 7,680 positions | 32 | {sae['fire_on_probe']} |" in text


def test_a_run_of_several_layers_needs_the_layer(tmp_path):
    run = tmp_path / "run"
    RunStore(run).save_config(RunConfig(model="toyworld-cnn", layer=["fc", "conv4"],
                                        probe=["toyworld:40"], summarizer="consensus"))
    with pytest.raises(ValueError, match=r"several layers \(fc, conv4\): choose one"):
        featurevis_run(run, "0", FeatureVisConfig(steps=2), progress=False)
    out = featurevis_run(run, "0", FeatureVisConfig(steps=2, batch_size=4), layer="conv4",
                         progress=False)
    assert out["done"] == 1 and RunStore(run).featurevis_files("conv4", 0)[1][0].is_file()
