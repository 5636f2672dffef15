"""`dnd explain` (dnd.explain): the Building Blocks views of one image on a finished run.
Known answers: integrated gradients' completeness on the toy CNN, channel contributions of
a hand-weighted linear net, NMF groups of planted groups, the dictionary of a hand-made
unit set; then the page and the CLI on a toy-world run with hand-written records."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from dnd.blocks import (
    channel_attribution,
    class_output,
    neuron_groups,
    semantic_dictionary,
    spatial_attribution,
    unit_output,
)
from dnd.config import RunConfig
from dnd.explain import Explainer, explain
from dnd.record import UnitRecord
from dnd.store import RunStore
from dnd.target import Preprocess, Target, hook_count, load_target


def _toy_image(seed: int = 3):
    from dnd.toyworld.render import render_scene

    return render_scene(seed).image


def test_integrated_gradients_are_complete_on_the_toy_cnn():
    target = load_target("toyworld-cnn")
    x = target.preprocess(_toy_image())[None]
    with torch.no_grad():
        top = int(target.module(x).argmax())
    att = spatial_attribution(target, x, class_output(target, top), "top class")
    assert att.map.shape == (64, 64)
    assert att.value - att.baseline_value > 1  # the class logit rises well above the black image
    assert att.gap < 0.01
    assert abs(att.map.sum() - (att.value - att.baseline_value)) < 0.01 * abs(att.value)
    # A unit's summary activation works too, from the mean-colour baseline.
    unit = spatial_attribution(target, x, unit_output(target, "conv4", 5), "conv4 unit 5",
                               baseline="mean")
    assert unit.baseline == "mean" and np.isfinite(unit.map).all()
    assert hook_count(target.module) == 0
    assert all(p.grad is None for p in target.module.parameters())
    # in-place ReLUs are restored after the attribution turned them off
    assert all(m.inplace for m in target.module.modules() if isinstance(m, nn.ReLU))


class TwoLayer(nn.Module):
    """``a`` = a 1x1 conv of the RGB input (no bias: zero input, zero activations), ``b`` =
    a 1x1 conv of ``a`` with known weights and bias, no ReLU between."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1, bias=False)
        self.b = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]
                                             ).view(4, 3, 1, 1))
            self.b.weight.copy_(torch.tensor([[2.0, -1.0, 0.5, 0.0], [0, 0, 0, 1]]
                                             ).view(2, 4, 1, 1))
            self.b.bias.copy_(torch.tensor([0.3, -0.2]))

    def forward(self, x):
        return self.b(self.a(x)).mean((2, 3))


def _two_layer() -> Target:
    return Target.from_module(TwoLayer(), Preprocess(8, 8, mean=(0, 0, 0), std=(1, 1, 1)),
                              name="two-layer")


def test_channel_attribution_recovers_weights_times_activations():
    target = _two_layer()
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = target.module.a(x).detach()[0]                           # [4, 8, 8]
    labels = {0: "reddish", 1: "greenish", 2: "bluish"}          # unit 3 has no label
    ch = channel_attribution(target, x, "a", "b", 0, steps=8, labels_a=labels,
                             label_b="mix")
    expected = target.module.b.weight[0, :, 0, 0].detach() * a.mean((1, 2))
    np.testing.assert_allclose(ch.contributions, expected.numpy(), rtol=1e-4, atol=1e-6)
    # The total is f(x) - f(a = 0): the bias is not a unit's contribution.
    assert ch.total == pytest.approx(float(expected.sum()), rel=1e-4)
    assert ch.gap < 1e-4
    (u1, f1, l1), (u2, f2, l2) = ch.top(2)
    assert (u1, l1) == (0, "reddish") and u2 == 2
    assert f1 == pytest.approx(float(expected[0] / expected.sum()), rel=1e-4)
    assert ch.sentence(2).startswith(f"b 'mix' <- a 'reddish' {f1:.2f}, 'bluish'")
    # Units sharing a label are one concept in the sentence: their contributions add up.
    merged = replace(ch, labels_a={0: "warm", 2: "warm", 1: "greenish"})
    label, frac, units = merged.by_label()[0]
    assert (label, units) == ("warm", (0, 2))
    assert frac == pytest.approx(float((expected[0] + expected[2]) / expected.sum()), rel=1e-4)
    assert merged.sentence(2) == f"b 'mix' <- a 'warm' {frac:.2f} (2 units), unit 3 (no label) 0.00"
    # Unit 1 of b reads only unit 3, which has no label.
    only = channel_attribution(target, x, "a", "b", 1, steps=4, labels_a=labels)
    assert only.top(1)[0][0] == 3 and "unit 3 (no label) 1.00" in only.sentence(1)
    assert hook_count(target.module) == 0
    with pytest.raises(ValueError, match="layer a runs before layer b"):
        channel_attribution(target, x, "b", "a", 0)
    assert hook_count(target.module) == 0


def test_semantic_dictionary_picks_the_labelled_units_at_each_position():
    maps = np.zeros((4, 2, 3), np.float32)
    maps[0, 0, 0], maps[1, 0, 0] = 5, 3      # red, then round, at (0, 0)
    maps[1, 1, 2], maps[3, 1, 2] = 2, 4      # stripes, then round, at (1, 2)
    maps[2] = 9                              # unit 2 fires everywhere but has no label
    d = semantic_dictionary(maps, {0: "red", 1: "round", 3: "stripes"}, top=2, layer="L")
    assert d.grid == (2, 3) and d.n_unlabelled == 1
    assert d.at(0, 0) == [(0, 5.0, "red"), (1, 3.0, "round")]
    assert d.at(1, 2) == [(3, 4.0, "stripes"), (1, 2.0, "round")]
    assert 2 not in d.units
    assert d.units[0, 1].tolist() == [0, 1] and d.values[0, 1].tolist() == [0, 0]  # ties
    with pytest.raises(ValueError, match="no labelled unit"):
        semantic_dictionary(maps, {7: "outside the layer"})


def test_neuron_groups_rebuild_planted_groups_and_are_named_by_their_units():
    h, w = 4, 5
    masks = np.zeros((2, h, w))
    masks[0, :2], masks[1, 2:] = 1, 1                            # top half, bottom half
    factors = np.array([[3.0, 2.0, 0, 0, 0.1, 0], [0, 0, 0, 4.0, 0, 1.0]])
    maps = np.einsum("nc,nhw->chw", factors, masks)              # [6, 4, 5]
    labels = {0: "red", 1: "circle", 3: "stripes", 5: "stripes"}
    g = neuron_groups(maps, labels, n_groups=2, top=2, layer="L")
    assert g.masks.shape == (2, h, w) and g.factors.shape == (2, 6)
    assert g.error < 1e-3
    np.testing.assert_allclose(g.reconstruction(), maps, atol=1e-2)
    assert g.masks.max(axis=(1, 2)) == pytest.approx([1, 1])
    top_half = int(np.argmax(g.masks[:, 0, 0]))
    assert g.labels[top_half] == "red + circle"
    assert g.labels[1 - top_half] == "stripes"                   # units 3 and 5: one label
    assert [u for u, _, _ in g.top[1 - top_half]] == [3, 5]
    with pytest.raises(ValueError, match="negative activations"):
        neuron_groups(maps - 1, labels, layer="L")
    with pytest.raises(ValueError, match="between 1 and 6"):
        neuron_groups(maps, labels, n_groups=7)


def _toy_run(tmp_path, layers=("conv4",)):
    run = tmp_path / "run"
    store = RunStore(run)
    store.save_config(RunConfig(model="toyworld-cnn", layer=list(layers),
                                probe=["toyworld:40"], summarizer="consensus"))
    names = ["red blob", "round edge", "striped area", "pink corner"]
    for unit in range(0, 128, 2):  # odd units stay undescribed
        store.write_unit(UnitRecord.from_json({
            "layer": "conv4", "unit": unit, "model": "toyworld-cnn", "stage": "labels",
            "labels": [names[(unit // 2) % 4]]}))
    image = tmp_path / "scene.png"
    _toy_image().save(image)
    return run, image


def test_explain_writes_a_page_that_names_the_labels(tmp_path):
    from dnd.report import build_report

    run, image = _toy_run(tmp_path)
    build_report(run)
    ex = explain(run, image, next_layer="fc", steps=16, groups=2)
    assert ex.page == run / "explain" / "scene" / "index.html"
    html = ex.page.read_text()
    for label in ("red blob", "round edge", "striped area"):
        assert label in html
    from dnd.toyworld.target import CLASS_NAMES

    # fc is undescribed, but it is the classifier: its unit is named by its class
    top_class = CLASS_NAMES[ex.channels.unit_b]
    assert ex.channels.sentence().startswith(f"fc '{top_class} (class)' <- conv4 '")
    assert "&lt;- conv4" in html and "dictionary.png" in html
    assert ex.attribution.objective.startswith("class ") and ex.attribution.gap < 0.05
    assert ex.dictionary.grid == (8, 8) and ex.dictionary.n_unlabelled == 64
    assert set(np.unique(ex.dictionary.units)) <= set(range(0, 128, 2))
    assert ex.groups.masks.shape == (2, 8, 8)
    assert 'href="../../report/units/conv4/0.html"' in html
    for name in ("image.png", "dictionary.png", "attribution.png", "group-0.png",
                 "group-1.png"):
        assert (ex.page.parent / name).is_file()
    data = json.loads((ex.page.parent / "explanation.json").read_text())
    assert len(data["dictionary"]["positions"]) == 64 and data["channels"]["layer_b"] == "fc"


def test_explainer_leaves_no_hooks_and_checks_its_inputs(tmp_path):
    run, image = _toy_run(tmp_path)
    with pytest.raises(ValueError, match="layer conv3 runs before layer conv4"):
        Explainer(run, next_layer="conv3")
    plain = Explainer(run)
    out = plain.explain(image, unit=4, groups=0, steps=4, write=False)  # 4: names[2]
    assert out.attribution.objective == "conv4 unit 4 'striped area' (spatial mean)"
    assert out.groups is None and out.channels is None and out.page is None
    with pytest.raises(ValueError, match="unit 500 is out of range"):
        plain.explain(image, unit=500, write=False)
    with pytest.raises(ValueError, match="unknown class"):
        plain.explain(image, klass="green dragon", write=False)
    with pytest.raises(FileNotFoundError, match="image not found"):
        plain.explain(tmp_path / "missing.png")
    assert hook_count(plain.target.module) == 0
    with pytest.raises(ValueError, match="no spatial positions"):
        Explainer(_fc_run(tmp_path)).explain(image, groups=2, write=False)


def _fc_run(tmp_path):
    run = tmp_path / "fc-run"
    store = RunStore(run)
    store.save_config(RunConfig(model="toyworld-cnn", layer="fc", probe=["toyworld:40"],
                                summarizer="consensus"))
    store.write_unit(UnitRecord.from_json({"layer": "fc", "unit": 0, "model": "toyworld-cnn",
                                           "stage": "labels", "labels": ["red circle"]}))
    return run


def test_cli_prints_the_page_and_reports_bad_input(tmp_path, capsys):
    from dnd.cli import main

    run, image = _toy_run(tmp_path)
    assert main(["explain", str(image), "--run", str(run), "--class", "red circle",
                 "--steps", "8", "--groups", "3", "--top", "2"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(run / "explain" / "scene" / "index.html")
    data = json.loads((run / "explain" / "scene" / "explanation.json").read_text())
    assert data["attribution"]["objective"] == "class 0 'red circle' (logit)"
    assert len(data["groups"]["groups"]) == 3
    assert len(data["dictionary"]["positions"][0]["top"]) == 2
    assert main(["explain", str(image), "--run", str(run), "--layer", "conv9"]) == 2
    assert "conv9" in capsys.readouterr().err


def test_a_dictionary_layer_of_the_run_is_explained_with_its_features(tmp_path):
    from dnd.config import load_config

    picks = np.zeros((2, 128), dtype=np.float32)
    picks[0, 5] = picks[1, 9] = 1.0  # feature 0 is channel 5 of conv4, feature 1 channel 9
    np.save(tmp_path / "picks.npy", picks)
    run = tmp_path / "run"
    store = RunStore(run)
    store.save_config(load_config(preset="toyworld", overrides={
        "layer": ["conv4.dict"], "probe": ["toyworld:40"], "dictionary.kind": "file",
        "dictionary.path": str(tmp_path / "picks.npy")}))
    for unit, label in ((0, "channel five"), (1, "channel nine")):
        store.write_unit(UnitRecord.from_json({"layer": "conv4.dict", "unit": unit,
                                               "stage": "labels", "labels": [label]}))
    image = tmp_path / "scene.png"
    _toy_image().save(image)
    ex = Explainer(run)
    hooks = hook_count(ex.target.module)  # the attached dictionary's own hook
    out = ex.explain(image, unit=1, groups=2, steps=16)
    x = ex.target.preprocess(_toy_image())[None]
    conv4 = ex.target.module.conv4(ex.target.module.conv3(ex.target.module.conv2(
        ex.target.module.conv1(x))))[0].detach().numpy()
    first = np.where(conv4[5] >= conv4[9], 0, 1)
    assert (out.dictionary.units[..., 0] == first).all()
    # Gradients flow through the dictionary: a feature's pixel attribution is complete.
    assert out.attribution.objective == "conv4.dict unit 1 'channel nine' (spatial mean)"
    assert out.attribution.gap < 0.05
    assert "channel five" in out.page.read_text()
    assert hook_count(ex.target.module) == hooks
    with pytest.raises(ValueError, match="conv4.dict is a dictionary layer"):
        Explainer(run, next_layer="fc")


def test_bench_pieces_find_the_objects_cells_and_judge_the_answer(monkeypatch, tmp_path):
    import importlib

    from dnd.benchmarks.explain import (
        cell_masks,
        explain_bench_lines,
        majority_label,
        one_object_scenes,
    )
    from dnd.cli import main

    mask = np.zeros((64, 64), bool)
    mask[16:40, 8:24] = True                  # exactly cells (rows 2-4, columns 1-2)
    on, off = cell_masks(mask, (8, 8))
    assert np.argwhere(on).tolist() == [[y, x] for y in (2, 3, 4) for x in (1, 2)]
    # background: no object pixel within one cell, i.e. outside rows 1-5 x columns 0-3
    assert not off[1:6, 0:4].any() and off[0].all() and off[6:].all() and off[:, 4:].all()
    maps = np.zeros((3, 8, 8), np.float32)
    maps[0, 2:5, 1:3] = 2.0                   # "red" on the object, "square" around it
    maps[1, 1:6, 0:4] = 1.0
    d = semantic_dictionary(maps, {0: "red", 1: "square", 2: "dots"}, top=2)
    assert majority_label(d, on) == "red" and majority_label(d, off) is None
    assert majority_label(d, on, {0: "dots", 1: "red", 2: "square"}) == "dots"
    scenes = one_object_scenes(1)
    assert len(scenes) == 64 and all(len(s.description.objects) == 1 for s in scenes)
    assert scenes[9].description.main_object.label == "orange square"
    rows = [{"names": (i < 7, False), "perm": 0.25, "background": False, "positions": [True],
             "gap": 0.004, "inside": 0.8, "area": 0.1, "channel": True, "channel_perm": 0.2,
             "group": True, "group_perm": 0.2, "error": 0.2, "object": "red circle",
             "answer": "red" if i < 7 else "dots", "group_label": "red", "sentence": "s"}
            for i in range(10)]
    text = "\n".join(explain_bench_lines(
        {"rows": rows, "n_probe": 40, "per_class": 1, "steps": 50, "permutations": 2,
         "units": 128, "labelled": 120, "judged": 60, "label_ok": 50, "describe_s": 1.0,
         "explain_s": 0.1, "threads": 2}, "dnd bench explain --probe-size 40"))
    assert "Regenerate: `dnd bench explain --probe-size 40`" in text
    assert "**7/10 (70%)**" in text and "Goal (at least 80% of renders): missed." in text
    assert "misses (object, and the answer at its positions): red circle (dots)" in text
    # `dnd bench explain` passes its command and probing-set size on.
    calls = []
    monkeypatch.setattr(importlib.import_module("dnd.benchmarks.explain"),
                        "write_explain_bench", lambda out, **kw: calls.append((out, kw)))
    assert main(["bench", "explain", "--probe-size", "300", "--out", str(tmp_path)]) == 0
    assert calls == [(str(tmp_path), {"command": "dnd bench explain --probe-size 300",
                                      "n_probe": 300})]
