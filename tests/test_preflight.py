"""Checks before heavy work: every model a command needs is found (or can be downloaded)
before any is loaded, and bad devices, bad YAML and unstated normalisation are reported in
one line, never as a traceback. Nothing here touches the network: the hub cache and the
torch cache are empty temporary folders and the connection probe is replaced."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from conftest import colour_target

from dnd import loading, preflight
from dnd.cli import main
from dnd.config import ConfigError, load_config

PAPER_MODELS = ("resnet50-11ad3fa6.pth", "Salesforce/blip-image-captioning-base",
                "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "timm/vit_base_patch16_clip_224.openai")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch caches, hub downloads off, every host unreachable.
    Returns (hf cache, torch home, probed hosts)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    probed = []
    monkeypatch.setattr(preflight, "host_reachable", lambda url, *a: probed.append(url) or False)
    return tmp_path / "hf" / "hub", tmp_path / "torch", probed


@pytest.fixture
def no_loading(monkeypatch):
    """Spies: building the target, the LLM, the backends or an embedder fails the test."""
    import dnd.evaluation.cli as ev_cli
    import dnd.loading as loading

    def forbidden(*a, **k):
        raise AssertionError("a model was built before the preflight failed")

    for name in ("load_target", "load_llm", "load_models"):
        monkeypatch.setattr(loading, name, forbidden)
    monkeypatch.setattr(ev_cli, "create_embedder", forbidden)
    monkeypatch.setattr("dnd.target.load_target", forbidden)


def _cache_repo(cache, repo: str, files=("model.safetensors",)) -> None:
    """A hub cache entry for ``repo`` at revision main, as huggingface_hub lays it out."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0123abcd")
    for f in files:
        path = root / "snapshots" / "0123abcd" / f
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")


# --- dnd describe ---------------------------------------------------------------------------

def test_paper_preset_offline_names_every_missing_model_before_loading_any(
        empty_caches, no_loading, tmp_path, monkeypatch, capsys):
    hf_cache, torch_home, _ = empty_caches
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert main(["describe", "--preset", "paper", "--probe", str(tmp_path), "--run-dir",
                 str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dnd: error: 4 model(s)") and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("  - ")]
    assert len(lines) == 4  # one line per model: id, where looked, how to provide it
    for model, line in zip(PAPER_MODELS, lines):
        assert model in line
    for line in lines[1:]:  # the hub models
        assert str(hf_cache) in line and "HF_HUB_OFFLINE" in line and "hf download" in line
    assert str(torch_home / "hub" / "checkpoints") in lines[0] and "--weights FILE" in lines[0]
    assert "captioner.options.model_id: FOLDER" in lines[1]
    assert "toy world" in err
    assert not (tmp_path / "run").exists() and not torch_home.exists()


def test_cached_or_downloadable_models_pass(empty_caches, monkeypatch, caplog):
    hf_cache, _, probed = empty_caches
    config = load_config(preset="paper", overrides={"probe": ["x"], "stop_after": "captions",
                                                    "weights": "none"})
    with pytest.raises(preflight.ModelsNotAvailable, match="blip-image-captioning-base"):
        loading.check_run(config)
    assert probed == []  # HF_HUB_OFFLINE: no probe needed to know it cannot download
    _cache_repo(hf_cache, "Salesforce/blip-image-captioning-base")
    loading.check_run(config)  # found in the cache
    # Missing but downloadable (network up): left to the loader, which downloads it.
    config = load_config(preset="paper", overrides={"probe": ["x"]})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(preflight, "host_reachable", lambda url, *a: True)
    with caplog.at_level(logging.INFO, logger="dnd.preflight"):
        loading.check_run(config)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5 is not on this machine yet" in caplog.text


def test_a_snapshot_without_weights_is_missing(empty_caches):
    hf_cache, _, _ = empty_caches
    _cache_repo(hf_cache, "org/half", files=("config.json",))  # an interrupted download
    need = preflight.hub_model("captioner blip", "org/half")
    assert preflight.locate(need)[0] is False
    _cache_repo(hf_cache, "org/full", files=("config.json", "sub/model.bin"))
    assert preflight.locate(preflight.hub_model("x", "org/full"))[0] is True


@pytest.mark.parametrize("section, options, ref, source", [
    ("captioner", {"name": "blip2"}, "Salesforce/blip2-opt-2.7b", "hf"),
    ("captioner", {"name": "blip", "options": {"model_id": "/no/such/blip"}}, "/no/such/blip",
     "path"),
    ("encoder", {"name": "hf_clip"}, "openai/clip-vit-base-patch16", "hf"),
    ("encoder", {"name": "open_clip", "options": {"model": "local-dir:/no/clip"}}, "/no/clip",
     "path"),
    ("llm", {"name": "transformers", "options": {"model": "org/chat"}}, "org/chat", "hf"),
])
def test_backends_declare_what_they_load(section, options, ref, source):
    config = load_config(preset="paper", overrides={"probe": ["x"], "weights": "none",
                                                    section: options})
    needs = loading.run_needs(config)
    assert any(n.ref == ref and n.source == source for n in needs), needs


def test_offline_presets_and_injected_models_need_nothing():
    assert loading.run_needs(load_config(preset="toyworld")) == []
    config = load_config(preset="paper", overrides={"probe": ["x"]})
    assert loading.run_needs(config, target=False, backends=False) == []
    assert loading.run_needs(load_config(preset="paper", overrides={
        "probe": ["x"], "weights": "none", "stop_after": "activations"})) == []


# --- dnd evaluate and dnd tables -------------------------------------------------------------

def test_classifier_search_missing_weights_fails_before_any_embedder_loads(
        empty_caches, no_loading, tmp_path, capsys):
    _, torch_home, probed = empty_caches
    labels = tmp_path / "labels.csv"
    labels.write_text("Neuron ID,Label 1\n0,dog\n")
    assert main(["evaluate", "classifier-search", "--labels", str(labels), "--model",
                 "resnet50", "--layer", "layer4", "--probe",
                 f"cifar10:{tmp_path / 'c.npz'}"]) == 2
    err = capsys.readouterr().err
    assert "target resnet50 (ResNet50_Weights.IMAGENET1K_V2)" in err
    assert "download.pytorch.org/models/resnet50-11ad3fa6.pth" in err
    assert "--weights FILE" in err and "toy world" in err and "Traceback" not in err
    assert probed == ["https://download.pytorch.org/models/resnet50-11ad3fa6.pth"]
    assert not torch_home.exists()  # no empty cache folders left behind


def test_a_failed_weights_download_leaves_no_empty_cache_folders(tmp_path, monkeypatch):
    import urllib.error

    import torch

    from dnd.target import load_target

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(OSError, match="Name or service not known"):
        load_target("resnet18")
    assert not (tmp_path / "torch").exists()


def test_final_layer_with_hub_embedders_fails_naming_them(empty_caches, no_loading, tmp_path,
                                                          capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("Neuron ID,Label 1\n0,dog\n")
    assert main(["evaluate", "final-layer", "--labels", str(labels), "--model", "resnet50",
                 "--embedder", "mpnet", "--embedder", "clip"]) == 2
    err = capsys.readouterr().err
    assert "text embedder mpnet: sentence-transformers/all-mpnet-base-v2" in err
    assert "text embedder clip: timm/vit_base_patch16_clip_224.openai" in err


def test_tables_whose_models_are_missing_are_not_run(empty_caches, tmp_path, monkeypatch):
    import dnd.benchmarks.tables as tables

    def forbidden(*a, **k):
        raise AssertionError("an embedder was loaded before the preflight")

    monkeypatch.setattr(tables, "create_embedder", forbidden)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "probe.npz").write_bytes(b"")
    (tmp_path / "tables.yaml").write_text(
        "search:\n  kind: classifier_search\n  title: t\n  models: [resnet50]\n"
        "  layer: layer4\n  labels: class_names\n  embedders: [mpnet]\n"
        "  data: {probe: probe.npz}\n  probe_kind: cifar10\n  command: c\n")
    written = tables.run_tables(["search"], out_dir=tmp_path / "out",
                                data_root=tmp_path / "data",
                                definitions=tmp_path / "tables.yaml", progress=False)
    text = written["search"].read_text()
    assert ("not run: needs models not on this machine: target resnet50 "
            "(ResNet50_Weights.IMAGENET1K_V2)") in text
    assert "text embedder mpnet (sentence-transformers/all-mpnet-base-v2)" in text


# --- devices, YAML, connectivity -------------------------------------------------------------

@pytest.mark.parametrize("device, cuda, count, mps, message", [
    ("cuda", False, 0, False, "device 'cuda': this machine has no usable CUDA GPU"),
    ("cuda:2", True, 1, False, "device 'cuda:2': this machine has 1 CUDA device(s)"),
    ("mps", False, 0, False, "device 'mps': Apple MPS is not available"),
    ("gpu", False, 0, False, "device 'gpu' is not a device name"),
])
def test_unavailable_device_is_a_one_line_error_before_any_work(
        no_loading, tmp_path, monkeypatch, capsys, device, cuda, count, mps, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert main(["describe", "--model", "resnet18", "--weights", "none", "--layer", "layer4",
                 "--probe", str(tmp_path), "--stop-after", "activations", "--device", device,
                 "--run-dir", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dnd: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_backend_device_option_is_checked_too(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = load_config(preset="toyworld", overrides={"encoder.options.device": "cuda"})
    with pytest.raises(ConfigError, match="device 'cuda'"):
        loading.check_run(config)


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("model: resnet50\nlayer: layer4\nprobe: [a, b\nunits: 0-3\n")
    assert main(["describe", "--config", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dnd: error: {bad}:4:6: invalid YAML: expected ',' or ']'")
    assert "started at line 3" in err and err.count("\n") == 1
    assert "<unicode string>" not in err and "Traceback" not in err


def test_host_probe_connects_once_per_host(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    monkeypatch.setattr(preflight, "_REACHABLE", {})
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    try:
        assert preflight.host_reachable(f"http://127.0.0.1:{port}/x", timeout=2)
    finally:
        server.close()
    assert preflight.host_reachable(f"http://127.0.0.1:{port}/y", timeout=2)  # remembered
    monkeypatch.setattr(preflight, "_REACHABLE", {})
    assert not preflight.host_reachable(f"http://127.0.0.1:{port}/x", timeout=2)


# --- a custom model's normalisation is stated or visibly defaulted ---------------------------

def test_from_module_without_mean_std_warns_and_records_the_values(tmp_path, caplog):
    import numpy as np
    from torch import nn

    from dnd.activations import compute_activations
    from dnd.probe import ArrayProbe
    from dnd.target import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Target

    with caplog.at_level(logging.WARNING, logger="dnd.target"):
        colour_target()  # states mean and std: no warning
        assert caplog.text == ""
        target = Target.from_module(nn.Conv2d(3, 2, 1), Preprocess(resize=8, crop=8),
                                    name="mine")
    assert "model 'mine'" in caplog.text and str(IMAGENET_MEAN) in caplog.text
    assert str(IMAGENET_STD) in caplog.text and "Preprocess(..., mean=..., std=...)" in caplog.text
    probe = ArrayProbe(name="p", ids=["a", "b"], images=np.zeros((2, 8, 8, 3), np.uint8),
                       source="zeros:2")
    acts = compute_activations(target, probe, [""], tmp_path, progress=False)[""]
    meta = json.loads((acts.path / "meta.json").read_text())
    assert meta["target"]["preprocess"]["mean"] == list(IMAGENET_MEAN)
