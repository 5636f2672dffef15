"""`dnd bench activations` on a small synthetic set: the numbers it reports are real."""

from __future__ import annotations

import pytest

from dnd.bench import bench_activations, write_activation_bench


def test_activation_bench_reports_float16_size_and_throughput(tmp_path):
    r = bench_activations(n_images=3000, n_units=64, batch_size=128)
    assert r["disk_mb"] == pytest.approx(3000 * 64 * 2 / 2**20)  # float16, nothing more
    assert r["images_per_s"] > 0 and r["peak_rss_growth_mb"] >= 0
    path = write_activation_bench(tmp_path, n_images=1000, n_units=32)
    text = path.read_text()
    assert "dnd bench activations --images 1000 --units 32" in text
    assert "| activations on disk | 0.1 MB" in text


def test_per_unit_path_gives_identical_records_and_does_more_work(tmp_path):
    """`dnd bench describe --compare naive` on a small toy run: the per-unit baseline and the
    batched pipeline decide the same captions, candidates, labels and selection order, and
    the batched one captions and generates fewer images (cross-unit dedupe)."""
    from dnd.bench import bench_describe, describe_bench_lines

    r = bench_describe(units="0-3", n_probe=300, compare_naive=True, work_dir=tmp_path)
    batched, naive = r["batched"], r["naive"]
    assert r["differences"] == []
    assert set(batched["records"]) == {0, 1, 2, 3}
    assert all(len(rec["labels"]) >= 1 for rec in batched["records"].values())
    assert batched["captioned"][0] < naive["captioned"][0]
    assert batched["generated"][0] < naive["generated"][0]
    assert set(batched["stage_seconds"]) == {"activations", "crops", "captions", "candidates",
                                             "labels"}
    text = "\n".join(describe_bench_lines(r, "dnd bench describe --units 0-3"))
    assert "identical captions, candidates, labels and selection order" in text
    assert "| units per minute, end to end |" in text


def test_same_results_names_the_unit_and_field_that_differ():
    from dnd.bench import same_results

    a = {0: {"captions": ["a red circle"], "labels": ["red circle"],
             "candidates": {"concepts": ["red circle"]}, "selection": {"order": [0]}}}
    b = {0: {**a[0], "labels": ["blue star"]}}
    assert same_results(a, a) == []
    (diff,) = same_results(a, b)
    assert diff.startswith("unit 0: labels")
