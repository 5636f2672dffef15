"""Planted specs of one's own: ``planted.load_spec`` (YAML and JSON, every validation
error), the committed ``PLANTED`` round-tripping through a spec file, training for a spec
(``python -m dnd.toyworld.train --only planted --spec FILE``), the weights check against a
spec's units and ``dnd tables --spec FILE --weights DIR``."""

from __future__ import annotations

import json

import pytest
import yaml

from dnd.benchmarks.planted import check_trained_for_planted
from dnd.toyworld import train
from dnd.toyworld.planted import (
    PLANTED,
    PlantedUnit,
    load_spec,
    planted_layers,
    spec_to_dicts,
    units_of,
)
from dnd.toyworld.target import PLANTED_STEM

# A small spec, one unit of each kind, conv4 listed before conv3 (file order is kept,
# layers come back in network order).
SMALL_SPEC = [
    {"layer": "conv4", "unit": 5, "kind": "monosemantic", "concepts": ["green"]},
    {"layer": "conv4", "unit": 2, "kind": "polysemantic", "concepts": ["square", "dotted"]},
    {"layer": "conv4", "unit": 0, "kind": "compositional", "concepts": ["cyan", "noisy"]},
    {"layer": "conv3", "unit": 1, "kind": "local", "concepts": ["small orange"]},
    {"layer": "conv3", "unit": 3, "kind": "textual", "concepts": ["text"]},
]
SMALL_UNITS = [PlantedUnit(d["layer"], d["unit"], d["kind"], tuple(d["concepts"]))
               for d in SMALL_SPEC]


def _write(path, data) -> str:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("name", ["spec.yaml", "spec.yml", "spec.json"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_load_spec_reads_yaml_and_json_lists_or_units_mappings(tmp_path, name, wrapped):
    path = _write(tmp_path / name, {"units": SMALL_SPEC} if wrapped else SMALL_SPEC)
    units = load_spec(path)
    assert units == SMALL_UNITS
    assert planted_layers(units) == ["conv3", "conv4"]
    assert [u.unit for u in units_of("conv4", units)] == [0, 2, 5]
    assert units_of("conv2", units) == []


def test_units_of_and_planted_layers_default_to_the_committed_units():
    assert planted_layers() == planted_layers(PLANTED) == ["conv2", "conv3", "conv4"]
    assert units_of("conv3") == units_of("conv3", PLANTED)
    assert len(units_of("conv3")) == 16


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_the_committed_units_round_trip_through_a_spec_file(tmp_path, suffix):
    path = _write(tmp_path / f"planted{suffix}", spec_to_dicts(PLANTED))
    assert load_spec(path) == PLANTED


def _entry(**changes) -> dict:
    return {**SMALL_SPEC[0], **changes}


@pytest.mark.parametrize(("data", "message"), [
    ([_entry(colour="red")], r"unit 1 \(conv4:5\): unknown key\(s\) colour"),
    ([{"layer": "conv4", "unit": 5, "kind": "monosemantic"}], r"missing key\(s\) concepts"),
    ([_entry(kind="bisemantic")], "unknown kind; choose one of monosemantic"),
    ([_entry(concepts=["magenta"])], "needs one object concept or background kind"),
    ([_entry(kind="polysemantic", concepts=["red", "red circle"])], "share no word"),
    ([_entry(kind="local", concepts=["red"])], "needs one 'small <colour"),
    ([_entry(kind="compositional", concepts=["striped", "blue"])],
     r"needs \(object concept, background kind\)"),
    ([_entry(concepts="red")], "concepts must be a list of concept names"),
    ([_entry(concepts=[])], "concepts must be a list of concept names"),
    ([_entry(layer="fc")], "ToyCNN has no layer 'fc'; choose one of conv1, conv2"),
    ([_entry(layer="conv2", unit=32)], r"unit must be a channel index 0\.\.31 of conv2"),
    ([_entry(unit=-1)], r"unit must be a channel index 0\.\.127 of conv4"),
    ([_entry(unit="5")], "unit must be a channel index"),
    ([_entry(unit=True)], "unit must be a channel index"),
    ([_entry(kind=3)], "kind must be one of"),
    ([SMALL_SPEC[0], SMALL_SPEC[1], _entry(concepts=["blue"])],
     r"unit 3: conv4:5 is already planted by unit 1; give each \(layer, unit\) once"),
    (["conv4:5 red"], "unit 1: expected a mapping with keys layer, unit, kind, concepts"),
    ([], "expected a non-empty list of planted units"),
    ({"units": SMALL_SPEC, "name": "mine"}, "a mapping at the top must hold only 'units'"),
    ({"layer": "conv4"}, "a mapping at the top must hold only 'units'"),
    ("conv4", "expected a non-empty list of planted units"),
])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_load_spec_names_the_file_and_the_entry_of_every_error(tmp_path, data, message,
                                                                suffix):
    path = _write(tmp_path / f"bad{suffix}", data)
    with pytest.raises(ValueError, match=message) as info:
        load_spec(path)
    assert str(info.value).startswith(path)


def test_load_spec_reports_a_missing_file_and_bad_syntax(tmp_path):
    with pytest.raises(FileNotFoundError, match="planted spec not found: .*none.yaml"):
        load_spec(tmp_path / "none.yaml")
    (tmp_path / "bad.json").write_text("[{'layer': conv4}]")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        load_spec(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("- {layer: conv4, unit: [}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="empty.yaml: expected a non-empty list"):
        load_spec(tmp_path / "empty.yaml")


def test_the_held_out_spec_is_valid_and_differs_from_the_committed_units():
    from pathlib import Path

    spec = Path(__file__).resolve().parents[1] / "eval" / "planted_heldout.yaml"
    units = load_spec(spec)
    assert planted_layers(units) == planted_layers()
    assert {u.kind for u in units} == {u.kind for u in PLANTED}
    committed = {(u.kind, u.concepts) for u in PLANTED if u.kind != "textual"}
    assert not committed & {(u.kind, u.concepts) for u in units}


# ------------------------------------------------------------------------- training


def test_train_refuses_a_spec_for_other_models_and_for_the_committed_folder(tmp_path,
                                                                            capsys):
    spec = _write(tmp_path / "spec.yaml", SMALL_SPEC)
    for argv in (["--only", "target", "--spec", spec, "--out", str(tmp_path)],
                 ["--spec", spec, "--out", str(tmp_path)]):
        with pytest.raises(SystemExit):
            train.main(argv)
        assert "--spec sets the planted units and applies to `--only planted`" in \
            capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--only", "planted", "--spec", spec])
    assert "would overwrite the committed weights" in capsys.readouterr().err


def test_train_script_trains_a_spec_a_few_steps_and_records_its_units(tmp_path):
    from dnd.target import load_target

    spec = _write(tmp_path / "spec.yaml", SMALL_SPEC)
    out = tmp_path / "weights"
    metrics = train.main(["--only", "planted", "--spec", spec, "--steps", "2",
                          "--n-train", "24", "--n-eval", "24", "--batch-size", "8",
                          "--out", str(out)])
    record = json.loads((out / f"{PLANTED_STEM}.json").read_text())["training"]
    assert record["planted_spec"] == spec
    assert [(u["layer"], u["unit"], u["kind"], u["concepts"]) for u in
            record["planted_units"]] == [tuple(d.values()) for d in SMALL_SPEC]
    assert metrics["planted"]["planted_units"] == record["planted_units"]
    check_trained_for_planted(str(out), load_spec(spec))  # folder: accepted for its spec
    with pytest.raises(ValueError, match="trained for other planted units than dnd"):
        check_trained_for_planted(str(out))  # ... and refused for PLANTED
    # The target loads from the folder as from its weights file, with one weights id.
    by_dir = load_target("toyworld-planted", str(out))
    by_file = load_target("toyworld-planted", str(out / f"{PLANTED_STEM}.safetensors"))
    assert by_dir.weights_id == by_file.weights_id != "random"


# ------------------------------------------------------------------ benchmark checks


def test_weights_are_checked_against_a_custom_spec(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    record = spec_to_dicts(SMALL_UNITS)
    (folder / f"{PLANTED_STEM}.json").write_text(
        json.dumps({"training": {"planted_units": record[::-1]}}))  # order does not matter
    check_trained_for_planted(str(folder), SMALL_UNITS)
    check_trained_for_planted(folder / f"{PLANTED_STEM}.safetensors", SMALL_UNITS)
    other = [*SMALL_UNITS[:-1], PlantedUnit("conv3", 3, "monosemantic", ("blue",))]
    with pytest.raises(ValueError, match="than the planted spec's units.*--spec FILE"):
        check_trained_for_planted(str(folder), other)
    with pytest.raises(ValueError, match=r"5 trained, 4 wanted; trained, not wanted: "
                       r"\('conv3', 3, 'textual', \('text',\)\); wanted, not trained: none"):
        check_trained_for_planted(str(folder), SMALL_UNITS[:4])
    (folder / f"{PLANTED_STEM}.json").unlink()
    check_trained_for_planted(str(folder), SMALL_UNITS)
    assert "not checked against the planted spec" in caplog.text


def test_dnd_tables_refuses_spec_and_weights_for_other_tables(tmp_path, capsys):
    from dnd.benchmarks.tables import run_tables
    from dnd.cli import main

    spec = _write(tmp_path / "spec.yaml", SMALL_SPEC)
    for names in (None, ["toyworld_planted", "toyworld_benchmark"]):
        with pytest.raises(ValueError, match="apply to tables of kind toyworld_planted only"
                           ".*toyworld_benchmark would ignore them"):
            run_tables(names, tmp_path, planted_spec=spec, planted_weights=str(tmp_path))
    assert main(["tables", "--only", "toyworld_benchmark", "--weights", str(tmp_path),
                 "--out", str(tmp_path)]) == 2
    assert "--weights apply to tables of kind toyworld_planted only" in capsys.readouterr().err
    # The committed weights were trained for PLANTED: refused for the spec, before any run.
    with pytest.raises(ValueError, match="trained for other planted units"):
        run_tables(["toyworld_planted"], tmp_path, planted_spec=spec)
    with pytest.raises(FileNotFoundError, match="--weights .*missing: no such folder"):
        run_tables(["toyworld_planted"], tmp_path, planted_weights=str(tmp_path / "missing"))
    assert not list(tmp_path.glob("*.md"))


def test_dnd_tables_with_a_spec_writes_its_own_file_with_the_full_command(tmp_path,
                                                                          monkeypatch):
    from dnd.benchmarks import tables

    spec = _write(tmp_path / "mine.yaml", SMALL_SPEC)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / f"{PLANTED_STEM}.json").write_text(
        json.dumps({"training": {"planted_units": spec_to_dicts(SMALL_UNITS)}}))
    seen = {}

    def fake_runner(table, resolve, embedders, cache_dir, progress):
        seen.update(table.options)
        return ["numbers"]

    monkeypatch.setitem(tables.RUNNERS, "toyworld_planted", fake_runner)
    out = tmp_path / "results"
    written = tables.run_tables(["toyworld_planted"], out, planted_spec=spec,
                                planted_weights=str(weights), cache_dir=tmp_path / "cache")
    assert written == {"toyworld_planted": out / "toyworld_planted-mine.md"}
    assert seen["spec"] == spec and seen["weights"] == str(weights)
    text = written["toyworld_planted"].read_text()
    assert (f"Regenerate: `dnd tables --only toyworld_planted --spec {spec} --weights "
            f"{weights} --out {out}`") in text
    assert text.rstrip().endswith("numbers")
    assert not (out / "toyworld_planted.md").exists()


def test_planted_benchmark_runs_get_a_folder_per_spec_and_weights(tmp_path):
    from dnd.benchmarks.tables import _planted_cache

    weights = tmp_path / "w"
    weights.mkdir()
    (weights / f"{PLANTED_STEM}.safetensors").write_bytes(b"one")
    first = _planted_cache(tmp_path, "eval/mine.yaml", str(weights))
    assert first.name.startswith("toyworld-planted-mine-")
    assert _planted_cache(tmp_path, None, "DEFAULT") == tmp_path / "toyworld-planted"
    assert _planted_cache(tmp_path, "mine.json", str(weights / f"{PLANTED_STEM}.safetensors")
                          ) == first
    (weights / f"{PLANTED_STEM}.safetensors").write_bytes(b"two")  # retrained: a new run
    assert _planted_cache(tmp_path, "eval/mine.yaml", str(weights)) != first


def test_the_planted_benchmark_judges_every_free_channel_or_the_first_ones():
    from dnd.benchmarks.planted import _unit_spec
    from dnd.benchmarks.tables import _free_units

    planted, free = _unit_spec("conv2", None)
    assert planted == [0, 1, 2, 3, 4, 5] and free == list(range(6, 32))  # conv2: 32 channels
    assert _unit_spec("conv2", 3)[1] == [6, 7, 8]
    with pytest.raises(ValueError, match="conv2 has 26 free channels, asked for 27"):
        _unit_spec("conv2", 27)
    assert _free_units("all") is None and _free_units(0) == 0
    for bad in (-1, "16", 2.5, True):
        with pytest.raises(ValueError, match="free_units must be a count >= 0 or 'all'"):
            _free_units(bad)
