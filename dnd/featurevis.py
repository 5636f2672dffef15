"""Feature visualization: images optimised to excite one unit (plain, diverse, faceted).

The second kind of evidence beside a unit's dataset examples. Every image is gradient
ascent on the input with:

- a decorrelated parameterisation: a Fourier spectrum scaled by 1/f (so the optimiser
  moves low frequencies as easily as high ones), mapped through the square root of the
  probing images' RGB covariance and a sigmoid around their mean colour;
- optionally (``alpha``) an opacity mask, composited over a random flat colour at each
  step, so that only what the unit needs stays opaque (the transparent visualizations of
  lucid's differentiable-parameterisation work);
- transformation robustness: a random rotation, scale and translation per image and step,
  so the result does not hinge on single pixels;
- for the first quarter of the steps, and for any image whose unit is still at zero, ReLUs
  also pass gradient that would switch them on (a "redirected" ReLU), so a unit that is
  off on the starting noise still gets a gradient. A dictionary feature
  (``dnd describe --dictionary``) is woken differently: the network's ReLUs stay plain
  and the gradient of the dictionary's continuous stand-in (an SAE's pre-activations,
  :meth:`dnd.dictionary.kinds.Dictionary.surrogate`) replaces the feature's own. On the toy
  CNN's conv4, redirected ReLUs switched on 59 of the 500 TopK SAE latents that probing
  renders switch on and 25 of 32 NMF factors, this 440 and 32
  (results/featurevis-toyworld.md), while for the network's own channels the redirect
  reads better (toy conv4: 26 of 73 units right, 16 without);
- objective: the unit's activation as the run summarises it (``split_output``: a channel's
  spatial mean, or max with ``summary="max"``; a linear feature's value; a ViT feature's
  CLS-token value);
- diversity (``per_unit > 1``): minus the mean pairwise cosine similarity of the layer's
  Gram matrices (style) of a unit's images, so each shows a different facet of the unit;
- a facet (:class:`Facet`, the Multimodal Neurons work): adds ``w . sum_pos(h * df/dh)``,
  where ``h`` is an earlier layer's output, ``df/dh`` the objective's gradient there and
  ``w`` a linear probe trained on that layer, steering which of the unit's inputs show.

Compact code of our own rather than a library: the maintained options either target
TensorFlow (lucid) or have not had a release for years and pin old torch (torch-lucent),
and we need what none offers together: many units optimised in one batch with seeds per
image (a unit's images do not depend on which units share its batch), the run's own
summary of a unit, targets given as :class:`dnd.target.Target` with their preprocessing,
and faceted objectives.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dnd.dictionary.kinds import Dictionary
from dnd.io import atomic_write_bytes, atomic_write_json, stable_hash
from dnd.store import RunStore, safe_name, unit_done
from dnd.target import Target, capture, position_sum, split_output


@dataclass(frozen=True)
class FeatureVisConfig:
    """Settings of one feature-visualization run (defaults: 64-px to 224-px targets)."""

    # Defaults: the best of a small sweep on the toy world (results/featurevis-toyworld.md).
    steps: int = 128                  # Adam steps per image
    lr: float = 0.02                  # Adam learning rate on the spectrum
    per_unit: int = 1                 # images per unit; > 1 adds the diversity term
    diversity: float = 1.0            # weight of the diversity term, in objective units
    jitter: float = 0.12              # max translation, fraction of the image side
    scale: tuple[float, float] = (0.7, 1.3)   # random zoom range
    rotate: float = 20.0              # max rotation, degrees
    decay: float = 2.5                # spectrum scaling 1 / f^decay (larger: smoother)
    batch_size: int = 32              # images optimised together
    seed: int = 0                     # image k of unit u always starts from the same noise
    summary: str = "mean"             # how a spatial unit's map becomes its objective
    alpha: bool = False               # also optimise an opacity mask (see FourierImage)

    def __post_init__(self) -> None:
        for name in ("steps", "per_unit", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"featurevis {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < self.per_unit:
            raise ValueError(f"featurevis batch_size ({self.batch_size}) must be >= per_unit "
                             f"({self.per_unit}): a unit's images are optimised together")
        if self.summary not in ("mean", "max"):
            raise ValueError(f"featurevis summary must be 'mean' or 'max', got {self.summary!r}")
        if not (0 < self.scale[0] <= self.scale[1]):
            raise ValueError(f"featurevis scale must be 0 < low <= high, got {self.scale}")
        if self.lr <= 0 or self.jitter < 0 or self.rotate < 0 or self.diversity < 0:
            raise ValueError("featurevis lr must be > 0 and jitter, rotate, diversity >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ColourBasis:
    """The probing images' colour statistics: ``mean`` [3] in (0, 1) and ``sqrt_cov`` [3, 3]
    (the symmetric square root of the RGB covariance, scaled to a largest column norm of
    1). A parameter image ``z`` [n, 3, h, w] becomes pixels ``sigmoid(logit(mean) +
    sqrt_cov @ z)``."""

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    sqrt_cov: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0),
                                               (0.0, 0.0, 1.0))

    @classmethod
    def from_images(cls, images: Sequence[Image.Image] | np.ndarray) -> ColourBasis:
        """Statistics of RGB images (PIL, or uint8 [n, h, w, 3])."""
        if not isinstance(images, np.ndarray):
            images = [np.asarray(im.convert("RGB")) for im in images]
            pixels = np.concatenate([a.reshape(-1, 3) for a in images])
        else:
            pixels = images.reshape(-1, 3)
        if len(pixels) < 2:
            raise ValueError("ColourBasis.from_images needs at least two pixels")
        pixels = pixels.astype(np.float64) / 255.0
        mean = np.clip(pixels.mean(0), 0.02, 0.98)
        vals, vecs = np.linalg.eigh(np.cov(pixels.T) + 1e-6 * np.eye(3))
        root = vecs @ np.diag(np.sqrt(np.clip(vals, 0, None))) @ vecs.T
        root /= np.linalg.norm(root, axis=0).max()
        return cls(tuple(float(m) for m in mean), tuple(tuple(float(v) for v in r) for r in root))


@dataclass(frozen=True)
class Facet:
    """A linear probe ``direction`` [C] on layer ``layer`` (earlier than the visualised one)
    and the ``weight`` of its term: the visualization then prefers the inputs of the unit
    that the probe's class explains (e.g. a written word rather than an object)."""

    name: str
    layer: str
    direction: tuple[float, ...]
    weight: float = 1.0


@dataclass
class UnitVis:
    """A unit's visualizations: ``images`` (PIL, the target's input size), the unit's
    activation on each (``activations``, untransformed images) and on the starting noise
    (``start_activations``, the unoptimised baseline)."""

    unit: int
    images: list[Image.Image]
    activations: list[float]
    start_activations: list[float]
    facet: str | None = None
    extra: dict = field(default_factory=dict)


INIT_STD = 0.05   # starting spectrum: low-contrast colour blobs around the mean colour


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose gradient, for the images in ``mask`` [n] (bool), also passes where the
    input is negative if it would raise the input: a unit that is off on its image has no
    gradient at all otherwise."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, mask)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mask = ctx.saved_tensors
        mask = mask.view(-1, *([1] * (x.dim() - 1)))
        return grad * ((x > 0) | ((grad < 0) & mask)).to(grad.dtype), None


class _Redirect:
    """Hooks on every ``nn.ReLU`` of a module that make it a :class:`_RedirectedReLU` for
    the images in ``mask`` (set per step; None: plain ReLUs); removed on exit."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.handles = module, []
        self.mask: torch.Tensor | None = None

    def __enter__(self) -> _Redirect:
        for m in self.module.modules():
            if isinstance(m, torch.nn.ReLU):
                self.handles.append(m.register_forward_pre_hook(self._keep_input))
                self.handles.append(m.register_forward_hook(self._redirect))
        return self

    def _keep_input(self, mod, args):
        if self.mask is not None and torch.is_grad_enabled() and args[0].shape[0] == len(
                self.mask):
            mod._dnd_input = args[0]
            # An in-place ReLU would overwrite the input the backward pass needs.
            return (args[0].clone(),) + tuple(args[1:]) if mod.inplace else None
        return None

    def _redirect(self, mod, args, out):
        x = mod.__dict__.pop("_dnd_input", None)
        return _RedirectedReLU.apply(x, self.mask) if x is not None else None

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for m in self.module.modules():
            m.__dict__.pop("_dnd_input", None)


def _image_seed(seed: int, unit: int, k: int) -> int:
    digest = hashlib.sha256(f"featurevis:{seed}:{unit}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class FourierImage(torch.nn.Module):
    """``n`` images of ``size`` x ``size`` pixels in [0, 1], parameterised by their 1/f-scaled
    Fourier spectra in the colour basis (see the module docstring). With ``alpha`` a fourth
    spectrum is an opacity mask (sigmoid, starting near 0.5), and the image is composited
    over a background: the one passed to :meth:`forward`, else the colour basis's mean."""

    def __init__(self, seeds: Sequence[int], size: int, colour: ColourBasis,
                 decay: float = 1.0, init_std: float = INIT_STD, alpha: bool = False):
        super().__init__()
        self.size, self.alpha = size, alpha
        self.spectrum = torch.nn.Parameter(torch.stack([self.noise(s, init_std) for s in seeds]))
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        scale = 1.0 / torch.clamp(torch.sqrt(fx ** 2 + fy ** 2), min=1.0 / size) ** decay
        # RMS 1, so a pixel's std starts near init_std whatever the size and decay.
        self.register_buffer("scale", scale / scale.pow(2).mean().sqrt())
        self.register_buffer("sqrt_cov", torch.tensor(colour.sqrt_cov, dtype=torch.float32))
        mean = torch.tensor(colour.mean, dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, 3, 1, 1))
        self.register_buffer("offset", torch.log(mean / (1 - mean)).view(1, 3, 1, 1))

    def noise(self, seed: int, std: float) -> torch.Tensor:
        """A starting spectrum [3 (4 with alpha), size, size // 2 + 1, 2] drawn from ``seed``
        (the colour channels are the same with and without alpha)."""
        shape = (self.size, self.size // 2 + 1, 2)
        g = torch.Generator().manual_seed(seed)
        rgb = torch.randn(3, *shape, generator=g) * std
        if not self.alpha:
            return rgb
        g_alpha = torch.Generator().manual_seed(seed ^ 0x5EED)
        return torch.cat([rgb, torch.randn(1, *shape, generator=g_alpha) * std])

    def forward(self, background: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels [n, 3, size, size] in [0, 1]; ``background`` [n, 3, 1, 1] (alpha only)."""
        spec = torch.view_as_complex(self.spectrum) * self.scale
        z = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho") * self.size / 4
        rgb = torch.sigmoid(self.offset + torch.einsum("ij,njhw->nihw", self.sqrt_cov, z[:, :3]))
        if not self.alpha:
            return rgb
        a = torch.sigmoid(z[:, 3:])
        return a * rgb + (1 - a) * (self.mean if background is None else background)


def to_images(pix: torch.Tensor) -> list[Image.Image]:
    """Pixels [n, 3, h, w] in [0, 1] -> n RGB images."""
    arrays = (pix.permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def start_images(units: Sequence[int], size: int, config: FeatureVisConfig,
                 colour: ColourBasis) -> list[Image.Image]:
    """The unoptimised starting image of each unit's first visualization (the baseline a
    visualization is compared with)."""
    param = FourierImage([_image_seed(config.seed, u, 0) for u in units], size, colour,
                         config.decay, alpha=config.alpha)
    with torch.no_grad():
        return to_images(param())


def _random_affine(generators: Sequence[torch.Generator], cfg: FeatureVisConfig
                   ) -> torch.Tensor:
    """One random rotation + zoom + translation per image: ``affine_grid`` thetas [n, 2, 3]."""
    thetas = []
    for g in generators:
        u = torch.rand(4, generator=g) * 2 - 1          # in [-1, 1)
        angle = math.radians(cfg.rotate) * float(u[0])
        lo, hi = cfg.scale
        zoom = lo + (hi - lo) * (float(u[1]) + 1) / 2
        # affine_grid maps output to input coordinates: dividing by zoom magnifies.
        c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
        tx, ty = 2 * cfg.jitter * float(u[2]), 2 * cfg.jitter * float(u[3])
        thetas.append([[c, -s, tx], [s, c, ty]])
    return torch.tensor(thetas, dtype=torch.float32)


def _style(out: torch.Tensor) -> torch.Tensor:
    """Per image, a vector describing the layer's response: the flattened Gram matrix of a
    spatial or token output, the output itself for a linear layer. [n, d]."""
    if out.dim() == 4:
        f = out.flatten(2)                                   # [n, C, hw]
        return torch.bmm(f, f.transpose(1, 2)).flatten(1) / f.shape[2]
    if out.dim() == 3:
        return torch.bmm(out.transpose(1, 2), out).flatten(1) / out.shape[1]
    return out


def pooled_features(target: Target, layer: str, images: Sequence[Image.Image],
                    batch: int = 64) -> torch.Tensor:
    """A layer's output averaged over positions, per image: [n, C] float32 (what a facet
    probe is trained on)."""
    module = target.layer(layer)
    rows = []
    with torch.no_grad(), capture(target.module, {layer: module}) as outs:
        for i in range(0, len(images), batch):
            x = torch.stack([target.preprocess(im) for im in images[i:i + batch]])
            target.module(x.to(target.device))
            out = outs[layer].float()
            n_pos = out[0].numel() / (out.shape[1] if out.dim() == 4 else out.shape[-1])
            rows.append(position_sum(out).cpu() / n_pos)
    return torch.cat(rows)


def train_facet(target: Target, layer: str, name: str, positives: Sequence[Image.Image],
                negatives: Sequence[Image.Image], weight: float = 1.0, l2: float = 1e-3,
                steps: int = 300) -> tuple[Facet, float]:
    """A linear probe separating ``positives`` from ``negatives`` on ``layer``'s pooled
    features (logistic regression on standardised features, L2 ``l2``); returns the
    :class:`Facet` (direction in raw feature units, unit norm) and its training accuracy."""
    if not positives or not negatives:
        raise ValueError(f"facet {name!r} needs positive and negative images, got "
                         f"{len(positives)} and {len(negatives)}")
    x = torch.cat([pooled_features(target, layer, positives),
                   pooled_features(target, layer, negatives)])
    y = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = float(((xs @ w + b > 0).float() == y).float().mean())
        raw = w / sd                                  # the same logit slope on raw features
        raw = raw / raw.norm().clamp_min(1e-12)
    return Facet(name, layer, tuple(float(v) for v in raw), weight), acc


def visualize(target: Target, layer: str, units: Sequence[int],
              config: FeatureVisConfig = FeatureVisConfig(), *,
              colour: ColourBasis | None = None, facet: Facet | None = None,
              progress: Callable[[int], None] | None = None) -> list[UnitVis]:
    """Feature visualizations of ``units`` of ``layer``: ``config.per_unit`` images each,
    ``config.batch_size`` images optimised together. ``progress(n)`` is called with the
    number of units finished after each batch. The target's parameters are not changed and
    get no gradients; hooks are removed on return."""
    cfg, colour = config, colour or ColourBasis()
    module = target.layer(layer)
    hooked = {layer: module}
    if facet is not None:
        hooked[facet.layer] = target.layer(facet.layer)
        w_facet = torch.tensor(facet.direction, dtype=torch.float32, device=target.device)
    size = target.preprocess.crop
    mean = torch.tensor(target.preprocess.mean, device=target.device).view(1, 3, 1, 1)
    std = torch.tensor(target.preprocess.std, device=target.device).view(1, 3, 1, 1)
    per_batch = max(1, cfg.batch_size // cfg.per_unit)
    dictionary = module if isinstance(module, Dictionary) else None
    if dictionary is not None:
        # The layer the dictionary reads ("conv4" of "conv4.sae"), for its stand-in.
        parent = layer.rpartition(".")[0]
        hooked[parent] = target.layer(parent)
    results: list[UnitVis] = []
    was_training = target.module.training
    target.module.eval()
    try:
        with capture(target.module, hooked) as outs, _Redirect(target.module) as redirect:
            def unit_objective(x: torch.Tensor, which: torch.Tensor,
                               wake: torch.Tensor | None = None) -> torch.Tensor:
                """The units' objectives [n]; ``wake`` [n] (bool): images whose unit gets
                a gradient even where it is off (see the module docstring)."""
                redirect.mask = wake if dictionary is None else None
                target.module((x - mean) / std)
                rows = torch.arange(len(which))
                summary, _ = split_output(outs[layer], cfg.summary, target.num_prefix_tokens)
                value = summary[rows, which]
                if dictionary is None or wake is None or not bool(wake.any()):
                    return value
                stand_in = dictionary.per_position(dictionary.surrogate, outs[parent])
                stand_in, _ = split_output(stand_in, cfg.summary, target.num_prefix_tokens)
                stand_in = stand_in[rows, which]
                # The value stays the feature's; its gradient is the stand-in's.
                return torch.where(wake, value.detach() + stand_in - stand_in.detach(), value)

            for start in range(0, len(units), per_batch):
                chunk = list(units[start:start + per_batch])
                results += _optimise(chunk, cfg, colour, size, target, facet,
                                     w_facet if facet is not None else None,
                                     unit_objective, outs, layer)
                if progress:
                    progress(len(chunk))
    finally:
        target.module.train(was_training)
    return results


def _optimise(chunk, cfg, colour, size, target, facet, w_facet, unit_objective, outs, layer
              ) -> list[UnitVis]:
    """Optimise the images of one batch of units (see :func:`visualize`)."""
    n = cfg.per_unit
    seeds = [_image_seed(cfg.seed, u, k) for u in chunk for k in range(n)]
    which = torch.tensor([u for u in chunk for _ in range(n)], device=target.device)
    param = FourierImage(seeds, size, colour, cfg.decay, alpha=cfg.alpha).to(target.device)
    gens = [torch.Generator().manual_seed(s + 1) for s in seeds]
    opt = torch.optim.Adam(param.parameters(), lr=cfg.lr)
    with torch.no_grad():
        start_acts = unit_objective(param(), which).float().cpu()
    last = start_acts.to(target.device)
    for step in range(cfg.steps):
        # Woken early on and while an image's unit is still off; plain gradients otherwise.
        wake = (last == 0) | (step < cfg.steps // 4)
        # With alpha, a random flat background per image and step: only what the unit
        # needs stays opaque (drawn after the affine, from the image's own generator).
        thetas = _random_affine(gens, cfg)
        background = (torch.stack([torch.rand(3, generator=g) for g in gens]).view(-1, 3, 1, 1)
                      .to(target.device) if cfg.alpha else None)
        pix = param(background)
        grid = F.affine_grid(thetas.to(pix.device), list(pix.shape),
                             align_corners=False)
        x = F.grid_sample(pix, grid, padding_mode="reflection", align_corners=False)
        obj = unit_objective(x, which, wake)
        last = obj.detach()
        loss = -obj.sum()
        if facet is not None:
            h = outs[facet.layer]
            grad = torch.autograd.grad(obj.sum(), h, create_graph=True)[0]
            loss = loss - facet.weight * (position_sum(h * grad) @ w_facet).sum()
        if n > 1:
            style = F.normalize(_style(outs[layer]).float(), dim=1).view(len(chunk), n, -1)
            sim = torch.bmm(style, style.transpose(1, 2))       # [units, n, n]
            off = (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))
            # In units of the unit's objective, so one weight suits every unit and layer.
            scale = obj.detach().abs().view(len(chunk), n).mean(1).clamp_min(1e-6)
            loss = loss + cfg.diversity * (scale * off).sum() * n
        (grad_p,) = torch.autograd.grad(loss, [param.spectrum])
        param.spectrum.grad = grad_p
        opt.step()
    with torch.no_grad():
        pix = param()
        acts = unit_objective(pix, which).float().cpu()
    images = to_images(pix)
    out = []
    for i, u in enumerate(chunk):
        sl = slice(i * n, (i + 1) * n)
        out.append(UnitVis(int(u), images[sl],
                           [float(a) for a in acts[sl]], [float(a) for a in start_acts[sl]],
                           facet.name if facet else None))
    return out


# ---------------------------------------------------------------------------------------
# Feature visualization of a run's units: `dnd featurevis RUN_DIR`
# ---------------------------------------------------------------------------------------

COLOUR_SAMPLE = 64  # probing images the colour statistics are taken from


def variant_name(facet: Facet | None) -> str:
    """Folder of a kind of visualization under ``<run>/featurevis/<layer>/``."""
    return "plain" if facet is None else f"facet-{safe_name(facet.name)}"


def _save_unit(folder: Path, vis: UnitVis, key: str) -> None:
    # Images first, the JSON last: a unit counts as done only when its JSON exists.
    for k, im in enumerate(vis.images):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        atomic_write_bytes(folder / f"{vis.unit}_{k}.png", buf.getvalue())
    atomic_write_json(folder / f"{vis.unit}.json", {
        "key": key, "unit": vis.unit, "activations": vis.activations,
        "start_activations": vis.start_activations, "facet": vis.facet})


def featurevis_run(run_dir: str | Path, units: str | None = None,
                   config: FeatureVisConfig = FeatureVisConfig(), *, layer: str | None = None,
                   facet_images: tuple[str, str, Sequence[Image.Image],
                                       Sequence[Image.Image], float] | None = None,
                   device: str | None = None, progress: bool = True) -> dict:
    """Feature visualizations of a run's units, saved under ``<run>/featurevis/<layer>/``
    (``plain/`` or ``facet-<name>/``) and shown by ``dnd report``.

    ``layer``: one of the run's layers (needed when it has several). ``units``: a unit spec
    (default: every unit of the layer with a record). The objective follows the
    run's ``summary``. ``facet_images``: (name, facet layer, positive images, negative
    images, weight) trains a facet probe first (saved as ``facet.json``). Resumes: a unit
    already visualised with the same settings is skipped. Returns {"done", "skipped",
    "folder", "seconds"}."""
    from dnd.backends.base import resolve_device
    from dnd.config import parse_units
    from dnd.dictionary.attach import attach_configured
    from dnd.probe import open_probe
    from dnd.target import load_target, num_units

    store = RunStore(run_dir)
    rc = store.layer_config(layer)
    config = replace(config, summary=rc.summary)
    target = load_target(rc.model, rc.weights).to(resolve_device(device or rc.device))
    attach_configured(target, rc, store.dictionary_path)  # a dictionary layer's features
    wanted = (store.described_units(rc.layer) if units is None
              else parse_units(units, num_units(target, rc.layer)))
    probe = open_probe(rc.probe)
    step = max(1, len(probe) // COLOUR_SAMPLE)
    colour = ColourBasis.from_images([probe.load(i) for i in range(0, len(probe), step)
                                      ][:COLOUR_SAMPLE])
    facet = None
    if facet_images is not None:
        name, flayer, pos, neg, weight = facet_images
        facet, acc = train_facet(target, flayer, name, pos, neg, weight)
        meta = {"name": name, "layer": flayer, "weight": weight, "train_accuracy": acc,
                "positives": len(pos), "negatives": len(neg), "direction": facet.direction}
        atomic_write_json(store.featurevis_dir(rc.layer, variant_name(facet)) / "facet.json",
                          meta)
    folder = store.featurevis_dir(rc.layer, variant_name(facet))
    # A setting added later (alpha) enters the key only when set, so the visualizations
    # saved before it existed stay valid.
    settings = {k: v for k, v in config.to_dict().items() if not (k == "alpha" and not v)}
    key = stable_hash({"config": settings, "target": target.identity,
                       "layer": rc.layer, "colour": asdict(colour),
                       "facet": asdict(facet) if facet else None})
    todo = [u for u in wanted if not unit_done(folder, u, key)]
    t0 = time.perf_counter()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="feature visualization", unit="unit")
    per_batch = max(1, config.batch_size // config.per_unit)
    try:
        # Saved batch by batch: an interrupted run keeps what it finished.
        for start in range(0, len(todo), per_batch):
            for vis in visualize(target, rc.layer, todo[start:start + per_batch], config,
                                 colour=colour, facet=facet,
                                 progress=bar.update if bar else None):
                _save_unit(folder, vis, key)
    finally:
        if bar:
            bar.close()
    return {"done": len(todo), "skipped": len(wanted) - len(todo), "folder": folder,
            "seconds": time.perf_counter() - t0}
