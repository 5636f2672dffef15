"""The image bank (dnd.cache.ImageBank): generated images shared across runs and layers,
identical records with and without it, damaged entries recomputed, concurrent writers that
lose nothing, least-recently-used eviction."""

from __future__ import annotations

import concurrent.futures
import multiprocessing

import numpy as np
from conftest import colour_target
from PIL import Image
from test_faults import ColourCaptioner
from test_score_stage import ColourGenerator, MeanColourEncoder
from test_work import BilledLLM

from dnd.api import describe
from dnd.backends.factory import Models
from dnd.cache import ImageBank
from dnd.config import RunConfig
from dnd.store import RunStore


def _run(folder, run_dir, bank, layer="pool"):
    config = RunConfig.from_dict({"model": "colournet", "layer": layer, "probe": [str(folder)],
                                  "units": "0-1", "crop": {"top_n": 3}, "image_bank": str(bank),
                                  "summarize": {"num_samples": 2}})
    models = Models(captioner=ColourCaptioner(), llm=BilledLLM(), generator=ColourGenerator(),
                    encoder=MeanColourEncoder())
    return describe(config, run_dir, target=colour_target(), models=models, progress=False)


def _decided(run_dir, layer="pool"):
    return {r.unit: (r.labels, r.scoring.selection) for r in RunStore(run_dir).records(layer)}


def test_runs_and_layers_share_the_bank_and_records_do_not_change(colour_probe, tmp_path):
    folder, _, _ = colour_probe
    bank = tmp_path / "bank"
    first = _run(folder, tmp_path / "a", bank)
    # "red thing" and its part "red", x Q = 10 each, both units
    assert first.work.generated_images == 20
    assert len(list(bank.glob("??/*.png"))) == 20 and len(list(bank.glob("??/*.npy"))) == 20
    # A new run folder, same units: every image and embedding comes from the bank.
    second = _run(folder, tmp_path / "b", bank)
    assert second.work.generated_images == 0 and second.work.encoded_images < \
        first.work.encoded_images
    assert _decided(tmp_path / "b") == _decided(tmp_path / "a")
    # Another layer of the model: its own activations, the same generated images.
    other = _run(folder, tmp_path / "c", bank, layer="detect")
    assert other.work.generated_images == 0 and other.done_now == [0, 1]
    # Without the bank, the same records again (a bank hit is exactly the generated image).
    alone = _run(folder, tmp_path / "d", "none")
    assert alone.work.generated_images == 20
    assert _decided(tmp_path / "d") == _decided(tmp_path / "a")


def test_a_damaged_entry_is_generated_again(colour_probe, tmp_path):
    folder, _, _ = colour_probe
    bank = tmp_path / "bank"
    _run(folder, tmp_path / "a", bank)
    damaged = sorted(bank.glob("??/*.png"))[3]
    damaged.write_bytes(b"\x89PNG not really")
    again = _run(folder, tmp_path / "b", bank)
    assert again.work.generated_images == 1
    with Image.open(damaged) as im:  # written again, whole
        assert im.size == (64, 64)
    assert _decided(tmp_path / "b") == _decided(tmp_path / "a")


def _write_images(root: str, seeds: list[int]) -> None:
    bank = ImageBank(root)
    for s in seeds:
        pixels = np.random.default_rng(s).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        bank.put_image(ImageBank.key({"g": 1}, "p", s), Image.fromarray(pixels))


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    root = str(tmp_path / "bank")
    seeds = [list(range(0, 60)), list(range(30, 90))]  # 30 keys written by both
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        list(pool.map(_write_images, [root, root], seeds))
    bank = ImageBank(root)
    for s in range(90):
        image = bank.get_image(ImageBank.key({"g": 1}, "p", s))
        expected = np.random.default_rng(s).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        assert image is not None and np.array_equal(np.asarray(image), expected), s
    assert not list((tmp_path / "bank").glob("??/.*.tmp"))  # no partial file left


def test_eviction_removes_the_least_recently_used_images_with_their_embeddings(tmp_path):
    bank = ImageBank(tmp_path / "bank", max_bytes=10**9)
    keys = [ImageBank.key({"g": 1}, "p", s) for s in range(4)]
    for i, k in enumerate(keys):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        bank.put_image(k, Image.fromarray(pixels))
        bank.put_embedding(k, {"e": 1}, 0, np.ones(8))
    size = sum(p.stat().st_size for p in (tmp_path / "bank").glob("??/*"))
    import os
    import time
    old = time.time() - 100
    for k in keys:  # an age order: key 0 oldest ... key 3 newest
        for p in (tmp_path / "bank").glob(f"??/{k}*"):
            os.utime(p, (old + keys.index(k), old + keys.index(k)))
    assert bank.get_image(keys[0]) is not None  # a hit makes key 0 the most recent
    bank.max_bytes = size - 1  # one image over: evict down to 90% of the limit
    assert bank.evict() >= 1
    assert bank.get_image(keys[1]) is None and bank.get_embedding(keys[1], {"e": 1}, 0) is None
    assert bank.get_image(keys[0]) is not None and bank.get_image(keys[3]) is not None


def test_where_the_bank_is(tmp_path, monkeypatch):
    config = RunConfig.from_dict({"model": "m", "layer": "l", "probe": ["p"]})
    monkeypatch.setenv("DND_IMAGE_BANK", str(tmp_path / "env"))
    assert config.open_image_bank().root == tmp_path / "env"
    monkeypatch.setenv("DND_IMAGE_BANK", "none")
    assert config.open_image_bank() is None
    monkeypatch.delenv("DND_IMAGE_BANK")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    bank = config.open_image_bank()
    assert bank.root == tmp_path / "xdg" / "dnd" / "image-bank" and bank.max_bytes == 20 * 2**30
    named = RunConfig.from_dict({"model": "m", "layer": "l", "probe": ["p"],
                                 "image_bank": str(tmp_path / "mine"), "image_bank_max_gb": 0.5})
    assert named.open_image_bank().root == tmp_path / "mine"
    assert named.open_image_bank().max_bytes == 2**29
    # where the bank is changes no result: a run directory accepts either
    assert named.results_key() == config.results_key()


def test_a_run_keeps_the_bank_within_its_size_limit(colour_probe, tmp_path):
    folder, _, _ = colour_probe
    bank = tmp_path / "bank"
    limit_gb = 1.5e-6  # about 1.6 KB: under half the run's 20 images and embeddings
    config = RunConfig.from_dict({"model": "colournet", "layer": "pool", "probe": [str(folder)],
                                  "units": "0-1", "crop": {"top_n": 3}, "image_bank": str(bank),
                                  "image_bank_max_gb": limit_gb,
                                  "summarize": {"num_samples": 2}})
    models = Models(captioner=ColourCaptioner(), llm=BilledLLM(), generator=ColourGenerator(),
                    encoder=MeanColourEncoder())
    res = describe(config, tmp_path / "run", target=colour_target(), models=models,
                   progress=False)
    assert res.work.generated_images == 20
    sizes = [p.stat().st_size for p in bank.glob("??/*")]
    assert 0 < sum(sizes) <= limit_gb * 2**30 and len(list(bank.glob("??/*.png"))) < 10
