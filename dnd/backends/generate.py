"""Text-to-image with diffusers (Step 3.1): Stable Diffusion + DPM-Solver, seeded per image.

``GENERATORS.create("diffusers", steps=50, device="cuda")``. Every image depends only on
(prompt, seed, settings): each one gets its own ``torch.Generator`` seeded with its request's
seed, so batching, batch neighbours and out-of-memory batch halving never change a pixel
(up to floating-point noise of batched kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from dnd.backends.base import GENERATORS, GenRequest, resolve_device, run_batched
from dnd.preflight import Need, declares_needs, hub_model

DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@GENERATORS.register("diffusers")
class DiffusersGenerator:
    """Stable Diffusion text-to-image through a diffusers pipeline.

    Args:
        model_id: hub id or local folder of a Stable Diffusion v1.x pipeline (v1-4:
            ``"CompVis/stable-diffusion-v1-4"``). With ``pipe`` it only names the pipeline
            in ``identity``.
        steps: denoising steps of the DPM-Solver multistep scheduler.
        guidance_scale: classifier-free guidance weight (<= 1 disables guidance).
        height, width: output size in pixels (multiples of 8).
        batch_size: images per pipeline call; halved automatically on GPU out-of-memory.
        device: ``None``/``"auto"`` picks CUDA when present.
        dtype: torch dtype or its name; default float16 on CUDA, float32 elsewhere.
        pipe: a ready ``StableDiffusionPipeline`` (tests, or one shared with other stages).
    """

    def __init__(self, model_id: str = DEFAULT_MODEL_ID, *, steps: int = 50,
                 guidance_scale: float = 7.5, height: int = 512, width: int = 512,
                 batch_size: int = 8, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, pipe: Any = None):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if height % 8 or width % 8 or height < 8 or width < 8:
            raise ValueError(f"height and width must be positive multiples of 8, "
                             f"got {height}x{width}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.steps, self.guidance_scale = int(steps), float(guidance_scale)
        self.height, self.width, self.batch_size = int(height), int(width), int(batch_size)
        if pipe is None:
            pipe = _load_pipeline(model_id, self.dtype)
        self.pipe = self._prepare(pipe)
        self.identity: dict[str, Any] = {
            "backend": "diffusers",
            "model": model_id,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "size": [self.height, self.width],
            "scheduler": type(self.pipe.scheduler).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def generate(self, requests: Sequence[GenRequest]) -> list[Image.Image | Exception]:
        """One RGB image [height x width] per request, in order. Stable Diffusion renders
        any prompt, so no request fails on its own; model errors propagate."""
        return run_batched(self._generate_batch, list(requests), self.batch_size,
                           what="diffusers generation")

    def _prepare(self, pipe: Any) -> Any:
        from diffusers import DPMSolverMultistepScheduler

        # The paper's scheduler, built from the model's own scheduler config (betas etc.).
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None  # see _load_pipeline
        # Callers batch many requests; one progress bar per pipeline call is noise.
        pipe.set_progress_bar_config(disable=True)
        if pipe.dtype != self.dtype:  # a loaded pipeline already has it; casting warns
            pipe = pipe.to(dtype=self.dtype)
        return pipe.to(device=self.device)

    def _generate_batch(self, batch: list[GenRequest]) -> list[Image.Image]:
        # One generator per image, on the CPU: each image's initial latents are drawn from
        # its own seed alone, identical on every device and whatever the batch holds.
        generators = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in batch]
        out = self.pipe(
            prompt=[r.prompt for r in batch],
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            generator=generators,
            output_type="pil",
        )
        return [img.convert("RGB") for img in out.images]


@declares_needs(GENERATORS, "diffusers")
def _diffusers_needs(model_id: str = DEFAULT_MODEL_ID, pipe: Any = None, **_: Any
                     ) -> list[Need]:
    return [] if pipe is not None else [
        hub_model("generator diffusers", model_id, files=("model_index.json",),
                  option="generator.options.model_id: FOLDER")]


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> float16 on CUDA (the paper's setting, half the memory), else float32
    (float16 is slow or unsupported on CPU)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float16', 'bfloat16', 'float32'")
    return resolved


def _load_pipeline(model_id: str, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionPipeline

    try:
        # No safety checker: generated images only probe the target network, and the
        # checker replaces any image it flags with a black one, which would silently
        # corrupt the activation ranking of Step 3. (``torch_dtype``: recent diffusers
        # prefers ``dtype`` and warns, but older releases know only ``torch_dtype``.)
        return StableDiffusionPipeline.from_pretrained(
            model_id, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except OSError as err:
        raise OSError(
            f"could not load the Stable Diffusion pipeline {model_id!r}: it must be a local "
            f"folder or be downloaded to the Hugging Face cache first (e.g. `hf download "
            f"{model_id}`). Cause: {err}"
        ) from err
