"""Failures stay contained: a unit whose LLM calls fail is recorded as failed with the
reason, the others finish, and --retry-failed redoes only the failed ones."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import colour_target

from dnd.api import describe
from dnd.backends.factory import Models
from dnd.backends.llm import ChatReply, LLMError
from dnd.cli import main
from dnd.config import RunConfig


class ColourCaptioner:
    identity = {"backend": "colour-words"}

    def caption(self, images):
        """'a <colour> thing' for the strongest channel at the image centre."""
        words = ("red", "green", "blue")
        centre = [im.getpixel((im.width // 2, im.height // 2)) for im in images]
        return [f"a {words[max(range(3), key=px.__getitem__)]} thing" for px in centre]


class FlakyLLM:
    """Answers with the first word it sees after 'a '; fails every request that mentions
    ``bad_word`` while ``broken`` is set."""

    cache_identity = {"backend": "flaky"}

    def __init__(self, bad_word):
        self.bad_word, self.broken, self.calls = bad_word, True, 0

    def complete(self, messages, *, temperature, sample=0):
        raise NotImplementedError

    def complete_many(self, requests):
        out = []
        for r in requests:
            self.calls += 1
            text = r.messages[-1]["content"]
            if self.broken and self.bad_word in text:
                out.append(LLMError("gave up after 3 tries; last error: HTTP 503"))
            else:
                out.append(ChatReply(("green thing" if "green" in text else "grey thing",)
                                     * r.n))
        return out


def test_failed_unit_is_recorded_and_retried_alone(colour_probe, tmp_path):
    folder, _, _ = colour_probe
    llm = FlakyLLM("green")
    models = Models(captioner=ColourCaptioner(), llm=llm)
    config = RunConfig.from_dict({"model": "colournet", "layer": "pool", "probe": [str(folder)],
                                  "units": "0-1", "stop_after": "candidates",
                                  "crop": {"top_n": 3}, "summarize": {"num_samples": 2}})
    run = tmp_path / "run"
    res = describe(config, run, target=colour_target(), models=models, progress=False)
    assert list(res.failed) == [1] and "HTTP 503" in res.failed[1]
    assert res.done_now == [0]
    rec1 = json.loads((run / "units/pool/1.json").read_text())
    assert rec1["failed_at"] == "candidates" and rec1["stage"] == "captions"
    # A plain re-run leaves the failed unit alone (and says so).
    calls = llm.calls
    again = describe(config, run, target=colour_target(), models=models, progress=False)
    assert list(again.failed) == [1] and llm.calls == calls
    # --retry-failed redoes only unit 1, from the failed stage.
    llm.broken = False
    fixed = describe(config, run, target=colour_target(), models=models, progress=False,
                     retry_failed=True)
    assert fixed.failed == {} and fixed.done_now == [1]
    rec1 = json.loads((run / "units/pool/1.json").read_text())
    assert rec1["stage"] == "candidates" and "error" not in rec1
    # The reply's concept and its part the captions name ("thing" alone says nothing).
    assert set(rec1["candidates"]["concepts"]) == {"green", "green thing"}


class LoopingLLM:
    """A small model stuck in a loop: every reply is a hyphen chain."""

    cache_identity = {"backend": "looping"}

    def complete_many(self, requests):
        return [ChatReply(("grey-grey-grey-grey",) * r.n) for r in requests]


def test_llm_with_no_usable_reply_falls_back_to_caption_phrases(colour_probe, tmp_path):
    """No unit with captions is left without candidates: when every reply is rejected (and
    re-asked), the captions' shared phrases stand in, marked as a fallback."""
    folder, _, _ = colour_probe
    models = Models(captioner=ColourCaptioner(), llm=LoopingLLM())
    base = {"model": "colournet", "layer": "pool", "probe": [str(folder)], "units": "0",
            "stop_after": "candidates", "crop": {"top_n": 3}}
    res = describe(RunConfig.from_dict(base), tmp_path / "a", target=colour_target(),
                   models=models, progress=False)
    assert res.failed == {} and res.done_now == [0]
    cands = json.loads((tmp_path / "a/units/pool/0.json").read_text())["candidates"]
    # The shared phrase and its part, ranked by coverage (equal: fewer words first).
    assert cands["concepts"][:2] == ["red", "red thing"]
    assert dict(zip(cands["concepts"], cands["sources"]))["red thing"] == ["consensus"]
    assert "no usable concept in 15 replies" in cands["fallback"]
    assert {r["reason"] for r in cands["rejected"]} == {"a repeated word"}
    assert cands["usage"]["requests"] == 3  # the first ask and two re-asks


def test_cli_exit_status_counts_failures(colour_probe, tmp_path, capsys, monkeypatch):
    folder, _, _ = colour_probe
    import dnd.loading as loading

    monkeypatch.setattr(loading, "load_llm", lambda config: FlakyLLM("green"))
    monkeypatch.setattr(loading, "load_models",
                        lambda config, device, llm: Models(captioner=ColourCaptioner(), llm=llm))
    monkeypatch.setattr(loading, "load_target", lambda name, weights: colour_target())
    # The models above replace the config's (BLIP ...), so nothing is looked for on disk.
    monkeypatch.setattr(loading, "check_run", lambda *a, **k: None)
    argv = ["describe", "--model", "colournet", "--layer", "pool", "--probe", str(folder),
            "--units", "0-1", "--stop-after", "candidates", "--run-dir", str(tmp_path / "r"),
            "-q"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "1 unit(s) failed, e.g. unit 1" in err
    # A failed unit is counted as failed, never as done.
    assert "2 unit(s) of pool: 1 done now, 0 already done, 1 failed" in out
    assert main(argv) == 1  # the failed unit is left alone, and said to be
    assert ("0 done now, 1 already done, 1 failed (1 in an earlier run, left alone: "
            "--retry-failed redoes them)") in capsys.readouterr().out


def _models_downloadable(monkeypatch):
    """As on a connected machine: the preset's models are not cached but could be
    downloaded, so the preflight lets the run go on (no connection is made)."""
    from dnd import preflight

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(preflight, "host_reachable", lambda url, *a: True)


def test_missing_api_key_and_unknown_backend_fail_before_the_pass(colour_probe, tmp_path,
                                                                   monkeypatch):
    import pytest
    from test_pipeline import CountingProbe

    from dnd.probe import open_probe

    folder, _, _ = colour_probe
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    _models_downloadable(monkeypatch)
    probe = CountingProbe(open_probe(str(folder)))
    base = {"model": "colournet", "layer": "pool", "probe": [str(folder)], "units": "0"}
    with pytest.raises(Exception, match="OPENAI_API_KEY"):
        describe(RunConfig.from_dict(base), tmp_path / "a", target=colour_target(),
                 probe=probe, progress=False)
    with pytest.raises(KeyError, match="unknown captioner 'bllip'; did you mean: blip"):
        describe(RunConfig.from_dict({**base, "captioner": {"name": "bllip"},
                                      "summarizer": "consensus"}),
                 tmp_path / "b", target=colour_target(), probe=probe, progress=False)
    assert probe.loads == 0 and not (tmp_path / "a").exists()


def test_paper_preset_without_key_fails_before_loading_the_target(tmp_path, monkeypatch,
                                                                   capsys):
    import dnd.loading as loading

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    _models_downloadable(monkeypatch)

    def no_target(*a, **k):
        raise AssertionError("the target must not load before the API key check")

    monkeypatch.setattr(loading, "load_target", no_target)
    assert main(["describe", "--preset", "paper", "--probe", str(tmp_path), "--run-dir",
                 str(tmp_path / "r"), "-q"]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err


def test_out_of_memory_halves_the_batch_then_fails_the_units_with_a_reason(colour_probe,
                                                                           tmp_path):
    import torch

    from dnd.backends.base import run_batched

    sizes = []

    def fn(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return [x * 10 for x in batch]

    assert run_batched(fn, list(range(7)), 8) == [x * 10 for x in range(7)]
    assert sizes[:3] == [7, 4, 2]  # halved until it fits, then kept

    class OOMCaptioner:
        identity = {"backend": "oom"}

        def caption(self, images):
            return run_batched(self._batch, list(images), 4, "captioning")

        def _batch(self, batch):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    folder, _, _ = colour_probe
    config = RunConfig.from_dict({"model": "colournet", "layer": "pool", "probe": [str(folder)],
                                  "units": "0-1", "stop_after": "captions"})
    res = describe(config, tmp_path / "run", target=colour_target(),
                   models=Models(captioner=OOMCaptioner()), progress=False)
    assert set(res.failed) == {0, 1}
    assert "captions: out of memory even at batch size 1" in res.failed[0]
    rec = json.loads((tmp_path / "run/units/pool/0.json").read_text())
    assert rec["stage"] == "crops" and rec["failed_at"] == "captions"


def test_layer_names_cannot_write_outside_the_run_directory(tmp_path):
    from dnd.record import UnitRecord
    from dnd.store import RunStore

    store = RunStore(tmp_path / "run")
    path = store.write_unit(UnitRecord("../../escape", 3))
    assert tmp_path / "run" in path.resolve().parents
    assert not (tmp_path / "escape").exists()


def test_atomic_write_flushes_unless_told_not_to(tmp_path, monkeypatch):
    """The io helper: a write is flushed (fsync) by default and not with ``durable=False``;
    either way it is atomic and leaves no temporary file. Which stores flush: below."""
    from dnd.io import atomic_write_bytes, atomic_write_text

    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(fd), real_fsync(fd)))
    atomic_write_text(tmp_path / "record.json", "{}")
    assert len(flushed) == 1
    atomic_write_bytes(tmp_path / "thumb.jpg", b"jpeg", durable=False)
    assert len(flushed) == 1 and (tmp_path / "thumb.jpg").read_bytes() == b"jpeg"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


class RedLLM:
    """Every reply names the red unit's concept (so Step 3 generates and caches images)."""

    cache_identity = {"backend": "red"}

    def complete_many(self, requests):
        return [ChatReply(("red thing",) * r.n) for r in requests]


# Files of a run written atomically, by whether each write is flushed before it replaces
# the old file (fnmatch patterns, relative to the run directory). Flushed: what model calls
# paid for or a resumed run relies on (records, caption and LLM-reply caches, labels, the
# config, the activations' metadata). Not flushed: what is recomputed when damaged, where
# the flush would slow thousands of small writes (the whole report is rebuilt from the
# records).
FLUSHED = ("units/*", "cache/captions/*", "cache/llm/*", "labels.csv", "config.yaml", "work.json",
           "activations/*/meta.json")
NOT_FLUSHED = ("cache/generated/*", "report/img/*", "report/units/*", "report/index.html")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_which_stores_of_a_run_flush_their_writes_to_disk(colour_probe, tmp_path, monkeypatch):
    """A whole run on the colour network (records, caches, labels, report) with os.fsync and
    os.replace counted per file: every write of a store in FLUSHED is flushed, no write of
    one in NOT_FLUSHED is, and no file is written outside both lists."""
    from fnmatch import fnmatch

    from test_score_stage import ColourGenerator, MeanColourEncoder

    folder, _, _ = colour_probe
    run = tmp_path / "run"
    writes, flushes = Counter(), Counter()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        # The descriptor is the temporary sibling ".<name>.<random>.tmp" of the final file.
        temp = Path(os.readlink(f"/proc/self/fd/{fd}"))
        final = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", temp.name)
        flushes[temp.parent / final.group(1) if final else temp] += 1
        real_fsync(fd)

    def replace(src, dst):
        writes[Path(dst)] += 1
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    models = Models(captioner=ColourCaptioner(), llm=RedLLM(), generator=ColourGenerator(),
                    encoder=MeanColourEncoder())
    config = RunConfig.from_dict({"model": "colournet", "layer": "pool", "probe": [str(folder)],
                                  "units": "0-1", "crop": {"top_n": 3},
                                  "summarize": {"num_samples": 2}})
    res = describe(config, run, target=colour_target(), models=models, progress=False)
    monkeypatch.undo()
    assert res.failed == {} and res.done_now == [0, 1]

    written = {str(p.relative_to(run)): n for p, n in writes.items() if run in p.parents}
    flushed = {str(p.relative_to(run)): n for p, n in flushes.items() if run in p.parents}
    assert set(flushed) <= set(written) and sum(flushed.values()) == sum(flushes.values())
    for rel, n in written.items():
        durable = [pat for pat in FLUSHED if fnmatch(rel, pat)]
        recomputed = [pat for pat in NOT_FLUSHED if fnmatch(rel, pat)]
        assert durable or recomputed, f"{rel}: a new store; add it to FLUSHED or NOT_FLUSHED"
        # Unit records are written once per stage, and each of those writes is flushed.
        assert flushed.get(rel, 0) == (n if durable else 0), (rel, n, flushed.get(rel, 0))
    for pattern in FLUSHED + NOT_FLUSHED:  # the run wrote every kind of file
        assert any(fnmatch(rel, pattern) for rel in written), pattern
    assert written["units/pool/0.json"] > 1
