"""`dnd bench paper-scale`: stage throughput of the paper's model sizes, with random weights.

Speed does not depend on the weights' values, so the paper's architectures are built from
their configs (nothing is downloaded) with random weights: ResNet-50 as the target, BLIP
base as the captioner, Stable Diffusion v1-5 (UNet, VAE, CLIP ViT-L/14 text encoder) at
512x512 with DPM-Solver as the generator, and open_clip ViT-B/16 as the image-text encoder.
Captions have a fixed length (min = max new tokens) so random weights cannot end them early.

Measured, through the same backends ``dnd describe`` uses:
- target forward images/s (ResNet-50, the activation pass and re-scoring),
- captioned images/s (``TransformersCaptioner``),
- generated images/s (``DiffusersGenerator``) and, in the same run, raw diffusers
  throughput (one ``pipe(...)`` call per batch of prompts) for the same settings; our
  generation stage is reported as a fraction of it,
- CLIP-encoded images/s,
then the hours to describe 2,048 units projected from those rates (see
:func:`project_hours`). Meant for a GPU; ``--tiny`` builds the same pipeline with tiny
configs so the code path can be exercised on a CPU (its numbers mean nothing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Stable Diffusion v1-5 component configs (the published config.json values).
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
             "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
             "hidden_act": "quick_gelu", "projection_dim": 768}
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "steps_offset": 1}

# Tiny stand-ins with the same structure, for exercising the code on a CPU.
TINY_UNET = {**SD15_UNET, "block_out_channels": [32, 64], "attention_head_dim": 4,
             "cross_attention_dim": 32, "norm_num_groups": 8, "layers_per_block": 1,
             "sample_size": 16, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
TINY_VAE = {**SD15_VAE, "block_out_channels": [16, 32], "norm_num_groups": 8,
            "layers_per_block": 1, "sample_size": 32,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2}
TINY_TEXT = {**SD15_TEXT, "hidden_size": 32, "intermediate_size": 64,
             "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 32}

# Per-unit work at the paper's settings (ALGORITHM.md): K = 10 activating images captioned,
# about 5 candidates x Q = 10 generated images, and about 17 LLM calls (10 caption
# simplifications, T = 5 concept requests, ~2 merges).
CAPTIONS_PER_UNIT = 10
CANDIDATES_PER_UNIT = 5
IMAGES_PER_CONCEPT = 10
LLM_CALLS_PER_UNIT = 17


@dataclass(frozen=True)
class Rates:
    """Measured throughput, items per second."""

    target: float      # target forward passes (images)
    caption: float     # captioned images
    generate: float    # generated images (our stage)
    encode: float      # CLIP-encoded images


def project_hours(rates: Rates, *, units: int = 2048, probe_images: int = 50_000,
                  gen_dedupe: float = 1.0, llm_calls_per_s: float = 8.0) -> dict[str, float]:
    """Hours to describe ``units`` units, by stage, from measured ``rates``.

    Work: one activation pass over ``probe_images``; per unit, up to 50 crops re-scored by
    the target, ``CAPTIONS_PER_UNIT`` captions, ``CANDIDATES_PER_UNIT`` x
    ``IMAGES_PER_CONCEPT`` generated images divided by ``gen_dedupe`` (the share of
    generation requests that are unique across units is 1 / gen_dedupe), each generated
    image scored by the target and encoded by CLIP, and ``LLM_CALLS_PER_UNIT`` LLM calls
    at ``llm_calls_per_s`` (an API with 8 calls in flight at ~1 s each gives 8/s).
    """
    generated = units * CANDIDATES_PER_UNIT * IMAGES_PER_CONCEPT / gen_dedupe
    seconds = {
        "activations": probe_images / rates.target,
        "crops": units * 50 / rates.target,
        "captions": units * CAPTIONS_PER_UNIT / rates.caption,
        "candidates (LLM)": units * LLM_CALLS_PER_UNIT / llm_calls_per_s,
        "generation": generated / rates.generate,
        "scoring": generated / rates.target + generated / rates.encode,
    }
    hours = {k: v / 3600 for k, v in seconds.items()}
    hours["total"] = sum(hours.values())
    return hours


def _timed_rate(fn, n_items: int, repeats: int = 1) -> float:
    """Items per second of ``fn()`` (which handles ``n_items``), after one warm-up call."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n_items * repeats / (time.perf_counter() - start)


def build_sd_pipeline(tiny: bool = False):
    """A random-weight ``StableDiffusionPipeline`` with SD v1-5's components (or tiny ones)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from dnd.toyworld.clip import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    text = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else SD15_TEXT)))
    tokenizer = build_tokenizer()  # any CLIP BPE tokenizer: speed depends on length only
    tokenizer.model_max_length = 77
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text.eval(), tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def build_blip(tiny: bool = False, work_dir: str | Path = "."):
    """A random-weight BLIP base captioner (``BlipConfig()`` defaults: ViT-B/16 at 384 px,
    BERT-base decoder) and a processor over a synthetic vocabulary of the model's size."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    config = BlipConfig()
    if tiny:
        tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2}
        config = BlipConfig(vision_config={**tower, "image_size": 32, "patch_size": 8},
                            text_config={**tower, "encoder_hidden_size": 32})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab += [f"w{i}" for i in range(config.text_config.vocab_size - len(vocab))]
    folder = Path(work_dir) / "blip-vocab"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(folder), bos_token="[DEC]")
    size = config.vision_config.image_size
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": size, "width": size}),
        tokenizer=tokenizer)
    torch.manual_seed(0)
    return BlipForConditionalGeneration(config).eval(), processor


def build_open_clip(tiny: bool = False):
    """open_clip ViT-B/16 with random weights (model config and tokenizer ship with
    open_clip), or a tiny ViT."""
    import open_clip

    if tiny:
        from open_clip.model import CLIP

        model = CLIP(embed_dim=32, vision_cfg={"layers": 2, "width": 32, "head_width": 16,
                                               "patch_size": 8, "image_size": 32},
                     text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32,
                               "heads": 2, "layers": 2})
        preprocess = open_clip.image_transform(32, is_train=False)
    else:
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16",
                                                                     pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("ViT-B-16")


def measure(device: str = "cuda", *, tiny: bool = False, steps: tuple[int, ...] = (50, 20),
            gen_batch: int = 8, caption_batch: int = 64, work_dir: str | Path = ".",
            ) -> dict[str, Any]:
    """Build the paper-size models on ``device`` and measure every stage's throughput.

    Generation is measured at each of ``steps`` (paper: 50; a fast preset: 20) at 512x512
    (tiny: 32x32), guidance 7.5, ``gen_batch`` images per call, float16 on CUDA.
    """
    from torchvision.models import resnet50

    from dnd.target import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Target

    rng = np.random.default_rng(0)
    side = 32 if tiny else 512
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
              for _ in range(max(gen_batch, 16))]
    out: dict[str, Any] = {"device": device, "tiny": tiny, "gen_batch": gen_batch,
                           "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}

    torch.manual_seed(0)
    size = (32, 32) if tiny else (256, 224)
    target = Target.from_module(resnet50(weights=None), Preprocess(
        *size, mean=IMAGENET_MEAN, std=IMAGENET_STD), name="resnet50",
                                weights_id="random")
    target.to(torch.device(device))
    batch = torch.stack([target.preprocess(im) for im in images] * 4).to(device)
    with torch.no_grad(), torch.autocast(device, enabled=device == "cuda"):
        target_rate = _timed_rate(lambda: target.module(batch), len(batch), repeats=3)

    cap_images = (images * (caption_batch // len(images) + 1))[:caption_batch]
    caption_rate = _caption_rate(tiny, device, work_dir, cap_images)
    encode_rate = _encode_rate(tiny, device, cap_images)
    generation = _generation_rates(tiny, device, side, steps, gen_batch)
    out.update(target=target_rate, caption=caption_rate, encode=encode_rate,
               generation=generation)
    if device == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _caption_rate(tiny: bool, device: str, work_dir, images: list[Image.Image]) -> float:
    from dnd.backends.caption import TransformersCaptioner

    model, processor = build_blip(tiny, work_dir)
    captioner = TransformersCaptioner("blip-base-random", model=model, processor=processor,
                                      device=device, batch_size=len(images),
                                      max_new_tokens=32, min_length=32)
    return _timed_rate(lambda: captioner.caption(images), len(images))


def _encode_rate(tiny: bool, device: str, images: list[Image.Image]) -> float:
    from dnd.backends.encode import OpenClipEncoder

    encoder = OpenClipEncoder("ViT-B-16", None, device=device, components=build_open_clip(tiny))
    return _timed_rate(lambda: encoder.encode_images(images), len(images))


def _generation_rates(tiny: bool, device: str, side: int, steps: tuple[int, ...],
                      gen_batch: int) -> dict[int, dict[str, float]]:
    """Our generation stage and raw diffusers, images/s, at each step count."""
    from dnd.backends.base import GenRequest
    from dnd.backends.generate import DiffusersGenerator

    pipe = build_sd_pipeline(tiny)
    prompts = [f"a realistic photo of concept {i}" for i in range(gen_batch)]
    requests = [GenRequest(p, 0) for p in prompts]
    rates = {}
    for n_steps in steps:
        gen = DiffusersGenerator("sd-v1-5-random", pipe=pipe, steps=n_steps, height=side,
                                 width=side, batch_size=gen_batch, device=device)
        pipe = gen.pipe  # moved and cast once; reused at the next step count
        ours = _timed_rate(lambda g=gen: g.generate(requests), gen_batch)
        # Plain diffusers: one call for the batch with one seeded generator.
        raw = _timed_rate(lambda n=n_steps, p=pipe: p(
            prompts, num_inference_steps=n, guidance_scale=7.5, height=side, width=side,
            generator=torch.Generator(device).manual_seed(0)), gen_batch)
        rates[n_steps] = {"ours": ours, "raw": raw, "fraction": ours / raw}
    return rates


def report_lines(r: dict[str, Any], command: str) -> list[str]:
    """The markdown of ``results/bench-paper-scale-<machine>.md`` for :func:`measure`."""
    title = ("Tiny stand-ins for the paper's models (code-path check only)" if r["tiny"]
             else "Paper-size models, random weights")
    lines = [f"# {title} ({r['gpu'] or r['device']})", "",
             f"Regenerate: `{command}`", "",
             "| stage | throughput |", "| --- | --- |",
             f"| target forward, ResNet-50 | {r['target']:,.1f} images/s |",
             f"| captions, BLIP base, 32 tokens | {r['caption']:,.1f} images/s |",
             f"| CLIP ViT-B/16 image encoding | {r['encode']:,.1f} images/s |"]
    for n_steps, g in r["generation"].items():
        lines.append(f"| generation, SD v1-5 512x512, {n_steps} DPM-Solver steps | "
                     f"{g['ours']:.2f} images/s; raw diffusers {g['raw']:.2f} images/s; "
                     f"ours = {g['fraction']:.2f} of raw |")
    if "peak_gpu_gb" in r:
        lines.append(f"| peak GPU memory | {r['peak_gpu_gb']:.1f} GiB |")
    lines += ["", "Projected hours for 2,048 units (50,000 probe images; LLM at 8 calls/s):",
              "", "| preset | activations | crops | captions | candidates (LLM) | generation "
              "| scoring | total |", "| --- |" + " --- |" * 7]
    for n_steps, g in r["generation"].items():
        h = project_hours(Rates(r["target"], r["caption"], g["ours"], r["encode"]))
        lines.append(f"| {n_steps} steps | " + " | ".join(f"{v:.2f}" for v in h.values())
                     + " |")
    lines += ["", "Fewer DPM-Solver steps change the generated images, so labels may differ "
              "from a 50-step run; the selection rule is unchanged."]
    return lines


def run_cli(steps: list[int], gen_batch: int, tiny: bool, out_dir: str | Path) -> int:
    """``dnd bench paper-scale``: measure, print, and (unless ``tiny``) write
    ``results/bench-paper-scale-<gpu>.md``."""
    import re
    import tempfile

    from dnd.io import atomic_write_text

    if not tiny and not torch.cuda.is_available():
        raise ValueError("dnd bench paper-scale needs a CUDA GPU (full-size Stable Diffusion "
                         "on a CPU takes minutes per image); --tiny checks the code path on "
                         "the CPU")
    command = "dnd bench paper-scale" + (f" --steps {' '.join(map(str, steps))}"
                                         if steps != [50, 20] else "")
    command += f" --gen-batch {gen_batch}" if gen_batch != 8 else ""
    with tempfile.TemporaryDirectory() as tmp:
        r = measure("cpu" if tiny else "cuda", tiny=tiny, steps=tuple(steps),
                    gen_batch=gen_batch, work_dir=tmp)
    lines = report_lines(r, command + (" --tiny" if tiny else ""))
    print("\n".join(lines))
    if not tiny:
        name = re.sub(r"[^A-Za-z0-9]+", "-", r["gpu"]).strip("-").lower()
        atomic_write_text(Path(out_dir) / f"bench-paper-scale-{name}.md", "\n".join(lines) + "\n")
    return 0
