"""The whole pipeline offline with tiny random-weight real models: BLIP, an LLM behind the
local fake chat server, Stable Diffusion and open_clip, on the hand-weighted colour CNN."""

from __future__ import annotations

import csv
import json
import zlib

import pytest
from conftest import colour_target
from fake_openai import FakeOpenAI, Reply
from tiny_blip import tiny_blip
from tiny_models import tiny_open_clip, tiny_sd_pipeline

from dnd.api import describe
from dnd.backends.caption import TransformersCaptioner
from dnd.backends.encode import OpenClipEncoder
from dnd.backends.factory import Models
from dnd.backends.generate import DiffusersGenerator
from dnd.backends.openai_chat import OpenAIChat, OpenAIChatConfig
from dnd.config import RunConfig

CONCEPTS = ["red squares", "stripes", "blue water", "green leaves", "checkerboard"]


def script(body, n):
    """A concept request's n replies are drawn from five concepts (a random BLIP repeats one
    caption, so the replies cannot depend on the captions), picked by a hash of the
    captions, so the replies do not depend on which unit's request arrives first."""
    text = body["messages"][-1]["content"]
    first = zlib.crc32(text.encode())
    return Reply(content=[CONCEPTS[(first + j * j) % len(CONCEPTS)]
                          for j in range(body.get("n", 1))])


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-e2e-sentinel-0123456789")
    blip, proc = tiny_blip(tmp_path, "a red square blue circle on green background".split())
    with FakeOpenAI(script) as server:
        yield server, Models(
            captioner=TransformersCaptioner("tiny-blip", model=blip, processor=proc,
                                            max_new_tokens=6, min_length=6),
            llm=OpenAIChat(OpenAIChatConfig(model="fake", base_url=server.base_url,
                                            max_retries=0, max_concurrency=1)),
            generator=DiffusersGenerator("tiny-sd", pipe=tiny_sd_pipeline(tmp_path), steps=2,
                                         height=32, width=32, batch_size=8),
            encoder=OpenClipEncoder(components=tiny_open_clip(tmp_path)),
        )


def test_three_units_get_three_labels_and_complete_records(colour_probe, tmp_path, models,
                                                           caplog):
    caplog.set_level("DEBUG")
    server, m = models
    folder, _, _ = colour_probe
    config = RunConfig.from_dict({
        "model": "colournet", "layer": "pool", "probe": [str(folder)], "units": "0-2",
        "crop": {"top_n": 3, "top_k": 4}, "summarize": {"num_samples": 5},
        "score": {"images_per_concept": 2, "beta": 1}})
    run = tmp_path / "run"
    result = describe(config, run, target=colour_target(), models=m, progress=False)
    assert result.failed == {} and result.done_now == [0, 1, 2]
    words = {w for c in CONCEPTS for w in c.split()}
    for u in range(3):
        rec = json.loads((run / "units" / "pool" / f"{u}.json").read_text())
        assert rec["stage"] == "labels"
        # The 3 top images, each with its best crop where the unit fires: units 0 (red, a
        # square in each top image) and 1 (green, two squares in one image); unit 2 never
        # fires, its maps are flat: no crop.
        act = rec["activating_images"]
        assert len(rec["captions"]) == len(act)
        assert sum(e["box"] is None for e in act) == 3
        assert sum(e["box"] is not None for e in act) == {0: 3, 1: 1, 2: 0}[u]
        assert all(len(c.split()) >= 3 for c in rec["captions"])
        # The replies' concepts and their parts ("red squares": "red", "squares").
        assert {w for c in rec["candidates"]["concepts"] for w in c.split()} <= words
        sel = rec["selection"]
        assert sel["rule"] == "evidence" and 0 <= rec["confidence"] <= 1
        assert 1 <= len(rec["labels"]) <= 3 and rec["labels"][0] == sel["labels"][0]
        for label in rec["labels"][1:]:  # Labels 2-3 only with evidence of both kinds
            i = sel["candidates"].index(label)
            assert sel["responses"][i] >= 0.5 and sel["coverage"][i] >= 0.4
        assert len(sel["ranks"]) == 2 * len(sel["candidates"])
        assert all(len(v) == 2 for v in rec["generated"].values())
    rows = list(csv.reader(open(run / "labels.csv")))
    assert rows[0] == ["Neuron ID", "Label 1", "Label 2", "Label 3"] and len(rows) == 4
    assert all(r[1] for r in rows[1:])
    # Nothing is paid twice: a re-run asks the LLM nothing and finishes at once.
    sent = len(server.requests)
    again = describe(config, run, target=colour_target(), models=m, progress=False)
    assert again.done_now == [] and len(server.requests) == sent
    # The API key appears nowhere in the run directory (report included) or the logs.
    assert (run / "report" / "index.html").is_file()
    assert "sk-e2e-sentinel" not in caplog.text
    for p in run.rglob("*"):
        if p.is_file():
            assert b"sk-e2e-sentinel" not in p.read_bytes(), p
