"""DiffusersGenerator on a tiny random-weight Stable Diffusion pipeline (32x32, 2 steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import SD_SIZE, tiny_sd_pipeline

from dnd.backends.base import GENERATORS, Generator, GenRequest
from dnd.backends.generate import DiffusersGenerator

SETTINGS = dict(steps=2, height=SD_SIZE, width=SD_SIZE, device="cpu")
REQ = GenRequest("a realistic image of a red dog", seed=7)
OTHERS = [GenRequest("a realistic image of stripes", seed=1),
          GenRequest("a realistic image of a blue circle", seed=2)]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def gen(pipe):
    return DiffusersGenerator("tiny-sd", pipe=pipe, batch_size=4, **SETTINGS)


@pytest.fixture(scope="module")
def alone(gen):
    """REQ generated on its own, as a float array [H, W, 3]."""
    (img,) = gen.generate([REQ])
    return np.asarray(img, dtype=np.float32)


def as_array(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def test_registry_builds_a_generator(pipe):
    gen = GENERATORS.create("diffusers", model_id="tiny-sd", pipe=pipe, **SETTINGS)
    assert isinstance(gen, DiffusersGenerator) and isinstance(gen, Generator)
    assert type(gen.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert gen.pipe.safety_checker is None
    assert gen.dtype == torch.float32  # CPU default


def test_count_size_and_mode(gen, alone):
    imgs = gen.generate([REQ, *OTHERS])
    assert len(imgs) == 3
    for img in imgs:
        assert img.mode == "RGB" and img.size == (SD_SIZE, SD_SIZE)
    assert alone.std() > 1.0, "a constant image would make every comparison below vacuous"
    assert gen.generate([]) == []


def test_same_request_same_pixels(gen, alone):
    (again,) = gen.generate([REQ])
    np.testing.assert_array_equal(as_array(again), alone)


def test_image_independent_of_batch_neighbours(gen, alone):
    batched = gen.generate([OTHERS[0], REQ, OTHERS[1]])
    # uint8 pixels: batched kernels may round a value one level differently.
    assert np.abs(as_array(batched[1]) - alone).max() <= 2.0


def test_different_seeds_and_prompts_differ(gen, alone):
    other_seed, other_prompt = gen.generate([GenRequest(REQ.prompt, REQ.seed + 1),
                                             GenRequest("a green square", REQ.seed)])
    assert np.abs(as_array(other_seed) - alone).mean() > 5.0
    assert np.abs(as_array(other_prompt) - alone).max() > 0.0


def test_identity_names_every_setting(pipe, gen):
    ident = gen.identity
    assert ident == {"backend": "diffusers", "model": "tiny-sd", "steps": 2,
                     "guidance_scale": 7.5, "size": [SD_SIZE, SD_SIZE],
                     "scheduler": "DPMSolverMultistepScheduler", "dtype": "float32"}
    other = DiffusersGenerator("tiny-sd", pipe=pipe, **{**SETTINGS, "steps": 3})
    assert other.identity != ident and other.identity["steps"] == 3


def test_out_of_memory_halves_the_batch(gen, alone, monkeypatch):
    real_pipe, calls = gen.pipe, []

    def flaky_pipe(*, prompt, **kwargs):
        calls.append(len(prompt))
        if len(prompt) > 1:
            raise torch.OutOfMemoryError("injected: batch too large")
        return real_pipe(prompt=prompt, **kwargs)

    monkeypatch.setattr(gen, "pipe", flaky_pipe)
    imgs = gen.generate([OTHERS[0], REQ, OTHERS[1]])
    assert len(imgs) == 3 and all(img.size == (SD_SIZE, SD_SIZE) for img in imgs)
    assert calls[:3] == [3, 2, 1]  # 4 -> 3 requests, then halved to 2, then to 1
    assert np.abs(as_array(imgs[1]) - alone).max() <= 2.0


@pytest.mark.parametrize("bad", [dict(steps=0), dict(height=30), dict(batch_size=0),
                                 dict(dtype="float17")])
def test_bad_settings_raise(pipe, bad):
    with pytest.raises(ValueError):
        DiffusersGenerator("tiny-sd", pipe=pipe, **{**SETTINGS, **bad})


def test_missing_model_names_it():
    with pytest.raises(OSError, match="dnd-tests/no-such-sd.*download"):
        DiffusersGenerator("dnd-tests/no-such-sd", device="cpu")
