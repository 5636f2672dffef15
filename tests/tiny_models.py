"""Tiny random-weight models and tokenizers, built offline from configs in a few seconds.

They exercise the real code paths of the backends (tokenizers, preprocessing, pipelines)
without any download. Outputs are meaningless but deterministic: every builder seeds torch.

Builders:
  - ``tiny_clip_tokenizer_dir(tmp)``: a byte-level BPE ``CLIPTokenizer`` folder.
  - ``tiny_sd_pipeline(tmp)``: a ``StableDiffusionPipeline`` on 32x32 images.
  - ``tiny_hf_clip(tmp)`` / ``tiny_hf_clip_dir(tmp)``: transformers CLIP model, image
    processor and tokenizer.
  - ``tiny_open_clip(tmp)`` / ``tiny_open_clip_dir(tmp)``: open_clip model, preprocess, tokenizer.
  - ``tiny_chat_model_dir(tmp)``: a chat LLM folder (Llama + word-level tokenizer).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

# Words whose BPE merges the tiny vocabularies contain, so common prompts tokenise into
# whole words rather than single bytes (either works; this just looks like a real vocab).
WORDS = ("a", "an", "the", "of", "photo", "image", "realistic", "red", "green", "blue",
         "circle", "square", "dog", "cat", "stripes", "background")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SD_SIZE = 32  # pixels; the tiny VAE halves once, so latents are 16x16


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (256 entries)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_merges() -> list[tuple[str, str]]:
    """Left-to-right BPE merges that build each word of ``WORDS`` (with ``</w>``)."""
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = ["".join(pair)] + symbols[2:]
    return merges


def _bpe_vocab(merges: list[tuple[str, str]], specials: list[str]) -> list[str]:
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    return list(dict.fromkeys(vocab + specials))


def tiny_clip_tokenizer_dir(tmp: str | Path) -> Path:
    """Write vocab.json + merges.txt for ``CLIPTokenizer.from_pretrained`` (~570 tokens).

    The special tokens come last, so ``<|endoftext|>`` has the highest id (CLIP pools the
    text at the end token).
    """
    out = Path(tmp) / "clip_tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    merges = tiny_merges()
    vocab = _bpe_vocab(merges, [BOS, EOS])
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n")
    return out


def tiny_clip_tokenizer(tmp: str | Path):
    """The tokenizer of :func:`tiny_clip_tokenizer_dir`, loaded (max length 16)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_clip_tokenizer_dir(tmp), model_max_length=16)
    assert len(tok) > 500, f"tiny CLIP tokenizer came out with {len(tok)} tokens"
    return tok


def _tiny_text_config(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=tok.model_max_length,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def tiny_sd_pipeline(tmp: str | Path):
    """A ``StableDiffusionPipeline`` of tiny random parts; 32x32 images, DPM-Solver.

    UNet (32, 64) channels with cross-attention width 32, a one-downsample VAE, a 2-layer
    CLIP text encoder and the tiny tokenizer. Safety checker off (nothing to check).
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = tiny_clip_tokenizer(tmp)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SD_SIZE // 2,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32,
        sample_size=SD_SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_text_config(tok)))
    # Stable Diffusion v1's schedule (steps_offset=1 as its config has; 0 draws a warning).
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hf_clip(tmp: str | Path):
    """``(CLIPModel, CLIPImageProcessor, CLIPTokenizer)``: 2-layer towers of width 32,
    embeddings of 24, 32x32 images, 16 tokens."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tok = tiny_clip_tokenizer(tmp)
    config = CLIPConfig(
        text_config=_tiny_text_config(tok),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=24,
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config).eval(), images, tok


def tiny_hf_clip_dir(tmp: str | Path) -> Path:
    """:func:`tiny_hf_clip` saved to a folder that ``from_pretrained`` loads."""
    out = Path(tmp) / "hf_clip"
    for part in tiny_hf_clip(tmp):
        part.save_pretrained(out)
    return out


def tiny_open_clip_dir(tmp: str | Path) -> Path:
    """A ``local-dir:`` open_clip folder: config (ViT width 32, 2 layers, patch 8, 32x32
    images; text width 32, 2 layers, 16 tokens) and a small gzipped BPE file for its
    ``SimpleTokenizer`` (~570 tokens instead of 49,408). No weights: random init."""
    from open_clip.tokenizer import SimpleTokenizer

    out = Path(tmp) / "open_clip"
    out.mkdir(parents=True, exist_ok=True)
    merges = tiny_merges()
    bpe = out / "bpe_tiny.txt.gz"
    # SimpleTokenizer skips the first line (a version header) of the merges file and reads
    # every later line, a trailing empty one included, so the file must not end in "\n".
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    vocab_size = SimpleTokenizer(bpe_path=str(bpe)).vocab_size
    model_cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8,
                       "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": vocab_size, "width": 32, "heads": 4,
                     "layers": 2, "tokenizer_kwargs": {"bpe_path": str(bpe)}},
    }
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return out


def tiny_open_clip(tmp: str | Path):
    """``(model, preprocess, tokenizer)`` of :func:`tiny_open_clip_dir`, in eval mode."""
    import open_clip

    torch.manual_seed(0)
    name = f"local-dir:{tiny_open_clip_dir(tmp)}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def tiny_chat_model():
    """A random-weight Llama (width 16, 1 layer) and a word-level tokenizer (``w0`` ...
    ``w54``, ``hello``, ``caption``, ``concept``) with a chat template, built offline.
    Special tokens and line breaks are suppressed, so every reply has exactly its token cap
    of words. Returns (model, tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "system", "user", "assistant", ":", "\n"]
    words += [f"w{i}" for i in range(55)] + ["hello", "caption", "concept"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n "
        "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.generation_config.suppress_tokens = [0, 1, 2, 3, 8]
    return model, tokenizer


def tiny_chat_model_dir(tmp: str | Path) -> Path:
    """A folder that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load, holding
    :func:`tiny_chat_model`."""
    model, tokenizer = tiny_chat_model()
    out = Path(tmp) / "tiny_chat"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
