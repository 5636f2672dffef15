"""One pass over the probing set: per-unit summary activations of every requested layer.

Activations are streamed to a float16 memory map ([n_images, n_units], ~200 MB for 50,000
images x 2,048 units) and never held twice in RAM. A cache entry is reused only when the
model, its weights, its preprocessing, the layer, the probing set's fingerprint and the
summary function all match; anything else recomputes (stale activation caches are a known
trap in this field).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dnd.io import FileLock, atomic_write_json, stable_hash
from dnd.probe import ProbeSet
from dnd.target import Target, ViewGeometry, capture, split_output

log = logging.getLogger(__name__)

SUMMARIES = ("mean", "max")


# ---------------------------------------------------------------------------------------
# Batched image loading shared by every stage that runs the target on probe images
# ---------------------------------------------------------------------------------------

class _ProbeViews(Dataset):
    """Probe images as the target sees them; a failed load yields ok=False, not a crash."""

    def __init__(self, probe: ProbeSet, target: Target, indices: Sequence[int]):
        self.probe, self.pre, self.indices = probe, target.preprocess, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            view, geom = self.pre.view(self.probe.load(i))
            return i, self.pre.to_tensor(view), geom, ""
        except Exception as e:  # noqa: BLE001 - any undecodable file is skipped, not fatal
            blank = torch.zeros(3, self.pre.crop, self.pre.crop)
            return i, blank, None, f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class Batch:
    """A batch of probe images: probe indices, tensor [B, 3, S, S], geometries, load errors."""

    indices: list[int]
    pixels: torch.Tensor
    geoms: list[ViewGeometry | None]
    errors: list[str]


def iter_batches(probe: ProbeSet, target: Target, indices: Sequence[int], batch_size: int,
                 workers: int = 0, desc: str | None = None) -> Iterator[Batch]:
    """Yield :class:`Batch` es of ``indices`` in order, loaded by ``workers`` processes."""
    loader = DataLoader(_ProbeViews(probe, target, indices), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate, shuffle=False)
    yield from tqdm(loader, desc=desc, unit="batch", disable=desc is None, leave=False)


def _collate(items) -> Batch:
    idx, px, geoms, errs = zip(*items)
    return Batch(list(idx), torch.stack(px), list(geoms), list(errs))


# ---------------------------------------------------------------------------------------
# Activations of a layer, on disk
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerActivations:
    """Summary activations of one layer: ``values`` float16 memmap [n_images, n_units].

    ``valid`` [n_images] is False for images that failed to load; they never rank.
    """

    layer: str
    values: np.ndarray
    valid: np.ndarray
    path: Path
    reused: bool

    @property
    def n_units(self) -> int:
        return int(self.values.shape[1])

    def top_images(self, units: Sequence[int], n: int, block: int = 8192
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` probe indices per unit, highest first: (indices, values) [len(units), n].

        Streams over row blocks keeping a running top-n, so memory is O(units x (n + block)).
        Ties are broken by the lower image index, so results are deterministic.
        """
        units = np.asarray(units, dtype=np.int64)
        n = min(n, int(self.valid.sum()))
        best_v = np.full((len(units), 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((len(units), 0), dtype=np.int64)
        for start in range(0, self.values.shape[0], block):
            vals = np.asarray(self.values[start:start + block][:, units], dtype=np.float32).T
            vals[:, ~self.valid[start:start + block]] = -np.inf
            idx = np.broadcast_to(np.arange(start, start + vals.shape[1]), vals.shape)
            cand_v = np.concatenate([best_v, vals], axis=1)
            cand_i = np.concatenate([best_i, idx], axis=1)
            # Sort by (-value, index) so equal values keep the lower index.
            order = np.lexsort((cand_i, -cand_v), axis=1)[:, :n]
            best_v = np.take_along_axis(cand_v, order, 1)
            best_i = np.take_along_axis(cand_i, order, 1)
        return best_i, best_v


def activation_key(target: Target, layer: str, probe: ProbeSet, summary: str) -> str:
    """Cache key: everything that changes the numbers."""
    return stable_hash({"target": target.identity, "layer": layer,
                        "probe": probe.fingerprint(), "summary": summary})


def compute_activations(target: Target, probe: ProbeSet, layers: Sequence[str],
                        cache_dir: str | Path,
                        *, summary: str = "mean", batch_size: int = 64, workers: int = 0,
                        progress: bool = True) -> dict[str, LayerActivations]:
    """Summary activations of all units of ``layers``, in one pass over ``probe``.

    Layers whose cache entry under ``cache_dir`` matches are loaded, not recomputed; the
    others are computed together in a single pass. Returns layer -> :class:`LayerActivations`.
    """
    if summary not in SUMMARIES:
        raise ValueError(f"unknown summary {summary!r}; choose one of {', '.join(SUMMARIES)}")
    cache_dir = Path(cache_dir)
    modules = {name: target.layer(name) for name in layers}  # unknown layers fail here
    keys = {name: activation_key(target, name, probe, summary) for name in layers}
    result = {name: _load(cache_dir / keys[name], name) for name in layers}
    todo = [name for name, acts in result.items() if acts is None]
    if not todo:
        return result
    # Processes may share a cache directory (`dnd tables` and `dnd evaluate` on
    # runs/eval-cache). values.f16 is written in place and creating it truncates it, so a
    # second writer would zero rows the first already wrote: one process computes an entry
    # while the others wait, then load it. Locks are taken in key order (no deadlock).
    with contextlib.ExitStack() as held:
        for key in sorted({keys[n] for n in todo}):
            lock = FileLock(cache_dir / f"{key}.lock").acquire(
                wait=True, on_wait=lambda _: log.info("waiting for another process to "
                                                      "finish the activations in %s", cache_dir))
            held.callback(lock.release)
        result.update({n: _load(cache_dir / keys[n], n) for n in todo})
        todo = [n for n in todo if result[n] is None]
        if todo:
            result.update(_compute(target, probe, {n: modules[n] for n in todo},
                                   {n: cache_dir / keys[n] for n in todo}, summary, batch_size,
                                   workers, progress))
    return result


def _load(directory: Path, layer: str) -> LayerActivations | None:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():  # meta.json is written last: its absence means unfinished
        return None
    meta = json.loads(meta_path.read_text())
    values = np.memmap(directory / "values.f16", dtype=np.float16, mode="r",
                       shape=tuple(meta["shape"]))
    valid = np.load(directory / "valid.npy")
    return LayerActivations(layer, values, valid, directory, reused=True)


def _compute(target: Target, probe: ProbeSet, modules: dict, dirs: dict[str, Path],
             summary: str, batch_size: int, workers: int, progress: bool
             ) -> dict[str, LayerActivations]:
    n = len(probe)
    valid = np.ones(n, dtype=bool)
    errors: list[str] = []
    mmaps: dict[str, np.memmap] = {}
    device = target.device
    desc = f"activations ({', '.join(modules)})" if progress else None
    with torch.no_grad(), capture(target.module, modules) as outs:
        for batch in iter_batches(probe, target, range(n), batch_size, workers, desc):
            target.module(batch.pixels.to(device))
            rows = slice(batch.indices[0], batch.indices[-1] + 1)
            for name in modules:
                s, _ = split_output(outs[name], summary, target.num_prefix_tokens)
                if name not in mmaps:
                    dirs[name].mkdir(parents=True, exist_ok=True)
                    mmaps[name] = np.memmap(dirs[name] / "values.f16", dtype=np.float16,
                                            mode="w+", shape=(n, s.shape[1]))
                mmaps[name][rows] = s.float().cpu().numpy().astype(np.float16)
            for i, err in zip(batch.indices, batch.errors):
                if err:
                    valid[i] = False
                    errors.append(f"{probe.ids[i]}: {err}")
    if errors:
        log.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(errors), probe.name,
                    "; ".join(errors[:3]))
    out = {}
    for name, mm in mmaps.items():
        mm.flush()
        np.save(dirs[name] / "valid.npy", valid)
        atomic_write_json(dirs[name] / "meta.json", {
            "layer": name, "shape": list(mm.shape), "summary": summary,
            "target": target.identity,  # model, weights and the normalisation used
            "probe": probe.name, "n_unreadable": len(errors), "unreadable": errors[:100]})
        # Reopened read-only: callers get the same memmap a later cache hit would give them.
        out[name] = dataclasses.replace(_load(dirs[name], name), reused=False)
    return out
