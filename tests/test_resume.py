"""Resume after SIGKILL: a run killed at random points and re-run finishes with every unit
exactly once and the same labels as an uninterrupted run, and a finished run re-run sends
no LLM request. Runs the real CLI in a subprocess on the toy world, with the summariser's
LLM behind the local fake chat server (requests counted there)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from fake_openai import FakeOpenAI, Reply

SENTINEL = "sk-resume-sentinel-4242"


# Caption words the toy renderer cannot draw on their own: a unit whose every candidate is
# one of them gets an unscored fallback label, which this test does not want.
NOT_DRAWABLE = {"background", "picture", "front", "with", "word", "there"}


def script(body, n):
    """Each of the request's n replies is a word of its captions, chosen by content (so the
    replies never depend on the order in which requests arrive)."""
    text = body["messages"][-1]["content"]
    captions = [line.split(". ", 1)[-1] for line in text.splitlines() if line[:1].isdigit()]
    words = [w for c in captions for w in c.split() if w.isalpha() and len(w) > 3]
    pool = [w for w in words if w not in NOT_DRAWABLE] or ["thing"]
    first = zlib.crc32(text.encode())
    return Reply(content=[pool[(first + j) % len(pool)] for j in range(body.get("n", 1))])


def _argv(run_dir, base_url):
    cfg = run_dir.parent / f"{run_dir.name}.yaml"
    cfg.write_text(
        "summarizer: llm\n"
        f"llm: {{name: openai, options: {{model: fake, base_url: '{base_url}', "
        "max_retries: 0}}\n")
    return [sys.executable, "-m", "dnd.cli", "describe", "--preset", "toyworld", "--config",
            str(cfg), "--probe", "toyworld:300", "--units", "0-7", "--chunk-units", "2",
            "--images-per-concept", "4", "--run-dir", str(run_dir), "-q"]


def _env():
    return {**os.environ, "OPENAI_API_KEY": SENTINEL, "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "2"}


def _labels(run_dir):
    rows = list(csv.reader(open(run_dir / "labels.csv")))
    return rows[0], {r[0]: r[1:] for r in rows[1:]}, [r[0] for r in rows[1:]]


@pytest.mark.faults
def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
    rng = np.random.default_rng(0)
    with FakeOpenAI(script) as server:
        clean = tmp_path / "clean"
        subprocess.run(_argv(clean, server.base_url), env=_env(), check=True, timeout=600)
        clean_requests = len(server.requests)
        killed = tmp_path / "killed"
        kills = 0
        for _ in range(3):
            proc = subprocess.Popen(_argv(killed, server.base_url), env=_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(float(rng.uniform(4.0, 12.0)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        subprocess.run(_argv(killed, server.base_url), env=_env(), check=True, timeout=600)
        sent = len(server.requests)
        # A finished run re-run pays nothing.
        subprocess.run(_argv(killed, server.base_url), env=_env(), check=True, timeout=600)
        assert len(server.requests) == sent
    assert kills >= 1
    header, clean_labels, _ = _labels(clean)
    _, killed_labels, order = _labels(killed)
    assert header == ["Neuron ID", "Label 1", "Label 2", "Label 3"]
    assert sorted(order) == sorted(set(order)) == [str(u) for u in range(8)]
    assert killed_labels == clean_labels
    for u in range(8):
        a = json.loads((clean / "units" / "fc" / f"{u}.json").read_text())
        b = json.loads((killed / "units" / "fc" / f"{u}.json").read_text())
        assert a["candidates"] == b["candidates"] and a["captions"] == b["captions"]
        assert a["labels"] == b["labels"] and a.get("fallback") == b.get("fallback")
        sa, sb = a.get("selection") or {}, b.get("selection") or {}
        assert sa.get("order") == sb.get("order")
        assert np.allclose(sa.get("final_scores", []), sb.get("final_scores", []), atol=1e-5)
    # Cached replies were not bought again: the interrupted runs together sent at most
    # what one clean run sends plus the requests in flight at each kill.
    assert sent - clean_requests <= clean_requests + kills * 64
    for p in killed.rglob("*"):
        if p.is_file():
            assert SENTINEL.encode() not in p.read_bytes(), p
