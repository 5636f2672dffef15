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
