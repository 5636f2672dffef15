"""Dictionary files: dnd's own, and the layouts of other tools.

:func:`save_dictionary` writes dnd's own safetensors file (kind and settings in its
metadata); :func:`load_dictionary` reads it back, or a SAELens folder, a
dictionary_learning ``ae.pt``, a safetensors file with ``W_enc``/``b_enc``, or a matrix of
directions (:data:`KNOWN_LAYOUTS`). Settings a layout has and dnd cannot reproduce are
refused by name (:class:`dnd.dictionary.kinds.DictionaryError`), never ignored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from dnd.dictionary.kinds import (
    INPUT_NORMS,
    Dictionary,
    DictionaryError,
    Directions,
    NMFDictionary,
    SparseAutoencoder,
)

log = logging.getLogger(__name__)

FORMAT = "dnd-dictionary"  # safetensors metadata "format" of files save_dictionary writes

KNOWN_LAYOUTS = (
    "a file written by dnd.dictionary.files.save_dictionary (safetensors, metadata format="
    f"{FORMAT!r})",
    "a SAELens folder: cfg.json + sae_weights.safetensors (architecture standard, topk or "
    "jumprelu)",
    "a dictionary_learning (saprmarks) ae.pt, config.json beside it: AutoEncoder, "
    "AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, "
    "MatryoshkaBatchTopKSAE",
    "a safetensors file with W_enc [d_in, d_sae] and b_enc [d_sae] (optional b_dec "
    "[d_in], subtracted from the input; threshold [d_sae] for JumpReLU; k for TopK; W_dec "
    "[d_sae, d_in])",
    "a file holding one [F, C] matrix of directions (.safetensors, .pt, .npy; a "
    "safetensors or .pt dict may name it 'directions' and add 'bias' [F])",
)



def save_dictionary(dictionary: Dictionary, path: str | Path) -> Path:
    """Write ``dictionary`` as safetensors with its kind and settings in the metadata;
    :func:`load_dictionary` reads it back to the same features."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in dictionary.state_dict().items()}
    meta = {"format": FORMAT, "kind": dictionary.kind, "config": json.dumps(dictionary.config()),
            "source": dictionary.source}
    if isinstance(dictionary, SparseAutoencoder) and dictionary.info:
        meta["info"] = json.dumps(dictionary.info)
    save_file(tensors, str(p), metadata=meta)
    return p


def load_dictionary(spec: str | Path) -> Dictionary:
    """A dictionary from a file or folder, its layout told from the files
    (:data:`KNOWN_LAYOUTS`). Unsupported settings raise instead of being ignored."""
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"dictionary not found: {p}")
    if p.is_dir():
        if (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file():
            return _load_saelens(p)
        if (p / "ae.pt").is_file():
            return _load_dictionary_learning(p / "ae.pt")
        names = sorted(x.name for x in p.iterdir())[:10]
        raise DictionaryError(_unknown_layout(p, f"folder holds {names}"))
    if p.name == "sae_weights.safetensors" and (p.parent / "cfg.json").is_file():
        return _load_saelens(p.parent)
    if p.suffix == ".npy":
        return load_directions(p)
    if p.suffix == ".safetensors":
        meta = _safetensors_metadata(p)
        if meta.get("format") == FORMAT:
            return _load_dnd(p, meta)
        tensors = _read_tensors(p)
        if "W_enc" in tensors:
            return _load_generic(p, tensors)
        return _directions_or_fail(p, tensors)
    if p.suffix in (".pt", ".pth", ".bin"):
        tensors = _read_tensors(p)
        if isinstance(tensors, torch.Tensor):
            return Directions(tensors, source=str(p))
        if "encoder.weight" in tensors or "W_enc" in tensors:
            return _load_dictionary_learning(p, tensors)
        return _directions_or_fail(p, tensors)
    raise DictionaryError(_unknown_layout(p, f"unknown file type {p.suffix!r}"))


def _unknown_layout(p: Path, why: str) -> str:
    return (f"cannot tell the dictionary layout of {p} ({why}). Known layouts: "
            + "; ".join(f"({i}) {s}" for i, s in enumerate(KNOWN_LAYOUTS, 1))
            + ". overcomplete (KempnerInstitute) SAEs are saved as whole pickled modules "
            "(torch.save(model)) with arbitrary encoders and no documented weights layout; "
            "dnd does not unpickle them (that runs code): write their encoder as W_enc/b_enc "
            "into a safetensors file")


def _directions_or_fail(p: Path, tensors: dict[str, torch.Tensor]) -> Directions:
    if len(tensors) == 1 or ("directions" in tensors and set(tensors) <= {"directions", "bias"}):
        return load_directions(p)
    raise DictionaryError(_unknown_layout(p, f"tensors {sorted(tensors)[:12]}"))


def load_directions(path: str | Path) -> Directions:
    """One [F, C] matrix of directions from ``.safetensors``, ``.pt``/``.pth`` (tensors only)
    or ``.npy``; a dict with several tensors must name it ``directions`` (``bias`` [F]
    optional)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"directions file not found: {p}")
    if p.suffix == ".npy":
        return Directions(np.load(p, allow_pickle=False), source=str(p))
    tensors = _read_tensors(p)
    if isinstance(tensors, torch.Tensor):
        return Directions(tensors, source=str(p))
    if len(tensors) == 1:
        return Directions(next(iter(tensors.values())), source=str(p))
    if "directions" in tensors and set(tensors) <= {"directions", "bias"}:
        return Directions(tensors["directions"], tensors.get("bias"), source=str(p))
    raise DictionaryError(f"{p} holds tensors {sorted(tensors)}: a directions file holds "
                          "one [F, C] matrix, or 'directions' (+ 'bias')")


def _read_tensors(p: Path) -> dict[str, torch.Tensor] | torch.Tensor:
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    try:
        # weights_only: a checkpoint from the internet must not run code when loaded.
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal gets the same advice
        raise DictionaryError(_unknown_layout(p, f"not a tensors-only torch file: "
                                                 f"{type(err).__name__}")) from err
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise DictionaryError(_unknown_layout(p, f"holds a {type(obj).__name__}, not tensors"))


def _safetensors_metadata(p: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        return dict(f.metadata() or {})


def _load_dnd(p: Path, meta: dict[str, str]) -> Dictionary:
    tensors = _read_tensors(p)
    config = json.loads(meta.get("config", "{}"))
    kind = meta.get("kind")
    source = str(p)
    if kind == "directions":
        return Directions(tensors["weight"], tensors.get("bias"), source=source)
    if kind == "nmf":
        return NMFDictionary(tensors["components"], n_iter=config["n_iter"], source=source)
    if kind == "sae":
        return SparseAutoencoder(
            tensors["W_enc"], tensors["b_enc"], b_pre=tensors.get("b_pre"),
            activation=config["activation"], k=config["k"], threshold=tensors.get("threshold"),
            W_dec=tensors.get("W_dec"), b_dec=tensors.get("b_dec"),
            input_norm=config["input_norm"], source=source,
            info=json.loads(meta["info"]) if "info" in meta else None)
    raise DictionaryError(f"{p}: dnd dictionary kind {kind!r} is unknown to this version "
                          "(directions, nmf, sae)")


def _unexpected(p: Path, tensors: dict, known: set[str], layout: str) -> None:
    extra = sorted(set(tensors) - known)
    if extra:
        raise DictionaryError(f"{p} ({layout}) holds tensors dnd does not know how to apply: "
                              f"{extra}; refusing rather than ignoring them")


def _load_generic(p: Path, t: dict[str, torch.Tensor]) -> SparseAutoencoder:
    """W_enc [d_in, d_sae], b_enc [d_sae], optional b_dec (subtracted from the input, as in
    SAELens), threshold (JumpReLU), k (TopK), W_dec."""
    _unexpected(p, t, {"W_enc", "b_enc", "b_dec", "threshold", "k", "W_dec"}, "generic SAE")
    if "b_enc" not in t:
        raise DictionaryError(f"{p}: a generic SAE file needs b_enc [d_sae] beside W_enc")
    w_enc, f = t["W_enc"], t["b_enc"].numel()
    if w_enc.dim() != 2 or w_enc.shape[1] != f:
        raise DictionaryError(f"{p}: W_enc must be [d_in, d_sae] with d_sae = len(b_enc) = "
                              f"{f}, got {tuple(w_enc.shape)} (transpose an [d_sae, d_in] "
                              "encoder weight)")
    if "threshold" in t and "k" in t:
        raise DictionaryError(f"{p}: holds both threshold (JumpReLU) and k (TopK); keep one")
    activation = "jumprelu" if "threshold" in t else "topk" if "k" in t else "relu"
    return SparseAutoencoder(w_enc, t["b_enc"], b_pre=t.get("b_dec"), activation=activation,
                             k=int(t["k"].item()) if "k" in t else None,
                             threshold=t.get("threshold"), W_dec=t.get("W_dec"),
                             b_dec=t.get("b_dec"), source=str(p))


def _load_saelens(folder: Path) -> SparseAutoencoder:
    """SAELens (5.x and 6.x) ``save_model`` folders: cfg.json + sae_weights.safetensors."""
    cfg = json.loads((folder / "cfg.json").read_text())
    t = _read_tensors(folder / "sae_weights.safetensors")
    where = f"SAELens SAE {folder}"
    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu")) or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch == "standard" and act_fn == "topk":  # SAELens < 6 kept TopK under "standard"
        arch = "topk"
    if arch not in ("standard", "topk", "jumprelu"):
        raise DictionaryError(f"{where}: architecture {arch!r} is not supported (standard, "
                              "topk, jumprelu)")
    if arch == "standard" and act_fn != "relu":
        raise DictionaryError(f"{where}: activation_fn {act_fn!r} is not supported (relu)")
    norm = cfg.get("normalize_activations", "none")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)
    if norm not in INPUT_NORMS:
        raise DictionaryError(
            f"{where}: normalize_activations={norm!r} scales inputs by a dataset constant that "
            "is not in its files; fold it into the weights first (SAELens: "
            "sae.fold_activation_norm_scaling_factor(factor), then save_model) or use an SAE "
            f"with normalize_activations in {INPUT_NORMS}")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise DictionaryError(f"{where}: reshape_activations={cfg['reshape_activations']!r} "
                              "(attention hook_z) is not supported")
    head = cfg.get("hook_head_index", cfg.get("hook_point_head_index"))
    if head is not None:
        raise DictionaryError(f"{where}: hook_head_index={head} reads one attention head; "
                              "not supported")
    for key in ("W_enc", "b_enc"):
        if key not in t:
            raise DictionaryError(f"{where}: sae_weights.safetensors has no {key}")
    _unexpected(folder / "sae_weights.safetensors", t,
                {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold",
                 "scaling_factor", "finetuning_scaling_factor"}, "SAELens")
    w_enc, b_enc = t["W_enc"].float(), t["b_enc"].float()
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if (d_in, d_sae) != (None, None) and tuple(w_enc.shape) != (d_in, d_sae):
        raise DictionaryError(f"{where}: W_enc is {tuple(w_enc.shape)} but cfg.json says "
                              f"[d_in, d_sae] = [{d_in}, {d_sae}]")
    w_dec = t["W_dec"].float() if "W_dec" in t else None
    b_dec = t["b_dec"].float() if "b_dec" in t else None
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    if apply_b_dec and b_dec is None:
        raise DictionaryError(f"{where}: apply_b_dec_to_input is true but there is no b_dec")
    # A finetuning scaling factor multiplies the latents before the decoder only: fold it
    # into W_dec (the latents themselves do not change).
    scaling = t.get("finetuning_scaling_factor", t.get("scaling_factor"))
    if scaling is not None and w_dec is not None:
        w_dec = w_dec * scaling.float().reshape(-1, 1)
    k = threshold = None
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    if arch == "topk":
        k = cfg.get("k", kwargs.get("k"))
        if k is None:
            raise DictionaryError(f"{where}: a topk SAE needs k in cfg.json")
        if cfg.get("rescale_acts_by_decoder_norm", False):
            # SAELens multiplies the pre-activations by |W_dec_f| before TopK and divides
            # the latents by it before decoding: fold both into the weights.
            if w_dec is None:
                raise DictionaryError(f"{where}: rescale_acts_by_decoder_norm needs W_dec")
            norms = w_dec.norm(dim=1)
            w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
    if arch == "jumprelu":
        if "threshold" in t:
            threshold = t["threshold"].float()
        elif "log_threshold" in t:
            threshold = t["log_threshold"].float().exp()
        else:
            raise DictionaryError(f"{where}: a jumprelu SAE needs threshold (or log_threshold)")
    return SparseAutoencoder(w_enc, b_enc, b_pre=b_dec if apply_b_dec else None,
                             activation=activation, k=k, threshold=threshold, W_dec=w_dec,
                             b_dec=b_dec, input_norm=norm, source=str(folder))


# dictionary_learning's classes by the tensor names in their state dicts.
_DL_STANDARD = {"encoder.weight", "encoder.bias", "decoder.weight", "bias"}
_DL_NEW = {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}
_DL_TOPK = {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}
_DL_JUMP = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
_DL_MATRYOSHKA = {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"}
_DL_GATED = {"encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias",
             "mag_bias"}


def _load_dictionary_learning(p: Path, tensors: dict | None = None) -> SparseAutoencoder:
    """saprmarks/dictionary_learning ``ae.pt`` state dicts; ``config.json`` beside it
    (``trainer.dict_class``) tells AutoEncoderTopK from BatchTopKSAE, which share tensors."""
    t = tensors if tensors is not None else _read_tensors(p)
    if isinstance(t, torch.Tensor):
        raise DictionaryError(_unknown_layout(p, "one tensor, not a state dict"))
    keys = set(t)
    where = f"dictionary_learning SAE {p}"
    cfg_path = p.parent / "config.json"
    dict_class = None
    if cfg_path.is_file():
        dict_class = (json.loads(cfg_path.read_text()).get("trainer") or {}).get("dict_class")
    src = str(p)
    if keys == _DL_STANDARD:  # AutoEncoder: relu(encoder(x - bias))
        return SparseAutoencoder(t["encoder.weight"].T, t["encoder.bias"], b_pre=t["bias"],
                                 W_dec=t["decoder.weight"].T, b_dec=t["bias"], source=src)
    if keys == _DL_NEW:  # AutoEncoderNew: relu(encoder(x)), decoder with its own bias
        return SparseAutoencoder(t["encoder.weight"].T, t["encoder.bias"],
                                 W_dec=t["decoder.weight"].T, b_dec=t["decoder.bias"],
                                 source=src)
    if keys == _DL_TOPK:
        common = dict(b_pre=t["b_dec"], W_dec=t["decoder.weight"].T, b_dec=t["b_dec"],
                      source=src)
        if dict_class == "AutoEncoderTopK":  # per-position top-k of relu(encoder(x - b_dec))
            return SparseAutoencoder(t["encoder.weight"].T, t["encoder.bias"],
                                     activation="topk", k=int(t["k"].item()), **common)
        if dict_class == "BatchTopKSAE":  # inference: relu(...) kept above one threshold
            return SparseAutoencoder(t["encoder.weight"].T, t["encoder.bias"],
                                     activation="jumprelu", threshold=t["threshold"], **common)
        raise DictionaryError(
            f"{where}: AutoEncoderTopK and BatchTopKSAE save the same tensors but encode "
            "differently (per-position top-k vs one threshold); put the trainer's config.json "
            f"(trainer.dict_class) beside the file (found dict_class={dict_class!r})")
    if keys == _DL_JUMP:  # JumpReluAutoEncoder: b_dec not subtracted (its default)
        return SparseAutoencoder(t["W_enc"], t["b_enc"], activation="jumprelu",
                                 threshold=t["threshold"], W_dec=t["W_dec"], b_dec=t["b_dec"],
                                 source=src)
    if keys == _DL_MATRYOSHKA:  # inference: relu((x - b_dec) @ W_enc + b_enc) > threshold
        return SparseAutoencoder(t["W_enc"], t["b_enc"], b_pre=t["b_dec"],
                                 activation="jumprelu", threshold=t["threshold"],
                                 W_dec=t["W_dec"], b_dec=t["b_dec"], source=src)
    if keys == _DL_GATED:
        raise DictionaryError(f"{where}: GatedAutoEncoder is not supported")
    raise DictionaryError(_unknown_layout(p, f"state dict tensors {sorted(keys)[:12]}"))


