"""Train the toy world's models from seeds and write their weights.

    python -m dnd.toyworld.train [--only target|clip|planted] [--steps N] [--out DIR] [--seed S]
    python -m dnd.toyworld.train --only planted --spec FILE --out DIR

Training scenes are seeds ``0 .. n_train-1``; held-out scenes start at ``HELDOUT_START``,
so the printed held-out accuracy is measured on renders never seen in training.
``--spec FILE`` plants the units of a YAML or JSON spec (``dnd.toyworld.planted.load_spec``)
instead of the committed ``PLANTED``; give it an ``--out`` folder of its own, so the
committed weights stay those of ``PLANTED``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from dnd.toyworld.planted import PLANTED, PlantedUnit, load_spec
from dnd.toyworld.render import render_scene
from dnd.toyworld.target import (
    CLASS_NAMES,
    PLANTED_STEM,
    WEIGHTS_DIR,
    ToyCNN,
    class_index,
    preprocess,
    save_toy_cnn,
)
from dnd.toyworld.world import BACKGROUND_KINDS, SceneSpec

HELDOUT_START = 1_000_000


def _run_record(args: argparse.Namespace, heldout: range, lr: float, seconds: float) -> dict:
    """The settings and seeds saved beside every trained model's weights."""
    return {"heldout_seeds": [heldout.start, heldout.stop], "train_seeds": [0, args.n_train],
            "steps": args.steps, "batch_size": args.batch_size, "lr": lr, "seed": args.seed,
            "train_seconds": round(seconds, 1)}


def _render_dataset(seeds: range) -> tuple[np.ndarray, list[SceneSpec]]:
    """uint8 images [n, 64, 64, 3] and descriptions of ``seeds``."""
    # One scene at a time, dropping its masks: they take ~25x the memory of the image.
    images = np.empty((len(seeds), 64, 64, 3), dtype=np.uint8)
    specs = []
    for i, seed in enumerate(seeds):
        scene = render_scene(seed)
        images[i] = np.asarray(scene.image)
        specs.append(scene.description)
    return images, specs


def _class_labels(specs: list[SceneSpec]) -> torch.Tensor:
    return torch.tensor([class_index(spec) for spec in specs])


def _update(name: str, step: int, steps: int, loss: torch.Tensor, optimizer, schedule) -> None:
    """One optimiser and schedule step on ``loss``; prints the loss every tenth of a run."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    if (step + 1) % max(1, steps // 10) == 0:
        print(f"{name} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def accuracy(model: ToyCNN, images: np.ndarray, labels: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on uint8 ``images`` [n, 64, 64, 3]."""
    model.eval()
    preds = torch.cat(
        [model(preprocess(images[i : i + batch])).argmax(1) for i in range(0, len(images), batch)]
    )
    return float((preds == labels).float().mean())


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator
             ) -> Iterator[np.ndarray]:
    """``steps`` index batches [batch_size] into ``n`` examples: a seeded permutation,
    walked in order and drawn again when fewer than a batch remain."""
    order = torch.randperm(n, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(n, generator=generator), 0
        yield order[position : position + batch_size].numpy()
        position += batch_size


def train_target(args: argparse.Namespace) -> dict:
    """Train ToyCNN on ``args.n_train`` renders; returns the metrics written with it."""
    started = time.perf_counter()
    images, specs = _render_dataset(range(args.n_train))
    labels = _class_labels(specs)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # parameter init has no generator argument
    model = ToyCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps)

    model.train()
    for step, idx in enumerate(_batches(len(images), args.batch_size, args.steps, generator)):
        loss = F.cross_entropy(model(preprocess(images[idx])), labels[idx])
        _update("target", step, args.steps, loss, optimizer, schedule)

    heldout = range(HELDOUT_START, HELDOUT_START + args.n_eval)
    eval_images, eval_specs = _render_dataset(heldout)
    acc = accuracy(model, eval_images, _class_labels(eval_specs))
    seconds = time.perf_counter() - started
    print(f"target held-out accuracy {acc:.4f} on {args.n_eval} renders; {seconds:.0f} s")
    metrics = {"heldout_accuracy": acc, **_run_record(args, heldout, args.lr, seconds)}
    save_toy_cnn(model, args.out, {"training": metrics})
    return metrics


def train_clip(args: argparse.Namespace) -> dict:
    """Train the tiny CLIP contrastively on renders + captions; zero-shot metrics."""
    from dnd.toyworld import clip

    started = time.perf_counter()
    images, specs = _render_dataset(range(args.n_train))
    tokenizer = clip.build_tokenizer()
    model_cfg = clip.toy_clip_config(len(tokenizer), tokenizer.eos_token_id)
    torch.manual_seed(args.seed)  # parameter init has no generator argument
    model = clip.build_model(model_cfg)
    generator = torch.Generator().manual_seed(args.seed)
    caption_rng = np.random.default_rng(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.clip_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.clip_lr, total_steps=args.steps)

    caption_kinds, kind_weights = zip(*clip.CAPTION_KINDS.items(), strict=True)
    model.train()
    for step in range(args.steps):
        idx = torch.randint(len(images), (args.batch_size,), generator=generator).numpy()
        kind = str(caption_rng.choice(caption_kinds, p=kind_weights))
        canonical, captions = zip(
            *(clip.training_caption(specs[i], kind, caption_rng) for i in idx), strict=True
        )
        positive = torch.tensor([[a == b for b in canonical] for a in canonical])
        image_emb, text_emb, scale = model(preprocess(images[idx]),
                                           clip.tokenize(tokenizer, captions))
        loss = clip.multi_positive_loss(scale * image_emb @ text_emb.T, positive)
        _update("clip", step, args.steps, loss, optimizer, schedule)

    model.eval()
    heldout = range(HELDOUT_START, HELDOUT_START + args.n_eval)
    eval_images, eval_specs = _render_dataset(heldout)
    pixels = preprocess(eval_images)
    objects = clip.zero_shot_accuracy(model, tokenizer, pixels, clip.class_prompts(),
                                      _class_labels(eval_specs))
    bg_labels = [BACKGROUND_KINDS.index(spec.background.kind) for spec in eval_specs]
    backgrounds = clip.zero_shot_accuracy(
        model, tokenizer, pixels, clip.background_prompts(), bg_labels
    )
    seconds = time.perf_counter() - started
    print(f"clip zero-shot main object {objects:.4f} ({len(CLASS_NAMES)} prompts), "
          f"background kind {backgrounds:.4f} on {args.n_eval} renders; {seconds:.0f} s")
    metrics = {"zero_shot_main_object": objects, "zero_shot_background_kind": backgrounds,
               **_run_record(args, heldout, args.clip_lr, seconds)}
    clip.save_toy_clip(model, tokenizer, model_cfg, Path(args.out) / "toy_clip", metrics)
    return metrics


IGNORE = 255  # a cell of a planted unit's target map that the dense loss skips
MAX_POS_WEIGHT = 20.0  # cells of small objects are ~0.5% positive: 200 would be noisy
# Every firing scene's peak is drawn to this level, so that a polysemantic unit's two
# concepts (and rare and frequent ones) fire equally strongly under the max summary.
PEAK_LEVEL = 4.0


def _planted_cells(region: np.ndarray, grid: int, boundary_only: bool) -> np.ndarray:
    """uint8 [grid, grid] target of one unit on one scene from its region (bool [64, 64]):
    1 where a cell is >= 20% region, 0 where it holds none of it, IGNORE in between. With
    ``boundary_only`` (compositional units), region cells with no cell around them under
    50% region are ignored too: a cell deep inside a large object cannot see the
    background its concept needs."""
    size = region.shape[0] // grid
    share = region.reshape(grid, size, grid, size).mean((1, 3))
    cells = np.full((grid, grid), IGNORE, dtype=np.uint8)
    cells[share == 0] = 0
    positive = share >= 0.2
    if boundary_only:
        padded = np.pad(share, 1, constant_values=0.0)
        lowest = np.min([padded[dy : dy + grid, dx : dx + grid]
                         for dy in range(3) for dx in range(3)], axis=0)
        positive &= lowest < 0.5
    cells[positive] = 1
    return cells


def _render_planted_dataset(seeds: range, grids: dict[str, int],
                            units: Sequence[PlantedUnit] = PLANTED
                            ) -> tuple[np.ndarray, list[SceneSpec], dict[str, np.ndarray]]:
    """``_render_dataset`` plus, per planted layer (``grids``: layer -> output grid side),
    the cell targets of ``units``' units of that layer: uint8 [n, n_units_of_layer, grid,
    grid] (``_planted_cells`` of ``planted_region``), units by channel."""
    from dnd.toyworld.planted import planted_region, units_of

    images = np.empty((len(seeds), 64, 64, 3), dtype=np.uint8)
    specs = []
    cells = {layer: np.empty((len(seeds), len(units_of(layer, units)), g, g),
                             dtype=np.uint8)
             for layer, g in grids.items()}
    for i, seed in enumerate(seeds):
        scene = render_scene(seed)
        images[i] = np.asarray(scene.image)
        specs.append(scene.description)
        for layer, grid in grids.items():
            for j, unit in enumerate(units_of(layer, units)):
                cells[layer][i, j] = _planted_cells(planted_region(unit, scene), grid,
                                                    unit.kind == "compositional")
    return images, specs, cells


def _positive_weight(positive: torch.Tensor, valid: torch.Tensor, dims) -> torch.Tensor:
    """(1 - rate) / rate of positives among valid entries over ``dims``, at most
    MAX_POS_WEIGHT: balances rare positives against the many negatives."""
    rate = (positive & valid).sum(dims) / valid.sum(dims).clamp(min=1)
    return ((1.0 - rate) / rate.clamp(min=1e-3)).clamp(max=MAX_POS_WEIGHT)


def train_planted(args: argparse.Namespace, units: Sequence[PlantedUnit] | None = None
                  ) -> dict:
    """Train ToyCNN on the classification task plus the planted units' loss (weight
    ``args.planted_weight``) for every unit of ``units`` (None: those of the spec file
    ``args.spec`` when it is set, else ``dnd.toyworld.planted.PLANTED``).

    A unit's logits are its pre-ReLU map (the block's BatchNorm output, max-pooled like the
    block's output so the cells are those the pipeline sees). Its loss is binary
    cross-entropy of (a) the map's spatial max against ``planted_indicator`` and (b) every
    cell against the unit's region (``planted_region``: 1 on it, 0 off it, see
    ``_planted_cells``), plus (c) the squared distance of a firing scene's peak to
    ``PEAK_LEVEL``. A negative scene is pushed below zero at every cell, so after the ReLU
    its map is (nearly) zero and both summaries rank it below firing scenes; (b) also
    teaches where to fire, which (a) alone learned too slowly; (c) makes every concept of
    a unit peak at the same level (without it, a polysemantic unit's rare concept, e.g.
    "red circle" beside "striped", peaked ~20x lower and never reached its top images).
    Positives are weighted by (1 - rate) / rate, at most ``MAX_POS_WEIGHT``: unweighted,
    the rare positives lose to a constant logit, reached by shrinking the BatchNorm scale
    to ~0 (units stuck silent). Returns the metrics written with the weights, with each
    unit's held-out AP (``planted.planted_report``) and the spec file it came from.
    """
    from dnd.toyworld.planted import (
        SUMMARY,
        indicator_matrix,
        planted_layers,
        planted_report,
        units_of,
    )

    spec = getattr(args, "spec", None)
    if units is None:
        # Loaded before anything is rendered, so a bad spec fails in a second.
        units = load_spec(spec) if spec else PLANTED
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # parameter init has no generator argument
    model = ToyCNN()
    layers = planted_layers(units)
    blocks = {layer: model.get_submodule(layer) for layer in layers}
    with torch.no_grad():  # each planted layer's output grid, from one blank image
        grids = {}
        handles = [blocks[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: grids.__setitem__(layer, out.shape[-1]))
            for layer in layers]
        model(torch.zeros(1, 3, 64, 64))
        for handle in handles:
            handle.remove()
    images, specs, cells = _render_planted_dataset(range(args.n_train), grids, units)
    labels = _class_labels(specs)
    channels = {layer: torch.tensor([u.unit for u in units_of(layer, units)])
                for layer in layers}
    truth = {layer: torch.from_numpy(indicator_matrix(units_of(layer, units), specs))
             for layer in layers}
    cells = {layer: torch.from_numpy(c) for layer, c in cells.items()}
    image_weight = {layer: _positive_weight(t, torch.ones_like(t), 0)
                    for layer, t in truth.items()}
    cell_weight = {layer: _positive_weight(c == 1, c != IGNORE, (0, 2, 3))[:, None, None]
                   for layer, c in cells.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps)

    # The planted channels' logits are taken inside the BatchNorm's hook: the block's ReLU
    # runs in place right after and would overwrite the pre-ReLU values.
    logits: dict[str, torch.Tensor] = {}

    def keep(layer: str, out: torch.Tensor) -> None:
        z = out[:, channels[layer]]
        pooled = any(isinstance(m, torch.nn.MaxPool2d) for m in blocks[layer])
        logits[layer] = F.max_pool2d(z, 2) if pooled else z

    handles = [blocks[layer][1].register_forward_hook(
        lambda _m, _i, out, layer=layer: keep(layer, out)) for layer in layers]
    try:
        model.train()
        for step, idx in enumerate(_batches(len(images), args.batch_size, args.steps,
                                            generator)):
            loss = F.cross_entropy(model(preprocess(images[idx])), labels[idx])
            for layer in layers:
                z, target, fires = logits[layer], cells[layer][idx], truth[layer][idx]
                valid = (target != IGNORE).float()
                peak = z.amax((2, 3))
                detect = F.binary_cross_entropy_with_logits(
                    peak, fires.float(), pos_weight=image_weight[layer])
                dense = F.binary_cross_entropy_with_logits(
                    z, (target == 1).float(), weight=valid, pos_weight=cell_weight[layer],
                    reduction="sum") / valid.sum().clamp(min=1)
                level = (((peak - PEAK_LEVEL) / PEAK_LEVEL) ** 2)[fires].mean() if fires.any() \
                    else peak.new_zeros(())
                loss = loss + args.planted_weight * (detect + dense + level)
            _update("planted", step, args.steps, loss, optimizer, schedule)
    finally:
        for handle in handles:
            handle.remove()

    heldout = range(HELDOUT_START, HELDOUT_START + args.n_eval)
    eval_images, eval_specs = _render_dataset(heldout)
    acc = accuracy(model, eval_images, _class_labels(eval_specs))
    report = planted_report(model, eval_images, eval_specs, units)
    seconds = time.perf_counter() - started
    for u in report:
        print(f"  {u['layer']}:{u['unit']:<3d} {u['kind']:14s} {' | '.join(u['concepts']):22s} "
              f"rate {u['positive_rate']:.3f}  AP mean {u['ap_mean']:.3f}  "
              f"max {u['ap_max']:.3f}")
    print(f"planted held-out accuracy {acc:.4f}, lowest unit AP ({SUMMARY} summary) "
          f"{np.nanmin([u['ap'] for u in report]):.3f} on {args.n_eval} renders; "
          f"{seconds:.0f} s")
    metrics = {"heldout_accuracy": acc, "planted_weight": args.planted_weight,
               **_run_record(args, heldout, args.lr, seconds),
               # The spec the units came from (None: PLANTED); the units themselves are
               # what the benchmark checks (dnd.benchmarks.planted.check_trained_for_planted).
               "planted_spec": str(spec) if spec else None, "planted_units": report}
    save_toy_cnn(model, args.out, {"training": metrics}, stem=PLANTED_STEM)
    return metrics


TRAINERS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "target": train_target, "clip": train_clip, "planted": train_planted,
}
DEFAULT_STEPS = {"target": 800, "clip": 2000, "planted": 2000}


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    """CLI entry point; returns each trained model's metrics by name."""
    parser = argparse.ArgumentParser(prog="python -m dnd.toyworld.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(TRAINERS), action="append",
                        help="train only this model (repeatable); default: all")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimiser steps (default per model: {DEFAULT_STEPS})")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and batch order")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, target")
    parser.add_argument("--clip-lr", type=float, default=1e-3, help="peak learning rate, clip")
    parser.add_argument("--planted-weight", type=float, default=1.0,
                        help="weight of the planted units' loss next to classification, planted")
    parser.add_argument("--n-train", type=int, default=16_000, help="training renders")
    parser.add_argument("--n-eval", type=int, default=2_000, help="held-out renders")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--spec", type=Path, default=None, metavar="FILE",
                        help="planted: plant the units of this YAML or JSON spec "
                        "(dnd.toyworld.planted.load_spec) instead of the committed PLANTED; "
                        "needs --only planted and, to keep the committed weights, an --out "
                        "folder of its own")
    args = parser.parse_args(argv)
    others = sorted(set(args.only or TRAINERS) - {"planted"})
    if args.spec is not None and others:
        parser.error(f"--spec sets the planted units and applies to `--only planted` alone, "
                     f"not to {', '.join(others)}: run `python -m dnd.toyworld.train --only "
                     f"planted --spec {args.spec} --out DIR`")
    if args.spec is not None and args.out.resolve() == WEIGHTS_DIR.resolve():
        parser.error(f"--spec {args.spec} would overwrite the committed weights (trained "
                     f"for PLANTED) in {WEIGHTS_DIR}: give --out DIR")
    torch.set_num_threads(args.threads)
    metrics = {}
    for name in args.only or sorted(TRAINERS):
        model_args = argparse.Namespace(**vars(args))
        model_args.steps = args.steps or DEFAULT_STEPS[name]
        metrics[name] = TRAINERS[name](model_args)
    return metrics


if __name__ == "__main__":
    main()
