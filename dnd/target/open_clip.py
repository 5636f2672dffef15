"""CLIP models as targets: open_clip image towers, and the whole CLIP behind a target name.

:func:`open_clip_target` wraps the image tower of ``open_clip:<model>/<pretrained>``
(``local-dir:FOLDER``, ``hf-hub:ORG/REPO`` too) with the preprocessing open_clip gives
those weights. Text feature visualization (:mod:`dnd.textvis`) needs the text tower as
well: :func:`load_clip_for_target` builds the whole model (:class:`ClipModel`) for an
``open_clip:`` name or for a name a plug-in registered in :data:`CLIP_MODELS` (the toy
world's ``toyworld-clip``, with the words its text tower was trained on and the
multimodal check its world can render).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dnd import preflight
from dnd.preflight import Need
from dnd.registry import Registry, unknown_name_message
from dnd.target.core import Preprocess, Target, no_empty_cache_folders

# ---------------------------------------------------------------------------------------
# open_clip image towers: open_clip:<model>/<pretrained>
# ---------------------------------------------------------------------------------------

OPEN_CLIP_PREFIX = "open_clip:"
# open_clip model names that name a config folder or hub repo instead of a built-in model.
_OPEN_CLIP_SCHEMAS = ("local-dir:", "hf-hub:")


def _open_clip_spec(spec: str) -> tuple[str, str | None]:
    """Split what follows ``open_clip:`` into (open_clip model name, pretrained tag).

    ``RN50x4/openai`` -> ("RN50x4", "openai"); ``local-dir:DIR`` and ``hf-hub:org/repo``
    carry their own config and weights -> (spec, None). Raises ValueError, naming the
    valid choices, for an unknown model, a missing tag or an unknown tag."""
    import open_clip

    if spec.startswith(_OPEN_CLIP_SCHEMAS):
        return spec, None
    arch, _, tag = spec.rpartition("/")
    if not arch:  # no "/": a model name without its tag
        arch, tag = spec, ""
    arch = arch.replace("/", "-")  # open_clip's own spelling of legacy "ViT-B/32"
    if arch not in open_clip.list_models():
        raise ValueError(unknown_name_message("open_clip model", arch, open_clip.list_models())
                         + " (`open_clip:<model>/<pretrained>`, e.g. open_clip:RN50x4/openai)")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not tag:
        if not tags:
            raise ValueError(f"open_clip model {arch!r} has no pretrained weights in open_clip, "
                             "so no preprocessing to take: wrap it with Target.from_module or "
                             "save it as a folder and use open_clip:local-dir:FOLDER")
        raise ValueError(f"open_clip target {OPEN_CLIP_PREFIX + spec!r} needs a pretrained tag "
                         f"(its weights and preprocessing): open_clip:{arch}/TAG with TAG one "
                         f"of: {', '.join(tags)}. With --weights none the weights are random "
                         "and the tag still gives the preprocessing.")
    if not open_clip.get_pretrained_cfg(arch, tag):
        raise ValueError(unknown_name_message("pretrained tag", tag, tags)
                         + f" (open_clip model {arch})")
    return arch, tag


def open_clip_target(spec: str, weights: str = "DEFAULT") -> Target:
    """The image tower of an open_clip model as a target named ``open_clip:<spec>``.

    ``spec``: ``<model>/<pretrained>`` (``RN50x4/openai``; ``open_clip.list_pretrained()``
    lists the pairs), ``local-dir:FOLDER`` or ``hf-hub:org/repo``. ``weights``: ``DEFAULT``
    (the tag's, the folder's or the repo's weights), ``none`` (random init) or a state-dict
    file (a whole CLIP checkpoint, loaded by open_clip, or the image tower's own
    ``state_dict()``). The preprocessing is always the one open_clip gives those weights.

    The module is ``model.visual`` (layers ``layer4``, ``attnpool``,
    ``transformer.resblocks.11``, ...); its output is the unnormalised image embedding
    [B, embed_dim], as ``model.encode_image`` returns it.
    """
    import open_clip

    arch, tag = _open_clip_spec(spec)
    kwargs: dict[str, Any] = {}
    if tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
        # open_clip 3 only warns when a tag's activation (OpenAI's weights: QuickGELU)
        # differs from the model config's; building with the tag's keeps activations right.
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        # The tag's preprocessing also for random or file weights (open_clip merges it
        # only when it downloads the tag's weights); non-preprocessing keys are dropped.
        kwargs["force_preprocess_cfg"] = tag_cfg
    name = OPEN_CLIP_PREFIX + spec
    if weights == "DEFAULT":
        try:
            with no_empty_cache_folders():
                model = open_clip.create_model(arch, pretrained=tag, **kwargs)
        except RuntimeError as err:  # open_clip's "Failed to download weights for tag ..."
            raise OSError(f"could not load the weights of {name} (provide them with "
                          f"--weights FILE, or use --weights none for random ones): {err}"
                          ) from err
        wid = _open_clip_default_weights_id(arch, tag)
    else:
        model = _unloaded_open_clip(arch, kwargs)
        if weights.lower() == "none":
            wid = "random"
        else:
            wid = _load_open_clip_weights(model, weights)
    return open_clip_image_target(model, name=name, weights_id=wid)


def _unloaded_open_clip(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """open_clip's ``arch`` with no weights loaded (the caller loads its own or keeps random
    ones)."""
    import open_clip

    # pretrained_text=False: a hub text tower's own weights would be downloaded otherwise.
    with _without_random_init_warning():
        return open_clip.create_model(arch, pretrained=None, load_weights=False,
                                      pretrained_text=False, **kwargs)


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Drop open_clip's root-logger warning "No pretrained weights loaded ... initialized
    randomly" while building a model whose weights the caller chose (random or a file
    loaded right after); its other messages pass."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def open_clip_image_target(model: nn.Module, *, name: str, weights_id: str) -> Target:
    """Wrap a built open_clip ``CLIP`` (from ``open_clip.create_model``, which sets
    ``model.visual.preprocess_cfg``) as a target: its image tower and own preprocessing."""
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", None)
    if cfg is None:
        raise ValueError(f"model {name!r}: model.visual has no preprocess_cfg; build it with "
                         "open_clip.create_model or set it with "
                         "open_clip.model.set_model_preprocess_cfg")
    trunk = getattr(visual, "trunk", None)  # a timm tower: timm counts its own prefix tokens
    prefix = (int(getattr(trunk, "num_prefix_tokens", 0)) if trunk is not None
              # open_clip's VisionTransformer puts one class token before the patches.
              else int(hasattr(visual, "class_embedding")))
    return Target(name=name, module=visual.eval(), preprocess=open_clip_preprocess(cfg, name),
                  weights_id=weights_id, num_prefix_tokens=prefix)


def open_clip_preprocess(cfg: dict, name: str = "open_clip model") -> Preprocess:
    """The :class:`Preprocess` equal to open_clip's inference transform for ``cfg`` (an
    open_clip ``preprocess_cfg``: size, mean, std, interpolation, resize_mode).

    ``shortest``: Resize(size) + CenterCrop(size); ``squash``: Resize((size, size)).
    ``longest`` (resize the longer side, pad the rest) and non-square sizes have no
    equivalent and raise."""
    size = cfg.get("size", 224)
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    if sizes[0] != sizes[1]:
        raise ValueError(f"{name}: input size {sizes} is not square; dnd targets take square "
                         "crops")
    mode = cfg.get("resize_mode") or "shortest"
    if mode not in ("shortest", "squash"):
        raise ValueError(f"{name}: open_clip resize_mode {mode!r} (resize the longer side and "
                         "pad) cannot be represented by dnd's Preprocess (shortest or squash)")
    interpolation = cfg.get("interpolation") or "bicubic"
    # open_clip's inference transform uses bicubic for 'random' (a training-only choice).
    interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"

    def rgb(v: Any) -> tuple[float, float, float]:
        return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3

    return Preprocess(resize=int(sizes[0]), crop=int(sizes[0]), mean=rgb(cfg["mean"]),
                      std=rgb(cfg["std"]), interpolation=interpolation, resize_mode=mode)


def _open_clip_default_weights_id(arch: str, tag: str | None) -> str:
    """``open_clip:<model>.<tag>``; for a ``local-dir:`` folder a hash of its weights files
    (they can change in place); for an ``hf-hub:`` repo its id."""
    if tag is not None:
        return f"open_clip:{arch}.{tag}"
    if arch.startswith("local-dir:"):
        from dnd.io import bytes_hash

        folder = Path(arch.split(":", 1)[1])
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin",
                                                                   ".pth"))
        if not files:
            raise FileNotFoundError(f"no weights file (.safetensors, .bin, .pth) in {folder}; "
                                    "use --weights none for random weights")
        return "local-dir:" + bytes_hash(b"".join(p.read_bytes() for p in files))
    return arch


def _load_open_clip_weights(model: nn.Module, path: str) -> str:
    """Load a weights file into an open_clip model; returns its id (``file:<hash>``).

    A whole CLIP checkpoint (keys ``visual.*``) goes through open_clip's loader, which also
    converts OpenAI's and other layouts; otherwise the file must be the image tower's own
    state dict (``Target.module.state_dict()``), loaded strictly."""
    from open_clip import load_checkpoint
    from open_clip.factory import load_state_dict

    from dnd.io import bytes_hash

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    state = load_state_dict(str(p))
    if any(k.startswith("visual.") for k in state):
        load_checkpoint(model, str(p))
    else:
        model.visual.load_state_dict(state)
    return f"file:{bytes_hash(p.read_bytes())}"


def open_clip_needs(role: str, spec: str, weights: str) -> list[Need]:
    """What :func:`open_clip_target` loads: the tag's hub file or URL (``DEFAULT``), a
    ``local-dir:`` folder or ``hf-hub:`` repo's config (always) and weights (``DEFAULT``),
    and a weights file. A bad name needs nothing here: loading reports it."""
    try:
        arch, tag = _open_clip_spec(spec)
    except ValueError:
        return []
    option = "--weights FILE, or open_clip:local-dir:FOLDER"
    file_need = ([] if weights == "DEFAULT" or weights.lower() == "none"
                 else [preflight.local_path(role, weights)])
    if tag is None and arch.startswith("hf-hub:") and weights != "DEFAULT":
        # The repo's config is read even for random or file weights.
        repo = arch.split(":", 1)[1]
        return [preflight.Need(role, "hf", repo, files=("open_clip_config.json",),
                               option=option), *file_need]
    if tag is None or weights == "DEFAULT":
        # open_clip_needs: the folder, the repo, or the tag's file (hub preferred, else URL).
        return preflight.open_clip_needs(role, arch, tag, option) + file_need
    return file_need


# ---------------------------------------------------------------------------------------
# The whole CLIP behind a target name (text feature visualization)
# ---------------------------------------------------------------------------------------

@dataclass
class ClipModel:
    """A whole open_clip model: ``model`` (eval mode), its ``tokenizer`` (open_clip's,
    called on a list of strings) and ``target``: its image tower as the :class:`Target`
    that ``load_target`` gives for the same name and weights (the same identity, so cached
    activations are shared).

    A plug-in's model may add ``words``: the words its text tower was trained on (a small
    tokenizer also holds merge pieces and plurals whose embeddings were never trained; text
    search keeps to these; None: every word token), and ``multimodal``: the multimodal
    check its world can render, ``multimodal(target, layer, units, labels, summary=...,
    seed=...) -> {unit: result as JSON}`` (``labels``: unit -> its Label 1)."""

    model: nn.Module
    tokenizer: Any
    target: Target
    words: frozenset[str] | None = None
    multimodal: Callable[..., dict[int, dict]] | None = None


# Plug-ins' whole CLIP models by target name: name -> factory(weights) -> ClipModel.
CLIP_MODELS = Registry("CLIP model")


def clip_target_needed() -> str:
    """The error's first part for a target that is not a CLIP, naming those that are."""
    names = [*CLIP_MODELS.names(), "open_clip:<model>/<pretrained>"]
    return (f"text feature visualization needs a CLIP target: {' or '.join(names)} (also "
            "open_clip:local-dir:FOLDER, open_clip:hf-hub:ORG/REPO)")


def is_clip_target(name: str) -> bool:
    return name.startswith(OPEN_CLIP_PREFIX) or name in CLIP_MODELS


def load_clip_for_target(name: str, weights: str = "DEFAULT") -> ClipModel:
    """The whole CLIP model (image and text towers) and tokenizer behind target ``name``:
    one a plug-in registered in :data:`CLIP_MODELS`, or ``open_clip:<model>/<tag>``,
    ``open_clip:local-dir:DIR``, ``open_clip:hf-hub:ORG/REPO`` (:func:`whole_open_clip`).
    Any other name raises ValueError."""
    if name.startswith(OPEN_CLIP_PREFIX):
        spec = name[len(OPEN_CLIP_PREFIX):]
        return whole_open_clip(spec, weights, name=OPEN_CLIP_PREFIX + spec)
    if name in CLIP_MODELS:
        return CLIP_MODELS.create(name, weights=weights)
    raise ValueError(f"{clip_target_needed()}; got model {name!r}")


def whole_open_clip(spec: str, weights: str = "DEFAULT", *, name: str,
                    weights_id: str | None = None) -> ClipModel:
    """The whole open_clip model of ``spec`` (what follows ``open_clip:``), built with
    open_clip's ``create_model`` and ``get_tokenizer``, with the weights rules of
    :func:`open_clip_target` (``DEFAULT``, ``none``: random, or a whole-CLIP checkpoint
    file; an image-tower-only state dict has no text tower and is refused). ``name``: the
    target's name; ``weights_id``: the id of the ``DEFAULT`` weights, when a plug-in names
    its committed ones itself (as its image-tower target does)."""
    import open_clip

    arch, tag = _open_clip_spec(spec)
    kwargs: dict[str, Any] = {}
    if tag is not None:  # the same activation and preprocessing as open_clip_target
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        kwargs["force_preprocess_cfg"] = tag_cfg
    if weights == "DEFAULT":
        try:
            with no_empty_cache_folders():
                model = open_clip.create_model(arch, pretrained=tag, **kwargs)
        except RuntimeError as err:
            raise OSError(f"could not load the weights of {name} (provide a whole CLIP "
                          f"checkpoint with --weights FILE): {err}") from err
        wid = weights_id or _open_clip_default_weights_id(arch, tag)
    else:
        model = _unloaded_open_clip(arch, kwargs)
        if weights.lower() == "none":
            wid = "random"
        else:
            from open_clip.factory import load_state_dict

            if not any(k.startswith("visual.") for k in load_state_dict(str(weights))):
                raise ValueError(f"{weights} holds only an image tower (no 'visual.*' keys): "
                                 "text feature visualization needs the text tower too; pass a "
                                 "whole CLIP checkpoint")
            wid = _load_open_clip_weights(model, weights)
    tokenizer = open_clip.get_tokenizer(arch)
    vocab = token_strings(tokenizer)
    if getattr(model, "vocab_size", None) and len(vocab) > model.vocab_size:
        raise ValueError(f"the tokenizer open_clip gives {name!r} has {len(vocab)} tokens, "
                         f"the model's text tower {model.vocab_size}; save the model's "
                         "tokenizer files beside its weights (open_clip local-dir folder)")
    target = open_clip_image_target(model, name=name, weights_id=wid)
    return ClipModel(model.eval(), tokenizer, target)


def token_strings(tokenizer) -> dict[str, int]:
    """Token string -> id of an open_clip tokenizer (``SimpleTokenizer`` or ``HFTokenizer``)."""
    if hasattr(tokenizer, "encoder"):
        return dict(tokenizer.encoder)
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "get_vocab"):
        return dict(inner.get_vocab())
    raise ValueError(f"cannot read the vocabulary of tokenizer {type(tokenizer).__name__}: "
                     "text feature visualization supports open_clip's SimpleTokenizer and "
                     "HFTokenizer")
