"""Dictionary features as units: a layer's activations read in another basis.

A *dictionary* is an ``nn.Module`` that maps a layer's output to F feature activations in
the same layout, with F features in place of the C channels, applied at every position:

- conv ``[B, C, h, w] -> [B, F, h, w]`` (one channel vector per spatial position);
- linear ``[B, C] -> [B, F]``;
- transformer tokens ``[B, T, C] -> [B, T, F]`` (every token, prefix tokens included).

:func:`attach` hangs a dictionary under its layer as ``f"{layer}.{name}"`` (e.g.
``layer4.sae``) with a forward hook on the layer that feeds it the layer's output and leaves
that output unchanged. ``Target.layer("layer4.sae")`` then finds it, and every stage that
captures a layer's output by name (activation pass, attention crops, re-scoring generated
images, feature visualization) reads the features as units without a change. Gradients
flow through every dictionary, so feature visualization can maximise a feature.

Kinds (each a small class):

- :class:`Directions`: ``f = <h, w_f> (+ b_f)``, any set of directions (probes, concept
  vectors, a file holding one [F, C] matrix);
- :class:`NMFDictionary`: non-negative components fitted with scikit-learn's NMF; a
  feature is the non-negative least-squares code of a position (Building Blocks' "neuron
  groups");
- :class:`SparseAutoencoder`: SAE latents ``z = act(W_enc^T (h - b_pre) + b_enc)`` with
  ReLU, TopK or JumpReLU; trained here (:func:`train_sae`) or loaded from SAELens,
  dictionary_learning or plain safetensors files (:func:`load_dictionary`).

Fitting: :func:`sample_positions` collects a seeded random subset of a layer's channel
vectors over a probing set; :func:`fit_dictionary` fits NMF or trains an SAE on them;
:func:`save_dictionary` writes dnd's own file, which :func:`load_dictionary` reads back.
:meth:`Dictionary.fingerprint` names a dictionary's exact numbers for cache keys (the
layer name ``layer4.sae`` alone does not tell two dictionaries apart).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dnd.io import bytes_hash, stable_hash
from dnd.probe import ProbeSet
from dnd.target import Target, capture

log = logging.getLogger(__name__)

FORMAT = "dnd-dictionary"  # safetensors metadata "format" of files save_dictionary writes
KINDS = ("nmf", "sae")  # what fit_dictionary fits
ACTIVATIONS = ("relu", "topk", "jumprelu")
INPUT_NORMS = ("none", "layer_norm", "constant_norm_rescale")

KNOWN_LAYOUTS = (
    "a file written by dnd.dictionary.save_dictionary (safetensors, metadata format="
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


class DictionaryError(ValueError):
    """A dictionary file or setting dnd cannot use as it is."""


# ---------------------------------------------------------------------------------------
# Base class: layouts, checks, identity
# ---------------------------------------------------------------------------------------

class Dictionary(nn.Module):
    """Base: ``encode`` maps channel vectors [N, C] to feature activations [N, F];
    ``forward`` applies it to a layer output in any of the three layouts (module
    docstring). Weights are buffers, not parameters: nothing in dnd trains them through
    the target, and feature visualization's optimiser only sees the image.

    ``source`` says where the numbers came from (a file, ``train_sae(...)``), for errors.
    """

    kind: ClassVar[str] = ""

    def __init__(self, in_features: int, n_features: int, source: str = ""):
        super().__init__()
        self.in_features = int(in_features)
        self.n_features = int(n_features)
        self.source = source or "memory"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [N, F] of channel vectors ``x`` [N, C]."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The settings (beside the tensors) that the numbers depend on; JSON-able."""
        return {}

    def describe(self) -> str:
        return f"{self.kind} dictionary ({self.n_features} features of {self.in_features} " \
               f"channels) from {self.source}"

    def check_input(self, h: torch.Tensor, where: str = "the layer") -> None:
        """Raise a clear error unless ``h`` (the output of ``where``) is a layer output
        this dictionary reads."""
        if h.dim() not in (2, 3, 4):
            raise DictionaryError(f"{self.describe()}: {where} gives output shape "
                                  f"{tuple(h.shape)}; dictionaries read [B, C, h, w], [B, C] "
                                  "or [B, T, C]")
        c = h.shape[1] if h.dim() == 4 else h.shape[-1]
        if c != self.in_features:
            raise DictionaryError(
                f"{self.describe()} reads {self.in_features} channels per position, but "
                f"{where} gives {c} (output shape {tuple(h.shape)}); "
                f"{self._shape_hint(c)}")

    def _shape_hint(self, channels: int) -> str:
        return f"this layer needs a dictionary over {channels} channels"

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """A continuous stand-in [N, F] for :meth:`encode` of ``x`` [N, C] that still has a
        gradient where a feature is 0 and rises as it would switch on (an SAE's
        pre-activations); feature visualization follows it while a feature is off. Default:
        the features themselves."""
        return self.encode(x)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, F, h, w]; [B, C] -> [B, F]; [B, T, C] -> [B, T, F]."""
        return self.per_position(self.encode, h)

    def per_position(self, fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor
                     ) -> torch.Tensor:
        """``fn`` ([N, C] -> [N, F], e.g. :meth:`encode`) applied at every position of a
        layer output ``h``, laid out as :meth:`forward` lays out the features."""
        self.check_input(h)
        if h.dim() == 4:
            b, c, hh, ww = h.shape
            z = fn(h.permute(0, 2, 3, 1).reshape(-1, c))
            return z.reshape(b, hh, ww, -1).permute(0, 3, 1, 2).contiguous()
        if h.dim() == 2:
            return fn(h)
        b, t, c = h.shape
        return fn(h.reshape(-1, c)).reshape(b, t, -1)

    def fingerprint(self) -> str:
        """Hash of the kind, settings and every tensor's bytes: two dictionaries with the
        same fingerprint give the same features (use it in activation cache keys)."""
        tensors = {k: bytes_hash(_tensor_bytes(v)) for k, v in sorted(self.state_dict().items())}
        return stable_hash({"kind": self.kind, "config": self.config(), "tensors": tensors})

    @property
    def _device(self) -> torch.device:
        return next(self.buffers()).device


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    return head + t.reshape(-1).view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------------------------------
# Directions
# ---------------------------------------------------------------------------------------

class Directions(Dictionary):
    """Feature f at a position = ``<h, w_f> (+ b_f)``: ``weight`` [F, C], ``bias`` [F].

    Units are those of the layer's activations times the directions' length (unit-length
    directions give the activation's component along each).
    """

    kind = "directions"

    def __init__(self, weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray |
                 None = None, source: str = ""):
        weight = torch.as_tensor(weight, dtype=torch.float32)
        if weight.dim() != 2:
            raise DictionaryError(f"directions from {source or 'memory'} must be one [F, C] "
                                  f"matrix, got shape {tuple(weight.shape)}")
        super().__init__(weight.shape[1], weight.shape[0], source)
        self.register_buffer("weight", weight.clone())
        if bias is not None:
            bias = torch.as_tensor(bias, dtype=torch.float32).reshape(-1)
            if bias.shape[0] != weight.shape[0]:
                raise DictionaryError(f"directions from {self.source}: bias has "
                                      f"{bias.shape[0]} values for {weight.shape[0]} "
                                      "directions")
            self.register_buffer("bias", bias.clone())
        else:
            self.bias = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def _shape_hint(self, channels: int) -> str:
        return (f"{self.source} holds a [{self.n_features}, {self.in_features}] matrix; this "
                f"layer needs [F, {channels}]")

    @classmethod
    def from_file(cls, path: str | Path) -> Directions:
        """One [F, C] matrix from ``.safetensors``, ``.pt``/``.pth`` (tensors only) or
        ``.npy``; a dict with several tensors must name it ``directions`` (``bias`` [F]
        optional)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"directions file not found: {p}")
        if p.suffix == ".npy":
            return cls(np.load(p, allow_pickle=False), source=str(p))
        tensors = _read_tensors(p)
        if isinstance(tensors, torch.Tensor):
            return cls(tensors, source=str(p))
        if len(tensors) == 1:
            return cls(next(iter(tensors.values())), source=str(p))
        if "directions" in tensors and set(tensors) <= {"directions", "bias"}:
            return cls(tensors["directions"], tensors.get("bias"), source=str(p))
        raise DictionaryError(f"{p} holds tensors {sorted(tensors)}: a directions file holds "
                              "one [F, C] matrix, or 'directions' (+ 'bias')")


# ---------------------------------------------------------------------------------------
# NMF
# ---------------------------------------------------------------------------------------

class NMFDictionary(Dictionary):
    """Non-negative matrix factorisation of a layer's activations: ``components`` [F, C]
    >= 0; feature f at a position is the f-th non-negative least-squares code
    ``argmin_{w >= 0} ||h - w @ components||^2`` (sklearn's ``NMF.transform``).

    Why NMF: Olah et al., "The Building Blocks of Interpretability" (2018), group a layer's
    channels into a few "neuron groups" with NMF of its activations, so each group is a
    non-negative mix of channels that tends to fire together, and show the groups instead of
    thousands of channels. Activations must be non-negative (a post-ReLU layer). Units: the
    layer's activation units divided by the component's scale (NMF's own scaling).

    Codes are computed in torch: accelerated projected gradient (FISTA, ``n_iter``
    iterations from the clamped least-squares solution, so deterministic), then the exact
    least-squares solve on the support found, kept where it satisfies the optimality
    conditions. They are unique when the components are linearly independent (F <= C);
    otherwise any optimum is valid and may differ from sklearn's. The gradient is the exact
    one of the optimum (implicit differentiation on its support).
    """

    kind = "nmf"

    def __init__(self, components: torch.Tensor | np.ndarray, n_iter: int = 200,
                 source: str = ""):
        comp = torch.as_tensor(components, dtype=torch.float32)
        if comp.dim() != 2:
            raise DictionaryError(f"NMF components must be [F, C], got {tuple(comp.shape)}")
        if (comp < 0).any():
            raise DictionaryError(f"NMF components from {source or 'memory'} have negative "
                                  "entries; NMF components are non-negative")
        if n_iter < 1:
            raise DictionaryError(f"NMF n_iter must be >= 1, got {n_iter}")
        super().__init__(comp.shape[1], comp.shape[0], source)
        self.n_iter = int(n_iter)
        self.register_buffer("components", comp.clone())
        self._derived()

    def _derived(self) -> None:
        """Gram matrix, pseudo-inverse and step size, from the components (float64)."""
        comp = self.components.double()
        gram = comp @ comp.T
        lip = torch.linalg.eigvalsh(gram).max().clamp(min=1e-12)
        # Persistent=False: derived numbers, not part of the file or the fingerprint.
        self.register_buffer("gram", gram.to(self.components.dtype), persistent=False)
        self.register_buffer("pinv", torch.linalg.pinv(comp).to(self.components.dtype),
                             persistent=False)
        self.register_buffer("lipschitz", lip.to(self.components.dtype), persistent=False)

    def config(self) -> dict[str, Any]:
        return {"n_iter": self.n_iter}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.components.dtype)
        if x.numel() and bool((x < 0).any()):
            raise DictionaryError(
                f"{self.describe()}: NMF reads non-negative activations, but this input goes "
                f"down to {float(x.min()):.4g}; attach it to a post-ReLU layer (e.g. a "
                "block's output after its ReLU)")
        return _NonNegativeCodes.apply(x, self.components, self.gram, self.pinv,
                                       self.lipschitz, self.n_iter)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction [N, C] of codes ``z`` [N, F]."""
        return z @ self.components

    @classmethod
    def fit(cls, samples: np.ndarray | torch.Tensor, n_features: int, seed: int = 0,
            max_iter: int = 500, tol: float = 1e-4, n_iter: int = 200) -> NMFDictionary:
        """Fit ``n_features`` components on ``samples`` [N, C] >= 0 (rows: positions,
        columns: channels) with scikit-learn's NMF (Frobenius loss, coordinate descent,
        ``nndsvda`` initialisation seeded by ``seed``)."""
        from sklearn.decomposition import NMF

        x = _as_samples(samples)
        if (x < 0).any():
            raise DictionaryError(f"NMF needs non-negative samples, but they go down to "
                                  f"{x.min():.4g}: sample a post-ReLU layer")
        model = NMF(n_components=int(n_features), init="nndsvda", solver="cd",
                    beta_loss="frobenius", max_iter=max_iter, tol=tol, random_state=seed)
        model.fit(x)
        return cls.from_sklearn(model, n_iter=n_iter,
                                source=f"NMF fit (F={n_features}, seed={seed}, N={len(x)})")

    @classmethod
    def from_sklearn(cls, model: Any, n_iter: int = 200, source: str = "") -> NMFDictionary:
        """From a fitted ``sklearn.decomposition.NMF`` (its ``components_``). Its
        ``alpha_W`` must be 0: the codes here are plain least squares."""
        if getattr(model, "alpha_W", 0.0):
            raise DictionaryError("NMF with alpha_W != 0 regularises the codes, which "
                                  "NMFDictionary does not reproduce; fit with alpha_W=0")
        if getattr(model, "beta_loss", "frobenius") not in ("frobenius", 2):
            raise DictionaryError("NMFDictionary's codes minimise the Frobenius loss; fit "
                                  "the NMF with beta_loss='frobenius'")
        return cls(np.asarray(model.components_, dtype=np.float32), n_iter=n_iter,
                   source=source or "sklearn NMF")


class _NonNegativeCodes(torch.autograd.Function):
    """NNLS codes [N, F] of ``x`` [N, C]; backward: exact gradient of the optimum."""

    @staticmethod
    def forward(ctx, x, components, gram, pinv, lipschitz, n_iter):
        with torch.no_grad():
            codes = _nnls(x, gram, pinv, lipschitz, n_iter, x @ components.T)
        ctx.save_for_backward(codes > 0, gram, components)
        return codes

    @staticmethod
    def backward(ctx, grad):
        active, gram, components = ctx.saved_tensors
        # On the support S of a row, codes_S = (x H_S^T) G_SS^-1, so the gradient wrt
        # x is (g_S G_SS^-1) H_S; off the support the code stays 0.
        g = _solve_on_support(active, gram, grad)
        return g @ components, None, None, None, None, None


def _nnls(x: torch.Tensor, gram: torch.Tensor, pinv: torch.Tensor, lipschitz: torch.Tensor,
          n_iter: int, xht: torch.Tensor) -> torch.Tensor:
    """min_{w >= 0} ||x - w H||^2 per row: FISTA, then the exact solve on its support."""
    w = torch.clamp(x @ pinv, min=0)
    y, t = w, 1.0
    for _ in range(n_iter):
        w_next = torch.clamp(y - (y @ gram - xht) / lipschitz, min=0)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = w_next + ((t - 1.0) / t_next) * (w_next - w)
        w, t = w_next, t_next
    active = w > 0
    exact = _solve_on_support(active, gram, xht)
    # Optimal iff exact >= 0 on the support and no inactive code would lower the loss.
    slack = exact @ gram - xht
    tol = 1e-5 * (xht.abs().amax(1, keepdim=True) + 1e-12)
    ok = ((exact >= -tol) | ~active).all(1) & ((slack >= -tol) | active).all(1)
    return torch.where(ok[:, None], exact.clamp(min=0), w)


def _solve_on_support(active: torch.Tensor, gram: torch.Tensor, b: torch.Tensor,
                      max_bytes: int = 64 << 20) -> torch.Tensor:
    """Per row n: v with v_S = b_S (G_SS)^-1 on S = active[n], 0 elsewhere; in row chunks
    so the [rows, F, F] systems stay under ``max_bytes``."""
    n, f = b.shape
    out = torch.zeros_like(b)
    if n == 0:
        return out
    # A tiny ridge keeps G_SS invertible when components on a support are dependent.
    ridge = 1e-7 * torch.diagonal(gram).mean().clamp(min=1e-12)
    eye = torch.eye(f, dtype=b.dtype, device=b.device)
    step = max(1, max_bytes // (f * f * b.element_size()))
    for s in range(0, n, step):
        m = active[s:s + step].to(b.dtype)
        a = m[:, :, None] * (gram + ridge * eye)[None] * m[:, None, :] + torch.diag_embed(1 - m)
        out[s:s + step] = torch.linalg.solve(a, (m * b[s:s + step])[..., None])[..., 0] * m
    return out


# ---------------------------------------------------------------------------------------
# Sparse autoencoders
# ---------------------------------------------------------------------------------------

class SparseAutoencoder(Dictionary):
    """SAE latents: ``z = act(W_enc^T (norm(h) - b_pre) + b_enc)`` per position.

    Shapes: ``W_enc`` [C, F], ``b_enc`` [F], ``b_pre`` [C] (None: nothing subtracted),
    ``threshold`` [F] (JumpReLU), ``W_dec`` [F, C] and ``b_dec`` [C] (for :meth:`decode`
    only; optional). ``activation``:

    - ``relu``: ``relu(pre)``;
    - ``topk``: the ``k`` largest pre-activations of a position, ReLU'd; the rest 0;
    - ``jumprelu``: ``relu(pre) * (pre > relu(threshold))`` (SAELens' form; with
      threshold >= 0 the same as dictionary_learning's ``relu(pre * (pre > threshold))``).

    ``input_norm`` (SAELens' ``normalize_activations``): ``none``; ``layer_norm`` (each
    vector minus its mean, divided by its (unbiased) std + 1e-5); ``constant_norm_rescale``
    (each vector scaled to norm sqrt(C)). Units of z: those of the SAE's training data
    (for :func:`train_sae`, the layer's activations divided by one number, the RMS of their
    centred entries).
    """

    kind = "sae"

    def __init__(self, W_enc, b_enc, *, b_pre=None, activation: str = "relu",  # noqa: N803
                 k: int | None = None, threshold=None, W_dec=None, b_dec=None,  # noqa: N803
                 input_norm: str = "none", source: str = "", info: dict | None = None):
        w_enc = torch.as_tensor(W_enc, dtype=torch.float32)
        where = source or "memory"
        if w_enc.dim() != 2:
            raise DictionaryError(f"SAE from {where}: W_enc must be [d_in, d_sae], got "
                                  f"{tuple(w_enc.shape)}")
        c, f = w_enc.shape
        super().__init__(c, f, source)
        if activation not in ACTIVATIONS:
            raise DictionaryError(f"SAE from {self.source}: unknown activation "
                                  f"{activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if input_norm not in INPUT_NORMS:
            raise DictionaryError(f"SAE from {self.source}: unknown input_norm "
                                  f"{input_norm!r}; choose one of {', '.join(INPUT_NORMS)}")
        if (activation == "topk") != (k is not None):
            raise DictionaryError(f"SAE from {self.source}: k is needed by, and only by, "
                                  f"activation 'topk' (activation={activation!r}, k={k})")
        if k is not None and not 1 <= int(k) <= f:
            raise DictionaryError(f"SAE from {self.source}: k={k} must be in 1..{f}")
        if (activation == "jumprelu") != (threshold is not None):
            raise DictionaryError(f"SAE from {self.source}: a threshold is needed by, and "
                                  f"only by, activation 'jumprelu' (activation="
                                  f"{activation!r})")
        self.activation = activation
        self.k = int(k) if k is not None else None
        self.input_norm = input_norm
        self.info = dict(info or {})  # provenance (training settings, losses); not numbers
        self.register_buffer("W_enc", w_enc.clone())
        self._vector("b_enc", b_enc, f, required=True)
        self._vector("b_pre", b_pre, c)
        if threshold is not None:
            thr = torch.as_tensor(threshold, dtype=torch.float32).reshape(-1)
            if thr.numel() == 1:  # one threshold for every latent
                thr = thr.expand(f)
            self._vector("threshold", thr, f)
        else:
            self.threshold = None
        if W_dec is not None:
            w_dec = torch.as_tensor(W_dec, dtype=torch.float32)
            if tuple(w_dec.shape) != (f, c):
                raise DictionaryError(f"SAE from {self.source}: W_dec must be [d_sae, d_in] "
                                      f"= [{f}, {c}], got {tuple(w_dec.shape)}")
            self.register_buffer("W_dec", w_dec.clone())
        else:
            self.W_dec = None
        self._vector("b_dec", b_dec, c)

    def _vector(self, name: str, value, size: int, required: bool = False) -> None:
        if value is None:
            if required:
                raise DictionaryError(f"SAE from {self.source}: {name} is required")
            setattr(self, name, None)
            return
        v = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
        if v.shape[0] != size:
            raise DictionaryError(f"SAE from {self.source}: {name} must have {size} values, "
                                  f"got {v.shape[0]}")
        self.register_buffer(name, v.clone())

    def config(self) -> dict[str, Any]:
        return {"activation": self.activation, "k": self.k, "input_norm": self.input_norm}

    def _shape_hint(self, channels: int) -> str:
        return (f"its W_enc is [d_in, d_sae] = [{self.in_features}, {self.n_features}]; this "
                f"layer needs d_in = {channels}")

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm == "layer_norm":
            x = x - x.mean(-1, keepdim=True)
            return x / (x.std(-1, keepdim=True) + 1e-5)
        if self.input_norm == "constant_norm_rescale":
            return x * (self.in_features ** 0.5 / x.norm(dim=-1, keepdim=True))
        return x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``W_enc^T (norm(x) - b_pre) + b_enc`` [N, F] of ``x`` [N, C]."""
        x = self._normalise(x.to(self.W_enc.dtype))
        if self.b_pre is not None:
            x = x - self.b_pre
        return x @ self.W_enc + self.b_enc

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-activations: a TopK or JumpReLU latent that is off has no gradient.
        (Raising a TopK latent's margin over the k-th largest instead woke fewer in a
        one-off comparison on 256 toy conv4 latents: 29 stayed at 0 against 13.)"""
        return self.pre_activations(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        if self.activation == "jumprelu":
            return F.relu(pre) * (pre > F.relu(self.threshold)).to(pre.dtype)
        return _topk_or_relu(pre, self.k)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction [N, C] of latents ``z`` [N, F] in the SAE's input space (after
        ``input_norm``: a normalised SAE's reconstruction is of the normalised vector)."""
        if self.W_dec is None:
            raise DictionaryError(f"SAE from {self.source} has no decoder weights (W_dec)")
        out = z @ self.W_dec
        return out + self.b_dec if self.b_dec is not None else out


def _topk_or_relu(pre: torch.Tensor, k: int | None) -> torch.Tensor:
    """ReLU of the ``k`` largest entries of each row, 0 elsewhere; plain ReLU if k is None."""
    if k is None:
        return F.relu(pre)
    values, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, F.relu(values))


def train_sae(samples: np.ndarray | torch.Tensor, n_features: int, *, k: int | None = None,
              l1: float | None = None, steps: int = 2000, batch_size: int = 512,
              lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu",
              dead_after: int = 200) -> SparseAutoencoder:
    """Train an SAE with ``n_features`` latents on ``samples`` [N, C] in plain torch.

    Exactly one of ``k`` (TopK SAE: keep each position's ``k`` largest latents; the
    simplest to tune, no sparsity coefficient) or ``l1`` (ReLU SAE with loss
    ``mse + l1 * sum|z|``). Inputs are centred on their mean and divided by the RMS of the
    centred entries (one number) for training; the returned SAE has that folded into its
    weights, so it reads raw activations. The decoder's rows are kept at unit length;
    latents that have not fired for ``dead_after`` steps are re-initialised on the
    worst-reconstructed inputs of the batch (every ``dead_after`` steps, until the last
    quarter of training). Adam, ``lr``,
    ``steps`` batches of ``batch_size`` drawn with ``seed``: the same seed, data and
    device give the same SAE. Seconds on a CPU for 64-channel layers. ``info["trained"]``
    of the result records the settings, and on the first 4,096 samples the fraction of
    variance unexplained (``fvu``) and of latents that fire on none (``frac_dead``).
    """
    if (k is None) == (l1 is None):
        raise DictionaryError("train_sae needs exactly one of k (TopK SAE) or l1 (ReLU SAE "
                              "with an L1 penalty)")
    x_all = torch.as_tensor(_as_samples(samples), device=device)
    n, c = x_all.shape
    if k is not None and not 1 <= k <= n_features:
        raise DictionaryError(f"train_sae: k={k} must be in 1..n_features={n_features}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    mean = x_all.mean(0)
    scale = float((x_all - mean).pow(2).mean().sqrt().clamp(min=1e-12))
    x_all = (x_all - mean) / scale

    w_dec = torch.randn(n_features, c, generator=gen).to(device)
    w_dec = nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))
    w_enc = nn.Parameter(w_dec.detach().T.clone())
    b_enc = nn.Parameter(torch.zeros(n_features, device=device))
    b_dec = nn.Parameter(torch.zeros(c, device=device))
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=lr)
    since_fired = torch.zeros(n_features, dtype=torch.long, device=device)
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)
        x = x_all[idx]
        z = _topk_or_relu((x - b_dec) @ w_enc + b_enc, k)
        x_hat = z @ w_dec + b_dec
        mse = (x_hat - x).pow(2).sum(-1).mean()
        loss = mse + (l1 * z.sum(-1).mean() if l1 is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec.div_(w_dec.norm(dim=1, keepdim=True).clamp(min=1e-12))
            fired = (z > 0).any(0)
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
            if (step + 1) % dead_after == 0 and step < 0.75 * steps:
                dead = since_fired >= dead_after
                _resample_dead(dead, x, x_hat, w_enc, b_enc, w_dec, b_dec, opt)
                since_fired[dead] = 0
    with torch.no_grad():
        x = x_all[:4096]
        z = _topk_or_relu((x - b_dec) @ w_enc + b_enc, k)
        fvu = float((z @ w_dec + b_dec - x).pow(2).sum() / x.pow(2).sum().clamp(min=1e-12))
        info = {"trained": {"n_samples": n, "n_features": n_features, "k": k, "l1": l1,
                            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                            "dead_after": dead_after, "fvu": fvu,
                            "frac_dead": float(((z > 0).sum(0) == 0).float().mean())}}
        # Fold the input normalisation: x_n = (x - mean) / scale, so
        # pre = (x - mean - scale b_dec) @ (w_enc / scale) + b_enc.
        return SparseAutoencoder(
            (w_enc / scale).cpu(), b_enc.cpu(), b_pre=(mean + scale * b_dec).cpu(),
            activation="topk" if k is not None else "relu", k=k,
            W_dec=(w_dec * scale).cpu(), b_dec=(mean + scale * b_dec).cpu(),
            source=f"train_sae(F={n_features}, {'k=' + str(k) if k else 'l1=' + str(l1)}, "
                   f"steps={steps}, seed={seed}, N={n})", info=info)


@torch.no_grad()
def _resample_dead(dead: torch.Tensor, x, x_hat, w_enc, b_enc, w_dec, b_dec, opt) -> None:
    """Point dead latents at the batch inputs with the largest reconstruction error."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return
    err = (x - x_hat).pow(2).sum(-1)
    worst = err.argsort(descending=True)[:n_dead]
    dirs = x[worst] - b_dec
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp(min=1e-12)
    ids = dead.nonzero()[:, 0][:len(worst)]
    alive_norm = w_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else 1.0
    w_dec[ids] = dirs
    w_enc[:, ids] = dirs.T * alive_norm
    b_enc[ids] = 0.0
    for p in (w_enc, b_enc, w_dec):  # fresh Adam moments for the re-initialised latents
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                if p is w_enc:
                    state[key][:, ids] = 0.0
                else:
                    state[key][ids] = 0.0


# ---------------------------------------------------------------------------------------
# Fitting on a layer's activations
# ---------------------------------------------------------------------------------------

def sample_positions(target: Target, probe: ProbeSet, layer: str, max_samples: int = 100_000,
                     seed: int = 0, batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """A layer's channel vectors at a seeded random subset of positions: float32 [N, C].

    Positions are every spatial position of a conv output, every token of a transformer
    output (prefix tokens included: dictionaries read them too) or the one vector of a
    linear output, over every image of ``probe``. ``max_samples`` of all positions are
    drawn uniformly without replacement with ``seed`` (memory stays [max_samples, C]);
    positions of images that fail to load are dropped, so N can be a little smaller.
    """
    from dnd.activations import iter_batches

    module = target.layer(layer)
    rng = np.random.default_rng(seed)
    chosen: np.ndarray | None = None
    per_image = 0
    rows: list[np.ndarray] = []
    with torch.no_grad(), capture(target.module, {layer: module}) as outs:
        for batch in iter_batches(probe, target, range(len(probe)), batch_size, workers):
            target.module(batch.pixels.to(target.device))
            vecs = _positions(outs[layer])  # [B, P, C]
            if chosen is None:
                per_image = vecs.shape[1]
                total = len(probe) * per_image
                chosen = np.sort(rng.choice(total, size=min(int(max_samples), total),
                                            replace=False))
            start = batch.indices[0] * per_image
            lo, hi = np.searchsorted(chosen, [start, start + len(batch.indices) * per_image])
            sel = chosen[lo:hi] - start
            readable = np.repeat([not e for e in batch.errors], per_image)
            sel = sel[readable[sel]]
            flat = vecs.reshape(-1, vecs.shape[-1])
            rows.append(flat[torch.from_numpy(sel).to(flat.device)].float().cpu().numpy())
    if not rows:
        raise DictionaryError(f"probing set {probe.name!r} has no image to sample")
    return np.concatenate(rows).astype(np.float32, copy=False)


def _positions(out: torch.Tensor) -> torch.Tensor:
    """[B, P, C] channel vectors per position of a layer output."""
    if out.dim() == 4:
        return out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, out.shape[1])
    if out.dim() == 2:
        return out[:, None, :]
    if out.dim() == 3:
        return out
    raise DictionaryError(f"cannot sample positions of layer output shape {tuple(out.shape)}: "
                          "expected [B, C, h, w], [B, C] or [B, T, C]")


def fit_dictionary(kind: str, samples: np.ndarray | torch.Tensor, n_features: int,
                   seed: int = 0, **options: Any) -> Dictionary:
    """Fit a dictionary of ``kind`` (``nmf`` or ``sae``) with ``n_features`` features on
    ``samples`` [N, C] (e.g. from :func:`sample_positions`). ``options`` go to
    :meth:`NMFDictionary.fit` (max_iter, tol, n_iter) or :func:`train_sae` (k or l1, steps,
    batch_size, lr, device, dead_after)."""
    if kind == "nmf":
        return NMFDictionary.fit(samples, n_features, seed=seed, **options)
    if kind == "sae":
        if "k" not in options and "l1" not in options:
            raise DictionaryError("fit_dictionary('sae', ...) needs k=... (TopK SAE) or "
                                  "l1=... (ReLU SAE)")
        return train_sae(samples, n_features, seed=seed, **options)
    raise DictionaryError(f"unknown dictionary kind {kind!r} to fit; choose one of "
                          f"{', '.join(KINDS)}")


def _as_samples(samples: np.ndarray | torch.Tensor) -> np.ndarray:
    x = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else samples
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DictionaryError(f"samples must be a non-empty [N, C] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DictionaryError("samples hold NaN or infinite values")
    return x


# ---------------------------------------------------------------------------------------
# Attaching to a target
# ---------------------------------------------------------------------------------------

@dataclass
class AttachedDictionary:
    """Handle of an attached dictionary: ``layer`` is its dotted name (``layer4.sae``).
    ``remove()`` (or leaving a ``with`` block) takes the hook and the attribute off."""

    target: Target
    parent: str
    name: str
    dictionary: Dictionary
    _module: nn.Module = field(repr=False, default=None)
    _hook: Any = field(repr=False, default=None)
    # Images read to fit the dictionary before attaching it (0: loaded; attach_configured).
    fitted_images: int = 0

    @property
    def layer(self) -> str:
        return f"{self.parent}.{self.name}" if self.parent else self.name

    def remove(self) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        if self._module.__dict__.get(self.name) is self.dictionary:
            del self._module.__dict__[self.name]
        self.target.dictionaries.pop(self.layer, None)

    def __enter__(self) -> AttachedDictionary:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(target: Target, layer: str, dictionary: Dictionary, name: str = "dict"
           ) -> AttachedDictionary:
    """Hang ``dictionary`` under ``layer`` as ``f"{layer}.{name}"`` and feed it the layer's
    output on every forward pass; the layer's output is returned unchanged.

    The dictionary is set as a plain attribute of the layer module, not registered with
    ``add_module``: ``get_submodule`` (so ``Target.layer`` and ``capture``) finds it all the
    same, but an ``nn.Sequential`` layer (torchvision's ``layer4``, the toy CNN's blocks)
    runs every registered child in turn, so registering it would change the layer's output;
    the target's ``state_dict`` and parameters stay the network's own too. The hook runs
    the dictionary only while something hooks it (``capture`` on ``layer.name``), so an
    attached dictionary costs nothing otherwise, and moves it to the device of the layer's
    output. Checks the channel count at once with one forward pass of a blank image.
    """
    if not name.isidentifier():
        raise DictionaryError(f"dictionary name {name!r} must be a Python identifier "
                              "(letters, digits, underscores; no dots)")
    module = target.layer(layer)
    if hasattr(module, name):
        raise DictionaryError(f"layer {layer!r} of model {target.name} already has an "
                              f"attribute {name!r}; attach the dictionary under another name")
    _check_layer(target, layer, module, dictionary)
    dictionary.eval()

    def hook(_mod, _inp, out):
        if not (dictionary._forward_hooks or dictionary._forward_pre_hooks):
            return None  # nobody reads the features: skip the work
        h = out[0] if isinstance(out, tuple) else out
        if dictionary._device != h.device:
            dictionary.to(h.device)
        dictionary(h)
        return None  # the layer's own output goes on untouched

    object.__setattr__(module, name, dictionary)
    handle = AttachedDictionary(target, layer, name, dictionary, module,
                                module.register_forward_hook(hook))
    target.dictionaries[handle.layer] = dictionary.fingerprint()  # in the target's identity
    return handle


def detach(handle: AttachedDictionary) -> None:
    """Remove an attached dictionary (its hook and attribute); idempotent."""
    handle.remove()


def attached(target: Target) -> dict[str, Dictionary]:
    """Dotted name -> dictionary of every dictionary attached to ``target``'s layers."""
    found = {}
    for lname, mod in target.module.named_modules():
        for attr, value in vars(mod).items():
            if isinstance(value, Dictionary):
                found[f"{lname}.{attr}" if lname else attr] = value
    return found


def attach_configured(target: Target, config: Any, saved: Callable[[str], Path],
                      probe: ProbeSet | None = None) -> list[AttachedDictionary]:
    """Attach the dictionary of a run's ``config`` (:class:`dnd.config.RunConfig`) under
    every layer it names (``config.dictionary_layers``: ``conv4.nmf`` reads ``conv4``).

    ``file``: loaded from ``config.dictionary.path``. ``nmf``/``sae``: read from
    ``saved(run_layer)`` (the run's copy, :meth:`dnd.store.RunStore.dictionary_path`), or
    when absent fitted on ``config.dictionary.samples`` positions of the probing set
    ``probe`` and saved there first (then read back, so every process of the run, Ray's
    actors included, uses the same numbers; the handle's ``fitted_images`` counts the images
    that fitting read). Without ``probe`` a missing copy raises FileNotFoundError."""
    dc = config.dictionary
    handles = []
    for run_layer, parent in config.dictionary_layers.items():
        fitted = 0
        if dc.kind == "file":
            dictionary = load_dictionary(dc.path)
        else:
            path = saved(run_layer)
            if not path.is_file():
                if probe is None:
                    raise FileNotFoundError(f"the run has no fitted dictionary for {run_layer} "
                                            f"({path}); run dnd describe first")
                _fit_and_save(target, config, parent, probe, path)
                fitted = len(probe)
            dictionary = load_dictionary(path)
        handles.append(attach(target, parent, dictionary, name=dc.name))
        handles[-1].fitted_images = fitted
    return handles


def _fit_and_save(target: Target, config: Any, layer: str, probe: ProbeSet, path: Path) -> None:
    """Fit ``config.dictionary`` on ``layer``'s positions over ``probe`` and save it to
    ``path`` atomically, with what it was fitted on in ``<path>.json``."""
    import os
    import time

    from dnd.io import atomic_write_json

    dc = config.dictionary
    started = time.perf_counter()
    samples = sample_positions(target, probe, layer, max_samples=dc.samples, seed=dc.seed,
                               batch_size=config.batch_size, workers=config.workers)
    n = dc.n_features(samples.shape[1])
    log.info("fitting %s with %d features on %d positions of %s", dc.kind, n, len(samples),
             layer)
    dictionary = fit_dictionary(dc.kind, samples, n, seed=dc.seed, **dc.fit_options())
    dictionary.source = f"fitted on {len(samples)} positions of {layer} over {probe.name}"
    tmp = path.with_name(path.name + ".tmp")
    save_dictionary(dictionary, tmp)
    os.replace(tmp, path)
    x = torch.from_numpy(samples[:20_000])
    with torch.no_grad():
        fvu = _unexplained(dictionary, x)
    atomic_write_json(path.with_suffix(".json"), {
        "layer": layer, "kind": dc.kind, "features": n, "positions": len(samples),
        "channels": int(samples.shape[1]), "seed": dc.seed, "probe": probe.name,
        "fraction_of_variance_unexplained": fvu,
        "seconds": round(time.perf_counter() - started, 2)})


def _unexplained(dictionary: Dictionary, x: torch.Tensor) -> float | None:
    """Fraction of the variance of ``x`` [N, C] its reconstruction leaves (None for a
    dictionary that cannot reconstruct)."""
    decode = getattr(dictionary, "decode", None)
    if decode is None:
        return None
    err = (decode(dictionary.encode(x)) - x).pow(2).sum()
    return round(float(err / (x - x.mean(0)).pow(2).sum()), 4)


def _check_layer(target: Target, layer: str, module: nn.Module, dictionary: Dictionary) -> None:
    """Run ``dictionary`` once on ``layer``'s output for a blank image, inside a hook (a
    later in-place op, e.g. ``ReLU(inplace=True)``, may overwrite the output afterwards)."""
    where = f"layer {layer!r} of model {target.name!r}"

    def check(_mod, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        dictionary.check_input(h, where=where)
        try:
            dictionary.to(h.device)(h)
        except DictionaryError as err:
            raise DictionaryError(f"{where}: {err}") from None

    blank = torch.zeros(1, 3, target.preprocess.crop, target.preprocess.crop,
                        device=target.device)
    handle = module.register_forward_hook(check)
    try:
        with torch.no_grad():
            target.module(blank)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

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
        return Directions.from_file(p)
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
        return Directions.from_file(p)
    raise DictionaryError(_unknown_layout(p, f"tensors {sorted(tensors)[:12]}"))


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

