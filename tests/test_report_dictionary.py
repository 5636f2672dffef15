"""`dnd report` on a run with dictionary features: a feature's page names the neurons it
mixes (its decoder row's largest weights) with their labels, links their pages and compares
their labels with its own; a neuron's page lists the features that use it. Hand-made runs,
no model."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from dnd.config import DictionaryConfig, RunConfig, save_config
from dnd.dictionary.files import save_dictionary
from dnd.dictionary.kinds import NMFDictionary
from dnd.record import UnitRecord
from dnd.report import build_report
from dnd.report.dictionary import top_channels
from dnd.store import RunStore

NEURON_LABELS = {0: "red", 1: "striped background", 2: "circle", 3: "text"}
# Feature 0 mixes neurons 1 (40%) and 2 (30%) (together over half) and a little of 0;
# feature 1 is neuron 3.
COMPONENTS = np.array([[0.3, 0.4, 0.3, 0.0],
                       [0.0, 0.0, 0.0, 2.0]], dtype=np.float32)
FEATURE_LABELS = {0: "striped background", 1: "written text"}


def _record(layer: str, unit: int, label: str) -> UnitRecord:
    return UnitRecord.from_json({"layer": layer, "unit": unit, "model": "tiny",
                                 "stage": "labels", "labels": [label, f"{label} 2"]})


def _run(root, kind: str, describe_neurons: bool = True):
    """A finished-looking run of ``fc`` and its dictionary layer (kind nmf: the fitted
    copy in the run; file: directions in a .npy elsewhere)."""
    probe = root / "probe"
    probe.mkdir()
    Image.new("RGB", (32, 32), "red").save(probe / "0.png")
    run = root / "run"
    if kind == "nmf":
        dictionary, layer = DictionaryConfig(kind="nmf", features=2), "fc.nmf"
    else:
        np.save(root / "dirs.npy", COMPONENTS)
        dictionary, layer = DictionaryConfig(kind="file", path=str(root / "dirs.npy")), "fc.dict"
    layers = ["fc", layer] if describe_neurons else [layer]
    run.mkdir()
    save_config(RunConfig(model="tiny", layer=layers, probe=[str(probe)],
                          summarizer="consensus", dictionary=dictionary), run / "config.yaml")
    store = RunStore(run)
    if kind == "nmf":
        save_dictionary(NMFDictionary(COMPONENTS), store.dictionary_path(layer))
    if describe_neurons:
        for unit, label in NEURON_LABELS.items():
            store.write_unit(_record("fc", unit, label))
    for unit, label in FEATURE_LABELS.items():
        store.write_unit(_record(layer, unit, label))
    return run, layer


def _text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.mark.parametrize("kind", ["nmf", "file"])
def test_feature_page_names_the_mixed_neurons_with_their_labels(tmp_path, kind):
    run, layer = _run(tmp_path, kind)
    build_report(run)
    pages = run / "report" / "units"
    page = (pages / layer / "0.html").read_text()
    table = re.search(r"<table id=mixed>(.*?)</table>", page, re.S).group(1)
    rows = re.findall(r"<tr><td>(.*?)</tr>", table, re.S)
    # Largest weight first (a tie by channel id): neuron 1 (40%), 0 (30%), 2 (30%); neuron
    # 3 (weight 0) is not mixed in.
    assert [re.search(r"fc #(\d+)", r).group(1) for r in rows] == ["1", "0", "2"]
    assert "40.0%" in rows[0] and "striped background" in rows[0]
    assert "30.0%" in rows[1] and ">red" in rows[1]
    assert "30.0%" in rows[2] and "circle" in rows[2]
    # Each neuron links its own page, which exists.
    links = re.findall(r'href="\.\./\.\./(units/fc/\d+\.html)"', table)
    assert links == ["units/fc/1.html", "units/fc/0.html", "units/fc/2.html"]
    assert all((run / "report" / link).is_file() for link in links)
    line = _text(re.search(r"<p id=polysemanticity>(.*?)</p>", page, re.S).group(1))
    assert ("the 2 neuron(s) carrying 70% of its weight (#1, #0) have 2 distinct Label 1(s) "
            "(\u201cstriped background\u201d; \u201cred\u201d)") in line
    assert "\u201cstriped background\u201d, which shares a word with 1 of them (neuron(s) 1)" \
        in line
    # Feature 1 is neuron 3 alone: all of its weight, and "written text" shares "text".
    page1 = (pages / layer / "1.html").read_text()
    first = re.search(r"<table id=mixed><tr>.*?</tr><tr><td>(.*?)</tr>", page1, re.S).group(1)
    assert "fc #3" in first and "100.0%" in first and ">text" in first
    assert "shares a word with 1 of them (neuron(s) 3)" in _text(page1)
    # A neuron's page has no mix of its own, but lists the features that use it, linked.
    neuron1 = (pages / "fc" / "1.html").read_text()
    assert "id=mixes" not in neuron1
    readers = re.search(r"<table class=readers>(.*?)</table>", neuron1, re.S).group(1)
    rows = re.findall(r"<tr><td>(.*?)</tr>", readers, re.S)
    assert len(rows) == 1 and f"{layer} #0" in rows[0] and "40.0%" in rows[0]
    assert "striped background" in rows[0]
    link = re.search(r'href="\.\./\.\./(units/[^"]+)"', rows[0]).group(1)
    assert link == f"units/{layer}/0.html" and (run / "report" / link).is_file()
    neuron3 = _text((pages / "fc" / "3.html").read_text())
    assert f"{layer} #1 2 100.0% written text" in neuron3 and f"{layer} #0" not in neuron3


def test_feature_page_without_the_neurons_says_how_to_get_their_labels(tmp_path):
    run, layer = _run(tmp_path, "nmf", describe_neurons=False)
    build_report(run)
    page = _text((run / "report" / "units" / layer / "0.html").read_text())
    assert "fc #1" in page and "not described in this run" in page
    assert "This run did not describe the neurons of fc" in page
    assert "--layer fc --layer fc.nmf" in page


def test_an_unreadable_dictionary_leaves_the_section_out_with_a_warning(tmp_path, caplog):
    run, layer = _run(tmp_path, "nmf")
    RunStore(run).dictionary_path(layer).unlink()
    build_report(run)
    assert "id=mixes" not in (run / "report" / "units" / layer / "0.html").read_text()
    assert "cannot read the dictionary of fc.nmf" in caplog.text


def test_top_channels_rank_by_absolute_weight():
    row = np.array([0.5, -2.0, 0.0, 1.5])
    assert [(c, w) for c, w, _ in top_channels(row, 3)] == [(1, -2.0), (3, 1.5), (0, 0.5)]
    assert [round(s, 3) for _, _, s in top_channels(row, 3)] == [0.5, 0.375, 0.125]
    assert [s for _, _, s in top_channels(np.zeros(3))] == [0.0, 0.0, 0.0]
