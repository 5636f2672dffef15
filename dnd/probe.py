"""Probing sets: the images whose activations describe a unit.

A probing set is an indexable list of images with stable string ids. Sets are built from a
spec string (see :func:`open_probe`):

- ``PATH``                  an image folder, recursive; class subfolders optional (this
                            covers ImageNet-val in either the flat or the per-synset layout)
- ``cifar10:PATH`` / ``cifar100:PATH``  torchvision's CIFAR layout (test split), or a
                            ``.npz`` with ``images`` [N, 32, 32, 3] uint8 (and ``labels``)
- ``PATH.npz``              the same npz layout, CIFAR-10 class names assumed if ``classes``
                            is absent
- ``SCHEME:ARG``            any scheme in ``PROBE_SCHEMES``: ``cifar10``, ``cifar100`` and
                            those plug-ins add (the toy world's ``toyworld:N``: N rendered
                            scenes, see :mod:`dnd.toyworld.probe`)

Several specs are concatenated in order. Files that are not images are skipped at listing
time; images that fail to decode are found during the activation pass. Both are counted and
reported once, never crash a run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dnd import plugins
from dnd.io import stable_hash
from dnd.registry import Registry

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class ProbeError(ValueError):
    """A probing set cannot be used (missing, empty, unknown spec)."""


@dataclass
class ProbeSet:
    """Base: ``len(p)``, ``p.load(i) -> PIL RGB image``, ``p.ids[i]``, ``p.fingerprint()``."""

    name: str
    ids: list[str] = field(default_factory=list)
    labels: list[int] | None = None
    class_names: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hash identifying this exact set (ids plus file sizes/mtimes where files exist)."""
        raise NotImplementedError


@dataclass
class FolderProbe(ProbeSet):
    """Images under a folder, found recursively and sorted by relative path."""

    root: Path = Path(".")
    paths: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, root: str | os.PathLike) -> FolderProbe:
        root = Path(root)
        if not root.is_dir():
            raise ProbeError(f"probing folder not found: {root}")
        paths, skipped = [], []
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
            else:
                skipped.append((str(p), "not an image file (extension)"))
        rel = [p.relative_to(root).as_posix() for p in paths]
        # Class subfolders are optional: labels only when every image sits in one.
        parents = [Path(r).parent.as_posix() for r in rel]
        labels = class_names = None
        if paths and all(par not in (".", "") for par in parents):
            class_names = sorted(set(parents))
            index = {c: i for i, c in enumerate(class_names)}
            labels = [index[par] for par in parents]
        return cls(name=str(root), ids=rel, labels=labels, class_names=class_names,
                   skipped=skipped, root=root, paths=paths)

    def load(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")

    def fingerprint(self) -> str:
        stats = [(r, p.stat().st_size, p.stat().st_mtime_ns) for r, p in zip(self.ids,
                                                                             self.paths)]
        return stable_hash({"kind": "folder", "root": str(self.root.resolve()), "files": stats})


@dataclass
class ArrayProbe(ProbeSet):
    """Images held in a uint8 array [N, H, W, 3] (CIFAR and similar)."""

    images: np.ndarray | None = None
    source: str = ""

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")

    def fingerprint(self) -> str:
        p = Path(self.source)
        stat = [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else []
        # Resolved, so a relative and an absolute path to the same file share a cache entry.
        source = str(p.resolve()) if p.exists() else str(self.source)
        return stable_hash({"kind": "array", "source": source, "n": len(self),
                            "shape": list(self.images.shape), "stat": stat})


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _open_npz(path: Path, name: str) -> ArrayProbe:
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z:
            raise ProbeError(f"{path}: npz probing sets need an 'images' array [N, H, W, 3]")
        images = z["images"]
        labels = z["labels"].tolist() if "labels" in z else None
        classes = [str(c) for c in z["classes"]] if "classes" in z else None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ProbeError(f"{path}: 'images' must be uint8 [N, H, W, 3], got "
                         f"{images.dtype} {images.shape}")
    if classes is None and name == "cifar10":
        classes = CIFAR10_CLASSES
    return ArrayProbe(name=name, ids=[f"{name}/{i}" for i in range(len(images))],
                      labels=labels, class_names=classes, images=images, source=str(path))


# Spec prefixes before the first ':' -> ``open(arg) -> ProbeSet`` for the text after it.
PROBE_SCHEMES = Registry("probe scheme")


def probe_scheme(name: str, usage: str) -> Callable[[Callable[[str], ProbeSet]],
                                                    Callable[[str], ProbeSet]]:
    """Decorator: ``open(arg) -> ProbeSet`` opens the spec ``name:arg``; ``usage`` (e.g.
    ``"toyworld:N"``) is how error messages show the form. Raise :class:`ProbeError` for
    a bad ``arg``."""

    def deco(fn: Callable[[str], ProbeSet]) -> Callable[[str], ProbeSet]:
        fn.usage = usage
        return PROBE_SCHEMES.register(name)(fn)

    return deco


def spec_forms() -> str:
    """The spec forms, for error messages: 'a folder of images, PATH.npz, cifar10:PATH, ...
    or toyworld:N' (every registered scheme)."""
    forms = ["a folder of images", "PATH.npz"] + [
        getattr(PROBE_SCHEMES.get(n), "usage", f"{n}:ARG") for n in PROBE_SCHEMES.names()]
    return ", ".join(forms[:-1]) + " or " + forms[-1]


@probe_scheme("cifar10", usage="cifar10:PATH")
def _open_cifar10(arg: str) -> ArrayProbe:
    return _open_cifar("cifar10", Path(arg))


@probe_scheme("cifar100", usage="cifar100:PATH")
def _open_cifar100(arg: str) -> ArrayProbe:
    return _open_cifar("cifar100", Path(arg))


def _open_cifar(kind: str, path: Path) -> ArrayProbe:
    if not path.exists():
        raise ProbeError(f"{kind} probing set not found: {path}")
    if path.suffix == ".npz":
        return _open_npz(path, kind)
    import torchvision

    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(str(path), train=False, download=False)
    except RuntimeError as e:
        raise ProbeError(f"{kind}: no torchvision CIFAR test split under {path} ({e})") from e
    return ArrayProbe(name=kind, ids=[f"{kind}/{i}" for i in range(len(ds.data))],
                      labels=list(ds.targets), class_names=list(ds.classes), images=ds.data,
                      source=str(path))


@dataclass
class ConcatProbe(ProbeSet):
    """Several probing sets, one after the other; ids are prefixed by the part index."""

    parts: list[ProbeSet] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, parts: Sequence[ProbeSet]) -> ConcatProbe:
        starts = list(np.cumsum([0] + [len(p) for p in parts])[:-1])
        ids = [f"{k}:{i}" for k, p in enumerate(parts) for i in p.ids]
        skipped = [s for p in parts for s in p.skipped]
        return cls(name="+".join(p.name for p in parts), ids=ids, skipped=skipped,
                   parts=list(parts), starts=[int(s) for s in starts])

    def load(self, i: int) -> Image.Image:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k].load(i - self.starts[k])

    def fingerprint(self) -> str:
        return stable_hash([p.fingerprint() for p in self.parts])


def open_probe(specs: str | Sequence[str]) -> ProbeSet:
    """Open one spec or concatenate several (see the module docstring for the forms).

    Raises :class:`ProbeError` naming the spec when it is missing or holds no image.
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ProbeError(f"no probing set given: pass --probe SPEC ({spec_forms()})")
    parts = [_open_one(s) for s in specs]
    for s, p in zip(specs, parts):
        if len(p) == 0:
            raise ProbeError(f"probing set {s!r} holds no image file "
                             f"({len(p.skipped)} other files skipped)")
    return parts[0] if len(parts) == 1 else ConcatProbe.of(parts)


def _open_one(spec: str) -> ProbeSet:
    # Only a registered scheme makes a prefix special: 'C:\\images' or 'runs/a:b' stay paths.
    scheme, sep, arg = spec.partition(":")
    if sep and scheme in PROBE_SCHEMES:
        return PROBE_SCHEMES.get(scheme)(arg)
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        return _open_npz(path, "cifar10" if "cifar10" in path.name else path.stem)
    if not path.exists():
        # A plug-in that failed to load may be the one that provides this scheme.
        note = plugins.failure_note() if sep and scheme.isidentifier() else ""
        raise ProbeError(f"probing set not found: {spec!r} (expected {spec_forms()})"
                         + note)
    return FolderProbe.open(path)
