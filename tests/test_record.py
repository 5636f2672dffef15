"""The unit record: one typed object per unit, the only code that knows the JSON layout."""

from __future__ import annotations

import json

import pytest

from dnd.record import (
    SCHEMA_VERSION,
    Candidates,
    Evidence,
    LLMUsage,
    RecordError,
    Rejection,
    Scoring,
    UnitCrops,
    UnitRecord,
)
from dnd.stages.select import select_concept
from dnd.store import RunStore

SEL = select_concept(["dog", "cat"], [[3.0, 2.0], [1.0, 0.0]],
                     [[0.9, 0.8, 0.1, 0.2]], k=2, beta=1)


def full_record() -> UnitRecord:
    top = Evidence(7, "imgs/7.jpg", None, 2.5, ((0.0, 1.0), (2.0, 3.0)), (0, 0, 64, 64))
    crop = Evidence(7, "imgs/7.jpg", (1, 2, 30, 40), 3.0)
    return UnitRecord(
        "layer4", 12, stage="labels", model="resnet50", weights="IMAGENET1K_V2",
        crops=UnitCrops((top,), (crop,), (crop, top)),
        captions=("a dog on grass", "a dog"), captioner={"backend": "blip"},
        candidates=Candidates(12, ("dog", "cat"), (("llm",), ("consensus",)), ("dog",),
                              (Rejection("dog-dog-dog", "a repeated word"),),
                              ("summarize_concept.v2",), LLMUsage(1, 100, 5, 0)),
        scoring=Scoring(("dog",), 0.61, {"banana": "cannot render"}, SEL,
                        {"dog": ("ab12", "cd34"), "cat": ("ef56", "0789")},
                        {"dog": "a photo of dog", "cat": "a photo of cat"}))


def test_a_record_round_trips_through_its_json_file(tmp_path):
    rec = full_record()
    store = RunStore(tmp_path)
    path = store.write_unit(rec)
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA_VERSION
    assert data["labels"] == ["dog"] and data["selection"]["labels"] == ["dog", "cat"]
    assert data["activating_images"][0] == {"index": 7, "image": "imgs/7.jpg",
                                            "box": [1, 2, 30, 40], "activation": 3.0}
    assert store.read_unit("layer4", 12) == rec
    assert store.records("layer4") == [rec]


def test_records_written_before_the_schema_field_are_read():
    """Schema 1 files (no "schema" key) have today's layout: read as they are."""
    data = full_record().to_json()
    data.pop("schema")
    assert UnitRecord.from_json(data) == full_record()


def test_a_record_from_a_newer_dnd_is_refused_with_the_fix(tmp_path):
    data = full_record().to_json() | {"schema": SCHEMA_VERSION + 1}
    (tmp_path / "units" / "layer4").mkdir(parents=True)
    (tmp_path / "units" / "layer4" / "12.json").write_text(json.dumps(data))
    with pytest.raises(RecordError, match="newer than this dnd reads.*upgrade dnd"):
        RunStore(tmp_path).read_unit("layer4", 12)


def test_a_malformed_record_names_the_unit():
    with pytest.raises(RecordError, match="unit 3 is malformed"):
        UnitRecord.from_json({"layer": "fc", "unit": 3, "captions": 5})


def test_stage_bookkeeping():
    rec = UnitRecord("fc", 0)
    assert rec.due("crops") and not rec.due("captions") and not rec.reached("crops")
    failed = rec.fail("crops", "out of memory")
    assert failed.failed and not failed.due("crops") and failed.stage is None
    assert failed.to_json() == {"schema": SCHEMA_VERSION, "layer": "fc", "unit": 0,
                                "error": "out of memory", "failed_at": "crops"}
    again = failed.retry()
    assert again.due("crops") and not again.failed
    done = full_record()
    assert done.reached("captions") and not done.due("labels") and done.labels == ("dog",)


def test_fallbacks_and_other_feature_bases(tmp_path):
    rec = UnitRecord("fc", 1, basis="sae-64", scoring=Scoring(("dog",), fallback="unscored"))
    assert rec.fallbacks == ("unscored",)
    store = RunStore(tmp_path)
    path = store.write_unit(rec)
    assert path.parent.name == "fc@sae-64" and json.loads(path.read_text())["basis"] == "sae-64"
    assert store.read_unit("fc", 1, basis="sae-64") == rec and store.records("fc") == []
