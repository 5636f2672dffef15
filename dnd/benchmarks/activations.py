"""`dnd bench activations`: the one-pass activation stage at scale.

A synthetic probing set (N random 4x4 images held as a uint8 array) goes through a network
whose probed layer has U units; the numbers are the activation file on disk, the growth of
peak RSS during the pass (the memory the stage itself needs, beyond the models), and
throughput. Speed does not depend on the images' content.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dnd.activations import compute_activations
from dnd.benchmarks.common import machine, peak_rss_mb, write_table
from dnd.probe import ArrayProbe
from dnd.target import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Target


def bench_activations(n_images: int = 50_000, n_units: int = 2048, batch_size: int = 256,
                      seed: int = 0) -> dict:
    """One activation pass over ``n_images`` synthetic images for ``n_units`` units.

    Returns a dict: disk MB of the activations, peak-RSS growth MB during the pass,
    images/s, and the top-10 lookup time for all units.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_images, 4, 4, 3), dtype=np.uint8)
    probe = ArrayProbe(name="synthetic", ids=[f"s/{i}" for i in range(n_images)],
                       images=images, source=f"synthetic:{n_images}:{seed}")
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, n_units, 3, padding=1), nn.ReLU())
    target = Target.from_module(net, Preprocess(resize=4, crop=4, mean=IMAGENET_MEAN,
                                                 std=IMAGENET_STD), name="bench-conv",
                                weights_id=f"seed{seed}")
    with tempfile.TemporaryDirectory() as tmp:
        before = peak_rss_mb()
        start = time.perf_counter()
        acts = compute_activations(target, probe, ["1"], Path(tmp), batch_size=batch_size,
                                   progress=False)["1"]
        seconds = time.perf_counter() - start
        grown = peak_rss_mb() - before
        disk = (Path(acts.path) / "values.f16").stat().st_size / 2**20
        start = time.perf_counter()
        acts.top_images(range(n_units), 10)
        topk_seconds = time.perf_counter() - start
    return {"n_images": n_images, "n_units": n_units, "disk_mb": disk,
            "peak_rss_growth_mb": grown, "images_per_s": n_images / seconds,
            "pass_seconds": seconds, "top10_seconds": topk_seconds,
            "probe_array_mb": images.nbytes / 2**20}


def write_activation_bench(out_dir: str | Path = "results", **kw) -> Path:
    """Run :func:`bench_activations` and write ``results/bench-activations-<machine>.md``."""
    r = bench_activations(**kw)
    name = machine()
    lines = [
        f"# Activation stage at scale ({name})", "",
        "Regenerate: `dnd bench activations"
        + (f" --images {r['n_images']}" if r["n_images"] != 50_000 else "")
        + (f" --units {r['n_units']}" if r["n_units"] != 2048 else "") + "`", "",
        f"Synthetic probing set of {r['n_images']:,} images (4x4, held in a "
        f"{r['probe_array_mb']:.0f} MB array), a layer of {r['n_units']:,} units, "
        "float16 memory-mapped activations.", "",
        "| measure | value |", "| --- | --- |",
        f"| activations on disk | {r['disk_mb']:.1f} MB (target <= ~250 MB) |",
        f"| peak RSS growth during the pass | {r['peak_rss_growth_mb']:.1f} MB |",
        f"| throughput | {r['images_per_s']:,.0f} images/s ({r['pass_seconds']:.1f} s) |",
        f"| top-10 images of every unit | {r['top10_seconds']:.1f} s |", "",
        "The RSS growth is what the stage needs beyond the model. It includes the memory "
        f"map's own file-backed pages (at most the {r['disk_mb']:.0f} MB on disk, which the "
        "kernel may drop at any time); the rest is one batch of layer outputs. The array "
        "is never copied into RAM as a whole.",
    ]
    return write_table(Path(out_dir) / f"bench-activations-{name}.md", lines)
