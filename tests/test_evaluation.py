"""Evaluation suites with hand-made fake embedders: every number here is computed by hand."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dnd.benchmarks.cli import add_tables_cli
from dnd.benchmarks.tables import run_tables
from dnd.evaluation import (
    LabelFileError,
    UnitLabels,
    classifier_search,
    final_layer_similarity,
    match_units,
    milan_scores,
    read_annotations,
    read_labels,
    reliable_mask,
    run_classifier_search,
)
from dnd.evaluation.cli import add_cli
from dnd.evaluation.milan import RELIABLE_THRESHOLDS, matching_threshold, milan_table_rows

SHARED = Path(__file__).resolve().parents[2] / "shared"


class FakeEmbedder:
    """Fixed vectors per text; unknown texts get a deterministic random unit vector."""

    def __init__(self, vectors: dict[str, tuple[float, ...]] | None = None, dim: int = 4,
                 name: str = "fake"):
        self.vectors, self.dim, self.name = vectors or {}, dim, name

    def encode(self, texts):
        rows = []
        for t in texts:
            if t in self.vectors:
                rows.append(np.asarray(self.vectors[t], dtype=np.float64))
            else:
                seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
                rows.append(np.random.default_rng(seed).normal(size=self.dim))
        rows = np.stack(rows)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------
# Label files
# ---------------------------------------------------------------------------------------

def test_read_reference_layout(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("Neuron ID,Label 1,Label 2,Label 3\n0,dogs,grass,\n7, red car ,wheels,road\n")
    units = read_labels(p, layer="layer4")
    assert units == [UnitLabels("layer4", 0, ("dogs", "grass")),
                     UnitLabels("layer4", 7, ("red car", "wheels", "road"))]
    assert units[1].description == "red car"


def test_read_layered_layout_and_layer_filter(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("layer,unit,description\nlayer1,3,stripes\nlayer2,3,dog faces\n")
    assert read_labels(p) == [UnitLabels("layer1", 3, ("stripes",)),
                              UnitLabels("layer2", 3, ("dog faces",))]
    assert read_labels(p, layer="layer2") == [UnitLabels("layer2", 3, ("dog faces",))]


@pytest.mark.parametrize("text, match", [
    ("Neuron ID,Label 1\n0,a\nx,b\n", r"labels\.csv, row 3: unit id 'x'"),
    ("Neuron ID,Label 1\n0,a\n1,,\n", r"labels\.csv, row 3: no label"),
    ("Neuron ID,Label 1\n0,a\n0,b\n", r"labels\.csv: unit 0 .* twice"),
    ("layer,unit,description\nlayer1,2\n", r"labels\.csv, row 2: no label for unit 2"),
    ("id,text\n0,a\n", r"labels\.csv: unknown header"),
])
def test_bad_label_files_name_file_and_row(tmp_path, text, match):
    p = tmp_path / "labels.csv"
    p.write_text(text)
    with pytest.raises(LabelFileError, match=match):
        read_labels(p)


# ---------------------------------------------------------------------------------------
# Final layer
# ---------------------------------------------------------------------------------------

def test_final_layer_scores_and_ci():
    emb = FakeEmbedder({"dog": (1, 0, 0, 0), "cat": (0, 1, 0, 0), "puppy": (0.6, 0.8, 0, 0)})
    labels = [UnitLabels(None, 0, ("dog",)), UnitLabels(None, 1, ("puppy",))]
    res = final_layer_similarity(labels, ["dog", "cat"], [emb], n_boot=200)
    (score,) = res.scores
    np.testing.assert_allclose(score.per_unit, [1.0, 0.8])
    assert score.mean == pytest.approx(0.9)
    assert 0.8 <= score.low <= score.mean <= score.high <= 1.0
    with pytest.raises(ValueError, match="out of range"):
        final_layer_similarity([UnitLabels(None, 2, ("dog",))], ["dog", "cat"], [emb])


# ---------------------------------------------------------------------------------------
# MILANNOTATIONS: 3 described units (+1 without description) with hand-computed scores
# ---------------------------------------------------------------------------------------

MILAN_VECTORS = {
    "dog": (1, 0, 0, 0), "puppy": (0.96, 0.28, 0, 0), "cat": (0, 1, 0, 0),
    "car": (0, 0, 1, 0), "truck": (0, 0.6, 0.8, 0), "road": (0, 0, 0, 1),
    "stripes": (0, 0, 0.6, 0.8), "zebra stripes": (0, 0, 0.8, 0.6),
    "object": (0.5, 0.5, 0.5, 0.5), "animal": (0.8, 0.6, 0, 0),
}
# unit 0: dog~puppy 0.96 (reliable); unit 1: car~truck 0.8 (not reliable at 0.81);
# unit 2: stripes~zebra stripes 0.96 (reliable); unit 3 has no description.
MILAN_CSV = """layer,unit,summary
layer1,0,dog
layer1,0,puppy
layer1,0,cat
layer1,1,car
layer1,1,truck
layer1,1,road
layer2,2,stripes
layer2,2,zebra stripes
layer2,2,road
layer2,3,cat
"""
DESCRIPTIONS = {("layer1", 0): "dog", ("layer1", 1): "car", ("layer2", 2): "road"}


@pytest.fixture
def annotations(tmp_path):
    p = tmp_path / "milan.csv"
    p.write_text(MILAN_CSV)
    return read_annotations(p)


def test_reliable_rule_and_threshold(annotations):
    emb = FakeEmbedder(MILAN_VECTORS)
    assert reliable_mask(annotations[:3], emb, 0.81).tolist() == [True, False, True]
    assert reliable_mask(annotations[:3], emb, threshold=0.79).tolist() == [True, True, True]
    assert reliable_mask(annotations[3:], emb, 0.81).tolist() == [False]  # one annotation


def test_reliable_threshold_is_per_encoder(annotations):
    """clip keeps the paper's 0.81 (car~truck at 0.8 is not reliable); minilm's calibrated
    0.41 counts it; an encoder without a calibrated threshold says so instead of guessing."""
    assert RELIABLE_THRESHOLDS["clip"] == 0.81 and RELIABLE_THRESHOLDS["minilm"] == 0.41
    clip = FakeEmbedder(MILAN_VECTORS, name="clip")
    minilm = FakeEmbedder(MILAN_VECTORS, name="minilm")
    assert reliable_mask(annotations[:3], clip).tolist() == [True, False, True]
    assert reliable_mask(annotations[:3], minilm).tolist() == [True, True, True]
    res = milan_scores(DESCRIPTIONS, annotations, minilm)
    assert res.threshold == 0.41 and res.reliable.tolist() == [True, True, True]
    assert "minilm cosine similarity > 0.41 (MiniLM's threshold, rank-matched" in res.rule
    res = milan_scores(DESCRIPTIONS, annotations, FakeEmbedder(MILAN_VECTORS, name="mpnet"))
    assert res.reliable is None and res.threshold is None
    assert res.method.mean_reliable is None and res.baseline.mean_reliable is None
    assert "no calibrated threshold for text embedder 'mpnet'" in res.rule
    with pytest.raises(ValueError, match="no calibrated threshold for text embedder 'mpnet'"):
        reliable_mask(annotations, FakeEmbedder(MILAN_VECTORS, name="mpnet"))
    given = milan_scores(DESCRIPTIONS, annotations, FakeEmbedder(MILAN_VECTORS, name="mpnet"),
                         threshold=0.9)
    assert given.reliable.tolist() == [True, False, True] and "given by the caller" in given.rule


def test_matching_threshold_rank_matches():
    best = np.array([0.9, 0.5, 0.7, 0.3, -np.inf])
    assert matching_threshold(best, 2) == pytest.approx(0.6)
    assert int((best > matching_threshold(best, 3)).sum()) == 3
    with pytest.raises(ValueError, match="tie"):
        matching_threshold(np.array([0.9, 0.5, 0.5]), 2)
    with pytest.raises(ValueError, match="in 1..4"):
        matching_threshold(best, 5)


def test_milan_scores_and_constant_baseline(annotations):
    res = milan_scores(DESCRIPTIONS, annotations, FakeEmbedder(MILAN_VECTORS),
                       threshold=0.81, generic_labels=("object", "animal"))
    assert res.units == (("layer1", 0), ("layer1", 1), ("layer2", 2))
    assert res.n_unlabelled == 1
    # dog vs (dog, puppy, cat) = (1 + .96 + 0)/3; car vs (car, truck, road) = 1.8/3;
    # road vs (stripes, zebra stripes, road) = (.8 + .6 + 1)/3.
    np.testing.assert_allclose(res.method.per_unit, [1.96 / 3, 0.6, 0.8])
    assert res.method.mean_all == pytest.approx(6.16 / 9)
    assert res.method.mean_reliable == pytest.approx((1.96 / 3 + 0.8) / 2)
    # "object" = (.5,.5,.5,.5) scores half the sum of each annotation vector: 5.22/9 overall,
    # beating "animal" (2.696/9); the best constant is reported.
    assert res.baseline.name == 'constant "object"'
    np.testing.assert_allclose(res.baseline.per_unit, [1.62 / 3, 1.7 / 3, 1.9 / 3])
    assert res.baseline.mean_all == pytest.approx(0.58)
    assert res.baseline.mean_reliable == pytest.approx((0.54 + 1.9 / 3) / 2)


def test_milan_given_constant(annotations):
    res = milan_scores(DESCRIPTIONS, annotations, FakeEmbedder(MILAN_VECTORS),
                       generic_labels=["animal"])
    assert res.baseline.name == 'constant "animal"'
    assert res.baseline.mean_all == pytest.approx(2.696 / 9)


def test_milan_table_per_layer_with_reliable_counts(annotations):
    res = milan_scores(DESCRIPTIONS, annotations, FakeEmbedder(MILAN_VECTORS), name="DnD",
                       threshold=0.81, generic_labels=["object"])
    rows = milan_table_rows([res])
    # layer1: units 0 (reliable, 1.96/3) and 1 (0.6); layer2: unit 2 (reliable, 0.8)
    assert rows == [
        ["layer1", "DnD", "0.6267", "0.6533", "2", "1"],
        ["layer1", 'constant "object"', "0.5533", "0.5400", "2", "1"],
        ["layer2", "DnD", "0.8000", "0.8000", "1", "1"],
        ["layer2", 'constant "object"', "0.6333", "0.6333", "1", "1"],
        ["all layers", "DnD", "0.6844", "0.7267", "3", "2"],
        ["all layers", 'constant "object"', "0.5800", "0.5867", "3", "2"],
    ]


def test_milan_table_says_no_reliable_unit_and_not_determined(annotations):
    only_unit_1 = {("layer1", 1): "car", ("layer2", 2): "road"}
    res = milan_scores(only_unit_1, annotations, FakeEmbedder(MILAN_VECTORS), threshold=0.81,
                       generic_labels=["object"])
    rows = milan_table_rows([res])
    assert rows[0] == ["layer1", "method", "0.6000", "no reliable unit", "1", "0"]
    assert rows[2] == ["layer2", "method", "0.8000", "0.8000", "1", "1"]
    undetermined = milan_scores(only_unit_1, annotations, FakeEmbedder(MILAN_VECTORS),
                                generic_labels=["object"])
    assert all(r[3] == r[5] == "not determined" for r in milan_table_rows([undetermined]))
    assert not any("nan" in c for r in rows for c in r)


def test_milan_table_layers_in_natural_order(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("layer,unit,summary\nlayer10,0,dog\nlayer2,0,dog\nconv1,0,dog\n")
    res = milan_scores({("layer10", 0): "dog", ("layer2", 0): "dog", ("conv1", 0): "dog"},
                       read_annotations(p), FakeEmbedder(MILAN_VECTORS), threshold=0.81)
    assert res.layers == ["conv1", "layer2", "layer10"]


# ---------------------------------------------------------------------------------------
# Classifier search
# ---------------------------------------------------------------------------------------

def test_classifier_search_perfect_unit_and_tie_averaged():
    emb = FakeEmbedder({"cat": (1, 0, 0, 0), "dog": (0, 1, 0, 0), "car": (0, 0, 1, 0),
                        "puppy": (0, 0.6, 0.8, 0)})
    labels = [UnitLabels(None, 0, ("cat",)), UnitLabels(None, 1, ("dog",)),
              UnitLabels(None, 2, ("dog",)), UnitLabels(None, 3, ("car",)),
              UnitLabels(None, 4, ("puppy",))]
    y = np.array([0, 0, 0, 1, 1, 1])  # class 0 = dog, 1 = cat
    acts = np.zeros((6, 5))
    acts[:, 0] = [0, 0, 0, 1, 2, 3]     # perfect cat detector
    acts[:, 1] = [5, 6, 7, 1, 2, 3]     # perfect dog detector
    acts[:, 2] = 1.0                    # tied with unit 1 on "dog", constant: AUROC 0.5
    res = classifier_search(labels, ["dog", "cat"], acts, y, [emb])
    assert res.units == ((1, 2), (0,))
    assert res.descriptions == (("dog", "dog"), ("cat",))
    np.testing.assert_allclose(res.per_class, [0.75, 1.0])
    assert res.mean_auroc == pytest.approx(0.875)


def test_match_units_ensemble_is_mean_of_cosines():
    a = FakeEmbedder({"x": (1, 0), "u": (1, 0), "v": (0.6, 0.8)}, dim=2)
    b = FakeEmbedder({"x": (1, 0), "u": (0, 1), "v": (1, 0)}, dim=2)
    # mean similarity of x: u (1 + 0)/2 = 0.5, v (0.6 + 1)/2 = 0.8 -> v
    matches, best = match_units(["u", "v"], ["x"], [a, b])
    assert matches == [[1]] and best[0] == pytest.approx(0.8)


def test_run_classifier_search_on_colour_net(tmp_path, monkeypatch):
    """End to end through compute_activations on red/green class folders. ColourNet's pool
    unit 0 fires on red, unit 1 on green, unit 2 on pure blue (never here: AUROC 0.5).
    Units 1 and 2 are both described "green": the tie averages 1.0 and 0.5."""
    from conftest import colour_target, grey_image, paint

    rng = np.random.default_rng(0)
    for cls, rgb in (("red", (255, 0, 0)), ("green", (0, 255, 0))):
        (tmp_path / "probe" / cls).mkdir(parents=True)
        for i in range(4):
            img = grey_image(rng)
            paint(img, (24 + 8 * i, 8, 40 + 8 * i, 24), rgb)  # inside the 64x64 centre view
            Image.fromarray(img).save(tmp_path / "probe" / cls / f"{i}.png")
    emb = FakeEmbedder({"red": (1, 0, 0, 0), "green": (0, 1, 0, 0), "red blobs": (0.9, 0.1, 0, 0)})
    labels = [UnitLabels("pool", 0, ("red blobs",)), UnitLabels("pool", 1, ("green",)),
              UnitLabels("pool", 2, ("green",))]
    target = colour_target()
    monkeypatch.setattr("dnd.target.load_target", lambda name, weights="DEFAULT": target)
    res = run_classifier_search(labels, "colournet", "pool", str(tmp_path / "probe"), [emb],
                                tmp_path / "cache", batch_size=4, progress=False)
    assert res.class_names == ("green", "red")
    assert res.units == ((1, 2), (0,))
    np.testing.assert_allclose(res.per_class, [0.75, 1.0])
    assert res.mean_auroc == pytest.approx(0.875) and res.n_images == 8


# ---------------------------------------------------------------------------------------
# Tables and CLI
# ---------------------------------------------------------------------------------------

def test_run_tables_writes_not_run_for_missing_data(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    written = run_tables(["classifier_search_cifar10_effnet_lite0", "milannotations_resnet152"],
                         out_dir=tmp_path / "out", data_root=empty,
                         embedders={"minilm": FakeEmbedder(), "clip": FakeEmbedder()})
    text = written["classifier_search_cifar10_effnet_lite0"].read_text()
    assert "not run: needs data cifar10-test/cifar10_test.npz" in text
    assert (f"dnd tables --only classifier_search_cifar10_effnet_lite0 --out {tmp_path / 'out'}"
            f" --data-root {empty}") in text
    assert "efficientnet-lite0" in text and "| mean" not in text
    milan = written["milannotations_resnet152"].read_text()
    assert "not run: needs data milannotations/resnet152_imagenet.csv" in milan
    with pytest.raises(KeyError, match="unknown table"):
        run_tables(["no_such_table"], out_dir=tmp_path / "out")


def test_run_tables_final_layer_sanity_and_baseline(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    written = run_tables(["final_layer_effnet_lite0_classnames"], out_dir=tmp_path,
                         embedders={"minilm": FakeEmbedder(dim=16, name="minilm")})
    rows = [r for r in written["final_layer_effnet_lite0_classnames"].read_text().splitlines()
            if r.startswith("| ")]
    assert rows[1].startswith("| class names | minilm | 1.0000 | [1.0000, 1.0000] | 1000 |")
    assert rows[2].startswith('| constant "object" (baseline) | minilm |')
    assert float(rows[2].split("|")[3]) < 0.9


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dnd")
    sub = p.add_subparsers(dest="command", required=True)
    add_tables_cli(sub)  # `dnd tables`, the benchmarks' command
    add_cli(sub)
    return p


def test_cli_parses_subcommands():
    p = _parser()
    a = p.parse_args(["tables", "--only", "x", "--only", "y", "--out", "o", "--data-root", "d"])
    assert (a.only, a.out, a.data_root) == (["x", "y"], "o", "d") and callable(a.func)
    a = p.parse_args(["evaluate", "final-layer", "--labels", "l.csv", "--model",
                      "efficientnet-lite0", "--embedder", "minilm", "--embedder", "mpnet"])
    assert a.embedder == ["minilm", "mpnet"] and a.baseline == "object"
    a = p.parse_args(["evaluate", "milan", "--labels", "layer1=l.csv", "--annotations", "a.csv"])
    assert a.threshold is None and a.embedder == "minilm"
    a = p.parse_args(["evaluate", "classifier-search", "--labels", "l.csv", "--model", "m",
                      "--layer", "_fc", "--probe", "cifar10:x.npz"])
    assert a.probe == ["cifar10:x.npz"] and a.summary == "mean"
    with pytest.raises(SystemExit):
        p.parse_args(["evaluate", "final-layer", "--labels", "l.csv"])  # no ground truth


@pytest.mark.parametrize("argv, flags", [
    (["tables"], ["--only", "--out", "--data-root", "--cache-dir"]),
    (["evaluate", "final-layer"], ["--labels", "--layer", "--model", "--class-names",
                                   "--embedder", "--baseline"]),
    (["evaluate", "milan"], ["--labels", "--annotations", "--embedder", "--threshold",
                             "--generic-label"]),
    (["evaluate", "classifier-search"], ["--labels", "--model", "--weights", "--layer",
                                         "--probe", "--embedder", "--summary", "--batch-size",
                                         "--workers", "--cache-dir"]),
])
def test_cli_help_lists_flags(capsys, argv, flags):
    with pytest.raises(SystemExit):
        _parser().parse_args([*argv, "--help"])
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out


def _run_milan_cli(tmp_path, monkeypatch, capsys, embedder_name, *extra):
    (tmp_path / "milan.csv").write_text(MILAN_CSV)
    (tmp_path / "l1.csv").write_text("Neuron ID,Label 1\n0,dog\n1,car\n")
    (tmp_path / "d.csv").write_text("layer,unit,description\nlayer2,2,road\n")
    monkeypatch.setattr("dnd.evaluation.cli.create_embedder",
                        lambda name: FakeEmbedder(MILAN_VECTORS, name=embedder_name))
    args = _parser().parse_args(["evaluate", "milan", "--annotations",
                                 str(tmp_path / "milan.csv"), "--labels",
                                 f"layer1={tmp_path / 'l1.csv'}", "--labels",
                                 str(tmp_path / "d.csv"), "--generic-label", "object", *extra])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_milan_prints_per_layer_method_and_baseline(tmp_path, monkeypatch, capsys):
    out = _run_milan_cli(tmp_path, monkeypatch, capsys, "clip")
    assert "cosine similarity > 0.81 (the paper's CLIP threshold)" in out
    assert "| layer1 | descriptions | 0.6267 | 0.6533 | 2 | 1 |" in out
    assert '| layer1 | constant "object" | 0.5533 | 0.5400 | 2 | 1 |' in out
    assert "| layer2 | descriptions | 0.8000 | 0.8000 | 1 | 1 |" in out
    assert "| all layers | descriptions | 0.6844 | 0.7267 | 3 | 2 |" in out
    assert '| all layers | constant "object" | 0.5800 | 0.5867 | 3 | 2 |' in out


def test_cli_milan_never_prints_nan(tmp_path, monkeypatch, capsys):
    out = _run_milan_cli(tmp_path, monkeypatch, capsys, "clip", "--threshold", "0.99")
    assert "| all layers | descriptions | 0.6844 | no reliable unit | 3 | 0 |" in out
    assert "nan" not in out and "> 0.99 (given by the caller)" in out


def test_cli_milan_uncalibrated_embedder_says_so(tmp_path, monkeypatch, capsys):
    out = _run_milan_cli(tmp_path, monkeypatch, capsys, "mpnet")
    assert "Reliable units not determined: no calibrated threshold for text embedder " \
           "'mpnet'" in out and "--threshold" in out
    assert "| all layers | descriptions | 0.6844 | not determined | 3 | not determined |" in out
    out = _run_milan_cli(tmp_path, monkeypatch, capsys, "minilm")
    assert "> 0.41 (MiniLM's threshold" in out
    assert "| all layers | descriptions | 0.6844 | 0.6844 | 3 | 3 |" in out


TABLES_YAML = """
milan_compare:
  kind: milan
  title: t
  models: [m]
  embedders: [minilm]
  method: DnD
  data:
    annotations: milan.csv
    labels: {layer1: l1.csv, layer2: l2.csv}
    compare: {Other: other.csv}
  command: c
reliability:
  kind: milan_reliability
  title: t
  models: [m]
  embedders: [minilm]
  thresholds: [0.97, 0.9]
  match_reliable: 1
  data:
    annotations: milan.csv
    labels: {layer1: l1.csv}
  command: c
"""


def test_tables_milan_compare_and_reliability(tmp_path):
    (tmp_path / "tables.yaml").write_text(TABLES_YAML)
    (tmp_path / "milan.csv").write_text(MILAN_CSV)
    (tmp_path / "l1.csv").write_text("Neuron ID,Label 1\n0,dog\n1,car\n")
    (tmp_path / "l2.csv").write_text("Neuron ID,label\n2,road\n")
    # a layer,unit,description file covering more units than DnD describes
    (tmp_path / "other.csv").write_text("layer,unit,description\nlayer1,0,cat\n"
                                        "layer1,1,truck\nlayer2,2,stripes\nlayer2,3,cat\n")
    written = run_tables(out_dir=tmp_path / "out", data_root=tmp_path,
                         definitions=tmp_path / "tables.yaml",
                         embedders={"minilm": FakeEmbedder(MILAN_VECTORS, name="minilm")})
    milan = written["milan_compare"].read_text()
    assert "Embedder minilm: 3 units. Reliable units: two annotations with minilm" in milan
    # minilm's 0.41 makes all three units reliable (car~truck 0.8 too)
    assert "| layer1 | DnD | 0.6267 | 0.6267 | 2 | 2 |" in milan
    # Other on DnD's units only (its layer2 unit 3 is left out): cat vs (dog, puppy, cat)
    # = (0 + .28 + 1)/3, truck vs (car, truck, road) = (.8 + 1 + 0)/3
    assert "| layer1 | Other | 0.5133 | 0.5133 | 2 | 2 |" in milan
    assert "| layer2 | Other | 0.9200 | 0.9200 | 1 | 1 |" in milan
    assert "| all layers | Other |" in milan and '| all layers | constant "' in milan
    rel = written["reliability"].read_text()
    # units 0 (best pair 0.96) and 1 (0.8) of layer1; rank-matching 1 unit: (0.96 + 0.8) / 2
    assert "the midpoint is 0.88." in rel
    assert "| 0.97 | 0 | 0 of 2 |" in rel and "| 0.88 (rank-matched) | 1 | 1 of 2 |" in rel
    assert "| 0.41 (calibrated) | 2 | 2 of 2 |" in rel
    assert "| layer2 | 1 | 2 |" in rel and "| all | 3 | 4 |" in rel  # every annotated unit


def test_cached_embedder_embeds_each_text_once():
    from dnd.evaluation import CachedEmbedder

    calls = []

    class Counting(FakeEmbedder):
        def encode(self, texts):
            calls.append(list(texts))
            return super().encode(texts)

    emb = CachedEmbedder(Counting(name="c"))
    first = emb.encode(["a", "b", "a"])
    again = emb.encode(["b", "c"])
    assert calls == [["a", "b"], ["c"]] and emb.name == "c"
    np.testing.assert_array_equal(first[1], again[0])
