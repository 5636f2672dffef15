"""A tiny CLIP for the toy world (transformers ``CLIPModel``), trained on renders + captions.

It is saved as an ordinary transformers folder (``config.json``, ``model.safetensors``, the
tokenizer and the image processor), so any code that loads a CLIP with
``CLIPModel.from_pretrained(path)`` / ``CLIPProcessor.from_pretrained(path)`` can use it.
Its tokenizer is a byte-level BPE with the usual CLIP conventions but only ~1,100 tokens,
learned from the toy world's own words, so the text tower stays tiny.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from dnd.toyworld.generator import SIZE_WORDS, STOPWORDS
from dnd.toyworld.render import compose_caption
from dnd.toyworld.target import CLASS_NAMES, TOY_PREPROCESS, WEIGHTS_DIR
from dnd.toyworld.world import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    SYNONYMS,
    WORDS,
    SceneSpec,
)

CLIP_DIR = WEIGHTS_DIR / "toy_clip"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 32
SYNONYM_PROBABILITY = 0.3  # captions say "crimson disc" for "red circle" this often


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def world_words() -> collections.Counter:
    """Word counts of the toy world's language: captions, synonyms, prompt templates."""
    counts: collections.Counter = collections.Counter()
    phrases = [*(s for syns in SYNONYMS.values() for s in syns), *BACKGROUND_COLOURS, *WORDS,
               *SIZE_WORDS, *STOPWORDS, "grey", "the word", "a picture of", "there is",
               "in front of", "background"]
    for phrase in phrases:
        counts.update(phrase.split())
    # Plurals ("red discs") appear in free-text concepts; one token each keeps them cheap.
    counts.update(w + ("es" if w.endswith(("s", "x")) else "s")
                  for syns in SYNONYMS.values() for s in syns for w in s.split())
    return counts


def learn_merges(counts: collections.Counter) -> list[tuple[str, str]]:
    """Classic BPE (Sennrich et al.): merge the most frequent adjacent pair until every
    word of ``counts`` is one token. Ties break alphabetically, so the result is fixed."""
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in counts.items()}
    merges = []
    while True:
        pairs: collections.Counter = collections.Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):  # noqa: B905 - pairs of neighbours
                pairs[pair] += n
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, n in words.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = n
        words = merged


def build_tokenizer():
    """A ``CLIPTokenizer`` over the world's words (bytes + merges; ids 0/1 = BOS/EOS)."""
    from transformers import CLIPTokenizer

    merges = learn_merges(world_words())
    byte_chars = list(_bytes_to_unicode().values())
    tokens = [BOS, EOS, *byte_chars, *(c + "</w>" for c in byte_chars), *(a + b for a, b in merges)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges,
                              model_max_length=CONTEXT_LENGTH)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


def toy_clip_config(vocab_size: int, eos_token_id: int, bos_token_id: int):
    """A ``CLIPConfig`` for 64-px images: ViT 8-px patches, width 64, 3 layers per tower."""
    from transformers import CLIPConfig

    tower = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
             "num_attention_heads": 4}
    return CLIPConfig(
        text_config={**tower, "vocab_size": vocab_size, "max_position_embeddings": CONTEXT_LENGTH,
                     "eos_token_id": eos_token_id, "bos_token_id": bos_token_id,
                     "pad_token_id": eos_token_id},
        vision_config={**tower, "image_size": TOY_PREPROCESS["size"], "patch_size": 8},
        projection_dim=64,
    )


def build_processor(tokenizer):
    """A ``CLIPProcessor`` with the toy world's image size and mean/std."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    size = TOY_PREPROCESS["size"]
    images = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(TOY_PREPROCESS["mean"]), image_std=list(TOY_PREPROCESS["std"]),
    )
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


# Caption kinds of a training batch, with their probabilities. Whole-scene captions alone
# let the model match a caption by its background and word and never learn which colour
# goes with which shape; batches of main-object-only captions force it to.
CAPTION_KINDS = {"scene": 0.4, "object": 0.4, "background": 0.2}


def training_caption(spec: SceneSpec, kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """(canonical caption, the same with words sometimes swapped for synonyms) of ``spec``.

    ``kind``: "scene" (objects, background, word), "object" (main object only) or
    "background". Equal canonical captions mark the positive pairs of a batch.
    """
    if kind == "scene":
        word = spec.text.word if spec.text else None
        caption = compose_caption(spec.objects, spec.background, word,
                                  template=int(rng.integers(4)), with_size=bool(rng.random() < 0.5))
    elif kind == "object":
        caption = compose_caption([spec.main_object], spec.background, None).split(" on ")[0]
    else:
        caption = compose_caption([], spec.background, None)
    words = caption.split(" ")
    for i, word in enumerate(words):
        if word in SYNONYMS and rng.random() < SYNONYM_PROBABILITY:
            options = SYNONYMS[word]
            words[i] = options[int(rng.integers(len(options)))]
    # "an" before a swapped consonant reads oddly but carries no concept; keep it simple.
    return caption, " ".join(words)


def multi_positive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss where several captions may be true of an image.

    ``logits`` [B, B] image x text; ``positive`` bool [B, B] (symmetric, diagonal True).
    """
    target = positive.float() / positive.sum(1, keepdim=True)
    image_to_text = torch.nn.functional.cross_entropy(logits, target)
    text_to_image = torch.nn.functional.cross_entropy(logits.T, target)
    return (image_to_text + text_to_image) / 2


def class_prompts() -> list[str]:
    """Zero-shot prompts, one per ``CLASS_NAMES`` entry ("a red circle")."""
    return [("an " if name[0] in "aeiou" else "a ") + name for name in CLASS_NAMES]


def background_prompts() -> list[str]:
    """Zero-shot prompts, one per background kind ("a striped background")."""
    return [f"a {kind} background" for kind in BACKGROUND_KINDS]


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text embeddings [len(texts), projection_dim]."""
    batch = tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")
    out = model.get_text_features(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"])
    features = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(features, dim=-1)


@torch.no_grad()
def embed_images(model, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings [n, projection_dim] of normalised pixels [n, 3, 64, 64]."""
    chunks = []
    for i in range(0, len(pixels), batch):
        out = model.get_image_features(pixel_values=pixels[i : i + batch])
        chunks.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


def zero_shot_accuracy(
    model, tokenizer, pixels: torch.Tensor, prompts: Sequence[str], labels: Iterable[int]
) -> float:
    """Top-1 accuracy of choosing ``labels`` [n] among ``prompts`` for images ``pixels``."""
    similarity = embed_images(model, pixels) @ embed_texts(model, tokenizer, prompts).T
    return float((similarity.argmax(1) == torch.as_tensor(list(labels))).float().mean())


def load_toy_clip(path: str | Path = CLIP_DIR):
    """The trained toy CLIP: (``CLIPModel`` in eval mode, ``CLIPProcessor``)."""
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(str(path))
    if len(processor.tokenizer) != CLIPModel.config_class.from_pretrained(
        str(path)
    ).text_config.vocab_size:
        raise RuntimeError(f"tokenizer in {path} does not match the model (offline load?)")
    return CLIPModel.from_pretrained(str(path)).eval(), processor
