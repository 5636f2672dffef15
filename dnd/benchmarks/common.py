"""What the benchmarks share: the one table writer, the machine's name, and toy-world runs
with their ground truth."""

from __future__ import annotations

import platform
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnd.io import atomic_write_text


def write_table(path: Path, lines: list[str]) -> Path:
    """Write a benchmark's markdown ``lines`` to ``path`` (atomically) and print them."""
    atomic_write_text(path, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table's lines: the header, its rule, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def machine() -> str:
    """The machine's name in result file names: its architecture and torch threads."""
    return f"{platform.machine()}-cpu{torch.get_num_threads()}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def describe_toy_layers(root: Path, n_probe: int, layers: list[tuple[str, str]],
                        overrides: dict | None = None, progress: bool = True) -> dict:
    """Run the ``toyworld`` preset on each (layer, units) under ``root/<layer>`` (as ``dnd
    describe`` does, report included); the models (an LLM included) are loaded once for
    all layers. Layer -> its :class:`dnd.pipeline.RunResult`."""
    from dnd.api import describe
    from dnd.backends.base import resolve_device
    from dnd.config import load_config
    from dnd.loading import load_llm, load_models

    results, models = {}, None
    for layer, units in layers:
        config = load_config(preset="toyworld", overrides={
            "layer": layer, "units": units, "probe": [f"toyworld:{n_probe}"],
            **(overrides or {})})
        if models is None:
            models = load_models(config, resolve_device(config.device), load_llm(config))
        results[layer] = describe(config, root / layer, models=models, progress=progress)
    return results


def layer_truths(layer: str, result, scenes) -> dict[int, str | None]:
    """Ground-truth concept of each unit a run described (None: no clear concept): the
    class of an ``fc`` unit, else the concept whose presence best predicts its activation
    (:func:`dnd.toyworld.groundtruth.unit_ground_truth`)."""
    from dnd.toyworld.groundtruth import unit_ground_truth
    from dnd.toyworld.target import CLASS_NAMES

    if layer == "fc":
        return {u: CLASS_NAMES[u] for u in result.units}
    acts = np.asarray(result.activations.values[:, result.units], dtype=np.float32)
    gt = unit_ground_truth(acts, scenes)
    return {u: t.concept if t.clear else None for u, t in zip(result.units, gt)}
