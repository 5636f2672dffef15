"""A tiny BLIP captioner for the toy world (transformers ``BlipForConditionalGeneration``).

Trained on freshly rendered scenes and on crops of them, so it captions both whole images
("a red circle and a small blue star on a striped gray background") and the attention crops
the pipeline feeds it. Saved as an ordinary transformers folder (``config.json``,
``model.safetensors``, word-level ``vocab.txt`` + tokenizer and image-processor files), so it
loads like any BLIP checkpoint and plugs into ``TransformersCaptioner``.

The committed weights were trained in five runs, each continuing the previous one
(``training.json`` nests the earlier runs' records; 27,000 steps, about 2.5 CPU-hours in
all). Shape is learnt late: the held-out colour+shape accuracy went 0.48 -> 0.52 -> 0.92
-> 0.96 -> 0.97 over the five:

    python -m dnd.toyworld.blip --threads 1 --steps 4000 --out /tmp/toy_blip_stage1
    python -m dnd.toyworld.blip --threads 1 --steps 3000 --lr 1e-3
        --init /tmp/toy_blip_stage1 --out /tmp/toy_blip_stage2   (one line)
    python -m dnd.toyworld.blip --threads 1 --steps 11000 --lr 5e-4
        --init /tmp/toy_blip_stage2 --out /tmp/toy_blip_stage3   (one line)
    python -m dnd.toyworld.blip --threads 1 --steps 5000 --lr 3e-4
        --init /tmp/toy_blip_stage3 --out /tmp/toy_blip_stage4   (one line)
    python -m dnd.toyworld.blip --threads 1 --steps 4000 --lr 2e-4
        --init /tmp/toy_blip_stage4 --out dnd/toyworld/weights/toy_blip   (one line)
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dnd.toyworld.render import Box, Scene, caption_region, compose_caption, render_scene
from dnd.toyworld.target import TOY_PREPROCESS, WEIGHTS_DIR
from dnd.toyworld.world import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOURS,
    SHAPES,
    STRIPE_ORIENTATIONS,
    WORDS,
    Background,
    SceneObject,
)

WEIGHTS = WEIGHTS_DIR / "toy_blip"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
HELDOUT_START = 10_000_000  # evaluation seeds; training scene seeds stay below this
MAX_TEXT_TOKENS = 40  # longest caption (3 objects with sizes, a word) is ~32 tokens + specials
MAX_NEW_TOKENS = 36
MIN_LENGTH = 3
# Share of each training batch: whole scenes, crops around one object, random crops.
MIX = (0.5, 0.25, 0.25)
MIN_CROP = 12  # px, smallest side of a random training crop of a 64-px scene


# ---------------------------------------------------------------------------- vocabulary


def caption_words(caption: str) -> list[str]:
    """Lower-cased words and punctuation marks, split as BERT's pre-tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]", caption.lower())


def grammar_captions() -> list[str]:
    """Captions exercising every word of the caption grammar (``render.compose_caption``).

    Every shape x colour x size object, background kind x colour and word appears in some
    caption, with every sentence template, with and without sizes.
    """
    objects = [SceneObject(shape, colour, size, (0, 0), 1, (0, 0, 1, 1))
               for shape, colour, size in itertools.product(
                   SHAPES, COLOURS, ("small", "medium", "large"))]
    backgrounds = [Background(kind, colour, STRIPE_ORIENTATIONS[0] if kind == "striped" else "")
                   for kind, colour in itertools.product(BACKGROUND_KINDS, BACKGROUND_COLOURS)]
    words = [None, *WORDS]
    captions = []
    for template, with_size in itertools.product(range(4), (False, True)):
        for i, obj in enumerate(objects):
            group = [obj, objects[(i + 1) % len(objects)], objects[(i + 2) % len(objects)]]
            captions.append(compose_caption(group, backgrounds[i % len(backgrounds)],
                                            words[i % len(words)], template, with_size))
    captions += [compose_caption([], bg, None) for bg in backgrounds]
    return captions


def build_vocabulary() -> list[str]:
    """Specials followed by the grammar's words in sorted order (BERT vocab.txt order)."""
    words = {w for caption in grammar_captions() for w in caption_words(caption)}
    return [*SPECIALS, *sorted(words)]


def build_processor(folder: Path):
    """Write ``vocab.txt`` into ``folder`` and return a ``BlipProcessor`` over it.

    The tokenizer is loaded from the folder because transformers v5 silently ignores
    ``BertTokenizer(vocab_file=...)``; its size is checked against the vocabulary.
    """
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    vocab = build_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(folder), bos_token="[DEC]",
                                              model_max_length=MAX_TEXT_TOKENS)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    size = TOY_PREPROCESS["size"]
    images = BlipImageProcessor(size={"height": size, "width": size},
                                image_mean=list(TOY_PREPROCESS["mean"]),
                                image_std=list(TOY_PREPROCESS["std"]))
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


def toy_blip_config(tokenizer):
    """A ``BlipConfig``: ViT on 64-px images with 8-px patches, width 96, 3 layers per tower."""
    from transformers import BlipConfig

    tower = {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 3,
             "num_attention_heads": 4}
    ids = dict(zip(SPECIALS, tokenizer.convert_tokens_to_ids(list(SPECIALS))))
    return BlipConfig(
        vision_config={**tower, "image_size": TOY_PREPROCESS["size"], "patch_size": 8},
        text_config={**tower, "vocab_size": len(tokenizer), "encoder_hidden_size": 96,
                     "max_position_embeddings": MAX_TEXT_TOKENS,
                     "bos_token_id": ids["[DEC]"], "sep_token_id": ids["[SEP]"],
                     "eos_token_id": ids["[SEP]"], "pad_token_id": ids["[PAD]"]},
        projection_dim=96,
    )


# ---------------------------------------------------------------------------- data


def object_box(scene: Scene, index: int, margin: float) -> Box:
    """Box around object ``index``'s bbox grown by ``margin`` x its side, clipped, in px."""
    x0, y0, x1, y1 = scene.description.objects[index].bbox
    size = scene.description.size
    pad = round(margin * max(x1 - x0, y1 - y0))
    return max(0, x0 - pad), max(0, y0 - pad), min(size, x1 + pad), min(size, y1 + pad)


def random_box(rng: np.random.Generator, size: int) -> Box:
    """A uniformly placed box with sides in [MIN_CROP, size] px."""
    w, h = (int(rng.integers(MIN_CROP, size + 1)) for _ in range(2))
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    return x0, y0, x0 + w, y0 + h


def training_sample(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One (image, caption) pair from ``scene``: the whole scene with its own caption, or a
    crop (of any size; the processor resizes it) captioned by ``caption_region``."""
    kind = rng.choice(len(MIX), p=MIX)
    if kind == 0:
        return scene.image, scene.caption
    if kind == 1:
        index = int(rng.integers(len(scene.description.objects)))
        box = object_box(scene, index, float(rng.uniform(0.0, 0.8)))
    else:
        box = random_box(rng, scene.description.size)
    return scene.image.crop(box), caption_region(scene, box)


def encode_batch(processor, images: Sequence[Image.Image], captions: Sequence[str]) -> dict:
    """Model inputs with labels: pixel_values [B, 3, 64, 64], input_ids / labels [B, T].

    Captions start with [DEC] instead of [CLS] because ``generate`` starts from [DEC]; the
    labels are the ids with padding ignored (-100). The model shifts them itself.
    """
    inputs = processor(images=list(images), text=list(captions), padding=True,
                       return_tensors="pt")
    input_ids = inputs["input_ids"]
    input_ids[:, 0] = processor.tokenizer.bos_token_id
    labels = input_ids.masked_fill(input_ids == processor.tokenizer.pad_token_id, -100)
    return {"pixel_values": inputs["pixel_values"], "input_ids": input_ids,
            "attention_mask": inputs["attention_mask"], "labels": labels}


# ---------------------------------------------------------------------------- evaluation


def parse_caption(caption: str) -> dict[str, str | None]:
    """The first object's colour and shape and the background kind a caption names.

    Scene captions list the main object first; a background with no kind word is "plain".
    Missing parts are None.
    """
    words = re.findall(r"\w+", caption.lower())
    colour = shape = kind = None
    for first, second in zip(words, words[1:]):
        if first in COLOURS and second in SHAPES:
            colour, shape = first, second
            break
    if "background" in words:
        i = words.index("background")
        if i >= 1 and words[i - 1] in BACKGROUND_COLOURS:
            kind = words[i - 2] if i >= 2 and words[i - 2] in BACKGROUND_KINDS else "plain"
    return {"colour": colour, "shape": shape, "kind": kind}


def single_object_crops(scenes: Sequence[Scene], rng: np.random.Generator
                        ) -> list[tuple[Image.Image, SceneObject]]:
    """One crop per scene around a random object whose region caption names only it."""
    crops = []
    for scene in scenes:
        index = int(rng.integers(len(scene.description.objects)))
        box = object_box(scene, index, float(rng.uniform(0.1, 0.5)))
        obj = scene.description.objects[index]
        if caption_region(scene, box) == compose_caption([obj], scene.description.background,
                                                         None):
            crops.append((scene.image.crop(box), obj))
    return crops


def caption_accuracy(captioner, n: int, seed: int = HELDOUT_START) -> dict:
    """Attribute accuracy of ``captioner`` on ``n`` renders of seeds ``seed .. seed+n-1``.

    ``attribute_accuracy``: fraction of images whose caption names the main object's colour
    AND shape (as its first object); ``background_kind_accuracy``: fraction naming the
    background kind; ``crop_attribute_accuracy``: the same as the first on crops around one
    object (``n_crops`` of them, any size, from the same scenes).
    """
    scenes = [render_scene(s) for s in range(seed, seed + n)]
    captions = captioner.caption([scene.image for scene in scenes])
    parsed = [parse_caption(c) for c in captions]
    mains = [scene.description.main_object for scene in scenes]
    attributes = [p["colour"] == o.colour and p["shape"] == o.shape
                  for p, o in zip(parsed, mains)]
    kinds = [p["kind"] == scene.description.background.kind
             for p, scene in zip(parsed, scenes)]
    crops = single_object_crops(scenes, np.random.default_rng(seed))
    crop_parsed = [parse_caption(c) for c in captioner.caption([im for im, _ in crops])]
    crop_attributes = [p["colour"] == o.colour and p["shape"] == o.shape
                       for p, (_, o) in zip(crop_parsed, crops)]
    return {
        "attribute_accuracy": float(np.mean(attributes)),
        "background_kind_accuracy": float(np.mean(kinds)),
        "crop_attribute_accuracy": float(np.mean(crop_attributes)) if crops else float("nan"),
        "n_images": n,
        "n_crops": len(crops),
        "seeds": [seed, seed + n],
        "examples": [[s.caption, c] for s, c in zip(scenes[:5], captions[:5])],
    }


# ---------------------------------------------------------------------------- training


def train_blip(out_dir: Path, steps: int, seed: int = 0, *, batch_size: int = 48,
               lr: float = 2e-3, n_eval: int = 500, init: Path | None = None,
               log_every: int | None = None) -> dict:
    """Train the tiny BLIP for ``steps`` AdamW steps of ``batch_size`` fresh samples and
    save it (safetensors + processor + ``training.json``) into ``out_dir``.

    Each step renders ``batch_size`` new scenes (consecutive seeds, all below
    ``HELDOUT_START``) and takes one sample per scene (see ``training_sample``); ``seed``
    fixes the initialisation and the crops. ``init``: a folder saved by this function to
    continue from; its scene seeds are not reused. Returns the metrics, with
    ``caption_accuracy`` on ``n_eval`` held-out renders (skipped when 0).
    """
    from transformers import BlipForConditionalGeneration

    started = time.perf_counter()
    out_dir = Path(out_dir)
    processor = build_processor(out_dir)
    torch.manual_seed(seed)  # parameter init has no generator argument
    if init is None:
        model, previous, first_seed = (
            BlipForConditionalGeneration(toy_blip_config(processor.tokenizer)), None, 0)
    else:
        model = load_toy_blip(init)[0].train()
        previous = json.loads((Path(init) / "training.json").read_text())
        first_seed = previous["train_scene_seeds"][1]
    stop_seed = first_seed + steps * batch_size
    if stop_seed > HELDOUT_START:
        raise ValueError("training scene seeds would reach the held-out seeds")
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps,
                                                   pct_start=0.1)
    log_every = log_every or max(1, steps // 20)

    model.train()
    losses = []
    for step in range(steps):
        scenes = (render_scene(first_seed + step * batch_size + i) for i in range(batch_size))
        images, captions = zip(*(training_sample(scene, rng) for scene in scenes))
        loss = model(**encode_batch(processor, images, captions)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(f"blip step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    model.eval()
    train_seconds = time.perf_counter() - started

    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
               "train_scene_seeds": [first_seed, stop_seed], "final_loss": losses[-1],
               "train_seconds": round(train_seconds, 1),
               "parameters": sum(p.numel() for p in model.parameters()),
               "init": None if init is None else str(init), "previous": previous}
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    if n_eval:
        captioner = toy_captioner(model=model, processor=processor, path=out_dir)
        metrics["caption_accuracy"] = caption_accuracy(captioner, n_eval)
    (out_dir / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ---------------------------------------------------------------------------- loading


def load_toy_blip(path: str | Path = WEIGHTS):
    """The trained toy BLIP: (``BlipForConditionalGeneration`` in eval mode,
    ``BlipProcessor``). Raises if the tokenizer does not match the model."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(str(path))
    model = BlipForConditionalGeneration.from_pretrained(str(path)).eval()
    if len(processor.tokenizer) != model.config.text_config.vocab_size:
        raise RuntimeError(f"tokenizer in {path} has {len(processor.tokenizer)} tokens, the "
                           f"model {model.config.text_config.vocab_size} (offline load?)")
    return model, processor


def toy_captioner(device: str = "cpu", *, path: str | Path = WEIGHTS, model=None,
                  processor=None, **kw):
    """A ``TransformersCaptioner`` over the toy BLIP at ``path`` (or the given model and
    processor). Toy captions are short: at most ``MAX_NEW_TOKENS`` new tokens."""
    from dnd.backends.caption import TransformersCaptioner

    if model is None or processor is None:
        model, processor = load_toy_blip(path)
    kw = {"max_new_tokens": MAX_NEW_TOKENS, "min_length": MIN_LENGTH, **kw}
    # The cache identity names the committed weights, not this machine's path to them.
    name = "toyworld-blip" if Path(path) == WEIGHTS else str(path)
    return TransformersCaptioner(name, model=model, processor=processor, device=device, **kw)


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI: train, evaluate on held-out renders and print the metrics."""
    parser = argparse.ArgumentParser(prog="python -m dnd.toyworld.blip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and crops")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--n-eval", type=int, default=500, help="held-out renders")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue training the model saved in this folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = train_blip(args.out, args.steps, args.seed, batch_size=args.batch_size,
                         lr=args.lr, n_eval=args.n_eval, init=args.init)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
