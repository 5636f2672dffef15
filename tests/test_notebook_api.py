"""The notebook-first Python API (issue 30): top-level entry points that keep `import dnd`
light, `dnd.open_run` over finished, partial and older runs, the labels DataFrame, inline
HTML with embedded images, and examples/quickstart.ipynb executed headless.

One real toy-world run (layers fc and conv4, units 0-1, 300 probing renders; about 30 s on
2 CPU cores) serves every test; the partial and older runs are copies of it with records
changed the way an interrupted run, a failed unit or an older dnd leaves them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dnd
from dnd.config import ConfigError, load_config, save_config
from dnd.record import RecordError, UnitRecord
from dnd.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
LAYERS = ["fc", "conv4"]
COLUMNS = ["unit", "Label 1", "Label 2", "Label 3", "score", "interpretability",
           "confidence", "stage", "failed", "why"]


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    """A finished run of fc and conv4 (conv4 has spatial maps, so heatmaps)."""
    run = tmp_path_factory.mktemp("notebook-api") / "run"
    config = load_config(preset="toyworld", overrides={
        "layer": LAYERS, "units": "0-1", "probe": ["toyworld:300"]})
    dnd.describe(config, run, progress=False)
    return run


def _copy(run: Path, dest: Path) -> Path:
    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns("run.lock")))


def _records(run: Path):
    return sorted((run / "units").rglob("*.json"))


# ------------------------------------------------------------------ top-level entry points


def test_import_dnd_loads_no_heavy_module():
    """`import dnd` (and listing its names) stays light: no torch, pandas or pipeline."""
    code = ("import sys, json, dnd; dir(dnd); dnd.__all__; "
            "print(json.dumps(sorted(m for m in ('torch', 'pandas', 'numpy', 'yaml', "
            "'transformers', 'dnd.api', 'dnd.pipeline', 'dnd.config', 'dnd.run') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert json.loads(out.stdout) == []


def test_top_level_names_resolve_to_the_real_objects():
    assert set(dnd.__all__) == {"__version__", *dnd._EXPORTS}
    for name, (module, attr) in dnd._EXPORTS.items():
        obj = getattr(dnd, name)
        assert obj is getattr(importlib.import_module(module), attr), name
        assert obj.__doc__ and obj.__doc__.strip(), f"dnd.{name} has no docstring"
        assert name in dir(dnd)
    assert dnd.describe is dnd.api.describe
    assert dnd.explain_image is dnd.explain.explain
    # The submodules stay modules whatever was imported first.
    assert dnd.explain.__name__ == "dnd.explain" and dnd.featurevis.__name__ == "dnd.featurevis"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dnd.nope  # noqa: B018


# ------------------------------------------------------------------------ open_run


def test_open_run_reads_config_layers_work_and_report(toy_run):
    run = dnd.open_run(toy_run)
    assert run.path == toy_run and run.layers == LAYERS
    assert run.config == RunStore(toy_run).load_config()
    total = json.loads((toy_run / "work.json").read_text())["total"]
    assert run.work.counts() == total and run.work.target_images > 0
    assert run.work.seconds and len(run.invocations) == 1
    assert run.report_path == toy_run / "report" / "index.html"
    # The report keeps each layer's heatmaps apart (unit 0 of two conv layers differ).
    assert list((toy_run / "report" / "img" / "heat" / "conv4").glob("0_*.png"))
    assert "toyworld-cnn" in repr(run) and "fc, conv4" in repr(run)


def test_labels_frame_columns_dtypes_and_values(toy_run):
    import pandas as pd

    run = dnd.open_run(toy_run)
    both = run.labels()
    assert list(both.columns) == ["layer", *COLUMNS]
    assert list(zip(both["layer"], both["unit"])) == [("fc", 0), ("fc", 1), ("conv4", 0),
                                                       ("conv4", 1)]
    fc = run.labels("fc")
    assert list(fc.columns) == COLUMNS
    assert fc["unit"].dtype == "int64" and fc["failed"].dtype == bool
    for col in ("score", "interpretability", "confidence"):
        assert fc[col].dtype == "float64", col
    for col in ("Label 1", "Label 2", "Label 3", "stage", "why"):
        assert pd.api.types.is_string_dtype(fc[col]) or fc[col].dtype == object, col
    for row in fc.itertuples(index=False):
        rec = RunStore(toy_run).read_unit("fc", row.unit)
        assert row[1] == rec.labels[0] and row.stage == "labels" and not row.failed
        assert row.score == pytest.approx(rec.scoring.selection.winner_score)
        assert row.interpretability == pytest.approx(rec.scoring.interpretability)
        conf = rec.scoring.confidence  # None under the paper's rule
        assert math.isnan(row.confidence) if conf is None else row.confidence == conf
    assert fc["why"].isna().all()
    with pytest.raises(ValueError, match=r"layer 'layer4' is not one of .*\(fc, conv4\)"):
        run.labels("layer4")


def test_labels_of_a_one_layer_run_have_no_layer_column(toy_run, tmp_path):
    run_dir = _copy(toy_run, tmp_path / "fc-only")
    store = RunStore(run_dir)
    save_config(dataclasses.replace(store.load_config(), layer="fc"), store.config_path)
    shutil.rmtree(run_dir / "units" / "conv4")
    frame = dnd.open_run(run_dir).labels()
    assert list(frame.columns) == COLUMNS and list(frame["unit"]) == [0, 1]


def test_unit_is_the_typed_record(toy_run):
    run = dnd.open_run(toy_run)
    rec = run.unit("conv4", 1)
    plain = RunStore(toy_run).read_unit("conv4", 1)
    assert isinstance(rec, UnitRecord) and rec == plain and plain == rec
    assert rec.to_json() == plain.to_json()
    assert repr(rec).startswith("<dnd.RunUnit conv4 #1: ")
    with pytest.raises(KeyError, match=r"no record of unit 7 of layer 'fc' \(records: 0-1\)"):
        run.unit("fc", 7)


def test_partial_run_failed_stopped_and_unreadable_units(toy_run, tmp_path):
    """What an interrupted run leaves: a failed unit, one stopped after captions, one whose
    record is half-written (left out, as the store does)."""
    run_dir = _copy(toy_run, tmp_path / "partial")
    store = RunStore(run_dir)
    for unit in (0, 1):  # back to where Step 2.2 starts
        store.write_unit(dataclasses.replace(store.read_unit("fc", unit), stage="captions",
                                             candidates=None, scoring=None))
    store.write_unit(store.read_unit("fc", 0).fail("candidates", "LLM kept answering 503"))
    (run_dir / "units" / "conv4" / "1.json").write_text('{"schema": 2, "lay')
    run = dnd.open_run(run_dir)
    frame = run.labels()
    assert list(zip(frame["layer"], frame["unit"])) == [("fc", 0), ("fc", 1), ("conv4", 0)]
    failed, stopped, done = (frame.iloc[i] for i in range(3))
    assert failed["failed"] and failed["why"] == "LLM kept answering 503"
    assert failed["stage"] == "captions" and failed[["Label 1", "score"]].isna().all()
    assert not stopped["failed"] and stopped["stage"] == "captions"
    assert stopped[["Label 1", "score", "interpretability"]].isna().all()
    assert not done["failed"] and isinstance(done["Label 1"], str)
    assert frame["failed"].dtype == bool and frame["score"].dtype == "float64"
    with pytest.raises(KeyError, match=r"records: 0-1"):  # the file exists, unreadable
        run.unit("conv4", 1)
    html = run._repr_html_()
    assert "failed at candidates: LLM kept answering 503" in html
    assert "stopped after captions" in html and "1 failed" in html
    card = run.unit("fc", 1)._repr_html_()
    assert "no label yet: stopped after captions" in card and "data:image/jpeg" in card


def test_a_run_before_any_unit_finished(toy_run, tmp_path):
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    shutil.copy(toy_run / "config.yaml", run_dir)
    run = dnd.open_run(run_dir)
    frame = run.labels()
    assert list(frame.columns) == ["layer", *COLUMNS] and len(frame) == 0
    assert frame["unit"].dtype == "int64" and frame["failed"].dtype == bool
    assert run.work.counts() == dict.fromkeys(run.work.counts(), 0)
    assert run.report_path is None and "0 units" in run._repr_html_()


def test_schema_1_records_read_like_schema_2(toy_run, tmp_path):
    """Records written before the schema field (and before confidence) existed."""
    run_dir = _copy(toy_run, tmp_path / "schema1")
    for path in _records(run_dir):
        data = json.loads(path.read_text())
        assert data.pop("schema") == 2
        data.pop("confidence", None)
        path.write_text(json.dumps(data))
    old, new = dnd.open_run(run_dir), dnd.open_run(toy_run)
    assert old.labels()["confidence"].isna().all()
    assert old.labels().drop(columns="confidence").equals(
        new.labels().drop(columns="confidence"))
    assert old.unit("fc", 0).labels == new.unit("fc", 0).labels
    assert "data:image" in old.unit("conv4", 0)._repr_html_()


def test_newer_records_and_configs_are_refused_with_the_fix(toy_run, tmp_path):
    run_dir = _copy(toy_run, tmp_path / "newer")
    path = run_dir / "units" / "fc" / "1.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema": 3}))
    run = dnd.open_run(run_dir)
    with pytest.raises(RecordError, match=r"1\.json: unit record schema 3 is newer .*upgrade"):
        run.labels()
    with pytest.raises(RecordError, match="upgrade dnd"):
        run.unit("fc", 1)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "quantum": True}))
    with pytest.raises(ConfigError, match=r"cannot read .*config\.yaml .*upgrade dnd"):
        dnd.open_run(run_dir)


def test_open_run_on_a_folder_that_is_not_a_run(toy_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory at .*nowhere"):
        dnd.open_run(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"not a dnd run directory \(no config\.yaml\)"
                       r"; describe units into it"):
        dnd.open_run(tmp_path)
    # `dnd demo`'s folder holds one run per layer: name them.
    with pytest.raises(FileNotFoundError, match=r"it holds runs: .*run; open one of those"):
        dnd.open_run(toy_run.parent)


# ------------------------------------------------------------------ notebook display


def _no_file_links(html: str) -> None:
    """Every image is embedded: no relative report paths, nothing from the network."""
    srcs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/") for s in srcs), \
        [s[:40] for s in srcs if not s.startswith("data:image/")]
    assert "http://" not in html and "https://" not in html


def test_unit_card_embeds_images_heatmaps_and_generated_images(toy_run):
    run = dnd.open_run(toy_run)
    rec = run.unit("conv4", 0)
    html = rec._repr_html_()
    assert html == run.unit_html("conv4", 0)
    assert f"<h1 id=label>{rec.labels[0]}</h1>" in html
    assert "data:image/jpeg;base64," in html  # top and activating images, crops
    assert '<image class=heat href="data:image/png;base64,' in html  # heatmaps
    gen = re.search(r"<td class=gen>(.*?)</td>", html).group(1)
    assert "data:image/jpeg;base64," in gen  # the candidates' generated images
    assert "<p class=why id=why>" in html  # why the winner won
    assert rec.captions[0] in html.replace("&quot;", '"').replace("&#x27;", "'")
    assert html.startswith('<div class="dnd-inline"><style>')
    assert "\nbody{" not in html and ".dnd-inline header{" in html  # CSS kept inside
    _no_file_links(html)


def test_run_table_embeds_thumbnails_and_escapes_labels(toy_run, tmp_path):
    run = dnd.open_run(toy_run)
    html = run._repr_html_()
    assert "<th>layer</th>" in html and html.count("<tr class=") == 4
    for label in run.labels()["Label 1"]:
        assert f"<b>{label}</b>" in html
    assert html.count("data:image/jpeg;base64,") >= 4
    _no_file_links(html)
    assert "1 of 2 units shown" in run.to_html("fc", limit=1)
    assert "<th>layer</th>" not in run.to_html("fc")
    # Model text is escaped here as in the report.
    run_dir = _copy(toy_run, tmp_path / "xss")
    store = RunStore(run_dir)
    rec = store.read_unit("fc", 0)
    xss = "<script>alert(1)</script>"
    store.write_unit(dataclasses.replace(
        rec, scoring=dataclasses.replace(rec.scoring, labels=(xss,))))
    unsafe = dnd.open_run(run_dir)
    for html in (unsafe.to_html(), unsafe.unit_html("fc", 0)):
        assert xss not in html and "&lt;script&gt;" in html


def test_display_without_the_probing_set(toy_run, tmp_path, caplog):
    """A run whose probing images are gone (moved, another machine): placeholders and a
    note instead of thumbnails; the generated images, kept in the run, still show."""
    run_dir = _copy(toy_run, tmp_path / "moved")
    store = RunStore(run_dir)
    save_config(dataclasses.replace(store.load_config(), probe=[str(tmp_path / "gone")]),
                store.config_path)
    run = dnd.open_run(run_dir)
    assert "probing set could not be opened" in run.to_html()
    card = run.unit_html("fc", 0)
    assert "class=noimg" in card and "data:image/jpeg" in card
    assert "cannot open the run's probing set" in caplog.text


# ------------------------------------------------------------------------ the notebook


def test_quickstart_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    source = "".join("".join(c["source"]) for c in code)
    assert "dnd.describe(" in source and "dnd.open_run(" in source


def test_quickstart_notebook_runs_headless(tmp_path):
    """The notebook as a user runs it, offline, in a fresh kernel (about 45 s): each code
    cell without error, the run and two units shown as HTML with embedded images."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(shutil.copy(NOTEBOOK, tmp_path), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if "text/html" in o.get("data", {})]
    cards = [h for h in html if "<h1 id=label>" in h]
    assert len(cards) == 2 and all("data:image/jpeg;base64," in h for h in cards)
    assert any("<table class=runtable>" in h and "data:image" in h for h in html)
    assert len(dnd.open_run(tmp_path / "runs" / "quickstart").labels()) == 8
