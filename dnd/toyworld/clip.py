"""A tiny CLIP for the toy world (open_clip ``CLIP``), trained on renders + captions.

It is saved as an open_clip ``local-dir`` folder (``open_clip_config.json``,
``open_clip_model.safetensors`` and the tokenizer files), so it loads like any open_clip
model: ``open_clip.create_model_and_transforms("local-dir:<folder>")``.
Its tokenizer is a byte-level BPE with the usual CLIP conventions but only ~1,100 tokens,
learned from the toy world's own words, so the text tower stays tiny.

Importing this module registers ``toyworld-clip``: its image tower as a target
(:data:`dnd.target.TARGETS`) and the whole model for text feature visualization
(:data:`dnd.target.CLIP_MODELS`: with the words of its training captions,
:func:`toy_clip_words`, and the multimodal check, :mod:`dnd.toyworld.multimodal`).
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from dnd.io import bytes_hash
from dnd.target import CLIP_MODELS, TARGETS, ClipModel, Target, open_clip_target
from dnd.target.open_clip import whole_open_clip
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


def toy_clip_config(vocab_size: int, eos_token_id: int) -> dict:
    """open_clip ``model_cfg`` of the toy CLIP: a ResNet image tower (open_clip's
    ``ModifiedResNet`` with one bottleneck per stage, width 16, attention pooling) on 64-px
    images and a 3-layer, width-64 text transformer pooled at the first end-of-text token.

    A convolutional tower, because a ViT with 8-px patches trained from scratch on CPU did
    not learn shape across object colours (23.8% zero-shot main object after 30 minutes;
    ViT-only probes stayed near chance on 8 shapes whose colour varies).
    """
    return {
        "embed_dim": 64,
        "vision_cfg": {"layers": [1, 1, 1, 1], "width": 16, "head_width": 32,
                       "image_size": TOY_PREPROCESS["size"]},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": 64,
                     "heads": 4, "layers": 3, "pool_type": "eos", "eos_id": eos_token_id,
                     "pad_id": eos_token_id,
                     # Any name: with a local-dir model open_clip reads the tokenizer files
                     # saved beside the weights.
                     "hf_tokenizer_name": "toyworld-clip"},
    }


def build_model(model_cfg: dict):
    """A fresh open_clip ``CLIP`` from :func:`toy_clip_config`."""
    from open_clip.model import CLIP

    return CLIP(**model_cfg)


def tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids [len(texts), CONTEXT_LENGTH] padded with end-of-text, as open_clip's
    ``HFTokenizer`` makes them at inference."""
    return tokenizer(list(texts), padding="max_length", max_length=CONTEXT_LENGTH,
                     truncation=True, return_tensors="pt")["input_ids"]


def save_toy_clip(model, tokenizer, model_cfg: dict, out_dir: str | Path,
                  training: dict) -> Path:
    """Write an open_clip ``local-dir`` folder: ``open_clip_config.json`` (model and
    preprocessing), ``open_clip_model.safetensors``, the tokenizer files and
    ``training.json``. Loads with ``open_clip.create_model_and_transforms("local-dir:DIR")``.
    """
    import json

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = {"size": TOY_PREPROCESS["size"], "mean": list(TOY_PREPROCESS["mean"]),
                      "std": list(TOY_PREPROCESS["std"]), "interpolation": "bilinear",
                      "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    tokenizer.save_pretrained(str(out))
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return out


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
    """L2-normalised text embeddings [len(texts), embed_dim]; ``tokenizer`` is open_clip's
    (from :func:`load_toy_clip`) or the transformers one from :func:`build_tokenizer`."""
    ids = tokenizer(list(texts)) if hasattr(tokenizer, "context_length") else tokenize(
        tokenizer, texts)
    return model.encode_text(ids, normalize=True)


@torch.no_grad()
def embed_images(model, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings [n, embed_dim] of normalised pixels [n, 3, 64, 64]."""
    return torch.cat([model.encode_image(pixels[i : i + batch], normalize=True)
                      for i in range(0, len(pixels), batch)])


def zero_shot_accuracy(
    model, tokenizer, pixels: torch.Tensor, prompts: Sequence[str], labels: Iterable[int]
) -> float:
    """Top-1 accuracy of choosing ``labels`` [n] among ``prompts`` for images ``pixels``."""
    similarity = embed_images(model, pixels) @ embed_texts(model, tokenizer, prompts).T
    return float((similarity.argmax(1) == torch.as_tensor(list(labels))).float().mean())


def load_toy_clip(path: str | Path = CLIP_DIR):
    """The trained toy CLIP as open_clip components: (``CLIP`` in eval mode, image
    transform, tokenizer), ready for ``OpenClipEncoder(components=...)``. Raises if the
    tokenizer does not match the model."""
    import open_clip

    name = f"local-dir:{Path(path).resolve()}"
    model, _, transform = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    if len(tokenizer.tokenizer) != model.vocab_size:
        raise RuntimeError(f"tokenizer in {path} has {len(tokenizer.tokenizer)} tokens, the "
                           f"model {model.vocab_size}")
    return model.eval(), transform, tokenizer


# ---------------------------------------------------------------------------------------
# toyworld-clip in dnd's registries
# ---------------------------------------------------------------------------------------

TOY_CAPTION_SPECS = 600  # scenes whose training captions give the toy CLIP's words


@functools.lru_cache(maxsize=4)
def toy_clip_words(n_specs: int = TOY_CAPTION_SPECS) -> frozenset[str]:
    """The words of the toy CLIP's training captions (made as its training makes them, for
    ``n_specs`` random scenes; 400 already give all 104). Its tokenizer also holds BPE
    merge pieces ("eaturing") and plurals that never occur in a caption: their embeddings
    were never trained and score like random vectors, so the text search leaves them out."""
    from dnd.toyworld.render import sample_spec

    rng = np.random.default_rng(0)
    words: set[str] = set()
    for _ in range(n_specs):
        spec = sample_spec(rng, 64)
        for kind in CAPTION_KINDS:
            for caption in training_caption(spec, kind, rng):
                words.update(re.findall(r"[a-z]+", caption))
    return frozenset(words)


def _committed_id() -> str:
    """The committed weights' id: the file's hash, as for the toy CNNs (not the folder's
    absolute path)."""
    data = (CLIP_DIR / "open_clip_model.safetensors").read_bytes()
    return f"toyworld-clip.committed:{bytes_hash(data)}"


@TARGETS.register("toyworld-clip")
def _toyworld_clip(weights: str = "DEFAULT") -> Target:
    """The toy CLIP's image tower (an open_clip ``ModifiedResNet`` on 64-px renders) with the
    preprocessing saved in its folder (``DEFAULT``: the committed weights; ``none``: random;
    or a weights file). Layers ``layer1``..``layer4``, ``attnpool`` (the image embedding)."""
    target = open_clip_target(f"local-dir:{CLIP_DIR.resolve()}", weights)
    target.name = "toyworld-clip"
    if weights == "DEFAULT":
        target.weights_id = _committed_id()
    return target


@CLIP_MODELS.register("toyworld-clip")
def _toyworld_clip_model(weights: str = "DEFAULT") -> ClipModel:
    """The whole toy CLIP behind the ``toyworld-clip`` target (the same image tower and
    identity), its vocabulary and the multimodal check its renderer can draw."""
    from dnd.toyworld.multimodal import run_check

    clip = whole_open_clip(f"local-dir:{CLIP_DIR.resolve()}", weights, name="toyworld-clip",
                           weights_id=_committed_id() if weights == "DEFAULT" else None)
    clip.words = toy_clip_words()
    clip.multimodal = run_check
    return clip

