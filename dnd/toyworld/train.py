"""Train the toy world's models from seeds and write their weights.

    python -m dnd.toyworld.train [--only target|clip] [--steps N] [--out DIR] [--seed S]

Training scenes are seeds ``0 .. n_train-1``; held-out scenes start at ``HELDOUT_START``,
so the printed held-out accuracy is measured on renders never seen in training.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from dnd.toyworld.render import render_scene
from dnd.toyworld.target import (
    CLASS_NAMES,
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
    order = torch.randperm(len(images), generator=generator)
    position = 0
    for step in range(args.steps):
        if position + args.batch_size > len(order):
            order, position = torch.randperm(len(images), generator=generator), 0
        idx = order[position : position + args.batch_size].numpy()
        position += args.batch_size
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


TRAINERS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "target": train_target, "clip": train_clip,
}
DEFAULT_STEPS = {"target": 800, "clip": 2000}


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
    parser.add_argument("--n-train", type=int, default=16_000, help="training renders")
    parser.add_argument("--n-eval", type=int, default=2_000, help="held-out renders")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = {}
    for name in args.only or sorted(TRAINERS):
        model_args = argparse.Namespace(**vars(args))
        model_args.steps = args.steps or DEFAULT_STEPS[name]
        metrics[name] = TRAINERS[name](model_args)
    return metrics


if __name__ == "__main__":
    main()
