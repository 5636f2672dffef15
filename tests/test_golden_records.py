"""Restructuring must not change results: a small toy-world run's unit records and
labels.csv equal the ones committed in tests/data/golden/ (timings and paths ignored).

Labels, candidates, selection order and every other string, integer and list length must
be equal exactly. Floats that the record rounds when it stores them (activation maps: 4
decimals) may differ by one unit of their last stored decimal: another machine's kernels
move the 5th decimal enough to flip the rounding now and then. Other floats (stored as
computed) may differ by 1e-4 relative.

Two runs: the demo's configuration (consensus summariser) and the LLM path with a scripted
chat server, so records with replies, rejections and usage are pinned too. Regenerate the
files only when a change is meant to alter results: ``python tests/test_golden_records.py``
(and say why in the commit).
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path

import pytest

HERE = Path(__file__).parent
GOLDEN = HERE / "data" / "golden"
PROBE = "toyworld:300"
RUNS = {  # name -> (layer, units, overrides)
    "consensus-fc": ("fc", "0-3", {}),
    "consensus-conv4": ("conv4", "0-3", {}),
    "llm-fc": ("fc", "4-6", {"summarizer": "llm+consensus", "llm.name": "openai",
                             "llm.options.model": "scripted", "llm.options.max_retries": 0}),
}
# Replies the scripted server gives, picked by a hash of the prompt: a phrase, a sentence
# the summariser cuts to its subject, and a degenerate reply it must reject.
REPLIES = ["red circle", "The object in almost every caption is a green square.",
           "blue-blue-blue-blue-blue", "stripes"]


def _script(body, count):
    """The same prompt always gets the same replies, whatever order requests arrive in."""
    from fake_openai import Reply

    first = zlib.crc32(body["messages"][-1]["content"].encode())
    return Reply(content=[REPLIES[(first + j) % len(REPLIES)] for j in range(body.get("n", 1))])


def run_all(root: Path) -> dict[str, Path]:
    """Run every configuration of RUNS under ``root``; returns name -> run directory."""
    sys.path.insert(0, str(HERE))
    from fake_openai import FakeOpenAI

    from dnd.config import load_config
    from dnd.pipeline import describe

    out = {}
    with FakeOpenAI(_script) as server:
        for name, (layer, units, extra) in RUNS.items():
            overrides = {"layer": layer, "units": units, "probe": [PROBE], **extra}
            if "llm.name" in extra:
                overrides["llm.options.base_url"] = server.base_url
            config = load_config(preset="toyworld", overrides=overrides)
            describe(config, root / name, progress=False)
            out[name] = root / name
    return out


def _records(run_dir: Path) -> dict[str, dict]:
    """Record files by "<layer>/<unit>", without the schema version (the committed records
    predate the field; the layout is otherwise the same)."""
    files = sorted((run_dir / "units").rglob("*.json"))
    out = {f"{p.parent.name}/{p.stem}": json.loads(p.read_text()) for p in files}
    for rec in out.values():
        rec.pop("schema", None)
    return out


# Record fields stored rounded -> their decimals (dnd/stages/crop.py rounds the small
# activation maps of the top images to 4 decimals).
STORED_DECIMALS = {"map": 4}


def _same(a, b, where: str, problems: list[str], decimals: int | None = None) -> None:
    """Append to ``problems`` every place where ``a`` and ``b`` differ: exactly, except
    floats. A float stored rounded to ``decimals`` (a field of :data:`STORED_DECIMALS`, and
    everything inside it) may differ by one unit of its last decimal; others by 1e-4
    relative (1e-6 absolute near zero)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                problems.append(f"{where}.{k}: only in {'golden' if k in a else 'new'}")
            else:
                _same(a[k], b[k], f"{where}.{k}", problems, STORED_DECIMALS.get(k, decimals))
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            problems.append(f"{where}: length {len(a)} -> {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]", problems, decimals)
    elif isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
            problems.append(f"{where}: {a!r} -> {b!r}")
        elif decimals is not None:
            if round(a, decimals) != a or round(b, decimals) != b:  # precision changed
                problems.append(f"{where}: {a!r} -> {b!r}, stored with more than {decimals} "
                                "decimals")
            # One unit of the last decimal; the slack absorbs binary representation (0.8337
            # - 0.8336 is 1.0000000000000009e-4).
            elif abs(a - b) > 10.0 ** -decimals * (1 + 1e-9):
                problems.append(f"{where}: {a!r} -> {b!r}")
        elif not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6):
            problems.append(f"{where}: {a!r} -> {b!r}")
    elif a != b:
        problems.append(f"{where}: {a!r} -> {b!r}")


def test_floats_stored_rounded_may_differ_by_one_unit_of_their_last_decimal():
    def problems(a, b) -> list[str]:
        out: list[str] = []
        _same(a, b, "r", out)
        return out

    # A 5th-decimal difference that flips the rounding of a stored map value passes...
    assert problems({"map": [[0.8337, 0.1154]]}, {"map": [[0.8336, 0.1155]]}) == []
    # ... two units, or a value stored with more decimals than the record keeps, do not.
    assert problems({"map": [[0.8337]]}, {"map": [[0.8335]]}) == ["r.map[0][0]: 0.8337 -> 0.8335"]
    assert len(problems({"map": [[0.8337]]}, {"map": [[0.83365]]})) == 1
    # Floats stored as computed: 1e-4 relative; a one-unit step of the 4th decimal is not.
    assert problems({"interpretability": 0.29224134}, {"interpretability": 0.29224135}) == []
    assert len(problems({"activation": 0.8337}, {"activation": 0.8336})) == 1
    # Labels, candidates and selection order: exactly.
    assert len(problems({"labels": ["red", "blue"]}, {"labels": ["blue", "red"]})) == 2
    assert len(problems({"selection": {"order": [0, 1]}}, {"selection": {"order": [1, 0]}})) == 2
    assert problems({"candidates": {"concepts": ["red"]}},
                    {"candidates": {"concepts": ["red", "dog"]}}) == [
        "r.candidates.concepts: length 1 -> 2"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_records_and_labels_equal_the_committed_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-golden-sentinel-0123456789")
    runs = run_all(tmp_path)
    problems: list[str] = []
    for name, run_dir in runs.items():
        golden = json.loads((GOLDEN / f"{name}.json").read_text())
        _same(golden["records"], _records(run_dir), name, problems)
        if golden["labels_csv"] != (run_dir / "labels.csv").read_text():
            problems.append(f"{name}: labels.csv differs")
    assert not problems, "\n".join(problems[:40])


if __name__ == "__main__":  # regenerate the committed records
    import os
    import tempfile

    os.environ.setdefault("OPENAI_API_KEY", "sk-golden-sentinel-0123456789")
    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, run_dir in run_all(Path(tmp)).items():
            data = {"records": _records(run_dir),
                    "labels_csv": (run_dir / "labels.csv").read_text()}
            (GOLDEN / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True)
                                                 + "\n")
            print(name, len(data["records"]), "records")
