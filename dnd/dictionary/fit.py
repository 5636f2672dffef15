"""Fitting a dictionary on a layer's activations.

:func:`sample_positions` collects a seeded random subset of a layer's channel vectors over
a probing set; :func:`fit_dictionary` fits NMF (:meth:`dnd.dictionary.kinds.NMFDictionary.fit`)
or trains a sparse autoencoder (:func:`train_sae`, plain torch) on them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from dnd.dictionary.kinds import (
    KINDS,
    Dictionary,
    DictionaryError,
    NMFDictionary,
    SparseAutoencoder,
    as_samples,
    topk_or_relu,
)
from dnd.probe import ProbeSet
from dnd.target import Target, capture


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
    x_all = torch.as_tensor(as_samples(samples), device=device)
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
        z = topk_or_relu((x - b_dec) @ w_enc + b_enc, k)
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
        z = topk_or_relu((x - b_dec) @ w_enc + b_enc, k)
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

