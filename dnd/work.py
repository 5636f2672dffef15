"""Work counters: what a run asked of each model, in counts that do not depend on the machine.

Times say how fast this machine was; counts say what a user's GPU hours and API bill will
be anywhere: images through the target network, images captioned, LLM requests and tokens,
images generated and their denoising steps, images and texts through the encoder. Every
describe run counts them (:func:`dnd.loading.count_models`,
:func:`dnd.loading.counting_target`), keeps them in
``RunResult.work`` and writes them to ``<run_dir>/work.json`` (one entry per invocation);
``dnd bench describe`` prints them per unit beside the reference implementation's
(:data:`REFERENCE_PER_UNIT`).

Only work a model actually did is counted: a caption, LLM reply or generated image's
features served from a cache cost nothing and count nothing (a resumed run shows what the
resume cost).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

COUNTS = ("target_images", "captioned_images", "llm_requests", "prompt_tokens",
          "completion_tokens", "generated_images", "denoising_steps", "encoded_images",
          "encoded_texts")

# The reference implementation's loop (Trustworthy-ML-Lab/Describe-and-Dissect), per unit,
# measured by running its code with the toy models on 8 `fc` units (issue 17): 10 caption
# simplifications + 5 concept requests + a follow-up per reply with a comma = 17.1 LLM
# requests; 4.5 distinct candidate concepts x Q = 10 images = 45 generated images, each with
# 50 DPM-Solver steps = 2,250 denoising steps; K = 10 activating images captioned (its crops
# re-scored one image per forward pass). Settings: Q = 10, 50 steps, K = 10, T = 5.
REFERENCE_PER_UNIT: dict[str, float] = {"llm_requests": 17.1, "generated_images": 45.0,
                                        "denoising_steps": 2250.0, "captioned_images": 10.0}


@dataclass
class Work:
    """Counts of one run (see the module docstring) and the seconds each model took.

    ``target_images``: images through the target network (activation pass, attention
    maps, crop and generated-image re-scoring; not the one-image probe of a layer's shape
    before the run). ``captioned_images``: images the captioner
    was given. ``llm_requests``: chat requests sent (a request asks for n replies);
    ``prompt_tokens`` / ``completion_tokens``: as the backend reported them.
    ``generated_images``: images the text-to-image model returned; ``denoising_steps``:
    those images times the generator's steps (0 for a generator without steps).
    ``encoded_images`` / ``encoded_texts``: inputs of the image-text encoder.
    ``seconds``: model -> wall seconds inside its calls.
    """

    target_images: int = 0
    captioned_images: int = 0
    llm_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_images: int = 0
    denoising_steps: int = 0
    encoded_images: int = 0
    encoded_texts: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, seconds: tuple[str, float] | None = None, **counts: int) -> None:
        """Add ``counts`` (names of :data:`COUNTS`) and ``seconds`` = (model, s); thread-safe
        (LLM requests may run concurrently)."""
        with self._lock:
            for name, n in counts.items():
                if name not in COUNTS:
                    raise KeyError(f"unknown work count {name!r}; known: {', '.join(COUNTS)}")
                setattr(self, name, getattr(self, name) + int(n))
            if seconds is not None:
                model, s = seconds
                self.seconds[model] = self.seconds.get(model, 0.0) + s

    def take(self) -> dict[str, Any]:
        """The counts and seconds so far (``{count: n, "seconds": {model: s}}``), and zero
        them: what a Ray actor returns with each chunk (:mod:`dnd.executor`)."""
        with self._lock:
            out = {**self.counts(), "seconds": dict(self.seconds)}
            for name in COUNTS:
                setattr(self, name, 0)
            self.seconds = {}
        return out

    def merge(self, taken: dict[str, Any]) -> None:
        """Add what :meth:`take` returned (another process's work)."""
        self.add(**{k: v for k, v in taken.items() if k != "seconds"})
        for model, s in taken.get("seconds", {}).items():
            self.add(seconds=(model, s))

    def counts(self) -> dict[str, int]:
        """The counts (no seconds), in :data:`COUNTS` order."""
        return {name: getattr(self, name) for name in COUNTS}

    def per_unit(self, n_units: int) -> dict[str, float]:
        """Every count divided by ``n_units`` (the units this run described)."""
        return {k: v / n_units for k, v in self.counts().items()} if n_units else {}

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts(), "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
